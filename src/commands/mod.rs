//! The commands, one module each: `run` (the daemon), `sync`, `check`, `export`, `status`,
//! `verify`, `auth`, `health`.
//! `main` parses the command line, loads the config and calls one of them; each returns true
//! on success (exit 0) and false on failure (exit 1); `verify` returns its exit code (it also
//! has 64 for an unknown account or mailbox).

use std::time::Duration;

use crate::budget::Budget;
use crate::config::Config;
use crate::parse::Limits;

pub mod auth;
pub mod check;
pub mod export;
pub mod health;
pub mod run;
pub mod status;
pub mod sync;
pub mod verify;

/// How long LOGOUT may take after a successful pass.
pub(crate) const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// What is left of the 10 s promise for the store's own shutdown.
pub const STORE_SHUTDOWN: Duration = Duration::from_secs(2);

/// The parser's limits from `config`.
pub fn limits(config: &Config) -> Limits {
    Limits {
        max_inline_body: config.store.max_inline_body,
        inline_raw_max: config.store.inline_raw_max,
        ..Limits::default()
    }
}

/// The process-wide memory budget of `config`.
pub fn budget(config: &Config) -> Budget {
    Budget::new(config.limits.max_inflight_bytes)
}
