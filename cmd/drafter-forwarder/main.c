/* drafter-forwarder — forward host addresses to ports of VMs in drafter-nat's namespaces (like
 * docker -p), until SIGINT/SIGTERM, which removes the rules again. See net.h. */
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/log.h"
#include "drafter/signals.h"
#include "drafter/net.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/signalfd.h>
#include <unistd.h>

int main(int argc, char **argv) {
        const char *forwards_json =
                "[{\"netns\":\"ark0\",\"internalPort\":\"6379\",\"protocol\":\"tcp\",\"externalAddr\":\"127.0.0.1:3333\"}]";
        bool verbose = false;
        struct flag flags[] = {
                {"port-forwards", FLAG_STRING, &forwards_json, "Port forwards configuration"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
        };
        int r = flags_parse_command("drafter-forwarder", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, &verbose);
        if (r >= 0)
                return r;
        struct port_forward *fw;
        int count;
        if (port_forwards_parse(forwards_json, &fw, &count) < 0) {
                log_error("%s", error_message());
                return 2;
        }
        int sigfd = signals_stop_fd();
        if (sigfd < 0) {
                log_error("cannot take SIGINT/SIGTERM on a descriptor: %s", strerror(-sigfd));
                return 1;
        }
        struct forwarder *f;
        if (forwarder_start(fw, count, &f) < 0) {
                log_error("%s", error_message());
                free(fw);
                return 1;
        }
        for (int i = 0; i < count; i++)
                log_info("Forwarding %s %s:%u to %s port %u (%s)", fw[i].protocol, fw[i].external_ip, fw[i].external_port,
                         fw[i].netns, fw[i].internal_port, fw[i].target_ip);
        log_info("Ready; Ctrl-C removes the forwards");
        struct signalfd_siginfo si;
        if (read(sigfd, &si, sizeof(si)) < 0)
                log_debug("signalfd: %m");
        log_info("Removing the forwards");
        forwarder_stop(f);
        free(fw);
        close(sigfd);
        return 0;
}
