/* device_config.c — parse and validate the --devices JSON (see device_config.h). */
#include "drafter/device_config.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

enum field_kind { FIELD_STRING, FIELD_BOOL, FIELD_INT, FIELD_DURATION, FIELD_BLOCK_SIZE };

struct field {
        const char *name;
        enum field_kind kind;
        size_t offset;
        unsigned schemas; /* bit per enum device_schema */
};

#define SNAP (1u << DEVICE_SCHEMA_SNAPSHOTTER)
#define PACK (1u << DEVICE_SCHEMA_PACKAGER)
#define PEER (1u << DEVICE_SCHEMA_PEER)
#define AT(member) offsetof(struct device_config, member)

static const struct field fields[] = {
        {"name", FIELD_STRING, AT(name), SNAP | PACK | PEER},
        {"input", FIELD_STRING, AT(input), SNAP},
        {"output", FIELD_STRING, AT(output), SNAP},
        {"path", FIELD_STRING, AT(path), PACK},
        {"base", FIELD_STRING, AT(base), PEER},
        {"overlay", FIELD_STRING, AT(overlay), PEER},
        {"state", FIELD_STRING, AT(state), PEER},
        {"blockSize", FIELD_BLOCK_SIZE, AT(block_size), PEER},
        {"expiry", FIELD_DURATION, AT(expiry_ns), PEER},
        {"maxDirtyBlocks", FIELD_INT, AT(max_dirty_blocks), PEER},
        {"minCycles", FIELD_INT, AT(min_cycles), PEER},
        {"maxCycles", FIELD_INT, AT(max_cycles), PEER},
        {"cycleThrottle", FIELD_DURATION, AT(cycle_throttle_ns), PEER},
        {"makeMigratable", FIELD_BOOL, AT(make_migratable), PEER},
        {"shared", FIELD_BOOL, AT(shared), PEER},
        {"sharedbase", FIELD_BOOL, AT(sharedbase), PEER},
        {"s3sync", FIELD_BOOL, AT(s3.sync), PEER},
        {"s3accesskey", FIELD_STRING, AT(s3.access_key), PEER},
        {"s3secretkey", FIELD_STRING, AT(s3.secret_key), PEER},
        {"s3endpoint", FIELD_STRING, AT(s3.endpoint), PEER},
        {"s3secure", FIELD_BOOL, AT(s3.secure), PEER},
        {"s3bucket", FIELD_STRING, AT(s3.bucket), PEER},
        {"s3concurrency", FIELD_INT, AT(s3.concurrency), PEER},
};

static const char *const schema_names[] = {
        [DEVICE_SCHEMA_SNAPSHOTTER] = "drafter-snapshotter",
        [DEVICE_SCHEMA_PACKAGER] = "drafter-packager",
        [DEVICE_SCHEMA_PEER] = "drafter-peer, drafter-mounter and drafter-registry",
};

static const char *json_type_name(const json_t *v) {
        switch (json_typeof(v)) {
        case JSON_OBJECT:  return "an object";
        case JSON_ARRAY:   return "an array";
        case JSON_STRING:  return "a string";
        case JSON_INTEGER: return "an integer";
        case JSON_REAL:    return "a number with a fraction";
        case JSON_TRUE:
        case JSON_FALSE:   return "a boolean";
        case JSON_NULL:    return "null";
        }
        return "a value";
}

static void device_config_init(struct device_config *d) {
        *d = (struct device_config){
                .block_size = DEVICE_DEFAULT_BLOCK_SIZE,
                .expiry_ns = 1000000000,
                .max_dirty_blocks = 200,
                .min_cycles = 5,
                .max_cycles = 20,
                .cycle_throttle_ns = 500000000,
                .make_migratable = true,
        };
}

static void device_config_free(struct device_config *d) {
        for (size_t i = 0; i < ELEMENTSOF(fields); i++)
                if (fields[i].kind == FIELD_STRING)
                        free(*(char **)((char *)d + fields[i].offset));
}

void device_list_free(struct device_list *list) {
        for (size_t i = 0; i < list->count; i++)
                device_config_free(&list->devices[i]);
        free(list->devices);
        list->devices = NULL;
        list->count = 0;
}

