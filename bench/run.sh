#!/usr/bin/env bash
# bench/run.sh — nbdmirror's NBD benchmark suite; what `npm run bench` runs (after `npm run build`).
#
# Runs bench/fio/nbd-bench.sh with nbdmirror and its peers side by side on 127.0.0.1:
#   nbdmirror-disk   node dist/server.js, file-backed export disk0 in a fresh data dir on /dev/shm
#   nbdmirror-pmem   the same with --durability pmem (only when dist/server.js --help lists --durability)
#   nbdmirror-mirror a primary that mirrors every write to a secondary node on loopback (bench/mirror/pair.sh),
#                    both with nbdmirror-disk's flags (only when --help lists --peer)
#   peers            nbdkit-file (the ratio baseline), qemu-nbd, nbd-server, nbdkit-memory (context)
# Each target gets nbdcopy copy_in/copy_out and eight fio workloads, among them randrw70_4k_2x16 (two
# connections, multi-conn, at depth 16 each); for every measurement the harness also records the server's peak RSS
# (column srv_rss_mib, and a "Peak RSS per server" table in summary.md).
# Then, in the same run directory, bench/mirror/resync.sh times a resync against an nbdcopy of the same data
# between the same two nodes, and bench/mirror/report.py adds a "Mirroring" section to summary.md (mirrored vs
# unmirrored write latency and IOPS, resync vs nbdcopy, each with its target and pass/fail).
# Results: bench-runs/<UTC timestamp>/summary.md (and summary.json, results.tsv, mirror*.json/tsv, raw/). The built server
# (dist/server.js + dist/lib) is copied to <run dir>/server/ first and the copy is what runs, so a rebuild of
# dist/ during the run (a shared worktree) cannot change the server under test.
#
# Usage:
#   npm run bench                                   # 3 reps x 5 s + 1 s ramp (about 20-25 min)
#   npm run bench -- --reps 1 --runtime 3           # quick look; any nbd-bench.sh option passes through
#   BENCH_PEERS='nbdkit-file' npm run bench         # other peer builtins (see bench/fio/nbd-bench.sh --list)
#   BENCH_PMEM_SIZE=2G npm run bench                # pass --pmem-size to the pmem target
#   BENCH_MIRROR=0 npm run bench                    # no nbdmirror-mirror target and no resync measurement
#   BENCH_RESYNC=0 npm run bench                    # the nbdmirror-mirror target, but no resync measurement
#   BENCH_RESYNC_BYTES=256M npm run bench           # data resynced (and nbdcopied) per rep (default 512M)
#   bash bench/mirror/resync.sh --reps 1            # the resync measurement alone (see its --help)
#   BENCH_WARM_EACH_MIB=0 npm run bench             # no memory warm-up before each server start (default 3072)
#   BENCH_DRY_RUN=1 bash bench/run.sh ...           # print the harness (and resync) command lines instead
#   bash bench/run.sh ...                           # the same without rebuilding dist/
#
# Defaults given to the harness (later arguments win): --reps 3 --runtime 5 --ramp 1
#   --baseline nbdkit-file --max-minutes 60 --warm-mib 3072
# resync.sh gets the harness's --reps and --datadir (defaults 3 and /dev/shm), and --warm-gib 0 when BENCH_WARM_GIB=0.
# Exit codes: those of nbd-bench.sh (then resync.sh's: 1 when a rep failed); 3 when a required tool is missing;
# 1 when dist/ is not built.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HARNESS=bench/fio/nbd-bench.sh
SERVER=dist/server.js
PEERS=(${BENCH_PEERS-nbdkit-memory nbdkit-file qemu-nbd nbd-server})

say() { printf 'bench: %s\n' "$*" >&2; }

for a in "$@"; do
  case $a in -h|--help|--list) exec bash "$HARNESS" "$a" ;; esac
done

[[ -f $SERVER ]] || { say "$SERVER not found: run 'npm run build' first (npm run bench does it for you)"; exit 1; }

# The run directory: the harness's default (bench-runs/<UTC timestamp>) unless --out is given.
OUT="" prev=""
for a in "$@"; do [[ $prev == --out ]] && OUT=$a; prev=$a; done
out_args=()
[[ -n $OUT ]] || { OUT=bench-runs/$(date -u +%Y%m%dT%H%M%SZ); out_args=(--out "$ROOT/$OUT"); }

