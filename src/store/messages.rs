//! Collection `messages`: the message document, batch commits (blobs, then messages, then the
//! checkpoint) and the minimal form of a document the database refuses.

use std::collections::HashSet;

use bson::{doc, Bson, Document};
use chrono::{DateTime, FixedOffset, Utc};

use super::{
    classify_insert_many, encoded_size, is_document_error, Checkpoint, MailboxStatus, Store,
    StoreError, MAX_DOCUMENT_BYTES,
};
use crate::parse::{Blob, ParsedMessage};

/// A message ready to be written: where it was found plus what the parser made of it.
#[derive(Debug)]
pub struct ReadyMessage {
    pub uid: u32,
    pub flags: Vec<String>,
    pub internal_date: Option<DateTime<FixedOffset>>,
    pub size: u64,
    pub parsed: ParsedMessage,
    /// Gmail's identifiers (X-GM-EXT-1), where the server has them.
    pub gmail: Option<GmailIds>,
}

/// What Gmail says of a message besides RFC 3501 (X-GM-EXT-1): stored as `gmail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmailIds {
    /// X-GM-MSGID: the same in every folder (label) the message appears in.
    pub msgid: u64,
    /// X-GM-THRID: the conversation.
    pub thrid: u64,
    /// X-GM-LABELS, UTF-8 (`\\Inbox`, `\\Important`, user labels).
    pub labels: Vec<String>,
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

impl Store {
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
    pub(super) async fn write_batch(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        batch: &[ReadyMessage],
    ) -> Result<CommitReport, StoreError> {
        if !batch.is_empty() {
            // [cluster]: a replica whose lease was taken over rewrites no document
            self.fence_gate(account, mailbox).await?;
        }
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
            .map(|m| {
                let d = message_document(account, mailbox, uidvalidity, m, stored_at);
                // Never send what MongoDB must refuse. parse keeps the parsed part under its
                // budget and inline raw bytes are capped, so only documents that may come near
                // the limit are measured (encoding one costs as much as sending it).
                if !may_exceed_limit(m) {
                    return d;
                }
                let size = encoded_size(&d);
                if size > MAX_DOCUMENT_BYTES {
                    minimal_document(&d, &format!("the parsed document ({size} bytes) exceeds MongoDB's limit: stored raw only"))
                } else {
                    d
                }
            })
            .collect();
        let (inserted, replaced) = self.write_messages(docs).await?;
        // The blobs again, now that documents point at them: a sweep that removed one between
        // the claim and the insert (possible only when a write outlasts `blob_sweep_after`)
        // is undone here, and one removing it right now makes the batch wait (Busy, retried).
        self.reclaim_blobs(&blobs).await?;
        if self.on_expunge == crate::config::OnExpunge::Mark {
            // a message that left another folder of the account (MOVE) and arrives here
            let shas: Vec<String> = batch.iter().map(|m| m.parsed.raw.sha256.clone()).collect();
            self.link_arrivals(account, &shas).await?;
        }
        report.inserted = inserted;
        report.replaced = replaced;
        Ok(report)
    }

    /// the database refuses for what it is (too large, invalid) is replaced by its minimal form
    /// (identity, raw, the error), so that one message never blocks its mailbox.
    async fn write_messages(&self, docs: Vec<Document>) -> Result<(usize, usize), StoreError> {
        if docs.is_empty() {
            return Ok((0, 0));
        }
        let total = docs.len();
        // Shared with the insert's task, not copied: the documents are needed again only when
        // some of them come back (duplicates, refusals).
        let keep = std::sync::Arc::new(docs);
        let sent = keep.clone();
        let coll = self.messages.clone();
        let outcome = self
            .guarded("message insert", async move {
                match coll.insert_many(sent.iter()).ordered(false).await {
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
                for d in keep.iter() {
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
            let update = rewrite(&current);
            let result = self
                .guarded("message replace", async move {
                    match coll.update_one(doc! {"_id": id}, update).upsert(true).await {
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

/// Whether the document of `m` could exceed [`MAX_DOCUMENT_BYTES`] and must be measured. A
/// message whose parsed part cannot have reached parse's budget (its raw size is below the
/// budget over parse's largest expansion factor) and whose server-supplied lists (flags, Gmail
/// labels) are small cannot: those are the ordinary ones. A document refused all the same is
/// still stored, minimal (`write_messages`).
fn may_exceed_limit(m: &ReadyMessage) -> bool {
    let listed = |l: &[String]| l.iter().map(|s| s.len() + 16).sum::<usize>();
    let extra = listed(&m.flags) + m.gmail.as_ref().map_or(0, |g| listed(&g.labels));
    m.parsed.raw.size as usize > crate::parse::DOCUMENT_BUDGET / 32 || extra > 512 * 1024
}

/// The update that rewrites a stored message document with `d` (a replayed batch): every field
/// of `d` is set, but `stored_at` stays the first one (a reader polling on it must not see the
/// message as new again), the move link to it (`moved_from`) stays, and an expunge mark goes
/// (the server just served the message, so the mark was wrong).
fn rewrite(d: &Document) -> Document {
    let mut set = d.clone();
    set.remove("_id");
    let stored_at = set
        .remove("stored_at")
        .unwrap_or_else(|| Bson::DateTime(bson::DateTime::now()));
    doc! {
        "$set": set,
        "$setOnInsert": {"stored_at": stored_at},
        "$unset": {"expunged_at": "", "expunged_reason": "", "moved_to": ""},
    }
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

/// `raw`: `{sha256, size, data}` with the bytes inline (up to `[store] inline_raw_max`), or
/// `{sha256, size, blob}` naming them in the `blobs` bucket (larger messages, and every
/// document written before inline raw bytes existed).
fn raw_field(p: &ParsedMessage) -> Document {
    let mut raw = doc! {"sha256": &p.raw.sha256, "size": p.raw.size as i64};
    match (&p.raw_data, &p.raw.blob) {
        (Some(data), _) => raw.insert(
            "data",
            bson::Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: data.clone(),
            },
        ),
        (None, Some(blob)) => raw.insert("blob", blob),
        (None, None) => raw.insert("blob", &p.raw.sha256),
    };
    raw
}

/// The `messages` document (README, "What lands in MongoDB").
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
        "raw": raw_field(p),
        "parse_errors": &p.parse_errors,
        "stored_at": stored_at,
    };
    if let Some(g) = &m.gmail {
        // Gmail's ids are 63-bit in practice; BSON's Int64 holds them
        d.insert(
            "gmail",
            doc! {"msgid": g.msgid as i64, "thrid": g.thrid as i64, "labels": &g.labels},
        );
    }
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
    use std::time::Duration;

    fn ready(uid: u32, flags: Vec<String>) -> ReadyMessage {
        let raw = format!("Subject: m{uid}\r\nMessage-ID: <m{uid}@x>\r\n\r\nhi\r\n").into_bytes();
        ReadyMessage {
            uid,
            flags,
            internal_date: None,
            size: raw.len() as u64,
            parsed: parse(raw, Limits::default()),
            gmail: None,
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
        let cfg =
            crate::store::test_config("mp_unit", Default::default(), Duration::from_secs(3600));
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
