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
