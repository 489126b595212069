//! Reading back: what `export` streams out of `messages`, and what `status` reads of
//! `mailboxes`. Reads only: nothing here writes.
//!
//! **Invariant:** an export holds at most one cursor batch plus [`EXPORT_QUEUE`] documents in
//! memory, whatever the size of the account: [`ExportCursor`] streams from a MongoDB cursor.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use tokio::sync::mpsc;

use super::{Store, StoreError};

/// Documents per cursor batch of an export (the server also caps a batch at 16 MiB).
const EXPORT_BATCH: u32 = 16;
/// Documents read ahead of the export's writers.
pub const EXPORT_QUEUE: usize = 4;

/// What `export` needs of one stored message.
#[derive(Debug, Clone)]
pub struct ExportItem {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub raw: ExportRaw,
    pub text: Option<String>,
    pub html: Option<String>,
    pub text_blob: Option<String>,
    pub html_blob: Option<String>,
    /// (filename, content_type, sha256) of each attachment, in document order.
    pub attachments: Vec<(Option<String>, String, String)>,
}

/// Where an exported message's raw bytes are.
#[derive(Debug, Clone)]
pub enum ExportRaw {
    /// In the document (`raw.data`).
    Inline(Vec<u8>),
    /// In the `blobs` bucket under this SHA-256 (`raw.blob`: large messages, and every
    /// document written before raw bytes were stored inline).
    Blob(String),
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
            raw: match d.get_document("raw").ok()?.get_binary_generic("data") {
                Ok(data) => ExportRaw::Inline(data.clone()),
                Err(_) => ExportRaw::Blob(blob_of("raw")?),
            },
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

impl Store {
    /// The filter of an export: `account`, optionally one mailbox, optionally messages that
    /// arrived on or after `since`.
    fn export_filter(
        account: &str,
        mailbox: Option<&str>,
        since: Option<chrono::NaiveDate>,
    ) -> Document {
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
        filter
    }

    /// How many messages [`Store::export_items`] will stream (the same filter).
    pub async fn export_count(
        &self,
        account: &str,
        mailbox: Option<&str>,
        since: Option<chrono::NaiveDate>,
    ) -> Result<u64, StoreError> {
        let coll = self.messages.clone();
        let filter = Self::export_filter(account, mailbox, since);
        self.guarded(
            "export count",
            async move { coll.count_documents(filter).await },
        )
        .await
    }

