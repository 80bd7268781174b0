#!/usr/bin/env bash
# Live migration of a VM whose memory keeps changing: vm-live-migrate.sh with drafter-memcheck as
# the guest's app (64 MiB rewritten at 32 MiB/s and verified whole after every step).
WORKLOAD=memcheck exec bash "$(dirname "$0")/vm-live-migrate.sh"
