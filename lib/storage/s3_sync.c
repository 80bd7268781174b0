/* s3_sync.c — continuous upload of a device to S3, and download of its objects (see s3_sync.h). */
#include "drafter/s3_sync.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/log.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define COLLECT_PERIOD_NS (100 * NSEC_PER_MSEC)
#define MAX_BACKOFF_NS (5 * NSEC_PER_SEC)
#define GIVE_UP_AFTER 3

uint32_t s3_object_size(uint32_t block_size) {
        return block_size > S3_OBJECT_SIZE_DEFAULT ? block_size : S3_OBJECT_SIZE_DEFAULT;
}

uint64_t s3_object_count(uint64_t size, uint32_t object_size) {
        return (size + object_size - 1) / object_size;
}

void s3_object_key(char *out, size_t size, const char *prefix, const char *device, uint64_t object) {
        snprintf(out, size, "%s/%s/%016" PRIx64, prefix, device, object);
}

int s3_new_prefix(char out[S3_PREFIX_MAX + 1]) {
        uint64_t id;
        if (getrandom(&id, sizeof(id), 0) != sizeof(id))
                return error_set_errno(-errno, "s3: no random bytes for a key prefix");
        snprintf(out, S3_PREFIX_MAX + 1, "drafter/%016" PRIx64, id);
        return 0;
}

bool s3_valid_prefix(const char *p) {
        size_t n = strlen(p);
        if (n == 0 || n > S3_PREFIX_MAX || p[0] == '/' || p[n - 1] == '/' || strstr(p, "..") || strstr(p, "//"))
                return false;
        for (size_t i = 0; i < n; i++)
                if (!((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= 'A' && p[i] <= 'Z') || (p[i] >= '0' && p[i] <= '9') ||
                      p[i] == '.' || p[i] == '_' || p[i] == '-' || p[i] == '/'))
                        return false;
        return true;
}

static size_t object_length(uint64_t size, uint32_t object_size, uint64_t object) {
        uint64_t off = object * object_size;
        return size - off < object_size ? (size_t)(size - off) : object_size;
}

static unsigned worker_count(unsigned concurrency) {
        return concurrency == 0 ? 8 : concurrency > S3_MAX_CONCURRENCY ? S3_MAX_CONCURRENCY : concurrency;
}

/* ---- upload ---- */

struct s3_sync {
        struct s3_sync_options o;
        char prefix[S3_PREFIX_MAX + 1], device[65];
        uint64_t size, count;
        uint32_t block_size;
        pthread_mutex_t lock;
        pthread_cond_t changed;
        struct bitmap need, current, busy;
        uint32_t *gen;          /* bumped by every change seen */
        uint64_t *last_write;   /* when a change was last seen */
        uint64_t *first_change; /* when the object became stale (0: it is not) */
        uint64_t cursor, last_collect, retry_at, backoff, tokens_at;
        double tokens;
        unsigned inflight;
        bool paused, stop, failing;
        pthread_t *threads;
        unsigned nthreads;
        struct s3_sync_stats stats;
        uint64_t started;
};

/* Under the lock: take the tracker's changes. */
static int collect_changes(struct s3_sync *s, uint64_t now) {
        uint64_t *blocks;
        size_t n;
        int r = dirty_tracker_collect(s->o.tracker, &blocks, &n);
        if (r < 0)
                return r;
        uint64_t per = s->o.object_size / s->block_size;
        for (size_t i = 0; i < n; i++) {
                uint64_t obj = blocks[i] / per;
                if (obj >= s->count)
                        continue;
                s->gen[obj]++;
                s->last_write[obj] = now;
                if (!s->first_change[obj])
                        s->first_change[obj] = now;
                bitmap_clear(&s->current, obj);
                bitmap_set(&s->need, obj);
        }
        free(blocks);
        s->last_collect = now;
        return 0;
}

/* Under the lock: the next object due for upload, or UINT64_MAX. Objects still being written
 * wait until they have been quiet for min_age, or stale for max_age. */
static uint64_t pick(struct s3_sync *s, uint64_t now) {
        for (int pass = 0; pass < 2; pass++) {
                uint64_t from = pass == 0 ? s->cursor : 0, to = pass == 0 ? s->count : s->cursor;
                for (uint64_t o = bitmap_next_set(&s->need, from); o < to; o = bitmap_next_set(&s->need, o + 1))
                        if (!bitmap_test(&s->busy, o) && (now - s->last_write[o] >= s->o.min_age_ns ||
                                                          now - s->first_change[o] >= s->o.max_age_ns)) {
                                s->cursor = o + 1 < s->count ? o + 1 : 0;
                                return o;
                        }
        }
        return UINT64_MAX;
}

