//! One POP3 poll: connect, UIDL + LIST, give new UIDLs their stable uids, RETR them in
//! batches through [`crate::pipeline`] (`Pop3Source` fetches, `Pop3Commit` stores with
//! `Store::commit_pop3_batch`, which records the UIDLs), DELE what was acknowledged when
//! `delete_after_store`, QUIT.
//!
//! **Invariant:** DELE is sent only for messages whose documents are acknowledged, and only
//! QUIT commits it.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::{Listing, Pop3Session};
use crate::config::Account;
use crate::pipeline::{
    self, cut_batches, Acked, Commit, Committed, Context, Fetched, FetchedMessage, Lane, Source,
    SyncError, SyncReport,
};
use crate::store::{ReadyMessage, Store};

/// (number in this session, UIDL) of each message of a batch, in the same order.
type Ids = Vec<(u32, String)>;

/// The fetch side: RETR batch by batch; acknowledged messages are queued for DELE.
struct Pop3Source<'a> {
    session: &'a mut Pop3Session,
    batches: VecDeque<Vec<(Listing, u32)>>,
    to_delete: &'a mut Ids,
    delete_after_store: bool,
    report: &'a mut SyncReport,
}

impl Source for Pop3Source<'_> {
    type Tag = Ids;

    fn next_bytes(&self) -> Option<u64> {
        self.batches
            .front()
            .map(|batch| batch.iter().map(|(l, _)| l.size).sum())
    }

    async fn fetch(&mut self) -> Result<Fetched<Ids>, SyncError> {
        // the pipeline fetches only after `next_bytes` announced a batch
        let batch = self.batches.pop_front().unwrap_or_default();
        let mut messages = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        for (l, uid) in batch {
            let body = self.session.retr(l.number).await?;
            self.report.bytes += body.len() as u64;
            messages.push(FetchedMessage {
                uid,
                flags: Vec::new(),
                internal_date: None,
                size: body.len() as u64,
                body,
                gmail: None,
            });
            ids.push((l.number, l.uidl));
        }
        self.report.fetched += messages.len();
        Ok(Fetched { messages, tag: ids })
    }

    async fn acknowledged(&mut self, batch: Acked<Ids>) -> Result<(), SyncError> {
        if self.delete_after_store {
            self.to_delete.extend(batch.tag);
        }
        Ok(())
    }
}

/// The store side: the documents, then the UIDL map says "stored".
struct Pop3Commit {
    store: Store,
    account: String,
    /// The highest uid committed so far.
    last: u32,
}

impl Commit for Pop3Commit {
    type Tag = Ids;

    async fn commit(
        &mut self,
        messages: &[ReadyMessage],
        ids: &Ids,
    ) -> Result<Committed, SyncError> {
        let uidls: Vec<String> = ids.iter().map(|(_, u)| u.clone()).collect();
        let written = self
            .store
            .commit_pop3_batch(&self.account, messages, &uidls)
            .await?;
        self.last = self
            .last
            .max(messages.iter().map(|m| m.uid).max().unwrap_or(0));
        Ok(Committed {
            written,
            last_uid: self.last,
        })
    }
}

/// One poll of a POP3 mailbox (always `INBOX`, uidvalidity 0).
pub async fn poll(
    account: &Account,
    ctx: &Context,
    cancel: &CancellationToken,
) -> Result<SyncReport, SyncError> {
    let store = &ctx.store;
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
    let total = new.len() as u64;
    let batches = cut_batches(
        new,
        account.settings.batch_size,
        account.settings.batch_bytes,
        |(l, _)| l.size,
    );
    let lane = Lane {
        account: name,
        mailbox: "INBOX",
        total,
    };
    let mut source = Pop3Source {
        session: &mut session,
        batches: batches.into(),
        to_delete: &mut to_delete,
        delete_after_store: account.delete_after_store,
        report: &mut report,
    };
    let commit = Pop3Commit {
        store: store.clone(),
        account: name.to_string(),
        last: 0,
    };
    let stored = pipeline::run(&ctx.budget, ctx.limits, lane, &mut source, commit, cancel).await?;
    report.stored = stored.inserted;
    report.replaced = stored.replaced;
    report.last_uid = stored
        .last_uid
        .unwrap_or(0)
        .max(known.values().map(|e| e.uid).max().unwrap_or(0));

    if account.delete_after_store {
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
