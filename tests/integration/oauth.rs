//! OAuth2 logins against Dovecot validating bearer tokens with the harness's identity provider
//! (`harness::idp`): both mechanisms over IMAP and POP3, expiring tokens in a running daemon,
//! a refused token refreshed once, invalid_grant, the endpoint down, rotation written back, a
//! token helper command, and `check`'s words for each failure. No token may appear in any
//! output: every run is checked against every token the provider handed out.

use std::time::{Duration, Instant};

use bson::doc;

use crate::harness::idp::{CLIENT_ID, CLIENT_SECRET};
use crate::harness::mailpump::{assert_no_secrets, Run};
use crate::harness::{
    eventually, message, AccountSpec, Daemon, Dovecot, Idp, Mailpump, TestDb, User,
};

const SOON: Duration = Duration::from_secs(20);

/// How an OAuth2 account reaches its Dovecot.
#[derive(Clone, Copy)]
struct Via {
    protocol: &'static str,
    security: &'static str,
    mechanism: &'static str,
}

fn port(dc: &Dovecot, via: Via) -> u16 {
    match (via.protocol, via.security) {
        ("imap", "tls") => dc.imaps_port,
        ("imap", _) => dc.imap_port,
        (_, "tls") => dc.pop3s_port,
        _ => dc.pop3_port,
    }
}

/// An `auth = "oauth2"` account; `source` are the lines of its `[oauth2]` table that say where
/// tokens come from (token endpoint keys, or access_token_command).
fn account(name: &str, dc: &Dovecot, user: &User, via: Via, source: &[String]) -> AccountSpec {
    let mut spec = AccountSpec::plain(name, dc, user)
        .with(format!("protocol = \"{}\"", via.protocol))
        .with(format!("ca_file = \"{}\"", dc.ca_file().display()))
        .with("auth = \"oauth2\"");
    spec.password = String::new();
    spec.security = via.security;
    spec.port = port(dc, via);
    spec = spec
        .with(format!("[accounts.{name}.oauth2]"))
        .with(format!("mechanism = \"{}\"", via.mechanism));
    for line in source {
        spec = spec.with(line.clone());
    }
    spec
}

/// The `[oauth2]` lines for the provider's token endpoint with `refresh_token`.
fn endpoint(idp: &Idp, refresh_token: &str) -> Vec<String> {
    vec![
        format!("token_url = \"{}\"", idp.token_url()),
        format!("client_id = \"{CLIENT_ID}\""),
        format!("client_secret = \"{CLIENT_SECRET}\""),
        format!("refresh_token = \"{refresh_token}\""),
    ]
}

const IMAP: Via = Via {
    protocol: "imap",
    security: "plain",
    mechanism: "xoauth2",
};

fn check_output(idp: &Idp, run: &Run) {
    assert_no_secrets(&idp.secrets(), &(run.stdout() + &run.stderr()));
}

