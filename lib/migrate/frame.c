/* frame.c — migration frames: encode, decode, validate (see migrate_frame.h, docs/protocol.md). */
#include "drafter/migrate_frame.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/io.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static uint16_t get16(const uint8_t *p) {
        uint16_t v;
        memcpy(&v, p, 2);
        return le16toh(v);
}

static uint32_t get32(const uint8_t *p) {
        uint32_t v;
        memcpy(&v, p, 4);
        return le32toh(v);
}

static uint64_t get64(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, 8);
        return le64toh(v);
}

static void put16(uint8_t *p, uint16_t v) {
        v = htole16(v);
        memcpy(p, &v, 2);
}

static void put32(uint8_t *p, uint32_t v) {
        v = htole32(v);
        memcpy(p, &v, 4);
}

static void put64(uint8_t *p, uint64_t v) {
        v = htole64(v);
        memcpy(p, &v, 8);
}

void migrate_header_encode(uint8_t out[MIGRATE_HEADER_SIZE], uint8_t type, uint8_t flags, uint16_t device,
                           uint32_t length) {
        put32(out, length);
        out[4] = type;
        out[5] = flags;
        put16(out + 6, device);
}

int migrate_header_decode(const uint8_t in[MIGRATE_HEADER_SIZE], struct migrate_frame *ret_frame) {
        struct migrate_frame f = {.length = get32(in), .type = in[4], .flags = in[5], .device = get16(in + 6)};
        if (f.type < MIGRATE_HELLO || f.type > MIGRATE_S3)
                return error_set(-EBADMSG, "migration: unknown frame type %u", f.type);
        if (f.length > MIGRATE_MAX_PAYLOAD)
                return error_set(-EBADMSG, "migration: frame of %" PRIu32 " bytes exceeds the limit of %u",
                                 f.length, MIGRATE_MAX_PAYLOAD);
        if (f.flags != 0)
                return error_set(-EBADMSG, "migration: frame type %u with undefined flags 0x%x", f.type, f.flags);
        *ret_frame = f;
        return 0;
}

static const char *const type_names[] = {
        [MIGRATE_HELLO] = "HELLO",         [MIGRATE_DEVICES] = "DEVICES",     [MIGRATE_DEVICES_ACK] = "DEVICES_ACK",
        [MIGRATE_BLOCK] = "BLOCK",         [MIGRATE_BLOCK_ZERO] = "BLOCK_ZERO", [MIGRATE_BLOCK_ZSTD] = "BLOCK_ZSTD",
        [MIGRATE_NEED_AT] = "NEED_AT",     [MIGRATE_DONT_NEED_AT] = "DONT_NEED_AT", [MIGRATE_DIRTY] = "DIRTY",
        [MIGRATE_EVENT] = "EVENT",         [MIGRATE_ERROR] = "ERROR",         [MIGRATE_S3] = "S3",
};

static const struct migrate_device_info *find_device(const struct migrate_device_table *t, uint16_t id) {
        for (size_t i = 0; t && i < t->count; i++)
                if (t->devices[i].id == id)
                        return &t->devices[i];
        return NULL;
}

static uint64_t block_count(const struct migrate_device_info *d) {
        return (d->size + d->block_size - 1) / d->block_size;
}

static uint32_t block_length(const struct migrate_device_info *d, uint64_t block) {
        uint64_t left = d->size - block * d->block_size;
        return left < d->block_size ? (uint32_t)left : d->block_size;
}

#define BAD(...) error_set(-EBADMSG, "migration: " __VA_ARGS__)

/* One S3 string: u16 length, bytes (printable, no NUL). */
static int get_s3_string(const uint8_t **p, const uint8_t *end, const char *what, char *out) {
        if (end - *p < 2)
                return BAD("S3 frame truncated before its %s", what);
        uint16_t n = get16(*p);
        if (n > MIGRATE_S3_STRING_MAX || end - *p - 2 < n)
                return BAD("S3 frame: %s of %u bytes is too long or truncated", what, n);
        for (uint16_t i = 0; i < n; i++)
                if ((*p)[2 + i] < 0x20 || (*p)[2 + i] > 0x7e)
                        return BAD("S3 frame: %s has a byte 0x%02x that is not printable", what, (*p)[2 + i]);
        memcpy(out, *p + 2, n);
        out[n] = '\0';
        *p += 2 + n;
        return 0;
}

