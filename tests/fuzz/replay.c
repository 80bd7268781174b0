/* replay.c — run a fuzz target over its corpus without libFuzzer: every file under the given
 * files or directories is one input. This is how the corpora run as tests in CI (with any
 * compiler, and under ASan+UBSan in the sanitized build). Exit 0 when every input ran. */
#include "fuzz.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static unsigned inputs;

static int run_file(const char *path) {
        FILE *f = fopen(path, "rb");
        if (!f) {
                fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
                return -1;
        }
        size_t cap = 1 << 16, len = 0;
        uint8_t *buf = malloc(cap);
        size_t n;
        while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
                len += n;
                if (len == cap) {
                        uint8_t *bigger = realloc(buf, cap *= 2);
                        if (!bigger)
                                free(buf);
                        buf = bigger;
                }
        }
        fclose(f);
        if (!buf) {
                fprintf(stderr, "replay: %s: out of memory\n", path);
                return -1;
        }
        /* An exact-size copy, so ASan sees reads past the input's end. */
        uint8_t *exact = malloc(len ? len : 1);
        memcpy(exact, buf, len);
        free(buf);
        LLVMFuzzerTestOneInput(exact, len);
        free(exact);
        inputs++;
        return 0;
}

static int compare(const void *a, const void *b) {
        return strcmp(*(char *const *)a, *(char *const *)b);
}

static int run_path(const char *path) {
        struct stat st;
        if (stat(path, &st) < 0) {
                fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
                return -1;
        }
        if (!S_ISDIR(st.st_mode))
                return run_file(path);
        DIR *d = opendir(path);
        if (!d) {
                fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
                return -1;
        }
        char **names = NULL;
        size_t count = 0;
        struct dirent *e;
        while ((e = readdir(d))) {
                if (e->d_name[0] == '.')
                        continue;
                char **more = realloc(names, (count + 1) * sizeof(*names));
                if (!more)
                        break;
                names = more;
                if (asprintf(&names[count], "%s/%s", path, e->d_name) < 0)
                        break;
                count++;
        }
        closedir(d);
        if (count)
                qsort(names, count, sizeof(*names), compare);
        int r = 0;
        for (size_t i = 0; i < count; i++) {
                if (run_path(names[i]) < 0)
                        r = -1;
                free(names[i]);
        }
        free(names);
        return r;
}

int main(int argc, char **argv) {
        if (argc < 2) {
                fprintf(stderr, "usage: %s CORPUS_DIR_OR_FILE...\n", argv[0]);
                return 2;
        }
        LLVMFuzzerInitialize(&argc, &argv);
        int r = 0;
        for (int i = 1; i < argc; i++)
                if (run_path(argv[i]) < 0)
                        r = 1;
        printf("%s: %u inputs ran\n", argv[0], inputs);
        if (inputs == 0) {
                fprintf(stderr, "replay: no inputs found: an empty corpus tests nothing\n");
                return 1;
        }
        return r;
}
