//! `mailpump run` as a child process: logs to a file we can read while it runs, signals by PID,
//! killed on drop.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::mailpump::{parse_logs, Mailpump};

pub struct Daemon {
    child: Option<Child>,
    log: std::path::PathBuf,
    secrets: Vec<String>,
    pidfile: Option<std::path::PathBuf>,
}

/// Leaves the daemon's PID under `$MAILPUMP_TEST_TMP/daemons/` for as long as it runs, so that
/// deploy/test.sh can stop it by PID when the test binary itself was killed (its watchdog does
/// that when the database stops answering) and no Drop ran.
fn record_pid(pid: u32) -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(&std::env::var_os("MAILPUMP_TEST_TMP")?).join("daemons");
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(pid.to_string());
    std::fs::write(&path, pid.to_string()).ok()?;
    Some(path)
}

/// The test standing in for systemd: the socket a daemon started by [`Daemon::start_notified`]
/// sends its sd_notify messages to.
pub struct Notifications(std::os::unix::net::UnixDatagram);

impl Notifications {
    /// The next message (blocking, 20 s at most: call from spawn_blocking).
    pub fn recv(&self) -> String {
        let mut buf = [0u8; 256];
        let n = self.0.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    }
}

impl Daemon {
    /// Starts the daemon with `NOTIFY_SOCKET` pointing at a socket of the test's and a 400 ms
    /// `WATCHDOG_USEC`, as systemd's `Type=notify` with `WatchdogSec=` would.
    pub fn start_notified(mp: &Mailpump) -> (Daemon, Notifications) {
        let path = mp.dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let daemon = Daemon::start_with_env(
            mp,
            &[
                ("NOTIFY_SOCKET", path.to_str().unwrap()),
                ("WATCHDOG_USEC", "400000"),
            ],
        );
        (daemon, Notifications(sock))
    }

    pub fn start(mp: &Mailpump) -> Daemon {
        Self::start_with_env(mp, &[])
    }

    pub fn start_with_env(mp: &Mailpump, env: &[(&str, &str)]) -> Daemon {
        let log = mp
            .dir
            .path()
            .join(format!("run-{}.log", super::unique_id()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = mp.command(&["run"]);
        cmd.stdout(file)
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start mailpump run");
        let pidfile = record_pid(child.id());
        Daemon {
            child: Some(child),
            log,
            secrets: mp.secrets(),
            pidfile,
        }
    }

    /// The daemon has exited: its PID file goes ([`record_pid`]).
    fn forget_pid(&mut self) {
        if let Some(p) = self.pidfile.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> Vec<Value> {
        parse_logs(&std::fs::read(&self.log).unwrap_or_default())
    }

    pub fn events(&self, message: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"] == message)
            .collect()
    }

    pub fn raw_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `check` holds on the logs, or panics with them after `within`.
    pub async fn wait_for_log(
        &self,
        within: Duration,
        what: &str,
        check: impl Fn(&[Value]) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            if check(&self.logs()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.raw_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit; returns the exit code and how long it took.
    pub async fn wait_exit(&mut self, within: Duration) -> (i32, Duration) {
        let started = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                self.forget_pid();
                return (status.code().unwrap_or(-1), started.elapsed());
            }
            assert!(
                started.elapsed() < within,
                "mailpump did not exit within {within:?}; log:\n{}",
                self.raw_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // every daemon's whole log goes through the secret check (unless the test already failed)
        if !std::thread::panicking() {
            super::mailpump::assert_no_secrets(&self.secrets, &self.raw_log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.forget_pid();
    }
}

/// Polls `check` until it returns true, or panics after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
