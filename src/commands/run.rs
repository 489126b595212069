//! `mailpump run`: the daemon. Signals (SIGTERM/SIGINT stop, SIGHUP reloads) feed the
//! supervisor, which keeps every mailbox live until shutdown.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{signals, supervisor};

/// Runs until SIGTERM/SIGINT; false only when the daemon could not start.
pub async fn run(path: &Path, config: Config) -> bool {
    let shutdown = CancellationToken::new();
    let signals = match signals::listen(shutdown.clone()) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "signal_setup_failed");
            return false;
        }
    };
    let (limits, budget) = (super::limits(&config), super::budget(&config));
    supervisor::run(path, config, limits, budget, shutdown, signals).await
}
