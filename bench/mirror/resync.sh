#!/usr/bin/env bash
# bench/mirror/resync.sh — resync throughput of an nbdmirror pair vs an nbdcopy of the same data between the
# same two nodes. bench/run.sh runs it after the harness, in the same run directory; it also runs alone.
#
# Usage:
#   bench/mirror/resync.sh [--out RUN_DIR] [--server SERVER.js] [--reps N] [--bytes D] [--export-size SIZE]
#                          [--datadir DIR] [--timeout S] [--warm-gib G] [-- NODE FLAGS...]
#
#   --out DIR          run directory (default: a new bench-runs/<UTC timestamp>); results go to
#                      DIR/mirror-resync.tsv (one row per rep), DIR/mirror-resync.meta.json (settings),
#                      DIR/raw/mirror-resync/ (node logs, poller output) and, through bench/mirror/report.py,
#                      DIR/mirror.json and the "Mirroring" section of DIR/summary.md
#   --server FILE      the server to run (default: DIR/server/server.js when bench/run.sh made that copy, else
#                      dist/server.js, copied to DIR/server/ first)
#   --reps N           repetitions (default 3, env BENCH_RESYNC_REPS)
#   --bytes D          data written while the secondary is down, and copied by nbdcopy (default 512M, env
#                      BENCH_RESYNC_BYTES); a multiple of 4 KiB
#   --export-size S    size of disk0 on the mirrored pair (default 1G; at least D)
#   --datadir DIR      where the nodes' data, pmem regions and the source file live (default /dev/shm)
#   --timeout S        bound for each wait (in sync, a copy; default 300)
#   --warm-gib G       before rep 1, write and remove G GiB in DIR (default 4, env BENCH_RESYNC_WARM_GIB; 0:
#                      no warm-up): see bench/lib/warm-memory.sh. Each rep writes about 2 x D of fresh files
#                      on DIR, and rep 1's resync, the first of them, once ran at half the speed of the others;
#                      this starts it, as bench/run.sh's warm-up starts the harness, on pages the host backs
#   NODE FLAGS         given to every node (without "--": --durability disk, as the nbdmirror-disk target)
#
# Each repetition (every step bounded in time; every process started here is stopped by its PID, also on
# failure and Ctrl-C; nodes run under `setpriv --pdeathsig TERM`, so they cannot outlive this script):
#   resync   start node b (--role secondary) and node a (--role primary, --peer b, --peer-timeout 1s) with fresh
#            data dirs and disk0 of --export-size; wait until in sync (a's link "connected" with 0 out-of-sync
#            blocks, b's disk "UpToDate"). Stop b (SIGTERM). `nbdcopy --flush` D random bytes into a; check that
#            a's outOfSync.bytes is D. Restart b with the same command, and poll both nodes every 25 ms until in
#            sync again. Then read both exports whole and compare their sha256 with each other and with the
#            source (padded with zeros to the export size): a rep whose copies differ fails and is not counted.
#   nbdcopy  start the same two node commands on the same ports without --peer/--role/--peer-timeout (solo
#            nodes, fresh data dirs, disk0 of D bytes each); nbdcopy --flush the source into a (untimed); time
#            `nbdcopy nbd://a/disk0 nbd://b/disk0`; check b's sha256 against the source.
# The two halves alternate which goes first. Figures per rep (D / time, MB/s = 10^6 B/s):
#   resync_s      from the start of the resync (the primary's link.resync.startedAt, caught by the poller) until
#                 the poller saw the pair in sync (includes the secondary's "synced" step; the poll adds <= 25 ms).
#                 When no poll caught the resync running, the server's lastResync.ms is used instead.
#   wall_s        from the restart of b until in sync: adds b's start-up and the primary's reconnect backoff
#                 (up to 5 s after an outage), so it says little about throughput
#   server_ms     the primary's own lastResync.ms (link up to last block acknowledged), with bytesSent etc.
#   nbdcopy_s     the timed nbdcopy; ratio = resync MB/s / nbdcopy MB/s (target >= 0.8)
# Fairness: the resync ends with the secondary flushing its copy (before it records UpToDate) and flushes the
# peer every 2 MiB on the way, so the timed nbdcopy runs with --flush (one FLUSH at the end: nbdcopy's side is
# still the lighter). nbdcopy keeps its defaults (multi-conn, several requests in flight per connection);
# the resync uses one link connection with 4 chunks of 256 KiB in flight.
# Exit: 0 all reps verified and measured, 1 a rep failed (see the TSV's status), 2 usage, 3 missing tool.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT" || exit 1

