//! The promises under adversarial timing: a scripted IMAP server that refuses every FETCH for a
//! while (an outage, never a broken message), refuses one UID for ever (quarantine after N
//! passes over a minimum age, then retried), and announces new mail the way Cyrus and Gmail do:
//! inside the response to whatever command comes next, slowly, and never again at IDLE.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::doc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::daemon::{eventually, Daemon};
use crate::harness::reliability::{record, Row};
use crate::harness::{AccountSpec, Mailpump, TestDb};

fn body(uid: u32) -> String {
    format!(
        "From: a@example.com\r\nSubject: scripted {uid}\r\nMessage-ID: <s{uid}@example.com>\r\n\r\nhello {uid}\r\n"
    )
}

/// What the scripted server does.
#[derive(Default)]
struct Script {
    /// UIDs in the mailbox.
    uids: Mutex<Vec<u32>>,
    /// Every body FETCH (and probe) is refused until then, with these texts in turn.
    refuse_until: Mutex<Option<Instant>>,
    /// This UID is refused whenever a FETCH includes it.
    refuse_uid: Mutex<Option<u32>>,
    /// Cyrus-style: the first body FETCH delivers a new message and announces it (`* N EXISTS`)
    /// at the start of that FETCH's response; IDLE announces nothing.
    deliver_during_fetch: AtomicBool,
    /// When that announcement went out.
    announced_at: Mutex<Option<std::time::SystemTime>>,
    /// Every response is sent this late.
    delay: Duration,
    /// Body FETCHes refused so far.
    refusals: Mutex<u32>,
}

const OUTAGE_TEXTS: &[&str] = &[
    "NO Server Unavailable. 15",
    "NO [UNAVAILABLE] Internal error occurred. Refer to server log for more information.",
    "NO [LIMIT] Bandwidth limit exceeded",
    "NO [INUSE] Mailbox in use",
    "NO [SERVERBUG] Internal error",
];

