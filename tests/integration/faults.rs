//! Fault tests: the real binary, real Dovecot and database, faults injected; each ends with an
//! exact comparison of the server's UIDs with the stored documents. Fast here; long under
//! deploy/reliability.sh (MAILPUMP_RELIABILITY=full), which writes RELIABILITY.md.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bson::doc;
use rand::Rng;

use crate::harness::proxy::{Mode, Proxy};
use crate::harness::reliability::{record, scale, Row};
use crate::harness::secantus::Secantus;
use crate::harness::{eventually, message, AccountSpec, Daemon, Dovecot, Mailpump, TestDb};

/// Stored documents vs the UIDs 1..=n: (stored distinct UIDs, duplicated documents).
async fn compare(db: &TestDb, n: u64) -> (u64, u64) {
    let docs = db.messages(doc! {}).await;
    let mut per_message: HashMap<String, u64> = HashMap::new();
    for d in &docs {
        *per_message
            .entry(d.get_str("message_id").unwrap_or("").to_string())
            .or_default() += 1;
    }
    let uids: BTreeSet<i64> = docs.iter().map(|d| d.get_i64("uid").unwrap()).collect();
    let expected: BTreeSet<i64> = (1..=n as i64).collect();
    assert_eq!(uids, expected, "every UID stored");
    let duplicated = per_message.values().map(|c| c - 1).sum::<u64>();
    (uids.len() as u64, duplicated)
}