static int parse_s3(const uint8_t *p, uint32_t length, const struct migrate_device_info *d, struct migrate_s3_info *s3) {
        const uint8_t *end = p + length;
        if (!(d->flags & MIGRATE_DEVICE_S3))
                return BAD("S3 frame for device \"%s\", which DEVICES did not mark as synchronised to S3", d->name);
        if (length < 12)
                return BAD("S3 frame of %u bytes is too short", length);
        s3->object_size = get32(p);
        s3->concurrency = get32(p + 4);
        uint32_t flags = get32(p + 8);
        p += 12;
        if (flags & ~1u)
                return BAD("S3 frame with undefined flags 0x%x", flags);
        s3->secure = flags & 1u;
        if (s3->object_size < d->block_size || s3->object_size % d->block_size || s3->object_size > (64u << 20))
                return BAD("S3 object size %u for device \"%s\" is not a multiple of its block size %u up to 64 MiB",
                           s3->object_size, d->name, d->block_size);
        int r;
        if ((r = get_s3_string(&p, end, "endpoint", s3->endpoint)) < 0 ||
            (r = get_s3_string(&p, end, "bucket", s3->bucket)) < 0 ||
            (r = get_s3_string(&p, end, "access key", s3->access_key)) < 0 ||
            (r = get_s3_string(&p, end, "secret key", s3->secret_key)) < 0 ||
            (r = get_s3_string(&p, end, "key prefix", s3->prefix)) < 0)
                return r;
        if (!*s3->endpoint || !*s3->bucket || !*s3->prefix)
                return BAD("S3 frame for device \"%s\" without an endpoint, bucket or key prefix", d->name);
        if (end - p < 8)
                return BAD("S3 frame truncated before its object count");
        s3->objects = get64(p);
        p += 8;
        uint64_t want = (d->size + s3->object_size - 1) / s3->object_size;
        if (s3->objects != want)
                return BAD("S3 frame for device \"%s\" lists %" PRIu64 " objects, its size makes %" PRIu64, d->name,
                           s3->objects, want);
        if ((uint64_t)(end - p) != (s3->objects + 7) / 8)
                return BAD("S3 frame: a bitmap of %td bytes for %" PRIu64 " objects", end - p, s3->objects);
        if (s3->objects % 8 && (p[s3->objects / 8] >> (s3->objects % 8)))
                return BAD("S3 frame: bits set past the last object");
        s3->bitmap = p;
        return 0;
}

