//! `mailpump sync`: one catch-up pass over every configured mailbox, all at once, then exit.
//! SIGTERM/SIGINT lets each mailbox finish the batch in flight within [`SYNC_GRACE`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{LOGOUT_TIMEOUT, STORE_SHUTDOWN};
use crate::config::{Account, Config, Protocol};
use crate::imap::Session;
use crate::pipeline::{Context, SyncError, SyncReport};
use crate::store::Store;
use crate::sync;

/// After SIGTERM/SIGINT, how long `sync` lets each mailbox finish the batch in flight.
pub const SYNC_GRACE: Duration = Duration::from_secs(7);

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

/// Records the outcome of one mailbox's pass in `mailboxes` for `status`: `last_success_at`
/// after a complete pass, the error otherwise. Waits at most the store's connect timeout (the
/// database may be what failed); a write that fails is only logged.
async fn record_outcome(
    store: &Store,
    within: Duration,
    account: &str,
    mailbox: &str,
    outcome: Result<(), String>,
) {
    let write = async {
        match &outcome {
            Ok(()) => store.mark_success(account, mailbox).await,
            Err(e) => store.record_error(account, mailbox, e).await,
        }
    };
    match tokio::time::timeout(within, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(account, mailbox, error = %e, "state_write_failed"),
        Err(_) => tracing::warn!(account, mailbox, error = "timed out", "state_write_failed"),
    }
}

/// Logs and records one mailbox's pass; true when it completed (or stopped cleanly on a
/// signal) with nothing held back.
async fn finish(
    store: &Store,
    within: Duration,
    name: &str,
    mailbox: &str,
    result: Result<SyncReport, SyncError>,
    cancel: &CancellationToken,
) -> bool {
    let outcome = match &result {
        Ok(_) if cancel.is_cancelled() => None,
        Ok(_) => Some(Ok(())),
        Err(e) => Some(Err(e.to_string())),
    };
    if let Some(outcome) = outcome {
        record_outcome(store, within, name, mailbox, outcome).await;
    }
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
}

/// Folders found on the server, then caught up by at most `max_connections` sessions at
/// once, each taking the next folder when it is done with one (the first session is the one
/// that listed them).
async fn sync_account(
    account: Account,
    ctx: Context,
    options: sync::Options,
    cancel: CancellationToken,
    within: Duration,
) -> bool {
    let name = account.name.clone();
    let listed = async {
        let mut session = Session::connect(&account).await?;
        tracing::info!(account = %account.name, host = %account.host, port = account.port, "connected");
        let prefix = crate::folders::personal_prefix(&session.namespaces().await?);
        let (lists, _) = session.list_folders().await?;
        let found: Vec<crate::folders::Folder> = lists.iter().map(Into::into).collect();
        let plan = crate::folders::Selection::of(&account).plan(&found, prefix.as_deref());
        Ok::<_, crate::imap::ImapError>((session, plan))
    };
    let (first, plan) = tokio::select! {
        _ = cancel.cancelled() => return true,
        listed = listed => match listed {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(account = %name, error = %e, "folder_list_failed");
                return false;
            }
        },
    };
    for (mailbox, reason) in &plan.left_out {
        tracing::info!(account = %name, mailbox = %mailbox, reason = %reason, "folder_left_out");
    }
    tracing::info!(account = %name, synced = plan.synced.len(), left_out = plan.left_out.len(), "folders_discovered");
    let queue: Arc<Mutex<VecDeque<String>>> =
        Arc::new(Mutex::new(plan.synced.keys().cloned().collect()));
    let workers = account
        .settings
        .max_connections
        .min(plan.synced.len())
        .max(1);
    let mut tasks = JoinSet::new();
    let mut first = Some(first);
    let live = Arc::new(AtomicUsize::new(workers));
    for _ in 0..workers {
        let (account, queue, cancel, live) =
            (account.clone(), queue.clone(), cancel.clone(), live.clone());
        let ctx = Context {
            store: ctx.store.scoped(),
            limits: ctx.limits,
            budget: ctx.budget.clone(),
        };
        let mut session = first.take();
        tasks.spawn(async move {
            let mut ok = true;
            loop {
                let Some(mailbox) = crate::error::lock(&queue).pop_front() else {
                    break;
                };
                if cancel.is_cancelled() {
                    break;
                }
                let mut s = match session.take() {
                    Some(s) => s,
                    None => match tokio::select! {
                        _ = cancel.cancelled() => break,
                        s = Session::connect(&account) => s,
                    } {
                        Ok(s) => {
                            tracing::info!(account = %account.name, host = %account.host, port = account.port, "connected");
                            s
                        }
                        // a server's connection cap: the other workers take this folder
                        Err(e) if live.load(Ordering::SeqCst) > 1 => {
                            tracing::warn!(account = %account.name, error = %e, "sync_worker_not_connected");
                            live.fetch_sub(1, Ordering::SeqCst);
                            crate::error::lock(&queue).push_front(mailbox);
                            return ok;
                        }
                        Err(e) => {
                            ok &= finish(&ctx.store, within, &account.name, &mailbox, Err(e.into()), &cancel).await;
                            continue;
                        }
                    },
                };
                let result = sync::catch_up(&mut s, &ctx, &account, &mailbox, options, &cancel).await;
                // a folder the server will not open leaves the session usable
                let keep = match &result {
                    Ok(_) => true,
                    Err(SyncError::Imap(crate::imap::ImapError::Rejected { command, .. })) => {
                        command == "EXAMINE" || command == "SELECT"
                    }
                    Err(_) => false,
                };
                ok &= finish(&ctx.store, within, &account.name, &mailbox, result, &cancel).await;
                if keep {
                    session = Some(s);
                }
            }
            if let Some(s) = session {
                s.logout(LOGOUT_TIMEOUT.min(account.settings.command_timeout)).await;
            }
            ok
        });
    }
    let mut all_ok = true;
    while let Some(joined) = tasks.join_next().await {
        all_ok &= joined.unwrap_or_else(|e| {
            tracing::error!(account = %name, error = %e, "mailbox_task_panicked");
            false
        });
    }
    all_ok
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
    let (limits, budget) = (super::limits(config), super::budget(config));
    let mut tasks = JoinSet::new();
    for account in &config.accounts {
        let Some(mailboxes) = crate::folders::fixed_mailboxes(account) else {
            let ctx = Context {
                store: store.clone(),
                limits,
                budget: budget.clone(),
            };
            let (account, cancel) = (account.clone(), cancel.child_token());
            let within = config.store.connect_timeout;
            tasks.spawn(async move { sync_account(account, ctx, options, cancel, within).await });
            continue;
        };
        for mailbox in &mailboxes {
            let ctx = Context {
                store: store.scoped(),
                limits,
                budget: budget.clone(),
            };
            let (account, mailbox, cancel) =
                (account.clone(), mailbox.clone(), cancel.child_token());
            let within = config.store.connect_timeout;
            tasks.spawn(async move {
                let result = sync_mailbox(&account, &mailbox, &ctx, options, &cancel).await;
                finish(&ctx.store, within, &account.name, &mailbox, result, &cancel).await
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
        peak_rss_kb = crate::sys::peak_rss_kb(),
        max_inflight_bytes = config.limits.max_inflight_bytes,
        "sync_finished"
    );
    all_ok
}
