/* Migration frames: every message type round-trips through a socket; a table of malformed
 * frames is refused with a message naming the problem; and 20,000 seeded mutations of valid
 * frames either parse into messages that respect every bound or are refused — never a crash
 * (this also runs under ASan/UBSan). */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/migrate_frame.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct migrate_device_table table;

static int setup(void **state) {
        table.count = 2;
        table.devices[0] = (struct migrate_device_info){.id = 7, .name = "memory", .size = 10 * 65536 + 100,
                                                        .block_size = 65536};
        table.devices[1] = (struct migrate_device_info){.id = 9, .name = "disk", .size = 4096 * 64,
                                                        .block_size = 4096, .flags = MIGRATE_DEVICE_SHAREDBASE};
        return 0;
}

/* Write a frame into one end of a socket pair and read it back from the other. */
static void round_trip(int sv[2], uint8_t type, uint16_t device, const void *payload, uint32_t len,
                       uint8_t **buf, size_t *cap, struct migrate_frame *ret) {
        struct iovec iov = {(void *)payload, len};
        assert_ok(migrate_write_frame(sv[0], type, 0, device, &iov, len ? 1 : 0));
        assert_ok(migrate_read_frame(sv[1], buf, cap, ret));
        assert_int_equal(ret->type, type);
        assert_int_equal(ret->device, device);
        assert_int_equal(ret->length, len);
}

