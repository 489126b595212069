//! One mailbox's life: connect, catch up, wait for news (IDLE, or NOOP polling where the server
//! has no IDLE or `idle = false`), catch up again. Any error ends the session: it is logged,
//! classified, and the task reconnects after a backoff (long for rejected credentials).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::config::Account;
use crate::error::ErrorClass;
use crate::imap::{IdleEnd, ImapError, Session};
use crate::metrics::Metrics;
use crate::pipeline::{Context, SyncError};
use crate::sync;

/// Catch-ups run back to back because the server announced news during the previous one,
/// before the session idles anyway.
const MAX_IMMEDIATE_PASSES: u32 = 3;

/// How long LOGOUT may take when a session ends on purpose.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a mailbox task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown or reload asked it to stop.
    Cancelled,
    /// Nothing will change until the operator acts.
    Fatal(String),
    /// `[cluster]`: a write was refused by the lease fence; the mailbox is another
    /// replica's now.
    Fenced(String),
}

#[derive(Clone)]
pub struct MailboxTask {
    pub account: Account,
    pub mailbox: String,
    /// This mailbox's own store scope ([`crate::store::Store::scoped`]), limits and budget.
    pub ctx: Context,
    pub metrics: Arc<Metrics>,
    pub policy: BackoffPolicy,
    /// When `last_success_at` was last written: at most once per [`SUCCESS_EVERY`], so that a
    /// thousand polling mailboxes do not each write after every quiet pass.
    pub success_written: Arc<std::sync::Mutex<Option<Instant>>>,
}

/// How often a run of successful passes refreshes `last_success_at` in `mailboxes`.
pub const SUCCESS_EVERY: Duration = Duration::from_secs(60);

impl MailboxTask {
    fn name(&self) -> &str {
        &self.account.name
    }

    /// Records the state for readers of `mailboxes`, without ever holding up the task (the
    /// database may be the thing that is down).
    fn record_state(&self, state: &'static str, error: Option<String>) {
        if error.is_some() {
            // the next success must be written at once, or `status` would see the error as newer
            *crate::error::lock(&self.success_written) = None;
        }
        let (store, account, mailbox) = (
            self.ctx.store.clone(),
            self.account.name.clone(),
            self.mailbox.clone(),
        );
        tokio::spawn(async move {
            let _ = store
                .set_state(&account, &mailbox, state, error.as_deref())
                .await;
        });
    }

