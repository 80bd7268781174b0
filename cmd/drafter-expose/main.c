/* drafter-expose — serve devices from a --devices list as files in a FUSE mount and/or through an
 * NBD server (unix socket, TCP) until interrupted. Used by the interop tests and benchmarks, and
 * handy on its own:
 *
 *   drafter-expose --devices '[{"name":"disk","base":"disk.img","shared":true}]' \
 *                  --fuse-dir /run/vm0 --nbd-unix /run/disk.sock --nbd-tcp localhost:10809
 */
#include "drafter/address.h"
#include "drafter/cleanup.h"
#include "drafter/device_config.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/fuse_export.h"
#include "drafter/log.h"
#include "drafter/signals.h"
#include "drafter/nbd_server.h"
#include "drafter/storage.h"

#include <signal.h>
#include <sys/signalfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char default_devices[] =
        "[{\"name\":\"disk\",\"base\":\"out/package/rootfs.ext4\",\"overlay\":\"out/overlay/rootfs.ext4\","
        "\"state\":\"out/state/rootfs.ext4\"}]";

int main(int argc, char **argv) {
        const char *devices_json = default_devices, *nbd_unix = "", *nbd_tcp = "", *fuse_dir = "";
        bool read_only = false, verbose = false;
        int64_t threads = 4;
        struct flag flags[] = {
                {"devices", FLAG_STRING, &devices_json, "Devices configuration"},
                {"fuse-dir", FLAG_STRING, &fuse_dir, "Directory to mount the devices in as files (leave empty to disable)"},
                {"nbd-unix", FLAG_STRING, &nbd_unix, "Unix socket to serve NBD on (leave empty to disable)"},
                {"nbd-tcp", FLAG_STRING, &nbd_tcp, "TCP address to serve NBD on, host:port (leave empty to disable)"},
                {"read-only", FLAG_BOOL, &read_only, "Whether to refuse writes"},
                {"threads", FLAG_INT, &threads, "Threads serving each NBD connection"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
        };
        int r = flags_parse_command("drafter-expose", flags, ELEMENTSOF(flags), argc, argv, &verbose);
        if (r >= 0)
                return r;
        if (!*nbd_unix && !*nbd_tcp && !*fuse_dir) {
                log_error("nothing to serve on: give --fuse-dir, --nbd-unix and/or --nbd-tcp");
                return 2;
        }
        if (threads < 1 || threads > 16) {
                log_error("--threads must be from 1 to 16");
                return 2;
        }

        /* Signals arrive on a descriptor read below, not to whichever thread runs. */
        _cleanup_close_ int sigfd = signals_stop_fd();
        if (sigfd < 0) {
                log_error("cannot take SIGINT/SIGTERM on a descriptor: %s", strerror(-sigfd));
                return 1;
        }

        struct device_list list;
        if (device_list_parse(devices_json, DEVICE_SCHEMA_PEER, &list) < 0) {
                log_error("%s", error_message());
                return 1;
        }
        if (device_list_check_inputs(&list, DEVICE_SCHEMA_PEER) < 0) {
                log_error("%s", error_message());
                device_list_free(&list);
                return 1;
        }
        int status = 1;
        struct block_device **devs = calloc(list.count ? list.count : 1, sizeof(*devs));
        struct nbd_export *exports = calloc(list.count ? list.count : 1, sizeof(*exports));
        struct fuse_export_device *files = calloc(list.count ? list.count : 1, sizeof(*files));
        struct nbd_server *srv = NULL;
        struct fuse_export *fx = NULL;
        if (!devs || !exports || !files)
                goto out;
        for (size_t i = 0; i < list.count; i++) {
                if (storage_open_device(&list.devices[i], &devs[i]) < 0) {
                        log_error("%s", error_message());
                        goto out;
                }
                exports[i] = (struct nbd_export){list.devices[i].name, NULL, devs[i], read_only};
                files[i] = (struct fuse_export_device){list.devices[i].name, devs[i], read_only};
        }
        if (*fuse_dir) {
                if (fuse_export_start(fuse_dir, files, list.count, &fx) < 0) {
                        log_error("%s", error_message());
                        goto out;
                }
                log_info("Serving devices as files in %s", fuse_dir);
        }
        if (!*nbd_unix && !*nbd_tcp)
                goto wait;
        if (nbd_server_new(&(struct nbd_server_config){exports, list.count, (unsigned)threads, 0}, &srv) < 0) {
                log_error("%s", error_message());
                goto out;
        }
        if (*nbd_unix) {
                if (nbd_server_listen_unix(srv, nbd_unix) < 0) {
                        log_error("%s", error_message());
                        goto out;
                }
                log_info("Serving NBD on unix:%s", nbd_unix);
        }
        if (*nbd_tcp) {
                char host[256], port[16];
                if (address_split(nbd_tcp, host, sizeof(host), port, sizeof(port)) < 0 ||
                    nbd_server_listen_tcp(srv, host, port) < 0) {
                        log_error("%s", error_message());
                        goto out;
                }
                log_info("Serving NBD on %s (port %d)", nbd_tcp, nbd_server_tcp_port(srv));
        }
        if (nbd_server_start(srv) < 0) {
                log_error("%s", error_message());
                goto out;
        }
wait:
        fflush(stderr);
        struct signalfd_siginfo si;
        if (read(sigfd, &si, sizeof(si)) < 0)
                log_debug("signalfd: %m");
        log_info("Shutting down");
        status = 0;
out:
        fuse_export_stop(fx);
        nbd_server_free(srv);
        for (size_t i = 0; devs && i < list.count; i++) {
                if (devs[i] && block_device_flush(devs[i]) < 0) {
                        log_error("%s", error_message());
                        status = 1;
                }
                block_device_close(devs[i]);
        }
        free(devs);
        free(exports);
        free(files);
        device_list_free(&list);
        return status;
}
