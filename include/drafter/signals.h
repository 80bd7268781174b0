/* signals.h — how the long-running tools stop: SIGINT and SIGTERM arrive on a descriptor. */
#pragma once

/* Block SIGINT and SIGTERM in the calling thread (and so in every thread it starts later),
 * ignore SIGPIPE (a vanished peer is an EPIPE, not a death), and return a signalfd that becomes
 * readable when one of them arrives; -errno if it cannot be made. Call before starting threads. */
int signals_stop_fd(void);
