/* guestlink.h — the links between host and guest: liveness (the guest says it has booted) and
 * the agent (the host calls BeforeSuspend / AfterResume, which run the guest's configured
 * commands).
 *
 * Wire format (DESIGN.md §3.5), one JSON object per line:
 *   liveness, guest → host:  {"liveness":"ready"}
 *   agent, host → guest:     {"request":{"call":ID,"function":NAME,"args":[]}}
 *   agent, guest → host:     {"response":{"call":ID,"value":null,"err":""}}
 * A request the host repeats after a timeout carries the same ID; the agent answers a repeated
 * ID from memory instead of running the command again, so each command runs exactly once.
 *
 * Transport: AF_VSOCK where the VMM offers it; otherwise named virtio-serial ports, whose host
 * ends are unix sockets the VMM listens on (vmm_port_path()). Not thread-safe per link. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define GUESTLINK_LIVENESS_PORT_NAME "drafter.liveness"
#define GUESTLINK_AGENT_PORT_NAME "drafter.agent"
#define GUESTLINK_MAX_LINE 65536

/* ---- wire (host and guest) ---- */

/* Lines are returned malloc'd, ending in '\n'. */
char *guestlink_encode_request(uint64_t call, const char *function);
char *guestlink_encode_response(uint64_t call, const char *err);
/* 0, or -EBADMSG with a message saying what is wrong. *ret_function / *ret_err are malloc'd. */
int guestlink_parse_request(const char *line, uint64_t *ret_call, char **ret_function);
int guestlink_parse_response(const char *line, uint64_t *ret_call, char **ret_err);
bool guestlink_is_liveness(const char *line);

/* ---- host ---- */

/* Connect to a unix socket, retrying while it does not exist or refuses, until timeout. */
int guestlink_connect_unix(const char *path, uint64_t timeout_ns, int *ret_fd);
/* Wait until the guest's liveness line arrives on the port at `path`. */
int guestlink_wait_liveness(const char *path, uint64_t timeout_ns);

struct guestlink_agent;
int guestlink_agent_connect(const char *path, uint64_t timeout_ns, struct guestlink_agent **ret_agent);
/* Call `function` and wait for its answer: each try waits try_timeout_ns, then the same call is
 * sent again, `tries` times in all. The guest's error becomes ours: "agent: BeforeSuspend: …". */
int guestlink_agent_call(struct guestlink_agent *agent, const char *function, uint64_t try_timeout_ns,
                         unsigned tries);
void guestlink_agent_free(struct guestlink_agent *agent);

/* ---- guest ---- */

/* Open the guest end of a link: the virtio-serial port named `name` if there is one, else an
 * AF_VSOCK connection to the host on `vsock_port`; retried until timeout. */
int guestlink_guest_open(const char *name, uint32_t vsock_port, uint64_t timeout_ns, int *ret_fd);
