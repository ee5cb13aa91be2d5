#!/usr/bin/env bash
# nbd-bench.sh — measure NBD servers side by side on this machine.
#
# For every target (a server command started fresh for each repetition, or an
# already-running NBD URI) the harness runs the same sequence:
#   1. copy_in   nbdcopy a 1 GiB random-data file into the (empty) export   [timed]
#   2. verify    read the export back and cmp it with the source (rep 1)   [untimed]
#   3. copy_out  nbdcopy --no-extents export -> null:                        [timed]
#   4. eight fio workloads, ioengine=nbd (libnbd), fixed runtime:
#        randread_4k_qd1 randread_4k_qd32 randwrite_4k_qd1 randwrite_4k_qd32
#        read_1m_qd8 write_1m_qd8 randrw70_4k_qd16   (numjobs=1: one connection)
#        randrw70_4k_2x16   (numjobs=2: two connections (multi-conn), QD16 each,
#                            group_reporting: one aggregated result)
# Repetitions are interleaved (rep1: A B C, rep2: B C A, ...), so slow drifts in
# machine load hit all targets alike. For every sample it also records the CPU
# used by the server's process group, by the client (fio/nbdcopy) and by
# everything else on the machine ("foreign" load), so noisy samples can be
# recognised, and the peak resident set size of the server's process group
# (sum of VmRSS, sampled every 0.2 s). Results: RUN_DIR/results.tsv (raw
# samples), summary.md and summary.json (median and min–max across reps,
# ratios vs. a baseline target, peak RSS per server).
#
# Usage:
#   bench/fio/nbd-bench.sh [options] [BUILTIN ...]
#
#   With no BUILTIN names, all default builtins run (see --list); --target and
#   --uri add more targets to that list.
#
# Targets:
#   --target NAME='CMD'   start CMD (run with bash -c) once per repetition.
#                         Placeholders substituted before running:
#                           {port}    TCP port to listen on; listen on 127.0.0.1 only
#                           {file}    fresh sparse backing file of --size bytes
#                           {size}    disk size in bytes
#                           {dir}     per-start scratch directory (configs etc.;
#                                     under /tmp, NOT on --datadir)
#                           {datadir} fresh empty directory on --datadir (default
#                                     /dev/shm), removed when the server stops; for
#                                     servers that create their own backing files
#                           {pidfile} if used, CMD is treated as daemonizing: the
#                                     harness waits for the pidfile and stops that PID
#                         The server must stay in the foreground (or use {pidfile}).
#   --export NAME=EXPORT  NBD export name for target NAME (default: "")
#   --uri NAME=URI        already-running server; NOT started or stopped; its data
#                         is OVERWRITTEN; no server-CPU accounting.
#
# Options:
#   --reps N              repetitions (default 3)
#   --runtime S           fio measured runtime per workload in seconds (default 5)
#   --ramp S              fio ramp time before measuring (default 1)
#   --size SIZE           disk size, e.g. 1G, 512M (default 1G)
#   --workloads LIST      comma-separated fio workload ids (default: all eight)
#   --no-copy             do not report the nbdcopy timings (copy_in still runs
#                         untimed as prefill, so reads never hit empty disks)
#   --verify MODE         first|all|none: data check after copy_in (default first)
#   --no-context          skip the memcpy / loopback-TCP context measurements
#   --baseline NAME       target that ratios are computed against
#                         (default: nbdkit-memory if present, else the first target)
#   --pin                 pin servers to CPU 1 and clients to CPU 0
#   --server-cpus LIST    taskset CPU list for servers   (implies pinning)
#   --client-cpus LIST    taskset CPU list for fio/nbdcopy
#   --wait-quiet S        before each measurement wait up to S seconds until the
#                         foreign load is below --quiet-cores (default 0 = off)
#   --quiet-cores X       threshold for --wait-quiet (default 0.25 cores)
#   --noise-cores X       foreign load above which a sample counts as noisy (0.3)
#   --fio-extra 'ARGS'    extra arguments for every fio run (e.g. '--fsync=32')
#   --datadir DIR         where source/backing files live (default /dev/shm)
#   --out DIR             result directory (default ./bench-runs/<UTC timestamp>)
#   --max-minutes M       stop starting new measurements after M minutes (default 30)
#   --warm-mib N          before each server start, write and remove N MiB in
#                         --datadir, so that every server starts on memory the
#                         machine has just used (default 0 = off; skipped when
#                         --datadir has less than N MiB + 2 x --size free)
#   --meta KEY=VALUE      extra line for meta.tsv (repeatable); version.* keys are
#                         listed under "tools" in summary.md
#   --list                list builtin targets and workloads, then exit
#   -h, --help            this text
#
# Example (all builtins plus nbdmirror; bench/run.sh is the usual entry point):
#   bench/fio/nbd-bench.sh --target nbdmirror='node dist/server.js --listen 127.0.0.1:{port}
#     --http 127.0.0.1:0 --data-dir {datadir} --export disk0={size} --log-level warn'
#
# Safety: servers bind 127.0.0.1 only, every client command runs under
# timeout(1), and every server started here is stopped by its PID / process
# group (never by name) on exit, including Ctrl-C.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ----------------------------------------------------------------------------
# Builtin targets. Each is a command template (see placeholders above).
# Defaults that matter for fairness are spelled out explicitly.
# ----------------------------------------------------------------------------
declare -A T_CMD T_KIND T_EXPORT T_URI T_VERIFY T_MC T_FLUSH T_FUA
BUILTIN_ORDER=(nbdkit-null nbdkit-memory nbdkit-file qemu-nbd nbd-server)
EXTRA_BUILTINS=(qemu-nbd-direct nbdkit-memory-malloc)

