/* fuzz-nbd — the NBD server (lib/expose/nbd) against an arbitrary client: the input is what the
 * client sends (handshake options, then transmission requests), fed through a socketpair to
 * nbd_server_serve_fd(); a thread drains the replies. Nothing may crash, hang, leak, or touch
 * the export outside its size. The first byte picks the path: 0 full handshake (newstyle
 * options), 1 straight to transmission as the kernel client talks. */
#include "fuzz.h"
#include "drafter/block_device.h"
#include "drafter/log.h"
#include "drafter/nbd_server.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define EXPORT_SIZE (1u << 20)

static struct block_device *dev;
static struct nbd_server *srv;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_level(LOG_NONE);
        static const struct nbd_export exports[] = {{.name = "disk", .description = "fuzz"},
                                                    {.name = "ro", .read_only = true}};
        static struct nbd_export e[2];
        e[0] = exports[0], e[1] = exports[1];
        if (memory_device_open("disk", EXPORT_SIZE, 4096, &dev) < 0)
                abort();
        e[0].dev = e[1].dev = dev;
        struct nbd_server_config cfg = {.exports = e, .export_count = 2, .threads_per_connection = 2,
                                        .max_request = 64 << 10};
        if (nbd_server_new(&cfg, &srv) < 0)
                abort();
        return 0;
}

static void *drain(void *arg) {
        int fd = *(int *)arg;
        char buf[1 << 16];
        while (read(fd, buf, sizeof(buf)) > 0)
                ;
        return NULL;
}

struct input {
        int fd;
        const uint8_t *p;
        size_t n;
};

static void *feed(void *arg) {
        struct input *in = arg;
        int fd = in->fd;
        const uint8_t *p = in->p;
        size_t n = in->n;
        while (n) {
                ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
                if (w <= 0)
                        break;
                p += w, n -= (size_t)w;
        }
        shutdown(fd, SHUT_WR);
        return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size < 1)
                return 0;
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                abort();
        /* Client side: one thread writes the input, one reads the replies. */
        struct input in = {sv[1], data + 1, size - 1};
        pthread_t writer, reader;
        pthread_create(&writer, NULL, feed, &in);
        pthread_create(&reader, NULL, drain, &sv[1]);
        if (data[0] & 1)
                nbd_server_serve_transmission(srv, sv[0], data[0] & 2 ? 1 : 0);
        else
                nbd_server_serve_fd(srv, sv[0]);
        pthread_join(writer, NULL);
        shutdown(sv[1], SHUT_RDWR);
        pthread_join(reader, NULL);
        close(sv[1]);
        return 0;
}
