//! `mailpump export`: writes stored messages from MongoDB to disk, the way the seed article
//! did: `DIR/ACCOUNT/MAILBOX/<uid>.eml` (the raw bytes), `<uid>.html` (or `<uid>.txt` when the
//! message has no HTML body) beside it, and its attachments in `<uid>.attachments/`.
//!
//! **Invariant:** nothing is written outside DIR. Every name that comes from mail (mailbox,
//! attachment file name) goes through [`sanitize`]: no path separators, no `..`, no NUL or
//! control characters, no reserved device names; collisions are numbered.
//!
//! Idempotent: a file that already holds the right bytes is left alone; a second export of the
//! same data writes nothing. Messages of an older UIDVALIDITY go to `uidvalidity-<n>/`.
//!
//! Memory is bounded whatever the account's size: messages stream from a cursor
//! ([`Store::export_items`]), and the files of at most [`MAX_JOBS`] messages (and about
//! [`MAX_JOB_BYTES`]) wait for the blocking pool, where every file read and write happens (none
//! on the async runtime). Progress is counted on a [`Tracker`]
//! (a bar on a terminal, `progress` events elsewhere).
//!
//! An account (or `--mailbox`) that is neither configured nor in the database (no message, no
//! `mailboxes` document) is an error that lists the known ones. An account removed from the
//! config whose mail is still stored stays exportable.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::NaiveDate;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::parse::sha256_hex;
use crate::progress::Tracker;
use crate::store::{ExportItem, ExportRaw, Store, StoreError};

/// Messages whose files may wait for, or be in, the blocking pool at once.
pub const MAX_JOBS: usize = 4;
/// Bytes of file content that may wait for the blocking pool at once (one message always may).
pub const MAX_JOB_BYTES: usize = 32 * 1024 * 1024;
/// Longest file name written, in bytes.
const MAX_NAME: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unknown account {account:?}: neither configured nor in the database (known: {})", list(.known))]
    UnknownAccount {
        account: String,
        known: BTreeSet<String>,
    },
    #[error("unknown mailbox {mailbox:?} of account {account:?}: neither configured nor in the database (known: {})", list(.known))]
    UnknownMailbox {
        account: String,
        mailbox: String,
        known: BTreeSet<String>,
    },
    #[error("a file writer ended abnormally: {0}")]
    Writer(String),
}

fn list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub account: String,
    pub mailbox: Option<String>,
    pub since: Option<NaiveDate>,
    pub dir: PathBuf,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ExportReport {
    pub messages: usize,
    pub files_written: usize,
    pub files_unchanged: usize,
    pub bytes_written: u64,
}

const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// A safe single file name from an untrusted one; `fallback` when nothing usable is left.
pub fn sanitize(name: &str, fallback: &str) -> String {
    // only the last path component: "../../etc/passwd" is "passwd"
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = cleaned
        .trim_start_matches(['.', ' '])
        .trim_end_matches(['.', ' ']);
    let mut out = if trimmed.is_empty() {
        fallback.to_string()
    } else {
        trimmed.to_string()
    };
    let stem = out.split('.').next().unwrap_or("").to_ascii_uppercase();
    if RESERVED.contains(&stem.as_str()) {
        out.insert(0, '_');
    }
    if out.len() > MAX_NAME {
        let (stem, ext) = match out.rfind('.') {
            Some(i) if out.len() - i <= 16 => (&out[..i], &out[i..]),
            _ => (out.as_str(), ""),
        };
        let mut cut = MAX_NAME - ext.len();
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        out = format!("{}{}", &stem[..cut], ext);
    }
    out
}

/// `name`, or `name (2).ext`, `name (3).ext`... whichever is not in `taken`.
fn unique(name: String, taken: &mut HashSet<String>) -> String {
    if taken.insert(name.to_lowercase()) {
        return name;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name.as_str(), ""),
    };
    for n in 2.. {
        let candidate = format!("{stem} ({n}){ext}");
        if taken.insert(candidate.to_lowercase()) {
            return candidate;
        }
    }
    unreachable!("an unbounded counter always finds a free name")
}

/// The folder of a mailbox: each `/`-separated level sanitized on its own.
fn mailbox_dir(root: &Path, account: &str, mailbox: &str) -> PathBuf {
    let mut dir = root.join(sanitize(account, "account"));
    for level in mailbox.split('/') {
        dir.push(sanitize(level, "mailbox"));
    }
    dir
}

