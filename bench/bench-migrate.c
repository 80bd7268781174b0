/* bench-migrate — device migration throughput over loopback TCP, against the loopback TCP
 * bandwidth of a plain sender/receiver measured in the same run, and against nbdcopy copying the
 * same data from nbdkit's file plugin to a file (all in tmpfs). Two data sets: incompressible
 * (random) and mixed (half random, a quarter zeros, a quarter a repeated pattern). The same
 * migrations run again over TLS 1.3 (PSK) links: the ratio to plain TCP is the cost of securing them.
 * Prints RESULT lines (DESIGN.md §6). */
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/log.h"
#include "drafter/migrate.h"
#include "drafter/tls.h"
#include "drafter/transport.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define BS 65536u

static uint64_t rng_state = 42;
static uint64_t rng_next(void) {
        uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
}

static void check(int r, const char *what) {
        if (r < 0) {
                fprintf(stderr, "bench-migrate: %s: %s\n", what, error_message());
                exit(1);
        }
}

static void fill(uint8_t *data, uint64_t size, bool mixed) {
        for (uint64_t off = 0; off < size; off += BS) {
                uint64_t quarter = off * 4 / size;
                if (!mixed || quarter < 2) {
                        for (unsigned i = 0; i < BS / 8; i++)
                                ((uint64_t *)(data + off))[i] = rng_next();
                } else if (quarter == 2) {
                        memset(data + off, 0, BS);
                } else {
                        for (unsigned i = 0; i < BS; i++)
                                data[off + i] = (uint8_t)("drafter migration benchmark "[i % 28]);
                }
        }
}

static struct tls_context *tls; /* PSK context for the TLS rounds */

struct dest_args {
        int listen_fd;
        bool tls;
        uint64_t size;
        int result;
        uint64_t done_ns; /* when the destination had everything (before freeing the device) */
};

static int open_memory(void *ctx, const struct migrate_device_info *info, struct block_device **ret) {
        return memory_device_open(info->name, info->size, info->block_size, ret);
}

static void *destination(void *arg) {
        struct dest_args *a = arg;
        int fd;
        a->result = transport_accept(a->listen_fd, 10000, &fd);
        if (a->result >= 0 && a->tls)
                a->result = tls_wrap(tls, fd, true, 10000, &fd);
        if (a->result < 0)
                return NULL;
        struct migrate_destination *d;
        struct migrate_destination_config cfg = {.open_device = open_memory};
        a->result = migrate_destination_start(fd, &cfg, &d);
        if (a->result < 0)
                return NULL;
        a->result = migrate_destination_wait(d, NULL);
        a->done_ns = clock_now_ns();
        migrate_destination_free(d);
        return NULL;
}

/* Seconds to migrate one device of `data` over loopback TCP (TLS: the clock includes the handshake). */
static double migrate_seconds(uint8_t *data, uint64_t size, bool compress, bool secure, struct migrate_stats *st) {
        struct block_device *dev;
        check(memory_device_open("disk", size, BS, &dev), "memory");
        check(block_device_write_at(dev, data, size, 0), "fill");
        int lfd, port;
        check(transport_listen("127.0.0.1:0", &lfd, &port), "listen");
        char addr[64];
        snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
        struct dest_args a = {lfd, secure, size, 0, 0};
        pthread_t t;
        pthread_create(&t, NULL, destination, &a);
        int fd;
        check(transport_connect(addr, 5000, &fd), "connect");
        struct migrate_source_device sd = {"disk", dev, NULL, NULL, 0, 0, 0, 0, NULL, NULL, false};
        struct migrate_source_config cfg = {.devices = &sd, .count = 1, .compress = compress};
        uint64_t t0 = clock_now_ns();
        if (secure)
                check(tls_wrap(tls, fd, false, 10000, &fd), "TLS");
        check(migrate_source_run(fd, &cfg, st), "migrate");
        pthread_join(t, NULL);
        double secs = (double)(a.done_ns - t0) / 1e9;
        check(a.result, "destination");
        close(fd);
        close(lfd);
        block_device_close(dev);
        return secs;
}

struct sink_args {
        int listen_fd;
        uint8_t *into;
        uint64_t size;
};

static void *sink(void *arg) {
        struct sink_args *a = arg;
        int fd;
        if (transport_accept(a->listen_fd, 10000, &fd) < 0)
                return NULL;
        uint64_t got = 0;
        while (got < a->size) {
                ssize_t n = read(fd, a->into + got, MIN(a->size - got, (uint64_t)1 << 20));
                if (n <= 0)
                        break;
                got += (uint64_t)n;
        }
        close(fd);
        return NULL;
}

/* Plain loopback TCP: 1 MiB writes from the buffer into a receiver's buffer. */
static double tcp_seconds(uint8_t *data, uint64_t size) {
        /* The same huge-page advice as memory devices get, so both sides fault alike. */
        uint8_t *into = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (into == MAP_FAILED)
                check(-errno, "mmap");
        (void)madvise(into, size, MADV_HUGEPAGE);
        int lfd, port;
        check(transport_listen("127.0.0.1:0", &lfd, &port), "listen");
        char addr[64];
        snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
        struct sink_args a = {lfd, into, size};
        pthread_t t;
        pthread_create(&t, NULL, sink, &a);
        int fd;
        check(transport_connect(addr, 5000, &fd), "connect");
        uint64_t t0 = clock_now_ns();
        for (uint64_t off = 0; off < size;) {
                ssize_t n = write(fd, data + off, MIN(size - off, (uint64_t)1 << 20));
                if (n <= 0)
                        break;
                off += (uint64_t)n;
        }
        close(fd);
        pthread_join(t, NULL);
        double secs = (double)(clock_now_ns() - t0) / 1e9;
        close(lfd);
        munmap(into, size);
        return secs;
}

