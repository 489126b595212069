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
    assert!(!events.is_empty(), "no progress event in:\n{}", run.stdout());
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
