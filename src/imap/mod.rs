//! IMAP: the only user of async-imap. Connects (plain, TLS, STARTTLS), logs in, and runs every
//! command through [`session::Session::command`], which requires the tagged OK and puts a
//! timeout on every read (async-imap's own helpers report success on EOF and swallow tagged
//! NO/BAD: see notes/crates.md).
//!
//! `sanitize` filters what imap-proto cannot parse but must ignore (unknown untagged responses).
//!
//! **Invariant:** any error leaves the session unusable: callers drop it and reconnect.

pub mod sanitize;
pub mod session;
pub mod transport;
pub mod utf7;

use std::time::Duration;

pub use session::{FetchedMessage, IdleEnd, MailboxInfo, Session};

use crate::error::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("connection refused by {host}:{port}")]
    Refused { host: String, port: u16 },
    #[error("cannot connect to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("timed out after {}s waiting for {what}", after.as_secs_f32())]
    Timeout { what: String, after: Duration },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server does not offer STARTTLS: refusing to continue in plain text (security = \"starttls\")")]
    NoStartTls,
    #[error("login rejected for {user}: {text}{hint}")]
    AuthRejected {
        user: String,
        text: String,
        hint: &'static str,
    },
    #[error("{command} failed: server said {status} {text}{hint}")]
    Rejected {
        command: String,
        status: &'static str,
        text: String,
        hint: &'static str,
    },
    #[error("server ended the session: {0}")]
    Bye(String),
    #[error("connection closed by the server")]
    Closed,
    #[error("connection closed by the server in the middle of a response")]
    ClosedMidResponse,
    #[error("I/O error: {0}")]
    Io(#[source] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the server sent a response mailpump cannot parse: {0}")]
    Unparseable(String),
}

impl ImapError {
    /// A read error from async-imap, named plainly where it can be.
    pub fn from_read(e: std::io::Error) -> ImapError {
        // async-imap reports EOF inside a response (a literal cut short) this way
        let text = e.to_string();
        if e.kind() == std::io::ErrorKind::UnexpectedEof
            || text.contains("bytes remaining in stream")
        {
            ImapError::ClosedMidResponse
        } else if let Some((_, quoted)) = text.split_once("during parsing of ") {
            // imap-proto's message carries the whole buffer as a byte list: keep the first line
            let line = quoted
                .trim_matches('"')
                .split("\\r\\n")
                .next()
                .unwrap_or("");
            let line: String = line.chars().take(120).collect();
            ImapError::Unparseable(line)
        } else if text.contains("incoming data too large") {
            ImapError::Protocol("the server announced a response larger than 512 MiB".into())
        } else {
            ImapError::Io(e)
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ImapError::AuthRejected { .. } | ImapError::NoStartTls => ErrorClass::RetryLater,
            ImapError::Tls(_) => ErrorClass::RetryLater,
            _ => ErrorClass::Retry,
        }
    }
}
