// The same with imapflow (the IMAP client behind EmailEngine).
// usage: node imapflow.js PORT USER PASSWORD MONGODB_URI DB
'use strict';
const { ImapFlow } = require('imapflow');
const { simpleParser } = require('mailparser');
const { MongoClient } = require('mongodb');
const { toDoc, Batcher } = require('./common');

const [port, user, password, uri, dbName] = process.argv.slice(2);

async function main() {
  const mongo = await MongoClient.connect(uri);
  const batcher = new Batcher(mongo.db(dbName).collection('messages'), 100);
  const client = new ImapFlow({ host: '127.0.0.1', port: Number(port), secure: false, doSTARTTLS: false, auth: { user, pass: password }, logger: false });
  const started = process.hrtime.bigint();
  await client.connect();
  const lock = await client.getMailboxLock('INBOX', { readOnly: true });
  try {
    for await (const msg of client.fetch('1:*', { uid: true, source: true }, { uid: true })) {
      await batcher.add(toDoc(await simpleParser(msg.source), msg.source, msg.uid));
    }
    await batcher.flush();
  } finally {
    lock.release();
  }
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  await client.logout();
  await mongo.close();
  console.log(JSON.stringify({ elapsed_s: elapsed, stored: batcher.stored }));
}
main().catch((e) => { console.error(e); process.exit(1); });
