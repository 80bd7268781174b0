/* transport.h — stream connections for migrations: "host:port" (TCP, IPv4 or IPv6 in brackets;
 * an empty host listens on every address) or "unix:/path". */
#pragma once

/* Listen; returns the listening fd. For TCP port 0, *ret_port gets the chosen port (may be NULL). */
int transport_listen(const char *address, int *ret_fd, int *ret_port);
/* Accept one connection, waiting at most timeout_ms (-1: forever). */
int transport_accept(int listen_fd, int timeout_ms, int *ret_fd);
/* Connect, retrying until timeout_ms passes (the peer may still be starting). */
int transport_connect(const char *address, int timeout_ms, int *ret_fd);
