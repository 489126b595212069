//! IMAP: the only user of async-imap. Connects over [`crate::net`] (plain, TLS, or STARTTLS via
//! `starttls`), logs in, and runs every command through [`session::Session::command`], which
//! requires the tagged OK and puts a timeout on every read (async-imap's own helpers report
//! success on EOF and swallow tagged NO/BAD: docs/imap-servers.md lists what they hide).
//!
//! `sanitize` filters what imap-proto cannot parse but must ignore (unknown untagged responses).
//!
//! **Invariant:** any error leaves the session unusable: callers drop it and reconnect.

pub mod changes;
pub mod inventory;
pub mod listing;
pub mod sanitize;
pub mod session;
pub mod starttls;
pub mod utf7;

pub use changes::Changes;
pub use inventory::ServerMeta;
pub use listing::{ListEntry, Listing, Namespace, StatusEntry};
pub use session::{IdleEnd, MailboxInfo, Session, WaitEnd};

use crate::error::ErrorClass;
use crate::net::NetError;

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// Connecting, TLS, timeouts, a closed connection: [`crate::net`]'s errors and wording.
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("server does not offer STARTTLS: refusing to continue in plain text (security = \"starttls\")")]
    NoStartTls,
    #[error("the server does not offer AUTH={mechanism} (it offers: {offered}): set mechanism in [oauth2] to one it offers, or check host and port")]
    MechanismNotOffered {
        mechanism: &'static str,
        offered: String,
    },
    /// No OAuth2 access token (token endpoint, token command).
    #[error(transparent)]
    OAuth(#[from] crate::oauth::TokenError),
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
    #[error("connection closed by the server in the middle of a response")]
    ClosedMidResponse,
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
            NetError::Io(e).into()
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ImapError::Net(e) => e.class(),
            ImapError::OAuth(e) => e.class(),
            ImapError::MechanismNotOffered { .. } => ErrorClass::RetryLater,
            ImapError::AuthRejected { .. } | ImapError::NoStartTls => ErrorClass::RetryLater,
            _ => ErrorClass::Retry,
        }
    }
}

/// The flags of a message as stored: the server's, without `\Recent`, which belongs to one
/// session and not to the message (kept, it would flip on every message the moment another
/// client opens the folder, and stay wrong where no MODSEQ records its going).
pub fn message_flags<'a, 'b: 'a>(
    flags: impl IntoIterator<Item = &'a std::borrow::Cow<'b, str>>,
) -> Vec<String> {
    flags
        .into_iter()
        .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
        .map(|f| f.to_string())
        .collect()
}
