//! Telemetry: the tracing subscriber that writes one JSON object per line (or plain text for
//! people) to stdout. `--log-format auto` (the default) picks text when stdout is a terminal
//! and JSON otherwise, so systemd, Docker and pipes get JSON unchanged.
//!
//! **Invariant:** async-imap and imap-proto are capped at WARN whatever `RUST_LOG` says: at
//! TRACE they log the LOGIN command with its password and whole message bodies.

use tracing::level_filters::LevelFilter;
use tracing::Metadata;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterFn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

/// Where log lines go: stdout, or stderr for the commands whose stdout is their report
/// (`check`, `status --json`, `health`), so that a pipe gets the report alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    Stdout,
    Stderr,
}

impl LogTo {
    fn is_terminal(self) -> bool {
        match self {
            LogTo::Stdout => std::io::IsTerminal::is_terminal(&std::io::stdout()),
            LogTo::Stderr => std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

impl LogFormat {
    /// `Auto` settled by whether the log's stream is a terminal.
    pub fn resolve(self, to: LogTo) -> LogFormat {
        match self {
            LogFormat::Auto if to.is_terminal() => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            f => f,
        }
    }
}

/// Targets that may log secrets or message bodies at debug/trace.
const LEAKY_TARGETS: &[&str] = &["async_imap", "imap_proto", "mongodb::command"];

fn leaky_target_allowed(meta: &Metadata<'_>) -> bool {
    let leaky = LEAKY_TARGETS
        .iter()
        .any(|t| meta.target() == *t || meta.target().starts_with(&format!("{t}::")));
    !leaky || *meta.level() <= tracing::Level::WARN
}

/// The filter that keeps [`LEAKY_TARGETS`] below WARN out. It says how verbose the log can be
/// at most (`filter`'s most verbose level): without that hint the subscriber's is unknown, the
/// `log` bridge lets every `log::trace!` through to be dropped later, and async-imap's trace of
/// each decode attempt validates its whole buffer as UTF-8 first (about 6% of a backfill's CPU).
fn guard(filter: &EnvFilter) -> FilterFn<fn(&Metadata<'_>) -> bool> {
    let guard = filter_fn(leaky_target_allowed as fn(&Metadata<'_>) -> bool);
    match filter.max_level_hint() {
        Some(max) => guard.with_max_level_hint(max),
        None => guard,
    }
}

/// The filter: `RUST_LOG` when set, else `config_level`, else `info`.
fn env_filter(config_level: Option<&str>) -> EnvFilter {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| config_level.map(str::to_string))
        .unwrap_or_else(|| "info".to_string());
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse_lossy(directives)
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat, config_level: Option<&str>, to: LogTo) {
    let filter = env_filter(config_level);
    let guard = guard(&filter);
    let registry = tracing_subscriber::registry();
    match format.resolve(to) {
        LogFormat::Json | LogFormat::Auto => {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_target(false)
                .with_writer(crate::progress::LogWriter(to))
                .with_filter(filter)
                .with_filter(guard);
            let _ = registry.with(layer).try_init();
        }
        LogFormat::Text => {
            let layer = tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(to.is_terminal())
                .with_writer(crate::progress::LogWriter(to))
                .with_filter(filter)
                .with_filter(guard);
            let _ = registry.with(layer).try_init();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_imap_trace_is_never_let_through() {
        let meta_trace = tracing::Metadata::new(
            "x",
            "async_imap::client",
            tracing::Level::TRACE,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        );
        assert!(!leaky_target_allowed(&meta_trace));
    }

    /// The subscriber's most verbose level is the filter's: what the `log` bridge lets through
    /// (async-imap's per-read traces are never even formatted at the default level).
    #[test]
    fn the_log_bridge_is_told_the_most_verbose_level() {
        use tracing::Subscriber;
        for (level, want) in [
            (None, LevelFilter::INFO),
            (Some("debug"), LevelFilter::DEBUG),
            (Some("warn"), LevelFilter::WARN),
        ] {
            let filter = env_filter(level);
            let guard = guard(&filter);
            let subscriber = tracing_subscriber::registry().with(
                tracing_subscriber::fmt::layer()
                    .with_filter(filter)
                    .with_filter(guard),
            );
            assert_eq!(subscriber.max_level_hint(), Some(want), "{level:?}");
        }
    }

    struct Cs;
    impl tracing::callsite::Callsite for Cs {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unimplemented!()
        }
    }
    static CALLSITE: Cs = Cs;
}
