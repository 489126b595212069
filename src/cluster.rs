//! `[cluster]`: N identical replicas share the configured mailboxes through leases in MongoDB.
//!
//! One [`Coordinator`] task per replica. Every tick (`renew_every`, at most 2 s) it
//! - sends its heartbeat to `instances`, which also tells it the database's time;
//! - renews every lease it holds (when `renew_every` has passed), with one update;
//! - counts the live replicas (heartbeat not expired at the database's time), works out its
//!   share (the configured units divided among them, by rank: within one of each other) and
//!   hands over what is above it (the supervisor stops the task, which finishes its batch
//!   and logs out, then the lease is released) or takes free and expired leases up to it
//!   (rendezvous order, so replicas prefer different mailboxes);
//! - takes a lease that expired without being released (its holder died, hangs or is cut
//!   off) at once, even above its share, and one that has stayed free for [`ORPHAN_TICKS`]
//!   ticks too, so that a mailbox is never left unserved while the replicas disagree about
//!   who is alive; the shares even out again once the dead replica's heartbeat has expired.
//!
//! A unit is a supervisor key: one mailbox, or a folder-sync account (`account/*`).
//!
//! **Taking a lease** (`Store::take_lease`, one atomic conditional update judged at the
//! database's time) raises its token; [`Store::seal`] then raises the fence of the mailbox
//! documents to that token before the task starts, and the task's store handle carries the
//! token (`Store::fenced`). A replica whose lease was taken over finds its next checkpoint
//! write (or POP3 DELE check) refused and its task ends with `Exit::Fenced`.
//!
//! **Its own clock.** A holder trusts its leases until the instant it sent its last successful
//! renewal plus the TTL, measured on its monotonic clock (which only has to run at about the
//! rate of the database's, never agree with it). When a renewal has not succeeded one tick
//! before that, it stops every task itself (`lease_expired_locally`), before any other
//! replica can take the leases.
//!
//! SIGTERM: the supervisor stops every task, then [`Shutdown`] releases every lease and removes
//! the heartbeat, so that the others take the mailboxes at their next tick instead of after a
//! TTL.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::store::{LeaseView, Store, StoreError};

/// A supervisor key: (account, mailbox), mailbox `*` for a folder-sync account.
pub type Key = (String, String);

/// Ticks a lease must be seen free before a replica at its share takes it anyway.
pub const ORPHAN_TICKS: u32 = 3;

/// The longest tick: a lease released by a replica is taken by another within about this.
pub const MAX_TICK: Duration = Duration::from_secs(2);

/// What the coordinator asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The lease is ours with this token (the mailbox documents are sealed): run the unit.
    Start { key: Key, token: i64 },
    /// Stop the unit (finish the batch, log out) and report [`Event::Ended`] with `token`
    /// once nothing of the unit runs any more.
    Stop { key: Key, token: i64 },
}

/// What the supervisor tells the coordinator.
#[derive(Debug)]
pub enum Event {
    /// The configured units (at start and after every reload).
    Configured(BTreeSet<Key>),
    /// The unit's task has ended (or was not running when asked to stop).
    /// `token`: the one the task was started with (None: nothing ran), so that a late report
    /// of an earlier run of the unit is never taken for the current one.
    Ended {
        key: Key,
        token: Option<i64>,
        fenced: bool,
    },
    /// Shutdown: every task has ended; release everything and leave.
    Shutdown(oneshot::Sender<()>),
}

/// Why this replica runs a unit.
#[derive(Debug, Clone, Copy)]
struct Held {
    token: i64,
}

