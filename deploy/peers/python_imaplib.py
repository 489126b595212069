#!/usr/bin/env python3
"""The Python standard way: imaplib + email + pymongo, UID FETCH in batches of 100, insert_many.
usage: python_imaplib.py PORT USER PASSWORD MONGODB_URI DB"""
import email
import email.policy
import imaplib
import json
import re
import sys
import time

import pymongo
from bson import Binary

port, user, password, uri, dbname = sys.argv[1:6]
coll = pymongo.MongoClient(uri)[dbname].messages
started = time.monotonic()
M = imaplib.IMAP4("127.0.0.1", int(port))
M.login(user, password)
M.select("INBOX", readonly=True)
_, data = M.uid("SEARCH", None, "ALL")
uids = data[0].split()
stored = 0


def addresses(value):
    return [{"name": a.display_name or None, "address": a.addr_spec or None} for a in getattr(value, "addresses", [])] if value else []


for i in range(0, len(uids), 100):
    _, resp = M.uid("FETCH", b",".join(uids[i:i + 100]), "(UID BODY.PEEK[])")
    docs = []
    for part in resp:
        if not isinstance(part, tuple):
            continue
        uid = int(re.search(rb"UID (\d+)", part[0]).group(1))
        raw = part[1]
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        html = msg.get_body(preferencelist=("html",))
        docs.append({
            "account": "bench", "mailbox": "INBOX", "uid": uid,
            "message_id": msg.get("Message-ID"), "subject": msg.get("Subject"),
            "from": addresses(msg.get("From")), "to": addresses(msg.get("To")),
            "text": body.get_content() if body else None, "html": html.get_content() if html else None,
            "attachments": [{"filename": a.get_filename(), "content_type": a.get_content_type(),
                             "content": Binary(a.get_payload(decode=True) or b"")} for a in msg.iter_attachments()],
            "raw": Binary(raw),
        })
    if docs:
        coll.insert_many(docs, ordered=False)
        stored += len(docs)
M.logout()
print(json.dumps({"elapsed_s": time.monotonic() - started, "stored": stored}))
