//! `mailpump status [--json]`: one line per mailbox, from the database only (no IMAP, no
//! writes), so it can run beside a daemon elsewhere.
//!
//! The mailboxes are the configured ones, in config order, then those the database still knows
//! (`mailboxes` documents, stored messages) that are no longer configured, marked so. A mailbox
//! is failing when its state is `error` or `backoff`, or it has a `last_error`, written after
//! its `last_success_at` (or with no success recorded): see
//! [`crate::store::MailboxSummary::is_failing`]. Failing UIDs (counted but not quarantined) are
//! shown but fail nothing by themselves: they hold only their own messages back.
//!
//! Output: an aligned table, or with `--json` one JSON object per line (JSON Lines: one per
//! mailbox, for `jq`). Returns false (exit 1) when any mailbox is failing or the database
//! cannot be read.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use crate::config::Config;
use crate::store::{MailboxSummary, Store};

/// One line of the report.
#[derive(Debug, Clone)]
struct Row {
    configured: bool,
    summary: MailboxSummary,
    messages: u64,
}

impl Row {
    fn failing(&self) -> bool {
        self.summary.is_failing()
    }

    fn to_json(&self) -> serde_json::Value {
        let s = &self.summary;
        json!({
            "account": s.account,
            "mailbox": s.mailbox,
            "configured": self.configured,
            "ok": !self.failing(),
            "state": s.state,
            "uidvalidity": s.uidvalidity,
            "last_uid": s.last_uid,
            "messages": self.messages,
            "last_success_at": s.last_success_at.map(time),
            "last_error": s.last_error,
            "last_error_at": s.last_error_at.map(time),
            "quarantined": s.quarantined,
            "failing_uids": s.failing_uids,
        })
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The rows: configured mailboxes first (config order), then the ones only the database knows.
fn rows(
    config: &Config,
    summaries: Vec<MailboxSummary>,
    counts: &HashMap<(String, String), u64>,
) -> Vec<Row> {
    let mut by_id: HashMap<(String, String), MailboxSummary> = summaries
        .into_iter()
        .map(|s| ((s.account.clone(), s.mailbox.clone()), s))
        .collect();
    let row = |key: (String, String), configured: bool, by_id: &mut HashMap<_, _>| Row {
        configured,
        messages: counts.get(&key).copied().unwrap_or(0),
        summary: by_id.remove(&key).unwrap_or_else(|| MailboxSummary {
            account: key.0.clone(),
            mailbox: key.1.clone(),
            ..Default::default()
        }),
    };
    let mut out = Vec::new();
    for account in &config.accounts {
        for mailbox in &account.mailboxes {
            out.push(row(
                (account.name.clone(), mailbox.clone()),
                true,
                &mut by_id,
            ));
        }
    }
    let rest: BTreeSet<(String, String)> = by_id.keys().chain(counts.keys()).cloned().collect();
    for key in rest {
        if !out
            .iter()
            .any(|r| (&r.summary.account, &r.summary.mailbox) == (&key.0, &key.1))
        {
            out.push(row(key, false, &mut by_id));
        }
    }
    out
}

/// The aligned table, header first.
fn table(rows: &[Row]) -> String {
    let dash = || "-".to_string();
    let mut lines = vec![[
        "".to_string(),
        "MAILBOX".into(),
        "STATE".into(),
        "UIDVALIDITY".into(),
        "LAST_UID".into(),
        "MESSAGES".into(),
        "LAST_SUCCESS".into(),
        "QUARANTINED".into(),
        "FAILING_UIDS".into(),
        "LAST_ERROR".into(),
    ]];
    for r in rows {
        let s = &r.summary;
        let mut name = format!("{}/{}", s.account, s.mailbox);
        if !r.configured {
            name.push_str(" (not configured)");
        }
        lines.push([
            if r.failing() { "FAIL" } else { "ok" }.to_string(),
            name,
            s.state.clone().unwrap_or_else(dash),
            s.uidvalidity.map_or_else(dash, |v| v.to_string()),
            s.last_uid.map_or_else(dash, |v| v.to_string()),
            r.messages.to_string(),
            s.last_success_at.map_or_else(dash, time),
            s.quarantined.to_string(),
            s.failing_uids.to_string(),
            s.last_error.clone().unwrap_or_else(dash),
        ]);
    }
    let mut widths = [0usize; 10];
    widths[0] = "FAIL".len();
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            if i + 1 == line.len() {
                text.push_str(cell); // the error, last and unpadded
            } else {
                let pad = w - cell.chars().count();
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// `mailpump status`: prints the report; true when no mailbox is failing.
pub async fn status(config: &Config, json: bool) -> bool {
    let read = async {
        let store = Store::connect_read_only(&config.store).await?;
        let result = async {
            Ok((
                store.mailbox_summaries().await?,
                store.message_counts().await?,
            ))
        }
        .await;
        store.shutdown(super::STORE_SHUTDOWN).await;
        result
    };
    let (summaries, counts) = match read.await {
        Ok(found) => found,
        Err::<_, crate::store::StoreError>(e) => {
            eprintln!(
                "mailpump status: cannot read database {:?}: {e}",
                config.store.database
            );
            return false;
        }
    };
    let rows = rows(config, summaries, &counts);
    if json {
        for r in &rows {
            println!("{}", r.to_json());
        }
    } else {
        print!("{}", table(&rows));
    }
    !rows.iter().any(Row::failing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned_and_marks_failing_and_unconfigured_mailboxes() {
        let ok = Row {
            configured: true,
            messages: 12,
            summary: MailboxSummary {
                account: "work".into(),
                mailbox: "INBOX".into(),
                state: Some("idle".into()),
                uidvalidity: Some(7),
                last_uid: Some(12),
                last_success_at: DateTime::from_timestamp(1_700_000_000, 0),
                ..Default::default()
            },
        };
        let gone = Row {
            configured: false,
            messages: 3,
            summary: MailboxSummary {
                account: "old".into(),
                mailbox: "Archive/2020".into(),
                state: Some("error".into()),
                last_error: Some("connection refused".into()),
                ..Default::default()
            },
        };
        let text = table(&[ok.clone(), gone.clone()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("ok    work/INBOX "), "{text}");
        assert!(
            lines[2].starts_with("FAIL  old/Archive/2020 (not configured)  error"),
            "{text}"
        );
        assert!(lines[2].ends_with("connection refused"), "{text}");
        let col = |l: &str| {
            l.find("STATE")
                .or_else(|| l.find("idle"))
                .or_else(|| l.find("error"))
        };
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));
        assert!(lines[1].contains("2023-11-14T22:13:20Z"));
        let j = gone.to_json();
        assert_eq!(j["configured"], false);
        assert_eq!(j["ok"], false);
        assert_eq!(j["messages"], 3);
        assert_eq!(j["last_uid"], serde_json::Value::Null);
    }
}
