/* flags.c — Go-compatible flag parsing and usage output (see flags.h). */
#include "drafter/flags.h"
#include "drafter/clock.h"
#include "drafter/cleanup.h"
#include "drafter/log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

char *go_quote(const char *s) {
        size_t cap = strlen(s) * 4 + 3, n = 0;
        char *out = malloc(cap);
        if (!out)
                return NULL;
        out[n++] = '"';
        for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
                switch (*p) {
                case '"':  n += (size_t)sprintf(out + n, "\\\""); break;
                case '\\': n += (size_t)sprintf(out + n, "\\\\"); break;
                case '\n': n += (size_t)sprintf(out + n, "\\n"); break;
                case '\t': n += (size_t)sprintf(out + n, "\\t"); break;
                case '\r': n += (size_t)sprintf(out + n, "\\r"); break;
                default:
                        if (*p < 0x20 || *p == 0x7f)
                                n += (size_t)sprintf(out + n, "\\x%02x", *p);
                        else
                                out[n++] = (char)*p;
                }
        }
        out[n++] = '"';
        out[n] = '\0';
        return out;
}

static const char *flag_type_name(enum flag_type type) {
        switch (type) {
        case FLAG_BOOL:     return "";
        case FLAG_INT:      return "int";
        case FLAG_UINT:     return "uint";
        case FLAG_STRING:   return "string";
        case FLAG_DURATION: return "duration";
        }
        return "value";
}

/* Render the current value of a flag into buf; returns false if it is the type's zero value
 * (Go prints no "(default …)" then). */
static bool flag_format_value(const struct flag *f, char *buf, size_t size) {
        switch (f->type) {
        case FLAG_BOOL:
                snprintf(buf, size, "%s", *(bool *)f->value ? "true" : "false");
                return *(bool *)f->value;
        case FLAG_INT:
                snprintf(buf, size, "%" PRId64, *(int64_t *)f->value);
                return *(int64_t *)f->value != 0;
        case FLAG_UINT:
                snprintf(buf, size, "%" PRIu64, *(uint64_t *)f->value);
                return *(uint64_t *)f->value != 0;
        case FLAG_DURATION:
                duration_format(*(int64_t *)f->value, buf, size);
                return *(int64_t *)f->value != 0;
        case FLAG_STRING: {
                const char *s = *(const char **)f->value;
                snprintf(buf, size, "%s", s ? s : "");
                return s && *s;
        }
        }
        return false;
}

static int flag_compare(const void *a, const void *b) {
        return strcmp((*(const struct flag *const *)a)->name, (*(const struct flag *const *)b)->name);
}

void flags_print_usage(const char *program, const struct flag *flags, size_t nflags, FILE *out) {
        _cleanup_free_ const struct flag **sorted = calloc(nflags ? nflags : 1, sizeof(*sorted));
        if (!sorted)
                return;
        for (size_t i = 0; i < nflags; i++)
                sorted[i] = &flags[i];
        qsort(sorted, nflags, sizeof(*sorted), flag_compare);

        fprintf(out, "Usage of %s:\n", program);
        for (size_t i = 0; i < nflags; i++) {
                const struct flag *f = sorted[i];
                const char *type = flag_type_name(f->type);
                char head[256];
                int len = snprintf(head, sizeof(head), "  -%s%s%s", f->name, *type ? " " : "", type);
                /* Go keeps one-letter bool flags on one line with the usage. */
                fputs(head, out);
                fputs(len <= 4 ? "\t" : "\n    \t", out);
                for (const char *u = f->usage; *u; u++) {
                        fputc(*u, out);
                        if (*u == '\n')
                                fputs("    \t", out);
                }
                char value[4096];
                if (flag_format_value(f, value, sizeof(value))) {
                        if (f->type == FLAG_STRING) {
                                _cleanup_free_ char *quoted = go_quote(value);
                                fprintf(out, " (default %s)", quoted ? quoted : value);
                        } else {
                                fprintf(out, " (default %s)", value);
                        }
                }
                fputc('\n', out);
        }
}

static int parse_bool(const char *s, bool *ret) {
        static const char *const yes[] = {"1", "t", "T", "true", "TRUE", "True"};
        static const char *const no[] = {"0", "f", "F", "false", "FALSE", "False"};
        for (size_t i = 0; i < ELEMENTSOF(yes); i++) {
                if (strcmp(s, yes[i]) == 0)
                        return *ret = true, 0;
                if (strcmp(s, no[i]) == 0)
                        return *ret = false, 0;
        }
        return -EINVAL;
}

