#!/usr/bin/env bash
# bench/ceiling/run.sh — how close can the request path get to nbdkit-file? One fio workload (default 4 KiB
# random write, QD32), alternated REPS times between:
#   nbdkit-file   nbdkit's file plugin on a tmpfs file (the issue's baseline)
#   null          nbdmirror's listener and connections over a device that does nothing
#                 (dist/bench/ceiling/null-server.js): the front end's ceiling before any storage work
#   nbdmirror     the server as bench/run.sh runs it (disk durability, region and data dir on tmpfs)
# For each: IOPS, p50, and the server's CPU per request (utime+stime of its process over the whole fio run,
# ramp included, divided by IOPS × (runtime + ramp)).
#
# Usage: bash bench/ceiling/run.sh [REPS] [RW] [BS] [QD]      (defaults 3 randwrite 4k 32)
#   npm run build && tsc -p bench/tsconfig.json first (npm run bench:ceiling does both).
# Every server is started here and stopped by its PID, also on failure; traffic stays on 127.0.0.1.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
REPS=${1:-3} RW=${2:-randwrite} BS=${3:-4k} QD=${4:-32}
RUNTIME=${CEILING_RUNTIME:-5} RAMP=1 PORT=${CEILING_PORT:-31990}
[[ $REPS =~ ^[1-9][0-9]?$ ]] || { echo "REPS must be 1..99" >&2; exit 2; }
for t in fio nbdkit nbdinfo nbdcopy node; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
[[ -f dist/server.js && -f dist/bench/ceiling/null-server.js ]] || { echo "build first: npm run bench:ceiling" >&2; exit 2; }
# shellcheck source=bench/lib/alternate.sh
source bench/lib/alternate.sh
bench_setup ceiling

# start NAME: starts the server, fills it with the source (untimed), sets SRV and URI
start() {
  rm -rf "$WORK/d"; mkdir -p "$WORK/d/data" "$WORK/d/pmem"
  case $1 in
    nbdkit-file)
      truncate -s 1G "$WORK/d/img"
      nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$PORT" file file="$WORK/d/img" & SRV=$!
      URI=nbd://127.0.0.1:$PORT/ ;;
    null)
      node --max-semi-space-size=4 dist/bench/ceiling/null-server.js "$PORT" >/dev/null & SRV=$!
      URI=nbd://127.0.0.1:$PORT/disk0 ;;
    nbdmirror)
      node --max-semi-space-size=4 dist/server.js --listen 127.0.0.1:$PORT --http 127.0.0.1:0 --data-dir "$WORK/d/data" \
        --pmem-dir "$WORK/d/pmem" --export disk0=1G --log-level warn & SRV=$!
      URI=nbd://127.0.0.1:$PORT/disk0 ;;
  esac
  up "$URI" || return 1
  [[ $1 == null ]] || nbdcopy --flush "$WORK/src.img" "$URI"
}

printf '%-12s %4s %9s %9s %12s\n' server rep IOPS p50_us cpu_us_per_io
for rep in $(seq "$REPS"); do
  for s in nbdkit-file null nbdmirror; do
    start "$s" || exit 1
    c0=$(cpu "$SRV")
    out=$(fio --name=c --ioengine=nbd --uri="$URI" --rw="$RW" --bs="$BS" --iodepth="$QD" --numjobs=1 --time_based \
      --runtime="$RUNTIME" --ramp_time=$RAMP --norandommap --randrepeat=1 --output-format=json 2>/dev/null | sed -n '/^{/,$p')
    c1=$(cpu "$SRV")
    kill "$SRV"; wait "$SRV" 2>/dev/null; SRV=""
    echo "$out" | python3 -c '
import json,sys
j=json.load(sys.stdin)["jobs"][0]; k="write" if j["write"]["io_bytes"] else "read"; x=j[k]
ticks=int(sys.argv[3]); hz=int(sys.argv[5]); secs=float(sys.argv[4])
print("%-12s %4s %9.0f %9.1f %12.2f"%(sys.argv[1], sys.argv[2], x["iops"], x["clat_ns"]["percentile"]["50.000000"]/1e3, ticks/hz*1e6/max(1.0, x["iops"]*secs)))' "$s" "$rep" "$((c1 - c0))" "$((RUNTIME + RAMP))" "$(getconf CLK_TCK)"
  done
done
