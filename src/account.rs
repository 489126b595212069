//! An IMAP account whose folders are found on the server, not only named: `mailboxes` with
//! `"*"`, globs or special-use names, or more folders than `watch` (and `max_connections`)
//! gives their own connection. One task per account:
//!
//! - **Discovery**: `LIST "" "*"` (with SPECIAL-USE and, where offered, LIST-STATUS) and
//!   NAMESPACE at every session start, every `discover_interval`, and at once when NOTIFY
//!   reports a folder created, renamed or deleted. [`crate::folders`] decides what is synced.
//!   A folder that disappears is marked `deleted` in `mailboxes` (its documents stay); a rename
//!   that NOTIFY names (OLDNAME) or that RFC 8474's MAILBOXID shows is recorded as `renamed`
//!   with `renamed_to`, and the new name syncs as a new folder (raw bytes are content-addressed
//!   in `blobs`, so nothing large is stored twice).
//! - **Watched folders** get a [`MailboxTask`] each (their own IDLE connection), started and
//!   stopped as discovery finds them; a panic restarts only that task.
//! - **Every other folder** is followed by this task's one connection, the *follower*: with
//!   NOTIFY (RFC 5465) it waits with no folder selected for `* STATUS` news of any folder and
//!   catches up the folder named at once, with a safety sweep every `discover_interval`
//!   (Dovecot's NOTIFY misses mail that bypassed it); without NOTIFY it sweeps every
//!   `poll_interval`: one LIST-STATUS, or pipelined STATUS commands, and catches up only the
//!   folders whose UIDNEXT, UIDVALIDITY or MESSAGES moved. Catch-ups of several folders run one
//!   after the other on the follower's connection, so the account holds at most
//!   `max_connections` connections: the watched ones plus this one.
//!
//! The follower's errors are handled like a mailbox task's: classified, backed off,
//! reconnected; the watched folders' tasks are not touched by them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::budget::Budget;
use crate::config::Account;
use crate::error::ErrorClass;
use crate::folders::{self, Folder, Follow, Plan, Selection};
use crate::imap::{ImapError, Listing, Session, StatusEntry, WaitEnd};
use crate::mailbox::{Exit, MailboxTask, SUCCESS_EVERY};
use crate::metrics::Metrics;
use crate::parse::Limits;
use crate::pipeline::{Context, SyncError};
use crate::store::Store;
use crate::sync;

/// A followed folder missing from a listing is looked for again this soon: gone only when
/// the second listing agrees.
const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// How long LOGOUT may take when the follower ends on purpose.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(3);

/// Catch-ups of one folder run back to back because the server announced news during the
/// previous one, before the follower waits anyway.
const MAX_IMMEDIATE_PASSES: u32 = 3;

/// How the follower learns of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Notify,
    StatusPoll,
}

impl Mode {
    /// As `mailboxes.followed_by`, `check` and `status` name it.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Notify => "notify",
            Mode::StatusPoll => "status poll",
        }
    }
}

/// What the follower last saw of a folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    uidvalidity: Option<u32>,
    uidnext: Option<u32>,
    messages: Option<u32>,
    /// Moves with every flag change and expunge (CONDSTORE): a flag change alone is news.
    highest_modseq: Option<u64>,
}

impl Seen {
    /// Takes in what `s` says; true when it says the folder holds other messages now.
    fn update(&mut self, s: &StatusEntry) -> bool {
        let mut moved = false;
        for (mine, theirs) in [
            (&mut self.uidvalidity, s.uidvalidity),
            (&mut self.uidnext, s.uidnext),
            (&mut self.messages, s.messages),
        ] {
            if let Some(v) = theirs {
                moved |= *mine != Some(v);
                *mine = Some(v);
            }
        }
        if let Some(m) = s.highestmodseq {
            moved |= self.highest_modseq != Some(m);
            self.highest_modseq = Some(m);
        }
        moved
    }
}

