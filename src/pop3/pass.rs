//! One POP3 poll: connect, UIDL + LIST, give new UIDLs their stable uids, RETR them in
//! batches (fetching batch n+1 while batch n is parsed and stored), DELE what was acknowledged
//! when `delete_after_store`, QUIT.

use std::collections::HashSet;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Listing, Pop3Session};
use crate::budget::Reservation;
use crate::config::Account;
use crate::imap::FetchedMessage;
use crate::sync::{cut_batches, parse_batch, Context, SyncError, SyncReport};

struct Batch {
    messages: Vec<FetchedMessage>,
    /// (number in this session, UIDL) of each message, in the same order.
    ids: Vec<(u32, String)>,
    /// Its share of the memory budget, given back once it is acknowledged.
    room: Reservation,
}

/// One poll of a POP3 mailbox (always `INBOX`, uidvalidity 0).
pub async fn poll(
    account: &Account,
    ctx: &Context,
    cancel: &CancellationToken,
) -> Result<SyncReport, SyncError> {
    let (store, limits) = (&ctx.store, ctx.limits);
    let started = Instant::now();
    let name = account.name.as_str();
    let mut session = Pop3Session::connect(account).await?;
    let listing = session.listing().await?;
    let known = store.pop3_known(name).await?;
    let unassigned: Vec<String> = listing
        .iter()
        .filter(|l| !known.contains_key(&l.uidl))
        .map(|l| l.uidl.clone())
        .collect();
    let assigned = store.pop3_assign(name, &unassigned).await?;
    let uid_of = |uidl: &str| {
        known
            .get(uidl)
            .map(|e| e.uid)
            .or_else(|| assigned.get(uidl).copied())
    };

    // Messages whose documents are acknowledged but which are still on the server (an
    // earlier session ended before QUIT): delete them now if asked to.
    let mut to_delete: Vec<(u32, String)> = if account.delete_after_store {
        listing
            .iter()
            .filter(|l| known.get(&l.uidl).is_some_and(|e| e.stored))
            .map(|l| (l.number, l.uidl.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let new: Vec<(Listing, u32)> = listing
        .iter()
        .filter(|l| !known.get(&l.uidl).is_some_and(|e| e.stored))
        .filter_map(|l| uid_of(&l.uidl).map(|uid| (l.clone(), uid)))
        .collect();
    let mut report = SyncReport {
        uidvalidity: 0,
        ..Default::default()
    };
    if !new.is_empty() {
        tracing::info!(
            account = name,
            mailbox = "INBOX",
            count = new.len(),
            on_server = listing.len(),
            "catch_up_started"
        );
    }
    let tracker = crate::progress::Tracker::start("sync", name, "INBOX", new.len() as u64);
    let batches = cut_batches(
        new,
        account.settings.batch_size,
        account.settings.batch_bytes,
        |(l, _)| l.size,
    );

    let (tx, mut rx) = mpsc::channel::<Batch>(1);
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<Vec<(u32, String)>>();
    let store2 = store.clone();
    let account_name = name.to_string();
    let storer = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let (mut stored, mut replaced, mut last) = (0usize, 0usize, 0u32);
        while let Some(batch) = rx.recv().await {
            let t = Instant::now();
            let ready = parse_batch(batch.messages, limits).await?;
            let uidls: Vec<String> = batch.ids.iter().map(|(_, u)| u.clone()).collect();
            let r = store2
                .commit_pop3_batch(&account_name, &ready, &uidls)
                .await?;
            stored += r.inserted;
            replaced += r.replaced;
            last = last.max(ready.iter().map(|m| m.uid).max().unwrap_or(0));
            drop(batch.room);
            tracker.inc(ready.len() as u64, ready.iter().map(|m| m.size).sum());
            tracing::debug!(account = %account_name, mailbox = "INBOX", count = ready.len(), elapsed_ms = t.elapsed().as_millis() as u64, "batch_stored");
            let _ = acked_tx.send(batch.ids);
        }
        Ok::<_, SyncError>((stored, replaced, last))
    }));

    let fetched = async {
        for batch in batches {
            if cancel.is_cancelled() {
                break;
            }
            if account.delete_after_store {
                while let Ok(acked) = acked_rx.try_recv() {
                    to_delete.extend(acked);
                }
            }
            let room = ctx
                .budget
                .reserve(batch.iter().map(|(l, _)| l.size).sum())
                .await;
            let mut messages = Vec::with_capacity(batch.len());
            let mut ids = Vec::with_capacity(batch.len());
            for (l, uid) in batch {
                let body = session.retr(l.number).await?;
                report.bytes += body.len() as u64;
                messages.push(FetchedMessage {
                    uid,
                    flags: Vec::new(),
                    internal_date: None,
                    size: body.len() as u64,
                    body,
                });
                ids.push((l.number, l.uidl));
            }
            report.fetched += messages.len();
            if tx
                .send(Batch {
                    messages,
                    ids,
                    room,
                })
                .await
                .is_err()
            {
                break;
            }
        }
        Ok::<(), SyncError>(())
    }
    .await;
    drop(tx);
    let store_result = storer
        .await
        .map_err(|e| SyncError::Internal(format!("POP3 store stage: {e}")))?;
    fetched?;
    let (stored, replaced, last) = store_result?;
    report.stored = stored;
    report.replaced = replaced;
    report.last_uid = last.max(known.values().map(|e| e.uid).max().unwrap_or(0));

    if account.delete_after_store {
        while let Ok(acked) = acked_rx.try_recv() {
            to_delete.extend(acked);
        }
        let mut seen = HashSet::new();
        to_delete.retain(|(n, _)| seen.insert(*n));
        for (number, _) in &to_delete {
            session.dele(*number).await?;
        }
    }
    // QUIT commits the deletions; only then does the map say so.
    session.quit().await?;
    if !to_delete.is_empty() {
        let uidls: Vec<String> = to_delete.iter().map(|(_, u)| u.clone()).collect();
        store.pop3_mark(name, &uidls, "deleted").await?;
        tracing::info!(
            account = name,
            mailbox = "INBOX",
            count = uidls.len(),
            "deleted_from_server"
        );
    }
    report.elapsed = started.elapsed();
    Ok(report)
}
