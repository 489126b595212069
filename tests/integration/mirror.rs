//! Flags and deletions followed after a message was stored (issue 13), against the three real
//! servers: Dovecot and Cyrus (CONDSTORE + QRESYNC: live FETCH/VANISHED while idling, then
//! `EXAMINE (QRESYNC ...)` after a restart) and Courier (neither: sequence-numbered FETCH and
//! EXPUNGE while idling, the flag scan and UID comparison after a restart).

use std::time::{Duration, Instant};

use bson::{doc, Document};

use crate::harness::proxy::{Mode, Proxy};
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

/// Starts the daemon and waits until it stored the 4 messages and watches the mailbox.
async fn start_watching(mp: &Mailpump, db: &TestDb) -> Daemon {
    let daemon = Daemon::start(mp);
    eventually(WAIT, "4 messages stored", || async {
        db.messages(doc! {}).await.len() == 4
    })
    .await;
    daemon
        .wait_for_log(WAIT, "watching", |logs| {
            logs.iter().any(|l| l["message"] == "watching")
        })
        .await;
    daemon
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
    let mut daemon = start_watching(&mp, &db).await;

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
    // CONDSTORE servers have their HIGHESTMODSEQ recorded, the others their flag scans
    let record = db.mailbox(&format!("{name}/INBOX")).await.unwrap();
    assert_eq!(
        record.get_i64("highest_modseq").is_ok(),
        name != "courier",
        "{record:?}"
    );
    assert!(
        record.get_datetime("flags_scanned_at").is_ok(),
        "{record:?}"
    );
}

/// An expunge made while mailpump opens the mailbox again (after a wake-up, before the server
/// acts on its EXAMINE) may be announced to no one: a server says nothing more about the
/// selection it closes, and the EXAMINE answers a count one lower. (Dovecot does send the
/// EXPUNGE before its `[CLOSED]` when it had it in time; the proxy drops it, as a server that
/// had it a moment later would never send it.) Without QRESYNC, that lower count must start a
/// UID comparison at once (`Session::open_mailbox` asks for it), not at the next flag scan (an
/// hour here). The fault proxy holds the EXAMINE back while another client expunges.
#[tokio::test(flavor = "multi_thread")]
async fn an_expunge_no_one_announced_while_the_mailbox_is_opened_again_is_found_by_the_count() {
    let caps = "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MULTIAPPEND UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 LITERAL+ CONDSTORE\n";
    let mut dovecot = Dovecot::start_with(caps);
    let user = dovecot.add_user("race", "pw-race");
    for i in 1..=4 {
        dovecot.append(&user, "INBOX", &message(&format!("m{i}"), "body"));
    }
    let proxy = Proxy::start(dovecot.imap_port).await;
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::on_port("race", proxy.port, &user).with("flag_scan_interval = \"1h\"")],
    );
    let daemon = start_watching(&mp, &db).await;
    let mut other = RawImap::login(dovecot.imap_port, &user);
    store(&mut other, "SELECT INBOX");
    // a first wake-up: the session's one UID comparison (its first look at stored mail) is
    // spent on it
    store(&mut other, "UID STORE 1 +FLAGS (\\Flagged)");
    until(&db, 1, "\\Flagged set on uid 1", |d| {
        flags(d).contains(&"\\Flagged".to_string())
    })
    .await;
    daemon
        .wait_for_log(WAIT, "the first look's comparison", |logs| {
            logs.iter().any(|l| l["message"] == "flags_scanned")
        })
        .await;
    // the next flag change wakes the daemon; its next EXAMINE waits 3 s in the proxy, the
    // expunge happens meanwhile, and no EXPUNGE reaches mailpump
    proxy.set_mode(Mode::DropExpunges);
    proxy.hold_next("EXAMINE", Duration::from_secs(3));
    store(&mut other, "UID STORE 2 +FLAGS (\\Deleted)");
    eventually(WAIT, "the EXAMINE held", || async { proxy.holds().0 == 1 }).await;
    store(&mut other, "EXPUNGE");
    other.logout();
    let found = until(&db, 2, "uid 2 marked expunged", |d| {
        d.get_datetime("expunged_at").is_ok()
    })
    .await;
    assert_eq!(proxy.holds().1, 1);
    // found by a second comparison, the one the lower count started
    daemon
        .wait_for_log(WAIT, "the second comparison", |logs| {
            logs.iter()
                .filter(|l| l["message"] == "flags_scanned")
                .count()
                >= 2
        })
        .await;
    let scans = daemon.events("flags_scanned");
    assert_eq!(scans.len(), 2, "{scans:?}");
    assert_eq!(scans[1]["expunged"], 1, "{scans:?}");
    eprintln!(
        "an expunge no one announced while the mailbox was opened again: marked {found:?} later"
    );

    for uid in [1, 3, 4] {
        assert!(doc_of(&db, uid).await.unwrap().get("expunged_at").is_none());
    }
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

