/* volatility_monitor.c — recent write frequency per block in O(1) per update (see volatility_monitor.h). */
#include "drafter/volatility_monitor.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define BUCKETS (VOLATILITY_MAX_COUNT + 1)
#define NIL UINT32_MAX

struct vm_node {
        uint32_t prev, next;
        uint64_t epoch; /* epoch at which `count` was exact */
        uint8_t count;
        bool queued;
};

struct volatility_monitor {
        pthread_mutex_t lock;
        uint64_t block_count;
        uint64_t half_life_ns;
        uint64_t epoch;          /* halvings so far */
        uint64_t epoch_start_ns; /* when the current epoch began */
        uint64_t queued;
        struct vm_node *nodes;
        uint32_t head[BUCKETS], tail[BUCKETS];
};

/* The count a node has now: halved once per epoch since it was written. */
static unsigned node_count(const struct volatility_monitor *vm, const struct vm_node *n) {
        uint64_t age = vm->epoch - n->epoch;
        return age >= 8 ? 0 : n->count >> age;
}

static void list_remove(struct volatility_monitor *vm, uint32_t i, unsigned bucket) {
        struct vm_node *n = &vm->nodes[i];
        if (n->prev != NIL)
                vm->nodes[n->prev].next = n->next;
        else
                vm->head[bucket] = n->next;
        if (n->next != NIL)
                vm->nodes[n->next].prev = n->prev;
        else
                vm->tail[bucket] = n->prev;
        n->prev = n->next = NIL;
}

static void list_append(struct volatility_monitor *vm, uint32_t i, unsigned bucket) {
        struct vm_node *n = &vm->nodes[i];
        n->next = NIL;
        n->prev = vm->tail[bucket];
        if (n->prev != NIL)
                vm->nodes[n->prev].next = i;
        else
                vm->head[bucket] = i;
        vm->tail[bucket] = i;
}

/* Append list `src` to list `dst`, leaving src empty. */
static void list_splice(struct volatility_monitor *vm, unsigned dst, unsigned src) {
        if (dst == src || vm->head[src] == NIL)
                return;
        if (vm->head[dst] == NIL) {
                vm->head[dst] = vm->head[src];
        } else {
                vm->nodes[vm->tail[dst]].next = vm->head[src];
                vm->nodes[vm->head[src]].prev = vm->tail[dst];
        }
        vm->tail[dst] = vm->tail[src];
        vm->head[src] = vm->tail[src] = NIL;
}

/* Bring the epoch up to `now`: each elapsed half-life halves every count, which maps bucket b to
 * bucket b >> k; merging the lists in ascending order keeps the older-first order within a bucket
 * roughly intact. */
static void advance(struct volatility_monitor *vm, uint64_t now_ns) {
        if (vm->half_life_ns == 0 || now_ns < vm->epoch_start_ns + vm->half_life_ns)
                return;
        uint64_t k = (now_ns - vm->epoch_start_ns) / vm->half_life_ns;
        vm->epoch += k;
        vm->epoch_start_ns += k * vm->half_life_ns;
        unsigned shift = k >= 8 ? 8 : (unsigned)k;
        for (unsigned b = 1; b < BUCKETS; b++)
                list_splice(vm, b >> shift, b);
}

int volatility_monitor_new(uint64_t block_count, uint64_t half_life_ns, uint64_t now_ns,
                           struct volatility_monitor **ret_vm) {
        if (block_count >= NIL)
                return error_set(-EINVAL, "volatility monitor: %llu blocks is too many",
                                 (unsigned long long)block_count);
        _cleanup_free_ struct volatility_monitor *vm = calloc(1, sizeof(*vm));
        if (!vm)
                return -ENOMEM;
        vm->nodes = calloc(block_count ? block_count : 1, sizeof(*vm->nodes));
        if (!vm->nodes)
                return -ENOMEM;
        pthread_mutex_init(&vm->lock, NULL);
        vm->block_count = block_count;
        vm->half_life_ns = half_life_ns;
        vm->epoch_start_ns = now_ns;
        for (unsigned b = 0; b < BUCKETS; b++)
                vm->head[b] = vm->tail[b] = NIL;
        for (uint64_t i = 0; i < block_count; i++) {
                vm->nodes[i].queued = true;
                list_append(vm, (uint32_t)i, 0);
        }
        vm->queued = block_count;
        *ret_vm = TAKE_PTR(vm);
        return 0;
}

void volatility_monitor_free(struct volatility_monitor *vm) {
        if (!vm)
                return;
        pthread_mutex_destroy(&vm->lock);
        free(vm->nodes);
        free(vm);
}

void volatility_monitor_touch(struct volatility_monitor *vm, uint64_t block, uint64_t now_ns) {
        if (block >= vm->block_count)
                return;
        pthread_mutex_lock(&vm->lock);
        advance(vm, now_ns);
        struct vm_node *n = &vm->nodes[block];
        unsigned old = node_count(vm, n);
        unsigned count = old < VOLATILITY_MAX_COUNT ? old + 1 : VOLATILITY_MAX_COUNT;
        if (n->queued && count != old) {
                list_remove(vm, (uint32_t)block, old);
                list_append(vm, (uint32_t)block, count);
        }
        n->count = (uint8_t)count;
        n->epoch = vm->epoch;
        pthread_mutex_unlock(&vm->lock);
}