int migrate_frame_parse(const struct migrate_frame *f, const struct migrate_device_table *table,
                        bool from_source, struct migrate_message *ret) {
        const char *name = type_names[f->type];
        const uint8_t *p = f->payload;
        struct migrate_message m = {.type = f->type};
        const struct migrate_device_info *d = NULL;

        /* Who may send what. */
        bool src_only = f->type == MIGRATE_DEVICES || f->type == MIGRATE_BLOCK || f->type == MIGRATE_BLOCK_ZERO ||
                        f->type == MIGRATE_BLOCK_ZSTD || f->type == MIGRATE_DIRTY || f->type == MIGRATE_S3;
        bool dst_only = f->type == MIGRATE_DEVICES_ACK || f->type == MIGRATE_NEED_AT || f->type == MIGRATE_DONT_NEED_AT;
        if ((src_only && !from_source) || (dst_only && from_source))
                return BAD("%s may not come from the %s", name, from_source ? "source" : "destination");

        bool per_device = (f->type >= MIGRATE_BLOCK && f->type <= MIGRATE_DIRTY) || f->type == MIGRATE_S3;
        if (per_device || (f->type == MIGRATE_EVENT && f->device != MIGRATE_CONNECTION)) {
                d = find_device(table, f->device);
                if (!d)
                        return BAD("%s for unknown device id %u", name, f->device);
                m.device = (uint16_t)(d - table->devices);
        } else if (f->device != MIGRATE_CONNECTION) {
                return BAD("%s must be connection-level, got device id %u", name, f->device);
        }

        switch (f->type) {
        case MIGRATE_HELLO:
                if (f->length != 20)
                        return BAD("HELLO of %u bytes, expected 20", f->length);
                if (memcmp(p, MIGRATE_MAGIC, 8) != 0)
                        return BAD("HELLO without the protocol magic: not a drafter migration peer");
                m.hello.version = get16(p + 8);
                m.hello.role = get16(p + 10);
                m.hello.capabilities = get64(p + 12);
                if (m.hello.role != (from_source ? MIGRATE_ROLE_SOURCE : MIGRATE_ROLE_DESTINATION))
                        return BAD("peer says it is role %u, expected the %s", m.hello.role,
                                   from_source ? "source" : "destination");
                break;
        case MIGRATE_DEVICES:
                return BAD("DEVICES must be decoded with migrate_devices_decode()");
        case MIGRATE_DEVICES_ACK:
                if (f->length != 0)
                        return BAD("DEVICES_ACK carries no payload, got %u bytes", f->length);
                break;
        case MIGRATE_BLOCK:
        case MIGRATE_BLOCK_ZSTD:
                if (f->length < 8)
                        return BAD("%s of %u bytes is too short", name, f->length);
                m.block.block = get64(p);
                if (m.block.block >= block_count(d))
                        return BAD("%s for block %" PRIu64 " of device \"%s\", which has %" PRIu64 " blocks", name,
                                   m.block.block, d->name, block_count(d));
                m.block.data = p + 8;
                m.block.length = f->length - 8;
                if (f->type == MIGRATE_BLOCK && m.block.length != block_length(d, m.block.block))
                        return BAD("BLOCK %" PRIu64 " of device \"%s\" carries %u bytes, the block has %u",
                                   m.block.block, d->name, m.block.length, block_length(d, m.block.block));
                if (f->type == MIGRATE_BLOCK_ZSTD && (m.block.length == 0 || m.block.length > d->block_size + 1024))
                        return BAD("BLOCK_ZSTD %" PRIu64 " of device \"%s\" has an implausible size %u",
                                   m.block.block, d->name, m.block.length);
                break;
        case MIGRATE_BLOCK_ZERO:
        case MIGRATE_NEED_AT:
        case MIGRATE_DONT_NEED_AT:
                if (f->length != 12)
                        return BAD("%s of %u bytes, expected 12", name, f->length);
                m.range.first = get64(p);
                m.range.count = get32(p + 8);
                if (m.range.count == 0 || m.range.first >= block_count(d) ||
                    m.range.count > block_count(d) - m.range.first)
                        return BAD("%s of blocks %" PRIu64 "+%u is outside device \"%s\" (%" PRIu64 " blocks)", name,
                                   m.range.first, m.range.count, d->name, block_count(d));
                break;
        case MIGRATE_DIRTY: {
                if (f->length < 4)
                        return BAD("DIRTY of %u bytes is too short", f->length);
                m.dirty.count = get32(p);
                if ((uint64_t)m.dirty.count * 8 + 4 != f->length)
                        return BAD("DIRTY lists %u blocks in %u bytes", m.dirty.count, f->length);
                m.dirty.blocks = p + 4;
                uint64_t prev = 0;
                for (uint32_t i = 0; i < m.dirty.count; i++) {
                        uint64_t b = get64(m.dirty.blocks + 8 * i);
                        if (b >= block_count(d) || (i > 0 && b <= prev))
                                return BAD("DIRTY entry %u (block %" PRIu64 ") of device \"%s\" is out of range or "
                                           "out of order", i, b, d->name);
                        prev = b;
                }
                break;
        }
        case MIGRATE_EVENT:
                if (f->length != 2)
                        return BAD("EVENT of %u bytes, expected 2", f->length);
                m.event = get16(p);
                switch (m.event) {
                case MIGRATE_EVENT_BULK_DONE:
                case MIGRATE_EVENT_COMPLETED:
                case MIGRATE_EVENT_FINAL:
                        if (!from_source || !d)
                                return BAD("event %u must come from the source for a device", m.event);
                        break;
                case MIGRATE_EVENT_SUSPENDED:
                case MIGRATE_EVENT_AUTHORITY:
                case MIGRATE_EVENT_BARRIER:
                        if (!from_source || d)
                                return BAD("event %u must come from the source for the connection", m.event);
                        break;
                case MIGRATE_EVENT_AUTHORITY_ACK:
                case MIGRATE_EVENT_COMPLETED_ACK:
                case MIGRATE_EVENT_BARRIER_ACK:
                case MIGRATE_EVENT_READY:
                        if (from_source || d)
                                return BAD("event %u must come from the destination for the connection", m.event);
                        break;
                default:
                        return BAD("unknown event %u", m.event);
                }
                break;
        case MIGRATE_S3: {
                int r = parse_s3(p, f->length, d, &m.s3);
                if (r < 0)
                        return r;
                break;
        }
        case MIGRATE_ERROR: {
                if (f->length < 6)
                        return BAD("ERROR of %u bytes is too short", f->length);
                m.error.err = (int32_t)get32(p);
                uint16_t len = get16(p + 4);
                if ((uint32_t)len + 6 != f->length || len > MIGRATE_MAX_MESSAGE)
                        return BAD("ERROR message length %u does not match the frame", len);
                memcpy(m.error.message, p + 6, len);
                m.error.message[len] = '\0';
                for (uint16_t i = 0; i < len; i++)
                        if ((unsigned char)m.error.message[i] < 0x20)
                                m.error.message[i] = '?'; /* one printable line, whatever the peer sent */
                break;
        }
        }
        *ret = m;
        return 0;
}

