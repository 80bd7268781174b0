/* host.c — nftables commands and one-line files for lib/net (host.h). */
#include "host.h"
#include "drafter/error.h"

#include <errno.h>
#include <nftables/libnftables.h>
#include <stdio.h>
#include <string.h>

int net_nft(const char *commands, bool quiet) {
        struct nft_ctx *ctx = nft_ctx_new(NFT_CTX_DEFAULT);
        if (!ctx)
                return error_set(-ENOMEM, "nftables: no context");
        nft_ctx_buffer_error(ctx);
        nft_ctx_buffer_output(ctx);
        int r = nft_run_cmd_from_buffer(ctx, commands);
        if (r != 0 && !quiet) {
                const char *why = nft_ctx_get_error_buffer(ctx);
                error_set(-EIO, "nftables: %.*s", (int)strcspn(why ? why : "failed", "\n"), why ? why : "failed");
        }
        nft_ctx_free(ctx);
        return r != 0 ? -EIO : 0;
}

void net_read_line(const char *path, char *buf, size_t size) {
        buf[0] = '\0';
        FILE *f = fopen(path, "re");
        if (f && fgets(buf, (int)size, f))
                buf[strcspn(buf, "\n")] = '\0';
        if (f)
                fclose(f);
}

int net_write_line(const char *path, const char *value) {
        FILE *f = fopen(path, "we");
        if (!f || fprintf(f, "%s\n", value) < 0 || fclose(f) != 0)
                return error_set_errno(-errno, "cannot write %s", path);
        return 0;
}
