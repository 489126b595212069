//! Packaging that cannot run here (no systemd as PID 1, no Docker engine) is checked for what
//! can be checked: the unit verifies and has its hardening, the Dockerfile copies what exists,
//! the compose file parses with health checks and file secrets; sd_notify really is sent.

use std::time::Duration;

use crate::harness::{message, root, AccountSpec, Daemon, Dovecot, Mailpump, TestDb};

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

#[test]
fn the_systemd_unit_is_hardened_reads_the_config_itself_and_verifies() {
    let unit = read("systemd/mailpump.service");
    for directive in [
        "Type=notify",
        "Restart=on-failure",
        "ExecStartPre=/usr/local/bin/mailpump --config /etc/mailpump/mailpump.toml check --config-only",
        "ExecStart=/usr/local/bin/mailpump --config /etc/mailpump/mailpump.toml run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "User=mailpump",
        "Group=mailpump",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RemoveIPC=yes",
    ] {
        assert!(unit.contains(directive), "missing {directive}");
    }
    // a credential is copied once at start: SIGHUP would re-read a stale copy
    let directives: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    for stale in ["LoadCredential", "DynamicUser", "%d/"] {
        assert!(
            !directives.iter().any(|l| l.contains(stale)),
            "{stale} in the unit"
        );
    }
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(
        stop > mailpump::supervisor::GRACE_PERIOD.as_secs() + 2,
        "TimeoutStopSec above the grace period"
    );

    // deploy/services.sh install provides systemd-analyze (Debian package `systemd`)
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailpump.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/mailpump", env!("CARGO_BIN_EXE_mailpump")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (run deploy/services.sh install)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("mailpump.service"),
        "systemd-analyze verify: {text}"
    );
}

#[test]
fn the_sysusers_file_makes_a_system_user_and_group_without_login() {
    let root_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(root_dir.path().join("etc")).unwrap();
    let out = std::process::Command::new("systemd-sysusers")
        .arg(format!("--root={}", root_dir.path().display()))
        .arg(root().join("systemd/mailpump.sysusers"))
        .output()
        .expect("systemd-sysusers (run deploy/services.sh install)");
    assert!(
        out.status.success(),
        "systemd-sysusers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root_dir.path().join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("mailpump:"))
        .expect("a mailpump user");
    let fields: Vec<&str> = user.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system uid: {user}");
    assert!(fields[6].ends_with("nologin"), "no login shell: {user}");
    let group = std::fs::read_to_string(root_dir.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("mailpump:")), "{group}");
}

#[test]
fn the_dockerfile_copies_what_exists_and_ends_non_root() {
    for file in ["deploy/Dockerfile", "deploy/demo-dovecot.Dockerfile"] {
        let text = read(file);
        for line in text
            .lines()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        {
            let parts: Vec<&str> = line.split_whitespace().collect();
            for src in &parts[1..parts.len() - 1] {
                let pattern = src.trim_end_matches("/*.eml");
                assert!(
                    root().join(pattern).exists(),
                    "{file}: COPY source {src} does not exist"
                );
            }
        }
    }
    let text = read("deploy/Dockerfile");
    let final_stage = text.rsplit("FROM ").next().unwrap();
    assert!(final_stage.contains("RUN /usr/local/bin/mailpump --version"));
    let user = final_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the final stage");
    assert!(!user.starts_with('0') && user != "root");
}

#[test]
fn the_compose_file_has_health_checks_and_file_secrets() {
    let compose: serde_yaml::Value = serde_yaml::from_str(&read("deploy/compose.yaml")).unwrap();
    let services = &compose["services"];
    for name in ["mongo", "dovecot"] {
        assert!(
            services[name]["healthcheck"]["test"].is_sequence(),
            "{name} has a health check"
        );
    }
    let mp = &services["mailpump"];
    assert_eq!(mp["depends_on"]["mongo"]["condition"], "service_healthy");
    assert!(mp["secrets"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|s| s == "demo_password"));
    assert!(compose["secrets"]["demo_password"]["file"].is_string());
    let config = compose["configs"]["mailpump_config"]["content"]
        .as_str()
        .unwrap();
    assert!(
        config.contains("password_file = \"/run/secrets/demo_password\"")
            && !config.contains("password =")
    );
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("demo_password");
    std::fs::write(&secret, "demo\n").unwrap();
    mailpump::config::from_toml_str(
        &config.replace("/run/secrets/demo_password", secret.to_str().unwrap()),
    )
    .expect("the compose config is valid");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_tells_systemd_ready_watchdog_and_stopping() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("notify", "pw-notify");
    dc.deliver(&user, &message("x", "y"));
    let db = TestDb::new().await;
    let mp = Mailpump::new(&db, &[AccountSpec::plain("notify", &dc, &user)]);
    let (mut daemon, sock) = Daemon::start_notified(&mp);
    let sock = tokio::task::spawn_blocking(move || {
        let mut got = vec![sock.recv()];
        while got.iter().filter(|m| *m == "WATCHDOG=1").count() < 2
            || !got.iter().any(|m| m.starts_with("STATUS=running"))
        {
            got.push(sock.recv());
        }
        (sock, got)
    })
    .await
    .unwrap();
    let (sock, got) = sock;
    assert_eq!(got[0], "READY=1");
    assert!(
        got.contains(&"STATUS=running 1 mailboxes".to_string()),
        "{got:?}"
    );
    daemon.signal("TERM");
    let stopping = tokio::task::spawn_blocking(move || loop {
        let m = sock.recv();
        if m != "WATCHDOG=1" && !m.starts_with("STATUS=") {
            return m;
        }
    })
    .await
    .unwrap();
    assert_eq!(stopping, "STOPPING=1");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await.0, 0);
}
