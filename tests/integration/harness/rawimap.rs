//! What the Cyrus and Courier harnesses share: a small blocking IMAP client over a raw
//! TcpStream (so that whatever a server does on APPEND or CREATE, its own notifications too,
//! happens as for any client), the [`ImapServer`] trait, and stopping a server by PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mailpump::imap::utf7::{mailbox_arg, quote};

use super::User;

/// One IMAP connection to 127.0.0.1:port, one command at a time.
pub struct RawImap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: u32,
    /// The server's greeting line.
    pub greeting: String,
}

impl RawImap {
    pub fn connect(port: u16) -> RawImap {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut imap = RawImap {
            reader: BufReader::new(stream),
            writer,
            tag: 0,
            greeting: String::new(),
        };
        imap.greeting = imap.read_line();
        assert!(
            imap.greeting.starts_with("* OK"),
            "greeting: {}",
            imap.greeting
        );
        imap
    }

    /// Connects and logs in with LOGIN.
    pub fn login(port: u16, user: &User) -> RawImap {
        let mut imap = Self::connect(port);
        imap.command(&format!(
            "LOGIN {} {}",
            quote(&user.name),
            quote(&user.password)
        ))
        .unwrap_or_else(|lines| panic!("LOGIN {} refused: {lines:?}", user.name));
        imap
    }

    /// One response line without its CRLF; a literal it announces is read into it.
    fn read_line(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = self.reader.read_until(b'\n', &mut line).unwrap();
            assert!(n > 0, "the server closed the connection");
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            out.extend_from_slice(&line);
            // `{n}` at the end: n bytes of literal follow, then the rest of the line
            let text = String::from_utf8_lossy(&line);
            let size = text
                .strip_suffix('}')
                .and_then(|t| t.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<usize>().ok());
            match size {
                Some(size) => {
                    let mut literal = vec![0; size];
                    self.reader.read_exact(&mut literal).unwrap();
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(&literal);
                }
                None => return String::from_utf8_lossy(&out).into_owned(),
            }
        }
    }

    fn next_tag(&mut self) -> String {
        self.tag += 1;
        format!("h{}", self.tag)
    }

    /// Reads up to the tagged response: every line, Ok when it is OK.
    fn finish(&mut self, tag: &str) -> Result<Vec<String>, Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line();
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                let ok = lines.last().unwrap()[tag.len() + 1..].starts_with("OK");
                return if ok { Ok(lines) } else { Err(lines) };
            }
        }
    }

    /// Sends `command` and returns every line up to its tagged response (Err unless OK).
    pub fn command(&mut self, command: &str) -> Result<Vec<String>, Vec<String>> {
        let tag = self.next_tag();
        self.writer
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .unwrap();
        self.finish(&tag)
    }

    /// CREATE of a UTF-8 name (full, with the server's prefix and delimiter), sent as
    /// modified UTF-7.
    pub fn create(&mut self, folder: &str) {
        self.command(&format!("CREATE {}", mailbox_arg(folder)))
            .unwrap_or_else(|lines| panic!("CREATE {folder}: {lines:?}"));
    }

    pub fn delete(&mut self, folder: &str) {
        self.command(&format!("DELETE {}", mailbox_arg(folder)))
            .unwrap_or_else(|lines| panic!("DELETE {folder}: {lines:?}"));
    }

    pub fn rename(&mut self, from: &str, to: &str) {
        self.command(&format!("RENAME {} {}", mailbox_arg(from), mailbox_arg(to)))
            .unwrap_or_else(|lines| panic!("RENAME {from} {to}: {lines:?}"));
    }

    /// APPEND with a synchronizing literal (Courier has no LITERAL+); the new message's UID
    /// when the server tells it (APPENDUID).
    pub fn append(&mut self, folder: &str, bytes: &[u8]) -> Option<u32> {
        let tag = self.next_tag();
        self.writer
            .write_all(
                format!(
                    "{tag} APPEND {} {{{}}}\r\n",
                    mailbox_arg(folder),
                    bytes.len()
                )
                .as_bytes(),
            )
            .unwrap();
        let go = self.read_line();
        assert!(go.starts_with('+'), "APPEND {folder}: {go}");
        self.writer.write_all(bytes).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
        let lines = self
            .finish(&tag)
            .unwrap_or_else(|lines| panic!("APPEND {folder}: {lines:?}"));
        let done = lines.last().unwrap();
        let (_, rest) = done.split_once("[APPENDUID ")?;
        rest.split([' ', ']']).nth(1)?.parse().ok()
    }

    /// The CAPABILITY list as the server gives it now.
    pub fn capabilities(&mut self) -> Vec<String> {
        let lines = self.command("CAPABILITY").unwrap();
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("* CAPABILITY "))
            .flat_map(|l| l.split(' ').map(str::to_string))
            .collect()
    }

    pub fn logout(mut self) {
        let _ = self.command("LOGOUT");
    }
}

/// Established TCP connections whose local port is `port`, from the kernel's table: the
/// server's side of every client connection to it (for Dovecot, which keeps no per-user list
/// a test can read).
pub fn server_connections(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // 01 = ESTABLISHED
            if local_port == Some(port) && *state == "01" {
                n += 1;
            }
        }
    }
    n
}

/// A real IMAP server started for one test. The folder helpers speak IMAP as `user`.
pub trait ImapServer {
    fn port(&self) -> u16;
    fn add_user(&mut self, name: &str, password: &str) -> User;
    /// Established IMAP connections logged in as `user`, counted on the server side.
    fn connections(&self, user: &User) -> usize;
    /// The server's own logs, for failure messages.
    fn log(&self) -> String;

    /// CREATE as `user`: the full UTF-8 name with the server's prefix and delimiter
    /// (`INBOX.Projects.2024`), sent as modified UTF-7.
    fn create_folder(&self, user: &User, name: &str) {
        let mut imap = RawImap::login(self.port(), user);
        imap.create(name);
        imap.logout();
    }

    /// IMAP APPEND as `user` over a raw connection; the UID when the server tells it.
    fn append(&self, user: &User, folder: &str, bytes: &[u8]) -> Option<u32> {
        let mut imap = RawImap::login(self.port(), user);
        let uid = imap.append(folder, bytes);
        imap.logout();
        uid
    }

    /// CAPABILITY after logging in as `user`.
    fn capabilities(&self, user: &User) -> Vec<String> {
        let mut imap = RawImap::login(self.port(), user);
        let caps = imap.capabilities();
        imap.logout();
        caps
    }
}

/// A temp dir for one server under deploy/test.sh's work dir (`MAILPUMP_TEST_TMP`), so that its
/// cleanup finds the PID file a test that died left there.
pub fn server_dir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("MAILPUMP_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap()
}

/// SIGTERM to `pid`, SIGKILL if it is still there after 10 s, then waits until nothing
/// listens on `port` any more.
pub fn stop_pid(pid: u32, port: u16) {
    let signal = |sig: &str| {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .output();
    };
    let gone = || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid);
    signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !gone() {
        signal("KILL");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