    /// The stored messages of `account` (optionally one mailbox, optionally arrived on or
    /// after `since`), in (mailbox, uidvalidity, uid) order, without their headers, streamed
    /// from a cursor (the unique index serves the order).
    ///
    /// The cursor lives in its own task, which holds this scope's in-flight lock and is never
    /// cancelled mid-call: it ends after its current read once the [`ExportCursor`] is dropped.
    pub fn export_items(
        &self,
        account: &str,
        mailbox: Option<&str>,
        since: Option<chrono::NaiveDate>,
    ) -> ExportCursor {
        let coll = self.messages.clone();
        let filter = Self::export_filter(account, mailbox, since);
        let projection = doc! {"headers": 0, "from": 0, "to": 0, "cc": 0, "bcc": 0, "sender": 0, "reply_to": 0, "references": 0};
        let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
        let inflight = self.inflight.clone();
        tokio::spawn(async move {
            let _running = inflight.read_owned().await;
            let cursor = coll
                .find(filter)
                .projection(projection)
                .sort(doc! {"mailbox": 1, "uidvalidity": 1, "uid": 1})
                .batch_size(EXPORT_BATCH)
                .await;
            let mut cursor = match cursor {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Some(Err(e))).await;
                    return;
                }
            };
            loop {
                let next = cursor.try_next().await;
                let end = !matches!(next, Ok(Some(_)));
                // a dropped reader: stop after this read
                if tx.send(next.transpose()).await.is_err() || end {
                    return;
                }
            }
        });
        ExportCursor {
            rx,
            timeout: self.op_timeout,
        }
    }

    /// Accounts with anything in the database: a message or a `mailboxes` document.
    pub async fn stored_accounts(&self) -> Result<BTreeSet<String>, StoreError> {
        self.distinct_everywhere("account", doc! {}).await
    }

    /// Mailboxes of `account` with anything in the database.
    pub async fn stored_mailboxes(&self, account: &str) -> Result<BTreeSet<String>, StoreError> {
        self.distinct_everywhere("mailbox", doc! {"account": account})
            .await
    }

    /// The distinct string values of `field` under `filter` in `messages` and `mailboxes`.
    async fn distinct_everywhere(
        &self,
        field: &'static str,
        filter: Document,
    ) -> Result<BTreeSet<String>, StoreError> {
        let (messages, mailboxes) = (self.messages.clone(), self.mailboxes.clone());
        let values = self
            .guarded("distinct read", async move {
                let mut all = messages.distinct(field, filter.clone()).await?;
                all.extend(mailboxes.distinct(field, filter).await?);
                Ok(all)
            })
            .await?;
        Ok(values
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect())
    }

    /// Every `mailboxes` document, for `status`.
    pub async fn mailbox_summaries(&self) -> Result<Vec<MailboxSummary>, StoreError> {
        let coll = self.mailboxes.clone();
        let docs: Vec<Document> = self
            .guarded("status read", async move {
                coll.find(doc! {})
                    .projection(doc! {"failures": 1, "quarantined.uid": 1, "account": 1, "mailbox": 1, "state": 1, "last_uid": 1, "uidvalidity": 1, "last_success_at": 1, "last_error": 1, "last_error_at": 1, "state_at": 1, "updated_at": 1, "followed_by": 1, "deleted_at": 1, "renamed_to": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        Ok(docs
            .iter()
            .filter_map(MailboxSummary::from_document)
            .collect())
    }

    /// Messages stored per (account, mailbox), all UIDVALIDITYs: one aggregation. The sort and
    /// projection on the unique index's leading fields let MongoDB answer it from the index
    /// alone (a covered scan): a bare `$group` would read every document, bodies and all.
    pub async fn message_counts(&self) -> Result<HashMap<(String, String), u64>, StoreError> {
        let coll = self.messages.clone();
        let pipeline = vec![
            doc! {"$sort": {"account": 1, "mailbox": 1}},
            doc! {"$project": {"_id": 0, "account": 1, "mailbox": 1}},
            doc! {"$group": {"_id": {"account": "$account", "mailbox": "$mailbox"}, "n": {"$sum": 1}}},
        ];
        let docs: Vec<Document> = self
            .guarded("message count", async move {
                coll.aggregate(pipeline).await?.try_collect().await
            })
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                let id = d.get_document("_id").ok()?;
                let n = d.get("n").and_then(as_i64)?;
                Some((
                    (
                        id.get_str("account").ok()?.to_string(),
                        id.get_str("mailbox").ok()?.to_string(),
                    ),
                    n.max(0) as u64,
                ))
            })
            .collect())
    }
}

/// An integer field, whichever width the server chose.
pub(super) fn as_i64(v: &Bson) -> Option<i64> {
    v.as_i64().or_else(|| v.as_i32().map(i64::from))
}

/// The stream of [`Store::export_items`].
pub struct ExportCursor {
    /// `None` marks the end; a channel closed without it means the reader task died.
    rx: mpsc::Receiver<Option<Result<Document, mongodb::error::Error>>>,
    timeout: Duration,
}

impl ExportCursor {
    /// The next message, `None` at the end. Each read waits at most the store's `op_timeout`.
    pub async fn next(&mut self) -> Result<Option<ExportItem>, StoreError> {
        loop {
            match tokio::time::timeout(self.timeout, self.rx.recv()).await {
                Err(_) => {
                    return Err(StoreError::Timeout {
                        what: "export read".into(),
                        after: self.timeout,
                    })
                }
                Ok(None) => return Err(StoreError::Aborted("export read".into())),
                Ok(Some(None)) => return Ok(None),
                Ok(Some(Some(Err(e)))) => return Err(e.into()),
                Ok(Some(Some(Ok(d)))) => {
                    // a document without a raw reference cannot be exported: skipped, as before
                    if let Some(item) = ExportItem::from_document(&d) {
                        return Ok(Some(item));
                    }
                }
            }
        }
    }
}