/// Writes `bytes` to `path` (atomically, by rename) unless it already holds exactly them.
/// Blocking: runs on the blocking pool.
fn write_if_changed(
    path: &Path,
    bytes: &[u8],
    report: &mut ExportReport,
) -> Result<(), ExportError> {
    let io = |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.len() == bytes.len() as u64
            && std::fs::read(path)
                .map(|old| sha256_hex(&old) == sha256_hex(bytes))
                .unwrap_or(false)
        {
            report.files_unchanged += 1;
            return Ok(());
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    // A name no sanitized file can have (sanitize strips leading dots), unique per write: two
    // writers of one folder (two mailboxes whose names sanitize alike) never share a temp file,
    // and an attachment named "x.mailpump-tmp" is never overwritten by the temp file of "x".
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}-{n}.mailpump-tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    report.files_written += 1;
    report.bytes_written += bytes.len() as u64;
    Ok(())
}

/// The files of one message, ready for the blocking pool.
struct Job {
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl Job {
    fn bytes(&self) -> usize {
        self.files.iter().map(|(_, b)| b.len()).sum()
    }

    fn write(self) -> Result<ExportReport, ExportError> {
        let mut report = ExportReport::default();
        for (path, bytes) in &self.files {
            write_if_changed(path, bytes, &mut report)?;
        }
        Ok(report)
    }
}

/// The messages whose files are on the blocking pool, and their bytes.
#[derive(Default)]
struct Writers {
    set: JoinSet<(usize, Result<ExportReport, ExportError>)>,
    bytes: usize,
}

impl Writers {
    /// Whether a message of `next` bytes must wait for one to finish first.
    fn full(&self, next: usize) -> bool {
        self.set.len() >= MAX_JOBS || (!self.set.is_empty() && self.bytes + next > MAX_JOB_BYTES)
    }

    fn spawn(&mut self, job: Job) {
        let size = job.bytes();
        self.bytes += size;
        self.set.spawn_blocking(move || (size, job.write()));
    }

