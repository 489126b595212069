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
    #[error("the database answered nonsense: {0}")]
    Protocol(String),
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Retry
    }
}

/// Whether `err` is about the documents sent (too large, invalid) rather than the database
/// being unreachable or busy: such an error is never retried as if the database were down.
fn is_document_error(err: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    match err.kind.as_ref() {
        ErrorKind::BsonSerialization(_) | ErrorKind::InvalidArgument { .. } => true,
        ErrorKind::Command(c) => DOCUMENT_CODES.contains(&c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => {
            DOCUMENT_CODES.contains(&w.code)
        }
        _ => false,
    }
}

/// Command-level codes that are about the document (BSONObjectTooLarge, BadValue, InvalidBSON,
/// DocumentValidationFailure, field-name problems, KeyTooLong).
const DOCUMENT_CODES: &[i32] = &[2, 14, 22, 52, 55, 56, 57, 121, 10334, 17280, 17419];

/// A document's encoded size (0 if it cannot be encoded; the write will say why).
pub fn encoded_size(d: &Document) -> usize {
    bson::to_vec(d).map(|v| v.len()).unwrap_or(0)
}

/// MongoDB refuses documents above 16 MiB; a message document stays under this.
pub const MAX_DOCUMENT_BYTES: usize = 15 * 1024 * 1024;

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

/// What `mailboxes` remembers of one mailbox besides the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct MailboxRecord {
    pub checkpoint: Option<Checkpoint>,
    /// (uidvalidity, uid) of UIDs with failed fetches counted against them.
    pub failing: HashSet<(u32, u32)>,
    /// The quarantine: (uidvalidity, uid, reason).
    pub quarantined: Vec<(u32, u32, String)>,
    /// When the quarantined UIDs were last tried again.
    pub quarantine_retried_at: Option<DateTime<Utc>>,
}

impl MailboxRecord {
    /// The quarantined UIDs under `uidvalidity`.
    pub fn quarantined_uids(&self, uidvalidity: u32) -> Vec<u32> {
        self.quarantined
            .iter()
            .filter(|(v, _, _)| *v == uidvalidity)
            .map(|(_, u, _)| *u)
            .collect()
    }
}