static bool rate_allows(struct s3_sync *s, uint64_t now, size_t len) {
        if (!s->o.max_rate)
                return true;
        double burst = (double)s->o.object_size * s->nthreads;
        s->tokens += (now - s->tokens_at) / 1e9 * (double)s->o.max_rate;
        s->tokens = s->tokens > burst ? burst : s->tokens;
        s->tokens_at = now;
        if (s->tokens < (double)len)
                return false;
        s->tokens -= (double)len;
        return true;
}

static void note_first_pass(struct s3_sync *s) {
        if (s->stats.first_pass_done || bitmap_next_set(&s->need, 0) < s->count || s->inflight)
                return;
        s->stats.first_pass_done = true;
        log_info("S3: device \"%s\" is in bucket \"%s\" (%" PRIu64 " objects, %" PRIu64 " uploaded, %.1f MB, %" PRIu64
                 " zero) after %.1f s",
                 s->device, s3_client_config(s->o.client)->bucket, s->count, s->stats.uploads,
                 s->stats.upload_bytes / 1e6, s->stats.zero_objects, (clock_now_ns() - s->started) / 1e9);
}

static void *upload_thread(void *arg) {
        struct s3_sync *s = arg;
        struct s3_conn *k = NULL;
        uint8_t *buf = malloc(s->o.object_size);
        if (!buf || s3_conn_new(s->o.client, &k) < 0) {
                log_error("S3: device \"%s\": cannot start an upload thread: %s", s->device,
                          buf ? error_message() : "out of memory");
                free(buf);
                return NULL;
        }
        pthread_mutex_lock(&s->lock);
        while (!s->stop) {
                uint64_t now = clock_now_ns();
                if (!s->paused && now - s->last_collect >= COLLECT_PERIOD_NS && collect_changes(s, now) < 0)
                        log_error("S3: device \"%s\": %s", s->device, error_message());
                uint64_t obj = s->paused || now < s->retry_at ? UINT64_MAX : pick(s, now);
                size_t len = obj == UINT64_MAX ? 0 : object_length(s->size, s->o.object_size, obj);
                if (obj != UINT64_MAX && !rate_allows(s, now, len))
                        obj = UINT64_MAX;
                if (obj == UINT64_MAX) {
                        struct timespec ts;
                        uint64_t wait = now < s->retry_at ? s->retry_at - now : COLLECT_PERIOD_NS;
                        clock_deadline_after(wait < COLLECT_PERIOD_NS ? wait : COLLECT_PERIOD_NS, &ts);
                        pthread_cond_timedwait(&s->changed, &s->lock, &ts);
                        continue;
                }
                uint32_t gen = s->gen[obj];
                bitmap_clear(&s->need, obj);
                bitmap_set(&s->busy, obj);
                s->inflight++;
                pthread_mutex_unlock(&s->lock);

                /* Read after taking it off the list: a write from now on marks it again. */
                int r = block_device_read_at(s->o.tracker, buf, len, obj * s->o.object_size);
                bool zero = r >= 0 && buffer_is_zero(buf, len);
                char key[S3_PREFIX_MAX + 96];
                s3_object_key(key, sizeof(key), s->prefix, s->device, obj);
                if (r >= 0 && !zero)
                        r = s3_put(k, key, buf, len);

                pthread_mutex_lock(&s->lock);
                bitmap_clear(&s->busy, obj);
                s->inflight--;
                if (r < 0) {
                        bitmap_set(&s->need, obj);
                        s->stats.failures++;
                        s->backoff = s->backoff ? (s->backoff * 2 > MAX_BACKOFF_NS ? MAX_BACKOFF_NS : s->backoff * 2)
                                                : 250 * NSEC_PER_MSEC;
                        s->retry_at = clock_now_ns() + s->backoff;
                        if (!s->failing)
                                log_error("S3: device \"%s\": upload failed, the VM runs on and uploads resume when S3 "
                                          "answers again: %s", s->device, error_message());
                        s->failing = true;
                } else {
                        if (s->failing)
                                log_info("S3: device \"%s\": uploads resumed", s->device);
                        s->failing = false;
                        s->backoff = 0;
                        if (zero) {
                                s->stats.zero_objects++;
                        } else {
                                s->stats.uploads++;
                                s->stats.upload_bytes += len;
                        }
                        if (s->gen[obj] == gen) {
                                s->first_change[obj] = 0;
                                /* A zero object is not in S3; the peer link sends zeros for almost nothing. */
                                if (!zero)
                                        bitmap_set(&s->current, obj);
                        }
                        note_first_pass(s);
                }
                pthread_cond_broadcast(&s->changed);
        }
        pthread_mutex_unlock(&s->lock);
        s3_conn_free(k);
        free(buf);
        return NULL;
}

