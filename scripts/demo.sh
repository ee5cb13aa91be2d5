#!/usr/bin/env bash
# npm run demo: the compose.yaml pair as two processes on loopback, without Docker. node-a starts as primary and
# node-b as secondary, mirroring disk0. The script waits until both nodes are ready and linked, prints their
# URIs and a few commands to try, and on Ctrl-C (SIGINT) or SIGTERM stops both cleanly and exits 0.
#
# The node flags are the compose file's, with loopback addresses instead of container names. Extra arguments
# go to both nodes (e.g. --durability pmem). Settings, from the environment:
#   DEMO_DIR        data dirs, logs and pid files     (default: ${TMPDIR:-/tmp}/nbdmirror-demo; kept between runs)
#   DEMO_NBD_PORT   node-a's NBD port; node-b's is +1 (default: 10809)
#   DEMO_HTTP_PORT  node-a's HTTP port; node-b's is +1 (default: 9810)
#   DEMO_EXPORT     the exports, NAME=SIZE[,NAME=SIZE…] (default: disk0=1G)
#   DEMO_PMEM_SIZE  each node's pmem region          (default: 256M)
#   DEMO_PMEM_DIR   where the regions live, one subdirectory per node (default: the server's, /dev/shm)
#   DEMO_BUILD      auto: run `npm run build` when dist/ is missing or older than the sources; 0: never
#   DEMO_READY_TIMEOUT  seconds to wait for each node to be ready, and for the pair to be linked (default: 60)
#   NODE_A_ROLE     node-a's role at every start (default: primary; set secondary after a failover, as in compose)
#   NBDMIRROR_ADMIN_TOKEN, if set, is passed to both nodes (and read by the nbdmirror CLI).
# Exit codes: 0 stopped by Ctrl-C/SIGTERM; 1 a node failed to start, or both nodes exited; 2 bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${DEMO_DIR:-${TMPDIR:-/tmp}/nbdmirror-demo}
NBD_PORT=${DEMO_NBD_PORT:-10809}
HTTP_PORT=${DEMO_HTTP_PORT:-9810}
EXPORTS=${DEMO_EXPORT:-disk0=1G}
PMEM_SIZE=${DEMO_PMEM_SIZE:-256M}
PMEM_DIR=${DEMO_PMEM_DIR:-}
ROLE_A=${NODE_A_ROLE:-primary}
READY_TIMEOUT_S=${DEMO_READY_TIMEOUT:-60}

for p in "$NBD_PORT" "$HTTP_PORT"; do
  [[ $p =~ ^[0-9]+$ ]] && ((p > 0 && p < 65535)) || { echo "demo: bad port \"$p\"" >&2; exit 2; }
done
EXPORT=${EXPORTS%%=*} # the first export's name, for the URIs shown

if [ "${DEMO_BUILD:-auto}" != 0 ]; then
  if [ ! -f dist/server.js ] || [ -n "$(find server.ts client.ts lib -name '*.ts' -newer dist/server.js -print -quit)" ]; then
    echo "demo: building (npm run build)…"
    npm run --silent build
  fi
fi
[ -f dist/server.js ] || { echo "demo: dist/server.js is missing: run 'npm run build'" >&2; exit 2; }

