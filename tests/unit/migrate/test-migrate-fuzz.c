/* Hostile peers against a running migration. Receiver: after a valid handshake a fake source
 * sends valid blocks and then one malformed frame (out-of-range block, wrong length, unknown
 * device or type, undefined flags, oversized or truncated frame, unordered DIRTY list, a frame
 * only a destination may send); the destination must stop with a clear error and hold exactly
 * the valid blocks. Sender: a fake destination answers the handshake and then sends malformed
 * frames; the source must stop with a clear error and without having transferred authority.
 * Over 10,000 frames in all, seeded; also runs under ASan/UBSan. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/migrate.h"
#include "drafter/waiting_cache.h"

#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define DEV_SIZE (256u << 10)
#define BS 4096u
#define BLOCKS (DEV_SIZE / BS)

static int send_raw(int fd, const void *buf, size_t len) {
        struct iovec iov = {(void *)buf, len};
        return io_write_iov(fd, &iov, 1) < 0 ? -1 : 0;
}

static int send_frame(int fd, uint8_t type, uint8_t flags, uint16_t device, const void *payload, uint32_t len) {
        uint8_t h[MIGRATE_HEADER_SIZE];
        migrate_header_encode(h, type, flags, device, len);
        if (send_raw(fd, h, sizeof(h)) < 0)
                return -1;
        return len ? send_raw(fd, payload, len) : 0;
}

struct fake_source {
        int fd;
        uint64_t seed;
        unsigned valid; /* valid blocks sent, mirrored into ref */
        uint8_t *ref;
        unsigned frames;
};

/* Send one frame that is invalid in a way chosen by `kind`. */
static void send_malformed(int fd, struct test_rng *rng, unsigned kind) {
        static uint8_t p[8 + 2 * BS];
        memset(p, 0x5a, sizeof(p));
        switch (kind) {
        case 0: /* block beyond the device */
                migrate_encode_block_index(p, BLOCKS + test_rng_below(rng, 1000));
                send_frame(fd, MIGRATE_BLOCK, 0, 0, p, 8 + BS);
                break;
        case 1: /* wrong payload length */
                migrate_encode_block_index(p, test_rng_below(rng, BLOCKS));
                send_frame(fd, MIGRATE_BLOCK, 0, 0, p, 8 + BS - 1 - (uint32_t)test_rng_below(rng, 100));
                break;
        case 2: /* unknown device */
                migrate_encode_block_index(p, 0);
                send_frame(fd, MIGRATE_BLOCK, 0, (uint16_t)(1 + test_rng_below(rng, 1000)), p, 8 + BS);
                break;
        case 3: /* unknown type */
                send_frame(fd, (uint8_t)(12 + test_rng_below(rng, 200)), 0, 0, p, 8);
                break;
        case 4: /* undefined flags */
                migrate_encode_block_index(p, 0);
                send_frame(fd, MIGRATE_BLOCK, (uint8_t)(1 + test_rng_below(rng, 255)), 0, p, 8 + BS);
                break;
        case 5: { /* oversized frame header */
                uint8_t h[MIGRATE_HEADER_SIZE];
                migrate_header_encode(h, MIGRATE_BLOCK, 0, 0, MIGRATE_MAX_PAYLOAD + 1 + (uint32_t)test_rng_below(rng, 1000));
                send_raw(fd, h, sizeof(h));
                break;
        }
        case 6: { /* a block whose payload never fully arrives */
                uint8_t h[MIGRATE_HEADER_SIZE];
                migrate_header_encode(h, MIGRATE_BLOCK, 0, 0, 8 + BS);
                migrate_encode_block_index(p, test_rng_below(rng, BLOCKS));
                send_raw(fd, h, sizeof(h));
                send_raw(fd, p, 8 + test_rng_below(rng, BS));
                break;
        }
        case 7: { /* unordered DIRTY list */
                uint32_t count = htole32(2);
                memcpy(p, &count, 4);
                migrate_encode_block_index(p + 4, 9);
                migrate_encode_block_index(p + 12, 3);
                send_frame(fd, MIGRATE_DIRTY, 0, 0, p, 20);
                break;
        }
        case 8: { /* what only a destination may send */
                uint32_t n = migrate_encode_range(p, 0, 1);
                send_frame(fd, MIGRATE_NEED_AT, 0, 0, p, n);
                break;
        }
        default: { /* a zstd block that does not decompress to a block */
                migrate_encode_block_index(p, test_rng_below(rng, BLOCKS));
                send_frame(fd, MIGRATE_BLOCK_ZSTD, 0, 0, p, 8 + 100);
                break;
        }
        }
}

