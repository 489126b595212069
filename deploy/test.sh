#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with a Rust toolchain:
#   - installs what it needs (Dovecot, OpenSSL headers, the SecantusDB venv) and unpacks Cyrus
#     and Courier IMAP into a cache,
#   - starts SecantusDB on 127.0.0.1 with its state in a temp dir (unless
#     MAILPUMP_TEST_MONGODB_URI already points at a MongoDB),
#   - runs cargo fmt --check, clippy -D warnings, and every test (each integration test starts
#     its own Dovecot under the same temp dir),
#   - stops every process it started, by PID, even on failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=deploy/services.sh
source deploy/services.sh

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
mp_install
# Cyrus and Courier for the servers tests: unpacked into a cache, never installed (they conflict
# with dovecot-imapd as packages). A few seconds the first time, instant after.
mp_cyrus_install
mp_courier_install

WORK=$(mktemp -d /tmp/mailpump-test.XXXXXX)
chmod 755 "$WORK"
export MAILPUMP_TEST_TMP=$WORK
SECANTUS_PID=""
WATCH_PID=""
TEST_PID=""

cleanup() {
  local rc=$?
  set +e
  # the tests first (cargo leads its own process group: the test binary and the daemons it
  # started go with it), so that nothing starts anew while the rest is stopped
  # (after a normal end the group is empty and there is nothing to wait for)
  if [ -n "$TEST_PID" ] && kill -TERM -- "-$TEST_PID" 2>/dev/null; then
    sleep 1
    kill -KILL -- "-$TEST_PID" 2>/dev/null
  fi
  [ -n "$WATCH_PID" ] && kill "$WATCH_PID" 2>/dev/null
  # Dovecots (and Cyruses, Courier namespaces, databases of their own: DIR/pid) of tests that
  # died before their Drop ran, and daemons whose test was killed: each left its PID file.
  local pidfile
  for pidfile in "$WORK"/*/run/master.pid "$WORK"/*/pid "$WORK"/daemons/*; do
    [ -f "$pidfile" ] && mp_stop_pid "$(cat "$pidfile")"
  done
  [ -n "$SECANTUS_PID" ] && mp_stop_pid "$SECANTUS_PID"
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== deploy manifests"; bash deploy/validate-deploy.sh

if [ -z "${MAILPUMP_TEST_MONGODB_URI:-}" ]; then
  port=$(mp_free_port)
  SECANTUS_PID=$(mp_secantus_start "$WORK/secantus" "$port")
  # Pooled connections idle for more than 5 s are closed: SecantusDB keeps each connection's
  # last read snapshot until that connection's next read, and old snapshots pinned by idle
  # connections are what its cache cannot evict while gigabytes are written.
  export MAILPUMP_TEST_MONGODB_URI="mongodb://127.0.0.1:$port/?maxIdleTimeMS=5000"
  echo "== SecantusDB on 127.0.0.1:$port (pid $SECANTUS_PID)"
fi

echo "== cargo test"
# in a process group of its own, which the cleanup and the watchdog stop as a whole
setsid -w cargo test --locked -- "$@" &
TEST_PID=$!
if [ -n "$SECANTUS_PID" ]; then
  mp_db_watch "$port" "$SECANTUS_PID" "$TEST_PID" "$WORK/../mailpump-db-stall.txt" &
  WATCH_PID=$!
fi
wait "$TEST_PID"
