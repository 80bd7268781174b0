/* storage.h — build the device stack a --devices entry asks for.
 *
 *   shared: true          → the base file itself, read-write: changes go into the package.
 *   overlay + state       → copy-on-write over the read-only base; changes go into the overlay,
 *                           and survive restarts (reopening continues where it stopped).
 *   neither               → the base file itself, read-write, as with shared: a single
 *                           instance whose changes are written back to the package (the seed
 *                           README's first drafter-peer example). cow_device_open_private()
 *                           remains for callers that want a throw-away overlay.
 *   sharedbase: true      → (with an overlay) the base is identical on every peer, so a
 *                           migration sends only the blocks present in the overlay;
 *                           storage_device_sends_all() tells the migrator. */
#pragma once

#include <stdbool.h>

#include "drafter/block_device.h"
#include "drafter/device_config.h"
#include "drafter/migrate_frame.h"

int storage_open_device(const struct device_config *cfg, struct block_device **ret_dev);

/* The device a migration fills: like storage_open_device(), but the block size must match the
 * source's and a missing base is created empty (sparse) with the source's size. */
int storage_open_received(const struct device_config *cfg, const struct migrate_device_info *info,
                          struct block_device **ret_dev);

/* Whether a migration must send every block of this device (false: only overlay blocks). */
bool storage_device_sends_all(const struct device_config *cfg);
