/* vm_config.c — config.json of a package (see vm_config.h). */
#include "drafter/vm_config.h"
#include "drafter/error.h"
#include "drafter/guestlink.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *vm_config_format(const struct vm_config *c) {
        json_t *drives = json_array();
        for (int i = 0; i < c->drive_count; i++)
                json_array_append_new(drives, json_string(c->drives[i]));
        json_t *j = json_pack("{s:i,s:s,s:s,s:s,s:s,s:I,s:I,s:I,s:s,s:I,s:I,s:o}", "version", VM_CONFIG_VERSION,
                              "backend", c->backend, "accelerator", c->accelerator, "machine", c->machine, "cpuModel",
                              c->cpu_model, "cpuCount", (json_int_t)c->cpu_count, "memoryBytes",
                              (json_int_t)c->memory_bytes, "stateBytes", (json_int_t)c->state_bytes, "bootArgs",
                              c->boot_args, "livenessVSockPort", (json_int_t)c->liveness_port, "agentVSockPort",
                              (json_int_t)c->agent_port, "drives", drives);
        if (j && c->tap[0])
                json_object_set_new(j, "network", json_pack("{s:s,s:s}", "tap", c->tap, "mac", c->mac));
        if (j && c->serial_port_count > 0) {
                json_t *ports = json_array();
                for (int i = 0; i < c->serial_port_count; i++)
                        json_array_append_new(ports, json_string(c->serial_ports[i]));
                json_object_set_new(j, "serialPorts", ports);
        }
        char *s = j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
        json_decref(j);
        if (!s)
                return NULL;
        size_t n = strlen(s);
        char *out = realloc(s, n + 2);
        if (!out) {
                free(s);
                return NULL;
        }
        out[n] = '\n';
        out[n + 1] = '\0';
        return out;
}

static int get_string(json_t *root, const char *what, const char *key, char *out, size_t size) {
        json_t *v = json_object_get(root, key);
        if (!json_is_string(v))
                return error_set(-EINVAL, "%s: field \"%s\" must be a string", what, key);
        if (json_string_length(v) >= size)
                return error_set(-EINVAL, "%s: field \"%s\" is longer than %zu bytes", what, key, size - 1);
        memcpy(out, json_string_value(v), json_string_length(v) + 1);
        return 0;
}

static int get_int(json_t *root, const char *what, const char *key, int64_t min, int64_t *out) {
        json_t *v = json_object_get(root, key);
        if (!json_is_integer(v) || json_integer_value(v) < min)
                return error_set(-EINVAL, "%s: field \"%s\" must be an integer of at least %lld", what, key,
                                 (long long)min);
        *out = json_integer_value(v);
        return 0;
}

