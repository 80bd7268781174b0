/* storage.c — from a --devices entry to a device stack (see storage.h). */
#include "drafter/storage.h"
#include "drafter/cow_device.h"
#include "drafter/error.h"
#include "drafter/fs.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

static bool is_set(const char *s) {
        return s && *s;
}

int storage_open_device(const struct device_config *cfg, struct block_device **ret_dev) {
        if (!is_set(cfg->base))
                return error_set(-EINVAL, "%s: no base file", cfg->name);
        if (is_set(cfg->overlay) && !cfg->shared)
                return cow_device_open(&(struct cow_config){cfg->name, cfg->base, cfg->overlay, cfg->state,
                                                            cfg->block_size},
                                       ret_dev);
        /* shared, or no overlay: the package file itself (Drafter's single-instance mode). */
        return file_device_open(cfg->name, cfg->base, 0, 0, cfg->block_size, ret_dev);
}

bool storage_device_sends_all(const struct device_config *cfg) {
        return !(cfg->sharedbase && !cfg->shared);
}

int storage_open_received(const struct device_config *cfg, const struct migrate_device_info *info,
                          struct block_device **ret_dev) {
        if (cfg->block_size != info->block_size)
                return error_set(-EINVAL, "device \"%s\": --devices says blockSize %u, the source uses %u", info->name,
                                 cfg->block_size, info->block_size);
        /* No local base yet: an empty (sparse) one of the source's size. */
        struct stat st;
        if (stat(cfg->base, &st) < 0) {
                int r = fs_mkdir_parents(cfg->base);
                int fd = r < 0 ? -1 : open(cfg->base, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
                if (fd < 0 || ftruncate(fd, (off_t)info->size) < 0) {
                        r = error_set_errno(-errno, "device \"%s\": cannot create base %s", info->name, cfg->base);
                        if (fd >= 0)
                                close(fd);
                        return r;
                }
                close(fd);
        }
        return storage_open_device(cfg, ret_dev);
}
