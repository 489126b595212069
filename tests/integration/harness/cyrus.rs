//! A Cyrus IMAP for one test (3.6 from Debian's .debs, unpacked by deploy/services.sh: the
//! package conflicts with dovecot-imapd): its own temp dir and port, logins in a sasldb, stock
//! namespace (personal `INBOX.`, delimiter `.`), no NOTIFY; stopped by PID on drop.

use std::path::Path;

use super::dovecot::{free_port, services};
use super::rawimap::{server_dir, stop_pid, ImapServer};
use super::User;

pub struct Cyrus {
    pub dir: tempfile::TempDir,
    port: u16,
    pid: Option<u32>,
}

impl Cyrus {
    /// The stock Debian settings (`altnamespace: no`, `unixhierarchysep: no`).
    pub fn start() -> Cyrus {
        Self::start_with("")
    }

    /// `extra`: imapd.conf lines that replace the harness's defaults of the same names
    /// (`unixhierarchysep: yes` for `/` as the delimiter, `altnamespace: yes`, ...).
    pub fn start_with(extra: &str) -> Cyrus {
        let dir = server_dir("cy");
        let extra_file = dir.path().join("extra.conf");
        std::fs::write(&extra_file, extra).unwrap();
        let mut cyrus = Cyrus {
            dir,
            port: free_port(),
            pid: None,
        };
        cyrus.launch();
        cyrus
    }

    fn launch(&mut self) {
        let out = services(&[
            "cyrus-start",
            self.path().to_str().unwrap(),
            &self.port.to_string(),
            self.path().join("extra.conf").to_str().unwrap(),
        ]);
        self.pid = Some(
            out.trim()
                .parse()
                .expect("cyrus-start prints the master PID"),
        );
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn stop(&mut self) {
        if let Some(pid) = self.pid.take() {
            stop_pid(pid, self.port);
            let _ = std::fs::remove_file(self.path().join("run/master.pid"));
        }
    }
}

impl ImapServer for Cyrus {
    fn port(&self) -> u16 {
        self.port
    }

    /// A sasldb login; the INBOX is created at the first login. Cyrus keeps the mail of every
    /// user under its own uid: `uid` is 0 and `maildir` empty (there is no maildir).
    fn add_user(&mut self, name: &str, password: &str) -> User {
        services(&[
            "cyrus-add-user",
            self.path().to_str().unwrap(),
            name,
            password,
        ]);
        User {
            name: name.to_string(),
            password: password.to_string(),
            uid: 0,
            maildir: Default::default(),
        }
    }

    /// From Cyrus's own process table: `proc_path` (DIR/run/proc) holds one file per imapd
    /// serving a connection, `service\thost\tuser\tmailbox...`, the user filled in at login.
    fn connections(&self, user: &User) -> usize {
        let Ok(entries) = std::fs::read_dir(self.path().join("run/proc")) else {
            return 0;
        };
        entries
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .filter(|text| text.split('\t').nth(2) == Some(user.name.as_str()))
            .count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("master.log")).unwrap_or_default()
    }
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        self.stop();
    }
}
