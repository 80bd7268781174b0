/* gate_device.h — a device layer that can hold writes back: while frozen, writes and discards
 * wait; thawed, they go through; shut, they fail with the given error. Reads always pass. Used
 * to stop writers at the suspend point of a migration without losing an acknowledged write:
 * a write either completed before the freeze (and is migrated) or is refused. Thread-safe. */
#pragma once

#include "drafter/block_device.h"

/* Wrap `inner` (owned). */
int gate_device_wrap(struct block_device *inner, struct block_device **ret_dev);
/* Block new writes and wait until writes in progress have finished. */
void gate_device_freeze(struct block_device *dev);
void gate_device_thaw(struct block_device *dev);
/* Fail waiting and future writes with err (e.g. -EROFS once the device has moved away). */
void gate_device_shut(struct block_device *dev, int err);
