//! `mailpump verify [--account A] [--mailbox M] [--repair] [--deep] [--json]`: the report of
//! [`crate::verify`], one mailbox per line, in config order.
//!
//! Accounts are verified side by side, each on one IMAP connection (mailboxes one after
//! another), so no account holds more than one connection whatever its `max_connections`.
//! Without `--repair` the store is only read (`Store::connect_read_only`: no index is created).
//!
//! Text: `✓`/`✗` (`-` for a skipped POP3 account), the mailbox and its counts, then a detail
//! line per kind of difference (at most [`SHOWN`] UIDs each). `--json`: one JSON object per
//! mailbox per line (JSON Lines, like `status --json`), each UID list capped at
//! [`MAX_LISTED`] with a `truncated` flag. Logs go to stderr.
//!
//! Exit code: 0 when every verified mailbox matches (after `--repair`: when everything was
//! repaired), 1 otherwise (a difference, an error), 64 for an `--account` or `--mailbox`
//! the config does not name.

use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::store::Store;
use crate::verify::{self, Diff, MailboxReport, Options};

/// UIDs per list in the JSON output.
pub const MAX_LISTED: usize = 1000;
/// UIDs per detail line in the text output.
pub const SHOWN: usize = 20;
const EX_USAGE: u8 = 64;

/// What the command line asked for.
#[derive(Debug, Clone, Default)]
pub struct VerifyArgs {
    pub account: Option<String>,
    pub mailbox: Option<String>,
    pub options: Options,
    pub json: bool,
}

fn uid_list(uids: &[u32]) -> Value {
    json!({
        "count": uids.len(),
        "uids": &uids[..uids.len().min(MAX_LISTED)],
        "truncated": uids.len() > MAX_LISTED,
    })
}

fn diff_json(d: &Diff) -> Value {
    let sizes: Vec<u32> = d.size_mismatch.iter().map(|m| m.uid).collect();
    let flags: Vec<u32> = d.flags_stale.iter().map(|f| f.uid).collect();
    json!({
        "differences": d.differences(),
        "server_messages": d.server_messages,
        "stored_messages": d.stored_messages,
        "not_yet_synced": d.not_yet_synced,
        "missing": uid_list(&d.missing),
        "extra": uid_list(&d.extra),
        "size_mismatch": uid_list(&sizes),
        "flags_stale": uid_list(&flags),
        "marked_expunged_present": uid_list(&d.marked_expunged_present),
        "quarantined": uid_list(&d.quarantined),
    })
}

/// One mailbox as a JSON object: what was found (top level), and after `--repair` what was
/// done (`repair`) and what the comparison made again says (`after`).
pub fn to_json(r: &MailboxReport) -> Value {
    let mut v = diff_json(&r.found);
    let o = v.as_object_mut().expect("diff_json builds an object");
    let extra = json!({
        "account": r.account,
        "mailbox": r.mailbox,
        "ok": r.ok(),
        "uidvalidity": r.uidvalidity,
        "checkpoint": r.checkpoint.map(|c| json!({"uidvalidity": c.uidvalidity, "last_uid": c.last_uid})),
        "uidvalidity_changed": r.uidvalidity_changed(),
        "digest_mismatch": r.deep.as_ref().map(|d| uid_list(&d.mismatched)),
        "deep": r.deep.as_ref().map(|d| json!({
            "checked": d.checked,
            "unread": uid_list(&d.unread),
            "remaining": d.remaining.as_deref().map(uid_list),
        })),
        "repair": r.repair.as_ref().map(|f| json!({
            "stored": f.stored,
            "restored": f.restored,
            "flags_fixed": f.flags_fixed,
            "marked_expunged": f.marked_expunged,
            "unmarked": f.unmarked,
            "refused": uid_list(&f.refused),
        })),
        "after": r.after.as_ref().map(diff_json),
        "error": r.error,
        "skipped": r.skipped,
        "elapsed_ms": r.elapsed.as_millis() as u64,
    });
    if let Value::Object(extra) = extra {
        o.extend(extra);
    }
    v
}

fn shown(uids: impl Iterator<Item = u32>, total: usize) -> String {
    let mut text: Vec<String> = uids.take(SHOWN).map(|u| u.to_string()).collect();
    if total > SHOWN {
        text.push(format!("… and {} more", total - SHOWN));
    }
    text.join(" ")
}

fn counts(d: &Diff) -> String {
    format!(
        "missing {}, extra {}, size {}, flags {}, marked expunged but present {}",
        d.missing.len(),
        d.extra.len(),
        d.size_mismatch.len(),
        d.flags_stale.len(),
        d.marked_expunged_present.len()
    )
}

