#!/usr/bin/env bash
# bench/mirror/pair.sh — a mirrored pair of nbdmirror nodes on loopback, for the harness target nbdmirror-mirror.
#
#   pair.sh --server SERVER.js --port PORT --datadir DIR --size BYTES [--peer-timeout T] [-- NODE FLAGS...]
#
# --peer-timeout defaults to the server's (5 s). A short one (1 s) is not safe here: the FLUSH at the end of
# copy_in makes the secondary write back its whole region, which can take longer than 1 s on a loaded machine,
# and the primary then drops the link and measures the next workloads partly unmirrored.
#
# 1. picks three free ports on 127.0.0.1 (the secondary's NBD and HTTP ports, the primary's HTTP port);
# 2. starts the secondary (node b, --role secondary) in the background: data in DIR/b/data, pmem region in
#    DIR/b/pmem, export disk0=BYTES. It runs under a small guard (this script with --guard) that stops it when
#    the primary is gone (see below);
# 3. waits until the secondary's NBD port accepts connections (it opens last; at most 20 s);
# 4. starts a short-lived watcher in the background that logs how long after the primary opened its NBD port the
#    pair was in sync (stderr, so the harness's server log), or a WARNING if it was not within 30 s;
# 5. execs the primary (node a, --role primary) on 127.0.0.1:PORT with --peer pointing at the secondary.
# NODE FLAGS (e.g. --log-level warn --durability disk) go to both nodes. Both nodes, their logs (stdout and
# stderr, pino JSON lines; "pid" tells the nodes apart), the guard and the watcher stay in this script's process
# group, so the harness's TERM (then KILL) to the group stops them all, and their CPU counts as the server's.
#
# Stopping. The harness sends SIGTERM to the whole group: the primary finishes its clients' requests, flushes
# both nodes and closes the link; the secondary, which got the same SIGTERM, stops once that link is closed
# (a second signal would make it exit without its clean stop, so nothing sends it one). If the primary exits
# by itself or is stopped alone (its PID, not the group), the guard, which runs under `setpriv --pdeathsig
# TERM` and so hears of its parent's death, sends the secondary one SIGTERM 5 s later (SIGKILL 20 s after that).
# SIGTERM or SIGINT to this script before the exec stops the secondary too. Nothing is left behind.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# --guard PRIMARY_PID CMD...: run CMD (the secondary) and stop it once the primary is gone. A SIGTERM to the
# guard comes from the harness's group stop (the secondary got one too and stops by itself once the primary has
# closed the link) or from --pdeathsig as the primary exits. Either way the guard then watches for the primary
# to be gone (the guard has been reparented) and, if the secondary still runs 5 s after that, sends it one
# SIGTERM, and SIGKILL 20 s later. SIGUSR1: stop the secondary now.
if [[ ${1:-} == --guard ]]; then
  set +e
  primary=$2; shift 2
  setpriv --pdeathsig TERM -- "$@" </dev/null &
  spid=$! watching=0 gone=-1 acted=0 deadline=0
  running() { local st; st=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$spid/stat" 2>/dev/null); [[ -n $st && $st != Z ]]; }
  # $$ is this guard ($BASHPID would be the $(...) subshell); its parent is the primary until the primary is gone.
  primary_gone() { [[ $(awk '{ sub(/^.*\) /, ""); print $2 }' "/proc/$$/stat") != "$primary" ]]; }
  stop_it() {
    ((acted)) && return; acted=1
    kill -TERM "$spid" 2>/dev/null && deadline=$((SECONDS + 20))
  }
  trap 'watching=1' TERM
  trap stop_it USR1
  while running; do
    if ((acted)); then
      ((SECONDS >= deadline)) && kill -KILL "$spid" 2>/dev/null
      sleep 0.2
    elif ((watching)); then
      if ((gone < 0)); then primary_gone && gone=$SECONDS; elif ((SECONDS - gone >= 5)); then stop_it; fi
      sleep 0.2
    else
      wait "$spid"           # returns early when a trapped signal arrives
    fi
  done
  wait "$spid"
  exit
fi
SERVER="" PORT="" DIR="" SIZE="" PEER_TIMEOUT=""
die() { printf 'pair.sh: %s\n' "$*" >&2; exit 1; }
while (($#)); do
  case $1 in
    --server) SERVER=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --datadir) DIR=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --peer-timeout) PEER_TIMEOUT=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
