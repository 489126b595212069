#!/usr/bin/env bash
# The local demo: no real account needed. Starts a throw-away Dovecot seeded with sample mail
# (the multilingual fixture corpus) and SecantusDB (a MongoDB wire-protocol server), both on
# 127.0.0.1 with state in a temp dir, runs the `mailpump run` daemon against them, prints
# what landed in the database, delivers a new message and shows it arriving, then stops
# everything it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=deploy/services.sh
source deploy/services.sh

mp_install
echo "== building mailpump"
cargo build --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug/mailpump

WORK=$(mktemp -d /tmp/mailpump-demo.XXXXXX)
chmod 755 "$WORK"
DOVECOT_PID="" SECANTUS_PID="" DAEMON_PID=""
cleanup() {
  local rc=$?
  [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null && mp_stop_pid "$DAEMON_PID"
  [ -n "$DOVECOT_PID" ] && mp_stop_pid "$DOVECOT_PID"
  [ -n "$SECANTUS_PID" ] && mp_stop_pid "$SECANTUS_PID"
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMAP=$(mp_free_port) IMAPS=$(mp_free_port) POP3=$(mp_free_port) POP3S=$(mp_free_port) DB=$(mp_free_port)
mp_dovecot_config "$WORK/dovecot" "$IMAP" "$IMAPS" "$POP3" "$POP3S"
mp_add_user "$WORK/dovecot" demo demo-password 20999
mp_deliver "$WORK/dovecot" demo tests/fixtures/parse/*.eml
dovecot -c "$WORK/dovecot/dovecot.conf" </dev/null >/dev/null 2>&1
for _ in $(seq 1 100); do [ -s "$WORK/dovecot/run/master.pid" ] && break; sleep 0.05; done
DOVECOT_PID=$(cat "$WORK/dovecot/run/master.pid")
echo "== Dovecot on 127.0.0.1:$IMAP (STARTTLS) and :$IMAPS (TLS), pid $DOVECOT_PID, $(ls tests/fixtures/parse/*.eml | wc -l) messages for user demo"
SECANTUS_PID=$(mp_secantus_start "$WORK/db" "$DB")
echo "== SecantusDB on 127.0.0.1:$DB, pid $SECANTUS_PID"

cat > "$WORK/mailpump.toml" <<TOML
[store]
uri = "mongodb://127.0.0.1:$DB"
database = "mailpump"

[accounts.demo]
host = "127.0.0.1"
port = $IMAPS
security = "tls"
ca_file = "$WORK/dovecot/ca.pem"
username = "demo"
password_file = "$WORK/demo.password"
mailboxes = ["INBOX"]
TOML
printf 'demo-password\n' > "$WORK/demo.password"

echo "== mailpump check"
"$BIN" --config "$WORK/mailpump.toml" check
echo "== mailpump run (the daemon; JSON logs in $WORK/run.log, shown below)"
"$BIN" --config "$WORK/mailpump.toml" run > "$WORK/run.log" &
DAEMON_PID=$!
count() {
  "$MP_VENV/bin/python" -c "import pymongo,sys; print(pymongo.MongoClient('mongodb://127.0.0.1:$DB').mailpump.messages.count_documents({}))"
}
for _ in $(seq 1 200); do grep -q '"watching"' "$WORK/run.log" && break; sleep 0.05; done
cat "$WORK/run.log"
echo "== what landed in MongoDB"
"$MP_VENV/bin/python" - "$DB" <<'PY'
import sys, pymongo
db = pymongo.MongoClient("mongodb://127.0.0.1:%s" % sys.argv[1]).mailpump
print("messages: %d   blobs: %d   checkpoint: %s" % (
    db.messages.count_documents({}), db["blobs.files"].count_documents({}),
    {k: v for k, v in db.mailboxes.find_one({"_id": "demo/INBOX"}).items() if k in ("uidvalidity", "last_uid")}))
print("%4s  %-28s  %-40s  %s" % ("uid", "from", "subject", "attachments / parse_errors"))
for d in db.messages.find({}).sort("uid", 1):
    frm = (d["from"][0].get("name") or d["from"][0].get("address")) if d["from"] else "-"
    atts = ", ".join(a.get("filename") or a["content_type"] for a in d["attachments"])
    errs = ("  [%d parse errors]" % len(d["parse_errors"])) if d["parse_errors"] else ""
    print("%4d  %-28.28s  %-40.40s  %s%s" % (d["uid"], frm, d["subject"] or "-", atts, errs))
PY
echo "== delivering a new message into the demo mailbox while the daemon idles"
BEFORE=$(count)
printf 'From: Demo <demo@example.com>\r\nTo: demo@example.com\r\nSubject: Delivered while mailpump was running\r\nMessage-ID: <live-%s@example.com>\r\n\r\nHello from the demo.\r\n' "$(date +%s%N)" > "$WORK/new.eml"
T0=$(date +%s%N)
mp_deliver "$WORK/dovecot" demo "$WORK/new.eml"
for _ in $(seq 1 200); do [ "$(count)" -gt "$BEFORE" ] && break; sleep 0.02; done
[ "$(count)" -gt "$BEFORE" ] || { echo "the new message did not arrive within 4 s"; exit 1; }
"$MP_VENV/bin/python" -c "
import pymongo, datetime
d = pymongo.MongoClient('mongodb://127.0.0.1:$DB').mailpump.messages.find_one({'subject': 'Delivered while mailpump was running'})
stored = d['stored_at'].replace(tzinfo=datetime.timezone.utc).timestamp()
print('uid %d %r stored %d ms after delivery (Dovecot itself announces new mail about 500 ms after delivery)' % (d['uid'], d['subject'], (stored - $T0 / 1e9) * 1000))"
echo "== mailpump status (from the database only; works wherever the daemon runs)"
"$BIN" --config "$WORK/mailpump.toml" status
echo "== SIGTERM: the daemon finishes, logs out and exits 0"
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID"
echo "exit code $?"
tail -n 4 "$WORK/run.log"