int migrate_devices_encode(const struct migrate_device_table *t, uint8_t **ret_payload, uint32_t *ret_length) {
        size_t len = 2;
        for (size_t i = 0; i < t->count; i++)
                len += 2 + 2 + strlen(t->devices[i].name) + 8 + 4 + 4;
        uint8_t *p = malloc(len), *q = p;
        if (!p)
                return -ENOMEM;
        put16(q, (uint16_t)t->count);
        q += 2;
        for (size_t i = 0; i < t->count; i++) {
                const struct migrate_device_info *d = &t->devices[i];
                size_t n = strlen(d->name);
                put16(q, d->id);
                put16(q + 2, (uint16_t)n);
                memcpy(q + 4, d->name, n);
                q += 4 + n;
                put64(q, d->size);
                put32(q + 8, d->block_size);
                put32(q + 12, d->flags);
                q += 16;
        }
        *ret_payload = p;
        *ret_length = (uint32_t)len;
        return 0;
}

int migrate_devices_decode(const struct migrate_frame *f, struct migrate_device_table *ret) {
        if (f->type != MIGRATE_DEVICES || f->device != MIGRATE_CONNECTION)
                return BAD("expected a connection-level DEVICES frame");
        const uint8_t *p = f->payload, *end = f->payload + f->length;
        if (f->length < 2)
                return BAD("DEVICES of %u bytes is too short", f->length);
        size_t count = get16(p);
        p += 2;
        if (count > MIGRATE_MAX_DEVICES)
                return BAD("DEVICES lists %zu devices, the limit is %d", count, MIGRATE_MAX_DEVICES);
        ret->count = 0;
        for (size_t i = 0; i < count; i++) {
                struct migrate_device_info *d = &ret->devices[i];
                if (end - p < 4)
                        return BAD("DEVICES entry %zu is truncated", i);
                d->id = get16(p);
                uint16_t n = get16(p + 2);
                p += 4;
                if (n == 0 || n > 64 || end - p < (ptrdiff_t)n + 16)
                        return BAD("DEVICES entry %zu has a bad name length %u or is truncated", i, n);
                memcpy(d->name, p, n);
                d->name[n] = '\0';
                p += n;
                d->size = get64(p);
                d->block_size = get32(p + 8);
                d->flags = get32(p + 12);
                p += 16;
                for (uint16_t k = 0; k < n; k++) {
                        char c = d->name[k];
                        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                              c == '_' || c == '.') || (k == 0 && c == '.'))
                                return BAD("DEVICES entry %zu has an invalid name", i);
                }
                if (d->id == MIGRATE_CONNECTION)
                        return BAD("device \"%s\" uses the reserved id 0xffff", d->name);
                if (d->block_size < 512 || d->block_size > (64u << 20) || (d->block_size & (d->block_size - 1)))
                        return BAD("device \"%s\" has block size %u (a power of two from 512 to 64 MiB expected)",
                                   d->name, d->block_size);
                if (d->flags & ~(uint32_t)(MIGRATE_DEVICE_SHAREDBASE | MIGRATE_DEVICE_S3))
                        return BAD("device \"%s\" has undefined flags 0x%x", d->name, d->flags);
                for (size_t j = 0; j < i; j++)
                        if (ret->devices[j].id == d->id || strcmp(ret->devices[j].name, d->name) == 0)
                                return BAD("device \"%s\" (id %u) appears twice", d->name, d->id);
                ret->count = i + 1;
        }
        if (p != end)
                return BAD("DEVICES has %td trailing bytes", end - p);
        return 0;
}

