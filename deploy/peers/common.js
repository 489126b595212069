// Shared by the Node.js peers: the document they store (the seed article's fields plus the
// raw message and attachment bytes, so that they store what mailpump stores) and batched
// inserts, as a reasonable implementation would.
'use strict';
const { Binary } = require('mongodb');

function toDoc(parsed, raw, uid) {
  const addr = (a) => (a && a.value ? a.value.map((v) => ({ name: v.name || null, address: v.address || null })) : []);
  return {
    account: 'bench', mailbox: 'INBOX', uid,
    message_id: parsed.messageId || null,
    subject: parsed.subject || null,
    date: parsed.date || null,
    from: addr(parsed.from), to: addr(parsed.to), cc: addr(parsed.cc),
    text: parsed.text || null,
    html: parsed.html || null,
    attachments: (parsed.attachments || []).map((a) => ({
      filename: a.filename || null, content_type: a.contentType, size: a.size,
      content_id: a.contentId || null, content: new Binary(a.content),
    })),
    raw: new Binary(raw),
    stored_at: new Date(),
  };
}

class Batcher {
  constructor(coll, size) { this.coll = coll; this.size = size; this.docs = []; this.stored = 0; }
  async add(doc) { this.docs.push(doc); if (this.docs.length >= this.size) await this.flush(); }
  async flush() {
    if (this.docs.length === 0) return;
    const docs = this.docs; this.docs = [];
    await this.coll.insertMany(docs, { ordered: false });
    this.stored += docs.length;
  }
}

module.exports = { toDoc, Batcher };