    /// What the next message to finish wrote; `None` when none is running.
    async fn next(&mut self) -> Option<Result<ExportReport, ExportError>> {
        Some(match self.set.join_next().await? {
            Err(e) => Err(ExportError::Writer(e.to_string())),
            Ok((size, written)) => {
                self.bytes -= size;
                written
            }
        })
    }
}

impl ExportReport {
    /// Counts one more message (what its writer did) and shows it on `progress`.
    fn add(&mut self, done: ExportReport, progress: &Tracker) {
        self.messages += 1;
        self.files_written += done.files_written;
        self.files_unchanged += done.files_unchanged;
        self.bytes_written += done.bytes_written;
        progress.inc(1, done.bytes_written);
    }
}

/// Reads what one message's files hold (raw, body, attachments) and names them.
async fn prepare(store: &Store, item: ExportItem, dir: &Path) -> Result<Job, ExportError> {
    let uid = item.uid.to_string();
    let raw = match item.raw {
        ExportRaw::Inline(data) => data,
        ExportRaw::Blob(sha) => store.read_blob(&sha).await?,
    };
    let mut files = vec![(dir.join(format!("{uid}.eml")), raw)];
    let html = match (&item.html, &item.html_blob) {
        (Some(h), _) => Some(h.as_bytes().to_vec()),
        (None, Some(sha)) => Some(store.read_blob(sha).await?),
        _ => None,
    };
    let text = match (&item.text, &item.text_blob) {
        (Some(t), _) => Some(t.as_bytes().to_vec()),
        (None, Some(sha)) => Some(store.read_blob(sha).await?),
        _ => None,
    };
    match (html, text) {
        (Some(h), _) => files.push((dir.join(format!("{uid}.html")), h)),
        (None, Some(t)) => files.push((dir.join(format!("{uid}.txt")), t)),
        (None, None) => {}
    }
    if !item.attachments.is_empty() {
        let folder = dir.join(format!("{uid}.attachments"));
        let mut taken = HashSet::new();
        for (i, (filename, _content_type, sha)) in item.attachments.iter().enumerate() {
            let fallback = format!("attachment-{}", i + 1);
            let name = unique(
                sanitize(filename.as_deref().unwrap_or(""), &fallback),
                &mut taken,
            );
            let path = folder.join(&name);
            debug_assert!(path.starts_with(&folder));
            files.push((path, store.read_blob(sha).await?));
        }
    }
    Ok(Job { files })
}

/// Fails with the known names when the account, or the mailbox, is neither configured nor in
/// the database.
async fn check_known(
    store: &Store,
    config: &Config,
    options: &ExportOptions,
) -> Result<(), ExportError> {
    let account = config.accounts.iter().find(|a| a.name == options.account);
    if account.is_none() {
        let mut known = store.stored_accounts().await?;
        if !known.contains(&options.account) {
            known.extend(config.accounts.iter().map(|a| a.name.clone()));
            return Err(ExportError::UnknownAccount {
                account: options.account.clone(),
                known,
            });
        }
    }
    if let Some(mailbox) = &options.mailbox {
        let configured = account.is_some_and(|a| a.mailboxes.contains(mailbox));
        if !configured {
            let mut known = store.stored_mailboxes(&options.account).await?;
            if !known.contains(mailbox) {
                known.extend(account.iter().flat_map(|a| a.mailboxes.iter().cloned()));
                return Err(ExportError::UnknownMailbox {
                    account: options.account.clone(),
                    mailbox: mailbox.clone(),
                    known,
                });
            }
        }
    }
    Ok(())
}

/// `mailpump export`: runs the export with its progress shown (`crate::progress`: a bar on a
/// terminal, `progress` events with kind "export" elsewhere) and logs `export_done` at the end.
/// An unknown account or mailbox is an error before anything is written.
pub async fn export(
    store: &Store,
    options: &ExportOptions,
    config: &Config,
) -> Result<ExportReport, ExportError> {
    check_known(store, config, options).await?;
    run(store, options).await
}

/// The export itself, counted on a progress tracker (messages done of a `count_documents`
/// total with the export's own filter). Does not check that the account is known.
async fn run(store: &Store, options: &ExportOptions) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let (account, mailbox, since) = (&options.account, options.mailbox.as_deref(), options.since);
    let total = store.export_count(account, mailbox, since).await?;
    let progress = Tracker::start("export", account, mailbox.unwrap_or("*"), total);
    let mut items = store.export_items(account, mailbox, since);
    // the current UIDVALIDITY of each mailbox met: one lookup per mailbox
    let mut current: HashMap<String, Option<u32>> = HashMap::new();
    let mut report = ExportReport::default();
    let mut writers = Writers::default();
    while let Some(item) = items.next().await? {
        if !current.contains_key(&item.mailbox) {
            let cp = store.checkpoint(account, &item.mailbox).await?;
            current.insert(item.mailbox.clone(), cp.map(|c| c.uidvalidity));
        }
        let mut dir = mailbox_dir(&options.dir, account, &item.mailbox);
        let newest = current.get(&item.mailbox).copied().flatten();
        if newest.is_some_and(|v| v != item.uidvalidity) {
            dir.push(format!("uidvalidity-{}", item.uidvalidity));
        }
        let job = prepare(store, item, &dir).await?;
        while writers.full(job.bytes()) {
            if let Some(done) = writers.next().await {
                report.add(done?, &progress);
            }
        }
        writers.spawn(job);
    }
    while let Some(done) = writers.next().await {
        report.add(done?, &progress);
    }
    drop(progress);
    tracing::info!(
        account = %options.account, messages = report.messages, files_written = report.files_written,
        files_unchanged = report.files_unchanged, bytes = report.bytes_written, elapsed_ms = started.elapsed().as_millis() as u64,
        dir = %options.dir.display(), "export_done"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_stay_inside_their_folder() {
        assert_eq!(sanitize("../../etc/passwd", "x"), "passwd");
        assert_eq!(sanitize("/absolute/path.txt", "x"), "path.txt");
        assert_eq!(sanitize("..\\..\\windows\\system.ini", "x"), "system.ini");
        assert_eq!(sanitize("..", "fallback"), "fallback");
        assert_eq!(sanitize("nul\0byte.pdf", "x"), "nul_byte.pdf");
        assert_eq!(sanitize("", "attachment-1"), "attachment-1");
        assert_eq!(sanitize(".hidden", "x"), "hidden");
        assert_eq!(sanitize("a:b*c?.txt", "x"), "a_b_c_.txt");
        assert_eq!(sanitize("CON.txt", "x"), "_CON.txt");
        assert_eq!(sanitize("com1", "x"), "_com1");
        assert_eq!(sanitize("报告.pdf", "x"), "报告.pdf");
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary_keeping_the_extension() {
        let long = format!("{}.pdf", "报".repeat(100));
        let s = sanitize(&long, "x");
        assert!(s.len() <= MAX_NAME && s.ends_with(".pdf"), "{s}");
    }

    #[test]
    fn collisions_are_numbered() {
        let mut taken = HashSet::new();
        assert_eq!(unique("a.txt".into(), &mut taken), "a.txt");
        assert_eq!(unique("a.txt".into(), &mut taken), "a (2).txt");
        assert_eq!(unique("A.TXT".into(), &mut taken), "A (3).TXT");
        assert_eq!(unique("noext".into(), &mut taken), "noext");
        assert_eq!(unique("noext".into(), &mut taken), "noext (2)");
    }

    #[test]
    fn mailbox_levels_become_folders() {
        let d = mailbox_dir(Path::new("/out"), "work", "INBOX/../Sub");
        assert_eq!(d, Path::new("/out/work/INBOX/mailbox/Sub"));
    }
}
