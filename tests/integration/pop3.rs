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
            stored.insert(
                db.blob(d.get_document("raw").unwrap().get_str("sha256").unwrap())
                    .await,
            );
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

/// How the scripted POP3 server misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Sends half of message 1's RETR, then closes (first connection only).
    DropMidRetr,
    /// Answers -ERR to UIDL.
    NoUidl,
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
                    let reply = match verb.as_str() {
                        "CAPA" => "+OK\r\nUSER\r\nUIDL\r\n.\r\n".to_string(),
                        "USER" | "PASS" | "DELE" | "NOOP" => "+OK\r\n".to_string(),
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
    assert_eq!(
        db.blob(
            docs[0]
                .get_document("raw")
                .unwrap()
                .get_str("sha256")
                .unwrap()
        )
        .await,
        SCRIPTED_MESSAGE.as_bytes()
    );
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
