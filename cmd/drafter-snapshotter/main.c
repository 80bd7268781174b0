/* drafter-snapshotter — boot a blueprint, wait until the guest is up, call BeforeSuspend and
 * write a package: state, memory, config.json, and copies of kernel, disk and oci. */
#include "drafter/clock.h"
#include "drafter/device_config.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/instance.h"
#include "drafter/signals.h"
#include "drafter/log.h"

#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include <string.h>

#define DEVICE(name, input, output) "{\"name\":\"" name "\",\"input\":\"" input "\",\"output\":\"" output "\"}"
static const char default_devices[] =
        "[" DEVICE("state", "", "out/package/state.bin") "," DEVICE("memory", "", "out/package/memory.bin") "," DEVICE(
                "kernel", "out/blueprint/vmlinux", "out/package/vmlinux") "," DEVICE("disk", "out/blueprint/rootfs.ext4",
                                                                                      "out/package/rootfs.ext4") "," DEVICE("config", "", "out/package/config.json") "," DEVICE("oci", "out/blueprint/oci.ext4", "out/package/oci.ext4") "]";

int main(int argc, char **argv) {
        const char *devices_json = default_devices, *chroot_base = "out/vms", *cpu_template = "None";
        const char *boot_args = "console=ttyS0 panic=-1 rootfstype=ext4 root=/dev/vda rootflags=rw quiet "
                                "printk.devkmsg=on random.trust_cpu=on";
        const char *serial_ports = "";
        const char *firecracker_bin = "firecracker", *qemu_bin = "qemu-system-x86_64", *vmm = "qemu", *netns = "";
        int64_t agent_port = 26, liveness_port = 25, cgroup_version = 2, cpu_count = 1, memory_mib = 1024;
        int64_t resume_timeout = 60 * NSEC_PER_SEC, agent_timeout = 10 * NSEC_PER_SEC;
        bool enable_input = false, enable_output = true, verbose = false;
        struct flag flags[] = {
                {"agent-vsock-port", FLAG_INT, &agent_port, "Agent VSocket port"},
                {"agent-timeout", FLAG_DURATION, &agent_timeout, "Time to wait for each try of an agent call"},
                {"boot-args", FLAG_STRING, &boot_args, "Boot/kernel arguments"},
                {"cgroup-version", FLAG_INT, &cgroup_version, "Cgroup version to use for Jailer"},
                {"chroot-base-dir", FLAG_STRING, &chroot_base, "chroot base directory"},
                {"cpu-count", FLAG_INT, &cpu_count, "CPU count"},
                {"cpu-template", FLAG_STRING, &cpu_template,
                 "Firecracker CPU template; with QEMU, the CPU model (\"None\": the default for the accelerator)"},
                {"devices", FLAG_STRING, &devices_json, "Devices configuration"},
                {"enable-input", FLAG_BOOL, &enable_input, "Whether to enable VM stdin"},
                {"enable-output", FLAG_BOOL, &enable_output, "Whether to enable VM stdout and stderr"},
                {"firecracker-bin", FLAG_STRING, &firecracker_bin, "Firecracker binary"},
                {"liveness-vsock-port", FLAG_INT, &liveness_port, "Liveness VSocket port"},
                {"memory-size", FLAG_INT, &memory_mib, "Memory size (in MB)"},
                {"netns", FLAG_STRING, &netns, "Network namespace to run the VM in"},
                {"qemu-bin", FLAG_STRING, &qemu_bin, "QEMU binary"},
                {"resume-timeout", FLAG_DURATION, &resume_timeout, "Maximum time to wait for the guest to boot"},
                {"serial-ports", FLAG_STRING, &serial_ports,
                 "Extra named virtio-serial ports for the guest, comma-separated (their host ends are unix sockets "
                 "<name>.sock in the VM's runtime directory; peers resuming the package offer the same ports)"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
                {"vmm", FLAG_STRING, &vmm, "Virtual machine monitor: qemu or firecracker"},
        };
        int r = flags_parse_command("drafter-snapshotter", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, &verbose);
        if (r >= 0)
                return r;
        if (strcmp(vmm, "qemu") != 0) {
                log_error("--vmm %s: only qemu is available in this build (firecracker needs /dev/kvm and its binary)",
                          vmm);
                return 2;
        }
        if (cpu_count < 1 || cpu_count > 64 || memory_mib < 64 || memory_mib % 2 != 0) {
                log_error("--cpu-count must be 1-64 and --memory-size an even number of MB of at least 64");
                return 2;
        }
        struct device_list devices;
        if (device_list_parse(devices_json, DEVICE_SCHEMA_SNAPSHOTTER, &devices) < 0) {
                log_error("%s", error_message());
                return 1;
        }
        /* Ctrl-C stops the snapshot cleanly: QEMU goes, no output appears (instance.h). */
        int sigfd = signals_stop_fd();
        if (sigfd < 0) {
                log_error("cannot take SIGINT/SIGTERM on a descriptor: %s", strerror(-sigfd));
                device_list_free(&devices);
                return 1;
        }
        struct instance_options o = {.qemu_bin = qemu_bin,
                                     .stop_fd = sigfd,
                                     .runtime_base = chroot_base,
                                     .enable_output = enable_output,
                                     .enable_input = enable_input,
                                     .liveness_timeout_ns = (uint64_t)resume_timeout,
                                     .agent_timeout_ns = (uint64_t)agent_timeout,
                                     .memory_bytes = (uint64_t)memory_mib << 20,
                                     .cpu_count = (int)cpu_count,
                                     .cpu_model = strcmp(cpu_template, "None") == 0 ? NULL : cpu_template,
                                     .boot_args = boot_args,
                                     .liveness_port = liveness_port,
                                     .agent_port = agent_port,
                                     .serial_ports = serial_ports,
                                     .netns = netns};
        r = instance_snapshot(&devices, &o);
        if (r < 0)
                log_error("%s", error_message());
        device_list_free(&devices);
        close(sigfd);
        return r < 0 ? 1 : 0;
}
