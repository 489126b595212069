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
use tokio_util::task::AbortOnDropHandle;

use crate::budget::{Budget, Reservation};
use crate::config::Account;
use crate::error::ErrorClass;
use crate::imap::{FetchedMessage, ImapError, MailboxInfo, Session};
use crate::parse::{self, Limits};
use crate::progress::Tracker;
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
    #[error("the server refused all {count} messages of a batch and a probe: {reason} (an outage: nothing is counted against them)")]
    Outage { count: usize, reason: String },
    #[error("internal: {0}")]
    Internal(String),
}

impl SyncError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SyncError::Imap(e) => e.class(),
            SyncError::Store(e) => e.class(),
            SyncError::Pop3(e) => e.class(),
            SyncError::Outage { .. } => ErrorClass::Retry,
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
    /// UIDs in the quarantine (this uidvalidity) after the pass.
    pub quarantined_total: usize,
    /// A UID that failed and is not quarantined yet, holding the checkpoint below itself.
    pub held: Option<u32>,
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
    /// RFC822.SIZE of them all.
    bytes: u64,
    /// The checkpoint once this batch is stored (its highest UID).
    last_uid: u32,
}

struct FetchedBatch {
    messages: Vec<FetchedMessage>,
    /// The checkpoint once this batch is stored.
    last_uid: u32,
    /// Its share of the memory budget, given back once it is acknowledged.
    room: Reservation,
}

struct ParsedBatch {
    messages: Vec<ReadyMessage>,
    last_uid: u32,
    room: Reservation,
}