/// One mailbox as text: the ✓/✗ line, then detail lines.
pub fn to_text(r: &MailboxReport) -> String {
    let name = format!("{}/{}", r.account, r.mailbox);
    if let Some(why) = &r.skipped {
        return format!("-  {name}  skipped: {why}\n");
    }
    let mark = if r.ok() { "✓" } else { "✗" };
    if let Some(e) = &r.error {
        return format!("{mark}  {name}  error: {e}\n");
    }
    let d = &r.found;
    let mut out = format!(
        "{mark}  {name}  {}; {} on the server, {} stored, {} not yet synced, {} quarantined",
        counts(d),
        d.server_messages,
        d.stored_messages,
        d.not_yet_synced,
        d.quarantined.len()
    );
    if let Some(deep) = &r.deep {
        out.push_str(&format!(
            "; deep: {} checked, {} digest mismatch",
            deep.checked,
            deep.mismatched.len()
        ));
    }
    out.push('\n');
    let mut line = |label: &str, text: String| out.push_str(&format!("    {label}: {text}\n"));
    if r.uidvalidity_changed() {
        if let (Some(cp), Some(v)) = (r.checkpoint, r.uidvalidity) {
            line(
                "uidvalidity changed",
                format!(
                    "stored {}, server {v}: the next sync starts this mailbox again",
                    cp.uidvalidity
                ),
            );
        }
    }
    if !d.missing.is_empty() {
        line("missing", shown(d.missing.iter().copied(), d.missing.len()));
    }
    if !d.extra.is_empty() {
        line(
            "extra (expunged on the server, not marked)",
            shown(d.extra.iter().copied(), d.extra.len()),
        );
    }
    if !d.marked_expunged_present.is_empty() {
        let m = &d.marked_expunged_present;
        line(
            "marked expunged but present",
            shown(m.iter().copied(), m.len()),
        );
    }
    for m in d.size_mismatch.iter().take(SHOWN) {
        line(
            "size mismatch",
            format!(
                "uid {} stored {} bytes, server {}",
                m.uid, m.stored, m.server
            ),
        );
    }
    for f in d.flags_stale.iter().take(SHOWN) {
        line(
            "flags stale",
            format!(
                "uid {} stored ({}), server ({})",
                f.uid,
                f.stored.join(" "),
                f.server.join(" ")
            ),
        );
    }
    let more =
        d.size_mismatch.len().saturating_sub(SHOWN) + d.flags_stale.len().saturating_sub(SHOWN);
    if more > 0 {
        line("and", format!("{more} more size or flag differences"));
    }
    if !d.quarantined.is_empty() {
        line(
            "quarantined (not stored; sync --retry-quarantined tries them)",
            shown(d.quarantined.iter().copied(), d.quarantined.len()),
        );
    }
    if let Some(deep) = &r.deep {
        if !deep.mismatched.is_empty() {
            line(
                "digest mismatch",
                shown(deep.mismatched.iter().copied(), deep.mismatched.len()),
            );
        }
        if !deep.unread.is_empty() {
            line(
                "not compared (refused or too large to fetch)",
                shown(deep.unread.iter().copied(), deep.unread.len()),
            );
        }
    }
    if let Some(f) = &r.repair {
        line(
            "repaired",
            format!(
                "stored {}, stored again {}, flags fixed {}, marked expunged {}, unmarked {}",
                f.stored, f.restored, f.flags_fixed, f.marked_expunged, f.unmarked
            ),
        );
        if !f.refused.is_empty() {
            line(
                "the server refused",
                shown(f.refused.iter().copied(), f.refused.len()),
            );
        }
    }
    if let Some(after) = &r.after {
        let deep_left = r
            .deep
            .as_ref()
            .and_then(|d| d.remaining.as_ref())
            .map_or(0, Vec::len);
        line(
            "after repair",
            format!("{}, digest mismatch {deep_left}", counts(after)),
        );
    }
    out
}

