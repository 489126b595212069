//! The supervisor of `mailpump run`: one named task per configured mailbox, restarted with
//! backoff if it panics, stopped on shutdown within a deadline; SIGHUP re-reads the config and
//! starts, stops or restarts only the mailboxes whose configuration changed.
//!
//! With `[cluster]`, a unit runs only while this replica holds its lease: the
//! [`crate::cluster`] coordinator says which to start (with the lease token their store handle
//! carries) and which to stop, and hears back when a unit's task has ended.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::account::AccountTask;
use crate::backoff::{Backoff, BackoffPolicy};
use crate::budget::Budget;
use crate::cluster::{self, Command, Event};
use crate::config::{self, Account, Config};
use crate::error::ErrorClass;
use crate::mailbox::{Exit, MailboxTask};
use crate::metrics::{self, Metrics};
use crate::notify;
use crate::parse::Limits;
use crate::pipeline::Context;
use crate::signals::Signal;
use crate::store::Store;

/// How long running batches may take to finish after SIGTERM (README, "Signals", promises exit
/// within 10 s; systemd's TimeoutStopSec sits above it).
pub const GRACE_PERIOD: Duration = Duration::from_secs(7);

type Key = (String, String);

struct Running {
    account: Account,
    cancel: CancellationToken,
    generation: u64,
}

struct Supervisor {
    store: Store,
    metrics: Arc<Metrics>,
    limits: Limits,
    budget: Budget,
    policy: BackoffPolicy,
    shutdown: CancellationToken,
    running: HashMap<Key, Running>,
    /// Mailboxes whose old task was asked to stop and has not ended yet (its generation).
    stopping: HashMap<Key, u64>,
    /// What to start once that old task has ended: never two sessions on one mailbox.
    waiting: HashMap<Key, Account>,
    /// One store scope per mailbox for the whole run, so that a restarted task settles the
    /// writes its predecessor left running.
    scopes: HashMap<Key, Store>,
    /// Each task ends with its key, generation and lease token (`[cluster]`) and how it ended.
    tasks: JoinSet<(Key, u64, Option<i64>, Exit)>,
    /// Mailboxes whose task stopped for good (a fatal error): their series and /healthz entry
    /// stay until a reload removes the mailbox (or restarts it).
    ended: std::collections::HashSet<Key>,
    generation: u64,
    /// What the config asks for now (with `[cluster]`, only the held units of it run).
    want: HashMap<Key, Account>,
    /// `[cluster]`: the coordinator's events, and the lease token of every held unit.
    cluster: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
    tokens: HashMap<Key, i64>,
    /// How long a passed fence check spares the next one (a quarter of the TTL, at most 1 s).
    gate_fresh: Duration,
    /// Units the coordinator asked to stop, with the token it named, until they ended.
    stop_asked: HashMap<Key, i64>,
}

