//! The one integration test binary: the real `mailpump` binary against a real Dovecot (started
//! per test by `harness::Dovecot`; Cyrus and Courier in servers.rs) and a real MongoDB-protocol
//! server (`MAILPUMP_TEST_MONGODB_URI`, started by deploy/test.sh), plus the golden parse
//! fixtures.

mod harness;

mod cli;
mod cluster;
mod daemon;
mod export;
mod faults;
mod folders;
mod follow;
mod golden;
mod health;
mod hostile;
mod limits;
mod mirror;
mod oauth;
mod packaging;
mod pop3;
mod progress;
mod promises;
mod servers;
mod status;
mod sync;
mod transport;
mod verify;
