/* drafter-heartbeat — the guest side of bench/bench-live-migration: a heartbeat line every
 * interval (1 ms) on a named virtio-serial port, which the host timestamps when it arrives, so
 * the largest gap between two heartbeats is the downtime the guest lived through, whichever VMM
 * migrated it; and a memory region that a worker thread rewrites at the rate the host asks for,
 * checking every page before it rewrites it, and all of it on request, so a migration that
 * delivers stale, zeroed or torn memory is caught.
 *
 * Host -> guest, one command per line:   rate <MiB/s>   |   verify
 * Guest -> host, one message per line:
 *   H <seq> <bad pages so far> <pages rewritten so far>     every interval
 *   R <MiB/s>                                              rate set
 *   V ok <pages>  |  V FAILED <first bad page> <bad pages so far>     after "verify"
 * Every 4 KiB page holds words derived from (page, generation, word); the generations are the
 * program's own memory, so they travel with the guest. Static, for the guest (cmd/meson.build). */
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/guestlink.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8)
#define TICK_NS (5 * NSEC_PER_MSEC)

static uint64_t *mem;
static uint32_t *gens;
static uint64_t pages;
static int port_fd = -1;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;
/* Set by the reader, taken by the worker. */
static volatile uint64_t rate_mib;
static volatile int verify_requested;
/* Read by the heartbeat. */
static volatile uint64_t bad_pages, rewritten;

static inline uint64_t page_seed(uint64_t page, uint64_t gen) {
        uint64_t z = page * 0x9e3779b97f4a7c15ULL ^ (gen + 1) * 0xbf58476d1ce4e5b9ULL;
        return z ^ (z >> 29);
}

static void fill(uint64_t page) {
        uint64_t *p = mem + page * WORDS, v = page_seed(page, gens[page]);
        for (uint64_t w = 0; w < WORDS; w++)
                p[w] = v + w;
}

static int intact(uint64_t page) {
        const uint64_t *p = mem + page * WORDS;
        uint64_t v = page_seed(page, gens[page]);
        for (uint64_t w = 0; w < WORDS; w++)
                if (p[w] != v + w)
                        return 0;
        return 1;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
        char line[128];
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(line, sizeof(line), fmt, ap);
        va_end(ap);
        pthread_mutex_lock(&write_lock);
        /* While the host end is closed the port blocks the write: that is a gap, which is what
         * the host measures. */
        for (int off = 0; off < n;) {
                ssize_t w = write(port_fd, line + off, (size_t)(n - off));
                if (w < 0 && errno == EINTR)
                        continue;
                if (w <= 0)
                        break;
                off += (int)w;
        }
        pthread_mutex_unlock(&write_lock);
}

static void *worker(void *arg) {
        (void)arg;
        uint64_t next = 0, done = 0, start = clock_now_ns(), current = 0;
        for (;;) {
                uint64_t r = rate_mib;
                if (r != current) { /* a new rate counts from now */
                        current = r;
                        start = clock_now_ns();
                        done = 0;
                }
                uint64_t due = current * (1u << 20) / PAGE * (clock_now_ns() - start) / NSEC_PER_SEC;
                if (due > done + current * (1u << 20) / PAGE) /* more than a second behind: do not try to catch up */
                        done = due - current * (1u << 20) / PAGE;
                for (; done < due; done++, next = (next + 1) % pages) {
                        if (!intact(next)) {
                                bad_pages++;
                                printf("drafter-heartbeat: page %llu does not hold generation %u\n",
                                       (unsigned long long)next, gens[next]);
                                fflush(stdout);
                        }
                        gens[next]++;
                        fill(next);
                        rewritten++;
                }
                if (verify_requested) {
                        verify_requested = 0;
                        uint64_t first = pages;
                        for (uint64_t pg = 0; pg < pages; pg++)
                                if (!intact(pg)) {
                                        bad_pages++;
                                        if (first == pages)
                                                first = pg;
                                        fill(pg); /* count each damage once */
                                }
                        if (first == pages)
                                say("V ok %llu\n", (unsigned long long)pages);
                        else
                                say("V FAILED %llu %llu\n", (unsigned long long)first, (unsigned long long)bad_pages);
                }
                clock_sleep_ns(TICK_NS);
        }
        return NULL;
}

