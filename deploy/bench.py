#!/usr/bin/env python3
"""mailpump's benchmark scenarios (run through deploy/bench.sh, which installs and builds).

Every scenario starts its own Dovecot and SecantusDB on 127.0.0.1 (or uses MONGODB_URI),
prints a table, and all results go to bench-results.json (BENCH_OUT overrides). Figures are
measurements, never pass/fail.
"""
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_mail  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICES = os.path.join(ROOT, "deploy", "services.sh")
BIN_DIR = os.environ["MAILPUMP_BIN_DIR"]
PEERS = os.environ["MAILPUMP_PEERS"]
VENV = os.environ["MAILPUMP_VENV"]
PIDS = []


def sh(*args, capture=True):
    out = subprocess.run(["bash", SERVICES, *args], check=True, capture_output=capture, text=True)
    return out.stdout.strip() if capture else None


def free_port():
    return int(sh("free-port"))


def stop(pid):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Services:
    """A Dovecot and a database in a temp dir, stopped by PID when done."""

    def __init__(self, extra=""):
        self.work = tempfile.mkdtemp(prefix="mailpump-bench.", dir="/tmp")
        os.chmod(self.work, 0o755)
        self.dc = os.path.join(self.work, "dovecot")
        self.imap, self.pop3 = free_port(), free_port()
        extra_file = os.path.join(self.work, "extra.conf")
        with open(extra_file, "w") as f:
            f.write(extra)
        sh("dovecot-config", self.dc, str(self.imap), str(free_port()), str(self.pop3), str(free_port()), extra_file)
        self.uid = 20900
        self.dovecot_pid = None
        if os.environ.get("MONGODB_URI"):
            self.uri, self.dbkind = os.environ["MONGODB_URI"], "MongoDB at MONGODB_URI"
        else:
            port = free_port()
            pid = int(sh("secantus-start", os.path.join(self.work, "db"), str(port)))
            PIDS.append(pid)
            self.uri, self.dbkind = "mongodb://127.0.0.1:%d" % port, "SecantusDB 0.7.0b3 (standalone, Python)"

    def add_users(self, names):
        """Users with their own uids, written in one go (faster than one add-user each)."""
        with open(os.path.join(self.dc, "users"), "a") as users:
            for i, name in enumerate(names):
                uid = self.uid + i
                home = os.path.join(self.dc, "home", name)
                for sub in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(home, "Maildir", sub), exist_ok=True)
                for d, _, files in os.walk(home):
                    os.chown(d, uid, 65534)
                users.write("%s:{PLAIN}pw-%s:%d:65534::%s::\n" % (name, name, uid, home))
        return {name: self.uid + i for i, name in enumerate(names)}

    def maildir(self, user):
        return os.path.join(self.dc, "home", user, "Maildir")

    def start_dovecot(self):
        subprocess.run(["dovecot", "-c", os.path.join(self.dc, "dovecot.conf")], check=True, stdin=subprocess.DEVNULL)
        for _ in range(200):
            pidfile = os.path.join(self.dc, "run", "master.pid")
            if os.path.exists(pidfile) and open(pidfile).read().strip():
                self.dovecot_pid = int(open(pidfile).read())
                PIDS.append(self.dovecot_pid)
                return
            time.sleep(0.05)
        raise SystemExit("dovecot did not start")

    def config(self, database, accounts, extra="", account_extra=""):
        text = '[store]\nuri = "%s"\ndatabase = "%s"\n%s\n' % (self.uri, database, extra)
        for name, protocol, port in accounts:
            text += ('[accounts.%s]\nprotocol = "%s"\nhost = "127.0.0.1"\nport = %d\nsecurity = "plain"\n'
                     'username = "%s"\npassword = "pw-%s"\n%s\n' % (name, protocol, port, name, name, account_extra))
        path = os.path.join(self.work, database + ".toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def count(self, database):
        import pymongo
        return pymongo.MongoClient(self.uri)[database].messages.count_documents({})

    def close(self):
        for pid in [self.dovecot_pid] + PIDS:
            if pid:
                stop(pid)
        PIDS.clear()
        shutil.rmtree(self.work, ignore_errors=True)


CPU = {}


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time; returns (stdout, wall seconds, peak RSS MB). The CPU
    seconds (user + system) it used are kept in CPU[cmd[-1] or the program]."""
    with tempfile.NamedTemporaryFile("r") as t:
        started = time.monotonic()
        out = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", t.name, *cmd], capture_output=True, text=True, env=env)
        wall = time.monotonic() - started
        if out.returncode != 0:
            raise SystemExit("%s failed:\n%s\n%s" % (cmd[0], out.stdout[-3000:], out.stderr[-3000:]))
        rss_kb, user, system = open(t.name).read().split()[-3:]
        CPU["last"] = float(user) + float(system)
    return out.stdout, wall, int(rss_kb) / 1024


def summary(stdout):
    for line in stdout.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("message") in ("mailbox_synced", "mailbox_sync_failed"):
            return e
    raise SystemExit("no summary in:\n" + stdout[-2000:])


def row(label, seconds, n, mb, rss=None, extra="", cpu=None):
    cpu_text = "%.2f" % (cpu * 1000 / n) if cpu is not None else "-"
    print("%-46s %8.2f %8d %7.1f %9s %9s  %s" % (label, seconds, n / seconds, mb / seconds, "%.0f MB" % rss if rss else "-", cpu_text, extra))


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)}


def backfill(n):
    s = Services()
    try:
        s.add_users(["bench"])
        seed = bench_mail.seed_quiet(s.maildir("bench"), s.uid, n)
        s.start_dovecot()
        mb = seed["bytes"] / 1e6
        print("\n== backfill: %d messages, %.1f MB; database: %s" % (n, mb, s.dbkind))
        print("%-46s %8s %8s %7s %9s %9s" % ("", "seconds", "msg/s", "MB/s", "peak RSS", "CPU s/1k"))
        bench_mail.fetch_quiet(s.imap, "bench", "pw-bench")  # warm-up: Dovecot indexes the mailbox
        bare = bench_mail.fetch_quiet(s.imap, "bench", "pw-bench")
        row("bare UID FETCH 1:* (raw socket)", bare["elapsed_s"], n, mb)
        out, _, rss = timed([os.path.join(BIN_DIR, "examples", "fetch_ceiling"), str(s.imap), "bench", "pw-bench", "100"])
        fetch = json.loads(out)
        row("fetch ceiling: mailpump's FETCHes, bytes dropped", fetch["elapsed_s"], n, mb, rss, cpu=CPU["last"])
        out, _, rss = timed([os.path.join(BIN_DIR, "examples", "store_ceiling"), s.uri, "ceiling", s.maildir("bench"), "100"])
        store = json.loads(out)
        row("store ceiling: mailpump's writes, pre-parsed", store["elapsed_s"], n, mb, rss, cpu=CPU["last"])
        cfg = s.config("mailpump", [("bench", "imap", s.imap)])
        out, wall, rss = timed([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "sync"])
        sync = summary(out)
        t_sync = sync["elapsed_ms"] / 1000
        lower = max(fetch["elapsed_s"], store["elapsed_s"])
        cpu_sync = CPU["last"]
        row("mailpump sync (IMAP)", t_sync, n, mb, rss, "%.0f%% of the lower ceiling" % (100 * lower / t_sync), cpu=cpu_sync)
        again = summary(timed([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "sync"])[0])
        peers = {}
        for label, cmd, db in (
            ("seed pipeline: node-imap + mailparser", ["node", os.path.join(ROOT, "deploy/peers/node_imap.js")], "node_imap"),
            ("imapflow + mailparser", ["node", os.path.join(ROOT, "deploy/peers/imapflow.js")], "imapflow"),
            ("python imaplib + email + pymongo", [os.path.join(VENV, "bin/python"), os.path.join(ROOT, "deploy/peers/python_imaplib.py")], "python"),
        ):
            env = dict(os.environ, NODE_PATH=os.path.join(PEERS, "node_modules"), NODE_OPTIONS="--max-old-space-size=8192")
            out, wall, rss = timed([*cmd, str(s.imap), "bench", "pw-bench", s.uri, db], env=env)
            r = json.loads(out.strip().splitlines()[-1])
            stored = s.count(db)
            row(label, r["elapsed_s"], n, mb, rss, "mailpump %.1fx faster, %.1fx less CPU; stored %d" % (r["elapsed_s"] / t_sync, CPU["last"] / cpu_sync, stored), cpu=CPU["last"])
            peers[db] = {"seconds": round(r["elapsed_s"], 2), "msg_per_s": round(n / r["elapsed_s"]), "peak_rss_mb": round(rss), "stored": stored,
                         "cpu_seconds": round(CPU["last"], 2), "mailpump_speedup": round(r["elapsed_s"] / t_sync, 2),
                         "mailpump_cpu_advantage": round(CPU["last"] / cpu_sync, 2)}
        # last: Dovecot marks messages \Seen when POP3 retrieves them, and the seed pipeline
        # searches UNSEEN
        cfg3 = s.config("pop3", [("bench", "pop3", s.pop3)])
        out, _, rss3 = timed([os.path.join(BIN_DIR, "mailpump"), "--config", cfg3, "sync"])
        pop = summary(out)
        row("mailpump sync (POP3, same mail)", pop["elapsed_ms"] / 1000, n, mb, rss3)
        return {
            "messages": n, "bytes": seed["bytes"], "database": s.dbkind,
            "bare_fetch": {"seconds": round(bare["elapsed_s"], 3), "msg_per_s": round(n / bare["elapsed_s"])},
            "fetch_ceiling": {"seconds": fetch["elapsed_s"], "msg_per_s": round(n / fetch["elapsed_s"])},
            "store_ceiling": {"seconds": store["elapsed_s"], "msg_per_s": round(n / store["elapsed_s"])},
            "mailpump": {"seconds": t_sync, "msg_per_s": round(n / t_sync), "mb_per_s": round(mb / t_sync, 1), "peak_rss_mb": round(rss), "cpu_seconds": round(cpu_sync, 2),
                         "stored": sync["stored"], "ratio_of_lower_ceiling": round(lower / t_sync, 3),
                         "second_sync_fetched": again["fetched"]},
            "pop3": {"seconds": pop["elapsed_ms"] / 1000, "msg_per_s": round(n / (pop["elapsed_ms"] / 1000)), "stored": pop["stored"]},
            "peers": peers,
        }
    finally:
        s.close()


def latency(n):
    s = Services()
    try:
        s.add_users(["bench"])
        s.start_dovecot()
        cfg = s.config("latency", [("bench", "imap", s.imap)])
        log = open(os.path.join(s.work, "run.log"), "w")
        daemon = subprocess.Popen([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "run"], stdout=log)
        wait_log(os.path.join(s.work, "run.log"), "watching", 1, 30)
        r = bench_mail.latency_quiet(s.imap, "bench", "pw-bench", s.maildir("bench"), s.uid, n, s.uri, "latency")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        print("\n== push latency: %d deliveries at random intervals; database: %s" % (n, s.dbkind))
        print_latency(r)
        return r
    finally:
        s.close()


def print_latency(r):
    print("%-46s %8s %8s %8s %8s" % ("milliseconds after delivery", "p50", "p95", "p99", "max"))
    for label, k in (("Dovecot's EXISTS to a bare IDLE client", "server_idle_notify_ms"), ("mailpump: stored in MongoDB", "mailpump_delivery_to_stored_ms")):
        v = r[k]
        print("%-46s %8.1f %8.1f %8.1f %8.1f" % (label, v["p50"], v["p95"], v["p99"], v["max"]))


def wait_log(path, message, count, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = sum(1 for l in open(path) if '"message":"%s"' % message in l)
        if seen >= count:
            return time.time()
        time.sleep(0.1)
    raise SystemExit("timed out waiting for %d %s events; log tail:\n%s" % (count, message, open(path).read()[-3000:]))


def proc_stat(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    rss = next(int(l.split()[1]) for l in open("/proc/%d/status" % pid) if l.startswith("VmRSS:")) / 1024
    return ticks / os.sysconf("SC_CLK_TCK"), rss


def scale(n):
    extra = ("default_process_limit = %d\ndefault_client_limit = %d\nservice imap {\n  process_limit = %d\n}\n"
             "service stats {\n  client_limit = %d\n}\n" % (n + 200, 4 * n + 1000, n + 200, 4 * n + 1000))
    s = Services(extra)
    try:
        names = ["u%04d" % i for i in range(n)]
        uids = s.add_users(names)
        s.start_dovecot()
        cfg = s.config("scale", [(name, "imap", s.imap) for name in names])
        logpath = os.path.join(s.work, "run.log")
        log = open(logpath, "w")
        started = time.time()
        daemon = subprocess.Popen([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "run"], stdout=log)
        all_idle = wait_log(logpath, "watching", n, 600) - started
        time.sleep(5)
        cpu0, rss = proc_stat(daemon.pid)
        time.sleep(60)
        cpu1, rss_after = proc_stat(daemon.pid)
        idle_cpu = (cpu1 - cpu0) / 60 * 100
        # push latency with every mailbox open: deliveries to random mailboxes
        import pymongo
        coll = pymongo.MongoClient(s.uri).scale.messages
        rng = random.Random(3)
        delivered = {}
        for i in range(50):
            user = rng.choice(names)
            time.sleep(rng.uniform(0.2, 0.6))
            raw = ("From: a@example.com\r\nSubject: scale %d\r\n\r\nping\r\n" % i).encode()
            name = "%d.scale%d.bench" % (int(time.time()), i)
            tmp = os.path.join(s.maildir(user), "tmp", name)
            with open(tmp, "wb") as f:
                f.write(raw)
            os.chown(tmp, uids[user], 65534)
            delivered[i] = time.time()
            os.rename(tmp, os.path.join(s.maildir(user), "new", name))
        deadline = time.time() + 30
        while coll.count_documents({}) < 50 and time.time() < deadline:
            time.sleep(0.2)
        lat = []
        for d in coll.find({}):
            i = int(d["subject"].split()[1])
            lat.append(d["stored_at"].replace(tzinfo=__import__("datetime").timezone.utc).timestamp() - delivered[i])
        daemon.send_signal(signal.SIGTERM)
        t0 = time.time()
        daemon.wait(30)
        stop_s = time.time() - t0
        r = {"mailboxes": n, "seconds_until_all_idle": round(all_idle, 1), "rss_mb": round(rss, 1), "rss_kb_per_mailbox": round(rss * 1024 / n, 1),
             "rss_mb_after_60s": round(rss_after, 1), "idle_cpu_percent_of_one_core": round(idle_cpu, 2),
             "latency_ms": bench_mail.percentiles(lat), "sigterm_exit_seconds": round(stop_s, 2)}
        print("\n== scale: %d mailboxes held open by one daemon (IDLE); database: %s" % (n, s.dbkind))
        print("all idling after %.1f s; RSS %.1f MB (%.1f KB per mailbox), %.1f MB after 60 s; CPU while idle %.2f%% of one core" %
              (all_idle, rss, rss * 1024 / n, rss_after, idle_cpu))
        print("push latency with all open (50 deliveries): p50 %.0f ms, p95 %.0f ms, p99 %.0f ms; SIGTERM exit in %.2f s" %
              (r["latency_ms"]["p50"], r["latency_ms"]["p95"], r["latency_ms"]["p99"], stop_s))
        return r
    finally:
        s.close()


# Folders of one account besides INBOX, parents before children: a few top-level ones, some
# with non-ASCII names (modified UTF-7 on disk and on the wire), Archive.2024.03 three levels
# deep, then Projects.pN each with subfolders sM and one more level under s0.
FOLDER_BASE = ["Sent", "Drafts", "Archive", "Archive.2024", "Archive.2024.03", "已发送", "Entwürfe",
               "Черновики", "Tom & Jerry", "日本語", "日本語.サブ", "Projects"]


def folder_names(count):
    names = list(FOLDER_BASE)
    p = 0
    while len(names) < count:
        names.append("Projects.p%d" % p)
        names.extend("Projects.p%d.s%d" % (p, i) for i in range(8))
        names.append("Projects.p%d.s0.深" % p)
        p += 1
    return names[:count]


def log_events(path, message):
    out = []
    for line in open(path, errors="replace"):
        if '"message":"%s"' % message not in line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def log_time(e):
    """The epoch seconds of a JSON log event's timestamp (RFC 3339, UTC)."""
    import datetime
    ts = e["timestamp"].rstrip("Z")
    if "." in ts:
        head, frac = ts.split(".", 1)
        ts = head + "." + frac[:6]
    return datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()


def tcp_sockets(port, side):
    """inode of every ESTABLISHED TCP socket on 127.0.0.1 whose local (side="server") or remote
    (side="client") port is port."""
    column = 1 if side == "server" else 2
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[column].rsplit(":", 1)[1], 16) == port:
                out.add(int(f[9]))
    return out


