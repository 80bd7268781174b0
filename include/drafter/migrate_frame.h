/* migrate_frame.h — frames of the migration wire protocol (docs/protocol.md): encoding, and
 * decoding that validates every field against the device table before anyone acts on it.
 * Pure functions on buffers (plus read/write helpers for file descriptors); thread-safe. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define MIGRATE_MAGIC "DRFTMIG"
#define MIGRATE_VERSION 1
#define MIGRATE_HEADER_SIZE 8
#define MIGRATE_MAX_PAYLOAD ((64u << 20) + (64u << 10))
#define MIGRATE_CONNECTION 0xffffu /* device id of connection-level frames */
#define MIGRATE_MAX_DEVICES 256
#define MIGRATE_MAX_MESSAGE 1024

enum migrate_type {
        MIGRATE_HELLO = 1,
        MIGRATE_DEVICES = 2,
        MIGRATE_DEVICES_ACK = 3,
        MIGRATE_BLOCK = 4,
        MIGRATE_BLOCK_ZERO = 5,
        MIGRATE_BLOCK_ZSTD = 6,
        MIGRATE_NEED_AT = 7,
        MIGRATE_DONT_NEED_AT = 8,
        MIGRATE_DIRTY = 9,
        MIGRATE_EVENT = 10,
        MIGRATE_ERROR = 11,
        MIGRATE_S3 = 12, /* src, per device, in the handshake: where the device's current objects are in S3 */
};

enum migrate_role { MIGRATE_ROLE_SOURCE = 1, MIGRATE_ROLE_DESTINATION = 2 };

enum migrate_capability {
        MIGRATE_CAP_ZSTD = 1u << 0,
        MIGRATE_CAP_ZERO_RUNS = 1u << 1,
        MIGRATE_CAP_BARRIER = 1u << 2, /* EVENT BARRIER / BARRIER_ACK */
        MIGRATE_CAP_S3 = 1u << 3,      /* S3 frames, devices fetched partly from S3 */
        /* Announced by a source only: a lazy migration (drafter-registry), the hand-over right
         * after the handshake and every block on demand or after it. */
        MIGRATE_CAP_LAZY = 1u << 4,
        MIGRATE_CAP_FINAL = 1u << 5, /* EVENT FINAL */
        /* EVENT READY: the destination says when it can take the VM (its VMM has started); the
         * source waits for it before its dirty cycles, so the suspend never waits for it. */
        MIGRATE_CAP_READY = 1u << 6,
};

enum migrate_device_flag {
        MIGRATE_DEVICE_SHAREDBASE = 1u << 0,
        MIGRATE_DEVICE_S3 = 1u << 1, /* an S3 frame for it follows DEVICES */
};

#define MIGRATE_S3_STRING_MAX 255

/* An S3 frame: the bucket a device is synchronised to (the configuration travels with the VM,
 * so later peers in a chain need none) and which of its objects hold the current contents. */
struct migrate_s3_info {
        uint32_t object_size;
        uint32_t concurrency;
        bool secure;
        char endpoint[MIGRATE_S3_STRING_MAX + 1], bucket[MIGRATE_S3_STRING_MAX + 1];
        char access_key[MIGRATE_S3_STRING_MAX + 1], secret_key[MIGRATE_S3_STRING_MAX + 1];
        char prefix[MIGRATE_S3_STRING_MAX + 1];
        uint64_t objects;      /* ceil(device size / object_size) */
        const uint8_t *bitmap; /* ceil(objects / 8) bytes, bit i (LSB first) = object i is current */
};

enum migrate_event {
        MIGRATE_EVENT_BULK_DONE = 1,
        MIGRATE_EVENT_SUSPENDED = 2,
        MIGRATE_EVENT_AUTHORITY = 3,
        MIGRATE_EVENT_AUTHORITY_ACK = 4,
        MIGRATE_EVENT_COMPLETED = 5,
        MIGRATE_EVENT_COMPLETED_ACK = 6,
        MIGRATE_EVENT_BARRIER = 7,     /* src: answer once everything sent before this is applied */
        MIGRATE_EVENT_BARRIER_ACK = 8, /* dst */
        /* src, per device, while the VM is paused: every block of its final contents has been
         * sent and no DIRTY list follows for it (the destination may read it whole now). */
        MIGRATE_EVENT_FINAL = 9,
        MIGRATE_EVENT_READY = 10, /* dst, with MIGRATE_CAP_READY: ready to take the VM */
};

struct migrate_device_info {
        uint16_t id;
        char name[65];
        uint64_t size;
        uint32_t block_size;
        uint32_t flags;
};

