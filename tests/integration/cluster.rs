//! `[cluster]`: three replicas (real `mailpump run` processes) with the same config of 30
//! mailboxes, one Dovecot, the test database: each mailbox served by exactly one replica
//! (Dovecot's own count of connections per user), shares within one, failover after `kill -9`,
//! rebalance after a restart, a paused replica fenced, a rolling restart with mail arriving
//! throughout, a database that stalls for longer than the TTL. Lease times are shortened (3 s
//! TTL, 1 s renewals).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use bson::{doc, Document};
use futures::TryStreamExt;

use crate::harness::secantus::Secantus;
use crate::harness::{eventually, message, AccountSpec, Daemon, Dovecot, Mailpump, TestDb, User};

const MAILBOXES: usize = 30;
const TTL: Duration = Duration::from_secs(3);

struct Setup {
    dovecot: Dovecot,
    users: Vec<User>,
    db: TestDb,
    mp: Mailpump,
}

fn account(i: usize) -> String {
    format!("a{i:02}")
}

async fn setup() -> Setup {
    setup_on(TestDb::new().await).await
}

async fn setup_on(db: TestDb) -> Setup {
    let mut dovecot = Dovecot::start();
    let users: Vec<User> = (0..MAILBOXES)
        .map(|i| dovecot.add_user(&format!("c{i:02}"), &format!("pw-{i}")))
        .collect();
    let accounts: Vec<AccountSpec> = users
        .iter()
        .enumerate()
        .map(|(i, u)| AccountSpec::plain(&account(i), &dovecot, u))
        .collect();
    let mp = Mailpump::new(&db, &accounts);
    let mut toml = std::fs::read_to_string(&mp.config).unwrap();
    toml.push_str(&format!(
        "[cluster]\nenabled = true\nlease_ttl = \"{}s\"\nrenew_every = \"1s\"\n",
        TTL.as_secs()
    ));
    std::fs::write(&mp.config, toml).unwrap();
    Setup {
        dovecot,
        users,
        db,
        mp,
    }
}

fn replica(mp: &Mailpump, name: &str) -> Daemon {
    Daemon::start_with_env(mp, &[("MAILPUMP_CLUSTER__INSTANCE", name)])
}

/// Unexpired leases: unit -> owner.
async fn holders(db: &TestDb) -> BTreeMap<String, String> {
    let docs: Vec<Document> = db
        .db
        .collection::<Document>("leases")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let now = bson::DateTime::now();
    docs.iter()
        .filter(|d| d.get_datetime("expires_at").is_ok_and(|t| *t > now))
        .filter_map(|d| {
            Some((
                d.get_str("_id").ok()?.to_string(),
                d.get_str("owner").ok()?.to_string(),
            ))
        })
        .collect()
}

/// Whether every mailbox is held by one of `names`, the shares are within one of each other,
/// every name has a share, and Dovecot sees exactly one connection per user.
async fn balanced(s: &Setup, names: &[&str]) -> Result<BTreeMap<String, usize>, String> {
    let held = holders(&s.db).await;
    let mut shares: BTreeMap<String, usize> = names.iter().map(|n| (n.to_string(), 0)).collect();
    for owner in held.values() {
        match shares.get_mut(owner) {
            Some(n) => *n += 1,
            None => return Err(format!("held by {owner}, not one of {names:?}")),
        }
    }
    if held.len() != MAILBOXES {
        return Err(format!("{} of {MAILBOXES} held: {shares:?}", held.len()));
    }
    let (lo, hi) = (
        shares.values().min().copied().unwrap_or(0),
        shares.values().max().copied().unwrap_or(0),
    );
    if hi - lo > 1 {
        return Err(format!("shares differ by more than one: {shares:?}"));
    }
    let connections = s.dovecot.connections();
    for u in &s.users {
        let n = connections.get(&u.name).copied().unwrap_or(0);
        if n != 1 {
            return Err(format!("{} has {n} connections: {connections:?}", u.name));
        }
    }
    Ok(shares)
}

