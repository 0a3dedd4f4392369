#!/usr/bin/env bash
# Reserves the 2 MiB hugepages the partition tests back guest memory with
# (tests/tests/partition_isolation.rs: two hugepage-backed partitions at once).
#
#   tests/setup-hugepages.sh [PAGES]      # default 512 pages = 1 GiB
#
# Idempotent: it only ever raises the reservation (an existing larger one is
# left alone) and does nothing when enough pages are already free. Needs
# root. On a NUMA host the pages are spread by the kernel over the nodes;
# AIVMM_HUGEPAGES_NODE=N reserves them on node N instead.
set -euo pipefail
pages="${1:-512}"
if ! [[ "$pages" =~ ^[0-9]+$ ]]; then
    echo "setup-hugepages: PAGES must be a number of 2 MiB pages, not '$pages'" >&2
    exit 2
fi
if [[ -n "${AIVMM_HUGEPAGES_NODE:-}" ]]; then
    dir="/sys/devices/system/node/node${AIVMM_HUGEPAGES_NODE}/hugepages/hugepages-2048kB"
else
    dir="/sys/kernel/mm/hugepages/hugepages-2048kB"
fi
if [[ ! -d "$dir" ]]; then
    echo "setup-hugepages: $dir does not exist: this kernel has no 2 MiB hugepages (or no such node)" >&2
    exit 1
fi
total="$(cat "$dir/nr_hugepages")"
free="$(cat "$dir/free_hugepages")"
if (( free >= pages )); then
    echo "setup-hugepages: $free free 2 MiB hugepages in $dir (>= $pages): nothing to do"
    exit 0
fi
want=$(( total + pages - free ))
if [[ "$(id -u)" != 0 ]]; then
    echo "setup-hugepages: $free free 2 MiB hugepages, $pages needed; reserving more needs root:" >&2
    echo "  sudo $0 $pages    (or: echo $want | sudo tee $dir/nr_hugepages)" >&2
    exit 1
fi
echo "$want" > "$dir/nr_hugepages"
free="$(cat "$dir/free_hugepages")"
if (( free < pages )); then
    echo "setup-hugepages: asked for $want pages in $dir but only $free are free:" \
        "memory is too fragmented or too small; try again after" \
        "'echo 3 > /proc/sys/vm/drop_caches', or reserve at boot (hugepages=N)" >&2
    exit 1
fi
echo "setup-hugepages: $free free 2 MiB hugepages in $dir"
