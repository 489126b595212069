//! Metrics and health: counters and per-mailbox series the mailbox tasks update, kept in a
//! `prometheus-client` registry and rendered as OpenMetrics text on `/metrics`, and the
//! `/healthz` verdict. Served by hyper (HTTP/1.1, one request per connection) on the
//! `[metrics] listen` address; the server starts before the database is reached, so the store
//! arrives later through a `watch` channel.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::lock;
use crate::store::{Store, StoreError};

/// Upper bounds (seconds) of the arrival-to-stored latency histogram.
const LATENCY_BUCKETS: &[f64] = &[0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
/// How long one HTTP exchange may take, from accept to the last byte written.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long /healthz waits for the database's ping: well inside HTTP_TIMEOUT, so that a
/// database that is down gets its 503 rather than a closed connection.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// What `/healthz` says before the store has answered once.
pub const WAITING_FOR_DATABASE: &str = "waiting for the database";
/// OpenMetrics 1.0 text, what prometheus-client writes (Prometheus negotiates it).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every state a mailbox task reports (`Metrics::state`, `Metrics::failure`), in its life's
/// order. `mailpump_mailbox_state` carries one series per state for every mailbox.
pub const STATES: &[&str] = &[
    "starting",
    "connecting",
    "syncing",
    "idle",
    "polling",
    "notify",
    "backoff",
];
/// The states in which a mailbox counts as up.
const UP_STATES: &[&str] = &["syncing", "idle", "polling", "notify"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailboxLabels {
    account: String,
    mailbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    account: String,
    mailbox: String,
    state: &'static str,
}

/// What `/healthz` needs that is no metric.
#[derive(Debug, Clone, Default)]
struct Health {
    failing_since: Option<SystemTime>,
    last_error: Option<String>,
}

pub struct Metrics {
    registry: Registry,
    messages_stored: Counter,
    bytes_fetched: Counter,
    reconnects: Counter,
    idle_cycles: Counter,
    flag_changes: Counter,
    expunges: Counter,
    /// `[cluster]`.
    pub leases_held: Gauge,
    pub leases_taken: Counter,
    pub leases_taken_over: Counter,
    pub leases_lost: Counter,
    pub leases_released: Counter,
    pub fencing_refusals: Counter,
    pub cluster_instances: Gauge,
    latency: Histogram,
    up: Family<MailboxLabels, Gauge>,
    state: Family<StateLabels, Gauge>,
    stored: Family<MailboxLabels, Counter>,
    last_success: Family<MailboxLabels, Gauge<f64, AtomicU64>>,
    quarantined: Family<MailboxLabels, Gauge>,
    /// Also the list of known mailboxes: a mailbox's series exist while it has an entry.
    health: Mutex<BTreeMap<(String, String), Health>>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn labels(account: &str, mailbox: &str) -> MailboxLabels {
    MailboxLabels {
        account: account.to_string(),
        mailbox: mailbox.to_string(),
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            messages_stored: Counter::default(),
            bytes_fetched: Counter::default(),
            reconnects: Counter::default(),
            idle_cycles: Counter::default(),
            flag_changes: Counter::default(),
            expunges: Counter::default(),
            leases_held: Gauge::default(),
            leases_taken: Counter::default(),
            leases_taken_over: Counter::default(),
            leases_lost: Counter::default(),
            leases_released: Counter::default(),
            fencing_refusals: Counter::default(),
            cluster_instances: Gauge::default(),
            latency: Histogram::new(LATENCY_BUCKETS.iter().copied()),
            up: Family::default(),
            state: Family::default(),
            stored: Family::default(),
            last_success: Family::default(),
            quarantined: Family::default(),
            health: Mutex::new(BTreeMap::new()),
        };
        let mut registry = Registry::default();
        // Counter names get their `_total` suffix from the encoder; help texts their full stop.
        registry.register(
            "mailpump_messages_stored",
            "Message documents inserted",
            m.messages_stored.clone(),
        );
        registry.register(
            "mailpump_bytes_fetched",
            "Raw message bytes fetched",
            m.bytes_fetched.clone(),
        );
        registry.register(
            "mailpump_reconnects",
            "Sessions that ended in an error",
            m.reconnects.clone(),
        );
        registry.register(
            "mailpump_idle_cycles",
            "IDLE commands completed",
            m.idle_cycles.clone(),
        );
        registry.register(
            "mailpump_flag_changes",
            "Stored documents whose flags were updated after a change on the server",
            m.flag_changes.clone(),
        );
        registry.register(
            "mailpump_expunges",
            "Stored documents marked expunged (or removed) after a deletion on the server",
            m.expunges.clone(),
        );
        registry.register(
            "mailpump_mailbox_up",
            "1 when the mailbox's session is healthy (syncing, idle or polling), else 0",
            m.up.clone(),
        );
        registry.register(
            "mailpump_mailbox_state",
            "The mailbox's state: 1 for the current one, 0 for every other state of the list",
            m.state.clone(),
        );
        registry.register(
            "mailpump_mailbox_messages_stored",
            "Documents inserted per mailbox",
            m.stored.clone(),
        );
        registry.register(
            "mailpump_mailbox_last_success_timestamp_seconds",
            "Last successful catch-up (Unix time)",
            m.last_success.clone(),
        );
        registry.register(
            "mailpump_quarantined",
            "UIDs in the mailbox's quarantine (failed again and again; retried on their own)",
            m.quarantined.clone(),
        );
        registry.register(
            "mailpump_leases_held",
            "[cluster] Mailbox leases this replica holds",
            m.leases_held.clone(),
        );
        registry.register(
            "mailpump_leases_taken",
            "[cluster] Leases this replica took (free, released or expired)",
            m.leases_taken.clone(),
        );
        registry.register(
            "mailpump_leases_taken_over",
            "[cluster] Leases this replica took after their holder let them expire",
            m.leases_taken_over.clone(),
        );
        registry.register(
            "mailpump_leases_lost",
            "[cluster] Leases this replica lost (taken over, or not renewed in time)",
            m.leases_lost.clone(),
        );
        registry.register(
            "mailpump_leases_released",
            "[cluster] Leases this replica gave back (rebalance, reload, shutdown)",
            m.leases_released.clone(),
        );
        registry.register(
            "mailpump_fencing_refusals",
            "[cluster] Writes refused because a newer lease sealed the mailbox",
            m.fencing_refusals.clone(),
        );
        registry.register(
            "mailpump_cluster_instances",
            "[cluster] Live replicas, as this replica last saw them",
            m.cluster_instances.clone(),
        );
        registry.register(
            "mailpump_arrival_to_stored_seconds",
            "INTERNALDATE to stored_at, for mail that arrived while running",
            m.latency.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Runs `f` on the mailbox's health, creating the mailbox (state `starting`, every series
    /// at zero) the first time it is seen.
    fn with_mailbox<R>(&self, account: &str, mailbox: &str, f: impl FnOnce(&mut Health) -> R) -> R {
        let mut map = lock(&self.health);
        let entry = map
            .entry((account.to_string(), mailbox.to_string()))
            .or_insert_with(|| {
                let l = labels(account, mailbox);
                let _ = self.stored.get_or_create(&l);
                let _ = self.quarantined.get_or_create(&l);
                self.set_state(account, mailbox, "starting");
                Health::default()
            });
        f(entry)
    }

    /// Sets the up gauge and the state set; the caller holds the health lock.
    fn set_state(&self, account: &str, mailbox: &str, state: &'static str) {
        debug_assert!(STATES.contains(&state), "unlisted state {state}");
        for s in STATES {
            self.state
                .get_or_create(&StateLabels {
                    account: account.to_string(),
                    mailbox: mailbox.to_string(),
                    state: s,
                })
                .set((*s == state) as i64);
        }
        self.up
            .get_or_create(&labels(account, mailbox))
            .set(UP_STATES.contains(&state) as i64);
    }

    pub fn state(&self, account: &str, mailbox: &str, state: &'static str) {
        self.with_mailbox(account, mailbox, |_| {
            self.set_state(account, mailbox, state)
        });
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
        self.messages_stored.inc_by(stored);
        self.bytes_fetched.inc_by(bytes);
        self.with_mailbox(account, mailbox, |h| {
            let l = labels(account, mailbox);
            self.stored.get_or_create(&l).inc_by(stored);
            self.last_success
                .get_or_create(&l)
                .set(unix(SystemTime::now()));
            h.failing_since = None;
            h.last_error = None;
        });
        for l in latencies {
            self.latency.observe(l.as_secs_f64());
        }
    }

    pub fn failure(&self, account: &str, mailbox: &str, error: &str) {
        self.reconnects.inc();
        self.with_mailbox(account, mailbox, |h| {
            self.set_state(account, mailbox, "backoff");
            h.failing_since.get_or_insert_with(SystemTime::now);
            h.last_error = Some(error.to_string());
        });
    }

    /// UIDs in the mailbox's quarantine after its latest pass.
    pub fn quarantined(&self, account: &str, mailbox: &str, n: u64) {
        self.with_mailbox(account, mailbox, |_| {
            self.quarantined
                .get_or_create(&labels(account, mailbox))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        });
    }

    /// A pass wrote `flags` flag changes and `expunged` expunges to stored documents.
    pub fn mirrored(&self, flags: u64, expunged: u64) {
        self.flag_changes.inc_by(flags);
        self.expunges.inc_by(expunged);
    }

    pub fn idle_cycle(&self) {
        self.idle_cycles.inc();
    }

    /// A mailbox left the config: its series go from every family.
    pub fn forget(&self, account: &str, mailbox: &str) {
        let mut map = lock(&self.health);
        map.remove(&(account.to_string(), mailbox.to_string()));
        let l = labels(account, mailbox);
        self.up.remove(&l);
        self.stored.remove(&l);
        self.last_success.remove(&l);
        self.quarantined.remove(&l);
        for state in STATES {
            self.state.remove(&StateLabels {
                account: account.to_string(),
                mailbox: mailbox.to_string(),
                state,
            });
        }
    }

    /// Mailboxes failing for longer than `window`, with their last error.
    pub fn failing_longer_than(&self, window: Duration) -> Vec<String> {
        let now = SystemTime::now();
        lock(&self.health)
            .iter()
            .filter_map(|((a, m), h)| {
                let since = h.failing_since?;
                (now.duration_since(since).unwrap_or_default() > window)
                    .then(|| format!("{a}/{m}: {}", h.last_error.clone().unwrap_or_default()))
            })
            .collect()
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would leave a partial text.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics_render_failed");
        }
        out
    }
}

/// What the HTTP handlers share.
struct Shared {
    metrics: Arc<Metrics>,
    store: watch::Receiver<Option<Store>>,
    unhealthy_after: Duration,
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET\n".to_string(),
        ));
    }
    let response = match request.uri().path() {
        "/metrics" => text(StatusCode::OK, OPENMETRICS, shared.metrics.render()),
        "/healthz" => {
            let store = shared.store.borrow().clone();
            let failing = shared.metrics.failing_longer_than(shared.unhealthy_after);
            let unavailable = StatusCode::SERVICE_UNAVAILABLE;
            match store {
                None => text(unavailable, PLAIN, format!("{WAITING_FOR_DATABASE}\n")),
                Some(store) => match tokio::time::timeout(PING_TIMEOUT, store.ping())
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Timeout {
                            what: "the ping".into(),
                            after: PING_TIMEOUT,
                        })
                    }) {
                    Err(e) => text(unavailable, PLAIN, format!("store unreachable: {e}\n")),
                    Ok(()) if failing.is_empty() => text(StatusCode::OK, PLAIN, "ok\n".into()),
                    Ok(()) => text(
                        unavailable,
                        PLAIN,
                        format!(
                            "failing for more than {}s:\n{}\n",
                            shared.unhealthy_after.as_secs(),
                            failing.join("\n")
                        ),
                    ),
                },
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "try /healthz or /metrics\n".to_string(),
        ),
    };
    Ok(response)
}

