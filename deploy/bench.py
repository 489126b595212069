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
        # On a server of someone else's (MONGODB_URI) every database of the run gets a prefix
        # of its own and is dropped at the end: nothing of an earlier run is found, nothing
        # else is touched.
        self.prefix = ""
        if os.environ.get("MONGODB_URI"):
            self.uri, self.dbkind = os.environ["MONGODB_URI"], "MongoDB at MONGODB_URI"
            self.prefix = "mpbench_%d_%d_" % (os.getpid(), int(time.time()))
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

    def db(self, name):
        """The database called `name` in this run."""
        return self.prefix + name

    def config(self, database, accounts, extra="", account_extra=""):
        text = '[store]\nuri = "%s"\ndatabase = "%s"\n%s\n' % (self.uri, self.db(database), extra)
        for name, protocol, port in accounts:
            text += ('[accounts.%s]\nprotocol = "%s"\nhost = "127.0.0.1"\nport = %d\nsecurity = "plain"\n'
                     'username = "%s"\npassword = "pw-%s"\n%s\n' % (name, protocol, port, name, name, account_extra))
        path = os.path.join(self.work, database + ".toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def count(self, database):
        import pymongo
        return pymongo.MongoClient(self.uri)[self.db(database)].messages.count_documents({})

    def close(self):
        if self.prefix:
            import pymongo
            client = pymongo.MongoClient(self.uri)
            for name in client.list_database_names():
                if name.startswith(self.prefix):
                    client.drop_database(name)
        for pid in [self.dovecot_pid] + PIDS:
            if pid:
                stop(pid)
        PIDS.clear()
        if os.environ.get("BENCH_KEEP"):  # keep the logs and state to look at
            print("kept", self.work)
        else:
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
        row("  of which the body FETCHes alone", fetch["bodies_s"], n, mb, None, "%.0f%% of the bare rate" % (100 * bare["elapsed_s"] / fetch["bodies_s"]))
        out, _, rss = timed([os.path.join(BIN_DIR, "examples", "store_ceiling"), s.uri, s.db("ceiling"), s.maildir("bench"), "100"])
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
            out, wall, rss = timed([*cmd, str(s.imap), "bench", "pw-bench", s.uri, s.db(db)], env=env)
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
            "fetch_ceiling": {"seconds": fetch["elapsed_s"], "msg_per_s": round(n / fetch["elapsed_s"]),
                              "bodies_seconds": fetch["bodies_s"], "bodies_msg_per_s": round(n / fetch["bodies_s"]),
                              "ratio_of_bare": round(bare["elapsed_s"] / fetch["elapsed_s"], 3)},
            "store_ceiling": {"seconds": store["elapsed_s"], "msg_per_s": round(n / store["elapsed_s"])},
            "mailpump": {"seconds": t_sync, "msg_per_s": round(n / t_sync), "mb_per_s": round(mb / t_sync, 1), "peak_rss_mb": round(rss), "cpu_seconds": round(cpu_sync, 2),
                         "stored": sync["stored"], "ratio_of_lower_ceiling": round(lower / t_sync, 3),
                         "second_sync_fetched": again["fetched"]},
            "pop3": {"seconds": pop["elapsed_ms"] / 1000, "msg_per_s": round(n / (pop["elapsed_ms"] / 1000)), "stored": pop["stored"]},
            "peers": peers,
        }
    finally:
        s.close()


