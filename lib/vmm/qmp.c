/* qmp.c — QMP client: line-delimited JSON over a unix socket, with deadlines (see qmp.h). */
#include "qmp.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/log.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* QEMU's answers are small; query-* results are a few KB. Anything near this is not QMP. */
#define QMP_MESSAGE_MAX      (16u << 20)
#define QMP_CONNECT_RETRY_NS (5 * NSEC_PER_MSEC)

struct qmp {
        int fd;
        char *path;
        char *buf; /* received, not yet parsed bytes: buf[0..len) */
        size_t len, cap;
        json_t *events; /* array, oldest first */
        json_t *seen;   /* event name -> CLOCK_MONOTONIC ns it was last read at */
        uint64_t timeout_ns;
        uint64_t next_id;
};

void qmp_free(struct qmp *q) {
        if (!q)
                return;
        if (q->fd >= 0)
                close(q->fd);
        json_decref(q->events);
        json_decref(q->seen);
        free(q->buf);
        free(q->path);
        free(q);
}

static void qmp_freep(struct qmp **q) {
        qmp_free(*q);
}

void qmp_set_timeout(struct qmp *q, uint64_t timeout_ns) {
        q->timeout_ns = timeout_ns;
}

static int qmp_send(struct qmp *q, json_t *msg, const char *what) {
        _cleanup_free_ char *text = json_dumps(msg, JSON_COMPACT);
        if (!text)
                return error_set(-ENOMEM, "qemu: %s: cannot encode the command", what);
        struct iovec iov[2] = {{text, strlen(text)}, {"\n", 1}};
        int r = io_write_iov(q->fd, iov, 2);
        if (r == -EPIPE || r == -ECONNRESET)
                return error_set(-ECONNRESET, "qemu: %s: QMP connection closed (QEMU exited?)", what);
        if (r < 0)
                return error_set_errno(r, "qemu: %s: cannot write to %s", what, q->path);
        return 0;
}

/* One message, read until CLOCK_MONOTONIC deadline_ns. Blank lines are skipped. */
static int qmp_read_message(struct qmp *q, uint64_t deadline_ns, const char *what, json_t **ret_msg) {
        for (;;) {
                char *nl = q->len > 0 ? memchr(q->buf, '\n', q->len) : NULL;
                if (nl) {
                        size_t line = (size_t)(nl - q->buf);
                        json_error_t jerr;
                        json_t *msg = NULL;
                        bool blank = true;
                        for (size_t i = 0; i < line && blank; i++)
                                blank = q->buf[i] == ' ' || q->buf[i] == '\t' || q->buf[i] == '\r';
                        if (!blank)
                                msg = json_loadb(q->buf, line, 0, &jerr);
                        memmove(q->buf, nl + 1, q->len - line - 1);
                        q->len -= line + 1;
                        if (blank)
                                continue;
                        if (!msg || !json_is_object(msg)) {
                                json_decref(msg);
                                return error_set(-EPROTO, "qemu: %s: malformed QMP message: %s", what,
                                                 msg ? "not an object" : jerr.text);
                        }
                        *ret_msg = msg;
                        return 0;
                }
                if (q->len == q->cap) {
                        if (q->cap >= QMP_MESSAGE_MAX)
                                return error_set(-EMSGSIZE, "qemu: %s: QMP message longer than %u bytes",
                                                 what, QMP_MESSAGE_MAX);
                        size_t cap = q->cap ? q->cap * 2 : 8192;
                        char *buf = realloc(q->buf, cap);
                        if (!buf)
                                return -ENOMEM;
                        q->buf = buf, q->cap = cap;
                }
                uint64_t now = clock_now_ns();
                if (now >= deadline_ns)
                        return error_set(-ETIMEDOUT, "qemu: %s: no answer from QMP within the timeout", what);
                uint64_t wait_ms = DIV_ROUND_UP(deadline_ns - now, NSEC_PER_MSEC);
                struct pollfd pfd = {.fd = q->fd, .events = POLLIN};
                int n = poll(&pfd, 1, (int)MIN(wait_ms, (uint64_t)INT32_MAX));
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "qemu: %s: poll on %s", what, q->path);
                if (n == 0)
                        continue; /* the deadline check above reports it */
                ssize_t got = read(q->fd, q->buf + q->len, q->cap - q->len);
                if (got < 0 && (errno == EINTR || errno == EAGAIN))
                        continue;
                if (got < 0 && errno != ECONNRESET)
                        return error_set_errno(-errno, "qemu: %s: cannot read from %s", what, q->path);
                if (got <= 0)
                        return error_set(-ECONNRESET, "qemu: %s: QMP connection closed (QEMU exited?)", what);
                q->len += (size_t)got;
        }
}

