/* s3.c — PUT/GET of S3 objects with libcurl (see s3.h). */
#include "drafter/s3.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/log.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct s3_client {
        struct s3_config cfg; /* strings owned */
        char region[64];
        char sigv4[128];
        char base[1024]; /* scheme://endpoint/bucket/ */
        const char *ca_file;
        unsigned attempts;
        uint64_t backoff_ns;
};

struct s3_conn {
        struct s3_client *c;
        CURL *curl;
        struct curl_slist *headers;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_result;

static void init_curl(void) {
        curl_init_result = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static char *dup_or_empty(const char *s) {
        return strdup(s ? s : "");
}

void s3_client_free(struct s3_client *c) {
        if (!c)
                return;
        free((char *)c->cfg.endpoint);
        free((char *)c->cfg.bucket);
        free((char *)c->cfg.access_key);
        free((char *)c->cfg.secret_key);
        free(c);
}

/* Bucket names as S3 allows them in paths (3-63 of a-z0-9.-); endpoints as host[:port]. */
static bool valid_bucket(const char *b) {
        size_t n = strlen(b);
        if (n < 3 || n > 63)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!((b[i] >= 'a' && b[i] <= 'z') || (b[i] >= '0' && b[i] <= '9') || b[i] == '.' || b[i] == '-'))
                        return false;
        return true;
}

static bool valid_endpoint(const char *e) {
        if (!*e || strlen(e) > 255)
                return false;
        for (const char *p = e; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '.' ||
                      *p == '-' || *p == ':' || *p == '[' || *p == ']'))
                        return false;
        return true;
}

int s3_client_new(const struct s3_config *cfg, struct s3_client **ret) {
        pthread_once(&curl_once, init_curl);
        if (curl_init_result != CURLE_OK)
                return error_set(-EIO, "s3: libcurl: %s", curl_easy_strerror(curl_init_result));
        const char *endpoint = cfg->endpoint ? cfg->endpoint : "";
        if (strncmp(endpoint, "http://", 7) == 0 || strncmp(endpoint, "https://", 8) == 0)
                return error_set(-EINVAL, "s3: endpoint \"%s\": give host[:port] without a scheme (s3secure picks https)",
                                 endpoint);
        if (!valid_endpoint(endpoint))
                return error_set(-EINVAL, "s3: endpoint \"%s\" is not host[:port]", endpoint);
        if (!cfg->bucket || !valid_bucket(cfg->bucket))
                return error_set(-EINVAL, "s3: bucket \"%s\" is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')",
                                 cfg->bucket ? cfg->bucket : "");
        struct s3_client *c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->cfg = *cfg;
        c->cfg.endpoint = dup_or_empty(cfg->endpoint);
        c->cfg.bucket = dup_or_empty(cfg->bucket);
        c->cfg.access_key = dup_or_empty(cfg->access_key);
        c->cfg.secret_key = dup_or_empty(cfg->secret_key);
        c->cfg.region = c->region;
        if (!c->cfg.endpoint || !c->cfg.bucket || !c->cfg.access_key || !c->cfg.secret_key) {
                s3_client_free(c);
                return -ENOMEM;
        }
        /* s3.<region>.amazonaws.com (or s3-<region>.…) names its region; anything else signs as us-east-1. */
        const char *r = cfg->region;
        char guess[64] = "us-east-1";
        if (!r) {
                const char *p = strncmp(endpoint, "s3.", 3) == 0 || strncmp(endpoint, "s3-", 3) == 0 ? endpoint + 3 : NULL;
                const char *dot = p ? strchr(p, '.') : NULL;
                if (dot && strncmp(dot, ".amazonaws.com", 14) == 0 && dot - p > 0 && dot - p < 60 &&
                    strncmp(p, "amazonaws", 9) != 0)
                        snprintf(guess, sizeof(guess), "%.*s", (int)(dot - p), p);
                r = guess;
        }
        snprintf(c->region, sizeof(c->region), "%s", r);
        snprintf(c->sigv4, sizeof(c->sigv4), "aws:amz:%s:s3", c->region);
        snprintf(c->base, sizeof(c->base), "%s://%s/%s/", cfg->secure ? "https" : "http", endpoint, cfg->bucket);
        /* A private CA (tests, on-premises S3): the variables curl's own tool and OpenSSL read. */
        c->ca_file = getenv("CURL_CA_BUNDLE") ? getenv("CURL_CA_BUNDLE") : getenv("SSL_CERT_FILE");
        c->attempts = 4;
        c->backoff_ns = 100 * NSEC_PER_MSEC;
        *ret = c;
        return 0;
}