# ---------------------------------------------------------------------------------------------------------------
# Tools. Each entry: "what|check command|Debian package|installed by scripts/install-deps.sh (1/0)".
# ---------------------------------------------------------------------------------------------------------------
checks=(
  "node|command -v node|nodejs|0"
  "fio with the nbd engine|command -v fio && fio --enghelp=nbd|fio|1"
  "nbdcopy|command -v nbdcopy|libnbd-bin|1"
  "nbdinfo|command -v nbdinfo|libnbd-bin|1"
  "jq|command -v jq|jq|0"
  "python3|command -v python3|python3|0"
  "ss|command -v ss|iproute2|0"
  "setsid|command -v setsid|util-linux|1"
  "timeout|command -v timeout|coreutils|0"
  "numfmt|command -v numfmt|coreutils|0"
  "/usr/bin/time (GNU time)|test -x /usr/bin/time|time|0"
)
[[ ${BENCH_MIRROR:-1} == 0 ]] || checks+=(
  "setpriv (mirror)|command -v setpriv|util-linux|1"
  "sha256sum (mirror)|command -v sha256sum|coreutils|0"
)
for p in "${PEERS[@]}"; do
  case $p in
    nbdkit*) checks+=("nbdkit (peer $p)|command -v nbdkit|nbdkit|1") ;;
    qemu-nbd*) checks+=("qemu-nbd (peer $p)|command -v qemu-nbd|qemu-utils|1") ;;
    nbd-server) checks+=("nbd-server (peer $p)|command -v nbd-server|nbd-server|1") ;;
  esac
done
missing=() via_deps=() via_apt=()
for c in "${checks[@]}"; do
  IFS='|' read -r what test pkg deps <<<"$c"
  if ! bash -c "$test" >/dev/null 2>&1; then
    missing+=("$what")
    if [[ $deps == 1 ]]; then via_deps+=("$pkg"); else via_apt+=("$pkg"); fi
  fi