NBDKIT="nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port {port}"
# nbdkit-null: protocol/loopback ceiling — reads return zeroes, writes are discarded.
T_CMD[nbdkit-null]="$NBDKIT null size={size}"
T_VERIFY[nbdkit-null]=no
# nbdkit memory plugin, default allocator=sparse (one mutex around the page table), 16 threads/conn.
T_CMD[nbdkit-memory]="$NBDKIT memory size={size}"
# Same with allocator=malloc (rwlock, more concurrency). Not in the default list.
T_CMD[nbdkit-memory-malloc]="$NBDKIT memory size={size} allocator=malloc"
# nbdkit file plugin: page cache (cache=default), FLUSH = fdatasync.
T_CMD[nbdkit-file]="$NBDKIT file file={file} cache=default fadvise=normal"
# qemu-nbd: page cache (writeback; FLUSH = fdatasync), thread-pool AIO.
# --shared=0 allows unlimited clients, which also makes qemu-nbd advertise multi-conn.
T_CMD[qemu-nbd]="qemu-nbd --format=raw --cache=writeback --aio=threads --shared=0 --persistent --bind=127.0.0.1 --port={port} {file}"
# qemu-nbd with O_DIRECT (cache=none). Not in the default list.
T_CMD[qemu-nbd-direct]="qemu-nbd --format=raw --cache=none --aio=threads --shared=0 --persistent --bind=127.0.0.1 --port={port} {file}"
# nbd-server (reference server): needs a config file; -d would serve only ONE
# client and exit, so it runs as a daemon with -p PIDFILE (forks per client).
# flush/fua are off by default in nbd-server; enabled here so all targets advertise FLUSH/FUA.
T_CMD[nbd-server]="printf '%s\n' '[generic]' 'listenaddr = 127.0.0.1' 'port = {port}' 'max_threads = 4' '[bench]' 'exportname = {file}' 'flush = true' 'fua = true' > {dir}/nbd-server.conf && exec nbd-server -C {dir}/nbd-server.conf -p {pidfile}"
T_EXPORT[nbd-server]=bench
for t in "${BUILTIN_ORDER[@]}" "${EXTRA_BUILTINS[@]}"; do T_KIND[$t]=builtin; done

# ----------------------------------------------------------------------------
# Workloads: fio arguments per id, and the number of fio jobs (WL_JOBS, default
# 1). Each job opens its own NBD connection (the nbd engine keeps one libnbd
# handle per job), so WL_JOBS > 1 is a multi-conn workload: the jobs run with
# --group_reporting and the result is their aggregate (IOPS and MB/s summed,
# latency percentiles over all I/Os). Such a workload still runs against a
# target that does not advertise multi-conn; its rows are marked in the note.
# ----------------------------------------------------------------------------
declare -A WL_ARGS WL_JOBS
WL_ORDER=(randread_4k_qd1 randread_4k_qd32 randwrite_4k_qd1 randwrite_4k_qd32 read_1m_qd8 write_1m_qd8 randrw70_4k_qd16
  randrw70_4k_2x16)
WL_ARGS[randread_4k_qd1]="--rw=randread --bs=4k --iodepth=1"
WL_ARGS[randread_4k_qd32]="--rw=randread --bs=4k --iodepth=32"
WL_ARGS[randwrite_4k_qd1]="--rw=randwrite --bs=4k --iodepth=1"
WL_ARGS[randwrite_4k_qd32]="--rw=randwrite --bs=4k --iodepth=32"
WL_ARGS[read_1m_qd8]="--rw=read --bs=1m --iodepth=8"
WL_ARGS[write_1m_qd8]="--rw=write --bs=1m --iodepth=8"
WL_ARGS[randrw70_4k_qd16]="--rw=randrw --rwmixread=70 --bs=4k --iodepth=16"
# Two connections (multi-conn) at depth 16 each: 32 requests in flight in all.
WL_ARGS[randrw70_4k_2x16]="--rw=randrw --rwmixread=70 --bs=4k --iodepth=16"
WL_JOBS[randrw70_4k_2x16]=2

# ----------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------
REPS=3 RUNTIME=5 RAMP=1 SIZE=1G DATADIR=/dev/shm OUT="" BASELINE=""
VERIFY=first DO_COPY=1 DO_CONTEXT=1 MAX_MINUTES=30 WORKLOADS=""
WAIT_QUIET=0 QUIET_CORES=0.25 NOISE_CORES=0.3 FIO_EXTRA="" WARM_MIB=0
SERVER_CPUS="" CLIENT_CPUS=""
START_TIMEOUT=20 COPY_TIMEOUT=180
TARGETS=() EXTRA_TARGETS=() EXTRA_META=()

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

list_builtins() {
  echo "Default builtin targets:"
  for t in "${BUILTIN_ORDER[@]}"; do printf '  %-22s %s\n' "$t" "${T_CMD[$t]}"; done
  echo "Other builtin targets (name them explicitly):"
  for t in "${EXTRA_BUILTINS[@]}"; do printf '  %-22s %s\n' "$t" "${T_CMD[$t]}"; done
  echo "fio workloads:"
  for w in "${WL_ORDER[@]}"; do printf '  %-20s %s --numjobs=%s\n' "$w" "${WL_ARGS[$w]}" "${WL_JOBS[$w]:-1}"; done
  echo "nbdcopy workloads: copy_in copy_out"
}

# ----------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------
ARGV_ORIG=("$@")
while (($#)); do
  case $1 in
    --target) [[ ${2:-} == *=* ]] || die "--target needs NAME='COMMAND'"
      n=${2%%=*}; T_CMD[$n]=${2#*=}; T_KIND[$n]=custom; EXTRA_TARGETS+=("$n"); shift 2 ;;
    --export) [[ ${2:-} == *=* ]] || die "--export needs NAME=EXPORT"
      T_EXPORT[${2%%=*}]=${2#*=}; shift 2 ;;
    --uri) [[ ${2:-} == *=* ]] || die "--uri needs NAME=URI"
      n=${2%%=*}; T_URI[$n]=${2#*=}; T_KIND[$n]=uri; T_CMD[$n]=""; EXTRA_TARGETS+=("$n"); shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --no-copy) DO_COPY=0; shift ;;
    --verify) VERIFY=$2; shift 2 ;;
    --no-context) DO_CONTEXT=0; shift ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --pin) SERVER_CPUS=1 CLIENT_CPUS=0; shift ;;
    --server-cpus) SERVER_CPUS=$2; shift 2 ;;
    --client-cpus) CLIENT_CPUS=$2; shift 2 ;;
    --wait-quiet) WAIT_QUIET=$2; shift 2 ;;
    --quiet-cores) QUIET_CORES=$2; shift 2 ;;
    --noise-cores) NOISE_CORES=$2; shift 2 ;;
    --fio-extra) FIO_EXTRA=$2; shift 2 ;;
    --datadir) DATADIR=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --max-minutes) MAX_MINUTES=$2; shift 2 ;;
    --warm-mib) WARM_MIB=$2; shift 2 ;;
    --meta) [[ ${2:-} == *=* ]] || die "--meta needs KEY=VALUE"
      EXTRA_META+=("$2"); shift 2 ;;
    --list) list_builtins; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ ${T_KIND[$1]:-} == builtin ]] || die "unknown builtin target '$1' (see --list)"
       TARGETS+=("$1"); shift ;;
  esac
