//! Error classes shared by every I/O boundary: how the supervisor should react to a failure.

/// What a failure means for the task that hit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (network, server hiccup): reconnect with the normal backoff.
    Retry,
    /// The server refused us (credentials, throttling): back off long, never hammer.
    RetryLater,
    /// Nothing will change until the operator does something (configuration): stop the task.
    Fatal,
}

/// The text of a caught panic (`catch_unwind`), for logs and parse errors.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The guard of `m`, also when a panic elsewhere poisoned it: mailpump's std mutexes guard plain
/// values (counters, series, a cache, a timestamp) that a panic cannot leave half-written.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
