//! The store: the only user of the mongodb crate. Writes messages, content-addressed blobs
//! (GridFS layout, bucket `blobs`) and the per-mailbox checkpoints in `mailboxes`.
//!
//! **Invariant (the checkpoint rule):** `last_uid` moves only in [`Store::commit_batch`], after
//! every blob and every message document of the batch has been acknowledged.
//!
//! **Invariant:** every write is idempotent. Blobs are keyed by their SHA-256 and chunks by
//! `sha/n`; messages by `account/mailbox/uidvalidity/uid` (plus a unique index on those four
//! fields); a replayed batch rewrites the same documents.
//!
//! Driver futures are never cancelled mid-flight (notes/crates.md): each operation runs in its
//! own task and the timeout is put on its JoinHandle.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use bson::{doc, Bson, Document};
use chrono::{DateTime, FixedOffset, Utc};
use futures::TryStreamExt;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};

use crate::config::StoreConfig;
use crate::error::ErrorClass;
use crate::parse::{Blob, ParsedMessage};

/// GridFS' default chunk size, so that any GridFS reader can open our blobs.
pub const CHUNK_SIZE: usize = 255 * 1024;
/// Chunk documents are sent in groups of about this many bytes (bounds memory for big blobs).
const CHUNK_GROUP_BYTES: usize = 8 * 1024 * 1024;

const DUPLICATE_KEY: i32 = 11000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("MongoDB did not acknowledge {what} within {}s", after.as_secs_f32())]
    Timeout { what: String, after: Duration },
    #[error("MongoDB operation {0} ended abnormally")]
    Aborted(String),
    #[error("missing from the database: {0}")]
    Missing(String),
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Retry
    }
}

/// What `export` needs of one stored message.
#[derive(Debug, Clone)]
pub struct ExportItem {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub raw_sha256: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub text_blob: Option<String>,
    pub html_blob: Option<String>,
    /// (filename, content_type, sha256) of each attachment, in document order.
    pub attachments: Vec<(Option<String>, String, String)>,
}

