#!/usr/bin/env bash
# Benchmarks (never part of the test suite's pass/fail). Installs what they need (Dovecot,
# SecantusDB, the Node.js peers), builds mailpump and its two ceiling helpers in release mode,
# then runs deploy/bench.py, which starts its own Dovecot and SecantusDB (or uses MONGODB_URI)
# on 127.0.0.1, runs the scenarios, prints one table per scenario and writes bench-results.json.
#   bash deploy/bench.sh                      every scenario at its default size
#   bash deploy/bench.sh backfill [N]         N messages (10,000): mailpump vs ceilings vs peers
#   bash deploy/bench.sh latency [N]          N deliveries (100) to an idling daemon
#   bash deploy/bench.sh scale [N]            N mailboxes (1,000) held open by one daemon
#   bash deploy/bench.sh big [MB]             one message of MB megabytes (50)
#   bash deploy/bench.sh verify [N]           one mailbox of N messages (100,000) synced, then
#                                             `mailpump verify` timed (twice, then --deep)
#   bash deploy/bench.sh folders [A] [F] [M]  A accounts (10) x F folders (100) of M messages (3),
#                                             mailboxes = ["*"]: connections, RSS, NOTIFY latency
#   bash deploy/bench.sh mirror [N]           N messages (10,000): flag/expunge latency, quiet wake-up, flag scan
#   bash deploy/bench.sh failover [N]         N mailboxes (300) over 3 replicas ([cluster]): kill -9 to
#                                             every orphan served, rebalance after the restart
#   bash deploy/bench.sh instructions [N]     N messages (2,000): instructions per message (valgrind
#                                             callgrind) of sync and the two ceilings (not in "all")
# See BENCHMARKS.md for the latest figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=deploy/services.sh
source deploy/services.sh
mp_install
command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
[ "${1:-}" != instructions ] || command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
command -v node >/dev/null || apt-get install -y -qq nodejs npm >/dev/null
PEERS=${XDG_CACHE_HOME:-$HOME/.cache}/mailpump/peers
mkdir -p "$PEERS"
cp deploy/peers/package.json "$PEERS/"
if [ ! -d "$PEERS/node_modules/imapflow" ]; then
  echo "== installing the Node.js peers into $PEERS"
  (cd "$PEERS" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
echo "== building mailpump and the ceiling helpers (release)"
cargo build --release --quiet --bin mailpump --example fetch_ceiling --example store_ceiling
export MAILPUMP_BIN_DIR=${CARGO_TARGET_DIR:-$PWD/target}/release MAILPUMP_PEERS=$PEERS MAILPUMP_VENV=$MP_VENV
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec "$MP_VENV/bin/python" deploy/bench.py "$@"
