//! `mailpump sync` against a real Dovecot and a real MongoDB-protocol server.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use bson::doc;

use crate::harness::{message, AccountSpec, Dovecot, Mailpump, TestDb};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = crate::harness::root().join("tests/fixtures/parse");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("eml"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Bytes an IMAP server sends back unchanged (CRLF line ends, no NUL, no bare CR/LF).
fn wire_clean(bytes: &[u8]) -> bool {
    !bytes.contains(&0)
        && bytes.iter().enumerate().all(|(i, b)| match b {
            b'\n' => i > 0 && bytes[i - 1] == b'\r',
            b'\r' => bytes.get(i + 1) == Some(&b'\n'),
            _ => true,
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_stores_every_message_once_with_its_exact_raw_bytes() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("alice", "pw-alice");
    let mut delivered = corpus();
    let (big, _) = crate::golden::big_message(25 * 1024 * 1024);
    delivered.push(("big".into(), big));
    for (_, bytes) in &delivered {
        dc.deliver(&user, bytes);
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("alice", &dc, &user).with("batch_size = 7")],
    );

    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let summary = run.event("mailbox_synced");
    assert_eq!(summary["account"], "alice");
    assert_eq!(summary["mailbox"], "INBOX");
    assert_eq!(summary["fetched"], delivered.len());
    assert_eq!(summary["stored"], delivered.len());
    assert_eq!(summary["skipped"], 0);
    assert!(summary["elapsed_ms"].is_u64());

    let docs = db.messages(doc! {}).await;
    assert_eq!(docs.len(), delivered.len());
    let by_sha: HashMap<String, &Vec<u8>> = delivered
        .iter()
        .map(|(_, b)| (mailpump::parse::sha256_hex(b), b))
        .collect();
    let mut uids = BTreeSet::new();
    for d in &docs {
        uids.insert(d.get_i64("uid").unwrap());
        let raw = d.get_document("raw").unwrap();
        let sha = raw.get_str("sha256").unwrap();
        // one document per ordinary message: the raw bytes inside it up to inline_raw_max
        // (256 KiB), in the blobs bucket above
        let size = d.get_i64("size").unwrap();
        assert_eq!(
            raw.contains_key("data"),
            size <= 256 * 1024,
            "{size} bytes: inline iff small"
        );
        assert_eq!(raw.get_str("blob").ok(), (size > 256 * 1024).then_some(sha));
        // (inline or a blob, checked against its digest)
        let stored = db.raw(d).await;
        assert_eq!(
            stored.len() as i64,
            d.get_i64("size").unwrap(),
            "raw size is the server's RFC822.SIZE"
        );
        if let Some(original) = by_sha.get(sha) {
            assert_eq!(&stored, *original);
        }
    }
    // every delivered message whose bytes survive IMAP unchanged is stored byte for byte
    let stored_shas: BTreeSet<String> = docs
        .iter()
        .map(|d| {
            d.get_document("raw")
                .unwrap()
                .get_str("sha256")
                .unwrap()
                .to_string()
        })
        .collect();
    for (name, bytes) in &delivered {
        if wire_clean(bytes) {
            assert!(
                stored_shas.contains(&mailpump::parse::sha256_hex(bytes)),
                "{name} stored byte for byte"
            );
        }
    }
    assert_eq!(uids, (1..=delivered.len() as i64).collect());
    let big_doc = docs
        .iter()
        .find(|d| d.get_str("subject") == Ok("Big"))
        .unwrap();
    let att = big_doc.get_array("attachments").unwrap()[0]
        .as_document()
        .unwrap();
    assert_eq!(att.get_i64("size").unwrap(), 25 * 1024 * 1024);
    assert_eq!(
        db.blob(att.get_str("sha256").unwrap()).await.len(),
        25 * 1024 * 1024
    );

    let cp = db.mailbox("alice/INBOX").await.unwrap();
    assert_eq!(cp.get_i64("last_uid").unwrap(), delivered.len() as i64);
    assert_eq!(
        cp.get_i64("uidvalidity").unwrap(),
        docs[0].get_i64("uidvalidity").unwrap()
    );

    let again = mp.run_async(&["sync"]).await;
    assert_eq!(again.code(), 0, "{}", again.stdout());
    assert_eq!(again.event("mailbox_synced")["fetched"], 0);
    assert_eq!(again.event("mailbox_synced")["stored"], 0);
    assert_eq!(db.count("messages", doc! {}).await, delivered.len() as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_messages_added_since_the_last_sync_are_fetched() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("bob", "pw-bob");
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("first {i}"), "x"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("bob", &dc, &user)]);
    assert_eq!(
        mp.run_async(&["sync"]).await.event("mailbox_synced")["stored"],
        3
    );
    for i in 0..2 {
        dc.deliver(&user, &message(&format!("later {i}"), "y"));
    }
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.event("mailbox_synced")["fetched"], 2);
    assert_eq!(run.event("mailbox_synced")["stored"], 2);
    let later: BTreeSet<i64> = db
        .messages(doc! {"subject": {"$regex": "^later"}})
        .await
        .iter()
        .map(|d| d.get_i64("uid").unwrap())
        .collect();
    assert_eq!(later, BTreeSet::from([4, 5]));
    assert_eq!(db.count("messages", doc! {}).await, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_uidvalidity_change_reingests_under_the_new_value_without_new_blobs() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("carol", "pw-carol");
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("m{i}"), "body"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("carol", &dc, &user)]);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    let blobs_before = db.count("blobs.files", doc! {}).await;
    let old = db
        .mailbox("carol/INBOX")
        .await
        .unwrap()
        .get_i64("uidvalidity")
        .unwrap();

    dc.reset_uidvalidity(&user);
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let changed = run.event("uidvalidity_changed");
    assert_eq!(changed["old"], old);
    let new = db
        .mailbox("carol/INBOX")
        .await
        .unwrap()
        .get_i64("uidvalidity")
        .unwrap();
    assert_ne!(new, old);
    assert_eq!(db.count("messages", doc! {"uidvalidity": new}).await, 3);
    assert_eq!(db.count("messages", doc! {"uidvalidity": old}).await, 3);
    // the old documents stay, marked: their UIDs name nothing any more
    assert_eq!(
        db.count(
            "messages",
            doc! {"uidvalidity": old, "expunged_reason": "uidvalidity changed", "expunged_at": {"$exists": true}}
        )
        .await,
        3
    );
    assert_eq!(
        db.count(
            "messages",
            doc! {"uidvalidity": new, "expunged_at": {"$exists": true}}
        )
        .await,
        0
    );
    assert_eq!(
        db.count("blobs.files", doc! {}).await,
        blobs_before,
        "same bytes, same blobs"
    );
}

