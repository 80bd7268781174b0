/* qmp.h — a small QMP (QEMU Machine Protocol) client over a unix socket.
 *
 * QMP is one JSON object per line. After connecting, QEMU sends a greeting; the client answers
 * with qmp_capabilities and may then execute commands, one at a time: each gets exactly one
 * {"return":…} or {"error":{"class":…,"desc":…}}. Asynchronous events ({"event":…}) can arrive
 * at any moment, also between a command and its answer; they are queued (the newest
 * QMP_EVENT_QUEUE_MAX) so qmp_wait_event() can still find one that arrived during a command.
 * Every read has a deadline. Not thread-safe: one owner per connection. */
#pragma once

#include <jansson.h>
#include <stdint.h>

#define QMP_DEFAULT_TIMEOUT_NS (10ULL * 1000000000ULL)
#define QMP_EVENT_QUEUE_MAX    256

struct qmp;

/* Connect to the QMP socket at `socket_path`, retrying while it does not exist yet or refuses
 * connections (QEMU creates it shortly after starting) until CLOCK_MONOTONIC `deadline_ns`; then
 * read the greeting and negotiate capabilities. Between attempts `check(userdata)` is called if
 * not NULL: a negative return stops the retry and is returned as is (its message kept), e.g.
 * when the QEMU process has exited. */
int qmp_connect(const char *socket_path, uint64_t deadline_ns, int (*check)(void *userdata), void *userdata,
                struct qmp **ret_qmp);
/* The same on a connected stream (taken over, closed on failure); `name` names it in errors. */
int qmp_open_fd(int fd, const char *name, uint64_t deadline_ns, struct qmp **ret_qmp);
void qmp_free(struct qmp *q);

/* How long qmp_execute() waits for an answer (QMP_DEFAULT_TIMEOUT_NS at first). */
void qmp_set_timeout(struct qmp *q, uint64_t timeout_ns);

/* Execute `command` with `args` (a JSON object, borrowed; NULL for none). On success *ret_return
 * (if not NULL) gets a new reference to the "return" value. Errors: -EIO with
 * "qemu: <command>: <class>: <desc>" for an error answer, -ETIMEDOUT, -ECONNRESET when QEMU
 * closed the connection, -EPROTO for malformed messages. */
int qmp_execute(struct qmp *q, const char *command, json_t *args, json_t **ret_return);

/* Wait for the next event named `event` (queued or new) within `timeout_ns`; *ret_data (if not
 * NULL) gets a new reference to its "data" (an empty object when it has none). */
int qmp_wait_event(struct qmp *q, const char *event, uint64_t timeout_ns, json_t **ret_data);
/* When (CLOCK_MONOTONIC ns) an event named `event` was last read from QEMU, queued or waited
 * for; 0 if never. */
uint64_t qmp_event_seen_ns(const struct qmp *q, const char *event);
/* The same for the first event named one of `events` (n of them); *ret_index (if not NULL)
 * says which. */
int qmp_wait_events(struct qmp *q, const char *const *events, size_t n, uint64_t timeout_ns, size_t *ret_index,
                    json_t **ret_data);
