/* signals.c — SIGINT/SIGTERM on a descriptor (signals.h). */
#include "drafter/signals.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>

int signals_stop_fd(void) {
        sigset_t stop;
        sigemptyset(&stop);
        sigaddset(&stop, SIGINT);
        sigaddset(&stop, SIGTERM);
        pthread_sigmask(SIG_BLOCK, &stop, NULL);
        signal(SIGPIPE, SIG_IGN);
        int fd = signalfd(-1, &stop, SFD_CLOEXEC);
        return fd < 0 ? -errno : fd;
}
