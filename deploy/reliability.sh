#!/usr/bin/env bash
# Reliability run: the fault, hostile-server and bad-mail tests at full scale (20 kill -9s
# during a 5,000-message catch-up, ...), then RELIABILITY.md rewritten from what they report.
#   bash deploy/reliability.sh            (about 10-15 minutes on 2 cores)
# The test suite runs the same tests at a small scale; this is the long version.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS=$(mktemp /tmp/mailpump-reliability.XXXXXX)
export MAILPUMP_RELIABILITY=full MAILPUMP_RELIABILITY_OUT=$ROWS
started=$(date +%s)
bash deploy/test.sh faults:: hostile:: malformed promises:: limits:: daemon::sigterm --test-threads=1
elapsed=$(( $(date +%s) - started ))
python3 - "$ROWS" "$elapsed" <<'PY'
import json, os, platform, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out = ["# Reliability", "",
       "What was done to mailpump to break it, how often, and what came of it. Produced by",
       "`bash deploy/reliability.sh` (the same tests run at a smaller scale in `bash deploy/test.sh`).",
       "Each fault test ends with an exact comparison of the server's UIDs with the stored",
       "documents: *stored* counts distinct UIDs found in `messages` (all of them, or the test",
       "fails), *duplicated* counts messages stored more than once. A panic, an unexpected exit",
       "or a hang (every wait is bounded) fails the test, so *crashes* and *hangs* are 0 in any",
       "table this command writes; the kill -9 row counts exits mailpump took by itself.", "",
       "Last run: %s, %s, %d cores, %d s. Real Dovecot %s, SecantusDB (MongoDB wire protocol,"
       " `--sync-on-commit` where the database is killed)." % (
           datetime.date.today().isoformat(), cpu, os.cpu_count(), int(sys.argv[2]),
           os.popen("dovecot --version").read().split()[0]), "",
       "| fault or input | tries | messages expected | stored | duplicated | crashes | hangs |",
       "|---|---|---|---|---|---|---|"]
for r in rows:
    out.append("| %s | %d | %d | %d | %d | %d | %d |" % (r["fault"].replace("|", "\\|"), r["tries"], r["expected"], r["stored"], r["duplicated"], r["crashes"], r["hangs"]))
out += ["", "Not covered here: servers other than Dovecot and the scripted ones (docs/imap-servers.md",
        "lists the quirks they imitate; Cyrus's announce-inside-responses behaviour is scripted, not run",
        "from a real Cyrus); a real MongoDB replica set; network faults below TCP (packet loss, reordering)."]
open("RELIABILITY.md", "w").write("\n".join(out) + "\n")
print("wrote RELIABILITY.md with %d rows" % len(rows))
PY
rm -f "$ROWS"
