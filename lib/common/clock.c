/* clock.c — monotonic time and Go-compatible duration text (see clock.h). */
#include "drafter/clock.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

uint64_t clock_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * NSEC_PER_SEC + (uint64_t)ts.tv_nsec;
}

void clock_sleep_ns(uint64_t ns) {
        struct timespec ts = {.tv_sec = (time_t)(ns / NSEC_PER_SEC), .tv_nsec = (long)(ns % NSEC_PER_SEC)};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

void clock_deadline_after(uint64_t ns, struct timespec *ret_ts) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        uint64_t total = (uint64_t)now.tv_nsec + ns % NSEC_PER_SEC;
        ret_ts->tv_sec = now.tv_sec + (time_t)(ns / NSEC_PER_SEC) + (time_t)(total / NSEC_PER_SEC);
        ret_ts->tv_nsec = (long)(total % NSEC_PER_SEC);
}

/* Append the fraction v/scale with trailing zeros removed, like Go's fmtFrac. */
static void append_fraction(char *buf, size_t size, uint64_t frac, unsigned digits) {
        char tmp[24];
        if (frac == 0)
                return;
        snprintf(tmp, sizeof(tmp), "%0*llu", (int)digits, (unsigned long long)frac);
        size_t len = strlen(tmp);
        while (len > 0 && tmp[len - 1] == '0')
                tmp[--len] = '\0';
        size_t used = strlen(buf);
        snprintf(buf + used, size - used, ".%s", tmp);
}

void duration_format(int64_t ns, char *buf, size_t size) {
        bool negative = ns < 0;
        uint64_t u = negative ? (uint64_t)0 - (uint64_t)ns : (uint64_t)ns;
        const char *sign = negative ? "-" : "";

        if (u == 0) {
                snprintf(buf, size, "0s");
                return;
        }
        if (u < NSEC_PER_SEC) {
                /* Sub-second: the largest unit that keeps the integer part non-zero. */
                const char *unit;
                uint64_t scale;
                unsigned digits;
                if (u < NSEC_PER_USEC) {
                        snprintf(buf, size, "%s%lluns", sign, (unsigned long long)u);
                        return;
                } else if (u < NSEC_PER_MSEC) {
                        unit = "µs", scale = NSEC_PER_USEC, digits = 3;
                } else {
                        unit = "ms", scale = NSEC_PER_MSEC, digits = 6;
                }
                snprintf(buf, size, "%s%llu", sign, (unsigned long long)(u / scale));
                append_fraction(buf, size, u % scale, digits);
                size_t used = strlen(buf);
                snprintf(buf + used, size - used, "%s", unit);
                return;
        }

        uint64_t secs = u / NSEC_PER_SEC, frac = u % NSEC_PER_SEC;
        uint64_t hours = secs / 3600, minutes = secs / 60 % 60, s = secs % 60;
        buf[0] = '\0';
        if (hours > 0)
                snprintf(buf, size, "%s%lluh%llum%llu", sign, (unsigned long long)hours,
                         (unsigned long long)minutes, (unsigned long long)s);
        else if (minutes > 0)
                snprintf(buf, size, "%s%llum%llu", sign, (unsigned long long)minutes, (unsigned long long)s);
        else
                snprintf(buf, size, "%s%llu", sign, (unsigned long long)s);
        append_fraction(buf, size, frac, 9);
        size_t used = strlen(buf);
        snprintf(buf + used, size - used, "s");
}

int duration_parse(const char *text, int64_t *ret_ns) {
        static const struct {
                const char *name;
                uint64_t ns;
        } units[] = {
                {"ns", 1},
                {"us", NSEC_PER_USEC},
                {"\xc2\xb5s", NSEC_PER_USEC}, /* µ (micro sign) */
                {"\xce\xbcs", NSEC_PER_USEC}, /* μ (Greek mu) */
                {"ms", NSEC_PER_MSEC},
                {"s", NSEC_PER_SEC},
                {"m", 60 * NSEC_PER_SEC},
                {"h", 3600 * NSEC_PER_SEC},
        };
        const char *p = text;
        bool negative = false;
        long double total = 0;

        if (*p == '-' || *p == '+')
                negative = *p++ == '-';
        if (strcmp(p, "0") == 0) {
                *ret_ns = 0;
                return 0;
        }
        if (*p == '\0')
                return -EINVAL;
        while (*p) {
                long double value = 0, scale = 1;
                bool digits = false;
                while (isdigit((unsigned char)*p)) {
                        value = value * 10 + (*p++ - '0');
                        digits = true;
                }
                if (*p == '.') {
                        p++;
                        while (isdigit((unsigned char)*p)) {
                                scale /= 10;
                                value += (*p++ - '0') * scale;
                                digits = true;
                        }
                }
                if (!digits)
                        return -EINVAL;
                size_t best = 0;
                uint64_t unit = 0;
                for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
                        size_t len = strlen(units[i].name);
                        if (len > best && strncmp(p, units[i].name, len) == 0)
                                best = len, unit = units[i].ns;
                }
                if (best == 0)
                        return -EINVAL; /* Go requires a unit on every number except a bare "0" */
                p += best;
                total += value * (long double)unit;
                if (total > (long double)INT64_MAX)
                        return -ERANGE;
        }
        *ret_ns = negative ? -(int64_t)(total + 0.5L) : (int64_t)(total + 0.5L);
        return 0;
}
