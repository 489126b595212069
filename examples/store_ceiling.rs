//! Benchmark helper (deploy/bench.sh): the database's ceiling for mailpump's writes. Parses
//! every message of a Maildir first (not timed), then times only the writes mailpump makes
//! for them (blobs, documents, checkpoints) through its own store, batch by batch.
//!   cargo run --release --example store_ceiling -- MONGODB_URI DATABASE MAILDIR [BATCH]

use std::time::{Duration, Instant};

use mailpump::config::Secret;
use mailpump::config::StoreConfig;
use mailpump::parse::{self, Limits};
use mailpump::store::{MailboxStatus, ReadyMessage, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (uri, database, maildir) = (&args[1], &args[2], std::path::Path::new(&args[3]));
    let batch: usize = args.get(4).map(|b| b.parse()).transpose()?.unwrap_or(100);
    let mut files: Vec<_> = ["new", "cur"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(maildir.join(d))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
        })
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut ready = Vec::with_capacity(files.len());
    let mut bytes = 0u64;
    for (i, path) in files.iter().enumerate() {
        let raw = std::fs::read(path)?;
        bytes += raw.len() as u64;
        let size = raw.len() as u64;
        ready.push(ReadyMessage {
            uid: i as u32 + 1,
            flags: vec![],
            internal_date: None,
            size,
            parsed: parse::parse(raw, Limits::default()),
            gmail: None,
        });
    }
    let store = Store::connect(&StoreConfig {
        uri: Secret::new(uri.as_str()),
        database: database.to_string(),
        connect_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(120),
        max_inline_body: 1024 * 1024,
        inline_raw_max: mailpump::parse::DEFAULT_INLINE_RAW,
        write_concern: Default::default(),
        on_expunge: Default::default(),
        blob_sweep_after: Duration::from_secs(3600),
    })
    .await?;
    let started = Instant::now();
    for chunk in ready.chunks(batch) {
        let last = chunk.last().map(|m| m.uid).unwrap_or(0);
        store
            .commit_batch("ceiling", "INBOX", 1, MailboxStatus::default(), chunk, last)
            .await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"elapsed_s\": {elapsed:.3}, \"messages\": {}, \"bytes\": {bytes}}}",
        ready.len()
    );
    store.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
