//! `mailpump export`: round trip against what the server holds, hostile names, idempotence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::harness::{AccountSpec, Dovecot, Mailpump, TestDb};

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

const HOSTILE: &str = "From: a@example.com\r\nSubject: hostile names\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"h\"\r\n\r\n\
--h\r\nContent-Type: text/html\r\n\r\n<p>html body</p>\r\n\
--h\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"../../escape.txt\"\r\n\r\nup\r\n\
--h\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"/etc/passwd\"\r\n\r\nroot\r\n\
--h\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename*=utf-8''nul%00byte.txt\r\n\r\nnul\r\n\
--h\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"CON.txt\"\r\n\r\ncon\r\n\
--h\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"same.txt\"\r\n\r\none\r\n\
--h\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"same.txt\"\r\n\r\ntwo\r\n\
--h\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment\r\n\r\nnameless\r\n\
--h--\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn export_round_trips_byte_for_byte_and_a_second_export_writes_nothing() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("exp", "pw-exp");
    let corpus: Vec<Vec<u8>> =
        std::fs::read_dir(crate::harness::root().join("tests/fixtures/parse"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()) == Some("eml")
                    && !p.ends_with("binary_garbage.eml")
            })
            .map(|p| std::fs::read(p).unwrap())
            .collect();
    for m in &corpus {
        dc.deliver(&user, m);
    }
    dc.deliver(&user, HOSTILE.as_bytes());
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("exp", &dc, &user).with("mailboxes = [\"INBOX\"]")],
    );
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);

    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("mail");
    let dir = target.to_str().unwrap();
    let run = mp
        .run_async(&["export", "--account", "exp", "--dir", dir])
        .await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    let done = run.event("export_done");
    assert_eq!(done["messages"], corpus.len() + 1);

    // every .eml is byte for byte what the server holds (its maildir files)
    let server: BTreeMap<String, Vec<u8>> = dc
        .inbox_files(&user)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .map(|b| (mailpump::parse::sha256_hex(&b), b))
        .collect();
    let inbox = target.join("exp").join("INBOX");
    let emls: Vec<PathBuf> = files_under(&inbox)
        .into_iter()
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()) == Some("eml")
                && p.parent() == Some(inbox.as_path())
        })
        .collect();
    assert_eq!(emls.len(), server.len());
    for p in &emls {
        let bytes = std::fs::read(p).unwrap();
        assert_eq!(
            server.get(&mailpump::parse::sha256_hex(&bytes)),
            Some(&bytes),
            "{}",
            p.display()
        );
    }
    // bodies beside the .eml: HTML when there is one, else text
    let hostile_uid = (corpus.len() + 1).to_string();
    assert_eq!(
        std::fs::read_to_string(inbox.join(format!("{hostile_uid}.html"))).unwrap(),
        "<p>html body</p>"
    );
    assert!(
        inbox.join("16.txt").exists()
            || files_under(&inbox)
                .iter()
                .any(|p| p.extension().and_then(|e| e.to_str()) == Some("txt"))
    );

    // hostile attachment names land inside the attachments folder, sanitized
    let atts = inbox.join(format!("{hostile_uid}.attachments"));
    let mut names: Vec<String> = std::fs::read_dir(&atts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "_CON.txt",
            "attachment-7",
            "escape.txt",
            "nul_byte.txt",
            "passwd",
            "same (2).txt",
            "same.txt"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(atts.join("same (2).txt")).unwrap(),
        "two"
    );
    let root = out.path().canonicalize().unwrap();
    for f in files_under(out.path()) {
        assert!(f.canonicalize().unwrap().starts_with(&root));
    }
    assert!(!out.path().join("escape.txt").exists() && !target.join("escape.txt").exists());

    let again = mp
        .run_async(&["export", "--account", "exp", "--dir", dir])
        .await;
    assert_eq!(again.code(), 0);
    assert_eq!(again.event("export_done")["files_written"], 0, "idempotent");
    assert!(
        again.event("export_done")["files_unchanged"]
            .as_u64()
            .unwrap()
            > 0
    );

    // --mailbox and --since narrow it
    let none = mp
        .run_async(&[
            "export",
            "--account",
            "exp",
            "--since",
            "2999-01-01",
            "--dir",
            out.path().join("none").to_str().unwrap(),
        ])
        .await;
    assert_eq!(none.event("export_done")["messages"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_account_or_mailbox_exits_1_naming_it_and_the_known_ones() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("known", "pw-known");
    dc.deliver(&user, &crate::harness::message("kept", "1"));
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("known", &dc, &user)]);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();

    let run = mp
        .run_async(&["export", "--account", "nosuch", "--dir", dir])
        .await;
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    let err = run.stderr();
    assert!(
        err.contains("unknown account \"nosuch\"") && err.contains("\"known\""),
        "{err}"
    );
    assert!(files_under(out.path()).is_empty());

    let run = mp
        .run_async(&[
            "export",
            "--account",
            "known",
            "--mailbox",
            "Nope",
            "--dir",
            dir,
        ])
        .await;
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    let err = run.stderr();
    assert!(
        err.contains("unknown mailbox \"Nope\" of account \"known\"") && err.contains("\"INBOX\""),
        "{err}"
    );

    // removed from the config, still stored: still exportable
    let other = dc.add_user("other", "pw-other");
    let without = Mailpump::new(&db, &[AccountSpec::plain("other", &dc, &other)]);
    let run = without
        .run_async(&[
            "export",
            "--account",
            "known",
            "--mailbox",
            "INBOX",
            "--dir",
            dir,
        ])
        .await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    assert_eq!(run.event("export_done")["messages"], 1);
    // configured, nothing stored yet: known, nothing to write
    let run = without
        .run_async(&["export", "--account", "other", "--dir", dir])
        .await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    assert_eq!(run.event("export_done")["messages"], 0);
}