/// A MOVE between two folders mailpump watches: an expunge in one, a new message in the
/// other, and the two documents linked (`moved_to` / `moved_from`), whichever side is seen
/// first.
async fn a_move_is_an_expunge_here_a_new_message_there_and_a_link(
    server: &mut impl ImapServer,
    name: &str,
    archive: &str,
) {
    let user = server.add_user("mover", "pw-mover");
    server.create_folder(&user, archive);
    server.append(&user, "INBOX", &message("to be moved", "body"));
    server.append(&user, "INBOX", &message("stays", "body"));
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::on_port(name, server.port(), &user)
            .with(format!("mailboxes = [\"INBOX\", \"{archive}\"]"))
            .with(format!("watch = [\"INBOX\", \"{archive}\"]"))],
    );
    let _daemon = Daemon::start(&mp);
    eventually(WAIT, "2 messages stored", || async {
        db.messages(doc! {}).await.len() == 2
    })
    .await;
    let mut other = RawImap::login(server.port(), &user);
    store(&mut other, "SELECT INBOX");
    store(&mut other, &format!("UID MOVE 1 \"{archive}\""));
    other.logout();
    let linked = || async {
        let moved = db.messages(doc! {"mailbox": archive}).await;
        let old = doc_of(&db, 1).await;
        moved.len() == 1
            && moved[0].get_str("moved_from").is_ok()
            && old.is_some_and(|o| o.get_str("moved_to").is_ok())
    };
    let deadline = Instant::now() + WAIT;
    while !linked().await {
        assert!(
            Instant::now() < deadline,
            "the move was not linked: {:#?}\n{}",
            db.messages(doc! {})
                .await
                .iter()
                .map(|d| (
                    d.get_str("_id").unwrap().to_string(),
                    d.get("expunged_at").cloned(),
                    d.get("moved_to").cloned(),
                    d.get("moved_from").cloned(),
                    d.get_document("raw")
                        .unwrap()
                        .get_str("sha256")
                        .unwrap()
                        .to_string()
                ))
                .collect::<Vec<_>>(),
            _daemon.raw_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = doc_of(&db, 1).await.unwrap();
    let new = &db.messages(doc! {"mailbox": archive}).await[0];
    assert!(old.get_datetime("expunged_at").is_ok(), "{old:?}");
    assert_eq!(old.get_str("moved_to"), new.get_str("_id"));
    assert_eq!(new.get_str("moved_from"), old.get_str("_id"));
    assert_eq!(new.get_str("subject"), Ok("to be moved"));
    assert!(doc_of(&db, 2).await.unwrap().get("expunged_at").is_none());
}

#[tokio::test]
async fn dovecot_a_move_between_watched_folders_is_linked() {
    let mut dovecot = Dovecot::start();
    a_move_is_an_expunge_here_a_new_message_there_and_a_link(&mut dovecot, "dovecot", "Archive")
        .await;
}

#[tokio::test]
async fn cyrus_a_move_between_watched_folders_is_linked() {
    let mut cyrus = Cyrus::start();
    a_move_is_an_expunge_here_a_new_message_there_and_a_link(&mut cyrus, "cyrus", "INBOX.Archive")
        .await;
}

/// A message with one attachment (`attachment` bytes, base64 on the wire).
fn with_attachment(subject: &str, attachment: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(attachment);
    format!(
        "From: a@example.test\r\nTo: b@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n{subject}\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"a.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b--\r\n"
    )
    .into_bytes()
}

/// `on_expunge = "delete"`: the documents of expunged messages go, and the blob sweep removes
/// the blobs nothing refers to any more, never one another document still points at.
#[tokio::test]
async fn on_expunge_delete_removes_documents_and_the_sweep_keeps_shared_blobs() {
    let mut dovecot = Dovecot::start();
    let user = dovecot.add_user("deleter", "pw-deleter");
    let shared = b"the same attachment in two messages".repeat(100);
    let unique = b"an attachment only the first message has".repeat(100);
    let server: &dyn ImapServer = &dovecot;
    server.append(&user, "INBOX", &with_attachment("one", &shared));
    server.append(&user, "INBOX", &with_attachment("two", &shared));
    server.append(&user, "INBOX", &with_attachment("three", &unique));
    let db = TestDb::new().await;
    // raw bytes as blobs too (inline_raw_max = 0), so that the sweep has raw blobs to judge
    let toml_store = "on_expunge = \"delete\"\nblob_sweep_after = \"1s\"\ninline_raw_max = 0";
    let mp = Mailpump::new_with_store(
        &db,
        toml_store,
        &[AccountSpec::on_port("deleter", server.port(), &user)],
    );
    let mut daemon = Daemon::start(&mp);
    eventually(WAIT, "3 messages stored", || async {
        db.messages(doc! {}).await.len() == 3
    })
    .await;
    let docs = db.messages(doc! {}).await;
    let sha_of = |subject: &str| -> (String, String) {
        let d = docs
            .iter()
            .find(|d| d.get_str("subject") == Ok(subject))
            .unwrap();
        let raw = d.get_document("raw").unwrap().get_str("sha256").unwrap();
        let att = d.get_array("attachments").unwrap()[0]
            .as_document()
            .unwrap()
            .get_str("sha256")
            .unwrap();
        (raw.to_string(), att.to_string())
    };
    let (raw1, shared_sha) = sha_of("one");
    let (raw2, shared2) = sha_of("two");
    let (raw3, unique_sha) = sha_of("three");
    assert_eq!(shared_sha, shared2);

    let mut other = RawImap::login(server.port(), &user);
    store(&mut other, "SELECT INBOX");
    store(&mut other, "UID STORE 1,3 +FLAGS (\\Deleted)");
    store(&mut other, "EXPUNGE");
    other.logout();
    eventually(WAIT, "two documents removed", || async {
        db.messages(doc! {}).await.len() == 1
    })
    .await;
    let blob = |sha: String| {
        let db = &db;
        async move { db.count("blobs.files", doc! {"_id": sha}).await }
    };
    eventually(WAIT, "the unreferenced blobs swept", || async {
        blob(raw1.clone()).await == 0
            && blob(raw3.clone()).await == 0
            && blob(unique_sha.clone()).await == 0
    })
    .await;
    // the attachment message two still has, and its raw bytes, stay; and their chunks
    assert_eq!(blob(shared_sha.clone()).await, 1);
    assert_eq!(blob(raw2.clone()).await, 1);
    assert!(
        db.count("blobs.chunks", doc! {"files_id": &shared_sha})
            .await
            > 0
    );
    assert_eq!(
        db.count("blobs.chunks", doc! {"files_id": &unique_sha})
            .await,
        0
    );
    let swept = daemon.events("blobs_swept");
    assert!(
        swept.iter().any(|e| e["removed"].as_u64() >= Some(3)),
        "{swept:?}"
    );
    // a new message with the shared attachment after the sweeps: stored and complete
    server.append(&user, "INBOX", &with_attachment("four", &shared));
    eventually(WAIT, "message four stored", || async {
        db.messages(doc! {"subject": "four"}).await.len() == 1
    })
    .await;
    assert_eq!(db.blob(&shared_sha).await, shared);
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(20)).await;
}

