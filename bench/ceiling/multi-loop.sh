#!/usr/bin/env bash
# bench/ceiling/multi-loop.sh — would more than one event loop win the multi-connection rows against
# nbd-server? Alternated REPS times, each on a fresh 1 GiB export:
#   nbd-server    the reference server (a process per connection, max_threads = 4), tmpfs file
#   loops1        nbdmirror's connections over a plain file device on one event loop
#                 (dist/bench/ceiling/file-server.js PORT FILE 1)
#   loops2        the same with two event loops (worker threads), a client's connections spread over them
#   nbdmirror     the server as bench/run.sh runs it (disk durability, data dir and region on tmpfs)
# Measured per rep, as in bench/run.sh: copy_in (nbdcopy --flush of 1 GiB of random data into the empty
# export, the first pass), copy_out (nbdcopy --no-extents to null:), then fio's randrw70_4k_2x16 (4 KiB 70/30
# random read/write, two connections at depth 16 each). nbdcopy opens min(4, nproc) connections. Printed:
# MB/s (IOPS for fio), the server's CPU seconds, and nbdcopy's own CPU seconds.
#
# Before each start it writes and removes CEILING_WARM_GIB GiB (default 3; 0 skips it) in the work
# directory (bench/lib/warm-memory.sh), so that every server draws pages the guest has just used: on this VM
# a first write to a page the host has taken back costs several times a write to a warm one, and without it
# the server that follows a smaller one pays for the difference (bench/README.md, "Why copy_in ran at half
# speed in some runs").
#
# Usage: bash bench/ceiling/multi-loop.sh [REPS]      (default 3; 1..99)
#   npm run build && tsc -p bench/tsconfig.json first (npm run bench:ceiling does both).
# Every server is started here and stopped by its PID, also on failure; traffic stays on 127.0.0.1.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
REPS=${1:-3} RUNTIME=${CEILING_RUNTIME:-5} PORT=${CEILING_PORT:-31991} WARM_GIB=${CEILING_WARM_GIB:-3}
[[ $REPS =~ ^[1-9][0-9]?$ ]] || { echo "REPS must be 1..99" >&2; exit 2; }
[[ $WARM_GIB =~ ^[0-9]+$ ]] || { echo "CEILING_WARM_GIB must be a whole number of GiB" >&2; exit 2; }
for t in fio nbd-server nbdinfo nbdcopy node /usr/bin/time; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
[[ -f dist/server.js && -f dist/bench/ceiling/file-server.js ]] || { echo "build first: npm run bench:ceiling" >&2; exit 2; }
# shellcheck source=bench/lib/alternate.sh
source bench/lib/alternate.sh
# shellcheck source=bench/lib/warm-memory.sh
source bench/lib/warm-memory.sh
say() { :; }  # warm_memory's report: one line per start would cut into the table
bench_setup multiloop

start() {
  rm -rf "$WORK/d"; mkdir -p "$WORK/d/data" "$WORK/d/pmem"
  warm_memory "$WORK/d" "$WARM_GIB"
  case $1 in
    nbd-server)
      truncate -s 1G "$WORK/d/img"
      printf '%s\n' '[generic]' 'listenaddr = 127.0.0.1' "port = $PORT" 'max_threads = 4' '[disk0]' "exportname = $WORK/d/img" \
        'flush = true' 'fua = true' > "$WORK/d/nbd-server.conf"
      # nbd-server daemonizes; -p writes the PID of the process that accepts (and that we stop)
      nbd-server -C "$WORK/d/nbd-server.conf" -p "$WORK/d/pid" || return 1
      for _ in $(seq 50); do [[ -s $WORK/d/pid ]] && break; sleep 0.1; done
      SRV=$(cat "$WORK/d/pid") ;;
    loops1|loops2)
      truncate -s 1G "$WORK/d/img"
      node --max-semi-space-size=4 dist/bench/ceiling/file-server.js "$PORT" "$WORK/d/img" "${1#loops}" >/dev/null 2>"$WORK/d/err" & SRV=$! ;;
    nbdmirror)
      node --max-semi-space-size=4 dist/server.js --listen 127.0.0.1:$PORT --http 127.0.0.1:0 --data-dir "$WORK/d/data" \
        --pmem-dir "$WORK/d/pmem" --export disk0=1G --log-level warn & SRV=$! ;;
  esac
  URI=nbd://127.0.0.1:$PORT/disk0
  up "$URI"
}

# CPU of the server: its process and, for nbd-server, the children it forked per connection (still alive
# while their connection is; a copy's children have exited by the time it returns, so nbd-server's figure
# for the copies is the parent's plus what /proc reports as its children's, cutime+cstime).
srv_cpu() { local s; s=$(awk '{print $14+$15+$16+$17}' "/proc/$SRV/stat"); for p in $(pgrep -P "$SRV"); do s=$((s + $(cpu "$p"))); done; echo "$s"; }
secs() { python3 -c 'import sys; print("%.2f" % (int(sys.argv[1]) / int(sys.argv[2])))' "$1" "$(getconf CLK_TCK)"; }
mbs() { python3 -c 'import sys; print("%.0f" % (1073.741824 / (float(sys.argv[2]) - float(sys.argv[1]))))' "$1" "$2"; }

printf '%-10s %4s %9s %8s %8s %9s %8s %9s %8s\n' server rep copy_in srv_s nbdcopy copy_out srv_s 2x16_iops srv_s
for rep in $(seq "$REPS"); do
  for s in nbd-server loops1 loops2 nbdmirror; do
    start "$s" || exit 1
    c0=$(srv_cpu); t0=$(date +%s.%N)
    /usr/bin/time -f '%U %S' -o "$WORK/ct" nbdcopy --flush "$WORK/src.img" "$URI" || exit 1
    t1=$(date +%s.%N); c1=$(srv_cpu)
    nbdcopy --no-extents "$URI" null: || exit 1
    t2=$(date +%s.%N); c2=$(srv_cpu)
    iops=$(fio --name=m --ioengine=nbd --uri="$URI" --rw=randrw --rwmixread=70 --bs=4k --iodepth=16 --numjobs=2 --group_reporting \
      --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=1 --output-format=json 2>/dev/null \
      | sed -n '/^{/,$p' | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.0f" % (j["read"]["iops"] + j["write"]["iops"]))')
    c3=$(srv_cpu)
    kill "$SRV"; wait "$SRV" 2>/dev/null; SRV=""
    printf '%-10s %4s %9s %8s %8s %9s %8s %9s %8s\n' "$s" "$rep" "$(mbs "$t0" "$t1")" "$(secs $((c1 - c0)))" \
      "$(awk '{print $1+$2}' "$WORK/ct")" "$(mbs "$t1" "$t2")" "$(secs $((c2 - c1)))" "$iops" "$(secs $((c3 - c2)))"
    [[ -s $WORK/d/err ]] && sed 's/^/           /' "$WORK/d/err"
  done
done