OUT="" SERVER="" REPS=${BENCH_RESYNC_REPS:-3} BYTES=${BENCH_RESYNC_BYTES:-512M} ESIZE=1G DATADIR=/dev/shm
TIMEOUT=300 FLAGS=(--durability disk) WARM_GIB=${BENCH_RESYNC_WARM_GIB:-4}
usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
log() { printf '[%(%H:%M:%S)T] resync: %s\n' -1 "$*" >&2; }
say() { log "$*"; }  # for bench/lib/warm-memory.sh
die() { log "ERROR: $*"; exit "${2:-1}"; }
while (($#)); do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --server) SERVER=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --bytes) BYTES=$2; shift 2 ;;
    --export-size) ESIZE=$2; shift 2 ;;
    --datadir) DATADIR=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --warm-gib) WARM_GIB=$2; shift 2 ;;
    --) shift; FLAGS=("$@"); break ;;   # may be empty: the server's defaults
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" 2 ;;
  esac
done
for t in node nbdcopy nbdinfo jq python3 sha256sum setpriv timeout numfmt; do
  command -v "$t" >/dev/null || die "required tool '$t' not found (see bench/README.md)" 3
done
D=$(numfmt --from=iec "$BYTES") || die "bad --bytes $BYTES" 2
ES=$(numfmt --from=iec "$ESIZE") || die "bad --export-size $ESIZE" 2
((D > 0 && D % 4096 == 0)) || die "--bytes must be a positive multiple of 4 KiB" 2
((ES >= D)) || die "--export-size must be at least --bytes" 2
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer" 2
[[ $WARM_GIB =~ ^[0-9]+$ ]] || die "--warm-gib must be a whole number of GiB" 2

if [[ -z $OUT ]]; then OUT=$ROOT/bench-runs/$(date -u +%Y%m%dT%H%M%SZ); fi
mkdir -p "$OUT/raw/mirror-resync" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
LOGDIR=$OUT/raw/mirror-resync
if [[ -z $SERVER ]]; then
  if [[ -f $OUT/server/server.js ]]; then SERVER=$OUT/server/server.js
  else
    [[ -f dist/server.js ]] || die "dist/server.js not found: run 'npm run build' first"
    { mkdir -p "$OUT/server" && cp -a dist/server.js dist/lib "$OUT/server/"; } || die "cannot copy dist/ to $OUT/server"
    SERVER=$OUT/server/server.js
  fi
