//! A self-contained Dovecot for one test: its own temp dir, ports, users and uids; rendered
//! from tests/dovecot/dovecot.conf.in by deploy/services.sh; stopped by PID on drop.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::root;

static NEXT_UID: AtomicU32 = AtomicU32::new(0);
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port nobody listens on now and that no other test of this process was given.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = PORTS.lock().unwrap();
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub password: String,
    pub uid: u32,
    pub maildir: PathBuf,
}

pub struct Dovecot {
    pub dir: tempfile::TempDir,
    pub imap_port: u16,
    pub imaps_port: u16,
    pub pop3_port: u16,
    pub pop3s_port: u16,
    pid: Option<u32>,
    delivered: u64,
}

/// Runs deploy/services.sh with `args`; its stdout (a PID, for the start commands).
pub fn services(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(root().join("deploy/services.sh"))
        .args(args)
        .output()
        .expect("run deploy/services.sh");
    assert!(
        out.status.success(),
        "services.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An unprivileged uid of its own for a test user (inotify limits are per uid), unique within
/// this test process and, by the process id, apart from other test processes.
pub fn next_uid() -> u32 {
    20000 + (std::process::id() % 1000) * 100 + NEXT_UID.fetch_add(1, Ordering::Relaxed) % 100
}

impl Dovecot {
    pub fn start() -> Dovecot {
        Self::start_with("")
    }

    /// Starts Dovecot validating bearer tokens (XOAUTH2, OAUTHBEARER) with `idp`'s
    /// introspection endpoint; password logins go on as before.
    pub fn start_oauth(idp: &super::idp::Idp) -> Dovecot {
        Self::start_oauth_with(idp, "")
    }

    /// [`Dovecot::start_oauth`] with `extra` appended to the config.
    pub fn start_oauth_with(idp: &super::idp::Idp, extra: &str) -> Dovecot {
        Self::start_with_files(
            &format!("{}{extra}", super::idp::dovecot_extra(idp)),
            &[(
                "dovecot-oauth2.conf.ext",
                super::idp::dovecot_oauth2_conf(idp),
            )],
        )
    }

    /// Starts Dovecot with `extra` appended to the config (later settings win).
    pub fn start_with(extra: &str) -> Dovecot {
        Self::start_with_files(extra, &[])
    }

    /// [`Dovecot::start_with`], with `files` (name, text) written into its directory first,
    /// readable by Dovecot's auth process (root:dovecot 0640).
    pub fn start_with_files(extra: &str, files: &[(&str, String)]) -> Dovecot {
        // Under deploy/test.sh's work dir when it runs us, so that it can stop what we leave.
        let base = std::env::var_os("MAILPUMP_TEST_TMP")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let dir = tempfile::Builder::new()
            .prefix("dc")
            .tempdir_in(base)
            .unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let _ = Command::new("chgrp").arg("dovecot").arg(&path).status();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
        let extra_file = dir.path().join("extra.conf");
        std::fs::write(
            &extra_file,
            extra.replace("@DIR@", dir.path().to_str().unwrap()),
        )
        .unwrap();
        let (imap, imaps, pop3, pop3s) = (free_port(), free_port(), free_port(), free_port());
        let d = dir.path().to_str().unwrap().to_string();
        services(&[
            "dovecot-config",
            &d,
            &imap.to_string(),
            &imaps.to_string(),
            &pop3.to_string(),
            &pop3s.to_string(),
            extra_file.to_str().unwrap(),
        ]);
        let mut dc = Dovecot {
            dir,
            imap_port: imap,
            imaps_port: imaps,
            pop3_port: pop3,
            pop3s_port: pop3s,
            pid: None,
            delivered: 0,
        };
        dc.launch();
        dc
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.path().join("ca.pem")
    }

    fn launch(&mut self) {
        let pidfile = self.path().join("run/master.pid");
        let _ = std::fs::remove_file(&pidfile);
        // The daemon keeps whatever stdout/stderr it was given: never a pipe we would wait on.
        let errors = std::fs::File::create(self.path().join("start.err")).unwrap();
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(self.path().join("dovecot.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(errors)
            .status()
            .expect("run dovecot");
        assert!(
            status.success(),
            "dovecot failed to start: {}",
            std::fs::read_to_string(self.path().join("start.err")).unwrap_or_default()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&pidfile) {
                if let Ok(pid) = text.trim().parse() {
                    self.pid = Some(pid);
                }
            }
            if self.pid.is_some()
                && std::net::TcpStream::connect(("127.0.0.1", self.imap_port)).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dovecot did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Stops the master by PID and waits until it is gone (its children follow it).
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let pid = pid as i32;
            unsafe_kill(pid, 15);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            unsafe_kill(pid, 9);
            // the listeners close with the master; wait for the port to be free
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect(("127.0.0.1", self.imap_port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL to the master (its children notice and exit), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.pid.take() {
            // the children first (imap processes would keep serving their clients), then the master
            let _ = Command::new("pkill")
                .arg("-9")
                .arg("-P")
                .arg(pid.to_string())
                .status();
            unsafe_kill(pid as i32, 9);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the same Dovecot again (same ports, same mail).
    pub fn start_again(&mut self) {
        self.launch();
    }

    pub fn add_user(&mut self, name: &str, password: &str) -> User {
        let uid = next_uid();
        services(&[
            "add-user",
            self.path().to_str().unwrap(),
            name,
            password,
            &uid.to_string(),
        ]);
        User {
            name: name.to_string(),
            password: password.to_string(),
            uid,
            maildir: self.path().join("home").join(name).join("Maildir"),
        }
    }

    /// Open IMAP connections per user, as Dovecot counts them (`doveadm who`).
    pub fn connections(&self) -> std::collections::HashMap<String, usize> {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(self.path().join("dovecot.conf"))
            .args(["who", "-1"])
            .output()
            .expect("run doveadm who");
        let mut per_user = std::collections::HashMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 2 && cols[1] == "imap" {
                *per_user.entry(cols[0].to_string()).or_insert(0) += 1;
            }
        }
        per_user
    }

    /// Every message file in the user's INBOX (new/ and cur/).
    pub fn inbox_files(&self, user: &User) -> Vec<PathBuf> {
        ["new", "cur"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(user.maildir.join(d))
                    .unwrap()
                    .map(|e| e.unwrap().path())
            })
            .collect()
    }

    /// Delivers into INBOX the way a delivery agent does: tmp/, then rename into new/.
    pub fn deliver(&mut self, user: &User, bytes: &[u8]) {
        self.deliver_to(user, None, bytes, "", None);
    }

    /// Delivers into `folder` (None: INBOX) with maildir `flags` ("S" = \Seen) and an optional
    /// modification time (which Dovecot reports as INTERNALDATE).
    pub fn deliver_to(
        &mut self,
        user: &User,
        folder: Option<&str>,
        bytes: &[u8],
        flags: &str,
        mtime: Option<std::time::SystemTime>,
    ) {
        let base = match folder {
            None => user.maildir.clone(),
            Some(f) => user
                .maildir
                .join(format!(".{}", mailpump::imap::utf7::encode_mailbox(f))),
        };
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(base.join(sub)).unwrap();
            std::os::unix::fs::chown(base.join(sub), Some(user.uid), Some(65534)).unwrap();
        }
        std::os::unix::fs::chown(&base, Some(user.uid), Some(65534)).unwrap();
        self.delivered += 1;
        let name = format!(
            "{}.M{}P{}.mailpump",
            1_600_000_000 + self.delivered,
            self.delivered,
            std::process::id()
        );
        let tmp = base.join("tmp").join(&name);
        std::fs::write(&tmp, bytes).unwrap();
        std::os::unix::fs::chown(&tmp, Some(user.uid), Some(65534)).unwrap();
        if let Some(t) = mtime {
            let f = std::fs::File::options().write(true).open(&tmp).unwrap();
            f.set_modified(t).unwrap();
        }
        let dest = if flags.is_empty() {
            base.join("new").join(&name)
        } else {
            base.join("cur").join(format!("{name}:2,{flags}"))
        };
        std::fs::rename(&tmp, dest).unwrap();
    }

    /// Makes Dovecot forget the mailbox's UIDs: it assigns a new UIDVALIDITY on next access.
    pub fn reset_uidvalidity(&mut self, user: &User) {
        self.stop();
        for entry in std::fs::read_dir(&user.maildir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("dovecot-uidlist")
                || name.starts_with("dovecot.index")
                || name.starts_with("dovecot.list")
            {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        // UIDVALIDITY is the creation time in seconds: make sure it changes.
        std::thread::sleep(Duration::from_millis(1100));
        self.launch();
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .output();
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

impl super::rawimap::ImapServer for Dovecot {
    fn port(&self) -> u16 {
        self.imap_port
    }

    fn add_user(&mut self, name: &str, password: &str) -> User {
        Dovecot::add_user(self, name, password)
    }

    /// Counted from the kernel's table of TCP connections to Dovecot's port (Dovecot keeps
    /// no per-user process list here): every connection, whoever logged in.
    fn connections(&self, _user: &User) -> usize {
        super::rawimap::server_connections(self.imap_port)
    }

    fn log(&self) -> String {
        Dovecot::log(self)
    }
}