fn days_ago(days: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(days * 86_400)
}

#[tokio::test(flavor = "multi_thread")]
async fn since_and_unseen_only_select_what_imap_search_selects_and_flags_stay_untouched() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("dave", "pw-dave");
    // INTERNALDATE comes from the file's mtime
    dc.deliver_to(
        &user,
        None,
        &message("old seen", "1"),
        "S",
        Some(days_ago(400)),
    );
    dc.deliver_to(
        &user,
        None,
        &message("old unseen", "2"),
        "",
        Some(days_ago(400)),
    );
    dc.deliver_to(
        &user,
        None,
        &message("new seen", "3"),
        "S",
        Some(days_ago(1)),
    );
    dc.deliver_to(
        &user,
        None,
        &message("new unseen", "4"),
        "",
        Some(days_ago(1)),
    );
    let since = (chrono::Utc::now() - chrono::Duration::days(30))
        .format("%Y-%m-%d")
        .to_string();

    let mut selected = Vec::new();
    for extra in [
        vec![],
        vec![format!("since = \"{since}\"")],
        vec!["unseen_only = true".to_string()],
        vec![format!("since = \"{since}\""), "unseen_only = true".into()],
    ] {
        let db = TestDb::new().await;
        let mut spec = AccountSpec::plain("dave", &dc, &user);
        for line in extra {
            spec = spec.with(line);
        }
        let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
        assert_eq!(run.code(), 0, "{}", run.stdout());
        let subjects: BTreeSet<String> = db
            .messages(doc! {})
            .await
            .iter()
            .map(|d| d.get_str("subject").unwrap().to_string())
            .collect();
        selected.push(subjects);
    }
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        selected[0],
        set(&["old seen", "old unseen", "new seen", "new unseen"])
    );
    assert_eq!(selected[1], set(&["new seen", "new unseen"]));
    assert_eq!(selected[2], set(&["old unseen", "new unseen"]));
    assert_eq!(selected[3], set(&["new unseen"]));

    // four syncs later, the unseen messages are still unseen on the server
    let seen_files = std::fs::read_dir(user.maildir.join("cur"))
        .unwrap()
        .chain(std::fs::read_dir(user.maildir.join("new")).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| {
            n.rsplit_once(":2,")
                .is_some_and(|(_, flags)| flags.contains('S'))
        })
        .count();
    assert_eq!(seen_files, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn mark_seen_sets_the_flag_after_storing() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("erin", "pw-erin");
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("m{i}"), "b"));
    }
    let db = TestDb::new().await;
    let run = Mailpump::new(
        &db,
        &[AccountSpec::plain("erin", &dc, &user)
            .with("mark_seen = true")
            .with("batch_size = 2")],
    )
    .run_async(&["sync"])
    .await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 3);
    // a fresh database asking for unseen mail now finds none
    let db2 = TestDb::new().await;
    let run = Mailpump::new(
        &db2,
        &[AccountSpec::plain("erin", &dc, &user).with("unseen_only = true")],
    )
    .run_async(&["sync"])
    .await;
    assert_eq!(run.code(), 0);
    assert_eq!(db2.count("messages", doc! {}).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn several_mailboxes_including_non_ascii_names_are_synced() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("frank", "pw-frank");
    dc.deliver(&user, &message("in inbox", "1"));
    for i in 0..3 {
        dc.deliver_to(
            &user,
            Some("已发送"),
            &message(&format!("sent {i}"), "2"),
            "",
            None,
        );
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::plain("frank", &dc, &user).with("mailboxes = [\"INBOX\", \"已发送\"]")],
    );
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.events("mailbox_synced").len(), 2);
    assert_eq!(db.count("messages", doc! {"mailbox": "INBOX"}).await, 1);
    assert_eq!(db.count("messages", doc! {"mailbox": "已发送"}).await, 3);
    assert!(db.mailbox("frank/已发送").await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_ascii_password_logs_in_with_authenticate_plain() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("gina", "pässwörd-密码");
    dc.deliver(&user, &message("hello", "1"));
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[AccountSpec::plain("gina", &dc, &user)])
        .run_async(&["sync"])
        .await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_a_clear_error_naming_the_account_and_stores_nothing() {
    let mut dc = Dovecot::start();
    let mut user = dc.add_user("hank", "right");
    dc.deliver(&user, &message("hello", "1"));
    user.password = "wrong-password".into();
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[AccountSpec::plain("hank", &dc, &user)])
        .run_async(&["sync"])
        .await;
    assert_eq!(run.code(), 1);
    let failed = run.event("mailbox_sync_failed");
    assert_eq!(failed["account"], "hank");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("login rejected for hank"),
        "{failed}"
    );
    assert!(
        !run.stdout().contains("wrong-password"),
        "the password never reaches the logs"
    );
    assert_eq!(db.count("messages", doc! {}).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_listening_says_connection_refused_with_host_and_port() {
    let port = crate::harness::dovecot::free_port();
    let db = TestDb::new().await;
    let spec = AccountSpec {
        name: "ivy".into(),
        port,
        security: "plain",
        username: "ivy".into(),
        password: "x".into(),
        extra: vec![],
    };
    let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
    assert_eq!(run.code(), 1);
    let error = run.event("mailbox_sync_failed")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains(&format!("connection refused by 127.0.0.1:{port}")),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_failing_mailbox_does_not_stop_the_others() {
    let mut dc = Dovecot::start();
    let good = dc.add_user("jill", "pw-jill");
    dc.deliver(&good, &message("fine", "1"));
    let db = TestDb::new().await;
    let bad =
        AccountSpec::plain("jill", &dc, &good).with("mailboxes = [\"INBOX\", \"Does-Not-Exist\"]");
    let run = Mailpump::new(&db, &[bad]).run_async(&["sync"]).await;
    assert_eq!(run.code(), 1, "exit 1 when any mailbox failed");
    assert_eq!(run.event("mailbox_synced")["mailbox"], "INBOX");
    assert_eq!(
        run.event("mailbox_sync_failed")["mailbox"],
        "Does-Not-Exist"
    );
    assert_eq!(db.count("messages", doc! {}).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_malformed_corpus_is_stored_whole_through_imap() {
    let (_dir, cases) = crate::golden::malformed_corpus();
    let mut dc = Dovecot::start();
    let user = dc.add_user("bad", "pw-bad");
    for (_, raw, _) in &cases {
        dc.deliver(&user, raw);
    }
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[AccountSpec::plain("bad", &dc, &user)])
        .run_async(&["sync"])
        .await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.event("mailbox_synced")["stored"], cases.len());
    let docs = db.messages(doc! {}).await;
    assert_eq!(docs.len(), cases.len());
    let by_sha: BTreeSet<String> = docs
        .iter()
        .map(|d| {
            d.get_document("raw")
                .unwrap()
                .get_str("sha256")
                .unwrap()
                .to_string()
        })
        .collect();
    for (name, raw, _) in &cases {
        if wire_clean(raw) {
            assert!(
                by_sha.contains(&mailpump::parse::sha256_hex(raw)),
                "{name} stored byte for byte"
            );
        }
    }
    assert!(
        docs.iter()
            .filter(|d| !d.get_array("parse_errors").unwrap().is_empty())
            .count()
            >= cases.iter().filter(|c| c.2).count()
    );
    crate::harness::reliability::record(crate::harness::reliability::Row {
        fault: "malformed mail (109 messages in 26 classes) through IMAP: each stored, raw bytes intact",
        tries: 1,
        expected: cases.len() as u64,
        stored: docs.len() as u64,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}
