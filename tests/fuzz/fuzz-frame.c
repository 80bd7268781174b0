/* fuzz-frame — the migration wire decoder (lib/migrate/frame.c) on arbitrary bytes: the input is
 * a stream of frames as a peer would send them (first byte: which side we play), each header
 * decoded, each payload validated against the device table the stream's DEVICES frames set up
 * (a fixed table until then). Nothing may crash, read out of bounds or leak; accepted messages
 * must keep their promises (pointers inside the payload, block indices inside the device). */
#include "fuzz.h"
#include "drafter/log.h"
#include "drafter/migrate_frame.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_level(LOG_NONE);
        return 0;
}

static uint64_t blocks_of(const struct migrate_device_info *d) {
        return d->block_size ? (d->size + d->block_size - 1) / d->block_size : 0;
}

static void check_inside(const uint8_t *p, size_t len, const uint8_t *base, size_t size) {
        if (len && (p < base || p + len > base + size))
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static struct migrate_device_table table;
        table = (struct migrate_device_table){.count = 2};
        table.devices[0] = (struct migrate_device_info){.id = 0, .name = "memory", .size = 1 << 20, .block_size = 65536};
        table.devices[1] = (struct migrate_device_info){.id = 7, .name = "disk", .size = 100000, .block_size = 4096};
        if (size < 1)
                return 0;
        bool from_source = data[0] & 1;
        size_t off = 1;
        while (size - off >= MIGRATE_HEADER_SIZE) {
                struct migrate_frame f;
                if (migrate_header_decode(data + off, &f) < 0)
                        break;
                off += MIGRATE_HEADER_SIZE;
                if (f.length > size - off)
                        break;
                /* The payload in its own allocation, as the reader hands it over. */
                uint8_t *payload = malloc(f.length ? f.length : 1);
                memcpy(payload, data + off, f.length);
                off += f.length;
                f.payload = payload;
                if (f.type == MIGRATE_DEVICES) {
                        struct migrate_device_table t;
                        if (migrate_devices_decode(&f, &t) == 0)
                                table = t;
                }
                struct migrate_message m;
                if (migrate_frame_parse(&f, &table, from_source, &m) == 0) {
                        switch (m.type) {
                        case MIGRATE_BLOCK:
                        case MIGRATE_BLOCK_ZSTD:
                                check_inside(m.block.data, m.block.length, payload, f.length);
                                if (m.device >= table.count || m.block.block >= blocks_of(&table.devices[m.device]))
                                        abort();
                                break;
                        case MIGRATE_BLOCK_ZERO:
                        case MIGRATE_NEED_AT:
                        case MIGRATE_DONT_NEED_AT:
                                if (m.device >= table.count ||
                                    m.range.first + m.range.count > blocks_of(&table.devices[m.device]))
                                        abort();
                                break;
                        case MIGRATE_DIRTY:
                                check_inside(m.dirty.blocks, (size_t)m.dirty.count * 8, payload, f.length);
                                break;
                        case MIGRATE_S3:
                                check_inside(m.s3.bitmap, (size_t)((m.s3.objects + 7) / 8), payload, f.length);
                                break;
                        default:
                                break;
                        }
                }
                free(payload);
        }
        return 0;
}
