/* address.h — "host:port" as Go's net.SplitHostPort reads it: "localhost:1337", ":1337" (all
 * addresses), "[::1]:1337" (IPv6 in brackets). */
#pragma once

#include <stddef.h>

/* Split into host (may be "") and port. Returns -EINVAL with a message on malformed input. */
int address_split(const char *address, char *host, size_t host_size, char *port, size_t port_size);

struct sockaddr_storage;
/* The port of an IPv4 or IPv6 socket address (host order); 0 for other families. */
unsigned address_port(const struct sockaddr_storage *ss);