unsigned volatility_monitor_count(struct volatility_monitor *vm, uint64_t block, uint64_t now_ns) {
        if (block >= vm->block_count)
                return 0;
        pthread_mutex_lock(&vm->lock);
        advance(vm, now_ns);
        unsigned c = node_count(vm, &vm->nodes[block]);
        pthread_mutex_unlock(&vm->lock);
        return c;
}

int volatility_monitor_pop_least(struct volatility_monitor *vm, uint64_t now_ns, uint64_t *ret_block) {
        int r = -ENOENT;
        pthread_mutex_lock(&vm->lock);
        advance(vm, now_ns);
        for (unsigned b = 0; b < BUCKETS; b++) {
                uint32_t i = vm->head[b];
                if (i == NIL)
                        continue;
                list_remove(vm, i, b);
                vm->nodes[i].queued = false;
                vm->queued--;
                *ret_block = i;
                r = 0;
                break;
        }
        pthread_mutex_unlock(&vm->lock);
        return r;
}

void volatility_monitor_push(struct volatility_monitor *vm, uint64_t block, uint64_t now_ns) {
        if (block >= vm->block_count)
                return;
        pthread_mutex_lock(&vm->lock);
        advance(vm, now_ns);
        struct vm_node *n = &vm->nodes[block];
        if (!n->queued) {
                n->count = (uint8_t)node_count(vm, n);
                n->epoch = vm->epoch;
                n->queued = true;
                list_append(vm, (uint32_t)block, n->count);
                vm->queued++;
        }
        pthread_mutex_unlock(&vm->lock);
}

uint64_t volatility_monitor_queued(struct volatility_monitor *vm) {
        pthread_mutex_lock(&vm->lock);
        uint64_t q = vm->queued;
        pthread_mutex_unlock(&vm->lock);
        return q;
}

int volatility_monitor_sort(struct volatility_monitor *vm, uint64_t *blocks, size_t count, uint64_t now_ns) {
        _cleanup_free_ uint64_t *sorted = malloc((count ? count : 1) * sizeof(*sorted));
        _cleanup_free_ uint8_t *keys = malloc(count ? count : 1);
        if (!sorted || !keys)
                return -ENOMEM;
        size_t start[BUCKETS + 1] = {0};
        pthread_mutex_lock(&vm->lock);
        advance(vm, now_ns);
        for (size_t i = 0; i < count; i++) {
                keys[i] = blocks[i] < vm->block_count ? (uint8_t)node_count(vm, &vm->nodes[blocks[i]]) : 0;
                start[keys[i] + 1]++;
        }
        pthread_mutex_unlock(&vm->lock);
        for (unsigned b = 1; b <= BUCKETS; b++)
                start[b] += start[b - 1];
        for (size_t i = 0; i < count; i++)
                sorted[start[keys[i]]++] = blocks[i];
        memcpy(blocks, sorted, count * sizeof(*blocks));
        return 0;
}

/* ---- the device layer ---- */

struct volatility_device {
        struct block_device dev;
        struct block_device *inner;
        struct volatility_monitor *vm;
};

static struct volatility_device *to_vdev(struct block_device *dev) {
        return (struct volatility_device *)dev;
}

static void touch_range(struct volatility_device *v, size_t len, uint64_t off) {
        uint64_t now = clock_now_ns();
        for (uint64_t b = off / v->dev.block_size; b <= (off + len - 1) / v->dev.block_size; b++)
                volatility_monitor_touch(v->vm, b, now);
}

static int vdev_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        return block_device_read_at(to_vdev(dev)->inner, buf, len, off);
}

static int vdev_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        struct volatility_device *v = to_vdev(dev);
        int r = block_device_write_at(v->inner, buf, len, off);
        touch_range(v, len, off);
        return r;
}

static int vdev_discard(struct block_device *dev, size_t len, uint64_t off) {
        struct volatility_device *v = to_vdev(dev);
        int r = block_device_discard(v->inner, len, off);
        touch_range(v, len, off);
        return r;
}

static int vdev_flush(struct block_device *dev) {
        return block_device_flush(to_vdev(dev)->inner);
}

static void vdev_close(struct block_device *dev) {
        block_device_close(to_vdev(dev)->inner);
        free(dev);
}

static const struct block_device_ops volatility_ops = {
        .read_at = vdev_read_at,
        .write_at = vdev_write_at,
        .flush = vdev_flush,
        .discard = vdev_discard,
        .close = vdev_close,
};

int volatility_device_wrap(struct block_device *inner, struct volatility_monitor *vm, struct block_device **ret_dev) {
        if (block_device_block_count(inner) != vm->block_count)
                return error_set(-EINVAL, "%s: volatility monitor has %llu blocks, device has %llu", inner->name,
                                 (unsigned long long)vm->block_count,
                                 (unsigned long long)block_device_block_count(inner));
        _cleanup_free_ struct volatility_device *v = calloc(1, sizeof(*v));
        if (!v)
                return -ENOMEM;
        int r = block_device_init(&v->dev, &volatility_ops, inner->name, inner->size, inner->block_size);
        if (r < 0)
                return r;
        v->inner = inner;
        v->vm = vm;
        *ret_dev = &TAKE_PTR(v)->dev;
        return 0;
}