const struct s3_config *s3_client_config(const struct s3_client *c) {
        return &c->cfg;
}

void s3_client_set_retries(struct s3_client *c, unsigned attempts, uint64_t backoff_ns) {
        c->attempts = attempts ? attempts : 1;
        c->backoff_ns = backoff_ns;
}

int s3_conn_new(struct s3_client *c, struct s3_conn **ret) {
        struct s3_conn *k = calloc(1, sizeof(*k));
        if (!k)
                return -ENOMEM;
        k->c = c;
        k->curl = curl_easy_init();
        /* The payload is not hashed into the signature (as over TLS most clients do); an empty
         * Expect saves the 100-continue round trip of every PUT. */
        k->headers = curl_slist_append(NULL, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
        struct curl_slist *h = k->headers ? curl_slist_append(k->headers, "Expect:") : NULL;
        if (!k->curl || !h) {
                s3_conn_free(k);
                return error_set(-ENOMEM, "s3: cannot make a libcurl handle");
        }
        k->headers = h;
        *ret = k;
        return 0;
}

void s3_conn_free(struct s3_conn *k) {
        if (!k)
                return;
        if (k->curl)
                curl_easy_cleanup(k->curl);
        curl_slist_free_all(k->headers);
        free(k);
}

struct body {
        uint8_t *buf;
        size_t cap, len;
        bool overflow;
        char err[512]; /* an error response's start */
        size_t err_len;
        bool ok;       /* 2xx: data goes to buf, else to err */
        const uint8_t *src; /* PUT */
        size_t src_len, src_off;
};

static size_t on_write(char *data, size_t size, size_t n, void *ctx) {
        struct body *b = ctx;
        size_t len = size * n;
        if (!b->ok) {
                size_t room = sizeof(b->err) - 1 - b->err_len;
                size_t take = len < room ? len : room;
                memcpy(b->err + b->err_len, data, take);
                b->err_len += take;
                b->err[b->err_len] = '\0';
                return len;
        }
        if (b->len + len > b->cap) {
                b->overflow = true;
                return 0; /* aborts the transfer */
        }
        memcpy(b->buf + b->len, data, len);
        b->len += len;
        return len;
}

static size_t on_header(char *data, size_t size, size_t n, void *ctx) {
        struct body *b = ctx;
        /* The status line of each response (there may be a 100 Continue first). */
        if (size * n > 9 && strncmp(data, "HTTP/", 5) == 0) {
                const char *sp = memchr(data, ' ', size * n);
                b->ok = sp && sp[1] == '2';
        }
        return size * n;
}

static size_t on_read(char *dst, size_t size, size_t n, void *ctx) {
        struct body *b = ctx;
        size_t len = size * n, left = b->src_len - b->src_off;
        size_t take = len < left ? len : left;
        memcpy(dst, b->src + b->src_off, take);
        b->src_off += take;
        return take;
}

/* <Code>X</Code> of an S3 error body, or "". */
static void xml_field(const char *xml, const char *tag, char *out, size_t size) {
        char open[64], close[64];
        snprintf(open, sizeof(open), "<%s>", tag);
        snprintf(close, sizeof(close), "</%s>", tag);
        const char *a = strstr(xml, open), *e = a ? strstr(a, close) : NULL;
        out[0] = '\0';
        if (a && e)
                snprintf(out, size, "%.*s", (int)(e - a - strlen(open)), a + strlen(open));
}

enum outcome { DONE, RETRY, FAIL };

static enum outcome perform(struct s3_conn *k, bool put, const char *key, struct body *b, int *ret_err) {
        struct s3_client *c = k->c;
        CURL *h = k->curl;
        char url[2048];
        snprintf(url, sizeof(url), "%s%s", c->base, key);
        curl_easy_reset(h);
        curl_easy_setopt(h, CURLOPT_URL, url);
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(h, CURLOPT_AWS_SIGV4, c->sigv4);
        curl_easy_setopt(h, CURLOPT_USERNAME, c->cfg.access_key);
        curl_easy_setopt(h, CURLOPT_PASSWORD, c->cfg.secret_key);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, k->headers);
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 3000L);
        /* A server that stops answering mid-request: under 1 KiB/s for 5 s ends the attempt. */
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1024L);
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, 5L);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, b);
        curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(h, CURLOPT_HEADERDATA, b);
        if (c->ca_file)
                curl_easy_setopt(h, CURLOPT_CAINFO, c->ca_file);
        if (put) {
                curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
                curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
                curl_easy_setopt(h, CURLOPT_READDATA, b);
                curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)b->src_len);
        }
        b->len = b->err_len = b->src_off = 0;
        b->err[0] = '\0';
        b->overflow = false;
        b->ok = false;
        CURLcode cr = curl_easy_perform(h);
        long status = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        const char *where = put ? "PUT" : "GET";
        if (b->overflow) {
                *ret_err = error_set(-EFBIG, "s3: GET %s: the object is larger than %zu bytes", url, b->cap);
                return FAIL;
        }
        if (cr != CURLE_OK) {
                int e = cr == CURLE_COULDNT_CONNECT        ? -ECONNREFUSED
                        : cr == CURLE_OPERATION_TIMEDOUT   ? -ETIMEDOUT
                        : cr == CURLE_COULDNT_RESOLVE_HOST ? -EHOSTUNREACH
                                                           : -EIO;
                *ret_err = error_set(e, "s3: %s %s: %s", where, url, curl_easy_strerror(cr));
                /* Certificate problems do not go away by trying again. */
                return cr == CURLE_PEER_FAILED_VERIFICATION || cr == CURLE_SSL_CACERT_BADFILE ||
                                       cr == CURLE_URL_MALFORMAT || cr == CURLE_COULDNT_RESOLVE_HOST
                               ? FAIL
                               : RETRY;
        }
        if (status >= 200 && status < 300)
                return DONE;
        char code[128], message[256];
        xml_field(b->err, "Code", code, sizeof(code));
        xml_field(b->err, "Message", message, sizeof(message));
        int e = status == 403 ? -EACCES : status == 404 ? -ENOENT : status == 400 ? -EINVAL : -EIO;
        *ret_err = error_set(e, "s3: %s %s: HTTP %ld%s%s%s%s", where, url, status, *code ? " " : "", code,
                             *message ? ": " : "", message);
        return status >= 500 || status == 408 || status == 429 ? RETRY : FAIL;
}

