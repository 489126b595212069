//! Metrics and health: counters the mailbox tasks update, rendered as Prometheus text on
//! `/metrics`, and the `/healthz` verdict. Served by a small HTTP/1.1 responder on the
//! `[metrics] listen` address (loopback by default): two GET paths need no web framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Upper bounds (seconds) of the arrival-to-stored latency histogram.
const LATENCY_BUCKETS: &[f64] = &[0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
/// How long one HTTP exchange may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
struct MailboxHealth {
    state: &'static str,
    stored: u64,
    last_success: Option<SystemTime>,
    failing_since: Option<SystemTime>,
    last_error: Option<String>,
    quarantined: u64,
}

#[derive(Default)]
pub struct Metrics {
    messages_stored: AtomicU64,
    bytes_fetched: AtomicU64,
    reconnects: AtomicU64,
    idle_cycles: AtomicU64,
    latency: Mutex<(Vec<u64>, f64, u64)>,
    mailboxes: Mutex<BTreeMap<(String, String), MailboxHealth>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain counters).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn with_mailbox(&self, account: &str, mailbox: &str, f: impl FnOnce(&mut MailboxHealth)) {
        let mut map = lock(&self.mailboxes);
        let entry = map
            .entry((account.to_string(), mailbox.to_string()))
            .or_insert_with(|| MailboxHealth {
                state: "starting",
                ..Default::default()
            });
        f(entry);
    }

    pub fn state(&self, account: &str, mailbox: &str, state: &'static str) {
        self.with_mailbox(account, mailbox, |m| m.state = state);
    }

    /// A catch-up pass succeeded: `stored` documents, `bytes` fetched.
    pub fn success(
        &self,
        account: &str,
        mailbox: &str,
        stored: u64,
        bytes: u64,
        latencies: &[Duration],
    ) {
        self.messages_stored.fetch_add(stored, Ordering::Relaxed);
        self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
        self.with_mailbox(account, mailbox, |m| {
            m.stored += stored;
            m.last_success = Some(SystemTime::now());
            m.failing_since = None;
            m.last_error = None;
        });
        if !latencies.is_empty() {
            let mut h = lock(&self.latency);
            if h.0.is_empty() {
                h.0 = vec![0; LATENCY_BUCKETS.len()];
            }
            for l in latencies {
                let s = l.as_secs_f64();
                for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                    if s <= *bound {
                        h.0[i] += 1;
                    }
                }
                h.1 += s;
                h.2 += 1;
            }
        }
    }

    pub fn failure(&self, account: &str, mailbox: &str, error: &str) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        self.with_mailbox(account, mailbox, |m| {
            m.state = "backoff";
            m.failing_since.get_or_insert_with(SystemTime::now);
            m.last_error = Some(error.to_string());
        });
    }

    /// UIDs in the mailbox's quarantine after its latest pass.
    pub fn quarantined(&self, account: &str, mailbox: &str, n: u64) {
        self.with_mailbox(account, mailbox, |m| m.quarantined = n);
    }

    pub fn idle_cycle(&self) {
        self.idle_cycles.fetch_add(1, Ordering::Relaxed);
    }

    pub fn forget(&self, account: &str, mailbox: &str) {
        lock(&self.mailboxes).remove(&(account.to_string(), mailbox.to_string()));
    }

    /// Mailboxes failing for longer than `window`, with their last error.
    pub fn failing_longer_than(&self, window: Duration) -> Vec<String> {
        let now = SystemTime::now();
        lock(&self.mailboxes)
            .iter()
            .filter_map(|((a, m), h)| {
                let since = h.failing_since?;
                (now.duration_since(since).unwrap_or_default() > window)
                    .then(|| format!("{a}/{m}: {}", h.last_error.clone().unwrap_or_default()))
            })
            .collect()
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "mailpump_messages_stored_total",
            "Message documents inserted.",
            self.messages_stored.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mailpump_bytes_fetched_total",
            "Raw message bytes fetched.",
            self.bytes_fetched.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mailpump_reconnects_total",
            "Sessions that ended in an error.",
            self.reconnects.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mailpump_idle_cycles_total",
            "IDLE commands completed.",
            self.idle_cycles.load(Ordering::Relaxed),
        );
        let map = lock(&self.mailboxes);
        let _ = writeln!(out, "# HELP mailpump_mailbox_up 1 when the mailbox's session is healthy.\n# TYPE mailpump_mailbox_up gauge");
        for ((a, m), h) in map.iter() {
            let up = matches!(h.state, "idle" | "polling" | "syncing") as u8;
            let _ = writeln!(
                out,
                "mailpump_mailbox_up{{account=\"{}\",mailbox=\"{}\",state=\"{}\"}} {up}",
                esc(a),
                esc(m),
                h.state
            );
        }
        let _ = writeln!(out, "# HELP mailpump_mailbox_messages_stored_total Documents inserted per mailbox.\n# TYPE mailpump_mailbox_messages_stored_total counter");
        for ((a, m), h) in map.iter() {
            let _ = writeln!(
                out,
                "mailpump_mailbox_messages_stored_total{{account=\"{}\",mailbox=\"{}\"}} {}",
                esc(a),
                esc(m),
                h.stored
            );
        }
        let _ = writeln!(out, "# HELP mailpump_mailbox_last_success_timestamp_seconds Last successful catch-up.\n# TYPE mailpump_mailbox_last_success_timestamp_seconds gauge");
        for ((a, m), h) in map.iter() {
            if let Some(t) = h.last_success {
                let _ = writeln!(out, "mailpump_mailbox_last_success_timestamp_seconds{{account=\"{}\",mailbox=\"{}\"}} {:.3}", esc(a), esc(m), unix(t));
            }
        }
        let _ = writeln!(out, "# HELP mailpump_quarantined UIDs in the mailbox's quarantine (failed again and again; retried on their own).\n# TYPE mailpump_quarantined gauge");
        for ((a, m), h) in map.iter() {
            let _ = writeln!(
                out,
                "mailpump_quarantined{{account=\"{}\",mailbox=\"{}\"}} {}",
                esc(a),
                esc(m),
                h.quarantined
            );
        }
        drop(map);
        let h = lock(&self.latency);
        let _ = writeln!(out, "# HELP mailpump_arrival_to_stored_seconds INTERNALDATE to stored_at, for mail that arrived while running.\n# TYPE mailpump_arrival_to_stored_seconds histogram");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "mailpump_arrival_to_stored_seconds_bucket{{le=\"{bound}\"}} {}",
                h.0.get(i).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(out, "mailpump_arrival_to_stored_seconds_bucket{{le=\"+Inf\"}} {}\nmailpump_arrival_to_stored_seconds_sum {:.3}\nmailpump_arrival_to_stored_seconds_count {}", h.2, h.1, h.2);
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `/healthz` and `/metrics` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    unhealthy_after: Duration,
    cancel: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics_accept_failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (metrics, store) = (metrics.clone(), store.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(HTTP_TIMEOUT, async {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    let read = sock.read(&mut buf[n..]).await?;
                    if read == 0 {
                        break;
                    }
                    n += read;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", metrics.render()),
                    "/healthz" => {
                        let failing = metrics.failing_longer_than(unhealthy_after);
                        match store.ping().await {
                            Err(e) => ("503 Service Unavailable", format!("store unreachable: {e}\n")),
                            Ok(()) if failing.is_empty() => ("200 OK", "ok\n".to_string()),
                            Ok(()) => ("503 Service Unavailable", format!("failing for more than {}s:\n{}\n", unhealthy_after.as_secs(), failing.join("\n"))),
                        }
                    }
                    _ => ("404 Not Found", "try /healthz or /metrics\n".to_string()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(response.as_bytes()).await?;
                sock.shutdown().await
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_and_histogram() {
        let m = Metrics::new();
        m.success(
            "work",
            "INBOX",
            3,
            300,
            &[Duration::from_millis(600), Duration::from_secs(20)],
        );
        m.state("work", "INBOX", "idle");
        let text = m.render();
        assert!(text.contains("mailpump_messages_stored_total 3"), "{text}");
        assert!(
            text.contains(
                "mailpump_mailbox_up{account=\"work\",mailbox=\"INBOX\",state=\"idle\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("mailpump_arrival_to_stored_seconds_bucket{le=\"0.75\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mailpump_arrival_to_stored_seconds_bucket{le=\"30\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mailpump_arrival_to_stored_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn a_mailbox_failing_past_the_window_is_reported_until_it_recovers() {
        let m = Metrics::new();
        m.failure("work", "INBOX", "connection refused by h:1");
        assert!(m.failing_longer_than(Duration::from_secs(3600)).is_empty());
        let failing = m.failing_longer_than(Duration::ZERO);
        assert_eq!(failing.len(), 1);
        assert!(failing[0].contains("connection refused"));
        m.success("work", "INBOX", 0, 0, &[]);
        assert!(m.failing_longer_than(Duration::ZERO).is_empty());
    }
}
