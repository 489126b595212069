//! `mailpump status`: what the database says of each mailbox, after syncs that worked and
//! syncs that failed.

use serde_json::Value;

use crate::harness::{message, AccountSpec, Dovecot, Mailpump, TestDb};

fn json_rows(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_good_sync_status_exits_0_with_the_checkpoint_and_the_count() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("stan", "pw-stan");
    for i in 0..4 {
        dc.deliver(&user, &message(&format!("s{i}"), "x"));
    }
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("stan", &dc, &user)]);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 0);

    let run = mp.run_async(&["status"]).await;
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    let text = run.stdout();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("LAST_UID") && lines[0].contains("MESSAGES"));
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&cells[..2], &["ok", "stan/INBOX"], "{text}");
    // STATE and FOLLOWED are `-` (sync writes no daemon state), then UIDVALIDITY, LAST_UID,
    // MESSAGES
    assert_eq!(&cells[2..4], &["-", "-"], "{text}");
    assert_eq!(&cells[5..7], &["4", "4"], "{text}");
    let col = |l: &str, name: &str| l.find(name).unwrap();
    assert_eq!(
        lines[1][col(lines[0], "LAST_UID")..]
            .split_whitespace()
            .next(),
        Some("4"),
        "{text}"
    );

    let run = mp.run_async(&["status", "--json"]).await;
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let rows = json_rows(&run.stdout());
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r["account"], "stan");
    assert_eq!(r["mailbox"], "INBOX");
    assert_eq!(r["configured"], true);
    assert_eq!(r["ok"], true);
    assert_eq!(r["last_uid"], 4);
    assert_eq!(r["messages"], 4);
    assert_eq!(r["quarantined"], 0);
    assert_eq!(r["failing_uids"], 0);
    assert_eq!(r["last_error"], Value::Null);
    assert!(r["last_success_at"].as_str().is_some(), "{r}");
    let stored = db.mailbox("stan/INBOX").await.unwrap();
    assert_eq!(r["uidvalidity"], stored.get_i64("uidvalidity").unwrap());

    // nothing has run for longer than the limit: stale, exit 1 (the default limit is 30 min)
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let run = mp
        .run_async(&["status", "--json", "--stale-after", "1s"])
        .await;
    assert_eq!(run.code(), 1, "{}", run.stdout());
    let rows = json_rows(&run.stdout());
    assert_eq!(
        (&rows[0]["stale"], &rows[0]["ok"]),
        (&true.into(), &false.into())
    );
    let run = mp.run_async(&["status", "--stale-after", "1s"]).await;
    assert!(
        run.stdout()
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("STALE  stan/INBOX"),
        "{}",
        run.stdout()
    );
    assert_eq!(
        mp.run_async(&["status", "--stale-after", "off"])
            .await
            .code(),
        0
    );

    // removed from the config: still listed, marked so
    let other = dc.add_user("olga", "pw-olga");
    let without = Mailpump::new(&db, &[AccountSpec::plain("olga", &dc, &other)]);
    let run = without.run_async(&["status", "--json"]).await;
    let rows = json_rows(&run.stdout());
    assert_eq!(rows.len(), 2, "{}", run.stdout());
    assert_eq!(
        (&rows[0]["account"], &rows[0]["configured"]),
        (&"olga".into(), &true.into())
    );
    assert_eq!(rows[0]["messages"], 0);
    assert_eq!(
        (&rows[1]["account"], &rows[1]["configured"]),
        (&"stan".into(), &false.into())
    );
    assert_eq!(rows[1]["messages"], 4);
    assert_eq!(run.code(), 0, "never synced is not failing");
    assert!(without
        .run_async(&["status"])
        .await
        .stdout()
        .contains("stan/INBOX (not configured)"));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_refused_connection_status_exits_1_and_shows_the_error() {
    let port = crate::harness::dovecot::free_port();
    let db = TestDb::new().await;
    let spec = AccountSpec {
        name: "rita".into(),
        port,
        security: "plain",
        username: "rita".into(),
        password: "x".into(),
        extra: vec![],
    };
    let mp = Mailpump::new(&db, &[spec]);
    assert_eq!(mp.run_async(&["sync"]).await.code(), 1);

    let run = mp.run_async(&["status"]).await;
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    let line = run.stdout().lines().nth(1).unwrap().to_string();
    assert!(line.starts_with("FAIL   rita/INBOX"), "{line}");
    assert!(
        line.contains(&format!("connection refused by 127.0.0.1:{port}")),
        "{line}"
    );

    let run = mp.run_async(&["status", "--json"]).await;
    assert_eq!(run.code(), 1);
    let rows = json_rows(&run.stdout());
    assert_eq!(rows[0]["ok"], false);
    // a failed `sync` records its error, not a state: the state is the daemon's
    assert_eq!(rows[0]["state"], Value::Null);
    assert!(rows[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
    assert_eq!(rows[0]["last_success_at"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_database_is_exit_1_with_a_message() {
    let port = crate::harness::dovecot::free_port();
    let toml = format!(
        "[store]\nuri = \"mongodb://127.0.0.1:{port}\"\ndatabase = \"x\"\nconnect_timeout = \"1s\"\n\n[accounts.u]\nhost = \"127.0.0.1\"\nport = 1\nsecurity = \"plain\"\nusername = \"u\"\npassword = \"p\"\n"
    );
    let run = Mailpump::from_toml(&toml).run_async(&["status"]).await;
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr()
            .contains("mailpump status: cannot read database \"x\""),
        "{}",
        run.stderr()
    );
}
