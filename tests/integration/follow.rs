//! The README's "Following changes" scripts, run for real: examples/follow_changes_poll.py
//! against the suite's database, examples/follow_changes_stream.py against a SecantusDB of its
//! own that advertises itself as a single-node replica set (change streams need one). The
//! documents are written through mailpump's own store (commit, flag updates, expunge marks,
//! move links, a UIDVALIDITY change), so they have exactly the shape readers will meet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailpump::config::{OnExpunge, Secret, StoreConfig};
use mailpump::parse::{self, Limits};
use mailpump::store::{FlagChange, MailboxStatus, ReadyMessage, Store};
use serde_json::Value;

use crate::harness::dovecot::free_port;
use crate::harness::{message, root, TestDb};

/// The venv deploy/services.sh installs pymongo (with SecantusDB) into.
fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("MAILPUMP_VENV") {
        return v.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    cache.join("mailpump/venv")
}

async fn store(uri: &str, database: &str, on_expunge: OnExpunge) -> Store {
    Store::connect(&StoreConfig {
        uri: Secret::new(uri),
        database: database.to_string(),
        connect_timeout: Duration::from_secs(10),
        op_timeout: Duration::from_secs(30),
        max_inline_body: 1024 * 1024,
        inline_raw_max: mailpump::parse::DEFAULT_INLINE_RAW,
        write_concern: Default::default(),
        on_expunge,
        blob_sweep_after: Duration::from_secs(3600),
    })
    .await
    .unwrap()
}

fn ready(uid: u32, raw: &[u8]) -> ReadyMessage {
    ReadyMessage {
        uid,
        flags: vec![],
        internal_date: None,
        size: raw.len() as u64,
        parsed: parse::parse(raw.to_vec(), Limits::default()),
        gmail: None,
    }
}

async fn commit(store: &Store, mailbox: &str, uidvalidity: u32, messages: &[(u32, &[u8])]) {
    let batch: Vec<ReadyMessage> = messages.iter().map(|(u, r)| ready(*u, r)).collect();
    let last = messages.iter().map(|(u, _)| *u).max().unwrap();
    store
        .commit_batch(
            "acc",
            mailbox,
            uidvalidity,
            MailboxStatus::default(),
            &batch,
            last,
        )
        .await
        .unwrap();
}

/// Runs an example script; its JSON lines.
fn script(name: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(venv().join("bin/python"))
        .arg(root().join("examples").join(name))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

/// (event, id) of each line, sorted, for comparing a round's output as a whole.
fn kinds(events: &[Value]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = list
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    out.sort();
    out
}

fn find<'a>(events: &'a [Value], event: &str, id: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["event"] == event && e["id"] == id)
        .unwrap_or_else(|| panic!("no {event} for {id} in {events:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_polling_script_prints_each_change_once_across_restarts() {
    let db = TestDb::new().await;
    let s = store(&db.uri, &db.name, OnExpunge::Mark).await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("state.json");
    let poll = |page: &'static str| {
        let state = state.to_str().unwrap().to_string();
        let (uri, name) = (db.uri.clone(), db.name.clone());
        move || {
            script(
                "follow_changes_poll.py",
                &[
                    "--uri",
                    &uri,
                    "--db",
                    &name,
                    "--state",
                    &state,
                    "--once",
                    "--page-size",
                    page,
                ],
            )
        }
    };
    let moved = message("moved", "m");
    // one batch: the three documents share one stored_at, and pages of two cut through it
    commit(
        &s,
        "INBOX",
        7,
        &[
            (1, &message("one", "1")),
            (2, &message("two", "2")),
            (3, &moved),
        ],
    )
    .await;
    let first = tokio::task::spawn_blocking(poll("2")).await.unwrap();
    assert_eq!(
        kinds(&first),
        pairs(&[
            ("new", "acc/INBOX/7/1"),
            ("new", "acc/INBOX/7/2"),
            ("new", "acc/INBOX/7/3")
        ])
    );
    assert_eq!(find(&first, "new", "acc/INBOX/7/1")["subject"], "one");

    // flags, an expunge, a MOVE (the same bytes stored in Archive, then expunged from INBOX),
    // a mailbox whose UIDVALIDITY changed
    s.apply_flags(
        "acc",
        "INBOX",
        7,
        &[FlagChange {
            uid: 1,
            flags: vec!["\\Seen".into()],
            modseq: Some(5),
        }],
    )
    .await
    .unwrap();
    commit(&s, "Archive", 9, &[(1, &moved)]).await;
    assert_eq!(
        s.mark_expunged("acc", "INBOX", 7, &[2, 3]).await.unwrap(),
        2
    );
    commit(&s, "Old", 1, &[(1, &message("old", "o"))]).await;
    assert_eq!(s.mark_uidvalidity_gone("acc", "Old", 2).await.unwrap(), 1);

    let second = tokio::task::spawn_blocking(poll("1000")).await.unwrap();
    assert_eq!(
        kinds(&second),
        pairs(&[
            ("new", "acc/Archive/9/1"),
            ("new", "acc/Old/1/1"),
            ("flags", "acc/INBOX/7/1"),
            ("expunged", "acc/INBOX/7/2"),
            ("expunged", "acc/INBOX/7/3"),
            ("expunged", "acc/Old/1/1"),
        ])
    );
    let flags = find(&second, "flags", "acc/INBOX/7/1");
    assert_eq!(
        (flags["flags"][0].as_str(), flags["modseq"].as_i64()),
        (Some("\\Seen"), Some(5))
    );
    assert_eq!(
        find(&second, "expunged", "acc/INBOX/7/3")["moved_to"],
        "acc/Archive/9/1"
    );
    assert_eq!(
        find(&second, "new", "acc/Archive/9/1")["moved_from"],
        "acc/INBOX/7/3"
    );
    assert_eq!(
        find(&second, "expunged", "acc/Old/1/1")["reason"],
        "uidvalidity changed"
    );
    assert!(find(&second, "expunged", "acc/INBOX/7/2")
        .get("moved_to")
        .is_none());

    // nothing new: nothing printed; the same flags again change nothing; new flags do
    assert_eq!(
        tokio::task::spawn_blocking(poll("2")).await.unwrap(),
        Vec::<Value>::new()
    );
    let same = FlagChange {
        uid: 1,
        flags: vec!["\\Seen".into()],
        modseq: Some(5),
    };
    assert_eq!(s.apply_flags("acc", "INBOX", 7, &[same]).await.unwrap(), 0);
    assert_eq!(
        tokio::task::spawn_blocking(poll("2")).await.unwrap(),
        Vec::<Value>::new()
    );
    // a new timestamp, surely past the millisecond of the last one
    tokio::time::sleep(Duration::from_millis(5)).await;
    let flagged = FlagChange {
        uid: 1,
        flags: vec!["\\Seen".into(), "\\Flagged".into()],
        modseq: Some(6),
    };
    assert_eq!(
        s.apply_flags("acc", "INBOX", 7, &[flagged]).await.unwrap(),
        1
    );
    let third = tokio::task::spawn_blocking(poll("2")).await.unwrap();
    assert_eq!(kinds(&third), pairs(&[("flags", "acc/INBOX/7/1")]));
    assert_eq!(third[0]["modseq"], 6);
}