fi
[[ -f $SERVER ]] || die "$SERVER not found"
[[ $(cd "$(dirname "$SERVER")" && pwd) == "$ROOT"/* ]] || export NODE_PATH=$ROOT/node_modules${NODE_PATH:+:$NODE_PATH}
node "$SERVER" --help 2>&1 | grep -q -- --peer-timeout || die "$SERVER has no --peer/--peer-timeout: no mirroring to measure"

avail=$(df -B1 --output=avail "$DATADIR" | tail -n1)
((avail > 2 * ES + 3 * D + (1 << 30))) || die "$DATADIR needs about 2 x $ESIZE + 3 x $BYTES + 1G free"

# ---------------------------------------------------------------------------------------------------------------
# Processes: every node is started here, recorded by name and PID, and stopped by that PID.
# ---------------------------------------------------------------------------------------------------------------
declare -A PID=()
WORK=$DATADIR/nbdmirror-resync.$$
SRC=$WORK/src.img
mkdir -p "$WORK" || die "cannot create $WORK"

# start_node NAME LOG ARGS...: node SERVER ARGS in the background; its parent-death signal is SIGTERM.
start_node() {
  local name=$1 logf=$2; shift 2
  echo "node --max-semi-space-size=4 $SERVER $*" >>"$logf"
  setpriv --pdeathsig TERM -- node --max-semi-space-size=4 "$SERVER" "$@" >>"$logf" 2>&1 </dev/null &
  PID[$name]=$!
}
# running PID: the process exists and is not a zombie.
running() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null); [[ -n $st && $st != Z* ]]; }
# stop_node NAME: SIGTERM, up to 15 s for its clean stop, then SIGKILL; reaps it.
stop_node() {
  local name=$1 p=${PID[$1]:-} i
  [[ -n $p ]] || return 0
  if kill -TERM "$p" 2>/dev/null; then
    for ((i = 0; i < 150; i++)); do running "$p" || break; sleep 0.1; done
    if running "$p"; then
      log "node $name ($p) did not stop in 15 s: SIGKILL"
      kill -KILL "$p" 2>/dev/null
    fi
  fi
  wait "$p" 2>/dev/null
  unset "PID[$name]"
}
stop_all() { local n; for n in "${!PID[@]}"; do stop_node "$n"; done; }
# bg CMD...: run CMD (which has its own time limit, e.g. under timeout(1)) in the background and wait for it,
# so that a signal to this script is handled at once; the EXIT trap stops it by its PID. timeout(1) passes a
# SIGTERM on to its whole process group (a pipeline, too). Output goes where the caller redirects it.
CHILD=""
bg() {
  "$@" &
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=""
  return "$rc"
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [[ -n $CHILD ]]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
  stop_all
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# wait_port NAME PORT: until the node's NBD port accepts connections (it opens last).
wait_port() {
  bg timeout -k 5 40 python3 "$HERE/repl.py" wait-up "$2" --timeout 30 --pid "${PID[$1]}" ||
    { log "node $1 did not come up"; return 1; }
}
status() { python3 "$HERE/repl.py" status "http://127.0.0.1:$1"; }
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a - b }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.1f", b / s / 1e6; else print "" }'; }
# sha_of PORT: SHA = the sha256 of the whole export disk0 on 127.0.0.1:PORT.
sha_of() {
  SHA=""
  # shellcheck disable=SC2016  # $1 is the inner shell's
  bg timeout -k 5 "$TIMEOUT" bash -o pipefail -c 'nbdcopy "$1" - | sha256sum' _ "nbd://127.0.0.1:$1/disk0" \
    >"$WORK/sha" || return 1
  SHA=$(<"$WORK/sha")
  SHA=${SHA%% *}
}

read -r AN AH BN BH < <(python3 "$HERE/repl.py" ports 4) || die "no free ports"
A="http://127.0.0.1:$AH" B="http://127.0.0.1:$BH"
log "out $OUT; server $SERVER; $REPS reps; D = $BYTES ($D B), export $ESIZE; node flags: ${FLAGS[*]}"
log "ports: a nbd $AN http $AH, b nbd $BN http $BH; data in $WORK"

log "creating $BYTES random source file"
if command -v openssl >/dev/null; then openssl rand -out "$SRC" "$D" 2>/dev/null; else head -c "$D" /dev/urandom >"$SRC"; fi
[[ $(stat -c %s "$SRC" 2>/dev/null) == "$D" ]] || die "could not create $SRC"
SRC_SHA=$(sha256sum <"$SRC") SRC_SHA=${SRC_SHA%% *}
EXP_SHA=$({ cat "$SRC"; head -c $((ES - D)) /dev/zero; } | sha256sum) EXP_SHA=${EXP_SHA%% *}
# shellcheck source=bench/lib/warm-memory.sh
source "$ROOT/bench/lib/warm-memory.sh"
warm_memory "$DATADIR" "$WARM_GIB"

mirror_args() {  # mirror_args NODE DIR: the mirrored pair's command line for node a or b
  if [[ $1 == a ]]; then
    echo --node-id a --role primary --listen "127.0.0.1:$AN" --http "127.0.0.1:$AH" \
      --peer "nbd://127.0.0.1:$BN" --peer-http "http://127.0.0.1:$BH"
  else
    echo --node-id b --role secondary --listen "127.0.0.1:$BN" --http "127.0.0.1:$BH" \
      --peer "nbd://127.0.0.1:$AN" --peer-http "http://127.0.0.1:$AH"
  fi
}

TSV=$OUT/mirror-resync.tsv
COLS=(rep bytes oos_bytes wall_s resync_s resync_mbps server_ms server_mbps bytes_sent bytes_zeroed blocks
  nbdcopy_s nbdcopy_mbps ratio resync_verify nbdcopy_verify status note)
(IFS=$'\t'; echo "${COLS[*]}") >"$TSV"

# One resync measurement. Sets R_* variables; returns non-zero on failure (R_NOTE says why).
measure_resync() {
  local rep=$1 la lb j st conn t0 started ins ls
  local w=$WORK/r$rep.mirror
  R_OOS="" R_WALL="" R_RS="" R_SMS="" R_SENT="" R_ZERO="" R_BLOCKS="" R_VERIFY="" R_NOTE=""
  mkdir -p "$w/a/data" "$w/a/pmem" "$w/b/data" "$w/b/pmem"
  la=$LOGDIR/r$rep.mirror-a.log lb=$LOGDIR/r$rep.mirror-b.log
  local -a ca cb
  read -ra ca <<<"$(mirror_args a)"; read -ra cb <<<"$(mirror_args b)"
  ca+=(--data-dir "$w/a/data" --pmem-dir "$w/a/pmem" --export "disk0=$ES" --peer-timeout 1s --log-level info "${FLAGS[@]}")
  cb+=(--data-dir "$w/b/data" --pmem-dir "$w/b/pmem" --export "disk0=$ES" --peer-timeout 1s --log-level info "${FLAGS[@]}")
  start_node b "$lb" "${cb[@]}"; wait_port b "$BN" || { R_NOTE="secondary did not start"; return 1; }
  start_node a "$la" "${ca[@]}"; wait_port a "$AN" || { R_NOTE="primary did not start"; return 1; }
  bg timeout -k 5 70 python3 "$HERE/repl.py" wait-sync "$A" "$B" disk0 --timeout 60 --min-connects 1 \
    --pids "${PID[a]},${PID[b]}" >"$WORK/j"
  j=$(<"$WORK/j")
  [[ $(jq -r .ok <<<"$j" 2>/dev/null) == true ]] ||
    { R_NOTE="fresh pair not in sync within 60 s: $(jq -c '{states, p: .primary.link.state, oos: .primary.outOfSync, s: .secondary.disk}' <<<"$j")"; return 1; }
  log "r$rep resync: fresh pair in sync; stopping the secondary"
  stop_node b
  t0=$(now)
  bg timeout -k 5 "$TIMEOUT" nbdcopy --flush "$SRC" "nbd://127.0.0.1:$AN/disk0" >>"$LOGDIR/r$rep.nbdcopy.log" 2>&1 ||
    { R_NOTE="nbdcopy into the degraded primary failed (rc $?)"; return 1; }
  log "r$rep resync: wrote $BYTES into the primary alone in $(sub "$(now)" "$t0") s (untimed)"
  st=$(status "$AH") || { R_NOTE="primary status unavailable"; return 1; }
  R_OOS=$(jq -r '.outOfSync.bytes' <<<"$st"); conn=$(jq -r '.link.connects' <<<"$st")
  [[ $(jq -r '.link.state' <<<"$st") != connected ]] || { R_NOTE="primary says connected with the secondary down"; return 1; }
  if ((R_OOS < D)); then R_NOTE="primary outOfSync.bytes $R_OOS < D $D"; return 1; fi
  ((R_OOS <= D + D / 100 + (4 << 20))) || R_NOTE="outOfSync.bytes $R_OOS > D $D; "
  log "r$rep resync: primary outOfSync.bytes = $R_OOS (link $(jq -r '.link.state' <<<"$st")); restarting the secondary"
  t0=$(now)
  start_node b "$lb" "${cb[@]}"
  bg timeout -k 5 $((TIMEOUT + 10)) python3 "$HERE/repl.py" wait-sync "$A" "$B" disk0 --timeout "$TIMEOUT" \
    --poll 0.025 --min-connects $((conn + 1)) --pids "${PID[a]},${PID[b]}" >"$WORK/j"
  local ok=$?
  j=$(<"$WORK/j")
  echo "$j" >"$LOGDIR/r$rep.wait-sync.json"
  if ((ok != 0)); then
    R_NOTE+="not in sync within $TIMEOUT s after the secondary restarted: $(jq -c '{states, link: .primary.link, oos: .primary.outOfSync, s: .secondary.disk}' <<<"$j")"
    return 1
  fi
  ins=$(jq -r '.in_sync_at' <<<"$j"); started=$(jq -r '.resync_started_at // empty' <<<"$j")
  ls=$(jq -c '.primary.link.lastResync' <<<"$j")
  R_WALL=$(sub "$ins" "$t0")
  if [[ $ls == null ]]; then R_NOTE+="no lastResync after the outage; "; else
    R_SMS=$(jq -r .ms <<<"$ls"); R_SENT=$(jq -r .bytesSent <<<"$ls"); R_ZERO=$(jq -r .bytesZeroed <<<"$ls"); R_BLOCKS=$(jq -r .blocks <<<"$ls")
  fi
  if [[ -n $started ]]; then R_RS=$(sub "$ins" "$started")
  elif [[ -n $R_SMS ]]; then R_RS=$(awk -v m="$R_SMS" 'BEGIN { printf "%.4f", m / 1000 }'); R_NOTE+="resync_s from lastResync.ms (no poll caught it running); "
  fi
  log "r$rep resync: in sync; wall $R_WALL s, resync $R_RS s, server ${R_SMS:-?} ms, bytesSent ${R_SENT:-?}; verifying"
  local ha hb
  sha_of "$AN" || { R_VERIFY=fail:read; R_NOTE+="reading the primary failed"; return 1; }
  ha=$SHA
  sha_of "$BN" || { R_VERIFY=fail:read; R_NOTE+="reading the secondary failed"; return 1; }
  hb=$SHA
  if [[ $ha == "$hb" && $ha == "$EXP_SHA" ]]; then R_VERIFY=ok
  else
    R_VERIFY=fail:mismatch
    R_NOTE+="sha256 primary $ha, secondary $hb, expected $EXP_SHA"
    cp "$la" "$lb" "$LOGDIR/" 2>/dev/null
    return 1
  fi
  stop_node a; stop_node b
  rm -rf "$w"
}

# One nbdcopy measurement between solo nodes on the same ports. Sets C_*.
measure_copy() {
  local rep=$1 t0 t1 h
  local w=$WORK/r$rep.solo
  C_S="" C_VERIFY="" C_NOTE=""
  mkdir -p "$w/a/data" "$w/a/pmem" "$w/b/data" "$w/b/pmem"
  start_node a "$LOGDIR/r$rep.solo-a.log" --node-id a --listen "127.0.0.1:$AN" --http "127.0.0.1:$AH" \
    --data-dir "$w/a/data" --pmem-dir "$w/a/pmem" --export "disk0=$D" --log-level info "${FLAGS[@]}"
  start_node b "$LOGDIR/r$rep.solo-b.log" --node-id b --listen "127.0.0.1:$BN" --http "127.0.0.1:$BH" \
    --data-dir "$w/b/data" --pmem-dir "$w/b/pmem" --export "disk0=$D" --log-level info "${FLAGS[@]}"
  { wait_port a "$AN" && wait_port b "$BN"; } || { C_NOTE="solo nodes did not start"; return 1; }
  bg timeout -k 5 "$TIMEOUT" nbdcopy --flush "$SRC" "nbd://127.0.0.1:$AN/disk0" >>"$LOGDIR/r$rep.nbdcopy.log" 2>&1 ||
    { C_NOTE="nbdcopy into solo a failed"; return 1; }
  t0=$(now)
  bg timeout -k 5 "$TIMEOUT" nbdcopy --flush "nbd://127.0.0.1:$AN/disk0" "nbd://127.0.0.1:$BN/disk0" >>"$LOGDIR/r$rep.nbdcopy.log" 2>&1 ||
    { C_NOTE="nbdcopy a -> b failed (rc $?)"; return 1; }
  t1=$(now)
  C_S=$(sub "$t1" "$t0")
  log "r$rep nbdcopy: a -> b in $C_S s; verifying"
  sha_of "$BN" || { C_VERIFY=fail:read; C_NOTE="reading b failed"; return 1; }
  h=$SHA
  if [[ $h == "$SRC_SHA" ]]; then C_VERIFY=ok; else C_VERIFY=fail:mismatch; C_NOTE="sha256 of b $h, source $SRC_SHA"; return 1; fi
  stop_node a; stop_node b
  rm -rf "$w"
}

failed=0
for ((rep = 1; rep <= REPS; rep++)); do
  log "rep $rep/$REPS"
  rs=ok cs=ok
  if ((rep % 2)); then
    measure_resync "$rep" || rs=fail; stop_all
    measure_copy "$rep" || cs=fail; stop_all
  else
    measure_copy "$rep" || cs=fail; stop_all
    measure_resync "$rep" || rs=fail; stop_all
  fi
  rm -rf "$WORK"/r"$rep".*
  if [[ $rs == ok && $cs == ok ]]; then st=ok; else st=fail:; [[ $rs != ok ]] && st+=resync; [[ $rs != ok && $cs != ok ]] && st+=+; [[ $cs != ok ]] && st+=nbdcopy; failed=1; fi
  rmb=$(rate "$D" "$R_RS") smb=""; [[ -n $R_SMS ]] && smb=$(rate "$D" "$(awk -v m="$R_SMS" 'BEGIN { print m / 1000 }')")
  cmb=$(rate "$D" "$C_S") ratio=""
  [[ $st == ok && -n $rmb && -n $cmb ]] && ratio=$(awk -v a="$rmb" -v b="$cmb" 'BEGIN { printf "%.3f", a / b }')
  note="${R_NOTE}${R_NOTE:+ }${C_NOTE}"
  row=("$rep" "$D" "$R_OOS" "$R_WALL" "$R_RS" "$rmb" "$R_SMS" "$smb" "$R_SENT" "$R_ZERO" "$R_BLOCKS" "$C_S" "$cmb" "$ratio"
    "$R_VERIFY" "$C_VERIFY" "$st" "${note//$'\t'/ }")
  (IFS=$'\t'; echo "${row[*]}") >>"$TSV"
  log "rep $rep: $st; resync ${rmb:-?} MB/s (server ${smb:-?}), nbdcopy ${cmb:-?} MB/s, ratio ${ratio:-?}${note:+; $note}"
done

jq -n --arg server "$SERVER" --arg bytes "$D" --arg esize "$ES" --arg reps "$REPS" --arg flags "${FLAGS[*]}" --arg warm "$WARM_META" \
  --arg nbdcopy "$(nbdcopy --version 2>&1 | head -n1)" --arg date "$(date -u '+%Y-%m-%d %H:%M:%S')" \
  --arg ver "$(node -p "require('$ROOT/package.json').version" 2>/dev/null)" \
  '{date: $date, server: $server, nbdmirror_version: $ver, bytes: ($bytes | tonumber),
    export_size: ($esize | tonumber), reps: ($reps | tonumber), node_flags: $flags, peer_timeout: "1s", nbdcopy: $nbdcopy,
    poll_s: 0.025, target_ratio: 0.8, memory_warmup: $warm}' >"$OUT/mirror-resync.meta.json"
python3 "$HERE/report.py" "$OUT" || log "report.py failed"
exit "$failed"
