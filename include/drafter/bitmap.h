/* bitmap.h — fixed-size bitmaps whose bit operations are atomic, so writers on many threads can
 * mark blocks while one collector takes and clears them (bitmap_take_word). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bitmap {
        uint64_t nbits;
        uint64_t *words;
};

#define BITMAP_WORDS(nbits) (((nbits) + 63) / 64)

int bitmap_init(struct bitmap *map, uint64_t nbits);
void bitmap_free(struct bitmap *map);

/* All of these are atomic with respect to each other. */
void bitmap_set(struct bitmap *map, uint64_t bit);
void bitmap_clear(struct bitmap *map, uint64_t bit);
bool bitmap_test(const struct bitmap *map, uint64_t bit);
/* Sets the bit; returns its previous value. */
bool bitmap_test_and_set(struct bitmap *map, uint64_t bit);
/* Clears the bit; returns its previous value. */
bool bitmap_test_and_clear(struct bitmap *map, uint64_t bit);
void bitmap_set_range(struct bitmap *map, uint64_t first, uint64_t count);
void bitmap_clear_all(struct bitmap *map);
void bitmap_set_all(struct bitmap *map);

/* Atomically read word i and replace it with 0; the collector's primitive. */
uint64_t bitmap_take_word(struct bitmap *map, uint64_t i);

/* Not atomic as a whole (each word is read atomically): a snapshot good enough for reporting. */
uint64_t bitmap_count(const struct bitmap *map);
/* First set bit at or after `from`, or map->nbits if none. */
uint64_t bitmap_next_set(const struct bitmap *map, uint64_t from);
/* First clear bit at or after `from`, or map->nbits if none. */
uint64_t bitmap_next_clear(const struct bitmap *map, uint64_t from);
/* True if every bit in [first, first+count) is set. */
bool bitmap_range_all_set(const struct bitmap *map, uint64_t first, uint64_t count);