/// What the server's folder list gave.
struct Discovery {
    folders: Vec<Folder>,
    statuses: Vec<StatusEntry>,
    /// MAILBOXID by name, where the server has OBJECTID.
    ids: HashMap<String, String>,
}

/// The watched folders' tasks.
#[derive(Default)]
struct Watchers {
    tasks: JoinSet<(String, u64, Exit)>,
    /// The running task of each folder, with its generation: a task that ends is forgotten
    /// only if it is still the folder's current one.
    running: HashMap<String, (u64, CancellationToken)>,
    generation: u64,
    /// One store scope per folder for the whole run (a restarted task settles its
    /// predecessor's writes).
    scopes: HashMap<String, Store>,
    /// Watched folders whose task stopped for good (fatal): not restarted until the folder
    /// leaves the plan and comes back.
    ended: HashSet<String>,
    /// `[cluster]`: a watched task's write was refused by the lease fence. The whole account
    /// is another replica's now: `trip` (the account's token) is cancelled.
    fenced: Option<String>,
    trip: CancellationToken,
}

/// What survives the follower's reconnects.
#[derive(Default)]
struct Folders {
    /// The plan in force.
    plan: Plan,
    /// MAILBOXID by folder, as last listed.
    ids: HashMap<String, String>,
    seen: HashMap<String, Seen>,
    /// Shared folders to catch up.
    dirty: BTreeSet<String>,
    /// Renames NOTIFY announced (old -> new), applied by the next discovery.
    renames: HashMap<String, String>,
    /// Folders whose left-out reason was logged.
    left_out_logged: std::collections::BTreeMap<String, String>,
    success_written: HashMap<String, Instant>,
    /// Shared folders caught up at least once in this session (their state was recorded).
    live: HashSet<String>,
    /// The DB's followed folders were compared with the first listing.
    reconciled: bool,
    /// Followed folders missing from the last listing (marked gone after two).
    misses: HashMap<String, u32>,
    /// When a sweep last recorded `last_success_at` for the quiet shared folders.
    sweep_success_at: Option<Instant>,
    /// When each shared folder was last caught up: without CONDSTORE a flag change moves no
    /// STATUS item, so a folder is caught up (and its flags read) every `flag_scan_interval`.
    caught_up_at: HashMap<String, Instant>,
}

#[derive(Clone)]
pub struct AccountTask {
    pub account: Account,
    /// The root store; the task makes its scopes from it.
    pub store: Store,
    pub limits: Limits,
    pub budget: Budget,
    pub metrics: Arc<Metrics>,
    pub policy: BackoffPolicy,
}

impl AccountTask {
    fn name(&self) -> &str {
        &self.account.name
    }