static void *reader(void *arg) {
        (void)arg;
        char buf[256];
        size_t len = 0;
        for (;;) {
                ssize_t n = read(port_fd, buf + len, sizeof(buf) - 1 - len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0) { /* host end closed: wait for the next host */
                        clock_sleep_ns(10 * NSEC_PER_MSEC);
                        continue;
                }
                len += (size_t)n;
                buf[len] = '\0';
                char *nl;
                while ((nl = strchr(buf, '\n'))) {
                        *nl = '\0';
                        unsigned long long v;
                        if (sscanf(buf, "rate %llu", &v) == 1) {
                                rate_mib = v;
                                say("R %llu\n", v);
                        } else if (strcmp(buf, "verify") == 0) {
                                verify_requested = 1;
                        }
                        len -= (size_t)(nl + 1 - buf);
                        memmove(buf, nl + 1, len + 1);
                }
                if (len == sizeof(buf) - 1)
                        len = 0; /* a line too long for any command */
        }
        return NULL;
}

int main(int argc, char **argv) {
        const char *port = "drafter.heartbeat";
        int64_t mib = 64, interval_ns = NSEC_PER_MSEC;
        struct flag flags[] = {
                {"interval", FLAG_DURATION, &interval_ns, "Time between two heartbeats"},
                {"mib", FLAG_INT, &mib, "Size of the memory region in MiB"},
                {"port", FLAG_STRING, &port, "Name of the virtio-serial port"},
        };
        int r = flags_parse("drafter-heartbeat", flags, 3, argc, argv, stderr, NULL);
        if (r == FLAGS_HELP)
                return 0;
        if (r < 0 || mib < 1 || interval_ns <= 0)
                return 2;
        /* The named virtio-serial port (QEMU), else vsock port 27 (Firecracker). */
        if (guestlink_guest_open(port, 27, 10 * NSEC_PER_SEC, &port_fd) < 0) {
                fprintf(stderr, "drafter-heartbeat: %s\n", error_message());
                return 1;
        }
        pages = (uint64_t)mib * (1u << 20) / PAGE;
        mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        gens = calloc(pages, sizeof(*gens));
        if (mem == MAP_FAILED || !gens) {
                perror("drafter-heartbeat: memory");
                return 1;
        }
        for (uint64_t pg = 0; pg < pages; pg++)
                fill(pg);
        /* The heartbeat must not wait behind the worker on the one vCPU. */
        mlockall(MCL_CURRENT | MCL_FUTURE);
        struct sched_param sp = {.sched_priority = 10};
        if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0)
                fprintf(stderr, "drafter-heartbeat: SCHED_FIFO: %s (heartbeats may wait for the worker)\n",
                        strerror(errno));
        pthread_attr_t normal;
        pthread_attr_init(&normal);
        pthread_attr_setinheritsched(&normal, PTHREAD_EXPLICIT_SCHED);
        struct sched_param zero = {0};
        pthread_attr_setschedpolicy(&normal, SCHED_OTHER);
        pthread_attr_setschedparam(&normal, &zero);
        pthread_t w, rd;
        if (pthread_create(&w, &normal, worker, NULL) != 0 || pthread_create(&rd, &normal, reader, NULL) != 0) {
                fprintf(stderr, "drafter-heartbeat: cannot start threads\n");
                return 1;
        }
        printf("drafter-heartbeat: %llu MiB, a heartbeat every %lld us on %s\n", (unsigned long long)mib,
               (long long)(interval_ns / 1000), port);
        fflush(stdout);
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        for (uint64_t seq = 1;; seq++) {
                say("H %llu %llu %llu\n", (unsigned long long)seq, (unsigned long long)bad_pages,
                    (unsigned long long)rewritten);
                next.tv_nsec += interval_ns;
                while (next.tv_nsec >= (long)NSEC_PER_SEC) {
                        next.tv_nsec -= (long)NSEC_PER_SEC;
                        next.tv_sec++;
                }
                /* After a pause (a migration) do not send a burst to catch up. */
                struct timespec now;
                clock_gettime(CLOCK_MONOTONIC, &now);
                int64_t behind = (int64_t)(now.tv_sec - next.tv_sec) * (int64_t)NSEC_PER_SEC + (now.tv_nsec - next.tv_nsec);
                if (behind > 10 * (int64_t)NSEC_PER_MSEC)
                        next = now;
                while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
                }
        }
}
