/* error.h — errors as -errno plus a per-thread message that names the object and the cause.
 *
 * Library functions return 0 or a negative errno. On failure they also leave a message in
 * thread-local storage (error_message()), e.g. "memory: overlay out/overlay/memory.bin: No space
 * left on device". Callers add context with error_prefix() as the error travels up; the CLI prints
 * the final message. Thread-safe: every thread has its own message. */
#pragma once

#include <stdarg.h>

/* Set the message to the formatted text; returns err (a negative errno) for `return error_set(...)`. */
int error_set(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Like error_set(), with ": <strerror(-err)>" appended. */
int error_set_errno(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepend "<formatted>: " to the current message; returns err. */
int error_prefix(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The last message set in this thread ("" if none). Valid until the next error_* call in this thread. */
const char *error_message(void);

void error_clear(void);

#ifdef __clang_analyzer__
/* The analyzer (scripts/lint clang-tidy) cannot see into error.c, so it would take any error
 * return for success and report every out-parameter left unset on failure paths. Under analysis
 * only, say what the functions return: their first argument. */
#define error_set(err, ...) (error_set((err), __VA_ARGS__), (err))
#define error_set_errno(err, ...) (error_set_errno((err), __VA_ARGS__), (err))
#define error_prefix(err, ...) (error_prefix((err), __VA_ARGS__), (err))
#endif
