//! IMAP's catch-up pass over one mailbox, in named steps: `open` (EXAMINE, and the checkpoint
//! compared with UIDVALIDITY), `retry_quarantine_if_due`, `plan` (UID SEARCH above the
//! checkpoint, sizes, batches), then the batches through [`crate::pipeline`]: `ImapSource`
//! fetches them (with the outage and quarantine rules of `fetch_batch`), `ImapCommit` stores
//! each one with `Store::commit_batch`, which moves the checkpoint.
//!
//! **Invariant:** the checkpoint only moves through `Store::commit_batch`, batch by batch, in
//! UID order: a failure anywhere leaves it at the last fully stored batch, and it never passes
//! a UID that failed and is not quarantined.

use std::collections::HashSet;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::{Account, Settings};
use crate::imap::{ImapError, MailboxInfo, Session};
use crate::pipeline::{
    self, parse_batch, Acked, Commit, Committed, Context, Fetched, FetchedMessage, Lane, Source,
    SyncError, SyncReport,
};
use crate::store::{MailboxRecord, MailboxStatus, ReadyMessage, Store};

/// async-imap holds each FETCH response whole and refuses literals above 512 MiB.
const MAX_FETCHABLE: u64 = 500 * 1024 * 1024;
/// A batch is sent ahead (pipelined) only up to this size: when the batch before needs a
/// look UID by UID (a refusal, a UID gone), the one ahead is read and dropped first, once,
/// outside the memory budget, and fetched again in its turn.
const AHEAD_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// UIDs per `UID FETCH (UID RFC822.SIZE)` while planning.
const SIZE_QUERY_CHUNK: usize = 5000;

struct PlannedBatch {
    uids: Vec<u32>,
    /// RFC822.SIZE of them all.
    bytes: u64,
    /// The checkpoint once this batch is stored (its highest UID).
    last_uid: u32,
}