def instructions(n):
    """Instructions mailpump executes per message (valgrind callgrind: repeatable on a noisy
    machine, unlike CPU seconds), for `mailpump sync` of n messages and for its two ceilings,
    with the functions that cost most."""
    s = Services()
    try:
        s.add_users(["bench"])
        seed = bench_mail.seed_quiet(s.maildir("bench"), s.uid, n)
        s.start_dovecot()
        bench_mail.fetch_quiet(s.imap, "bench", "pw-bench")
        print("\n== instructions (valgrind callgrind): %d messages, %.1f MB; database: %s" % (n, seed["bytes"] / 1e6, s.dbkind))
        cfg = s.config("callgrind", [("bench", "imap", s.imap)])
        out = {}
        for label, cmd in (
            ("mailpump sync (IMAP)", [os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "sync"]),
            ("fetch ceiling", [os.path.join(BIN_DIR, "examples", "fetch_ceiling"), str(s.imap), "bench", "pw-bench", "100"]),
            ("store ceiling (parse included)", [os.path.join(BIN_DIR, "examples", "store_ceiling"), s.uri, s.db("ceiling"), s.maildir("bench"), "100"]),
        ):
            data = os.path.join(s.work, "callgrind.%d.out" % len(out))
            r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + data, *cmd], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit("%s under callgrind failed:\n%s" % (label, r.stderr[-3000:]))
            total = next(int(l.split()[-1].replace(",", "")) for l in r.stderr.splitlines() if "Collected" in l)
            ann = subprocess.run(["callgrind_annotate", "--threshold=100", data], capture_output=True, text=True).stdout
            top, sha = [], 0
            lines = ann.splitlines()
            start = next((i for i, l in enumerate(lines) if "file:function" in l), len(lines))
            for line in lines[start + 1:]:
                if not line.strip() and top:
                    break  # the function list ends; annotated source follows
                parts = line.strip().split(None, 2)
                if "PROGRAM TOTALS" in line:
                    continue
                if len(parts) >= 2 and parts[0].replace(",", "").isdigit() and "(" in parts[1]:
                    ir = int(parts[0].replace(",", ""))
                    name = line.split(")", 1)[1].strip() if ")" in line else parts[-1]
                    if "sha2::" in name:
                        sha += ir
                    if len(top) < 12:
                        top.append((ir, name[:110]))
            # valgrind's CPU has no SHA extensions: SHA-256 runs in software under it, with
            # SHA-NI natively (where the CPU has it); the count without it is the comparable one
            print("%-32s %12.0f instructions per message (%.2f G in all); without SHA-256 %.0f" % (label, total / n, total / 1e9, (total - sha) / n))
            for ir, name in top[:8]:
                print("    %5.1f%%  %s" % (100 * ir / total, name))
            out[label] = {"instructions": total, "per_message": round(total / n), "per_message_without_sha256": round((total - sha) / n),
                          "top": [[round(100 * ir / total, 1), name] for ir, name in top]}
        return {"messages": n, "bytes": seed["bytes"], "results": out}
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
        r = bench_mail.latency_quiet(s.imap, "bench", "pw-bench", s.maildir("bench"), s.uid, n, s.uri, s.db("latency"))
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
        coll = pymongo.MongoClient(s.uri)[s.db("scale")].messages
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
        coll = pymongo.MongoClient(s.uri)[s.db("folders")].messages
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



