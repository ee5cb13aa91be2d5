#!/usr/bin/env bash
# Two nbdmirror nodes on loopback, mirroring disk0: node a primary (NBD 127.0.0.1:10809, HTTP :9810), node b
# secondary (NBD :10810, HTTP :9811). Data under ${DEMO_DIR:-./demo-data}. Ctrl-C stops both cleanly.
# Build first (npm run build). Extra flags after the script name go to both nodes, e.g. --export disk0=256M.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DEMO_DIR:-./demo-data}
mkdir -p "$DIR/a" "$DIR/b"
[ -f dist/server.js ] || { echo "two-nodes: run 'npm run build' first" >&2; exit 2; }

node dist/server.js --node-id a --role primary --listen 127.0.0.1:10809 --http 127.0.0.1:9810 \
  --data-dir "$DIR/a" --pmem-dir "$DIR/a" --pmem-size 64M \
  --peer nbd://127.0.0.1:10810 --peer-http http://127.0.0.1:9811 "$@" >"$DIR/a.log" 2>&1 &
A=$!
node dist/server.js --node-id b --role secondary --listen 127.0.0.1:10810 --http 127.0.0.1:9811 \
  --data-dir "$DIR/b" --pmem-dir "$DIR/b" --pmem-size 64M \
  --peer nbd://127.0.0.1:10809 --peer-http http://127.0.0.1:9810 "$@" >"$DIR/b.log" 2>&1 &
B=$!
stop() { kill -TERM "$A" "$B" 2>/dev/null || true; wait "$A" "$B" 2>/dev/null || true; }
trap stop EXIT INT TERM

cat <<MSG
node a (primary):   nbd://127.0.0.1:10809/disk0   http://127.0.0.1:9810   pid $A   log $DIR/a.log
node b (secondary): nbd://127.0.0.1:10810/disk0   http://127.0.0.1:9811   pid $B   log $DIR/b.log
try:
  node dist/client.js status --http http://127.0.0.1:9810
  nbdcopy --flush SOME.img nbd://127.0.0.1:10809/disk0
  node dist/client.js promote disk0 --http http://127.0.0.1:9811   # after stopping node a
Ctrl-C stops both.
MSG
wait "$A" "$B"
