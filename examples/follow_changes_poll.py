#!/usr/bin/env python3
"""Follow changes to mailpump's `messages` collection by polling (any MongoDB, no replica set).

Prints one JSON line per event:
  {"event": "new",      "id": ..., "account": ..., "mailbox": ..., "uid": ..., "at": ..., ...}
  {"event": "flags",    ..., "flags": [...], "modseq": ...}
  {"event": "expunged", ..., "reason": ..., "moved_to": ...}

It polls the three indexed timestamps mailpump sets: `stored_at` (a new document),
`flags_updated_at` (flags really changed) and `expunged_at` (deleted on the server; the
document stays with the default on_expunge = "mark"). For each field it remembers the last
value seen, and asks for `{field: {$gte: last - overlap}}` sorted by (field, _id), paging by
(field, _id) within a round. Ties and late writers are handled by the overlap and a set of
(id -> value) already emitted inside the overlap window: mailpump sets the timestamps on its
own clock before a batch is written, so a batch acknowledged late can carry an older
timestamp than one already seen; keep --overlap above your `[store] op_timeout`.

Caveats: polling sees the latest state of a document, not every intermediate one (flags that
changed twice between two rounds give one event with the last flags); with on_expunge =
"delete" an expunged document is simply gone, which polling cannot see (use the change
stream script, examples/follow_changes_stream.py, for that).

State (the timestamps and the ids of the overlap window) is kept in --state, written
atomically after every round, so a restart goes on where it stopped.

  pip install pymongo
  python3 examples/follow_changes_poll.py --uri mongodb://127.0.0.1:27017 --db mailpump \\
      --state /var/lib/reader/poll-state.json
"""

import argparse
import datetime as dt
import json
import os
import sys
import time

import pymongo

FIELDS = [("stored_at", "new"), ("flags_updated_at", "flags"), ("expunged_at", "expunged")]
PROJECTION = {
    "account": 1, "mailbox": 1, "uidvalidity": 1, "uid": 1, "subject": 1, "message_id": 1,
    "flags": 1, "modseq": 1, "stored_at": 1, "flags_updated_at": 1, "expunged_at": 1,
    "expunged_reason": 1, "moved_to": 1, "moved_from": 1,
}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def ms(t):
    """A BSON date (tz-aware datetime) as integer milliseconds."""
    return int((t - EPOCH) / dt.timedelta(milliseconds=1))


def from_ms(v):
    return EPOCH + dt.timedelta(milliseconds=v)


def load_state(path, since_now):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = ms(dt.datetime.now(dt.timezone.utc)) if since_now else 0
    return {"last": {f: start for f, _ in FIELDS}, "seen": {f: {} for f, _ in FIELDS}}


def save_state(path, state):
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def event_of(kind, field, d):
    e = {
        "event": kind,
        "id": d["_id"],
        "account": d.get("account"),
        "mailbox": d.get("mailbox"),
        "uidvalidity": d.get("uidvalidity"),
        "uid": d.get("uid"),
        "at": d[field].isoformat(),
    }
    if kind == "new":
        e.update(subject=d.get("subject"), message_id=d.get("message_id"), flags=d.get("flags"))
        if "moved_from" in d:
            e["moved_from"] = d["moved_from"]
    elif kind == "flags":
        e.update(flags=d.get("flags"), modseq=d.get("modseq"))
    else:
        e["reason"] = d.get("expunged_reason", "expunged on the server")
        if "moved_to" in d:
            e["moved_to"] = d["moved_to"]
    return e


def poll_field(coll, state, field, kind, overlap_ms, page, out):
    """One round over one field; returns how many events were printed."""
    last = state["last"][field]
    seen = state["seen"][field]
    start = max(0, last - overlap_ms)
    key = None  # (value, _id) of the last document read in this round
    printed = 0
    while True:
        if key is None:
            flt = {field: {"$gte": from_ms(start)}}
        else:
            v, i = key
            flt = {"$or": [{field: {"$gt": v}}, {field: v, "_id": {"$gt": i}}]}
        docs = list(coll.find(flt, PROJECTION).sort([(field, 1), ("_id", 1)]).limit(page))
        for d in docs:
            value = ms(d[field])
            if seen.get(d["_id"]) != value:
                out.write(json.dumps(event_of(kind, field, d)) + "\n")
                printed += 1
                seen[d["_id"]] = value
            last = max(last, value)
        out.flush()
        if len(docs) < page:
            break
        key = (docs[-1][field], docs[-1]["_id"])
    state["last"][field] = last
    # ids older than the overlap window can never be read again
    cutoff = last - overlap_ms
    state["seen"][field] = {i: v for i, v in seen.items() if v >= cutoff}
    return printed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", default=os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017"))
    p.add_argument("--db", default="mailpump")
    p.add_argument("--state", help="file that keeps the position across restarts")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between rounds")
    p.add_argument("--overlap", type=float, default=300.0,
                   help="seconds re-read behind the last timestamp (late writers, ties)")
    p.add_argument("--page-size", type=int, default=1000)
    p.add_argument("--since-now", action="store_true",
                   help="without a state file, start now instead of from the beginning")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    a = p.parse_args()

    client = pymongo.MongoClient(a.uri, tz_aware=True)
    coll = client[a.db]["messages"]
    state = load_state(a.state, a.since_now)
    overlap_ms = int(a.overlap * 1000)
    while True:
        for field, kind in FIELDS:
            poll_field(coll, state, field, kind, overlap_ms, a.page_size, sys.stdout)
        save_state(a.state, state)
        if a.once:
            return
        time.sleep(a.interval)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
