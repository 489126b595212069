//! Progress of long work in JSON mode (what systemd, Docker and pipes see): `progress` events
//! with count, total, rate and ETA while a catch-up runs.

use crate::harness::{message, AccountSpec, Dovecot, Mailpump, TestDb};

#[tokio::test(flavor = "multi_thread")]
async fn a_long_sync_logs_progress_events_with_count_total_rate_and_eta() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("pia", "pw-pia");
    const N: u64 = 400;
    for i in 0..N {
        dc.deliver(&user, &message(&format!("m{i}"), &"x".repeat(2000)));
    }
    let db = TestDb::new().await;
    let account = AccountSpec::plain("pia", &dc, &user).with("batch_size = 5");
    let run = Mailpump::new(&db, &[account])
        .run_async(&["--progress-interval", "100ms", "sync"])
        .await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.event("mailbox_synced")["stored"], N);
    let events = run.events("progress");
    assert!(
        !events.is_empty(),
        "no progress event in:\n{}",
        run.stdout()
    );
    let mut last_count = 0;
    for e in &events {
        assert_eq!(e["kind"], "sync");
        assert_eq!(e["account"], "pia");
        assert_eq!(e["mailbox"], "INBOX");
        assert_eq!(e["total"], N);
        let count = e["count"].as_u64().unwrap();
        assert!(count <= N && count >= last_count, "{e}");
        last_count = count;
        assert!(e["rate_per_s"].as_f64().is_some(), "{e}");
        assert!(e["elapsed_s"].as_u64().is_some(), "{e}");
        if count > 0 {
            assert!(e["eta_s"].as_u64().is_some(), "{e}");
            assert!(e["bytes"].as_u64().unwrap() >= count * 2000, "{e}");
        }
    }
}

/// On a terminal (a pseudo-terminal from `script`, bsdutils, essential on Debian) `sync` draws
/// a bar per mailbox with count and total, and the log is text.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_terminal_sync_draws_a_bar_and_logs_text() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("tia", "pw-tia");
    for i in 0..300 {
        dc.deliver(&user, &message(&format!("m{i}"), &"y".repeat(2000)));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("tia", &dc, &user).with("batch_size = 5")],
    );
    let command = format!(
        "{} --config {} sync",
        env!("CARGO_BIN_EXE_mailpump"),
        mp.config.display()
    );
    let out = tokio::process::Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .env("TERM", "xterm")
        .env("COLUMNS", "120")
        .output()
        .await
        .expect("script(1) from bsdutils");
    let text = strip_ansi(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("tia/INBOX ["), "no bar in:\n{text}");
    assert!(text.contains("/300"), "no total in the bar:\n{text}");
    assert!(text.contains("mailbox_synced"), "{text}");
    assert!(
        !text.contains("{\"timestamp\""),
        "JSON on a terminal:\n{text}"
    );
    crate::harness::mailpump::assert_no_secrets(&mp.secrets(), &text);
}

/// `text` without terminal escape sequences (colours, cursor moves).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
