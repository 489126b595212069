//! POP3 accounts against Dovecot's POP3 service, and against scripted servers that misbehave.

use std::collections::{BTreeMap, BTreeSet};

use bson::doc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::{message, AccountSpec, Dovecot, Mailpump, TestDb, User};

fn pop3(name: &str, dc: &Dovecot, user: &User) -> AccountSpec {
    let mut spec = AccountSpec::plain(name, dc, user).with("protocol = \"pop3\"");
    spec.port = dc.pop3_port;
    spec
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_over_plain_tls_and_stls_stores_the_exact_bytes() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("pop", "pw-pop");
    // lines that need dot-stuffing on the wire must come back exactly
    let tricky = b"From: a@example.com\r\nSubject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n".to_vec();
    let mut sent = vec![tricky];
    for i in 0..4 {
        sent.push(message(&format!("pop {i}"), "body"));
    }
    for m in &sent {
        dc.deliver(&user, m);
    }
    let ca = format!("ca_file = \"{}\"", dc.ca_file().display());
    let mut tls = pop3("pop", &dc, &user).with(ca.clone());
    tls.port = dc.pop3s_port;
    tls.security = "tls";
    let mut stls = pop3("pop", &dc, &user).with(ca);
    stls.security = "starttls";
    for spec in [pop3("pop", &dc, &user), tls, stls] {
        let db = TestDb::new().await;
        let label = spec.security;
        let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
        assert_eq!(run.code(), 0, "{label}: {}", run.stdout());
        assert_eq!(run.event("mailbox_synced")["stored"], sent.len(), "{label}");
        let docs = db.messages(doc! {}).await;
        let mut stored = BTreeSet::new();
        for d in &docs {
            assert_eq!(d.get_str("mailbox").unwrap(), "INBOX");
            assert_eq!(d.get_i64("uidvalidity").unwrap(), 0);
            stored.insert(db.raw(d).await);
        }
        assert_eq!(
            stored,
            sent.iter().cloned().collect::<BTreeSet<_>>(),
            "{label}: byte for byte"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_restarts_fetch_nothing_twice_and_uids_never_change() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("stable", "pw-stable");
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("first {i}"), "x"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[pop3("stable", &dc, &user)]);
    assert_eq!(
        mp.run_async(&["sync"]).await.event("mailbox_synced")["stored"],
        3
    );
    let uids = |docs: Vec<bson::Document>| {
        docs.iter()
            .map(|d| {
                (
                    d.get_str("subject").unwrap().to_string(),
                    d.get_i64("uid").unwrap(),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let before = uids(db.messages(doc! {}).await);
    let again = mp.run_async(&["sync"]).await;
    assert_eq!(again.event("mailbox_synced")["fetched"], 0);
    for i in 0..2 {
        dc.deliver(&user, &message(&format!("later {i}"), "y"));
    }
    let third = mp.run_async(&["sync"]).await;
    assert_eq!(third.event("mailbox_synced")["fetched"], 2);
    let after = uids(db.messages(doc! {}).await);
    assert_eq!(after.len(), 5);
    for (subject, uid) in &before {
        assert_eq!(after[subject], *uid, "uid of {subject} is stable");
    }
    let max_before = before.values().max().unwrap();
    assert!(after
        .iter()
        .filter(|(s, _)| s.starts_with("later"))
        .all(|(_, u)| u > max_before));
    assert_eq!(db.count("pop3_uidl", doc! {"stored": true}).await, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_after_store_empties_the_server_only_after_storing() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("dele", "pw-dele");
    for i in 0..4 {
        dc.deliver(&user, &message(&format!("to delete {i}"), "x"));
    }
    let db = TestDb::new().await;
    let run = Mailpump::new(
        &db,
        &[pop3("dele", &dc, &user)
            .with("delete_after_store = true")
            .with("batch_size = 3")],
    )
    .run_async(&["sync"])
    .await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 4);
    assert!(
        dc.inbox_files(&user).is_empty(),
        "left on the server: {:?}",
        dc.inbox_files(&user)
    );
    assert_eq!(db.count("pop3_uidl", doc! {"deleted": true}).await, 4);
    assert_eq!(run.event("deleted_from_server")["count"], 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_pop3_password_is_a_clear_error() {
    let mut dc = Dovecot::start();
    let mut user = dc.add_user("popbad", "right");
    dc.deliver(&user, &message("x", "y"));
    user.password = "wrong".into();
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[pop3("popbad", &dc, &user)])
        .run_async(&["sync"])
        .await;
    assert_eq!(run.code(), 1);
    let error = run.event("mailbox_sync_failed")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("login rejected for popbad"), "{error}");
    assert_eq!(db.count("messages", doc! {}).await, 0);
}

/// Adds `line` to the `[store]` table of `mp`'s config.
fn store_option(mp: &Mailpump, line: &str) {
    let toml = std::fs::read_to_string(&mp.config).unwrap();
    let toml = toml.replacen("[store]\n", &format!("[store]\n{line}\n"), 1);
    std::fs::write(&mp.config, toml).unwrap();
}

/// Deletes the message with `subject` from the user's maildir, as another client would.
fn delete_on_server(dc: &Dovecot, user: &User, subject: &str) {
    let needle = format!("Subject: {subject}\r\n");
    let file = dc
        .inbox_files(user)
        .into_iter()
        .find(|f| String::from_utf8_lossy(&std::fs::read(f).unwrap()).contains(&needle))
        .unwrap_or_else(|| panic!("no message {subject:?} on the server"));
    std::fs::remove_file(file).unwrap();
}

/// subject -> the document's `expunged_at`, for every document.
async fn expunged_by_subject(db: &TestDb) -> BTreeMap<String, Option<bson::DateTime>> {
    db.messages(doc! {})
        .await
        .iter()
        .map(|d| {
            (
                d.get_str("subject").unwrap().to_string(),
                d.get_datetime("expunged_at").ok().copied(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_deleted_by_someone_else_is_marked_expunged_once() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("gone", "pw-gone");
    for s in ["keep 1", "goes", "keep 2"] {
        dc.deliver(&user, &message(s, "x"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[pop3("gone", &dc, &user)]);
    let first = mp.run_async(&["sync"]).await;
    assert_eq!(first.code(), 0, "{}", first.stdout());
    assert!(first.events("pop3_expunged").is_empty());
    assert!(expunged_by_subject(&db).await.values().all(Option::is_none));

    delete_on_server(&dc, &user, "goes");
    let second = mp.run_async(&["sync"]).await;
    assert_eq!(second.code(), 0, "{}", second.stdout());
    let event = second.event("pop3_expunged");
    assert_eq!(
        (event["count"].as_u64(), event["documents"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(event["on_expunge"], "mark");
    let marks = expunged_by_subject(&db).await;
    assert_eq!(marks.len(), 3, "the document is kept: {marks:?}");
    let when = marks["goes"].expect("expunged_at on the deleted message");
    assert!(
        marks["keep 1"].is_none() && marks["keep 2"].is_none(),
        "{marks:?}"
    );
    assert_eq!(
        db.count("pop3_uidl", doc! {"gone_at": {"$exists": true}})
            .await,
        1
    );

    // idempotent: the next polls do not look at it again, the mark keeps its time
    dc.deliver(&user, &message("later", "y"));
    let third = mp.run_async(&["sync"]).await;
    assert_eq!(third.code(), 0, "{}", third.stdout());
    assert_eq!(third.event("mailbox_synced")["stored"], 1);
    assert!(
        third.events("pop3_expunged").is_empty(),
        "{}",
        third.stdout()
    );
    let marks = expunged_by_subject(&db).await;
    assert_eq!(marks["goes"], Some(when));
    assert_eq!(
        marks.values().filter(|m| m.is_some()).count(),
        1,
        "{marks:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_expunge_delete_removes_the_document_of_a_message_deleted_by_someone_else() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("gonedel", "pw-gonedel");
    for s in ["stays", "removed", "also removed", "stays too"] {
        dc.deliver(&user, &message(s, "x"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[pop3("gonedel", &dc, &user)]);
    store_option(&mp, "on_expunge = \"delete\"");
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    assert_eq!(db.count("messages", doc! {}).await, 4);
    delete_on_server(&dc, &user, "removed");
    delete_on_server(&dc, &user, "also removed");
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.event("pop3_expunged")["documents"], 2);
    assert_eq!(run.event("pop3_expunged")["on_expunge"], "delete");
    let left: BTreeSet<String> = expunged_by_subject(&db).await.into_keys().collect();
    assert_eq!(
        left,
        ["stays", "stays too"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let again = mp.run_async(&["sync"]).await;
    assert!(
        again.events("pop3_expunged").is_empty(),
        "{}",
        again.stdout()
    );
    assert_eq!(db.count("messages", doc! {}).await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_delete_after_store_deleted_keeps_its_documents_with_on_expunge_delete() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("ours", "pw-ours");
    for i in 0..3 {
        dc.deliver(&user, &message(&format!("ours {i}"), "x"));
    }
    let db = TestDb::new().await;
    let spec = pop3("ours", &dc, &user);
    let mp = Mailpump::new(&db, &[spec.clone().with("delete_after_store = true")]);
    store_option(&mp, "on_expunge = \"delete\"");
    let first = mp.run_async(&["sync"]).await;
    assert_eq!(first.code(), 0, "{}", first.stdout());
    assert!(dc.inbox_files(&user).is_empty());
    assert_eq!(db.count("pop3_uidl", doc! {"dele_sent": true}).await, 3);
    // more polls, an empty maildrop, then new mail that is stored and deleted in turn
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    dc.deliver(&user, &message("ours 3", "x"));
    for _ in 0..2 {
        let run = mp.run_async(&["sync"]).await;
        assert_eq!(run.code(), 0, "{}", run.stdout());
        assert!(run.events("pop3_expunged").is_empty(), "{}", run.stdout());
    }
    assert_eq!(db.count("messages", doc! {}).await, 4);

    // The same account without delete_after_store now: the server keeps new mail, so its
    // listings show stored messages again, and still nothing mailpump deleted is touched.
    let mp2 = Mailpump::new(&db, &[spec]);
    store_option(&mp2, "on_expunge = \"delete\"");
    for s in ["kept a", "kept b"] {
        dc.deliver(&user, &message(s, "x"));
    }
    for _ in 0..2 {
        let run = mp2.run_async(&["sync"]).await;
        assert_eq!(run.code(), 0, "{}", run.stdout());
        assert!(run.events("pop3_expunged").is_empty(), "{}", run.stdout());
    }
    // someone else deletes one of them: that one goes, mailpump's own deletions stay
    delete_on_server(&dc, &user, "kept a");
    let run = mp2.run_async(&["sync"]).await;
    assert_eq!(
        run.event("pop3_expunged")["documents"],
        1,
        "{}",
        run.stdout()
    );
    let left: BTreeSet<String> = expunged_by_subject(&db).await.into_keys().collect();
    assert_eq!(
        left,
        ["ours 0", "ours 1", "ours 2", "ours 3", "kept b"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert_eq!(
        db.count("messages", doc! {"expunged_at": {"$exists": true}})
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_maildrop_is_marked_only_once_a_later_listing_shows_a_stored_message() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("empty", "pw-empty");
    for s in ["old 1", "old 2"] {
        dc.deliver(&user, &message(s, "x"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[pop3("empty", &dc, &user)]);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    delete_on_server(&dc, &user, "old 1");
    delete_on_server(&dc, &user, "old 2");
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.event("pop3_expunge_withheld")["missing"], 2);
    assert!(run.events("pop3_expunged").is_empty());
    dc.deliver(&user, &message("new", "y"));
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.event("mailbox_synced")["stored"], 1, "{}", run.stdout());
    assert!(run.events("pop3_expunged").is_empty(), "{}", run.stdout());
    assert!(expunged_by_subject(&db).await.values().all(Option::is_none));
    // this listing shows a stored message ("new"): the old ones are gone after all
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.event("pop3_expunged")["count"], 2, "{}", run.stdout());
    let marks = expunged_by_subject(&db).await;
    assert!(marks["old 1"].is_some() && marks["old 2"].is_some() && marks["new"].is_none());
}

/// How the scripted POP3 server misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Sends half of message 1's RETR, then closes (first connection only).
    DropMidRetr,
    /// Answers -ERR to UIDL.
    NoUidl,
    /// Two messages; from the second connection on, STAT and LIST still count two but UIDL
    /// lists only the first.
    UidlLosesOne,
    /// Two messages; from the second connection on, STAT 0 and UIDL, LIST empty.
    EmptiedLater,
}

const SCRIPTED_MESSAGE: &str = "From: a@example.com\r\nSubject: scripted\r\nMessage-ID: <scripted@example.com>\r\n\r\nline one\r\nline two\r\n";

/// A POP3 server with one message; returns (port, commands received per connection).
async fn scripted_pop3(
    script: Script,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    tokio::spawn(async move {
        let mut connection = 0;
        while let Ok((sock, _)) = listener.accept().await {
            connection += 1;
            let log = log2.clone();
            log.lock().unwrap().push(Vec::new());
            let index = log.lock().unwrap().len() - 1;
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"+OK scripted ready\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.lock().unwrap()[index].push(line.clone());
                    let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let two = matches!(script, Script::UidlLosesOne | Script::EmptiedLater);
                    let later = connection > 1;
                    let size = SCRIPTED_MESSAGE.len();
                    let reply = match verb.as_str() {
                        "CAPA" => "+OK\r\nUSER\r\nUIDL\r\n.\r\n".to_string(),
                        "USER" | "PASS" | "DELE" | "NOOP" => "+OK\r\n".to_string(),
                        "STAT" if script == Script::EmptiedLater && later => "+OK 0 0\r\n".into(),
                        "STAT" if two => format!("+OK 2 {}\r\n", 2 * size),
                        "UIDL" if script == Script::EmptiedLater && later => "+OK\r\n.\r\n".into(),
                        "LIST" if script == Script::EmptiedLater && later => "+OK\r\n.\r\n".into(),
                        "UIDL" if script == Script::UidlLosesOne && later => {
                            "+OK\r\n1 scripted-uidl-1\r\n.\r\n".into()
                        }
                        "UIDL" if two => {
                            "+OK\r\n1 scripted-uidl-1\r\n2 scripted-uidl-2\r\n.\r\n".into()
                        }
                        "LIST" if two => format!("+OK\r\n1 {size}\r\n2 {size}\r\n.\r\n"),
                        "RETR" if two && line.ends_with(" 2") => format!(
                            "+OK\r\n{}.\r\n",
                            SCRIPTED_MESSAGE.replace("Subject: scripted", "Subject: scripted 2")
                        ),
                        "STAT" => format!("+OK 1 {}\r\n", SCRIPTED_MESSAGE.len()),
                        "UIDL" if script == Script::NoUidl => {
                            "-ERR command not implemented\r\n".to_string()
                        }
                        "UIDL" => "+OK\r\n1 scripted-uidl-1\r\n.\r\n".to_string(),
                        "LIST" => format!("+OK\r\n1 {}\r\n.\r\n", SCRIPTED_MESSAGE.len()),
                        "RETR" if script == Script::DropMidRetr && connection == 1 => {
                            let half = &SCRIPTED_MESSAGE[..SCRIPTED_MESSAGE.len() / 2];
                            w.write_all(format!("+OK\r\n{half}").as_bytes())
                                .await
                                .unwrap();
                            return; // drop the connection mid-message
                        }
                        "RETR" => format!("+OK\r\n{SCRIPTED_MESSAGE}.\r\n"),
                        "QUIT" => {
                            w.write_all(b"+OK bye\r\n").await.unwrap();
                            return;
                        }
                        _ => "-ERR unknown\r\n".to_string(),
                    };
                    w.write_all(reply.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (port, log)
}

fn scripted_spec(port: u16) -> AccountSpec {
    AccountSpec {
        name: "scripted".into(),
        port,
        security: "plain",
        username: "u".into(),
        password: "p".into(),
        extra: vec![
            "protocol = \"pop3\"".into(),
            "delete_after_store = true".into(),
        ],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_dropped_mid_retr_stores_and_deletes_nothing_then_recovers() {
    let (port, log) = scripted_pop3(Script::DropMidRetr).await;
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[scripted_spec(port)]);
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 1);
    assert!(
        run.event("mailbox_sync_failed")["error"]
            .as_str()
            .unwrap()
            .contains("closed"),
        "{}",
        run.stdout()
    );
    assert_eq!(db.count("messages", doc! {}).await, 0);
    assert!(
        !log.lock().unwrap()[0]
            .iter()
            .any(|c| c.starts_with("DELE") || c == "QUIT"),
        "nothing deleted: {:?}",
        log.lock().unwrap()
    );

    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let docs = db.messages(doc! {}).await;
    assert_eq!(docs.len(), 1);
    assert_eq!(db.raw(&docs[0]).await, SCRIPTED_MESSAGE.as_bytes());
    let second = log.lock().unwrap()[1].clone();
    let dele = second
        .iter()
        .position(|c| c == "DELE 1")
        .expect("DELE after storing");
    assert!(second[dele..].iter().any(|c| c == "QUIT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_uidl_is_refused_with_a_clear_error() {
    let (port, log) = scripted_pop3(Script::NoUidl).await;
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[scripted_spec(port)])
        .run_async(&["sync"])
        .await;
    assert_eq!(run.code(), 1);
    let error = run.event("mailbox_sync_failed")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("does not support UIDL"), "{error}");
    assert!(!log
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .any(|c| c.starts_with("RETR") || c.starts_with("DELE")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_that_contradicts_itself_or_empties_out_marks_nothing() {
    for script in [Script::UidlLosesOne, Script::EmptiedLater] {
        let (port, _log) = scripted_pop3(script).await;
        let db = TestDb::new().await;
        let mut spec = scripted_spec(port);
        spec.extra.retain(|l| !l.starts_with("delete_after_store"));
        let mp = Mailpump::new(&db, &[spec]);
        store_option(&mp, "on_expunge = \"delete\"");
        let first = mp.run_async(&["sync"]).await;
        assert_eq!(first.code(), 0, "{}", first.stdout());
        assert_eq!(db.count("messages", doc! {}).await, 2);
        for _ in 0..2 {
            let run = mp.run_async(&["sync"]).await;
            assert_eq!(run.code(), 0, "{}", run.stdout());
            assert!(run.events("pop3_expunged").is_empty(), "{}", run.stdout());
            let withheld = run.event("pop3_expunge_withheld");
            if script == Script::UidlLosesOne {
                assert_eq!(withheld["missing"], 1);
                assert!(
                    withheld["reason"]
                        .as_str()
                        .unwrap()
                        .contains("STAT counts 2"),
                    "{withheld}"
                );
            } else {
                assert_eq!(withheld["missing"], 2);
            }
        }
        assert_eq!(db.count("messages", doc! {}).await, 2);
        assert_eq!(
            db.count("pop3_uidl", doc! {"gone_at": {"$exists": true}})
                .await,
            0
        );
    }
}