void s3_sync_free(struct s3_sync *s) {
        if (!s)
                return;
        pthread_mutex_lock(&s->lock);
        s->stop = true;
        pthread_cond_broadcast(&s->changed);
        pthread_mutex_unlock(&s->lock);
        for (unsigned i = 0; i < s->nthreads; i++)
                pthread_join(s->threads[i], NULL);
        free(s->threads);
        bitmap_free(&s->need);
        bitmap_free(&s->current);
        bitmap_free(&s->busy);
        free(s->gen);
        free(s->last_write);
        free(s->first_change);
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->changed);
        free(s);
}

int s3_sync_start(const struct s3_sync_options *o, struct s3_sync **ret) {
        struct block_device *dev = o->tracker;
        if (!dirty_tracker_inner(dev))
                return error_set(-EINVAL, "S3: device \"%s\": the sync needs a dirty tracker", o->device);
        if (o->object_size == 0 || o->object_size % dev->block_size)
                return error_set(-EINVAL, "S3: device \"%s\": object size %u is not a multiple of the block size %u",
                                 o->device, o->object_size, dev->block_size);
        struct s3_sync *s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->o = *o;
        s->o.min_age_ns = o->min_age_ns ? o->min_age_ns : NSEC_PER_SEC;
        s->o.max_age_ns = o->max_age_ns ? o->max_age_ns : 30 * NSEC_PER_SEC;
        snprintf(s->prefix, sizeof(s->prefix), "%s", o->prefix);
        snprintf(s->device, sizeof(s->device), "%s", o->device);
        s->o.prefix = s->prefix;
        s->o.device = s->device;
        s->size = dev->size;
        s->block_size = dev->block_size;
        s->count = s3_object_count(s->size, o->object_size);
        pthread_mutex_init(&s->lock, NULL);
        pthread_cond_init(&s->changed, NULL);
        s->gen = calloc(s->count ? s->count : 1, sizeof(*s->gen));
        s->last_write = calloc(s->count ? s->count : 1, sizeof(*s->last_write));
        s->first_change = calloc(s->count ? s->count : 1, sizeof(*s->first_change));
        s->nthreads = worker_count(o->concurrency);
        s->threads = calloc(s->nthreads, sizeof(*s->threads));
        if (!s->gen || !s->last_write || !s->first_change || !s->threads || bitmap_init(&s->need, s->count) < 0 ||
            bitmap_init(&s->current, s->count) < 0 || bitmap_init(&s->busy, s->count) < 0) {
                s3_sync_free(s);
                return -ENOMEM;
        }
        uint64_t now = clock_now_ns();
        s->started = s->last_collect = s->tokens_at = now;
        /* Everything not known current is due at once (it was never uploaded). */
        for (uint64_t i = 0; i < s->count; i++) {
                if (o->current && i < o->current->nbits && bitmap_test(o->current, i)) {
                        bitmap_set(&s->current, i);
                } else {
                        bitmap_set(&s->need, i);
                        s->first_change[i] = 1; /* long stale: due at once */
                }
        }
        /* Writes before now: an object S3 held is stale now; the others are due anyway (their
         * upload reads what the writes left). */
        uint64_t *blocks;
        size_t n;
        int r = dirty_tracker_collect(dev, &blocks, &n);
        if (r < 0) {
                s3_sync_free(s);
                return r;
        }
        for (size_t i = 0; i < n; i++) {
                uint64_t obj = blocks[i] / (o->object_size / dev->block_size);
                if (obj < s->count && bitmap_test(&s->current, obj)) {
                        bitmap_clear(&s->current, obj);
                        bitmap_set(&s->need, obj);
                        s->first_change[obj] = s->last_write[obj] = now;
                }
        }
        free(blocks);
        unsigned started = 0;
        for (; started < s->nthreads; started++)
                if (pthread_create(&s->threads[started], NULL, upload_thread, s) != 0)
                        break;
        s->nthreads = started;
        if (started == 0) {
                s3_sync_free(s);
                return error_set(-EAGAIN, "S3: device \"%s\": cannot start upload threads", o->device);
        }
        s->stats.objects = s->count;
        *ret = s;
        return 0;
}

