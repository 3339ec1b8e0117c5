#!/usr/bin/env bash
# Idle-connection memory benchmark, in one run: Tandem's relay and the Node
# sync server (official automerge-repo 2.5.6 packages,
# tests/js/bench-sync-server.mjs), each on 127.0.0.1 with a fresh data
# directory, loaded by `tandem-loadgen idle` from a separate process: CLIENTS
# clients connect, each completes the join/peer handshake and loads one
# document, then stays idle. Memory per connection is the server's VmRSS with
# the clients minus before them, over the clients. ROUNDS rounds alternate
# the two servers (Tandem first in odd rounds, Node first in even ones).
#
#   relay/bench/idle.sh                    # about a minute
#   CLIENTS=1000 ROUNDS=3 relay/bench/idle.sh
#   NO_REQUEST=1 relay/bench/idle.sh       # handshake only, no document
#
# Needs the Rust toolchain, Node 20, `npm ci` in tests/js, and a file
# descriptor limit above CLIENTS (raised here if the hard limit allows).
# The JSON reports and server logs stay in $BENCH_OUT (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLIENTS=${CLIENTS:-1000}
ROUNDS=${ROUNDS:-1}
SETTLE_SECS=${SETTLE_SECS:-3}
OUT=${BENCH_OUT:-$(mktemp -d -t tandem-idle.XXXXXX)}
mkdir -p "$OUT"

# Each side holds CLIENTS sockets, plus files and a margin.
need=$((CLIENTS + 256))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  if ! ulimit -n "$need" 2>/dev/null; then
    echo "FAILED: ulimit -n is $(ulimit -n) and cannot be raised to $need (hard limit $(ulimit -Hn))" >&2
    exit 1
  fi
fi

source relay/bench/common.sh
build

extra=()
if [ -n "${NO_REQUEST:-}" ]; then
  extra+=(--no-request)
fi

# measure NAME ROUND COMMAND...: start the server, run the load generator, stop it.
measure() {
  local name=$1 round=$2
  shift 2
  echo "== $name (round $round)"
  rm -rf "$OUT/$name-data-$round"
  mkdir -p "$OUT/$name-data-$round"
  start_server "$name" "$@" "$OUT/$name-data-$round"
  if ! "$BIN/tandem-loadgen" idle --url "$SERVER_URL" --server-pid "$SERVER_PID" \
    --clients "$CLIENTS" --settle-secs "$SETTLE_SECS" --label "$name" --json "${extra[@]}" \
    >"$OUT/$name-$round.json"; then
    echo "FAILED: the load generator failed against $name" >&2
    tail -n 20 "$OUT/$name.stderr" >&2 || true
    exit 1
  fi
  require_alive "$name"
  stop_server
}

tandem() { measure tandem "$1" "$BIN/tandem" serve --listen 127.0.0.1:0 --allow-anonymous --data; }
node_server() { measure node "$1" node tests/js/bench-sync-server.mjs; }

for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then
    tandem "$round"
    node_server "$round"
  else
    node_server "$round"
    tandem "$round"
  fi
done

echo
echo "== summary (ratios are tandem/node; reports in $OUT)"
for round in $(seq 1 "$ROUNDS"); do
  echo "-- round $round"
  "$BIN/tandem-loadgen" --compare "$OUT/tandem-$round.json" "$OUT/node-$round.json"
done
