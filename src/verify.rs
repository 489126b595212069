//! `mailpump verify`: compares what the server holds of each mailbox (UIDs, FLAGS,
//! RFC822.SIZE; with `deep`, the SHA-256 of every message's bytes) with the documents stored
//! for its current UIDVALIDITY, and with `repair` makes the store match. The comparison is
//! [`diff`], pure; the rest is the orchestration: one EXAMINE, one `UID FETCH 1:* (UID FLAGS
//! RFC822.SIZE)` ([`Session::inventory`]) and one [`Store::stored_meta`] query per mailbox,
//! compared in memory, so a 100,000-message mailbox takes seconds.
//!
//! **Invariant: verify never modifies the server.** EXAMINE only (whatever `mark_seen` says),
//! `BODY.PEEK[]` only, no STORE, no EXPUNGE. Repairs write the store only: missing and changed
//! messages through [`Store::commit_below_checkpoint`] (the checkpoint never moves here),
//! flags through [`Store::apply_flags`], expunges through [`Store::mark_expunged`] /
//! [`Store::unmark_expunged`]. A stored message is marked expunged only after
//! `UID SEARCH UID` confirmed the server no longer has it.
//!
//! What counts as a difference, per UID of the current UIDVALIDITY:
//! - **missing**: on the server, at or below the checkpoint's `last_uid`, not stored, not
//!   quarantined (and, for accounts with `since`/`unseen_only`, matched by that search now);
//!   above the checkpoint it is only **not yet synced** (a count, no difference);
//!   quarantined UIDs are listed as **quarantined** (no difference: `sync
//!   --retry-quarantined` is their repair);
//! - **extra**: stored, not marked expunged, not on the server (expunged but not marked);
//! - **marked expunged but present**: stored with `expunged_at`, yet on the server;
//! - **size mismatch**: stored `size` is not the server's RFC822.SIZE (repair: stored again);
//! - **flags stale**: the flag sets differ (compared without case and without `\Recent`,
//!   which belongs to one session, not to the message);
//! - with `deep`, **digest mismatch**: `raw.sha256` is not the SHA-256 of the bytes the
//!   server sends now (repair: stored again).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::config::Account;
use crate::imap::{ImapError, ServerMeta, Session};
use crate::parse::{sha256_hex, Limits};
use crate::pipeline::{cut_batches, parse_batch, FetchedMessage, SyncError};
use crate::store::{Checkpoint, FlagChange, Store, StoredMeta};

/// async-imap holds each FETCH response whole and refuses literals above 512 MiB (as `sync`).
const MAX_FETCHABLE: u64 = 500 * 1024 * 1024;
/// UIDs per `UID SEARCH UID set` that confirms extras are gone.
const CONFIRM_CHUNK: usize = 1000;

/// What to do besides comparing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Fetch the missing, fix flags and expunge marks, store again what differs.
    pub repair: bool,
    /// Fetch every stored message's bytes and compare their SHA-256 with `raw.sha256`.
    pub deep: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeMismatch {
    pub uid: u32,
    pub stored: u64,
    pub server: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleFlags {
    pub uid: u32,
    pub stored: Vec<String>,
    pub server: Vec<String>,
}

/// The differences of one mailbox (UID lists sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Messages the server lists.
    pub server_messages: usize,
    /// Stored documents not marked expunged.
    pub stored_messages: usize,
    /// On the server above the checkpoint and not stored: the next sync's work.
    pub not_yet_synced: usize,
    pub missing: Vec<u32>,
    /// On the server, not stored, in the quarantine.
    pub quarantined: Vec<u32>,
    pub extra: Vec<u32>,
    pub size_mismatch: Vec<SizeMismatch>,
    pub flags_stale: Vec<StaleFlags>,
    pub marked_expunged_present: Vec<u32>,
}

impl Diff {
    /// How many differences (quarantined and not-yet-synced UIDs are none).
    pub fn differences(&self) -> usize {
        self.missing.len()
            + self.extra.len()
            + self.size_mismatch.len()
            + self.flags_stale.len()
            + self.marked_expunged_present.len()
    }
}