async fn wait_count(db: &TestDb, filter: bson::Document, n: u64) {
    eventually(SOON, &format!("{n} messages in the database"), || async {
        db.count("messages", filter.clone()).await >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_and_pop3_log_in_with_both_mechanisms_over_plain_tls_and_starttls() {
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start_oauth(&idp);
    // the same Dovecot without SASL-IR: the initial response goes after the `+`
    let mut no_ir = Dovecot::start_oauth_with(
        &idp,
        "imap_capability = IMAP4rev1 LITERAL+ ID ENABLE IDLE UIDPLUS\n",
    );
    let user = dc.add_user("alice", "unused-password");
    let user2 = no_ir.add_user("alice", "unused-password");
    for i in 0..2 {
        dc.deliver(&user, &message(&format!("oauth {i}"), "x"));
        no_ir.deliver(&user2, &message(&format!("oauth {i}"), "x"));
    }
    let greeting = {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", no_ir.imap_port)).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(
        greeting.contains("AUTH=XOAUTH2") && !greeting.contains("SASL-IR"),
        "{greeting}"
    );
    let combos = [
        (&dc, &user, "imap", "plain", "xoauth2"),
        (&dc, &user, "imap", "tls", "oauthbearer"),
        (&dc, &user, "imap", "starttls", "xoauth2"),
        (&no_ir, &user2, "imap", "plain", "oauthbearer"),
        (&no_ir, &user2, "imap", "starttls", "xoauth2"),
        (&dc, &user, "pop3", "plain", "oauthbearer"),
        (&dc, &user, "pop3", "tls", "xoauth2"),
        (&dc, &user, "pop3", "starttls", "oauthbearer"),
    ];
    for (n, (dovecot, user, protocol, security, mechanism)) in combos.into_iter().enumerate() {
        let label = format!("{protocol} {security} {mechanism} (#{n})");
        let via = Via {
            protocol,
            security,
            mechanism,
        };
        let db = TestDb::new().await;
        let rt = idp.refresh_token("alice");
        let before = idp.token_requests().len();
        let spec = account("alice", dovecot, user, via, &endpoint(&idp, &rt));
        let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
        check_output(&idp, &run);
        assert_eq!(run.code(), 0, "{label}: {}", run.stdout());
        assert_eq!(run.event("mailbox_synced")["stored"], 2, "{label}");
        assert_eq!(idp.token_requests().len(), before + 1, "{label}: one token");
        assert!(run.events("oauth_token_refused").is_empty(), "{label}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_the_mechanism_gets_a_clear_error() {
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start(); // password logins only
    let user = dc.add_user("alice", "pw");
    let db = TestDb::new().await;
    for protocol in ["imap", "pop3"] {
        let via = Via { protocol, ..IMAP };
        let spec = account(
            "alice",
            &dc,
            &user,
            via,
            &endpoint(&idp, &idp.refresh_token("alice")),
        );
        let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
        assert_ne!(run.code(), 0);
        let out = run.stdout();
        assert!(
            out.contains("does not offer") && out.contains("XOAUTH2"),
            "{protocol}: {out}"
        );
    }
    assert!(
        idp.token_requests().is_empty(),
        "no token asked for a server that cannot use it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_expire_while_the_daemon_runs_and_new_mail_is_still_stored() {
    // 3 s tokens; POP3 logs in every second (one poll per login), IMAP holds IDLE sessions on
    // two mailboxes of one account and reconnects when Dovecot restarts
    let lifetime = Duration::from_secs(3);
    let idp = Idp::start(lifetime).await;
    let mut dc = Dovecot::start_oauth(&idp);
    let imap_user = dc.add_user("alice", "unused");
    let pop_user = dc.add_user("bob", "unused");
    dc.deliver_to(
        &imap_user,
        Some("Other"),
        &message("other 0", "x"),
        "",
        None,
    );
    let db = TestDb::new().await;
    let imap = account(
        "alice",
        &dc,
        &imap_user,
        IMAP,
        &endpoint(&idp, &idp.refresh_token("alice")),
    )
    .with("mailboxes = [\"INBOX\", \"Other\"]");
    // (the mailboxes line lands in [oauth2] if put after it: move it up)
    let imap = {
        let mut spec = imap;
        let line = spec.extra.pop().unwrap();
        spec.extra.insert(0, line);
        spec
    };
    let pop_via = Via {
        protocol: "pop3",
        security: "plain",
        mechanism: "oauthbearer",
    };
    let mut pop = account(
        "bob",
        &dc,
        &pop_user,
        pop_via,
        &endpoint(&idp, &idp.refresh_token("bob")),
    );
    pop.extra.insert(0, "poll_interval = \"1s\"".into());
    let mp = Mailpump::new(&db, &[imap, pop]);
    let started = Instant::now();
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "both IMAP mailboxes watching", |l| {
            l.iter()
                .filter(|e| e["message"] == "watching" && e["account"] == "alice")
                .count()
                >= 2
        })
        .await;
    assert_eq!(
        idp.token_requests_for("alice").len(),
        1,
        "two mailboxes starting together share one token request"
    );
    let mut sent_imap = 1;
    let mut sent_pop = 0;
    // five token lifetimes, mail arriving all along
    while started.elapsed() < lifetime * 5 {
        dc.deliver(&imap_user, &message("imap live", "x"));
        dc.deliver(&pop_user, &message("pop live", "x"));
        sent_imap += 1;
        sent_pop += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    wait_count(&db, doc! {"account": "alice"}, sent_imap).await;
    wait_count(&db, doc! {"account": "bob"}, sent_pop).await;
    let elapsed = started.elapsed();
    let bob = idp.token_requests_for("bob");
    let per_hour = bob.len() as f64 * 3600.0 / elapsed.as_secs_f64();
    let lifetimes = elapsed.as_secs_f64() / lifetime.as_secs_f64();
    eprintln!(
        "steady state: bob (POP3, a login every second) made {} token requests in {:.1}s = {:.0}/hour with {}s tokens ({:.2} per token lifetime); alice (IMAP, IDLE) {}",
        bob.len(),
        elapsed.as_secs_f64(),
        per_hour,
        lifetime.as_secs(),
        bob.len() as f64 / lifetimes,
        idp.token_requests_for("alice").len()
    );
    assert!(
        bob.len() as f64 <= lifetimes * 1.5 + 2.0 && bob.len() as f64 >= lifetimes * 0.7,
        "about one token request per lifetime: {} in {lifetimes:.1} lifetimes",
        bob.len()
    );
    assert!(bob.iter().all(|r| r.status == 200));
    // IMAP sessions outlive their tokens; a reconnect after expiry needs a new one
    let alice_before = idp.token_requests_for("alice").len();
    dc.stop();
    dc.start_again();
    dc.deliver(&imap_user, &message("after restart", "x"));
    dc.deliver_to(
        &imap_user,
        Some("Other"),
        &message("other after", "x"),
        "",
        None,
    );
    wait_count(&db, doc! {"account": "alice"}, sent_imap + 2).await;
    let alice_after = idp.token_requests_for("alice").len();
    assert_eq!(
        alice_after,
        alice_before + 1,
        "both mailboxes reconnecting share one refresh"
    );
    assert!(daemon.events("rejected").is_empty(), "{}", daemon.raw_log());
    assert_no_secrets(&idp.secrets(), &daemon.raw_log());
    // nothing stored twice
    let docs = db.messages(doc! {}).await;
    let ids: std::collections::BTreeSet<_> = docs
        .iter()
        .map(|d| d.get_str("message_id").unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids.len(), docs.len(), "no duplicates");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_is_refreshed_and_retried_once() {
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start_oauth(&idp);
    let user = dc.add_user("alice", "unused");
    dc.deliver(&user, &message("one", "x"));
    for protocol in ["imap", "pop3"] {
        let via = Via { protocol, ..IMAP };
        let db = TestDb::new().await;
        let spec = account(
            "alice",
            &dc,
            &user,
            via,
            &endpoint(&idp, &idp.refresh_token("alice")),
        );
        let mp = Mailpump::new(&db, &[spec]);
        // refused once: refreshed, retried, stored
        let before = idp.token_requests().len();
        idp.refuse_next(1);
        let run = mp.run_async(&["sync"]).await;
        check_output(&idp, &run);
        assert_eq!(run.code(), 0, "{protocol}: {}", run.stdout());
        assert_eq!(run.event("mailbox_synced")["stored"], 1, "{protocol}");
        assert_eq!(run.events("oauth_token_refused").len(), 1, "{protocol}");
        assert_eq!(idp.token_requests().len(), before + 2, "{protocol}");
        // refused twice: a rejected login, no third try
        let before = idp.token_requests().len();
        let introspections = idp.introspections();
        idp.refuse_next(2);
        let run = mp.run_async(&["sync"]).await;
        check_output(&idp, &run);
        assert_ne!(run.code(), 0, "{protocol}");
        assert!(
            run.stdout().contains("refused again after a refresh"),
            "{protocol}: {}",
            run.stdout()
        );
        assert_eq!(idp.token_requests().len(), before + 2, "{protocol}");
        assert_eq!(idp.introspections(), introspections + 2, "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_grant_stops_one_account_while_another_goes_on() {
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start_oauth(&idp);
    let alice = dc.add_user("alice", "unused");
    let bob = dc.add_user("bob", "unused");
    dc.deliver(&alice, &message("alice", "x"));
    dc.deliver(&bob, &message("bob 0", "x"));
    dc.deliver_to(
        &alice,
        Some("Other"),
        &message("alice other", "x"),
        "",
        None,
    );
    let db = TestDb::new().await;
    let mut a = account(
        "alice",
        &dc,
        &alice,
        IMAP,
        &endpoint(&idp, &idp.refresh_token("alice")),
    );
    a.extra
        .insert(0, "mailboxes = [\"INBOX\", \"Other\"]".into());
    a.extra.insert(0, "watch = [\"INBOX\", \"Other\"]".into());
    let b = account(
        "bob",
        &dc,
        &bob,
        IMAP,
        &endpoint(&idp, &idp.refresh_token("bob")),
    );
    idp.revoke("alice");
    let mp = Mailpump::new(&db, &[a, b]);
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "alice's mailboxes stopped", |l| {
            l.iter()
                .filter(|e| e["message"] == "mailbox_stopped" && e["account"] == "alice")
                .count()
                == 2
        })
        .await;
    let stopped = daemon.events("mailbox_stopped");
    let text = stopped[0]["error"].as_str().unwrap().to_string();
    assert!(
        text.contains("account alice")
            && text.contains("invalid_grant")
            && text.contains("new refresh token"),
        "{text}"
    );
    assert_eq!(
        daemon.events("oauth_account_stopped").len(),
        1,
        "one clear error"
    );
    wait_count(&db, doc! {"account": "bob"}, 1).await;
    dc.deliver(&bob, &message("bob 1", "x"));
    wait_count(&db, doc! {"account": "bob"}, 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        idp.token_requests_for("alice").len(),
        1,
        "invalid_grant is asked once, never again"
    );
    assert_eq!(db.count("messages", doc! {"account": "alice"}).await, 0);
    assert_no_secrets(&idp.secrets(), &daemon.raw_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_endpoint_down_then_back() {
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start_oauth(&idp);
    let user = dc.add_user("alice", "unused");
    dc.deliver(&user, &message("waiting", "x"));
    let db = TestDb::new().await;
    let spec = account(
        "alice",
        &dc,
        &user,
        IMAP,
        &endpoint(&idp, &idp.refresh_token("alice")),
    );
    idp.set_token_down(true);
    let mp = Mailpump::new(&db, &[spec]);
    let started = Instant::now();
    let daemon = Daemon::start(&mp);
    eventually(
        SOON,
        "two token requests while the endpoint is down",
        || async { idp.token_requests().len() >= 2 },
    )
    .await;
    let failures = daemon.events("disconnected");
    let text = failures[0]["error"].as_str().unwrap();
    assert!(
        text.contains("token endpoint") && text.contains("503"),
        "{text}"
    );
    assert!(daemon.events("rejected").is_empty() && daemon.events("mailbox_stopped").is_empty());
    let down_requests = idp.token_requests().len();
    let down_for = started.elapsed();
    idp.set_token_down(false);
    wait_count(&db, doc! {}, 1).await;
    // retried with backoff, never hammered: at most one request per 2 s cooldown, plus one
    assert!(
        down_requests as f64 <= down_for.as_secs_f64() / 2.0 + 2.0,
        "{down_requests} requests in {down_for:?}"
    );
    assert_eq!(
        idp.token_requests()
            .iter()
            .filter(|r| r.status == 200)
            .count(),
        1
    );
    assert_no_secrets(&idp.secrets(), &daemon.raw_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_refresh_token_is_written_back_to_its_file() {
    use std::os::unix::fs::PermissionsExt;
    let idp = Idp::start(Duration::from_secs(60)).await;
    idp.set_rotate(true);
    let mut dc = Dovecot::start_oauth(&idp);
    let user = dc.add_user("alice", "unused");
    dc.deliver(&user, &message("one", "x"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("alice.refresh");
    let first = idp.refresh_token("alice");
    std::fs::write(&file, format!("{first}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let source = vec![
        format!("token_url = \"{}\"", idp.token_url()),
        format!("client_id = \"{CLIENT_ID}\""),
        format!("client_secret = \"{CLIENT_SECRET}\""),
        format!("refresh_token_file = \"{}\"", file.display()),
    ];
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[account("alice", &dc, &user, IMAP, &source)]);
    let mut seen = vec![first];
    for round in 0..3 {
        let run = mp.run_async(&["sync"]).await;
        check_output(&idp, &run);
        assert_eq!(run.code(), 0, "round {round}: {}", run.stdout());
        assert_eq!(
            run.events("oauth_refresh_token_saved").len(),
            1,
            "round {round}"
        );
        let now = std::fs::read_to_string(&file).unwrap().trim().to_string();
        assert!(
            !seen.contains(&now),
            "round {round}: the rotated token is in the file"
        );
        seen.push(now);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "round {round}");
    }
    // only the file remains in its directory (no temporary left behind)
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(idp.token_requests().iter().all(|r| r.status == 200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_helper_command_provides_the_token() {
    use std::os::unix::fs::PermissionsExt;
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start_oauth(&idp);
    let user = dc.add_user("alice", "unused");
    dc.deliver(&user, &message("one", "x"));
    let dir = tempfile::tempdir().unwrap();
    let token = idp.access_token("alice");
    let helper = dir.path().join("helper.sh");
    std::fs::write(
        &helper,
        format!("#!/bin/sh\necho \"helper for $1: token {token}\" >&2\necho {token}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o700)).unwrap();
    let failing = dir.path().join("failing.sh");
    std::fs::write(&failing, "#!/bin/sh\necho 'no cached token' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (n, (via, program)) in [
        (IMAP, &helper),
        (
            Via {
                protocol: "pop3",
                mechanism: "oauthbearer",
                ..IMAP
            },
            &helper,
        ),
        (IMAP, &failing),
    ]
    .into_iter()
    .enumerate()
    {
        let db = TestDb::new().await;
        let source = vec![format!(
            "access_token_command = [\"{}\", \"alice\"]",
            program.display()
        )];
        let run = Mailpump::new(&db, &[account("alice", &dc, &user, via, &source)])
            .run_async(&["sync"])
            .await;
        check_output(&idp, &run);
        if n < 2 {
            assert_eq!(run.code(), 0, "#{n}: {}", run.stdout());
            assert_eq!(run.event("mailbox_synced")["stored"], 1);
            let stderr = run.event("oauth_token_command_stderr");
            assert_eq!(stderr["stderr"], "helper for alice: token ***");
        } else {
            assert_ne!(run.code(), 0);
            let out = run.stdout();
            assert!(
                out.contains("access_token_command") && out.contains("exit status: 3"),
                "{out}"
            );
            assert_eq!(
                run.event("oauth_token_command_stderr")["stderr"],
                "no cached token"
            );
        }
    }
    assert!(
        idp.token_requests().is_empty(),
        "the helper, not the endpoint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_each_oauth2_problem() {
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start_oauth(&idp);
    let user = dc.add_user("alice", "unused");
    let closed = crate::harness::dovecot::free_port();
    let good = idp.refresh_token("alice");
    let revoked = idp.refresh_token("alice");
    idp.revoke("alice");
    let good_for_refusal = idp.refresh_token("alice");
    let with = |lines: Vec<String>| account("alice", &dc, &user, IMAP, &lines);
    let cases: Vec<(&str, AccountSpec, &str)> = vec![
        (
            "unreachable",
            with(vec![
                format!("token_url = \"http://127.0.0.1:{closed}/token\""),
                format!("client_id = \"{CLIENT_ID}\""),
                format!("refresh_token = \"{good}\""),
            ]),
            "could not reach the token endpoint",
        ),
        (
            "invalid client",
            with(vec![
                format!("token_url = \"{}\"", idp.token_url()),
                format!("client_id = \"{CLIENT_ID}\""),
                "client_secret = \"wrong-secret\"".into(),
                format!("refresh_token = \"{good}\""),
            ]),
            "client_id and client_secret",
        ),
        (
            "invalid grant",
            with(endpoint(&idp, &revoked)),
            "get a new refresh token",
        ),
        (
            "refused token",
            with(endpoint(&idp, &good_for_refusal)),
            "the mail server refused the access token",
        ),
    ];
    for (label, spec, words) in cases {
        let db = TestDb::new().await;
        if label == "refused token" {
            idp.refuse_next(2);
        }
        let run = Mailpump::new(&db, &[spec]).run_async(&["check"]).await;
        check_output(&idp, &run);
        assert_ne!(run.code(), 0, "{label}");
        let out = run.stdout() + &run.stderr();
        assert!(
            out.contains("hint:") && out.contains(words),
            "{label}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mailpump_auth_gets_the_first_refresh_token_with_pkce() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let idp = Idp::start(Duration::from_secs(60)).await;
    let mut dc = Dovecot::start_oauth(&idp);
    let user = dc.add_user("alice", "unused");
    dc.deliver(&user, &message("one", "x"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("alice.refresh");
    let source = vec![
        format!("token_url = \"{}\"", idp.token_url()),
        format!("client_id = \"{CLIENT_ID}\""),
        format!("client_secret = \"{CLIENT_SECRET}\""),
        format!("refresh_token_file = \"{}\"", file.display()),
        "scope = \"mail offline_access\"".into(),
    ];
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[account("alice", &dc, &user, IMAP, &source)]);
    let authorize = format!("{}/authorize", idp.url);
    let mut cmd = tokio::process::Command::from(mp.command(&[
        "auth",
        "alice",
        "--authorize-url",
        &authorize,
    ]));
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(SOON, stdout.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("the authorization URL");
        if line.starts_with(&authorize) {
            break reqwest::Url::parse(&line).unwrap();
        }
    };
    let param = |k: &str| {
        url.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    assert_eq!(param("client_id"), CLIENT_ID);
    assert_eq!(param("response_type"), "code");
    assert_eq!(param("code_challenge_method"), "S256");
    assert_eq!(param("scope"), "mail offline_access");
    assert_eq!(param("redirect_uri"), "http://localhost");
    let code = idp.authorization_code("alice", &param("code_challenge"));
    let pasted = format!("http://localhost/?code={code}&state={}\n", param("state"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(pasted.as_bytes()).await.unwrap();
    drop(stdin);
    let mut rest = String::new();
    while let Some(line) = stdout.next_line().await.unwrap() {
        rest.push_str(&line);
        rest.push('\n');
    }
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{rest}{stderr}");
    assert!(rest.contains("written to"), "{rest}");
    assert_no_secrets(&idp.secrets(), &(rest + &stderr));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // the token it wrote logs in
    let run = mp.run_async(&["sync"]).await;
    check_output(&idp, &run);
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(run.event("mailbox_synced")["stored"], 1);
}