EXTRA=("$@")
[[ -n $SERVER && -n $PORT && -n $DIR && -n $SIZE ]] || die "--server, --port, --datadir and --size are required"
[[ -f $SERVER ]] || die "$SERVER not found"

read -r SNBD SHTTP PHTTP < <(python3 "$HERE/repl.py" ports 3) || die "no free ports"
mkdir -p "$DIR/a/data" "$DIR/a/pmem" "$DIR/b/data" "$DIR/b/pmem"
common=(--export "disk0=$SIZE" ${PEER_TIMEOUT:+--peer-timeout "$PEER_TIMEOUT"} "${EXTRA[@]}")

# The guard: the secondary's parent (see "Stopping" above).
setpriv --pdeathsig TERM -- bash "${BASH_SOURCE[0]}" --guard "$$" node --max-semi-space-size=4 "$SERVER" --node-id b --role secondary \
  --listen "127.0.0.1:$SNBD" --http "127.0.0.1:$SHTTP" \
  --peer "nbd://127.0.0.1:$PORT" --peer-http "http://127.0.0.1:$PHTTP" \
  --data-dir "$DIR/b/data" --pmem-dir "$DIR/b/pmem" "${common[@]}" </dev/null &
GPID=$!
# Before the exec: stop the secondary through its guard (SIGUSR1: stop it now), wait for both.
stop_secondary() {
  kill -USR1 "$GPID" 2>/dev/null || return 0
  wait "$GPID" 2>/dev/null || true
}
trap stop_secondary EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

python3 "$HERE/repl.py" wait-up "$SNBD" --timeout 20 --pid "$GPID" >&2 ||
  die "the secondary did not come up"

# Watcher: the harness connects as soon as the primary listens, and a write before the link is up is
# resynced rather than mirrored. This logs when the pair was first seen in sync (an upper bound: a busy primary
# answers status polls late) and how many blocks were written before the link was up (the primary's
# lastResync.blocks; 0 when the harness's copy_in started after the link came up).
(
  python3 "$HERE/repl.py" wait-up "$PORT" --timeout 30 --pid "$$" || exit 0
  t0=$(date +%s.%N)
  r=$(python3 "$HERE/repl.py" wait-sync "http://127.0.0.1:$PHTTP" "http://127.0.0.1:$SHTTP" disk0 \
        --timeout 30 --poll 0.05 --min-connects 1 --pids "$$,$GPID") && ok=1 || ok=0
  at=$(jq -r '.in_sync_at // empty' <<<"$r" 2>/dev/null || true)
  early=$(jq -r '.primary.link.lastResync.blocks // 0' <<<"$r" 2>/dev/null || echo '?')
  if ((ok)); then
    printf 'pair.sh: in sync %.2f s after the primary opened its NBD port; %s blocks written before the link was up were resynced\n' \
      "$(awk -v a="$at" -v b="$t0" 'BEGIN { print a - b }')" "$early" >&2
  else
    printf 'pair.sh: WARNING: not in sync 30 s after the primary opened its NBD port; last seen: %s\n' "$r" >&2
  fi
) </dev/null &

trap - EXIT TERM INT
exec node --max-semi-space-size=4 "$SERVER" --node-id a --role primary \
  --listen "127.0.0.1:$PORT" --http "127.0.0.1:$PHTTP" \
  --peer "nbd://127.0.0.1:$SNBD" --peer-http "http://127.0.0.1:$SHTTP" \
  --data-dir "$DIR/a/data" --pmem-dir "$DIR/a/pmem" "${common[@]}" </dev/null