/// What the store is expected to hold, besides the server's list.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The checkpoint's `last_uid` for this UIDVALIDITY (0: none).
    pub last_uid: u32,
    pub quarantined: &'a HashSet<u32>,
    /// With `since` or `unseen_only`: the UIDs sync's search matches; None: every UID.
    pub eligible: Option<&'a HashSet<u32>>,
}

/// A flag set as verify compares it: lowercase (IMAP flags are case-insensitive), without
/// `\Recent`.
fn flag_set(flags: &[String]) -> BTreeSet<String> {
    flags
        .iter()
        .map(|f| f.to_ascii_lowercase())
        .filter(|f| f != "\\recent")
        .collect()
}

/// The flags verify writes: the server's, without `\Recent`.
fn archived_flags(flags: &[String]) -> Vec<String> {
    flags
        .iter()
        .filter(|f| !f.eq_ignore_ascii_case("\\recent"))
        .cloned()
        .collect()
}

/// Compares the server's list with the stored documents, both sorted by UID.
pub fn diff(server: &[ServerMeta], stored: &[StoredMeta], expected: Expected<'_>) -> Diff {
    let mut d = Diff {
        server_messages: server.len(),
        stored_messages: stored.iter().filter(|m| !m.expunged).count(),
        ..Default::default()
    };
    let (mut i, mut j) = (0, 0);
    while i < server.len() || j < stored.len() {
        let s = server.get(i);
        let m = stored.get(j);
        match (s, m) {
            (Some(s), Some(m)) if s.uid == m.uid => {
                if m.expunged {
                    d.marked_expunged_present.push(s.uid);
                }
                if s.size != m.size {
                    d.size_mismatch.push(SizeMismatch {
                        uid: s.uid,
                        stored: m.size,
                        server: s.size,
                    });
                }
                if flag_set(&s.flags) != flag_set(&m.flags) {
                    d.flags_stale.push(StaleFlags {
                        uid: s.uid,
                        stored: m.flags.clone(),
                        server: s.flags.clone(),
                    });
                }
                i += 1;
                j += 1;
            }
            (Some(s), m) if m.is_none_or(|m| s.uid < m.uid) => {
                let uid = s.uid;
                if expected.quarantined.contains(&uid) {
                    d.quarantined.push(uid);
                } else if uid > expected.last_uid {
                    d.not_yet_synced += 1;
                } else if expected.eligible.is_none_or(|e| e.contains(&uid)) {
                    d.missing.push(uid);
                }
                i += 1;
            }
            (_, Some(m)) => {
                if !m.expunged {
                    d.extra.push(m.uid);
                }
                j += 1;
            }
            (None, None) => break,
            // (Some, None) is the arm above; this one cannot be reached
            (Some(_), None) => i += 1,
        }
    }
    d
}

/// What `deep` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeepReport {
    /// Messages whose bytes were fetched and compared.
    pub checked: usize,
    /// Stored messages whose `raw.sha256` is not the digest of the server's bytes.
    pub mismatched: Vec<u32>,
    /// Stored messages the server refused to send or that are too large to FETCH: not
    /// compared (no difference).
    pub unread: Vec<u32>,
    /// After a repair: the mismatched ones whose document still has another digest.
    pub remaining: Option<Vec<u32>>,
}

/// What `repair` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Missing messages fetched and stored.
    pub stored: usize,
    /// Messages stored again (size or digest mismatch).
    pub restored: usize,
    pub flags_fixed: usize,
    pub marked_expunged: usize,
    pub unmarked: usize,
    /// Messages the server refused to send.
    pub refused: Vec<u32>,
}

/// One mailbox's outcome.
#[derive(Debug, Clone, Default)]
pub struct MailboxReport {
    pub account: String,
    pub mailbox: String,
    /// The server's UIDVALIDITY.
    pub uidvalidity: Option<u32>,
    /// The stored checkpoint (maybe of another UIDVALIDITY).
    pub checkpoint: Option<Checkpoint>,
    pub found: Diff,
    pub deep: Option<DeepReport>,
    pub repair: Option<RepairReport>,
    /// After a repair: the comparison made again.
    pub after: Option<Diff>,
    pub error: Option<String>,
    /// Not verified, and why (POP3).
    pub skipped: Option<String>,
    pub elapsed: Duration,
}

