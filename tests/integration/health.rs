//! `/metrics` and `/healthz` over real TCP, the start order under systemd (READY and the HTTP
//! server before the database), and the Docker HEALTHCHECK command against a running daemon.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::dovecot::free_port;
use crate::harness::secantus::Secantus;
use crate::harness::{eventually, message, root, AccountSpec, Daemon, Dovecot, Mailpump, TestDb};

const SOON: Duration = Duration::from_secs(30);

/// `mp`'s config with `[metrics] listen` on a free loopback port; returns the port.
fn with_metrics(mp: &Mailpump) -> u16 {
    let port = free_port();
    let toml = std::fs::read_to_string(&mp.config).unwrap();
    std::fs::write(
        &mp.config,
        format!("{toml}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    port
}

/// Sends `request` as is, reads until the server closes: (status code, headers, body).
async fn exchange(port: u16, request: &[u8]) -> std::io::Result<(u16, String, String)> {
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    sock.write_all(request).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    Ok((status, head.to_string(), body.to_string()))
}

async fn get(port: u16, path: &str) -> (u16, String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    exchange(port, request.as_bytes()).await.unwrap()
}

/// Polls `GET path` until the listener answers with `status`; returns the body.
async fn wait_status(port: u16, path: &str, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let last = match exchange(port, request.as_bytes()).await {
            Ok((s, _, body)) if s == status => return body,
            Ok((s, _, body)) => format!("{s} {body}"),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "{path} did not answer {status} within {within:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One sample of a text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the Prometheus / OpenMetrics text format strictly enough to catch a broken
/// exposition: HELP/TYPE before the samples of a family, valid names, quoted and escaped label
/// values, numeric values, `# EOF` last.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF:\n{text}");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(valid_name(name), "metric name {name:?} in {line:?}");
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&t),
                        "type in {line:?}"
                    );
                    assert!(types.insert(name.to_string(), t.to_string()).is_none());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample line");
        let name = &line[..name_end];
        assert!(valid_name(name), "sample name in {line:?}");
        let family = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE before {line:?}");
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let (key, after) = r.split_once("=\"").expect("label=\"value\"");
                assert!(valid_name(key), "label name {key:?} in {line:?}");
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next().expect("closing quote") {
                        (_, '\\') => match chars.next().expect("escape").1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => panic!("bad escape \\{c} in {line:?}"),
                        },
                        (i, '"') => break i,
                        (_, c) => value.push(c),
                    }
                };
                labels.insert(key.to_string(), value);
                r = &after[end + 1..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
            rest = r;
        }
        let value = rest.strip_prefix(' ').expect("a space before the value");
        let value = value.split(' ').next().unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

fn of_mailbox<'s>(samples: &'s [Sample], name: &str, account: &str) -> Vec<&'s Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && s.labels.get("account").map(String::as_str) == Some(account)
                && s.labels.get("mailbox").map(String::as_str) == Some("INBOX")
        })
        .collect()
}

