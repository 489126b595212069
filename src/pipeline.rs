//! The one path every message takes, whatever protocol fetched it: fetch -> parse -> store.
//!
//! ```text
//!  fetch (the caller's task,  ── channel(1) ──> parse (blocking pool, ── channel(1) ──> store (a task:
//!  owns the session: Source)                    split across cores)                    Commit), then
//!        ^                                                                               │ ack
//!        └────────── acknowledged batches (UIDs + tag), between fetches ─────────────────┘
//! ```
//!
//! Fetching batch n+1 overlaps parsing n and storing n-1, so a pass runs at the speed of the
//! slowest of server, parser and database rather than their sum. Every batch first reserves its
//! announced bytes from the process-wide [`crate::budget`]; the reservation travels with the
//! batch and is given back once the store acknowledged it. The bounded channels keep at most
//! about five batches of one mailbox in memory.
//!
//! A protocol plugs in twice: a [`Source`] (what to fetch next, how to fetch it, what to do
//! with acknowledged batches; runs in the caller's task) and a [`Commit`] (how a parsed batch is
//! written; runs alone in the store task). IMAP's are in `sync`, POP3's in `pop3::pass`.
//!
//! **Invariant:** batches are committed one at a time, in the order they were fetched, by the
//! single store task; a failure anywhere stops the pass with nothing after the failed batch
//! committed. **Invariant:** cancellation is looked at between batches only: a batch that was
//! fetched is parsed and stored. **Invariant:** the stage tasks are aborted if the pass is
//! dropped (a panic in the fetch stage), so nothing of a dead pass keeps running beside the
//! next one.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::budget::{Budget, Reservation};
use crate::error::ErrorClass;
use crate::imap::ImapError;
use crate::parse::{self, Limits};
use crate::pop3::Pop3Error;
use crate::progress::Tracker;
use crate::store::{CommitReport, ReadyMessage, Store, StoreError};

/// One message as a server sent it (IMAP UID FETCH or POP3 RETR).
#[derive(Debug)]
pub struct FetchedMessage {
    pub uid: u32,
    pub flags: Vec<String>,
    pub internal_date: Option<DateTime<FixedOffset>>,
    pub size: u64,
    pub body: Vec<u8>,
    pub gmail: Option<crate::store::GmailIds>,
}

/// Why a pass (IMAP catch-up or POP3 poll) failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pop3(#[from] Pop3Error),
    #[error("the server refused all {count} messages of a batch and a probe: {reason} (an outage: nothing is counted against them)")]
    Outage { count: usize, reason: String },
    #[error("internal: {0}")]
    Internal(String),
}

impl SyncError {
    /// A write refused by the `[cluster]` lease fence.
    pub fn is_fenced(&self) -> bool {
        matches!(self, SyncError::Store(e) if e.is_fenced())
    }

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

/// What one pass did.
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
    /// Stored documents whose flags changed ([`crate::mirror`]).
    pub flags_changed: usize,
    /// Stored documents marked expunged (or removed).
    pub expunged: usize,
}

/// Where a pass runs: its store scope, parse limits and the process-wide budget.
#[derive(Clone)]
pub struct Context {
    pub store: Store,
    pub limits: Limits,
    pub budget: Budget,
}

/// One fetched batch and what its commit needs besides the messages (`tag`: IMAP the
/// checkpoint, POP3 the message numbers and UIDLs).
pub struct Fetched<T> {
    pub messages: Vec<FetchedMessage>,
    pub tag: T,
}

/// A batch the store acknowledged, back at its source.
pub struct Acked<T> {
    pub uids: Vec<u32>,
    pub tag: T,
}

/// What one commit wrote, and the checkpoint (highest UID) it leaves.
pub struct Committed {
    pub written: CommitReport,
    pub last_uid: u32,
}

/// What feeds the pipeline; runs in the caller's task and owns the session.
pub trait Source {
    type Tag: Send + 'static;
    /// The announced bytes of the next batch (reserved from the budget before it is fetched),
    /// or `None` when the pass has nothing left to fetch.
    fn next_bytes(&self) -> Option<u64>;
    /// Fetches the batch `next_bytes` announced.
    fn fetch(&mut self) -> impl Future<Output = Result<Fetched<Self::Tag>, SyncError>> + Send;
    /// One acknowledged batch, in commit order: between fetches, and once more after the last
    /// one when fetching did not fail.
    fn acknowledged(
        &mut self,
        batch: Acked<Self::Tag>,
    ) -> impl Future<Output = Result<(), SyncError>> + Send;
}

/// How a parsed batch is written; runs alone in the store task, one batch at a time.
pub trait Commit: Send + 'static {
    type Tag: Send + 'static;
    fn commit(
        &mut self,
        messages: &[ReadyMessage],
        tag: &Self::Tag,
    ) -> impl Future<Output = Result<Committed, SyncError>> + Send;
}

/// What the store stage did over the whole pass.
#[derive(Debug, Default)]
pub struct Stored {
    pub inserted: usize,
    pub replaced: usize,
    /// The `last_uid` of the last committed batch; `None` when nothing was committed.
    pub last_uid: Option<u32>,
    /// INTERNALDATE to acknowledged, per stored message that has an INTERNALDATE.
    pub latencies: Vec<Duration>,
}

