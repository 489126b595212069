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

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::NaiveDate;

use crate::parse::sha256_hex;
use crate::store::{ExportItem, Store, StoreError};

/// How often a progress line is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);
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
    let tmp = path.with_extension("mailpump-tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    report.files_written += 1;
    report.bytes_written += bytes.len() as u64;
    Ok(())
}

async fn export_one(
    store: &Store,
    item: &ExportItem,
    dir: &Path,
    report: &mut ExportReport,
) -> Result<(), ExportError> {
    let uid = item.uid.to_string();
    write_if_changed(
        &dir.join(format!("{uid}.eml")),
        &store.read_blob(&item.raw_sha256).await?,
        report,
    )?;
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
        (Some(h), _) => write_if_changed(&dir.join(format!("{uid}.html")), &h, report)?,
        (None, Some(t)) => write_if_changed(&dir.join(format!("{uid}.txt")), &t, report)?,
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
            write_if_changed(&path, &store.read_blob(sha).await?, report)?;
        }
    }
    Ok(())
}

/// Runs the export; logs a progress line every few seconds.
pub async fn export(store: &Store, options: &ExportOptions) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let items = store
        .export_items(&options.account, options.mailbox.as_deref(), options.since)
        .await?;
    let mut current = std::collections::HashMap::new();
    for item in &items {
        if !current.contains_key(&item.mailbox) {
            let cp = store.checkpoint(&options.account, &item.mailbox).await?;
            current.insert(item.mailbox.clone(), cp.map(|c| c.uidvalidity));
        }
    }
    let mut report = ExportReport::default();
    let mut last_progress = Instant::now();
    for (i, item) in items.iter().enumerate() {
        let mut dir = mailbox_dir(&options.dir, &options.account, &item.mailbox);
        let newest = current.get(&item.mailbox).copied().flatten();
        if newest.is_some_and(|v| v != item.uidvalidity) {
            dir.push(format!("uidvalidity-{}", item.uidvalidity));
        }
        export_one(store, item, &dir, &mut report).await?;
        report.messages += 1;
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            tracing::info!(account = %options.account, count = i + 1, total = items.len(), files_written = report.files_written, "export_progress");
        }
    }
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