def socket_holders(inodes):
    """inode -> the PIDs holding it (every process's fds, read from /proc)."""
    held = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    held.setdefault(inode, set()).add(int(pid))
    return held


def proc_uid(pid):
    try:
        return next(int(l.split()[1]) for l in open("/proc/%d/status" % pid) if l.startswith("Uid:"))
    except (OSError, StopIteration):
        return None


def connections(imap_port, daemon_pid, account_of_uid):
    """Connections as the server counts them: ESTABLISHED sockets whose local port is Dovecot's
    IMAP port, attributed to accounts by the uid of the Dovecot imap process holding each (every
    bench user has its own uid); and the daemon's own client sockets, as a cross-check."""
    server = tcp_sockets(imap_port, "server")
    holders = socket_holders(server | tcp_sockets(imap_port, "client"))
    per_account, unattributed = {}, 0
    for inode in server:
        names = {account_of_uid.get(proc_uid(p)) for p in holders.get(inode, ())} - {None}
        if len(names) == 1:
            name = names.pop()
            per_account[name] = per_account.get(name, 0) + 1
        else:
            unattributed += 1
    daemon_side = sum(1 for inode in tcp_sockets(imap_port, "client") if daemon_pid in holders.get(inode, ()))
    return {"server_total": len(server), "per_account": per_account, "unattributed": unattributed,
            "daemon_client_sockets": daemon_side}