done
((${#TARGETS[@]})) || TARGETS=("${BUILTIN_ORDER[@]}")
TARGETS+=("${EXTRA_TARGETS[@]}")
if [[ -z $WORKLOADS ]]; then FIO_WLS=("${WL_ORDER[@]}"); else IFS=, read -ra FIO_WLS <<<"$WORKLOADS"; fi
for w in "${FIO_WLS[@]}"; do [[ -n ${WL_ARGS[$w]:-} ]] || die "unknown workload '$w' (see --list)"; done
[[ $VERIFY =~ ^(first|all|none)$ ]] || die "--verify must be first|all|none"
[[ $WARM_MIB =~ ^[0-9]+$ ]] || die "--warm-mib must be a number of MiB"
if [[ -z $BASELINE ]]; then
  BASELINE=${TARGETS[0]}
  for t in "${TARGETS[@]}"; do [[ $t == nbdkit-memory ]] && BASELINE=$t; done
fi
read -ra FIO_EXTRA_ARR <<<"$FIO_EXTRA"
SERVER_PIN=() CLIENT_PIN=()
[[ -n $SERVER_CPUS ]] && SERVER_PIN=(taskset -c "$SERVER_CPUS")
[[ -n $CLIENT_CPUS ]] && CLIENT_PIN=(taskset -c "$CLIENT_CPUS")

for tool in fio nbdcopy nbdinfo jq python3 ss timeout setsid /usr/bin/time; do
  command -v "$tool" >/dev/null || die "required tool '$tool' not found"
done
SIZE_BYTES=$(numfmt --from=iec "$SIZE") || die "bad --size $SIZE"
HZ=$(getconf CLK_TCK)
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-${PWD}/bench-runs/$RUN_ID}
RAW=$OUT/raw
mkdir -p "$RAW" || die "cannot create $OUT"
[[ $OUT != *' '* && $DATADIR != *' '* ]] || die "paths with spaces are not supported"
RUN_TMP=$(mktemp -d /tmp/nbd-bench.XXXXXX)
TSV=$OUT/results.tsv META=$OUT/meta.tsv
SRC=$DATADIR/nbd-bench.$RUN_ID.src.img
VERIFY_FILE=$DATADIR/nbd-bench.$RUN_ID.verify.img
T_START=$(date +%s)

# State of the server currently running (at most one at a time).
SERVER_PID="" SERVER_PGID="" LAUNCH_PID="" SERVER_FILE="" SERVER_DATADIR="" URI="" IPERF_PID=""
# The peak-RSS sampler of the measurement in progress (see rss_begin).
RSS_PID="" RSS_FILE=$RUN_TMP/rss.peak RSS_KB=0 RSS_PIDS=""

# ----------------------------------------------------------------------------
# Process / CPU accounting helpers
# ----------------------------------------------------------------------------

# Print "<live> <ticks>" for a process group (or a single PID when $2=pid):
# live = number of non-zombie members; ticks = utime+stime of all members
# (zombies keep their times until reaped) plus cutime+cstime of the leader
# (children it already reaped, e.g. nbd-server's per-connection processes).
# A child is either a member or in the leader's cutime, never both.
pg_stat() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v id="$1" -v mode="${2:-pg}" '
    { pid = $1; sub(/^.*\) /, "")   # drop "pid (comm) " — comm may contain spaces
      # now: $1=state $2=ppid $3=pgrp ... $12=utime $13=stime $14=cutime $15=cstime
      if ((mode == "pg" && $3 == id) || (mode == "pid" && pid == id)) {
        if ($1 != "Z") live++
        t += $12 + $13
        if (pid == id) t += $14 + $15
      } }
    END { printf "%d %d\n", live, t }'
}
server_ticks() {
  [[ -n $SERVER_PID ]] || { echo ""; return; }
  local s; if [[ -n $SERVER_PGID ]]; then s=$(pg_stat "$SERVER_PGID"); else s=$(pg_stat "$SERVER_PID" pid); fi
  echo "${s#* }"
}
server_alive() {
  [[ -n $SERVER_PID ]] || return 1
  local s; if [[ -n $SERVER_PGID ]]; then s=$(pg_stat "$SERVER_PGID"); else s=$(pg_stat "$SERVER_PID" pid); fi
  [[ ${s%% *} -gt 0 ]]
}

