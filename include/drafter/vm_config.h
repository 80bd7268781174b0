/* vm_config.h — config.json of a package: which VMM and machine shape made the snapshot, so a
 * resume starts the same machine (a different one cannot load the state), and how to reach the
 * guest. Written by drafter-snapshotter, read by drafter-peer. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VM_CONFIG_VERSION 1
#define VM_CONFIG_MAX_SERIAL_PORTS 2

struct vm_config {
        char backend[16];      /* "qemu" (or "firecracker") */
        char accelerator[8];   /* "tcg" or "kvm": the state of one does not load in the other */
        char machine[32];      /* "q35" */
        char cpu_model[64];    /* "max", "host", a fixed model for portable snapshots */
        int64_t cpu_count;
        uint64_t memory_bytes; /* the size of the memory device */
        uint64_t state_bytes;  /* the device state stream at the start of the state device */
        char boot_args[1024];
        int64_t liveness_port, agent_port; /* vsock ports (virtio-serial ports are named) */
        char drives[8][64];    /* devices attached as disks, in guest order (vda, vdb, …) */
        int drive_count;
        /* Named virtio-serial ports besides the agent's and liveness's (e.g. a benchmark's
         * heartbeat): part of the machine, so a restore must offer the same ones. "serialPorts"
         * in the JSON, left out when empty. */
        char serial_ports[VM_CONFIG_MAX_SERIAL_PORTS][32];
        int serial_port_count;
        /* The VM's network interface, a tap of that name in the namespace it runs in (net.h),
         * or tap[0] == '\0' for none. "network": {"tap", "mac"} in the JSON, left out without. */
        char tap[16];
        char mac[18];
};

/* To JSON (malloc'd, ends with a newline). */
char *vm_config_format(const struct vm_config *c);
/* From JSON: every field checked; -EINVAL with a message naming the field otherwise. `what` names
 * the file in messages. */
int vm_config_parse(const char *json, size_t len, const char *what, struct vm_config *ret_config);
/* Set c's extra serial ports from a comma-separated list ("" for none): names of letters,
 * digits, '.', '-' and '_', unique, not the agent's or liveness's. */
int vm_config_set_serial_ports(struct vm_config *c, const char *list);