def machine_busy():
    """CPU seconds the whole machine spent busy since boot (every core, not idle or iowait)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root):
    """CPU seconds of root and its children still running (Dovecot's master and its services)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == root or int(stat[1]) == root:
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def proc_mem(pid):
    status = {l.split(":")[0]: l.split()[1] for l in open("/proc/%d/status" % pid) if l.startswith(("VmRSS", "VmHWM"))}
    return int(status["VmRSS"]) / 1024, int(status["VmHWM"]) / 1024


def probe_latency(s, coll, targets, rng, label, timeout):
    """For each (account, folder): APPEND one message over IMAP (raw socket), then poll the
    messages collection for its unique subject every 20 ms. Returns the samples and the misses."""
    samples, missed = [], []
    token = "%x" % rng.getrandbits(32)
    for i, (account, folder) in enumerate(targets):
        subject = "folders-bench %s %s %d" % (label, token, i)
        raw = ("From: probe@example.com\r\nTo: %s@example.com\r\nSubject: %s\r\nMessage-ID: <%s-%d-%s@bench>\r\n"
               "Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n\r\nping\r\n" % (account, subject, label, i, token)).encode()
        client = bench_mail.ImapClient(s.imap, account, "pw-" + account)
        done = client.append(folder, raw)
        doc, polls = None, 0
        while time.time() < done + timeout:
            doc = coll.find_one({"subject": subject}, {"stored_at": 1, "mailbox": 1, "account": 1})
            polls += 1
            if doc:
                break
            time.sleep(0.02)
        seen = time.time()
        client.logout()
        if doc is None:
            missed.append({"account": account, "folder": folder, "subject": subject, "appended_at": done})
        else:
            stored = doc["stored_at"].replace(tzinfo=__import__("datetime").timezone.utc).timestamp()
            samples.append({"account": account, "folder": folder, "visible_s": seen - done, "stored_at_s": stored - done,
                            "polls": polls, "right_place": doc.get("mailbox") == folder and doc.get("account") == account})
        time.sleep(rng.uniform(0.8, 1.2))
    return samples, missed


def folders(accounts, per_account, per_folder=3):
    """ACCOUNTS accounts with PER_ACCOUNT folders each (INBOX included) holding PER_FOLDER
    generated messages each, mailboxes = ["*"] and the default watch (INBOX) and
    max_connections (5)."""
    import pymongo
    s = Services()
    try:
        names = ["f%02d" % i for i in range(accounts)]
        uids = s.add_users(names)
        others = folder_names(per_account - 1)
        rng = random.Random(11)
        total_bytes = k = 0
        for name in names:
            for folder in [None] + others:
                base = s.maildir(name) if folder is None else os.path.join(s.maildir(name), "." + bench_mail.utf7_mailbox(folder))
                for sub in ("", "cur", "new", "tmp"):
                    os.makedirs(os.path.join(base, sub), exist_ok=True)
                    os.chown(os.path.join(base, sub), uids[name], 65534)
                for _ in range(per_folder):
                    raw = bench_mail.message(rng, k).encode()
                    total_bytes += len(raw)
                    fname = "%d.M%dP1.bench" % (1_600_000_000 + k, k)
                    tmp = os.path.join(base, "tmp", fname)
                    with open(tmp, "wb") as f:
                        f.write(raw)
                    os.chown(tmp, uids[name], 65534)
                    os.rename(tmp, os.path.join(base, "new", fname))
                    k += 1
        expected = k
        coll = pymongo.MongoClient(s.uri).folders.messages
        # the probes below look messages up by subject; mailpump itself never does
        coll.create_index("subject")
        s.start_dovecot()
        cfg = s.config("folders", [(n, "imap", s.imap) for n in names], account_extra='mailboxes = ["*"]\n')
        logpath = os.path.join(s.work, "run.log")
        log = open(logpath, "w")
        print("\n== folders: %d accounts x %d folders (INBOX included), %d messages, %.1f MB; database: %s" %
              (accounts, per_account, expected, total_bytes / 1e6, s.dbkind), flush=True)
        # another busy process on the machine slows the backfill: the CPU time of the whole
        # machine, less mailpump's, the database's and Dovecot's, says so
        busy_before = machine_busy()
        dovecot_before = tree_cpu(s.dovecot_pid)
        db_pid = PIDS[0] if PIDS and PIDS[0] != s.dovecot_pid and not os.environ.get("MONGODB_URI") else None
        db_before = proc_stat(db_pid)[0] if db_pid else 0.0
        started = time.time()
        daemon = subprocess.Popen([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "run"], stdout=log, stderr=subprocess.STDOUT)
        want = accounts * per_account
        deadline = started + 900
        watching = {}
        while time.time() < deadline:
            for e in log_events(logpath, "watching"):
                watching.setdefault((e.get("account"), e.get("mailbox")), e)
            if len(watching) >= want or daemon.poll() is not None:
                break
            time.sleep(0.2)
        if len(watching) < want:
            raise SystemExit("%d of %d folders watching after %.0f s; log tail:\n%s" %
                             (len(watching), want, time.time() - started, open(logpath).read()[-4000:]))
        cpu_ready, _ = proc_stat(daemon.pid)
        db_cpu_ready = proc_stat(db_pid)[0] - db_before if db_pid else None
        dovecot_cpu_ready = tree_cpu(s.dovecot_pid) - dovecot_before
        other_cpu_ready = machine_busy() - busy_before - cpu_ready - (db_cpu_ready or 0) - dovecot_cpu_ready
        ready_s = max(log_time(e) for e in watching.values()) - started
        inbox_ready_s = max(log_time(e) for (a, m), e in watching.items() if m == "INBOX") - started
        modes = sorted({e.get("mode") for e in watching.values()})
        discovered = log_events(logpath, "folders_discovered")
        connected = log_events(logpath, "follower_connected")
        discovered_s = max(log_time(e) for e in discovered) - started if discovered else None
        stored_at_ready = coll.count_documents({})
        t_end = time.time() + 120
        while coll.count_documents({}) < expected and time.time() < t_end:
            time.sleep(0.5)
        stored = coll.count_documents({})
        time.sleep(5)
        account_of_uid = {uid: name for name, uid in uids.items()}
        conns = connections(s.imap, daemon.pid, account_of_uid)
        rss, hwm = proc_mem(daemon.pid)
        cpu0, _ = proc_stat(daemon.pid)
        time.sleep(30)
        cpu1, _ = proc_stat(daemon.pid)
        idle_cpu = (cpu1 - cpu0) / 30 * 100
        prng = random.Random(5)
        shared_targets = [(prng.choice(names), prng.choice(others)) for _ in range(30)]
        shared, shared_missed = probe_latency(s, coll, shared_targets, prng, "shared", 20)
        inbox, inbox_missed = probe_latency(s, coll, [(prng.choice(names), "INBOX") for _ in range(10)], prng, "inbox", 20)
        # a probe not seen within 20 s: was it stored later (by the safety sweep, say)?
        missed_all, late = shared_missed + inbox_missed, []
        t_end = time.time() + (60 if missed_all else 0)
        while time.time() < t_end:
            late = [m for m in missed_all if coll.find_one({"subject": m["subject"]})]
            if len(late) == len(missed_all):
                break
            time.sleep(1)
        time.sleep(2)
        conns_after = connections(s.imap, daemon.pid, account_of_uid)
        rss_after, hwm_after = proc_mem(daemon.pid)
        levels = {}
        for line in open(logpath, errors="replace"):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("level") in ("WARN", "ERROR"):
                key = (e["level"], e.get("message", "")[:80])
                levels[key] = levels.get(key, 0) + 1
        daemon.send_signal(signal.SIGTERM)
        t0 = time.time()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(5)
        stop_s = time.time() - t0
        shutil.copy(logpath, os.path.join(ROOT, "bench-folders.log"))

        def pct(values):
            return bench_mail.percentiles(values) if values else None
        r = {"accounts": accounts, "folders_per_account": per_account, "messages": expected, "bytes": total_bytes,
             "database": s.dbkind, "seconds_until_all_watching": round(ready_s, 1),
             "seconds_until_every_inbox_idle": round(inbox_ready_s, 1),
             "seconds_until_last_folders_discovered": round(discovered_s, 1) if discovered_s is not None else None,
             "daemon_cpu_seconds_until_ready": round(cpu_ready, 2),
             "database_cpu_seconds_until_ready": round(db_cpu_ready, 2) if db_cpu_ready is not None else None,
             "dovecot_cpu_seconds_until_ready": round(dovecot_cpu_ready, 2),
             "other_cpu_seconds_until_ready": round(other_cpu_ready, 2),
             "watching_modes": modes, "follower_modes": sorted({e.get("mode") for e in connected}),
             "follower_connects": len(connected), "stored_when_ready": stored_at_ready, "stored": stored,
             "connections": conns, "connections_after_probes": conns_after,
             "rss_mb": round(rss, 1), "hwm_mb": round(hwm, 1), "rss_mb_after_probes": round(rss_after, 1), "hwm_mb_after_probes": round(hwm_after, 1),
             "idle_cpu_percent_of_one_core": round(idle_cpu, 2),
             "shared_latency_ms": pct([x["visible_s"] for x in shared]), "shared_stored_at_ms": pct([x["stored_at_s"] for x in shared]),
             "inbox_latency_ms": pct([x["visible_s"] for x in inbox]), "inbox_stored_at_ms": pct([x["stored_at_s"] for x in inbox]),
             "shared_missed": len(shared_missed), "inbox_missed": len(inbox_missed), "missed_stored_later": len(late),
             "wrong_place": sum(1 for x in shared + inbox if not x["right_place"]),
             "shared_samples": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in shared],
             "warnings": [{"level": l, "message": m, "count": c} for (l, m), c in sorted(levels.items())],
             "sigterm_exit_seconds": round(stop_s, 2)}
        per = sorted(conns["per_account"].values())
        print("all %d folders watching after %.1f s (every INBOX idling after %.1f s); stored %d of %d (%d at that moment)" %
              (want, ready_s, inbox_ready_s, stored, expected, stored_at_ready))
        print("CPU seconds until then: mailpump %.2f, the database %s, Dovecot %.2f, everything else on the machine %.2f" %
              (cpu_ready, "%.2f" % db_cpu_ready if db_cpu_ready is not None else "-", dovecot_cpu_ready, other_cpu_ready))
        print("follower modes %s; watching modes %s" % (r["follower_modes"], modes))
        print("connections (server side, ESTABLISHED on the IMAP port): %d in total, per account min %s max %s, %d unattributed; daemon's client sockets %d"
              % (conns["server_total"], per[0] if per else "-", per[-1] if per else "-", conns["unattributed"], conns["daemon_client_sockets"]))
        print("after the probes: %d in total; daemon's client sockets %d" % (conns_after["server_total"], conns_after["daemon_client_sockets"]))
        print("RSS %.1f MB (peak %.1f MB); after the probes %.1f MB (peak %.1f MB); CPU over 30 idle s %.2f%% of one core" %
              (rss, hwm, rss_after, hwm_after, idle_cpu))
        print("%-56s %8s %8s %8s %6s" % ("ms from APPEND's OK to visible in MongoDB", "p50", "p95", "max", "n"))
        for label, key in (("folder not watched (follower, NOTIFY)", "shared"), ("INBOX (its own IDLE)", "inbox")):
            for sub, k2 in (("polled, every 20 ms", "_latency_ms"), ("stored_at", "_stored_at_ms")):
                v = r[key + k2]
                if v:
                    print("%-56s %8.1f %8.1f %8.1f %6d" % ("%s, %s" % (label, sub), v["p50"], v["p95"], v["max"], v["n"]))
        print("missed within 20 s: %d not watched, %d INBOX (%d of them stored later); wrong account/folder %d" %
              (r["shared_missed"], r["inbox_missed"], len(late), r["wrong_place"]))
        for w in r["warnings"]:
            print("log %(level)s x%(count)d: %(message)s" % w)
        print("SIGTERM exit in %.2f s; daemon log copied to bench-folders.log" % stop_s)
        return r
    finally:
        s.close()


