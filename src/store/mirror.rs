//! What changes after a message was stored: its flags (`flags`, `modseq`, `flags_updated_at`),
//! its deletion on the server (`expunged_at`, or the document removed with `on_expunge =
//! "delete"`), a move between folders (`moved_to` / `moved_from`), and the sweep of blobs that
//! no document refers to any more.
//!
//! **Invariant (blobs):** once a batch is acknowledged, every blob its documents refer to is
//! complete in the bucket, whatever sweep ran meanwhile. The sweep looks only at
//! `blob_candidates` (the blobs of documents `on_expunge = "delete"` removed), only once they
//! have been candidates for `blob_sweep_after`, only at blobs no document refers to and nobody
//! touched for that long: it takes a lease on one (`deleting` with its own token, only if still
//! untouched and not leased), removes the chunks, then the files document, and records
//! `swept_at` on the candidate (kept two hours). Writers look their blobs up among the
//! candidates before writing documents and again after ([`Store::claim_blobs`]: a candidate is
//! touched and looked up one by one; every other blob cannot be swept within that time): a
//! candidate that is gone is written again, one under a lease makes the batch wait
//! (`StoreError::Busy`, retried). The unit test `a_sweep_racing_a_writer_...` runs a sweep with
//! no grace at all against such a writer.

use std::collections::{HashMap, HashSet};

use bson::{doc, Bson, Document};
use futures::TryStreamExt;

use super::{Store, StoreError};
use crate::config::OnExpunge;

/// One message's flags as the server reports them now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagChange {
    pub uid: u32,
    pub flags: Vec<String>,
    /// The message's MODSEQ, where the server has CONDSTORE.
    pub modseq: Option<u64>,
}

/// What `verify` compares of one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMeta {
    pub uid: u32,
    pub size: u64,
    pub flags: Vec<String>,
    pub expunged: bool,
    pub raw_sha256: Option<String>,
}

/// What one blob sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Blobs untouched for long enough that were looked at.
    pub candidates: usize,
    /// Blobs removed.
    pub removed: usize,
}

/// Flag updates in flight at once (one `update_one` each: every message has its own MODSEQ).
const FLAG_WRITES_IN_FLIGHT: usize = 16;
/// A message stored this long after its copy in another folder was expunged is still linked
/// as a move.
const MOVE_WINDOW: chrono::Duration = chrono::Duration::hours(1);
/// A sweep that marked a blob and died is taken over by another after this long (writers
/// meeting the blob wait meanwhile).
const SWEEP_LEASE: chrono::Duration = chrono::Duration::minutes(10);
/// `_id`s per `$in` query.
const IDS_PER_QUERY: usize = 5000;

fn message_id(account: &str, mailbox: &str, uidvalidity: u32, uid: u32) -> String {
    format!("{account}/{mailbox}/{uidvalidity}/{uid}")
}

/// The `_id`s of `uids`, [`IDS_PER_QUERY`] at a time.
fn id_chunks<'a>(
    account: &'a str,
    mailbox: &'a str,
    uidvalidity: u32,
    uids: &'a [u32],
) -> impl Iterator<Item = Vec<String>> + 'a {
    uids.chunks(IDS_PER_QUERY).map(move |chunk| {
        chunk
            .iter()
            .map(|u| message_id(account, mailbox, uidvalidity, *u))
            .collect()
    })
}

impl Store {
    /// Writes the flags the server reports now; a document is only touched (and
    /// `flags_updated_at` only moves) when its flags really differ. Returns how many changed.
    pub async fn apply_flags(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        changes: &[FlagChange],
    ) -> Result<usize, StoreError> {
        if !changes.is_empty() {
            self.fence_gate(account, mailbox).await?;
        }
        let now = bson::DateTime::now();
        let mut changed = 0;
        for group in changes.chunks(FLAG_WRITES_IN_FLIGHT) {
            let mut writes = Vec::with_capacity(group.len());
            for c in group {
                let store = self.clone();
                let coll = self.messages.clone();
                let id = message_id(account, mailbox, uidvalidity, c.uid);
                let mut set = doc! {"flags": &c.flags, "flags_updated_at": now};
                if let Some(m) = c.modseq {
                    set.insert("modseq", m as i64);
                }
                let flags = c.flags.clone();
                writes.push(async move {
                    store
                        .guarded("flag update", async move {
                            coll.update_one(
                                doc! {"_id": id, "flags": {"$ne": flags}},
                                doc! {"$set": set},
                            )
                            .await
                            .map(|r| r.modified_count as usize)
                        })
                        .await
                });
            }
            changed += futures::future::try_join_all(writes)
                .await?
                .into_iter()
                .sum::<usize>();
        }
        Ok(changed)
    }

