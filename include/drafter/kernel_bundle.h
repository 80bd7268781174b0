/* kernel_bundle.h — a package's `kernel` device: a kernel and its initramfs in one file.
 *
 * Layout: the bzImage zero-padded to a multiple of 4096 bytes, then the initramfs zero-padded
 * to a multiple of 4096, then a 40-byte trailer: ASCII "DRAFTKB1" and four little-endian u64,
 * kernel offset, kernel size, initrd offset, initrd size. A file that does not end with such a
 * trailer is a plain kernel (no initrd). The reader checks every field: a non-empty kernel,
 * 4096-aligned offsets, both parts inside the file before the trailer and not overlapping; an
 * initrd size of 0 (with offset 0) means none. The file must keep its exact size: a device layer
 * that pads it hides the trailer. Thread-safe (no shared state). */
#pragma once

#define KERNEL_BUNDLE_MAGIC        "DRAFTKB1"
#define KERNEL_BUNDLE_TRAILER_SIZE 40
#define KERNEL_BUNDLE_ALIGN        4096

/* Write the kernel to out_dir/kernel and the initrd (if any) to out_dir/initrd (each through a
 * temporary file and a rename; a stale out_dir/initrd is removed when there is none). On success
 * *ret_kernel_path is the malloc'd kernel path and *ret_initrd_path the malloc'd initrd path or
 * NULL. */
int kernel_bundle_extract(const char *bundle_path, const char *out_dir, char **ret_kernel_path,
                          char **ret_initrd_path);

/* Write a bundle of kernel_path and initrd_path (NULL: a bundle without initrd) to bundle_path,
 * replaced atomically and fsynced. */
int kernel_bundle_create(const char *kernel_path, const char *initrd_path, const char *bundle_path);
