//! The command line: exit codes, config errors, `check`.

use crate::harness::{message, AccountSpec, Dovecot, Mailpump, TestDb};

#[test]
fn version_and_usage_errors() {
    let mp = Mailpump::from_toml("");
    let run = mp.run(&["--version"]);
    assert_eq!(run.code(), 0);
    assert!(run.stdout().contains(env!("CARGO_PKG_VERSION")));
    assert_eq!(mp.run(&["no-such-command"]).code(), 64);
}

#[test]
fn a_bad_config_exits_78_and_names_the_key() {
    let base = "[store]\nuri = \"mongodb://127.0.0.1:1\"\n[accounts.work]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n";
    for (extra, key) in [
        ("port = 70000", "accounts.work.port"),
        ("colour = \"blue\"", "colour"),
        ("mailboxes = []", "accounts.work.mailboxes"),
        ("idle_refresh = \"forever\"", "accounts.work.idle_refresh"),
        ("ca_file = \"/nonexistent/ca.pem\"", "accounts.work.ca_file"),
    ] {
        let mp = Mailpump::from_toml(&format!("{base}{extra}\n"));
        let run = mp.run(&["sync"]);
        assert_eq!(run.code(), 78, "{extra}");
        assert!(run.stderr().contains(key), "{extra}: {}", run.stderr());
    }
    let mut missing = Mailpump::from_toml(base);
    missing.config = missing.dir.path().join("absent.toml");
    let run = missing.run(&["check"]);
    assert_eq!(run.code(), 78);
    assert!(run.stderr().contains("absent.toml"));
}

#[test]
fn store_credentials_never_reach_the_logs() {
    let toml = "[store]\nuri = \"mongodb://mailpump:s3cret-db-pw@127.0.0.1:1/?authSource=admin\"\nconnect_timeout = \"1s\"\n[accounts.work]\nhost = \"127.0.0.1\"\nport = 1\nsecurity = \"plain\"\nusername = \"u\"\npassword = \"imap-pw-123\"\n";
    let mp = Mailpump::from_toml(toml);
    assert_eq!(
        crate::harness::mailpump::secrets_in(toml),
        vec!["mailpump:s3cret-db-pw", "s3cret-db-pw", "imap-pw-123"]
    );
    for args in [&["sync"][..], &["check"], &["--log-format", "text", "sync"]] {
        let run = mp.run(args); // run() itself asserts that no secret appears
        assert_eq!(run.code(), 1);
    }
    let run = mp.run(&["check"]);
    assert!(run.stdout().contains("✗ store"), "{}", run.stdout());
}

#[tokio::test(flavor = "multi_thread")]
async fn check_prints_one_line_per_mailbox_and_fails_on_a_bad_login() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("kate", "pw-kate");
    dc.deliver(&user, &message("a", "b"));
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[AccountSpec::plain("kate", &dc, &user)])
        .run_async(&["check"])
        .await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert!(
        run.stdout()
            .lines()
            .any(|l| l.starts_with("✓ kate/INBOX  1 messages")),
        "{}",
        run.stdout()
    );
    assert!(run.stdout().lines().any(|l| l.starts_with("✓ store")));

    let mut bad = AccountSpec::plain("kate", &dc, &user);
    bad.password = "nope".into();
    let run = Mailpump::new(&db, &[bad]).run_async(&["check"]).await;
    assert_eq!(run.code(), 1);
    assert!(
        run.stdout()
            .lines()
            .any(|l| l.starts_with("✗ kate/INBOX  login rejected")),
        "{}",
        run.stdout()
    );
    assert_eq!(
        Mailpump::new(&db, &[AccountSpec::plain("kate", &dc, &user)])
            .run_async(&["check", "--config-only"])
            .await
            .code(),
        0
    );
}

/// A port that accepts nothing: bound, then closed.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_runs_mailboxes_at_once_names_the_fix_and_keeps_its_deadline() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("lena", "pw-lena");
    dc.deliver(&user, &message("a", "b"));
    let db = TestDb::new().await;
    let mut bad_pw = AccountSpec::plain("badpw", &dc, &user);
    bad_pw.password = "nope-pw-x".into();
    let mut refused = AccountSpec::plain("refused", &dc, &user);
    refused.port = closed_port();
    // A server that accepts the connection and never says a word: only the deadline ends it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut mute = AccountSpec::plain("mute", &dc, &user)
        .with("connect_timeout = \"120s\"")
        .with("command_timeout = \"120s\"");
    mute.port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            socks.push(s);
        }
    });
    let good = AccountSpec::plain("good", &dc, &user);
    let mp = Mailpump::new(&db, &[good, bad_pw, refused, mute]);
    let run = mp.run_async(&["check", "--deadline", "12s"]).await;
    held.abort();
    let out = run.stdout();
    assert_eq!(run.code(), 1, "{out}");
    let line = |prefix: &str| {
        out.lines()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{out}"))
    };
    line("✓ store");
    line("✓ good/INBOX  1 messages");
    let bad = line("✗ badpw/INBOX  login rejected");
    assert!(
        out.lines()
            .nth(bad + 1)
            .unwrap()
            .contains("hint: the server refused the username or password"),
        "{out}"
    );
    let refused = line("✗ refused/INBOX  connection refused by 127.0.0.1:");
    assert!(
        out.lines()
            .nth(refused + 1)
            .unwrap()
            .contains("hint: nothing accepts connections"),
        "{out}"
    );
    line("✗ mute/INBOX  no answer within the 12s deadline");
}