/// Serves `/healthz` and `/metrics` until `cancel` fires. `store` holds `None` until the
/// database has answered: `/healthz` says so with a 503.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: watch::Receiver<Option<Store>>,
    unhealthy_after: Duration,
    cancel: CancellationToken,
) {
    let shared = Arc::new(Shared {
        metrics,
        store,
        unhealthy_after,
    });
    loop {
        let (sock, _) = tokio::select! {
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
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request| handle(request, shared.clone()));
        // hyper answers a request it cannot parse with a 4xx itself and closes the connection.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HTTP_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(sock), service);
        tokio::spawn(async move {
            match tokio::time::timeout(HTTP_TIMEOUT, connection).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics_request_failed"),
                Err(_) => tracing::debug!("metrics_request_timed_out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` for metric `name` (any labels), as (labels, value).
    fn samples<'t>(text: &'t str, name: &str) -> Vec<(&'t str, &'t str)> {
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (labels, value) = match rest.strip_prefix('{') {
                    Some(r) => r.split_once("} ")?,
                    None => ("", rest.strip_prefix(' ')?),
                };
                Some((labels, value))
            })
            .collect()
    }

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
        assert!(
            text.contains("\nmailpump_messages_stored_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("\nmailpump_bytes_fetched_total 300\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nmailpump_mailbox_messages_stored_total{account=\"work\",mailbox=\"INBOX\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\nmailpump_mailbox_up{account=\"work\",mailbox=\"INBOX\"} 1\n"),
            "{text}"
        );
        let buckets = samples(&text, "mailpump_arrival_to_stored_seconds_bucket");
        let les: Vec<&str> = buckets.iter().map(|(l, _)| *l).collect();
        assert_eq!(les.len(), LATENCY_BUCKETS.len() + 1, "{text}");
        assert_eq!(les.last(), Some(&"le=\"+Inf\""));
        assert!(buckets.contains(&("le=\"0.75\"", "1")), "{text}");
        assert!(buckets.contains(&("le=\"30.0\"", "2")), "{text}");
        assert!(buckets.contains(&("le=\"0.5\"", "0")), "{text}");
        assert!(
            text.contains("\nmailpump_arrival_to_stored_seconds_count 2\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_state_is_present_and_only_the_current_one_is_one() {
        let m = Metrics::new();
        m.state("work", "INBOX", "connecting");
        let text = m.render();
        let states = samples(&text, "mailpump_mailbox_state");
        assert_eq!(states.len(), STATES.len(), "{text}");
        for s in STATES {
            let want = if *s == "connecting" { "1" } else { "0" };
            let labels = format!("account=\"work\",mailbox=\"INBOX\",state=\"{s}\"");
            assert!(states.contains(&(labels.as_str(), want)), "{s}: {text}");
        }
        assert_eq!(
            samples(&text, "mailpump_mailbox_up"),
            vec![("account=\"work\",mailbox=\"INBOX\"", "0")]
        );
        m.failure("work", "INBOX", "connection refused");
        let text = m.render();
        let states = samples(&text, "mailpump_mailbox_state");
        let ones: Vec<_> = states.iter().filter(|(_, v)| *v == "1").collect();
        assert_eq!(ones.len(), 1, "{text}");
        assert!(ones[0].0.ends_with("state=\"backoff\""), "{text}");
    }

    #[test]
    fn a_new_mailbox_starts_in_starting_with_zeroed_series() {
        let m = Metrics::new();
        m.quarantined("work", "Sent", 2);
        let text = m.render();
        assert!(
            text.contains(
                "mailpump_mailbox_state{account=\"work\",mailbox=\"Sent\",state=\"starting\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("mailpump_quarantined{account=\"work\",mailbox=\"Sent\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "mailpump_mailbox_messages_stored_total{account=\"work\",mailbox=\"Sent\"} 0"
            ),
            "{text}"
        );
    }

    #[test]
    fn forget_removes_the_mailbox_from_every_family() {
        let m = Metrics::new();
        for mailbox in ["INBOX", "Sent"] {
            m.success("work", mailbox, 1, 10, &[]);
            m.quarantined("work", mailbox, 1);
            m.state("work", mailbox, "idle");
        }
        m.failure("work", "INBOX", "boom");
        m.forget("work", "INBOX");
        let text = m.render();
        assert!(!text.contains("mailbox=\"INBOX\""), "{text}");
        for family in [
            "mailpump_mailbox_up{",
            "mailpump_mailbox_state{",
            "mailpump_mailbox_messages_stored_total{",
            "mailpump_mailbox_last_success_timestamp_seconds{",
            "mailpump_quarantined{",
        ] {
            assert!(
                text.contains(&format!("{family}account=\"work\",mailbox=\"Sent\"")),
                "{family} kept Sent: {text}"
            );
        }
        assert!(m.failing_longer_than(Duration::ZERO).is_empty());
        // the totals are process-wide: forgetting a mailbox does not rewind them
        assert!(
            text.contains("\nmailpump_messages_stored_total 2\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.state("work", "a\"b\\c", "idle");
        let text = m.render();
        assert!(
            text.contains("mailpump_mailbox_up{account=\"work\",mailbox=\"a\\\"b\\\\c\"} 1"),
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