/// Cuts `sizes` (sorted by UID) into batches of at most `count` messages and `bytes` bytes
/// (a single larger message goes alone).
fn plan_batches(sizes: &[(u32, u64)], count: usize, bytes: u64) -> Vec<PlannedBatch> {
    cut_batches(sizes.iter().copied(), count, bytes, |(_, size)| *size)
        .into_iter()
        .map(|batch| PlannedBatch {
            last_uid: batch.last().map(|(uid, _)| *uid).unwrap_or(0),
            bytes: batch.iter().map(|(_, size)| *size).sum(),
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

/// Where a catch-up pass runs: its store scope, parse limits and the process-wide budget.
#[derive(Clone)]
pub struct Context {
    pub store: Store,
    pub limits: Limits,
    pub budget: Budget,
}

/// What a catch-up pass does besides catching up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Try every quarantined UID again now, whenever it was last tried.
    pub retry_quarantined: bool,
}

/// Who the quarantine rules are applied for.
struct Quarantine<'a> {
    account: &'a str,
    mailbox: &'a str,
    uidvalidity: u32,
    settings: &'a crate::config::Settings,
}

/// What one batch's fetch gave.
struct BatchOutcome {
    messages: Vec<FetchedMessage>,
    /// UIDs that no longer exist.
    gone: usize,
    /// UIDs quarantined now.
    quarantined: usize,
    /// The lowest UID that failed but is not quarantined yet: the checkpoint stays below it.
    held: Option<u32>,
}

fn refusal(status: &str, text: &str) -> String {
    format!("UID FETCH answered {status} {text}")
}

/// Fetches one batch. A refusal of the whole batch (tagged NO/BAD) or UIDs left out although
/// they exist are examined UID by UID:
///
/// - When no UID of the batch could be fetched and the server does not serve a probe (the next
///   UID to fetch, else the last stored one) either, the server is refusing everything: an
///   outage (Exchange's "Server Unavailable", `[UNAVAILABLE]`, `[LIMIT]`, Gmail's bandwidth
///   `[ALERT]`). The session ends with a retryable error and nothing is counted against any UID.
/// - Otherwise each UID that failed while others succeeded has the failure counted (once per
///   pass, keyed by uidvalidity and UID). It is quarantined once it failed in
///   `quarantine_after` passes spread over `quarantine_min_age`; until then it only holds the
///   checkpoint below itself while every other message is stored.
async fn fetch_batch(
    session: &mut Session,
    store: &Store,
    q: &Quarantine<'_>,
    failing: &HashSet<u32>,
    uids: &[u32],
    probes: &[u32],
) -> Result<BatchOutcome, SyncError> {
    let mut failed: Vec<(u32, String)> = Vec::new();
    let mut messages = match session.fetch_bodies(uids).await {
        Ok(m) => m,
        Err(ImapError::Rejected { status, text, .. }) if uids.len() == 1 => {
            failed.push((uids[0], refusal(status, &text)));
            Vec::new()
        }
        Err(ImapError::Rejected { .. }) => {
            let mut out = Vec::new();
            for uid in uids {
                match session.fetch_bodies(&[*uid]).await {
                    Ok(m) => out.extend(m),
                    Err(ImapError::Rejected { status, text, .. }) => {
                        failed.push((*uid, refusal(status, &text)))
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
    let fetched_failing: Vec<u32> = messages
        .iter()
        .map(|m| m.uid)
        .filter(|u| failing.contains(u))
        .collect();
    store
        .clear_failures(q.account, q.mailbox, q.uidvalidity, &fetched_failing)
        .await?;
    if failed.is_empty() {
        return Ok(BatchOutcome {
            messages,
            gone,
            quarantined: 0,
            held: None,
        });
    }
    failed.sort_unstable_by_key(|(u, _)| *u);
    if messages.is_empty() {
        let mut serves_others = false;
        for uid in probes {
            if session.probe(*uid).await? {
                serves_others = true;
                break;
            }
        }
        if !serves_others {
            let (uid, reason) = &failed[0];
            tracing::warn!(account = q.account, mailbox = q.mailbox, uid, count = failed.len(), error = %reason, "server_refusing");
            return Err(SyncError::Outage {
                count: failed.len(),
                reason: reason.clone(),
            });
        }
    }
    let mut quarantined = HashSet::new();
    let mut held = None;
    let now = chrono::Utc::now();
    for (uid, reason) in &failed {
        let count = store
            .record_failure(q.account, q.mailbox, q.uidvalidity, *uid, reason)
            .await?;
        let age = (now - count.since).to_std().unwrap_or_default();
        if count.sessions >= q.settings.quarantine_after && age >= q.settings.quarantine_min_age {
            store
                .quarantine(q.account, q.mailbox, q.uidvalidity, *uid, reason)
                .await?;
            tracing::error!(account = q.account, mailbox = q.mailbox, uid, attempts = count.sessions, error = %reason, "quarantined");
            quarantined.insert(*uid);
        } else {
            tracing::warn!(
                account = q.account,
                mailbox = q.mailbox,
                uid,
                attempts = count.sessions,
                quarantine_after = q.settings.quarantine_after,
                failing_for_s = age.as_secs(),
                error = %reason,
                "fetch_failed_checkpoint_held"
            );
            held = Some(held.map_or(*uid, |h: u32| h.min(*uid)));
        }
    }
    messages.retain(|m| !quarantined.contains(&m.uid));
    Ok(BatchOutcome {
        messages,
        gone,
        quarantined: quarantined.len(),
        held,
    })
}

/// Tries every quarantined UID of the current uidvalidity again, one at a time: one that is
/// fetched now is stored (below the checkpoint) and leaves the quarantine, one that is gone
/// leaves it too, one still refused stays.
async fn retry_quarantined(
    session: &mut Session,
    ctx: &Context,
    q: &Quarantine<'_>,
    uids: &[u32],
) -> Result<(usize, usize), SyncError> {
    let (mut released, mut stored) = (0usize, 0usize);
    for uid in uids {
        let size = session.fetch_sizes(&[*uid]).await?;
        let Some((_, size)) = size.first().copied() else {
            if session.existing(&[*uid]).await?.is_empty() {
                release(ctx, q, *uid, "quarantine_released_gone").await?;
                released += 1;
            }
            continue;
        };
        if size > MAX_FETCHABLE {
            continue; // still too large; nothing has changed
        }
        let _room = ctx.budget.reserve(size).await;
        let messages = match session.fetch_bodies(&[*uid]).await {
            Ok(m) => m,
            Err(ImapError::Rejected { status, text, .. }) => {
                tracing::info!(account = q.account, mailbox = q.mailbox, uid, error = %refusal(status, &text), "quarantine_retry_refused");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if messages.is_empty() {
            continue;
        }
        let ready = parse_batch(messages, ctx.limits).await?;
        ctx.store
            .commit_below_checkpoint(q.account, q.mailbox, q.uidvalidity, &ready)
            .await?;
        release(ctx, q, *uid, "quarantine_released_stored").await?;
        released += 1;
        stored += 1;
    }
    Ok((released, stored))
}

/// Takes `uid` out of the quarantine and logs `event` (why).
async fn release(
    ctx: &Context,
    q: &Quarantine<'_>,
    uid: u32,
    event: &'static str,
) -> Result<(), SyncError> {
    ctx.store
        .release_quarantined(q.account, q.mailbox, q.uidvalidity, &[uid])
        .await?;
    tracing::info!(account = q.account, mailbox = q.mailbox, uid, "{event}");
    Ok(())
}

/// One catch-up pass over `mailbox`. Stops between batches when `cancel` fires (what was
/// stored stays stored, and the checkpoint says so).
pub async fn catch_up(
    session: &mut Session,
    ctx: &Context,
    account: &Account,
    mailbox: &str,
    options: Options,
    cancel: &CancellationToken,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let store = &ctx.store;
    let limits = ctx.limits;
    let settings = &account.settings;
    let info: MailboxInfo = session.open_mailbox(mailbox, settings.mark_seen).await?;
    let status = MailboxStatus {
        uidnext: info.uidnext,
        exists: info.exists,
    };
    let name = account.name.as_str();

    let record = store.mailbox_record(name, mailbox).await?;
    let last_uid = match record.checkpoint {
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
    let q = Quarantine {
        account: name,
        mailbox,
        uidvalidity: info.uidvalidity,
        settings,
    };
    let failing: HashSet<u32> = record
        .failing
        .iter()
        .filter(|(v, _)| *v == info.uidvalidity)
        .map(|(_, u)| *u)
        .collect();
    let mut quarantined_now = record.quarantined_uids(info.uidvalidity);
    let mut report = SyncReport {
        uidvalidity: info.uidvalidity,
        last_uid,
        ..Default::default()
    };

    let retry_due = !quarantined_now.is_empty()
        && (options.retry_quarantined
            || record.quarantine_retried_at.is_none_or(|at| {
                (chrono::Utc::now() - at).to_std().unwrap_or_default() >= settings.quarantine_retry
            }));
    if retry_due {
        let (released, stored) = retry_quarantined(session, ctx, &q, &quarantined_now).await?;
        store.mark_quarantine_retried(name, mailbox).await?;
        tracing::info!(
            account = name,
            mailbox,
            tried = quarantined_now.len(),
            released,
            stored,
            "quarantine_retried"
        );
        report.stored += stored;
        let record = store.mailbox_record(name, mailbox).await?;
        quarantined_now = record.quarantined_uids(info.uidvalidity);
    }

    let uids = session
        .search_after(last_uid, settings.since, settings.unseen_only)
        .await?;
    let quarantined_set: HashSet<u32> = quarantined_now.iter().copied().collect();
    let uids: Vec<u32> = uids
        .into_iter()
        .filter(|u| !quarantined_set.contains(u))
        .collect();
    report.quarantined_total = quarantined_now.len();
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
        store
            .quarantine(name, mailbox, info.uidvalidity, *uid, &reason)
            .await?;
        tracing::error!(account = name, mailbox, uid, size, error = %reason, "quarantined");
    }
    report.skipped += too_large.len();
    report.quarantined += too_large.len();
    let plan = plan_batches(&fetchable, settings.batch_size, settings.batch_bytes);
    tracing::info!(
        account = name,
        mailbox,
        count = fetchable.len(),
        batches = plan.len(),
        after_uid = last_uid,
        "catch_up_started"
    );

    // Stage 2: parse. Stage tasks are aborted if this pass is dropped (a panic in stage 1):
    // nothing of a dead pass keeps running beside the next one.
    let (fetched_tx, mut fetched_rx) = mpsc::channel::<FetchedBatch>(1);
    let (parsed_tx, mut parsed_rx) = mpsc::channel::<ParsedBatch>(1);
    let parser = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(batch) = fetched_rx.recv().await {
            let messages = parse_batch(batch.messages, limits).await?;
            if parsed_tx
                .send(ParsedBatch {
                    messages,
                    last_uid: batch.last_uid,
                    room: batch.room,
                })
                .await
                .is_err()
            {
                break; // the store stage stopped; it reports why
            }
        }
        Ok::<(), SyncError>(())
    }));

    // Stage 3: store. Acknowledged UIDs flow back for `mark_seen`.
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<Vec<u32>>();
    let store2 = store.clone();
    let (name2, mailbox2) = (name.to_string(), mailbox.to_string());
    let uidvalidity = info.uidvalidity;
    let tracker = Tracker::start("sync", name, mailbox, fetchable.len() as u64);
    let storer = AbortOnDropHandle::new(tokio::spawn(async move {
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
            drop(batch.room);
            tracker.inc(
                batch.messages.len() as u64,
                batch.messages.iter().map(|m| m.size).sum(),
            );
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
    }));

    // Stage 1: fetch (this task owns the session).
    let fetch_result = async {
        let mut held: Option<u32> = None;
        // the last UID the server served in this pass: the best probe there is
        let mut last_good: Option<u32> = None;
        for (i, batch) in plan.iter().enumerate() {
            if cancel.is_cancelled() {
                tracing::info!(
                    account = name,
                    mailbox,
                    last_uid = report.last_uid,
                    "catch_up_interrupted"
                );
                break;
            }
            if settings.mark_seen {
                while let Ok(uids) = acked_rx.try_recv() {
                    session.mark_seen(&uids).await?;
                }
            }
            let room = ctx.budget.reserve(batch.bytes).await;
            let probes = plan_probes(&fetchable, &plan, i, last_good, last_uid, &failing);
            let outcome = fetch_batch(session, store, &q, &failing, &batch.uids, &probes).await?;
            if let Some(m) = outcome.messages.last() {
                last_good = Some(m.uid);
            }
            report.skipped += outcome.gone + outcome.quarantined;
            report.quarantined += outcome.quarantined;
            report.fetched += outcome.messages.len();
            report.bytes += outcome
                .messages
                .iter()
                .map(|m| m.body.len() as u64)
                .sum::<u64>();
            if let Some(h) = outcome.held {
                held = Some(held.map_or(h, |x| x.min(h)));
            }
            // The checkpoint never passes a UID that failed and is not quarantined yet.
            let checkpoint = match held {
                Some(h) => batch.last_uid.min(h.saturating_sub(1)).max(last_uid),
                None => batch.last_uid,
            };
            report.held = held;
            if fetched_tx
                .send(FetchedBatch {
                    messages: outcome.messages,
                    last_uid: checkpoint,
                    room,
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
    report.stored += stored;
    report.replaced = replaced;
    report.last_uid = last;
    report.latencies = latencies;
    report.quarantined_total = quarantined_now.len() + report.quarantined;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// UIDs to probe when every UID of batch `i` failed, best first: the last one served in this
/// pass, then up to three later ones not known to fail, then the last one stored before this
/// pass (a server that serves any of them is not in an outage).
fn plan_probes(
    fetchable: &[(u32, u64)],
    plan: &[PlannedBatch],
    i: usize,
    last_good: Option<u32>,
    last_uid: u32,
    failing: &HashSet<u32>,
) -> Vec<u32> {
    let after = plan.get(i).map(|b| b.last_uid).unwrap_or(0);
    last_good
        .into_iter()
        .chain(
            fetchable
                .iter()
                .map(|(u, _)| *u)
                .filter(|u| *u > after && !failing.contains(u))
                .take(3),
        )
        .chain((last_uid > 0).then_some(last_uid))
        .collect()
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
