//! A scripted IMAP server that misbehaves on purpose. Whatever it does, mailpump must log a
//! clear error, never panic, never hang, and never move the checkpoint past a message it did
//! not store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::doc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::mailpump::Run;
use crate::harness::{AccountSpec, Mailpump, TestDb};

const MESSAGE: &str =
    "From: a@example.com\r\nSubject: scripted\r\nMessage-ID: <s@example.com>\r\n\r\nhello\r\n";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    NoGreeting,
    ByeGreeting,
    GarbageGreeting,
    CapabilityDoubleSpace,
    GarbageAfterLogin,
    UnknownUntagged,
    ShortLiteral,
    LongLiteral,
    HugeLiteral,
    FetchNo,
    SearchBadWithoutText,
    ByeMidSession,
    NoUidValidity,
    /// 163.com: SELECT/EXAMINE refused with "Unsafe Login" unless the client sent ID first.
    RequireId,
    /// Gmail: X-GM-EXT-1 (message and thread ids, labels), special-use folders, LIST-EXTENDED.
    Gmail,
    /// `UID SEARCH ALL` answers an empty list although EXAMINE said 1 EXISTS.
    EmptySearchAll,
    /// From the second login on, the mailbox is empty (EXISTS 0, every SEARCH empty): an
    /// emptied folder, or a backend whose store went missing.
    EmptiedLater,
}

