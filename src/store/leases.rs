//! Leases (`leases`) and replicas (`instances`) for `[cluster]`, and the fence on `mailboxes`.
//!
//! A lease document per unit of work (`_id` `"account/mailbox"`, `"account/*"` for a
//! folder-sync account): `owner` (the instance name, for people), `run` (a random id per
//! process, the one compared), `token` (grows by one with every change of owner), `since`,
//! `expires_at`, `taken_from` (the owner whose expired lease this one replaced).
//!
//! **Time is the database's.** Every comparison with "now" runs inside the database, in the
//! update pipeline of the one atomic update that takes or renews (`$$NOW`, compared as
//! `$toLong` milliseconds), and every `expires_at` is `$$NOW` plus the TTL. The replicas'
//! clocks are never compared with each other or with the database. A holder times its own
//! lease only with its monotonic clock, from before it sent the renewal (`crate::cluster`).
//!
//! **The fence.** Taking a lease with token T raises `fence` to T on the mailbox documents
//! it covers ([`Store::seal`]) before anything of the mailbox is read; a [`Store::fenced`]
//! handle adds `fence <= T` to the filter of every checkpoint-bearing write and sets
//! `fence = T`, so a replica whose lease was taken over finds those writes refused
//! ([`StoreError::Fenced`]) and can never move a checkpoint back.

use std::time::Duration;

use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;

use super::{is_duplicate_key, Store, StoreError};

/// One lease as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseView {
    pub account: String,
    pub mailbox: String,
    /// The holder's instance name; None when released.
    pub owner: Option<String>,
    /// The holder's run id; None when released.
    pub run: Option<String>,
    pub token: i64,
    pub since: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
}

impl LeaseView {
    /// Whether nobody holds it at the database's time `now`.
    pub fn is_free(&self, now: DateTime<Utc>) -> bool {
        self.run.is_none() || self.expires_at <= now
    }
}

/// A replica as its heartbeat left it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub run: String,
    pub instance: String,
    pub expires_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub held: i64,
}

/// A lease just taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Taken {
    pub token: i64,
    /// The instance whose unexpired-until-then lease ran out (None: it was free or released).
    pub taken_from: Option<String>,
}

/// `_id` of the token counter in `leases`.
const TOKEN_COUNTER: &str = "~token";

