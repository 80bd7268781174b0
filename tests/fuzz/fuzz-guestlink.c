/* fuzz-guestlink — the agent's line protocol (lib/guestlink/wire.c): arbitrary lines parsed as
 * requests, responses and liveness messages. Nothing may crash or leak; what parses must
 * encode back to a line that parses to the same call. */
#include "fuzz.h"
#include "drafter/guestlink.h"
#include "drafter/log.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_level(LOG_NONE);
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char *line = malloc(size + 1);
        memcpy(line, data, size);
        line[size] = 0;
        uint64_t call, again;
        char *function = NULL, *err = NULL;
        if (guestlink_parse_request(line, &call, &function) == 0) {
                char *encoded = guestlink_encode_request(call, function);
                char *back = NULL;
                if (!encoded || guestlink_parse_request(encoded, &again, &back) != 0 || again != call ||
                    strcmp(back, function) != 0)
                        abort();
                free(back);
                free(encoded);
                free(function);
        }
        if (guestlink_parse_response(line, &call, &err) == 0) {
                char *encoded = guestlink_encode_response(call, err);
                char *back = NULL;
                if (!encoded || guestlink_parse_response(encoded, &again, &back) != 0 || again != call ||
                    (err == NULL) != (back == NULL) || (err && strcmp(err, back) != 0))
                        abort();
                free(back);
                free(encoded);
                free(err);
        }
        (void)guestlink_is_liveness(line);
        free(line);
        return 0;
}