/// One counted failure of a UID: how many sessions it failed in, and since when.
#[derive(Debug, Clone, Copy)]
pub struct FailureCount {
    pub sessions: u32,
    pub since: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Store {
    /// Held (shared) by every driver operation of this scope while it runs, even after its
    /// caller gave up waiting: [`Store::settle`] takes it exclusively to wait for them.
    inflight: std::sync::Arc<tokio::sync::RwLock<()>>,
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
        options.write_concern = Some(
            mongodb::options::WriteConcern::builder()
                .w(match &cfg.write_concern.w {
                    crate::config::WriteAck::Majority => mongodb::options::Acknowledgment::Majority,
                    crate::config::WriteAck::Nodes(n) => {
                        mongodb::options::Acknowledgment::Nodes(*n)
                    }
                    crate::config::WriteAck::Tag(t) => {
                        mongodb::options::Acknowledgment::Custom(t.clone())
                    }
                })
                .journal(cfg.write_concern.journal)
                .w_timeout(cfg.op_timeout)
                .build(),
        );
        let client = Client::with_options(options)?;
        let db = client.database(&cfg.database);
        let store = Store {
            messages: db.collection("messages"),
            mailboxes: db.collection("mailboxes"),
            pop3_uidl: db.collection("pop3_uidl"),
            files: db.collection("blobs.files"),
            chunks: db.collection("blobs.chunks"),
            inflight: Default::default(),
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

    /// A handle on the same database whose operations [`Store::settle`] waits for apart from
    /// every other scope's: one per mailbox task.
    pub fn scoped(&self) -> Store {
        Store {
            inflight: Default::default(),
            ..self.clone()
        }
    }

    /// Waits until no operation of this scope is running any more, including operations whose
    /// caller timed out (the driver's futures are never cancelled, so a write that timed out
    /// may still land). A mailbox calls this before each session, so that a late write of the
    /// last session can never land after the next one started.
    pub async fn settle(&self) {
        if self.inflight.try_write().is_ok() {
            return;
        }
        let started = std::time::Instant::now();
        tracing::warn!("waiting_for_earlier_writes");
        let _ = self.inflight.write().await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "earlier_writes_ended"
        );
    }

    /// Runs `op` in its own task and waits at most `op_timeout` for it. The task holds this
    /// scope's in-flight lock until the operation really ended.
    async fn guarded<T, F>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, mongodb::error::Error>> + Send + 'static,
    {
        let running = self.inflight.clone().read_owned().await;
        let handle = tokio::spawn(async move {
            let _running = running;
            op.await
        });
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

    /// Ends the client, waiting at most `within`. Drop every cursor first (nothing here keeps
    /// one open).
    pub async fn shutdown(self, within: Duration) {
        let _ = tokio::time::timeout(within, self.client.shutdown()).await;
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
        Ok(self.mailbox_record(account, mailbox).await?.checkpoint)
    }

    /// The checkpoint, the UIDs with counted failures and the quarantine of a mailbox.
    pub async fn mailbox_record(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<MailboxRecord, StoreError> {
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        let found = self
            .guarded("checkpoint read", async move {
                coll.find_one(doc! {"_id": id}).await
            })
            .await?;
        let Some(d) = found else {
            return Ok(MailboxRecord::default());
        };
        let checkpoint = (|| {
            Some(Checkpoint {
                uidvalidity: d.get_i64("uidvalidity").ok()? as u32,
                last_uid: d.get_i64("last_uid").ok()? as u32,
            })
        })();
        let failing = d
            .get_document("failures")
            .map(|f| f.keys().filter_map(|k| parse_failure_key(k)).collect())
            .unwrap_or_default();
        let quarantined = d
            .get_array("quarantined")
            .map(|list| {
                list.iter()
                    .filter_map(|e| {
                        let e = e.as_document()?;
                        Some((
                            // entries written before uidvalidity was recorded: the current one
                            e.get_i64("uidvalidity")
                                .map(|v| v as u32)
                                .unwrap_or(checkpoint.map(|c| c.uidvalidity).unwrap_or(0)),
                            e.get_i64("uid").ok()? as u32,
                            e.get_str("reason").unwrap_or("").to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(MailboxRecord {
            checkpoint,
            failing,
            quarantined,
            quarantine_retried_at: d
                .get_datetime("quarantine_retried_at")
                .ok()
                .map(|t| t.to_chrono()),
        })
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

    /// Counts one more session in which `uid` (under `uidvalidity`) failed; returns how many
    /// sessions it has failed in and since when.
    pub async fn record_failure(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uid: u32,
        reason: &str,
    ) -> Result<FailureCount, StoreError> {
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        let key = failure_key(uidvalidity, uid);
        let field = format!("failures.{key}");
        let reason = reason.to_string();
        let now = bson::DateTime::now();
        let updated = self
            .guarded("failure count", async move {
                coll.find_one_and_update(
                    doc! {"_id": id},
                    doc! {
                        "$inc": {format!("{field}.sessions"): 1i64},
                        "$min": {format!("{field}.first_at"): now},
                        "$set": {format!("{field}.last_at"): now, format!("{field}.reason"): &reason, "last_error": &reason},
                    },
                )
                .upsert(true)
                .return_document(mongodb::options::ReturnDocument::After)
                .await
            })
            .await?;
        let entry = updated
            .as_ref()
            .and_then(|d| d.get_document("failures").ok())
            .and_then(|f| f.get_document(&key).ok());
        Ok(FailureCount {
            sessions: entry
                .and_then(|e| e.get("sessions"))
                .and_then(|v| v.as_i64().or_else(|| v.as_i32().map(i64::from)))
                .unwrap_or(1)
                .clamp(0, u32::MAX as i64) as u32,
            since: entry
                .and_then(|e| e.get_datetime("first_at").ok())
                .map(|d| d.to_chrono())
                .unwrap_or_else(Utc::now),
        })
    }

    /// Forgets the failures counted against `uids`: they were fetched after all.
    pub async fn clear_failures(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<(), StoreError> {
        if uids.is_empty() {
            return Ok(());
        }
        let mut unset = Document::new();
        for uid in uids {
            unset.insert(format!("failures.{}", failure_key(uidvalidity, *uid)), "");
        }
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        self.guarded("failure reset", async move {
            coll.update_one(doc! {"_id": id}, doc! {"$unset": unset})
                .await
                .map(|_| ())
        })
        .await
    }

    /// Records `uid` (under `uidvalidity`) as quarantined (skipped by catch-ups, retried on its
    /// own) with its reason, and forgets its failure count.
    pub async fn quarantine(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uid: u32,
        reason: &str,
    ) -> Result<(), StoreError> {
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        let entry = doc! {"uidvalidity": uidvalidity as i64, "uid": uid as i64, "reason": reason, "at": bson::DateTime::now()};
        let failure = format!("failures.{}", failure_key(uidvalidity, uid));
        self.guarded("quarantine", async move {
            coll.update_one(
                doc! {"_id": &id, "quarantined": {"$not": {"$elemMatch": {"uidvalidity": uidvalidity as i64, "uid": uid as i64}}}},
                doc! {"$push": {"quarantined": entry}},
            )
            .upsert(false)
            .await?;
            coll.update_one(doc! {"_id": &id}, doc! {"$unset": {failure: ""}})
                .await
                .map(|_| ())
        })
        .await
    }

    /// Notes that the quarantine was just tried again.
    pub async fn mark_quarantine_retried(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<(), StoreError> {
        let set = doc! {"quarantine_retried_at": bson::DateTime::now()};
        self.upsert_mailbox(
            Self::mailbox_id(account, mailbox),
            set,
            "quarantine retry mark",
        )
        .await
    }

    /// Takes `uids` out of the quarantine (stored after all, or gone from the server).
    pub async fn release_quarantined(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<(), StoreError> {
        if uids.is_empty() {
            return Ok(());
        }
        let coll = self.mailboxes.clone();
        let id = Self::mailbox_id(account, mailbox);
        let uids: Vec<i64> = uids.iter().map(|u| *u as i64).collect();
        self.guarded("quarantine release", async move {
            // entries from before uidvalidity was recorded carry none: they are the current one's
            coll.update_one(
                doc! {"_id": id},
                doc! {"$pull": {"quarantined": {"uid": {"$in": uids}, "$or": [{"uidvalidity": uidvalidity as i64}, {"uidvalidity": {"$exists": false}}]}}},
            )
            .await
            .map(|_| ())
        })
        .await
    }

    /// Writes messages that sit at or below the checkpoint (quarantined UIDs that could be
    /// fetched after all). Moves no checkpoint: they are below it already.
    pub async fn commit_below_checkpoint(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        batch: &[ReadyMessage],
    ) -> Result<CommitReport, StoreError> {
        self.write_batch(account, mailbox, uidvalidity, batch).await
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
            let uidl = uidls.get(i).ok_or_else(|| {
                StoreError::Protocol(format!("a write error for UIDL {i} of {}", uidls.len()))
            })?;
            let coll = self.pop3_uidl.clone();
            let id = Self::uidl_id(account, uidl);
            let existing = self
                .guarded("UIDL map read", async move {
                    coll.find_one(doc! {"_id": id}).await
                })
                .await?;
            if let Some(uid) = existing.and_then(|d| d.get_i64("uid").ok()) {
                out.insert(uidl.clone(), uid as u32);
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

    /// Inserts message documents; a replayed batch rewrites the ones already there. A document
    /// the database refuses for what it is (too large, invalid) is replaced by its minimal form
    /// (identity, raw, the error), so that one message never blocks its mailbox.
    async fn write_messages(&self, docs: Vec<Document>) -> Result<(usize, usize), StoreError> {
        if docs.is_empty() {
            return Ok((0, 0));
        }
        let total = docs.len();
        // Never send what MongoDB must refuse: parse keeps documents far below the limit, but the
        // server supplies the flags.
        let docs: Vec<Document> = docs
            .into_iter()
            .map(|d| {
                let size = encoded_size(&d);
                if size > MAX_DOCUMENT_BYTES {
                    minimal_document(&d, &format!("the parsed document ({size} bytes) exceeds MongoDB's limit: stored raw only"))
                } else {
                    d
                }
            })
            .collect();
        let keep = docs.clone();
        let coll = self.messages.clone();
        let outcome = self
            .guarded("message insert", async move {
                match coll.insert_many(docs).ordered(false).await {
                    Ok(_) => Ok(Ok((Vec::new(), Vec::new()))),
                    Err(e) => match classify_insert_many(&e) {
                        Some(split) => Ok(Ok(split)),
                        None if is_document_error(&e) => Ok(Err(e.to_string())),
                        None => Err(e),
                    },
                }
            })
            .await?;
        let (dups, refused) = match outcome {
            Ok(split) => split,
            // The whole batch was refused for a document in it: find which, one by one.
            Err(why) => {
                tracing::warn!(count = keep.len(), error = %why, "batch_refused_per_document");
                let mut replaced = 0;
                for d in &keep {
                    replaced += self.write_one(d.clone()).await? as usize;
                }
                return Ok((total - replaced, replaced));
            }
        };
        let mut replaced = 0;
        for i in &dups {
            let doc = keep.get(*i).ok_or_else(|| {
                StoreError::Protocol(format!("a write error for document {i} of {}", keep.len()))
            })?;
            self.write_one(doc.clone()).await?;
            replaced += 1;
        }
        for (i, why) in &refused {
            let doc = keep.get(*i).ok_or_else(|| {
                StoreError::Protocol(format!("a write error for document {i} of {}", keep.len()))
            })?;
            tracing::warn!(id = doc.get_str("_id").unwrap_or(""), error = %why, "document_refused");
            self.write_one(minimal_document(
                doc,
                &format!("MongoDB refused the parsed document ({why}): stored raw only"),
            ))
            .await?;
        }
        Ok((total - replaced, replaced))
    }

    /// Writes (inserts or replaces, by `_id`) one message document, falling back to its minimal
    /// form when the database refuses the document itself. Returns whether it was there before.
    async fn write_one(&self, doc: Document) -> Result<bool, StoreError> {
        let mut current = doc;
        for attempt in 0..2 {
            let id = current.get("_id").cloned().unwrap_or(Bson::Null);
            let coll = self.messages.clone();
            let d = current.clone();
            let result = self
                .guarded("message replace", async move {
                    match coll.replace_one(doc! {"_id": id}, d).upsert(true).await {
                        Ok(r) => Ok(Ok(r.matched_count > 0)),
                        Err(e) if is_document_error(&e) => Ok(Err(e.to_string())),
                        Err(e) => Err(e),
                    }
                })
                .await?;
            match result {
                Ok(existed) => return Ok(existed),
                Err(why) if attempt == 0 => {
                    tracing::warn!(id = current.get_str("_id").unwrap_or(""), error = %why, "document_refused");
                    current = minimal_document(
                        &current,
                        &format!("MongoDB refused the parsed document ({why}): stored raw only"),
                    );
                }
                Err(why) => {
                    return Err(StoreError::Protocol(format!(
                        "even the minimal document was refused: {why}"
                    )))
                }
            }
        }
        Ok(false)
    }
}

/// The key of one UID's failure count inside `mailboxes.failures`.
fn failure_key(uidvalidity: u32, uid: u32) -> String {
    format!("{uidvalidity}-{uid}")
}

fn parse_failure_key(key: &str) -> Option<(u32, u32)> {
    let (v, u) = key.split_once('-')?;
    Some((v.parse().ok()?, u.parse().ok()?))
}

/// The document a message gets when its parsed form cannot be stored: its identity, the raw
/// bytes' reference and the reason; every parsed field empty. Its raw blob is already written.
pub fn minimal_document(full: &Document, reason: &str) -> Document {
    let mut d = Document::new();
    for key in [
        "_id",
        "account",
        "mailbox",
        "uidvalidity",
        "uid",
        "internal_date",
        "size",
        "raw",
    ] {
        d.insert(key, full.get(key).cloned().unwrap_or(Bson::Null));
    }
    let flags = full.get_array("flags").ok().filter(|f| {
        f.iter()
            .map(|v| v.as_str().map_or(0, str::len) + 16)
            .sum::<usize>()
            < 64 * 1024
    });
    d.insert("flags", flags.cloned().unwrap_or_default());
    for key in ["message_id", "subject", "date", "text", "html"] {
        d.insert(key, Bson::Null);
    }
    for key in [
        "in_reply_to",
        "references",
        "from",
        "sender",
        "reply_to",
        "to",
        "cc",
        "bcc",
        "headers",
        "attachments",
    ] {
        d.insert(key, Bson::Array(Vec::new()));
    }
    d.insert("parse_errors", vec![reason.to_string()]);
    d.insert(
        "stored_at",
        full.get("stored_at")
            .cloned()
            .unwrap_or_else(|| Bson::DateTime(bson::DateTime::now())),
    );
    d
}

/// The documents an insert_many could not write, by index: duplicates, and documents refused for
/// what they are (with the reason).
type Split = (Vec<usize>, Vec<(usize, String)>);

/// For an insert_many that failed on some documents only, which ones and why. None when the
/// failure is the database's.
fn classify_insert_many(err: &mongodb::error::Error) -> Option<Split> {
    use mongodb::error::ErrorKind;
    match err.kind.as_ref() {
        ErrorKind::InsertMany(e) if e.write_concern_error.is_none() => {
            let errors = e.write_errors.as_ref()?;
            // Only codes known to be about the document itself are taken as such; anything else
            // (WriteConflict, LockTimeout, disk full, ...) is the database's and retried.
            if errors
                .iter()
                .any(|w| w.code != DUPLICATE_KEY && !DOCUMENT_CODES.contains(&w.code))
            {
                return None;
            }
            let dups = errors
                .iter()
                .filter(|w| w.code == DUPLICATE_KEY)
                .map(|w| w.index)
                .collect();
            let refused = errors
                .iter()
                .filter(|w| w.code != DUPLICATE_KEY)
                .map(|w| (w.index, format!("code {}: {}", w.code, w.message)))
                .collect();
            Some((dups, refused))
        }
        _ => None,
    }
}

/// For an insert_many that failed only on duplicate keys: the indexes of the duplicates.
fn duplicate_indexes(err: &mongodb::error::Error) -> Option<Vec<usize>> {
    classify_insert_many(err)
        .filter(|(_, refused)| refused.is_empty())
        .map(|(dups, _)| dups)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse, Limits};

    fn ready(uid: u32, flags: Vec<String>) -> ReadyMessage {
        let raw = format!("Subject: m{uid}\r\nMessage-ID: <m{uid}@x>\r\n\r\nhi\r\n").into_bytes();
        ReadyMessage {
            uid,
            flags,
            internal_date: None,
            size: raw.len() as u64,
            parsed: parse(raw, Limits::default()),
        }
    }

    #[test]
    fn the_minimal_document_keeps_identity_and_raw_and_drops_a_flood_of_flags() {
        let flags: Vec<String> = (0..2_000_000).map(|i| format!("$flag{i}")).collect();
        let m = ready(7, flags);
        let full = message_document("a", "INBOX", 3, &m, bson::DateTime::now());
        assert!(encoded_size(&full) > MAX_DOCUMENT_BYTES);
        let min = minimal_document(&full, "too large");
        assert!(encoded_size(&min) < 64 * 1024);
        assert_eq!(min.get_str("_id").unwrap(), "a/INBOX/3/7");
        assert_eq!(
            min.get_document("raw").unwrap(),
            full.get_document("raw").unwrap()
        );
        assert_eq!(min.get_array("parse_errors").unwrap().len(), 1);
        assert!(min.get_array("flags").unwrap().is_empty());
    }

    /// Against the MongoDB-protocol server of the test run: a document MongoDB must refuse
    /// (the server sent two million flags) is stored in its minimal form beside its neighbours,
    /// instead of failing the batch for ever.
    #[tokio::test]
    async fn a_document_the_database_must_refuse_is_stored_minimal_and_the_batch_goes_on() {
        let uri = std::env::var("MAILPUMP_TEST_MONGODB_URI").expect(
            "MAILPUMP_TEST_MONGODB_URI must point at a MongoDB (deploy/test.sh starts one)",
        );
        let cfg = crate::config::StoreConfig {
            uri: crate::config::Secret::new(uri),
            database: format!("mp_unit_{}", std::process::id()),
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(60),
            max_inline_body: 1024 * 1024,
            write_concern: Default::default(),
        };
        let store = Store::connect(&cfg).await.unwrap();
        let flood: Vec<String> = (0..2_000_000).map(|i| format!("$flag{i}")).collect();
        let batch = vec![
            ready(1, vec![]),
            ready(2, flood),
            ready(3, vec!["\\Seen".into()]),
        ];
        let r = store
            .commit_batch("a", "INBOX", 1, MailboxStatus::default(), &batch, 3)
            .await
            .unwrap();
        assert_eq!(r.inserted, 3);
        let coll = store.messages.clone();
        let two = coll
            .find_one(doc! {"uid": 2i64, "account": "a"})
            .await
            .unwrap()
            .unwrap();
        let errors = two.get_array("parse_errors").unwrap();
        assert!(
            errors[0].as_str().unwrap().contains("stored raw only"),
            "{errors:?}"
        );
        assert_eq!(
            store
                .checkpoint("a", "INBOX")
                .await
                .unwrap()
                .unwrap()
                .last_uid,
            3
        );
        // replaying the batch rewrites, never duplicates
        let r = store
            .commit_batch("a", "INBOX", 1, MailboxStatus::default(), &batch, 3)
            .await
            .unwrap();
        assert_eq!((r.inserted, r.replaced), (0, 3));
        let _ = store.client.database(&cfg.database).drop().await;
    }
}