static void test_round_trips(void **state) {
        int sv[2];
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
        uint8_t *buf = NULL, p[64 + MIGRATE_MAX_MESSAGE];
        size_t cap = 0;
        struct migrate_frame f;
        struct migrate_message m;

        uint32_t n = migrate_encode_hello(p, MIGRATE_ROLE_SOURCE, MIGRATE_CAP_ZSTD | MIGRATE_CAP_ZERO_RUNS);
        round_trip(sv, MIGRATE_HELLO, MIGRATE_CONNECTION, p, n, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, NULL, true, &m));
        assert_int_equal(m.hello.version, MIGRATE_VERSION);
        assert_int_equal(m.hello.role, MIGRATE_ROLE_SOURCE);
        assert_int_equal(m.hello.capabilities, 3);

        uint8_t *dp;
        uint32_t dlen;
        assert_ok(migrate_devices_encode(&table, &dp, &dlen));
        round_trip(sv, MIGRATE_DEVICES, MIGRATE_CONNECTION, dp, dlen, &buf, &cap, &f);
        free(dp);
        struct migrate_device_table got;
        assert_ok(migrate_devices_decode(&f, &got));
        assert_int_equal(got.count, 2);
        assert_string_equal(got.devices[1].name, "disk");
        assert_int_equal(got.devices[0].size, 10 * 65536 + 100);
        assert_int_equal(got.devices[1].flags, MIGRATE_DEVICE_SHAREDBASE);

        /* A full block and the short last block of "memory". */
        static uint8_t block[8 + 65536];
        migrate_encode_block_index(block, 10);
        memset(block + 8, 0xab, 100);
        round_trip(sv, MIGRATE_BLOCK, 7, block, 8 + 100, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, true, &m));
        assert_int_equal(m.device, 0);
        assert_int_equal(m.block.block, 10);
        assert_int_equal(m.block.length, 100);
        assert_int_equal(m.block.data[99], 0xab);

        n = migrate_encode_range(p, 3, 7);
        round_trip(sv, MIGRATE_NEED_AT, 9, p, n, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, false, &m));
        assert_int_equal(m.device, 1);
        assert_int_equal(m.range.first, 3);
        assert_int_equal(m.range.count, 7);

        uint8_t dirty[4 + 3 * 8];
        uint32_t three = 3;
        memcpy(dirty, &three, 4);
        migrate_encode_block_index(dirty + 4, 1);
        migrate_encode_block_index(dirty + 12, 5);
        migrate_encode_block_index(dirty + 20, 63);
        round_trip(sv, MIGRATE_DIRTY, 9, dirty, sizeof(dirty), &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, true, &m));
        assert_int_equal(m.dirty.count, 3);

        n = migrate_encode_event(p, MIGRATE_EVENT_AUTHORITY);
        round_trip(sv, MIGRATE_EVENT, MIGRATE_CONNECTION, p, n, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, true, &m));
        assert_int_equal(m.event, MIGRATE_EVENT_AUTHORITY);

        /* FINAL: from the source, for a device; nothing else. */
        n = migrate_encode_event(p, MIGRATE_EVENT_FINAL);
        round_trip(sv, MIGRATE_EVENT, 9, p, n, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, true, &m));
        assert_int_equal(m.event, MIGRATE_EVENT_FINAL);
        assert_int_equal(migrate_frame_parse(&f, &table, false, &m), -EBADMSG);
        round_trip(sv, MIGRATE_EVENT, MIGRATE_CONNECTION, p, n, &buf, &cap, &f);
        assert_int_equal(migrate_frame_parse(&f, &table, true, &m), -EBADMSG);

        /* READY: from the destination, for the connection; nothing else. */
        n = migrate_encode_event(p, MIGRATE_EVENT_READY);
        round_trip(sv, MIGRATE_EVENT, MIGRATE_CONNECTION, p, n, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, false, &m));
        assert_int_equal(m.event, MIGRATE_EVENT_READY);
        assert_int_equal(migrate_frame_parse(&f, &table, true, &m), -EBADMSG);
        round_trip(sv, MIGRATE_EVENT, 9, p, n, &buf, &cap, &f);
        assert_int_equal(migrate_frame_parse(&f, &table, false, &m), -EBADMSG);

        n = migrate_encode_error(p, -ENOSPC, "disk: overlay out/overlay/disk: No space left\non device");
        round_trip(sv, MIGRATE_ERROR, MIGRATE_CONNECTION, p, n, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, false, &m));
        assert_int_equal(m.error.err, -ENOSPC);
        assert_string_equal(m.error.message, "disk: overlay out/overlay/disk: No space left?on device");

        round_trip(sv, MIGRATE_DEVICES_ACK, MIGRATE_CONNECTION, NULL, 0, &buf, &cap, &f);
        assert_ok(migrate_frame_parse(&f, &table, false, &m));

        /* The peer going away mid-frame is a clear error. */
        uint8_t h[MIGRATE_HEADER_SIZE];
        migrate_header_encode(h, MIGRATE_BLOCK, 0, 7, 8 + 65536);
        assert_int_equal(write(sv[0], h, sizeof(h)), (ssize_t)sizeof(h));
        close(sv[0]);
        assert_int_equal(migrate_read_frame(sv[1], &buf, &cap, &f), -ECONNRESET);
        assert_string_equal(error_message(), "migration: connection lost inside a BLOCK frame");
        assert_int_equal(migrate_read_frame(sv[1], &buf, &cap, &f), -ECONNRESET);
        assert_string_equal(error_message(), "migration: the peer closed the connection");
        close(sv[1]);
        free(buf);
}

struct bad_case {
        uint8_t type;
        uint16_t device;
        bool from_source;
        uint8_t payload[40];
        uint32_t length;
        const char *message;
};