/// `mailpump verify`: prints the report; the exit code.
pub async fn verify(config: &Config, args: VerifyArgs) -> u8 {
    let accounts: Vec<_> = config
        .accounts
        .iter()
        .filter(|a| args.account.as_deref().is_none_or(|n| n == a.name))
        .cloned()
        .collect();
    if accounts.is_empty() {
        let known: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        eprintln!(
            "mailpump verify: no account {:?} in the config (known: {})",
            args.account.as_deref().unwrap_or(""),
            known.join(", ")
        );
        return EX_USAGE;
    }
    if let Some(m) = &args.mailbox {
        // fixed accounts name their mailboxes in the config; folder-sync accounts learn theirs
        // from the server, so a name only they might have is checked there
        let possible = accounts
            .iter()
            .any(|a| crate::folders::fixed_mailboxes(a).is_none_or(|names| names.contains(m)));
        if !possible {
            eprintln!("mailpump verify: no configured mailbox {m:?} in the selected accounts");
            return EX_USAGE;
        }
    }
    let connect = if args.options.repair {
        Store::connect(&config.store).await
    } else {
        Store::connect_read_only(&config.store).await
    };
    let store = match connect {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "store_unreachable");
            eprintln!(
                "mailpump verify: cannot reach database {:?}: {e}",
                config.store.database
            );
            return 1;
        }
    };
    let limits = super::limits(config);
    let mut tasks = JoinSet::new();
    for (i, account) in accounts.into_iter().enumerate() {
        let (store, mailbox, options) = (store.clone(), args.mailbox.clone(), args.options);
        tasks.spawn(async move {
            let only = mailbox.as_deref().filter(|m| {
                crate::folders::fixed_mailboxes(&account)
                    .is_none_or(|names| names.iter().any(|n| n == *m))
            });
            if mailbox.is_some() && only.is_none() {
                return (i, Vec::new()); // this account has no such mailbox
            }
            let reports = verify::verify_account(
                &account,
                &store,
                options,
                limits,
                only,
                super::LOGOUT_TIMEOUT,
            )
            .await;
            (i, reports)
        });
    }
    let mut results = Vec::new();
    let mut all_ok = true;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => results.push(r),
            Err(e) => {
                tracing::error!(error = %e, "verify_task_panicked");
                all_ok = false;
            }
        }
    }
    store.shutdown(super::STORE_SHUTDOWN).await;
    results.sort_by_key(|(i, _)| *i);
    for report in results.iter().flat_map(|(_, r)| r) {
        all_ok &= report.ok();
        if args.json {
            println!("{}", to_json(report));
        } else {
            print!("{}", to_text(report));
        }
    }
    if all_ok {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Checkpoint;
    use crate::verify::{RepairReport, StaleFlags};

    #[test]
    fn json_names_each_difference_and_caps_the_lists() {
        let r = MailboxReport {
            account: "a".into(),
            mailbox: "INBOX".into(),
            uidvalidity: Some(7),
            checkpoint: Some(Checkpoint {
                uidvalidity: 7,
                last_uid: 5000,
            }),
            found: Diff {
                missing: (1..=1500).collect(),
                flags_stale: vec![StaleFlags {
                    uid: 3,
                    stored: vec![],
                    server: vec!["\\Seen".into()],
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let j = to_json(&r);
        assert_eq!(j["ok"], false);
        assert_eq!(j["missing"]["count"], 1500);
        assert_eq!(j["missing"]["uids"].as_array().unwrap().len(), MAX_LISTED);
        assert_eq!(j["missing"]["truncated"], true);
        assert_eq!(j["flags_stale"]["uids"], json!([3]));
        assert_eq!(j["extra"]["count"], 0);
        assert_eq!(j["differences"], 1501);
        assert_eq!(j["checkpoint"]["last_uid"], 5000);
        assert_eq!(j["digest_mismatch"], Value::Null);
        assert_eq!(j["repair"], Value::Null);
        let text = to_text(&r);
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("✗  a/INBOX  missing 1500,"), "{text}");
        assert!(text.contains("    missing: 1 2 3 "), "{text}");
        assert!(text.contains("… and 1480 more"), "{text}");
        assert!(
            text.contains("flags stale: uid 3 stored (), server (\\Seen)"),
            "{text}"
        );
    }

    #[test]
    fn a_repaired_mailbox_is_ok_and_says_what_was_done() {
        let r = MailboxReport {
            account: "a".into(),
            mailbox: "INBOX".into(),
            found: Diff {
                missing: vec![2],
                ..Default::default()
            },
            repair: Some(RepairReport {
                stored: 1,
                ..Default::default()
            }),
            after: Some(Diff::default()),
            ..Default::default()
        };
        assert!(to_text(&r).starts_with("✓  a/INBOX  missing 1,"));
        assert!(to_text(&r).contains("repaired: stored 1,"));
        let j = to_json(&r);
        assert_eq!(
            (j["ok"].clone(), j["after"]["differences"].clone()),
            (json!(true), json!(0))
        );
        assert_eq!(j["repair"]["stored"], 1);
    }
}