def mirror(n):
    """Flags and deletions followed by mailpump (see src/mirror.rs): (1) flag-change and
    expunge latency to an idling daemon (CONDSTORE + QRESYNC Dovecot), with a bare IDLE client
    as the server's own delay; (2) the cost of a wake-up with nothing changed (raw imaplib:
    EXAMINE with QRESYNC, plain EXAMINE, the full UID FETCH 1:* (FLAGS)) and the commands
    mailpump sends in one quiet wake-up (Dovecot rawlog); (3) the full flag scan of `mailpump
    sync` against a Dovecot with CONDSTORE and QRESYNC taken out of its capabilities."""
    import imaplib
    import socket
    import statistics
    import threading
    import pymongo

    class Imap(imaplib.IMAP4):
        """imaplib counting the bytes it reads from the server."""
        received = 0

        def readline(self):
            line = super().readline()
            self.received += len(line)
            return line

        def read(self, size):
            data = super().read(size)
            self.received += len(data)
            return data

    def login(port):
        c = Imap("127.0.0.1", port)
        c.login("bench", "pw-bench")
        return c

    def ok(typ, data, what):
        if typ != "OK":
            raise SystemExit("%s: %s %r" % (what, typ, data))
        return data

    def warnings(path):
        out = []
        for line in open(path, errors="replace"):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("level") in ("WARN", "ERROR"):
                out.append(line.strip()[:600])
        return out

    # rawlog only where its directory exists: created just before the quiet-wake-up daemon, so
    # the backfill's 10,000 bodies are never logged
    s = Services()
    r = {"messages": n, "database": s.dbkind}
    try:
        rawlog_root = os.path.join(s.work, "rawlog")
        with open(os.path.join(s.work, "extra.conf"), "w") as f:
            f.write("rawlog_dir = %s/%%u\n" % rawlog_root)
        sh("dovecot-config", s.dc, str(s.imap), str(free_port()), str(s.pop3), str(free_port()), os.path.join(s.work, "extra.conf"))
        s.add_users(["bench"])
        seed = bench_mail.seed_quiet(s.maildir("bench"), s.uid, n)
        s.start_dovecot()
        db = pymongo.MongoClient(s.uri)[s.db("mirror")]
        print("\n== mirror: %d messages, %.1f MB in INBOX; database: %s" % (n, seed["bytes"] / 1e6, s.dbkind))
        cfg = s.config("mirror", [("bench", "imap", s.imap)])
        logpath = os.path.join(s.work, "run.log")
        log = open(logpath, "w")
        started = time.time()
        daemon = subprocess.Popen([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "run"], stdout=log, stderr=subprocess.STDOUT)
        wait_log(logpath, "watching", 1, 900)
        r["backfill_seconds"] = round(time.time() - started, 1)
        stored = db.messages.count_documents({})
        if stored != n:
            raise SystemExit("daemon watching with %d of %d stored" % (stored, n))
        r["recent_after_backfill"] = db.messages.count_documents({"flags": "\\Recent"})
        print("daemon backfilled %d messages and is idling after %.1f s; documents with \\Recent stored: %d" %
              (n, r["backfill_seconds"], r["recent_after_backfill"]))

        # (1) latency. A bare IDLE client (raw socket, EXAMINE) notes when Dovecot announces
        # each change: the server's own delay.
        events, ready = [], threading.Event()

        def bare_idle():
            sock = socket.create_connection(("127.0.0.1", s.imap))
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b'a LOGIN "bench" "pw-bench"\r\n')
            while not f.readline().startswith(b"a "):
                pass
            sock.sendall(b"b EXAMINE INBOX\r\nc IDLE\r\n")
            while not f.readline().startswith(b"+"):
                pass
            ready.set()
            while True:
                line = f.readline()
                if not line:
                    return
                words = line.split()
                if len(words) >= 3 and words[0] == b"*" and words[2] in (b"FETCH", b"EXPUNGE"):
                    events.append((time.time(), words[2].decode()))

        threading.Thread(target=bare_idle, daemon=True).start()
        ready.wait(10)
        c = login(s.imap)
        ok(*c.select("INBOX"), "SELECT")
        uidvalidity = int(c.response("UIDVALIDITY")[1][0])
        ident = lambda uid: "bench/INBOX/%d/%d" % (uidvalidity, uid)
        rng = random.Random(17)
        pool = list(range(1, n + 1))
        rng.shuffle(pool)
        flagged = []

        def wait_doc(uid, test, timeout=30):
            deadline = time.time() + timeout
            while time.time() < deadline:
                d = db.messages.find_one({"_id": ident(uid)}, {"flags": 1, "flags_updated_at": 1, "expunged_at": 1})
                if d and test(d):
                    return time.time(), d
                time.sleep(0.005)
            return None, None

        def server_delay(sent, done, kind):
            t = next((t for t, k in events if t >= sent and k == kind), None)
            return None if t is None else t - done

        def epoch(dt):
            import datetime
            return dt.replace(tzinfo=datetime.timezone.utc).timestamp()

        flag_samples, flag_missed = [], []
        for i in range(50):
            time.sleep(rng.uniform(0.3, 1.5))
            if i % 2 == 0 or not flagged:
                uid, op, want = pool.pop(), "+FLAGS", True
                flagged.append(uid)
            else:
                uid, op, want = flagged.pop(rng.randrange(len(flagged))), "-FLAGS", False
            sent = time.time()
            ok(*c.uid("STORE", str(uid), op, "(\\Flagged)"), "UID STORE")
            done = time.time()
            seen, d = wait_doc(uid, lambda d: ("\\Flagged" in d.get("flags", [])) == want)
            if seen is None:
                flag_missed.append({"uid": uid, "op": op})
                continue
            flag_samples.append({"uid": uid, "op": op, "visible_s": seen - done,
                                 "flags_updated_at_s": epoch(d["flags_updated_at"]) - done if d.get("flags_updated_at") else None,
                                 "server_s": server_delay(sent, done, "FETCH")})
        exp_samples, exp_missed = [], []
        for i in range(10):
            time.sleep(rng.uniform(0.3, 1.5))
            uid = pool.pop()
            ok(*c.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)"), "UID STORE")
            sent = time.time()
            ok(*c.uid("EXPUNGE", str(uid)), "UID EXPUNGE")
            done = time.time()
            seen, d = wait_doc(uid, lambda d: d.get("expunged_at") is not None)
            if seen is None:
                exp_missed.append(uid)
                continue
            exp_samples.append({"uid": uid, "visible_s": seen - done, "expunged_at_s": epoch(d["expunged_at"]) - done,
                                "server_s": server_delay(sent, done, "EXPUNGE")})
        c.logout()
        time.sleep(2)
        # every change must be in the end state, not only seen once
        final_flagged = {d["_id"] for d in db.messages.find({"flags": "\\Flagged"}, {"_id": 1})}
        final_expunged = db.messages.count_documents({"expunged_at": {"$ne": None}})
        # \Recent is a session flag: the SELECT above took it from every message, and no MODSEQ
        # moved for that, so QRESYNC never reports it
        r["recent_at_end"] = db.messages.count_documents({"flags": "\\Recent"})
        applied = log_events(logpath, "changes_applied")

        def pct(values):
            values = [v for v in values if v is not None]
            return bench_mail.percentiles(values) if values else None
        r["flags"] = {"changes": 50, "missed": flag_missed,
                      "server_idle_notify_ms": pct([x["server_s"] for x in flag_samples]),
                      "visible_ms": pct([x["visible_s"] for x in flag_samples]),
                      "flags_updated_at_ms": pct([x["flags_updated_at_s"] for x in flag_samples]),
                      "flagged_at_end": len(final_flagged), "flagged_expected": len(flagged),
                      "flagged_end_state_right": final_flagged == {ident(u) for u in flagged}}
        r["expunge"] = {"expunges": 10, "missed": exp_missed,
                        "server_idle_notify_ms": pct([x["server_s"] for x in exp_samples]),
                        "visible_ms": pct([x["visible_s"] for x in exp_samples]),
                        "expunged_at_ms": pct([x["expunged_at_s"] for x in exp_samples]),
                        "marked_at_end": final_expunged}
        r["flag_samples"] = [{k: (round(v * 1000, 1) if isinstance(v, float) else v) for k, v in x.items()} for x in flag_samples]
        r["expunge_samples"] = [{k: (round(v * 1000, 1) if isinstance(v, float) else v) for k, v in x.items()} for x in exp_samples]
        r["changes_applied_events"] = {"events": len(applied), "flags": sum(e.get("flags", 0) for e in applied),
                                       "expunged": sum(e.get("expunged", 0) for e in applied)}
        rss, hwm = proc_mem(daemon.pid)
        r["daemon_rss_mb"], r["daemon_hwm_mb"] = round(rss, 1), round(hwm, 1)
        print("%-52s %8s %8s %8s %8s %4s" % ("ms after the tagged OK", "p50", "p95", "p99", "max", "n"))
        for label, v in (("flag change: Dovecot's FETCH to a bare IDLE client", r["flags"]["server_idle_notify_ms"]),
                         ("flag change: visible in MongoDB (polled, 5 ms)", r["flags"]["visible_ms"]),
                         ("flag change: flags_updated_at", r["flags"]["flags_updated_at_ms"]),
                         ("expunge: Dovecot's EXPUNGE to a bare IDLE client", r["expunge"]["server_idle_notify_ms"]),
                         ("expunge: expunged_at visible (polled, 5 ms)", r["expunge"]["visible_ms"]),
                         ("expunge: expunged_at", r["expunge"]["expunged_at_ms"])):
            if v:
                print("%-52s %8.1f %8.1f %8.1f %8.1f %4d" % (label, v["p50"], v["p95"], v["p99"], v["max"], v["n"]))
        print("missed within 30 s: %d flag changes, %d expunges; end state: %d flagged (expected %d, same set: %s), %d marked expunged" %
              (len(flag_missed), len(exp_missed), len(final_flagged), len(flagged), r["flags"]["flagged_end_state_right"], final_expunged))
        print("changes_applied events: %(events)d, flags %(flags)d, expunged %(expunged)d; daemon RSS" % r["changes_applied_events"],
              "%.1f MB (peak %.1f MB)" % (rss, hwm))
        print("documents still stored with \\Recent after another client's SELECT: %d" % r["recent_at_end"])

        # (2) a wake-up with nothing changed, on the same 10,000-message folder
        record = db.mailboxes.find_one({"_id": "bench/INBOX"}) or {}
        modseq, mvalidity = record.get("highest_modseq"), record.get("modseq_uidvalidity")
        if modseq is None or mvalidity != uidvalidity:
            raise SystemExit("no usable highest_modseq in mailboxes: %r" % record)
        wake = {"stored_highest_modseq": int(modseq)}
        qr, qr_examine, qr_bytes, qr_changes, plain, plain_bytes = [], [], [], 0, [], []
        for _ in range(20):
            c = login(s.imap)
            c.received = 0
            t0 = time.perf_counter()
            ok(*c.enable("QRESYNC"), "ENABLE")
            t1 = time.perf_counter()
            c.is_readonly = True  # imaplib refuses the next command after a READ-ONLY it did not ask for
            ok(*c._simple_command("EXAMINE", "INBOX", "(QRESYNC (%d %d))" % (uidvalidity, modseq)), "EXAMINE QRESYNC")
            t2 = time.perf_counter()
            qr.append(t2 - t0)
            qr_examine.append(t2 - t1)
            qr_bytes.append(c.received)
            qr_changes += len([x for x in c.untagged_responses.get("FETCH", []) if x]) + len(c.untagged_responses.get("VANISHED", []))
            wake["server_highest_modseq"] = int(c.untagged_responses.get("HIGHESTMODSEQ", [b"0"])[-1])
            c.logout()
        for _ in range(20):
            c = login(s.imap)
            c.received = 0
            t0 = time.perf_counter()
            ok(*c.select("INBOX", readonly=True), "EXAMINE")
            plain.append(time.perf_counter() - t0)
            plain_bytes.append(c.received)
            c.logout()
        c = login(s.imap)
        ok(*c.select("INBOX", readonly=True), "EXAMINE")
        full, full_bytes = [], 0
        for _ in range(5):
            c.received = 0
            t0 = time.perf_counter()
            data = ok(*c.uid("FETCH", "1:*", "(FLAGS)"), "UID FETCH")
            full.append(time.perf_counter() - t0)
            full_bytes = c.received
        c.logout()
        med = lambda v: round(statistics.median(v) * 1000, 2)
        wake.update({"qresync_enable_examine_ms": med(qr), "qresync_examine_ms": med(qr_examine), "qresync_bytes": int(statistics.median(qr_bytes)),
                     "qresync_changes_reported": qr_changes, "plain_examine_ms": med(plain), "plain_examine_bytes": int(statistics.median(plain_bytes)),
                     "uid_fetch_all_flags_ms": med(full), "uid_fetch_all_flags_bytes": full_bytes, "uid_fetch_all_flags_responses": len(data)})

        # the commands of one quiet wake-up: a second daemon on the same database with
        # idle_refresh = 3s, its connection logged by Dovecot (rawlog_dir)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log.close()
        r["warnings"] = warnings(logpath)
        os.makedirs(os.path.join(rawlog_root, "bench"))
        for d in (rawlog_root, os.path.join(rawlog_root, "bench")):
            os.chown(d, s.uid, 65534)
        cfg2 = s.config("mirror", [("bench", "imap", s.imap)], account_extra='idle_refresh = "3s"\n')
        log2path = os.path.join(s.work, "run2.log")
        log2 = open(log2path, "w")
        daemon = subprocess.Popen([os.path.join(BIN_DIR, "mailpump"), "--config", cfg2, "run"], stdout=log2, stderr=subprocess.STDOUT)
        wait_log(log2path, "watching", 1, 120)
        time.sleep(8)  # two refreshes
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log2.close()
        r["warnings"] += warnings(log2path)
        with open(os.path.join(ROOT, "bench-mirror.log"), "w") as keep:
            for path in (logpath, log2path):
                keep.write(open(path, errors="replace").read())
        def rawlog(path):
            """(epoch seconds, text) of each line Dovecot logged (it prefixes a timestamp)."""
            out = []
            for line in open(path, "rb").read().decode("utf-8", "replace").splitlines():
                ts, _, text = line.partition(" ")
                try:
                    out.append((float(ts), text.strip()))
                except ValueError:
                    pass
            return out
        wakeups = []  # from a DONE to the next IDLE: (commands, ms, bytes the server sent)
        bench_dir = os.path.join(rawlog_root, "bench")
        for name in sorted(os.listdir(bench_dir)):
            if not name.endswith(".in"):
                continue
            lines = rawlog(os.path.join(bench_dir, name))
            out_lines = rawlog(os.path.join(bench_dir, name[:-3] + ".out")) if os.path.exists(os.path.join(bench_dir, name[:-3] + ".out")) else []
            cmds = [(ts, text if text == "DONE" else text.partition(" ")[2]) for ts, text in lines if text]
            i = 0
            while i < len(cmds):
                if cmds[i][1] == "DONE":
                    j = i + 1
                    while j < len(cmds) and cmds[j][1] != "IDLE":
                        j += 1
                    if j < len(cmds):
                        t0, t1 = cmds[i][0], cmds[j][0]
                        sent = sum(len(text) + 2 for ts, text in out_lines if t0 <= ts < t1)
                        wakeups.append({"commands": [c for _, c in cmds[i + 1:j]], "ms": round((t1 - t0) * 1000, 1), "server_bytes": sent})
                    i = j
                else:
                    i += 1
        wake["quiet_wakeups_logged"] = len(wakeups)
        wake["quiet_wakeups"] = wakeups
        r["wakeup"] = wake
        print("\nwake-up with nothing changed (stored HIGHESTMODSEQ %d, server's %d)" % (wake["stored_highest_modseq"], wake["server_highest_modseq"]))
        print("%-52s %10s %10s" % ("", "median ms", "bytes"))
        print("%-52s %10.2f %10d" % ("ENABLE QRESYNC + EXAMINE INBOX (QRESYNC (v m)), n=20", wake["qresync_enable_examine_ms"], wake["qresync_bytes"]))
        print("%-52s %10.2f %10s" % ("  of which the EXAMINE", wake["qresync_examine_ms"], ""))
        print("%-52s %10.2f %10d" % ("plain EXAMINE INBOX, n=20", wake["plain_examine_ms"], wake["plain_examine_bytes"]))
        print("%-52s %10.2f %10d" % ("UID FETCH 1:* (FLAGS) (no CONDSTORE), n=5", wake["uid_fetch_all_flags_ms"], wake["uid_fetch_all_flags_bytes"]))
        print("changes reported by the 20 QRESYNC EXAMINEs: %d" % qr_changes)
        print("mailpump's quiet wake-ups (idle_refresh = 3s, Dovecot rawlog), from DONE to the next IDLE:")
        for w in wakeups:
            print("  %d commands, %.1f ms, %d bytes from the server: %s" % (len(w["commands"]), w["ms"], w["server_bytes"], "; ".join(w["commands"])))
    finally:
        s.close()

    # (3) the full flag scan of a server without CONDSTORE/QRESYNC
    caps = ("imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MULTIAPPEND "
            "UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 LITERAL+\n")
    s = Services(caps)
    try:
        s.add_users(["bench"])
        bench_mail.seed_quiet(s.maildir("bench"), s.uid, n)
        s.start_dovecot()
        c = login(s.imap)
        capabilities = sorted(ok(*c.capability(), "CAPABILITY")[0].decode().split())
        if "CONDSTORE" in capabilities or "QRESYNC" in capabilities:
            raise SystemExit("CONDSTORE still offered: %s" % capabilities)
        cfg = s.config("scan", [("bench", "imap", s.imap)], account_extra='flag_scan_interval = "1s"\n')
        mp = [os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "sync"]
        out, wall0, rss0 = timed(mp)
        first = summary(out)
        scan_db = pymongo.MongoClient(s.uri)[s.db("scan")].messages
        recent_first = scan_db.count_documents({"flags": "\\Recent"})

        def scanned(stdout):
            for line in stdout.splitlines():
                if '"message":"flags_scanned"' in line:
                    return json.loads(line)
            return None
        ok(*c.select("INBOX"), "SELECT")
        changed = random.Random(23).sample(range(1, n + 1), 200)
        for uid in changed:
            ok(*c.uid("STORE", str(uid), "+FLAGS", "(\\Flagged)"), "UID STORE")
        c.logout()
        time.sleep(1.5)  # flag_scan_interval is 1s
        out, wall, rss = timed(mp)
        cpu = CPU["last"]
        scan = scanned(out)
        time.sleep(1.5)
        out2, wall2, rss2 = timed(mp)
        quiet = scanned(out2)
        flagged = scan_db.count_documents({"flags": "\\Flagged"})
        recent_second = scan_db.count_documents({"flags": "\\Recent"})
        if scan is None:
            raise SystemExit("no flags_scanned event in the second sync:\n" + out[-3000:])
        # 200 more changes now that no message carries \Recent any more (nor its document)
        c = login(s.imap)
        ok(*c.select("INBOX"), "SELECT")
        seen_uids = random.Random(29).sample(sorted(set(range(1, n + 1)) - set(changed)), 200)
        for uid in seen_uids:
            ok(*c.uid("STORE", str(uid), "+FLAGS", "(\\Seen)"), "UID STORE")
        c.logout()
        time.sleep(1.5)
        out3, wall3, rss3 = timed(mp)
        clean = scanned(out3)
        if clean is None:
            raise SystemExit("no flags_scanned event in the fourth sync:\n" + out3[-3000:])
        r["scan"] = {"capabilities": " ".join(capabilities), "first_sync_seconds": round(wall0, 2), "first_sync_stored": first.get("stored"),
                     "changed": 200, "found": scan.get("flags"), "expunged": scan.get("expunged"), "last_uid": scan.get("last_uid"),
                     "scan_elapsed_ms": scan.get("elapsed_ms"), "sync_wall_seconds": round(wall, 2), "sync_peak_rss_mb": round(rss),
                     "sync_cpu_seconds": round(cpu, 2), "flagged_in_db": flagged,
                     "quiet_scan_elapsed_ms": quiet.get("elapsed_ms") if quiet else None, "quiet_scan_found": quiet.get("flags") if quiet else None,
                     "quiet_sync_wall_seconds": round(wall2, 2), "quiet_sync_peak_rss_mb": round(rss2),
                     "recent_stored_after_first_sync": recent_first, "recent_stored_after_second_sync": recent_second,
                     "clean_changed": 200, "clean_found": clean.get("flags"), "clean_scan_elapsed_ms": clean.get("elapsed_ms"),
                     "clean_sync_wall_seconds": round(wall3, 2), "clean_sync_peak_rss_mb": round(rss3),
                     "clean_sync_cpu_seconds": round(CPU["last"], 2)}
        print("\nfull flag scan without CONDSTORE/QRESYNC (capabilities trimmed), %d messages, 200 flags changed:" % n)
        print("%-52s %10s %10s %10s %8s" % ("", "scan ms", "sync s", "peak RSS", "found"))
        print("%-52s %10d %10.2f %10s %8d" % ("second mailpump sync (flags_scanned)", scan["elapsed_ms"], wall, "%.0f MB" % rss, scan["flags"]))
        if quiet:
            print("%-52s %10d %10.2f %10s %8d" % ("third mailpump sync, nothing changed", quiet["elapsed_ms"], wall2, "%.0f MB" % rss2, quiet["flags"]))
        print("%-52s %10d %10.2f %10s %8d" % ("fourth sync: 200 \\Seen added, no \\Recent left", clean["elapsed_ms"], wall3, "%.0f MB" % rss3, clean["flags"]))
        print("documents flagged in MongoDB: %d; first sync (backfill) %.2f s; documents with \\Recent after the first sync %d, after the second %d" %
              (flagged, wall0, recent_first, recent_second))
    finally:
        s.close()
    if r["warnings"]:
        print("\ndaemon log WARN/ERROR lines:")
        for w in r["warnings"]:
            print("  " + w)
    else:
        print("\nno WARN/ERROR in the daemons' logs")
    print("daemon logs copied to bench-mirror.log")
    return r