pub struct Coordinator {
    store: Store,
    cfg: ClusterConfig,
    /// This process's id in `leases.run` and `instances._id`: a restarted replica with the
    /// same instance name never mistakes its predecessor's leases for its own.
    run: String,
    metrics: Arc<Metrics>,
    commands: mpsc::UnboundedSender<Command>,
    configured: BTreeSet<Key>,
    held: HashMap<Key, Held>,
    /// Asked to stop for a handover: released once the supervisor reports it ended.
    handing_over: HashMap<Key, Held>,
    /// Until when the held leases are surely ours (monotonic; see the module doc).
    valid_until: Option<Instant>,
    last_renewal: Option<Instant>,
    /// Consecutive ticks each unit was seen free.
    free_ticks: HashMap<Key, u32>,
    /// Units whose take or seal just failed: not tried again before this tick.
    retry_at: HashMap<Key, u64>,
    ticks: u64,
}

/// The coordinator's handle for the supervisor (its commands come on the receiver that
/// [`start`] returns beside it).
pub struct Handle {
    pub events: mpsc::UnboundedSender<Event>,
    task: tokio::task::JoinHandle<()>,
}

/// Sent at shutdown; waits at most `within` for the release.
pub async fn shutdown(handle: Handle, within: Duration) {
    let (tx, rx) = oneshot::channel();
    if handle.events.send(Event::Shutdown(tx)).is_ok()
        && tokio::time::timeout(within, rx).await.is_err()
    {
        tracing::warn!("lease_release_timeout");
    }
    handle.task.abort();
}

/// A unit's place in `run`'s order of preference (rendezvous hashing).
fn score(run: &str, key: &Key) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (run, &key.0, &key.1).hash(&mut h);
    h.finish()
}

/// This replica's share of `units` among the live replicas `runs` (sorted, unique): the first
/// `units % n` by rank get one more, so that shares are within one of each other.
pub fn share(units: usize, runs: &[String], me: &str) -> usize {
    let n = runs.len().max(1);
    let rank = runs.iter().position(|r| r == me).unwrap_or(n - 1);
    units / n + usize::from(rank < units % n)
}

