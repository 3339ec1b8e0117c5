#!/usr/bin/env bash
# Cold-start benchmark, in one run: how long after launch Tandem's relay and
# the Node sync server (official automerge-repo 2.5.6 packages,
# tests/js/bench-sync-server.mjs) complete the first sync of one document
# from a store of DOCS documents. Both stores hold the very same documents
# under the same ids: `tandem-loadgen seed` writes the Tandem store and
# exports them, relay/bench/seed-node-store.mjs imports them into a
# NodeFSStorageAdapter directory. `tandem-loadgen cold-start` (a separate
# process) launches each server RUNS times, connecting from the moment of
# launch, and reports the median. Two ways to connect, both timed:
#
# - one client: retries until a connection is accepted, then waits on it
#   (what an automerge-repo client does; a server that accepts before it can
#   answer leaves it waiting);
# - probing: while accepted connections wait, another is opened every
#   PROBE_MS; the first served shows when the server could first serve.
#
#   relay/bench/coldstart.sh               # seeding the Node store takes minutes
#   RUNS=9 SEED_DIR=/tmp/seed relay/bench/coldstart.sh   # seeds once, then reuses
#
# Page caches are warm (the stores were just written or read); the files are
# the project's disk. Needs the Rust toolchain, Node 20, `npm ci` in tests/js.
# The JSON reports and server logs stay in $BENCH_OUT (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/../.."

DOCS=${DOCS:-10000}
RUNS=${RUNS:-5}
PROBE_MS=${PROBE_MS:-20}
OUT=${BENCH_OUT:-$(mktemp -d -t tandem-coldstart.XXXXXX)}
SEED=${SEED_DIR:-$OUT/seed}
mkdir -p "$OUT"

source relay/bench/common.sh
build

if [ -f "$SEED/seeded-$DOCS" ]; then
  echo "== reusing the stores in $SEED"
else
  echo "== seed $DOCS documents"
  rm -rf "$SEED"
  mkdir -p "$SEED"
  "$BIN/tandem-loadgen" seed --data "$SEED/tandem" --docs "$DOCS" --export "$SEED/docs.jsonl" >"$SEED/doc.txt"
  echo "   Tandem store written; importing the same documents into the Node store"
  start=$(date +%s)
  node relay/bench/seed-node-store.mjs "$SEED/docs.jsonl" "$SEED/node"
  echo "   Node store written in $(($(date +%s) - start)) s"
  touch "$SEED/seeded-$DOCS"
fi
DOC=$(cat "$SEED/doc.txt")
echo "   requesting $DOC"

# cold NAME MODE [--probe-ms N]: time RUNS launches of the server NAME.
cold() {
  local name=$1 mode=$2
  shift 2
  local cmd
  case $name in
    tandem) cmd=("$BIN/tandem" serve --allow-anonymous --listen '127.0.0.1:{port}' --data "$SEED/tandem") ;;
    node) cmd=(node tests/js/bench-sync-server.mjs "$SEED/node" '{port}') ;;
  esac
  echo "== $name, $mode"
  if ! "$BIN/tandem-loadgen" cold-start --doc "$DOC" --runs "$RUNS" --label "$name" --json \
    --server-log "$OUT/$name-$mode.log" "$@" -- "${cmd[@]}" >"$OUT/$name-$mode.json"; then
    echo "FAILED: cold start of $name ($mode); server log $OUT/$name-$mode.log" >&2
    exit 1
  fi
}

cold tandem single
cold node single
cold node probe --probe-ms "$PROBE_MS"
cold tandem probe --probe-ms "$PROBE_MS"

echo
echo "== summary (ratios are tandem/node; reports in $OUT)"
echo "-- one client"
"$BIN/tandem-loadgen" --compare "$OUT/tandem-single.json" "$OUT/node-single.json"
echo
echo "-- probing every $PROBE_MS ms"
"$BIN/tandem-loadgen" --compare "$OUT/tandem-probe.json" "$OUT/node-probe.json"
