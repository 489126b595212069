//! The catch-up pass over one mailbox: EXAMINE, compare UIDVALIDITY with the checkpoint, UID
//! SEARCH above it, then a three-stage pipeline (fetch -> parse -> store) joined by bounded
//! channels, so that fetching batch n+1 overlaps parsing n and storing n-1, and memory stays
//! bounded by a few batches whatever the mailbox size.
//!
//! **Invariant:** the checkpoint only moves through `Store::commit_batch`, batch by batch, in
//! UID order: a failure anywhere leaves it at the last fully stored batch.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Account;
use crate::error::ErrorClass;
use crate::imap::{FetchedMessage, ImapError, MailboxInfo, Session};
use crate::parse::{self, Limits};
use crate::store::{MailboxStatus, ReadyMessage, Store, StoreError};

/// async-imap holds each FETCH response whole and refuses literals above 512 MiB.
const MAX_FETCHABLE: u64 = 500 * 1024 * 1024;
/// UIDs per `UID FETCH (UID RFC822.SIZE)` while planning.
const SIZE_QUERY_CHUNK: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pop3(#[from] crate::pop3::Pop3Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl SyncError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SyncError::Imap(e) => e.class(),
            SyncError::Store(e) => e.class(),
            SyncError::Pop3(e) => e.class(),
            SyncError::Internal(_) => ErrorClass::Retry,
        }
    }
}

/// What one catch-up pass did.
#[derive(Debug, Default, Clone)]
pub struct SyncReport {
    /// Messages fetched from the server.
    pub fetched: usize,
    /// Message documents newly inserted.
    pub stored: usize,
    /// Documents that were already there and were rewritten.
    pub replaced: usize,
    /// UIDs found by SEARCH but not stored: expunged meanwhile, quarantined, or too large.
    pub skipped: usize,
    /// UIDs quarantined during this pass.
    pub quarantined: usize,
    /// Raw bytes fetched.
    pub bytes: u64,
    pub elapsed: Duration,
    /// INTERNALDATE to acknowledged, per stored message (for the latency histogram).
    pub latencies: Vec<Duration>,
    /// The checkpoint after the pass.
    pub last_uid: u32,
    pub uidvalidity: u32,
}

struct PlannedBatch {
    uids: Vec<u32>,
    /// The checkpoint once this batch is stored (its highest UID).
    last_uid: u32,
}

struct FetchedBatch {
    messages: Vec<FetchedMessage>,
    last_uid: u32,
}

struct ParsedBatch {
    messages: Vec<ReadyMessage>,
    last_uid: u32,
}

/// Cuts `sizes` (sorted by UID) into batches of at most `count` messages and `bytes` bytes
/// (a single larger message goes alone).
fn plan_batches(sizes: &[(u32, u64)], count: usize, bytes: u64) -> Vec<PlannedBatch> {
    cut_batches(sizes.iter().copied(), count, bytes, |(_, size)| *size)
        .into_iter()
        .map(|batch| PlannedBatch {
            last_uid: batch.last().map(|(uid, _)| *uid).unwrap_or(0),
            uids: batch.into_iter().map(|(uid, _)| uid).collect(),
        })
        .collect()
}