/// Names the pass for logs and the progress display.
pub struct Lane<'a> {
    pub account: &'a str,
    pub mailbox: &'a str,
    /// Messages the pass means to fetch (the progress total).
    pub total: u64,
}

/// A batch between stages, with its share of the budget.
struct InFlight<M, T> {
    messages: Vec<M>,
    tag: T,
    room: Reservation,
}

/// Runs `source` through parse into `commit` until the source has nothing left, `cancel` fires
/// (looked at before each batch), or a stage fails. Each batch reserves its bytes from
/// `budget` before it is fetched. Errors are reported store first, then parse, then fetch: a
/// later stage's failure is what stopped the earlier ones.
pub async fn run<S, C>(
    budget: &Budget,
    limits: Limits,
    lane: Lane<'_>,
    source: &mut S,
    mut commit: C,
    cancel: &CancellationToken,
) -> Result<Stored, SyncError>
where
    S: Source,
    C: Commit<Tag = S::Tag>,
{
    let (fetched_tx, mut fetched_rx) = mpsc::channel::<InFlight<FetchedMessage, S::Tag>>(1);
    let (parsed_tx, mut parsed_rx) = mpsc::channel::<InFlight<ReadyMessage, S::Tag>>(1);
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<Acked<S::Tag>>();

    let parser = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(batch) = fetched_rx.recv().await {
            let messages = parse_batch(batch.messages, limits).await?;
            let parsed = InFlight {
                messages,
                tag: batch.tag,
                room: batch.room,
            };
            if parsed_tx.send(parsed).await.is_err() {
                break; // the store stage stopped; it reports why
            }
        }
        Ok::<(), SyncError>(())
    }));

    let tracker = Tracker::start("sync", lane.account, lane.mailbox, lane.total);
    let (account, mailbox) = (lane.account.to_string(), lane.mailbox.to_string());
    let storer = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut stored = Stored::default();
        while let Some(batch) = parsed_rx.recv().await {
            let t = Instant::now();
            let r = commit.commit(&batch.messages, &batch.tag).await?;
            drop(batch.room);
            tracker.inc(
                batch.messages.len() as u64,
                batch.messages.iter().map(|m| m.size).sum(),
            );
            stored.inserted += r.written.inserted;
            stored.replaced += r.written.replaced;
            stored.last_uid = Some(r.last_uid);
            let now = chrono::Utc::now();
            stored
                .latencies
                .extend(batch.messages.iter().filter_map(|m| {
                    (now - m.internal_date?.with_timezone(&chrono::Utc))
                        .to_std()
                        .ok()
                }));
            tracing::debug!(
                account = %account, mailbox = %mailbox, count = batch.messages.len(), last_uid = r.last_uid,
                blobs = r.written.blobs_written, elapsed_ms = t.elapsed().as_millis() as u64, "batch_stored"
            );
            let uids = batch.messages.iter().map(|m| m.uid).collect();
            let _ = acked_tx.send(Acked {
                uids,
                tag: batch.tag,
            });
        }
        Ok::<_, SyncError>(stored)
    }));

    // The fetch stage: this task, which owns the session.
    let fetch_result = async {
        while let Some(bytes) = source.next_bytes() {
            if cancel.is_cancelled() {
                tracing::info!(
                    account = lane.account,
                    mailbox = lane.mailbox,
                    "catch_up_interrupted"
                );
                break;
            }
            while let Ok(acked) = acked_rx.try_recv() {
                source.acknowledged(acked).await?;
            }
            let room = budget.reserve(bytes).await;
            let batch = source.fetch().await?;
            let fetched = InFlight {
                messages: batch.messages,
                tag: batch.tag,
                room,
            };
            if fetched_tx.send(fetched).await.is_err() {
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
    if fetch_result.is_ok() {
        while let Ok(acked) = acked_rx.try_recv() {
            source.acknowledged(acked).await?;
        }
    }
    let stored = store_result?;
    parse_result?;
    fetch_result?;
    Ok(stored)
}

/// Cuts `items` into batches of at most `count` items and `bytes` bytes (by `size`); a single
/// larger item goes alone. The batch planning of every source.
pub fn cut_batches<T>(
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

/// Parses a batch on the blocking pool, split across the cores (the parse stage, and IMAP's
/// quarantine retry, which stores outside the pipeline).
pub async fn parse_batch(
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
                    gmail: m.gmail,
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn items_are_cut_by_count_and_bytes_and_a_large_one_goes_alone() {
        let cut = cut_batches([10u64, 10, 10, 10, 10], 2, 1000, |s| *s);
        assert_eq!(cut.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        let cut = cut_batches([10u64, 5000, 10], 100, 100, |s| *s);
        assert_eq!(cut, vec![vec![10], vec![5000], vec![10]]);
    }

    /// A source of scripted batches; each batch's tag is its highest uid.
    struct Script {
        batches: VecDeque<Vec<u32>>,
        fetches: usize,
        fail_fetch: Option<usize>,
        cancel_on_fetch: Option<(usize, CancellationToken)>,
        acked: Vec<u32>,
    }

    impl Script {
        fn new(batches: &[&[u32]]) -> Script {
            Script {
                batches: batches.iter().map(|b| b.to_vec()).collect(),
                fetches: 0,
                fail_fetch: None,
                cancel_on_fetch: None,
                acked: Vec::new(),
            }
        }
    }

    impl Source for Script {
        type Tag = u32;

        fn next_bytes(&self) -> Option<u64> {
            self.batches.front().map(|b| b.len() as u64 * 100)
        }

        async fn fetch(&mut self) -> Result<Fetched<u32>, SyncError> {
            self.fetches += 1;
            if self.fail_fetch == Some(self.fetches) {
                return Err(SyncError::Internal("fetch failed".into()));
            }
            if let Some((n, cancel)) = &self.cancel_on_fetch {
                if *n == self.fetches {
                    cancel.cancel();
                }
            }
            let uids = self.batches.pop_front().unwrap_or_default();
            Ok(Fetched {
                tag: uids.last().copied().unwrap_or(0),
                messages: uids
                    .into_iter()
                    .map(|uid| FetchedMessage {
                        uid,
                        flags: Vec::new(),
                        internal_date: None,
                        size: 40,
                        body: format!("Subject: m{uid}\r\n\r\nbody\r\n").into_bytes(),
                        gmail: None,
                    })
                    .collect(),
            })
        }

        async fn acknowledged(&mut self, batch: Acked<u32>) -> Result<(), SyncError> {
            self.acked.push(batch.tag);
            Ok(())
        }
    }

    /// Records the tags it commits; fails on `fail_on`.
    struct Recorder {
        committed: Arc<Mutex<Vec<u32>>>,
        fail_on: Option<u32>,
    }

    impl Commit for Recorder {
        type Tag = u32;

        async fn commit(
            &mut self,
            messages: &[ReadyMessage],
            tag: &u32,
        ) -> Result<Committed, SyncError> {
            if self.fail_on == Some(*tag) {
                return Err(SyncError::Internal(format!("commit {tag} failed")));
            }
            assert!(messages.iter().all(|m| m.parsed.parse_errors.is_empty()));
            self.committed.lock().unwrap().push(*tag);
            Ok(Committed {
                written: CommitReport {
                    inserted: messages.len(),
                    replaced: 0,
                    blobs_written: 0,
                },
                last_uid: *tag,
            })
        }
    }

    async fn run_script(
        source: &mut Script,
        fail_on: Option<u32>,
        cancel: &CancellationToken,
    ) -> (Result<Stored, SyncError>, Vec<u32>) {
        let committed = Arc::new(Mutex::new(Vec::new()));
        let commit = Recorder {
            committed: committed.clone(),
            fail_on,
        };
        let lane = Lane {
            account: "a",
            mailbox: "INBOX",
            total: 5,
        };
        let budget = Budget::new(1 << 30);
        let result = run(&budget, Limits::default(), lane, source, commit, cancel).await;
        let committed = committed.lock().unwrap().clone();
        (result, committed)
    }

    #[tokio::test]
    async fn batches_are_committed_in_fetch_order_and_every_one_is_acknowledged_back() {
        let mut source = Script::new(&[&[1, 2], &[3, 4], &[5]]);
        let (result, committed) = run_script(&mut source, None, &CancellationToken::new()).await;
        let stored = result.unwrap();
        assert_eq!(committed, vec![2, 4, 5]);
        assert_eq!(source.acked, vec![2, 4, 5]);
        assert_eq!((stored.inserted, stored.last_uid), (5, Some(5)));
    }

    #[tokio::test]
    async fn a_failed_commit_stops_the_pass_and_is_the_error_reported() {
        let mut source = Script::new(&[&[1, 2], &[3, 4], &[5]]);
        let (result, committed) = run_script(&mut source, Some(4), &CancellationToken::new()).await;
        let err = result.unwrap_err();
        assert!(err.to_string().contains("commit 4 failed"), "{err}");
        assert_eq!(
            committed,
            vec![2],
            "nothing after the failed batch is committed"
        );
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_what_was_committed_before_it() {
        let mut source = Script::new(&[&[1, 2], &[3, 4], &[5]]);
        source.fail_fetch = Some(2);
        let (result, committed) = run_script(&mut source, None, &CancellationToken::new()).await;
        assert!(result.unwrap_err().to_string().contains("fetch failed"));
        assert_eq!(committed, vec![2]);
    }

    #[tokio::test]
    async fn cancellation_stops_between_batches_and_the_fetched_batch_is_stored() {
        let cancel = CancellationToken::new();
        let mut source = Script::new(&[&[1, 2], &[3, 4], &[5]]);
        source.cancel_on_fetch = Some((2, cancel.clone()));
        let (result, committed) = run_script(&mut source, None, &cancel).await;
        assert_eq!(result.unwrap().last_uid, Some(4));
        assert_eq!(committed, vec![2, 4]);
        assert_eq!(source.fetches, 2);
    }
}
