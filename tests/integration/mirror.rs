//! Flags and deletions followed after a message was stored (issue 13), against the three real
//! servers: Dovecot and Cyrus (CONDSTORE + QRESYNC: live FETCH/VANISHED while idling, then
//! `EXAMINE (QRESYNC ...)` after a restart) and Courier (neither: sequence-numbered FETCH and
//! EXPUNGE while idling, the flag scan and UID comparison after a restart).

use std::time::{Duration, Instant};

use bson::{doc, Document};

use crate::harness::{
    eventually, message, AccountSpec, Courier, Cyrus, Daemon, Dovecot, ImapServer, Mailpump,
    RawImap, TestDb,
};

const WAIT: Duration = Duration::from_secs(20);

fn flags(d: &Document) -> Vec<String> {
    d.get_array("flags")
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn doc_of(db: &TestDb, uid: u32) -> Option<Document> {
    db.messages(doc! {"mailbox": "INBOX", "uid": uid as i64})
        .await
        .into_iter()
        .next()
}

/// Waits until the document of `uid` satisfies `check`; returns how long it took.
async fn until<F: Fn(&Document) -> bool>(db: &TestDb, uid: u32, what: &str, check: F) -> Duration {
    let started = Instant::now();
    eventually(WAIT, what, || async {
        doc_of(db, uid).await.is_some_and(|d| check(&d))
    })
    .await;
    started.elapsed()
}

fn store(imap: &mut RawImap, command: &str) {
    imap.command(command)
        .unwrap_or_else(|e| panic!("{command}: {e:?}"));
}

async fn flags_and_expunges_are_mirrored(server: &mut impl ImapServer, name: &str, extra: &str) {
    let user = server.add_user("mirror", "pw-mirror");
    for i in 1..=4 {
        server.append(&user, "INBOX", &message(&format!("m{i}"), "body"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::on_port(name, server.port(), &user).with(extra.to_string())],
    );
    let mut daemon = Daemon::start(&mp);
    eventually(WAIT, "4 messages stored", || async {
        db.messages(doc! {}).await.len() == 4
    })
    .await;
    daemon
        .wait_for_log(WAIT, "idling", |logs| {
            logs.iter().any(|l| l["message"] == "watching")
        })
        .await;

    // while idling: another client sets and clears flags, and expunges a message
    let mut other = RawImap::login(server.port(), &user);
    store(&mut other, "SELECT INBOX");
    store(&mut other, "UID STORE 1 +FLAGS (\\Flagged $Work)");
    let set = until(&db, 1, "\\Flagged set on uid 1", |d| {
        flags(d).contains(&"\\Flagged".to_string()) && flags(d).contains(&"$Work".to_string())
    })
    .await;
    store(&mut other, "UID STORE 1 -FLAGS ($Work)");
    let cleared = until(&db, 1, "$Work cleared on uid 1", |d| {
        !flags(d).contains(&"$Work".to_string()) && d.get_datetime("flags_updated_at").is_ok()
    })
    .await;
    store(&mut other, "UID STORE 2 +FLAGS (\\Deleted)");
    store(&mut other, "EXPUNGE");
    let expunged = until(&db, 2, "uid 2 marked expunged", |d| {
        d.get_datetime("expunged_at").is_ok()
    })
    .await;
    eprintln!("{name}: while idling: flag set {set:?}, cleared {cleared:?}, expunge {expunged:?}");
    for uid in [1, 3, 4] {
        assert!(doc_of(&db, uid).await.unwrap().get("expunged_at").is_none());
    }

    // while mailpump is stopped: a flag change and an expunge, found at the next start
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(20)).await;
    store(&mut other, "UID STORE 3 +FLAGS (\\Answered)");
    store(&mut other, "UID STORE 4 +FLAGS (\\Deleted)");
    store(&mut other, "EXPUNGE");
    other.logout();
    let _daemon = Daemon::start(&mp);
    until(&db, 3, "\\Answered on uid 3 after the restart", |d| {
        flags(d).contains(&"\\Answered".to_string())
    })
    .await;
    until(&db, 4, "uid 4 marked expunged after the restart", |d| {
        d.get_datetime("expunged_at").is_ok()
    })
    .await;
    let one = doc_of(&db, 1).await.unwrap();
    assert!(one.get("expunged_at").is_none(), "{one:?}");
    assert_eq!(db.messages(doc! {}).await.len(), 4, "documents stay (mark)");
}

#[tokio::test]
async fn dovecot_flags_and_expunges_are_followed_live_and_after_a_restart() {
    let mut dovecot = Dovecot::start();
    flags_and_expunges_are_mirrored(&mut dovecot, "dovecot", "").await;
}

#[tokio::test]
async fn cyrus_flags_and_expunges_are_followed_live_and_after_a_restart() {
    let mut cyrus = Cyrus::start();
    flags_and_expunges_are_mirrored(&mut cyrus, "cyrus", "").await;
}

/// Courier has neither CONDSTORE nor QRESYNC: live changes come by sequence number, and after
/// the restart only the flag scan (every `flag_scan_interval`, 2 s here) finds them.
#[tokio::test]
async fn courier_flags_and_expunges_are_followed_by_sequence_numbers_and_the_flag_scan() {
    let mut courier = Courier::start();
    flags_and_expunges_are_mirrored(&mut courier, "courier", "flag_scan_interval = \"2s\"").await;
}