impl ExportItem {
    fn from_document(d: &Document) -> Option<ExportItem> {
        let blob_of = |key: &str| {
            d.get_document(key)
                .ok()
                .and_then(|b| b.get_str("sha256").ok())
                .map(str::to_string)
        };
        let text_of = |key: &str| d.get_str(key).ok().map(str::to_string);
        Some(ExportItem {
            mailbox: d.get_str("mailbox").ok()?.to_string(),
            uidvalidity: d.get_i64("uidvalidity").ok()? as u32,
            uid: d.get_i64("uid").ok()? as u32,
            raw_sha256: blob_of("raw")?,
            text: text_of("text"),
            html: text_of("html"),
            text_blob: blob_of("text_blob"),
            html_blob: blob_of("html_blob"),
            attachments: d
                .get_array("attachments")
                .map(|list| {
                    list.iter()
                        .filter_map(|a| {
                            let a = a.as_document()?;
                            Some((
                                a.get_str("filename").ok().map(str::to_string),
                                a.get_str("content_type")
                                    .unwrap_or("application/octet-stream")
                                    .to_string(),
                                a.get_str("sha256").ok()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// A message ready to be written: where it was found plus what the parser made of it.
#[derive(Debug)]
pub struct ReadyMessage {
    pub uid: u32,
    pub flags: Vec<String>,
    pub internal_date: Option<DateTime<FixedOffset>>,
    pub size: u64,
    pub parsed: ParsedMessage,
}

/// The stored checkpoint of one mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub uidvalidity: u32,
    pub last_uid: u32,
}

/// What the server said about the mailbox when the batch was fetched (kept for readers).
#[derive(Debug, Clone, Copy, Default)]
pub struct MailboxStatus {
    pub uidnext: Option<u32>,
    pub exists: u32,
}

/// What one [`Store::commit_batch`] wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitReport {
    /// Message documents newly inserted.
    pub inserted: usize,
    /// Message documents that already existed and were rewritten (a replayed batch).
    pub replaced: usize,
    /// Blobs written (blobs already present are not written again).
    pub blobs_written: usize,
}

/// What the UIDL map knows of one POP3 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pop3Entry {
    /// The stable uid this UIDL was given, once and for all.
    pub uid: u32,
    /// Its document is acknowledged.
    pub stored: bool,
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    messages: Collection<Document>,
    mailboxes: Collection<Document>,
    pop3_uidl: Collection<Document>,
    files: Collection<Document>,
    chunks: Collection<Document>,
    op_timeout: Duration,
}

impl Store {
    /// Connects, pings (so a wrong URI fails fast) and creates the indexes.
    pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let mut options = ClientOptions::parse(cfg.uri.expose()).await?;
        options.server_selection_timeout = Some(cfg.connect_timeout);
        options.connect_timeout = Some(cfg.connect_timeout);
        options.app_name = Some("mailpump".into());
        let client = Client::with_options(options)?;
        let db = client.database(&cfg.database);
        let store = Store {
            messages: db.collection("messages"),
            mailboxes: db.collection("mailboxes"),
            pop3_uidl: db.collection("pop3_uidl"),
            files: db.collection("blobs.files"),
            chunks: db.collection("blobs.chunks"),
            client,
            op_timeout: cfg.op_timeout.max(cfg.connect_timeout),
        };
        let db2 = db.clone();
        store
            .guarded("ping", async move {
                db2.run_command(doc! {"ping": 1}).await.map(|_| ())
            })
            .await?;
        store.create_indexes().await?;
        Ok(store)
    }

    /// Runs `op` in its own task and waits at most `op_timeout` for it.
    async fn guarded<T, F>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, mongodb::error::Error>> + Send + 'static,
    {
        let handle = tokio::spawn(op);
        match tokio::time::timeout(self.op_timeout, handle).await {
            Err(_) => Err(StoreError::Timeout {
                what: what.to_string(),
                after: self.op_timeout,
            }),
            Ok(Err(_join)) => Err(StoreError::Aborted(what.to_string())),
            Ok(Ok(result)) => result.map_err(StoreError::from),
        }
    }

    async fn create_indexes(&self) -> Result<(), StoreError> {
        let unique = || IndexOptions::builder().unique(true).build();
        let messages = self.messages.clone();
        let chunks = self.chunks.clone();
        let files = self.files.clone();
        let pop3 = self.pop3_uidl.clone();
        self.guarded("index creation", async move {
            pop3.create_index(IndexModel::builder().keys(doc! {"account": 1}).build())
                .await?;
            messages
                .create_index(
                    IndexModel::builder()
                        .keys(doc! {"account": 1, "mailbox": 1, "uidvalidity": 1, "uid": 1})
                        .options(unique())
                        .build(),
                )
                .await?;
            // The indexes every GridFS driver expects.
            chunks
                .create_index(
                    IndexModel::builder()
                        .keys(doc! {"files_id": 1, "n": 1})
                        .options(unique())
                        .build(),
                )
                .await?;
            files
                .create_index(
                    IndexModel::builder()
                        .keys(doc! {"filename": 1, "uploadDate": 1})
                        .build(),
                )
                .await?;
            Ok(())
        })
        .await
    }

    /// A ping, for /healthz.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let db = self.mailboxes.namespace().db;
        let client = self.client.clone();
        self.guarded("ping", async move {
            client
                .database(&db)
                .run_command(doc! {"ping": 1})
                .await
                .map(|_| ())
        })
        .await
    }

    /// Ends the client. Drop every cursor first (nothing here keeps one open).
    pub async fn shutdown(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.shutdown()).await;
    }

    fn mailbox_id(account: &str, mailbox: &str) -> String {
        format!("{account}/{mailbox}")
    }

    /// The stored checkpoint, if this mailbox was seen before.
    pub async fn checkpoint(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        let found = self
            .guarded("checkpoint read", async move {
                coll.find_one(doc! {"_id": id}).await
            })
            .await?;
        Ok(found.and_then(|d| {
            let uidvalidity = d.get_i64("uidvalidity").ok()?;
            let last_uid = d.get_i64("last_uid").ok()?;
            Some(Checkpoint {
                uidvalidity: uidvalidity as u32,
                last_uid: last_uid as u32,
            })
        }))
    }

    /// Starts a mailbox over under a new UIDVALIDITY (promise 6): `last_uid` back to 0. The
    /// documents stored under the old value stay; blobs are shared by content.
    pub async fn reset_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        status: MailboxStatus,
    ) -> Result<(), StoreError> {
        self.write_checkpoint(
            account,
            mailbox,
            Checkpoint {
                uidvalidity,
                last_uid: 0,
            },
            status,
        )
        .await
    }

    async fn write_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
        cp: Checkpoint,
        status: MailboxStatus,
    ) -> Result<(), StoreError> {
        let id = Self::mailbox_id(account, mailbox);
        let set = doc! {
            "account": account,
            "mailbox": mailbox,
            "uidvalidity": cp.uidvalidity as i64,
            "last_uid": cp.last_uid as i64,
            "uidnext": status.uidnext.map(|n| Bson::Int64(n as i64)).unwrap_or(Bson::Null),
            "exists": status.exists as i64,
            "updated_at": bson::DateTime::now(),
        };
        self.upsert_mailbox(id, set, "checkpoint write").await
    }

    /// `$set` on the mailbox document, creating it (with an empty quarantine) if needed.
    async fn upsert_mailbox(
        &self,
        id: String,
        set: Document,
        what: &str,
    ) -> Result<(), StoreError> {
        let coll = self.mailboxes.clone();
        self.guarded(what, async move {
            coll.update_one(
                doc! {"_id": id},
                doc! {"$set": set, "$setOnInsert": {"quarantined": []}},
            )
            .upsert(true)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Counts one more failed attempt at `uid`; returns the count.
    pub async fn record_failure(
        &self,
        account: &str,
        mailbox: &str,
        uid: u32,
        reason: &str,
    ) -> Result<i64, StoreError> {
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        let field = format!("failures.{uid}");
        let reason = reason.to_string();
        let updated = self
            .guarded("failure count", async move {
                coll.find_one_and_update(
                    doc! {"_id": id},
                    doc! {"$inc": {&field: 1i64}, "$set": {"last_error": reason}},
                )
                .upsert(true)
                .return_document(mongodb::options::ReturnDocument::After)
                .await
            })
            .await?;
        Ok(updated
            .and_then(|d| {
                d.get_document("failures").ok().and_then(|f| {
                    f.get(uid.to_string())
                        .and_then(Bson::as_i64)
                        .or_else(|| f.get_i32(uid.to_string()).ok().map(i64::from))
                })
            })
            .unwrap_or(1))
    }

    /// Records `uid` as quarantined (skipped for good) with its reason.
    pub async fn quarantine(
        &self,
        account: &str,
        mailbox: &str,
        uid: u32,
        reason: &str,
    ) -> Result<(), StoreError> {
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        let entry = doc! {"uid": uid as i64, "reason": reason, "at": bson::DateTime::now()};
        self.guarded("quarantine", async move {
            coll.update_one(
                doc! {"_id": id, "quarantined.uid": {"$ne": entry.get_i64("uid").unwrap_or(0)}},
                doc! {"$push": {"quarantined": entry}},
            )
            .await
            .map(|_| ())
        })
        .await
    }

    /// Records the mailbox's state for readers and /healthz (`syncing`, `idle`, `error`, ...).
    pub async fn set_state(
        &self,
        account: &str,
        mailbox: &str,
        state: &str,
        last_error: Option<&str>,
    ) -> Result<(), StoreError> {
        let id = Self::mailbox_id(account, mailbox);
        let set = doc! {
            "account": account,
            "mailbox": mailbox,
            "state": state,
            "last_error": last_error.map(|e| Bson::String(e.to_string())).unwrap_or(Bson::Null),
            "updated_at": bson::DateTime::now(),
        };
        self.upsert_mailbox(id, set, "state write").await
    }

    /// Writes the batch's blobs, then its messages, then moves the checkpoint to the batch's
    /// highest UID. `batch` must be sorted by UID and every UID must be above the checkpoint.
    /// The one place where `last_uid` advances.
    pub async fn commit_batch(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        status: MailboxStatus,
        batch: &[ReadyMessage],
        last_uid: u32,
    ) -> Result<CommitReport, StoreError> {
        let report = self
            .write_batch(account, mailbox, uidvalidity, batch)
            .await?;
        self.write_checkpoint(
            account,
            mailbox,
            Checkpoint {
                uidvalidity,
                last_uid,
            },
            status,
        )
        .await?;
        Ok(report)
    }

    /// Blobs, then message documents. Moves no checkpoint: callers are `commit_batch` and
    /// `commit_pop3_batch`, which do that once this returned.
    async fn write_batch(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        batch: &[ReadyMessage],
    ) -> Result<CommitReport, StoreError> {
        let mut report = CommitReport::default();
        let blobs: Vec<&Blob> = {
            let mut seen = HashSet::new();
            batch
                .iter()
                .flat_map(|m| m.parsed.blobs.iter())
                .filter(|b| seen.insert(b.sha256.as_str()))
                .collect()
        };
        report.blobs_written = self.write_blobs(&blobs).await?;

        let stored_at = bson::DateTime::now();
        let docs: Vec<Document> = batch
            .iter()
            .map(|m| message_document(account, mailbox, uidvalidity, m, stored_at))
            .collect();
        let (inserted, replaced) = self.write_messages(docs).await?;
        report.inserted = inserted;
        report.replaced = replaced;
        Ok(report)
    }

    // --- Reading back (export) ------------------------------------------------------------

    /// The stored messages of `account` (optionally one mailbox, optionally arrived on or
    /// after `since`), in (mailbox, uidvalidity, uid) order, without their headers.
    pub async fn export_items(
        &self,
        account: &str,
        mailbox: Option<&str>,
        since: Option<chrono::NaiveDate>,
    ) -> Result<Vec<ExportItem>, StoreError> {
        let mut filter = doc! {"account": account};
        if let Some(m) = mailbox {
            filter.insert("mailbox", m);
        }
        if let Some(day) = since {
            let start =
                bson::DateTime::from_chrono(day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
            // POP3 messages have no INTERNALDATE: their Date header decides
            filter.insert(
                "$or",
                vec![
                    doc! {"internal_date": {"$gte": start}},
                    doc! {"internal_date": Bson::Null, "date": {"$gte": start}},
                ],
            );
        }
        let coll = self.messages.clone();
        let projection = doc! {"headers": 0, "from": 0, "to": 0, "cc": 0, "bcc": 0, "sender": 0, "reply_to": 0, "references": 0};
        let docs: Vec<Document> = self
            .guarded("export query", async move {
                coll.find(filter)
                    .projection(projection)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let mut items: Vec<ExportItem> =
            docs.iter().filter_map(ExportItem::from_document).collect();
        items.sort_by(|a, b| {
            (&a.mailbox, a.uidvalidity, a.uid).cmp(&(&b.mailbox, b.uidvalidity, b.uid))
        });
        Ok(items)
    }

    /// The bytes of a blob, chunk by chunk (each looked up by its exact `_id`).
    pub async fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let files = self.files.clone();
        let id = sha256.to_string();
        let file = self
            .guarded("blob read", async move {
                files.find_one(doc! {"_id": id}).await
            })
            .await?;
        let Some(file) = file else {
            return Err(StoreError::Missing(format!("blob {sha256}")));
        };
        let length = file.get_i64("length").unwrap_or(0).max(0) as usize;
        let chunk_size = file
            .get_i32("chunkSize")
            .unwrap_or(CHUNK_SIZE as i32)
            .max(1) as usize;
        let mut out = Vec::with_capacity(length);
        for n in 0..length.div_ceil(chunk_size) {
            let chunks = self.chunks.clone();
            let id = format!("{sha256}/{n}");
            let chunk = self
                .guarded("blob read", async move {
                    chunks.find_one(doc! {"_id": id}).await
                })
                .await?;
            let data = chunk
                .as_ref()
                .and_then(|c| c.get_binary_generic("data").ok())
                .ok_or_else(|| StoreError::Missing(format!("chunk {n} of blob {sha256}")))?;
            out.extend_from_slice(data);
        }
        if out.len() != length {
            return Err(StoreError::Missing(format!(
                "blob {sha256}: {} of {length} bytes",
                out.len()
            )));
        }
        Ok(out)
    }

    // --- POP3: the UIDL map (collection `pop3_uidl`, one document per account and UIDL) -------

    fn uidl_id(account: &str, uidl: &str) -> String {
        format!("{account}/{uidl}")
    }

    /// Everything the map knows for `account`, by UIDL.
    pub async fn pop3_known(
        &self,
        account: &str,
    ) -> Result<HashMap<String, Pop3Entry>, StoreError> {
        let coll = self.pop3_uidl.clone();
        let account = account.to_string();
        let docs: Vec<Document> = self
            .guarded("UIDL map read", async move {
                coll.find(doc! {"account": account})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let uidl = d.get_str("uidl").ok()?.to_string();
                let uid = d.get_i64("uid").ok()? as u32;
                Some((
                    uidl,
                    Pop3Entry {
                        uid,
                        stored: d.get_bool("stored").unwrap_or(false),
                    },
                ))
            })
            .collect())
    }

    /// Gives each new UIDL its stable uid: a block of numbers is taken from the mailbox's
    /// counter, then the map entries are inserted; a UIDL that already had one keeps it.
    pub async fn pop3_assign(
        &self,
        account: &str,
        uidls: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        let mut out = HashMap::new();
        if uidls.is_empty() {
            return Ok(out);
        }
        let n = uidls.len() as i64;
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, "INBOX");
        let counter = self
            .guarded("uid allocation", async move {
                coll.find_one_and_update(doc! {"_id": id}, doc! {"$inc": {"pop3_next_uid": n}})
                    .upsert(true)
                    .return_document(mongodb::options::ReturnDocument::After)
                    .await
            })
            .await?;
        let top = counter
            .and_then(|d| d.get_i64("pop3_next_uid").ok())
            .unwrap_or(n);
        let first = top - n + 1;
        let now = bson::DateTime::now();
        let docs: Vec<Document> = uidls
            .iter()
            .enumerate()
            .map(|(i, uidl)| {
                doc! {"_id": Self::uidl_id(account, uidl), "account": account, "uidl": uidl, "uid": first + i as i64, "stored": false, "updated_at": now}
            })
            .collect();
        let dups = self
            .insert_ignoring_duplicates(&self.pop3_uidl, docs, "UIDL map insert")
            .await?;
        for (i, uidl) in uidls.iter().enumerate() {
            out.insert(uidl.clone(), (first + i as i64) as u32);
        }
        for i in dups {
            let coll = self.pop3_uidl.clone();
            let id = Self::uidl_id(account, &uidls[i]);
            let existing = self
                .guarded("UIDL map read", async move {
                    coll.find_one(doc! {"_id": id}).await
                })
                .await?;
            if let Some(uid) = existing.and_then(|d| d.get_i64("uid").ok()) {
                out.insert(uidls[i].clone(), uid as u32);
            }
        }
        Ok(out)
    }

    /// Writes a POP3 batch (mailbox `INBOX`, uidvalidity 0), then marks its UIDLs stored: the
    /// POP3 form of the checkpoint rule.
    pub async fn commit_pop3_batch(
        &self,
        account: &str,
        batch: &[ReadyMessage],
        uidls: &[String],
    ) -> Result<CommitReport, StoreError> {
        let report = self.write_batch(account, "INBOX", 0, batch).await?;
        self.pop3_mark(account, uidls, "stored").await?;
        if let Some(top) = batch.iter().map(|m| m.uid).max() {
            let coll = self.mailboxes.clone();
            let id = Self::mailbox_id(account, "INBOX");
            let set = doc! {"account": account, "mailbox": "INBOX", "uidvalidity": 0i64, "updated_at": bson::DateTime::now()};
            self.guarded("checkpoint write", async move {
                coll.update_one(doc! {"_id": id}, doc! {"$set": set, "$max": {"last_uid": top as i64}, "$setOnInsert": {"quarantined": []}})
                    .upsert(true)
                    .await
                    .map(|_| ())
            })
            .await?;
        }
        Ok(report)
    }

    /// Sets `field` (stored / deleted) on the map entries of `uidls`.
    pub async fn pop3_mark(
        &self,
        account: &str,
        uidls: &[String],
        field: &str,
    ) -> Result<(), StoreError> {
        if uidls.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = uidls.iter().map(|u| Self::uidl_id(account, u)).collect();
        let coll = self.pop3_uidl.clone();
        let set = doc! {field: true, "updated_at": bson::DateTime::now()};
        self.guarded("UIDL map write", async move {
            coll.update_many(doc! {"_id": {"$in": ids}}, doc! {"$set": set})
                .await
                .map(|_| ())
        })
        .await
    }

    /// Writes blobs in the GridFS layout: chunks first, then the files document that marks the
    /// blob complete. Blobs larger than one chunk are looked up first and skipped when present;
    /// smaller ones are simply inserted, duplicates ignored.
    async fn write_blobs(&self, blobs: &[&Blob]) -> Result<usize, StoreError> {
        let mut files_docs = Vec::new();
        let mut chunk_docs = Vec::new();
        let mut chunk_bytes = 0usize;
        let mut written = 0;
        for blob in blobs {
            if blob.bytes.len() > CHUNK_SIZE {
                let files = self.files.clone();
                let id = blob.sha256.clone();
                let exists = self
                    .guarded("blob lookup", async move {
                        files.find_one(doc! {"_id": id}).await
                    })
                    .await?;
                if exists.is_some() {
                    continue;
                }
            }
            written += 1;
            let chunks = if blob.bytes.is_empty() {
                Vec::new()
            } else {
                blob.bytes.chunks(CHUNK_SIZE).collect()
            };
            for (n, data) in chunks.into_iter().enumerate() {
                chunk_docs.push(doc! {
                    "_id": format!("{}/{n}", blob.sha256),
                    "files_id": &blob.sha256,
                    "n": n as i32,
                    "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: data.to_vec() },
                });
                chunk_bytes += data.len();
                // Bounded memory: a 50 MB message is written a few MiB at a time, not copied
                // into chunk documents all at once.
                if chunk_bytes >= CHUNK_GROUP_BYTES {
                    self.insert_ignoring_duplicates(
                        &self.chunks,
                        std::mem::take(&mut chunk_docs),
                        "blob chunks",
                    )
                    .await?;
                    chunk_bytes = 0;
                }
            }
            files_docs.push(doc! {
                "_id": &blob.sha256,
                "length": blob.bytes.len() as i64,
                "chunkSize": CHUNK_SIZE as i32,
                "uploadDate": bson::DateTime::now(),
                "filename": &blob.sha256,
            });
        }
        self.insert_ignoring_duplicates(&self.chunks, chunk_docs, "blob chunks")
            .await?;
        self.insert_ignoring_duplicates(&self.files, files_docs, "blob files")
            .await?;
        Ok(written)
    }

    /// `insert_many` (unordered); duplicate-key failures are fine, their indexes are returned.
    async fn insert_ignoring_duplicates(
        &self,
        coll: &Collection<Document>,
        docs: Vec<Document>,
        what: &str,
    ) -> Result<Vec<usize>, StoreError> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        let coll = coll.clone();
        let result = self
            .guarded(what, async move {
                match coll.insert_many(docs).ordered(false).await {
                    Ok(_) => Ok(Vec::new()),
                    Err(e) => duplicate_indexes(&e).ok_or(e),
                }
            })
            .await?;
        Ok(result)
    }

    async fn write_messages(&self, docs: Vec<Document>) -> Result<(usize, usize), StoreError> {
        let total = docs.len();
        let keep = docs.clone();
        let dups = self
            .insert_ignoring_duplicates(&self.messages, docs, "message insert")
            .await?;
        // A replayed batch: rewrite the documents that were already there.
        for i in &dups {
            let mut doc = keep[*i].clone();
            doc.remove("_id");
            let filter = doc! {
                "account": doc.get("account").cloned().unwrap_or(Bson::Null),
                "mailbox": doc.get("mailbox").cloned().unwrap_or(Bson::Null),
                "uidvalidity": doc.get("uidvalidity").cloned().unwrap_or(Bson::Null),
                "uid": doc.get("uid").cloned().unwrap_or(Bson::Null),
            };
            let coll = self.messages.clone();
            self.guarded("message replace", async move {
                coll.replace_one(filter, doc).upsert(true).await.map(|_| ())
            })
            .await?;
        }
        Ok((total - dups.len(), dups.len()))
    }
}

/// For an insert_many that failed only on duplicate keys: the indexes of the duplicates.
fn duplicate_indexes(err: &mongodb::error::Error) -> Option<Vec<usize>> {
    use mongodb::error::ErrorKind;
    match err.kind.as_ref() {
        ErrorKind::InsertMany(e) if e.write_concern_error.is_none() => {
            let errors = e.write_errors.as_ref()?;
            if errors.iter().all(|w| w.code == DUPLICATE_KEY) {
                Some(errors.iter().map(|w| w.index).collect())
            } else {
                None
            }
        }
        _ => None,
    }
}

fn to_bson<T: serde::Serialize>(value: &T) -> Bson {
    // Serializing plain structs of strings and numbers cannot fail.
    bson::to_bson(value).unwrap_or(Bson::Null)
}

fn opt_date(d: Option<DateTime<Utc>>) -> Bson {
    d.map(|d| Bson::DateTime(bson::DateTime::from_chrono(d)))
        .unwrap_or(Bson::Null)
}

fn opt_string(s: &Option<String>) -> Bson {
    s.as_ref()
        .map(|s| Bson::String(s.clone()))
        .unwrap_or(Bson::Null)
}

/// The `messages` document (PRODUCT.md, "What lands in MongoDB").
pub fn message_document(
    account: &str,
    mailbox: &str,
    uidvalidity: u32,
    m: &ReadyMessage,
    stored_at: bson::DateTime,
) -> Document {
    let p = &m.parsed;
    let mut d = doc! {
        "_id": format!("{account}/{mailbox}/{uidvalidity}/{}", m.uid),
        "account": account,
        "mailbox": mailbox,
        "uidvalidity": uidvalidity as i64,
        "uid": m.uid as i64,
        "flags": &m.flags,
        "internal_date": opt_date(m.internal_date.map(|d| d.with_timezone(&Utc))),
        "size": m.size as i64,
        "message_id": opt_string(&p.message_id),
        "in_reply_to": &p.in_reply_to,
        "references": &p.references,
        "subject": opt_string(&p.subject),
        "date": opt_date(p.date),
        "from": to_bson(&p.from),
        "sender": to_bson(&p.sender),
        "reply_to": to_bson(&p.reply_to),
        "to": to_bson(&p.to),
        "cc": to_bson(&p.cc),
        "bcc": to_bson(&p.bcc),
        "headers": to_bson(&p.headers),
        "text": opt_string(&p.text),
        "html": opt_string(&p.html),
        "attachments": to_bson(&p.attachments),
        "raw": to_bson(&p.raw),
        "parse_errors": &p.parse_errors,
        "stored_at": stored_at,
    };
    if let Some(r) = &p.text_blob {
        d.insert("text_blob", to_bson(r));
    }
    if let Some(r) = &p.html_blob {
        d.insert("html_blob", to_bson(r));
    }
    d
}
