/* s3.h — a small S3 client: PUT and GET of whole objects over HTTP or HTTPS, path-style URLs,
 * AWS Signature Version 4 (libcurl's CURLOPT_AWS_SIGV4), retries with backoff.
 *
 * A client is shared by threads; each thread doing requests holds its own connection
 * (s3_conn), which keeps its HTTP connection open between requests. Errors name the endpoint,
 * the bucket and the object, and carry the server's error code (AccessDenied, NoSuchBucket, …). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct s3_config {
        const char *endpoint; /* host[:port], as the seeds' s3endpoint ("s3.us-west-2.amazonaws.com") */
        const char *bucket;
        const char *access_key, *secret_key;
        bool secure;          /* https */
        const char *region;   /* NULL: from an s3.<region>.amazonaws.com endpoint, else us-east-1 */
};

struct s3_client;
struct s3_conn;

int s3_client_new(const struct s3_config *cfg, struct s3_client **ret);
void s3_client_free(struct s3_client *c);
const struct s3_config *s3_client_config(const struct s3_client *c);

/* Attempts per request (1 + retries) and the first backoff; later ones double. Default 4 and
 * 100 ms. Requests that fail for good (4xx other than 408/429) are not retried. */
void s3_client_set_retries(struct s3_client *c, unsigned attempts, uint64_t backoff_ns);

int s3_conn_new(struct s3_client *c, struct s3_conn **ret);
void s3_conn_free(struct s3_conn *k);

/* Store len bytes as object `key`. */
int s3_put(struct s3_conn *k, const char *key, const void *data, size_t len);
/* Read object `key` into buf (cap bytes); *ret_len gets its length. -ENOENT if it does not
 * exist, -EFBIG if it is larger than cap. */
int s3_get(struct s3_conn *k, const char *key, void *buf, size_t cap, size_t *ret_len);

/* Check at start that the bucket is there and the credentials may write into it: PUT of a small
 * object `key` holding `text`. The error says what is wrong (credentials, bucket, endpoint). */
int s3_check_writable(struct s3_client *c, const char *key, const char *text);