struct migrate_device_table {
        size_t count;
        struct migrate_device_info devices[MIGRATE_MAX_DEVICES];
};

/* A frame as read: header fields and a pointer to its payload. */
struct migrate_frame {
        uint8_t type, flags;
        uint16_t device;
        uint32_t length;
        const uint8_t *payload;
};

/* A validated message. Pointers point into the frame's payload. */
struct migrate_message {
        enum migrate_type type;
        uint16_t device; /* index into the device table for device frames */
        union {
                struct {
                        uint16_t version, role;
                        uint64_t capabilities;
                } hello;
                struct {
                        uint64_t block;
                        const uint8_t *data;
                        uint32_t length; /* raw: the block's length; zstd: compressed length */
                } block;
                struct {
                        uint64_t first;
                        uint32_t count;
                } range; /* BLOCK_ZERO, NEED_AT, DONT_NEED_AT */
                struct {
                        uint32_t count;
                        const uint8_t *blocks; /* count little-endian u64, ascending */
                } dirty;
                uint16_t event;
                struct migrate_s3_info s3;
                struct {
                        int32_t err;
                        char message[MIGRATE_MAX_MESSAGE + 1];
                } error;
        };
};

/* Header: encode, and decode with the bounds that need no context (type known, length bounded). */
void migrate_header_encode(uint8_t out[MIGRATE_HEADER_SIZE], uint8_t type, uint8_t flags, uint16_t device,
                           uint32_t length);
int migrate_header_decode(const uint8_t in[MIGRATE_HEADER_SIZE], struct migrate_frame *ret_frame);

/* Validate a complete frame for the receiving side (`from_source`: the frame was sent by the
 * source) against the device table (may be empty before DEVICES). -EBADMSG with a message naming
 * the problem if anything is off. DEVICES is parsed with migrate_devices_decode(). */
int migrate_frame_parse(const struct migrate_frame *frame, const struct migrate_device_table *table,
                        bool from_source, struct migrate_message *ret_message);

/* DEVICES payload. */
int migrate_devices_encode(const struct migrate_device_table *table, uint8_t **ret_payload, uint32_t *ret_length);
int migrate_devices_decode(const struct migrate_frame *frame, struct migrate_device_table *ret_table);

/* S3 payload (malloc'd); info->bitmap points to info->objects bits. */
int migrate_s3_encode(const struct migrate_s3_info *info, uint8_t **ret_payload, uint32_t *ret_length);

/* Payload builders for the fixed-size messages; return the payload length. */
uint32_t migrate_encode_hello(uint8_t out[20], enum migrate_role role, uint64_t capabilities);
uint32_t migrate_encode_range(uint8_t out[12], uint64_t first, uint32_t count);
uint32_t migrate_encode_event(uint8_t out[2], enum migrate_event event);
uint32_t migrate_encode_block_index(uint8_t out[8], uint64_t block);
/* ERROR payload into out (at least 6 + MIGRATE_MAX_MESSAGE bytes). */
uint32_t migrate_encode_error(uint8_t *out, int err, const char *message);

/* Blocking I/O on a stream: one whole frame, payload into *buf (grown as needed). */
int migrate_read_frame(int fd, uint8_t **buf, size_t *cap, struct migrate_frame *ret_frame);
/* Reading a stream of frames with one readv per frame where the peer keeps up: each payload
 * read also fetches the next frame's header. A frame's payload stays valid until the next call. */
struct migrate_reader {
        int fd;
        uint8_t *buf;
        size_t cap;
        uint8_t head[MIGRATE_HEADER_SIZE];
        size_t head_have;
        size_t left; /* payload bytes of the current frame not read yet */
        uint8_t type;
};
int migrate_reader_init(struct migrate_reader *r, int fd);
/* A whole frame. */
int migrate_reader_next(struct migrate_reader *r, struct migrate_frame *ret_frame);
/* Or in parts: the header (payload NULL), then its payload with migrate_reader_take() calls
 * (dst NULL drops bytes) until none is left. */
int migrate_reader_header(struct migrate_reader *r, struct migrate_frame *ret_frame);
int migrate_reader_take(struct migrate_reader *r, void *dst, size_t len);
/* True if the rest of the current payload has arrived (is buffered by the kernel): reading it
 * cannot stop half-way, so it may go straight to its final place. */
bool migrate_reader_has_rest(struct migrate_reader *r);
void migrate_reader_free(struct migrate_reader *r);
/* Header + payload pieces in one sendmsg loop. */
int migrate_write_frame(int fd, uint8_t type, uint8_t flags, uint16_t device, const struct iovec *payload,
                        int count);