static void test_malformed(void **state) {
        uint8_t hello[20];
        migrate_encode_hello(hello, MIGRATE_ROLE_DESTINATION, 0);
        const struct bad_case cases[] = {
                {MIGRATE_HELLO, MIGRATE_CONNECTION, false, "NOTDRAFT", 20, "HELLO without the protocol magic"},
                {MIGRATE_HELLO, MIGRATE_CONNECTION, false, {0}, 19, "HELLO of 19 bytes, expected 20"},
                {MIGRATE_BLOCK, 7, false, {0}, 8, "BLOCK may not come from the destination"},
                {MIGRATE_NEED_AT, 7, true, {0}, 12, "NEED_AT may not come from the source"},
                {MIGRATE_BLOCK, 8, true, {0}, 8, "BLOCK for unknown device id 8"},
                {MIGRATE_BLOCK, 7, true, {11}, 8, "BLOCK for block 11 of device \"memory\", which has 11 blocks"},
                {MIGRATE_BLOCK, 7, true, {0}, 8 + 100, "BLOCK 0 of device \"memory\" carries 100 bytes, the block has 65536"},
                {MIGRATE_BLOCK, 7, true, {0}, 7, "BLOCK of 7 bytes is too short"},
                {MIGRATE_BLOCK_ZSTD, 7, true, {0}, 8, "BLOCK_ZSTD 0 of device \"memory\" has an implausible size 0"},
                {MIGRATE_BLOCK_ZERO, 9, true, {60, 0, 0, 0, 0, 0, 0, 0, 5}, 12,
                 "BLOCK_ZERO of blocks 60+5 is outside device \"disk\" (64 blocks)"},
                {MIGRATE_BLOCK_ZERO, 9, true, {1}, 12, "BLOCK_ZERO of blocks 1+0 is outside device \"disk\""},
                {MIGRATE_NEED_AT, 9, false, {0}, 11, "NEED_AT of 11 bytes, expected 12"},
                {MIGRATE_DIRTY, 9, true, {2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 5}, 20, "DIRTY entry 1 (block 5)"},
                {MIGRATE_DIRTY, 9, true, {2, 0, 0, 0}, 12, "DIRTY lists 2 blocks in 12 bytes"},
                {MIGRATE_DIRTY, 9, true, {1, 0, 0, 0, 64}, 12, "DIRTY entry 0 (block 64)"},
                {MIGRATE_EVENT, MIGRATE_CONNECTION, true, {1}, 2, "event 1 must come from the source for a device"},
                {MIGRATE_EVENT, 7, true, {3}, 2, "event 3 must come from the source for the connection"},
                {MIGRATE_EVENT, MIGRATE_CONNECTION, true, {4}, 2, "event 4 must come from the destination"},
                {MIGRATE_EVENT, MIGRATE_CONNECTION, false, {7}, 2, "event 7 must come from the source for the connection"},
                {MIGRATE_EVENT, MIGRATE_CONNECTION, true, {8}, 2, "event 8 must come from the destination"},
                {MIGRATE_EVENT, MIGRATE_CONNECTION, false, {99}, 2, "unknown event 99"},
                {MIGRATE_EVENT, MIGRATE_CONNECTION, false, {6}, 3, "EVENT of 3 bytes, expected 2"},
                {MIGRATE_ERROR, MIGRATE_CONNECTION, false, {0, 0, 0, 0, 10}, 8, "ERROR message length 10 does not match"},
                {MIGRATE_DEVICES_ACK, MIGRATE_CONNECTION, false, {0}, 1, "DEVICES_ACK carries no payload"},
                {MIGRATE_DEVICES_ACK, 7, false, {0}, 0, "DEVICES_ACK must be connection-level, got device id 7"},
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct migrate_frame f = {.type = cases[i].type, .device = cases[i].device,
                                          .length = cases[i].length};
                static uint8_t payload[8 + 65536];
                memset(payload, 0, sizeof(payload));
                memcpy(payload, cases[i].payload, sizeof(cases[i].payload));
                if (i == 0)
                        memcpy(payload + 8, hello + 8, 12);
                f.payload = payload;
                struct migrate_message m;
                error_clear();
                int r = migrate_frame_parse(&f, &table, cases[i].from_source, &m);
                if (r != -EBADMSG || !strstr(error_message(), cases[i].message))
                        fail_msg("case %zu: got %d \"%s\", expected \"%s\"", i, r, error_message(), cases[i].message);
        }

        /* Header-level checks. */
        uint8_t h[MIGRATE_HEADER_SIZE];
        struct migrate_frame f;
        migrate_header_encode(h, 42, 0, 0, 0);
        assert_int_equal(migrate_header_decode(h, &f), -EBADMSG);
        assert_string_equal(error_message(), "migration: unknown frame type 42");
        migrate_header_encode(h, MIGRATE_BLOCK, 0, 7, MIGRATE_MAX_PAYLOAD + 1);
        assert_int_equal(migrate_header_decode(h, &f), -EBADMSG);
        migrate_header_encode(h, MIGRATE_BLOCK, 4, 7, 8);
        assert_int_equal(migrate_header_decode(h, &f), -EBADMSG);
        assert_string_equal(error_message(), "migration: frame type 4 with undefined flags 0x4");

        /* DEVICES tables. */
        struct migrate_device_table t = {.count = 1};
        t.devices[0] = (struct migrate_device_info){.id = 1, .name = "disk", .size = 1 << 20, .block_size = 1000};
        uint8_t *dp;
        uint32_t dlen;
        assert_ok(migrate_devices_encode(&t, &dp, &dlen));
        f = (struct migrate_frame){.type = MIGRATE_DEVICES, .device = MIGRATE_CONNECTION, .length = dlen, .payload = dp};
        struct migrate_device_table got;
        assert_int_equal(migrate_devices_decode(&f, &got), -EBADMSG);
        assert_string_equal(error_message(), "migration: device \"disk\" has block size 1000 (a power of two from 512 "
                                             "to 64 MiB expected)");
        f.length = dlen - 1;
        assert_int_equal(migrate_devices_decode(&f, &got), -EBADMSG);
        free(dp);
        t.count = 2;
        t.devices[0].block_size = 4096;
        t.devices[1] = t.devices[0];
        assert_ok(migrate_devices_encode(&t, &dp, &dlen));
        f.payload = dp;
        f.length = dlen;
        assert_int_equal(migrate_devices_decode(&f, &got), -EBADMSG);
        assert_string_equal(error_message(), "migration: device \"disk\" (id 1) appears twice");
        free(dp);
}

