#!/usr/bin/env bash
# Fan-out benchmark, in one run: Tandem's relay and the Node sync server
# (official automerge-repo 2.5.6 packages, tests/js/bench-sync-server.mjs),
# each on 127.0.0.1 with a fresh data directory, loaded by the same load
# generator (relay/src/bin/tandem-loadgen.rs) from a separate process:
# 1 writer and READERS readers on one document, the writer at RATE changes/s
# for PHASE_SECS, then as fast as it can for PHASE_SECS. The load generator
# samples the server's CPU and RSS from /proc every 500 ms. The relay runs
# with --allow-anonymous: the Node server has no authentication either.
#
#   relay/bench/fanout.sh            # about a minute
#   READERS=50 RATE=1000 PHASE_SECS=10 DRAIN_SECS=10 relay/bench/fanout.sh
#   TANDEM_LOG=info,automerge=warn relay/bench/fanout.sh   # RUST_LOG for the relay
#   TANDEM_SYNC_WINDOW=1 relay/bench/fanout.sh   # the relay with flow control
#                                                 (tandem serve --sync-window)
#   STAMP=field relay/bench/fanout.sh   # send time in the document beside v
#                                         (default: in each change's message)
#   RECORDS=20 relay/bench/fanout.sh    # writes spread over 20 records
#                                         (default 0: one key at the root)
#
# Needs what .ci/run installs: the Rust toolchain, Node 20, `npm ci` in tests/js.
# The JSON reports and server logs stay in $BENCH_OUT (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/../.."

READERS=${READERS:-50}
RATE=${RATE:-100}
PHASE_SECS=${PHASE_SECS:-10}
DRAIN_SECS=${DRAIN_SECS:-10}
STAMP=${STAMP:-message}
RECORDS=${RECORDS:-0}
OUT=${BENCH_OUT:-$(mktemp -d -t tandem-fanout.XXXXXX)}
mkdir -p "$OUT"

source relay/bench/common.sh
build

# bench NAME: run the load generator against the started server.
bench() {
  local name=$1
  echo "== load: $name"
  if ! "$BIN/tandem-loadgen" --url "$SERVER_URL" --server-pid "$SERVER_PID" \
    --label "$name" --readers "$READERS" --rate "$RATE" \
    --phase-secs "$PHASE_SECS" --drain-secs "$DRAIN_SECS" --stamp "$STAMP" --records "$RECORDS" --json >"$OUT/$name.json"; then
    echo "FAILED: the load generator failed against $name" >&2
    tail -n 20 "$OUT/$name.stderr" >&2 || true
    exit 1
  fi
  require_alive "$name"
}

echo "== tandem relay"
mkdir -p "$OUT/tandem-data"
if [ -n "${TANDEM_LOG:-}" ]; then
  start_server tandem env RUST_LOG="$TANDEM_LOG" "$BIN/tandem" serve --listen 127.0.0.1:0 --allow-anonymous --data "$OUT/tandem-data"
else
  start_server tandem "$BIN/tandem" serve --listen 127.0.0.1:0 --allow-anonymous --data "$OUT/tandem-data"
fi
bench tandem
stop_server

echo "== node sync server (automerge-repo 2.5.6)"
mkdir -p "$OUT/node-data"
start_server node node tests/js/bench-sync-server.mjs "$OUT/node-data"
bench node
stop_server

echo
echo "== summary (ratios are tandem/node; reports in $OUT)"
"$BIN/tandem-loadgen" --compare "$OUT/tandem.json" "$OUT/node.json"
