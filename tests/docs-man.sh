#!/usr/bin/env bash
# Every tool in cmd/ has a manual page that renders without warnings, has EXAMPLES (the guest-side
# helpers excepted), and documents every flag its --help lists.
set -euo pipefail
SRC=$1 BUILD=$2
command -v man >/dev/null || { echo "SKIP: man is not installed"; exit 77; }
command -v help2man >/dev/null || { echo "SKIP: help2man is not installed"; exit 77; }
status=0
for dir in "$SRC"/cmd/*/; do
        tool=$(basename "$dir")
        page=$BUILD/docs/man/$tool.1
        if [[ ! -f $page ]]; then
                [[ -x $BUILD/cmd/$tool ]] || continue # not built here (sanitized builds leave out guest tools)
                echo "FAIL: $tool has no manual page (docs/man/$tool.h2m)"; status=1; continue
        fi
        # (a long --devices default cannot be broken: "cannot adjust line" is no fault of the page)
        warnings=$(MANWIDTH=100 man --warnings -l "$page" 2>&1 >/dev/null | grep -v "cannot adjust line" || true)
        [[ -z $warnings ]] || { echo "FAIL: $tool.1: $warnings"; status=1; }
        text=$(MANWIDTH=200 man -l "$page" 2>/dev/null)
        case $tool in drafter-agent | drafter-liveness | drafter-heartbeat | drafter-memcheck) ;;
        *) grep -q '^EXAMPLES' <<<"$text" || { echo "FAIL: $tool.1 has no EXAMPLES"; status=1; } ;;
        esac
        while read -r flag; do
                grep -q -- "-$flag" <<<"$text" || { echo "FAIL: $tool.1 does not document -$flag"; status=1; }
        done < <("$BUILD/cmd/$tool" --help 2>&1 | sed -n 's/^  -\([a-z0-9-]*\).*/\1/p')
        ((status)) || echo "$tool.1: ok"
done
exit $status