/// Waits until [`balanced`] holds; returns how long it took.
async fn wait_balanced(s: &Setup, names: &[&str], within: Duration) -> Duration {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match balanced(s, names).await {
            Ok(_) => return started.elapsed(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("not balanced over {names:?} within {within:?}: {last}");
}

async fn count_per_account(db: &TestDb) -> HashMap<String, u64> {
    let docs = db.messages(doc! {}).await;
    let mut out = HashMap::new();
    for d in docs {
        *out.entry(d.get_str("account").unwrap().to_string())
            .or_insert(0) += 1;
    }
    out
}

/// Delivers one message to every mailbox and waits until each holds `expect` documents.
async fn deliver_round(s: &mut Setup, round: usize, expect: u64) -> Duration {
    let started = Instant::now();
    for (i, u) in s.users.clone().iter().enumerate() {
        s.dovecot.deliver(
            u,
            &message(&format!("round {round} box {i}"), "cluster test"),
        );
    }
    eventually(
        Duration::from_secs(30),
        &format!("{expect} messages in every mailbox"),
        || async {
            let counts = count_per_account(&s.db).await;
            (0..MAILBOXES).all(|i| counts.get(&account(i)).copied().unwrap_or(0) == expect)
        },
    )
    .await;
    let took = started.elapsed();
    let counts = count_per_account(&s.db).await;
    for i in 0..MAILBOXES {
        assert_eq!(counts.get(&account(i)).copied(), Some(expect), "{counts:?}");
    }
    took
}

async fn stop_all(replicas: Vec<Daemon>) {
    for r in &replicas {
        r.signal("TERM");
    }
    for mut r in replicas {
        let (code, _) = r.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(code, 0, "{}", r.raw_log());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_share_thirty_mailboxes_fail_over_after_kill_9_and_rebalance() {
    let mut s = setup().await;
    let mut r = vec![
        replica(&s.mp, "r1"),
        replica(&s.mp, "r2"),
        replica(&s.mp, "r3"),
    ];
    let took = wait_balanced(&s, &["r1", "r2", "r3"], Duration::from_secs(40)).await;
    eprintln!("balanced over 3 replicas after {took:?}");
    let took = deliver_round(&mut s, 1, 1).await;
    eprintln!("one message in each of {MAILBOXES} mailboxes stored in {took:?}");

    // kill -9: the orphans are served by the others within the TTL and a few seconds
    let before = holders(&s.db).await;
    let orphans: BTreeSet<String> = before
        .iter()
        .filter(|(_, o)| *o == "r2")
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!orphans.is_empty());
    r[1].signal("KILL");
    let _ = r[1].wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    wait_balanced(&s, &["r1", "r3"], TTL + Duration::from_secs(12)).await;
    let failover = killed.elapsed();
    eprintln!(
        "{} orphans served by r1 and r3 {failover:?} after kill -9 (lease_ttl {TTL:?})",
        orphans.len()
    );
    assert!(
        failover <= TTL + Duration::from_secs(8),
        "failover took {failover:?}"
    );
    let taken_over: usize = [&r[0], &r[2]]
        .iter()
        .map(|d| d.events("lease_taken_over").len())
        .sum();
    assert_eq!(taken_over, orphans.len(), "each orphan taken over once");
    deliver_round(&mut s, 2, 2).await;

    // r2 comes back: the shares rebalance within a minute, by graceful handover
    r[1] = replica(&s.mp, "r2");
    let took = wait_balanced(&s, &["r1", "r2", "r3"], Duration::from_secs(60)).await;
    eprintln!("rebalanced after the restart in {took:?}");
    let handed: usize = [&r[0], &r[2]]
        .iter()
        .map(|d| d.events("lease_handing_over").len())
        .sum();
    assert!(handed >= MAILBOXES / 3 - 1, "handed over {handed}");
    deliver_round(&mut s, 3, 3).await;

    // the checkpoints never moved back, and status names the holders
    for i in 0..MAILBOXES {
        let m =
            s.db.mailbox(&format!("{}/INBOX", account(i)))
                .await
                .unwrap();
        assert_eq!(m.get_i64("last_uid").unwrap(), 3, "{m:?}");
    }
    let status = s.mp.run_async(&["status", "--json"]).await;
    let held = holders(&s.db).await;
    for line in status.stdout().lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = format!(
            "{}/{}",
            row["account"].as_str().unwrap(),
            row["mailbox"].as_str().unwrap()
        );
        assert_eq!(
            row["holder"].as_str(),
            held.get(&id).map(String::as_str),
            "{line}"
        );
        assert!(row["held_since"].is_string(), "{line}");
    }
    let text = s.mp.run_async(&["status"]).await.stdout();
    assert!(text.lines().next().unwrap().contains("HOLDER"), "{text}");
    stop_all(r).await;
    // SIGTERM released every lease and removed the heartbeats (the killed replica's expired
    // one stays until the TTL index removes it, an hour later)
    assert!(holders(&s.db).await.is_empty());
    let left = s.db.count("instances", doc! {}).await;
    let expired =
        s.db.count(
            "instances",
            doc! {"expires_at": {"$lt": bson::DateTime::now()}},
        )
        .await;
    assert_eq!((left, expired), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_paused_past_its_ttl_is_fenced_gives_up_its_mailboxes_and_rejoins() {
    let mut s = setup().await;
    let r = vec![
        replica(&s.mp, "r1"),
        replica(&s.mp, "r2"),
        replica(&s.mp, "r3"),
    ];
    wait_balanced(&s, &["r1", "r2", "r3"], Duration::from_secs(40)).await;
    let before = holders(&s.db).await;
    let paused: BTreeSet<String> = before
        .iter()
        .filter(|(_, o)| *o == "r2")
        .map(|(k, _)| k.clone())
        .collect();
    r[1].signal("STOP");
    // the others take its mailboxes over; its connections stay open meanwhile
    eventually(
        TTL + Duration::from_secs(12),
        "r2's leases taken over",
        || async {
            let held = holders(&s.db).await;
            held.len() == MAILBOXES && held.values().all(|o| o != "r2")
        },
    )
    .await;
    // mail for every mailbox while r2 sleeps: r2's sessions will wake up to it
    deliver_round(&mut s, 1, 1).await;
    r[1].signal("CONT");
    // it finds every taken-over lease lost (renewal or a fenced write) and stops those tasks
    eventually(
        Duration::from_secs(15),
        "r2 gave up what was taken over",
        || async {
            let lost: BTreeSet<String> = r[1]
                .events("lease_lost")
                .iter()
                .chain(r[1].events("lease_lost_fenced").iter())
                .filter_map(|e| {
                    Some(format!(
                        "{}/{}",
                        e["account"].as_str()?,
                        e["mailbox"].as_str().unwrap_or("*")
                    ))
                })
                .collect();
            paused.is_subset(&lost)
        },
    )
    .await;
    let fenced = r[1].events("lease_lost_fenced").len();
    eprintln!(
        "r2 lost {} leases after SIGCONT, {fenced} of them found by a refused write",
        paused.len()
    );
    wait_balanced(&s, &["r1", "r2", "r3"], Duration::from_secs(60)).await;
    deliver_round(&mut s, 2, 2).await;
    for i in 0..MAILBOXES {
        let m =
            s.db.mailbox(&format!("{}/INBOX", account(i)))
                .await
                .unwrap();
        assert_eq!(m.get_i64("last_uid").unwrap(), 2, "{m:?}");
    }
    stop_all(r).await;
}

/// The database stalls (SIGSTOP) for longer than the TTL under two replicas: no renewal can
/// succeed, so each replica stops every mailbox itself at its local deadline, before anyone
/// could take a lease over (no replica goes on serving a mailbox it cannot prove it holds);
/// mail delivered meanwhile is stored once the database answers again, each mailbox by one
/// replica, and no checkpoint is left behind or ahead of what is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_stalled_past_the_ttl_stops_every_mailbox_and_nothing_is_lost() {
    let server = Secantus::start();
    let mut s = setup_on(TestDb::on(&server.uri()).await).await;
    let r = vec![replica(&s.mp, "r1"), replica(&s.mp, "r2")];
    wait_balanced(&s, &["r1", "r2"], Duration::from_secs(40)).await;
    deliver_round(&mut s, 1, 1).await;
    let expired_before: Vec<usize> = r
        .iter()
        .map(|d| d.events("lease_expired_locally").len())
        .collect();
    assert_eq!(s.dovecot.connections().len(), MAILBOXES);
    server.pause();
    let paused = Instant::now();
    // mail for every mailbox while the database answers nothing
    for (i, u) in s.users.clone().iter().enumerate() {
        s.dovecot
            .deliver(u, &message(&format!("stalled {i}"), "cluster test"));
    }
    // both replicas give up every lease locally and log out of every mailbox
    // (a task that was writing when the database stopped answering leaves when the driver
    // gives the write up: its server monitor times out after 10-15 s)
    let mut stopped_after = None;
    let mut expired_after = None;
    while paused.elapsed() < TTL + Duration::from_secs(40) {
        let expired = r
            .iter()
            .zip(&expired_before)
            .all(|(d, before)| d.events("lease_expired_locally").len() > *before);
        if expired && expired_after.is_none() {
            expired_after = Some(paused.elapsed());
        }
        if expired && s.dovecot.connections().values().all(|n| *n == 0) {
            stopped_after = Some(paused.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_after = stopped_after.unwrap_or_else(|| {
        panic!(
            "not every mailbox stopped while the database stalled: {:?}",
            s.dovecot.connections()
        )
    });
    // each gave its leases up by itself before they could expire at the database
    let expired_after = expired_after.unwrap();
    assert!(expired_after < TTL, "{expired_after:?}");
    // the stall outlasts the TTL
    let stall = TTL + Duration::from_secs(3);
    if let Some(rest) = stall.checked_sub(paused.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    server.resume();
    let resumed = Instant::now();
    wait_balanced(&s, &["r1", "r2"], Duration::from_secs(60)).await;
    eventually(
        Duration::from_secs(30),
        "the mail delivered during the stall stored",
        || async {
            let counts = count_per_account(&s.db).await;
            (0..MAILBOXES).all(|i| counts.get(&account(i)).copied().unwrap_or(0) == 2)
        },
    )
    .await;
    eprintln!(
        "database stalled {:?}: both replicas gave up their leases {expired_after:?} and every mailbox had stopped {stopped_after:?} after the stall began (lease_ttl {TTL:?}); served again and the mail of the stall stored {:?} after it ended",
        paused.elapsed() - resumed.elapsed(),
        resumed.elapsed()
    );
    let counts = count_per_account(&s.db).await;
    for i in 0..MAILBOXES {
        assert_eq!(counts.get(&account(i)).copied(), Some(2), "{counts:?}");
        let m =
            s.db.mailbox(&format!("{}/INBOX", account(i)))
                .await
                .unwrap();
        assert_eq!(m.get_i64("last_uid").unwrap(), 2, "{m:?}");
    }
    deliver_round(&mut s, 3, 3).await;
    stop_all(r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_with_mail_arriving_loses_and_duplicates_nothing() {
    let s = setup().await;
    let mut r = vec![
        replica(&s.mp, "r1"),
        replica(&s.mp, "r2"),
        replica(&s.mp, "r3"),
    ];
    wait_balanced(&s, &["r1", "r2", "r3"], Duration::from_secs(40)).await;
    let Setup {
        mut dovecot,
        users,
        db,
        mp,
    } = s;
    // one message every 100 ms, round-robin over the mailboxes, for the whole restart
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deliverer = {
        let (stop, users) = (stop.clone(), users.clone());
        tokio::task::spawn_blocking(move || {
            let mut sent: Vec<(usize, String, SystemTime)> = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = n % MAILBOXES;
                let subject = format!("rolling {n}");
                dovecot.deliver(&users[i], &message(&subject, "rolling restart"));
                sent.push((i, subject, SystemTime::now()));
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (dovecot, sent)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, name) in ["r1", "r2", "r3"].iter().enumerate() {
        r[i].signal("TERM");
        let (code, took) = r[i].wait_exit(Duration::from_secs(20)).await;
        assert_eq!(code, 0, "{}", r[i].raw_log());
        eprintln!("{name} stopped in {took:?}");
        r[i] = replica(&mp, name);
        eventually(Duration::from_secs(60), "rebalanced", || async {
            let held = holders(&db).await;
            let mut shares: HashMap<&str, usize> = HashMap::new();
            for o in held.values() {
                *shares.entry(o.as_str()).or_default() += 1;
            }
            held.len() == MAILBOXES
                && ["r1", "r2", "r3"]
                    .iter()
                    .all(|n| shares.get(n).copied().unwrap_or(0) >= MAILBOXES / 3 - 1)
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (dovecot, sent) = deliverer.await.unwrap();
    eventually(
        Duration::from_secs(30),
        "every delivered message stored",
        || async { db.count("messages", doc! {}).await >= sent.len() as u64 },
    )
    .await;
    let docs = db.messages(doc! {}).await;
    assert_eq!(docs.len(), sent.len(), "nothing lost, nothing duplicated");
    let stored: HashMap<String, (String, SystemTime)> = docs
        .iter()
        .map(|d| {
            (
                d.get_str("subject").unwrap().to_string(),
                (
                    d.get_str("account").unwrap().to_string(),
                    d.get_datetime("stored_at").unwrap().to_system_time(),
                ),
            )
        })
        .collect();
    let mut worst = Duration::ZERO;
    for (i, subject, at) in &sent {
        let (acct, stored_at) = stored
            .get(subject)
            .unwrap_or_else(|| panic!("{subject} lost"));
        assert_eq!(acct, &account(*i));
        worst = worst.max(stored_at.duration_since(*at).unwrap_or_default());
    }
    eprintln!(
        "{} messages over a rolling restart of 3 replicas: the slowest stored {worst:?} after delivery",
        sent.len()
    );
    assert!(
        worst <= Duration::from_secs(10),
        "a mailbox waited {worst:?}"
    );
    stop_all(r).await;
    drop(dovecot);
}

/// The fence itself, end to end: a replica paused in the middle of a batch (its FETCH trickled
/// by a proxy) wakes up after another replica took the mailbox over and stored the message; it
/// finishes its batch, and its checkpoint write is refused: it logs `lease_lost_fenced`, stops
/// the mailbox, and the checkpoint and the one document stay as the new holder wrote them.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_replica_finishing_its_batch_finds_its_checkpoint_write_fenced() {
    use crate::harness::proxy::{Mode, Proxy};
    let mut dovecot = Dovecot::start();
    let user = dovecot.add_user("fence", "pw-fence");
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("a00", &dovecot, &user)]);
    let mut toml = std::fs::read_to_string(&mp.config).unwrap();
    toml.push_str("[cluster]\nenabled = true\nlease_ttl = \"3s\"\nrenew_every = \"1s\"\n");
    std::fs::write(&mp.config, toml).unwrap();
    let proxy = Proxy::start(dovecot.imap_port).await;
    let port = proxy.port.to_string();
    let old = Daemon::start_with_env(
        &mp,
        &[
            ("MAILPUMP_CLUSTER__INSTANCE", "old"),
            ("MAILPUMP_ACCOUNTS__A00__PORT", port.as_str()),
        ],
    );
    old.wait_for_log(Duration::from_secs(20), "old idling", |l| {
        l.iter()
            .any(|e| e["message"] == "idling" || e["message"] == "watching")
    })
    .await;
    // a 400 KB message, trickled: old's FETCH is under way when it is paused
    proxy.set_mode(Mode::Trickle(Duration::from_millis(4)));
    let body = "x".repeat(76).repeat(5000);
    dovecot.deliver(&user, &message("fenced", &body));
    tokio::time::sleep(Duration::from_secs(2)).await;
    old.signal("STOP");
    let new = replica(&mp, "new");
    eventually(
        Duration::from_secs(20),
        "new took over and stored it",
        || async {
            let m = db.mailbox("a00/INBOX").await;
            db.count("messages", doc! {}).await == 1
                && m.is_some_and(|m| m.get_i64("last_uid") == Ok(1) && m.get_i64("fence") == Ok(2))
        },
    )
    .await;
    proxy.set_mode(Mode::Pass);
    old.signal("CONT");
    old.wait_for_log(Duration::from_secs(30), "old's write fenced", |l| {
        l.iter().any(|e| e["message"] == "lease_lost_fenced")
    })
    .await;
    // (with one mailbox and two replicas, the shares may then move it back to old: token 3)
    let m = db.mailbox("a00/INBOX").await.unwrap();
    assert_eq!(m.get_i64("last_uid"), Ok(1), "{m:?}");
    assert!(m.get_i64("fence").unwrap() >= 2, "{m:?}");
    assert_eq!(db.count("messages", doc! {}).await, 1);
    assert!(!old.events("lease_lost").is_empty(), "{}", old.raw_log());
    stop_all(vec![old, new]).await;
}
