/* address.c — split "host:port" the way Go does (see address.h). */
#include "drafter/address.h"
#include "drafter/error.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int address_split(const char *address, char *host, size_t host_size, char *port, size_t port_size) {
        const char *colon, *host_start = address, *host_end;
        if (address[0] == '[') {
                const char *close = strchr(address, ']');
                if (!close || close[1] != ':')
                        return error_set(-EINVAL, "address %s: missing ']:port' after an IPv6 host", address);
                host_start = address + 1;
                host_end = close;
                colon = close + 1;
        } else {
                colon = strrchr(address, ':');
                if (!colon)
                        return error_set(-EINVAL, "address %s: missing port (expected host:port)", address);
                if (memchr(address, ':', (size_t)(colon - address)))
                        return error_set(-EINVAL, "address %s: too many colons (write IPv6 hosts as [host]:port)",
                                         address);
                host_end = colon;
        }
        const char *p = colon + 1;
        if (*p == '\0' || strspn(p, "0123456789") != strlen(p) || strlen(p) > 5)
                return error_set(-EINVAL, "address %s: port must be a number from 0 to 65535", address);
        long n = 0;
        sscanf(p, "%ld", &n);
        if (n > 65535)
                return error_set(-EINVAL, "address %s: port must be a number from 0 to 65535", address);
        size_t hlen = (size_t)(host_end - host_start);
        if (hlen >= host_size || strlen(p) >= port_size)
                return error_set(-EINVAL, "address %s: too long", address);
        memcpy(host, host_start, hlen);
        host[hlen] = '\0';
        strcpy(port, p);
        return 0;
}

unsigned address_port(const struct sockaddr_storage *ss) {
        if (ss->ss_family == AF_INET) {
                struct sockaddr_in in;
                memcpy(&in, ss, sizeof(in));
                return ntohs(in.sin_port);
        }
        if (ss->ss_family == AF_INET6) {
                struct sockaddr_in6 in6;
                memcpy(&in6, ss, sizeof(in6));
                return ntohs(in6.sin6_port);
        }
        return 0;
}
