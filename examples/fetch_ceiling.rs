//! Benchmark helper (deploy/bench.sh): the server's ceiling for mailpump's fetch pattern. The
//! same UID SEARCH, RFC822.SIZE and batched `UID FETCH (... BODY.PEEK[])` commands as a
//! catch-up (the next batch's FETCH pipelined), through mailpump's own IMAP session, with the
//! bytes thrown away.
//!   cargo run --release --example fetch_ceiling -- PORT USER PASSWORD [BATCH]

use std::time::Instant;

use mailpump::config;
use mailpump::imap::Session;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // in a task of the runtime's workers, as mailpump's own sessions run (the main thread's
    // block_on would add a thread hop to every wake-up)
    tokio::spawn(fetch()).await?
}

async fn fetch() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    let (port, user, password) = (&args[1], &args[2], &args[3]);
    let batch: usize = args.get(4).map(|b| b.parse()).transpose()?.unwrap_or(100);
    let toml = format!(
        "[store]\nuri = \"mongodb://unused\"\n[accounts.bench]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"plain\"\nusername = \"{user}\"\npassword = \"{password}\"\n"
    );
    let account = config::from_toml_str(&toml)?.accounts.remove(0);
    let mut session = Session::connect(&account).await?;
    let started = Instant::now();
    let trace = std::env::var_os("FETCH_CEILING_TRACE").is_some();
    let step = |what: &str| {
        if trace {
            eprintln!("{what} {:.3}", started.elapsed().as_secs_f64());
        }
    };
    session.open_mailbox("INBOX", false, None).await?;
    step("examine");
    let uids = session.search_after(0, None, false).await?;
    step("search");
    let mut sizes = Vec::new();
    for chunk in uids.chunks(5000) {
        sizes.extend(session.fetch_sizes(chunk).await?);
    }
    step("sizes");
    let bodies_from = started.elapsed().as_secs_f64();
    let (mut messages, mut bytes) = (0usize, 0u64);
    let batches: Vec<&[u32]> = uids.chunks(batch).collect();
    for (i, chunk) in batches.iter().enumerate() {
        // as a catch-up does: the next batch's FETCH sent before this one is read
        let next = batches.get(i + 1).copied();
        for m in session.fetch_bodies_then(chunk, next).await? {
            messages += 1;
            bytes += m.body.len() as u64;
        }
        step(&format!("{messages} fetched"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    // elapsed_s: EXAMINE to the last body; bodies_s: the body FETCHes alone (what the bare
    // `UID FETCH 1:*` of the benchmark times)
    let bodies = elapsed - bodies_from;
    println!("{{\"elapsed_s\": {elapsed:.3}, \"bodies_s\": {bodies:.3}, \"messages\": {messages}, \"bytes\": {bytes}}}");
    Ok(())
}
