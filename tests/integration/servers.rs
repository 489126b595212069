//! `mailpump sync` against real IMAP servers other than Dovecot, neither of which has NOTIFY:
//! Cyrus 3.6 and Courier 5.0, unpacked from Debian's packages by deploy/services.sh and
//! started per test (harness::Cyrus, harness::Courier).

use std::time::Duration;

use bson::doc;

use crate::harness::{
    eventually, message, AccountSpec, Courier, Cyrus, ImapServer, Mailpump, RawImap, TestDb,
};

/// Both servers' stock personal namespace: prefix `INBOX.`, delimiter `.`.
const FOLDERS: [&str; 3] = ["INBOX.Projects", "INBOX.Projects.2024", "INBOX.已发送"];

async fn sync_stores_a_message_of_every_folder(server: &mut impl ImapServer, account: &str) {
    let user = server.add_user("alice", "pw-alice");
    let caps = server.capabilities(&user);
    eprintln!("{account}: CAPABILITY after login: {}", caps.join(" "));
    assert!(
        !caps.iter().any(|c| c.eq_ignore_ascii_case("NOTIFY")),
        "{account} has no NOTIFY: {caps:?}"
    );
    assert!(caps.iter().any(|c| c == "IDLE"), "{caps:?}");

    for folder in FOLDERS {
        server.create_folder(&user, folder);
    }
    let all: Vec<&str> = std::iter::once("INBOX").chain(FOLDERS).collect();
    // ASCII subjects: Cyrus turns raw 8-bit header bytes into 'X' (munge8bit)
    for (i, folder) in all.iter().enumerate() {
        server.append(&user, folder, &message(&format!("folder {i}"), "body"));
    }

    let db = TestDb::new().await;
    let list = all
        .iter()
        .map(|f| format!("\"{f}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::on_port(account, server.port(), &user)
            .with(format!("mailboxes = [{list}]"))],
    );
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), server.log());
    assert_eq!(
        run.events("mailbox_synced").len(),
        all.len(),
        "{}",
        run.stdout()
    );
    for (i, folder) in all.iter().enumerate() {
        let docs = db.messages(doc! {"mailbox": *folder}).await;
        assert_eq!(docs.len(), 1, "{folder}: {docs:?}");
        assert_eq!(
            docs[0].get_str("subject"),
            Ok(format!("folder {i}").as_str())
        );
    }
    assert!(db
        .mailbox(&format!("{account}/INBOX.已发送"))
        .await
        .is_some());

    // connections counted on the server's side: sync's are gone, two new ones are seen
    let (s, u) = (&*server, &user);
    let count_is = |n: usize| move || async move { s.connections(u) == n };
    eventually(
        Duration::from_secs(10),
        "sync's connections closed",
        count_is(0),
    )
    .await;
    let first = RawImap::login(s.port(), u);
    let second = RawImap::login(s.port(), u);
    eventually(Duration::from_secs(10), "two connections", count_is(2)).await;
    first.logout();
    drop(second);
    eventually(Duration::from_secs(10), "no connection", count_is(0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cyrus_sync_stores_nested_and_non_ascii_folders() {
    let mut cyrus = Cyrus::start();
    sync_stores_a_message_of_every_folder(&mut cyrus, "cyrus").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn courier_sync_stores_nested_and_non_ascii_folders() {
    let mut courier = Courier::start();
    sync_stores_a_message_of_every_folder(&mut courier, "courier").await;
}