void s3_sync_pause(struct s3_sync *s) {
        pthread_mutex_lock(&s->lock);
        s->paused = true;
        while (s->inflight)
                pthread_cond_wait(&s->changed, &s->lock);
        pthread_mutex_unlock(&s->lock);
}

void s3_sync_resume(struct s3_sync *s) {
        pthread_mutex_lock(&s->lock);
        s->paused = false;
        pthread_cond_broadcast(&s->changed);
        pthread_mutex_unlock(&s->lock);
}

int s3_sync_snapshot(struct s3_sync *s, struct bitmap *current) {
        pthread_mutex_lock(&s->lock);
        int r = current->nbits == s->count ? collect_changes(s, clock_now_ns())
                                           : error_set(-EINVAL, "S3: snapshot bitmap of the wrong size");
        if (r >= 0)
                memcpy(current->words, s->current.words, BITMAP_WORDS(s->count) * sizeof(uint64_t));
        pthread_mutex_unlock(&s->lock);
        return r;
}

void s3_sync_get_stats(struct s3_sync *s, struct s3_sync_stats *ret) {
        pthread_mutex_lock(&s->lock);
        *ret = s->stats;
        ret->current = bitmap_count(&s->current);
        pthread_mutex_unlock(&s->lock);
}

/* ---- download ---- */

struct s3_fetch {
        struct s3_fetch_options o;
        char prefix[S3_PREFIX_MAX + 1], device[65];
        uint64_t count, cursor, left;
        struct bitmap todo; /* not yet taken by a thread */
        uint64_t *urgent;
        size_t urgent_head, urgent_count, urgent_cap;
        unsigned failures_in_row;
        bool stop;
        pthread_mutex_t lock;
        pthread_cond_t changed;
        pthread_t *threads;
        unsigned nthreads;
        struct s3_fetch_stats stats;
};

/* Under the lock. */
static uint64_t take_next(struct s3_fetch *f) {
        while (f->urgent_count) {
                uint64_t o = f->urgent[f->urgent_head];
                f->urgent_head = (f->urgent_head + 1) % f->urgent_cap;
                f->urgent_count--;
                if (bitmap_test_and_clear(&f->todo, o))
                        return o;
        }
        uint64_t o = bitmap_next_set(&f->todo, f->cursor);
        if (o >= f->count)
                o = bitmap_next_set(&f->todo, 0);
        if (o >= f->count)
                return UINT64_MAX;
        bitmap_clear(&f->todo, o);
        f->cursor = o + 1;
        return o;
}

static void give_back(struct s3_fetch *f, uint64_t o) {
        f->o.failed(f->o.ctx, o);
        pthread_mutex_lock(&f->lock);
        f->stats.failed++;
        f->left--;
        pthread_cond_broadcast(&f->changed);
        pthread_mutex_unlock(&f->lock);
}