/// `1:3,5,7:*` against the UIDs present.
fn set_members(set: &str, present: &[u32]) -> Vec<u32> {
    let max = present.iter().copied().max().unwrap_or(0);
    let mut out = Vec::new();
    for part in set.split(',') {
        let (a, b) = part.split_once(':').unwrap_or((part, part));
        let parse = |x: &str| {
            if x == "*" {
                max
            } else {
                x.parse().unwrap_or(0)
            }
        };
        let (mut lo, mut hi) = (parse(a), parse(b));
        if lo > hi {
            std::mem::swap(&mut lo, &mut hi);
        }
        out.extend(present.iter().copied().filter(|u| *u >= lo && *u <= hi));
        // "n:*" always matches the highest UID (RFC 3501)
        if b == "*" && !out.contains(&max) && max > 0 {
            out.push(max);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

async fn serve(script: Arc<Script>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                if w.write_all(b"* OK scripted\r\n").await.is_err() {
                    return;
                }
                let mut idle_tag: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(tag) = idle_tag.take() {
                        // DONE
                        let _ = w
                            .write_all(format!("{tag} OK Idle done\r\n").as_bytes())
                            .await;
                        continue;
                    }
                    let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
                    let upper = rest.to_ascii_uppercase();
                    tokio::time::sleep(script.delay).await;
                    let present = script.uids.lock().unwrap().clone();
                    let refusing_all = script
                        .refuse_until
                        .lock()
                        .unwrap()
                        .is_some_and(|t| Instant::now() < t);
                    let refuse_uid = *script.refuse_uid.lock().unwrap();
                    let reply = if upper.starts_with("LOGIN") {
                        format!("{tag} OK logged in\r\n")
                    } else if upper.starts_with("CAPABILITY") {
                        format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK\r\n")
                    } else if upper.starts_with("EXAMINE") || upper.starts_with("SELECT") {
                        let next = present.iter().max().unwrap_or(&0) + 1;
                        format!("* {} EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT {next}] ok\r\n{tag} OK [READ-ONLY] done\r\n", present.len())
                    } else if let Some(set) = upper.strip_prefix("UID SEARCH UID ") {
                        let found = set_members(set.split(' ').next().unwrap_or(""), &present);
                        let list: Vec<String> = found.iter().map(|u| u.to_string()).collect();
                        format!("* SEARCH {}\r\n{tag} OK\r\n", list.join(" "))
                    } else if let Some(args) = upper.strip_prefix("UID FETCH ") {
                        let (set, what) = args.split_once(' ').unwrap_or((args, ""));
                        let members = set_members(set, &present);
                        let wants_body = what.contains("BODY.PEEK[]");
                        let probe = what.contains("BODY.PEEK[HEADER]");
                        let mut out = String::new();
                        if wants_body && script.deliver_during_fetch.swap(false, Ordering::SeqCst) {
                            let mut uids = script.uids.lock().unwrap();
                            let new = uids.iter().max().unwrap_or(&0) + 1;
                            uids.push(new);
                            out.push_str(&format!("* {} EXISTS\r\n", uids.len()));
                            *script.announced_at.lock().unwrap() =
                                Some(std::time::SystemTime::now());
                        }
                        let refused = (wants_body || probe)
                            && (refusing_all || refuse_uid.is_some_and(|r| members.contains(&r)));
                        if refused {
                            let mut n = script.refusals.lock().unwrap();
                            let text = OUTAGE_TEXTS[*n as usize % OUTAGE_TEXTS.len()];
                            *n += 1;
                            if refusing_all {
                                format!("{out}{tag} {text}\r\n")
                            } else {
                                format!("{out}{tag} NO [UNAVAILABLE] System Error\r\n")
                            }
                        } else {
                            for uid in members {
                                let b = body(uid);
                                let n = b.len();
                                let seq = present.iter().position(|u| *u == uid).unwrap_or(0) + 1;
                                if wants_body {
                                    out.push_str(&format!("* {seq} FETCH (UID {uid} FLAGS () INTERNALDATE \"01-Jun-2020 10:00:00 +0000\" RFC822.SIZE {n} BODY[] {{{n}}}\r\n{b})\r\n"));
                                } else if probe {
                                    let h = "Subject: x\r\n\r\n";
                                    out.push_str(&format!(
                                        "* {seq} FETCH (UID {uid} BODY[HEADER] {{{}}}\r\n{h})\r\n",
                                        h.len()
                                    ));
                                } else {
                                    out.push_str(&format!(
                                        "* {seq} FETCH (UID {uid} RFC822.SIZE {n})\r\n"
                                    ));
                                }
                            }
                            format!("{out}{tag} OK\r\n")
                        }
                    } else if upper.starts_with("IDLE") {
                        idle_tag = Some(tag.to_string());
                        "+ idling\r\n".to_string()
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
    port
}

fn spec(port: u16, extra: &[&str]) -> AccountSpec {
    AccountSpec {
        name: "scripted".into(),
        port,
        security: "plain",
        username: "u".into(),
        password: "p".into(),
        extra: ["command_timeout = \"5s\"", "connect_timeout = \"3s\""]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
    }
}

async fn quarantine_of(db: &TestDb) -> Vec<bson::Document> {
    db.mailbox("scripted/INBOX")
        .await
        .and_then(|d| d.get_array("quarantined").ok().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| b.as_document().cloned())
        .collect()
}

/// Every FETCH refused for 40 s (five kinds of refusal in turn), under the strictest quarantine
/// settings there are: one counted failure would quarantine. Nothing may be counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_forty_second_server_wide_refusal_quarantines_nothing_and_loses_nothing() {
    let outage = Duration::from_secs(crate::harness::reliability::scale(40, 40));
    let script = Arc::new(Script {
        uids: Mutex::new(vec![1, 2, 3, 4, 5]),
        refuse_until: Mutex::new(Some(Instant::now() + outage)),
        ..Default::default()
    });
    let port = serve(script.clone()).await;
    let db = TestDb::new().await;
    let mp = Mailpump::new(
        &db,
        &[spec(
            port,
            &[
                "quarantine_after = 1",
                "quarantine_min_age = \"0s\"",
                "batch_size = 2",
            ],
        )],
    );
    let daemon = Daemon::start(&mp);
    // After an outage the next attempt comes within one backoff delay, and jitter (10% to 100%
    // of a cap that doubles per failure, up to 300 s) can make that delay long: wait for the
    // largest one rather than a lucky draw.
    let max_backoff = mailpump::backoff::BackoffPolicy::default().max;
    eventually(
        outage + max_backoff + Duration::from_secs(60),
        "all 5 stored after the outage",
        || async { db.count("messages", doc! {}).await == 5 },
    )
    .await;
    assert!(
        quarantine_of(&db).await.is_empty(),
        "{:?}",
        quarantine_of(&db).await
    );
    let refusals = daemon.events("server_refusing").len();
    assert!(refusals >= 3, "the outage was seen: {refusals}");
    assert!(daemon.events("quarantined").is_empty());
    eventually(Duration::from_secs(10), "the checkpoint at 5", || async {
        db.mailbox("scripted/INBOX")
            .await
            .and_then(|d| d.get_i64("last_uid").ok())
            == Some(5)
    })
    .await;
    record(Row {
        fault: &format!(
            "every FETCH refused for {} s (Server Unavailable, [UNAVAILABLE], [LIMIT], [INUSE], [SERVERBUG]) with quarantine_after = 1, min_age 0: an outage, nothing quarantined, all stored after it ({} refusals)",
            outage.as_secs(),
            *script.refusals.lock().unwrap()
        ),
        tries: refusals as u64,
        expected: 5,
        stored: db.count("messages", doc! {}).await,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

/// UID 2 is refused for ever while 1 and 3 are served: counted once per pass, the checkpoint
/// held below it while 3 is stored anyway, quarantined only after 3 passes spread over the
/// minimum age, then retried on demand and released once the server serves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_uid_refused_while_others_are_served_is_quarantined_after_passes_and_age_then_retried() {
    let script = Arc::new(Script {
        uids: Mutex::new(vec![1, 2, 3]),
        refuse_uid: Mutex::new(Some(2)),
        ..Default::default()
    });
    let port = serve(script.clone()).await;
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[spec(port, &["quarantine_min_age = \"3s\""])]);
    let started = Instant::now();
    for pass in 1..=3 {
        let run = mp.run_async(&["sync"]).await;
        assert_eq!(
            run.code(),
            1,
            "pass {pass}: held, not synced\n{}",
            run.stdout()
        );
        assert_eq!(run.event("fetch_failed_checkpoint_held")["attempts"], pass);
        // 1 and 3 are stored all the same; the checkpoint waits below 2
        assert_eq!(db.count("messages", doc! {}).await, 2, "pass {pass}");
        let cp = db.mailbox("scripted/INBOX").await.unwrap();
        assert_eq!(cp.get_i64("last_uid").unwrap(), 1, "pass {pass}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "3 passes within the minimum age"
    );
    assert!(
        quarantine_of(&db).await.is_empty(),
        "not before the minimum age"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.event("quarantined")["uid"], 2);
    let q = quarantine_of(&db).await;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].get_i64("uidvalidity").unwrap(), 7);
    assert!(q[0].get_str("reason").unwrap().contains("System Error"));
    assert_eq!(
        db.mailbox("scripted/INBOX")
            .await
            .unwrap()
            .get_i64("last_uid")
            .unwrap(),
        3
    );
    // the failure count is gone with the quarantine
    let failures = db.mailbox("scripted/INBOX").await.unwrap();
    assert!(
        failures
            .get_document("failures")
            .map(|f| f.is_empty())
            .unwrap_or(true),
        "{failures:?}"
    );

    // still refused: a retry keeps it
    let run = mp.run_async(&["sync", "--retry-quarantined"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(quarantine_of(&db).await.len(), 1);
    // the server serves it again: the next retry stores it and releases it
    *script.refuse_uid.lock().unwrap() = None;
    let run = mp.run_async(&["sync", "--retry-quarantined"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.event("quarantine_released_stored")["uid"], 2);
    assert!(quarantine_of(&db).await.is_empty());
    assert_eq!(db.count("messages", doc! {}).await, 3);
    record(Row {
        fault: "one UID refused for ever while others are served: checkpoint held (others stored), quarantined after 3 passes and the minimum age, stored by --retry-quarantined once served",
        tries: 6,
        expected: 3,
        stored: db.count("messages", doc! {}).await,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}

/// Cyrus and Gmail announce new mail inside the response to whatever command comes next and
/// not again at IDLE; with 300 ms per response the window is wide. The mail must be stored
/// within a second or so of the announcement, never at the IDLE refresh (10 minutes).
#[tokio::test(flavor = "multi_thread")]
async fn mail_announced_inside_a_fetch_response_of_a_slow_server_is_stored_at_once() {
    let script = Arc::new(Script {
        uids: Mutex::new(vec![1]),
        delay: Duration::from_millis(300),
        deliver_during_fetch: AtomicBool::new(true),
        ..Default::default()
    });
    let port = serve(script.clone()).await;
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[spec(port, &[])]);
    let daemon = Daemon::start(&mp);
    eventually(Duration::from_secs(30), "both stored", || async {
        db.count("messages", doc! {}).await == 2
    })
    .await;
    let announced = script.announced_at.lock().unwrap().expect("announced");
    let second = db.messages(doc! {"uid": 2i64}).await;
    assert_eq!(second.len(), 1);
    let stored_at = second[0]
        .get_datetime("stored_at")
        .unwrap()
        .to_system_time();
    let after = stored_at.duration_since(announced).unwrap_or_default();
    // a new pass is four 300 ms round trips (EXAMINE, SEARCH, sizes, bodies) plus the write
    assert!(after < Duration::from_secs(5), "{after:?}");
    drop(daemon);
    record(Row {
        fault: &format!("new mail announced (* 2 EXISTS) inside a UID FETCH response, 300 ms per response, nothing at IDLE: stored {} ms after the announcement, not at the IDLE refresh", after.as_millis()),
        tries: 1,
        expected: 2,
        stored: db.count("messages", doc! {}).await,
        duplicated: 0,
        crashes: 0,
        hangs: 0,
    });
}