impl MailboxReport {
    /// The store matches the server (after a repair: everything was repaired).
    pub fn ok(&self) -> bool {
        if self.skipped.is_some() {
            return true;
        }
        if self.error.is_some() {
            return false;
        }
        let deep_ok = self.deep.as_ref().is_none_or(|d| match &d.remaining {
            Some(r) => r.is_empty(),
            None => d.mismatched.is_empty(),
        });
        let diff = self.after.as_ref().unwrap_or(&self.found);
        deep_ok && diff.differences() == 0
    }

    /// The stored checkpoint is of another UIDVALIDITY than the server's.
    pub fn uidvalidity_changed(&self) -> bool {
        matches!((self.checkpoint, self.uidvalidity), (Some(cp), Some(v)) if cp.uidvalidity != v)
    }

    fn new(account: &str, mailbox: &str) -> MailboxReport {
        MailboxReport {
            account: account.to_string(),
            mailbox: mailbox.to_string(),
            ..Default::default()
        }
    }
}

/// Where a mailbox is verified.
struct Target<'a> {
    store: &'a Store,
    account: &'a Account,
    mailbox: &'a str,
    uidvalidity: u32,
    limits: Limits,
}

impl Target<'_> {
    /// The server's list, the stored documents and, with `since`/`unseen_only`, sync's search.
    async fn look(
        &self,
        session: &mut Session,
        exists: u32,
    ) -> Result<(Vec<ServerMeta>, Vec<StoredMeta>, Option<HashSet<u32>>), SyncError> {
        let server = session.inventory(exists).await?;
        let s = &self.account.settings;
        let eligible = if s.since.is_some() || s.unseen_only {
            Some(
                session
                    .search_after(0, s.since, s.unseen_only)
                    .await?
                    .into_iter()
                    .collect(),
            )
        } else {
            None
        };
        let stored = self
            .store
            .stored_meta(&self.account.name, self.mailbox, self.uidvalidity)
            .await?;
        Ok((server, stored, eligible))
    }

    /// Parses and stores fetched messages below the checkpoint (it does not move).
    async fn store_messages(&self, mut messages: Vec<FetchedMessage>) -> Result<usize, SyncError> {
        if messages.is_empty() {
            return Ok(0);
        }
        for m in &mut messages {
            m.flags = archived_flags(&m.flags);
        }
        let ready = parse_batch(messages, self.limits).await?;
        self.store
            .commit_below_checkpoint(&self.account.name, self.mailbox, self.uidvalidity, &ready)
            .await?;
        Ok(ready.len())
    }
}

/// `UID FETCH set (... BODY.PEEK[])`; a batch the server refuses is asked UID by UID, and the
/// UIDs it refuses alone come back second.
async fn fetch_bodies(
    session: &mut Session,
    uids: &[u32],
) -> Result<(Vec<FetchedMessage>, Vec<u32>), ImapError> {
    match session.fetch_bodies(uids).await {
        Ok(m) => Ok((m, Vec::new())),
        Err(ImapError::Rejected { .. }) => {
            let (mut out, mut refused) = (Vec::new(), Vec::new());
            for uid in uids {
                match session.fetch_bodies(&[*uid]).await {
                    Ok(m) => out.extend(m),
                    Err(ImapError::Rejected { .. }) => refused.push(*uid),
                    Err(e) => return Err(e),
                }
            }
            Ok((out, refused))
        }
        Err(e) => Err(e),
    }
}

/// `items` (UID, size) in batches of the account's `batch_size` and `batch_bytes`; messages
/// too large to FETCH are left out and returned.
fn batches(account: &Account, items: Vec<(u32, u64)>) -> (Vec<Vec<u32>>, Vec<u32>) {
    let (ok, too_large): (Vec<_>, Vec<_>) =
        items.into_iter().partition(|(_, s)| *s <= MAX_FETCHABLE);
    let s = &account.settings;
    let cut = cut_batches(ok, s.batch_size, s.batch_bytes, |(_, size)| *size)
        .into_iter()
        .map(|b| b.into_iter().map(|(uid, _)| uid).collect())
        .collect();
    (cut, too_large.into_iter().map(|(uid, _)| uid).collect())
}