static int request(struct s3_conn *k, bool put, const char *key, struct body *b) {
        int r = 0;
        uint64_t wait = k->c->backoff_ns;
        for (unsigned attempt = 1;; attempt++) {
                enum outcome o = perform(k, put, key, b, &r);
                if (o == DONE)
                        return 0;
                if (o == FAIL || attempt >= k->c->attempts)
                        return r;
                log_debug("%s (attempt %u of %u; again in %.0f ms)", error_message(), attempt, k->c->attempts,
                          wait / 1e6);
                clock_sleep_ns(wait);
                wait *= 2;
        }
}

int s3_put(struct s3_conn *k, const char *key, const void *data, size_t len) {
        struct body b = {.src = data, .src_len = len};
        return request(k, true, key, &b);
}

int s3_get(struct s3_conn *k, const char *key, void *buf, size_t cap, size_t *ret_len) {
        struct body b = {.buf = buf, .cap = cap};
        int r = request(k, false, key, &b);
        if (r >= 0)
                *ret_len = b.len;
        return r;
}

int s3_check_writable(struct s3_client *c, const char *key, const char *text) {
        struct s3_conn *k;
        int r = s3_conn_new(c, &k);
        if (r < 0)
                return r;
        r = s3_put(k, key, text, strlen(text));
        s3_conn_free(k);
        if (r == -EACCES)
                return error_prefix(r, "S3 refused the credentials for bucket \"%s\" (check s3accesskey and s3secretkey)",
                                    c->cfg.bucket);
        if (r == -ENOENT)
                return error_prefix(r, "S3 bucket \"%s\" does not exist at %s", c->cfg.bucket, c->cfg.endpoint);
        if (r < 0)
                return error_prefix(r, "S3 endpoint %s (bucket \"%s\") cannot be used", c->cfg.endpoint, c->cfg.bucket);
        return 0;
}