static void qmp_note_event(struct qmp *q, const char *name) {
        log_debug("qmp: event %s", name ? name : "?");
        if (name && q->seen)
                json_object_set_new(q->seen, name, json_integer((json_int_t)clock_now_ns()));
}

uint64_t qmp_event_seen_ns(const struct qmp *q, const char *event) {
        json_t *at = q && q->seen ? json_object_get(q->seen, event) : NULL;
        return at ? (uint64_t)json_integer_value(at) : 0;
}

static int qmp_queue_event(struct qmp *q, json_t *msg) {
        const char *name = json_string_value(json_object_get(msg, "event"));
        qmp_note_event(q, name);
        if (json_array_size(q->events) >= QMP_EVENT_QUEUE_MAX)
                json_array_remove(q->events, 0);
        return json_array_append(q->events, msg) < 0 ? -ENOMEM : 0;
}

int qmp_execute(struct qmp *q, const char *command, json_t *args, json_t **ret_return) {
        char id[32];
        snprintf(id, sizeof(id), "drafter-%" PRIu64, q->next_id++);
        json_auto_t *msg = json_pack("{s:s, s:s}", "execute", command, "id", id);
        if (!msg || (args && json_object_set(msg, "arguments", args) < 0))
                return -ENOMEM;
        int r = qmp_send(q, msg, command);
        if (r < 0)
                return r;

        uint64_t deadline = clock_now_ns() + q->timeout_ns;
        for (;;) {
                json_auto_t *answer = NULL;
                r = qmp_read_message(q, deadline, command, &answer);
                if (r < 0)
                        return r;
                if (json_object_get(answer, "event")) {
                        if ((r = qmp_queue_event(q, answer)) < 0)
                                return r;
                        continue;
                }
                const char *answer_id = json_string_value(json_object_get(answer, "id"));
                if (answer_id && strcmp(answer_id, id) != 0) {
                        log_debug("qmp: %s: ignoring an answer to %s", command, answer_id);
                        continue;
                }
                json_t *error = json_object_get(answer, "error");
                if (error) {
                        const char *class = json_string_value(json_object_get(error, "class"));
                        const char *desc = json_string_value(json_object_get(error, "desc"));
                        return error_set(-EIO, "qemu: %s: %s: %s", command, class ? class : "Error",
                                         desc ? desc : "(no description)");
                }
                json_t *value = json_object_get(answer, "return");
                if (!value)
                        return error_set(-EPROTO, "qemu: %s: QMP answer with neither return nor error",
                                         command);
                if (ret_return)
                        *ret_return = json_incref(value);
                return 0;
        }
}

/* Remove and return the oldest queued event named one of `events`, or NULL. */
static json_t *qmp_take_event(struct qmp *q, const char *const *events, size_t n, size_t *ret_index) {
        size_t i;
        json_t *msg;
        json_array_foreach(q->events, i, msg) {
                const char *name = json_string_value(json_object_get(msg, "event"));
                for (size_t k = 0; name && k < n; k++)
                        if (strcmp(name, events[k]) == 0) {
                                json_incref(msg);
                                json_array_remove(q->events, i);
                                *ret_index = k;
                                return msg;
                        }
        }
        return NULL;
}

static int qmp_event_data(json_t *msg, json_t **ret_data) {
        if (!ret_data)
                return 0;
        json_t *data = json_object_get(msg, "data");
        *ret_data = data ? json_incref(data) : json_object();
        return *ret_data ? 0 : -ENOMEM;
}

