//! The one-shot commands: `sync` (one catch-up pass over every mailbox, concurrently) and
//! `check` (config, store, login and EXAMINE of every mailbox, one line each).

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Account, Config, Protocol};
use crate::imap::Session;
use crate::parse::Limits;
use crate::store::Store;
use crate::sync::{self, SyncError, SyncReport};

/// How long LOGOUT may take after a successful pass.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn limits(config: &Config) -> Limits {
    Limits {
        max_inline_body: config.store.max_inline_body,
        ..Limits::default()
    }
}

/// Connects, runs one catch-up pass, logs out.
pub async fn sync_mailbox(
    account: &Account,
    mailbox: &str,
    store: &Store,
    limits: Limits,
    cancel: &CancellationToken,
) -> Result<SyncReport, SyncError> {
    if account.protocol == Protocol::Pop3 {
        return crate::pop3::pass::poll(account, store, limits, cancel).await;
    }
    let mut session = Session::connect(account).await?;
    tracing::info!(account = %account.name, mailbox, host = %account.host, port = account.port, "connected");
    let report = sync::catch_up(&mut session, store, account, mailbox, limits, cancel).await?;
    session
        .logout(LOGOUT_TIMEOUT.min(account.settings.command_timeout))
        .await;
    Ok(report)
}

/// `mailpump sync`: true when every mailbox completed its pass.
pub async fn sync_all(config: &Config, cancel: CancellationToken) -> bool {
    let store = match Store::connect(&config.store).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "store_unreachable");
            return false;
        }
    };
    let limits = limits(config);
    let mut tasks = JoinSet::new();
    for account in &config.accounts {
        for mailbox in &account.mailboxes {
            let (account, mailbox, store, cancel) = (
                account.clone(),
                mailbox.clone(),
                store.clone(),
                cancel.child_token(),
            );
            tasks.spawn(async move {
                let result = sync_mailbox(&account, &mailbox, &store, limits, &cancel).await;
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
                        false
                    }
                    Ok(r) => {
                        tracing::info!(
                            account = name,
                            mailbox,
                            fetched = r.fetched,
                            stored = r.stored,
                            replaced = r.replaced,
                            skipped = r.skipped,
                            bytes = r.bytes,
                            last_uid = r.last_uid,
                            uidvalidity = r.uidvalidity,
                            elapsed_ms = r.elapsed.as_millis() as u64,
                            "mailbox_synced"
                        );
                        true
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
    while let Some(joined) = tasks.join_next().await {
        // A panic in one mailbox's task is that mailbox's failure, not the others'.
        all_ok &= joined.unwrap_or_else(|e| {
            tracing::error!(error = %e, "mailbox_task_panicked");
            false
        });
    }
    store.shutdown().await;
    all_ok
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
            store.shutdown().await;
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