def big(megabytes):
    s = Services()
    try:
        s.add_users(["big"])
        data = random.Random(5).randbytes(int(megabytes * 1e6 * 3 / 4))
        import base64
        b64 = base64.b64encode(data).decode()
        body = "\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
        raw = ("From: a@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               "--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--b\r\nContent-Type: application/octet-stream\r\n"
               "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=big.bin\r\n\r\n" + body + "\r\n--b--\r\n").encode()
        name = "1.big.bench"
        tmp = os.path.join(s.maildir("big"), "tmp", name)
        with open(tmp, "wb") as f:
            f.write(raw)
        os.chown(tmp, s.uid, 65534)
        os.rename(tmp, os.path.join(s.maildir("big"), "new", name))
        s.start_dovecot()
        cfg = s.config("big", [("big", "imap", s.imap)])
        out, wall, rss = timed([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "sync"])
        e = summary(out)
        size_mb = len(raw) / 1e6
        r = {"message_mb": round(size_mb, 1), "seconds": e["elapsed_ms"] / 1000, "wall_seconds": round(wall, 2), "peak_rss_mb": round(rss),
             "rss_over_size": round(rss / size_mb, 2), "stored": e["stored"]}
        print("\n== one %.1f MB message: synced in %.2f s (process %.2f s), peak RSS %.0f MB = %.2fx its size; database: %s" %
              (size_mb, r["seconds"], wall, rss, r["rss_over_size"], s.dbkind))
        return r
    finally:
        s.close()