/* Go accepts underscores between digits and 0x/0o/0b prefixes with base 0. */
static int parse_integer(const char *s, bool is_signed, int64_t *ret_signed, uint64_t *ret_unsigned) {
        char clean[128];
        size_t n = 0;
        for (const char *p = s; *p; p++) {
                if (*p == '_')
                        continue;
                if (n + 1 >= sizeof(clean))
                        return -ERANGE;
                clean[n++] = *p;
        }
        clean[n] = '\0';
        if (n == 0)
                return -EINVAL;
        const char *digits = clean;
        int base = 0;
        char *end;
        const char *sign = (clean[0] == '-' || clean[0] == '+') ? clean : NULL;
        const char *body = sign ? clean + 1 : clean;
        char rebuilt[128];
        if (body[0] == '0' && (body[1] == 'o' || body[1] == 'O')) {
                snprintf(rebuilt, sizeof(rebuilt), "%s%s", sign ? (clean[0] == '-' ? "-" : "+") : "", body + 2);
                digits = rebuilt, base = 8;
        } else if (body[0] == '0' && (body[1] == 'b' || body[1] == 'B')) {
                snprintf(rebuilt, sizeof(rebuilt), "%s%s", sign ? (clean[0] == '-' ? "-" : "+") : "", body + 2);
                digits = rebuilt, base = 2;
        }
        errno = 0;
        if (is_signed) {
                long long v = strtoll(digits, &end, base);
                if (errno || *end || end == digits)
                        return errno == ERANGE ? -ERANGE : -EINVAL;
                *ret_signed = v;
        } else {
                if (clean[0] == '-')
                        return -EINVAL;
                unsigned long long v = strtoull(digits, &end, base);
                if (errno || *end || end == digits)
                        return errno == ERANGE ? -ERANGE : -EINVAL;
                *ret_unsigned = v;
        }
        return 0;
}

static int flag_set_value(struct flag *f, const char *text) {
        switch (f->type) {
        case FLAG_BOOL:
                return parse_bool(text, f->value);
        case FLAG_INT:
                return parse_integer(text, true, f->value, NULL);
        case FLAG_UINT:
                return parse_integer(text, false, NULL, f->value);
        case FLAG_DURATION:
                return duration_parse(text, f->value);
        case FLAG_STRING:
                *(const char **)f->value = text;
                return 0;
        }
        return -EINVAL;
}

static struct flag *flag_find(struct flag *flags, size_t nflags, const char *name, size_t len) {
        for (size_t i = 0; i < nflags; i++)
                if (strlen(flags[i].name) == len && strncmp(flags[i].name, name, len) == 0)
                        return &flags[i];
        return NULL;
}

int flags_parse(const char *program, struct flag *flags, size_t nflags, int argc, char **argv, FILE *out,
                int *ret_next) {
        /* The usage shows the defaults, i.e. the values before parsing: snapshot them. */
        _cleanup_free_ struct flag *defaults = calloc(nflags ? nflags : 1, sizeof(*defaults));
        _cleanup_free_ unsigned char *storage = calloc(nflags ? nflags : 1, 16);
        if (!defaults || !storage)
                return -ENOMEM;
        for (size_t i = 0; i < nflags; i++) {
                defaults[i] = flags[i];
                defaults[i].value = storage + 16 * i;
                memcpy(defaults[i].value, flags[i].value,
                       flags[i].type == FLAG_BOOL ? sizeof(bool) : flags[i].type == FLAG_STRING ? sizeof(char *) : 8);
        }

        int i = 1;
        for (; i < argc; i++) {
                const char *arg = argv[i];
                if (arg[0] != '-' || arg[1] == '\0')
                        break;
                const char *name = arg + 1;
                if (name[0] == '-') {
                        name++;
                        if (name[0] == '\0') { /* "--" ends the flags */
                                i++;
                                break;
                        }
                }
                if (name[0] == '-' || name[0] == '=') {
                        fprintf(out, "bad flag syntax: %s\n", arg);
                        flags_print_usage(program, defaults, nflags, out);
                        return -EINVAL;
                }
                const char *eq = strchr(name, '=');
                size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
                struct flag *f = flag_find(flags, nflags, name, name_len);
                if (!f) {
                        if ((name_len == 4 && strncmp(name, "help", 4) == 0) ||
                            (name_len == 1 && name[0] == 'h')) {
                                flags_print_usage(program, defaults, nflags, out);
                                return FLAGS_HELP;
                        }
                        fprintf(out, "flag provided but not defined: -%.*s\n", (int)name_len, name);
                        flags_print_usage(program, defaults, nflags, out);
                        return -EINVAL;
                }
                const char *value;
                if (eq) {
                        value = eq + 1;
                } else if (f->type == FLAG_BOOL) {
                        value = "true";
                } else if (i + 1 < argc) {
                        value = argv[++i];
                } else {
                        fprintf(out, "flag needs an argument: -%s\n", f->name);
                        flags_print_usage(program, defaults, nflags, out);
                        return -EINVAL;
                }
                int r = flag_set_value(f, value);
                if (r < 0) {
                        const char *why = f->type == FLAG_BOOL ? "parse error"
                                          : r == -ERANGE       ? "value out of range"
                                                               : "parse error";
                        fprintf(out, "invalid %s \"%s\" for flag -%s: %s\n",
                                f->type == FLAG_BOOL ? "boolean value" : "value", value, f->name, why);
                        flags_print_usage(program, defaults, nflags, out);
                        return -EINVAL;
                }
        }
        if (ret_next)
                *ret_next = i;
        return FLAGS_OK;
}

int flags_parse_command(const char *program, struct flag *flags, size_t nflags, int argc, char **argv,
                        const bool *verbose) {
        int r = flags_parse(program, flags, nflags, argc, argv, stderr, NULL);
        if (r == FLAGS_HELP)
                return 0;
        if (r < 0)
                return 2;
        log_setup_from_env();
        if (verbose && *verbose)
                log_set_level(LOG_DEBUG);
        return -1;
}
