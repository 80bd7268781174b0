/* drafter-memcheck — a guest workload for migration tests: keeps a region of memory that it
 * rewrites at a steady rate and verifies completely every interval, and a counter.
 *
 * Every 4 KiB page holds 64-bit words derived from (page, the page's generation, word); the
 * generations live in the program's own memory, so after a migration a page that arrived stale
 * (an older generation), zeroed or torn fails the check. One line per interval:
 *   memcheck <counter> ok <pages verified>        or        memcheck <counter> FAILED page …
 * Static, for the guest (cmd/meson.build). */
#include "drafter/clock.h"
#include "drafter/flags.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define PAGE 4096u
#define WORDS (PAGE / 8)

static inline uint64_t word(uint64_t page, uint64_t gen, uint64_t w) {
        uint64_t z = page * 0x9e3779b97f4a7c15ULL ^ gen * 0xbf58476d1ce4e5b9ULL ^ (w + 1) * 0x94d049bb133111ebULL;
        z = (z ^ (z >> 31)) * 0xd6e8feb86659fd93ULL;
        return z ^ (z >> 32);
}

static void fill(uint64_t *p, uint64_t page, uint64_t gen) {
        for (uint64_t w = 0; w < WORDS; w++)
                p[w] = word(page, gen, w);
}

int main(int argc, char **argv) {
        int64_t mib = 64, rate_mib = 32, interval_ns = 100 * NSEC_PER_MSEC;
        struct flag flags[] = {
                {"interval", FLAG_DURATION, &interval_ns, "Time between two checks"},
                {"mib", FLAG_INT, &mib, "Size of the memory region in MiB"},
                {"rate-mib", FLAG_INT, &rate_mib, "MiB rewritten per second"},
        };
        int r = flags_parse("drafter-memcheck", flags, 3, argc, argv, stderr, NULL);
        if (r == FLAGS_HELP)
                return 0;
        if (r < 0 || mib < 1 || rate_mib < 0 || interval_ns <= 0)
                return 2;
        uint64_t pages = (uint64_t)mib * (1u << 20) / PAGE;
        uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        uint32_t *gens = calloc(pages, sizeof(*gens));
        if (mem == MAP_FAILED || !gens) {
                perror("drafter-memcheck: memory");
                return 1;
        }
        for (uint64_t pg = 0; pg < pages; pg++)
                fill(mem + pg * WORDS, pg, 0);
        /* Pages rewritten per interval, round-robin through the region. */
        uint64_t per_interval = (uint64_t)rate_mib * (1u << 20) / PAGE * (uint64_t)interval_ns / NSEC_PER_SEC;
        uint64_t next = 0, failures = 0;
        for (uint64_t counter = 1;; counter++) {
                uint64_t t = clock_now_ns();
                for (uint64_t i = 0; i < per_interval; i++, next = (next + 1) % pages)
                        fill(mem + next * WORDS, next, ++gens[next]);
                uint64_t bad = pages;
                for (uint64_t pg = 0; pg < pages && bad == pages; pg++) {
                        const uint64_t *p = mem + pg * WORDS;
                        for (uint64_t w = 0; w < WORDS; w++)
                                if (p[w] != word(pg, gens[pg], w)) {
                                        bad = pg;
                                        break;
                                }
                }
                if (bad == pages) {
                        printf("memcheck %llu ok %llu\n", (unsigned long long)counter, (unsigned long long)pages);
                } else {
                        failures++;
                        printf("memcheck %llu FAILED page %llu (generation %u)\n", (unsigned long long)counter,
                               (unsigned long long)bad, gens[bad]);
                        fill(mem + bad * WORDS, bad, gens[bad]); /* report each damage once */
                }
                fflush(stdout);
                uint64_t spent = clock_now_ns() - t;
                if (spent < (uint64_t)interval_ns)
                        clock_sleep_ns((uint64_t)interval_ns - spent);
        }
}
