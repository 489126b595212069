#!/usr/bin/env bash
# Backfill benchmark: `mailpump sync` of an N-message mailbox (default 10,000) beside the
# server's own ceiling (a bare `UID FETCH 1:* BODY.PEEK[]` read by a raw socket) in the same
# run. Starts its own Dovecot and SecantusDB (or uses MONGODB_URI), seeds generated mail
# straight into the Maildir, prints a table and writes bench-results.json. Not part of the
# test suite.
#   bash deploy/bench.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=deploy/services.sh
source deploy/services.sh
N=${1:-10000}
OUT=${BENCH_OUT:-bench-results.json}

mp_install
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
echo "== building mailpump (release)"
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/mailpump

WORK=$(mktemp -d /tmp/mailpump-bench.XXXXXX)
chmod 755 "$WORK"
DOVECOT_PID="" SECANTUS_PID=""
cleanup() {
  local rc=$?
  [ -n "$DOVECOT_PID" ] && mp_stop_pid "$DOVECOT_PID"
  [ -n "$SECANTUS_PID" ] && mp_stop_pid "$SECANTUS_PID"
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMAP=$(mp_free_port)
mp_dovecot_config "$WORK/dovecot" "$IMAP" "$(mp_free_port)" "$(mp_free_port)" "$(mp_free_port)"
mp_add_user "$WORK/dovecot" bench bench-pw 20900
echo "== seeding $N messages"
SEED=$(python3 deploy/bench_mail.py seed "$WORK/dovecot/home/bench/Maildir" 20900 "$N")
dovecot -c "$WORK/dovecot/dovecot.conf" </dev/null >/dev/null 2>&1
for _ in $(seq 1 100); do [ -s "$WORK/dovecot/run/master.pid" ] && break; sleep 0.05; done
DOVECOT_PID=$(cat "$WORK/dovecot/run/master.pid")
if [ -n "${MONGODB_URI:-}" ]; then
  URI=$MONGODB_URI DBKIND="MongoDB at MONGODB_URI"
else
  DB=$(mp_free_port)
  SECANTUS_PID=$(mp_secantus_start "$WORK/db" "$DB")
  URI="mongodb://127.0.0.1:$DB" DBKIND="SecantusDB $MP_SECANTUS_VERSION (standalone)"
fi

echo "== server ceiling: bare UID FETCH 1:* BODY.PEEK[] (warm-up, then measured)"
python3 deploy/bench_mail.py fetch "$IMAP" bench bench-pw >/dev/null
FETCH=$(python3 deploy/bench_mail.py fetch "$IMAP" bench bench-pw)

cat > "$WORK/mailpump.toml" <<TOML
[store]
uri = "$URI"
database = "bench"
[accounts.bench]
host = "127.0.0.1"
port = $IMAP
security = "plain"
username = "bench"
password = "bench-pw"
TOML
echo "== mailpump sync"
/usr/bin/time -f '%M %e' -o "$WORK/time1" "$BIN" --config "$WORK/mailpump.toml" sync > "$WORK/sync1.log"
/usr/bin/time -f '%M %e' -o "$WORK/time2" "$BIN" --config "$WORK/mailpump.toml" sync > "$WORK/sync2.log"

python3 - "$SEED" "$FETCH" "$WORK" "$URI" "$OUT" "$DBKIND" "$MP_VENV" <<'PY'
import json, os, platform, subprocess, sys
seed, fetch, work, uri, out, dbkind, venv = sys.argv[1:]
seed, fetch = json.loads(seed), json.loads(fetch)
def summary(path):
    for line in open(path):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("message") in ("mailbox_synced", "mailbox_sync_failed"):
            return e
    raise SystemExit("no summary in " + path)
s1, s2 = summary(work + "/sync1.log"), summary(work + "/sync2.log")
rss1, wall1 = open(work + "/time1").read().split()
count = subprocess.run([venv + "/bin/python", "-c",
    "import pymongo,sys; print(pymongo.MongoClient(sys.argv[1]).bench.messages.count_documents({}))", uri],
    capture_output=True, text=True, check=True).stdout.strip()
mb = seed["bytes"] / 1e6
t_fetch = fetch["elapsed_s"]
t_sync = s1["elapsed_ms"] / 1000
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
res = {
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "database": dbkind},
    "mailbox": {"messages": seed["messages"], "bytes": seed["bytes"]},
    "bare_fetch": {"seconds": round(t_fetch, 3), "msg_per_s": round(seed["messages"] / t_fetch), "mb_per_s": round(mb / t_fetch, 1)},
    "mailpump_sync": {"seconds": round(t_sync, 3), "msg_per_s": round(seed["messages"] / t_sync), "mb_per_s": round(mb / t_sync, 1),
                      "peak_rss_mb": round(int(rss1) / 1024, 1), "stored": s1.get("stored"), "wall_s": float(wall1)},
    "second_sync": {"fetched": s2.get("fetched"), "stored": s2.get("stored")},
    "documents_in_db": int(count),
}
json.dump(res, open(out, "w"), indent=2)
print()
print("machine: %s, %d cores; database: %s" % (cpu, os.cpu_count(), dbkind))
print("mailbox: %d messages, %.1f MB" % (seed["messages"], mb))
print("%-34s %9s %9s %8s %10s" % ("", "seconds", "msg/s", "MB/s", "peak RSS"))
print("%-34s %9.2f %9d %8.1f %10s" % ("bare UID FETCH 1:* (server ceiling)", t_fetch, seed["messages"] / t_fetch, mb / t_fetch, "-"))
print("%-34s %9.2f %9d %8.1f %7.1f MB" % ("mailpump sync (fetch+parse+store)", t_sync, seed["messages"] / t_sync, mb / t_sync, int(rss1) / 1024))
print("stored %s documents (database holds %s); second sync fetched %s, stored %s" % (s1.get("stored"), count, s2.get("fetched"), s2.get("stored")))
print("wrote", out)
PY
