/* drafter-packager — put a VM's devices into one .tar.zst, or take them out again (package.h). */
#include "drafter/clock.h"
#include "drafter/device_config.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/log.h"
#include "drafter/package.h"
#include "drafter/signals.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEVICE(name, path) "{\"name\":\"" name "\",\"path\":\"" path "\"}"
static const char default_devices[] = "[" DEVICE("state", "out/package/state.bin") "," DEVICE(
        "memory", "out/package/memory.bin") "," DEVICE("kernel", "out/package/vmlinux") "," DEVICE("disk",
                                                                                                   "out/package/rootfs.ext4") "," DEVICE("config", "out/package/config.json") "," DEVICE("oci", "out/blueprint/oci.ext4") "]";

static double mib(uint64_t bytes) {
        return (double)bytes / (1 << 20);
}

int main(int argc, char **argv) {
        const char *devices_json = default_devices, *package_path = "out/app.tar.zst";
        bool extract = false, verbose = false;
        int64_t level = 3, threads = 0;
        uint64_t max_entry = PACKAGE_DEFAULT_MAX_ENTRY;
        struct flag flags[] = {
                {"compression-level", FLAG_INT, &level, "zstd compression level (1-19)"},
                {"devices", FLAG_STRING, &devices_json, "Devices configuration"},
                {"extract", FLAG_BOOL, &extract, "Whether to extract or archive"},
                {"max-device-size", FLAG_UINT, &max_entry,
                 "When extracting, refuse devices larger than this many bytes"},
                {"package-path", FLAG_STRING, &package_path, "Path to package file"},
                {"threads", FLAG_INT, &threads, "Compression threads (0: one per CPU)"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
        };
        int r = flags_parse_command("drafter-packager", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, &verbose);
        if (r >= 0)
                return r;
        if (level < 1 || level > 19 || threads < 0 || threads > 256) {
                log_error("--compression-level must be 1-19 and --threads 0-256");
                return 2;
        }
        if (!*package_path) {
                log_error("--package-path must not be empty");
                return 2;
        }
        struct device_list list;
        if (device_list_parse(devices_json, DEVICE_SCHEMA_PACKAGER, &list) < 0) {
                log_error("%s", error_message());
                return 2;
        }
        struct package_file *files = calloc(list.count ? list.count : 1, sizeof(*files));
        if (!files) {
                device_list_free(&list);
                return 1;
        }
        for (size_t i = 0; i < list.count; i++)
                files[i] = (struct package_file){list.devices[i].name, list.devices[i].path};
        int sigfd = signals_stop_fd();
        if (sigfd < 0)
                log_warning("cannot take SIGINT/SIGTERM on a descriptor: %s", strerror(-sigfd));
        struct package_options o = {.level = (int)level,
                                    .threads = (int)threads,
                                    .max_entry_bytes = max_entry,
                                    .progress = true,
                                    .stop_fd = sigfd};
        struct package_stats st = {0};
        uint64_t t0 = clock_now_ns();
        if (!extract) {
                if ((r = device_list_check_inputs(&list, DEVICE_SCHEMA_PACKAGER)) == 0)
                        r = package_create(package_path, files, list.count, &o, &st);
                if (r == 0)
                        log_info("Packaged %zu devices into %s in %.0f ms: %.1f MiB (%.1f MiB of data, the rest holes) "
                                 "into %.1f MiB",
                                 list.count, package_path, (double)(clock_now_ns() - t0) / 1e6, mib(st.logical_bytes),
                                 mib(st.data_bytes), mib(st.archive_bytes));
        } else {
                r = package_extract(package_path, files, list.count, &o, &st);
                if (r == 0)
                        log_info("Extracted %zu devices from %s in %.0f ms: %.1f MiB (%.1f MiB written, the rest "
                                 "holes)%s",
                                 list.count, package_path, (double)(clock_now_ns() - t0) / 1e6, mib(st.logical_bytes),
                                 mib(st.data_bytes), st.skipped_entries ? "; skipped entries not in --devices" : "");
        }
        if (r < 0)
                log_error("%s%s", error_message(), r == -EINTR ? " (nothing was written)" : "");
        free(files);
        device_list_free(&list);
        if (sigfd >= 0)
                close(sigfd);
        return r < 0 ? 1 : 0;
}
