/* wire.c — the JSON lines of the guest links (see guestlink.h). */
#include "drafter/guestlink.h"
#include "drafter/error.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static char *dump_line(json_t *j) {
        char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!s)
                return NULL;
        size_t n = strlen(s);
        char *line = realloc(s, n + 2);
        if (!line) {
                free(s);
                return NULL;
        }
        line[n] = '\n';
        line[n + 1] = '\0';
        return line;
}

char *guestlink_encode_request(uint64_t call, const char *function) {
        return dump_line(json_pack("{s:{s:I,s:s,s:[]}}", "request", "call", (json_int_t)call, "function", function,
                                   "args"));
}

char *guestlink_encode_response(uint64_t call, const char *err) {
        return dump_line(
                json_pack("{s:{s:I,s:n,s:s}}", "response", "call", (json_int_t)call, "value", "err", err ? err : ""));
}

/* The object under `key` with its call id. */
static int parse_envelope(const char *line, const char *key, json_t **ret_root, json_t **ret_inner,
                          uint64_t *ret_call) {
        json_error_t e;
        json_t *root = json_loads(line, JSON_REJECT_DUPLICATES, &e);
        if (!root)
                return error_set(-EBADMSG, "guest link: not JSON (%s)", e.text);
        json_t *inner = json_object_get(root, key);
        json_t *call = inner ? json_object_get(inner, "call") : NULL;
        if (!json_is_object(inner) || !json_is_integer(call) || json_integer_value(call) < 0) {
                json_decref(root);
                return error_set(-EBADMSG, "guest link: expected {\"%s\":{\"call\":<id>,…}}", key);
        }
        *ret_root = root;
        *ret_inner = inner;
        *ret_call = (uint64_t)json_integer_value(call);
        return 0;
}

int guestlink_parse_request(const char *line, uint64_t *ret_call, char **ret_function) {
        json_t *root, *req;
        uint64_t call;
        int r = parse_envelope(line, "request", &root, &req, &call);
        if (r < 0)
                return r;
        json_t *fn = json_object_get(req, "function");
        if (!json_is_string(fn) || json_string_length(fn) == 0) {
                json_decref(root);
                return error_set(-EBADMSG, "guest link: request %" PRIu64 " names no function", call);
        }
        char *function = strdup(json_string_value(fn));
        json_decref(root);
        if (!function)
                return -ENOMEM;
        *ret_call = call;
        *ret_function = function;
        return 0;
}

int guestlink_parse_response(const char *line, uint64_t *ret_call, char **ret_err) {
        json_t *root, *resp;
        uint64_t call;
        int r = parse_envelope(line, "response", &root, &resp, &call);
        if (r < 0)
                return r;
        json_t *err = json_object_get(resp, "err");
        if (err && !json_is_string(err)) {
                json_decref(root);
                return error_set(-EBADMSG, "guest link: response %" PRIu64 " has a non-string err", call);
        }
        char *text = strdup(err ? json_string_value(err) : "");
        json_decref(root);
        if (!text)
                return -ENOMEM;
        *ret_call = call;
        *ret_err = text;
        return 0;
}

bool guestlink_is_liveness(const char *line) {
        json_t *root = json_loads(line, 0, NULL);
        json_t *v = root ? json_object_get(root, "liveness") : NULL;
        bool ok = json_is_string(v) && strcmp(json_string_value(v), "ready") == 0;
        json_decref(root);
        return ok;
}
