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
//! A configured mailbox is also *stale* when its last success is older than `--stale-after`
//! (default `auto`: three of its account's wake-up periods, 30 min with the defaults; a
//! running daemon records a success at least once per period): the daemon is not running, or
//! its task for that mailbox is stuck. Use `--stale-after 2d` when only a daily `sync` runs,
//! `off` to judge errors only.
//!
//! Output: an aligned table, or with `--json` one JSON object per line (JSON Lines: one per
//! mailbox, for `jq`). Returns false (exit 1) when any configured mailbox is failing or stale,
//! or the database cannot be read.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use std::time::Duration;

use crate::config::{Account, Config};
use crate::mailbox::SUCCESS_EVERY;
use crate::store::{MailboxSummary, Store};

/// One line of the report.
#[derive(Debug, Clone)]
struct Row {
    configured: bool,
    summary: MailboxSummary,
    messages: u64,
    /// No successful pass for longer than the staleness limit: nothing is running for it.
    stale: bool,
    /// `[cluster]`: the replica whose lease covers the mailbox, and since when (None: nobody
    /// holds it, or no cluster).
    holder: Option<Holder>,
}

/// A lease's holder (instance name) and since when it holds it.
type Holder = (String, Option<DateTime<Utc>>);

/// How old a mailbox's last success may be before `status` calls it stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleAfter {
    /// Three of the account's own wake-up periods (`idle_refresh`, or `poll_interval` when
    /// longer): a running daemon passes over every mailbox at least that often.
    Auto,
    Off,
    After(Duration),
}

impl std::str::FromStr for StaleAfter {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(StaleAfter::Auto),
            "off" => Ok(StaleAfter::Off),
            t => crate::config::parse_duration(t)
                .filter(|d| !d.is_zero())
                .map(StaleAfter::After)
                .ok_or_else(|| format!("{t:?} is not auto, off or a duration such as 2h or 1d")),
        }
    }
}

impl StaleAfter {
    fn limit(self, account: &Account) -> Option<Duration> {
        match self {
            StaleAfter::Auto => {
                let s = &account.settings;
                Some(3 * s.idle_refresh.max(s.poll_interval).max(SUCCESS_EVERY))
            }
            StaleAfter::Off => None,
            StaleAfter::After(d) => Some(d),
        }
    }
}

impl Row {
    /// Counts for the exit code: a configured mailbox that is failing or stale. A mailbox no
    /// longer configured is shown but judged by nothing (its last state is history).
    fn failing(&self) -> bool {
        self.configured && (self.summary.is_failing() || self.stale)
    }

