// The seed article's pipeline: node-imap SEARCH + FETCH, mailparser, the official MongoDB
// driver (batched insertMany). usage: node node_imap.js PORT USER PASSWORD MONGODB_URI DB
'use strict';
const Imap = require('imap');
const { simpleParser } = require('mailparser');
const { MongoClient } = require('mongodb');
const { toDoc, Batcher } = require('./common');

const [port, user, password, uri, dbName] = process.argv.slice(2);

async function main() {
  const client = await MongoClient.connect(uri);
  const batcher = new Batcher(client.db(dbName).collection('messages'), 100);
  const imap = new Imap({ user, password, host: '127.0.0.1', port: Number(port), tls: false });
  const started = process.hrtime.bigint();
  await new Promise((resolve, reject) => {
    imap.once('error', reject);
    imap.once('ready', () => {
      imap.openBox('INBOX', true, (err) => {
        if (err) return reject(err);
        // the article searched UNSEEN/SINCE; everything is unseen here
        imap.search(['UNSEEN'], (err, uids) => {
          if (err) return reject(err);
          let chain = Promise.resolve();
          const f = imap.fetch(uids, { bodies: '', markSeen: false });
          f.on('message', (msg) => {
            const chunks = []; let uid = 0;
            msg.on('body', (stream) => stream.on('data', (c) => chunks.push(c)));
            msg.once('attributes', (a) => { uid = a.uid; });
            msg.once('end', () => {
              const raw = Buffer.concat(chunks);
              const parsed = simpleParser(raw);
              chain = chain.then(async () => batcher.add(toDoc(await parsed, raw, uid)));
            });
          });
          f.once('error', reject);
          f.once('end', () => chain.then(() => batcher.flush()).then(resolve, reject));
        });
      });
    });
    imap.connect();
  });
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  imap.end();
  await client.close();
  console.log(JSON.stringify({ elapsed_s: elapsed, stored: batcher.stored }));
}
main().catch((e) => { console.error(e); process.exit(1); });