/// `deep`: every stored message the server lists, fetched in bounded batches, its digest
/// compared; with `repair` a mismatched message is stored again at once (its bytes are here).
/// Returns the report and the server's digests of the mismatched ones.
async fn deep_check(
    session: &mut Session,
    t: &Target<'_>,
    server: &[ServerMeta],
    stored: &[StoredMeta],
    mut repair: Option<&mut RepairReport>,
) -> Result<(DeepReport, HashMap<u32, String>), SyncError> {
    let by_uid: HashMap<u32, &StoredMeta> = stored.iter().map(|m| (m.uid, m)).collect();
    let items: Vec<(u32, u64)> = server
        .iter()
        .filter(|s| by_uid.contains_key(&s.uid))
        .map(|s| (s.uid, s.size))
        .collect();
    let (batches, too_large) = batches(t.account, items);
    let mut report = DeepReport {
        unread: too_large,
        ..Default::default()
    };
    let mut digests = HashMap::new();
    for uids in batches {
        let (messages, refused) = fetch_bodies(session, &uids).await?;
        report.unread.extend(refused);
        let mut differing = Vec::new();
        for m in messages {
            report.checked += 1;
            let sha = sha256_hex(&m.body);
            let stored_sha = by_uid.get(&m.uid).and_then(|s| s.raw_sha256.as_deref());
            if stored_sha != Some(sha.as_str()) {
                report.mismatched.push(m.uid);
                digests.insert(m.uid, sha);
                differing.push(m);
            }
        }
        if let Some(r) = repair.as_deref_mut() {
            r.restored += t.store_messages(differing).await?;
        }
    }
    report.mismatched.sort_unstable();
    report.unread.sort_unstable();
    Ok((report, digests))
}

/// Repairs what `found` lists (digest mismatches were repaired by [`deep_check`]).
async fn repair(
    session: &mut Session,
    t: &Target<'_>,
    found: &Diff,
    server: &[ServerMeta],
    report: &mut RepairReport,
) -> Result<(), SyncError> {
    let (name, mailbox, v) = (t.account.name.as_str(), t.mailbox, t.uidvalidity);
    if !found.marked_expunged_present.is_empty() {
        report.unmarked += t
            .store
            .unmark_expunged(name, mailbox, v, &found.marked_expunged_present)
            .await?;
    }
    if !found.flags_stale.is_empty() {
        let changes: Vec<FlagChange> = found
            .flags_stale
            .iter()
            .map(|f| FlagChange {
                uid: f.uid,
                flags: archived_flags(&f.server),
                modseq: None,
            })
            .collect();
        report.flags_fixed += t.store.apply_flags(name, mailbox, v, &changes).await?;
    }
    if !found.extra.is_empty() {
        // only what the server confirms it no longer has
        let mut still: HashSet<u32> = HashSet::new();
        for chunk in found.extra.chunks(CONFIRM_CHUNK) {
            still.extend(session.existing(chunk).await?);
        }
        let gone: Vec<u32> = found
            .extra
            .iter()
            .copied()
            .filter(|u| !still.contains(u))
            .collect();
        if !gone.is_empty() {
            report.marked_expunged += t.store.mark_expunged(name, mailbox, v, &gone).await?;
        }
    }
    let size: HashMap<u32, u64> = server.iter().map(|s| (s.uid, s.size)).collect();
    let again: HashSet<u32> = found.size_mismatch.iter().map(|m| m.uid).collect();
    let mut wanted: Vec<u32> = found
        .missing
        .iter()
        .copied()
        .chain(again.iter().copied())
        .collect();
    wanted.sort_unstable();
    let items = wanted
        .iter()
        .map(|u| (*u, size.get(u).copied().unwrap_or(0)))
        .collect();
    let (batches, too_large) = batches(t.account, items);
    report.refused.extend(too_large);
    for uids in batches {
        let (messages, refused) = fetch_bodies(session, &uids).await?;
        report.refused.extend(refused);
        let restored = messages.iter().filter(|m| again.contains(&m.uid)).count();
        let n = t.store_messages(messages).await?;
        report.restored += restored;
        report.stored += n - restored;
    }
    report.refused.sort_unstable();
    Ok(())
}

