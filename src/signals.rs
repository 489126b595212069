//! Signals: SIGTERM/SIGINT become a shutdown (the cancellation token), a second one exits at
//! once; SIGHUP becomes a reload request.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Shutdown,
    Reload,
}

/// Exit code when a second signal cuts a graceful shutdown short (128 + SIGTERM).
pub const FORCED_EXIT: i32 = 143;

/// Spawns the listener. The first SIGTERM/SIGINT cancels `shutdown`; the second exits the
/// process at once (signal-hook removed the default action, so we must). SIGHUP is sent on
/// the returned channel. Must be called inside the runtime.
pub fn listen(shutdown: CancellationToken) -> std::io::Result<mpsc::UnboundedReceiver<Signal>> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => {
                    tracing::info!("reload_requested");
                    let _ = tx.send(Signal::Reload);
                }
                _ if shutdown.is_cancelled() => {
                    tracing::warn!(signal = sig, "forced_exit");
                    std::process::exit(FORCED_EXIT);
                }
                _ => {
                    tracing::info!(signal = sig, "shutdown");
                    let _ = tx.send(Signal::Shutdown);
                    shutdown.cancel();
                }
            }
        }
    });
    Ok(rx)
}