static uint8_t *put_s3_string(uint8_t *q, const char *s) {
        size_t n = MIN(strlen(s), (size_t)MIGRATE_S3_STRING_MAX);
        put16(q, (uint16_t)n);
        memcpy(q + 2, s, n);
        return q + 2 + n;
}

int migrate_s3_encode(const struct migrate_s3_info *s3, uint8_t **ret_payload, uint32_t *ret_length) {
        size_t bytes = (s3->objects + 7) / 8;
        size_t len = 12 + 5 * (2 + MIGRATE_S3_STRING_MAX) + 8 + bytes;
        if (len > MIGRATE_MAX_PAYLOAD)
                return error_set(-EFBIG, "migration: %" PRIu64 " S3 objects do not fit one frame", s3->objects);
        uint8_t *p = malloc(len), *q = p;
        if (!p)
                return -ENOMEM;
        put32(q, s3->object_size);
        put32(q + 4, s3->concurrency);
        put32(q + 8, s3->secure ? 1u : 0u);
        q += 12;
        q = put_s3_string(q, s3->endpoint);
        q = put_s3_string(q, s3->bucket);
        q = put_s3_string(q, s3->access_key);
        q = put_s3_string(q, s3->secret_key);
        q = put_s3_string(q, s3->prefix);
        put64(q, s3->objects);
        memcpy(q + 8, s3->bitmap, bytes);
        q += 8 + bytes;
        *ret_payload = p;
        *ret_length = (uint32_t)(q - p);
        return 0;
}

uint32_t migrate_encode_hello(uint8_t out[20], enum migrate_role role, uint64_t capabilities) {
        memcpy(out, MIGRATE_MAGIC, 8); /* includes the NUL */
        put16(out + 8, MIGRATE_VERSION);
        put16(out + 10, (uint16_t)role);
        put64(out + 12, capabilities);
        return 20;
}

uint32_t migrate_encode_range(uint8_t out[12], uint64_t first, uint32_t count) {
        put64(out, first);
        put32(out + 8, count);
        return 12;
}

uint32_t migrate_encode_event(uint8_t out[2], enum migrate_event event) {
        put16(out, (uint16_t)event);
        return 2;
}

uint32_t migrate_encode_block_index(uint8_t out[8], uint64_t block) {
        put64(out, block);
        return 8;
}

uint32_t migrate_encode_error(uint8_t *out, int err, const char *message) {
        size_t n = MIN(strlen(message), (size_t)MIGRATE_MAX_MESSAGE);
        put32(out, (uint32_t)err);
        put16(out + 4, (uint16_t)n);
        memcpy(out + 6, message, n);
        return (uint32_t)(6 + n);
}

int migrate_read_frame(int fd, uint8_t **buf, size_t *cap, struct migrate_frame *ret) {
        uint8_t h[MIGRATE_HEADER_SIZE];
        int r = io_read_full(fd, h, sizeof(h));
        if (r < 0)
                return r == -ECONNRESET ? error_set(r, "migration: the peer closed the connection")
                                        : error_set_errno(r, "migration: read");
        struct migrate_frame f;
        if ((r = migrate_header_decode(h, &f)) < 0)
                return r;
        if (f.length > *cap) {
                uint8_t *grown = realloc(*buf, f.length);
                if (!grown)
                        return -ENOMEM;
                *buf = grown;
                *cap = f.length;
        }
        if (f.length && (r = io_read_full(fd, *buf, f.length)) < 0)
                return error_set(r, "migration: connection lost inside a %s frame", type_names[f.type]);
        f.payload = *buf;
        *ret = f;
        return 0;
}