static void *fetch_thread(void *arg) {
        struct s3_fetch *f = arg;
        struct s3_conn *k = NULL;
        uint8_t *buf = malloc(f->o.object_size);
        if (!buf || s3_conn_new(f->o.client, &k) < 0) {
                free(buf);
                buf = NULL; /* everything this thread takes is given back */
        }
        for (;;) {
                pthread_mutex_lock(&f->lock);
                uint64_t o = f->stop ? UINT64_MAX : take_next(f);
                bool gave_up = f->stats.gave_up;
                pthread_mutex_unlock(&f->lock);
                if (o == UINT64_MAX)
                        break;
                if (gave_up || !buf) {
                        give_back(f, o);
                        continue;
                }
                size_t want = object_length(f->o.size, f->o.object_size, o), got = 0;
                char key[S3_PREFIX_MAX + 96];
                s3_object_key(key, sizeof(key), f->prefix, f->device, o);
                int r = s3_get(k, key, buf, f->o.object_size, &got);
                if (r >= 0 && got != want)
                        r = error_set(-EBADMSG, "S3: object %s has %zu bytes, the device's layout says %zu", key, got,
                                      want);
                if (r < 0) {
                        pthread_mutex_lock(&f->lock);
                        bool first = !f->stats.gave_up;
                        if (++f->failures_in_row >= GIVE_UP_AFTER)
                                f->stats.gave_up = true;
                        bool now_gave_up = first && f->stats.gave_up;
                        pthread_mutex_unlock(&f->lock);
                        if (now_gave_up)
                                log_error("S3: device \"%s\": giving up on S3, the rest comes over the peer link: %s",
                                          f->device, error_message());
                        else
                                log_info("S3: device \"%s\": %s; this object comes over the peer link", f->device,
                                         error_message());
                        give_back(f, o);
                        continue;
                }
                f->o.deliver(f->o.ctx, o, buf, got);
                pthread_mutex_lock(&f->lock);
                f->failures_in_row = 0;
                f->stats.fetched++;
                f->stats.bytes += got;
                f->left--;
                pthread_cond_broadcast(&f->changed);
                pthread_mutex_unlock(&f->lock);
        }
        s3_conn_free(k);
        free(buf);
        return NULL;
}

int s3_fetch_start(const struct s3_fetch_options *o, struct s3_fetch **ret) {
        struct s3_fetch *f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        f->o = *o;
        snprintf(f->prefix, sizeof(f->prefix), "%s", o->prefix);
        snprintf(f->device, sizeof(f->device), "%s", o->device);
        f->count = s3_object_count(o->size, o->object_size);
        pthread_mutex_init(&f->lock, NULL);
        pthread_cond_init(&f->changed, NULL);
        f->nthreads = worker_count(o->concurrency);
        f->threads = calloc(f->nthreads, sizeof(*f->threads));
        f->urgent_cap = f->count ? f->count : 1;
        f->urgent = calloc(f->urgent_cap, sizeof(*f->urgent));
        if (!f->threads || !f->urgent || bitmap_init(&f->todo, f->count) < 0) {
                f->nthreads = 0;
                s3_fetch_free(f);
                return -ENOMEM;
        }
        for (uint64_t i = bitmap_next_set(o->objects, 0); i < f->count && i < o->objects->nbits;
             i = bitmap_next_set(o->objects, i + 1))
                bitmap_set(&f->todo, i);
        f->left = bitmap_count(&f->todo);
        unsigned started = 0;
        for (; started < f->nthreads; started++)
                if (pthread_create(&f->threads[started], NULL, fetch_thread, f) != 0)
                        break;
        f->nthreads = started;
        if (started == 0) {
                s3_fetch_free(f);
                return error_set(-EAGAIN, "S3: device \"%s\": cannot start download threads", o->device);
        }
        *ret = f;
        return 0;
}

void s3_fetch_prioritize(struct s3_fetch *f, uint64_t object) {
        pthread_mutex_lock(&f->lock);
        if (object < f->count && bitmap_test(&f->todo, object) && f->urgent_count < f->urgent_cap) {
                f->urgent[(f->urgent_head + f->urgent_count) % f->urgent_cap] = object;
                f->urgent_count++;
        }
        pthread_mutex_unlock(&f->lock);
}

bool s3_fetch_done(struct s3_fetch *f) {
        pthread_mutex_lock(&f->lock);
        bool done = f->left == 0;
        pthread_mutex_unlock(&f->lock);
        return done;
}

void s3_fetch_get_stats(struct s3_fetch *f, struct s3_fetch_stats *ret) {
        pthread_mutex_lock(&f->lock);
        *ret = f->stats;
        pthread_mutex_unlock(&f->lock);
}

void s3_fetch_stop(struct s3_fetch *f) {
        if (!f)
                return;
        pthread_mutex_lock(&f->lock);
        f->stop = true;
        pthread_cond_broadcast(&f->changed);
        unsigned n = f->nthreads;
        f->nthreads = 0;
        pthread_mutex_unlock(&f->lock);
        for (unsigned i = 0; i < n; i++)
                pthread_join(f->threads[i], NULL);
}

void s3_fetch_free(struct s3_fetch *f) {
        if (!f)
                return;
        s3_fetch_stop(f);
        free(f->threads);
        free(f->urgent);
        bitmap_free(&f->todo);
        pthread_mutex_destroy(&f->lock);
        pthread_cond_destroy(&f->changed);
        free(f);
}
