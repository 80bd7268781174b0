/* error.c — per-thread error messages (see error.h). */
#include "drafter/error.h"

#undef error_set /* the analyzer's stand-ins (error.h) */
#undef error_set_errno
#undef error_prefix

#include <stdio.h>
#include <string.h>

#define ERROR_MESSAGE_MAX 1024

static _Thread_local char error_buffer[ERROR_MESSAGE_MAX];

__attribute__((format(printf, 1, 0))) static void error_vformat(const char *fmt, va_list ap) {
        vsnprintf(error_buffer, sizeof(error_buffer), fmt, ap);
}

int error_set(int err, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        error_vformat(fmt, ap);
        va_end(ap);
        return err;
}

int error_set_errno(int err, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        error_vformat(fmt, ap);
        va_end(ap);
        size_t used = strlen(error_buffer);
        snprintf(error_buffer + used, sizeof(error_buffer) - used, ": %s", strerror(err < 0 ? -err : err));
        return err;
}

int error_prefix(int err, const char *fmt, ...) {
        char prefix[ERROR_MESSAGE_MAX];
        char old[ERROR_MESSAGE_MAX];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(prefix, sizeof(prefix), fmt, ap);
        va_end(ap);
        memcpy(old, error_buffer, sizeof(old));
        if (old[0] == '\0')
                snprintf(error_buffer, sizeof(error_buffer), "%s: %s", prefix, strerror(err < 0 ? -err : err));
        else
                snprintf(error_buffer, sizeof(error_buffer), "%s: %s", prefix, old);
        return err;
}

const char *error_message(void) {
        return error_buffer;
}

void error_clear(void) {
        error_buffer[0] = '\0';
}
