//! A Courier IMAP for one test (5.0 from Debian's .debs, unpacked by deploy/services.sh: the
//! package conflicts with dovecot-imapd): couriertcpd + imaplogin + imapd with authdaemond's
//! userdb module, in their own mount and PID namespaces (Courier's paths are compiled in),
//! state in a temp dir, one uid per user, folders `INBOX.x`, no NOTIFY; stopped by PID on drop.

use std::path::Path;

use super::dovecot::{free_port, next_uid, services};
use super::rawimap::{server_dir, stop_pid, ImapServer};
use super::User;

pub struct Courier {
    pub dir: tempfile::TempDir,
    port: u16,
    pid: Option<u32>,
}

impl Courier {
    /// The stock Debian settings of /etc/courier/imapd, with IMAP_ENHANCEDIDLE=1 (IDLE pushes
    /// within about a second; the stock 0 polls every 60 s).
    pub fn start() -> Courier {
        Self::start_with("")
    }

    /// `extra`: shell lines appended to the imapd settings (later ones win), e.g.
    /// `IMAP_ENHANCEDIDLE=0` or an `IMAP_CAPABILITY=...` without IDLE.
    pub fn start_with(extra: &str) -> Courier {
        let dir = server_dir("co");
        std::fs::write(dir.path().join("extra.conf"), extra).unwrap();
        let mut courier = Courier {
            dir,
            port: free_port(),
            pid: None,
        };
        courier.launch();
        courier
    }

    fn launch(&mut self) {
        let out = services(&[
            "courier-start",
            self.path().to_str().unwrap(),
            &self.port.to_string(),
            self.path().join("extra.conf").to_str().unwrap(),
        ]);
        self.pid = Some(out.trim().parse().expect("courier-start prints a PID"));
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// SIGTERM to the namespace's first process: the kernel ends the rest with it.
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid.take() {
            stop_pid(pid, self.port);
            let _ = std::fs::remove_file(self.path().join("pid"));
        }
    }
}

impl ImapServer for Courier {
    fn port(&self) -> u16 {
        self.port
    }

    /// A userdb entry with its own unprivileged uid and ~/Maildir (INBOX).
    fn add_user(&mut self, name: &str, password: &str) -> User {
        let uid = next_uid();
        services(&[
            "courier-add-user",
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

    /// Courier runs one `imapd` process per logged-in connection, as the user's uid: those
    /// processes in this Courier's mount namespace (read from /proc).
    fn connections(&self, user: &User) -> usize {
        let Some(pid) = self.pid else { return 0 };
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            return 0;
        };
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return 0;
        };
        procs
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter(|e| std::fs::read_link(e.path().join("ns/mnt")).ok().as_ref() == Some(&ns))
            .filter(|e| {
                let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
                    return false;
                };
                let field = |key: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(key))
                        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                };
                field("Name:").as_deref() == Some("imapd")
                    && field("Uid:").as_deref() == Some(user.uid.to_string().as_str())
            })
            .count()
    }

    fn log(&self) -> String {
        ["courier.log", "imapd.log", "authdaemond.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.stop();
    }
}