/* "device "memory"" once the name is known, "device at index 3" before. */
static void device_label(const struct device_config *d, size_t index, char *buf, size_t size) {
        if (d->name && *d->name)
                snprintf(buf, size, "device \"%s\"", d->name);
        else
                snprintf(buf, size, "device at index %zu", index);
}

static void accepted_fields(enum device_schema schema, char *buf, size_t size) {
        size_t n = 0;
        buf[0] = '\0';
        for (size_t i = 0; i < ELEMENTSOF(fields) && n < size; i++)
                if (fields[i].schemas & (1u << schema))
                        n += (size_t)snprintf(buf + n, size - n, "%s%s", n ? ", " : "", fields[i].name);
}

static int set_field(struct device_config *d, const char *label, const struct field *f, json_t *v) {
        void *slot = (char *)d + f->offset;
        switch (f->kind) {
        case FIELD_STRING: {
                if (!json_is_string(v))
                        return error_set(-EINVAL, "devices: %s: field \"%s\": expected a string, got %s", label,
                                         f->name, json_type_name(v));
                if (strlen(json_string_value(v)) != json_string_length(v))
                        return error_set(-EINVAL, "devices: %s: field \"%s\": contains a NUL byte", label,
                                         f->name);
                char *copy = strdup(json_string_value(v));
                if (!copy)
                        return error_set(-ENOMEM, "devices: out of memory");
                free(*(char **)slot);
                *(char **)slot = copy;
                return 0;
        }
        case FIELD_BOOL:
                if (!json_is_boolean(v))
                        return error_set(-EINVAL, "devices: %s: field \"%s\": expected true or false, got %s",
                                         label, f->name, json_type_name(v));
                *(bool *)slot = json_is_true(v);
                return 0;
        case FIELD_INT:
        case FIELD_DURATION:
        case FIELD_BLOCK_SIZE: {
                const char *what = f->kind == FIELD_DURATION ? "a non-negative integer of nanoseconds (e.g. "
                                                               "500000000 for 500ms)"
                                                             : "a non-negative integer";
                if (!json_is_integer(v))
                        return error_set(-EINVAL, "devices: %s: field \"%s\": expected %s, got %s", label, f->name,
                                         what, json_type_name(v));
                json_int_t n = json_integer_value(v);
                if (n < 0)
                        return error_set(-EINVAL, "devices: %s: field \"%s\": expected %s, got %" JSON_INTEGER_FORMAT,
                                         label, f->name, what, n);
                if (f->kind == FIELD_BLOCK_SIZE) {
                        if (n < DEVICE_MIN_BLOCK_SIZE || n > DEVICE_MAX_BLOCK_SIZE || (n & (n - 1)) != 0)
                                return error_set(-EINVAL,
                                                 "devices: %s: field \"blockSize\": must be a power of two from "
                                                 "%u to %u, got %" JSON_INTEGER_FORMAT,
                                                 label, DEVICE_MIN_BLOCK_SIZE, DEVICE_MAX_BLOCK_SIZE, n);
                        *(uint32_t *)slot = (uint32_t)n;
                } else {
                        *(int64_t *)slot = (int64_t)n;
                }
                return 0;
        }
        }
        return -EINVAL;
}

static bool name_is_valid(const char *name) {
        if (!name || !*name || name[0] == '.' || strlen(name) > DEVICE_NAME_MAX)
                return false;
        for (const char *p = name; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '-' || *p == '_' || *p == '.'))
                        return false;
        return true;
}

static bool is_empty(const char *s) {
        return !s || !*s;
}