    fn spawn_store<F, Fut>(&self, write: F)
    where
        F: FnOnce(Store) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), crate::store::StoreError>> + Send,
    {
        let store = self.store.clone();
        tokio::spawn(async move {
            let _ = write(store).await;
        });
    }

    /// Runs until `cancel` fires or the follower meets a fatal error.
    pub async fn run(self, cancel: CancellationToken) -> Exit {
        let mut backoff = Backoff::new(self.policy);
        let mut rng = rand::rngs::StdRng::from_entropy();
        let account = self.name().to_string();
        let scope = self.store.scoped();
        let mut folders = Folders::default();
        let mut watchers = Watchers::default();
        // the watched folders' tasks stop with the account, also when its follower stops
        let cancel_all = cancel;
        let cancel = cancel_all.child_token();
        watchers.trip = cancel.clone();
        let exit = loop {
            if cancel.is_cancelled() {
                break Exit::Cancelled;
            }
            tokio::select! {
                _ = cancel.cancelled() => break Exit::Cancelled,
                _ = scope.settle() => {}
            }
            let mut healthy_since = None;
            let result = self
                .follow(
                    &mut folders,
                    &mut watchers,
                    &scope,
                    &cancel,
                    &mut healthy_since,
                )
                .await;
            let error = match result {
                Ok(()) => break Exit::Cancelled,
                Err(e) => e,
            };
            let class = error.class();
            let text = error.to_string();
            if error.is_fenced() {
                tracing::error!(account, error = %text, "lease_lost_fenced");
                cancel.cancel();
                break Exit::Fenced(text);
            }
            for name in folders.plan.shared() {
                self.metrics.failure(&account, name, &text);
            }
            folders.live.clear();
            if class == ErrorClass::Fatal {
                tracing::error!(account, error = %text, "account_follower_stopped");
                for name in folders.plan.shared() {
                    tracing::error!(account, mailbox = %name, error = %text, "mailbox_stopped");
                    let (a, m, t) = (account.clone(), name.clone(), text.clone());
                    self.spawn_store(move |s| async move {
                        s.set_state(&a, &m, "error", Some(&t)).await
                    });
                }
                cancel.cancel();
                break Exit::Fatal(text);
            }
            backoff.session_ended(
                healthy_since
                    .map(|t: Instant| t.elapsed())
                    .unwrap_or_default(),
            );
            let delay = backoff.next_delay(class, &mut rng);
            tracing::warn!(account, error = %text, delay_ms = delay.as_millis() as u64, attempt = backoff.failures(), "follower_disconnected");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = &mut sleep => break,
                    Some(joined) = watchers.tasks.join_next(), if !watchers.tasks.is_empty() => {
                        self.reaped(&mut watchers, joined);
                    }
                }
            }
        };
        // the watched tasks are children of `cancel`: wait for them to log out
        if matches!(exit, Exit::Cancelled) {
            while watchers.tasks.join_next().await.is_some() {}
            for name in folders.plan.synced.keys() {
                self.metrics.forget(&account, name);
            }
        } else {
            while let Some(joined) = watchers.tasks.join_next().await {
                self.reaped(&mut watchers, joined);
            }
        }
        match watchers.fenced {
            Some(error) if exit == Exit::Cancelled && !cancel_all.is_cancelled() => {
                tracing::error!(account, error = %error, "lease_lost_fenced");
                Exit::Fenced(error)
            }
            _ => exit,
        }
    }

    fn reaped(
        &self,
        watchers: &mut Watchers,
        joined: Result<(String, u64, Exit), tokio::task::JoinError>,
    ) {
        let Ok((name, generation, exit)) = joined else {
            return;
        };
        if watchers.running.get(&name).map(|(g, _)| *g) != Some(generation) {
            return; // an older task of a folder that was stopped and started again
        }
        watchers.running.remove(&name);
        match exit {
            Exit::Fatal(error) => {
                tracing::error!(account = %self.account.name, mailbox = %name, error = %error, "mailbox_task_ended");
                watchers.ended.insert(name);
            }
            Exit::Fenced(error) => {
                watchers.fenced.get_or_insert(error);
                watchers.trip.cancel();
            }
            Exit::Cancelled => {}
        }
    }

    fn start_watcher(&self, watchers: &mut Watchers, cancel: &CancellationToken, name: &str) {
        if watchers.running.contains_key(name) || watchers.ended.contains(name) {
            return;
        }
        let token = cancel.child_token();
        let scope = watchers
            .scopes
            .entry(name.to_string())
            .or_insert_with(|| self.store.scoped())
            .clone();
        let task = MailboxTask {
            account: self.account.clone(),
            mailbox: name.to_string(),
            ctx: Context {
                store: scope,
                limits: self.limits,
                budget: self.budget.clone(),
            },
            metrics: self.metrics.clone(),
            policy: self.policy,
            success_written: Default::default(),
        };
        let (c, policy, account, mailbox) = (
            token.clone(),
            self.policy,
            self.account.name.clone(),
            name.to_string(),
        );
        watchers.generation += 1;
        let generation = watchers.generation;
        watchers.tasks.spawn(async move {
            let exit = crate::supervisor::supervised(&account, &mailbox, policy, c.clone(), || {
                task.clone().run(c.clone())
            })
            .await;
            (mailbox, generation, exit)
        });
        watchers
            .running
            .insert(name.to_string(), (generation, token));
        tracing::info!(account = %self.account.name, mailbox = name, "mailbox_started");
    }

    fn stop_watcher(&self, watchers: &mut Watchers, name: &str) {
        if let Some((_, token)) = watchers.running.remove(name) {
            token.cancel();
            tracing::info!(account = %self.account.name, mailbox = name, "mailbox_stopping");
        }
        watchers.ended.remove(name);
    }

    /// LIST (+ STATUS), parsed into folders.
    /// `known`: MAILBOXIDs already read; those of other folders are asked for with STATUS
    /// where the server has OBJECTID (RFC 8474).
    async fn discover(
        &self,
        session: &mut Session,
        known: &HashMap<String, String>,
    ) -> Result<Discovery, ImapError> {
        let (lists, statuses) = session.list_folders().await?;
        let mut ids: HashMap<String, String> = statuses
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.mailbox_id.clone()?)))
            .collect();
        if session.has_capability("OBJECTID") {
            let mut ask = Vec::new();
            for l in &lists {
                if l.has("\\noselect") || l.has("\\nonexistent") || ids.contains_key(&l.name) {
                    continue;
                }
                match known.get(&l.name) {
                    Some(id) => {
                        ids.insert(l.name.clone(), id.clone());
                    }
                    None => ask.push(l.name.clone()),
                }
            }
            if !ask.is_empty() {
                for s in session.mailbox_ids(&ask).await? {
                    if let Some(id) = s.mailbox_id {
                        ids.insert(s.name, id);
                    }
                }
            }
        }
        Ok(Discovery {
            folders: lists.iter().map(Folder::from).collect(),
            statuses,
            ids,
        })
    }

    /// Applies a new listing: folders gone are marked, watched tasks started and stopped,
    /// new shared folders queued for a catch-up.
    async fn apply(
        &self,
        found: Discovery,
        prefix: Option<&str>,
        mode: Mode,
        f: &mut Folders,
        w: &mut Watchers,
        cancel: &CancellationToken,
    ) -> bool {
        let account = self.name().to_string();
        let mut plan = Selection::of(&self.account).plan(&found.folders, prefix);
        let listed: HashSet<&str> = found
            .folders
            .iter()
            .filter(|x| !x.attributes.iter().any(|a| a == "\\nonexistent"))
            .map(|x| x.name.as_str())
            .collect();
        // folders followed before (this run, or an earlier one: `mailboxes` remembers) that are gone
        let mut before: HashMap<String, Option<String>> = f
            .plan
            .synced
            .keys()
            .map(|n| (n.clone(), f.ids.get(n).cloned()))
            .collect();
        if !f.reconciled {
            match self.store.followed_folders(&account).await {
                Ok(records) => {
                    f.reconciled = true;
                    for r in records {
                        before.entry(r.mailbox).or_insert(r.mailbox_id);
                    }
                }
                Err(e) => tracing::warn!(account, error = %e, "folder_records_unread"),
            }
        }
        // MAILBOXID survives a rename (RFC 8474): another listed folder with the old one's id
        let by_id: HashMap<&String, &String> = found.ids.iter().map(|(n, i)| (i, n)).collect();
        let mut keep = Vec::new();
        for (old, old_id) in &before {
            if plan.synced.contains_key(old) || listed.contains(old.as_str()) {
                f.misses.remove(old);
                continue;
            }
            let renamed_to = f.renames.remove(old).or_else(|| {
                old_id
                    .as_ref()
                    .and_then(|id| by_id.get(id).map(|n| (*n).clone()))
                    .filter(|n| n != old)
            });
            // one listing without it is not proof (a server's LIST can glitch, a rename may
            // not show its MAILBOXID yet): it is gone when the next listing agrees
            let misses = f.misses.entry(old.clone()).or_insert(0);
            *misses += 1;
            if renamed_to.is_none() && *misses < 2 {
                keep.push(old.clone());
                continue;
            }
            f.misses.remove(old);
            self.stop_watcher(w, old);
            f.dirty.remove(old);
            f.seen.remove(old);
            f.live.remove(old);
            self.metrics.forget(&account, old);
            match &renamed_to {
                Some(to) => {
                    tracing::info!(account, mailbox = %old, renamed_to = %to, "folder_renamed")
                }
                None => tracing::info!(account, mailbox = %old, "folder_deleted"),
            }
            let (a, m, to) = (account.clone(), old.clone(), renamed_to.clone());
            self.spawn_store(move |s| async move {
                s.mark_deleted(&a, &m, to.as_deref()).await?;
                if let Some(to) = to {
                    s.note_renamed_from(&a, &to, &m).await?;
                }
                Ok(())
            });
        }
        f.renames.clear();
        for name in &keep {
            if let Some(follow) = f.plan.synced.get(name) {
                plan.synced.insert(name.clone(), *follow);
            }
        }
        let recheck = !keep.is_empty();
        // a folder no longer selected (config unchanged: its attributes changed) just stops
        for old in f.plan.synced.keys() {
            if !plan.synced.contains_key(old) && listed.contains(old.as_str()) {
                self.stop_watcher(w, old);
                f.dirty.remove(old);
            }
        }
        for (name, follow) in &plan.synced {
            let was = f.plan.synced.get(name);
            match follow {
                Follow::Watch => {
                    f.dirty.remove(name);
                    self.start_watcher(w, cancel, name);
                }
                Follow::Shared => {
                    self.stop_watcher(w, name);
                    if was != Some(&Follow::Shared) {
                        f.dirty.insert(name.clone());
                    }
                }
            }
            let label = match follow {
                Follow::Watch => "idle",
                Follow::Shared => mode.label(),
            };
            let id = found.ids.get(name).cloned();
            if was != Some(follow) || (id.is_some() && f.ids.get(name) != id.as_ref()) {
                let (a, m, l) = (account.clone(), name.clone(), label);
                self.spawn_store(move |s| async move {
                    s.note_followed(&a, &m, l, id.as_deref()).await
                });
            }
        }
        for (name, why) in &plan.left_out {
            if f.left_out_logged.get(name) != Some(why) {
                tracing::info!(account, mailbox = %name, reason = %why, "folder_left_out");
            }
        }
        f.left_out_logged = plan.left_out.clone();
        if !plan.demoted.is_empty() && plan.demoted != f.plan.demoted {
            tracing::warn!(account, folders = ?plan.demoted, max_connections = self.account.settings.max_connections, "watch_limited");
        }
        for s in &found.statuses {
            if plan.shared().any(|n| *n == s.name)
                && f.seen.entry(s.name.clone()).or_default().update(s)
            {
                f.dirty.insert(s.name.clone());
            }
        }
        f.ids = found.ids;
        let changed = plan.synced != f.plan.synced;
        f.plan = plan;
        if changed {
            tracing::info!(
                account,
                synced = f.plan.synced.len(),
                watched = f.plan.watched().count(),
                shared = f.plan.shared().count(),
                left_out = f.plan.left_out.len(),
                mode = mode.label(),
                "folders_discovered"
            );
        }
        recheck
    }

    /// What the server sent meanwhile: STATUS news queues a catch-up, LIST news a discovery.
    fn absorb(&self, session: &mut Session, f: &mut Folders) -> bool {
        let mut rediscover = false;
        for l in session.take_listings() {
            match l {
                Listing::Status(s) => {
                    let shared = f.plan.synced.get(&s.name) == Some(&Follow::Shared);
                    if shared && f.seen.entry(s.name.clone()).or_default().update(&s) {
                        tracing::debug!(account = %self.account.name, mailbox = %s.name, "folder_changed");
                        f.dirty.insert(s.name);
                    }
                }
                Listing::List(entry) => {
                    tracing::debug!(account = %self.account.name, mailbox = %entry.name, "folder_list_changed");
                    if let Some(old) = entry.old_name {
                        f.renames.insert(old, entry.name.clone());
                    }
                    rediscover = true;
                }
                Listing::Namespace(_) => {}
            }
        }
        rediscover
    }

    /// A sweep: the STATUS of every shared folder (one LIST-STATUS where the server has it,
    /// else pipelined STATUS commands); a folder whose numbers moved is queued.
    async fn sweep(
        &self,
        session: &mut Session,
        f: &mut Folders,
        list_status: bool,
    ) -> Result<(), ImapError> {
        let statuses = if list_status {
            session.list_folders().await?.1
        } else {
            let names: Vec<String> = f.plan.shared().cloned().collect();
            session.status_many(&names).await?
        };
        for s in statuses {
            let shared = f.plan.synced.get(&s.name) == Some(&Follow::Shared);
            if shared && f.seen.entry(s.name.clone()).or_default().update(&s) {
                f.dirty.insert(s.name);
            }
        }
        Ok(())
    }

    /// One catch-up of a shared folder; true when the folder is selected afterwards. A folder
    /// the server will not open or serve (a tagged NO/BAD, an outage of that folder) is that
    /// folder's error only: recorded, and retried at the next sweep, while the other folders go
    /// on. Errors of the connection or the database end the session.
    async fn catch_up(
        &self,
        session: &mut Session,
        f: &mut Folders,
        scope: &Store,
        name: &str,
        mode: Mode,
        cancel: &CancellationToken,
    ) -> Result<bool, SyncError> {
        let account = self.name();
        let ctx = Context {
            store: scope.clone(),
            limits: self.limits,
            budget: self.budget.clone(),
        };
        let mut passes = 0;
        loop {
            self.metrics.state(account, name, "syncing");
            let report = match sync::catch_up(
                session,
                &ctx,
                &self.account,
                name,
                sync::Options::default(),
                cancel,
            )
            .await
            {
                Ok(r) => r,
                Err(
                    e @ (SyncError::Imap(ImapError::Rejected { .. }) | SyncError::Outage { .. }),
                ) => {
                    // a failed EXAMINE leaves nothing selected (RFC 3501)
                    let opened = !matches!(&e, SyncError::Imap(ImapError::Rejected { command, .. }) if command == "EXAMINE" || command == "SELECT");
                    let error = e.to_string();
                    tracing::warn!(account, mailbox = name, error = %error, "folder_unavailable");
                    self.metrics.failure(account, name, &error);
                    f.live.remove(name);
                    // the next sweep must find it changed, whatever it says
                    f.seen.remove(name);
                    let (a, m) = (account.to_string(), name.to_string());
                    self.spawn_store(move |s| async move {
                        s.set_state(&a, &m, "error", Some(&error)).await
                    });
                    return Ok(opened);
                }
                Err(e) => return Err(e),
            };
            if report.stored + report.replaced > 0 {
                tracing::info!(
                    account,
                    mailbox = name,
                    count = report.stored,
                    replaced = report.replaced,
                    last_uid = report.last_uid,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "stored"
                );
            }
            let live = f.live.contains(name);
            self.metrics
                .mirrored(report.flags_changed as u64, report.expunged as u64);
            self.metrics.success(
                account,
                name,
                report.stored as u64,
                report.bytes,
                if live { &report.latencies } else { &[] },
            );
            self.metrics
                .quarantined(account, name, report.quarantined_total as u64);
            let state = match mode {
                Mode::Notify => "notify",
                Mode::StatusPoll => "polling",
            };
            self.metrics.state(account, name, state);
            if !cancel.is_cancelled() {
                let due = f
                    .success_written
                    .get(name)
                    .is_none_or(|t| t.elapsed() >= SUCCESS_EVERY);
                if !live || due {
                    f.success_written.insert(name.to_string(), Instant::now());
                    let (a, m) = (account.to_string(), name.to_string());
                    let first = !live;
                    self.spawn_store(move |s| async move {
                        if first {
                            s.set_state(&a, &m, state, None).await?;
                        }
                        s.mark_success(&a, &m).await
                    });
                }
            }
            if !live {
                f.live.insert(name.to_string());
                tracing::info!(
                    account,
                    mailbox = name,
                    mode = mode.label(),
                    last_uid = report.last_uid,
                    "watching"
                );
            }
            if cancel.is_cancelled() || !session.take_changed() {
                return Ok(true);
            }
            if passes >= MAX_IMMEDIATE_PASSES {
                // news still: the folder's turn comes again after the others'
                f.dirty.insert(name.to_string());
                return Ok(true);
            }
            passes += 1;
        }
    }

    /// One follower session: Ok(()) only when cancelled.
    async fn follow(
        &self,
        f: &mut Folders,
        w: &mut Watchers,
        scope: &Store,
        cancel: &CancellationToken,
        healthy_since: &mut Option<Instant>,
    ) -> Result<(), SyncError> {
        let account = self.name();
        let settings = &self.account.settings;
        let mut session = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            s = Session::connect(&self.account) => s?,
        };
        *healthy_since = Some(Instant::now());
        let prefix = folders::personal_prefix(&session.namespaces().await?);
        let mode = if session.has_capability("NOTIFY") {
            match session.notify_set().await {
                Ok(()) => Mode::Notify,
                Err(ImapError::Rejected { text, .. }) => {
                    tracing::warn!(account, text, "notify_refused");
                    Mode::StatusPoll
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            Mode::StatusPoll
        };
        let list_status = session.has_capability("LIST-STATUS");
        tracing::info!(account, host = %self.account.host, port = self.account.port, mode = mode.label(), list_status, namespace = prefix.as_deref().unwrap_or(""), "follower_connected");
        // The snapshot comes before the catch-ups: mail arriving after it shows in the next
        // sweep or NOTIFY event, never between the two.
        let found = self.discover(&mut session, &f.ids).await?;
        let recheck = self
            .apply(found, prefix.as_deref(), mode, f, w, cancel)
            .await;
        if !list_status {
            self.sweep(&mut session, f, false).await?;
        }
        // anything may have arrived while this connection was down
        f.dirty.extend(f.plan.shared().cloned());
        let sweep_every = match mode {
            Mode::Notify => settings.discover_interval,
            Mode::StatusPoll => settings.poll_interval,
        };
        let now = tokio::time::Instant::now();
        let (mut next_sweep, mut next_discover) =
            (now + sweep_every, now + settings.discover_interval);
        if recheck {
            next_discover = now + RECHECK_AFTER;
        }
        let mut selected: Option<String> = None;
        // a catch-up ran on this connection since it last waited
        let mut caught_up = false;
        let mut rediscover = false;
        loop {
            while let Some(name) = f.dirty.pop_first() {
                if cancel.is_cancelled() {
                    session.logout(LOGOUT_TIMEOUT).await;
                    return Ok(());
                }
                let opened = self
                    .catch_up(&mut session, f, scope, &name, mode, cancel)
                    .await?;
                f.caught_up_at.insert(name.clone(), Instant::now());
                selected = opened.then_some(name);
                caught_up = true;
                rediscover |= self.absorb(&mut session, f);
                while let Some(joined) = w.tasks.try_join_next() {
                    self.reaped(w, joined);
                }
            }
            if cancel.is_cancelled() {
                session.logout(LOGOUT_TIMEOUT).await;
                return Ok(());
            }
            if rediscover {
                rediscover = false;
                let found = self.discover(&mut session, &f.ids).await?;
                if self
                    .apply(found, prefix.as_deref(), mode, f, w, cancel)
                    .await
                {
                    next_discover = next_discover.min(tokio::time::Instant::now() + RECHECK_AFTER);
                }
                rediscover |= self.absorb(&mut session, f);
                continue;
            }
            if caught_up && mode == Mode::Notify {
                caught_up = false;
                // NOTIFY is prompt only for a connection with nothing selected
                if let Some(name) = selected.take() {
                    // flag changes and expunges of that folder announced meanwhile are
                    // written before UNSELECT ends its numbering
                    crate::mirror::apply_pending(&mut session, scope, &self.account.name).await?;
                    // news of that folder announced meanwhile is its own wake-up
                    let mut changed = session.take_changed();
                    match session.unselect().await {
                        Ok(true) => changed |= session.take_changed(),
                        Ok(false) => selected = Some(name.clone()),
                        // BAD "No mailbox selected": nothing was
                        Err(ImapError::Rejected { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    if changed {
                        f.dirty.insert(name);
                    }
                }
                // and Dovecot holds back (up to 30 s) what happened while a folder was
                // selected: one sweep now finds it (one LIST-STATUS: 14 ms for 200 folders)
                self.sweep(&mut session, f, list_status).await?;
                rediscover |= self.absorb(&mut session, f);
                if !f.dirty.is_empty() || rediscover {
                    continue;
                }
            }
            let deadline = next_sweep.min(next_discover);
            let end = tokio::select! {
                end = session.wait_news(deadline, cancel) => end?,
                Some(joined) = w.tasks.join_next(), if !w.tasks.is_empty() => {
                    self.reaped(w, joined);
                    continue;
                }
            };
            match end {
                WaitEnd::Cancelled => {
                    session.logout(LOGOUT_TIMEOUT).await;
                    return Ok(());
                }
                WaitEnd::News => {
                    rediscover |= self.absorb(&mut session, f);
                    if session.take_changed() {
                        // the folder still selected (the last one caught up) changed
                        if let Some(name) = &selected {
                            f.dirty.insert(name.clone());
                        }
                    }
                }
                WaitEnd::Deadline => {
                    let now = tokio::time::Instant::now();
                    if now >= next_discover || (now >= next_sweep && list_status) {
                        let found = self.discover(&mut session, &f.ids).await?;
                        let recheck = self
                            .apply(found, prefix.as_deref(), mode, f, w, cancel)
                            .await;
                        next_discover = now
                            + if recheck {
                                RECHECK_AFTER
                            } else {
                                settings.discover_interval
                            };
                        if list_status {
                            next_sweep = now + sweep_every;
                        }
                    }
                    if now >= next_sweep {
                        self.sweep(&mut session, f, false).await?;
                        next_sweep = now + sweep_every;
                    }
                    if !session.condstore() {
                        let every = settings.flag_scan_interval;
                        let due: Vec<String> = f
                            .plan
                            .shared()
                            .filter(|n| {
                                f.caught_up_at.get(*n).is_some_and(|t| t.elapsed() >= every)
                            })
                            .cloned()
                            .collect();
                        f.dirty.extend(due);
                    }
                    rediscover |= self.absorb(&mut session, f);
                    self.sweep_succeeded(f);
                }
            }
        }
    }

    /// A sweep that answered is a success for every shared folder that is caught up (for
    /// `status`: a quiet folder is not a stale one), written at most once per
    /// [`SUCCESS_EVERY`], in one write.
    fn sweep_succeeded(&self, f: &mut Folders) {
        if f.sweep_success_at
            .is_some_and(|t| t.elapsed() < SUCCESS_EVERY)
        {
            return;
        }
        f.sweep_success_at = Some(Instant::now());
        let names: Vec<String> = f
            .plan
            .shared()
            .filter(|n| f.live.contains(*n) && !f.dirty.contains(*n))
            .cloned()
            .collect();
        if names.is_empty() {
            return;
        }
        for name in &names {
            self.metrics.success(&self.account.name, name, 0, 0, &[]);
        }
        let account = self.account.name.clone();
        self.spawn_store(move |s| async move { s.mark_success_many(&account, &names).await });
    }
}
