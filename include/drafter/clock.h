/* clock.h — monotonic time in nanoseconds and Go-style durations ("1m0s", "500ms"). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#define NSEC_PER_USEC 1000ULL
#define NSEC_PER_MSEC 1000000ULL
#define NSEC_PER_SEC 1000000000ULL

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t clock_now_ns(void);

/* Sleep for ns nanoseconds, restarting after signals. */
void clock_sleep_ns(uint64_t ns);

/* Absolute CLOCK_REALTIME timespec ns from now, for pthread_cond_timedwait. */
struct timespec;
void clock_deadline_after(uint64_t ns, struct timespec *ret_ts);

/* Format like Go's time.Duration.String(): "0s", "1.5s", "1m0s", "500ms", "1h2m3s". */
void duration_format(int64_t ns, char *buf, size_t size);

/* Parse like Go's time.ParseDuration: "300ms", "-1.5h", "2h45m", units ns us µs ms s m h. */
int duration_parse(const char *text, int64_t *ret_ns);
