/* gate_device.c — hold writes back while a migration suspends (see gate_device.h). */
#include "drafter/gate_device.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

struct gate_device {
        struct block_device dev;
        struct block_device *inner;
        pthread_mutex_t lock;
        pthread_cond_t changed;
        bool frozen;
        int shut;         /* 0 or a negative errno */
        unsigned writers; /* writes in progress */
};

static struct gate_device *to_gate(struct block_device *dev) {
        return (struct gate_device *)dev;
}

static int enter(struct gate_device *g) {
        pthread_mutex_lock(&g->lock);
        while (g->frozen && !g->shut)
                pthread_cond_wait(&g->changed, &g->lock);
        int r = g->shut;
        if (!r)
                g->writers++;
        pthread_mutex_unlock(&g->lock);
        return r ? error_set(r, "%s: the device is no longer writable here", g->dev.name) : 0;
}

static void leave(struct gate_device *g) {
        pthread_mutex_lock(&g->lock);
        if (--g->writers == 0)
                pthread_cond_broadcast(&g->changed);
        pthread_mutex_unlock(&g->lock);
}

static int gate_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        return block_device_read_at(to_gate(dev)->inner, buf, len, off);
}

static int gate_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        struct gate_device *g = to_gate(dev);
        int r = enter(g);
        if (r < 0)
                return r;
        r = block_device_write_at(g->inner, buf, len, off);
        leave(g);
        return r;
}

static int gate_discard(struct block_device *dev, size_t len, uint64_t off) {
        struct gate_device *g = to_gate(dev);
        int r = enter(g);
        if (r < 0)
                return r;
        r = block_device_discard(g->inner, len, off);
        leave(g);
        return r;
}

static int gate_flush(struct block_device *dev) {
        return block_device_flush(to_gate(dev)->inner);
}

static void gate_close(struct block_device *dev) {
        struct gate_device *g = to_gate(dev);
        block_device_close(g->inner);
        pthread_mutex_destroy(&g->lock);
        pthread_cond_destroy(&g->changed);
        free(g);
}

static const struct block_device_ops gate_ops = {
        .read_at = gate_read_at,
        .write_at = gate_write_at,
        .flush = gate_flush,
        .discard = gate_discard,
        .close = gate_close,
};

int gate_device_wrap(struct block_device *inner, struct block_device **ret_dev) {
        _cleanup_free_ struct gate_device *g = calloc(1, sizeof(*g));
        if (!g)
                return -ENOMEM;
        int r = block_device_init(&g->dev, &gate_ops, inner->name, inner->size, inner->block_size);
        if (r < 0)
                return r;
        pthread_mutex_init(&g->lock, NULL);
        pthread_cond_init(&g->changed, NULL);
        g->inner = inner;
        *ret_dev = &TAKE_PTR(g)->dev;
        return 0;
}

void gate_device_freeze(struct block_device *dev) {
        struct gate_device *g = to_gate(dev);
        pthread_mutex_lock(&g->lock);
        g->frozen = true;
        while (g->writers > 0)
                pthread_cond_wait(&g->changed, &g->lock);
        pthread_mutex_unlock(&g->lock);
}

void gate_device_thaw(struct block_device *dev) {
        struct gate_device *g = to_gate(dev);
        pthread_mutex_lock(&g->lock);
        g->frozen = false;
        pthread_cond_broadcast(&g->changed);
        pthread_mutex_unlock(&g->lock);
}

void gate_device_shut(struct block_device *dev, int err) {
        struct gate_device *g = to_gate(dev);
        pthread_mutex_lock(&g->lock);
        g->shut = err < 0 ? err : -EROFS;
        pthread_cond_broadcast(&g->changed);
        pthread_mutex_unlock(&g->lock);
}
