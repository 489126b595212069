//! One POP3 poll: connect, STAT + UIDL + LIST, give new UIDLs their stable uids, RETR them in
//! batches through [`crate::pipeline`] (`Pop3Source` fetches, `Pop3Commit` stores with
//! `Store::commit_pop3_batch`, which records the UIDLs), DELE what was acknowledged when
//! `delete_after_store` (recorded as `dele_sent` in the map first), QUIT; then the stored
//! messages the server no longer lists are marked expunged ([`vanished`]).
//!
//! **Invariant:** DELE is sent only for messages whose documents are acknowledged, and only
//! QUIT commits it.
//!
//! **Invariant:** a message mailpump deleted is never marked expunged. Its map entry says
//! `dele_sent` before the first DELE goes out, and entries with `dele_sent` or `deleted` are
//! never looked at by [`vanished`] (with `on_expunge = "delete"`, marking them would remove the
//! archive of every `delete_after_store` account).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::{Listing, Maildrop, Pop3Session};
use crate::config::{Account, OnExpunge};
use crate::pipeline::{
    self, cut_batches, Acked, Commit, Committed, Context, Fetched, FetchedMessage, Lane, Source,
    SyncError, SyncReport,
};
use crate::store::{Pop3Entry, ReadyMessage, Store};

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

/// What a poll concludes from the UIDLs the map knows and the server's listing.
#[derive(Debug, Default, PartialEq, Eq)]
struct Vanished {
    /// Stored, not deleted by mailpump, not listed any more: (UIDL, uid), by uid.
    gone: Vec<(String, u32)>,
    /// Had gone and is listed again, not logged before (a server oddity: logged once, the
    /// entry and its document are left as they are, and it is never fetched or deleted).
    reappeared: Vec<String>,
    /// Messages missing from the listing that are not marked this poll, and why.
    withheld: Option<(usize, String)>,
}