def failover(n, ttls=None):
    """n mailboxes over 3 replicas ([cluster]): new mail in every mailbox with one process and
    with three, then kill -9 of the replica holding most: the time until every orphan's lease is
    taken, its session is idling again, and mail delivered right after the kill is stored; then
    the restart and the time until the shares are even again. Once per lease TTL in ttls."""
    import pymongo
    import datetime
    ttls = ttls or [int(t) for t in os.environ.get("BENCH_TTLS", "30,10").split(",")]
    extra = ("default_process_limit = %d\ndefault_client_limit = %d\nservice imap {\n  process_limit = %d\n}\n"
             "service stats {\n  client_limit = %d\n}\n" % (2 * n + 200, 8 * n + 1000, 2 * n + 200, 8 * n + 1000))
    s = Services(extra)
    results = {"mailboxes": n, "replicas": 3}
    try:
        names = ["f%04d" % i for i in range(n)]
        uids = s.add_users(names)
        s.start_dovecot()
        client = pymongo.MongoClient(s.uri)
        seq = [0]

        def deliver(users, tag):
            at = {}
            for user in users:
                seq[0] += 1
                raw = ("From: a@example.com\r\nSubject: %s %s %d\r\n\r\nping\r\n" % (tag, user, seq[0])).encode()
                name = "%d.fo%d.bench" % (int(time.time()), seq[0])
                tmp = os.path.join(s.maildir(user), "tmp", name)
                with open(tmp, "wb") as f:
                    f.write(raw)
                os.chown(tmp, uids[user], 65534)
                at[user] = time.time()
                os.rename(tmp, os.path.join(s.maildir(user), "new", name))
            return at

        def wait_stored(coll, users, tag, timeout=300):
            want = set(users)
            deadline = time.time() + timeout
            while time.time() < deadline:
                got = {d["account"] for d in coll.find({"subject": {"$regex": "^%s " % tag}}, {"account": 1})}
                if want <= got:
                    return time.time()
                time.sleep(0.1)
            raise SystemExit("not all %s stored" % tag)

        def start(cfg, name, logpath):
            env = dict(os.environ, MAILPUMP_CLUSTER__INSTANCE=name)
            p = subprocess.Popen([os.path.join(BIN_DIR, "mailpump"), "--config", cfg, "run"],
                                 stdout=open(logpath, "a"), env=env)
            PIDS.append(p.pid)
            return p

        def held(coll, now):
            return {d["_id"]: d["owner"] for d in coll.find({}) if d.get("run") and d["expires_at"].replace(tzinfo=datetime.timezone.utc).timestamp() > now}

        def one_process(db):
            # one process, no [cluster]: the reference for new mail in every mailbox
            cfg = s.config(db, [(u, "imap", s.imap) for u in names])
            log1 = os.path.join(s.work, db + ".log")
            one = start(cfg, "single", log1)
            wait_log(log1, "watching", n, 600)
            time.sleep(5)
            t0 = time.time()
            deliver(names, db)
            took = wait_stored(client[s.db(db)].messages, names, db) - t0
            stop(one.pid)
            return took

        single = one_process("fo_single")
        results["new_mail_all_mailboxes_one_process_s"] = round(single, 2)
        print("\n== failover: %d mailboxes, 3 replicas sharing them through leases; database: %s" % (n, s.dbkind))
        print("one message in each of %d mailboxes: stored in %.2f s by one process" % (n, single))

        for ttl in ttls:
            db = "fo_ttl%d" % ttl
            renew = max(1, ttl // 3)
            cfg = s.config(db, [(u, "imap", s.imap) for u in names],
                           extra='\n[cluster]\nenabled = true\nlease_ttl = "%ds"\nrenew_every = "%ds"\n' % (ttl, renew))
            logs = {r: os.path.join(s.work, "%s-%s.log" % (db, r)) for r in ("r1", "r2", "r3")}
            procs = {r: start(cfg, r, logs[r]) for r in logs}
            leases = client[s.db(db)].leases
            coll = client[s.db(db)].messages
            t0 = time.time()
            moves = ("lease_taken", "lease_handing_over", "lease_released", "lease_lost", "lease_taken_over")

            def lease_events():
                return sum(len(log_events(logs[r], m)) for r in logs for m in moves)
            last, quiet_since = -1, time.time()
            while True:
                h = held(leases, time.time())
                shares = {r: sum(1 for o in h.values() if o == r) for r in logs}
                events = lease_events()
                if events != last:
                    last, quiet_since = events, time.time()
                settled = max(shares.values()) - min(shares.values()) <= 1 and time.time() - quiet_since >= 5
                if len(h) == n and settled:
                    break
                if time.time() - t0 > 600:
                    raise SystemExit("replicas did not take every mailbox")
                time.sleep(0.2)
            # settled: every lease held, shares even, no lease moved for 5 s
            spread = quiet_since - t0
            t1 = time.time()
            deliver(names, "three%d" % ttl)
            three = wait_stored(coll, names, "three%d" % ttl) - t1
            victim = max(shares, key=shares.get)
            orphans = sorted(k.split("/")[0] for k, o in h.items() if o == victim)
            survivors = [r for r in logs if r != victim]
            marks = {r: len(log_events(logs[r], "watching")) for r in survivors}
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            killed = time.time()
            deliver(orphans, "orphan%d" % ttl)
            taken_at = idle_at = None
            while taken_at is None or idle_at is None:
                now = time.time()
                h = held(leases, now)
                if taken_at is None and all(h.get(a + "/INBOX") in survivors for a in orphans):
                    taken_at = now
                if idle_at is None:
                    back = set()
                    for r in survivors:
                        for e in log_events(logs[r], "watching")[marks[r]:]:
                            back.add(e.get("account"))
                    if set(orphans) <= back:
                        idle_at = now
                if now - killed > ttl + 300:
                    raise SystemExit("orphans not served")
                time.sleep(0.05)
            stored_at = wait_stored(coll, orphans, "orphan%d" % ttl)
            lat = []
            for d in coll.find({"subject": {"$regex": "^orphan%d " % ttl}}):
                lat.append(d["stored_at"].replace(tzinfo=datetime.timezone.utc).timestamp() - killed)
            # the restart: shares even again (within one), every mailbox held once
            procs[victim] = start(cfg, victim, logs[victim])
            restarted = time.time()
            while True:
                h = held(leases, time.time())
                sh_ = {r: sum(1 for o in h.values() if o == r) for r in logs}
                if len(h) == n and max(sh_.values()) - min(sh_.values()) <= 1:
                    break
                if time.time() - restarted > 300:
                    raise SystemExit("no rebalance: %s" % sh_)
                time.sleep(0.1)
            rebalance = time.time() - restarted
            t2 = time.time()
            for r in logs:
                procs[r].send_signal(signal.SIGTERM)
            for r in logs:
                procs[r].wait(60)
            stop_s = time.time() - t2
            left = len(held(leases, time.time()))
            r = {"lease_ttl_s": ttl, "renew_every_s": renew, "seconds_until_settled": round(spread, 1),
                 "shares": shares, "new_mail_all_mailboxes_three_replicas_s": round(three, 2),
                 "orphans": len(orphans), "kill9_to_all_leases_taken_s": round(taken_at - killed, 2),
                 "kill9_to_all_orphans_idle_s": round(idle_at - killed, 2),
                 "kill9_to_all_orphan_mail_stored_s": round(stored_at - killed, 2),
                 "orphan_mail_stored_after_kill_ms": bench_mail.percentiles(lat),
                 "restart_to_even_shares_s": round(rebalance, 2), "sigterm_all_s": round(stop_s, 2),
                 "leases_left_after_sigterm": left}
            results["ttl_%ds" % ttl] = r
            print("lease_ttl %ds (renew %ds): all %d held, shares even and no lease moving %.1f s after start, shares %s" %
                  (ttl, renew, n, spread, shares))
            print("  one message in each of %d mailboxes: stored in %.2f s by three replicas (one process: %.2f s)" %
                  (n, three, single))
            print("  kill -9 of %s (%d mailboxes): every lease taken after %.2f s, every orphan idling after %.2f s, "
                  "mail delivered at the kill stored after %.2f s" %
                  (victim, len(orphans), taken_at - killed, idle_at - killed, stored_at - killed))
            print("  restarted: shares even after %.2f s; SIGTERM of all three: %.2f s, %d leases left" % (rebalance, stop_s, left))
        # the same again at the end: the database has more in it now than at the start
        again = one_process("fo_single_again")
        results["new_mail_all_mailboxes_one_process_again_s"] = round(again, 2)
        print("one message in each of %d mailboxes, one process again after the cluster runs: %.2f s" % (n, again))
        return results
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
            "folders": lambda: folders(size or 10, int(args[2]) if len(args) > 2 else 100, int(args[3]) if len(args) > 3 else 3),
            "mirror": lambda: mirror(size or 10000),
            "instructions": lambda: instructions(size or 2000),
            "failover": lambda: failover(size or 300)}
    for name in ([n for n in runs if n != "instructions"] if scenario == "all" else [scenario]):
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
