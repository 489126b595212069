//! A MongoDB-protocol server owned by one test (for tests that stop and restart the database),
//! started by deploy/services.sh and stopped by PID.

use std::process::Command;

use super::dovecot::free_port;
use super::root;

pub struct Secantus {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pid: Option<u32>,
}

impl Secantus {
    pub fn start() -> Secantus {
        let mut s = Secantus::not_started();
        s.launch();
        s
    }

    /// A database with its port chosen but not running yet: `launch` starts it there.
    pub fn not_started() -> Secantus {
        let base = std::env::var_os("MAILPUMP_TEST_TMP")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let dir = tempfile::Builder::new()
            .prefix("db")
            .tempdir_in(base)
            .unwrap();
        Secantus {
            dir,
            port: free_port(),
            pid: None,
        }
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    pub fn launch(&mut self) {
        let out = Command::new("bash")
            .arg(root().join("deploy/services.sh"))
            .args([
                "secantus-start",
                self.dir.path().to_str().unwrap(),
                &self.port.to_string(),
                "--sync-on-commit",
            ])
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "SecantusDB did not start");
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        // deploy/test.sh stops what a crashed test leaves behind by these files
        std::fs::write(self.dir.path().join("pid"), pid.to_string()).unwrap();
        self.pid = Some(pid);
    }

    /// Sends `signal` (`-STOP`, `-CONT`, ...) to the server, if it runs.
    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .arg(signal)
                .arg(pid.to_string())
                .status();
        }
    }

    /// SIGSTOP: the server keeps its connections and answers nothing (a stalled database, a
    /// host frozen by its hypervisor) until [`Secantus::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL, as a crash would (writes acknowledged with --sync-on-commit survive).
    pub fn kill9(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            let proc = format!("/proc/{pid}");
            while std::path::Path::new(&proc).exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    pub fn stop(&mut self) {
        self.resume();
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let proc = format!("/proc/{pid}");
            for _ in 0..200 {
                if !std::path::Path::new(&proc).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            if std::path::Path::new(&proc).exists() {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

impl Drop for Secantus {
    fn drop(&mut self) {
        self.stop();
    }
}
