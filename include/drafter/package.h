/* package.h — packages: a VM's devices in one .tar.zst (docs/design.md "Packages").
 *
 * One POSIX (pax) tar entry per device, named after it, compressed as one zstd stream with a
 * checksum. Sparse-aware both ways: runs of zeros (holes, or zero data of at least
 * PACKAGE_HOLE_MIN bytes) go into the archive as pax sparse maps, not as data, and extraction
 * writes no zero pages, so a mostly-zero memory image costs neither time nor disk. Archives are
 * ordinary: GNU tar (`tar -I zstd -xf`) extracts ours, and we extract theirs.
 *
 * Both directions are safe against a crash, a signal or hostile input: the archive, or every
 * extracted device, is written under a temporary name in its final directory and renamed only
 * when the whole stream has been read and verified, so a failure leaves the old files (or
 * nothing) behind, never a half-written one. Extraction accepts only regular-file entries with
 * plain device names (no '/', no "..", no links), each at most once, within a size limit. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PACKAGE_HOLE_MIN (64u << 10)           /* zero data at least this long becomes a hole */
#define PACKAGE_DEFAULT_MAX_ENTRY (4ull << 40) /* 4 TiB */

struct package_file {
        const char *name; /* the entry's name: a device name */
        const char *path; /* the file that goes in (create) or comes out (extract) */
};

struct package_options {
        int level;                /* zstd level; 0: 3, zstd's default */
        int threads;              /* compression workers; 0: one per online CPU */
        uint64_t max_entry_bytes; /* extract: larger entries are refused; 0: PACKAGE_DEFAULT_MAX_ENTRY */
        bool progress;            /* a log_info line per second of work */
        int stop_fd;              /* once readable, stop with -EINTR (outputs removed); -1: none */
};

struct package_stats {
        uint64_t logical_bytes; /* sum of the devices' sizes */
        uint64_t data_bytes;    /* bytes outside holes: what was compressed or written */
        uint64_t archive_bytes; /* size of the .tar.zst */
        uint64_t skipped_entries; /* extract: entries not asked for */
};

/* Write `archive` (replaced atomically) with one entry per file, in the order given. */
int package_create(const char *archive, const struct package_file *files, size_t count,
                   const struct package_options *options, struct package_stats *ret_stats);

/* Extract the entries named in `files` to their paths (parent directories created). Entries the
 * list does not name are skipped; a named entry missing from the archive is an error. */
int package_extract(const char *archive, const struct package_file *files, size_t count,
                    const struct package_options *options, struct package_stats *ret_stats);
