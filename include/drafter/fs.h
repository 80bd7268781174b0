/* fs.h — small file-system helpers: parent directories, files replaced atomically. */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* Create the directories leading to `path` (not `path` itself), like mkdir -p "$(dirname path)". */
int fs_mkdir_parents(const char *path);

/* Write `len` bytes to `path` through a temporary file in the same directory, fsync, rename:
 * readers see the old file or the whole new one, never a part. */
int fs_write_file_atomic(const char *path, const void *data, size_t len);
/* The same without the fsyncs: whole or absent for readers, not durable. For files that do not
 * outlive the process that needs them (a VM's state handed to QEMU). */
int fs_write_file_replace(const char *path, const void *data, size_t len);

/* fsync the directory containing `path` so a rename or create in it is durable. */
int fs_fsync_parent(const char *path);

/* Copy `from` to `to` (created or truncated), keeping holes, at least `min_size` bytes long
 * (zero-extended), fsynced. */
int fs_copy_file(const char *from, const char *to, uint64_t min_size);
