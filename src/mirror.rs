//! The catch-up pass's second job: keeping the stored documents a mirror of the messages
//! already stored, not a snapshot of them. After the mailbox is opened, [`follow`] finds what
//! changed since the last pass and writes it (`Store::apply_flags`, `Store::mark_expunged`):
//!
//! - **QRESYNC** (Dovecot, Cyrus): the EXAMINE itself carries `(QRESYNC (uidvalidity
//!   modseq))` from the stored HIGHESTMODSEQ, and the server answers with every flag change
//!   (FETCH with UID and MODSEQ) and every expunge (`VANISHED (EARLIER)`) since: one round
//!   trip when nothing changed.
//! - **CONDSTORE** only (Gmail): `UID FETCH 1:last (UID FLAGS) (CHANGEDSINCE modseq)` when
//!   the mailbox's HIGHESTMODSEQ moved; expunges by comparing UIDs (below) once per session,
//!   after an EXPUNGE, when an opening found the mailbox shrunk without one (an expunge
//!   while it was being opened again: `Session::open_mailbox` asks for the comparison) and
//!   every `flag_scan_interval`.
//! - **Neither** (Courier): every `flag_scan_interval`, all flags (`UID FETCH a:b (UID FLAGS)`
//!   in chunks) compared with the stored ones, and `UID SEARCH ALL` compared with the stored
//!   UIDs; the UID comparison also runs after any EXPUNGE the server announced, and when the
//!   mailbox shrank without one.
//!
//! Changes announced while idling or inside any other response are collected by the session
//! (`imap::Changes`) and written at the start of the next pass ([`apply_pending`]), before the
//! mailbox is opened again. The stored HIGHESTMODSEQ moves only after everything up to it is
//! written, so a pass that fails midway is simply repeated.
//!
//! **Rule:** a UID comparison runs only on a consistent answer: `UID SEARCH ALL` must return
//! at least as many UIDs as EXAMINE's EXISTS (a server that answers a short or empty list for
//! a mailbox full of messages marks nothing).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::config::Account;
use crate::imap::changes::in_ranges;
use crate::imap::{Changes, MailboxInfo, Session};
use crate::pipeline::SyncError;
use crate::store::{FlagChange, MailboxRecord, Store, StoredMeta};

/// Stored documents per page of a full flag read or UID comparison (one read of the stored
/// documents and one `UID FETCH first:last (UID FLAGS)` each): memory stays bounded.
const SCAN_CHUNK: u32 = 20_000;
/// VANISHED ranges up to this many UIDs are expanded; wider ones are met with the stored UIDs.
const EXPAND_VANISHED: usize = 100_000;

/// What one [`follow`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MirrorReport {
    /// Documents whose flags changed.
    pub flags: usize,
    /// Documents marked expunged (or removed).
    pub expunged: usize,
    /// Documents whose expunge mark was wrong (the server has the UID after all).
    pub restored: usize,
    /// A full flag read (and UID comparison) ran.
    pub scanned: bool,
}

/// Writes what the server announced about the mailbox selected until now (which may be
/// another one than the pass is about to open): call before opening a mailbox and before
/// UNSELECT.
pub async fn apply_pending(
    session: &mut Session,
    store: &Store,
    account: &str,
) -> Result<MirrorReport, SyncError> {
    let Some((mailbox, uidvalidity, changes)) = session.take_changes().await? else {
        return Ok(MirrorReport::default());
    };
    let mut report = MirrorReport::default();
    write_changes(store, account, &mailbox, uidvalidity, &changes, &mut report).await?;
    if changes.overflow {
        // more than was held: the next pass reads every flag
        store.clear_flags_scanned(account, &mailbox).await?;
    } else if changes.expunged {
        // which messages went is only known by comparing UIDs: the next pass over this
        // mailbox in this session does it
        session.compare_due(&mailbox);
    }
    log(account, &mailbox, &report);
    Ok(report)
}

