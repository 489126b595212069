//! What changes after a message was stored: its flags (`flags`, `modseq`, `flags_updated_at`),
//! its deletion on the server (`expunged_at`, or the document removed with `on_expunge =
//! "delete"`), a move between folders (`moved_to` / `moved_from`), and the sweep of blobs that
//! no document refers to any more.
//!
//! **Invariant (blobs):** a blob is removed only when no message document refers to it and no
//! writer touched it for `blob_sweep_after`. Writers claim every blob of a batch before they
//! write its documents ([`Store::claim_blobs`]: `touched_at` set on those present, in one
//! update); the sweep first marks a blob `deleting` (only if still untouched), then removes its
//! chunks, then its files document, and a writer that meets a blob marked `deleting` waits
//! (`StoreError::Busy`, retried) instead of pointing a document at it.

use std::collections::{HashMap, HashSet};

use bson::{doc, Bson, Document};
use futures::{StreamExt, TryStreamExt};

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
/// `_id`s per `$in` query.
const IDS_PER_QUERY: usize = 5000;

fn message_id(account: &str, mailbox: &str, uidvalidity: u32, uid: u32) -> String {
    format!("{account}/{mailbox}/{uidvalidity}/{uid}")
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
        let now = bson::DateTime::now();
        // Owned first: a closure over `&FlagChange` that returns a future makes the whole
        // future not `Send` for every lifetime, so it could not be awaited in a spawned task.
        let owned: Vec<(String, Document, Vec<String>)> = changes
            .iter()
            .map(|c| {
                let mut set = doc! {"flags": &c.flags, "flags_updated_at": now};
                if let Some(m) = c.modseq {
                    set.insert("modseq", m as i64);
                }
                (
                    message_id(account, mailbox, uidvalidity, c.uid),
                    set,
                    c.flags.clone(),
                )
            })
            .collect();
        let updates = owned.into_iter().map(|(id, set, flags)| {
            let coll = self.messages.clone();
            async move {
                self.guarded("flag update", async move {
                    coll.update_one(
                        doc! {"_id": id, "flags": {"$ne": flags}},
                        doc! {"$set": set},
                    )
                    .await
                    .map(|r| r.modified_count as usize)
                })
                .await
            }
        });
        let changed: Vec<usize> = futures::stream::iter(updates)
            .buffer_unordered(FLAG_WRITES_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok(changed.into_iter().sum())
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
        let mut done = 0;
        for chunk in uids.chunks(IDS_PER_QUERY) {
            let ids: Vec<String> = chunk
                .iter()
                .map(|u| message_id(account, mailbox, uidvalidity, *u))
                .collect();
            let coll = self.messages.clone();
            done += match self.on_expunge {
                OnExpunge::Delete => {
                    self.guarded("expunged delete", async move {
                        coll.delete_many(doc! {"_id": {"$in": ids}})
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
        let mut done = 0;
        for chunk in uids.chunks(IDS_PER_QUERY) {
            let ids: Vec<String> = chunk
                .iter()
                .map(|u| message_id(account, mailbox, uidvalidity, *u))
                .collect();
            let coll = self.messages.clone();
            done += self
                .guarded("expunged unmark", async move {
                    coll.update_many(
                        doc! {"_id": {"$in": ids}, "expunged_at": {"$exists": true}},
                        doc! {"$unset": {"expunged_at": "", "moved_to": ""}},
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
        let coll = self.messages.clone();
        let filter =
            doc! {"account": account, "mailbox": mailbox, "uidvalidity": uidvalidity as i64};
        let docs: Vec<Document> = self
            .guarded("stored uids", async move {
                coll.find(filter)
                    .projection(doc! {"_id": 0, "uid": 1, "size": 1, "flags": 1, "expunged_at": 1, "raw.sha256": 1})
                    .batch_size(10_000)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let mut out: Vec<StoredMeta> = docs
            .iter()
            .filter_map(|d| {
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
            })
            .collect();
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
        let filter = doc! {"account": account, "raw.sha256": {"$in": shas}};
        let docs: Vec<Document> = self
            .guarded("move lookup", async move {
                coll.find(filter)
                    .projection(doc! {"_id": 1, "mailbox": 1, "raw.sha256": 1, "expunged_at": 1, "moved_to": 1, "moved_from": 1, "stored_at": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
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
                .filter(|d| d.contains_key("expunged_at") && !d.contains_key("moved_to"))
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
                let Some(new) = live.iter().find(|d| {
                    d.get_str("mailbox").unwrap_or("") != from
                        && !used.contains(d.get_str("_id").unwrap_or(""))
                }) else {
                    continue;
                };
                let (old_id, new_id) = (
                    old.get_str("_id").unwrap_or("").to_string(),
                    new.get_str("_id").unwrap_or("").to_string(),
                );
                used.insert(new_id.clone());
                let coll = self.messages.clone();
                let (a, b) = (old_id.clone(), new_id.clone());
                self.guarded("move link", async move {
                    coll.update_one(
                        doc! {"_id": &a, "moved_to": {"$exists": false}},
                        doc! {"$set": {"moved_to": &b}},
                    )
                    .await?;
                    coll.update_one(
                        doc! {"_id": &b, "moved_from": {"$exists": false}},
                        doc! {"$set": {"moved_from": &a}},
                    )
                    .await
                    .map(|_| ())
                })
                .await?;
                linked += 1;
            }
        }
        Ok(linked)
    }

    /// Claims the blobs a batch is about to refer to: those present get `touched_at` now (so
    /// that no sweep removes them), in one update. Returns the digests that must be written.
    /// A blob a sweep is removing right now is `StoreError::Busy`: the batch is retried.
    pub(super) async fn claim_blobs(&self, shas: &[String]) -> Result<HashSet<String>, StoreError> {
        if shas.is_empty() {
            return Ok(HashSet::new());
        }
        let files = self.files.clone();
        let ids = shas.to_vec();
        let present: Vec<Document> = self
            .guarded("blob claim", async move {
                files
                    .update_many(
                        doc! {"_id": {"$in": &ids}, "deleting": {"$exists": false}},
                        doc! {"$set": {"touched_at": bson::DateTime::now()}},
                    )
                    .await?;
                files
                    .find(doc! {"_id": {"$in": &ids}})
                    .projection(doc! {"_id": 1, "deleting": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let mut missing: HashSet<String> = shas.iter().cloned().collect();
        for d in &present {
            let id = d.get_str("_id").unwrap_or("");
            if d.contains_key("deleting") {
                return Err(StoreError::Busy(format!("blob {id} is being swept")));
            }
            missing.remove(id);
        }
        Ok(missing)
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
        let files = self.files.clone();
        let filter = untouched.clone();
        let candidates: Vec<String> = self
            .guarded("sweep candidates", async move {
                let docs: Vec<Document> = files
                    .find(filter)
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
            for sha in chunk.iter().filter(|s| !referenced.contains(*s)) {
                let files = self.files.clone();
                let chunks = self.chunks.clone();
                let messages = self.messages.clone();
                let (sha, mut filter) = (sha.clone(), untouched.clone());
                filter.insert("_id", &sha);
                let removed = self
                    .guarded("blob sweep", async move {
                        // 1: only if still untouched; from now on writers wait
                        let marked = files
                            .update_one(filter, doc! {"$set": {"deleting": bson::DateTime::now()}})
                            .await?;
                        if marked.modified_count == 0 {
                            return Ok(false);
                        }
                        // a document written between the reference check and the mark
                        // claimed the blob first (the mark would then have failed); this
                        // last look covers documents that are being replayed
                        if messages.find_one(references(&sha)).await?.is_some() {
                            files
                                .update_one(doc! {"_id": &sha}, doc! {"$unset": {"deleting": ""}})
                                .await?;
                            return Ok(false);
                        }
                        chunks.delete_many(doc! {"files_id": &sha}).await?;
                        files.delete_one(doc! {"_id": &sha}).await?;
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
                    .projection(doc! {"raw.sha256": 1, "attachments.sha256": 1, "text_blob.sha256": 1, "html_blob.sha256": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let wanted: HashSet<&str> = shas.iter().map(String::as_str).collect();
        let mut found = HashSet::new();
        for d in &docs {
            let mut note = |v: Option<&str>| {
                if let Some(s) = v.filter(|s| wanted.contains(s)) {
                    found.insert(s.to_string());
                }
            };
            for key in ["raw", "text_blob", "html_blob"] {
                note(
                    d.get_document(key)
                        .ok()
                        .and_then(|r| r.get_str("sha256").ok()),
                );
            }
            if let Ok(list) = d.get_array("attachments") {
                for a in list {
                    note(a.as_document().and_then(|a| a.get_str("sha256").ok()));
                }
            }
        }
        Ok(found)
    }
}

/// A filter for any message document that refers to blob `sha`.
fn references(sha: &str) -> Document {
    doc! {"$or": [
        {"raw.sha256": sha},
        {"attachments.sha256": sha},
        {"text_blob.sha256": sha},
        {"html_blob.sha256": sha},
    ]}
}

fn int(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) => Some(*f as i64),
        _ => None,
    }
}
