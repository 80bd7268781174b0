/* flags.h — command-line flags parsed like Go's flag package, so the seeds' commands run unchanged.
 *
 * Accepts -name and --name, "-name=value" or "-name value" (bools only take "=value"), "--" ends
 * the flags, the first non-flag argument ends them too. --help/-h prints usage in Go's format:
 *
 *   Usage of drafter-liveness:
 *     -vsock-port int
 *       	VSocket port (default 25)
 *
 * Defaults are read from the variables the flags point at when flags_parse() is called. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum flag_type {
        FLAG_BOOL,     /* bool * */
        FLAG_INT,      /* int64_t * */
        FLAG_UINT,     /* uint64_t * */
        FLAG_STRING,   /* const char ** (points into argv or at the default) */
        FLAG_DURATION, /* int64_t * nanoseconds, written "1m0s", "500ms" */
};

struct flag {
        const char *name;
        enum flag_type type;
        void *value;
        const char *usage;
};

enum {
        FLAGS_OK = 0,
        FLAGS_HELP = 1, /* usage was printed on request: exit 0 */
};

/* Parse argv[1..]. Returns FLAGS_OK, FLAGS_HELP, or -EINVAL after printing the error and the usage to
 * `out` (Go exits 2 then). *ret_next is the index of the first argument that is not a flag. */
int flags_parse(const char *program, struct flag *flags, size_t nflags, int argc, char **argv, FILE *out,
                int *ret_next);

/* For a command's main(): parse, print usage or errors to stderr, apply DRAFTER_LOG and, if
 * *verbose (a flag in `flags`) was set, debug logging. Returns -1 to go on, or the exit status
 * to return at once (0 after --help, 2 for a usage error). */
int flags_parse_command(const char *program, struct flag *flags, size_t nflags, int argc, char **argv,
                        const bool *verbose);

/* Print the usage text for the flags with their current values as defaults. */
void flags_print_usage(const char *program, const struct flag *flags, size_t nflags, FILE *out);

/* Go's %q quoting of a string (as used for string defaults in --help). Returns a malloc'd string. */
char *go_quote(const char *s);