/* Any frame that parses must respect the bounds the receiver relies on. */
static void check_invariants(const struct migrate_frame *f, const struct migrate_message *m) {
        const struct migrate_device_info *d = &table.devices[m->device];
        uint64_t blocks = (d->size + d->block_size - 1) / d->block_size;
        switch (m->type) {
        case MIGRATE_BLOCK:
        case MIGRATE_BLOCK_ZSTD:
                assert_true(m->block.block < blocks);
                assert_true(m->block.data + m->block.length == f->payload + f->length);
                break;
        case MIGRATE_BLOCK_ZERO:
        case MIGRATE_NEED_AT:
        case MIGRATE_DONT_NEED_AT:
                assert_true(m->range.count > 0 && m->range.first + m->range.count <= blocks);
                break;
        case MIGRATE_DIRTY:
                assert_true(4 + (uint64_t)m->dirty.count * 8 == f->length);
                break;
        case MIGRATE_ERROR:
                assert_true(strlen(m->error.message) <= MIGRATE_MAX_MESSAGE);
                break;
        default:
                break;
        }
}

static void test_mutations(void **state) {
        struct test_rng rng = {test_seed("test-frame")};
        static uint8_t payload[8 + 65536 + 64];
        unsigned accepted = 0, refused = 0;
        for (int i = 0; i < 20000; i++) {
                /* A valid frame of a random kind… */
                uint8_t type = (uint8_t)(1 + test_rng_below(&rng, 11));
                bool from_source = test_rng_below(&rng, 2);
                uint16_t device = test_rng_below(&rng, 3) ? table.devices[test_rng_below(&rng, 2)].id : MIGRATE_CONNECTION;
                uint32_t len = 0;
                switch (type) {
                case MIGRATE_HELLO:
                        len = migrate_encode_hello(payload, from_source ? MIGRATE_ROLE_SOURCE : MIGRATE_ROLE_DESTINATION, 3);
                        break;
                case MIGRATE_BLOCK:
                        len = migrate_encode_block_index(payload, test_rng_below(&rng, 12)) + 4096;
                        break;
                case MIGRATE_BLOCK_ZERO:
                case MIGRATE_NEED_AT:
                case MIGRATE_DONT_NEED_AT:
                        len = migrate_encode_range(payload, test_rng_below(&rng, 70), (uint32_t)test_rng_below(&rng, 70));
                        break;
                case MIGRATE_DIRTY: {
                        uint32_t count = (uint32_t)test_rng_below(&rng, 5);
                        memcpy(payload, &count, 4);
                        for (uint32_t k = 0; k < count; k++)
                                migrate_encode_block_index(payload + 4 + 8 * k, k * 3 + test_rng_below(&rng, 3));
                        len = 4 + 8 * count;
                        break;
                }
                case MIGRATE_EVENT:
                        len = migrate_encode_event(payload, (enum migrate_event)(1 + test_rng_below(&rng, 6)));
                        break;
                case MIGRATE_ERROR:
                        len = migrate_encode_error(payload, -5, "boom");
                        break;
                default:
                        len = (uint32_t)test_rng_below(&rng, 64);
                        test_rng_fill(&rng, payload, len);
                }
                /* …then damaged: flipped bytes, a wrong length, or untouched. */
                unsigned how = (unsigned)test_rng_below(&rng, 4);
                if (how == 0 && len > 0)
                        for (int k = 0; k < 3; k++)
                                payload[test_rng_below(&rng, len)] ^= (uint8_t)(1 + test_rng_below(&rng, 255));
                else if (how == 1)
                        len = (uint32_t)test_rng_below(&rng, len + 16);
                uint8_t h[MIGRATE_HEADER_SIZE];
                migrate_header_encode(h, type, 0, device, len);
                if (test_rng_below(&rng, 10) == 0)
                        h[test_rng_below(&rng, MIGRATE_HEADER_SIZE)] ^= (uint8_t)(1 + test_rng_below(&rng, 255));
                struct migrate_frame f;
                if (migrate_header_decode(h, &f) < 0 || f.length > sizeof(payload)) {
                        refused++;
                        continue;
                }
                f.payload = payload;
                struct migrate_message m;
                struct migrate_device_table t;
                int r = f.type == MIGRATE_DEVICES ? migrate_devices_decode(&f, &t)
                                                  : migrate_frame_parse(&f, &table, from_source, &m);
                if (r < 0) {
                        assert_int_equal(r, -EBADMSG);
                        assert_true(strncmp(error_message(), "migration: ", 11) == 0);
                        refused++;
                        continue;
                }
                accepted++;
                if (f.type != MIGRATE_DEVICES)
                        check_invariants(&f, &m);
        }
        fprintf(stderr, "  20000 frames: %u accepted within bounds, %u refused\n", accepted, refused);
        assert_true(accepted > 1000 && refused > 1000);
}