static int add_serial_port(struct vm_config *c, const char *name) {
        size_t n = strlen(name);
        if (n == 0 || n >= sizeof(c->serial_ports[0]) || strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_") != n)
                return error_set(-EINVAL, "serial port \"%s\": a name is 1-%zu letters, digits, '.', '-' or '_'", name,
                                 sizeof(c->serial_ports[0]) - 1);
        if (strcmp(name, GUESTLINK_AGENT_PORT_NAME) == 0 || strcmp(name, GUESTLINK_LIVENESS_PORT_NAME) == 0)
                return error_set(-EINVAL, "serial port \"%s\" is the guest link's own", name);
        for (int i = 0; i < c->serial_port_count; i++)
                if (strcmp(c->serial_ports[i], name) == 0)
                        return error_set(-EINVAL, "serial port \"%s\" is named twice", name);
        if (c->serial_port_count >= VM_CONFIG_MAX_SERIAL_PORTS)
                return error_set(-EINVAL, "serial port \"%s\": at most %d extra ports", name, VM_CONFIG_MAX_SERIAL_PORTS);
        snprintf(c->serial_ports[c->serial_port_count++], sizeof(c->serial_ports[0]), "%s", name);
        return 0;
}

int vm_config_set_serial_ports(struct vm_config *c, const char *list) {
        c->serial_port_count = 0;
        char buf[256];
        if (strlen(list) >= sizeof(buf))
                return error_set(-EINVAL, "serial ports \"%s\": too long", list);
        snprintf(buf, sizeof(buf), "%s", list);
        char *save = NULL;
        for (char *name = strtok_r(buf, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
                int r = add_serial_port(c, name);
                if (r < 0)
                        return r;
        }
        return 0;
}

int vm_config_parse(const char *text, size_t len, const char *what, struct vm_config *ret) {
        /* A config.json device may be padded with zeros after the document. */
        size_t n = strnlen(text, len);
        json_error_t e;
        json_t *root = json_loadb(text, n, JSON_REJECT_DUPLICATES, &e);
        if (!root)
                return error_set(-EINVAL, "%s: not valid JSON (line %d: %s)", what, e.line, e.text);
        struct vm_config c = {0};
        int64_t version = 0, memory = 0, state = 0;
        int r = get_int(root, what, "version", 1, &version);
        if (r >= 0 && version != VM_CONFIG_VERSION)
                r = error_set(-EINVAL, "%s: version %lld, this drafter reads version %d", what, (long long)version,
                              VM_CONFIG_VERSION);
        if (r >= 0)
                r = get_string(root, what, "backend", c.backend, sizeof(c.backend));
        if (r >= 0)
                r = get_string(root, what, "accelerator", c.accelerator, sizeof(c.accelerator));
        if (r >= 0)
                r = get_string(root, what, "machine", c.machine, sizeof(c.machine));
        if (r >= 0)
                r = get_string(root, what, "cpuModel", c.cpu_model, sizeof(c.cpu_model));
        if (r >= 0)
                r = get_int(root, what, "cpuCount", 1, &c.cpu_count);
        if (r >= 0)
                r = get_int(root, what, "memoryBytes", 1, &memory);
        if (r >= 0)
                r = get_int(root, what, "stateBytes", 1, &state);
        if (r >= 0)
                r = get_string(root, what, "bootArgs", c.boot_args, sizeof(c.boot_args));
        if (r >= 0)
                r = get_int(root, what, "livenessVSockPort", 0, &c.liveness_port);
        if (r >= 0)
                r = get_int(root, what, "agentVSockPort", 0, &c.agent_port);
        json_t *drives = json_object_get(root, "drives");
        if (r >= 0 && (!json_is_array(drives) || json_array_size(drives) > 8))
                r = error_set(-EINVAL, "%s: field \"drives\" must be an array of at most 8 device names", what);
        for (size_t i = 0; r >= 0 && i < json_array_size(drives); i++) {
                json_t *d = json_array_get(drives, i);
                if (!json_is_string(d) || json_string_length(d) == 0 || json_string_length(d) >= sizeof(c.drives[0]))
                        r = error_set(-EINVAL, "%s: drives[%zu] must be a device name", what, i);
                else
                        snprintf(c.drives[c.drive_count++], sizeof(c.drives[0]), "%s", json_string_value(d));
        }
        json_t *net = json_object_get(root, "network");
        if (r >= 0 && net &&
            (!json_is_object(net) || get_string(net, what, "tap", c.tap, sizeof(c.tap)) < 0 ||
             get_string(net, what, "mac", c.mac, sizeof(c.mac)) < 0 || !c.tap[0]))
                r = error_set(-EINVAL, "%s: field \"network\" must be {\"tap\": NAME, \"mac\": MAC}", what);
        json_t *ports = json_object_get(root, "serialPorts");
        if (r >= 0 && ports && (!json_is_array(ports) || json_array_size(ports) > VM_CONFIG_MAX_SERIAL_PORTS))
                r = error_set(-EINVAL, "%s: field \"serialPorts\" must be an array of at most %d port names", what,
                              VM_CONFIG_MAX_SERIAL_PORTS);
        for (size_t i = 0; r >= 0 && ports && i < json_array_size(ports); i++) {
                json_t *p = json_array_get(ports, i);
                if (!json_is_string(p) || (r = add_serial_port(&c, json_string_value(p))) < 0)
                        r = error_set(-EINVAL, "%s: serialPorts[%zu]: %s", what, i,
                                      json_is_string(p) ? error_message() : "must be a port name");
        }
        json_decref(root);
        if (r < 0)
                return r;
        if (strcmp(c.backend, "qemu") != 0 && strcmp(c.backend, "firecracker") != 0)
                return error_set(-EINVAL, "%s: unknown backend \"%s\"", what, c.backend);
        c.memory_bytes = (uint64_t)memory;
        c.state_bytes = (uint64_t)state;
        *ret = c;
        return 0;
}