# Small HTTP helpers (Node's fetch: no curl needed).
#   ready URL PID SECONDS  wait until GET URL/readyz is 200 (/healthz while /readyz is 404); fail if PID dies
#   linked URL_A URL_B SECONDS  wait until one node is primary of every export, linked, with nothing left
#                               to resync, and the other is UpToDate; prints nothing, fails on timeout
#   role URL               print the role of the first export (or "?")
read -r -d '' JS <<'EOF' || true
const [cmd, ...a] = process.argv.slice(1);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const get = async (url) => {
  const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
  const text = await res.text();
  return { status: res.status, text };
};
const alive = (pid) => {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return require('fs').readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0] !== 'Z';
  } catch {
    return true;
  }
};
const status = async (base) => JSON.parse((await get(`${base}/v1/status`)).text);
const exportsOf = (s) => s?.replication?.exports ?? [];
(async () => {
  if (cmd === 'ready') {
    const [base, pid, secs] = [a[0], Number(a[1]), Number(a[2])];
    const deadline = Date.now() + secs * 1000;
    let path = '/readyz';
    while (Date.now() < deadline) {
      if (!alive(pid)) process.exit(3);
      try {
        const r = await get(base + path);
        if (r.status === 200) process.exit(0);
        if (r.status === 404 && path === '/readyz') path = '/healthz';
      } catch {}
      await sleep(100);
    }
    process.exit(1);
  } else if (cmd === 'linked') {
    const [x, y, secs] = [a[0], a[1], Number(a[2])];
    const deadline = Date.now() + secs * 1000;
    while (Date.now() < deadline) {
      try {
        const [sx, sy] = [await status(x), await status(y)];
        for (const [p, s] of [[sx, sy], [sy, sx]]) {
          const pe = exportsOf(p);
          const ok = pe.length > 0 && pe.every((e) => e.role === 'primary' && e.link?.state === 'connected' && (e.outOfSync?.blocks ?? 0) === 0);
          if (ok && exportsOf(s).every((e) => e.disk === 'UpToDate')) process.exit(0);
        }
      } catch {}
      await sleep(200);
    }
    process.exit(1);
  } else if (cmd === 'role') {
    try {
      process.stdout.write(String(exportsOf(await status(a[0]))[0]?.role ?? '?'));
    } catch {
      process.stdout.write('?');
    }
  }
})();
EOF

mkdir -p "$DIR/a" "$DIR/b"
PIDS=()
NAMES=()

alive() { kill -0 "$1" 2>/dev/null && [ "$(sed -E 's/.*\) (.).*/\1/' "/proc/$1/stat" 2>/dev/null || echo R)" != Z ]; }