/* Rules that involve one device's fields together. */
static int check_device(const struct device_config *d, const char *label, enum device_schema schema) {
        switch (schema) {
        case DEVICE_SCHEMA_SNAPSHOTTER:
                if (is_empty(d->output))
                        return error_set(-EINVAL, "devices: %s: field \"output\": required (where the snapshot "
                                         "of this device is written)", label);
                if (d->input && strcmp(d->input, d->output) == 0)
                        return error_set(-EINVAL, "devices: %s: field \"output\": same file as \"input\" (%s); "
                                         "the blueprint would be overwritten", label, d->output);
                break;
        case DEVICE_SCHEMA_PACKAGER:
                if (is_empty(d->path))
                        return error_set(-EINVAL, "devices: %s: field \"path\": required", label);
                break;
        case DEVICE_SCHEMA_PEER:
                if (is_empty(d->base))
                        return error_set(-EINVAL, "devices: %s: field \"base\": required", label);
                if (is_empty(d->overlay) != is_empty(d->state))
                        return error_set(-EINVAL, "devices: %s: field \"%s\": required together with \"%s\"", label,
                                         is_empty(d->overlay) ? "overlay" : "state",
                                         is_empty(d->overlay) ? "state" : "overlay");
                if (d->shared && !is_empty(d->overlay))
                        return error_set(-EINVAL, "devices: %s: field \"shared\": a shared device writes to "
                                         "\"base\" directly, so \"overlay\" and \"state\" must be empty", label);
                if (!is_empty(d->overlay)) {
                        if (strcmp(d->overlay, d->base) == 0 || strcmp(d->state, d->base) == 0)
                                return error_set(-EINVAL, "devices: %s: field \"%s\": same file as \"base\" (%s)",
                                                 label, strcmp(d->overlay, d->base) == 0 ? "overlay" : "state",
                                                 d->base);
                        if (strcmp(d->overlay, d->state) == 0)
                                return error_set(-EINVAL, "devices: %s: field \"state\": same file as \"overlay\" "
                                                 "(%s)", label, d->state);
                }
                if (d->min_cycles > d->max_cycles)
                        return error_set(-EINVAL, "devices: %s: field \"minCycles\": %" PRId64 " is greater than "
                                         "maxCycles (%" PRId64 ")", label, d->min_cycles, d->max_cycles);
                if (d->s3.sync && (is_empty(d->s3.endpoint) || is_empty(d->s3.bucket)))
                        return error_set(-EINVAL, "devices: %s: field \"%s\": required when \"s3sync\" is true",
                                         label, is_empty(d->s3.endpoint) ? "s3endpoint" : "s3bucket");
                break;
        }
        return 0;
}

/* Paths that two devices must not share: each device writes its own. */
static int check_distinct_outputs(const struct device_list *list) {
        static const size_t outputs[] = {AT(output), AT(overlay), AT(state)};
        for (size_t i = 0; i < list->count; i++)
                for (size_t j = 0; j < i; j++)
                        for (size_t a = 0; a < ELEMENTSOF(outputs); a++) {
                                const char *p = *(char **)((char *)&list->devices[i] + outputs[a]);
                                if (is_empty(p))
                                        continue;
                                for (size_t b = 0; b < ELEMENTSOF(outputs); b++) {
                                        const char *q = *(char **)((char *)&list->devices[j] + outputs[b]);
                                        if (!is_empty(q) && strcmp(p, q) == 0)
                                                return error_set(-EINVAL,
                                                                 "devices: device \"%s\": writes to %s, which "
                                                                 "device \"%s\" also writes to",
                                                                 list->devices[i].name, p, list->devices[j].name);
                                }
                        }
        return 0;
}

static int parse_device(json_t *obj, size_t index, enum device_schema schema, struct device_config *d) {
        char label[128];
        const char *key;
        json_t *value;

        device_config_init(d);
        if (!json_is_object(obj))
                return error_set(-EINVAL, "devices: device at index %zu: expected an object, got %s", index,
                                 json_type_name(obj));

        json_t *name = json_object_get(obj, "name");
        if (!name)
                return error_set(-EINVAL, "devices: device at index %zu: field \"name\": required", index);
        snprintf(label, sizeof(label), "device at index %zu", index);
        int r = set_field(d, label, &fields[0], name);
        if (r < 0)
                return r;
        if (!name_is_valid(d->name))
                return error_set(-EINVAL, "devices: device at index %zu: field \"name\": \"%s\" is not a valid "
                                 "name (1-%d of A-Z a-z 0-9 . _ -, not starting with a dot)",
                                 index, d->name, DEVICE_NAME_MAX);
        device_label(d, index, label, sizeof(label));

        json_object_foreach(obj, key, value) {
                const struct field *f = NULL;
                for (size_t i = 0; i < ELEMENTSOF(fields); i++)
                        if (strcmp(fields[i].name, key) == 0)
                                f = &fields[i];
                if (!f) {
                        const struct field *like = NULL;
                        for (size_t i = 0; i < ELEMENTSOF(fields); i++)
                                if (strcasecmp(fields[i].name, key) == 0)
                                        like = &fields[i];
                        if (like)
                                return error_set(-EINVAL, "devices: %s: field \"%s\": unknown field (did you "
                                                 "mean \"%s\"?)", label, key, like->name);
                        char list[512];
                        accepted_fields(schema, list, sizeof(list));
                        return error_set(-EINVAL, "devices: %s: field \"%s\": unknown field (accepted: %s)", label,
                                         key, list);
                }
                if (!(f->schemas & (1u << schema))) {
                        char list[512];
                        accepted_fields(schema, list, sizeof(list));
                        return error_set(-EINVAL, "devices: %s: field \"%s\": not used by %s (accepted: %s)", label,
                                         key, schema_names[schema], list);
                }
                if (f != &fields[0] && (r = set_field(d, label, f, value)) < 0)
                        return r;
        }
        return check_device(d, label, schema);
}

