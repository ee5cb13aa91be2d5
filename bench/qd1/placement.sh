#!/usr/bin/env bash
# bench/qd1/placement.sh — what sets the QD1 latency ratio against nbdkit-memory on this machine: where the
# scheduler runs the server's thread relative to fio's. One fio workload (default 4 KiB random write, QD1),
# alternated REPS times between three servers and three placements:
#   servers     nbdkit-memory (its default 16 threads), nbdkit-memory -t 1 (one thread, like an event loop),
#               nbdmirror --durability pmem (as bench/run.sh runs it)
#   placements  free      no affinity: the scheduler decides (what npm run bench measures)
#               apart     server on CPU 0, fio on CPU 1: every request and reply wakes the other CPU
#               together  server and fio both on CPU 1: no cross-CPU wake-up at all
# For each: IOPS, p10/p50/p90 completion latency, and the server's CPU per request (utime+stime of its process
# over the fio run, ramp included, divided by IOPS × (runtime + ramp)). Each server is filled with 1 GiB of
# random data first (untimed), as bench/run.sh's copy_in does.
#
# Usage: bash bench/qd1/placement.sh [REPS] [RW]      (defaults 2 randwrite; RW may be randread)
#   npm run build first (npm run bench:qd1 does it). Needs 2 CPUs (taskset -c 0 and 1).
# Every server is started here and stopped by its PID, also on failure; traffic stays on 127.0.0.1.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
REPS=${1:-2} RW=${2:-randwrite}
RUNTIME=${QD1_RUNTIME:-5} RAMP=1 PORT=${QD1_PORT:-31994}
[[ $REPS =~ ^[1-9][0-9]?$ ]] || { echo "REPS must be 1..99" >&2; exit 2; }
[[ $RW == randwrite || $RW == randread ]] || { echo "RW must be randwrite or randread" >&2; exit 2; }
for t in fio nbdkit nbdinfo nbdcopy node taskset; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
[[ -f dist/server.js ]] || { echo "build first: npm run build" >&2; exit 2; }
(($(nproc) >= 2)) || { echo "needs at least 2 CPUs (has $(nproc))" >&2; exit 3; }
# shellcheck source=bench/lib/alternate.sh
source bench/lib/alternate.sh
bench_setup qd1

# start SERVER PLACEMENT: starts the server with its affinity, fills it (untimed), sets SRV and URI
start() {
  local pin=()
  case $2 in apart) pin=(taskset -c 0) ;; together) pin=(taskset -c 1) ;; esac
  rm -rf "$WORK/d"; mkdir -p "$WORK/d/data" "$WORK/d/pmem"
  case $1 in
    nbdkit-memory)
      "${pin[@]}" nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$PORT" memory 1G & SRV=$!
      URI=nbd://127.0.0.1:$PORT/ ;;
    nbdkit-memory-t1)
      "${pin[@]}" nbdkit --foreground --exit-with-parent --threads 1 --ipaddr 127.0.0.1 --port "$PORT" memory 1G & SRV=$!
      URI=nbd://127.0.0.1:$PORT/ ;;
    nbdmirror-pmem)
      "${pin[@]}" node --max-semi-space-size=4 dist/server.js --listen 127.0.0.1:$PORT --http 127.0.0.1:0 \
        --data-dir "$WORK/d/data" --pmem-dir "$WORK/d/pmem" --export disk0=1G --durability pmem --log-level warn & SRV=$!
      URI=nbd://127.0.0.1:$PORT/disk0 ;;
  esac
  up "$URI" || return 1
  nbdcopy --flush "$WORK/src.img" "$URI"
}

printf '%-17s %-9s %4s %8s %7s %7s %7s %12s\n' server placement rep IOPS p10_us p50_us p90_us cpu_us_per_io
for rep in $(seq "$REPS"); do
  for place in free apart together; do
    fiopin=()
    [[ $place == free ]] || fiopin=(taskset -c 1)
    for s in nbdkit-memory nbdkit-memory-t1 nbdmirror-pmem; do
      start "$s" "$place" || exit 1
      c0=$(cpu "$SRV")
      out=$("${fiopin[@]}" fio --name=q --ioengine=nbd --uri="$URI" --rw="$RW" --bs=4k --iodepth=1 --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time=$RAMP --norandommap --randrepeat=1 \
        --percentile_list=10:50:90 --output-format=json 2>/dev/null | sed -n '/^{/,$p')
      c1=$(cpu "$SRV")
      kill "$SRV"; wait "$SRV" 2>/dev/null; SRV=""
      echo "$out" | python3 -c '
import json,sys
j=json.load(sys.stdin)["jobs"][0]; k="write" if j["write"]["io_bytes"] else "read"; x=j[k]; p=x["clat_ns"]["percentile"]
ticks=int(sys.argv[4]); secs=float(sys.argv[5]); hz=int(sys.argv[6])
print("%-17s %-9s %4s %8.0f %7.1f %7.1f %7.1f %12.2f"%(sys.argv[1], sys.argv[2], sys.argv[3], x["iops"], p["10.000000"]/1e3,
  p["50.000000"]/1e3, p["90.000000"]/1e3, ticks/hz*1e6/max(1.0, x["iops"]*secs)))' \
        "$s" "$place" "$rep" "$((c1 - c0))" "$((RUNTIME + RAMP))" "$(getconf CLK_TCK)" || exit 1
    done
  done
done
