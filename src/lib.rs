//! mailpump: holds IMAP connections open to many mailboxes and stores every message, parsed
//! and raw, in MongoDB.
//!
//! # Layout (in reading order)
//! - [`config`]: figment layers -> raw config -> validated [`config::Config`]; secrets redacted.
//! - [`telemetry`]: the JSON / text log subscriber (async-imap's leaky TRACE output capped).
//! - [`signals`]: SIGTERM/SIGINT -> shutdown token, SIGHUP -> reload.
//! - [`supervisor`]: `mailpump run`: one task per mailbox, restarts, reload, shutdown deadline.
//! - [`mailbox`]: one mailbox's life: connect, catch up, IDLE or poll, reconnect with backoff.
//! - [`commands`]: `sync` and `check`, one task per mailbox; `status` from the database.
//! - [`sync`]: one mailbox's catch-up pass: fetch -> parse -> store pipeline.
//! - [`imap`]: the only async-imap user: transport (TLS, STARTTLS), checked commands.
//! - [`pop3`]: the POP3 client (STLS, APOP, UIDL, dot-unstuffing).
//! - [`parse`]: raw bytes -> [`parse::ParsedMessage`]; pure, panic-isolated.
//! - [`store`]: the only mongodb user: messages, blobs, mailboxes, the UIDL map, reads.
//! - [`budget`]: the process-wide budget of mail bytes in flight.
//! - [`backoff`]: capped exponential backoff with full jitter.
//! - [`metrics`]: counters, `/metrics` and `/healthz`.
//! - [`notify`]: systemd's sd_notify (READY, STOPPING, WATCHDOG).
//! - [`export`]: `mailpump export`: stored messages streamed back to files, names sanitized.
//! - [`error`]: error classes shared by the I/O boundaries.
//!
//! ARCHITECTURE.md at the repository root tells the data's path and the invariants.

pub mod backoff;
pub mod budget;
pub mod commands;
pub mod config;
pub mod error;
pub mod export;
pub mod imap;
pub mod mailbox;
pub mod metrics;
pub mod notify;
pub mod parse;
pub mod pop3;
pub mod signals;
pub mod store;
pub mod supervisor;
pub mod sync;
pub mod telemetry;