int device_list_parse(const char *text, enum device_schema schema, struct device_list *ret_list) {
        json_error_t jerr;
        json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
        if (!root)
                return error_set(-EINVAL, "devices: invalid JSON at line %d, column %d: %s", jerr.line,
                                 jerr.column, jerr.text);
        int r = 0;
        struct device_list list = {0};

        if (!json_is_array(root)) {
                r = error_set(-EINVAL, "devices: expected a JSON array of device objects, got %s",
                              json_type_name(root));
                goto out;
        }
        list.count = 0;
        list.devices = calloc(json_array_size(root) ? json_array_size(root) : 1, sizeof(*list.devices));
        if (!list.devices) {
                r = error_set(-ENOMEM, "devices: out of memory");
                goto out;
        }
        for (size_t i = 0; i < json_array_size(root); i++) {
                r = parse_device(json_array_get(root, i), i, schema, &list.devices[i]);
                list.count = i + 1; /* so that device_list_free() releases what was parsed */
                if (r < 0)
                        goto out;
                for (size_t j = 0; j < i; j++)
                        if (strcmp(list.devices[j].name, list.devices[i].name) == 0) {
                                r = error_set(-EINVAL, "devices: device \"%s\" (index %zu): field \"name\": "
                                              "duplicate of the device at index %zu",
                                              list.devices[i].name, i, j);
                                goto out;
                        }
        }
        r = check_distinct_outputs(&list);
        if (r < 0)
                goto out;
        *ret_list = list;
        list = (struct device_list){0};
out:
        device_list_free(&list);
        json_decref(root);
        return r;
}

const struct device_config *device_list_find(const struct device_list *list, const char *name) {
        for (size_t i = 0; i < list->count; i++)
                if (strcmp(list->devices[i].name, name) == 0)
                        return &list->devices[i];
        return NULL;
}

static int check_input_file(const struct device_config *d, const char *field, const char *path, bool writable) {
        struct stat st;
        if (stat(path, &st) < 0)
                return error_set_errno(-errno, "devices: device \"%s\": field \"%s\": %s", d->name, field, path);
        if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
                return error_set(-EINVAL, "devices: device \"%s\": field \"%s\": %s is not a regular file or "
                                 "block device", d->name, field, path);
        int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "devices: device \"%s\": field \"%s\": %s", d->name, field, path);
        close(fd);
        return 0;
}

int device_list_check_inputs(const struct device_list *list, enum device_schema schema) {
        for (size_t i = 0; i < list->count; i++) {
                const struct device_config *d = &list->devices[i];
                int r = 0;
                switch (schema) {
                case DEVICE_SCHEMA_SNAPSHOTTER:
                        if (!is_empty(d->input))
                                r = check_input_file(d, "input", d->input, false);
                        break;
                case DEVICE_SCHEMA_PACKAGER:
                        r = check_input_file(d, "path", d->path, false);
                        break;
                case DEVICE_SCHEMA_PEER:
                        r = check_input_file(d, "base", d->base, d->shared || is_empty(d->overlay));
                        break;
                }
                if (r < 0)
                        return r;
        }
        return 0;
}