fn epoch() -> bson::DateTime {
    bson::DateTime::from_millis(0)
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn date(d: &Document, key: &str) -> Option<DateTime<Utc>> {
    d.get_datetime(key).ok().map(|t| t.to_chrono())
}

fn int(d: &Document, key: &str) -> i64 {
    d.get(key).and_then(super::reads::as_i64).unwrap_or(0)
}

fn string(d: &Document, key: &str) -> Option<String> {
    d.get_str(key).ok().map(str::to_string)
}

fn lease_view(d: &Document) -> Option<LeaseView> {
    Some(LeaseView {
        account: string(d, "account")?,
        mailbox: string(d, "mailbox")?,
        owner: string(d, "owner"),
        run: string(d, "run"),
        token: int(d, "token"),
        since: date(d, "since"),
        expires_at: date(d, "expires_at").unwrap_or_default(),
    })
}

/// The update pipeline that takes a lease for `run` if it is free, expired or already
/// `run`'s, and leaves it as it is otherwise. A take always sets `token` (a fresh value of the
/// one counter all leases share): a retaken lease of one's own gets a new token too, so that a
/// late write of the unit's previous run is refused; and since the counter is global, the
/// seal of any newer take outranks any older one, whichever lease key covered the mailbox.
fn take_pipeline(
    account: &str,
    mailbox: &str,
    run: &str,
    instance: &str,
    ttl: Duration,
    token: i64,
) -> Vec<Document> {
    let new_owner = doc! {"$and": ["$_free", {"$not": ["$_mine"]}]};
    vec![
        doc! {"$set": {
            "_mine": {"$eq": ["$run", run]},
            "_free": {"$or": [
                {"$eq": ["$run", run]},
                {"$lte": [{"$toLong": {"$ifNull": ["$expires_at", epoch()]}}, {"$toLong": "$$NOW"}]},
            ]},
        }},
        doc! {"$set": {
            "token": {"$cond": ["$_free", token, "$token"]},
            "since": {"$cond": ["$_free", "$$NOW", "$since"]},
            "taken_from": {"$cond": [&new_owner, "$owner", {"$cond": ["$_free", Bson::Null, "$taken_from"]}]},
            "owner": {"$cond": ["$_free", instance, "$owner"]},
            "run": {"$cond": ["$_free", run, "$run"]},
            "expires_at": {"$cond": ["$_free", {"$add": ["$$NOW", ms(ttl)]}, "$expires_at"]},
            "account": account,
            "mailbox": mailbox,
        }},
        doc! {"$unset": ["_mine", "_free"]},
    ]
}

fn release_pipeline() -> Vec<Document> {
    vec![doc! {"$set": {
        "owner": Bson::Null,
        "run": Bson::Null,
        "expires_at": epoch(),
        "released_at": "$$NOW",
    }}]
}

impl Store {
    /// A handle whose checkpoint-bearing writes carry the lease token `token` (module doc);
    /// its message writes check the fence first unless it passed a check less than
    /// `gate_fresh` ago (keep it well under the lease TTL: a replica paused longer than that
    /// checks again, its monotonic clock having moved on).
    pub fn fenced(&self, token: i64, gate_fresh: Duration) -> Store {
        Store {
            fence: Some(token),
            gate: Some(std::sync::Arc::new(super::Gate {
                fresh: gate_fresh,
                passed: Default::default(),
            })),
            ..self.clone()
        }
    }

    /// The token this handle's writes carry, if any.
    pub fn fence(&self) -> Option<i64> {
        self.fence
    }

    /// `filter` with the fence added: matches only documents not sealed by a newer lease.
    pub(super) fn fence_filter(&self, mut filter: Document) -> Document {
        if let Some(t) = self.fence {
            filter.insert("fence", doc! {"$not": {"$gt": t}});
        }
        filter
    }

    /// `set` with the fence added.
    pub(super) fn fence_set(&self, mut set: Document) -> Document {
        if let Some(t) = self.fence {
            set.insert("fence", t);
        }
        set
    }

    /// A fenced upsert that failed on the `_id` is a newer lease's seal: [`StoreError::Fenced`].
    pub(super) fn fence_refusal<T>(
        &self,
        what: &str,
        r: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match (self.fence, r) {
            (Some(token), Err(StoreError::Mongo(e))) if is_duplicate_key(&e) => {
                Err(StoreError::Fenced {
                    what: what.to_string(),
                    token,
                })
            }
            (_, r) => r,
        }
    }

    /// Before a fenced handle writes message documents (which carry no token of their own):
    /// [`Store::check_fence`]. A replica paused past its TTL, woken up with a batch in flight,
    /// finds its lease taken over here, before it could rewrite what the new holder stored
    /// and updated since. (What is left: the milliseconds between this check and the write.)
    pub(super) async fn fence_gate(&self, account: &str, mailbox: &str) -> Result<(), StoreError> {
        let (Some(_), Some(gate)) = (self.fence, &self.gate) else {
            return Ok(());
        };
        let id = Self::mailbox_id(account, mailbox);
        let fresh = crate::error::lock(&gate.passed)
            .get(&id)
            .is_some_and(|t| t.elapsed() < gate.fresh);
        if fresh {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.check_fence(account, mailbox).await?;
        crate::error::lock(&gate.passed).insert(id, started);
        Ok(())
    }

    /// Checks the fence of `account/mailbox` by a fenced write (before a POP3 DELE): Ok only
    /// while no newer lease sealed it.
    pub async fn check_fence(&self, account: &str, mailbox: &str) -> Result<(), StoreError> {
        if self.fence.is_none() {
            return Ok(());
        }
        let set = doc! {"fence_checked_at": bson::DateTime::now()};
        self.upsert_mailbox(Self::mailbox_id(account, mailbox), set, "fence check")
            .await
    }

    /// Raises the fence of what the lease `account/mailbox` (mailbox `*`: every folder of the
    /// account) covers to `token`. Fails with [`StoreError::Fenced`] if a newer token is there.
    pub async fn seal(&self, account: &str, mailbox: &str, token: i64) -> Result<(), StoreError> {
        let coll = self.mailboxes.clone();
        let what = "lease seal";
        let (account, mailbox) = (account.to_string(), mailbox.to_string());
        let id = Self::mailbox_id(&account, &mailbox);
        let newer = self
            .guarded(what, async move {
                if mailbox == "*" {
                    coll.update_many(
                        doc! {"account": &account, "fence": {"$not": {"$gt": token}}},
                        doc! {"$set": {"fence": token}},
                    )
                    .await?;
                    coll.find_one(doc! {"account": &account, "fence": {"$gt": token}}).await
                } else {
                    let r = coll
                        .update_one(
                            doc! {"_id": &id, "fence": {"$not": {"$gt": token}}},
                            doc! {"$set": {"fence": token, "account": &account, "mailbox": &mailbox}, "$setOnInsert": {"quarantined": []}},
                        )
                        .upsert(true)
                        .await;
                    match r {
                        Ok(_) => Ok(None),
                        Err(e) if is_duplicate_key(&e) => Ok(Some(Document::new())),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        match newer {
            None => Ok(()),
            Some(_) => Err(StoreError::Fenced {
                what: what.to_string(),
                token,
            }),
        }
    }

    /// Creates what the cluster collections need (a TTL index that removes replicas gone for
    /// an hour).
    pub async fn prepare_cluster(&self) -> Result<(), StoreError> {
        let instances = self.instances.clone();
        self.guarded("cluster index creation", async move {
            instances
                .create_index(
                    mongodb::IndexModel::builder()
                        .keys(doc! {"expires_at": 1})
                        .options(
                            mongodb::options::IndexOptions::builder()
                                .expire_after(Duration::from_secs(3600))
                                .build(),
                        )
                        .build(),
                )
                .await
                .map(|_| ())
        })
        .await
    }

    /// This replica's heartbeat: alive until the database's now + `ttl`. Returns the
    /// database's now.
    pub async fn heartbeat(
        &self,
        run: &str,
        instance: &str,
        ttl: Duration,
        held: usize,
    ) -> Result<DateTime<Utc>, StoreError> {
        let coll = self.instances.clone();
        let pipeline = vec![doc! {"$set": {
            "instance": instance,
            "seen_at": "$$NOW",
            "expires_at": {"$add": ["$$NOW", ms(ttl)]},
            "started_at": {"$ifNull": ["$started_at", "$$NOW"]},
            "held": held as i64,
            "pid": std::process::id() as i64,
        }}];
        let run = run.to_string();
        let after = self
            .guarded("heartbeat", async move {
                coll.find_one_and_update(doc! {"_id": run}, pipeline)
                    .upsert(true)
                    .return_document(mongodb::options::ReturnDocument::After)
                    .await
            })
            .await?;
        after
            .as_ref()
            .and_then(|d| date(d, "seen_at"))
            .ok_or_else(|| StoreError::Protocol("heartbeat returned no seen_at".into()))
    }

    /// Every replica that sent a heartbeat in the last hour (alive or not: compare
    /// `expires_at` with the database's now).
    pub async fn instances(&self) -> Result<Vec<InstanceView>, StoreError> {
        let coll = self.instances.clone();
        let docs: Vec<Document> = self
            .guarded("instances read", async move {
                coll.find(doc! {}).await?.try_collect().await
            })
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(InstanceView {
                    run: string(d, "_id")?,
                    instance: string(d, "instance")?,
                    expires_at: date(d, "expires_at")?,
                    started_at: date(d, "started_at"),
                    held: int(d, "held"),
                })
            })
            .collect())
    }

    /// This replica leaves: its heartbeat document goes.
    pub async fn leave(&self, run: &str) -> Result<(), StoreError> {
        let coll = self.instances.clone();
        let run = run.to_string();
        self.guarded("instance removal", async move {
            coll.delete_one(doc! {"_id": run}).await.map(|_| ())
        })
        .await
    }

    /// Every lease.
    pub async fn leases(&self) -> Result<Vec<LeaseView>, StoreError> {
        let coll = self.leases.clone();
        let docs: Vec<Document> = self
            .guarded("leases read", async move {
                coll.find(doc! {}).await?.try_collect().await
            })
            .await?;
        Ok(docs.iter().filter_map(lease_view).collect())
    }

    /// Takes the lease of `account/mailbox` for `run` if it is free, expired or `run`'s
    /// already: one atomic conditional update, judged at the database's time.
    pub async fn take_lease(
        &self,
        account: &str,
        mailbox: &str,
        run: &str,
        instance: &str,
        ttl: Duration,
    ) -> Result<Option<Taken>, StoreError> {
        let coll = self.leases.clone();
        let id = Self::mailbox_id(account, mailbox);
        let (account, mailbox, run_id, name) = (
            account.to_string(),
            mailbox.to_string(),
            run.to_string(),
            instance.to_string(),
        );
        let after = self
            .guarded("lease take", async move {
                // the one token counter: a document beside the leases, with no account (so
                // never read as a lease)
                let n = coll
                    .find_one_and_update(doc! {"_id": TOKEN_COUNTER}, doc! {"$inc": {"n": 1i64}})
                    .upsert(true)
                    .return_document(mongodb::options::ReturnDocument::After)
                    .await?;
                let Some(token) = n.as_ref().map(|d| int(d, "n")).filter(|t| *t > 0) else {
                    // no token, no take: the next tick tries again
                    return Ok(None);
                };
                let pipeline = take_pipeline(&account, &mailbox, &run_id, &name, ttl, token);
                coll.find_one_and_update(doc! {"_id": id}, pipeline)
                    .upsert(true)
                    .return_document(mongodb::options::ReturnDocument::After)
                    .await
            })
            .await?;
        // nothing back: an upsert that lost a race with another take of the same missing
        // lease (seen with SecantusDB); the other one has it
        let Some(after) = after else {
            return Ok(None);
        };
        if after.get_str("run").ok() != Some(run) {
            return Ok(None);
        }
        Ok(Some(Taken {
            token: int(&after, "token"),
            taken_from: string(&after, "taken_from").filter(|o| o != instance),
        }))
    }

    /// Extends every lease `run` holds to the database's now + `ttl`; returns the leases that
    /// are `run`'s after it (key and token).
    pub async fn renew_leases(
        &self,
        run: &str,
        ttl: Duration,
    ) -> Result<Vec<((String, String), i64)>, StoreError> {
        let coll = self.leases.clone();
        let run = run.to_string();
        let docs: Vec<Document> = self
            .guarded("lease renewal", async move {
                coll.update_many(
                    doc! {"run": &run},
                    vec![doc! {"$set": {"expires_at": {"$add": ["$$NOW", ms(ttl)]}}}],
                )
                .await?;
                coll.find(doc! {"run": &run})
                    .projection(doc! {"account": 1, "mailbox": 1, "token": 1})
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some((
                    (string(d, "account")?, string(d, "mailbox")?),
                    int(d, "token"),
                ))
            })
            .collect())
    }

    /// Gives the lease back (only if it still is `run`'s with `token`): free at once.
    pub async fn release_lease(
        &self,
        account: &str,
        mailbox: &str,
        run: &str,
        token: i64,
    ) -> Result<bool, StoreError> {
        let coll = self.leases.clone();
        let filter = doc! {"_id": Self::mailbox_id(account, mailbox), "run": run, "token": token};
        let r = self
            .guarded("lease release", async move {
                coll.update_one(filter, release_pipeline()).await
            })
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Gives back every lease `run` holds; returns how many.
    pub async fn release_all(&self, run: &str) -> Result<u64, StoreError> {
        let coll = self.leases.clone();
        let run = run.to_string();
        let r = self
            .guarded("lease release", async move {
                coll.update_many(doc! {"run": run}, release_pipeline())
                    .await
            })
            .await?;
        Ok(r.matched_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnExpunge;
    use crate::store::{Checkpoint, MailboxStatus};

    async fn store(prefix: &str) -> (Store, crate::config::StoreConfig) {
        let cfg = crate::store::test_config(prefix, OnExpunge::Mark, Duration::from_secs(3600));
        (Store::connect(&cfg).await.unwrap(), cfg)
    }

    /// Free, held, renewed, expired (at the database's time), released: every take gets a
    /// token above every earlier one (one counter for all leases), a renewal keeps it.
    #[tokio::test]
    async fn a_lease_is_taken_only_when_free_expired_or_ours() {
        let (s, cfg) = store("mp_leases").await;
        let ttl = Duration::from_millis(1500);
        let a = s
            .take_lease("acct", "INBOX", "run-a", "A", ttl)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.taken_from, None);
        assert_eq!(
            s.take_lease("acct", "INBOX", "run-b", "B", ttl)
                .await
                .unwrap(),
            None
        );
        // ours already: same token
        let again = s
            .take_lease("acct", "INBOX", "run-a", "A", ttl)
            .await
            .unwrap()
            .unwrap();
        assert!(again.token > a.token, "a retake is a new token");
        let a = again;
        // renewals keep it past its first expiry
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let ours = s.renew_leases("run-a", ttl).await.unwrap();
            assert_eq!(
                ours,
                vec![(("acct".to_string(), "INBOX".to_string()), a.token)]
            );
            assert_eq!(
                s.take_lease("acct", "INBOX", "run-b", "B", ttl)
                    .await
                    .unwrap(),
                None
            );
        }
        // no renewal: expired, taken over
        tokio::time::sleep(ttl + Duration::from_millis(300)).await;
        let b = s
            .take_lease("acct", "INBOX", "run-b", "B", ttl)
            .await
            .unwrap()
            .unwrap();
        assert!(b.token > a.token, "{b:?}");
        assert_eq!(b.taken_from.as_deref(), Some("A"));
        assert!(
            s.renew_leases("run-a", ttl).await.unwrap().is_empty(),
            "A's renewal finds nothing of its own"
        );
        assert!(
            !s.release_lease("acct", "INBOX", "run-a", a.token)
                .await
                .unwrap(),
            "A cannot release B's lease"
        );
        // a release frees it at once, and a release names no one taken over
        assert!(s
            .release_lease("acct", "INBOX", "run-b", b.token)
            .await
            .unwrap());
        let leases = s.leases().await.unwrap();
        assert_eq!(leases.len(), 1, "the token counter is no lease: {leases:?}");
        let lease = &leases[0];
        assert!(lease.run.is_none() && lease.owner.is_none());
        let c = s
            .take_lease("acct", "INBOX", "run-a", "A", ttl)
            .await
            .unwrap()
            .unwrap();
        assert!(c.token > b.token && c.taken_from.is_none(), "{c:?}");
        assert_eq!(s.release_all("run-a").await.unwrap(), 1);
        // heartbeats: the database's time, alive until it + ttl
        let now = s.heartbeat("run-a", "A", ttl, 0).await.unwrap();
        let inst = s.instances().await.unwrap();
        assert_eq!(inst.len(), 1);
        assert!(inst[0].expires_at > now && inst[0].instance == "A");
        s.leave("run-a").await.unwrap();
        assert!(s.instances().await.unwrap().is_empty());
        let _ = s.client.database(&cfg.database).drop().await;
    }

    /// The fence: after B took the lease over and sealed, every checkpoint-bearing write of A
    /// is refused and the checkpoint never moves back; B's go through.
    #[tokio::test]
    async fn a_taken_over_replica_finds_its_checkpoint_writes_refused() {
        let (s, cfg) = store("mp_fence").await;
        let status = MailboxStatus {
            uidnext: Some(11),
            exists: 10,
        };
        let a = s.scoped().fenced(1, Duration::ZERO);
        s.seal("acct", "INBOX", 1).await.unwrap();
        a.write_checkpoint(
            "acct",
            "INBOX",
            Checkpoint {
                uidvalidity: 7,
                last_uid: 10,
            },
            status,
        )
        .await
        .unwrap();
        // B takes over with token 2 and seals; it reads the checkpoint A left
        s.seal("acct", "INBOX", 2).await.unwrap();
        let b = s.scoped().fenced(2, Duration::ZERO);
        assert_eq!(
            b.checkpoint("acct", "INBOX")
                .await
                .unwrap()
                .unwrap()
                .last_uid,
            10
        );
        b.write_checkpoint(
            "acct",
            "INBOX",
            Checkpoint {
                uidvalidity: 7,
                last_uid: 20,
            },
            status,
        )
        .await
        .unwrap();
        // A, resumed, would write an older checkpoint: refused, nothing moves back
        let e = a
            .write_checkpoint(
                "acct",
                "INBOX",
                Checkpoint {
                    uidvalidity: 7,
                    last_uid: 15,
                },
                status,
            )
            .await
            .unwrap_err();
        assert!(e.is_fenced(), "{e}");
        assert!(a
            .record_failure("acct", "INBOX", 7, 12, "x")
            .await
            .unwrap_err()
            .is_fenced());
        assert!(a
            .set_highest_modseq("acct", "INBOX", 7, 99)
            .await
            .unwrap_err()
            .is_fenced());
        assert!(a
            .check_fence("acct", "INBOX")
            .await
            .unwrap_err()
            .is_fenced());
        assert!(
            s.seal("acct", "INBOX", 1).await.unwrap_err().is_fenced(),
            "an old token cannot seal"
        );
        assert_eq!(
            s.checkpoint("acct", "INBOX")
                .await
                .unwrap()
                .unwrap()
                .last_uid,
            20
        );
        b.check_fence("acct", "INBOX").await.unwrap();
        // POP3's counter and checkpoint carry the fence too
        assert!(a
            .pop3_assign("acct", &["u1".to_string()])
            .await
            .unwrap_err()
            .is_fenced());
        b.pop3_assign("acct", &["u1".to_string()]).await.unwrap();
        // a folder-sync account's lease seals every folder, also a new one written later
        b.write_checkpoint(
            "acct",
            "Archive",
            Checkpoint {
                uidvalidity: 1,
                last_uid: 3,
            },
            status,
        )
        .await
        .unwrap();
        s.seal("acct", "*", 3).await.unwrap();
        assert!(b
            .write_checkpoint(
                "acct",
                "Archive",
                Checkpoint {
                    uidvalidity: 1,
                    last_uid: 4
                },
                status
            )
            .await
            .unwrap_err()
            .is_fenced());
        let c = s.scoped().fenced(3, Duration::ZERO);
        c.write_checkpoint(
            "acct",
            "Sent",
            Checkpoint {
                uidvalidity: 1,
                last_uid: 1,
            },
            status,
        )
        .await
        .unwrap();
        assert!(s.seal("acct", "*", 2).await.unwrap_err().is_fenced());
        // an unfenced handle (no [cluster]) writes as before
        s.mark_success("acct", "INBOX").await.unwrap();
        let _ = s.client.database(&cfg.database).drop().await;
    }
}