/// `tries` times: wait until more is stored, then `crash` something (and bring it back); then
/// wait (at most `finish`) until all `n` are stored and compare with the server's UIDs.
async fn crash_during_catch_up(
    db: &TestDb,
    n: u64,
    tries: u64,
    finish: Duration,
    mut crash: impl FnMut(),
) -> (u64, u64) {
    for _ in 0..tries {
        let before = db.count("messages", doc! {}).await;
        if before >= n {
            break;
        }
        eventually(Duration::from_secs(60), "progress", || async {
            db.count("messages", doc! {}).await > before
        })
        .await;
        crash();
    }
    eventually(finish, "everything stored", || async {
        db.count("messages", doc! {}).await >= n
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    compare(db, n).await
}

fn deliver_many(dc: &mut Dovecot, user: &crate::harness::User, n: u64) {
    for i in 0..n {
        dc.deliver(
            user,
            &message(&format!("fault {i}"), &"body line\r\n".repeat(40)),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_during_a_catch_up_loses_and_doubles_nothing() {
    let n = scale(600, 5000);
    let kills = scale(3, 20);
    let mut dc = Dovecot::start();
    let user = dc.add_user("kill9", "pw-kill9");
    deliver_many(&mut dc, &user, n);
    let server = Secantus::start(); // --sync-on-commit: acknowledged writes survive
    let db = TestDb::on(&server.uri()).await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("kill9", &dc, &user).with("batch_size = 25")],
    );
    let mut rng = rand::thread_rng();
    let mut crashes = 0;
    for _ in 0..kills {
        let before = db.count("messages", doc! {}).await;
        if before >= n {
            break;
        }
        let mut daemon = Daemon::start(&mp);
        // let it get going, then kill it somewhere in the middle of a batch
        eventually(Duration::from_secs(60), "progress", || async {
            db.count("messages", doc! {}).await > before
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
        daemon.signal("KILL");
        let (code, _) = daemon.wait_exit(Duration::from_secs(10)).await;
        if code != -1 {
            crashes += 1; // exited by itself: not what we did
        }
        let checkpoint = db
            .mailbox("kill9/INBOX")
            .await
            .map(|d| d.get_i64("last_uid").unwrap_or(0))
            .unwrap_or(0) as u64;
        let stored = db.count("messages", doc! {}).await;
        assert!(
            checkpoint <= stored,
            "checkpoint {checkpoint} ahead of {stored} stored documents"
        );
    }
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let (stored, duplicated) = compare(&db, n).await;
    assert_eq!(duplicated, 0);
    record(Row {
        fault: "kill -9 of mailpump at random moments during a catch-up, restart each time",
        tries: kills,
        expected: n,
        stored,
        duplicated,
        crashes,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn dovecot_killed_and_restarted_mid_fetch() {
    let n = scale(400, 3000);
    let mut dc = Dovecot::start();
    let user = dc.add_user("dckill", "pw-dckill");
    deliver_many(&mut dc, &user, n);
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("dckill", &dc, &user).with("batch_size = 20")],
    );
    let daemon = Daemon::start(&mp);
    let tries = scale(2, 5);
    let (stored, duplicated) =
        crash_during_catch_up(&db, n, tries, Duration::from_secs(120), || {
            dc.kill9();
            std::thread::sleep(Duration::from_millis(300));
            dc.start_again();
        })
        .await;
    assert_eq!(duplicated, 0);
    assert!(!daemon.events("disconnected").is_empty());
    record(Row {
        fault: "Dovecot killed (SIGKILL) and restarted mid-FETCH",
        tries,
        expected: n,
        stored,
        duplicated,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_killed_and_restarted_mid_batch() {
    let n = scale(400, 3000);
    let mut dc = Dovecot::start();
    let user = dc.add_user("dbkill", "pw-dbkill");
    deliver_many(&mut dc, &user, n);
    let mut server = Secantus::start();
    let db = TestDb::on(&server.uri()).await;
    let toml = std::fs::read_to_string(
        &Mailpump::new(
            &db,
            &[AccountSpec::plain("dbkill", &dc, &user).with("batch_size = 20")],
        )
        .config,
    )
    .unwrap()
    .replace(
        "connect_timeout = \"5s\"\n\n[defaults]",
        "connect_timeout = \"2s\"\nop_timeout = \"5s\"\n\n[defaults]",
    );
    let mp = Mailpump::from_toml(&toml);
    let daemon = Daemon::start(&mp);
    let tries = scale(2, 5);
    let (stored, duplicated) =
        crash_during_catch_up(&db, n, tries, Duration::from_secs(180), || {
            server.kill9();
            std::thread::sleep(Duration::from_millis(500));
            server.launch();
        })
        .await;
    assert_eq!(duplicated, 0);
    drop(daemon);
    record(Row {
        fault: "database killed (SIGKILL) and restarted mid-batch",
        tries,
        expected: n,
        stored,
        duplicated,
        crashes: 0,
        hangs: 0,
    });
}

/// mailpump through a fault proxy to Dovecot, with short timeouts.
async fn through_proxy(name: &str, n: u64) -> (Dovecot, Proxy, TestDb, Mailpump) {
    let mut dc = Dovecot::start_with("imap_idle_notify_interval = 1 secs\n");
    let user = dc.add_user(name, &format!("pw-{name}"));
    deliver_many(&mut dc, &user, n);
    let proxy = Proxy::start(dc.imap_port).await;
    let db = TestDb::new().await;
    let mut spec = AccountSpec::plain(name, &dc, &user)
        .with("batch_size = 20")
        .with("command_timeout = \"3s\"")
        .with("idle_refresh = \"2s\"")
        .with("silence_timeout = \"3s\"");
    spec.port = proxy.port;
    let mp = Mailpump::new(&db, &[spec]);
    (dc, proxy, db, mp)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_reset_in_the_middle_of_a_literal() {
    let n = scale(200, 2000);
    let (_dc, proxy, db, mp) = through_proxy("reset", n).await;
    let tries = scale(2, 10);
    for _ in 0..tries {
        proxy.set_mode(Mode::ResetAfter(
            30_000 + rand::thread_rng().gen_range(0..20_000),
        ));
        let run = mp.run_async(&["sync"]).await;
        if run.code() != 0 {
            let e = run.event("mailbox_sync_failed")["error"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                e.contains("closed") || e.contains("reset") || e.contains("I/O"),
                "{e}"
            );
        }
    }
    proxy.set_mode(Mode::Pass);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    let (stored, duplicated) = compare(&db, n).await;
    assert!(proxy.resets() >= 1);
    record(Row {
        fault: "connection reset (RST) in the middle of a FETCH literal",
        tries,
        expected: n,
        stored,
        duplicated,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_trickled_slowly_still_arrive() {
    let n = scale(20, 100);
    let (_dc, proxy, db, mp) = through_proxy("trickle", n).await;
    proxy.set_mode(Mode::Trickle(Duration::from_millis(2)));
    let run = tokio::time::timeout(Duration::from_secs(120), mp.run_async(&["sync"]))
        .await
        .expect("no hang");
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let (stored, duplicated) = compare(&db, n).await;
    record(Row {
        fault: "bytes trickled slowly (256 bytes every 2 ms)",
        tries: 1,
        expected: n,
        stored,
        duplicated,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stall_longer_than_the_timeouts_and_a_refusal_for_a_while() {
    let n = scale(50, 500);
    let (mut dc, proxy, db, mp) = through_proxy("stall", n).await;
    let daemon = Daemon::start(&mp);
    eventually(Duration::from_secs(60), "caught up", || async {
        db.count("messages", doc! {}).await >= n
    })
    .await;
    daemon
        .wait_for_log(Duration::from_secs(20), "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;

    // a stall: the open connection goes silent; new mail must still arrive via a new session
    proxy.freeze_existing();
    let user = crate::harness::User {
        name: "stall".into(),
        password: "pw-stall".into(),
        uid: 0,
        maildir: dc.path().join("home/stall/Maildir"),
    };
    let uid = std::fs::metadata(&user.maildir)
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    let user = crate::harness::User { uid, ..user };
    dc.deliver(&user, &message("after stall", "x"));
    eventually(
        Duration::from_secs(30),
        "the message after the stall",
        || async { db.count("messages", doc! {}).await > n },
    )
    .await;

    // refused for a while: the listener goes away, the daemon backs off, then comes back
    proxy.refuse();
    proxy.freeze_existing();
    dc.deliver(&user, &message("while refused", "x"));
    daemon
        .wait_for_log(Duration::from_secs(30), "connection refused", |l| {
            l.iter().any(|e| {
                e["message"] == "disconnected"
                    && e["error"]
                        .as_str()
                        .is_some_and(|s| s.contains("connection refused"))
            })
        })
        .await;
    proxy.accept_again().await;
    eventually(
        Duration::from_secs(60),
        "the message sent while refused",
        || async { db.count("messages", doc! {}).await > n + 1 },
    )
    .await;
    let (stored, duplicated) = compare(&db, n + 2).await;
    assert_eq!(duplicated, 0);
    record(Row {
        fault: "stall longer than the timeouts (found at the next IDLE refresh), then connections refused for a while",
        tries: 1,
        expected: n + 2,
        stored,
        duplicated,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn uidvalidity_changed_under_a_running_daemon() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("uv", "pw-uv");
    deliver_many(&mut dc, &user, 5);
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("uv", &dc, &user)]);
    let daemon = Daemon::start(&mp);
    eventually(Duration::from_secs(30), "caught up", || async {
        db.count("messages", doc! {}).await >= 5
    })
    .await;
    let old = db
        .mailbox("uv/INBOX")
        .await
        .unwrap()
        .get_i64("uidvalidity")
        .unwrap();
    dc.reset_uidvalidity(&user);
    eventually(
        Duration::from_secs(60),
        "re-ingested under the new UIDVALIDITY",
        || async {
            db.count("messages", doc! {"uidvalidity": {"$ne": old}})
                .await
                >= 5
        },
    )
    .await;
    daemon
        .wait_for_log(Duration::from_secs(5), "uidvalidity_changed", |l| {
            l.iter().any(|e| e["message"] == "uidvalidity_changed")
        })
        .await;
    record(Row {
        fault: "UIDVALIDITY changed under a running daemon (re-ingested under the new value)",
        tries: 1,
        expected: 5,
        stored: db
            .count("messages", doc! {"uidvalidity": {"$ne": old}})
            .await,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_expunged_while_mailpump_is_behind_are_skipped_not_fatal() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("exp2", "pw-exp2");
    deliver_many(&mut dc, &user, 10);
    // expunge three before mailpump ever saw them: remove their files (Dovecot notices)
    let mut files = dc.inbox_files(&user);
    files.sort();
    for f in files.iter().take(3) {
        std::fs::remove_file(f).unwrap();
    }
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[AccountSpec::plain("exp2", &dc, &user)])
        .run_async(&["sync"])
        .await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 7);
    record(Row {
        fault: "messages expunged while mailpump was behind",
        tries: 1,
        expected: 7,
        stored: 7,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mailbox_deleted_and_recreated() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("recreate", "pw-recreate");
    for i in 0..3 {
        dc.deliver_to(
            &user,
            Some("Work"),
            &message(&format!("work {i}"), "x"),
            "",
            None,
        );
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("recreate", &dc, &user)
            .with("mailboxes = [\"Work\"]")
            .with("watch = [\"Work\"]")
            .with("poll_interval = \"1s\"")],
    );
    let daemon = Daemon::start(&mp);
    eventually(Duration::from_secs(30), "first generation", || async {
        db.count("messages", doc! {}).await >= 3
    })
    .await;
    let old = db
        .mailbox("recreate/Work")
        .await
        .unwrap()
        .get_i64("uidvalidity")
        .unwrap();
    dc.stop();
    std::fs::remove_dir_all(user.maildir.join(".Work")).unwrap();
    let _ = std::fs::remove_file(user.maildir.join("dovecot.list.index"));
    std::thread::sleep(Duration::from_millis(1100));
    dc.start_again();
    daemon
        .wait_for_log(Duration::from_secs(30), "the mailbox is gone", |l| {
            l.iter()
                .any(|e| e["message"] == "disconnected" && e["mailbox"] == "Work")
        })
        .await;
    for i in 0..2 {
        dc.deliver_to(
            &user,
            Some("Work"),
            &message(&format!("recreated {i}"), "y"),
            "",
            None,
        );
    }
    eventually(
        Duration::from_secs(120),
        "the recreated mailbox ingested",
        || async {
            db.count("messages", doc! {"uidvalidity": {"$ne": old}})
                .await
                >= 2
        },
    )
    .await;
    assert_eq!(
        db.count("messages", doc! {"uidvalidity": old}).await,
        3,
        "the old generation stays"
    );
    record(Row {
        fault: "mailbox deleted and recreated under a running daemon",
        tries: 1,
        expected: 2,
        stored: db
            .count("messages", doc! {"uidvalidity": {"$ne": old}})
            .await,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}