/// A SecantusDB of this test's own that advertises a single-node replica set (no
/// `--standalone`), so that `watch` works; stopped by PID on drop.
struct ReplicaSet {
    _dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl ReplicaSet {
    fn start() -> ReplicaSet {
        let base = std::env::var_os("MAILPUMP_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let dir = tempfile::Builder::new()
            .prefix("rs")
            .tempdir_in(base)
            .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("secantus.log")).unwrap();
        let child = Command::new(venv().join("bin/secantusd-py"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start secantusd-py");
        // deploy/test.sh stops what a crashed test leaves behind by these files
        std::fs::write(dir.path().join("pid"), child.id().to_string()).unwrap();
        let rs = ReplicaSet {
            _dir: dir,
            port,
            child,
        };
        wait_for_port(port, rs._dir.path());
        rs
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }
}

fn wait_for_port(port: u16, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "SecantusDB did not come up: {}",
            std::fs::read_to_string(dir.join("secantus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_change_stream_script_resumes_from_its_saved_token() {
    let rs = ReplicaSet::start();
    let uri = rs.uri();
    let database = "follow_stream";
    let s = store(&uri, database, OnExpunge::Mark).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token.json");
    let follow = {
        let (uri, token) = (uri.clone(), token.to_str().unwrap().to_string());
        move || {
            script(
                "follow_changes_stream.py",
                &[
                    "--uri",
                    &uri,
                    "--db",
                    database,
                    "--token",
                    &token,
                    "--exit-after-idle",
                    "1.5",
                ],
            )
        }
    };
    // the first run only records where the stream starts
    assert_eq!(
        tokio::task::spawn_blocking(follow.clone()).await.unwrap(),
        Vec::<Value>::new()
    );
    assert!(token.exists());

    // while no reader runs
    let moved = message("moved", "m");
    commit(&s, "INBOX", 7, &[(1, &message("one", "1")), (2, &moved)]).await;
    s.apply_flags(
        "acc",
        "INBOX",
        7,
        &[FlagChange {
            uid: 1,
            flags: vec!["\\Seen".into()],
            modseq: None,
        }],
    )
    .await
    .unwrap();
    commit(&s, "Archive", 9, &[(1, &moved)]).await;
    s.mark_expunged("acc", "INBOX", 7, &[2]).await.unwrap();

    let events = tokio::task::spawn_blocking(follow.clone()).await.unwrap();
    let got = kinds(&events);
    for want in pairs(&[
        ("new", "acc/INBOX/7/1"),
        ("new", "acc/INBOX/7/2"),
        ("new", "acc/Archive/9/1"),
        ("flags", "acc/INBOX/7/1"),
        ("expunged", "acc/INBOX/7/2"),
        ("moved", "acc/INBOX/7/2"),
        ("moved", "acc/Archive/9/1"),
    ]) {
        assert!(got.contains(&want), "{want:?} missing from {events:?}");
    }
    assert_eq!(
        find(&events, "flags", "acc/INBOX/7/1")["flags"][0],
        "\\Seen"
    );
    assert_eq!(find(&events, "new", "acc/INBOX/7/1")["subject"], "one");
    let links: BTreeSet<String> = events
        .iter()
        .filter(|e| e["event"] == "moved")
        .map(|e| e.to_string())
        .collect();
    assert!(
        links
            .iter()
            .any(|l| l.contains("\"moved_to\":\"acc/Archive/9/1\"")),
        "{links:?}"
    );
    assert!(
        links
            .iter()
            .any(|l| l.contains("\"moved_from\":\"acc/INBOX/7/2\"")),
        "{links:?}"
    );

    // a restart prints nothing twice; a removed document (on_expunge = "delete") is seen
    assert_eq!(
        tokio::task::spawn_blocking(follow.clone()).await.unwrap(),
        Vec::<Value>::new()
    );
    let deleting = store(&uri, database, OnExpunge::Delete).await;
    deleting
        .mark_expunged("acc", "INBOX", 7, &[1])
        .await
        .unwrap();
    let events = tokio::task::spawn_blocking(follow).await.unwrap();
    assert_eq!(kinds(&events), pairs(&[("deleted", "acc/INBOX/7/1")]));
}