# SIGTERM both nodes and wait for them; SIGKILL what is still running after 60 s.
stop_nodes() {
  local p i
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for ((i = 0; i < 600; i++)); do
    local any=0
    for p in "${PIDS[@]}"; do alive "$p" && any=1; done
    [ "$any" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do
    if alive "$p"; then
      echo "demo: pid $p did not stop within 60 s: killing it" >&2
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  rm -f "$DIR/node-a.pid" "$DIR/node-b.pid"
  PIDS=()
}

on_signal() {
  trap '' INT TERM
  echo
  echo "demo: stopping both nodes…"
  stop_nodes
  echo "demo: stopped (data kept in $DIR)"
  exit 0
}
trap on_signal INT TERM
trap 'stop_nodes' EXIT

# node NAME SELF_NBD SELF_HTTP PEER_NBD PEER_HTTP [FLAGS…]: start one node in its own session, so that a Ctrl-C
# in the terminal reaches only this script (a second signal would make the server exit without flushing).
start_node() {
  local name=$1 nbd=$2 http=$3 peer_nbd=$4 peer_http=$5
  shift 5
  local args=(--node-id "node-$name" --listen "127.0.0.1:$nbd" --http "127.0.0.1:$http" --data-dir "$DIR/$name"
    --export "$EXPORTS" --pmem-size "$PMEM_SIZE"
    --peer "nbd://127.0.0.1:$peer_nbd" --peer-http "http://127.0.0.1:$peer_http")
  [ -n "$PMEM_DIR" ] && mkdir -p "$PMEM_DIR/$name" && args+=(--pmem-dir "$PMEM_DIR/$name")
  local launcher=()
  command -v setsid >/dev/null && launcher=(setsid)
  "${launcher[@]}" node --max-semi-space-size=4 dist/server.js "${args[@]}" "$@" >"$DIR/node-$name.log" 2>&1 </dev/null &
  PIDS+=("$!")
  NAMES+=("node-$name")
  echo "$!" >"$DIR/node-$name.pid"
}

A_NBD=$NBD_PORT B_NBD=$((NBD_PORT + 1)) A_HTTP=$HTTP_PORT B_HTTP=$((HTTP_PORT + 1))
# As in compose.yaml: node-a takes NODE_A_ROLE (primary) at every start; node-b has no --role, so a new
# export starts secondary there and later starts keep the stored role.
start_node a "$A_NBD" "$A_HTTP" "$B_NBD" "$B_HTTP" --role "$ROLE_A" "$@"
start_node b "$B_NBD" "$B_HTTP" "$A_NBD" "$A_HTTP" "$@"

for i in 0 1; do
  name=${NAMES[$i]}
  port=$([ "$i" = 0 ] && echo "$A_HTTP" || echo "$B_HTTP")
  if ! node -e "$JS" ready "http://127.0.0.1:$port" "${PIDS[$i]}" "$READY_TIMEOUT_S"; then
    echo "demo: $name did not become ready; the end of $DIR/$name.log:" >&2
    tail -n 20 "$DIR/$name.log" >&2 || true
    exit 1
  fi
done
if ! node -e "$JS" linked "http://127.0.0.1:$A_HTTP" "http://127.0.0.1:$B_HTTP" "$READY_TIMEOUT_S"; then
  echo "demo: warning: the nodes are not linked and in sync yet (see $DIR/node-a.log, $DIR/node-b.log, and status below)" >&2
fi
ROLE_SHOWN_A=$(node -e "$JS" role "http://127.0.0.1:$A_HTTP")
ROLE_SHOWN_B=$(node -e "$JS" role "http://127.0.0.1:$B_HTTP")

CLI="node dist/client.js"
cat <<MSG

nbdmirror demo: two nodes on loopback mirroring $EXPORTS (data, logs and pid files in $DIR)

  node-a  $(printf '%-9s' "$ROLE_SHOWN_A")  nbd://127.0.0.1:$A_NBD/$EXPORT  http://127.0.0.1:$A_HTTP  pid ${PIDS[0]}  log $DIR/node-a.log
  node-b  $(printf '%-9s' "$ROLE_SHOWN_B")  nbd://127.0.0.1:$B_NBD/$EXPORT  http://127.0.0.1:$B_HTTP  pid ${PIDS[1]}  log $DIR/node-b.log

  metrics:  http://127.0.0.1:$A_HTTP/metrics   http://127.0.0.1:$B_HTTP/metrics
  status:   http://127.0.0.1:$A_HTTP/v1/status  http://127.0.0.1:$B_HTTP/v1/status

Try, in another terminal:
  nbdinfo nbd://127.0.0.1:$A_NBD/$EXPORT
  nbdcopy --flush SOME.img nbd://127.0.0.1:$A_NBD/$EXPORT          # write through the primary
  $CLI status --watch --http http://127.0.0.1:$A_HTTP
  kill -9 \$(cat $DIR/node-a.pid)                                  # lose the primary
  $CLI promote $EXPORT --http http://127.0.0.1:$B_HTTP             # fail over to node-b
  nbdcopy nbd://127.0.0.1:$B_NBD/$EXPORT - | head -c \$(stat -c %s SOME.img) | cmp - SOME.img   # the data is there

Ctrl-C stops both nodes.
MSG

# Report a node that exits by itself; end when both have.
declare -A reported=()
while :; do
  left=0
  for i in 0 1; do
    if alive "${PIDS[$i]}"; then
      left=$((left + 1))
    elif [ -z "${reported[$i]:-}" ]; then
      reported[$i]=1
      echo "demo: ${NAMES[$i]} (pid ${PIDS[$i]}) has exited; see $DIR/${NAMES[$i]}.log"
    fi
  done
  [ "$left" = 0 ] && break
  sleep 0.5
done
echo "demo: both nodes have exited" >&2
exit 1
