//! Test helpers: a Dovecot (or Cyrus, or Courier) per test, the database, the mailpump binary,
//! and log reading.

pub mod courier;
pub mod cyrus;
pub mod daemon;
pub mod dovecot;
pub mod idp;
pub mod mailpump;
pub mod mongo;
pub mod proxy;
pub mod rawimap;
pub mod reliability;
pub mod secantus;

pub use courier::Courier;
pub use cyrus::Cyrus;
pub use daemon::{eventually, Daemon};
pub use dovecot::{Dovecot, User};
pub use idp::Idp;
pub use mailpump::{AccountSpec, Mailpump};
pub use mongo::TestDb;
pub use rawimap::{ImapServer, RawImap};

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A simple RFC 5322 message with a unique Message-ID.
pub fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.com>\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\nMessage-ID: <{}@mailpump.test>\r\nDate: Mon, 1 Jun 2020 10:00:00 +0000\r\n\r\n{body}\r\n",
        unique_id()
    )
    .into_bytes()
}

pub fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