/* S3 frames: a round trip, each malformed field refused with its reason, and seeded damage
 * either refused or parsed within bounds. Device 7 ("memory", 11 blocks of 64 KiB) is marked S3. */
static uint32_t s3_frame(uint8_t **ret, uint32_t object_size, uint64_t objects, const char *prefix) {
        uint8_t bits[2] = {0x05, 0x00}; /* objects 0 and 2 */
        struct migrate_s3_info info = {.object_size = object_size, .concurrency = 16, .secure = true,
                                       .endpoint = "127.0.0.1:4568", .bucket = "drafter-test",
                                       .access_key = "S3RVER", .secret_key = "S3RVER", .objects = objects,
                                       .bitmap = bits};
        snprintf(info.prefix, sizeof(info.prefix), "%s", prefix);
        uint32_t len;
        assert_ok(migrate_s3_encode(&info, ret, &len));
        return len;
}

static int parse_s3(const struct migrate_device_table *t, uint8_t *p, uint32_t len, struct migrate_message *m) {
        struct migrate_frame f = {.type = MIGRATE_S3, .device = 7, .length = len, .payload = p};
        return migrate_frame_parse(&f, t, true, m);
}

static void test_s3(void **state) {
        struct migrate_device_table t = table;
        t.devices[0].flags = MIGRATE_DEVICE_S3;
        uint8_t *p;
        struct migrate_message m;
        /* 10 * 64 KiB + 100 bytes in 256 KiB objects: 3 objects. */
        uint32_t len = s3_frame(&p, 4 * 65536, 3, "drafter/0123456789abcdef");
        assert_ok(parse_s3(&t, p, len, &m));
        assert_int_equal(m.s3.object_size, 4 * 65536);
        assert_int_equal(m.s3.concurrency, 16);
        assert_true(m.s3.secure);
        assert_string_equal(m.s3.endpoint, "127.0.0.1:4568");
        assert_string_equal(m.s3.bucket, "drafter-test");
        assert_string_equal(m.s3.secret_key, "S3RVER");
        assert_string_equal(m.s3.prefix, "drafter/0123456789abcdef");
        assert_int_equal(m.s3.objects, 3);
        assert_int_equal(m.s3.bitmap[0], 0x05);
        /* Refused: device not marked, wrong counts and sizes, stray bits, bad bytes, short frames. */
        assert_int_equal(parse_s3(&table, p, len, &m), -EBADMSG);
        assert_non_null(strstr(error_message(), "which DEVICES did not mark"));
        free(p);
        len = s3_frame(&p, 4 * 65536, 4, "x");
        assert_int_equal(parse_s3(&t, p, len, &m), -EBADMSG);
        assert_non_null(strstr(error_message(), "lists 4 objects, its size makes 3"));
        free(p);
        len = s3_frame(&p, 65536 + 4096, 3, "x");
        assert_int_equal(parse_s3(&t, p, len, &m), -EBADMSG);
        assert_non_null(strstr(error_message(), "is not a multiple of its block size"));
        free(p);
        len = s3_frame(&p, 4 * 65536, 3, "x");
        p[len - 1] = 0x0f; /* object 3 does not exist */
        assert_int_equal(parse_s3(&t, p, len, &m), -EBADMSG);
        assert_non_null(strstr(error_message(), "bits set past the last object"));
        p[len - 1] = 0x05;
        p[14] = '\n'; /* inside the endpoint */
        assert_int_equal(parse_s3(&t, p, len, &m), -EBADMSG);
        assert_non_null(strstr(error_message(), "endpoint has a byte 0x0a"));
        p[14] = '2';
        assert_int_equal(parse_s3(&t, p, len - 1, &m), -EBADMSG);
        assert_non_null(strstr(error_message(), "bitmap of 0 bytes for 3 objects"));
        assert_int_equal(parse_s3(&t, p, 20, &m), -EBADMSG);
        assert_int_equal(parse_s3(&t, p, 11, &m), -EBADMSG);
        assert_non_null(strstr(error_message(), "too short"));

        struct test_rng rng = {test_seed("test-frame-s3")};
        unsigned accepted = 0, refused = 0;
        uint8_t *q = malloc(len + 16);
        assert_non_null(q);
        for (int i = 0; i < 5000; i++) {
                memcpy(q, p, len);
                uint32_t n = len;
                if (test_rng_below(&rng, 3))
                        for (int k = 0; k < 2; k++)
                                q[test_rng_below(&rng, len)] ^= (uint8_t)(1 + test_rng_below(&rng, 255));
                else
                        n = (uint32_t)test_rng_below(&rng, len + 16);
                int r = parse_s3(&t, q, n, &m);
                if (r < 0) {
                        assert_int_equal(r, -EBADMSG);
                        refused++;
                        continue;
                }
                accepted++;
                assert_int_equal(m.s3.objects, 3);
                assert_true(m.s3.object_size % 65536 == 0 && m.s3.object_size <= (64u << 20));
                assert_true(strlen(m.s3.endpoint) <= MIGRATE_S3_STRING_MAX && strlen(m.s3.prefix) <= MIGRATE_S3_STRING_MAX);
                assert_true(m.s3.bitmap >= q && m.s3.bitmap < q + n);
        }
        fprintf(stderr, "  5000 S3 frames: %u accepted within bounds, %u refused\n", accepted, refused);
        assert_true(accepted > 100 && refused > 1000);
        free(q);
        free(p);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_s3),
                cmocka_unit_test(test_round_trips),
                cmocka_unit_test(test_malformed),
                cmocka_unit_test(test_mutations),
        };
        return cmocka_run_group_tests(tests, setup, NULL);
}
