//! mailpump: holds IMAP connections open to many mailboxes and stores every message, parsed
//! and raw, in MongoDB.
//!
//! # Layout (in reading order)
//! - [`config`]: figment layers -> raw config -> validated [`config::Config`]; secrets redacted.
//! - [`telemetry`]: the JSON / text log subscriber (async-imap's leaky TRACE output capped).
//! - [`signals`]: SIGTERM/SIGINT -> shutdown token, SIGHUP -> reload.
//! - [`supervisor`]: `mailpump run`: one task per mailbox, restarts, reload, shutdown deadline.
//! - [`cluster`]: `[cluster]`: replicas share the mailboxes through leases in MongoDB
//!   (heartbeats, shares, handover, fencing tokens).
//! - [`account`]: an account with folders beyond its watched ones: discovery, the shared
//!   connection (NOTIFY or a STATUS poll) that follows them, the watched folders' tasks.
//! - [`folders`]: which folders are synced and how each is followed (selectors); pure.
//! - [`mailbox`]: one mailbox's life: connect, catch up, IDLE or poll, reconnect with backoff.
//! - [`commands`]: one module per command (`run`, `sync`, `check`, `export`, `status`, ...).
//! - [`sync`]: IMAP's catch-up pass: open, quarantine retry, plan, then the pipeline.
//! - [`mirror`]: the pass's second job: flag changes and expunges of stored messages.
//! - [`verify`]: `mailpump verify`: server and store compared (pure `diff`), and repaired.
//! - [`pop3`]: the POP3 client (STLS, APOP, UIDL, dot-unstuffing) and its poll (`pop3::pass`).
//! - [`pipeline`]: fetch -> parse -> store for both protocols, fed by a `Source` and a `Commit`.
//! - [`imap`]: the only async-imap user: STARTTLS prologue, checked commands, IDLE.
//! - [`oauth`]: OAuth2 access tokens (refresh grant, token command, one cache per account) and SASL.
//! - [`net`]: TCP with keepalive, TLS, the STARTTLS/STLS upgrade, deadlines, `NetError`.
//! - [`parse`]: raw bytes -> [`parse::ParsedMessage`]; pure, panic-isolated.
//! - [`store`]: the only mongodb user: messages, blobs, mailboxes, the UIDL map, reads.
//! - [`progress`]: progress bars on a terminal, `progress` events elsewhere.
//! - [`budget`]: the process-wide budget of mail bytes in flight.
//! - [`backoff`]: capped exponential backoff with full jitter.
//! - [`metrics`]: counters, `/metrics` and `/healthz`.
//! - [`notify`]: systemd's sd_notify (READY, STOPPING, WATCHDOG).
//! - [`export`]: `mailpump export`: stored messages streamed back to files, names sanitized.
//! - [`sys`]: the process-level system calls (open files limit, peak RSS).
//! - [`error`]: error classes shared by the I/O boundaries.
//!
//! ARCHITECTURE.md at the repository root tells the data's path and the invariants;
//! docs/imap-servers.md and docs/crates.md the server and crate behaviours the code is built
//! around.

pub mod account;
pub mod backoff;
pub mod budget;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod error;
pub mod export;
pub mod folders;
pub mod imap;
pub mod mailbox;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod notify;
pub mod oauth;
pub mod parse;
pub mod pipeline;
pub mod pop3;
pub mod progress;
pub mod signals;
pub mod store;
pub mod supervisor;
pub mod sync;
pub mod sys;
pub mod telemetry;
pub mod verify;
