/* host.h — small helpers of lib/net: nftables commands and one-line files (procfs sysctls,
 * our records under /run/drafter). */
#pragma once

#include <stdbool.h>
#include <stddef.h>

/* Run nft commands (libnftables). -EIO with nft's first error line as the message, unless
 * `quiet` (for removals of what may not exist). */
int net_nft(const char *commands, bool quiet);
/* The first line of path, without its newline; "" if it cannot be read. */
void net_read_line(const char *path, char *buf, size_t size);
/* value and a newline into path (a sysctl, or a record). */
int net_write_line(const char *path, const char *value);
