//! The network layer both mail protocols stand on: TCP connect with timeouts and kernel
//! keepalive, TLS (implicit, or an upgrade after a plain-text go-ahead: IMAP STARTTLS, POP3
//! STLS), reads and writes under a deadline, and [`NetError`], whose wording the protocols
//! pass on unchanged ("connection refused by host:port", "timed out after ...").
//!
//! It knows nothing of IMAP or POP3: `imap` and `pop3` each build their protocol on a
//! [`Transport`] and wrap [`NetError`] in their own error type.
//!
//! **Invariant:** every await here has a deadline given by the caller (from config).

pub mod transport;

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

pub use transport::{tcp_connect, tls_handshake, upgrade, Transport};

use crate::error::ErrorClass;

/// A failure of the connection itself, whatever protocol runs on it.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("connection refused by {host}:{port}")]
    Refused { host: String, port: u16 },
    #[error("cannot connect to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: io::Error,
    },
    #[error("timed out after {}s waiting for {what}", after.as_secs_f32())]
    Timeout { what: String, after: Duration },
    #[error("TLS: {0}")]
    Tls(String),
    /// Bytes already read in plain text when the TLS upgrade was due: they would otherwise be
    /// taken as if they came over TLS (a command injection, CVE-2011-0411 and kin).
    #[error("protocol error: server sent data after {after} (possible injection)")]
    DataBeforeTls { after: &'static str },
    #[error("connection closed by the server")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
}

impl NetError {
    pub fn class(&self) -> ErrorClass {
        match self {
            // a certificate or TLS setup problem does not go away by reconnecting at once
            NetError::Tls(_) => ErrorClass::RetryLater,
            _ => ErrorClass::Retry,
        }
    }
}

/// Awaits an I/O operation under `after`: elapsed becomes [`NetError::Timeout`] waiting for
/// `what`, an I/O error [`NetError::Io`].
pub async fn within<T>(
    after: Duration,
    what: &str,
    op: impl Future<Output = io::Result<T>>,
) -> Result<T, NetError> {
    match tokio::time::timeout(after, op).await {
        Err(_) => Err(NetError::Timeout {
            what: what.to_string(),
            after,
        }),
        Ok(Err(e)) => Err(NetError::Io(e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Reads one line into `buf` (cleared first) under `after`, keeping its line ending, reading
/// at most `max` bytes: a line cut by `max` or by the end of the stream comes back without
/// `\n` (the caller decides what that means). Nothing at all before EOF is
/// [`NetError::Closed`].
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    after: Duration,
    what: &str,
) -> Result<(), NetError> {
    buf.clear();
    let mut limited = reader.take(max as u64);
    match within(after, what, limited.read_until(b'\n', buf)).await? {
        0 => Err(NetError::Closed),
        _ => Ok(()),
    }
}