/// After the mailbox was opened (with `resync` from `record` where the session has QRESYNC):
/// finds and writes what changed among the messages up to `last_uid`.
pub async fn follow(
    session: &mut Session,
    store: &Store,
    account: &Account,
    mailbox: &str,
    info: &MailboxInfo,
    record: &MailboxRecord,
    last_uid: u32,
) -> Result<MirrorReport, SyncError> {
    let name = account.name.as_str();
    let mut report = MirrorReport::default();
    let uidvalidity = info.uidvalidity;
    let same = record
        .checkpoint
        .is_some_and(|cp| cp.uidvalidity == uidvalidity);
    let stored_modseq = record.highest_modseq.filter(|_| same);
    // what the EXAMINE brought (QRESYNC), or nothing
    let mut changes = match session.take_changes().await? {
        Some((m, v, c)) if m == mailbox && v == uidvalidity => c,
        _ => Changes::default(),
    };
    // a report too large to hold is not trusted: every flag is read and UIDs compared
    let resynced = info.resynced && stored_modseq.is_some() && !changes.overflow;
    let scan_due = record.flags_scanned_at.is_none_or(|at| {
        (chrono::Utc::now() - at).to_std().unwrap_or_default()
            >= account.settings.flag_scan_interval
    });
    let started = Instant::now();
    if last_uid > 0 {
        let mut read_all_flags = false;
        match (info.highest_modseq, stored_modseq) {
            _ if changes.overflow => read_all_flags = true,
            (Some(_), Some(_)) if resynced => {}
            // HIGHESTMODSEQ went back (an index rebuilt without a new UIDVALIDITY), or
            // nothing was ever known: the MODSEQs say nothing, read every flag
            (Some(now), Some(before)) if now < before || before == 0 => read_all_flags = true,
            (Some(now), Some(before)) if now > before => {
                for c in session.flags_changed_since(last_uid, before).await? {
                    changes.flags.insert(c.uid, (c.flags, c.modseq));
                }
            }
            (Some(_), Some(_)) => {}
            // CONDSTORE but nothing stored yet (a first pass, or an upgrade), or no CONDSTORE
            // and the scan due: read every flag
            (Some(_), None) => read_all_flags = true,
            (None, _) => read_all_flags = scan_due || changes.overflow,
        }
        // without QRESYNC nothing names what was expunged while nobody watched: compare UIDs
        // once per session, after an EXPUNGE, and at every flag scan
        let first_look = session.first_look(mailbox);
        let asked = session.take_compare_due(mailbox);
        let compare_uids = !resynced
            && (first_look
                || asked
                || changes.expunged
                || changes.overflow
                || scan_due
                || read_all_flags);
        let server_uids = if compare_uids {
            let uids = session.all_uids().await?;
            if (uids.len() as u64) < info.exists as u64 {
                tracing::warn!(
                    account = name,
                    mailbox,
                    exists = info.exists,
                    listed = uids.len(),
                    "uid_comparison_skipped"
                );
                None
            } else if uids.first().is_none_or(|u| *u > last_uid) {
                // Not one stored message left: a folder emptied, or a server whose store is
                // missing (unmounted, rebuilding) that still answers. Believed only when a
                // comparison at least `flag_scan_interval` later says the same.
                let confirmed = record.all_gone_since.is_some_and(|t| {
                    (chrono::Utc::now() - t).to_std().unwrap_or_default()
                        >= account.settings.flag_scan_interval
                });
                if confirmed {
                    store.set_all_gone(name, mailbox, false).await?;
                    Some(uids)
                } else {
                    if record.all_gone_since.is_none() {
                        store.set_all_gone(name, mailbox, true).await?;
                    }
                    tracing::warn!(
                        account = name,
                        mailbox,
                        exists = info.exists,
                        "expunge_withheld"
                    );
                    None
                }
            } else {
                if record.all_gone_since.is_some() {
                    store.set_all_gone(name, mailbox, false).await?;
                }
                Some(uids)
            }
        } else {
            None
        };
        let wide_vanished = changes.vanished_uids(EXPAND_VANISHED).is_none();
        let vanished = if wide_vanished {
            changes.vanished_ranges()
        } else {
            Vec::new()
        };
        write_changes(store, name, mailbox, uidvalidity, &changes, &mut report).await?;
        if read_all_flags || server_uids.is_some() || wide_vanished {
            // page by page of stored documents, so that memory stays bounded whatever the
            // mailbox's size and however sparse its UIDs
            let mut after = 0u32;
            loop {
                let stored = store
                    .stored_meta_page(name, mailbox, uidvalidity, after, last_uid, SCAN_CHUNK)
                    .await?;
                let (Some(first), Some(last)) = (stored.first(), stored.last()) else {
                    break;
                };
                let (from, to) = (first.uid, last.uid);
                if read_all_flags {
                    let server = session.flags_between(from, to).await?;
                    let changed = changed_flags(&stored, server);
                    report.flags += store
                        .apply_flags(name, mailbox, uidvalidity, &changed)
                        .await?;
                }
                if let Some(server) = &server_uids {
                    let lo = server.partition_point(|u| *u < from);
                    let hi = server.partition_point(|u| *u <= to);
                    let (gone, back) = compare(&stored, &server[lo..hi], to);
                    report.expunged += store
                        .mark_expunged(name, mailbox, uidvalidity, &gone)
                        .await?;
                    report.restored += store
                        .unmark_expunged(name, mailbox, uidvalidity, &back)
                        .await?;
                }
                if wide_vanished {
                    let gone: Vec<u32> = stored
                        .iter()
                        .filter(|m| !m.expunged && in_ranges(&vanished, m.uid))
                        .map(|m| m.uid)
                        .collect();
                    report.expunged += store
                        .mark_expunged(name, mailbox, uidvalidity, &gone)
                        .await?;
                }
                if stored.len() < SCAN_CHUNK as usize || to >= last_uid {
                    break;
                }
                after = to;
            }
            report.scanned = read_all_flags || server_uids.is_some();
        }
    }
    if let Some(m) = info.highest_modseq {
        if stored_modseq != Some(m) {
            store
                .set_highest_modseq(name, mailbox, uidvalidity, m)
                .await?;
        }
    }
    if report.scanned || (last_uid == 0 && record.flags_scanned_at.is_none()) {
        store.set_flags_scanned(name, mailbox, uidvalidity).await?;
    }
    if report.scanned {
        tracing::info!(
            account = name,
            mailbox,
            last_uid,
            flags = report.flags,
            expunged = report.expunged,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "flags_scanned"
        );
    }
    log(name, mailbox, &report);
    Ok(report)
}

