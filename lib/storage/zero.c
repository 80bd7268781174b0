/* zero.c — zero-block detection, used to skip writes, punch holes and send zero runs. */
#include "drafter/block_device.h"

#include <stdint.h>
#include <string.h>

bool buffer_is_zero(const void *buf, size_t len) {
        const unsigned char *p = buf;

        /* Check the unaligned head byte by byte, then 8 words at a time; the compiler vectorises
         * the OR-reduction. */
        while (len > 0 && ((uintptr_t)p & 7)) {
                if (*p)
                        return false;
                p++, len--;
        }
        const uint64_t *w = (const uint64_t *)p;
        while (len >= 64) {
                uint64_t acc = w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
                if (acc)
                        return false;
                w += 8;
                len -= 64;
        }
        p = (const unsigned char *)w;
        while (len > 0) {
                if (*p)
                        return false;
                p++, len--;
        }
        return true;
}