    /// Records a pass that ended well (`last_success_at`, for `status`), likewise in the
    /// background, at most once per [`SUCCESS_EVERY`] (`status` judges staleness in minutes).
    fn record_success(&self) {
        {
            let mut last = crate::error::lock(&self.success_written);
            if last.is_some_and(|t| t.elapsed() < SUCCESS_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (store, account, mailbox) = (
            self.ctx.store.clone(),
            self.account.name.clone(),
            self.mailbox.clone(),
        );
        tokio::spawn(async move {
            let _ = store.mark_success(&account, &mailbox).await;
        });
    }

    /// Runs until `cancel` fires or a fatal error; reconnects after every other error.
    pub async fn run(self, cancel: CancellationToken) -> Exit {
        let mut backoff = Backoff::new(self.policy);
        let mut rng = rand::rngs::StdRng::from_entropy();
        let (account, mailbox) = (self.name().to_string(), self.mailbox.clone());
        loop {
            if cancel.is_cancelled() {
                return Exit::Cancelled;
            }
            // A write of the last session that timed out may still be running: let it end
            // before anything of the next one is read or written.
            tokio::select! {
                _ = cancel.cancelled() => return Exit::Cancelled,
                _ = self.ctx.store.settle() => {}
            }
            let mut healthy_since = None;
            let error = match self.session(&cancel, &mut healthy_since).await {
                Ok(()) => return Exit::Cancelled,
                Err(e) => e,
            };
            let class = error.class();
            let text = error.to_string();
            if error.is_fenced() {
                // no state is written: the mailbox's document is the new holder's
                tracing::error!(account, mailbox, error = %text, "lease_lost_fenced");
                return Exit::Fenced(text);
            }
            self.metrics.failure(&account, &mailbox, &text);
            self.record_state("error", Some(text.clone()));
            if class == ErrorClass::Fatal {
                tracing::error!(account, mailbox, error = %text, "mailbox_stopped");
                return Exit::Fatal(text);
            }
            backoff.session_ended(
                healthy_since
                    .map(|t: Instant| t.elapsed())
                    .unwrap_or_default(),
            );
            let delay = backoff.next_delay(class, &mut rng);
            if class == ErrorClass::RetryLater {
                tracing::error!(account, mailbox, error = %text, "rejected");
            } else {
                tracing::warn!(account, mailbox, error = %text, "disconnected");
            }
            tracing::info!(
                account,
                mailbox,
                delay_ms = delay.as_millis() as u64,
                attempt = backoff.failures(),
                "backoff"
            );
            tokio::select! {
                _ = cancel.cancelled() => return Exit::Cancelled,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// POP3: a poll (its own connection) every `poll_interval`. Ok(()) only when cancelled.
    async fn pop3_polls(
        &self,
        cancel: &CancellationToken,
        healthy_since: &mut Option<Instant>,
    ) -> Result<(), SyncError> {
        let account = self.name();
        loop {
            self.metrics.state(account, "INBOX", "syncing");
            let report = crate::pop3::pass::poll(&self.account, &self.ctx, cancel).await?;
            if !cancel.is_cancelled() {
                self.record_success();
            }
            if report.stored + report.replaced > 0 {
                tracing::info!(
                    account,
                    mailbox = "INBOX",
                    count = report.stored,
                    replaced = report.replaced,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "stored"
                );
            }
            self.metrics
                .success(account, "INBOX", report.stored as u64, report.bytes, &[]);
            if healthy_since.is_none() {
                *healthy_since = Some(Instant::now());
                self.record_state("polling", None);
                tracing::info!(account, mailbox = "INBOX", mode = "pop3", "watching");
            }
            self.metrics.state(account, "INBOX", "polling");
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.account.settings.poll_interval) => {}
            }
        }
    }

    /// One session: Ok(()) only when cancelled.
    async fn session(
        &self,
        cancel: &CancellationToken,
        healthy_since: &mut Option<Instant>,
    ) -> Result<(), SyncError> {
        if self.account.protocol == crate::config::Protocol::Pop3 {
            return self.pop3_polls(cancel, healthy_since).await;
        }
        let (account, mailbox) = (self.name(), self.mailbox.as_str());
        let settings = &self.account.settings;
        self.metrics.state(account, mailbox, "connecting");
        let mut session = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            s = Session::connect(&self.account) => s?,
        };
        let mut use_idle = settings.idle && session.has_capability("IDLE");
        tracing::info!(account, mailbox, host = %self.account.host, port = self.account.port, idle = use_idle, "connected");
        // Healthy from the login on: a long, productive catch-up that then breaks must reset
        // the backoff too (only sessions that last `healthy_after` do).
        *healthy_since = Some(Instant::now());
        let mut watching = false;
        let mut live = false;
        let mut immediate = 0;
        loop {
            self.metrics.state(account, mailbox, "syncing");
            let report = sync::catch_up(
                &mut session,
                &self.ctx,
                &self.account,
                mailbox,
                sync::Options::default(),
                cancel,
            )
            .await?;
            if !cancel.is_cancelled() {
                self.record_success();
            }
            self.metrics
                .quarantined(account, mailbox, report.quarantined_total as u64);
            if report.stored + report.replaced > 0 {
                tracing::info!(
                    account,
                    mailbox,
                    count = report.stored,
                    replaced = report.replaced,
                    last_uid = report.last_uid,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "stored"
                );
            }
            self.metrics
                .mirrored(report.flags_changed as u64, report.expunged as u64);
            self.metrics.success(
                account,
                mailbox,
                report.stored as u64,
                report.bytes,
                if live { &report.latencies } else { &[] },
            );
            live = true;
            if cancel.is_cancelled() {
                session.logout(LOGOUT_TIMEOUT).await;
                return Ok(());
            }
            if !watching {
                watching = true;
                self.record_state(if use_idle { "idle" } else { "polling" }, None);
                tracing::info!(
                    account,
                    mailbox,
                    mode = if use_idle { "idle" } else { "poll" },
                    last_uid = report.last_uid,
                    "watching"
                );
            }
            // News announced inside the responses of the pass (Cyrus, Gmail) is not announced
            // again when IDLE starts: catch up again at once.
            // (at most a few times in a row: a server that repeats EXISTS in every response
            // must not keep the session from idling)
            if session.take_changed() && immediate < MAX_IMMEDIATE_PASSES {
                immediate += 1;
                tracing::debug!(account, mailbox, "changed_during_catch_up");
                continue;
            }
            immediate = 0;
            if use_idle {
                self.metrics.state(account, mailbox, "idle");
                // without CONDSTORE a flag change made while nobody watched is found only
                // by the flag scan: a pass at least every flag_scan_interval runs it
                let refresh = if session.condstore() {
                    settings.idle_refresh
                } else {
                    settings.idle_refresh.min(settings.flag_scan_interval)
                };
                match session
                    .idle(refresh, settings.silence_timeout, cancel)
                    .await
                {
                    Ok(IdleEnd::Changed) => tracing::debug!(account, mailbox, "new_mail"),
                    Ok(IdleEnd::Refresh) => tracing::debug!(account, mailbox, "idle_refreshed"),
                    Ok(IdleEnd::Cancelled) => {
                        session.logout(LOGOUT_TIMEOUT).await;
                        return Ok(());
                    }
                    Err(ImapError::Rejected { command, text, .. }) if command == "IDLE" => {
                        tracing::warn!(account, mailbox, text, "idle_refused");
                        use_idle = false;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                self.metrics.idle_cycle();
            } else {
                self.metrics.state(account, mailbox, "polling");
                tokio::select! {
                    _ = cancel.cancelled() => {
                        session.logout(LOGOUT_TIMEOUT).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                }
                // NOOP proves the connection alive; the catch-up that follows decides.
                session.noop().await?;
            }
        }
    }
}
