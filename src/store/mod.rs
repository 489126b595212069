//! The store: the only user of the mongodb crate. Writes messages, content-addressed blobs
//! (GridFS layout, bucket `blobs`) and the per-mailbox checkpoints in `mailboxes`.
//!
//! This file owns the [`Store`] handle: connecting (with the configured write concern), the
//! indexes, scoped handles and [`Store::settle`], the guarded driver calls, errors and shutdown.
//! The collections each have their own file:
//! - `messages`: message documents and [`Store::commit_batch`], the checkpoint rule;
//! - `blobs`: GridFS chunks and files, written and read back;
//! - `mailboxes`: checkpoints, failure counts, the quarantine, the state for readers;
//! - `mirror`: what changes after a message was stored: flags, expunges, moves, and the
//!   sweep of blobs nothing refers to any more;
//! - `pop3`: the POP3 UIDL map (`pop3_uidl`);
//! - `leases`: `[cluster]`'s leases and replicas, and the fence on `mailboxes`;
//! - `reads`: what `export` and `status` read.
//!
//! **Invariant (the checkpoint rule):** `last_uid` moves only in [`Store::commit_batch`], after
//! every blob and every message document of the batch has been acknowledged.
//!
//! **Invariant:** every write is idempotent. Blobs are keyed by their SHA-256 and chunks by
//! `sha/n`; messages by `account/mailbox/uidvalidity/uid` (plus a unique index on those four
//! fields); a replayed batch rewrites the same documents.
//!
//! Driver futures are never cancelled mid-flight (docs/crates.md): each operation runs in its
//! own task and the timeout is put on its JoinHandle.

mod blobs;
mod leases;
mod mailboxes;
mod messages;
mod mirror;
mod pop3;
mod reads;

pub use blobs::CHUNK_SIZE;
pub use leases::{InstanceView, LeaseView, Taken};
pub use mailboxes::{Checkpoint, FailureCount, FolderRecord, MailboxRecord, MailboxStatus};
pub use messages::{message_document, minimal_document, CommitReport, GmailIds, ReadyMessage};
pub use mirror::{FlagChange, StoredMeta, SweepReport};
pub use pop3::Pop3Entry;
pub use reads::{ExportCursor, ExportItem, ExportRaw, MailboxSummary, EXPORT_QUEUE};

use std::future::Future;
use std::time::Duration;

use bson::{doc, Document};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};

use crate::config::StoreConfig;
use crate::error::ErrorClass;

const DUPLICATE_KEY: i32 = 11000;

/// Whether one write failed on a unique index (an upsert that met a concurrent insert, or a
/// fenced upsert refused by a newer seal).
fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

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
    /// Another writer holds what this write needs (a blob being swept): try again shortly.
    #[error("busy: {0}")]
    Busy(String),
    /// A newer lease sealed this mailbox: this replica's lease was taken over (`[cluster]`).
    #[error(
        "{what} refused: the mailbox's lease was taken over (this replica held token {token})"
    )]
    Fenced { what: String, token: i64 },
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Retry
    }

    /// The write was refused by the lease fence: the mailbox is another replica's now.
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
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

/// The fence checks a fenced handle passed recently (`Store::fenced`).
#[derive(Debug, Default)]
struct Gate {
    fresh: Duration,
    passed: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
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
    /// Digests of messages expunged in the last hour, by account (`store::mirror`: MOVE links).
    recent_expunges: Collection<Document>,
    /// Blobs of removed documents, the only ones the sweep looks at (`store::mirror`).
    blob_candidates: Collection<Document>,
    leases: Collection<Document>,
    instances: Collection<Document>,
    /// The lease token this handle's checkpoint-bearing writes carry (`[cluster]`).
    fence: Option<i64>,
    /// When the fence last passed a check, per mailbox (`Store::fenced`).
    gate: Option<std::sync::Arc<Gate>>,
    files: Collection<Document>,
    chunks: Collection<Document>,
    op_timeout: Duration,
    /// `[store] on_expunge`.
    pub on_expunge: crate::config::OnExpunge,
}

impl Store {
    /// Connects, pings (so a wrong URI fails fast) and creates the indexes.
    pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let store = Self::connect_read_only(cfg).await?;
        store.create_indexes().await?;
        Ok(store)
    }

    /// Connects and pings, and writes nothing (not even the indexes): for readers such as
    /// `status`, which may run beside the daemon with a read-only user.
    pub async fn connect_read_only(cfg: &StoreConfig) -> Result<Store, StoreError> {
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
            recent_expunges: db.collection("recent_expunges"),
            blob_candidates: db.collection("blob_candidates"),
            leases: db.collection("leases"),
            instances: db.collection("instances"),
            fence: None,
            gate: None,
            files: db.collection("blobs.files"),
            chunks: db.collection("blobs.chunks"),
            inflight: Default::default(),
            client,
            op_timeout: cfg.op_timeout.max(cfg.connect_timeout),
            on_expunge: cfg.on_expunge,
        };
        let db2 = db.clone();
        store
            .guarded("ping", async move {
                db2.run_command(doc! {"ping": 1}).await.map(|_| ())
            })
            .await?;
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
            // For readers that poll for changes (README, "Following changes"), for verify's
            // digests and the move links.
            // (every index costs each insert: the two fields most documents never get are
            // partial, so they cost nothing until a message changes)
            for key in ["stored_at", "raw.sha256"] {
                messages
                    .create_index(IndexModel::builder().keys(doc! {key: 1}).build())
                    .await?;
            }
            for key in ["flags_updated_at", "expunged_at"] {
                messages
                    .create_index(
                        IndexModel::builder()
                            .keys(doc! {key: 1})
                            .options(
                                IndexOptions::builder()
                                    .partial_filter_expression(doc! {key: {"$exists": true}})
                                    .build(),
                            )
                            .build(),
                    )
                    .await?;
            }

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

    /// Ends the client, waiting at most `within`. Drop every cursor first (only an
    /// [`ExportCursor`]'s task keeps one, and it ends once that is dropped or exhausted).
    pub async fn shutdown(self, within: Duration) {
        let _ = tokio::time::timeout(within, self.client.shutdown()).await;
    }

    fn mailbox_id(account: &str, mailbox: &str) -> String {
        format!("{account}/{mailbox}")
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

/// For tests against the MongoDB-protocol server of the test run: the default store settings
/// on a database of this process's own, named `prefix_<pid>` (each test drops it at its end).
#[cfg(test)]
pub(crate) fn test_config(
    prefix: &str,
    on_expunge: crate::config::OnExpunge,
    blob_sweep_after: Duration,
) -> StoreConfig {
    let uri = std::env::var("MAILPUMP_TEST_MONGODB_URI")
        .expect("MAILPUMP_TEST_MONGODB_URI must point at a MongoDB (deploy/test.sh starts one)");
    StoreConfig {
        uri: crate::config::Secret::new(uri),
        database: format!("{prefix}_{}", std::process::id()),
        connect_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(60),
        max_inline_body: 1024 * 1024,
        inline_raw_max: crate::parse::DEFAULT_INLINE_RAW,
        write_concern: Default::default(),
        on_expunge,
        blob_sweep_after,
    }
}