# Peak resident set size of the server during a measurement. rss_pids sets
# RSS_PIDS to the members of the server's process group, or to its PID alone
# when it has no group of its own (the same scope as the CPU accounting);
# rss_sample sets RSS_KB to the sum of VmRSS (/proc/PID/status, kB) over
# RSS_PIDS. Both use bash builtins only: no process is started per sample
# (pgrep would cost ~8 ms of CPU per call). rss_begin starts a background
# sampler that samples every 0.2 s and keeps the maximum in $RSS_FILE. It lists
# the group at every sample during the first second (the client connects just
# after the start, and nbd-server forks a process per connection; a copy may
# last only half a second) and once a second after that. rss_end stops it
# (cleanup does too), takes one last sample and sets M_RSS (peak MiB; empty when
# there is no server of ours, e.g. --uri). The sampler's CPU (~3 ms per listing
# of /proc, far less per sample, ~30 ms to start and stop) counts as foreign
# load: well under 0.01 cores.
rss_pids() {
  local f l c pg
  RSS_PIDS=$SERVER_PID
  [[ -n $SERVER_PGID ]] || return 0
  RSS_PIDS=""
  for f in /proc/[0-9]*/stat; do
    # fields: pid (comm) state ppid pgrp ...
    { read -r _ c _ _ pg _ <"$f"; } 2>/dev/null || continue
    if [[ $c != *')' ]]; then             # comm contains spaces: cut at its last ") "
      { read -r l <"$f"; } 2>/dev/null || continue
      l=${l##*) }; l=${l#* }; l=${l#* }; pg=${l%% *}
    fi
    [[ $pg == "$SERVER_PGID" ]] && RSS_PIDS+=" ${f:6:-5}"
  done
}
rss_sample() {
  local p k v _
  RSS_KB=0
  for p in $RSS_PIDS; do
    while read -r k v _; do
      [[ $k == VmRSS: ]] && { RSS_KB=$((RSS_KB + v)); break; }
    done 2>/dev/null <"/proc/$p/status"
  done
}
rss_begin() {
  rss_end_sampler
  rm -f "$RSS_FILE"
  [[ -n $SERVER_PID ]] || return 0
  # A subshell does not inherit the harness's EXIT/INT/TERM traps, so TERM ends
  # it through its own trap, which writes the peak. It waits with read -t on a
  # pipe that never delivers data (no sleep process per sample; a trapped signal
  # interrupts the read at once).
  (
    peak=0 n=0 fd=""
    trap 'echo "$peak" >"$RSS_FILE"; exit 0' TERM
    exec {fd}<> <(:) || fd=""
    while [[ -d /proc/$$ ]]; do          # $$ = the harness: stop if it is gone
      ((n < 5 || n % 5 == 0)) && rss_pids
      n=$((n + 1))
      rss_sample
      ((RSS_KB > peak)) && { peak=$RSS_KB; echo "$peak" >"$RSS_FILE"; }
      if [[ -n $fd ]]; then read -rt 0.2 -u "$fd" _; else sleep 0.2; fi
    done
  ) &
  RSS_PID=$!
}
rss_end_sampler() {
  [[ -n $RSS_PID ]] || return 0
  kill "$RSS_PID" 2>/dev/null
  wait "$RSS_PID" 2>/dev/null
  RSS_PID=""
}
rss_end() {
  M_RSS=""
  [[ -n $SERVER_PID ]] || { rss_end_sampler; return 0; }
  rss_pids; rss_sample                    # the end of the measurement
  rss_end_sampler
  local peak=$RSS_KB p=""
  [[ -s $RSS_FILE ]] && read -r p <"$RSS_FILE"
  [[ $p =~ ^[0-9]+$ ]] && ((p > peak)) && peak=$p
  ((peak > 0)) && M_RSS=$(awk -v k="$peak" 'BEGIN { printf "%.1f", k / 1024 }')
  rm -f "$RSS_FILE"
}

# measure_begin / measure_end bracket one measurement. measure_end takes the
# client's user+sys CPU seconds and sets M_WALL (s), M_SRV, M_CLI, M_FOREIGN,
# M_STEAL (all in cores = CPU-seconds per wall second), and M_RSS (peak RSS of
# the server in MiB, see rss_end).
measure_begin() {
  rss_begin
  M_SRV0=$(server_ticks)
  local _ u n s i w q sq st
  read -r _ u n s i w q sq st _ </proc/stat
  M_BUSY0=$((u + n + s + q + sq)) M_STEAL0=$st
  M_T0=$(date +%s%N)
}
measure_end() {
  local cli=${1:-0} t1 srv1 _ u n s i w q sq st
  t1=$(date +%s%N)
  read -r _ u n s i w q sq st _ </proc/stat
  srv1=$(server_ticks)
  rss_end
  read -r M_WALL M_SRV M_CLI M_FOREIGN M_STEAL < <(awk -v t0="$M_T0" -v t1="$t1" -v hz="$HZ" \
      -v b0="$M_BUSY0" -v b1="$((u + n + s + q + sq))" -v s0="$M_STEAL0" -v s1="$st" \
      -v v0="$M_SRV0" -v v1="$srv1" -v cli="$cli" 'BEGIN {
        wall = (t1 - t0) / 1e9; if (wall <= 0) wall = 1e-9
        busy = (b1 - b0) / hz / wall; steal = (s1 - s0) / hz / wall
        c = cli / wall
        if (v0 == "" || v1 == "") { srv = "n/a"; f = busy - c }
        else { srv = sprintf("%.3f", (v1 - v0) / hz / wall); f = busy - srv - c }
        if (f < 0) f = 0
        printf "%.3f %s %.3f %.3f %.3f\n", wall, srv, c, f, steal }')
}
# Client CPU seconds (user+sys) from a /usr/bin/time -f '%U %S' output file.
client_cpu() { tail -n1 "$1" 2>/dev/null | awk 'NF == 2 { print $1 + $2; exit } { print 0 }'; }

# Busy cores of everything on the machine over $1 seconds (between measurements
# our server is idle, so this is essentially foreign load).
sample_busy() {
  local _ u n s i w q sq st b0 b1
  read -r _ u n s i w q sq st _ </proc/stat; b0=$((u + n + s + q + sq))
  sleep "$1"
  read -r _ u n s i w q sq st _ </proc/stat; b1=$((u + n + s + q + sq))
  awk -v d="$((b1 - b0))" -v hz="$HZ" -v t="$1" 'BEGIN { printf "%.2f\n", d / hz / t }'
}
wait_quiet() {
  [[ $WAIT_QUIET == 0 ]] && return
  local deadline=$(($(date +%s) + WAIT_QUIET)) b
  while :; do
    b=$(sample_busy 0.5)
    awk -v b="$b" -v q="$QUIET_CORES" 'BEGIN { exit !(b < q) }' && return
    (($(date +%s) >= deadline)) && { log "  (machine still busy: $b cores; measuring anyway)"; return; }
  done
}

# ----------------------------------------------------------------------------
# Server lifecycle
# ----------------------------------------------------------------------------
pick_port() {
  local p i
  for i in $(seq 100); do
    p=$((20000 + RANDOM % 20000))
    [[ -z $(ss -Hltn "( sport = :$p )") ]] && { echo "$p"; return 0; }
  done
  return 1
}

# True if every listener on $PORT belongs to our server (guards against another
# process having grabbed the port between pick_port and the server's bind).
listener_is_ours() {
  local pids p pg
  pids=$(ss -Hltnp "( sport = :$PORT )" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
  [[ -n $pids ]] || return 1
  for p in $pids; do
    if [[ -n $SERVER_PGID ]]; then
      pg=$(awk '{ sub(/^.*\) /, ""); print $3 }' "/proc/$p/stat" 2>/dev/null)
      [[ $pg == "$SERVER_PGID" ]] || return 1
    else
      [[ $p == "$SERVER_PID" ]] || return 1
    fi
  done
}

# warm_before_start — --warm-mib: on a VM whose host takes freed guest memory back (free page reporting,
# ballooning), a first write to such a page costs several times a write to one in use, so the server that
# starts after a smaller one would pay for the pages the smaller one never touched. Writing and removing N
# MiB first hands every server memory the guest has just used.
warm_before_start() {
  ((WARM_MIB > 0)) || return 0
  local f=$DATADIR/nbd-bench.$RUN_ID.warm avail
  avail=$(df -Pm "$DATADIR" | awk 'NR == 2 { print $4 }')
  if ((avail < WARM_MIB + 2 * SIZE_BYTES / 1048576)); then
    log "warm-up skipped: $avail MiB free in $DATADIR"; return 0
  fi
  dd if=/dev/zero of="$f" bs=1M count="$WARM_MIB" status=none 2>/dev/null || log "warm-up: dd failed"
  rm -f "$f"
}

# start_server NAME REP — sets SERVER_PID/SERVER_PGID/URI; returns non-zero on failure.
start_server() {
  local name=$1 rep=$2 tpl=${T_CMD[$1]} dir cmd i pg slog=$RAW/$1.r$2.server.log
  dir=$RUN_TMP/$name.r$rep; mkdir -p "$dir"
  warm_before_start
  PORT=$(pick_port) || { log "no free port"; return 1; }
  SERVER_FILE=""
  if [[ $tpl == *'{file}'* ]]; then
    SERVER_FILE=$DATADIR/nbd-bench.$RUN_ID.$name.img
    rm -f "$SERVER_FILE"; truncate -s "$SIZE_BYTES" "$SERVER_FILE" || return 1
  fi
  SERVER_DATADIR=""
  if [[ $tpl == *'{datadir}'* ]]; then
    SERVER_DATADIR=$DATADIR/nbd-bench.$RUN_ID.$name.d
    rm -rf "$SERVER_DATADIR"; mkdir -p "$SERVER_DATADIR" || return 1
  fi
  cmd=${tpl//\{port\}/$PORT}; cmd=${cmd//\{file\}/$SERVER_FILE}; cmd=${cmd//\{size\}/$SIZE_BYTES}
  cmd=${cmd//\{datadir\}/$SERVER_DATADIR}
  cmd=${cmd//\{dir\}/$dir}; cmd=${cmd//\{pidfile\}/$dir/server.pid}
  echo "$cmd" >"$slog"
  # setsid makes the server leader of a new process group (PGID = PID), so it
  # and any children it forks can be stopped together by that id.
  "${SERVER_PIN[@]}" setsid bash -c "$cmd" >>"$slog" 2>&1 </dev/null &
  LAUNCH_PID=$!
  SERVER_PID=$LAUNCH_PID
  if [[ $tpl == *'{pidfile}'* ]]; then          # daemonizing server
    SERVER_PID=""
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
      if [[ -s $dir/server.pid ]]; then
        local p; p=$(tr -dc 0-9 <"$dir/server.pid")
        [[ -n $p ]] && kill -0 "$p" 2>/dev/null && { SERVER_PID=$p; break; }
      fi
      sleep 0.1
    done
    [[ -n $SERVER_PID ]] || { log "$name: pidfile never appeared"; tail -n5 "$slog" >&2; return 1; }
  fi
  # The child may not have reached setsid() yet: give it a moment to become a
  # group leader. A daemon that did not setsid() is handled by PID only.
  for ((i = 0; i < 20; i++)); do
    pg=$(awk '{ sub(/^.*\) /, ""); print $3 }' "/proc/$SERVER_PID/stat" 2>/dev/null)
    [[ $pg == "$SERVER_PID" ]] && break
    sleep 0.05
  done
  if [[ $pg == "$SERVER_PID" ]]; then SERVER_PGID=$pg; else SERVER_PGID=""; fi
  URI="nbd://127.0.0.1:$PORT/${T_EXPORT[$name]:-}"
  for ((i = 0; i < START_TIMEOUT * 10; i++)); do
    server_alive || { log "$name: server exited during startup"; tail -n5 "$slog" >&2; return 1; }
    if timeout 3 nbdinfo --size "$URI" >/dev/null 2>&1; then
      listener_is_ours && return 0
      log "$name: port $PORT is served by a process that is not ours"; return 1
    fi
    sleep 0.1
  done
  log "$name: not ready after ${START_TIMEOUT}s"; tail -n5 "$slog" >&2
  return 1
}

# Stop the current server by process group (or PID): TERM, wait up to 5 s, KILL.
stop_server() {
  local sig i
  if [[ -z $SERVER_PID ]]; then
    [[ -n $SERVER_FILE ]] && rm -f "$SERVER_FILE"
    [[ -n $SERVER_DATADIR && $SERVER_DATADIR == "$DATADIR"/nbd-bench.* ]] && rm -rf "$SERVER_DATADIR"
    LAUNCH_PID="" SERVER_FILE="" SERVER_DATADIR=""; return 0
  fi
  for sig in TERM KILL; do
    if [[ -n $SERVER_PGID ]]; then kill -s $sig -- "-$SERVER_PGID" 2>/dev/null; else kill -s $sig "$SERVER_PID" 2>/dev/null; fi
    for ((i = 0; i < 50; i++)); do server_alive || break; sleep 0.1; done
    server_alive || break
    log "server $SERVER_PID did not stop on SIGTERM; sending SIGKILL"
  done
  [[ -n $LAUNCH_PID ]] && wait "$LAUNCH_PID" 2>/dev/null
  [[ -n $SERVER_FILE ]] && rm -f "$SERVER_FILE"
  [[ -n $SERVER_DATADIR && $SERVER_DATADIR == "$DATADIR"/nbd-bench.* ]] && rm -rf "$SERVER_DATADIR"
  SERVER_PID="" SERVER_PGID="" LAUNCH_PID="" SERVER_FILE="" SERVER_DATADIR=""
}

cleanup() {
  rss_end_sampler
  stop_server
  [[ -n $IPERF_PID ]] && kill "$IPERF_PID" 2>/dev/null && wait "$IPERF_PID" 2>/dev/null
  rm -f "$SRC" "$VERIFY_FILE"
  rm -rf "$RUN_TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ----------------------------------------------------------------------------
# Measurements. Each appends one row to results.tsv.
# ----------------------------------------------------------------------------
# New columns go at the end, so the positions of the older ones stay valid.
TSV_COLS="run rep target workload status iops mbps p50_us p99_us p999_us mean_us seconds srv_cores cli_cores foreign_cores steal_cores note srv_rss_mib"
emit() { local IFS=$'\t'; echo "$*" >>"$TSV"; }
# emit_row REP TARGET WORKLOAD STATUS IOPS MBPS P50 P99 P999 MEAN SECONDS NOTE (CPU and RSS fields from M_*)
emit_row() {
  emit "$RUN_ID" "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "${10}" "${11}" \
    "${M_SRV:-}" "${M_CLI:-}" "${M_FOREIGN:-}" "${M_STEAL:-}" "${12:-}" "${M_RSS:-}"
}
emit_fail() { M_SRV="" M_CLI="" M_FOREIGN="" M_STEAL="" M_RSS=""; emit_row "$1" "$2" "$3" "$4" "" "" "" "" "" "" "" "${5:-}"; }

# run_fio REP TARGET WORKLOAD
# With WL_JOBS[WORKLOAD] > 1, fio runs that many jobs (one NBD connection each)
# with --group_reporting, so .jobs[0] of its JSON is their aggregate.
run_fio() {
  local rep=$1 name=$2 wl=$3 json=$RAW/$2.r$1.$3.json flog=$RAW/$2.r$1.$3.log tf=$RUN_TMP/time.out rc vals
  local jobs=${WL_JOBS[$wl]:-1} note=""
  local -a wlargs jobargs=(--numjobs="$jobs"); read -ra wlargs <<<"${WL_ARGS[$wl]}"
  if ((jobs > 1)); then
    jobargs+=(--group_reporting)
    case ${T_MC[$name]:-?} in
      yes) ;;
      no) note="no multi-conn advertised" ;;
      *) note="multi-conn not known (nbdinfo --can multi-conn failed)" ;;
    esac
  fi
  wait_quiet
  measure_begin
  /usr/bin/time -f '%U %S' -o "$tf" timeout -k 5 $((RAMP + RUNTIME + 30)) "${CLIENT_PIN[@]}" \
    fio --name="$wl" --ioengine=nbd --uri="$URI" "${wlargs[@]}" "${jobargs[@]}" \
      --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap --randrepeat=1 \
      --unified_rw_reporting=mixed --percentile_list=50:90:99:99.9 \
      --output-format=json --output="$json" "${FIO_EXTRA_ARR[@]}" >"$flog" 2>&1
  rc=$?
  measure_end "$(client_cpu "$tf")"
  vals=$(sed -n '/^{/,$p' "$json" 2>/dev/null | jq -r '
      def us: if . == null then "" else (. / 1000) end;
      .jobs[0] as $j | $j.mixed as $m |
      [$j.error, $m.iops, ($m.bw_bytes / 1e6), ($m.clat_ns.percentile["50.000000"] | us),
       ($m.clat_ns.percentile["99.000000"] | us), ($m.clat_ns.percentile["99.900000"] | us),
       ($m.clat_ns.mean | us), ($m.runtime / 1000)] | @tsv' 2>/dev/null)
  local err iops mbps p50 p99 p999 mean secs
  IFS=$'\t' read -r err iops mbps p50 p99 p999 mean secs <<<"$vals"
  if [[ $rc != 0 || -z $vals || $err != 0 || -z $iops ]] || awk -v x="$iops" 'BEGIN { exit !(x <= 0) }'; then
    local why; why=$(grep -m1 -iE 'error|fail|timeout' "$flog" | tr '\t' ' ' | cut -c1-120)
    [[ $rc == 124 || $rc == 137 ]] && why="timed out after $((RAMP + RUNTIME + 30)) s $why"
    emit_row "$rep" "$name" "$wl" "fail:rc=$rc" "" "" "" "" "" "" "" "${note:+$note; }$why"
    log "  $wl: FAILED rc=$rc $why${note:+ ($note)}"
    return 1
  fi
  emit_row "$rep" "$name" "$wl" ok "$iops" "$mbps" "$p50" "$p99" "$p999" "$mean" "$secs" "$note"
  log "  $(printf '%-18s %9.0f IOPS %8.1f MB/s  p50 %7.1f us  p99 %8.1f us  srv %s cli %s foreign %s rss %s MiB' \
        "$wl" "$iops" "$mbps" "$p50" "$p99" "$M_SRV" "$M_CLI" "$M_FOREIGN" "${M_RSS:-n/a}")${note:+ ($note)}"
}

# run_copy REP TARGET WORKLOAD(copy_in|copy_out) RECORD(0|1)
run_copy() {
  local rep=$1 name=$2 wl=$3 record=$4 clog=$RAW/$2.r$1.$3.log tf=$RUN_TMP/time.out rc
  local -a args
  if [[ $wl == copy_in ]]; then
    args=("$SRC" "$URI")
    [[ ${T_FLUSH[$name]:-no} == yes ]] && args=(--flush "${args[@]}")
  else
    args=(--no-extents "$URI" null:)
  fi
  ((record)) && wait_quiet
  measure_begin
  /usr/bin/time -f '%U %S' -o "$tf" timeout -k 5 "$COPY_TIMEOUT" "${CLIENT_PIN[@]}" nbdcopy "${args[@]}" >"$clog" 2>&1
  rc=$?
  measure_end "$(client_cpu "$tf")"
  if [[ $rc != 0 ]]; then
    local why; why=$(head -c 120 "$clog" | tr '\t\n' '  ')
    [[ $rc == 124 || $rc == 137 ]] && why="timed out after $COPY_TIMEOUT s $why"
    ((record)) && emit_row "$rep" "$name" "$wl" "fail:rc=$rc" "" "" "" "" "" "" "" "$why"
    log "  $wl: FAILED rc=$rc $why"
    return 1
  fi
  local mbps; mbps=$(awk -v b="$SIZE_BYTES" -v s="$M_WALL" 'BEGIN { printf "%.1f", b / s / 1e6 }')
  if ((record)); then
    emit_row "$rep" "$name" "$wl" ok "" "$mbps" "" "" "" "" "$M_WALL" "nbdcopy ${args[*]}"
    log "  $(printf '%-18s %6.2f s %8.1f MB/s  srv %s cli %s foreign %s rss %s MiB' "$wl" "$M_WALL" "$mbps" "$M_SRV" "$M_CLI" "$M_FOREIGN" "${M_RSS:-n/a}")"
  else
    log "  $wl (prefill, not reported): ${M_WALL}s"
  fi
}

# Read the whole export back into a file and compare with the source (catches a
# server that drops or corrupts writes). Untimed.
run_verify() {
  local rep=$1 name=$2 st=ok
  M_SRV="" M_CLI="" M_FOREIGN="" M_STEAL="" M_RSS=""
  rm -f "$VERIFY_FILE"
  if ! timeout -k 5 "$COPY_TIMEOUT" nbdcopy --no-extents "$URI" "$VERIFY_FILE" >"$RAW/$name.r$rep.verify.log" 2>&1; then
    st=fail:read
  elif ! cmp -s "$SRC" "$VERIFY_FILE"; then
    st=fail:mismatch
  fi
  rm -f "$VERIFY_FILE"
  emit_row "$rep" "$name" verify "$st" "" "" "" "" "" "" "" ""
  log "  verify: $st"
}

# One repetition of every measurement against one target.
run_target_rep() {
  local name=$1 rep=$2 w
  log "rep $rep/$REPS: $name"
  if [[ ${T_KIND[$name]} == uri ]]; then
    URI=${T_URI[$name]}; SERVER_PID="" SERVER_PGID=""
    timeout 5 nbdinfo --size "$URI" >/dev/null 2>&1 || {
      for w in copy_in copy_out "${FIO_WLS[@]}"; do emit_fail "$rep" "$name" "$w" unreachable; done; return; }
  elif ! start_server "$name" "$rep"; then
    for w in copy_in copy_out "${FIO_WLS[@]}"; do emit_fail "$rep" "$name" "$w" start_failed; done
    stop_server; return
  fi
  # Export facts, once per target.
  if [[ -z ${T_MC[$name]:-} ]]; then
    local c v
    for c in multi-conn flush fua; do
      timeout 5 nbdinfo --can "$c" "$URI" >/dev/null 2>&1
      case $? in 0) v=yes ;; 2) v=no ;; *) v='?' ;; esac
      case $c in multi-conn) T_MC[$name]=$v ;; flush) T_FLUSH[$name]=$v ;; fua) T_FUA[$name]=$v ;; esac
    done
    timeout 5 nbdinfo --json "$URI" >"$RAW/$name.nbdinfo.json" 2>&1
  fi
  local esize; esize=$(timeout 5 nbdinfo --size "$URI" 2>/dev/null)
  local copy_ok=1
  if [[ $esize != "$SIZE_BYTES" ]]; then
    log "  export size $esize != $SIZE_BYTES: skipping copies and verification"
    copy_ok=0
    for w in copy_in copy_out; do ((DO_COPY)) && emit_fail "$rep" "$name" "$w" "size_mismatch:$esize"; done
  fi
  if ((copy_ok)); then
    # copy_in always runs: it is also the prefill, so reads never hit an empty disk.
    run_copy "$rep" "$name" copy_in "$DO_COPY"
    if [[ ${T_VERIFY[$name]:-yes} == yes ]] && { [[ $VERIFY == all ]] || [[ $VERIFY == first && $rep == 1 ]]; }; then
      run_verify "$rep" "$name"
    fi
    ((DO_COPY)) && run_copy "$rep" "$name" copy_out 1
  fi
  local down=""
  for w in "${FIO_WLS[@]}"; do
    if [[ -n $down ]]; then emit_fail "$rep" "$name" "$w" "skipped:$down"; continue; fi
    if ! run_fio "$rep" "$name" "$w"; then
      # After a failure, check whether the server is still usable.
      if [[ ${T_KIND[$name]} != uri ]] && ! server_alive; then down=server_exited
      elif ! timeout 5 nbdinfo --size "$URI" >/dev/null 2>&1; then down=server_unresponsive; fi
    fi
  done
  [[ ${T_KIND[$name]} == uri ]] || stop_server
}