/// Dovecot holds NOTIFY events up to its 30 s idle-check timer in this harness (see
/// folders.rs): two rounds of it.
const HELD: Duration = Duration::from_secs(90);

/// A folder that is not watched (followed by the account's one follower connection: NOTIFY
/// on Dovecot, a LIST-STATUS sweep with HIGHESTMODSEQ on Cyrus, a STATUS sweep plus the flag
/// scan on Courier) has its flag changes and expunges followed too.
async fn a_folder_followed_by_the_follower_mirrors_flags_and_expunges(
    server: &mut impl ImapServer,
    name: &str,
    work: &str,
) {
    let user = server.add_user("follow", "pw-follow");
    server.create_folder(&user, work);
    server.append(&user, work, &message("w1", "body"));
    server.append(&user, work, &message("w2", "body"));
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::on_port(name, server.port(), &user)
            .with("mailboxes = [\"*\"]")
            .with("poll_interval = \"1s\"")
            .with("flag_scan_interval = \"2s\"")],
    );
    let daemon = Daemon::start(&mp);
    let in_work = |uid: u32| {
        let db = &db;
        async move {
            db.messages(doc! {"mailbox": work, "uid": uid as i64})
                .await
                .into_iter()
                .next()
        }
    };
    eventually(WAIT, "2 messages of the folder stored", || async {
        db.messages(doc! {"mailbox": work}).await.len() == 2
    })
    .await;
    let mut other = RawImap::login(server.port(), &user);
    store(&mut other, &format!("SELECT \"{work}\""));
    store(&mut other, "UID STORE 1 +FLAGS (\\Flagged)");
    store(&mut other, "UID STORE 2 +FLAGS (\\Deleted)");
    store(&mut other, "EXPUNGE");
    other.logout();
    let started = Instant::now();
    let deadline = started + HELD;
    loop {
        let one = in_work(1).await.unwrap();
        let two = in_work(2).await.unwrap();
        if flags(&one).contains(&"\\Flagged".to_string()) && two.get_datetime("expunged_at").is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: not mirrored: {one:?}\n{two:?}\n{}",
            daemon.raw_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{name}: a non-watched folder's changes mirrored after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dovecot_a_folder_followed_by_notify_mirrors_flags_and_expunges() {
    let mut dovecot = Dovecot::start();
    a_folder_followed_by_the_follower_mirrors_flags_and_expunges(&mut dovecot, "dovecot", "Work")
        .await;
}

#[tokio::test]
async fn cyrus_a_folder_followed_by_list_status_mirrors_flags_and_expunges() {
    let mut cyrus = Cyrus::start();
    a_folder_followed_by_the_follower_mirrors_flags_and_expunges(&mut cyrus, "cyrus", "INBOX.Work")
        .await;
}

#[tokio::test]
async fn courier_a_folder_followed_by_status_polls_mirrors_flags_and_expunges() {
    let mut courier = Courier::start();
    a_folder_followed_by_the_follower_mirrors_flags_and_expunges(
        &mut courier,
        "courier",
        "INBOX.Work",
    )
    .await;
}

/// Gmail's shape: CONDSTORE without QRESYNC. Flag changes made while mailpump was stopped come
/// from `CHANGEDSINCE`, expunges from the UID comparison of the first pass of a session.
#[tokio::test]
async fn dovecot_with_condstore_only_uses_changedsince_and_the_uid_comparison() {
    let caps = "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MULTIAPPEND UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 LITERAL+ CONDSTORE\n";
    let mut dovecot = Dovecot::start_with(caps);
    flags_and_expunges_are_mirrored(&mut dovecot, "gmailish", "").await;
}