done
if ((${#missing[@]})); then
  say "missing tools: $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g')"
  ((${#via_deps[@]})) && say "install as root with: ./scripts/install-deps.sh   (Debian/Ubuntu; installs $(printf '%s\n' "${via_deps[@]}" | sort -u | paste -sd' ') and the other test clients)"
  ((${#via_apt[@]})) && say "not installed by install-deps.sh; as root: apt-get install $(printf '%s\n' "${via_apt[@]}" | sort -u | paste -sd' ')"
  command -v fio >/dev/null && ! fio --enghelp=nbd >/dev/null 2>&1 &&
    say "note: $(command -v fio) has no nbd engine; it needs a fio built with libnbd (Debian's fio package is)"
  say "optional: gcc (memcpy probe), iperf3 (loopback TCP context), openssl (fast random source)"
  exit 3
fi

# ---------------------------------------------------------------------------------------------------------------
# nbdmirror targets. {datadir} is a fresh directory on the harness's --datadir (/dev/shm), created before and
# removed after every server start, so nbdmirror's backing files live on tmpfs like the peers' {file}s.
# {size} is the disk size in bytes, which --export accepts as is.
# ---------------------------------------------------------------------------------------------------------------
SNAP=$OUT/server
if [[ -n ${BENCH_DRY_RUN:-} ]]; then mkdir -p bench-runs; SNAP=$(mktemp -d "$ROOT/bench-runs/.dry-run.XXXXXX"); trap 'rm -rf "$SNAP"' EXIT; fi
mkdir -p "$SNAP" && cp -a dist/server.js dist/lib "$SNAP/" || { say "cannot copy dist/ to $SNAP"; exit 1; }
SERVER=$SNAP/server.js
# A copy outside the repo cannot find node_modules by walking up; point Node at the repo's.
[[ $(cd "$SNAP" && pwd) == "$ROOT"/* ]] || export NODE_PATH=$ROOT/node_modules${NODE_PATH:+:$NODE_PATH}
HELP=$(node "$SERVER" --help 2>&1 || true)
grep -q -- --data-dir <<<"$HELP" || { say "'node $SERVER --help' failed:"; printf '%s\n' "$HELP" | head -n5 >&2; exit 1; }
has_flag() { grep -q -- "$1" <<<"$HELP"; }

BASE="mkdir -p {datadir}/data{PMEMDIR_MK} && exec node --max-semi-space-size=4 $SERVER --listen 127.0.0.1:{port} --http 127.0.0.1:0"
BASE+=" --data-dir {datadir}/data --export disk0={size} --log-level warn"
targets=()
if has_flag --durability; then
  pm="" mk=""
  if has_flag --pmem-dir; then pm=" --pmem-dir {datadir}/pmem" mk=" {datadir}/pmem"; fi
  size=""
  [[ -n ${BENCH_PMEM_SIZE:-} ]] && has_flag --pmem-size && size=" --pmem-size $BENCH_PMEM_SIZE"
  # Name disk mode explicitly when --help lists "disk" among the --durability choices.
  durdisk=""
  awk '/--durability/ { on = 1 } on && /^  -/ && !/--durability/ { on = 0 } on' <<<"$HELP" | grep -q '"disk"' &&
    durdisk=" --durability disk"
  b=${BASE//\{PMEMDIR_MK\}/$mk}
  targets+=(--target "nbdmirror-disk=$b$durdisk$pm" --export nbdmirror-disk=disk0)
  targets+=(--target "nbdmirror-pmem=$b --durability pmem$pm$size" --export nbdmirror-pmem=disk0)
  say "dist/server.js supports --durability: running nbdmirror-disk and nbdmirror-pmem"
else
  targets+=(--target "nbdmirror-disk=${BASE//\{PMEMDIR_MK\}/}" --export nbdmirror-disk=disk0)
  say "dist/server.js has no --durability flag yet: running nbdmirror-disk only (no nbdmirror-pmem)"
fi

# The mirrored pair: bench/mirror/pair.sh starts the secondary and execs the primary on {port}; both get the
# disk target's flags. The unmirrored figures are nbdmirror-disk's in the same run.
MIRROR=0
if [[ ${BENCH_MIRROR:-1} != 0 ]] && has_flag --peer && has_flag --pmem-dir; then
  MIRROR=1
  targets+=(--target "nbdmirror-mirror=exec bash bench/mirror/pair.sh --server $SERVER --port {port} --datadir {datadir} --size {size} -- --log-level warn${durdisk:-}"
    --export nbdmirror-mirror=disk0)
  say "dist/server.js supports --peer: running nbdmirror-mirror (a mirrored pair) and the resync measurement"
elif [[ ${BENCH_MIRROR:-1} != 0 ]]; then
  say "dist/server.js has no --peer: no nbdmirror-mirror target, no resync measurement"
fi

# Facts for summary.md: which nbdmirror was measured.
ver=$(node -p "require('./package.json').version" 2>/dev/null || echo '?')
if rev=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff-index --quiet HEAD -- 2>/dev/null || rev+=" + uncommitted changes"
else
  rev="not a git checkout"
fi
meta=(--meta "version.nbdmirror=$ver ($rev)" --meta "run.suite=bench/run.sh $*")

say "peers: ${PEERS[*]}; harness: $HARNESS"
# --warm-mib: every server starts on memory the guest has just used (see the harness's warm_before_start).
cmd=(bash "$HARNESS" "${PEERS[@]}" --reps 3 --runtime 5 --ramp 1 --baseline nbdkit-file --max-minutes 60 \
  --warm-mib "${BENCH_WARM_EACH_MIB:-3072}" "${targets[@]}" "${meta[@]}" "${out_args[@]}" "$@")

# The resync measurement, after the harness, in the same run directory, with the harness's --reps and --datadir.
reps=3 datadir=/dev/shm prev=""
for a in "$@"; do
  case $prev in --reps) reps=$a ;; --datadir) datadir=$a ;; esac
  prev=$a
done
rcmd=()
if ((MIRROR)) && [[ ${BENCH_RESYNC:-1} != 0 ]]; then
  rcmd=(bash bench/mirror/resync.sh --out "$OUT" --server "$SERVER" --reps "$reps" --datadir "$datadir")
  [[ ${BENCH_WARM_GIB:-12} == 0 ]] && rcmd+=(--warm-gib 0)
  rcmd+=(--)
  [[ -n ${durdisk:-} ]] && rcmd+=(--durability disk)
fi

# Guest memory warm-up before the harness (bench/lib/warm-memory.sh); BENCH_WARM_GIB=0 skips it. resync.sh,
# which runs some 20 minutes later, does its own.
# shellcheck source=bench/lib/warm-memory.sh
source bench/lib/warm-memory.sh

if [[ -n ${BENCH_DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"; echo
  ((${#rcmd[@]})) && { printf '%q ' "${rcmd[@]}"; echo; }
  exit 0
fi
warm_memory "$datadir" "${BENCH_WARM_GIB:-12}"
[[ -n $WARM_META ]] && cmd+=(--meta "context.memory_warmup=$WARM_META before the run")
rc=0
"${cmd[@]}" || rc=$?
# Interrupted (Ctrl-C, SIGTERM): stop here.
((rc == 130 || rc == 143)) && exit "$rc"
if ((${#rcmd[@]})); then
  say "resync vs nbdcopy: ${rcmd[*]}"
  rrc=0
  "${rcmd[@]}" || rrc=$?
  ((rrc == 130 || rrc == 143)) && exit "$rrc"
  ((rc != 0)) || rc=$rrc
fi
if ((MIRROR)); then
  python3 bench/mirror/report.py "$OUT" >/dev/null || say "bench/mirror/report.py failed"
  say "mirroring: see the Mirroring section of $OUT/summary.md"
fi
exit "$rc"
