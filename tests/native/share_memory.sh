#!/bin/sh
# Memory shared between two processes of one simulated GPU, for ctest:
#   share_memory.sh MAKER OPENER WAY
# MAKER (a driver_client) makes 64 MiB and shares it (WAY: vmm, a VMM handle's
# POSIX fd; ipc, a cuIpcGetMemHandle handle; pool, an exported pool and pointer);
# OPENER opens it and prints its facts.
set -eu
out=$(mktemp)
"$1" "$3-export" 64 30 > "$out" &
maker=$!
trap 'kill $maker 2>/dev/null; rm -f "$out"' EXIT
tries=0
until grep -q '^used' "$out"; do
    tries=$((tries + 1))
    [ $tries -lt 400 ] || { echo "the maker shared nothing"; exit 1; }
    sleep 0.05
done
fact() { awk -v k="$1" '$1 == k { print $2 }' "$out"; }
case "$3" in
    vmm) "$2" vmm-import "$(fact pid)" "$(fact fd)" ;;
    ipc) "$2" ipc-import "$(fact handle)" ;;
    pool) "$2" pool-import "$(fact pid)" "$(fact fd)" "$(fact data)" ;;
esac
