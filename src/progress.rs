//! Progress of long work (a first `sync` of a big mailbox, an `export`, a daemon catch-up),
//! shown one of two ways, chosen once by `main`:
//! - **bars**: on a terminal with text logs, one indicatif bar per mailbox (count, total, rate,
//!   ETA) on stderr; text log lines are printed above the bars through [`LogWriter`] so the two
//!   never tear each other;
//! - **events**: everywhere else (JSON logs, systemd, Docker, pipes), a `progress` log event per
//!   running tracker every interval (10 s by default) with the same fields: `kind`, `account`,
//!   `mailbox`, `count`, `total`, `bytes`, `rate_per_s`, `eta_s`, `elapsed_s`. Work that ends
//!   within one interval logs no progress at all.
//!
//! A [`Tracker`] is cheap (two atomics) and does nothing visible until [`init`] has run, so
//! library users and unit tests need no setup. The registry is process-wide, like the tracing
//! subscriber it writes through.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::lock;

/// How often `progress` events are logged unless `--progress-interval` says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Live bars on stderr (a terminal).
    Bars,
    /// `progress` log events every `interval`.
    Events { interval: Duration },
}

struct Registry {
    mode: Mode,
    multi: MultiProgress,
    live: Mutex<Vec<Weak<State>>>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

struct State {
    kind: &'static str,
    account: String,
    mailbox: String,
    total: AtomicU64,
    count: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
}

/// One piece of work being counted. Dropping it ends it (its bar disappears).
pub struct Tracker {
    state: Arc<State>,
}

/// Chooses how progress is shown; call once, from `main`, before any tracker is made. Events
/// need a tokio runtime: the ticker is started by the first tracker made inside one.
pub fn init(mode: Mode) {
    let multi = match mode {
        Mode::Bars => MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
        Mode::Events { .. } => MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
    };
    let _ = REGISTRY.set(Registry {
        mode,
        multi,
        live: Mutex::new(Vec::new()),
    });
}

static TICKER: OnceLock<()> = OnceLock::new();

fn start_ticker(interval: Duration) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    TICKER.get_or_init(|| {
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                emit_events(interval);
            }
        });
    });
}

/// Logs one `progress` event for every tracker that has run for at least `interval`.
fn emit_events(interval: Duration) {
    let Some(reg) = REGISTRY.get() else { return };
    let live: Vec<Arc<State>> = {
        let mut list = lock(&reg.live);
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    };
    for s in live {
        if s.started.elapsed() >= interval {
            s.log("progress");
        }
    }
}

impl State {
    fn figures(&self) -> (u64, u64, u64, f64, Option<u64>, f64) {
        let count = self.count.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            count as f64 / elapsed
        } else {
            0.0
        };
        let eta = (rate > 0.0 && total >= count).then(|| ((total - count) as f64 / rate) as u64);
        (count, total, bytes, rate, eta, elapsed)
    }

    fn log(&self, event: &'static str) {
        let (count, total, bytes, rate, eta, elapsed) = self.figures();
        tracing::info!(
            kind = self.kind,
            account = %self.account,
            mailbox = %self.mailbox,
            count,
            total,
            bytes,
            rate_per_s = (rate * 10.0).round() / 10.0,
            eta_s = eta,
            elapsed_s = elapsed as u64,
            "{event}"
        );
    }
}

impl Tracker {
    /// Starts counting `kind` work ("sync", "export", "catch_up") on one mailbox.
    pub fn start(kind: &'static str, account: &str, mailbox: &str, total: u64) -> Tracker {
        let reg = REGISTRY.get();
        let bar = match reg {
            Some(r) if r.mode == Mode::Bars => {
                let bar = r.multi.add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:.bold} [{bar:30}] {pos}/{len} {rate} ETA {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .with_key(
                        "rate",
                        |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                            let _ = write!(w, "{:.0}/s", s.per_sec());
                        },
                    )
                    .progress_chars("=> "),
                );
                bar.set_prefix(format!("{account}/{mailbox}"));
                bar.enable_steady_tick(Duration::from_millis(200));
                Some(bar)
            }
            _ => None,
        };
        let state = Arc::new(State {
            kind,
            account: account.to_string(),
            mailbox: mailbox.to_string(),
            total: AtomicU64::new(total),
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            bar,
        });
        if let Some(r) = reg {
            if let Mode::Events { interval } = r.mode {
                lock(&r.live).push(Arc::downgrade(&state));
                start_ticker(interval);
            }
        }
        Tracker { state }
    }

    /// `n` more items done, `bytes` more bytes.
    pub fn inc(&self, n: u64, bytes: u64) {
        self.state.count.fetch_add(n, Ordering::Relaxed);
        self.state.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.state.bar {
            bar.inc(n);
        }
    }

    /// The total turned out different (messages expunged meanwhile, a count that grew).
    pub fn set_total(&self, total: u64) {
        self.state.total.store(total, Ordering::Relaxed);
        if let Some(bar) = &self.state.bar {
            bar.set_length(total);
        }
    }

    /// Items done so far.
    pub fn count(&self) -> u64 {
        self.state.count.load(Ordering::Relaxed)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if let Some(bar) = &self.state.bar {
            bar.finish_and_clear();
            if let Some(r) = REGISTRY.get() {
                r.multi.remove(bar);
            }
        }
    }
}

/// The log writer: each line goes to its stream (stdout or stderr), printed above the
/// progress bars when there are any, so log lines and bars never overwrite each other.
#[derive(Clone, Copy)]
pub struct LogWriter(pub crate::telemetry::LogTo);

impl LogWriter {
    fn put(&self, buf: &[u8]) -> std::io::Result<()> {
        match self.0 {
            crate::telemetry::LogTo::Stdout => std::io::stdout().lock().write_all(buf),
            crate::telemetry::LogTo::Stderr => std::io::stderr().lock().write_all(buf),
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match REGISTRY.get() {
            Some(r) if r.mode == Mode::Bars => r.multi.suspend(|| self.put(buf))?,
            _ => self.put(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.0 {
            crate::telemetry::LogTo::Stdout => std::io::stdout().flush(),
            crate::telemetry::LogTo::Stderr => std::io::stderr().flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_give_rate_and_eta() {
        let t = Tracker::start("sync", "a", "INBOX", 100);
        t.inc(10, 1000);
        assert_eq!(t.count(), 10);
        std::thread::sleep(Duration::from_millis(20));
        let (count, total, bytes, rate, eta, _) = t.state.figures();
        assert_eq!((count, total, bytes), (10, 100, 1000));
        assert!(rate > 0.0);
        assert!(eta.is_some());
        t.set_total(5); // fewer than done: no ETA rather than a negative one
        assert_eq!(t.state.figures().4, None);
    }
}