# ----------------------------------------------------------------------------
# Context: memcpy bandwidth and loopback TCP throughput.
# ----------------------------------------------------------------------------
context_measurements() {
  if command -v gcc >/dev/null && gcc -O2 -o "$RUN_TMP/memcpy-bw" "$HERE/lib/memcpy-bw.c" 2>"$RAW/memcpy-build.log"; then
    local r; r=$(timeout 60 "$RUN_TMP/memcpy-bw" $((256 << 20)) 12)
    [[ -n $r ]] && meta context.memcpy "single-thread memcpy of 256 MiB: best ${r% *} MB/s, median ${r#* } MB/s"
    log "context: memcpy best/median MB/s: $r"
  fi
  if command -v iperf3 >/dev/null; then
    local p; p=$(pick_port)
    setsid iperf3 -s -1 -B 127.0.0.1 -p "$p" >"$RAW/iperf3-server.log" 2>&1 </dev/null &
    IPERF_PID=$!
    sleep 0.5
    timeout 30 iperf3 -c 127.0.0.1 -p "$p" -t 4 -J >"$RAW/iperf3.json" 2>&1
    local gbps; gbps=$(jq -r '.end.sum_received.bits_per_second / 1e9 | . * 100 | round / 100' "$RAW/iperf3.json" 2>/dev/null)
    kill "$IPERF_PID" 2>/dev/null; wait "$IPERF_PID" 2>/dev/null; IPERF_PID=""
    [[ -n $gbps && $gbps != null ]] && meta context.iperf3 "iperf3 1 TCP stream over 127.0.0.1, 4 s: $gbps Gbit/s ($(awk -v g="$gbps" 'BEGIN { printf "%.0f", g * 1e9 / 8 / 1e6 }') MB/s)"
    log "context: loopback TCP $gbps Gbit/s"
  else
    meta context.iperf3 "iperf3 not installed (apt-get install iperf3); see nbdkit-null rows for the NBD-level ceiling"
  fi
}