int qmp_wait_events(struct qmp *q, const char *const *events, size_t n, uint64_t timeout_ns, size_t *ret_index,
                    json_t **ret_data) {
        size_t index = 0;
        json_auto_t *queued = qmp_take_event(q, events, n, &index);
        if (queued) {
                if (ret_index)
                        *ret_index = index;
                return qmp_event_data(queued, ret_data);
        }

        char what[96];
        snprintf(what, sizeof(what), "waiting for event %s%s", events[0], n > 1 ? " (or another)" : "");
        uint64_t deadline = clock_now_ns() + timeout_ns;
        for (;;) {
                json_auto_t *msg = NULL;
                int r = qmp_read_message(q, deadline, what, &msg);
                if (r < 0)
                        return r;
                const char *name = json_string_value(json_object_get(msg, "event"));
                if (!name) {
                        log_debug("qmp: %s: ignoring a message that is not an event", what);
                        continue;
                }
                for (size_t k = 0; k < n; k++)
                        if (strcmp(name, events[k]) == 0) {
                                qmp_note_event(q, name);
                                if (ret_index)
                                        *ret_index = k;
                                return qmp_event_data(msg, ret_data);
                        }
                if ((r = qmp_queue_event(q, msg)) < 0)
                        return r;
        }
}

int qmp_wait_event(struct qmp *q, const char *event, uint64_t timeout_ns, json_t **ret_data) {
        return qmp_wait_events(q, &event, 1, timeout_ns, NULL, ret_data);
}

static int qmp_connect_socket(const char *path, uint64_t deadline_ns, int (*check)(void *), void *userdata,
                              int *ret_fd) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        if (strlen(path) >= sizeof(addr.sun_path))
                return error_set(-ENAMETOOLONG, "qmp: socket path %s is longer than %zu bytes", path,
                                 sizeof(addr.sun_path) - 1);
        memcpy(addr.sun_path, path, strlen(path) + 1);

        for (;;) {
                _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd < 0)
                        return error_set_errno(-errno, "qmp: socket");
                if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
                        *ret_fd = TAKE_FD(fd);
                        return 0;
                }
                if (errno != ENOENT && errno != ECONNREFUSED && errno != EINTR)
                        return error_set_errno(-errno, "qmp: cannot connect to %s", path);
                if (check) {
                        int r = check(userdata);
                        if (r < 0)
                                return r;
                }
                if (clock_now_ns() >= deadline_ns)
                        return error_set(-ETIMEDOUT, "qmp: QEMU did not open its QMP socket %s in time",
                                         path);
                clock_sleep_ns(QMP_CONNECT_RETRY_NS);
        }
}

int qmp_open_fd(int fd, const char *name, uint64_t deadline_ns, struct qmp **ret_qmp) {
        _cleanup_(qmp_freep) struct qmp *q = calloc(1, sizeof(*q));
        if (!q) {
                close(fd);
                return -ENOMEM;
        }
        q->fd = fd;
        q->timeout_ns = QMP_DEFAULT_TIMEOUT_NS;
        q->path = strdup(name);
        q->events = json_array();
        q->seen = json_object();
        if (!q->path || !q->events || !q->seen)
                return -ENOMEM;

        /* The greeting: {"QMP": {"version": …, "capabilities": […]}}. */
        uint64_t now = clock_now_ns();
        uint64_t greeting_deadline = MAX(deadline_ns, now + NSEC_PER_SEC);
        json_auto_t *greeting = NULL;
        int r = qmp_read_message(q, greeting_deadline, "greeting", &greeting);
        if (r < 0)
                return r;
        json_t *version =
                json_object_get(json_object_get(json_object_get(greeting, "QMP"), "version"), "qemu");
        if (!json_object_get(greeting, "QMP"))
                return error_set(-EPROTO, "qemu: %s does not greet like QMP", name);
        log_debug("qmp: connected to QEMU %" JSON_INTEGER_FORMAT ".%" JSON_INTEGER_FORMAT
                  ".%" JSON_INTEGER_FORMAT,
                  json_integer_value(json_object_get(version, "major")),
                  json_integer_value(json_object_get(version, "minor")),
                  json_integer_value(json_object_get(version, "micro")));

        if ((r = qmp_execute(q, "qmp_capabilities", NULL, NULL)) < 0)
                return r;
        *ret_qmp = TAKE_PTR(q);
        return 0;
}

int qmp_connect(const char *socket_path, uint64_t deadline_ns, int (*check)(void *userdata), void *userdata,
                struct qmp **ret_qmp) {
        int fd = -EBADF;
        int r = qmp_connect_socket(socket_path, deadline_ns, check, userdata, &fd);
        if (r < 0)
                return r;
        return qmp_open_fd(fd, socket_path, deadline_ns, ret_qmp);
}