    fn to_json(&self) -> serde_json::Value {
        let s = &self.summary;
        json!({
            "account": s.account,
            "mailbox": s.mailbox,
            "configured": self.configured,
            "ok": !self.failing(),
            "stale": self.stale,
            "state": s.state,
            "uidvalidity": s.uidvalidity,
            "last_uid": s.last_uid,
            "messages": self.messages,
            "last_success_at": s.last_success_at.map(time),
            "last_error": s.last_error,
            "last_error_at": s.last_error_at.map(time),
            "quarantined": s.quarantined,
            "failing_uids": s.failing_uids,
            "followed_by": s.followed_by,
            "deleted_at": s.deleted_at.map(time),
            "renamed_to": s.renamed_to,
            "holder": self.holder.as_ref().map(|h| &h.0),
            "held_since": self.holder.as_ref().and_then(|h| h.1).map(time),
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
        stale: false,
        holder: None,
        messages: counts.get(&key).copied().unwrap_or(0),
        summary: by_id.remove(&key).unwrap_or_else(|| MailboxSummary {
            account: key.0.clone(),
            mailbox: key.1.clone(),
            ..Default::default()
        }),
    };
    let mut out = Vec::new();
    for account in &config.accounts {
        match crate::folders::fixed_mailboxes(account) {
            Some(names) => {
                for mailbox in names {
                    out.push(row((account.name.clone(), mailbox), true, &mut by_id));
                }
            }
            None => {
                // folder sync: every folder the database knows of the account (found by the
                // daemon or by `sync`), in name order; one marked deleted or renamed on the
                // server is history, judged by nothing
                let mut found: Vec<(String, String)> = by_id
                    .keys()
                    .filter(|k| k.0 == account.name)
                    .cloned()
                    .collect();
                found.sort();
                for key in found {
                    let deleted = by_id[&key].deleted_at.is_some();
                    out.push(row(key, !deleted, &mut by_id));
                }
            }
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

/// The aligned table, header first; with `cluster`, the HOLDER and HELD_SINCE columns too.
fn table(rows: &[Row], cluster: bool) -> String {
    let dash = || "-".to_string();
    let mut lines = vec![vec![
        "".to_string(),
        "MAILBOX".into(),
        "STATE".into(),
        "FOLLOWED".into(),
        "UIDVALIDITY".into(),
        "LAST_UID".into(),
        "MESSAGES".into(),
        "LAST_SUCCESS".into(),
        "QUARANTINED".into(),
        "FAILING_UIDS".into(),
        "LAST_ERROR".into(),
    ]];
    if cluster {
        lines[0].splice(3..3, ["HOLDER".to_string(), "HELD_SINCE".to_string()]);
    }
    for r in rows {
        let s = &r.summary;
        let mut name = format!("{}/{}", s.account, s.mailbox);
        match (&s.renamed_to, s.deleted_at) {
            (Some(to), _) => name.push_str(&format!(" (renamed to {to})")),
            (None, Some(_)) => name.push_str(" (deleted on the server)"),
            _ if !r.configured => name.push_str(" (not configured)"),
            _ => {}
        }
        let mut line = vec![
            match (r.failing(), r.configured) {
                (true, _) if r.stale && !s.is_failing() => "STALE",
                (true, _) => "FAIL",
                (false, false) => "-",
                (false, true) => "ok",
            }
            .to_string(),
            name,
            s.state.clone().unwrap_or_else(dash),
            s.followed_by.clone().unwrap_or_else(dash),
            s.uidvalidity.map_or_else(dash, |v| v.to_string()),
            s.last_uid.map_or_else(dash, |v| v.to_string()),
            r.messages.to_string(),
            s.last_success_at.map_or_else(dash, time),
            s.quarantined.to_string(),
            s.failing_uids.to_string(),
            s.last_error.clone().unwrap_or_else(dash),
        ];
        if cluster {
            let (holder, since) = match &r.holder {
                Some((h, since)) => (h.clone(), since.map_or_else(dash, time)),
                None => (dash(), dash()),
            };
            line.splice(3..3, [holder, since]);
        }
        lines.push(line);
    }
    let mut widths = vec![0usize; lines[0].len()];
    widths[0] = "STALE".len();
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths.iter().copied()).enumerate() {
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

/// `mailpump status`: prints the report; true when no configured mailbox is failing or stale.
pub async fn status(config: &Config, json: bool, stale_after: StaleAfter) -> bool {
    let read = async {
        let store = Store::connect_read_only(&config.store).await?;
        let result = async {
            Ok((
                store.mailbox_summaries().await?,
                store.message_counts().await?,
                // who holds what: only a [cluster] config has leases to read
                match config.cluster {
                    Some(_) => store.leases().await?,
                    None => Vec::new(),
                },
            ))
        }
        .await;
        store.shutdown(super::STORE_SHUTDOWN).await;
        result
    };
    let (summaries, counts, leases) = match read.await {
        Ok(found) => found,
        Err::<_, crate::store::StoreError>(e) => {
            eprintln!(
                "mailpump status: cannot read database {:?}: {e}",
                config.store.database
            );
            return false;
        }
    };
    let mut rows = rows(config, summaries, &counts);
    let now = Utc::now();
    // (this machine's clock, for display only: the replicas judge expiry by the database's)
    let held: HashMap<(String, String), Holder> = leases
        .into_iter()
        .filter(|l| !l.is_free(now))
        .filter_map(|l| Some(((l.account, l.mailbox), (l.owner?, l.since))))
        .collect();
    for r in rows.iter_mut() {
        let s = &r.summary;
        r.holder = held
            .get(&(s.account.clone(), s.mailbox.clone()))
            .or_else(|| held.get(&(s.account.clone(), crate::supervisor::ACCOUNT_UNIT.into())))
            .cloned();
    }
    for r in rows.iter_mut().filter(|r| r.configured) {
        let account = config.accounts.iter().find(|a| a.name == r.summary.account);
        let limit = account.and_then(|a| stale_after.limit(a));
        r.stale = match (limit, r.summary.last_success_at) {
            (Some(limit), Some(ok)) => (now - ok).to_std().unwrap_or_default() > limit,
            _ => false, // never synced shows as failing or as nothing yet, not as stale
        };
    }
    if json {
        for r in &rows {
            println!("{}", r.to_json());
        }
    } else {
        print!("{}", table(&rows, config.cluster.is_some()));
    }
    !rows.iter().any(Row::failing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned_and_marks_failing_and_unconfigured_mailboxes() {
        let ok = Row {
            holder: None,
            stale: false,
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
            holder: None,
            stale: false,
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
        let text = table(&[ok.clone(), gone.clone()], false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("ok     work/INBOX "), "{text}");
        assert!(
            lines[2].starts_with("-      old/Archive/2020 (not configured)  error"),
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
        assert_eq!(
            j["ok"], true,
            "a mailbox no longer configured fails nothing"
        );
        let stale = Row {
            stale: true,
            ..ok.clone()
        };
        assert!(stale.failing());
        assert!(table(&[stale], false)
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("STALE  work/INBOX"));
        assert_eq!(j["messages"], 3);
        let held = Row {
            holder: Some((
                "replica-2".into(),
                DateTime::from_timestamp(1_700_000_100, 0),
            )),
            ..ok.clone()
        };
        let text = table(&[held.clone(), gone.clone()], true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("STATE  HOLDER     HELD_SINCE  "),
            "{text}"
        );
        assert!(
            lines[1].contains("replica-2  2023-11-14T22:15:00Z"),
            "{text}"
        );
        assert_eq!(held.to_json()["holder"], "replica-2");
        assert_eq!(gone.to_json()["holder"], serde_json::Value::Null);
        assert_eq!(j["last_uid"], serde_json::Value::Null);
    }
}
