/* drafter-peer — run a package: resume its VM from the devices (base, or base + overlay + state)
 * and keep it running until SIGINT/SIGTERM, which suspends the VM back into its devices. */
#include "drafter/clock.h"
#include "drafter/device_config.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/fs.h"
#include "drafter/instance.h"
#include "drafter/log.h"
#include "drafter/signals.h"
#include "drafter/tls.h"
#include "drafter/transport.h"
#include "drafter/cleanup.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#define DEVICE_FIELDS(name, file)                                                                                   \
        "{\"name\":\"" name "\",\"base\":\"out/package/" file "\",\"overlay\":\"out/overlay/" file                   \
        "\",\"state\":\"out/state/" file "\",\"blockSize\":65536,\"expiry\":1000000000,\"maxDirtyBlocks\":200,"      \
        "\"minCycles\":5,\"maxCycles\":20,\"cycleThrottle\":500000000,\"makeMigratable\":true,\"shared\":false}"
static const char default_devices[] = "[" DEVICE_FIELDS("state", "state.bin") ", " DEVICE_FIELDS(
        "memory", "memory.bin") ", " DEVICE_FIELDS("kernel", "vmlinux") ", " DEVICE_FIELDS("disk", "rootfs.ext4") ", " DEVICE_FIELDS("config", "config.json") ", " DEVICE_FIELDS("oci", "oci.ext4") "]";