def seed_small(maildir, uid, count):
    """count small plain-text messages (about 1 KB): verify reads no body without --deep, so
    the mailbox's size on disk is beside the point and the sync before it stays short."""
    total = 0
    for i in range(count):
        raw = ("From: Sender %d <sender%d@example.com>\r\nTo: rcpt@example.com\r\nSubject: verify %d\r\n"
               "Message-ID: <verify-%d@example.com>\r\nDate: Mon, 1 Jun 2020 10:00:00 +0000\r\n\r\n%s\r\n"
               % (i % 97, i % 97, i, i, ("line %d of the body\r\n" % i) * 40)).encode()
        total += len(raw)
        name = "%d.M%dP1.verify" % (1_600_000_000 + i, i)
        tmp = os.path.join(maildir, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(raw)
        os.chown(tmp, uid, 65534)
        os.rename(tmp, os.path.join(maildir, "new", name))
    return total


def verify(n):
    """n messages synced, then `mailpump verify` timed: a match (twice), then --deep."""
    s = Services()
    try:
        s.add_users(["verify"])
        total = seed_small(s.maildir("verify"), s.uid, n)
        s.start_dovecot()
        mb = total / 1e6
        print("\n== verify: one mailbox of %d messages, %.1f MB; database: %s" % (n, mb, s.dbkind))
        cfg = s.config("verify", [("verify", "imap", s.imap)])
        out, wall_sync, _ = timed([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "sync"])
        synced = summary(out)
        print("%-46s %8s %8s %7s %9s %9s" % ("", "seconds", "msg/s", "MB/s", "peak RSS", "CPU s/1k"))
        row("mailpump sync (to fill the store)", synced["elapsed_ms"] / 1000, n, mb)
        runs = {}
        for label, key, extra in (("mailpump verify (first)", "verify", []), ("mailpump verify (again)", "verify_again", []),
                                  ("mailpump verify --deep", "verify_deep", ["--deep"])):
            out, wall, rss = timed([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "verify", "--json", *extra])
            r = json.loads(out.strip().splitlines()[-1])
            if r["differences"] != 0 or not r["ok"]:
                raise SystemExit("verify found differences after a sync: %s" % out[-2000:])
            row(label, wall, n, mb, rss, "%d compared, %d differences" % (r["server_messages"], r["differences"]), cpu=CPU["last"])
            runs[key] = {"seconds": round(wall, 2), "msg_per_s": round(n / wall), "peak_rss_mb": round(rss),
                         "cpu_seconds": round(CPU["last"], 2), "differences": r["differences"]}
        return {"messages": n, "bytes": total, "database": s.dbkind, "sync_seconds": synced["elapsed_ms"] / 1000, **runs}
    finally:
        s.close()


def main():
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log file as it happens
    args = sys.argv[1:]
    scenario = args[0] if args else "all"
    size = int(args[1]) if len(args) > 1 else None
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    print("machine: %(cpu)s, %(cores)d cores, %(memory_gb)d GB" % results["machine"])
    runs = {"backfill": lambda: backfill(size or 10000), "latency": lambda: latency(size or 100),
            "scale": lambda: scale(size or 1000), "big": lambda: big(size or 50),
            "verify": lambda: verify(size or 100000),
            "folders": lambda: folders(size or 10, int(args[2]) if len(args) > 2 else 100, int(args[3]) if len(args) > 3 else 3)}
    for name in (runs if scenario == "all" else [scenario]):
        results[name] = runs[name]()
    out = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench-results.json"))
    if os.path.exists(out):  # scenarios run one at a time accumulate in one file
        previous = json.load(open(out))
        previous.update(results)
        results = previous
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print("\nwrote", out)


if __name__ == "__main__":
    try:
        main()
    finally:
        for pid in PIDS:
            stop(pid)