/// Writes the flag changes and the (expanded) vanished UIDs of `changes`.
async fn write_changes(
    store: &Store,
    account: &str,
    mailbox: &str,
    uidvalidity: u32,
    changes: &Changes,
    report: &mut MirrorReport,
) -> Result<(), SyncError> {
    let flags: Vec<FlagChange> = changes
        .flags
        .iter()
        .map(|(uid, (flags, modseq))| FlagChange {
            uid: *uid,
            flags: flags.clone(),
            modseq: *modseq,
        })
        .collect();
    report.flags += store
        .apply_flags(account, mailbox, uidvalidity, &flags)
        .await?;
    if let Some(gone) = changes.vanished_uids(EXPAND_VANISHED) {
        report.expunged += store
            .mark_expunged(account, mailbox, uidvalidity, &gone)
            .await?;
    }
    Ok(())
}

fn log(account: &str, mailbox: &str, r: &MirrorReport) {
    if r.flags + r.expunged + r.restored > 0 {
        tracing::info!(
            account,
            mailbox,
            flags = r.flags,
            expunged = r.expunged,
            restored = r.restored,
            "changes_applied"
        );
    }
}

/// The flags of `server` that differ (as sets) from the stored ones.
fn changed_flags(stored: &[StoredMeta], server: Vec<FlagChange>) -> Vec<FlagChange> {
    let by_uid: HashMap<u32, &StoredMeta> = stored.iter().map(|m| (m.uid, m)).collect();
    server
        .into_iter()
        .filter(|c| {
            by_uid.get(&c.uid).is_some_and(|m| {
                let a: HashSet<&str> = m.flags.iter().map(String::as_str).collect();
                let b: HashSet<&str> = c.flags.iter().map(String::as_str).collect();
                a != b
            })
        })
        .collect()
}

/// Stored UIDs (up to `last_uid`) the server no longer has and that are not marked yet, and
/// marked ones it has after all.
fn compare(stored: &[StoredMeta], server: &[u32], last_uid: u32) -> (Vec<u32>, Vec<u32>) {
    let on_server: HashSet<u32> = server.iter().copied().collect();
    let mut gone = Vec::new();
    let mut back = Vec::new();
    for m in stored.iter().filter(|m| m.uid <= last_uid) {
        match (m.expunged, on_server.contains(&m.uid)) {
            (false, false) => gone.push(m.uid),
            (true, true) => back.push(m.uid),
            _ => {}
        }
    }
    (gone, back)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uid: u32, flags: &[&str], expunged: bool) -> StoredMeta {
        StoredMeta {
            uid,
            size: 1,
            flags: flags.iter().map(|s| s.to_string()).collect(),
            expunged,
            raw_sha256: None,
        }
    }

    #[test]
    fn flags_compare_as_sets() {
        let stored = vec![
            meta(1, &["\\Seen", "\\Flagged"], false),
            meta(2, &[], false),
        ];
        let server = vec![
            FlagChange {
                uid: 1,
                flags: vec!["\\Flagged".into(), "\\Seen".into()],
                modseq: None,
            },
            FlagChange {
                uid: 2,
                flags: vec!["\\Seen".into()],
                modseq: None,
            },
            // not stored (above the checkpoint, or quarantined): nothing to change
            FlagChange {
                uid: 3,
                flags: vec![],
                modseq: None,
            },
        ];
        let changed = changed_flags(&stored, server);
        assert_eq!(changed.iter().map(|c| c.uid).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn the_uid_comparison_marks_what_went_and_unmarks_what_came_back() {
        let stored = vec![
            meta(1, &[], false),
            meta(2, &[], false),
            meta(3, &[], true),
            meta(4, &[], true),
            meta(9, &[], false),
        ];
        let (gone, back) = compare(&stored, &[1, 3, 10], 9);
        assert_eq!(gone, vec![2, 9]);
        assert_eq!(back, vec![3]);
        // UIDs above the checkpoint are never judged
        let (gone, _) = compare(&stored, &[1, 2], 2);
        assert!(gone.is_empty());
    }
}