static double nbdcopy_seconds(uint8_t *data, uint64_t size) {
        const char *src = "/dev/shm/bench-migrate-src.img", *dst = "/dev/shm/bench-migrate-dst.img";
        int fd = open(src, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, data, size) != (ssize_t)size)
                return -1;
        close(fd);
        char cmd[512];
        snprintf(cmd, sizeof(cmd), "nbdcopy -- [ nbdkit --exit-with-parent file %s ] %s", src, dst);
        uint64_t t0 = clock_now_ns();
        int r = system(cmd);
        double secs = (double)(clock_now_ns() - t0) / 1e9;
        unlink(src);
        unlink(dst);
        return r == 0 ? secs : -1;
}

static void result(const char *name, double ours, const char *peer, double theirs) {
        printf("RESULT name=%s value=%.3f unit=GB/s peer=%s peer_value=%.3f ratio=%.3f\n", name, ours, peer, theirs,
               theirs > 0 ? ours / theirs : 0.0);
        fflush(stdout);
}

static void make_tls(void) {
        char path[] = "/dev/shm/bench-migrate-psk.XXXXXX";
        int fd = mkstemp(path);
        const char key[] = "bench:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        if (fd < 0 || write(fd, key, sizeof(key) - 1) != (ssize_t)(sizeof(key) - 1))
                check(-EIO, "PSK file");
        close(fd);
        struct tls_options o = {.psk_file = path};
        check(tls_context_new(&o, &tls), "TLS");
        unlink(path);
}

int main(int argc, char **argv) {
        int64_t size_mib = 1024;
        bool tls_only = false;
        struct flag flags[] = {{"size-mib", FLAG_INT, &size_mib, "Device size in MiB"},
                               {"tls-only", FLAG_BOOL, &tls_only, "Only migrations over plain TCP against TLS"}};
        int r = flags_parse("bench-migrate", flags, 2, argc, argv, stderr, NULL);
        if (r == FLAGS_HELP)
                return 0;
        if (r < 0)
                return 2;
        signal(SIGPIPE, SIG_IGN);
        log_set_level(LOG_WARNING); /* no "Secured the link" line per round */
        make_tls();
        uint64_t size = (uint64_t)size_mib << 20;
        uint8_t *data = malloc(size);
        for (int mixed = 0; mixed <= 1; mixed++) {
                fill(data, size, mixed);
                const char *set = mixed ? "mixed" : "random";
                /* Best of three, alternating, so first-touch page faults and other warm-up costs
                 * do not decide the comparison. */
                double tcp = 1e9, plain = 1e9, zstd = 1e9, nbd = 1e9, tls_plain = 1e9, tls_zstd = 1e9;
                struct migrate_stats st, st_plain;
                for (int round = 0; round < 3; round++) {
                        if (!tls_only)
                                tcp = MIN(tcp, tcp_seconds(data, size));
                        plain = MIN(plain, migrate_seconds(data, size, false, false, &st_plain));
                        tls_plain = MIN(tls_plain, migrate_seconds(data, size, false, true, &st_plain));
                        zstd = MIN(zstd, migrate_seconds(data, size, true, false, &st));
                        tls_zstd = MIN(tls_zstd, migrate_seconds(data, size, true, true, &st));
                        double n = tls_only ? -1 : nbdcopy_seconds(data, size);
                        if (n > 0)
                                nbd = MIN(nbd, n);
                }
                if (nbd >= 1e9)
                        nbd = -1;
                double gb = (double)size / 1e9;
                printf("bench-migrate: %s %" PRIu64 " MiB, best of 3: tcp %.2f s, migrate %.2f s, migrate+zstd %.2f s "
                       "(%" PRIu64 " zero, %" PRIu64 " compressed blocks, %.1f MB on the wire), nbdcopy %.2f s; "
                       "over TLS: migrate %.2f s, migrate+zstd %.2f s\n",
                       set, size >> 20, tls_only ? -1 : tcp, plain, zstd, st.zero_blocks, st.compressed_blocks,
                       st.bytes_sent / 1e6, nbd, tls_plain, tls_zstd);
                char name[128];
                if (!tls_only) {
                        snprintf(name, sizeof(name), "migrate_%s_throughput_GBps_vs_tcp", set);
                        result(name, gb / plain, "loopback_tcp", gb / tcp);
                        snprintf(name, sizeof(name), "migrate_zstd_%s_throughput_GBps_vs_tcp", set);
                        result(name, gb / zstd, "loopback_tcp", gb / tcp);
                }
                if (nbd > 0) {
                        snprintf(name, sizeof(name), "migrate_%s_throughput_GBps_vs_nbdcopy", set);
                        result(name, gb / MIN(plain, zstd), "nbdcopy_nbdkit_file", gb / nbd);
                }
                snprintf(name, sizeof(name), "migrate_tls_%s_throughput_GBps_vs_plain", set);
                result(name, gb / tls_plain, "migrate_plain_tcp", gb / plain);
                snprintf(name, sizeof(name), "migrate_zstd_tls_%s_throughput_GBps_vs_plain", set);
                result(name, gb / tls_zstd, "migrate_zstd_plain_tcp", gb / zstd);
        }
        free(data);
        tls_context_free(tls);
        return 0;
}
