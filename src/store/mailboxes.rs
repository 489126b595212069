//! Collection `mailboxes`: checkpoints, failure counts, the quarantine and the state for
//! readers, one document per (account, mailbox).

use std::collections::HashSet;

use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};

use super::{Store, StoreError};

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
    /// HIGHESTMODSEQ up to which every flag change and expunge is in the documents (CONDSTORE
    /// servers), for the checkpoint's UIDVALIDITY only.
    pub highest_modseq: Option<u64>,
    /// When every flag was last read and the UIDs compared (servers without CONDSTORE/QRESYNC).
    pub flags_scanned_at: Option<DateTime<Utc>>,
    /// Since when UID comparisons find none of the stored messages on the server (marked
    /// only once a later comparison confirms it).
    pub all_gone_since: Option<DateTime<Utc>>,
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

impl Store {
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
        let highest_modseq = match (checkpoint, d.get_i64("modseq_uidvalidity")) {
            (Some(cp), Ok(v)) if v as u32 == cp.uidvalidity => {
                d.get_i64("highest_modseq").ok().map(|m| m as u64)
            }
            _ => None,
        };
        Ok(MailboxRecord {
            checkpoint,
            failing,
            quarantined,
            highest_modseq,
            all_gone_since: d.get_datetime("all_gone_since").ok().map(|t| t.to_chrono()),
            flags_scanned_at: match (checkpoint, d.get_i64("flags_scanned_uidvalidity")) {
                (Some(cp), Ok(v)) if v as u32 == cp.uidvalidity => d
                    .get_datetime("flags_scanned_at")
                    .ok()
                    .map(|t| t.to_chrono()),
                _ => None,
            },
            quarantine_retried_at: d
                .get_datetime("quarantine_retried_at")
                .ok()
                .map(|t| t.to_chrono()),
        })
    }

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

    pub(super) async fn write_checkpoint(
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

    /// Every flag change and expunge up to `modseq` (under `uidvalidity`) is in the documents.
    pub async fn set_highest_modseq(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        modseq: u64,
    ) -> Result<(), StoreError> {
        let set = doc! {
            "highest_modseq": modseq as i64,
            "modseq_uidvalidity": uidvalidity as i64,
        };
        self.upsert_mailbox(Self::mailbox_id(account, mailbox), set, "modseq write")
            .await
    }

    /// Every flag was read and the UIDs compared now (servers without CONDSTORE).
    pub async fn set_flags_scanned(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
    ) -> Result<(), StoreError> {
        let set = doc! {
            "flags_scanned_at": bson::DateTime::now(),
            "flags_scanned_uidvalidity": uidvalidity as i64,
        };
        self.upsert_mailbox(Self::mailbox_id(account, mailbox), set, "flag scan write")
            .await
    }

    /// Records (or clears) that a UID comparison found none of the stored messages.
    pub async fn set_all_gone(
        &self,
        account: &str,
        mailbox: &str,
        gone: bool,
    ) -> Result<(), StoreError> {
        let coll = self.mailboxes.clone();
        let filter = self.fence_filter(doc! {"_id": Self::mailbox_id(account, mailbox)});
        let update = if gone {
            doc! {"$set": {"all_gone_since": bson::DateTime::now()}}
        } else {
            doc! {"$unset": {"all_gone_since": ""}}
        };
        self.guarded("all-gone mark", async move {
            coll.update_one(filter, update).await.map(|_| ())
        })
        .await
    }

    /// The next pass must read every flag and compare UIDs (more changes than were held).
    pub async fn clear_flags_scanned(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<(), StoreError> {
        let coll = self.mailboxes.clone();
        let filter = self.fence_filter(doc! {"_id": Self::mailbox_id(account, mailbox)});
        self.guarded("flag scan reset", async move {
            coll.update_one(filter, doc! {"$unset": {"flags_scanned_at": ""}})
                .await
                .map(|_| ())
        })
        .await
    }

    /// `$set` on the mailbox document, creating it (with an empty quarantine) if needed;
    /// fenced when this handle carries a lease token.
    pub(super) async fn upsert_mailbox(
        &self,
        id: String,
        set: Document,
        what: &str,
    ) -> Result<(), StoreError> {
        self.upsert_mailbox_with(id, set, Document::new(), what)
            .await
    }

    /// [`Store::upsert_mailbox`] with more update operators beside `$set` (`$unset`, `$max`):
    /// the one fenced write path of `mailboxes` documents.
    pub(super) async fn upsert_mailbox_with(
        &self,
        id: String,
        set: Document,
        more: Document,
        what: &str,
    ) -> Result<(), StoreError> {
        let filter = self.fence_filter(doc! {"_id": id});
        let mut update = doc! {"$set": self.fence_set(set), "$setOnInsert": {"quarantined": []}};
        update.extend(more);
        let write = || {
            let (coll, filter, update) = (self.mailboxes.clone(), filter.clone(), update.clone());
            async move {
                coll.update_one(filter, update)
                    .upsert(true)
                    .await
                    .map(|_| ())
            }
        };
        let r = self.guarded(what, write()).await;
        // a fenced upsert that met a duplicate key: a newer seal, or another write that just
        // created the missing document; once more, and a duplicate then is the newer seal
        let r = match r {
            Err(StoreError::Mongo(e)) if self.fence.is_some() && super::is_duplicate_key(&e) => {
                self.guarded(what, write()).await
            }
            r => r,
        };
        self.fence_refusal(what, r)
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
        let filter = self.fence_filter(doc! {"_id": id});
        let set = self.fence_set(doc! {format!("{field}.last_at"): now, format!("{field}.reason"): &reason, "last_error": &reason, "last_error_at": now});
        let updated = self
            .guarded("failure count", async move {
                coll.find_one_and_update(
                    filter,
                    doc! {
                        "$inc": {format!("{field}.sessions"): 1i64},
                        "$min": {format!("{field}.first_at"): now},
                        "$set": set,
                    },
                )
                .upsert(true)
                .return_document(mongodb::options::ReturnDocument::After)
                .await
            })
            .await;
        let updated = self.fence_refusal("failure count", updated)?;
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
        let filter = self.fence_filter(doc! {"_id": Self::mailbox_id(account, mailbox)});
        self.guarded("failure reset", async move {
            coll.update_one(filter, doc! {"$unset": unset})
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
        let filter = self.fence_filter(doc! {"_id": &id, "quarantined": {"$not": {"$elemMatch": {"uidvalidity": uidvalidity as i64, "uid": uid as i64}}}});
        let filter2 = self.fence_filter(doc! {"_id": &id});
        self.guarded("quarantine", async move {
            coll.update_one(filter, doc! {"$push": {"quarantined": entry}})
                .upsert(false)
                .await?;
            coll.update_one(filter2, doc! {"$unset": {failure: ""}})
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
        let filter = self.fence_filter(doc! {"_id": Self::mailbox_id(account, mailbox)});
        let uids: Vec<i64> = uids.iter().map(|u| *u as i64).collect();
        self.guarded("quarantine release", async move {
            // entries from before uidvalidity was recorded carry none: they are the current one's
            coll.update_one(
                filter,
                doc! {"$pull": {"quarantined": {"uid": {"$in": uids}, "$or": [{"uidvalidity": uidvalidity as i64}, {"uidvalidity": {"$exists": false}}]}}},
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
        let now = bson::DateTime::now();
        let mut set = doc! {
            "account": account,
            "mailbox": mailbox,
            "state": state,
            "last_error": last_error.map(|e| Bson::String(e.to_string())).unwrap_or(Bson::Null),
            "state_at": now,
            "updated_at": now,
        };
        if last_error.is_some() {
            set.insert("last_error_at", now);
        }
        self.upsert_mailbox(id, set, "state write").await
    }

    /// Records the error of a pass made outside the daemon (`mailpump sync`) without touching
    /// `state`, which belongs to the daemon's task: `status` weighs it against the next success.
    pub async fn record_error(
        &self,
        account: &str,
        mailbox: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        let now = bson::DateTime::now();
        let set = doc! {
            "account": account,
            "mailbox": mailbox,
            "last_error": error,
            "last_error_at": now,
            "updated_at": now,
        };
        self.upsert_mailbox(Self::mailbox_id(account, mailbox), set, "error write")
            .await
    }

    /// Notes that a catch-up pass (or a POP3 poll) of this mailbox just ended well:
    /// `last_success_at`, which `status` weighs `last_error` against.
    pub async fn mark_success(&self, account: &str, mailbox: &str) -> Result<(), StoreError> {
        let set = doc! {
            "account": account,
            "mailbox": mailbox,
            "last_success_at": bson::DateTime::now(),
        };
        self.upsert_mailbox(Self::mailbox_id(account, mailbox), set, "success mark")
            .await
    }
}

/// A folder the account's folder sync knew, as `mailboxes` remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderRecord {
    pub mailbox: String,
    pub state: Option<String>,
    /// How it was followed (`idle`, `notify`, `status poll`); None for a folder only ever
    /// named in the config by a fixed account.
    pub followed_by: Option<String>,
    /// RFC 8474's MAILBOXID, where the server has it.
    pub mailbox_id: Option<String>,
}

impl Store {
    /// Notes that folder sync follows this folder, and how (`idle`, `notify`, `status poll`);
    /// a folder that was marked deleted and is back loses the mark.
    pub async fn note_followed(
        &self,
        account: &str,
        mailbox: &str,
        followed_by: &str,
        mailbox_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = bson::DateTime::now();
        let mut set = doc! {
            "account": account,
            "mailbox": mailbox,
            "followed_by": followed_by,
            "followed_at": now,
            "updated_at": now,
        };
        if let Some(id) = mailbox_id {
            set.insert("mailbox_id", id);
        }
        self.upsert_mailbox_with(
            Self::mailbox_id(account, mailbox),
            set,
            doc! {"$unset": {"deleted_at": "", "renamed_to": ""}},
            "folder note",
        )
        .await
    }

    /// Marks a folder that disappeared from the server: `state: "deleted"` and `deleted_at`,
    /// or `state: "renamed"` with `renamed_to` where the server told the new name. Its
    /// documents stay.
    pub async fn mark_deleted(
        &self,
        account: &str,
        mailbox: &str,
        renamed_to: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = bson::DateTime::now();
        let mut set = doc! {
            "account": account,
            "mailbox": mailbox,
            "state": if renamed_to.is_some() { "renamed" } else { "deleted" },
            "state_at": now,
            "deleted_at": now,
            "updated_at": now,
        };
        if let Some(to) = renamed_to {
            set.insert("renamed_to", to);
        }
        // a folder made again under this name starts from nothing, whatever UIDVALIDITY it
        // gets (Cyrus gives folders created in the same second the same one)
        self.upsert_mailbox_with(
            Self::mailbox_id(account, mailbox),
            set,
            doc! {"$unset": {"last_uid": "", "uidvalidity": ""}},
            "deletion mark",
        )
        .await
    }

    /// `last_success_at` for several mailboxes of one account at once: a sweep that found them
    /// unchanged is a success for each (one write, however many folders).
    pub async fn mark_success_many(
        &self,
        account: &str,
        mailboxes: &[String],
    ) -> Result<(), StoreError> {
        let ids: Vec<String> = mailboxes
            .iter()
            .map(|m| Self::mailbox_id(account, m))
            .collect();
        let coll = self.mailboxes.clone();
        self.guarded("success marks", async move {
            coll.update_many(
                doc! {"_id": {"$in": ids}},
                doc! {"$set": {"last_success_at": bson::DateTime::now()}},
            )
            .await
            .map(|_| ())
        })
        .await
    }

    /// Notes on a new folder the one it was renamed from.
    pub async fn note_renamed_from(
        &self,
        account: &str,
        mailbox: &str,
        from: &str,
    ) -> Result<(), StoreError> {
        let set = doc! {"account": account, "mailbox": mailbox, "renamed_from": from};
        self.upsert_mailbox(Self::mailbox_id(account, mailbox), set, "rename note")
            .await
    }

    /// Every folder of `account` that folder sync followed and that is not marked deleted.
    pub async fn followed_folders(&self, account: &str) -> Result<Vec<FolderRecord>, StoreError> {
        use futures::TryStreamExt;
        let coll = self.mailboxes.clone();
        let account = account.to_string();
        let docs: Vec<Document> = self
            .guarded("folder list read", async move {
                coll.find(doc! {"account": account, "followed_by": {"$exists": true}, "deleted_at": {"$exists": false}})
                    .projection(doc! {"mailbox": 1, "state": 1, "followed_by": 1, "mailbox_id": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(FolderRecord {
                    mailbox: d.get_str("mailbox").ok()?.to_string(),
                    state: d.get_str("state").ok().map(str::to_string),
                    followed_by: d.get_str("followed_by").ok().map(str::to_string),
                    mailbox_id: d.get_str("mailbox_id").ok().map(str::to_string),
                })
            })
            .collect())
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