/// Runs a mailbox task (a fresh future from `run` each time), restarting it with backoff if it
/// panics: a panic in one mailbox never reaches another.
pub(crate) async fn supervised<F, Fut>(
    name: &str,
    mailbox: &str,
    policy: BackoffPolicy,
    cancel: CancellationToken,
    mut run: F,
) -> Exit
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Exit>,
{
    let mut backoff = Backoff::new(policy);
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        match AssertUnwindSafe(run()).catch_unwind().await {
            Ok(exit) => return exit,
            Err(panic) => {
                let why = crate::error::panic_message(panic.as_ref());
                let delay = backoff.next_delay(ErrorClass::Retry, &mut rng);
                tracing::error!(account = name, mailbox, error = %why, delay_ms = delay.as_millis() as u64, "mailbox_task_panicked");
                tokio::select! {
                    _ = cancel.cancelled() => return Exit::Cancelled,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The key of an account run by one [`AccountTask`] (folder sync) instead of one task per
/// named mailbox: no folder can be called that (`*` is LIST's wildcard).
pub const ACCOUNT_UNIT: &str = "*";

/// What runs: one task per mailbox of a fixed account (every folder named and watched, see
/// [`crate::folders::Selection::fixed`]), one [`AccountTask`] per other account.
fn desired(config: &Config) -> HashMap<Key, Account> {
    let mut out = HashMap::new();
    for account in &config.accounts {
        match crate::folders::fixed_mailboxes(account) {
            Some(names) => {
                for mailbox in names {
                    out.insert((account.name.clone(), mailbox), account.clone());
                }
            }
            None => {
                out.insert(
                    (account.name.clone(), ACCOUNT_UNIT.to_string()),
                    account.clone(),
                );
            }
        }
    }
    out
}

/// What runs under one key: a mailbox's task, or a folder-sync account's.
#[derive(Clone)]
enum Unit {
    Mailbox(MailboxTask),
    Account(AccountTask),
}

impl Unit {
    async fn run(self, cancel: CancellationToken) -> Exit {
        match self {
            Unit::Mailbox(t) => t.run(cancel).await,
            Unit::Account(t) => t.run(cancel).await,
        }
    }
}

impl Supervisor {
    fn start(&mut self, key: Key, account: Account) {
        let fence = self.tokens.get(&key).copied();
        if self.cluster.is_some() && fence.is_none() {
            return; // not ours: the coordinator starts it once it holds the lease
        }
        self.ended.remove(&key);
        if self.stopping.contains_key(&key) {
            // the old task is still finishing its batch: start when it has ended
            self.waiting.insert(key, account);
            return;
        }
        self.generation += 1;
        let cancel = self.shutdown.child_token();
        let generation = self.generation;
        let unit = if key.1 == ACCOUNT_UNIT {
            tracing::info!(account = %key.0, "account_started");
            Unit::Account(AccountTask {
                account: account.clone(),
                store: match fence {
                    Some(t) => self.store.fenced(t, self.gate_fresh),
                    None => self.store.clone(),
                },
                limits: self.limits,
                budget: self.budget.clone(),
                metrics: self.metrics.clone(),
                policy: self.policy,
            })
        } else {
            tracing::info!(account = %key.0, mailbox = %key.1, "mailbox_started");
            Unit::Mailbox(MailboxTask {
                account: account.clone(),
                mailbox: key.1.clone(),
                ctx: Context {
                    store: {
                        let scope = self
                            .scopes
                            .entry(key.clone())
                            .or_insert_with(|| self.store.scoped());
                        match fence {
                            Some(t) => scope.fenced(t, self.gate_fresh),
                            None => scope.clone(),
                        }
                    },
                    limits: self.limits,
                    budget: self.budget.clone(),
                },
                metrics: self.metrics.clone(),
                policy: self.policy,
                success_written: Default::default(),
            })
        };
        let (k, c, policy) = (key.clone(), cancel.clone(), self.policy);
        self.tasks.spawn(async move {
            let exit = supervised(&k.0, &k.1, policy, c.clone(), || {
                unit.clone().run(c.clone())
            })
            .await;
            (k, generation, fence, exit)
        });
        self.running.insert(
            key,
            Running {
                account,
                cancel,
                generation,
            },
        );
    }

    fn stop(&mut self, key: &Key) {
        self.waiting.remove(key);
        if let Some(r) = self.running.remove(key) {
            r.cancel.cancel();
            self.stopping.insert(key.clone(), r.generation);
            self.metrics.forget(&key.0, &key.1);
            tracing::info!(account = %key.0, mailbox = %key.1, "mailbox_stopping");
        }
    }

    /// Applies a new config: only the mailboxes whose account settings changed are touched.
    fn reload(&mut self, path: &Path, current: &mut Config) {
        let new = match config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reload_failed");
                return;
            }
        };
        if new.store != current.store
            || new.metrics != current.metrics
            || new.cluster != current.cluster
        {
            tracing::warn!(
                "reload_partial: [store], [metrics] and [cluster] changes take effect at the next restart"
            );
        }
        let want = desired(&new);
        self.want = want.clone();
        for key in self.ended.iter().filter(|k| !want.contains_key(*k)) {
            self.metrics.forget(&key.0, &key.1);
        }
        self.ended.retain(|k| want.contains_key(k));
        // a start that waits for its old task follows the newest config, or is dropped
        self.waiting.retain(|key, account| match want.get(key) {
            Some(a) => {
                *account = a.clone();
                true
            }
            None => false,
        });
        let (mut added, mut removed, mut restarted) = (0, 0, 0);
        let keys: Vec<Key> = self.running.keys().cloned().collect();
        for key in keys {
            match want.get(&key) {
                None => {
                    self.stop(&key);
                    self.tokens.remove(&key);
                    removed += 1;
                }
                Some(account) if *account != self.running[&key].account => {
                    self.stop(&key);
                    self.start(key, account.clone());
                    restarted += 1;
                }
                Some(_) => {}
            }
        }
        let units = want.keys().cloned().collect();
        for (key, account) in want {
            if !self.running.contains_key(&key) && !self.waiting.contains_key(&key) {
                if self.cluster.is_none() || self.tokens.contains_key(&key) {
                    added += 1;
                }
                self.start(key, account);
            }
        }
        if let Some(events) = &self.cluster {
            let _ = events.send(Event::Configured(units));
        }
        tracing::info!(added, removed, restarted, "reloaded");
        current.accounts = new.accounts;
    }
}

impl Supervisor {
    /// `[cluster]`: the coordinator took or gave up a lease.
    fn command(&mut self, command: Command) {
        match command {
            Command::Start { key, token } => {
                if self.shutdown.is_cancelled() {
                    return; // the release at the end of shutdown gives it back
                }
                // a Stop before this Start was for an earlier lease, no longer awaited
                self.stop_asked.remove(&key);
                match self.want.get(&key).cloned() {
                    Some(account) => {
                        self.tokens.insert(key.clone(), token);
                        if self.running.contains_key(&key) {
                            // a token of ours that changed: the old task's writes would be refused
                            self.stop(&key);
                        }
                        self.start(key, account)
                    }
                    None => self.ended_unit(key, Some(token), false),
                }
            }
            Command::Stop { key, token } => {
                self.tokens.remove(&key);
                self.waiting.remove(&key);
                if self.ended.remove(&key) {
                    self.metrics.forget(&key.0, &key.1);
                }
                if self.running.contains_key(&key) {
                    self.stop(&key);
                    self.stop_asked.insert(key, token);
                } else if self.stopping.contains_key(&key) {
                    self.stop_asked.insert(key, token);
                } else {
                    self.ended_unit(key, Some(token), false);
                }
            }
        }
    }

    /// Tells the coordinator that a unit no longer runs here.
    fn ended_unit(&mut self, key: Key, token: Option<i64>, fenced: bool) {
        if fenced && token.is_some() && self.tokens.get(&key) == token.as_ref() {
            self.tokens.remove(&key);
        }
        if let Some(events) = &self.cluster {
            let _ = events.send(Event::Ended { key, token, fenced });
        }
    }
}

/// Connects to the store, retrying with backoff until it answers or shutdown. Neither the
/// attempt nor the wait between attempts holds up a shutdown.
async fn connect_store(
    config: &Config,
    shutdown: &CancellationToken,
    policy: BackoffPolicy,
) -> Option<Store> {
    let mut backoff = Backoff::new(policy);
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        // an attempt dropped at shutdown abandons no write: nothing was stored yet
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return None,
            attempt = Store::connect(&config.store) => attempt,
        };
        match attempt {
            Ok(s) => return Some(s),
            Err(e) => {
                let delay = backoff.next_delay(ErrorClass::Retry, &mut rng);
                tracing::error!(error = %e, delay_ms = delay.as_millis() as u64, "store_unreachable");
                // systemctl status tells "unreachable" from "refused our credentials"
                notify::notify(&format!("STATUS={}: {e}", metrics::WAITING_FOR_DATABASE));
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn status_running(mailboxes: usize) {
    notify::notify(&format!("STATUS=running {mailboxes} mailboxes"));
}

/// `mailpump run`: until shutdown. Returns false only when it could not start.
///
/// Start order: the metrics listener and READY come first, once the config is loaded, so that
/// a database that is down at boot keeps the unit waiting (`STATUS=`, watchdog pings, `/healthz`
/// 503) instead of being killed by systemd's start timeout; the mailboxes start once the store
/// has answered.
/// With `on_expunge = "delete"`: removes the blobs no document refers to any more, every
/// `every` (blobs untouched that long; `store::mirror` says why this never races a writer).
async fn sweep_blobs(store: Store, every: Duration, shutdown: CancellationToken) {
    let mut wait = every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let started = std::time::Instant::now();
        // a sweep that failed midway leaves blobs that writers wait for: finish soon
        wait = every.min(Duration::from_secs(60));
        match store.sweep_blobs(every).await {
            Ok(r) => {
                wait = every;
                tracing::info!(
                    candidates = r.candidates,
                    removed = r.removed,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "blobs_swept"
                )
            }
            Err(e) => tracing::warn!(error = %e, "blob_sweep_failed"),
        }
    }
}

pub async fn run(
    path: &Path,
    mut config: Config,
    limits: Limits,
    budget: Budget,
    shutdown: CancellationToken,
    mut signals: UnboundedReceiver<Signal>,
) -> bool {
    let policy = BackoffPolicy::default();
    let metrics = Metrics::new();
    let (store_tx, store_rx) = watch::channel(None);
    if let Some(m) = &config.metrics {
        match tokio::net::TcpListener::bind(&m.listen).await {
            Ok(listener) => {
                tracing::info!(listen = %m.listen, "metrics_listening");
                tokio::spawn(metrics::serve(
                    listener,
                    metrics.clone(),
                    store_rx,
                    m.unhealthy_after,
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                tracing::error!(listen = %m.listen, error = %e, "metrics_bind_failed");
                return false;
            }
        }
    }
    notify::notify("READY=1");
    notify::notify(&format!("STATUS={}", metrics::WAITING_FOR_DATABASE));
    let watchdog = notify::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));

    // A SIGHUP meanwhile is applied before any mailbox starts (below).
    let store = {
        let connecting = connect_store(&config, &shutdown, policy);
        tokio::pin!(connecting);
        loop {
            tokio::select! {
                store = &mut connecting => break store,
                _ = watchdog_tick.tick(), if watchdog.is_some() => notify::notify("WATCHDOG=1"),
            }
        }
    };
    let Some(store) = store else {
        // SIGTERM while waiting for the database: nothing was started
        notify::notify("STOPPING=1");
        tracing::info!("stopped");
        return true;
    };
    store_tx.send_replace(Some(store.clone()));
    // The operator may have changed the accounts while the database was down: start from the
    // file as it is now, not as it was at boot (a POP3 account whose delete_after_store was
    // just turned off must not delete).
    let mut reload_queued = false;
    while let Ok(signal) = signals.try_recv() {
        reload_queued |= signal == Signal::Reload;
    }
    if reload_queued {
        match config::load(path) {
            Ok(new) => {
                if new.store != config.store
                    || new.metrics != config.metrics
                    || new.cluster != config.cluster
                {
                    tracing::warn!("reload_partial: [store], [metrics] and [cluster] changes take effect at the next restart");
                }
                config.accounts = new.accounts;
                tracing::info!("reloaded_before_start");
            }
            Err(e) => tracing::error!(error = %e, "reload_failed"),
        }
    }
    let mut sup = Supervisor {
        store: store.clone(),
        metrics,
        limits,
        budget,
        policy,
        stopping: HashMap::new(),
        waiting: HashMap::new(),
        scopes: HashMap::new(),
        shutdown: shutdown.clone(),
        running: HashMap::new(),
        tasks: JoinSet::new(),
        ended: Default::default(),
        generation: 0,
        want: desired(&config),
        cluster: None,
        tokens: HashMap::new(),
        gate_fresh: config
            .cluster
            .as_ref()
            .map(|c| (c.lease_ttl / 4).min(Duration::from_secs(1)))
            .unwrap_or_default(),
        stop_asked: HashMap::new(),
    };
    let mut cluster_link = None;
    let mut commands = match &config.cluster {
        Some(c) => {
            let (handle, commands) = cluster::start(
                store.clone(),
                c.clone(),
                sup.metrics.clone(),
                shutdown.clone(),
            );
            let _ = handle
                .events
                .send(Event::Configured(sup.want.keys().cloned().collect()));
            sup.cluster = Some(handle.events.clone());
            cluster_link = Some(handle);
            commands
        }
        None => {
            for (key, account) in sup.want.clone() {
                sup.start(key, account);
            }
            tokio::sync::mpsc::unbounded_channel().1
        }
    };
    if config.store.on_expunge == config::OnExpunge::Delete {
        tokio::spawn(sweep_blobs(
            store.clone(),
            config.store.blob_sweep_after,
            shutdown.clone(),
        ));
    }
    status_running(sup.running.len());
    tracing::info!(mailboxes = sup.running.len(), "running");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(signal) = signals.recv() => {
                if signal == Signal::Reload {
                    sup.reload(path, &mut config);
                    status_running(sup.running.len());
                }
            }
            Some(command) = commands.recv() => {
                sup.command(command);
                status_running(sup.running.len());
            }
            Some(joined) = sup.tasks.join_next(), if !sup.tasks.is_empty() => {
                if let Ok((key, generation, token, exit)) = joined {
                    if sup.stopping.get(&key) == Some(&generation) {
                        sup.stopping.remove(&key);
                        if let Some(account) = sup.waiting.remove(&key) {
                            sup.start(key.clone(), account);
                        } else if !sup.running.contains_key(&key) {
                            // what the removed task reported while it finished goes too
                            sup.metrics.forget(&key.0, &key.1);
                        }
                    }
                    let current = sup.running.get(&key).map(|r| r.generation) == Some(generation);
                    if current {
                        sup.running.remove(&key);
                        match &exit {
                            Exit::Fatal(error) => {
                                sup.ended.insert(key.clone());
                                tracing::error!(account = %key.0, mailbox = %key.1, error = %error, "mailbox_task_ended");
                            }
                            Exit::Fenced(_) => sup.metrics.forget(&key.0, &key.1),
                            Exit::Cancelled => {}
                        }
                    }
                    if !sup.running.contains_key(&key) && !sup.waiting.contains_key(&key) {
                        // the token of the Stop that asked for it, if one did: that is the
                        // lease the coordinator waits to give back
                        let token = sup.stop_asked.remove(&key).or(token);
                        sup.ended_unit(key, token, matches!(exit, Exit::Fenced(_)));
                    }
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify::notify("WATCHDOG=1"),
        }
    }

    notify::notify("STOPPING=1");
    tracing::info!(
        mailboxes = sup.tasks.len(),
        grace_ms = GRACE_PERIOD.as_millis() as u64,
        "stopping"
    );
    let deadline = tokio::time::sleep(GRACE_PERIOD);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = sup.tasks.join_next() => if joined.is_none() { break },
            _ = &mut deadline => {
                tracing::warn!(still_running = sup.tasks.len(), "shutdown_deadline");
                sup.tasks.abort_all();
                break;
            }
        }
    }
    if let Some(handle) = cluster_link {
        // every task has logged out: the others may take the mailboxes at once
        cluster::shutdown(handle, Duration::from_secs(3)).await;
    }
    store.shutdown(crate::commands::STORE_SHUTDOWN).await;
    tracing::info!("stopped");
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_after_a_backoff_and_its_exit_returned() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let exit = supervised(
            "a",
            "INBOX",
            BackoffPolicy::default(),
            CancellationToken::new(),
            move || {
                let r = r.clone();
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("boom");
                    }
                    Exit::Fatal("done".into())
                }
            },
        )
        .await;
        assert_eq!(exit, Exit::Fatal("done".into()));
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_stops_on_cancel_during_its_backoff() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let exit = supervised(
            "a",
            "INBOX",
            BackoffPolicy::default(),
            cancel.clone(),
            move || {
                c.cancel();
                async { panic!("always") }
            },
        )
        .await;
        assert_eq!(exit, Exit::Cancelled);
    }
}
