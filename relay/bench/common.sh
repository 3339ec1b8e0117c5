# Shared by the relay benchmark scripts (sourced, not run): build, start and
# stop a server, clean up on exit. Expects OUT (a directory) to be set and the
# working directory to be the repository root.

BIN=target/release
SERVER_PID=""

cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# build: the relay and the load generator in release; the Node packages.
build() {
  echo "== build (release)"
  cargo build --release -p tandem-relay --bin tandem --bin tandem-loadgen
  if [ ! -d tests/js/node_modules/@automerge/automerge-repo-storage-nodefs ]; then
    echo "== npm ci in tests/js"
    npm ci --prefix tests/js --no-audit --no-fund
  fi
}

# start_server NAME COMMAND...: start it in the background, wait (at most
# 15 s) for the ws://HOST:PORT it prints, set SERVER_PID and SERVER_URL.
start_server() {
  local name=$1
  shift
  "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  SERVER_PID=$!
  SERVER_URL=""
  for _ in $(seq 1 150); do
    SERVER_URL=$(grep -o 'ws://[0-9.]*:[0-9][0-9]*' "$OUT/$name.stdout" 2>/dev/null | head -1 || true)
    [ -n "$SERVER_URL" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
  if [ -z "$SERVER_URL" ]; then
    echo "FAILED: the $name server did not start (command: $*)" >&2
    echo "--- stdout:" >&2
    cat "$OUT/$name.stdout" >&2 || true
    echo "--- stderr:" >&2
    tail -n 50 "$OUT/$name.stderr" >&2 || true
    exit 1
  fi
  echo "$name server (pid $SERVER_PID) listening on $SERVER_URL"
}

# stop_server: SIGTERM, wait at most 10 s, then SIGKILL.
stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "warning: server $SERVER_PID ignored SIGTERM for 10 s; killing it" >&2
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# require_alive NAME: fail if the server died.
require_alive() {
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "FAILED: the $1 server died during the run" >&2
    tail -n 50 "$OUT/$1.stderr" >&2 || true
    exit 1
  fi
}