int main(int argc, char **argv) {
        const char *devices_json = default_devices, *chroot_base = "out/vms", *raddr = "", *laddr = "";
        const char *json_summary = "";
        const char *firecracker_bin = "firecracker", *qemu_bin = "qemu-system-x86_64", *vmm = "qemu", *netns = "";
        int64_t cgroup_version = 2, concurrency = 1024;
        int64_t resume_timeout = 60 * NSEC_PER_SEC, agent_timeout = 10 * NSEC_PER_SEC;
        bool enable_input = false, enable_output = true, verbose = false, disable_postcopy = false;
        struct tls_options tls_options = {0};
        struct flag flags[] = {
                TLS_FLAGS(tls_options),
                {"agent-timeout", FLAG_DURATION, &agent_timeout, "Time to wait for each try of an agent call"},
                {"cgroup-version", FLAG_INT, &cgroup_version, "Cgroup version to use for Jailer"},
                {"chroot-base-dir", FLAG_STRING, &chroot_base, "chroot base directory"},
                {"concurrency", FLAG_INT, &concurrency, "Number of concurrent workers to use in migrations"},
                {"devices", FLAG_STRING, &devices_json, "Devices configuration"},
                {"disable-postcopy-migration", FLAG_BOOL, &disable_postcopy,
                 "Whether to disable post-copy migration"},
                {"enable-input", FLAG_BOOL, &enable_input, "Whether to enable VM stdin"},
                {"enable-output", FLAG_BOOL, &enable_output, "Whether to enable VM stdout and stderr"},
                {"firecracker-bin", FLAG_STRING, &firecracker_bin, "Firecracker binary"},
                {"json-summary", FLAG_STRING, &json_summary,
                 "File to write a JSON summary of the run's timings to when it ends (leave empty to disable)"},
                {"laddr", FLAG_STRING, &laddr, "Local address to listen on (leave empty to disable)"},
                {"netns", FLAG_STRING, &netns, "Network namespace to run the VM in"},
                {"qemu-bin", FLAG_STRING, &qemu_bin, "QEMU binary"},
                {"raddr", FLAG_STRING, &raddr, "Remote address to connect to (leave empty to disable)"},
                {"resume-timeout", FLAG_DURATION, &resume_timeout, "Maximum time to wait for the VM to resume"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
                {"vmm", FLAG_STRING, &vmm, "Virtual machine monitor: qemu or firecracker"},
        };
        int r = flags_parse_command("drafter-peer", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, &verbose);
        if (r >= 0)
                return r;
        if (strcmp(vmm, "qemu") != 0) {
                log_error("--vmm %s: only qemu is available in this build (firecracker needs /dev/kvm and its binary)",
                          vmm);
                return 2;
        }
        struct tls_context *tls;
        if (tls_context_from_flags(&tls_options, *raddr || *laddr, &tls) < 0)
                return 1;
        struct device_list devices;
        if (device_list_parse(devices_json, DEVICE_SCHEMA_PEER, &devices) < 0) {
                log_error("%s", error_message());
                tls_context_free(tls);
                return 1;
        }
        /* Signals arrive on a descriptor; QEMU runs in its own process group, so a terminal's
         * Ctrl-C reaches us and we suspend the VM properly. */
        int sigfd = signals_stop_fd();
        if (sigfd < 0) {
                log_error("cannot take SIGINT/SIGTERM on a descriptor: %s", strerror(-sigfd));
                return 1;
        }

        struct instance_options o = {.qemu_bin = qemu_bin,
                                     .runtime_base = chroot_base,
                                     .enable_output = enable_output,
                                     .enable_input = enable_input,
                                     .agent_timeout_ns = (uint64_t)agent_timeout,
                                     .resume_timeout_ns = (uint64_t)resume_timeout,
                                     .netns = netns,
                                     .tls = tls};
        struct instance *inst;
        int status = 1, lfd = -1;
        r = *raddr ? instance_receive(&devices, &o, raddr, disable_postcopy, &inst) : instance_resume(&devices, &o, &inst);
        if (r < 0) {
                log_error("%s", error_message());
                goto out;
        }
        char report[512];
        instance_resume_report(inst, report, sizeof(report));
        log_info("Resumed VM in %.1f ms (%s)", instance_resume_ms(inst), report);
        bool received = !*raddr, stopping = false, migrated = false, skip_agent = false;
        struct migrate_stats out_stats = {0};
        for (;;) {
                struct pollfd p[2] = {{.fd = sigfd, .events = POLLIN}, {.fd = lfd, .events = POLLIN}};
                int n = poll(p, lfd >= 0 ? 2 : 1, 200);
                if (n > 0 && (p[0].revents & POLLIN)) {
                        struct signalfd_siginfo si;
                        if (read(sigfd, &si, sizeof(si)) < 0)
                                log_debug("signalfd: %s", strerror(errno));
                        stopping = true;
                        if (!received)
                                log_info("Waiting for the last blocks before suspending");
                }
                if (!received) {
                        int got = instance_received(inst);
                        if (got < 0) {
                                log_error("%s", error_message());
                                log_info("Serving the blocks that arrived until stopped; the VM cannot read the others");
                                status = 1; /* nothing more will come: serve what is here until stopped */
                                struct signalfd_siginfo si;
                                if (read(sigfd, &si, sizeof(si)) < 0)
                                        log_debug("signalfd: %s", strerror(errno));
                                break;
                        }
                        if (got > 0) {
                                received = true;
                                log_info("Completed all device migrations");
                        }
                }
                if (stopping && received) {
                        log_info(skip_agent ? "Suspending the VM without BeforeSuspend" : "Suspending the VM");
                        status = 0;
                        r = instance_suspend(inst, skip_agent);
                        if (r == -ECANCELED) {
                                /* Nothing is lost by waiting: the VM runs on until asked again. */
                                status = 1;
                                log_error("%s", error_message());
                                log_info("The VM was not suspended; SIGINT again suspends it without BeforeSuspend");
                                stopping = false;
                                skip_agent = true;
                                continue;
                        }
                        if (r < 0) {
                                log_error("%s", error_message());
                                status = 1;
                        }
                        break;
                }
                /* Offer the VM once it is complete here. */
                if (received && *laddr && lfd < 0) {
                        int port;
                        if (transport_listen(laddr, &lfd, &port) < 0) {
                                log_error("%s", error_message());
                                break;
                        }
                        log_info("Serving on %s", laddr);
                }
                if (n > 0 && lfd >= 0 && (p[1].revents & POLLIN)) {
                        int fd;
                        if (transport_accept(lfd, 0, &fd) < 0)
                                continue;
                        if (tls_wrap(tls, fd, true, 10000, &fd) < 0) {
                                log_error("refused a peer: %s", error_message());
                                continue;
                        }
                        log_info("Migrating the VM to a peer");
                        struct migrate_stats st;
                        r = instance_migrate_out(inst, fd, (unsigned)MIN(concurrency, 64), &st);
                        out_stats = st;
                        migrated = true;
                        close(fd);
                        if (r >= 0) {
                                status = 0;
                                /* The VM starts over there now, its state load and first
                                 * steps CPU-bound: our teardown (QEMU's exit, dropping the
                                 * memory file's page cache at the unmount, the overlays'
                                 * write-back) took 15-20 ms of CPU from them on a 2-core host. */
                                struct sched_param sp = {0};
                                if (sched_setscheduler(0, SCHED_IDLE, &sp) < 0)
                                        log_debug("teardown at idle priority: %s", strerror(errno));
                                break;
                        }
                        log_error("migration failed: %s", error_message());
                        if (st.authority_transferred)
                                break;
                        log_info("Kept the VM; serving on %s again", laddr);
                        continue;
                }
                if (!instance_running(inst)) {
                        log_error("the VM stopped on its own");
                        break;
                }
        }
        if (lfd >= 0)
                close(lfd);
        if (*json_summary) {
                _cleanup_free_ char *text = instance_summary_json(inst, migrated ? &out_stats : NULL);
                if (!text || fs_write_file_atomic(json_summary, text, strlen(text)) < 0)
                        log_error("--json-summary %s: %s", json_summary, text ? error_message() : "out of memory");
        }
        log_info("Shutting down");
        instance_free(inst);
out:
        device_list_free(&devices);
        tls_context_finish(tls);
        close(sigfd);
        return status;
}