/// The HEALTHCHECK of deploy/Dockerfile, run here with the test binary in place of the
/// image's: (exit code, stdout).
async fn docker_healthcheck(mp: &Mailpump) -> (i32, String) {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let healthcheck = &dockerfile[dockerfile.find("\nHEALTHCHECK ").expect("a HEALTHCHECK")..];
    let cmd = &healthcheck[healthcheck.find("CMD [").expect("an exec-form CMD") + 4..];
    let json = cmd.lines().next().unwrap();
    let argv: Vec<String> = serde_json::from_str(json).unwrap();
    let mut cmd = tokio::process::Command::new(
        argv[0].replace("/usr/local/bin/mailpump", env!("CARGO_BIN_EXE_mailpump")),
    );
    cmd.args(&argv[1..])
        .env("MAILPUMP_CONFIG", &mp.config)
        .env_remove("RUST_LOG");
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("the health check ends within 10 s")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_healthz_answer_over_tcp_and_survive_garbage() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("web", "pw-web");
    dc.deliver(&user, &message("hello", "metrics"));
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("web", &dc, &user)]);
    let port = with_metrics(&mp);
    let daemon = Daemon::start(&mp);
    daemon
        .wait_for_log(SOON, "watching", |l| {
            l.iter().any(|e| e["message"] == "watching")
        })
        .await;

    // the mailbox idles: up 1, and the state set has every state, idle the only 1
    let deadline = Instant::now() + SOON;
    let samples = loop {
        let (status, head, body) = get(port, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        let samples = parse_exposition(&body);
        if of_mailbox(&samples, "mailpump_mailbox_state", "web")
            .iter()
            .any(|x| x.labels["state"] == "idle" && x.value == 1.0)
        {
            break samples;
        }
        assert!(Instant::now() < deadline, "never idle:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let states = of_mailbox(&samples, "mailpump_mailbox_state", "web");
    let names: Vec<&str> = states.iter().map(|s| s.labels["state"].as_str()).collect();
    for state in mailpump::metrics::STATES {
        assert!(names.contains(state), "state {state} missing: {names:?}");
    }
    assert_eq!(states.len(), mailpump::metrics::STATES.len());
    assert_eq!(states.iter().filter(|s| s.value == 1.0).count(), 1);
    let up = of_mailbox(&samples, "mailpump_mailbox_up", "web");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].value, 1.0);
    assert!(!up[0].labels.contains_key("state"), "up has no state label");
    let stored = of_mailbox(&samples, "mailpump_mailbox_messages_stored_total", "web");
    assert_eq!(stored[0].value, 1.0);
    for name in [
        "mailpump_messages_stored_total",
        "mailpump_bytes_fetched_total",
        "mailpump_reconnects_total",
        "mailpump_idle_cycles_total",
        "mailpump_flag_changes_total",
        "mailpump_expunges_total",
        "mailpump_mailbox_last_success_timestamp_seconds",
        "mailpump_quarantined",
        "mailpump_arrival_to_stored_seconds_bucket",
        "mailpump_arrival_to_stored_seconds_sum",
        "mailpump_arrival_to_stored_seconds_count",
    ] {
        assert!(samples.iter().any(|s| s.name == name), "{name} missing");
    }

    let (status, _, body) = get(port, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, _) = get(port, "/no-such-page").await;
    assert_eq!(status, 404);

    // a TLS ClientHello and garbage: a 4xx, and the server keeps serving
    let (status, _, _) = exchange(port, b"\x16\x03\x01garbage\r\n\r\n")
        .await
        .unwrap();
    assert!((400..500).contains(&status), "garbage got {status}");
    let (status, _, _) = exchange(port, b"GET /healthz\r\n\r\n").await.unwrap();
    assert!((400..500).contains(&status), "HTTP/0.9 got {status}");
    // a client that connects and sends nothing holds up nobody
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (status, _, _) = get(port, "/healthz").await;
    assert_eq!(status, 200);

    let (code, out) = docker_healthcheck(&mp).await;
    assert_eq!(code, 0, "HEALTHCHECK: {out}");
    assert_eq!(out.trim(), "200 ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_database_down_the_daemon_is_ready_says_so_and_catches_up_once_it_is_up() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("late", "pw-late");
    dc.deliver(&user, &message("before the database", "x"));
    let mut server = Secantus::not_started();
    let db = TestDb::on(&server.uri()).await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("late", &dc, &user)]);
    let port = with_metrics(&mp);
    let mut daemon = Daemon::start(&mp);

    let body = wait_status(port, "/healthz", 503, SOON).await;
    assert_eq!(body, "waiting for the database\n");
    let (code, out) = docker_healthcheck(&mp).await;
    assert_ne!(code, 0, "HEALTHCHECK while waiting: {out}");
    assert_eq!(out.trim(), "503 waiting for the database");
    // /metrics works before the database too
    let (status, _, body) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    parse_exposition(&body);

    tokio::task::block_in_place(|| server.launch());
    wait_status(port, "/healthz", 200, Duration::from_secs(90)).await;
    eventually(SOON, "the message stored", || async {
        db.count("messages", bson::doc! {}).await == 1
    })
    .await;
    let (code, out) = docker_healthcheck(&mp).await;
    assert_eq!(code, 0, "HEALTHCHECK once connected: {out}");

    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await.0, 0);
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_the_database_the_daemon_pings_the_watchdog_and_stops_at_once_on_sigterm() {
    let free = free_port(); // nothing listens there
    let db = TestDb::on(&format!("mongodb://127.0.0.1:{free}")).await;
    let mp = Mailpump::new(
        &db,
        &[AccountSpec {
            name: "never".into(),
            port: free_port(),
            security: "plain",
            username: "u".into(),
            password: "pw-never-used".into(),
            extra: Vec::new(),
        }],
    );
    let port = with_metrics(&mp);
    let (mut daemon, sock) = Daemon::start_notified(&mp);
    let (sock, got) = tokio::task::spawn_blocking(move || {
        let mut got = vec![sock.recv()];
        while got.iter().filter(|m| *m == "WATCHDOG=1").count() < 3 {
            got.push(sock.recv());
        }
        (sock, got)
    })
    .await
    .unwrap();
    assert_eq!(got[0], "READY=1", "{got:?}");
    assert!(
        got.contains(&"STATUS=waiting for the database".to_string()),
        "{got:?}"
    );
    assert!(
        !got.iter().any(|m| m.starts_with("STATUS=running")),
        "{got:?}"
    );
    let body = wait_status(port, "/healthz", 503, SOON).await;
    assert_eq!(body, "waiting for the database\n");

    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, 0, "log:\n{}", daemon.raw_log());
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    let stopping = tokio::task::spawn_blocking(move || loop {
        let m = sock.recv();
        if m != "WATCHDOG=1" {
            return m;
        }
    })
    .await
    .unwrap();
    assert_eq!(stopping, "STOPPING=1");
    assert!(daemon.events("mailbox_started").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mailbox_removed_by_a_reload_leaves_no_series_behind() {
    let mut dc = Dovecot::start();
    let (a, b) = (
        dc.add_user("kept", "pw-kept"),
        dc.add_user("gone", "pw-gone"),
    );
    let db = TestDb::new().await;
    let both = Mailpump::new(
        &db,
        &[
            AccountSpec::plain("kept", &dc, &a),
            AccountSpec::plain("gone", &dc, &b),
        ],
    );
    let port = with_metrics(&both);
    let daemon = Daemon::start(&both);
    daemon
        .wait_for_log(SOON, "both watching", |l| {
            l.iter().filter(|e| e["message"] == "watching").count() == 2
        })
        .await;
    let (_, _, body) = get(port, "/metrics").await;
    let samples = parse_exposition(&body);
    assert_eq!(of_mailbox(&samples, "mailpump_mailbox_up", "gone").len(), 1);

    let one = Mailpump::new(&db, &[AccountSpec::plain("kept", &dc, &a)]);
    let toml = std::fs::read_to_string(&one.config).unwrap();
    std::fs::write(
        &both.config,
        format!("{toml}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    daemon.signal("HUP");
    daemon
        .wait_for_log(SOON, "reloaded", |l| {
            l.iter().any(|e| e["message"] == "reloaded")
        })
        .await;
    // the stopped task may report once more while it logs out: its series still go
    let deadline = Instant::now() + SOON;
    loop {
        let (_, _, body) = get(port, "/metrics").await;
        let samples = parse_exposition(&body);
        let gone = samples
            .iter()
            .any(|s| s.labels.get("account").map(String::as_str) == Some("gone"));
        if !gone && daemon.events("mailbox_stopping").len() == 1 {
            assert_eq!(
                of_mailbox(&samples, "mailpump_mailbox_up", "kept")[0].value,
                1.0
            );
            assert_eq!(
                of_mailbox(&samples, "mailpump_mailbox_state", "kept").len(),
                mailpump::metrics::STATES.len()
            );
            break;
        }
        assert!(Instant::now() < deadline, "gone's series stayed:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
