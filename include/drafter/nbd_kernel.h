/* nbd_kernel.h — attach an export of our NBD server to a kernel block device /dev/nbdN over the
 * nbd generic-netlink family (Drafter's way of exposing devices). Needs the nbd kernel module;
 * on machines without it nbd_kernel_available() is false and callers use FUSE instead. */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "drafter/nbd_server.h"

struct nbd_kernel;

/* True if the kernel offers NBD devices (loading the module if we may). */
bool nbd_kernel_available(void);

/* Connect export `export_index` of `srv` to a free /dev/nbdN (N in *ret_index). The transmission
 * runs on `connections` socket pairs served by threads of ours. */
int nbd_kernel_connect(struct nbd_server *srv, size_t export_index, unsigned connections,
                       struct nbd_kernel **ret_nbd, int *ret_index);

/* Disconnect the device and stop serving it. NULL is fine. */
void nbd_kernel_disconnect(struct nbd_kernel *nbd);
