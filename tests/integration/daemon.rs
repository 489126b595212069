//! `mailpump run`: live mail over IDLE and polling, many mailboxes, faults, signals, reload.

use std::collections::BTreeSet;
use std::time::Duration;

use bson::doc;

use crate::harness::secantus::Secantus;
use crate::harness::{eventually, message, AccountSpec, Daemon, Dovecot, Mailpump, TestDb};

const SOON: Duration = Duration::from_secs(20);

async fn wait_count(db: &TestDb, n: u64) {
    eventually(SOON, &format!("{n} messages in the database"), || async {
        db.count("messages", doc! {}).await >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_delivered_while_running_is_stored_over_idle() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("live", "pw-live");
    dc.deliver(&user, &message("before", "1"));
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("live", &dc, &user)]);
    let mut daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;
    assert_eq!(daemon.events("watching")[0]["mode"], "idle");
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("live {i}"), "x"));
        wait_count(&db, 2 + i).await;
    }
    assert_eq!(db.count("messages", doc! {}).await, 4);
    daemon.signal("TERM");
    let (code, _) = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, 0);
    assert_eq!(
        daemon.events("connected").len(),
        1,
        "one session served every delivery"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_idle_is_polled() {
    // Dovecot's default capability list minus IDLE
    let mut dc = Dovecot::start_with("imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE SORT THREAD=REFERENCES MULTIAPPEND UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 LITERAL+\n");
    let user = dc.add_user("poll", "pw-poll");
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("poll", &dc, &user).with("poll_interval = \"1s\"")],
    );
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;
    assert_eq!(daemon.events("watching")[0]["mode"], "poll");
    dc.deliver(&user, &message("polled", "x"));
    wait_count(&db, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_mailboxes_each_get_their_mail() {
    let mut dc = Dovecot::start();
    let users: Vec<_> = (0..20)
        .map(|i| dc.add_user(&format!("m{i}"), &format!("pw{i}")))
        .collect();
    let db = TestDb::new().await;
    let specs: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| AccountSpec::plain(&format!("m{i}"), &dc, u))
        .collect();
    let mp = Mailpump::new(&db, &specs);
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "20 mailboxes watching", |l| {
            l.iter().filter(|e| e["message"] == "watching").count() == 20
        })
        .await;
    for (i, u) in users.iter().enumerate() {
        dc.deliver(u, &message(&format!("for m{i}"), "x"));
    }
    wait_count(&db, 20).await;
    for i in 0..20 {
        let docs = db.messages(doc! {"account": format!("m{i}")}).await;
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].get_str("subject").unwrap(), format!("for m{i}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dovecot_restart_is_survived_with_nothing_lost_or_doubled() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("restart", "pw-restart");
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("before {i}"), "x"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("restart", &dc, &user)]);
    let daemon = Daemon::start(&mp);
    wait_count(&db, 3).await;
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;

    dc.stop();
    let port = dc.imap_port;
    daemon
        .wait_for_log(SOON, "connection refused and backoff", |l| {
            l.iter().any(|e| {
                e["message"] == "disconnected"
                    && e["error"].as_str().is_some_and(|s| {
                        s.contains(&format!("connection refused by 127.0.0.1:{port}"))
                    })
            }) && l
                .iter()
                .any(|e| e["message"] == "backoff" && e["delay_ms"].is_u64())
        })
        .await;
    for i in 0..4 {
        dc.deliver(&user, &message(&format!("while down {i}"), "y"));
    }
    dc.start_again();
    wait_count(&db, 7).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let uids: BTreeSet<i64> = db
        .messages(doc! {})
        .await
        .iter()
        .map(|d| d.get_i64("uid").unwrap())
        .collect();
    assert_eq!(uids, (1..=7).collect::<BTreeSet<_>>());
    assert_eq!(db.count("messages", doc! {}).await, 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_catch_up_exits_promptly_and_a_restart_resumes_exactly() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("bulk", "pw-bulk");
    const N: u64 = 3000;
    for i in 0..N {
        dc.deliver(&user, &message(&format!("bulk {i}"), &"z".repeat(2000)));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("bulk", &dc, &user).with("batch_size = 50")],
    );
    let mut daemon = Daemon::start(&mp);
    eventually(
        Duration::from_secs(60),
        "the first batches stored",
        || async { db.count("messages", doc! {}).await >= 100 },
    )
    .await;
    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, 0, "{}", daemon.raw_log());
    assert!(took <= Duration::from_secs(10), "exit took {took:?}");
    let stored_at_stop = db.count("messages", doc! {}).await;
    assert!(
        stored_at_stop < N,
        "the catch-up was interrupted ({stored_at_stop} of {N})"
    );
    let checkpoint = db
        .mailbox("bulk/INBOX")
        .await
        .unwrap()
        .get_i64("last_uid")
        .unwrap() as u64;
    assert!(
        checkpoint <= stored_at_stop,
        "the checkpoint never runs ahead of what is stored"
    );

    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let uids: BTreeSet<i64> = db
        .messages(doc! {})
        .await
        .iter()
        .map(|d| d.get_i64("uid").unwrap())
        .collect();
    assert_eq!(uids.len() as u64, N);
    assert_eq!(uids, (1..=N as i64).collect::<BTreeSet<_>>());
    crate::harness::reliability::record(crate::harness::reliability::Row {
        fault: &format!(
            "SIGTERM to the daemon mid-catch-up: exit 0 after {} ms (promise: 10 s); a restart resumes exactly",
            took.as_millis()
        ),
        tries: 1,
        expected: N,
        stored: uids.len() as u64,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_backs_off_instead_of_looping() {
    let mut dc = Dovecot::start();
    let mut user = dc.add_user("locked", "right");
    user.password = "wrong".into();
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("locked", &dc, &user)]);
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "rejected", |l| {
            l.iter().any(|e| e["message"] == "rejected")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rejected = daemon.events("rejected");
    assert_eq!(rejected.len(), 1, "one login attempt in 5 s, not a loop");
    assert!(rejected[0]["error"]
        .as_str()
        .unwrap()
        .contains("login rejected for locked"));
    assert_eq!(rejected[0]["level"], "ERROR");
    let backoff = &daemon.events("backoff")[0];
    assert!(backoff["delay_ms"].as_u64().unwrap() >= 60_000, "{backoff}");
    let auth_failures = dc.log().matches("auth failed").count()
        + dc.log().matches("Authentication failure").count()
        + dc.log().matches("password mismatch").count();
    assert!(
        auth_failures <= 2,
        "dovecot saw {auth_failures} failed logins"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_adds_a_mailbox_without_touching_the_others() {
    let mut dc = Dovecot::start();
    let a = dc.add_user("first", "pw-a");
    let b = dc.add_user("second", "pw-b");
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("first", &dc, &a)]);
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;

    let both = Mailpump::new(
        &db,
        &[
            AccountSpec::plain("first", &dc, &a),
            AccountSpec::plain("second", &dc, &b),
        ],
    );
    std::fs::copy(&both.config, &mp.config).unwrap();
    daemon.signal("HUP");
    daemon
        .wait_for_log(SOON, "reloaded", |l| {
            l.iter().any(|e| e["message"] == "reloaded")
        })
        .await;
    let reloaded = &daemon.events("reloaded")[0];
    assert_eq!(
        (
            reloaded["added"].as_u64(),
            reloaded["removed"].as_u64(),
            reloaded["restarted"].as_u64()
        ),
        (Some(1), Some(0), Some(0))
    );
    dc.deliver(&b, &message("for second", "x"));
    dc.deliver(&a, &message("for first", "x"));
    wait_count(&db, 2).await;
    let first_sessions = daemon
        .events("connected")
        .iter()
        .filter(|e| e["account"] == "first")
        .count();
    assert_eq!(first_sessions, 1, "the first mailbox kept its session");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_stopping_mid_run_loses_nothing_and_duplicates_nothing() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("dbdown", "pw-dbdown");
    for i in 0..2 {
        dc.deliver(&user, &message(&format!("first {i}"), "x"));
    }
    let mut server = Secantus::start();
    let db = TestDb::on(&server.uri()).await;
    let mut spec = AccountSpec::plain("dbdown", &dc, &user);
    spec.extra.push("command_timeout = \"10s\"".into());
    let mut toml = String::new();
    let mp0 = Mailpump::new(&db, &[spec]);
    toml.push_str(&std::fs::read_to_string(&mp0.config).unwrap().replace(
        "connect_timeout = \"5s\"\n\n[defaults]",
        "connect_timeout = \"2s\"\nop_timeout = \"3s\"\n\n[defaults]",
    ));
    let mp = Mailpump::from_toml(&toml);
    let daemon = Daemon::start(&mp);
    wait_count(&db, 2).await;
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;

    server.stop();
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("while db down {i}"), "y"));
    }
    daemon
        .wait_for_log(
            Duration::from_secs(30),
            "a store error and a backoff",
            |l| {
                l.iter().any(|e| e["message"] == "disconnected")
                    && l.iter().any(|e| e["message"] == "backoff")
            },
        )
        .await;
    server.launch();
    let db = TestDb::on(&server.uri()).await.with_name(&db.name).await;
    eventually(
        Duration::from_secs(60),
        "5 messages after the database came back",
        || async { db.count("messages", doc! {}).await >= 5 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let uids: BTreeSet<i64> = db
        .messages(doc! {})
        .await
        .iter()
        .map(|d| d.get_i64("uid").unwrap())
        .collect();
    assert_eq!(uids, (1..=5).collect::<BTreeSet<_>>());
    assert_eq!(db.count("messages", doc! {}).await, 5);
    assert_eq!(
        db.mailbox("dbdown/INBOX")
            .await
            .unwrap()
            .get_i64("last_uid")
            .unwrap(),
        5
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_connection_is_replaced_at_the_next_idle_refresh() {
    // Dovecot says "* OK Still here" every second while idling: a live connection is never silent.
    let mut dc = Dovecot::start_with("imap_idle_notify_interval = 1 secs\n");
    let user = dc.add_user("silent", "pw-silent");
    let proxy = crate::harness::proxy::Proxy::start(dc.imap_port).await;
    let db = TestDb::new().await;
    // silence must outlast the refresh (a quiet server is healthy): a frozen connection is found
    // when the refresh's DONE goes unanswered within command_timeout
    let mut spec = AccountSpec::plain("silent", &dc, &user)
        .with("idle_refresh = \"2s\"")
        .with("silence_timeout = \"3s\"")
        .with("command_timeout = \"2s\"");
    spec.port = proxy.port;
    let mp = Mailpump::new(&db, &[spec]);
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;
    // keepalives arrive: several seconds pass without a disconnect
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        daemon.events("disconnected").is_empty(),
        "{}",
        daemon.raw_log()
    );

    proxy.freeze_existing();
    dc.deliver(&user, &message("after the freeze", "x"));
    daemon
        .wait_for_log(SOON, "an unanswered DONE", |l| {
            l.iter().any(|e| {
                e["message"] == "disconnected"
                    && e["error"].as_str().is_some_and(|s| s.contains("DONE"))
            })
        })
        .await;
    wait_count(&db, 1).await;
    assert_eq!(
        daemon.events("connected").len(),
        2,
        "one replacement session"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_is_reissued_every_idle_refresh_without_losing_mail_across_it() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("refresh", "pw-refresh");
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("refresh", &dc, &user).with("idle_refresh = \"500ms\"")],
    );
    let daemon = Daemon::start_with_env(&mp, &[("RUST_LOG", "info,mailpump=debug")]);
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;
    for i in 0..6u64 {
        dc.deliver(&user, &message(&format!("across refresh {i}"), "x"));
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    wait_count(&db, 6).await;
    let refreshes = daemon.events("idle_refreshed").len();
    assert!(refreshes >= 2, "IDLE re-issued {refreshes} times");
    assert_eq!(daemon.events("connected").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pop3_mailbox_is_polled_by_the_daemon() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("popd", "pw-popd");
    let db = TestDb::new().await;
    let mut spec = AccountSpec::plain("popd", &dc, &user)
        .with("protocol = \"pop3\"")
        .with("poll_interval = \"1s\"");
    spec.port = dc.pop3_port;
    let mp = Mailpump::new(&db, &[spec]);
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;
    assert_eq!(daemon.events("watching")[0]["mode"], "pop3");
    dc.deliver(&user, &message("by pop3", "x"));
    wait_count(&db, 1).await;
    dc.deliver(&user, &message("by pop3 again", "x"));
    wait_count(&db, 2).await;
}
