/* s3_device.c — the S3 side of a peer's device: configuration, check, sync (see s3_sync.h). */
#include "drafter/s3_sync.h"
#include "drafter/error.h"
#include "drafter/log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void copy_field(char *dst, const char *src, const char *device, const char *field, int *r) {
        if (*r < 0)
                return;
        if (strlen(src ? src : "") > MIGRATE_S3_STRING_MAX)
                *r = error_set(-EINVAL, "devices: device \"%s\": field \"%s\": longer than %d bytes", device, field,
                               MIGRATE_S3_STRING_MAX);
        else
                snprintf(dst, MIGRATE_S3_STRING_MAX + 1, "%s", src ? src : "");
}

static int make(const char *name, const struct migrate_s3_info *info, struct s3_device **ret) {
        struct s3_device *d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        d->src.info = *info;
        d->src.info.bitmap = NULL;
        snprintf(d->name, sizeof(d->name), "%s", name);
        struct s3_config c = {.endpoint = info->endpoint, .bucket = info->bucket, .access_key = info->access_key,
                              .secret_key = info->secret_key, .secure = info->secure};
        int r = s3_client_new(&c, &d->client);
        if (r < 0) {
                free(d);
                return error_prefix(r, "device \"%s\"", name);
        }
        *ret = d;
        return 0;
}

int s3_device_from_config(const struct device_config *c, uint64_t size, struct s3_device **ret) {
        struct migrate_s3_info info = {.object_size = s3_object_size(c->block_size),
                                       .concurrency = (uint32_t)(c->s3.concurrency > 0 ? c->s3.concurrency : 0),
                                       .secure = c->s3.secure};
        int r = 0;
        copy_field(info.endpoint, c->s3.endpoint, c->name, "s3endpoint", &r);
        copy_field(info.bucket, c->s3.bucket, c->name, "s3bucket", &r);
        copy_field(info.access_key, c->s3.access_key, c->name, "s3accesskey", &r);
        copy_field(info.secret_key, c->s3.secret_key, c->name, "s3secretkey", &r);
        char prefix[S3_PREFIX_MAX + 1];
        if (r < 0 || (r = s3_new_prefix(prefix)) < 0)
                return r;
        snprintf(info.prefix, sizeof(info.prefix), "%s", prefix);
        struct s3_device *d;
        if ((r = make(c->name, &info, &d)) < 0)
                return r;
        char key[S3_PREFIX_MAX + 96], text[256];
        snprintf(key, sizeof(key), "%s/%s/layout", prefix, c->name);
        snprintf(text, sizeof(text), "{\"size\":%" PRIu64 ",\"objectSize\":%u}\n", size, info.object_size);
        if ((r = s3_check_writable(d->client, key, text)) < 0) {
                s3_device_free(d);
                return error_prefix(r, "device \"%s\"", c->name);
        }
        log_info("S3: device \"%s\" syncs to bucket \"%s\" at %s under %s/", c->name, info.bucket, info.endpoint, prefix);
        *ret = d;
        return 0;
}

int s3_device_from_received(const char *name, const struct migrate_s3_info *info, struct s3_device **ret) {
        return make(name, info, ret);
}

int s3_device_start(struct s3_device *d, struct block_device *tracker, const struct bitmap *current) {
        struct s3_sync_options o = {.client = d->client,
                                    .prefix = d->src.info.prefix,
                                    .device = d->name,
                                    .tracker = tracker,
                                    .object_size = d->src.info.object_size,
                                    .concurrency = d->src.info.concurrency,
                                    .current = current};
        int r = s3_sync_start(&o, &d->src.sync);
        return r < 0 ? error_prefix(r, "device \"%s\"", d->name) : 0;
}

void s3_device_free(struct s3_device *d) {
        if (!d)
                return;
        s3_sync_free(d->src.sync);
        s3_client_free(d->client);
        free(d);
}
