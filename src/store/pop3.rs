//! Collection `pop3_uidl`: the POP3 UIDL map that gives each message a stable uid, and what
//! became of it: `stored` (its document is acknowledged), `dele_sent` (mailpump is deleting it:
//! written before the first DELE of a session), `deleted` (a QUIT committed that DELE),
//! `gone_at` (it vanished from the server without mailpump's DELE and its document was marked
//! expunged, or removed), `reappeared_at` (a UIDL that had gone came back: logged once).

use std::collections::HashMap;

use bson::{doc, Document};
use futures::TryStreamExt;

use super::{CommitReport, ReadyMessage, Store, StoreError};

/// What the UIDL map knows of one POP3 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pop3Entry {
    /// The stable uid this UIDL was given, once and for all.
    pub uid: u32,
    /// Its document is acknowledged.
    pub stored: bool,
    /// mailpump sent (or was about to send) DELE for it: if it vanishes, mailpump deleted it.
    pub dele_sent: bool,
    /// A QUIT committed mailpump's DELE.
    pub deleted: bool,
    /// It vanished from the server without mailpump's DELE, and its document was marked
    /// expunged (or removed): never looked at again.
    pub gone: bool,
    /// It had gone and came back (logged once).
    pub reappeared: bool,
}

impl Store {
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
                        dele_sent: d.get_bool("dele_sent").unwrap_or(false),
                        deleted: d.get_bool("deleted").unwrap_or(false),
                        gone: d.contains_key("gone_at"),
                        reappeared: d.contains_key("reappeared_at"),
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
        let (filter, update) = (
            self.fence_filter(doc! {"_id": id}),
            match self.fence() {
                Some(t) => doc! {"$inc": {"pop3_next_uid": n}, "$set": {"fence": t}},
                None => doc! {"$inc": {"pop3_next_uid": n}},
            },
        );
        let counter = self
            .guarded("uid allocation", async move {
                coll.find_one_and_update(filter, update)
                    .upsert(true)
                    .return_document(mongodb::options::ReturnDocument::After)
                    .await
            })
            .await;
        let counter = self.fence_refusal("uid allocation", counter)?;
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
            let set = doc! {"account": account, "mailbox": "INBOX", "uidvalidity": 0i64, "updated_at": bson::DateTime::now()};
            self.upsert_mailbox_with(
                Self::mailbox_id(account, "INBOX"),
                set,
                doc! {"$max": {"last_uid": top as i64}},
                "checkpoint write",
            )
            .await?;
        }
        Ok(report)
    }

    /// Sets `field` (stored / dele_sent / deleted) on the map entries of `uidls`.
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

    /// Sets the time `field` (gone_at / reappeared_at) to now on the map entries of `uidls`
    /// that do not have it yet (the first time stays).
    pub async fn pop3_stamp(
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
        let now = bson::DateTime::now();
        let filter = doc! {"_id": {"$in": ids}, field: {"$exists": false}};
        let set = doc! {field: now, "updated_at": now};
        self.guarded("UIDL map write", async move {
            coll.update_many(filter, doc! {"$set": set})
                .await
                .map(|_| ())
        })
        .await
    }
}
