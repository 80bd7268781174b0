/* storage.c — from a --devices entry to a device stack (see storage.h). */
#include "drafter/storage.h"
#include "drafter/cow_device.h"
#include "drafter/error.h"

#include <errno.h>

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
