#!/usr/bin/env bash
# Benchmarks (not part of the test suite). Each starts its own Dovecot and SecantusDB (or uses
# MONGODB_URI), prints a table and writes a JSON file.
#   bash deploy/bench.sh [backfill] [N]   `mailpump sync` of an N-message mailbox (default
#       10,000, seeded straight into the Maildir) beside the server's ceiling, a bare
#       `UID FETCH 1:* BODY.PEEK[]` read by a raw socket, in the same run
#   bash deploy/bench.sh latency [N]      the daemon idling; N messages (default 100) delivered
#       one at a time at random intervals; delivery->stored percentiles beside the server's own
#       delivery->EXISTS delay seen by a bare IDLE client in the same run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=deploy/services.sh
source deploy/services.sh
SCENARIO=backfill
case "${1:-}" in backfill|latency) SCENARIO=$1; shift ;; esac
if [ "$SCENARIO" = latency ]; then N=${1:-100}; else N=${1:-10000}; fi
OUT=${BENCH_OUT:-bench-$SCENARIO.json}

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

IMAP=$(mp_free_port) POP3=$(mp_free_port)
mp_dovecot_config "$WORK/dovecot" "$IMAP" "$(mp_free_port)" "$POP3" "$(mp_free_port)"
mp_add_user "$WORK/dovecot" bench bench-pw 20900
if [ "$SCENARIO" = backfill ]; then
  echo "== seeding $N messages"
  SEED=$(python3 deploy/bench_mail.py seed "$WORK/dovecot/home/bench/Maildir" 20900 "$N")
fi
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

if [ "$SCENARIO" = latency ]; then
  cat > "$WORK/mailpump.toml" <<TOML
[store]
uri = "$URI"
database = "latency"
[accounts.bench]
host = "127.0.0.1"
port = $IMAP
security = "plain"
username = "bench"
password = "bench-pw"
TOML
  "$BIN" --config "$WORK/mailpump.toml" run > "$WORK/run.log" &
  DAEMON=$!
  for _ in $(seq 1 200); do grep -q '"watching"' "$WORK/run.log" && break; sleep 0.05; done
  echo "== delivering $N messages one at a time"
  RES=$("$MP_VENV/bin/python" deploy/bench_mail.py latency "$IMAP" bench bench-pw "$WORK/dovecot/home/bench/Maildir" 20900 "$N" "$URI" latency)
  kill -TERM "$DAEMON"; wait "$DAEMON" || true
  echo "$RES" > "$OUT"
  python3 - "$RES" "$DBKIND" <<'PY'
import json, os, sys
r = json.loads(sys.argv[1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print("\nmachine: %s, %d cores; database: %s" % (cpu, os.cpu_count(), sys.argv[2]))
print("%d deliveries, %d stored" % (r["deliveries"], r["stored"]))
print("%-44s %8s %8s %8s %8s" % ("milliseconds after delivery", "p50", "p95", "p99", "max"))
for label, k in (("Dovecot's EXISTS to a bare IDLE client", "server_idle_notify_ms"), ("mailpump: stored in MongoDB (stored_at)", "mailpump_delivery_to_stored_ms")):
    v = r[k]
    print("%-44s %8.1f %8.1f %8.1f %8.1f" % (label, v["p50"], v["p95"], v["p99"], v["max"]))
PY
  echo "wrote $OUT"
  exit 0
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
echo "== mailpump sync of the same mailbox over POP3 (another database)"
sed -e 's/^database = "bench"/database = "bench_pop3"/' -e "s/^port = $IMAP/port = $POP3/" \
    -e 's/^\[accounts.bench\]/[accounts.bench]\nprotocol = "pop3"/' "$WORK/mailpump.toml" > "$WORK/pop3.toml"
/usr/bin/time -f '%M %e' -o "$WORK/time3" "$BIN" --config "$WORK/pop3.toml" sync > "$WORK/sync3.log"

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
s1, s2, s3 = summary(work + "/sync1.log"), summary(work + "/sync2.log"), summary(work + "/sync3.log")
rss3 = open(work + "/time3").read().split()[0]
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
    "pop3_sync": {"seconds": round(s3["elapsed_ms"] / 1000, 3), "msg_per_s": round(seed["messages"] / (s3["elapsed_ms"] / 1000)),
                  "mb_per_s": round(mb / (s3["elapsed_ms"] / 1000), 1), "peak_rss_mb": round(int(rss3) / 1024, 1), "stored": s3.get("stored")},
    "documents_in_db": int(count),
}
json.dump(res, open(out, "w"), indent=2)
print()
print("machine: %s, %d cores; database: %s" % (cpu, os.cpu_count(), dbkind))
print("mailbox: %d messages, %.1f MB" % (seed["messages"], mb))
print("%-34s %9s %9s %8s %10s" % ("", "seconds", "msg/s", "MB/s", "peak RSS"))
print("%-34s %9.2f %9d %8.1f %10s" % ("bare UID FETCH 1:* (server ceiling)", t_fetch, seed["messages"] / t_fetch, mb / t_fetch, "-"))
print("%-34s %9.2f %9d %8.1f %7.1f MB" % ("mailpump sync (fetch+parse+store)", t_sync, seed["messages"] / t_sync, mb / t_sync, int(rss1) / 1024))
t3 = s3["elapsed_ms"] / 1000
print("%-34s %9.2f %9d %8.1f %7.1f MB" % ("mailpump sync over POP3", t3, seed["messages"] / t3, mb / t3, int(rss3) / 1024))
print("stored %s documents (database holds %s); second sync fetched %s, stored %s" % (s1.get("stored"), count, s2.get("fetched"), s2.get("stored")))
print("wrote", out)
PY
