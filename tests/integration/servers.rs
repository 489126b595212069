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

/// The daemon with `mailboxes = ["*"]` on a server without NOTIFY: the follower sweeps every
/// `poll_interval` (Cyrus: one LIST-STATUS; Courier: pipelined STATUS), stores new mail of a
/// folder that is not watched, (Cyrus, whose every sweep is a listing) finds a folder created
/// meanwhile and marks one deleted, and the
/// account holds two connections (INBOX's IDLE and the follower), counted by the server.
async fn the_daemon_follows_every_folder_by_sweeping(
    server: &mut impl ImapServer,
    account: &str,
    list_status: bool,
    selectors: &str,
) {
    let user = server.add_user("bob", "pw-bob");
    for folder in FOLDERS {
        server.create_folder(&user, folder);
        server.append(&user, folder, &message(folder, "old"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::on_port(account, server.port(), &user)
            .with(format!("mailboxes = {selectors}"))
            .with("poll_interval = \"2s\"")
            .with("discover_interval = \"10m\"")],
    );
    let daemon = crate::harness::Daemon::start(&mp);
    eventually(Duration::from_secs(30), "the backfill", || async {
        db.count("messages", doc! {"account": account}).await == 3
    })
    .await;
    let connected = daemon.events("follower_connected");
    assert_eq!(connected[0]["mode"], "status poll", "{connected:?}");
    assert_eq!(connected[0]["list_status"], list_status, "{connected:?}");
    assert_eq!(connected[0]["namespace"], "INBOX.", "{connected:?}");

    // new mail in a folder that is not watched: found by the next sweep
    let started = std::time::Instant::now();
    server.append(&user, "INBOX.Projects.2024", &message("swept", "new"));
    eventually(
        Duration::from_secs(20),
        "new mail found by the sweep",
        || async {
            db.count("messages", doc! {"account": account, "subject": "swept"})
                .await
                == 1
        },
    )
    .await;
    eprintln!(
        "{account}: APPEND to stored by sweep: {:?}",
        started.elapsed()
    );

    // a folder created while the daemon runs is found by the next discovery (with LIST-STATUS
    // every sweep is one)
    if list_status {
        server.create_folder(&user, "INBOX.Fresh");
        server.append(&user, "INBOX.Fresh", &message("fresh", "x"));
        eventually(
            Duration::from_secs(20),
            "a folder created meanwhile",
            || async { db.count("messages", doc! {"mailbox": "INBOX.Fresh"}).await == 1 },
        )
        .await;
        let mut imap = RawImap::login(server.port(), &user);
        imap.delete("INBOX.Fresh");
        imap.logout();
        let id = format!("{account}/INBOX.Fresh");
        eventually(
            Duration::from_secs(20),
            "a deleted folder marked",
            || async {
                db.mailbox(&id)
                    .await
                    .is_some_and(|d| d.get_str("state").ok() == Some("deleted"))
            },
        )
        .await;
    }
    let held = server.connections(&user);
    assert_eq!(
        held, 2,
        "INBOX's IDLE and the follower, counted by {account}"
    );
    daemon.signal("TERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn cyrus_folders_are_followed_by_a_list_status_sweep() {
    let mut cyrus = Cyrus::start();
    the_daemon_follows_every_folder_by_sweeping(&mut cyrus, "cyrus", true, "[\"*\"]").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn courier_folders_are_followed_by_a_pipelined_status_sweep() {
    let mut courier = Courier::start();
    // globs without the INBOX. prefix: the personal namespace is matched for them
    the_daemon_follows_every_folder_by_sweeping(
        &mut courier,
        "courier",
        false,
        "[\"INBOX\", \"Projects/**\", \"已发送\"]",
    )
    .await;
}

/// Cyrus has OBJECTID (RFC 8474): a rename is recorded from MAILBOXID even without NOTIFY.
#[tokio::test(flavor = "multi_thread")]
async fn cyrus_a_rename_is_recorded_from_mailboxid() {
    let mut cyrus = Cyrus::start();
    let user = cyrus.add_user("ren", "pw-ren");
    cyrus.create_folder(&user, "INBOX.Before");
    cyrus.append(&user, "INBOX.Before", &message("before", "x"));
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec::on_port("ren", cyrus.port(), &user)
            .with("mailboxes = [\"*\"]")
            .with("poll_interval = \"1s\"")],
    );
    let daemon = crate::harness::Daemon::start(&mp);
    eventually(Duration::from_secs(30), "the backfill", || async {
        db.count("messages", doc! {"mailbox": "INBOX.Before"}).await == 1
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the MAILBOXID recorded",
        || async {
            db.mailbox("ren/INBOX.Before")
                .await
                .is_some_and(|d| d.get_str("mailbox_id").is_ok())
        },
    )
    .await;
    let mut imap = RawImap::login(cyrus.port(), &user);
    imap.rename("INBOX.Before", "INBOX.After");
    imap.logout();
    eventually(Duration::from_secs(20), "the rename recorded", || async {
        db.mailbox("ren/INBOX.Before")
            .await
            .is_some_and(|d| d.get_str("renamed_to").ok() == Some("INBOX.After"))
    })
    .await;
    eventually(Duration::from_secs(20), "the new name synced", || async {
        db.count("messages", doc! {"mailbox": "INBOX.After"}).await == 1
    })
    .await;
    let after = db.mailbox("ren/INBOX.After").await.unwrap();
    assert_eq!(after.get_str("renamed_from").unwrap(), "INBOX.Before");
    daemon.signal("TERM");
}
