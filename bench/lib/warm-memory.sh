# bench/lib/warm-memory.sh — sourced by bench/run.sh, bench/mirror/resync.sh and bench/ceiling/multi-loop.sh.
#
# Guest memory warm-up. On this kind of VM the host backs a guest page only when the guest first writes it: a
# write to a page the guest never used costs about ten times a write to one it did (a tmpfs file written in
# 256 KiB pieces: ~300 MB/s against ~2900 MB/s), and the host takes freed pages back after a while. Whichever
# server drew fresh pages (for its files on /dev/shm, its region, its buffers) ran slower by that much; resync
# and copy_in ratios swung 2x between reps. Writing (not fallocating: tmpfs leaves those pages untouched) and
# deleting a large file first leaves the kernel's free lists full of pages the host already backs, for every
# measurement alike.
#
#   warm_memory DIR GIB   writes and removes GIB GiB in DIR (capped at 60% of MemAvailable and DIR's free
#                         space minus 4 GiB; 0: nothing). Sets WARM_META to what it did ("" when it did
#                         nothing); reports through the caller's `say` function.

warm_memory() {
  local dir=$1 gib=$2 avail free
  WARM_META=""
  ((gib > 0)) || return 0
  avail=$(awk '/^MemAvailable:/ { print int($2 / 1048576 * 0.6) }' /proc/meminfo)
  free=$(df -k --output=avail "$dir" 2>/dev/null | awk 'NR == 2 { print int($1 / 1048576) - 4 }')
  ((gib > avail)) && gib=$avail
  [[ -n $free ]] && ((gib > free)) && gib=$free
  ((gib > 0)) || { say "memory warm-up skipped (not enough room in $dir)"; return 0; }
  local f=$dir/nbdmirror-bench-warm.$$ t0 t1
  t0=$(date +%s.%N)
  timeout 300 dd if=/dev/zero of="$f" bs=1M count=$((gib * 1024)) status=none || say "memory warm-up: dd stopped early"
  rm -f "$f"
  t1=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  WARM_META="wrote and removed $gib GiB in $dir ($t1 s)"
  say "memory warm-up: $WARM_META"
}