/// Which stored messages were deleted on the server by someone else. Only entries that are
/// stored and neither `dele_sent` nor `deleted` (mailpump's own deletions) nor `gone` already
/// are candidates. Nothing is concluded from a listing that contradicts itself
/// ([`Maildrop::doubt`]: STAT, LIST and UIDL disagree), nor from one that lists none of the
/// candidates at all (an empty maildrop or a wholesale change of UIDLs: the signature of a
/// broken server, an unmounted mail store or a changed UIDL format as much as of a user who
/// emptied the mailbox): those wait until a later listing still shows at least one stored
/// message, which happens once new mail has been stored and is listed again.
fn vanished(known: &HashMap<String, Pop3Entry>, maildrop: &Maildrop) -> Vanished {
    let listed: HashSet<&str> = maildrop.messages.iter().map(|l| l.uidl.as_str()).collect();
    let mut reappeared: Vec<String> = known
        .iter()
        .filter(|(uidl, e)| e.gone && !e.reappeared && listed.contains(uidl.as_str()))
        .map(|(uidl, _)| uidl.clone())
        .collect();
    reappeared.sort();
    let mut out = Vanished {
        reappeared,
        ..Vanished::default()
    };
    let live: Vec<(&String, &Pop3Entry)> = known
        .iter()
        .filter(|(_, e)| e.stored && !e.gone && !e.dele_sent && !e.deleted)
        .collect();
    let mut missing: Vec<(String, u32)> = live
        .iter()
        .filter(|(uidl, _)| !listed.contains(uidl.as_str()))
        .map(|(uidl, e)| ((*uidl).clone(), e.uid))
        .collect();
    if missing.is_empty() {
        return out;
    }
    if let Some(why) = maildrop.doubt() {
        out.withheld = Some((
            missing.len(),
            format!("the listing contradicts itself: {why}"),
        ));
    } else if missing.len() == live.len() {
        out.withheld = Some((
            missing.len(),
            format!(
                "the server lists none of the {} messages stored from it (empty or replaced \
                 listing): waiting for a listing that still shows one of them",
                live.len()
            ),
        ));
    } else {
        missing.sort_unstable_by_key(|(_, uid)| *uid);
        out.gone = missing;
    }
    out
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
    let maildrop = session.maildrop().await?;
    let listing = &maildrop.messages;
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
    // earlier session ended before QUIT): delete them now if asked to. Not one that had
    // gone and came back: its document may have been removed (`on_expunge = "delete"`).
    let mut to_delete: Vec<(u32, String)> = if account.delete_after_store {
        listing
            .iter()
            .filter(|l| known.get(&l.uidl).is_some_and(|e| e.stored && !e.gone))
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
        // Recorded before the first DELE: whatever happens next, a message that vanishes
        // after this is one mailpump deleted (a DELE whose QUIT failed leaves it listed).
        let uidls: Vec<String> = to_delete.iter().map(|(_, u)| u.clone()).collect();
        if !uidls.is_empty() {
            // [cluster]: a replica whose lease was taken over deletes nothing
            store.check_fence(name, "INBOX").await?;
        }
        store.pop3_mark(name, &uidls, "dele_sent").await?;
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
    // With delete_after_store every stored message is mailpump's to delete: one that is gone
    // is taken to be its own deletion (a crash between QUIT and the map's update, or a
    // provider such as Gmail's POP that lists a message only until it was downloaded, must
    // never cost the archive), so nothing is marked.
    if !account.delete_after_store {
        expunge_vanished(store, name, &known, &maildrop).await?;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Marks the documents of the messages deleted on the server by someone else (as an IMAP
/// expunge: `expunged_at`, or removed with `on_expunge = "delete"`), then records them
/// `gone_at` in the map, so that the next poll does not look at them again. A crash between
/// the two repeats the marking, which is idempotent.
async fn expunge_vanished(
    store: &Store,
    account: &str,
    known: &HashMap<String, Pop3Entry>,
    maildrop: &Maildrop,
) -> Result<(), SyncError> {
    let v = vanished(known, maildrop);
    if !v.reappeared.is_empty() {
        tracing::warn!(
            account,
            mailbox = "INBOX",
            count = v.reappeared.len(),
            "pop3_uidl_reappeared"
        );
        store
            .pop3_stamp(account, &v.reappeared, "reappeared_at")
            .await?;
    }
    if let Some((count, reason)) = &v.withheld {
        tracing::warn!(
            account,
            mailbox = "INBOX",
            missing = count,
            reason = reason.as_str(),
            "pop3_expunge_withheld"
        );
    }
    if v.gone.is_empty() {
        return Ok(());
    }
    let uids: Vec<u32> = v.gone.iter().map(|(_, uid)| *uid).collect();
    let marked = store.mark_expunged(account, "INBOX", 0, &uids).await?;
    let uidls: Vec<String> = v.gone.into_iter().map(|(uidl, _)| uidl).collect();
    store.pop3_stamp(account, &uidls, "gone_at").await?;
    tracing::info!(
        account,
        mailbox = "INBOX",
        count = uidls.len(),
        documents = marked,
        on_expunge = match store.on_expunge {
            OnExpunge::Mark => "mark",
            OnExpunge::Delete => "delete",
        },
        "pop3_expunged"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uid: u32) -> Pop3Entry {
        Pop3Entry {
            uid,
            stored: true,
            dele_sent: false,
            deleted: false,
            gone: false,
            reappeared: false,
        }
    }

    fn drop_of(uidls: &[&str]) -> Maildrop {
        Maildrop {
            messages: uidls
                .iter()
                .enumerate()
                .map(|(i, u)| Listing {
                    number: i as u32 + 1,
                    uidl: u.to_string(),
                    size: 1,
                })
                .collect(),
            stat_count: uidls.len() as u32,
            list_count: uidls.len(),
        }
    }

    fn map(entries: &[(&str, Pop3Entry)]) -> HashMap<String, Pop3Entry> {
        entries.iter().map(|(u, e)| (u.to_string(), *e)).collect()
    }

    #[test]
    fn a_stored_uidl_no_longer_listed_is_gone_once() {
        let mut known = map(&[("a", entry(1)), ("b", entry(2)), ("c", entry(3))]);
        let v = vanished(&known, &drop_of(&["a", "c"]));
        assert_eq!(v.gone, vec![("b".to_string(), 2)]);
        assert_eq!(v.withheld, None);
        known.get_mut("b").unwrap().gone = true;
        assert_eq!(vanished(&known, &drop_of(&["a", "c"])), Vanished::default());
    }

    #[test]
    fn what_mailpump_deleted_is_never_gone() {
        let sent = Pop3Entry {
            dele_sent: true,
            ..entry(2)
        };
        let committed = Pop3Entry {
            deleted: true,
            ..entry(3)
        };
        let known = map(&[("a", entry(1)), ("b", sent), ("c", committed)]);
        assert_eq!(vanished(&known, &drop_of(&["a"])), Vanished::default());
        // all of mailpump's own deletions gone and nothing else stored: nothing to conclude
        let known = map(&[("b", sent), ("c", committed)]);
        assert_eq!(vanished(&known, &drop_of(&[])), Vanished::default());
    }

    #[test]
    fn unstored_entries_are_not_candidates() {
        let unstored = Pop3Entry {
            stored: false,
            ..entry(2)
        };
        let known = map(&[("a", entry(1)), ("b", unstored)]);
        assert_eq!(vanished(&known, &drop_of(&["a"])), Vanished::default());
    }

    #[test]
    fn an_empty_or_replaced_listing_concludes_nothing() {
        let known = map(&[("a", entry(1)), ("b", entry(2))]);
        for listing in [drop_of(&[]), drop_of(&["x", "y", "z"])] {
            let v = vanished(&known, &listing);
            assert!(v.gone.is_empty());
            assert_eq!(v.withheld.as_ref().unwrap().0, 2);
        }
        // once a later listing still shows one stored message, the others are gone
        let known = map(&[("a", entry(1)), ("b", entry(2)), ("x", entry(3))]);
        let v = vanished(&known, &drop_of(&["x"]));
        assert_eq!(v.gone, vec![("a".to_string(), 1), ("b".to_string(), 2)]);
    }

    #[test]
    fn a_self_contradicting_listing_concludes_nothing() {
        let known = map(&[("a", entry(1)), ("b", entry(2))]);
        let mut listing = drop_of(&["a"]);
        listing.stat_count = 2;
        let v = vanished(&known, &listing);
        assert!(v.gone.is_empty());
        assert!(v.withheld.unwrap().1.contains("STAT counts 2"));
    }

    #[test]
    fn a_uidl_that_comes_back_is_reported_once_and_left() {
        let gone = Pop3Entry {
            gone: true,
            ..entry(2)
        };
        let known = map(&[("a", entry(1)), ("b", gone)]);
        let v = vanished(&known, &drop_of(&["a", "b"]));
        assert_eq!(v.reappeared, vec!["b".to_string()]);
        assert!(v.gone.is_empty());
        let logged = Pop3Entry {
            reappeared: true,
            ..gone
        };
        let known = map(&[("a", entry(1)), ("b", logged)]);
        assert_eq!(vanished(&known, &drop_of(&["a", "b"])), Vanished::default());
    }
}
