//! `mailpump verify` against a real Dovecot and the MongoDB-protocol server: a store that
//! matches, documents deleted or changed by hand, a message expunged behind mailpump's back,
//! and a raw digest altered (`--deep`); `--repair` for each; the server never modified.

use bson::{doc, Document};
use serde_json::Value;

use crate::harness::{message, AccountSpec, Dovecot, Mailpump, RawImap, TestDb, User};

/// The only line of `verify --json` (one mailbox configured).
fn one_row(stdout: &str) -> Value {
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    rows.into_iter().next().unwrap()
}

fn uids(v: &Value) -> Vec<u64> {
    v["uids"]
        .as_array()
        .unwrap_or_else(|| panic!("no uid list in {v}"))
        .iter()
        .map(|u| u.as_u64().unwrap())
        .collect()
}

/// A Dovecot with `n` unseen messages in INBOX, synced by mailpump.
async fn synced(name: &str, n: usize) -> (Dovecot, User, TestDb, Mailpump) {
    let mut dc = Dovecot::start();
    let user = dc.add_user(name, &format!("pw-{name}"));
    for i in 0..n {
        dc.deliver(&user, &message(&format!("v{i}"), &format!("body {i}")));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain(name, &dc, &user)]);
    let run = mp.run_async(&["sync"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    (dc, user, db, mp)
}

async fn document(db: &TestDb, uid: i64) -> Option<Document> {
    db.messages(doc! {"uid": uid}).await.into_iter().next()
}

fn id_of(d: &Document) -> String {
    d.get_str("_id").unwrap().to_string()
}

/// The flags Dovecot reports for every message of INBOX, read with EXAMINE (which changes
/// nothing).
fn server_flags(dc: &Dovecot, user: &User) -> Vec<String> {
    let mut imap = RawImap::login(dc.imap_port, user);
    imap.command("EXAMINE INBOX").unwrap();
    let lines = imap.command("UID FETCH 1:* (FLAGS)").unwrap();
    imap.logout();
    lines.into_iter().filter(|l| l.contains("FETCH")).collect()
}

fn assert_nothing_seen(dc: &Dovecot, user: &User) {
    let flags = server_flags(dc, user);
    assert!(!flags.is_empty());
    for line in &flags {
        assert!(
            !line.contains("\\Seen") && !line.contains("\\Deleted"),
            "verify changed a flag on the server: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_sync_verify_exits_0_and_reports_no_difference() {
    let (dc, user, _db, mp) = synced("vera", 4).await;
    let run = mp.run_async(&["verify", "--json"]).await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    let r = one_row(&run.stdout());
    assert_eq!(r["account"], "vera");
    assert_eq!(r["mailbox"], "INBOX");
    assert_eq!(r["ok"], true);
    assert_eq!(r["differences"], 0);
    assert_eq!(r["server_messages"], 4);
    assert_eq!(r["stored_messages"], 4);
    assert_eq!(r["not_yet_synced"], 0);
    for key in [
        "missing",
        "extra",
        "size_mismatch",
        "flags_stale",
        "marked_expunged_present",
        "quarantined",
    ] {
        assert_eq!(r[key]["count"], 0, "{key}: {r}");
        assert_eq!(r[key]["truncated"], false, "{key}: {r}");
    }
    assert_eq!(r["checkpoint"]["last_uid"], 4);
    assert_eq!(r["repair"], Value::Null);

    // the text report: one ✓ line
    let run = mp.run_async(&["verify"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let text = run.stdout();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("✓  vera/INBOX  missing 0, extra 0,"),
        "{text}"
    );
    assert!(text.contains("4 on the server, 4 stored"), "{text}");

    // a message that arrived since the sync is not yet synced: no difference
    let mut dc = dc;
    dc.deliver(&user, &message("late", "x"));
    let run = mp.run_async(&["verify", "--json", "--deep"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let r = one_row(&run.stdout());
    assert_eq!(r["not_yet_synced"], 1, "{r}");
    assert_eq!(r["deep"]["checked"], 4, "{r}");
    assert_eq!(r["digest_mismatch"]["count"], 0, "{r}");

    // usage errors
    let run = mp.run_async(&["verify", "--account", "nobody"]).await;
    assert_eq!(run.code(), 64, "{}", run.stderr());
    assert!(run.stderr().contains("vera"), "{}", run.stderr());
    let run = mp.run_async(&["verify", "--mailbox", "Nope"]).await;
    assert_eq!(run.code(), 64, "{}", run.stderr());

    // verify read with EXAMINE and BODY.PEEK only: nothing became \Seen
    assert_nothing_seen(&dc, &user);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_document_and_stale_flags_are_found_and_repaired() {
    let (dc, user, db, mp) = synced("vic", 3).await;
    let coll = db.db.collection::<Document>("messages");
    let two = document(&db, 2).await.unwrap();
    let sha = two
        .get_document("raw")
        .unwrap()
        .get_str("sha256")
        .unwrap()
        .to_string();
    coll.delete_one(doc! {"_id": id_of(&two)}).await.unwrap();
    let three = document(&db, 3).await.unwrap();
    coll.update_one(
        doc! {"_id": id_of(&three)},
        doc! {"$set": {"flags": ["\\Flagged", "\\Answered"]}},
    )
    .await
    .unwrap();

    let run = mp.run_async(&["verify", "--json"]).await;
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    let r = one_row(&run.stdout());
    assert_eq!(r["ok"], false);
    assert_eq!(uids(&r["missing"]), vec![2], "{r}");
    assert_eq!(uids(&r["flags_stale"]), vec![3], "{r}");
    assert_eq!(r["differences"], 2, "{r}");
    assert_eq!(r["extra"]["count"], 0, "{r}");
    let text = mp.run_async(&["verify"]).await.stdout();
    assert!(text.starts_with("✗  vic/INBOX  missing 1,"), "{text}");
    assert!(text.contains("    missing: 2\n"), "{text}");
    assert!(
        text.contains("flags stale: uid 3 stored (\\Flagged \\Answered)"),
        "{text}"
    );

    let run = mp.run_async(&["verify", "--repair", "--json"]).await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    let r = one_row(&run.stdout());
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(uids(&r["missing"]), vec![2], "what was found: {r}");
    assert_eq!(r["repair"]["stored"], 1, "{r}");
    assert_eq!(r["repair"]["flags_fixed"], 1, "{r}");
    assert_eq!(r["after"]["differences"], 0, "{r}");

    let back = document(&db, 2).await.expect("the document is back");
    assert_eq!(
        back.get_document("raw").unwrap().get_str("sha256").unwrap(),
        sha
    );
    assert_eq!(back.get_str("subject").unwrap(), "v1");
    let fixed = document(&db, 3).await.unwrap();
    let flags: Vec<&str> = fixed
        .get_array("flags")
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        !flags.contains(&"\\Flagged") && !flags.contains(&"\\Answered"),
        "{flags:?}"
    );
    // the checkpoint did not move
    let cp = db.mailbox("vic/INBOX").await.unwrap();
    assert_eq!(cp.get_i64("last_uid").unwrap(), 3);

    let run = mp.run_async(&["verify", "--json"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(one_row(&run.stdout())["differences"], 0);
    assert_nothing_seen(&dc, &user);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_expunged_while_mailpump_was_not_running_is_extra_and_gets_marked() {
    let (dc, user, db, mp) = synced("vale", 3).await;
    let mut imap = RawImap::login(dc.imap_port, &user);
    imap.command("SELECT INBOX").unwrap();
    imap.command("UID STORE 2 +FLAGS.SILENT (\\Deleted)")
        .unwrap();
    imap.command("EXPUNGE").unwrap();
    imap.logout();

    let run = mp.run_async(&["verify", "--json"]).await;
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    let r = one_row(&run.stdout());
    assert_eq!(uids(&r["extra"]), vec![2], "{r}");
    assert_eq!(r["missing"]["count"], 0, "{r}");
    assert_eq!(r["server_messages"], 2, "{r}");
    assert!(document(&db, 2)
        .await
        .unwrap()
        .get_datetime("expunged_at")
        .is_err());

    let run = mp.run_async(&["verify", "--repair", "--json"]).await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    let r = one_row(&run.stdout());
    assert_eq!(r["repair"]["marked_expunged"], 1, "{r}");
    let two = document(&db, 2).await.expect("marked, not removed");
    assert!(two.get_datetime("expunged_at").is_ok(), "{two}");
    for uid in [1, 3] {
        assert!(document(&db, uid)
            .await
            .unwrap()
            .get_datetime("expunged_at")
            .is_err());
    }
    let run = mp.run_async(&["verify", "--json"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    let r = one_row(&run.stdout());
    assert_eq!(
        (r["stored_messages"].clone(), r["differences"].clone()),
        (2.into(), 0.into())
    );

    // a mark the server contradicts is taken off again
    db.db
        .collection::<Document>("messages")
        .update_one(
            doc! {"uid": 3i64},
            doc! {"$set": {"expunged_at": bson::DateTime::now()}},
        )
        .await
        .unwrap();
    let run = mp.run_async(&["verify", "--json"]).await;
    assert_eq!(run.code(), 1, "{}", run.stdout());
    assert_eq!(
        uids(&one_row(&run.stdout())["marked_expunged_present"]),
        vec![3]
    );
    let run = mp.run_async(&["verify", "--repair", "--json"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(one_row(&run.stdout())["repair"]["unmarked"], 1);
    assert!(document(&db, 3)
        .await
        .unwrap()
        .get_datetime("expunged_at")
        .is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_finds_an_altered_raw_digest_and_repair_stores_the_message_again() {
    let (dc, user, db, mp) = synced("vidal", 3).await;
    let one = document(&db, 1).await.unwrap();
    let sha = one
        .get_document("raw")
        .unwrap()
        .get_str("sha256")
        .unwrap()
        .to_string();
    db.db
        .collection::<Document>("messages")
        .update_one(
            doc! {"_id": id_of(&one)},
            doc! {"$set": {"raw.sha256": "0".repeat(64)}},
        )
        .await
        .unwrap();

    // without --deep the bytes are not read: nothing to see
    let run = mp.run_async(&["verify", "--json"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());

    let run = mp.run_async(&["verify", "--deep", "--json"]).await;
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    let r = one_row(&run.stdout());
    assert_eq!(uids(&r["digest_mismatch"]), vec![1], "{r}");
    assert_eq!(r["deep"]["checked"], 3, "{r}");
    let text = mp.run_async(&["verify", "--deep"]).await.stdout();
    assert!(text.contains("    digest mismatch: 1\n"), "{text}");

    let run = mp
        .run_async(&["verify", "--deep", "--repair", "--json"])
        .await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    let r = one_row(&run.stdout());
    assert_eq!(r["repair"]["restored"], 1, "{r}");
    assert_eq!(r["deep"]["remaining"]["count"], 0, "{r}");
    let one = document(&db, 1).await.unwrap();
    assert_eq!(
        one.get_document("raw").unwrap().get_str("sha256").unwrap(),
        sha
    );
    let run = mp.run_async(&["verify", "--deep", "--json"]).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_nothing_seen(&dc, &user);
}