/// Starts the server; returns its port and every command line it received.
async fn server(fault: Fault) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                let greeting = match fault {
                    Fault::NoGreeting => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    Fault::ByeGreeting => "* BYE too many connections, go away\r\n",
                    Fault::GarbageGreeting => "HELLO THIS IS NOT IMAP\r\n",
                    _ => "* OK scripted IMAP server ready\r\n",
                };
                if w.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                while let Ok(Some(line)) = lines.next_line().await {
                    seen.lock().unwrap().push(line.clone());
                    let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
                    let upper = rest.to_ascii_uppercase();
                    let n = MESSAGE.len();
                    let id_sent = seen
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|l| l.to_ascii_uppercase().contains(" ID (\"NAME\""));
                    let reply: String = if upper.starts_with("LOGIN") {
                        format!("{tag} OK logged in\r\n")
                    } else if upper.starts_with("CAPABILITY") {
                        match fault {
                            Fault::CapabilityDoubleSpace => {
                                format!("* CAPABILITY IMAP4rev1  IDLE\r\n{tag} OK\r\n")
                            }
                            Fault::GarbageAfterLogin => {
                                format!("%%% garbage \x01\x02 %%%\r\n{tag} OK\r\n")
                            }
                            Fault::RequireId => {
                                format!("* CAPABILITY IMAP4rev1 ID\r\n{tag} OK\r\n")
                            }
                            Fault::Gmail => format!("* CAPABILITY IMAP4rev1 IDLE NAMESPACE ID X-GM-EXT-1 SPECIAL-USE LIST-EXTENDED UIDPLUS\r\n{tag} OK\r\n"),
                            _ => format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK\r\n"),
                        }
                    } else if upper.starts_with("NAMESPACE") {
                        format!("* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n{tag} OK\r\n")
                    } else if upper.starts_with("LIST") {
                        // as Gmail answers, with the special-use attributes asked for
                        format!("* LIST (\\HasNoChildren) \"/\" \"INBOX\"\r\n* LIST (\\HasChildren \\Noselect) \"/\" \"[Gmail]\"\r\n* LIST (\\All \\HasNoChildren) \"/\" \"[Gmail]/All Mail\"\r\n* LIST (\\HasNoChildren \\Sent) \"/\" \"[Gmail]/Sent Mail\"\r\n* LIST (\\HasNoChildren \\Trash) \"/\" \"[Gmail]/Trash\"\r\n* LIST (\\HasNoChildren) \"/\" \"&XfJT0ZAB-\"\r\n{tag} OK Success\r\n")
                    } else if upper.starts_with("ID ") {
                        format!("* ID (\"name\" \"scripted\")\r\n{tag} OK ID completed\r\n")
                    } else if fault == Fault::RequireId
                        && !id_sent
                        && (upper.starts_with("EXAMINE") || upper.starts_with("SELECT"))
                    {
                        format!("{tag} NO SELECT Unsafe Login. Please contact kefu@188.com for help\r\n")
                    } else if fault == Fault::EmptiedLater
                        && seen
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|l| l.to_ascii_uppercase().contains(" LOGIN "))
                            .count()
                            > 1
                        && (upper.starts_with("EXAMINE") || upper.starts_with("UID SEARCH"))
                    {
                        if upper.starts_with("EXAMINE") {
                            format!("* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 2] ok\r\n{tag} OK [READ-ONLY] done\r\n")
                        } else {
                            format!("* SEARCH\r\n{tag} OK\r\n")
                        }
                    } else if upper.starts_with("EXAMINE") || upper.starts_with("SELECT") {
                        let validity = if fault == Fault::NoUidValidity {
                            String::new()
                        } else {
                            "* OK [UIDVALIDITY 7] ok\r\n".to_string()
                        };
                        format!("* 1 EXISTS\r\n{validity}* OK [UIDNEXT 2] ok\r\n{tag} OK [READ-ONLY] done\r\n")
                    } else if upper.starts_with("UID SEARCH ALL") && fault == Fault::EmptySearchAll
                    {
                        format!("* SEARCH\r\n{tag} OK\r\n")
                    } else if upper.starts_with("UID SEARCH") {
                        match fault {
                            Fault::SearchBadWithoutText => format!("{tag} BAD\r\n"),
                            Fault::ByeMidSession => {
                                let _ = w.write_all(b"* BYE server shutting down\r\n").await;
                                return;
                            }
                            Fault::UnknownUntagged => format!(
                                "* XAPPLEPUSHSERVICE aps-version 2\r\n* SEARCH 1\r\n{tag} OK\r\n"
                            ),
                            _ => format!("* SEARCH 1\r\n{tag} OK\r\n"),
                        }
                    } else if upper.starts_with("UID FETCH") && upper.contains("BODY.PEEK[]") {
                        let head = if upper.contains("X-GM-MSGID") {
                            "* 1 FETCH (X-GM-THRID 1266894439832287888 X-GM-MSGID 1278455344230334865 X-GM-LABELS (\\Inbox \\Important \"&XfJT0ZAB-\" Work) UID 1 FLAGS () INTERNALDATE \"01-Jun-2020 10:00:00 +0000\" RFC822.SIZE"
                        } else {
                            "* 1 FETCH (UID 1 FLAGS () INTERNALDATE \"01-Jun-2020 10:00:00 +0000\" RFC822.SIZE"
                        };
                        match fault {
                            Fault::FetchNo => format!("{tag} NO [UNAVAILABLE] System Error\r\n"),
                            Fault::ShortLiteral => {
                                let _ = w
                                    .write_all(
                                        format!("{head} {n} BODY[] {{{}}}\r\n{MESSAGE}", n + 10)
                                            .as_bytes(),
                                    )
                                    .await;
                                return;
                            }
                            Fault::LongLiteral => format!(
                                "{head} {n} BODY[] {{{}}}\r\n{MESSAGE})\r\n{tag} OK\r\n",
                                n - 10
                            ),
                            Fault::HugeLiteral => {
                                let _ = w
                                    .write_all(
                                        format!("{head} {n} BODY[] {{1073741824}}\r\n{MESSAGE}")
                                            .as_bytes(),
                                    )
                                    .await;
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            _ => format!("{head} {n} BODY[] {{{n}}}\r\n{MESSAGE})\r\n{tag} OK\r\n"),
                        }
                    } else if upper.starts_with("UID FETCH") {
                        format!("* 1 FETCH (UID 1 RFC822.SIZE {n})\r\n{tag} OK\r\n")
                    } else if upper.starts_with("LOGOUT") {
                        let _ = w
                            .write_all(format!("* BYE bye\r\n{tag} OK\r\n").as_bytes())
                            .await;
                        return;
                    } else {
                        format!("{tag} OK\r\n")
                    };
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// An account on the scripted server at `port`, with `extra` config lines.
fn scripted(name: &str, port: u16, extra: &[&str]) -> AccountSpec {
    AccountSpec {
        name: name.into(),
        port,
        security: "plain",
        username: "u".into(),
        password: "p".into(),
        extra: extra.iter().map(|l| l.to_string()).collect(),
    }
}

async fn sync_against(fault: Fault) -> (Run, TestDb) {
    let (port, _) = server(fault).await;
    let db = TestDb::new().await;
    let spec = scripted(
        "hostile",
        port,
        &["command_timeout = \"3s\"", "connect_timeout = \"2s\""],
    );
    let mp = Mailpump::new(&db, &[spec]);
    let run = tokio::time::timeout(Duration::from_secs(30), mp.run_async(&["sync"]))
        .await
        .unwrap_or_else(|_| panic!("{fault:?}: mailpump hung"));
    assert!(
        !run.stderr().contains("panicked"),
        "{fault:?}: {}",
        run.stderr()
    );
    let outcome = run
        .events("mailbox_sync_failed")
        .first()
        .map(|e| e["error"].to_string())
        .unwrap_or_else(|| "synced".into());
    eprintln!("hostile {fault:?}: exit {} {outcome}", run.code());
    (run, db)
}

/// The run failed with an error containing `expect`, and nothing moved.
async fn assert_fails_cleanly(fault: Fault, expect: &str) {
    let (run, db) = sync_against(fault).await;
    assert_eq!(run.code(), 1, "{fault:?}: {}", run.stdout());
    let error = run.event("mailbox_sync_failed")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.to_lowercase().contains(&expect.to_lowercase()),
        "{fault:?}: {error}"
    );
    assert_eq!(db.count("messages", doc! {}).await, 0, "{fault:?}");
    let last_uid = db
        .mailbox("hostile/INBOX")
        .await
        .and_then(|d| d.get_i64("last_uid").ok())
        .unwrap_or(0);
    assert_eq!(last_uid, 0, "{fault:?}: the checkpoint did not move");
    crate::harness::reliability::record(crate::harness::reliability::Row {
        fault: &format!("hostile IMAP server: {fault:?} (clear error: \"{error}\")"),
        tries: 1,
        expected: 0,
        stored: 0,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_well_behaved_script_syncs() {
    let (run, db) = sync_against(Fault::None).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);
}

/// Gmail's shape: `mailboxes = ["\\All"]` finds `[Gmail]/All Mail` by its special-use
/// attribute, and X-GM-EXT-1 gives every document its message id, thread id and labels.
#[tokio::test(flavor = "multi_thread")]
async fn a_gmail_style_server_is_synced_from_all_mail_with_its_ids_and_labels() {
    let (port, seen) = server(Fault::Gmail).await;
    let db = TestDb::new().await;
    let spec = scripted(
        "gm",
        port,
        &["command_timeout = \"3s\"", "mailboxes = [\"\\\\All\"]"],
    );
    let mp = Mailpump::new(&db, &[spec]);
    let run = tokio::time::timeout(Duration::from_secs(30), mp.run_async(&["sync"]))
        .await
        .expect("mailpump hung");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let docs = db.messages(doc! {}).await;
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].get_str("mailbox").unwrap(), "[Gmail]/All Mail");
    let gmail = docs[0].get_document("gmail").unwrap();
    assert_eq!(gmail.get_i64("msgid").unwrap(), 1278455344230334865);
    assert_eq!(gmail.get_i64("thrid").unwrap(), 1266894439832287888);
    let labels: Vec<&str> = gmail
        .get_array("labels")
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(labels, ["\\Inbox", "\\Important", "已发送", "Work"]);
    let commands = seen.lock().unwrap().join("\n");
    assert!(commands.contains("RETURN (SPECIAL-USE)"), "{commands}");
    assert!(
        commands.contains("EXAMINE \"[Gmail]/All Mail\""),
        "{commands}"
    );
    assert!(!commands.contains("EXAMINE \"INBOX\""), "{commands}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_163_style_server_that_wants_imap_id_before_select_is_served() {
    let (port, seen) = server(Fault::RequireId).await;
    let db = TestDb::new().await;
    let spec = scripted("netease", port, &[]);
    let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);
    let lines = seen.lock().unwrap().clone();
    let id = lines
        .iter()
        .position(|l| l.contains(" ID (\"name\" \"mailpump\" \"version\""))
        .expect("ID sent");
    let examine = lines.iter().position(|l| l.contains("EXAMINE")).unwrap();
    assert!(id < examine, "ID before EXAMINE: {lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_greetings() {
    assert_fails_cleanly(
        Fault::NoGreeting,
        "timed out after 2s waiting for the server greeting",
    )
    .await;
    assert_fails_cleanly(Fault::ByeGreeting, "too many connections").await;
    assert_fails_cleanly(
        Fault::GarbageGreeting,
        "cannot parse: HELLO THIS IS NOT IMAP",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_odd_capabilities() {
    assert_fails_cleanly(Fault::GarbageAfterLogin, "cannot parse: %%% garbage").await;
    // imap-proto cannot parse a double space; the transport filter collapses it
    let (run, db) = sync_against(Fault::CapabilityDoubleSpace).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);
    crate::harness::reliability::record(crate::harness::reliability::Row {
        fault: "hostile IMAP server: a CAPABILITY line with a double space (collapsed by the transport filter: synced)",
        tries: 1,
        expected: 1,
        stored: 1,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn literals_that_lie_about_their_length() {
    assert_fails_cleanly(Fault::ShortLiteral, "closed").await;
    assert_fails_cleanly(Fault::LongLiteral, "cannot parse").await;
    // async-imap refuses the announcement at once (its cap is 512 MiB): no 1 GB allocation
    assert_fails_cleanly(Fault::HugeLiteral, "larger than 512 MiB").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tagged_bad_without_text_and_bye_mid_session() {
    assert_fails_cleanly(Fault::SearchBadWithoutText, "BAD").await;
    assert_fails_cleanly(Fault::ByeMidSession, "shutting down").await;
    assert_fails_cleanly(Fault::NoUidValidity, "no UIDVALIDITY").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_untagged_responses_are_ignored() {
    // RFC 3501 section 7: clients must ignore what they do not know. imap-proto would fail the
    // session on it; the transport filter drops it.
    let (run, db) = sync_against(Fault::UnknownUntagged).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);
    crate::harness::reliability::record(crate::harness::reliability::Row {
        fault: "hostile IMAP server: an unknown untagged response in the middle of a command (ignored: synced)",
        tries: 1,
        expected: 1,
        stored: 1,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

/// A mailbox whose only message the server always refuses is indistinguishable from a server
/// that refuses everything: an outage. However often it happens, nothing is counted or
/// quarantined and the checkpoint stays (promises.rs has the UID refused beside served ones).
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_lone_message_is_an_outage_never_quarantined() {
    let (port, _) = server(Fault::FetchNo).await;
    let db = TestDb::new().await;
    let spec = scripted(
        "hostile",
        port,
        &["quarantine_after = 1", "quarantine_min_age = \"0s\""],
    );
    let mp = Mailpump::new(&db, &[spec]);
    for _ in 1..=3 {
        let run = mp.run_async(&["sync"]).await;
        assert_eq!(run.code(), 1);
        let error = run.event("mailbox_sync_failed")["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            error.contains("outage") && error.contains("System Error"),
            "{error}"
        );
        let mailbox = db.mailbox("hostile/INBOX").await.unwrap();
        assert_eq!(mailbox.get_i64("last_uid").unwrap(), 0);
        assert!(mailbox.get_array("quarantined").unwrap().is_empty());
    }
    crate::harness::reliability::record(crate::harness::reliability::Row {
        fault: "the only message refused (NO [UNAVAILABLE]) in 3 sessions, quarantine_after = 1: an outage, nothing quarantined, checkpoint unmoved",
        tries: 3,
        expected: 0,
        stored: 0,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

/// A server whose `UID SEARCH ALL` comes back empty for a mailbox whose EXAMINE said it holds a
/// message (a broken backend, a hostile proxy) gets no document marked expunged: the UID
/// comparison only believes an answer at least as long as EXISTS.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_uid_list_for_a_full_mailbox_marks_nothing_expunged() {
    let (port, seen) = server(Fault::EmptySearchAll).await;
    let db = TestDb::new().await;
    let spec = scripted(
        "hostile",
        port,
        &["command_timeout = \"3s\"", "flag_scan_interval = \"1s\""],
    );
    let mp = Mailpump::new_with_store(&db, "on_expunge = \"delete\"", &[spec]);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    assert_eq!(db.count("messages", doc! {}).await, 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("UID SEARCH ALL")),
        "the flag scan compared UIDs"
    );
    assert_eq!(
        run.events("uid_comparison_skipped").len(),
        1,
        "{}",
        run.stdout()
    );
    assert_eq!(db.count("messages", doc! {}).await, 1, "nothing deleted");
}

/// A folder that comes back empty (EXISTS 0, no UIDs) is not believed at once: the documents
/// are withheld from marking (`expunge_withheld`) until a comparison `flag_scan_interval`
/// later says the same, so a backend whose store is missing for a moment costs nothing, and
/// a folder really emptied is followed after all.
#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_folder_is_believed_only_when_a_later_comparison_agrees() {
    let (port, _seen) = server(Fault::EmptiedLater).await;
    let db = TestDb::new().await;
    let spec = scripted(
        "hostile",
        port,
        &["command_timeout = \"3s\"", "flag_scan_interval = \"2s\""],
    );
    let mp = Mailpump::new_with_store(&db, "on_expunge = \"delete\"", &[spec]);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);
    assert_eq!(db.count("messages", doc! {}).await, 1);
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.events("expunge_withheld").len(), 1, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1, "withheld");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(
        db.count("messages", doc! {}).await,
        0,
        "confirmed: {}",
        run.stdout()
    );
}