/// Cuts `items` into batches of at most `count` items and `bytes` bytes (by `size`); a single
/// larger item goes alone. Shared by the IMAP and POP3 passes.
pub(crate) fn cut_batches<T>(
    items: impl IntoIterator<Item = T>,
    count: usize,
    bytes: u64,
    size: impl Fn(&T) -> u64,
) -> Vec<Vec<T>> {
    let mut batches = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut current_bytes = 0u64;
    for item in items {
        let item_size = size(&item);
        if !current.is_empty() && (current.len() >= count || current_bytes + item_size > bytes) {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(item);
        current_bytes += item_size;
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Parses a batch on the blocking pool, split across the cores.
pub(crate) async fn parse_batch(
    messages: Vec<FetchedMessage>,
    limits: Limits,
) -> Result<Vec<ReadyMessage>, SyncError> {
    let parallel = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1);
    let per_task = messages.len().div_ceil(parallel).max(1);
    let mut tasks = Vec::new();
    let mut rest = messages;
    while !rest.is_empty() {
        let tail = rest.split_off(per_task.min(rest.len()));
        let chunk = std::mem::replace(&mut rest, tail);
        tasks.push(tokio::task::spawn_blocking(move || {
            chunk
                .into_iter()
                .map(|m| ReadyMessage {
                    uid: m.uid,
                    flags: m.flags,
                    internal_date: m.internal_date,
                    size: m.size,
                    parsed: parse::parse(m.body, limits),
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        // parse::parse catches panics itself; a JoinError here would be a bug in mailpump.
        out.extend(
            t.await
                .map_err(|e| SyncError::Internal(format!("parse task failed: {e}")))?,
        );
    }
    Ok(out)
}

/// How many sessions in a row a UID may fail before it is quarantined.
pub const QUARANTINE_AFTER: i64 = 3;

/// UID FETCH of one batch. When the server refuses the batch (tagged NO/BAD: Gmail's
/// "NO System Error" for one message) or leaves out UIDs that still exist, each UID is fetched
/// on its own to find the culprits. A culprit's failure is counted in the store; at
/// QUARANTINE_AFTER it is quarantined (recorded with its reason, logged, skipped) so that it
/// cannot block its mailbox forever; before that, the batch fails and is retried next session.
/// Returns (messages, UIDs gone, UIDs quarantined).
async fn fetch_batch(
    session: &mut Session,
    store: &Store,
    account: &str,
    mailbox: &str,
    uids: &[u32],
) -> Result<(Vec<FetchedMessage>, usize, usize), SyncError> {
    let mut failed: Vec<(u32, String)> = Vec::new();
    let mut messages = match session.fetch_bodies(uids).await {
        Ok(m) => m,
        Err(ImapError::Rejected { status, text, .. }) if uids.len() == 1 => {
            failed.push((uids[0], format!("UID FETCH answered {status} {text}")));
            Vec::new()
        }
        Err(ImapError::Rejected { .. }) => {
            let mut out = Vec::new();
            for uid in uids {
                match session.fetch_bodies(&[*uid]).await {
                    Ok(m) => out.extend(m),
                    Err(ImapError::Rejected { status, text, .. }) => {
                        failed.push((*uid, format!("UID FETCH answered {status} {text}")))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            out
        }
        Err(e) => return Err(e.into()),
    };
    let got: HashSet<u32> = messages
        .iter()
        .map(|m| m.uid)
        .chain(failed.iter().map(|(u, _)| *u))
        .collect();
    let missing: Vec<u32> = uids.iter().copied().filter(|u| !got.contains(u)).collect();
    let mut gone = 0;
    if !missing.is_empty() {
        let still_there: HashSet<u32> = session.existing(&missing).await?.into_iter().collect();
        gone = missing.len() - still_there.len();
        for uid in missing.into_iter().filter(|u| still_there.contains(u)) {
            failed.push((
                uid,
                "the server returned no body for it although it exists".into(),
            ));
        }
    }
    let mut quarantined = HashSet::new();
    let mut retry = Vec::new();
    for (uid, reason) in &failed {
        let attempts = store.record_failure(account, mailbox, *uid, reason).await?;
        if attempts >= QUARANTINE_AFTER {
            store.quarantine(account, mailbox, *uid, reason).await?;
            tracing::error!(account, mailbox, uid, attempts, error = %reason, "quarantined");
            quarantined.insert(*uid);
        } else {
            retry.push(format!(
                "UID {uid}: {reason} (attempt {attempts} of {QUARANTINE_AFTER})"
            ));
        }
    }
    if !retry.is_empty() {
        return Err(SyncError::Imap(ImapError::Protocol(retry.join("; "))));
    }
    messages.retain(|m| !quarantined.contains(&m.uid));
    Ok((messages, gone, quarantined.len()))
}

/// One catch-up pass over `mailbox`. Stops between batches when `cancel` fires (what was
/// stored stays stored, and the checkpoint says so).
pub async fn catch_up(
    session: &mut Session,
    store: &Store,
    account: &Account,
    mailbox: &str,
    limits: Limits,
    cancel: &CancellationToken,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let settings = &account.settings;
    let info: MailboxInfo = session.open_mailbox(mailbox, settings.mark_seen).await?;
    let status = MailboxStatus {
        uidnext: info.uidnext,
        exists: info.exists,
    };
    let name = account.name.as_str();

    let last_uid = match store.checkpoint(name, mailbox).await? {
        Some(cp) if cp.uidvalidity == info.uidvalidity => cp.last_uid,
        Some(cp) => {
            tracing::warn!(
                account = name,
                mailbox,
                old = cp.uidvalidity,
                new = info.uidvalidity,
                "uidvalidity_changed"
            );
            store
                .reset_checkpoint(name, mailbox, info.uidvalidity, status)
                .await?;
            0
        }
        None => {
            store
                .reset_checkpoint(name, mailbox, info.uidvalidity, status)
                .await?;
            0
        }
    };
    let mut report = SyncReport {
        uidvalidity: info.uidvalidity,
        last_uid,
        ..Default::default()
    };

    let uids = session
        .search_after(last_uid, settings.since, settings.unseen_only)
        .await?;
    if uids.is_empty() {
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    let mut sizes = Vec::with_capacity(uids.len());
    for chunk in uids.chunks(SIZE_QUERY_CHUNK) {
        sizes.extend(session.fetch_sizes(chunk).await?);
    }
    let known: HashSet<u32> = sizes.iter().map(|(u, _)| *u).collect();
    report.skipped += uids.iter().filter(|u| !known.contains(u)).count();
    let (fetchable, too_large): (Vec<_>, Vec<_>) =
        sizes.into_iter().partition(|(_, s)| *s <= MAX_FETCHABLE);
    for (uid, size) in &too_large {
        let reason =
            format!("{size} bytes: larger than the {MAX_FETCHABLE} bytes a FETCH may carry");
        store.quarantine(name, mailbox, *uid, &reason).await?;
        tracing::error!(account = name, mailbox, uid, size, error = %reason, "quarantined");
    }
    report.skipped += too_large.len();
    let plan = plan_batches(&fetchable, settings.batch_size, settings.batch_bytes);
    tracing::info!(
        account = name,
        mailbox,
        count = fetchable.len(),
        batches = plan.len(),
        after_uid = last_uid,
        "catch_up_started"
    );

    // Stage 2: parse.
    let (fetched_tx, mut fetched_rx) = mpsc::channel::<FetchedBatch>(1);
    let (parsed_tx, mut parsed_rx) = mpsc::channel::<ParsedBatch>(1);
    let parser = tokio::spawn(async move {
        while let Some(batch) = fetched_rx.recv().await {
            let messages = parse_batch(batch.messages, limits).await?;
            if parsed_tx
                .send(ParsedBatch {
                    messages,
                    last_uid: batch.last_uid,
                })
                .await
                .is_err()
            {
                break; // the store stage stopped; it reports why
            }
        }
        Ok::<(), SyncError>(())
    });

    // Stage 3: store. Acknowledged UIDs flow back for `mark_seen`.
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<Vec<u32>>();
    let store2 = store.clone();
    let (name2, mailbox2) = (name.to_string(), mailbox.to_string());
    let uidvalidity = info.uidvalidity;
    let storer = tokio::spawn(async move {
        let mut totals = (0usize, 0usize, report.last_uid, Vec::new());
        while let Some(batch) = parsed_rx.recv().await {
            let t = Instant::now();
            let r = store2
                .commit_batch(
                    &name2,
                    &mailbox2,
                    uidvalidity,
                    status,
                    &batch.messages,
                    batch.last_uid,
                )
                .await?;
            totals.0 += r.inserted;
            totals.1 += r.replaced;
            totals.2 = batch.last_uid;
            let now = chrono::Utc::now();
            totals.3.extend(batch.messages.iter().filter_map(|m| {
                (now - m.internal_date?.with_timezone(&chrono::Utc))
                    .to_std()
                    .ok()
            }));
            tracing::debug!(
                account = %name2, mailbox = %mailbox2, count = batch.messages.len(), last_uid = batch.last_uid,
                blobs = r.blobs_written, elapsed_ms = t.elapsed().as_millis() as u64, "batch_stored"
            );
            let _ = acked_tx.send(batch.messages.iter().map(|m| m.uid).collect());
        }
        Ok::<_, SyncError>(totals)
    });

    // Stage 1: fetch (this task owns the session).
    let fetch_result = async {
        for batch in plan {
            if cancel.is_cancelled() {
                tracing::info!(account = name, mailbox, "catch_up_interrupted");
                break;
            }
            if settings.mark_seen {
                while let Ok(uids) = acked_rx.try_recv() {
                    session.mark_seen(&uids).await?;
                }
            }
            let (messages, gone, quarantined) =
                fetch_batch(session, store, name, mailbox, &batch.uids).await?;
            report.skipped += gone + quarantined;
            report.quarantined += quarantined;
            report.fetched += messages.len();
            report.bytes += messages.iter().map(|m| m.body.len() as u64).sum::<u64>();
            if fetched_tx
                .send(FetchedBatch {
                    messages,
                    last_uid: batch.last_uid,
                })
                .await
                .is_err()
            {
                break; // a later stage failed; it reports why
            }
        }
        Ok::<(), SyncError>(())
    }
    .await;
    drop(fetched_tx);

    let parse_result = parser
        .await
        .map_err(|e| SyncError::Internal(format!("parse stage: {e}")))?;
    let store_result = storer
        .await
        .map_err(|e| SyncError::Internal(format!("store stage: {e}")))?;
    if settings.mark_seen && fetch_result.is_ok() {
        while let Ok(uids) = acked_rx.try_recv() {
            session.mark_seen(&uids).await?;
        }
    }
    let (stored, replaced, last, latencies) = store_result?;
    parse_result?;
    fetch_result?;
    report.stored = stored;
    report.replaced = replaced;
    report.last_uid = last;
    report.latencies = latencies;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// `uidvalidity` and `exists` of a mailbox the way `check` reports them.
pub async fn examine(session: &mut Session, mailbox: &str) -> Result<MailboxInfo, SyncError> {
    Ok(session.open_mailbox(mailbox, false).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_by_count_and_bytes() {
        let sizes: Vec<(u32, u64)> = (1..=10).map(|u| (u, 10)).collect();
        let plan = plan_batches(&sizes, 4, 1000);
        assert_eq!(
            plan.iter().map(|b| b.uids.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(plan[0].last_uid, 4);
        let plan = plan_batches(&sizes, 100, 25);
        assert_eq!(
            plan.iter().map(|b| b.uids.len()).collect::<Vec<_>>(),
            vec![2, 2, 2, 2, 2]
        );
    }

    #[test]
    fn an_oversized_message_goes_alone() {
        let sizes = vec![(1, 10), (2, 5000), (3, 10)];
        let plan = plan_batches(&sizes, 100, 100);
        assert_eq!(
            plan.iter().map(|b| b.uids.clone()).collect::<Vec<_>>(),
            vec![vec![1], vec![2], vec![3]]
        );
    }
}