    /// The messages of `uids` were deleted on the server: marks their documents `expunged_at`
    /// (or removes them with `on_expunge = "delete"`), and links a marked document to the
    /// copy of the same message stored in another folder (a MOVE). Returns how many documents
    /// were marked or removed now.
    pub async fn mark_expunged(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<usize, StoreError> {
        if !uids.is_empty() {
            self.fence_gate(account, mailbox).await?;
        }
        let mut done = 0;
        for ids in id_chunks(account, mailbox, uidvalidity, uids) {
            let coll = self.messages.clone();
            done += match self.on_expunge {
                OnExpunge::Delete => {
                    let candidates = self.blob_candidates.clone();
                    self.guarded("expunged delete", async move {
                        // the blobs these documents refer to become the sweep's candidates
                        // (it never looks at any other blob)
                        let refs: Vec<Document> = coll
                            .find(doc! {"_id": {"$in": &ids}})
                            .projection(REFERENCE_FIELDS.clone())
                            .await?
                            .try_collect()
                            .await?;
                        let mut shas: Vec<String> = refs.iter().flat_map(blob_refs).collect();
                        shas.sort_unstable();
                        shas.dedup();
                        let now = bson::DateTime::now();
                        for sha in shas {
                            candidates
                                .update_one(
                                    doc! {"_id": sha},
                                    doc! {"$set": {"since": now}, "$unset": {"swept_at": ""}},
                                )
                                .upsert(true)
                                .await?;
                        }
                        coll.delete_many(doc! {"_id": {"$in": &ids}})
                            .await
                            .map(|r| r.deleted_count as usize)
                    })
                    .await?
                }
                OnExpunge::Mark => {
                    let found = ids.clone();
                    let marked = self
                        .guarded("expunged mark", async move {
                            coll.update_many(
                                doc! {"_id": {"$in": ids}, "expunged_at": {"$exists": false}},
                                doc! {"$set": {"expunged_at": bson::DateTime::now()}},
                            )
                            .await
                            .map(|r| r.modified_count as usize)
                        })
                        .await?;
                    if marked > 0 {
                        let shas = self.raw_shas(found).await?;
                        // remembered first, looked for second; a copy's store does the
                        // opposite (its insert, then `link_arrivals`): whichever side comes
                        // second sees the other, so a MOVE racing its arrival is still linked
                        self.remember_expunged(account, &shas).await?;
                        self.link_moves(account, &shas).await?;
                    }
                    marked
                }
            };
        }
        Ok(done)
    }

    /// Takes `expunged_at` off documents whose UIDs the server has after all (UIDs are never
    /// reused within a UIDVALIDITY, so the mark was wrong). Returns how many.
    pub async fn unmark_expunged(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<usize, StoreError> {
        if !uids.is_empty() {
            self.fence_gate(account, mailbox).await?;
        }
        let mut done = 0;
        for ids in id_chunks(account, mailbox, uidvalidity, uids) {
            let coll = self.messages.clone();
            done += self
                .guarded("expunged unmark", async move {
                    // the move links these documents made were wrong too: both sides go
                    let linked: Vec<Document> = coll
                        .find(doc! {"_id": {"$in": &ids}, "moved_to": {"$exists": true}})
                        .projection(doc! {"moved_to": 1})
                        .await?
                        .try_collect()
                        .await?;
                    let targets: Vec<&str> = linked
                        .iter()
                        .filter_map(|d| d.get_str("moved_to").ok())
                        .collect();
                    if !targets.is_empty() {
                        coll.update_many(
                            doc! {"_id": {"$in": targets}, "moved_from": {"$in": &ids}},
                            doc! {"$unset": {"moved_from": ""}},
                        )
                        .await?;
                    }
                    coll.update_many(
                        doc! {"_id": {"$in": &ids}, "expunged_at": {"$exists": true}},
                        doc! {"$unset": {"expunged_at": "", "expunged_reason": "", "moved_to": ""}},
                    )
                    .await
                    .map(|r| r.modified_count as usize)
                })
                .await?;
        }
        Ok(done)
    }

    /// The UIDVALIDITY changed: the documents stored under other values name messages that no
    /// longer exist under those UIDs. They are marked `expunged_at` with the reason (never
    /// removed, whatever `on_expunge` says: the new UIDVALIDITY's messages are fetched again,
    /// but a server that reset a mailbox by mistake must not cost the archive).
    pub async fn mark_uidvalidity_gone(
        &self,
        account: &str,
        mailbox: &str,
        current: u32,
    ) -> Result<usize, StoreError> {
        let coll = self.messages.clone();
        let filter = doc! {
            "account": account,
            "mailbox": mailbox,
            "uidvalidity": {"$ne": current as i64},
            "expunged_at": {"$exists": false},
        };
        self.guarded("uidvalidity mark", async move {
            coll.update_many(
                filter,
                doc! {"$set": {"expunged_at": bson::DateTime::now(), "expunged_reason": "uidvalidity changed"}},
            )
            .await
            .map(|r| r.modified_count as usize)
        })
        .await
    }

    /// UID, size, flags, whether expunged and the raw SHA-256 of every document of the mailbox
    /// under `uidvalidity`, sorted by UID (what `verify` and the UID comparison read; a
    /// projection of small fields, so a 100,000-message mailbox is a few MB).
    pub async fn stored_meta(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
    ) -> Result<Vec<StoredMeta>, StoreError> {
        self.stored_meta_page(account, mailbox, uidvalidity, 0, u32::MAX, 0)
            .await
    }

    /// Up to `limit` (0: all) documents with a UID in `after+1..=up_to`, by UID.
    pub async fn stored_meta_page(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        after: u32,
        up_to: u32,
        limit: u32,
    ) -> Result<Vec<StoredMeta>, StoreError> {
        let coll = self.messages.clone();
        let filter = doc! {
            "account": account,
            "mailbox": mailbox,
            "uidvalidity": uidvalidity as i64,
            "uid": {"$gt": after as i64, "$lte": up_to as i64},
        };
        let docs: Vec<Document> = self
            .guarded("stored page", async move {
                coll.find(filter)
                    .projection(doc! {"_id": 0, "uid": 1, "size": 1, "flags": 1, "expunged_at": 1, "raw.sha256": 1})
                    .sort(doc! {"uid": 1})
                    .limit(limit as i64)
                    .batch_size(10_000)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let mut out: Vec<StoredMeta> = docs.iter().filter_map(meta_of).collect();
        out.sort_unstable_by_key(|m| m.uid);
        Ok(out)
    }

    /// The raw SHA-256 of each document of `ids` that has one.
    async fn raw_shas(&self, ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        let coll = self.messages.clone();
        let docs: Vec<Document> = self
            .guarded("raw digests", async move {
                coll.find(doc! {"_id": {"$in": ids}})
                    .projection(doc! {"raw.sha256": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let mut shas: Vec<String> = docs
            .iter()
            .filter_map(|d| d.get_document("raw").ok()?.get_str("sha256").ok())
            .map(str::to_string)
            .collect();
        shas.sort_unstable();
        shas.dedup();
        Ok(shas)
    }

    /// Pairs, among the documents of `account` whose raw bytes are one of `shas`, each document
    /// marked expunged (and not linked yet) with a live one of the same bytes in another folder
    /// (not linked yet), oldest first: a MOVE (or a COPY followed by an expunge, which is the
    /// same thing to a reader). The old document gets `moved_to`, the new one `moved_from`.
    /// Called from both sides, so the link is made whichever of the two is seen first.
    pub(super) async fn link_moves(
        &self,
        account: &str,
        shas: &[String],
    ) -> Result<usize, StoreError> {
        if shas.is_empty() {
            return Ok(0);
        }
        let coll = self.messages.clone();
        // by the indexed field alone (a filter that names the account too makes SecantusDB
        // walk the account's index instead); the account is checked below
        let filter = doc! {"raw.sha256": {"$in": shas}};
        let docs: Vec<Document> = self
            .guarded("move lookup", async move {
                coll.find(filter)
                    .projection(doc! {"_id": 1, "account": 1, "mailbox": 1, "raw.sha256": 1, "expunged_at": 1, "moved_to": 1, "moved_from": 1, "stored_at": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let docs: Vec<Document> = docs
            .into_iter()
            .filter(|d| d.get_str("account") == Ok(account))
            .collect();
        let mut groups: HashMap<String, Vec<&Document>> = HashMap::new();
        for d in &docs {
            if let Some(sha) = d
                .get_document("raw")
                .ok()
                .and_then(|r| r.get_str("sha256").ok())
            {
                groups.entry(sha.to_string()).or_default().push(d);
            }
        }
        let mut linked = 0;
        for group in groups.values() {
            if group.len() < 2 {
                continue;
            }
            let mut gone: Vec<&Document> = group
                .iter()
                .copied()
                // (documents of an old UIDVALIDITY did not move anywhere)
                .filter(|d| {
                    d.contains_key("expunged_at")
                        && !d.contains_key("moved_to")
                        && !d.contains_key("expunged_reason")
                })
                .collect();
            let mut live: Vec<&Document> = group
                .iter()
                .copied()
                .filter(|d| !d.contains_key("expunged_at") && !d.contains_key("moved_from"))
                .collect();
            gone.sort_by_key(|d| d.get_datetime("expunged_at").ok().copied());
            live.sort_by_key(|d| d.get_datetime("stored_at").ok().copied());
            let mut used = HashSet::new();
            for old in gone {
                let from = old.get_str("mailbox").unwrap_or("");
                // a copy stored long before the expunge is a copy, not the move's target
                let earliest = old
                    .get_datetime("expunged_at")
                    .ok()
                    .map(|t| bson::DateTime::from_chrono(t.to_chrono() - MOVE_WINDOW));
                let old_id = old.get_str("_id").unwrap_or("").to_string();
                let candidates: Vec<String> = live
                    .iter()
                    .filter(|d| {
                        d.get_str("mailbox").unwrap_or("") != from
                            && !used.contains(d.get_str("_id").unwrap_or(""))
                            && earliest.is_none_or(|e| {
                                d.get_datetime("stored_at").ok().is_some_and(|s| *s >= e)
                            })
                    })
                    .map(|d| d.get_str("_id").unwrap_or("").to_string())
                    .collect();
                // Another writer may be linking the same documents right now (the expunge
                // side and the store side both look): the new copy is claimed first
                // (`moved_from` set only where absent), then the old one; a claim lost on
                // either side is given back or passed over, so that each copy ends with at
                // most one link and both sides of every link agree.
                for new_id in candidates {
                    used.insert(new_id.clone());
                    let coll = self.messages.clone();
                    let (a, b) = (old_id.clone(), new_id.clone());
                    let outcome = self
                        .guarded("move link", async move {
                            let claimed = coll
                                .update_one(
                                    doc! {"_id": &b, "moved_from": {"$exists": false}},
                                    doc! {"$set": {"moved_from": &a}},
                                )
                                .await?
                                .modified_count
                                > 0;
                            if !claimed {
                                return Ok(None);
                            }
                            let linked = coll
                                .update_one(
                                    doc! {"_id": &a, "moved_to": {"$exists": false}},
                                    doc! {"$set": {"moved_to": &b}},
                                )
                                .await?
                                .modified_count
                                > 0;
                            if !linked {
                                // the old one was linked elsewhere meanwhile: give this back
                                coll.update_one(
                                    doc! {"_id": &b, "moved_from": &a},
                                    doc! {"$unset": {"moved_from": ""}},
                                )
                                .await?;
                            }
                            Ok(Some(linked))
                        })
                        .await?;
                    match outcome {
                        Some(true) => {
                            linked += 1;
                            break;
                        }
                        // the old one is taken: nothing more to do for it (and this copy
                        // is free for another)
                        Some(false) => {
                            used.remove(&new_id);
                            break;
                        }
                        // this copy is taken: the next one
                        None => continue,
                    }
                }
            }
        }
        Ok(linked)
    }

    /// A batch of `account` was just stored: links those of its messages that left another
    /// folder of the account recently (expunged there in the last [`MOVE_WINDOW`]): one lookup
    /// by `_id` in `recent_expunges`, a collection of a few documents; `messages` is read only
    /// when one matches.
    pub(super) async fn link_arrivals(
        &self,
        account: &str,
        shas: &[String],
    ) -> Result<usize, StoreError> {
        if shas.is_empty() {
            return Ok(0);
        }
        let coll = self.recent_expunges.clone();
        let ids: Vec<String> = shas.iter().map(|s| format!("{account}/{s}")).collect();
        let recent: Vec<Document> = self
            .guarded("recent expunges", async move {
                coll.find(doc! {"_id": {"$in": ids}})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let mut matched: Vec<String> = recent
            .iter()
            .filter_map(|d| d.get_str("sha256").ok().map(str::to_string))
            .collect();
        if matched.is_empty() {
            return Ok(0);
        }
        matched.sort_unstable();
        matched.dedup();
        self.link_moves(account, &matched).await
    }

    /// Remembers for an hour ([`MOVE_WINDOW`]) the digests of messages just marked expunged,
    /// so that a copy stored in another folder later is linked (`link_arrivals`: one lookup by
    /// `_id` in a collection of a few documents per batch, instead of a query over `messages`).
    async fn remember_expunged(&self, account: &str, shas: &[String]) -> Result<(), StoreError> {
        let coll = self.recent_expunges.clone();
        let now = bson::DateTime::now();
        let cutoff = bson::DateTime::from_chrono(chrono::Utc::now() - MOVE_WINDOW);
        let docs: Vec<(String, Document)> = shas
            .iter()
            .map(|s| {
                (
                    format!("{account}/{s}"),
                    doc! {"account": account, "sha256": s, "at": now},
                )
            })
            .collect();
        self.guarded("recent expunges", async move {
            for (id, d) in docs {
                coll.update_one(doc! {"_id": id}, doc! {"$set": d})
                    .upsert(true)
                    .await?;
            }
            coll.delete_many(doc! {"at": {"$lt": cutoff}})
                .await
                .map(|_| ())
        })
        .await
    }

    /// Claims the blobs of a batch that a sweep may remove: the sweep candidates among them
    /// (one query on `blob_candidates`, a collection of the blobs of removed documents only).
    /// Each is touched (`touched_at`, so that no sweep marks it) and looked up: the answer maps
    /// it to whether it is present. A blob a sweep is removing right now is
    /// `StoreError::Busy`: the batch is retried. Blobs that are no candidates are not in the
    /// answer: no sweep looks at them.
    pub(super) async fn claim_blobs(
        &self,
        shas: &[String],
    ) -> Result<HashMap<String, bool>, StoreError> {
        let mut out = HashMap::new();
        if shas.is_empty() {
            return Ok(out);
        }
        let mut found: Vec<Document> = Vec::new();
        for ids in shas.chunks(super::blobs::GROUP_DOCS) {
            let candidates = self.blob_candidates.clone();
            let ids = ids.to_vec();
            found.extend(
                self.guarded("blob candidates", async move {
                    candidates
                        .find(doc! {"_id": {"$in": ids}})
                        .await?
                        .try_collect::<Vec<Document>>()
                        .await
                })
                .await?,
            );
        }
        for c in &found {
            let Ok(sha) = c.get_str("_id") else { continue };
            let files = self.files.clone();
            let id = sha.to_string();
            let file = self
                .guarded("blob claim", async move {
                    files
                        .update_one(
                            doc! {"_id": &id, "deleting": {"$exists": false}},
                            doc! {"$set": {"touched_at": bson::DateTime::now()}},
                        )
                        .await?;
                    files
                        .find_one(doc! {"_id": &id})
                        .projection(doc! {"_id": 1, "deleting": 1})
                        .await
                })
                .await?;
            match file {
                Some(f) if f.contains_key("deleting") => {
                    return Err(StoreError::Busy(format!("blob {sha} is being swept")))
                }
                present => {
                    out.insert(sha.to_string(), present.is_some());
                }
            }
        }
        Ok(out)
    }

    /// Removes the blobs that no message document refers to and that nobody touched for
    /// `older_than` (see the module's invariant for why this never removes a blob a writer is
    /// about to refer to).
    pub async fn sweep_blobs(
        &self,
        older_than: std::time::Duration,
    ) -> Result<SweepReport, StoreError> {
        let cutoff = bson::DateTime::from_chrono(
            chrono::Utc::now() - chrono::Duration::from_std(older_than).unwrap_or_default(),
        );
        let untouched = doc! {"$or": [
            {"touched_at": {"$lt": cutoff}},
            {"touched_at": {"$exists": false}, "uploadDate": {"$lt": cutoff}},
        ]};
        let coll = self.blob_candidates.clone();
        let kept = bson::DateTime::from_chrono(
            chrono::Utc::now()
                - chrono::Duration::from_std(older_than * 2)
                    .unwrap_or_default()
                    .max(chrono::Duration::hours(2)),
        );
        let candidates: Vec<String> = self
            .guarded("sweep candidates", async move {
                // entries of blobs swept long ago go (a writer's second claim has long looked)
                coll.delete_many(doc! {"swept_at": {"$lt": kept}}).await?;
                let docs: Vec<Document> = coll
                    .find(doc! {"since": {"$lt": cutoff}, "swept_at": {"$exists": false}})
                    .projection(doc! {"_id": 1})
                    .await?
                    .try_collect()
                    .await?;
                Ok(docs
                    .iter()
                    .filter_map(|d| d.get_str("_id").ok().map(str::to_string))
                    .collect())
            })
            .await?;
        let mut report = SweepReport {
            candidates: candidates.len(),
            removed: 0,
        };
        for chunk in candidates.chunks(IDS_PER_QUERY) {
            let referenced = self.referenced(chunk).await?;
            let still: Vec<String> = chunk
                .iter()
                .filter(|s| referenced.contains(*s))
                .cloned()
                .collect();
            if !still.is_empty() {
                // referred to again (the same bytes arrived in another message): no longer a
                // candidate
                let coll = self.blob_candidates.clone();
                self.guarded("sweep candidates", async move {
                    coll.delete_many(doc! {"_id": {"$in": still}})
                        .await
                        .map(|_| ())
                })
                .await?;
            }
            for sha in chunk.iter().filter(|s| !referenced.contains(*s)) {
                let files = self.files.clone();
                let chunks = self.chunks.clone();
                let candidates = self.blob_candidates.clone();
                let (sha, mut filter) = (sha.clone(), untouched.clone());
                filter.insert("_id", &sha);
                let removed = self
                    .guarded("blob sweep", async move {
                        // 1: only if still untouched; from now on writers wait. A document
                        // written since the reference check claimed the blob before (so this
                        // fails) or claims it again after its insert (and rewrites it).
                        // The mark is a lease with a token of this sweep's own: a second
                        // sweeper (another process) cannot take a blob one is removing, and
                        // takes over one whose sweep died only after SWEEP_LEASE.
                        let token = bson::oid::ObjectId::new();
                        let stale = bson::DateTime::from_chrono(chrono::Utc::now() - SWEEP_LEASE);
                        let mut filter = filter;
                        filter.insert(
                            "$and",
                            vec![doc! {"$or": [
                                {"deleting": {"$exists": false}},
                                {"deleting.at": {"$lt": stale}},
                            ]}],
                        );
                        let marked = files
                            .update_one(
                                filter,
                                doc! {"$set": {"deleting": {"token": token, "at": bson::DateTime::now()}}},
                            )
                            .await?;
                        if marked.modified_count == 0 {
                            return Ok(false);
                        }
                        chunks.delete_many(doc! {"files_id": &sha}).await?;
                        files
                            .delete_one(doc! {"_id": &sha, "deleting.token": token})
                            .await?;
                        // kept a while: a writer that looked before the removal claims again
                        // after its documents are in, and finds it here
                        candidates
                            .update_one(
                                doc! {"_id": &sha},
                                doc! {"$set": {"swept_at": bson::DateTime::now()}},
                            )
                            .await?;
                        Ok(true)
                    })
                    .await?;
                report.removed += removed as usize;
            }
        }
        Ok(report)
    }

    /// Which of `shas` some message document refers to (raw, attachment, or a body blob).
    async fn referenced(&self, shas: &[String]) -> Result<HashSet<String>, StoreError> {
        let coll = self.messages.clone();
        let list: Vec<Bson> = shas.iter().map(|s| Bson::String(s.clone())).collect();
        let filter = doc! {"$or": [
            {"raw.sha256": {"$in": &list}},
            {"attachments.sha256": {"$in": &list}},
            {"text_blob.sha256": {"$in": &list}},
            {"html_blob.sha256": {"$in": &list}},
        ]};
        let docs: Vec<Document> = self
            .guarded("blob references", async move {
                coll.find(filter)
                    .projection(REFERENCE_FIELDS.clone())
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let wanted: HashSet<&str> = shas.iter().map(String::as_str).collect();
        let found = docs
            .iter()
            .flat_map(blob_refs)
            .filter(|s| wanted.contains(s.as_str()))
            .collect();
        Ok(found)
    }
}

/// The fields of a message document that name blobs.
static REFERENCE_FIELDS: std::sync::LazyLock<Document> = std::sync::LazyLock::new(|| {
    doc! {"raw.sha256": 1, "raw.blob": 1, "attachments.sha256": 1, "text_blob.sha256": 1, "html_blob.sha256": 1}
});

/// Every blob digest a message document (or its projection on [`REFERENCE_FIELDS`]) names.
/// Raw bytes stored inline (`raw.data`, no `raw.blob`) are no blob.
fn blob_refs(d: &Document) -> Vec<String> {
    let mut out = Vec::new();
    for key in ["raw", "text_blob", "html_blob"] {
        let Ok(r) = d.get_document(key) else { continue };
        if key == "raw" && !r.contains_key("blob") {
            continue;
        }
        if let Ok(s) = r.get_str("sha256") {
            out.push(s.to_string());
        }
    }
    if let Ok(list) = d.get_array("attachments") {
        for a in list {
            if let Some(s) = a.as_document().and_then(|a| a.get_str("sha256").ok()) {
                out.push(s.to_string());
            }
        }
    }
    out
}

/// The [`StoredMeta`] of a projected message document.
fn meta_of(d: &Document) -> Option<StoredMeta> {
    Some(StoredMeta {
        uid: int(d.get("uid")?)? as u32,
        size: d.get("size").and_then(int).unwrap_or(0) as u64,
        flags: d
            .get_array("flags")
            .map(|f| {
                f.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        expunged: d.contains_key("expunged_at"),
        raw_sha256: d
            .get_document("raw")
            .ok()
            .and_then(|r| r.get_str("sha256").ok())
            .map(str::to_string),
    })
}

fn int(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) => Some(*f as i64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse, Limits};
    use crate::store::{MailboxStatus, ReadyMessage};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn with_attachment(uid: u32, attachment: &str) -> ReadyMessage {
        let raw = format!(
            "Subject: m{uid}\r\nMessage-ID: <m{uid}@x>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi {uid}\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.bin\r\n\r\n{attachment}\r\n--b--\r\n"
        )
        .into_bytes();
        ReadyMessage {
            uid,
            flags: vec![],
            internal_date: None,
            size: raw.len() as u64,
            // raw bytes as a blob too: the sweep has raw blobs to judge
            parsed: parse(
                raw,
                Limits {
                    inline_raw_max: 0,
                    ..Limits::default()
                },
            ),
            gmail: None,
        }
    }

    /// The same message in two folders, both moved to a third: two expunged copies, two new
    /// ones. Linking from several writers at once gives each copy at most one link, and both
    /// ends of every link agree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_move_links_pair_each_copy_once_and_both_ends_agree() {
        let cfg = crate::store::test_config("mp_links", OnExpunge::Mark, Duration::from_secs(3600));
        let store = Store::connect(&cfg).await.unwrap();
        let one = |uid| with_attachment(uid, "same");
        // the same raw bytes everywhere (uid 7 in every folder)
        for mailbox in ["INBOX", "Archive"] {
            store
                .commit_batch("a", mailbox, 1, MailboxStatus::default(), &[one(7)], 7)
                .await
                .unwrap();
        }
        let coll = store.messages.clone();
        coll.update_many(
            doc! {"mailbox": {"$in": ["INBOX", "Archive"]}},
            doc! {"$set": {"expunged_at": bson::DateTime::now()}},
        )
        .await
        .unwrap();
        for mailbox in ["Trash", "Trash2"] {
            store
                .commit_batch("a", mailbox, 1, MailboxStatus::default(), &[one(7)], 7)
                .await
                .unwrap();
        }
        let sha = vec![one(7).parsed.raw.sha256.clone()];
        let (a, b, c) = tokio::join!(
            store.link_moves("a", &sha),
            store.link_moves("a", &sha),
            store.link_moves("a", &sha)
        );
        assert!(a.unwrap() + b.unwrap() + c.unwrap() >= 2);
        let docs: Vec<Document> = coll
            .find(doc! {"account": "a"})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let get = |id: &str| docs.iter().find(|d| d.get_str("_id") == Ok(id)).unwrap();
        let mut targets = HashSet::new();
        for old in ["a/INBOX/1/7", "a/Archive/1/7"] {
            let to = get(old).get_str("moved_to").expect("every old copy linked");
            assert!(targets.insert(to.to_string()), "{to} linked twice");
            assert_eq!(get(to).get_str("moved_from"), Ok(old), "both ends agree");
        }
        let _ = store.client.database(&cfg.database).drop().await;
    }

    #[test]
    fn inline_raw_bytes_are_no_blob_reference() {
        let inline = doc! {"raw": {"sha256": "r", "size": 3i64, "data": bson::Binary {subtype: bson::spec::BinarySubtype::Generic, bytes: b"abc".to_vec()}},
        "attachments": [{"sha256": "a"}], "text_blob": {"sha256": "t"}};
        assert_eq!(blob_refs(&inline), vec!["t".to_string(), "a".to_string()]);
        let projected = doc! {"raw": {"sha256": "r"}, "attachments": []};
        assert!(blob_refs(&projected).is_empty(), "no raw.blob: inline");
        let old_layout = doc! {"raw": {"sha256": "r", "size": 3i64, "blob": "r"}};
        assert_eq!(blob_refs(&old_layout), vec!["r".to_string()]);
    }

    /// A sweep running flat out (nothing is "old enough" to protect a blob: `older_than` 0)
    /// beside a writer whose every message shares one attachment with the message it just
    /// deleted: whatever interleaving happens, every stored document's blobs are there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sweep_racing_a_writer_never_leaves_a_document_without_its_blobs() {
        let cfg = crate::store::test_config("mp_sweep", OnExpunge::Delete, Duration::from_secs(1));
        let store = Store::connect(&cfg).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut removed = 0;
                while !stop.load(Ordering::Relaxed) {
                    removed += store.sweep_blobs(Duration::ZERO).await.unwrap().removed;
                }
                removed
            })
        };
        let attachment = "the attachment every message shares";
        let mut busy = 0;
        for uid in 1..=60u32 {
            let batch = vec![with_attachment(uid, attachment)];
            loop {
                match store
                    .commit_batch("a", "INBOX", 1, MailboxStatus::default(), &batch, uid)
                    .await
                {
                    Ok(_) => break,
                    Err(StoreError::Busy(_)) => {
                        busy += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            let p = &batch[0].parsed;
            for sha in [&p.raw.sha256, &p.attachments[0].sha256] {
                store
                    .read_blob(sha)
                    .await
                    .unwrap_or_else(|e| panic!("uid {uid}: {e}"));
            }
            // the message before goes: its raw blob is unreferenced, the attachment is not
            if uid > 1 {
                assert_eq!(
                    store
                        .mark_expunged("a", "INBOX", 1, &[uid - 1])
                        .await
                        .unwrap(),
                    1
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        let removed = sweeper.await.unwrap();
        let last = with_attachment(60, attachment);
        let blob = store
            .read_blob(&last.parsed.attachments[0].sha256)
            .await
            .unwrap();
        assert_eq!(blob, attachment.as_bytes());
        store.read_blob(&last.parsed.raw.sha256).await.unwrap();
        eprintln!("sweep race: {removed} blobs removed, {busy} batches waited");
        assert!(
            removed > 0,
            "the sweep did remove the raw blobs of deleted messages"
        );
        let _ = store.client.database(&cfg.database).drop().await;
    }
}
