//! The one-shot commands: `sync` (one catch-up pass over every mailbox, concurrently) and
//! `check` (config, store, login and EXAMINE of every mailbox, one line each).

pub mod health;

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::config::{Account, Config, Protocol};
use crate::imap::Session;
use crate::parse::Limits;
use crate::store::Store;
use crate::sync::{self, Context, SyncError, SyncReport};

/// How long LOGOUT may take after a successful pass.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGTERM/SIGINT, how long `sync` lets each mailbox finish the batch in flight.
pub const SYNC_GRACE: Duration = Duration::from_secs(7);
/// What is left of the 10 s promise for the store's own shutdown.
pub const STORE_SHUTDOWN: Duration = Duration::from_secs(2);

pub fn limits(config: &Config) -> Limits {
    Limits {
        max_inline_body: config.store.max_inline_body,
        ..Limits::default()
    }
}

/// Connects, runs one catch-up pass, logs out. Cancelled before the login, it returns an
/// empty report.
pub async fn sync_mailbox(
    account: &Account,
    mailbox: &str,
    ctx: &Context,
    options: sync::Options,
    cancel: &CancellationToken,
) -> Result<SyncReport, SyncError> {
    if account.protocol == Protocol::Pop3 {
        return crate::pop3::pass::poll(account, ctx, cancel).await;
    }
    let mut session = tokio::select! {
        _ = cancel.cancelled() => return Ok(SyncReport::default()),
        s = Session::connect(account) => s?,
    };
    tracing::info!(account = %account.name, mailbox, host = %account.host, port = account.port, "connected");
    let report = sync::catch_up(&mut session, ctx, account, mailbox, options, cancel).await?;
    session
        .logout(LOGOUT_TIMEOUT.min(account.settings.command_timeout))
        .await;
    Ok(report)
}

/// The process-wide memory budget of `config`.
pub fn budget(config: &Config) -> Budget {
    Budget::new(config.limits.max_inflight_bytes)
}

/// `mailpump sync`: true when every mailbox completed its pass, or stopped cleanly between
/// batches because SIGTERM/SIGINT asked it to (what it had fetched is stored).
pub async fn sync_all(config: &Config, options: sync::Options, cancel: CancellationToken) -> bool {
    let store = tokio::select! {
        _ = cancel.cancelled() => return true,
        s = Store::connect(&config.store) => match s {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "store_unreachable");
                return false;
            }
        },
    };
    let (limits, budget) = (limits(config), budget(config));
    let mut tasks = JoinSet::new();
    for account in &config.accounts {
        for mailbox in &account.mailboxes {
            let ctx = Context {
                store: store.scoped(),
                limits,
                budget: budget.clone(),
            };
            let (account, mailbox, cancel) =
                (account.clone(), mailbox.clone(), cancel.child_token());
            tasks.spawn(async move {
                let result = sync_mailbox(&account, &mailbox, &ctx, options, &cancel).await;
                let name = account.name.as_str();
                match result {
                    Ok(r) if cancel.is_cancelled() => {
                        tracing::warn!(
                            account = name,
                            mailbox,
                            fetched = r.fetched,
                            stored = r.stored,
                            last_uid = r.last_uid,
                            "sync_interrupted"
                        );
                        true
                    }
                    Ok(r) => {
                        tracing::info!(
                            account = name,
                            mailbox,
                            fetched = r.fetched,
                            stored = r.stored,
                            replaced = r.replaced,
                            skipped = r.skipped,
                            quarantined = r.quarantined_total,
                            held = r.held,
                            bytes = r.bytes,
                            last_uid = r.last_uid,
                            uidvalidity = r.uidvalidity,
                            elapsed_ms = r.elapsed.as_millis() as u64,
                            "mailbox_synced"
                        );
                        r.held.is_none()
                    }
                    Err(e) => {
                        tracing::error!(account = name, mailbox, error = %e, "mailbox_sync_failed");
                        false
                    }
                }
            });
        }
    }
    let mut all_ok = true;
    // armed by the first signal; until then far away
    let deadline = tokio::time::sleep(Duration::from_secs(86400 * 365));
    tokio::pin!(deadline);
    let mut deadline_armed = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                // A panic in one mailbox's task is that mailbox's failure, not the others'.
                Some(joined) => all_ok &= joined.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "mailbox_task_panicked");
                    false
                }),
            },
            _ = cancel.cancelled(), if !deadline_armed => {
                deadline_armed = true;
                deadline.as_mut().reset(tokio::time::Instant::now() + SYNC_GRACE);
                tracing::info!(mailboxes = tasks.len(), grace_ms = SYNC_GRACE.as_millis() as u64, "stopping");
            }
            _ = &mut deadline, if deadline_armed => {
                tracing::warn!(still_running = tasks.len(), "shutdown_deadline");
                tasks.abort_all();
                all_ok = false;
                break;
            }
        }
    }
    store.shutdown(STORE_SHUTDOWN).await;
    tracing::info!(
        ok = all_ok,
        peak_rss_kb = peak_rss_kb(),
        max_inflight_bytes = config.limits.max_inflight_bytes,
        "sync_finished"
    );
    all_ok
}

/// The process's peak resident set size so far, in KiB (Linux `ru_maxrss`).
pub fn peak_rss_kb() -> u64 {
    // SAFETY: getrusage only writes the struct we pass.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0 {
            usage.ru_maxrss.max(0) as u64
        } else {
            0
        }
    }
}

/// `mailpump check`: prints one line per check to stdout; true when all pass.
pub async fn check_all(config: &Config) -> bool {
    let mut all_ok = true;
    match Store::connect(&config.store).await {
        Ok(store) => {
            println!(
                "ok    store  database {:?} reachable, indexes in place",
                config.store.database
            );
            store.shutdown(STORE_SHUTDOWN).await;
        }
        Err(e) => {
            println!("FAIL  store  {e}");
            all_ok = false;
        }
    }
    for account in &config.accounts {
        if account.protocol == Protocol::Pop3 {
            let result = async {
                let mut s = crate::pop3::Pop3Session::connect(account).await?;
                let (count, size) = s.stat().await?;
                let uidl = s.listing().await.map(|_| ());
                s.quit().await?;
                uidl.map(|_| (count, size))
            }
            .await;
            match result {
                Ok((count, size)) => println!(
                    "ok    {}/INBOX  {count} messages, {size} bytes (POP3)",
                    account.name
                ),
                Err(e) => {
                    println!("FAIL  {}/INBOX  {e}", account.name);
                    all_ok = false;
                }
            }
            continue;
        }
        match Session::connect(account).await {
            Err(e) => {
                for mailbox in &account.mailboxes {
                    println!("FAIL  {}/{}  {e}", account.name, mailbox);
                }
                all_ok = false;
            }
            Ok(mut session) => {
                for mailbox in &account.mailboxes {
                    match sync::examine(&mut session, mailbox).await {
                        Ok(info) => println!(
                            "ok    {}/{}  {} messages, uidvalidity {}",
                            account.name, mailbox, info.exists, info.uidvalidity
                        ),
                        Err(e) => {
                            println!("FAIL  {}/{}  {e}", account.name, mailbox);
                            all_ok = false;
                        }
                    }
                }
                session
                    .logout(LOGOUT_TIMEOUT.min(account.settings.command_timeout))
                    .await;
            }
        }
    }
    all_ok
}