static void *fake_source(void *arg) {
        struct fake_source *s = arg;
        struct test_rng rng = {s->seed};
        uint8_t p[20];
        send_frame(s->fd, MIGRATE_HELLO, 0, MIGRATE_CONNECTION, p, migrate_encode_hello(p, MIGRATE_ROLE_SOURCE, 3));
        struct migrate_device_table t = {.count = 1};
        t.devices[0] = (struct migrate_device_info){.id = 0, .name = "disk", .size = DEV_SIZE, .block_size = BS};
        uint8_t *dp;
        uint32_t dlen;
        if (migrate_devices_encode(&t, &dp, &dlen) < 0)
                return NULL;
        send_frame(s->fd, MIGRATE_DEVICES, 0, MIGRATE_CONNECTION, dp, dlen);
        free(dp);
        s->frames += 2;
        /* Valid blocks; then wait until they are applied before breaking the stream, so the
         * check below knows exactly what should be there. */
        unsigned n = (unsigned)test_rng_below(&rng, 6);
        static _Thread_local uint8_t block[8 + BS];
        for (unsigned i = 0; i < n; i++) {
                uint64_t b = test_rng_below(&rng, BLOCKS);
                migrate_encode_block_index(block, b);
                test_rng_fill(&rng, block + 8, BS);
                if (send_frame(s->fd, MIGRATE_BLOCK, 0, 0, block, 8 + BS) < 0)
                        return NULL;
                memcpy(s->ref + b * BS, block + 8, BS);
                s->valid++;
                s->frames++;
        }
        send_malformed(s->fd, &rng, (unsigned)test_rng_below(&rng, 10));
        s->frames++;
        shutdown(s->fd, SHUT_WR);
        return NULL;
}

static int open_memory(void *ctx, const struct migrate_device_info *info, struct block_device **ret) {
        return memory_device_open(info->name, info->size, info->block_size, ret);
}

static void test_hostile_source(void **state) {
        struct test_rng rng = {test_seed("test-migrate-fuzz")};
        unsigned frames = 0, connections = 0;
        uint8_t *ref = malloc(DEV_SIZE), *got = malloc(DEV_SIZE);
        while (frames < 8000) {
                int sv[2];
                assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
                memset(ref, 0, DEV_SIZE);
                struct fake_source s = {sv[0], test_rng_next(&rng), 0, ref, 0};
                pthread_t t;
                assert_int_equal(pthread_create(&t, NULL, fake_source, &s), 0);
                struct migrate_destination *d;
                struct migrate_destination_config cfg = {.open_device = open_memory, .read_timeout_ns = NSEC_PER_SEC};
                assert_ok(migrate_destination_start(sv[1], &cfg, &d));
                int r = migrate_destination_wait(d, NULL);
                pthread_join(t, NULL);
                if (r >= 0)
                        fail_msg("connection %u: a malformed stream was accepted", connections);
                if (strncmp(error_message(), "migration: ", 11) != 0 && strncmp(error_message(), "source: ", 8) != 0)
                        fail_msg("connection %u: unclear error \"%s\"", connections, error_message());
                /* Exactly the valid blocks; reads of blocks never sent fail fast (cancelled). */
                struct block_device *dev = migrate_destination_device(d, 0);
                struct block_device *inner = waiting_cache_inner(dev);
                assert_ok(block_device_read_at(inner, got, DEV_SIZE, 0));
                assert_memory_equal(got, ref, DEV_SIZE);
                migrate_destination_free(d);
                close(sv[0]);
                frames += s.frames;
                connections++;
        }
        fprintf(stderr, "  destination: %u frames over %u connections, every one refused cleanly\n", frames,
                connections);
        free(ref);
        free(got);
}

struct fake_destination {
        int fd;
        uint64_t seed;
        unsigned frames;
        unsigned kind;
};

