/* fuzz-devices — the --devices JSON parser (lib/common/device_config.c) under every schema:
 * arbitrary text must parse or fail with a message, never crash or leak; a parsed list must hold
 * what the parser promises (names unique and non-empty, block sizes powers of two). */
#include "fuzz.h"
#include "drafter/device_config.h"
#include "drafter/error.h"
#include "drafter/log.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_level(LOG_NONE);
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char *json = malloc(size + 1);
        memcpy(json, data, size);
        json[size] = 0;
        const enum device_schema schemas[] = {DEVICE_SCHEMA_PEER, DEVICE_SCHEMA_SNAPSHOTTER, DEVICE_SCHEMA_PACKAGER};
        for (size_t k = 0; k < sizeof(schemas) / sizeof(schemas[0]); k++) {
                struct device_list list;
                error_clear();
                if (device_list_parse(json, schemas[k], &list) < 0) {
                        if (!*error_message())
                                abort(); /* every refusal says why */
                        continue;
                }
                for (size_t i = 0; i < list.count; i++) {
                        const struct device_config *c = &list.devices[i];
                        if (!c->name || !*c->name || device_list_find(&list, c->name) != c)
                                abort();
                        if (schemas[k] == DEVICE_SCHEMA_PEER && (c->block_size == 0 || (c->block_size & (c->block_size - 1))))
                                abort();
                }
                device_list_free(&list);
        }
        free(json);
        return 0;
}