# ----------------------------------------------------------------------------
# Run metadata
# ----------------------------------------------------------------------------
meta() { printf '%s\t%s\n' "$1" "$2" >>"$META"; }
ver() { "$@" 2>&1 | head -n1 | tr '\t' ' '; }
collect_meta() {
  : >"$META"
  meta run.id "$RUN_ID"
  meta run.date "$(date -u '+%Y-%m-%d %H:%M:%S')"
  meta run.command "$0 ${ARGV_ORIG[*]}"
  meta host.nproc "$(nproc)"
  meta host.cpu_model "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')$(lscpu 2>/dev/null | awk -F: '/Hypervisor vendor/ { gsub(/^ +/, "", $2); printf " (VM, hypervisor %s)", $2 }')"
  meta host.mem "$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  meta host.kernel "$(uname -r)"
  meta host.loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg) (loadavg); busy over 1 s before start: $(sample_busy 1) cores"
  meta version.nbdkit "$(ver nbdkit --version | awk '{ print $2 }')"
  meta version.qemu-nbd "$(ver qemu-nbd --version | awk '{ print $2, $3, $4 }')"
  meta version.nbd-server "$(ver nbd-server -V | awk '{ print $NF }')"
  meta version.fio "$(ver fio --version)"
  meta version.libnbd "$(ver nbdinfo --version | awk '{ print $2 }')"
  command -v node >/dev/null && meta version.node "$(ver node --version)"
  command -v iperf3 >/dev/null && meta version.iperf3 "$(ver iperf3 --version | awk '{ print $2 }')"
  meta config.reps "$REPS"; meta config.runtime "$RUNTIME"; meta config.ramp "$RAMP"
  meta config.size "$SIZE"; meta config.datadir "$DATADIR"; meta config.baseline "$BASELINE"
  meta config.fio_extra "$FIO_EXTRA"; meta config.noise_cores "$NOISE_CORES"
  local pin="${SERVER_CPUS:+server CPUs $SERVER_CPUS }${CLIENT_CPUS:+client CPUs $CLIENT_CPUS}"
  meta config.pin "${pin:-none}"
  meta config.wait_quiet "$WAIT_QUIET"
  meta config.warm_mib "$WARM_MIB"
  meta config.workloads "${FIO_WLS[*]}"
  local w mj=()
  for w in "${FIO_WLS[@]}"; do [[ ${WL_JOBS[$w]:-1} == 1 ]] || mj+=("$w=${WL_JOBS[$w]}"); done
  meta config.multi_job_workloads "${mj[*]}"
  meta config.rss_sample_interval "0.2"
  local kv; for kv in "${EXTRA_META[@]}"; do meta "${kv%%=*}" "${kv#*=}"; done
}
write_targets() {
  { printf 'name\tkind\tcommand\turi\tmulti_conn\tflush\tfua\n'
    for t in "${TARGETS[@]}"; do
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "${T_KIND[$t]}" "${T_CMD[$t]}" "${T_URI[$t]:-}" \
        "${T_MC[$t]:-?}" "${T_FLUSH[$t]:-?}" "${T_FUA[$t]:-?}"
    done; } >"$OUT/targets.tsv"
}

# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
log "run $RUN_ID -> $OUT"
log "targets: ${TARGETS[*]} (baseline $BASELINE); reps $REPS; fio ${RUNTIME}s + ${RAMP}s ramp"
avail=$(df -B1 --output=avail "$DATADIR" | tail -n1)
((avail > 3 * SIZE_BYTES)) || die "$DATADIR needs 3 x $SIZE free"
collect_meta
echo "$TSV_COLS" | tr ' ' '\t' >"$TSV"
((DO_CONTEXT)) && context_measurements

log "creating $SIZE random source file $SRC"
if command -v openssl >/dev/null; then openssl rand -out "$SRC" "$SIZE_BYTES"; else head -c "$SIZE_BYTES" /dev/urandom >"$SRC"; fi
[[ $(stat -c %s "$SRC") == "$SIZE_BYTES" ]] || die "could not create $SRC"

stopped_early=""
for ((rep = 1; rep <= REPS; rep++)); do
  n=${#TARGETS[@]}
  for ((k = 0; k < n; k++)); do
    name=${TARGETS[$(((k + rep - 1) % n))]}     # rotate start each rep
    if (($(date +%s) - T_START > MAX_MINUTES * 60)); then stopped_early="time cap of $MAX_MINUTES min reached at rep $rep"; break 2; fi
    run_target_rep "$name" "$rep"
  done
done
[[ -n $stopped_early ]] && { log "$stopped_early"; meta run.stopped_early "$stopped_early"; }

# (loadavg is not a useful noise measure here: it counts the servers' own
# runnable worker threads, e.g. nbdkit's 16 per connection.)
meta host.busy_end "busy over 1 s after the last measurement: $(sample_busy 1) cores"
meta run.duration_s "$(($(date +%s) - T_START))"
write_targets
log "done in $(($(date +%s) - T_START)) s; summarizing"
python3 "$HERE/lib/summarize.py" "$OUT" --baseline "$BASELINE"
log "results: $OUT/summary.md  $OUT/summary.json  $OUT/results.tsv"
