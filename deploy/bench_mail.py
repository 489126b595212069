#!/usr/bin/env python3
"""Benchmark helpers (used by deploy/bench.sh).

  bench_mail.py seed MAILDIR UID COUNT [SEED]   write COUNT generated messages into MAILDIR/new
  bench_mail.py fetch PORT USER PASSWORD        time a bare `UID FETCH 1:* BODY.PEEK[]`
  bench_mail.py latency PORT USER PASSWORD MAILDIR UID COUNT MONGO_URI DB
      deliver COUNT messages one at a time at random intervals while a bare IDLE client
      watches the same mailbox; report delivery->EXISTS (the server's own delay) and
      delivery->stored_at (mailpump) percentiles. Needs pymongo (the SecantusDB venv has it).

The generated mail is deterministic for a seed: sizes skewed (most 2-20 KB, a tail of
100 KB - 2 MB with attachments), mixed charsets, multipart alternatives, forwards.
"""
import base64
import json
import os
import random
import socket
import sys
import time

WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
         "ut labore et dolore magna aliqua 你好 世界 邮件 测试 こんにちは 안녕하세요").split()


def text(rng, size):
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(12))
        out.append(line)
        n += len(line.encode()) + 2
    return "\r\n".join(out)


def message(rng, i):
    r = rng.random()
    body_size = int(rng.lognormvariate(8.6, 0.7))  # median ~5 KB
    body_size = max(500, min(body_size, 20000))
    subject = "=?UTF-8?B?%s?=" % base64.b64encode(("报告 %d %s" % (i, rng.choice(WORDS))).encode()).decode()
    head = ("From: Sender %d <sender%d@example.com>\r\nTo: rcpt@example.com\r\nSubject: %s\r\n"
            "Message-ID: <bench-%d@example.com>\r\nDate: Mon, 1 Jun 2020 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            % (i % 97, i % 97, subject, i))
    body = text(rng, body_size)
    if r < 0.6:
        return head + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body + "\r\n"
    if r < 0.9:
        html = "<html><body><p>" + body.replace("\r\n", "</p><p>") + "</p></body></html>"
        return (head + 'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
                "--alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body +
                "\r\n--alt\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + html +
                "\r\n--alt--\r\n")
    att_size = int(rng.uniform(100_000, 2_000_000)) if r > 0.98 else int(rng.uniform(20_000, 100_000))
    data = rng.randbytes(att_size)
    b64 = base64.b64encode(data).decode()
    b64 = "\r\n".join(b64[j:j + 76] for j in range(0, len(b64), 76))
    return (head + 'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
            "--mix\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body +
            "\r\n--mix\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            'Content-Disposition: attachment; filename="file-%d.bin"\r\n\r\n' % i + b64 + "\r\n--mix--\r\n")


def seed(maildir, uid, count, seed_value=1):
    print(json.dumps(seed_quiet(maildir, uid, count, seed_value)))


def seed_quiet(maildir, uid, count, seed_value=1):
    rng = random.Random(seed_value)
    total = 0
    for i in range(count):
        raw = message(rng, i).encode()
        total += len(raw)
        name = "%d.M%dP1.bench" % (1_600_000_000 + i, i)
        tmp = os.path.join(maildir, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(raw)
        os.chown(tmp, uid, 65534)
        os.rename(tmp, os.path.join(maildir, "new", name))
    return {"messages": count, "bytes": total}


def fetch(port, user, password):
    print(json.dumps(fetch_quiet(port, user, password)))


def fetch_quiet(port, user, password):
    s = socket.create_connection(("127.0.0.1", port))
    buf = bytearray()

    def until(tag):
        nonlocal buf
        while True:
            idx = buf.find(tag)
            if idx >= 0:
                end = buf.find(b"\r\n", idx)
                if end >= 0:
                    line = bytes(buf[idx:end])
                    del buf[:end + 2]
                    return line
            chunk = s.recv(1 << 20)
            if not chunk:
                raise SystemExit("connection closed")
            # keep only a tail: the tagged line cannot hide inside a literal we already passed
            buf += chunk
            if len(buf) > (4 << 20):
                del buf[: len(buf) - 4096]

    until(b"* OK")
    s.sendall(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
    assert b"a OK" in until(b"a ")
    s.sendall(b"b EXAMINE INBOX\r\n")
    assert b"b OK" in until(b"b ")
    received = 0
    start = time.monotonic()
    s.sendall(b"c UID FETCH 1:* BODY.PEEK[]\r\n")
    # count bytes as they come
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise SystemExit("connection closed")
        received += len(chunk)
        buf += chunk
        if len(buf) > 8192:
            del buf[: len(buf) - 8192]
        if b"\r\nc OK" in buf or b"\r\nc NO" in buf or b"\r\nc BAD" in buf:
            break
    elapsed = time.monotonic() - start
    s.sendall(b"d LOGOUT\r\n")
    s.close()
    return {"elapsed_s": elapsed, "bytes": received}


def percentiles(values):
    v = sorted(values)
    pick = lambda p: v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
    return {"p50": round(pick(50) * 1000, 1), "p95": round(pick(95) * 1000, 1), "p99": round(pick(99) * 1000, 1),
            "max": round(v[-1] * 1000, 1), "n": len(v)}


def latency(port, user, password, maildir, uid, count, mongo_uri, dbname):
    print(json.dumps(latency_quiet(port, user, password, maildir, uid, count, mongo_uri, dbname)))


def latency_quiet(port, user, password, maildir, uid, count, mongo_uri, dbname):
    import threading
    import pymongo
    coll = pymongo.MongoClient(mongo_uri)[dbname].messages
    exists_at = []  # (time, N) for each "* N EXISTS" after IDLE began
    base_exists = [0]
    ready = threading.Event()

    def bare_idle():
        s = socket.create_connection(("127.0.0.1", port))
        f = s.makefile("rb")
        f.readline()
        s.sendall(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
        while not f.readline().startswith(b"a "):
            pass
        s.sendall(b"b EXAMINE INBOX\r\n")
        while True:
            line = f.readline()
            if line.startswith(b"* ") and line.rstrip().endswith(b"EXISTS"):
                base_exists[0] = int(line.split()[1])
            if line.startswith(b"b "):
                break
        s.sendall(b"c IDLE\r\n")
        f.readline()  # + idling
        ready.set()
        while not exists_at or exists_at[-1][1] < base_exists[0] + count:
            line = f.readline()
            if not line:
                return
            if line.startswith(b"* ") and line.rstrip().endswith(b"EXISTS"):
                exists_at.append((time.time(), int(line.split()[1])))

    t = threading.Thread(target=bare_idle, daemon=True)
    t.start()
    ready.wait(10)
    rng = random.Random(7)
    base = coll.count_documents({})
    delivered_at = []
    for i in range(count):
        time.sleep(rng.uniform(0.3, 1.2))
        raw = ("From: a@example.com\r\nTo: b@example.com\r\nSubject: latency %d\r\n"
               "Message-ID: <lat-%d-%f@example.com>\r\n\r\nping\r\n" % (i, i, time.time())).encode()
        name = "%d.lat%d.bench" % (int(time.time()), i)
        tmp = os.path.join(maildir, "tmp", name)
        with open(tmp, "wb") as fh:
            fh.write(raw)
        os.chown(tmp, uid, 65534)
        delivered_at.append(time.time())
        os.rename(tmp, os.path.join(maildir, "new", name))
    deadline = time.time() + 30
    while coll.count_documents({}) < base + count and time.time() < deadline:
        time.sleep(0.1)
    t.join(5)
    stored = {}
    for d in coll.find({"subject": {"$regex": "^latency "}}):
        stored[int(d["subject"].split()[1])] = d["stored_at"].replace(tzinfo=__import__("datetime").timezone.utc).timestamp()
    # one EXISTS may announce several deliveries: message i is announced by the first EXISTS
    # whose count reaches it
    server = []
    for i, d in enumerate(delivered_at):
        seen = next((t for t, n in exists_at if n >= base_exists[0] + i + 1), None)
        if seen is not None:
            server.append(seen - d)
    pump = [stored[i] - delivered_at[i] for i in range(count) if i in stored]
    return {"deliveries": count, "stored": len(pump), "server_idle_notify_ms": percentiles(server),
            "mailpump_delivery_to_stored_ms": percentiles(pump)}



def utf7_mailbox(name):
    """A mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3), as on the wire and as
    Dovecot's Maildir++ folder directories are named."""
    out, pending = [], []

    def flush():
        if pending:
            b = base64.b64encode("".join(pending).encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + b.replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7e:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def quoted(text):
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


class ImapClient:
    """A bare IMAP client on a raw socket: LOGIN, APPEND, LOGOUT. Every read has a timeout."""

    def __init__(self, port, user, password, timeout=30):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.s.makefile("rb")
        self.n = 0
        self.f.readline()
        self.command("LOGIN %s %s" % (quoted(user), quoted(password)))

    def _tagged(self, tag):
        while True:
            line = self.f.readline()
            if not line:
                raise SystemExit("IMAP connection closed")
            if line.startswith(tag + b" "):
                if not line.split()[1] == b"OK":
                    raise SystemExit("IMAP: %r" % line)
                return line

    def command(self, text):
        self.n += 1
        tag = b"t%d" % self.n
        self.s.sendall(tag + b" " + text.encode() + b"\r\n")
        return self._tagged(tag)

    def append(self, mailbox, raw):
        """APPENDs raw to mailbox (UTF-8 name); returns time.time() when the tagged OK arrived."""
        self.n += 1
        tag = b"t%d" % self.n
        self.s.sendall(tag + b" APPEND " + quoted(utf7_mailbox(mailbox)).encode() + b" {%d}\r\n" % len(raw))
        line = self.f.readline()
        if not line.startswith(b"+"):
            raise SystemExit("APPEND refused: %r" % line)
        self.s.sendall(raw + b"\r\n")
        self._tagged(tag)
        return time.time()

    def logout(self):
        try:
            self.s.sendall(b"z LOGOUT\r\n")
            self.s.close()
        except OSError:
            pass


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "seed":
        seed(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    elif cmd == "latency":
        latency(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), sys.argv[8], sys.argv[9])
    elif cmd == "fetch":
        fetch(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(__doc__)