/// Runs mailpump to its end and returns what it printed and its own peak RSS (wait4's
/// ru_maxrss for exactly this child, in KiB).
// reaped by wait4 below, which std's `wait` cannot replace (it gives no rusage)
#[allow(clippy::zombie_processes)]
fn run_measured(mp: &Mailpump, args: &[&str]) -> (i32, String, u64) {
    use std::io::Read;
    let mut child = mp
        .command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let mut status = 0;
    // SAFETY: wait4 only writes the status and the rusage we pass; the child is ours and not
    // waited for anywhere else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let pid = child.id() as libc::pid_t;
        assert_eq!(libc::wait4(pid, &mut status, 0, &mut usage), pid);
        usage
    };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, stdout, usage.ru_maxrss.max(0) as u64)
}

/// The old export collected every message first: 135 MB peak for 92 MB exported (debug build);
/// streamed, the peak stays near the binary's own ~27 MB whatever the account's size (~42 MB
/// alone, up to ~70 MB beside the rest of the suite: more threads, more malloc arenas, but
/// bounded by them, not by the account).
#[tokio::test(flavor = "multi_thread")]
async fn an_export_far_larger_than_a_cursor_batch_streams_in_bounded_memory() {
    const MESSAGES: usize = 600;
    let mut dc = Dovecot::start();
    let user = dc.add_user("big", "pw-big");
    // ~150 KB of text per message: the .eml and the .txt beside it, ~300 KB written
    for i in 0..MESSAGES {
        let line = format!("message {i} line of text to fill the body up to a hundred kB\r\n");
        let body = line.repeat(150 * 1024 / line.len());
        dc.deliver(&user, &crate::harness::message(&format!("big {i}"), &body));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("big", &dc, &user)]);
    let sync = mp.run_async(&["sync"]).await;
    assert_eq!(sync.code(), 0, "{}", sync.stdout());
    assert_eq!(sync.event("mailbox_synced")["stored"], MESSAGES);

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap().to_string();
    let (code, stdout, peak_kb) = tokio::task::spawn_blocking(move || {
        run_measured(
            &mp,
            &[
                "--progress-interval",
                "100ms",
                "export",
                "--account",
                "big",
                "--dir",
                &dir,
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stdout}");
    let logs = crate::harness::mailpump::parse_logs(stdout.as_bytes());
    let done = logs
        .iter()
        .find(|l| l["message"] == "export_done")
        .unwrap_or_else(|| panic!("no export_done in {stdout}"));
    assert_eq!(done["messages"], MESSAGES);
    // progress in JSON mode: count of the total, never more
    let progress: Vec<_> = logs.iter().filter(|l| l["message"] == "progress").collect();
    assert!(!progress.is_empty(), "no progress event in {stdout}");
    for p in &progress {
        assert_eq!(p["kind"], "export");
        assert_eq!(p["account"], "big");
        assert_eq!(p["total"], MESSAGES);
        assert!(p["count"].as_u64().unwrap() <= MESSAGES as u64, "{p}");
    }
    let total = done["bytes"].as_u64().unwrap();
    let on_disk: u64 = files_under(out.path())
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert_eq!(on_disk, total);
    assert!(total >= 150_000_000, "{total} bytes exported");
    let peak = peak_kb * 1024;
    eprintln!("export of {total} bytes: peak RSS {peak} bytes");
    assert!(
        peak < total / 2,
        "peak RSS {peak} bytes for an export of {total} bytes"
    );
}