/// Verifies (and repairs) one mailbox on `session`.
pub async fn verify_mailbox(
    session: &mut Session,
    store: &Store,
    account: &Account,
    mailbox: &str,
    options: Options,
    limits: Limits,
) -> Result<MailboxReport, SyncError> {
    let started = Instant::now();
    let mut report = MailboxReport::new(&account.name, mailbox);
    let info = session.open_mailbox(mailbox, false, None).await?;
    let record = store.mailbox_record(&account.name, mailbox).await?;
    let v = info.uidvalidity;
    report.uidvalidity = Some(v);
    report.checkpoint = record.checkpoint;
    let last_uid = match record.checkpoint {
        Some(cp) if cp.uidvalidity == v => cp.last_uid,
        _ => 0,
    };
    let quarantined: HashSet<u32> = record.quarantined_uids(v).into_iter().collect();
    let t = Target {
        store,
        account,
        mailbox,
        uidvalidity: v,
        limits,
    };
    let (server, stored, eligible) = t.look(session, info.exists).await?;
    let expected = Expected {
        last_uid,
        quarantined: &quarantined,
        eligible: eligible.as_ref(),
    };
    report.found = diff(&server, &stored, expected);
    let mut fixes = options.repair.then(RepairReport::default);
    let mut digests = HashMap::new();
    if options.deep {
        let (deep, d) = deep_check(session, &t, &server, &stored, fixes.as_mut()).await?;
        report.deep = Some(deep);
        digests = d;
    }
    if let Some(fixes) = fixes.as_mut() {
        let found = report.found.clone();
        if found.differences() > 0 {
            repair(session, &t, &found, &server, fixes).await?;
        }
        let changed = found.differences() > 0 || !digests.is_empty();
        report.after = Some(if changed {
            let (server, stored, eligible) = t.look(session, info.exists.max(1)).await?;
            if let Some(deep) = report.deep.as_mut() {
                let now: HashMap<u32, Option<&str>> = stored
                    .iter()
                    .map(|m| (m.uid, m.raw_sha256.as_deref()))
                    .collect();
                deep.remaining = Some(
                    deep.mismatched
                        .iter()
                        .copied()
                        .filter(|u| {
                            now.get(u).copied().flatten() != digests.get(u).map(String::as_str)
                        })
                        .collect(),
                );
            }
            let expected = Expected {
                last_uid,
                quarantined: &quarantined,
                eligible: eligible.as_ref(),
            };
            diff(&server, &stored, expected)
        } else {
            if let Some(deep) = report.deep.as_mut() {
                deep.remaining = Some(Vec::new());
            }
            found
        });
    }
    report.repair = fixes;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The folders folder sync would sync now: the server's LIST through the account's selection
/// (the same plan `mailpump sync` follows).
async fn selected_folders(
    session: &mut Session,
    account: &Account,
) -> Result<Vec<String>, ImapError> {
    let prefix = crate::folders::personal_prefix(&session.namespaces().await?);
    let (lists, _) = session.list_folders().await?;
    let found: Vec<crate::folders::Folder> = lists.iter().map(Into::into).collect();
    let plan = crate::folders::Selection::of(account).plan(&found, prefix.as_deref());
    Ok(plan.synced.keys().cloned().collect())
}

/// Verifies the mailboxes of one account, one after another on one connection (reconnecting
/// after an error that ends the session). `only`: just this mailbox. `logout`: how long
/// LOGOUT may take.
pub async fn verify_account(
    account: &Account,
    store: &Store,
    options: Options,
    limits: Limits,
    only: Option<&str>,
    logout: Duration,
) -> Vec<MailboxReport> {
    let fixed = crate::folders::fixed_mailboxes(account);
    if account.protocol == crate::config::Protocol::Pop3 {
        return fixed
            .unwrap_or_default()
            .iter()
            .filter(|m| only.is_none_or(|o| o == m.as_str()))
            .map(|m| MailboxReport {
                skipped: Some("verify supports IMAP only".into()),
                ..MailboxReport::new(&account.name, m)
            })
            .collect();
    }
    let failed = |mailbox: &str, e: String| MailboxReport {
        error: Some(e),
        ..MailboxReport::new(&account.name, mailbox)
    };
    let mut session = match Session::connect(account).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(account = %account.name, error = %e, "connect_failed");
            let names = fixed.unwrap_or_else(|| vec![only.unwrap_or("*").to_string()]);
            return names
                .iter()
                .filter(|m| only.is_none_or(|o| o == m.as_str()))
                .map(|m| failed(m, e.to_string()))
                .collect();
        }
    };
    let mailboxes = match fixed {
        Some(names) => names,
        None => {
            let Some(s) = session.as_mut() else {
                return Vec::new();
            };
            match selected_folders(s, account).await {
                Ok(mut names) => {
                    if let Some(o) = only {
                        if !names.iter().any(|n| n == o) {
                            let e = format!("not a folder the account's mailboxes/exclude select on the server (selected: {})", names.join(", "));
                            return vec![failed(o, e)];
                        }
                        names.retain(|n| n == o);
                    }
                    names
                }
                Err(e) => {
                    tracing::error!(account = %account.name, error = %e, "folder_list_failed");
                    return vec![failed(only.unwrap_or("*"), e.to_string())];
                }
            }
        }
    };
    let mailboxes: Vec<String> = match only {
        Some(o) => mailboxes.into_iter().filter(|m| m == o).collect(),
        None => mailboxes,
    };
    let mut out = Vec::new();
    for mailbox in &mailboxes {
        let mut s = match session.take() {
            Some(s) => s,
            None => match Session::connect(account).await {
                Ok(s) => s,
                Err(e) => {
                    out.push(failed(mailbox, e.to_string()));
                    continue;
                }
            },
        };
        match verify_mailbox(&mut s, store, account, mailbox, options, limits).await {
            Ok(r) => {
                log(&r);
                out.push(r);
                session = Some(s);
            }
            Err(e) => {
                tracing::error!(account = %account.name, mailbox = %mailbox, error = %e, "mailbox_verify_failed");
                // a mailbox the server will not open leaves the session usable
                if matches!(&e, SyncError::Imap(ImapError::Rejected { command, .. }) if command == "EXAMINE")
                {
                    session = Some(s);
                }
                out.push(failed(mailbox, e.to_string()));
            }
        }
    }
    if let Some(s) = session {
        s.logout(logout.min(account.settings.command_timeout)).await;
    }
    out
}

