/* log.h — leveled logging to stderr in Go's log format ("2024/06/24 13:43:11 message").
 *
 * The library logs only at LOG_DEBUG; CLIs log what the user should see at LOG_INFO and raise
 * the threshold with --verbose or DRAFTER_LOG=debug. Thread-safe. */
#pragma once

#include <stdarg.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERROR, LOG_NONE };

void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Parse "debug", "info", "warning", "error", "none"; returns -EINVAL otherwise. */
int log_level_parse(const char *name, enum log_level *ret_level);
/* Apply DRAFTER_LOG from the environment if set. */
void log_setup_from_env(void);

void log_write(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_write(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_write(LOG_INFO, __VA_ARGS__)
#define log_warning(...) log_write(LOG_WARNING, __VA_ARGS__)
#define log_error(...) log_write(LOG_ERROR, __VA_ARGS__)
