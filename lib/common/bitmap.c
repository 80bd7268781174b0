/* bitmap.c — atomic bitmaps (see bitmap.h). */
#include "drafter/bitmap.h"

#include <errno.h>
#include <stdlib.h>

int bitmap_init(struct bitmap *map, uint64_t nbits) {
        map->nbits = nbits;
        map->words = calloc(BITMAP_WORDS(nbits) ? BITMAP_WORDS(nbits) : 1, sizeof(uint64_t));
        return map->words ? 0 : -ENOMEM;
}

void bitmap_free(struct bitmap *map) {
        free(map->words);
        map->words = NULL;
        map->nbits = 0;
}

static inline uint64_t bit_mask(uint64_t bit) {
        return 1ULL << (bit % 64);
}

void bitmap_set(struct bitmap *map, uint64_t bit) {
        __atomic_fetch_or(&map->words[bit / 64], bit_mask(bit), __ATOMIC_RELEASE);
}

void bitmap_clear(struct bitmap *map, uint64_t bit) {
        __atomic_fetch_and(&map->words[bit / 64], ~bit_mask(bit), __ATOMIC_RELEASE);
}

bool bitmap_test(const struct bitmap *map, uint64_t bit) {
        return (__atomic_load_n(&map->words[bit / 64], __ATOMIC_ACQUIRE) & bit_mask(bit)) != 0;
}

bool bitmap_test_and_set(struct bitmap *map, uint64_t bit) {
        return (__atomic_fetch_or(&map->words[bit / 64], bit_mask(bit), __ATOMIC_ACQ_REL) & bit_mask(bit)) != 0;
}

bool bitmap_test_and_clear(struct bitmap *map, uint64_t bit) {
        return (__atomic_fetch_and(&map->words[bit / 64], ~bit_mask(bit), __ATOMIC_ACQ_REL) & bit_mask(bit)) !=
               0;
}

/* Mask of bits [lo, hi) inside one word, 0 <= lo < hi <= 64. */
static inline uint64_t word_mask(unsigned lo, unsigned hi) {
        uint64_t upper = hi == 64 ? ~0ULL : (1ULL << hi) - 1;
        return upper & ~((1ULL << lo) - 1);
}

void bitmap_set_range(struct bitmap *map, uint64_t first, uint64_t count) {
        uint64_t end = first + count;
        while (first < end) {
                uint64_t w = first / 64;
                unsigned lo = first % 64;
                unsigned hi = (end - w * 64) >= 64 ? 64 : (unsigned)(end - w * 64);
                __atomic_fetch_or(&map->words[w], word_mask(lo, hi), __ATOMIC_RELEASE);
                first = w * 64 + hi;
        }
}

void bitmap_clear_all(struct bitmap *map) {
        for (uint64_t i = 0; i < BITMAP_WORDS(map->nbits); i++)
                __atomic_store_n(&map->words[i], 0, __ATOMIC_RELEASE);
}

void bitmap_set_all(struct bitmap *map) {
        bitmap_set_range(map, 0, map->nbits);
}

uint64_t bitmap_take_word(struct bitmap *map, uint64_t i) {
        return __atomic_exchange_n(&map->words[i], 0, __ATOMIC_ACQ_REL);
}

uint64_t bitmap_count(const struct bitmap *map) {
        uint64_t n = 0;
        for (uint64_t i = 0; i < BITMAP_WORDS(map->nbits); i++)
                n += (uint64_t)__builtin_popcountll(__atomic_load_n(&map->words[i], __ATOMIC_RELAXED));
        return n;
}

static uint64_t bitmap_next(const struct bitmap *map, uint64_t from, bool want_set) {
        while (from < map->nbits) {
                uint64_t w = from / 64;
                uint64_t word = __atomic_load_n(&map->words[w], __ATOMIC_ACQUIRE);
                if (!want_set)
                        word = ~word;
                word &= ~0ULL << (from % 64);
                if (word) {
                        uint64_t bit = w * 64 + (uint64_t)__builtin_ctzll(word);
                        return bit < map->nbits ? bit : map->nbits;
                }
                from = (w + 1) * 64;
        }
        return map->nbits;
}

uint64_t bitmap_next_set(const struct bitmap *map, uint64_t from) {
        return bitmap_next(map, from, true);
}

uint64_t bitmap_next_clear(const struct bitmap *map, uint64_t from) {
        return bitmap_next(map, from, false);
}

bool bitmap_range_all_set(const struct bitmap *map, uint64_t first, uint64_t count) {
        return count == 0 || bitmap_next_clear(map, first) >= first + count;
}
