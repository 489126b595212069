#!/usr/bin/env python3
"""Follow changes to mailpump's `messages` collection with a MongoDB change stream.

Needs a replica set (a single-node one is enough: `mongod --replSet rs0` then
`rs.initiate()`); a standalone mongod refuses `watch` ("The $changeStream stage is only
supported on replica sets"). Use examples/follow_changes_poll.py there.

Prints one JSON line per event:
  new        a document was inserted (a message stored)
  replaced   a document was rewritten whole (a replayed batch: same message, same _id)
  flags      `flags` changed (with `modseq` on CONDSTORE servers)
  expunged   `expunged_at` was set (deleted on the server; `reason` is "uidvalidity changed"
             when the whole mailbox was reset), with `moved_to` when it was a MOVE
  moved      a link was added afterwards: `moved_to` (to the copy in the other folder) or
             `moved_from` (on the copy, from the old document)
  unexpunged `expunged_at` was taken off again (the server had the message after all)
  deleted    the document was removed (on_expunge = "delete")

The resume token is written (atomically) to --token after every event, so a restart goes
on exactly after the last event printed. A token older than the oplog's window cannot be
resumed: the script then says so and exits with status 2; catch up with the polling script
(or start afresh with --forget-token) and accept that the changes in between were missed.

  pip install pymongo
  python3 examples/follow_changes_stream.py --uri "mongodb://127.0.0.1:27017/?replicaSet=rs0" \\
      --db mailpump --token /var/lib/reader/stream-token.json
"""

import argparse
import json
import os
import sys

import pymongo
from pymongo.errors import OperationFailure

# Only the small fields of inserted documents travel (not text, html, headers).
PIPELINE = [
    {"$match": {"operationType": {"$in": ["insert", "update", "replace", "delete"]}}},
    {"$project": {
        "operationType": 1, "documentKey": 1, "clusterTime": 1, "updateDescription": 1,
        "fullDocument.account": 1, "fullDocument.mailbox": 1, "fullDocument.uidvalidity": 1,
        "fullDocument.uid": 1, "fullDocument.subject": 1, "fullDocument.message_id": 1,
        "fullDocument.flags": 1, "fullDocument.modseq": 1, "fullDocument.moved_from": 1,
    }},
]
HISTORY_LOST = {136, 280, 286}  # CappedPositionLost, ChangeStreamFatalError, ChangeStreamHistoryLost


def identity(doc_id):
    """account/mailbox/uidvalidity/uid from a message _id (the mailbox may contain '/')."""
    account, rest = doc_id.split("/", 1)
    mailbox, uidvalidity, uid = rest.rsplit("/", 2)
    return {"id": doc_id, "account": account, "mailbox": mailbox,
            "uidvalidity": int(uidvalidity), "uid": int(uid)}


def events_of(change):
    """The JSON events of one change (an update can carry several)."""
    op = change["operationType"]
    base = identity(change["documentKey"]["_id"])
    if op in ("insert", "replace"):
        d = change.get("fullDocument") or {}
        e = dict(base, event="new" if op == "insert" else "replaced",
                 subject=d.get("subject"), message_id=d.get("message_id"), flags=d.get("flags"))
        if "moved_from" in d:
            e["moved_from"] = d["moved_from"]
        return [e]
    if op == "delete":
        return [dict(base, event="deleted")]
    desc = change.get("updateDescription") or {}
    set_ = desc.get("updatedFields") or {}
    removed = desc.get("removedFields") or []
    out = []
    # MongoDB 5+ may describe an array change element-wise ("flags.2") or as a truncation:
    # the current flags then come from the looked-up document.
    touched = [k for k in list(set_) + removed if k == "flags" or k.startswith("flags.")]
    touched += [t["field"] for t in desc.get("truncatedArrays") or [] if t.get("field") == "flags"]
    if touched:
        now = change.get("fullDocument") or {}
        out.append(dict(base, event="flags", flags=now.get("flags", set_.get("flags")),
                        modseq=now.get("modseq", set_.get("modseq"))))
    if "expunged_at" in set_:
        e = dict(base, event="expunged", at=set_["expunged_at"].isoformat(),
                 reason=set_.get("expunged_reason", "expunged on the server"))
        if "moved_to" in set_:
            e["moved_to"] = set_["moved_to"]
        out.append(e)
    elif "moved_to" in set_:
        out.append(dict(base, event="moved", moved_to=set_["moved_to"]))
    if "moved_from" in set_:
        out.append(dict(base, event="moved", moved_from=set_["moved_from"]))
    if "expunged_at" in removed:
        out.append(dict(base, event="unexpunged"))
    return out


def load_token(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)["resume_token"]
    return None


def save_token(path, token):
    if not path or token is None:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"resume_token": token}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", default=os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017"))
    p.add_argument("--db", default="mailpump")
    p.add_argument("--token", help="file that keeps the resume token across restarts")
    p.add_argument("--forget-token", action="store_true", help="ignore a saved token")
    p.add_argument("--exit-after-idle", type=float,
                   help="exit once no change arrived for this many seconds (batch use, tests)")
    a = p.parse_args()

    client = pymongo.MongoClient(a.uri, tz_aware=True)
    coll = client[a.db]["messages"]
    token = None if a.forget_token else load_token(a.token)
    idle_ms = int(a.exit_after_idle * 1000) if a.exit_after_idle else 1000
    try:
        with coll.watch(PIPELINE, resume_after=token, max_await_time_ms=idle_ms,
                        full_document="updateLookup") as stream:
            # a fresh stream: remember where it starts, so that a restart misses nothing
            save_token(a.token, stream.resume_token)
            while stream.alive:
                change = stream.try_next()
                if change is None:
                    save_token(a.token, stream.resume_token)
                    if a.exit_after_idle:
                        return 0
                    continue
                for e in events_of(change):
                    print(json.dumps(e, default=str), flush=True)
                save_token(a.token, stream.resume_token)
    except OperationFailure as err:
        if err.code in HISTORY_LOST:
            print(f"the saved resume token is too old for the oplog ({err}): catch up with "
                  "follow_changes_poll.py, then restart with --forget-token", file=sys.stderr)
            return 2
        if err.code == 40573:
            print("this server is not a replica set: change streams need one (or use "
                  "follow_changes_poll.py)", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        pass