/// What `status` shows of one `mailboxes` document.
#[derive(Debug, Clone, Default)]
pub struct MailboxSummary {
    pub account: String,
    pub mailbox: String,
    pub state: Option<String>,
    pub uidvalidity: Option<u32>,
    pub last_uid: Option<u32>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// When `last_error` was written (by [`Store::set_state`] or [`Store::record_failure`]).
    pub last_error_at: Option<DateTime<Utc>>,
    /// When `state` was written.
    pub state_at: Option<DateTime<Utc>>,
    pub quarantined: usize,
    pub failing_uids: usize,
    /// How folder sync follows it (`idle`, `notify`, `status poll`).
    pub followed_by: Option<String>,
    /// When folder sync found it gone from the server.
    pub deleted_at: Option<DateTime<Utc>>,
    pub renamed_to: Option<String>,
}

impl MailboxSummary {
    fn from_document(d: &Document) -> Option<MailboxSummary> {
        // `_id` is "account/mailbox"; account names never hold a '/', mailbox names may
        let (id_account, id_mailbox) = d.get_str("_id").ok()?.split_once('/')?;
        let string = |k: &str| d.get_str(k).ok().map(str::to_string);
        let date = |k: &str| d.get_datetime(k).ok().map(|t| t.to_chrono());
        let int = |k: &str| {
            d.get(k)
                .and_then(as_i64)
                .map(|v| v.clamp(0, u32::MAX as i64) as u32)
        };
        Some(MailboxSummary {
            account: string("account").unwrap_or_else(|| id_account.to_string()),
            mailbox: string("mailbox").unwrap_or_else(|| id_mailbox.to_string()),
            state: string("state"),
            uidvalidity: int("uidvalidity"),
            last_uid: int("last_uid"),
            last_success_at: date("last_success_at"),
            last_error: string("last_error"),
            last_error_at: date("last_error_at"),
            state_at: date("state_at").or_else(|| date("updated_at")),
            quarantined: d.get_array("quarantined").map_or(0, |q| q.len()),
            failing_uids: d.get_document("failures").map_or(0, |f| f.len()),
            followed_by: string("followed_by"),
            deleted_at: date("deleted_at"),
            renamed_to: string("renamed_to"),
        })
    }

    /// Failing: in state `error` or `backoff`, or with a `last_error`, written after the last
    /// success (or with no success ever recorded).
    pub fn is_failing(&self) -> bool {
        let state_error = matches!(self.state.as_deref(), Some("error" | "backoff"));
        let error_at = [
            self.last_error.as_ref().and(self.last_error_at),
            self.state_at.filter(|_| state_error),
        ]
        .into_iter()
        .flatten()
        .max();
        let erred = state_error || self.last_error.is_some();
        match (erred, error_at, self.last_success_at) {
            (false, _, _) => false,
            (true, _, None) => true,
            (true, None, Some(_)) => false,
            (true, Some(err), Some(ok)) => err > ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(secs, 0)
    }

    #[test]
    fn a_mailbox_fails_only_when_its_error_is_newer_than_its_last_success() {
        let ok = MailboxSummary {
            state: Some("idle".into()),
            last_success_at: at(100),
            ..Default::default()
        };
        assert!(!ok.is_failing());
        let never = MailboxSummary {
            state: Some("error".into()),
            last_error: Some("refused".into()),
            last_error_at: at(50),
            state_at: at(50),
            ..Default::default()
        };
        assert!(never.is_failing());
        let recovered = MailboxSummary {
            last_success_at: at(100),
            ..never.clone()
        };
        assert!(!recovered.is_failing(), "a later success clears it");
        let again = MailboxSummary {
            last_error_at: at(150),
            state_at: at(150),
            ..recovered.clone()
        };
        assert!(again.is_failing());
        let backoff = MailboxSummary {
            state: Some("backoff".into()),
            state_at: at(10),
            ..Default::default()
        };
        assert!(backoff.is_failing(), "no success ever");
    }
}
