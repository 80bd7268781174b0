/* storage.h — build the device stack a --devices entry asks for.
 *
 *   shared: true          → the base file itself, read-write: changes go into the package.
 *   overlay + state       → copy-on-write over the read-only base; changes go into the overlay,
 *                           and survive restarts (reopening continues where it stopped).
 *   neither               → copy-on-write with a private overlay in unlinked temporary files:
 *                           the package is never modified and nothing is left behind.
 *   sharedbase: true      → (with an overlay) the base is identical on every peer, so a
 *                           migration sends only the blocks present in the overlay;
 *                           storage_device_sends_all() tells the migrator. */
#pragma once

#include <stdbool.h>

#include "drafter/block_device.h"
#include "drafter/device_config.h"

int storage_open_device(const struct device_config *cfg, struct block_device **ret_dev);

/* Whether a migration must send every block of this device (false: only overlay blocks). */
bool storage_device_sends_all(const struct device_config *cfg);