int migrate_write_frame(int fd, uint8_t type, uint8_t flags, uint16_t device, const struct iovec *payload,
                        int count) {
        struct iovec iov[8];
        uint8_t h[MIGRATE_HEADER_SIZE];
        size_t len = 0;
        if (count > 7)
                return -EINVAL;
        for (int i = 0; i < count; i++) {
                iov[i + 1] = payload[i];
                len += payload[i].iov_len;
        }
        if (len > MIGRATE_MAX_PAYLOAD)
                return error_set(-EMSGSIZE, "migration: frame of %zu bytes is too large", len);
        migrate_header_encode(h, type, flags, device, (uint32_t)len);
        iov[0] = (struct iovec){h, sizeof(h)};
        int r = io_write_iov(fd, iov, count + 1);
        if (r < 0)
                return error_set_errno(r, "migration: write");
        return 0;
}

int migrate_reader_init(struct migrate_reader *r, int fd) {
        *r = (struct migrate_reader){.fd = fd};
        return 0;
}

void migrate_reader_free(struct migrate_reader *r) {
        free(r->buf);
        r->buf = NULL;
        r->cap = 0;
}

/* Read len bytes into p (NULL: drop them); with the payload's last bytes, also whatever part of
 * the next frame's header the stream already has. */
static int reader_take(struct migrate_reader *r, uint8_t *p, size_t len, bool last, const char *type) {
        uint8_t drop[4096]; /* only written (by readv) */
        while (len > 0) {
                size_t want = p ? len : MIN(len, sizeof(drop));
                // cppcheck-suppress legacyUninitvar
                struct iovec iov[2] = {{p ? p : drop, want}, {r->head, MIGRATE_HEADER_SIZE}};
                ssize_t n = readv(r->fd, iov, last && want == len ? 2 : 1);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "migration: read");
                if (n == 0)
                        return error_set(-ECONNRESET, "migration: connection lost inside a %s frame", type);
                if ((size_t)n > want) {
                        r->head_have = (size_t)n - want;
                        n = (ssize_t)want;
                }
                if (p)
                        p += n;
                len -= (size_t)n;
        }
        return 0;
}

int migrate_reader_header(struct migrate_reader *r, struct migrate_frame *ret) {
        if (r->left > 0)
                return error_set(-EINVAL, "migration: %zu bytes of the last payload not read", r->left);
        while (r->head_have < MIGRATE_HEADER_SIZE) {
                ssize_t n = read(r->fd, r->head + r->head_have, MIGRATE_HEADER_SIZE - r->head_have);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "migration: read");
                if (n == 0)
                        return r->head_have ? error_set(-ECONNRESET, "migration: connection lost inside a frame header")
                                            : error_set(-ECONNRESET, "migration: the peer closed the connection");
                r->head_have += (size_t)n;
        }
        struct migrate_frame f;
        int e = migrate_header_decode(r->head, &f);
        if (e < 0)
                return e;
        r->head_have = 0;
        r->left = f.length;
        r->type = f.type;
        f.payload = NULL;
        *ret = f;
        return 0;
}

int migrate_reader_take(struct migrate_reader *r, void *dst, size_t len) {
        if (len > r->left)
                return error_set(-EINVAL, "migration: reading %zu bytes of a payload with %zu left", len, r->left);
        r->left -= len;
        return reader_take(r, dst, len, r->left == 0, type_names[r->type]);
}

bool migrate_reader_has_rest(struct migrate_reader *r) {
        int n = 0;
        return ioctl(r->fd, FIONREAD, &n) == 0 && n >= 0 && (size_t)n >= r->left;
}

int migrate_reader_next(struct migrate_reader *r, struct migrate_frame *ret) {
        struct migrate_frame f = {0};
        int e = migrate_reader_header(r, &f);
        if (e < 0)
                return e;
        if (f.length > r->cap) {
                size_t cap = MAX((size_t)f.length, (size_t)(64u << 10) + 64);
                uint8_t *grown = realloc(r->buf, cap);
                if (!grown)
                        return -ENOMEM;
                r->buf = grown;
                r->cap = cap;
        }
        if ((e = migrate_reader_take(r, r->buf, f.length)) < 0)
                return e;
        f.payload = r->buf;
        *ret = f;
        return 0;
}
