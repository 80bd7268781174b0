/* log.c — leveled logging in Go's log format (see log.h). */
#include "drafter/log.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static enum log_level log_threshold = LOG_INFO;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const log_level_names[] = {
        [LOG_DEBUG] = "debug", [LOG_INFO] = "info", [LOG_WARNING] = "warning",
        [LOG_ERROR] = "error", [LOG_NONE] = "none",
};

void log_set_level(enum log_level level) {
        __atomic_store_n(&log_threshold, level, __ATOMIC_RELAXED);
}

enum log_level log_get_level(void) {
        return __atomic_load_n(&log_threshold, __ATOMIC_RELAXED);
}

int log_level_parse(const char *name, enum log_level *ret_level) {
        for (size_t i = 0; i < sizeof(log_level_names) / sizeof(log_level_names[0]); i++)
                if (strcmp(name, log_level_names[i]) == 0) {
                        *ret_level = (enum log_level)i;
                        return 0;
                }
        return -EINVAL;
}

void log_setup_from_env(void) {
        const char *e = getenv("DRAFTER_LOG");
        enum log_level level;
        if (e && log_level_parse(e, &level) == 0)
                log_set_level(level);
}

void log_write(enum log_level level, const char *fmt, ...) {
        if (level < log_get_level() || level >= LOG_NONE)
                return;

        char line[2048];
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        localtime_r(&ts.tv_sec, &tm);
        int n = (int)strftime(line, sizeof(line), "%Y/%m/%d %H:%M:%S ", &tm);
        if (level == LOG_DEBUG) /* with the microseconds: debug output is for timing things */
                n += snprintf(line + n - 1, sizeof(line) - (size_t)n + 1, ".%06ld debug: ", ts.tv_nsec / 1000) - 1;
        else if (level == LOG_WARNING)
                n += snprintf(line + n, sizeof(line) - (size_t)n, "warning: ");
        else if (level == LOG_ERROR)
                n += snprintf(line + n, sizeof(line) - (size_t)n, "error: ");

        va_list ap;
        va_start(ap, fmt);
        vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
        va_end(ap);

        pthread_mutex_lock(&log_lock);
        fputs(line, stderr);
        fputc('\n', stderr);
        pthread_mutex_unlock(&log_lock);
}
