/* drafter-agent — runs in the guest: answers the host's BeforeSuspend / AfterResume calls by
 * running the configured commands (one JSON line per call, guestlink.h). A call repeated by the
 * host after a timeout is answered from memory, so each command runs exactly once per call. */
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/guestlink.h"
#include "drafter/log.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *shell = "sh";

/* Run cmd with the shell; "" on success, else why (static buffer). */
static const char *run(const char *cmd) {
        static char why[256];
        if (!cmd || !*cmd)
                return "";
        pid_t pid = fork();
        if (pid < 0) {
                snprintf(why, sizeof(why), "cannot start %s: %s", shell, strerror(errno));
                return why;
        }
        if (pid == 0) {
                signal(SIGPIPE, SIG_DFL);
                execlp(shell, shell, "-c", cmd, (char *)NULL);
                _exit(127);
        }
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
                return "";
        if (WIFEXITED(status))
                snprintf(why, sizeof(why), "command exited with status %d", WEXITSTATUS(status));
        else
                snprintf(why, sizeof(why), "command killed by signal %d", WTERMSIG(status));
        return why;
}

static int write_all(int fd, const char *s) {
        size_t len = strlen(s), done = 0;
        while (done < len) {
                ssize_t n = write(fd, s + done, len - done);
                if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
                        clock_sleep_ns(5 * NSEC_PER_MSEC);
                        continue;
                }
                if (n <= 0)
                        return -errno;
                done += (size_t)n;
        }
        return 0;
}

int main(int argc, char **argv) {
        const char *before = "", *after = "";
        uint64_t port = 26;
        int64_t timeout_ns = 60 * NSEC_PER_SEC;
        struct flag flags[] = {
                {"after-resume-cmd", FLAG_STRING, &after,
                 "Command to run after the VM has been resumed (leave empty to disable)"},
                {"before-suspend-cmd", FLAG_STRING, &before,
                 "Command to run before the VM is suspended (leave empty to disable)"},
                {"shell-cmd", FLAG_STRING, &shell,
                 "Shell to use to run the before suspend and after resume commands"},
                {"vsock-port", FLAG_UINT, &port, "VSocket port"},
                {"vsock-timeout", FLAG_DURATION, &timeout_ns, "VSocket dial timeout"},
        };
        int r = flags_parse("drafter-agent", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, stderr, NULL);
        if (r == FLAGS_HELP)
                return 0;
        if (r < 0)
                return 2;
        log_setup_from_env();
        signal(SIGPIPE, SIG_IGN);
        if (port > UINT32_MAX || timeout_ns <= 0) {
                log_error("--vsock-port must be 0-%u and --vsock-timeout positive", UINT32_MAX);
                return 2;
        }
        int fd;
        if (guestlink_guest_open(GUESTLINK_AGENT_PORT_NAME, (uint32_t)port, (uint64_t)timeout_ns, &fd) < 0) {
                log_error("%s", error_message());
                return 1;
        }
        _cleanup_free_ char *buf = malloc(GUESTLINK_MAX_LINE);
        if (!buf)
                return 1;
        size_t have = 0;
        uint64_t last_call = UINT64_MAX;
        char *last_response = NULL;
        for (;;) {
                struct pollfd p = {.fd = fd, .events = POLLIN};
                if (poll(&p, 1, -1) < 0 && errno != EINTR)
                        return 1;
                if (!(p.revents & POLLIN)) {
                        /* The host end is not connected (between VMM processes): wait for it. */
                        clock_sleep_ns(2 * NSEC_PER_MSEC);
                        continue;
                }
                ssize_t n = read(fd, buf + have, GUESTLINK_MAX_LINE - have);
                if (n <= 0) {
                        if (n < 0 && errno != EINTR && errno != EAGAIN)
                                log_debug("agent: read: %s", strerror(errno));
                        clock_sleep_ns(2 * NSEC_PER_MSEC);
                        continue;
                }
                have += (size_t)n;
                char *nl;
                while ((nl = memchr(buf, '\n', have))) {
                        *nl = '\0';
                        uint64_t call;
                        char *function;
                        if (guestlink_parse_request(buf, &call, &function) < 0) {
                                log_warning("agent: %s", error_message());
                        } else {
                                if (call != last_call) {
                                        const char *err = "";
                                        if (strcmp(function, "BeforeSuspend") == 0)
                                                err = run(before);
                                        else if (strcmp(function, "AfterResume") == 0)
                                                err = run(after);
                                        else if (strcmp(function, "Ping") != 0)
                                                err = "unknown function";
                                        free(last_response);
                                        last_response = guestlink_encode_response(call, err);
                                        last_call = call;
                                }
                                if (last_response && write_all(fd, last_response) < 0)
                                        log_debug("agent: answer to call %" PRIu64 " not sent", call);
                                free(function);
                        }
                        size_t used = (size_t)(nl - buf) + 1;
                        memmove(buf, nl + 1, have - used);
                        have -= used;
                }
                if (have == GUESTLINK_MAX_LINE) {
                        log_warning("agent: dropping a line longer than %d bytes", GUESTLINK_MAX_LINE);
                        have = 0;
                }
        }
}
