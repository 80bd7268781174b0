/* fuzz-package — package extraction (lib/pack/package.c) from an arbitrary archive: the input is
 * written as a .tar.zst and extracted to two device files. It must fail with a message or
 * produce the devices; never crash, leak, write outside the output directory, or leave a
 * temporary file behind. */
#include "fuzz.h"
#include "drafter/error.h"
#include "drafter/log.h"
#include "drafter/package.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[64];
static char archive[96], out_a[96], out_b[96];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_level(LOG_NONE);
        snprintf(dir, sizeof(dir), "%s/drafter-fuzz-package.XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
        if (!mkdtemp(dir))
                abort();
        snprintf(archive, sizeof(archive), "%s/in.tar.zst", dir);
        snprintf(out_a, sizeof(out_a), "%s/out/memory.bin", dir);
        snprintf(out_b, sizeof(out_b), "%s/out/disk.img", dir);
        return 0;
}

/* Everything in the scratch directory but the archive and the two outputs is a leftover. */
static void check_clean(const char *path) {
        DIR *d = opendir(path);
        if (!d)
                return;
        struct dirent *e;
        while ((e = readdir(d))) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || !strcmp(e->d_name, "in.tar.zst") ||
                    !strcmp(e->d_name, "memory.bin") || !strcmp(e->d_name, "disk.img"))
                        continue;
                if (!strcmp(e->d_name, "out")) {
                        char sub[128];
                        snprintf(sub, sizeof(sub), "%s/out", path);
                        check_clean(sub);
                        continue;
                }
                fprintf(stderr, "fuzz-package: left behind: %s/%s\n", path, e->d_name);
                abort();
        }
        closedir(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        FILE *f = fopen(archive, "wb");
        if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0)
                abort();
        const struct package_file files[] = {{"memory", out_a}, {"disk", out_b}};
        struct package_options o = {.threads = 1, .max_entry_bytes = 64 << 20, .stop_fd = -1};
        struct package_stats st;
        error_clear();
        if (package_extract(archive, files, 2, &o, &st) < 0 && !*error_message())
                abort(); /* every refusal says why */
        check_clean(dir);
        unlink(out_a);
        unlink(out_b);
        return 0;
}