/// Starts the coordinator. It takes nothing until it has been told the configured units and
/// has seen one tick of the other replicas' heartbeats.
pub fn start(
    store: Store,
    cfg: ClusterConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (Handle, mpsc::UnboundedReceiver<Command>) {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let run = format!("{:016x}", rand::thread_rng().gen::<u64>());
    let coordinator = Coordinator {
        store,
        cfg,
        run,
        metrics,
        commands: cmd_tx,
        configured: BTreeSet::new(),
        held: HashMap::new(),
        handing_over: HashMap::new(),
        valid_until: None,
        last_renewal: None,
        free_ticks: HashMap::new(),
        retry_at: HashMap::new(),
        ticks: 0,
    };
    let task = tokio::spawn(coordinator.run(ev_rx, shutdown));
    (
        Handle {
            events: ev_tx,
            task,
        },
        cmd_rx,
    )
}

impl Coordinator {
    fn tick_every(&self) -> Duration {
        self.cfg.renew_every.min(MAX_TICK)
    }

    /// Waits at most half the lease TTL for a database call, so that a hung database never
    /// keeps the coordinator from stopping its units before its leases run out. A call given
    /// up on may still land: a take or a renewal that did is found by the next renewal (a
    /// lease of ours that we do not hold is released), a release that did not is left to
    /// expire.
    async fn db<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // never past the moment the held leases must be given up (one tick before they run
        // out): the caller checks the deadline right after
        let mut within = self.cfg.lease_ttl / 2;
        if let Some(until) = self.valid_until {
            let left = until.saturating_duration_since(Instant::now() + self.tick_every());
            within = within.min(left.max(Duration::from_millis(100)));
        }
        tokio::time::timeout(within, call)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Timeout {
                    what: what.to_string(),
                    after: within,
                })
            })
    }

    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        shutdown: CancellationToken,
    ) {
        tracing::info!(instance = %self.cfg.instance, run = %self.run, lease_ttl_ms = self.cfg.lease_ttl.as_millis() as u64, renew_every_ms = self.cfg.renew_every.as_millis() as u64, "cluster_joined");
        if let Err(e) = self.store.prepare_cluster().await {
            tracing::warn!(error = %e, "cluster_index_failed");
        }
        let mut tick = tokio::time::interval(self.tick_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    None => return,
                    Some(Event::Shutdown(done)) => {
                        self.leave().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(event) => self.on_event(event).await,
                },
                _ = tick.tick() => self.tick(shutdown.is_cancelled()).await,
            }
        }
    }

    fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    fn publish(&self) {
        self.metrics.leases_held.set(self.held.len() as i64);
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Configured(units) => {
                // held units no longer configured are given back once their task ended (the
                // supervisor stops them; one that had already ended reports at once)
                let gone: Vec<Key> = self
                    .held
                    .keys()
                    .filter(|k| !units.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    if let Some(h) = self.held.remove(&key) {
                        tracing::info!(account = %key.0, mailbox = %key.1, "lease_unit_removed");
                        self.handing_over.insert(key.clone(), h);
                        self.send(Command::Stop {
                            key,
                            token: h.token,
                        });
                    }
                }
                self.configured = units;
            }
            Event::Ended { key, token, fenced } => {
                let current = |h: &Held| token.is_none_or(|t| t == h.token);
                if fenced {
                    self.metrics.fencing_refusals.inc();
                    let held = self.held.get(&key).or(self.handing_over.get(&key)).copied();
                    if held.is_some_and(|h| current(&h)) {
                        self.held.remove(&key);
                        self.handing_over.remove(&key);
                        self.metrics.leases_lost.inc();
                        tracing::warn!(account = %key.0, mailbox = %key.1, "lease_lost");
                    }
                } else if let Some(h) = self.handing_over.get(&key).copied().filter(|h| current(h))
                {
                    self.handing_over.remove(&key);
                    self.release(&key, h).await;
                }
                // else a fatal error: the lease stays held (another replica would fail alike)
                self.publish();
            }
            Event::Shutdown(_) => unreachable!("handled in run"),
        }
    }

    async fn release(&mut self, key: &Key, held: Held) {
        match self
            .db(
                "lease release",
                self.store
                    .release_lease(&key.0, &key.1, &self.run, held.token),
            )
            .await
        {
            Ok(true) => {
                self.metrics.leases_released.inc();
                tracing::info!(account = %key.0, mailbox = %key.1, token = held.token, "lease_released");
            }
            Ok(false) => {}
            // it expires by itself after a TTL
            Err(e) => {
                tracing::warn!(account = %key.0, mailbox = %key.1, error = %e, "lease_release_failed")
            }
        }
    }

    /// Shutdown: every task has ended; every lease goes back at once.
    async fn leave(&mut self) {
        match self
            .db("lease release", self.store.release_all(&self.run))
            .await
        {
            Ok(n) => {
                self.metrics.leases_released.inc_by(n);
                tracing::info!(released = n, "leases_released")
            }
            Err(e) => tracing::warn!(error = %e, "lease_release_failed"),
        }
        if let Err(e) = self
            .db("instance removal", self.store.leave(&self.run))
            .await
        {
            tracing::warn!(error = %e, "instance_removal_failed");
        }
        self.held.clear();
        self.publish();
    }

    /// Stops every unit held: the leases can no longer be trusted.
    fn drop_all(&mut self, why: &str) {
        if self.held.is_empty() && self.handing_over.is_empty() {
            return;
        }
        tracing::error!(
            held = self.held.len(),
            reason = why,
            "lease_expired_locally"
        );
        for (key, h) in self.held.drain().chain(self.handing_over.drain()) {
            self.metrics.leases_lost.inc();
            tracing::warn!(account = %key.0, mailbox = %key.1, reason = why, "lease_lost");
            let _ = self.commands.send(Command::Stop {
                key,
                token: h.token,
            });
        }
        self.valid_until = None;
        self.publish();
    }

    async fn tick(&mut self, stopping: bool) {
        self.ticks += 1;
        let tick = self.tick_every();
        let ttl = self.cfg.lease_ttl;
        let heartbeat = self
            .db(
                "heartbeat",
                self.store
                    .heartbeat(&self.run, &self.cfg.instance, ttl, self.held.len()),
            )
            .await;
        self.check_validity(tick);
        // the leases are renewed whether or not the heartbeat went through
        let due = self
            .last_renewal
            .is_none_or(|t| t.elapsed() + tick / 2 >= self.cfg.renew_every);
        if due && !(self.held.is_empty() && self.handing_over.is_empty()) {
            self.renew().await;
        }
        self.check_validity(tick);
        let now = match heartbeat {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat_failed");
                return;
            }
        };
        if stopping || self.configured.is_empty() || self.ticks < 2 {
            return;
        }
        if let Err(e) = self.balance(now).await {
            tracing::warn!(error = %e, "balance_failed");
        }
    }

    fn check_validity(&mut self, tick: Duration) {
        if let Some(until) = self.valid_until {
            if Instant::now() + tick >= until {
                self.drop_all("renewal did not succeed in time");
            }
        }
    }

    async fn renew(&mut self) {
        let sent = Instant::now();
        match self
            .db(
                "lease renewal",
                self.store.renew_leases(&self.run, self.cfg.lease_ttl),
            )
            .await
        {
            Ok(ours) => {
                self.last_renewal = Some(sent);
                self.valid_until = Some(sent + self.cfg.lease_ttl);
                let ours: HashMap<Key, i64> = ours.into_iter().collect();
                for map in [&mut self.held, &mut self.handing_over] {
                    let lost: Vec<(Key, i64)> = map
                        .iter()
                        .filter(|(k, h)| ours.get(*k) != Some(&h.token))
                        .map(|(k, h)| (k.clone(), h.token))
                        .collect();
                    for (key, token) in lost {
                        map.remove(&key);
                        self.metrics.leases_lost.inc();
                        tracing::warn!(account = %key.0, mailbox = %key.1, "lease_lost");
                        let _ = self.commands.send(Command::Stop { key, token });
                    }
                }
                // a take whose answer was lost may have landed: give it back
                for (key, token) in ours {
                    if !self.held.contains_key(&key) && !self.handing_over.contains_key(&key) {
                        self.release(&key, Held { token }).await;
                    }
                }
                self.publish();
            }
            Err(e) => tracing::warn!(error = %e, "lease_renewal_failed"),
        }
    }

    async fn balance(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut runs: Vec<String> = self
            .db("instances read", self.store.instances())
            .await?
            .into_iter()
            .filter(|i| i.expires_at > now)
            .map(|i| i.run)
            .collect();
        if !runs.contains(&self.run) {
            runs.push(self.run.clone());
        }
        runs.sort();
        runs.dedup();
        self.metrics.cluster_instances.set(runs.len() as i64);
        let target = share(self.configured.len(), &runs, &self.run);
        let leases: HashMap<Key, LeaseView> = self
            .db("leases read", self.store.leases())
            .await?
            .into_iter()
            .map(|l| ((l.account.clone(), l.mailbox.clone()), l))
            .collect();
        let free: Vec<Key> = self
            .configured
            .iter()
            .filter(|k| !self.held.contains_key(*k) && !self.handing_over.contains_key(*k))
            .filter(|k| leases.get(*k).is_none_or(|l| l.is_free(now)))
            .cloned()
            .collect();
        self.free_ticks.retain(|k, _| free.contains(k));
        for k in &free {
            *self.free_ticks.entry(k.clone()).or_default() += 1;
        }

        // a lease that expired without a release: its holder died or hangs. Taken at once,
        // whatever the share (its heartbeat may count it alive for a while yet), and nothing is
        // handed over while that settles
        let expired = |k: &Key| {
            leases
                .get(k)
                .is_some_and(|l| l.run.is_some() && l.expires_at <= now)
        };
        let failover = free.iter().any(expired);
        let held = self.held.len();
        if held > target && !failover {
            let mut mine: Vec<Key> = self.held.keys().cloned().collect();
            mine.sort_by_key(|k| score(&self.run, k));
            for key in mine.into_iter().take(held - target) {
                if let Some(h) = self.held.remove(&key) {
                    tracing::info!(account = %key.0, mailbox = %key.1, share = target, "lease_handing_over");
                    self.handing_over.insert(key.clone(), h);
                    self.send(Command::Stop {
                        key,
                        token: h.token,
                    });
                }
            }
        }
        let mut candidates = free;
        candidates.sort_by_key(|k| std::cmp::Reverse(score(&self.run, k)));
        let mut room = target.saturating_sub(self.held.len());
        let started = Instant::now();
        for key in candidates {
            // at most one tick of takes: the renewals must not wait behind them
            if started.elapsed() >= self.tick_every() {
                break;
            }
            let orphan =
                expired(&key) || self.free_ticks.get(&key).copied().unwrap_or(0) >= ORPHAN_TICKS;
            if room == 0 && !orphan {
                continue;
            }
            if self.retry_at.get(&key).is_some_and(|t| self.ticks < *t) {
                continue; // it failed just now: the others first
            }
            match self.take(&key).await {
                Ok(true) => room = room.saturating_sub(1),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(account = %key.0, mailbox = %key.1, error = %e, "lease_take_failed");
                    self.retry_at
                        .insert(key.clone(), self.ticks + ORPHAN_TICKS as u64);
                }
            }
            self.check_validity(self.tick_every());
        }
        self.retry_at.retain(|_, t| *t > self.ticks);
        self.publish();
        Ok(())
    }

    /// Takes and seals one lease, then starts its unit. False if another replica has it.
    async fn take(&mut self, key: &Key) -> Result<bool, StoreError> {
        let ttl = self.cfg.lease_ttl;
        let sent = Instant::now();
        let Some(taken) = self
            .db(
                "lease take",
                self.store
                    .take_lease(&key.0, &key.1, &self.run, &self.cfg.instance, ttl),
            )
            .await?
        else {
            return Ok(false);
        };
        self.free_ticks.remove(key);
        if let Err(e) = self
            .db("lease seal", self.store.seal(&key.0, &key.1, taken.token))
            .await
        {
            tracing::warn!(account = %key.0, mailbox = %key.1, error = %e, "lease_seal_failed");
            self.retry_at
                .insert(key.clone(), self.ticks + ORPHAN_TICKS as u64);
            let release = self
                .store
                .release_lease(&key.0, &key.1, &self.run, taken.token);
            let _ = self.db("lease release", release).await;
            return Ok(false);
        }
        if self.held.is_empty() && self.handing_over.is_empty() {
            self.valid_until = Some(sent + ttl);
            self.last_renewal = Some(sent);
        }
        self.metrics.leases_taken.inc();
        if let Some(from) = &taken.taken_from {
            self.metrics.leases_taken_over.inc();
            tracing::warn!(account = %key.0, mailbox = %key.1, token = taken.token, from = %from, "lease_taken_over");
        } else {
            tracing::info!(account = %key.0, mailbox = %key.1, token = taken.token, "lease_taken");
        }
        self.held.insert(key.clone(), Held { token: taken.token });
        self.send(Command::Start {
            key: key.clone(),
            token: taken.token,
        });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}")).collect()
    }

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        for units in [0, 1, 2, 29, 30, 31, 300] {
            for n in 1..=7 {
                let r = runs(n);
                let shares: Vec<usize> = r.iter().map(|me| share(units, &r, me)).collect();
                assert_eq!(shares.iter().sum::<usize>(), units, "{units} over {n}");
                let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(hi - lo <= 1, "{units} over {n}: {shares:?}");
            }
        }
    }

    #[test]
    fn rendezvous_order_differs_between_replicas() {
        let keys: Vec<Key> = (0..30).map(|i| ("a".into(), format!("m{i}"))).collect();
        let top = |run: &str| {
            let mut k = keys.clone();
            k.sort_by_key(|k| std::cmp::Reverse(score(run, k)));
            k.truncate(10);
            k
        };
        assert_ne!(top("r0"), top("r1"));
        assert_eq!(top("r0"), top("r0"));
    }
}