/// Cuts `sizes` (sorted by UID) into batches of at most `count` messages and `bytes` bytes
/// (a single larger message goes alone).
fn plan_batches(sizes: &[(u32, u64)], count: usize, bytes: u64) -> Vec<PlannedBatch> {
    pipeline::cut_batches(sizes.iter().copied(), count, bytes, |(_, size)| *size)
        .into_iter()
        .map(|batch| PlannedBatch {
            last_uid: batch.last().map(|(uid, _)| *uid).unwrap_or(0),
            bytes: batch.iter().map(|(_, size)| *size).sum(),
            uids: batch.into_iter().map(|(uid, _)| uid).collect(),
        })
        .collect()
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
    settings: &'a Settings,
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
    next: Option<&[u32]>,
) -> Result<BatchOutcome, SyncError> {
    let mut failed: Vec<(u32, String)> = Vec::new();
    let mut messages = match session.fetch_bodies_then(uids, next).await {
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
    let name = account.name.as_str();
    let settings = &account.settings;
    // what the server announced about the mailbox open until now (while idling, or inside
    // the responses of the last pass) is written before anything else is opened
    // (a server that refuses what mirroring asks must not keep new mail from being stored:
    // its refusals are logged and the pass goes on; the stored HIGHESTMODSEQ stays behind)
    let pending = mirror_step(
        name,
        mailbox,
        crate::mirror::apply_pending(session, &ctx.store, name).await,
    )?;
    let opened = open(session, &ctx.store, name, mailbox, settings.mark_seen).await?;
    let mirrored = mirror_step(
        name,
        mailbox,
        crate::mirror::follow(
            session,
            &ctx.store,
            account,
            mailbox,
            &opened.info,
            &opened.record,
            opened.last_uid,
        )
        .await,
    )?;
    let q = Quarantine {
        account: name,
        mailbox,
        uidvalidity: opened.info.uidvalidity,
        settings,
    };
    let failing: HashSet<u32> = opened
        .record
        .failing
        .iter()
        .filter(|(v, _)| *v == q.uidvalidity)
        .map(|(_, u)| *u)
        .collect();
    let mut report = SyncReport {
        uidvalidity: q.uidvalidity,
        last_uid: opened.last_uid,
        flags_changed: pending.flags + mirrored.flags,
        expunged: pending.expunged + mirrored.expunged,
        ..Default::default()
    };
    let quarantined_now =
        retry_quarantine_if_due(session, ctx, &q, &opened.record, options, &mut report).await?;

    let plan = plan(
        session,
        &ctx.store,
        &q,
        opened.last_uid,
        &quarantined_now,
        &mut report,
    )
    .await?;
    report.quarantined_total = quarantined_now.len();
    let Some(plan) = plan else {
        report.elapsed = started.elapsed();
        return Ok(report);
    };

    let mut source = ImapSource {
        session,
        store: &ctx.store,
        q: &q,
        failing: &failing,
        plan: &plan,
        next: 0,
        last_good: None,
        held: None,
        start_uid: opened.last_uid,
        mark_seen: settings.mark_seen,
        report: &mut report,
    };
    let commit = ImapCommit {
        store: ctx.store.clone(),
        account: name.to_string(),
        mailbox: mailbox.to_string(),
        uidvalidity: q.uidvalidity,
        status: opened.status,
    };
    let lane = Lane {
        account: name,
        mailbox,
        total: plan.fetchable.len() as u64,
    };
    let stored = pipeline::run(&ctx.budget, ctx.limits, lane, &mut source, commit, cancel).await?;
    report.stored += stored.inserted;
    report.replaced = stored.replaced;
    report.last_uid = stored.last_uid.unwrap_or(report.last_uid);
    report.latencies = stored.latencies;
    report.quarantined_total = quarantined_now.len() + report.quarantined;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// A mirroring step's outcome: a command the server refused is logged (`mirror_failed`) and
/// costs only this pass's mirroring; anything else ends the pass as usual.
fn mirror_step(
    account: &str,
    mailbox: &str,
    result: Result<crate::mirror::MirrorReport, SyncError>,
) -> Result<crate::mirror::MirrorReport, SyncError> {
    match result {
        Err(SyncError::Imap(e @ ImapError::Rejected { .. })) => {
            tracing::warn!(account, mailbox, error = %e, "mirror_failed");
            Ok(Default::default())
        }
        other => other,
    }
}

/// The mailbox as opened, with its stored record and the checkpoint this pass starts from.
struct Opened {
    info: MailboxInfo,
    status: MailboxStatus,
    record: MailboxRecord,
    /// 0 for a new mailbox or a changed UIDVALIDITY (whose checkpoint is reset here).
    last_uid: u32,
}

/// Step 1: EXAMINE (SELECT with `mark_seen`) and the checkpoint. A UIDVALIDITY other than the
/// stored one makes it a new mailbox: the checkpoint starts again from 0, and the documents of
/// the old UIDVALIDITY are marked expunged. With QRESYNC the stored HIGHESTMODSEQ goes with
/// the EXAMINE, so that the server reports every change since ([`crate::mirror`]).
async fn open(
    session: &mut Session,
    store: &Store,
    account: &str,
    mailbox: &str,
    writable: bool,
) -> Result<Opened, SyncError> {
    let record = store.mailbox_record(account, mailbox).await?;
    let resync = record
        .checkpoint
        .zip(record.highest_modseq)
        .map(|(cp, m)| (cp.uidvalidity, m));
    let info = session.open_mailbox(mailbox, writable, resync).await?;
    let status = MailboxStatus {
        uidnext: info.uidnext,
        exists: info.exists,
    };
    let last_uid = match record.checkpoint {
        Some(cp) if cp.uidvalidity == info.uidvalidity => cp.last_uid,
        Some(cp) => {
            tracing::warn!(
                account,
                mailbox,
                old = cp.uidvalidity,
                new = info.uidvalidity,
                "uidvalidity_changed"
            );
            store
                .reset_checkpoint(account, mailbox, info.uidvalidity, status)
                .await?;
            let marked = store
                .mark_uidvalidity_gone(account, mailbox, info.uidvalidity)
                .await?;
            tracing::info!(account, mailbox, marked, "old_uidvalidity_marked");
            0
        }
        None => {
            store
                .reset_checkpoint(account, mailbox, info.uidvalidity, status)
                .await?;
            0
        }
    };
    Ok(Opened {
        info,
        status,
        record,
        last_uid,
    })
}

/// Step 2: tries the quarantined UIDs again when asked to or when `quarantine_retry` has passed
/// since the last try. Returns the UIDs quarantined now.
async fn retry_quarantine_if_due(
    session: &mut Session,
    ctx: &Context,
    q: &Quarantine<'_>,
    record: &MailboxRecord,
    options: Options,
    report: &mut SyncReport,
) -> Result<Vec<u32>, SyncError> {
    let quarantined = record.quarantined_uids(q.uidvalidity);
    let due = !quarantined.is_empty()
        && (options.retry_quarantined
            || record.quarantine_retried_at.is_none_or(|at| {
                (chrono::Utc::now() - at).to_std().unwrap_or_default()
                    >= q.settings.quarantine_retry
            }));
    if !due {
        return Ok(quarantined);
    }
    let (released, stored) = retry_quarantined(session, ctx, q, &quarantined).await?;
    ctx.store
        .mark_quarantine_retried(q.account, q.mailbox)
        .await?;
    tracing::info!(
        account = q.account,
        mailbox = q.mailbox,
        tried = quarantined.len(),
        released,
        stored,
        "quarantine_retried"
    );
    report.stored += stored;
    let record = ctx.store.mailbox_record(q.account, q.mailbox).await?;
    Ok(record.quarantined_uids(q.uidvalidity))
}

/// What a pass will fetch.
struct Plan {
    /// (UID, RFC822.SIZE) of every UID to fetch, in UID order.
    fetchable: Vec<(u32, u64)>,
    batches: Vec<PlannedBatch>,
}

/// Step 3: UID SEARCH above the checkpoint (quarantined UIDs left out), the sizes, and the
/// batches; a message too large to FETCH is quarantined here. `None`: nothing to fetch.
async fn plan(
    session: &mut Session,
    store: &Store,
    q: &Quarantine<'_>,
    last_uid: u32,
    quarantined: &[u32],
    report: &mut SyncReport,
) -> Result<Option<Plan>, SyncError> {
    let settings = q.settings;
    let (name, mailbox) = (q.account, q.mailbox);
    let uids = session
        .search_after(last_uid, settings.since, settings.unseen_only)
        .await?;
    let quarantined: HashSet<u32> = quarantined.iter().copied().collect();
    let uids: Vec<u32> = uids
        .into_iter()
        .filter(|u| !quarantined.contains(u))
        .collect();
    if uids.is_empty() {
        return Ok(None);
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
            .quarantine(name, mailbox, q.uidvalidity, *uid, &reason)
            .await?;
        tracing::error!(account = name, mailbox, uid, size, error = %reason, "quarantined");
    }
    report.skipped += too_large.len();
    report.quarantined += too_large.len();
    let batches = plan_batches(&fetchable, settings.batch_size, settings.batch_bytes);
    tracing::info!(
        account = name,
        mailbox,
        count = fetchable.len(),
        batches = batches.len(),
        after_uid = last_uid,
        "catch_up_started"
    );
    Ok(Some(Plan { fetchable, batches }))
}

/// Step 4's fetch side: the planned batches, one `fetch_batch` each, with the checkpoint each
/// may move to as its tag; marks acknowledged messages `\Seen` with `mark_seen`.
struct ImapSource<'a> {
    session: &'a mut Session,
    store: &'a Store,
    q: &'a Quarantine<'a>,
    failing: &'a HashSet<u32>,
    plan: &'a Plan,
    /// The index of the next batch to fetch.
    next: usize,
    /// The last UID the server served in this pass: the best probe there is.
    last_good: Option<u32>,
    /// The lowest UID that failed in this pass and is not quarantined yet.
    held: Option<u32>,
    /// The checkpoint this pass started from.
    start_uid: u32,
    mark_seen: bool,
    report: &'a mut SyncReport,
}

impl Source for ImapSource<'_> {
    /// The checkpoint once the batch is stored.
    type Tag = u32;

    fn next_bytes(&self) -> Option<u64> {
        self.plan.batches.get(self.next).map(|b| b.bytes)
    }

    async fn fetch(&mut self) -> Result<Fetched<u32>, SyncError> {
        let i = self.next;
        self.next += 1;
        let (plan, failing) = (self.plan, self.failing);
        let batch = &plan.batches[i];
        let probes = plan_probes(
            &plan.fetchable,
            &plan.batches,
            i,
            self.last_good,
            self.start_uid,
            failing,
        );
        // The next batch's FETCH goes out now, so that the server works on it while this one
        // is read (not with mark_seen: its STORE between batches would have to read it first).
        let next = plan
            .batches
            .get(i + 1)
            .filter(|b| !self.mark_seen && b.bytes <= AHEAD_MAX_BYTES)
            .map(|b| b.uids.as_slice());
        let outcome = fetch_batch(
            self.session,
            self.store,
            self.q,
            failing,
            &batch.uids,
            &probes,
            next,
        )
        .await?;
        if let Some(m) = outcome.messages.last() {
            self.last_good = Some(m.uid);
        }
        let report = &mut *self.report;
        report.skipped += outcome.gone + outcome.quarantined;
        report.quarantined += outcome.quarantined;
        report.fetched += outcome.messages.len();
        report.bytes += outcome
            .messages
            .iter()
            .map(|m| m.body.len() as u64)
            .sum::<u64>();
        if let Some(h) = outcome.held {
            self.held = Some(self.held.map_or(h, |x| x.min(h)));
        }
        // The checkpoint never passes a UID that failed and is not quarantined yet.
        let checkpoint = match self.held {
            Some(h) => batch.last_uid.min(h.saturating_sub(1)).max(self.start_uid),
            None => batch.last_uid,
        };
        report.held = self.held;
        Ok(Fetched {
            messages: outcome.messages,
            tag: checkpoint,
        })
    }

    async fn acknowledged(&mut self, batch: Acked<u32>) -> Result<(), SyncError> {
        if self.mark_seen {
            self.session.mark_seen(&batch.uids).await?;
        }
        Ok(())
    }
}

/// Step 4's store side: `Store::commit_batch`, the one place the checkpoint moves.
struct ImapCommit {
    store: Store,
    account: String,
    mailbox: String,
    uidvalidity: u32,
    status: MailboxStatus,
}

impl Commit for ImapCommit {
    type Tag = u32;

    async fn commit(
        &mut self,
        messages: &[ReadyMessage],
        checkpoint: &u32,
    ) -> Result<Committed, SyncError> {
        let written = self
            .store
            .commit_batch(
                &self.account,
                &self.mailbox,
                self.uidvalidity,
                self.status,
                messages,
                *checkpoint,
            )
            .await?;
        Ok(Committed {
            written,
            last_uid: *checkpoint,
        })
    }
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
    Ok(session.open_mailbox(mailbox, false, None).await?)
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
