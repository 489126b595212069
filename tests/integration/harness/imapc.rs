//! A blocking IMAP client over a raw socket, for tests that change an account the way another
//! mail client would (CREATE, RENAME, DELETE, APPEND): the server's own notifications fire.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct ImapClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: u32,
}

fn quoted(wire: &str) -> String {
    format!("\"{}\"", wire.replace('\\', "\\\\").replace('"', "\\\""))
}

fn mailbox(name: &str) -> String {
    quoted(&mailpump::imap::utf7::encode_mailbox(name))
}

impl ImapClient {
    /// Connects to 127.0.0.1:`port` in plain text and logs in.
    pub fn login(port: u16, user: &str, password: &str) -> ImapClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut c = ImapClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            tag: 0,
        };
        let mut greeting = String::new();
        c.reader.read_line(&mut greeting).unwrap();
        assert!(greeting.starts_with("* OK"), "greeting {greeting:?}");
        c.ok(&format!("LOGIN {} {}", quoted(user), quoted(password)));
        c
    }

    /// Sends a command; returns its untagged lines and the tagged reply line.
    pub fn command(&mut self, command: &str) -> (Vec<String>, String) {
        self.tag += 1;
        let tag = format!("T{}", self.tag);
        write!(self.writer, "{tag} {command}\r\n").unwrap();
        self.writer.flush().unwrap();
        self.read_until(&tag)
    }

    fn read_until(&mut self, tag: &str) -> (Vec<String>, String) {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read");
            assert!(n > 0, "server closed the connection");
            if line.starts_with(&format!("{tag} ")) {
                return (lines, line.trim_end().to_string());
            }
            lines.push(line.trim_end().to_string());
        }
    }

    /// A command that must succeed.
    pub fn ok(&mut self, command: &str) -> Vec<String> {
        let (lines, done) = self.command(command);
        assert!(
            done.split(' ').nth(1) == Some("OK"),
            "{command} answered {done}"
        );
        lines
    }

    pub fn create(&mut self, name: &str) {
        self.ok(&format!("CREATE {}", mailbox(name)));
    }

    pub fn delete(&mut self, name: &str) {
        self.ok(&format!("DELETE {}", mailbox(name)));
    }

    pub fn rename(&mut self, from: &str, to: &str) {
        self.ok(&format!("RENAME {} {}", mailbox(from), mailbox(to)));
    }

    /// APPEND with a synchronizing literal.
    pub fn append(&mut self, name: &str, bytes: &[u8]) {
        self.tag += 1;
        let tag = format!("T{}", self.tag);
        write!(
            self.writer,
            "{tag} APPEND {} {{{}}}\r\n",
            mailbox(name),
            bytes.len()
        )
        .unwrap();
        self.writer.flush().unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.starts_with('+'), "APPEND continuation: {line:?}");
        self.writer.write_all(bytes).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
        self.writer.flush().unwrap();
        let (_, done) = self.read_until(&tag);
        assert!(done.contains(" OK"), "APPEND answered {done}");
    }
}

/// Established TCP connections whose local port is `port`, counted from the kernel's table:
/// the server's side of every client connection to it.
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