fn log(r: &MailboxReport) {
    let d = r.after.as_ref().unwrap_or(&r.found);
    tracing::info!(
        account = %r.account,
        mailbox = %r.mailbox,
        ok = r.ok(),
        missing = r.found.missing.len(),
        extra = r.found.extra.len(),
        size_mismatch = r.found.size_mismatch.len(),
        flags_stale = r.found.flags_stale.len(),
        marked_expunged_present = r.found.marked_expunged_present.len(),
        digest_mismatch = r.deep.as_ref().map(|d| d.mismatched.len()),
        remaining = r.after.as_ref().map(|_| d.differences()),
        elapsed_ms = r.elapsed.as_millis() as u64,
        "mailbox_verified"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(uid: u32, size: u64, flags: &[&str]) -> ServerMeta {
        ServerMeta {
            uid,
            size,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    fn doc(uid: u32, size: u64, flags: &[&str], expunged: bool) -> StoredMeta {
        StoredMeta {
            uid,
            size,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            expunged,
            raw_sha256: Some("x".into()),
        }
    }

    fn expected<'a>(last_uid: u32, q: &'a HashSet<u32>) -> Expected<'a> {
        Expected {
            last_uid,
            quarantined: q,
            eligible: None,
        }
    }

    #[test]
    fn a_store_that_matches_has_no_difference() {
        let server = vec![srv(1, 10, &["\\Seen"]), srv(2, 20, &[])];
        let stored = vec![doc(1, 10, &["\\Seen"], false), doc(2, 20, &[], false)];
        let d = diff(&server, &stored, expected(2, &HashSet::new()));
        assert_eq!(d.differences(), 0);
        assert_eq!((d.server_messages, d.stored_messages), (2, 2));
        assert_eq!(d.not_yet_synced, 0);
    }

    #[test]
    fn every_kind_of_difference_is_named_by_uid() {
        let quarantined: HashSet<u32> = [4].into();
        let server = vec![
            srv(1, 10, &[]),                      // stored, fine
            srv(2, 20, &[]),                      // missing
            srv(3, 30, &["\\Seen", "\\Flagged"]), // flags stale
            srv(4, 40, &[]),                      // quarantined
            srv(6, 60, &[]),                      // marked expunged, present
            srv(7, 71, &[]),                      // size mismatch
            srv(9, 90, &[]),                      // above the checkpoint
            srv(10, 90, &[]),                     // above the checkpoint
        ];
        let stored = vec![
            doc(1, 10, &[], false),
            doc(3, 30, &["\\Seen"], false),
            doc(5, 50, &[], false), // extra: expunged on the server, not marked
            doc(6, 60, &[], true),
            doc(7, 70, &[], false),
            doc(8, 80, &[], true), // expunged and marked: fine
        ];
        let d = diff(&server, &stored, expected(8, &quarantined));
        assert_eq!(d.missing, vec![2]);
        assert_eq!(d.quarantined, vec![4]);
        assert_eq!(d.extra, vec![5]);
        assert_eq!(d.marked_expunged_present, vec![6]);
        assert_eq!(
            d.size_mismatch,
            vec![SizeMismatch {
                uid: 7,
                stored: 70,
                server: 71
            }]
        );
        assert_eq!(d.flags_stale.len(), 1);
        assert_eq!(d.flags_stale[0].uid, 3);
        assert_eq!(d.not_yet_synced, 2);
        assert_eq!(d.differences(), 5);
        assert_eq!(d.stored_messages, 4);
    }

    #[test]
    fn flags_compare_as_sets_without_case_and_without_recent() {
        let server = vec![srv(1, 1, &["\\Seen", "$Label1", "\\Recent"])];
        let stored = vec![doc(1, 1, &["$label1", "\\SEEN"], false)];
        assert_eq!(
            diff(&server, &stored, expected(1, &HashSet::new())).differences(),
            0
        );
        assert_eq!(
            archived_flags(&["\\Recent".into(), "\\Seen".into()]),
            vec!["\\Seen".to_string()]
        );
    }

    #[test]
    fn uids_the_sync_search_does_not_match_are_not_missing() {
        let eligible: HashSet<u32> = [2].into();
        let q = HashSet::new();
        let server = vec![srv(1, 1, &["\\Seen"]), srv(2, 1, &[])];
        let d = diff(
            &server,
            &[],
            Expected {
                last_uid: 2,
                quarantined: &q,
                eligible: Some(&eligible),
            },
        );
        assert_eq!(d.missing, vec![2]);
    }

    #[test]
    fn a_never_synced_mailbox_is_all_not_yet_synced() {
        let server: Vec<ServerMeta> = (1..=5).map(|u| srv(u, 1, &[])).collect();
        let d = diff(&server, &[], expected(0, &HashSet::new()));
        assert_eq!((d.not_yet_synced, d.differences()), (5, 0));
    }

    #[test]
    fn a_large_mailbox_compares_in_linear_time() {
        let server: Vec<ServerMeta> = (1..=200_000).map(|u| srv(u, 100, &["\\Seen"])).collect();
        let stored: Vec<StoredMeta> = (1..=200_000)
            .filter(|u| u % 1000 != 0)
            .map(|u| doc(u, 100, &["\\Seen"], false))
            .collect();
        let d = diff(&server, &stored, expected(200_000, &HashSet::new()));
        assert_eq!(d.missing.len(), 200);
        assert_eq!(d.differences(), 200);
    }

    #[test]
    fn the_report_is_ok_only_when_nothing_is_left_to_repair() {
        let mut r = MailboxReport::new("a", "INBOX");
        assert!(r.ok());
        r.found.missing = vec![3];
        assert!(!r.ok());
        r.after = Some(Diff::default());
        assert!(r.ok(), "repaired");
        r.deep = Some(DeepReport {
            mismatched: vec![4],
            remaining: Some(vec![4]),
            ..Default::default()
        });
        assert!(!r.ok());
        r.error = Some("x".into());
        assert!(!r.ok());
        let skipped = MailboxReport {
            skipped: Some("verify supports IMAP only".into()),
            ..MailboxReport::new("p", "INBOX")
        };
        assert!(skipped.ok());
    }
}