static void *fake_destination(void *arg) {
        struct fake_destination *f = arg;
        struct test_rng rng = {f->seed};
        uint8_t *buf = NULL;
        size_t cap = 0;
        struct migrate_frame fr;
        /* HELLO both ways, DEVICES from the source, our DEVICES_ACK: a correct start. */
        uint8_t p[64];
        if (migrate_read_frame(f->fd, &buf, &cap, &fr) < 0 ||
            send_frame(f->fd, MIGRATE_HELLO, 0, MIGRATE_CONNECTION, p,
                       migrate_encode_hello(p, MIGRATE_ROLE_DESTINATION, 3)) < 0 ||
            migrate_read_frame(f->fd, &buf, &cap, &fr) < 0) {
                free(buf);
                return NULL;
        }
        send_frame(f->fd, MIGRATE_DEVICES_ACK, 0, MIGRATE_CONNECTION, NULL, 0);
        f->frames += 2;
        unsigned kind = f->kind = (unsigned)test_rng_below(&rng, 6);
        uint32_t n;
        switch (kind) {
        case 0: /* NEED_AT beyond the device */
                n = migrate_encode_range(p, BLOCKS + test_rng_below(&rng, 100), 1);
                send_frame(f->fd, MIGRATE_NEED_AT, 0, 0, p, n);
                break;
        case 1: /* a block: only sources send those */
                migrate_encode_block_index(p, 0);
                send_frame(f->fd, MIGRATE_BLOCK_ZERO, 0, 0, p, 12);
                break;
        case 2: /* an event a destination may not send */
                n = migrate_encode_event(p, MIGRATE_EVENT_AUTHORITY);
                send_frame(f->fd, MIGRATE_EVENT, 0, MIGRATE_CONNECTION, p, n);
                break;
        case 3: /* garbage header */
                test_rng_fill(&rng, p, MIGRATE_HEADER_SIZE);
                p[4] = 200;
                send_raw(f->fd, p, MIGRATE_HEADER_SIZE);
                break;
        case 4: /* completion before authority */
                n = migrate_encode_event(p, MIGRATE_EVENT_COMPLETED_ACK);
                send_frame(f->fd, MIGRATE_EVENT, 0, MIGRATE_CONNECTION, p, n);
                break;
        default: /* an error report */
                n = migrate_encode_error(p, -EIO, "disk full\nover here");
                send_frame(f->fd, MIGRATE_ERROR, 0, MIGRATE_CONNECTION, p, n);
                break;
        }
        f->frames++;
        /* Keep reading what the source sends until it gives up. */
        while (migrate_read_frame(f->fd, &buf, &cap, &fr) >= 0)
                ;
        free(buf);
        return NULL;
}

static void test_hostile_destination(void **state) {
        struct test_rng rng = {test_seed("test-migrate-fuzz") + 1};
        unsigned frames = 0, runs = 0, in_doubt = 0;
        struct block_device *dev;
        assert_ok(memory_device_open("disk", DEV_SIZE, BS, &dev));
        uint8_t *before = malloc(DEV_SIZE), *after = malloc(DEV_SIZE);
        test_rng_fill(&rng, before, DEV_SIZE);
        assert_ok(block_device_write_at(dev, before, DEV_SIZE, 0));
        while (frames < 2500) {
                int sv[2];
                assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
                struct fake_destination f = {sv[1], test_rng_next(&rng), 0, 0};
                pthread_t t;
                assert_int_equal(pthread_create(&t, NULL, fake_destination, &f), 0);
                /* Slow cycles, so the bad frame arrives while the source is still working. */
                struct migrate_source_device sd = {"disk", dev, NULL, NULL, 0, 0, 0, 0, NULL, NULL, false};
                struct migrate_source_config cfg = {.devices = &sd, .count = 1};
                struct migrate_stats st;
                int r = migrate_source_run(sv[0], &cfg, &st);
                close(sv[0]);
                pthread_join(t, NULL);
                close(sv[1]);
                if (r >= 0)
                        fail_msg("run %u: the source completed against a hostile destination", runs);
                /* The source keeps its devices, unless it had already sent AUTHORITY when the bad
                 * frame came: only an ERROR from the destination proves it did not take over. */
                if (st.authority_transferred) {
                        if (f.kind == 5 || !strstr(error_message(), "the destination may have taken over"))
                                fail_msg("run %u: authority given up against a destination that refused (%s)", runs,
                                         error_message());
                        in_doubt++;
                }
                if (strncmp(error_message(), "destination: ", 13) != 0 && strncmp(error_message(), "migration: ", 11) != 0)
                        fail_msg("run %u: unclear error \"%s\"", runs, error_message());
                assert_null(strchr(error_message(), '\n'));
                frames += f.frames;
                runs++;
        }
        assert_ok(block_device_read_at(dev, after, DEV_SIZE, 0));
        assert_memory_equal(before, after, DEV_SIZE);
        fprintf(stderr, "  source: %u frames over %u runs, every run stopped with a clear error (%u after AUTHORITY)\n",
                frames, runs, in_doubt);
        block_device_close(dev);
        free(before);
        free(after);
}

int main(void) {
        signal(SIGPIPE, SIG_IGN);
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_hostile_source),
                cmocka_unit_test(test_hostile_destination),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
