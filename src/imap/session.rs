//! One logged-in IMAP connection and the checked commands mailpump needs: CAPABILITY, ID,
//! EXAMINE/SELECT, UID SEARCH, UID FETCH (sizes, then bodies), UID STORE, LOGOUT.
//!
//! **Invariant:** at most one command is in flight besides a body FETCH sent ahead of its
//! turn ([`Session::fetch_bodies_then`]); every other command reads that one to its end first,
//! so the stream never gets out of step.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_imap::imap_proto::{self, AttributeValue, MailboxDatum, Response, ResponseCode, Status};
use chrono::{DateTime, FixedOffset, NaiveDate};
use tokio::io::BufWriter;

use super::changes::Changes;
use super::listing::{self, ListEntry, Listing, Namespace, StatusEntry};
use super::sanitize::{Captured, Sanitize, CAPTURED_MARK};
use super::{starttls, utf7, ImapError};
use crate::config::{Account, Security};
use crate::net::{self, NetError, Transport};
use crate::pipeline::FetchedMessage;

type Stream = BufWriter<Sanitize<Transport>>;

/// What EXAMINE (or SELECT) reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxInfo {
    pub uidvalidity: u32,
    pub uidnext: Option<u32>,
    pub exists: u32,
    /// `[HIGHESTMODSEQ n]`: CONDSTORE is in force for this mailbox (`[NOMODSEQ]`: None).
    pub highest_modseq: Option<u64>,
    /// It was opened with `(QRESYNC (uidvalidity modseq))` for its own UIDVALIDITY: the
    /// server reported every change since that MODSEQ ([`Session::take_changes`]).
    pub resynced: bool,
}

/// Why an IDLE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleEnd {
    /// The server announced a change (EXISTS, RECENT, EXPUNGE, FETCH, VANISHED).
    Changed,
    /// `idle_refresh` passed: re-issue IDLE (RFC 2177 asks for less than 29 minutes).
    Refresh,
    /// Shutdown was requested.
    Cancelled,
}

/// A logged-in session. Every read is bounded by `command_timeout`.
pub struct Session {
    inner: async_imap::Session<Stream>,
    capabilities: HashSet<String>,
    timeout: Duration,
    /// The server announced a change (EXISTS, RECENT, EXPUNGE, VANISHED, or a FETCH nobody asked
    /// for) inside the response to some command since the mailbox was last opened. Cyrus, Gmail
    /// and most servers announce new mail there, at the start of whatever response comes next,
    /// and not again when IDLE starts: forgetting it would leave the mail waiting until the
    /// next event or the IDLE refresh.
    changed: bool,
    /// LIST, STATUS and NAMESPACE responses taken out of the stream by `sanitize`.
    captured: Captured,
    /// Those that arrived outside a command that asked for them (NOTIFY's news): kept for
    /// [`Session::take_listings`] while a LIST or STATUS of ours runs.
    held: Vec<Listing>,
    /// The mailbox opened last (name, UIDVALIDITY), until another is opened or UNSELECT.
    selected: Option<(String, u32)>,
    /// Flag changes and expunges announced for `selected` ([`Session::take_changes`]).
    changes: Changes,
    /// A FETCH of ours for flags is running: its FETCH responses are its own, not news.
    scanning: bool,
    /// `ENABLE QRESYNC` succeeded: EXAMINE takes `(QRESYNC (uidvalidity modseq))`, expunges
    /// come as VANISHED, every FETCH carries UID and MODSEQ.
    qresync: bool,
    /// CONDSTORE is usable (enabled, or asked for by `EXAMINE x (CONDSTORE)`).
    condstore: bool,
    /// Mailboxes opened in this session (see [`Session::first_look`]).
    looked_at: HashSet<String>,
    /// What the last opening of each mailbox reported: UIDVALIDITY, EXISTS, UIDNEXT. An
    /// opening that finds the mailbox shrunk (see [`shrank`]) asks for a UID comparison.
    opened: HashMap<String, (u32, u32, Option<u32>)>,
    /// A SELECT/EXAMINE of another mailbox than the one selected is running: what the server
    /// sends before `[CLOSED]` (RFC 7162 3.2.11) is about the old one and is not taken.
    opening_other: bool,
    /// Mailboxes whose UIDs must be compared at their next pass (an EXPUNGE named none).
    compare_due: HashSet<String>,
    /// The server refused a SELECT/EXAMINE with a `(QRESYNC ...)` or `(CONDSTORE)` parameter:
    /// plain ones from then on (and no CONDSTORE: CHANGEDSINCE would go the same way).
    no_select_parameters: bool,
    /// A body FETCH sent ahead of its turn ([`Session::fetch_bodies_then`]): the server works
    /// on it while the one before is read. Any other command first reads it to its end.
    ahead: Option<Ahead>,
    /// The server answered pipelined FETCHes out of order or interleaved: no more of them
    /// in this session.
    no_pipelining: bool,
    /// `user@host:port`, for what is remembered of the server beyond one session.
    key: String,
}

/// Accounts (`user@host:port`) whose server timed out on a pipelined FETCH: they get none
/// for the rest of the process.
static NO_PIPELINING: std::sync::LazyLock<std::sync::Mutex<HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);

fn pipelining_allowed(key: &str) -> bool {
    !crate::error::lock(&NO_PIPELINING).contains(key)
}

fn forbid_pipelining(key: &str) {
    if crate::error::lock(&NO_PIPELINING).insert(key.to_string()) {
        tracing::warn!(server = key, "pipelining_disabled");
    }
}

/// A body FETCH sent before its turn.
#[derive(Debug)]
struct Ahead {
    tag: imap_proto::RequestId,
    verb: String,
    uids: Vec<u32>,
    /// Its tagged reply, or some of its FETCH responses, were read while another command was
    /// being read: what it fetched is not all there, it is asked again.
    spoiled: bool,
    /// Its tagged reply was read already.
    done: bool,
}

/// At most this many captured responses wait to be read (a server that streams STATUS lines
/// nobody asked for must not grow memory); the oldest go first.
const MAX_WAITING_LISTINGS: usize = 100_000;

/// Why [`Session::wait_news`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// The server sent something about the folders (NOTIFY's STATUS or LIST, or a change of
    /// the selected mailbox): read it with [`Session::take_listings`] / `take_changed`.
    News,
    /// The deadline passed.
    Deadline,
    /// Shutdown was requested.
    Cancelled,
}

/// Hints added to errors for providers with known requirements (docs/imap-servers.md).
fn login_hint(host: &str) -> &'static str {
    let host = host.to_ascii_lowercase();
    if host.ends_with("qq.com") {
        " (QQ Mail: switch IMAP/POP3 on in the web settings and use the generated authorization code, not the login password)"
    } else if host.ends_with("163.com") || host.ends_with("126.com") || host.ends_with("yeah.net") {
        " (NetEase: enable IMAP in the web settings and use the client authorization password)"
    } else if host.ends_with("gmail.com") || host.ends_with("googlemail.com") {
        " (Gmail: use an app password)"
    } else {
        ""
    }
}

struct PlainAuth<'a> {
    user: &'a str,
    password: &'a str,
}

impl async_imap::Authenticator for PlainAuth<'_> {
    type Response = Vec<u8>;
    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.user.len() + self.password.len() + 2);
        out.push(0);
        out.extend_from_slice(self.user.as_bytes());
        out.push(0);
        out.extend_from_slice(self.password.as_bytes());
        out
    }
}

/// Awaits `read` (a `read_response()`) under `timeout`, returning the error from the enclosing
/// function when it times out, fails or meets EOF. A macro because async-imap's ResponseData
/// cannot be named outside that crate.
macro_rules! next_response {
    ($read:expr, $timeout:expr, $what:expr) => {
        match tokio::time::timeout($timeout, $read).await {
            Err(_) => {
                return Err(NetError::Timeout {
                    what: $what.into(),
                    after: $timeout,
                }
                .into())
            }
            Ok(Err(e)) => return Err(ImapError::from_read(e)),
            Ok(Ok(None)) => return Err(NetError::Closed.into()),
            Ok(Ok(Some(r))) => r,
        }
    };
}

/// A tagged NO/BAD to `command`, as an error.
fn rejected(
    command: &str,
    status: &Status,
    information: Option<&str>,
    hint: &'static str,
) -> ImapError {
    ImapError::Rejected {
        command: command.to_string(),
        status: status_word(status),
        text: clean_status_text(information.unwrap_or("")),
        hint,
    }
}

/// An untagged BYE, as an error.
fn bye(information: Option<&str>) -> ImapError {
    ImapError::Bye(information.unwrap_or("").to_string())
}

fn status_word(status: &Status) -> &'static str {
    match status {
        Status::Ok => "OK",
        Status::No => "NO",
        Status::Bad => "BAD",
        Status::PreAuth => "PREAUTH",
        Status::Bye => "BYE",
    }
}

fn map_async_imap(err: async_imap::error::Error) -> ImapError {
    use async_imap::error::Error as E;
    match err {
        E::Io(e) => NetError::Io(e).into(),
        E::ConnectionLost => NetError::Closed.into(),
        E::Bad(t) => ImapError::Protocol(format!("BAD {t}")),
        E::No(t) => ImapError::Protocol(format!("NO {t}")),
        other => ImapError::Protocol(other.to_string()),
    }
}

/// Formats sorted UIDs as an IMAP sequence set: `1:5,7,9:12`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// `SINCE 14-Jun-2015` wants English month names whatever the locale.
pub fn imap_date(date: NaiveDate) -> String {
    date.format("%d-%b-%Y").to_string()
}

fn parse_internal_date(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_str(s.trim(), "%d-%b-%Y %H:%M:%S %z").ok()
}

type Client = async_imap::Client<Stream>;
type Inner = async_imap::Session<Stream>;

/// LOGIN, or AUTHENTICATE PLAIN for 8-bit credentials.
async fn password_login(client: Client, account: &Account) -> Result<Inner, ImapError> {
    let timeout = account.settings.command_timeout;
    let user = account.username.as_str();
    let password = account.password.expose();
    let plain_login_ok =
        user.is_ascii() && password.is_ascii() && !password.contains(['\r', '\n', '\0']);
    let login = async {
        if plain_login_ok {
            client.login(user, password).await
        } else {
            // LOGIN's quoted strings cannot carry 8-bit text: RFC 4616 PLAIN sends UTF-8.
            client
                .authenticate("PLAIN", PlainAuth { user, password })
                .await
        }
    };
    match tokio::time::timeout(timeout, login).await {
        Err(_) => Err(NetError::Timeout {
            what: "the login reply".into(),
            after: timeout,
        }
        .into()),
        Ok(Ok(session)) => Ok(session),
        Ok(Err((async_imap::error::Error::No(text), _)))
        | Ok(Err((async_imap::error::Error::Bad(text), _))) => Err(ImapError::AuthRejected {
            user: user.to_string(),
            text: clean_status_text(&text),
            hint: login_hint(&account.host),
        }),
        Ok(Err((e, _))) => Err(map_async_imap(e)),
    }
}

/// The hint on an OAuth2 login the server refused twice.
const OAUTH_REFUSED_HINT: &str = " (the server refused the OAuth2 access token even after a refresh: check that `username` is the account that gave consent, the scope (Gmail https://mail.google.com/, Microsoft IMAP.AccessAsUser.All / POP.AccessAsUser.All) and that IMAP/POP is enabled for the mailbox)";

/// The SASL exchange of XOAUTH2 / OAUTHBEARER: the initial response (when not sent with the
/// command, SASL-IR), then an empty answer to the server's error challenge, which it follows
/// with its tagged NO.
struct BearerAuth<'a> {
    initial: Option<Vec<u8>>,
    challenge: &'a mut Option<Vec<u8>>,
}

impl async_imap::Authenticator for BearerAuth<'_> {
    type Response = Vec<u8>;
    fn process(&mut self, challenge: &[u8]) -> Vec<u8> {
        if let Some(initial) = self.initial.take() {
            return initial;
        }
        *self.challenge = Some(challenge.to_vec());
        Vec::new()
    }
}

/// How one AUTHENTICATE with a bearer token ended.
enum BearerOutcome {
    LoggedIn(Inner),
    /// The server refused the token (error challenge and NO): refresh and try again.
    Refused {
        client: Client,
        why: String,
    },
}

/// The capability name of an IMAP capability.
fn capability_name(c: &imap_proto::Capability<'_>) -> String {
    match c {
        imap_proto::Capability::Imap4rev1 => "IMAP4REV1".to_string(),
        imap_proto::Capability::Auth(a) => format!("AUTH={}", a.to_ascii_uppercase()),
        imap_proto::Capability::Atom(a) => a.to_ascii_uppercase(),
    }
}

/// CAPABILITY before login, by hand (async-imap's Client has no checked version of it).
async fn pre_auth_capabilities(
    client: &mut Client,
    timeout: Duration,
) -> Result<HashSet<String>, ImapError> {
    // async-imap's Client keeps its tagged run_command to itself: write the command under a
    // tag of our own (its own tags are A0001...; nothing of its is pending before login).
    const TAG: &str = "MPCAP";
    let write = async {
        use tokio::io::AsyncWriteExt;
        let w = client.get_mut();
        w.write_all(format!("{TAG} CAPABILITY\r\n").as_bytes())
            .await?;
        w.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Err(_) => {
            return Err(NetError::Timeout {
                what: "sending CAPABILITY".into(),
                after: timeout,
            }
            .into())
        }
        Ok(Err(e)) => return Err(NetError::Io(e).into()),
        Ok(Ok(())) => {}
    }
    let mut caps = HashSet::new();
    loop {
        let response = next_response!(client.read_response(), timeout, "the reply to CAPABILITY");
        match response.parsed() {
            Response::Capabilities(list) => caps.extend(list.iter().map(capability_name)),
            Response::Done {
                tag: t,
                status,
                outcome,
            } if t.0 == TAG => {
                return match status {
                    Status::Ok => Ok(caps),
                    other => Err(rejected(
                        "CAPABILITY",
                        other,
                        outcome.information.as_deref(),
                        "",
                    )),
                }
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => return Err(bye(outcome.information.as_deref())),
            _ => {}
        }
    }
}

/// One AUTHENTICATE with `token`.
async fn bearer_attempt(
    client: Client,
    account: &Account,
    mechanism: crate::config::Mechanism,
    token: &crate::oauth::AccessToken,
    sasl_ir: bool,
) -> Result<BearerOutcome, ImapError> {
    use crate::oauth::sasl;
    let timeout = account.settings.command_timeout;
    let user = account.username.as_str();
    let mut challenge = None;
    let (command, initial) = if sasl_ir {
        let encoded = sasl::encoded_initial_response(
            mechanism,
            user,
            &account.host,
            account.port,
            &token.secret,
        );
        (format!("{} {}", mechanism.name(), encoded.expose()), None)
    } else {
        let raw =
            sasl::initial_response(mechanism, user, &account.host, account.port, &token.secret);
        (
            mechanism.name().to_string(),
            Some(raw.expose().as_bytes().to_vec()),
        )
    };
    let auth = BearerAuth {
        initial,
        challenge: &mut challenge,
    };
    let outcome = tokio::time::timeout(timeout, client.authenticate(command, auth)).await;
    let why = |text: &str, challenge: &Option<Vec<u8>>| {
        let text = clean_status_text(text);
        match challenge {
            Some(c) => format!("{text} ({})", sasl::describe_challenge(c)),
            None => text,
        }
    };
    match outcome {
        Err(_) => Err(NetError::Timeout {
            what: "the AUTHENTICATE reply".into(),
            after: timeout,
        }
        .into()),
        Ok(Ok(session)) => Ok(BearerOutcome::LoggedIn(session)),
        Ok(Err((async_imap::error::Error::No(text), client))) => {
            let lower = text.to_ascii_lowercase();
            if challenge.is_none() && (lower.contains("unavailable") || lower.contains("temporary"))
            {
                // Dovecot's answer when it cannot reach the identity provider: not our token.
                return Err(ImapError::Rejected {
                    command: "AUTHENTICATE".into(),
                    status: "NO",
                    text: clean_status_text(&text),
                    hint: " (the server could not check the token just now)",
                });
            }
            Ok(BearerOutcome::Refused {
                client,
                why: why(&text, &challenge),
            })
        }
        Ok(Err((async_imap::error::Error::Bad(text), _))) => Err(ImapError::AuthRejected {
            user: user.to_string(),
            text: format!("BAD {}", why(&text, &challenge)),
            hint: "",
        }),
        Ok(Err((e, _))) => Err(map_async_imap(e)),
    }
}

/// AUTHENTICATE XOAUTH2 / OAUTHBEARER with the account's cached token; when the server refuses
/// it, once more with a refreshed one. A second refusal is a rejected login.
async fn oauth_login(
    mut client: Client,
    account: &Account,
    mechanism: crate::config::Mechanism,
) -> Result<Inner, ImapError> {
    let caps = pre_auth_capabilities(&mut client, account.settings.command_timeout).await?;
    let wanted = format!("AUTH={}", mechanism.name());
    if !caps.contains(&wanted) {
        let mut offered: Vec<&str> = caps
            .iter()
            .filter_map(|c| c.strip_prefix("AUTH="))
            .collect();
        offered.sort();
        return Err(ImapError::MechanismNotOffered {
            mechanism: mechanism.name(),
            offered: if offered.is_empty() {
                "none".into()
            } else {
                offered.join(" ")
            },
        });
    }
    let sasl_ir = caps.contains("SASL-IR");
    let tokens = crate::oauth::tokens_for(account).ok_or_else(|| {
        ImapError::Protocol("an OAuth2 login for an account without [oauth2]".into())
    })?;
    let token = tokens.token().await?;
    let (client, first) = match bearer_attempt(client, account, mechanism, &token, sasl_ir).await? {
        BearerOutcome::LoggedIn(s) => return Ok(s),
        BearerOutcome::Refused { client, why } => (client, why),
    };
    tracing::info!(account = %account.name, reason = %first, "oauth_token_refused");
    let token = tokens.after_refusal(&token).await?;
    match bearer_attempt(client, account, mechanism, &token, sasl_ir).await? {
        BearerOutcome::LoggedIn(s) => Ok(s),
        BearerOutcome::Refused { why, .. } => Err(ImapError::AuthRejected {
            user: account.username.clone(),
            text: format!("{why}; the OAuth2 token was refused again after a refresh"),
            hint: OAUTH_REFUSED_HINT,
        }),
    }
}

impl Session {
    /// Connects, negotiates TLS as configured, reads the greeting, logs in, reads CAPABILITY
    /// and sends ID where offered (163.com refuses SELECT without it).
    pub async fn connect(account: &Account) -> Result<Session, ImapError> {
        let connect_timeout = account.settings.connect_timeout;
        let tcp = net::tcp_connect(&account.host, account.port, connect_timeout).await?;
        let (transport, greeting_read) = match account.security {
            Security::Plain => (Transport::Plain(tcp), false),
            Security::Tls => (
                net::tls_handshake(tcp, &account.host, &account.tls, connect_timeout).await?,
                false,
            ),
            Security::StartTls => (
                starttls::starttls(tcp, &account.host, &account.tls, connect_timeout).await?,
                true,
            ),
        };
        Self::establish(transport, greeting_read, account).await
    }

    /// Greeting (unless STARTTLS already read it), login, CAPABILITY, ID over `transport`.
    pub(crate) async fn establish(
        transport: Transport,
        greeting_read: bool,
        account: &Account,
    ) -> Result<Session, ImapError> {
        let timeout = account.settings.command_timeout;
        let connect_timeout = account.settings.connect_timeout;
        let sanitize = Sanitize::new(transport);
        let captured = sanitize.captured();
        let mut client = async_imap::Client::new(BufWriter::new(sanitize));
        if !greeting_read {
            // async-imap does not read the greeting itself; authenticate() hangs without this.
            let greeting = next_response!(
                client.read_response(),
                connect_timeout,
                "the server greeting"
            );
            match greeting.parsed() {
                Response::Data {
                    status: Status::Ok | Status::PreAuth,
                    ..
                } => {}
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => return Err(bye(outcome.information.as_deref())),
                other => {
                    return Err(ImapError::Protocol(format!(
                        "unexpected greeting {other:?}"
                    )))
                }
            }
        }

        let inner = match &account.oauth2 {
            Some(oauth) => oauth_login(client, account, oauth.mechanism).await?,
            None => password_login(client, account).await?,
        };

        let mut session = Session {
            inner,
            capabilities: HashSet::new(),
            timeout,
            changed: false,
            captured,
            held: Vec::new(),
            selected: None,
            changes: Changes::default(),
            scanning: false,
            qresync: false,
            condstore: false,
            looked_at: HashSet::new(),
            opened: HashMap::new(),
            opening_other: false,
            compare_due: HashSet::new(),
            no_select_parameters: false,
            ahead: None,
            no_pipelining: false,
            key: format!("{}@{}:{}", account.username, account.host, account.port),
        };
        session.refresh_capabilities().await?;
        if session.has_capability("ID") {
            let id = format!(
                "ID (\"name\" \"mailpump\" \"version\" \"{}\" \"vendor\" \"mailpump\")",
                env!("CARGO_PKG_VERSION")
            );
            // Failure here is survivable; a SELECT refused for want of ID says so below.
            if let Err(e) = session.command(&id, |_| Ok(())).await {
                if !matches!(e, ImapError::Rejected { .. }) {
                    return Err(e);
                }
                tracing::warn!(account = %account.name, error = %e, "id_refused");
            }
        }
        session.enable_modseq(&account.name).await?;
        Ok(session)
    }

    /// `ENABLE QRESYNC` (which brings CONDSTORE), else `ENABLE CONDSTORE`, where offered: from
    /// then on the server reports MODSEQs, and with QRESYNC the UIDs of expunged messages.
    async fn enable_modseq(&mut self, account: &str) -> Result<(), ImapError> {
        let want = if self.has_capability("QRESYNC") {
            "QRESYNC"
        } else if self.has_capability("CONDSTORE") {
            "CONDSTORE"
        } else {
            return Ok(());
        };
        if !self.has_capability("ENABLE") {
            // CONDSTORE works without ENABLE: `EXAMINE x (CONDSTORE)`
            self.condstore = self.has_capability("CONDSTORE");
            return Ok(());
        }
        let mut enabled = HashSet::new();
        let result = self
            .command(&format!("ENABLE {want}"), |r| {
                if let Response::Capabilities(list) = r {
                    enabled.extend(list.iter().map(capability_name));
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {}
            Err(e @ ImapError::Rejected { .. }) => {
                tracing::warn!(account, error = %e, "enable_refused");
            }
            Err(e) => return Err(e),
        }
        self.qresync = enabled.contains("QRESYNC");
        self.condstore =
            self.qresync || enabled.contains("CONDSTORE") || self.has_capability("CONDSTORE");
        Ok(())
    }

    /// Whether the server reports expunged UIDs itself (QRESYNC enabled).
    pub fn qresync(&self) -> bool {
        self.qresync
    }

    /// True the first time it is asked for `mailbox` in this session: without QRESYNC, what
    /// was expunged while nobody watched is found by one UID comparison per session.
    pub fn first_look(&mut self, mailbox: &str) -> bool {
        self.looked_at.insert(mailbox.to_string())
    }

    /// Asks for a UID comparison of `mailbox` at its next pass in this session.
    pub fn compare_due(&mut self, mailbox: &str) {
        self.compare_due.insert(mailbox.to_string());
    }

    /// Whether a UID comparison of `mailbox` was asked for, and forget it.
    pub fn take_compare_due(&mut self, mailbox: &str) -> bool {
        self.compare_due.remove(mailbox)
    }

    /// Whether the server reports MODSEQs (CONDSTORE).
    pub fn condstore(&self) -> bool {
        self.condstore
    }

    /// The mailbox opened last (name, UIDVALIDITY) and what the server announced about its
    /// messages since (flag changes with their UIDs, expunges), taken. Flag changes announced
    /// by sequence number only are turned into UIDs here, with one `FETCH set (UID FLAGS)`
    /// while the numbering still holds.
    pub async fn take_changes(&mut self) -> Result<Option<(String, u32, Changes)>, ImapError> {
        // what a FETCH sent ahead still carries (EXPUNGEs, flag changes) is part of it
        self.settle_ahead().await?;
        let Some((name, uidvalidity)) = self.selected.clone() else {
            self.changes = Changes::default();
            return Ok(None);
        };
        if !self.changes.seqs.is_empty() {
            let seqs: Vec<u32> = std::mem::take(&mut self.changes.seqs).into_iter().collect();
            let mut found = Vec::new();
            self.scanning = true;
            let result = self
                .command(&format!("FETCH {} (UID FLAGS)", uid_set(&seqs)), |r| {
                    found.extend(flags_of(r));
                    Ok(())
                })
                .await;
            self.scanning = false;
            result?;
            for c in found {
                self.changes.flags.insert(c.uid, (c.flags, c.modseq));
            }
        }
        let changes = std::mem::take(&mut self.changes);
        Ok((!changes.is_empty()).then_some((name, uidvalidity, changes)))
    }

    /// `UID FETCH 1:last_uid (UID FLAGS) (CHANGEDSINCE modseq)`: the messages whose flags
    /// changed since `modseq` (CONDSTORE).
    pub async fn flags_changed_since(
        &mut self,
        last_uid: u32,
        modseq: u64,
    ) -> Result<Vec<crate::store::FlagChange>, ImapError> {
        let mut out = Vec::new();
        if last_uid == 0 {
            return Ok(out);
        }
        self.scanning = true;
        let result = self
            .command(
                &format!("UID FETCH 1:{last_uid} (UID FLAGS) (CHANGEDSINCE {modseq})"),
                |r| {
                    out.extend(flags_of(r));
                    Ok(())
                },
            )
            .await;
        self.scanning = false;
        result?;
        Ok(out)
    }

    /// The flags of every message with a UID in `from..=to` (`UID FETCH from:to (UID FLAGS)`;
    /// servers without CONDSTORE), sorted by UID.
    pub async fn flags_between(
        &mut self,
        from: u32,
        to: u32,
    ) -> Result<Vec<crate::store::FlagChange>, ImapError> {
        let mut out = Vec::new();
        self.scanning = true;
        let result = self
            .command(&format!("UID FETCH {from}:{to} (UID FLAGS)"), |r| {
                out.extend(flags_of(r).filter(|c| c.uid >= from && c.uid <= to));
                Ok(())
            })
            .await;
        self.scanning = false;
        result?;
        out.sort_unstable_by_key(|c| c.uid);
        out.dedup_by_key(|c| c.uid);
        Ok(out)
    }

    /// `UID SEARCH ALL`: every UID in the mailbox, sorted.
    pub async fn all_uids(&mut self) -> Result<Vec<u32>, ImapError> {
        let mut uids = Vec::new();
        self.command("UID SEARCH ALL", |r| {
            if let Response::MailboxData(MailboxDatum::Search(found)) = r {
                uids.extend(found.iter().copied());
            }
            Ok(())
        })
        .await?;
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// The LIST, STATUS and NAMESPACE responses received since the last call, parsed, oldest
    /// first (malformed ones are skipped).
    pub fn take_listings(&mut self) -> Vec<Listing> {
        let mut out = std::mem::take(&mut self.held);
        out.extend(self.captured_now());
        out
    }

    /// What `sanitize` captured since the last look, parsed.
    fn captured_now(&mut self) -> Vec<Listing> {
        let raw: Vec<Vec<u8>> = crate::error::lock(&self.captured).drain(..).collect();
        raw.iter().filter_map(|r| listing::parse(r)).collect()
    }

    /// Keeps what arrived so far for `take_listings`, before a command whose own answers are
    /// read from the capture.
    fn hold_listings(&mut self) {
        let now = self.captured_now();
        self.held.extend(now);
        let excess = self.held.len().saturating_sub(MAX_WAITING_LISTINGS);
        self.held.drain(..excess);
    }

    fn cap_listings(&self) {
        let mut queue = crate::error::lock(&self.captured);
        let excess = queue.len().saturating_sub(MAX_WAITING_LISTINGS);
        queue.drain(..excess);
    }

    /// NAMESPACE's personal namespaces (RFC 2342); empty where the server lacks it.
    pub async fn namespaces(&mut self) -> Result<Vec<Namespace>, ImapError> {
        if !self.has_capability("NAMESPACE") {
            return Ok(Vec::new());
        }
        self.hold_listings();
        self.command("NAMESPACE", |_| Ok(())).await?;
        let mut found = Vec::new();
        for l in self.captured_now() {
            match l {
                Listing::Namespace(ns) => found = ns,
                other => self.held.push(other),
            }
        }
        Ok(found)
    }

    /// Every folder: `LIST "" "*"`, with RFC 6154 special-use attributes and, where the
    /// server has LIST-STATUS (RFC 5819), each folder's STATUS in the same command.
    pub async fn list_folders(&mut self) -> Result<(Vec<ListEntry>, Vec<StatusEntry>), ImapError> {
        let mut returns = Vec::new();
        if self.has_capability("SPECIAL-USE") && self.has_capability("LIST-EXTENDED") {
            returns.push("SPECIAL-USE".to_string());
        }
        if self.has_capability("LIST-STATUS") {
            // not MAILBOXID: Cyrus 3.6 answers it with garbage bytes beside other items
            let items = self.status_items().replace(" MAILBOXID", "");
            returns.push(format!("STATUS ({items})"));
        }
        let command = if returns.is_empty() {
            "LIST \"\" \"*\"".to_string()
        } else {
            format!("LIST \"\" \"*\" RETURN ({})", returns.join(" "))
        };
        self.hold_listings();
        self.command(&command, |_| Ok(())).await?;
        let (mut lists, mut statuses) = (Vec::new(), Vec::new());
        for l in self.captured_now() {
            match l {
                // a rename NOTIFY announced meanwhile: its old name matters to the caller
                Listing::List(e) if e.old_name.is_some() => self.held.push(Listing::List(e)),
                Listing::List(e) => lists.push(e),
                // news of a folder's STATUS meanwhile is among them: the caller compares all
                Listing::Status(s) => statuses.push(s),
                Listing::Namespace(_) => {}
            }
        }
        Ok((lists, statuses))
    }

    /// The STATUS items mailpump asks for.
    fn status_items(&self) -> &'static str {
        match (
            self.has_capability("CONDSTORE"),
            self.has_capability("OBJECTID"),
        ) {
            (true, true) => "MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ MAILBOXID",
            (true, false) => "MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ",
            (false, true) => "MESSAGES UIDNEXT UIDVALIDITY MAILBOXID",
            (false, false) => "MESSAGES UIDNEXT UIDVALIDITY",
        }
    }

    /// `STATUS` of every folder in `names`, pipelined (up to 100 commands per write). A folder
    /// the server refuses (deleted meanwhile) is left out of the answer.
    pub async fn status_many(&mut self, names: &[String]) -> Result<Vec<StatusEntry>, ImapError> {
        // MAILBOXID only on its own: Cyrus 3.6 answers it with garbage bytes beside other items
        let items = self.status_items().replace(" MAILBOXID", "");
        self.status_of(names, &items).await
    }

    /// `STATUS name (MAILBOXID)` (RFC 8474) of every folder in `names`, pipelined.
    pub async fn mailbox_ids(&mut self, names: &[String]) -> Result<Vec<StatusEntry>, ImapError> {
        self.status_of(names, "MAILBOXID").await
    }

    async fn status_of(
        &mut self,
        names: &[String],
        items: &str,
    ) -> Result<Vec<StatusEntry>, ImapError> {
        self.settle_ahead().await?;
        self.hold_listings();
        let asked: HashSet<&String> = names.iter().collect();
        let mut out = Vec::new();
        for chunk in names.chunks(100) {
            let mut tags = Vec::new();
            for name in chunk {
                let command = format!("STATUS {} ({items})", utf7::mailbox_arg(name));
                let tag = match tokio::time::timeout(self.timeout, self.inner.run_command(&command))
                    .await
                {
                    Err(_) => {
                        return Err(NetError::Timeout {
                            what: "sending STATUS".into(),
                            after: self.timeout,
                        }
                        .into())
                    }
                    Ok(Err(e)) => return Err(map_async_imap(e)),
                    Ok(Ok(tag)) => tag,
                };
                tags.push(tag);
            }
            while !tags.is_empty() {
                let response = next_response!(
                    self.inner.read_response(),
                    self.timeout,
                    "the replies to STATUS"
                );
                match response.parsed() {
                    Response::Done {
                        tag,
                        status,
                        outcome,
                    } => {
                        let Some(i) = tags.iter().position(|t| t == tag) else {
                            return Err(ImapError::Protocol(format!(
                                "reply for unknown tag {tag:?} while waiting for STATUS"
                            )));
                        };
                        tags.swap_remove(i);
                        if *status != Status::Ok {
                            tracing::debug!(
                                text = outcome.information.as_deref().unwrap_or(""),
                                "status_refused"
                            );
                        }
                    }
                    Response::Data {
                        status: Status::Bye,
                        outcome,
                    } => return Err(bye(outcome.information.as_deref())),
                    other => {
                        if announces_change(other, false) {
                            self.changed = true;
                        }
                    }
                }
            }
            for l in self.captured_now() {
                match l {
                    Listing::Status(s) if asked.contains(&s.name) => out.push(s),
                    other => self.held.push(other),
                }
            }
        }
        Ok(out)
    }

    /// `NOTIFY SET` (RFC 5465) for new mail, expunges, flag changes and folder changes in every
    /// personal folder. Dovecot then sends `* STATUS` for a folder that changed and `* LIST`
    /// for one created, renamed or deleted.
    pub async fn notify_set(&mut self) -> Result<(), ImapError> {
        self.command(
            "NOTIFY SET (selected (MessageNew MessageExpunge FlagChange)) (personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))",
            |_| Ok(()),
        )
        .await
    }

    /// Leaves the selected folder (UNSELECT, RFC 3691) where the server has it; Dovecot's
    /// NOTIFY is reliably prompt only for a connection with nothing selected.
    pub async fn unselect(&mut self) -> Result<bool, ImapError> {
        if !self.has_capability("UNSELECT") {
            return Ok(false);
        }
        self.command("UNSELECT", |_| Ok(())).await?;
        self.selected = None;
        self.changes = Changes::default();
        Ok(true)
    }

    /// Waits, with no command pending, until the server sends news (a captured LIST or
    /// STATUS, or a change of the selected mailbox), `deadline` passes, or `cancel` fires.
    /// Reading is cancel-safe: partial data stays in async-imap's buffer.
    pub async fn wait_news(
        &mut self,
        deadline: tokio::time::Instant,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<WaitEnd, ImapError> {
        self.settle_ahead().await?;
        self.cap_listings();
        if !self.held.is_empty() || !crate::error::lock(&self.captured).is_empty() || self.changed {
            return Ok(WaitEnd::News);
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(WaitEnd::Cancelled),
                _ = tokio::time::sleep_until(deadline) => return Ok(WaitEnd::Deadline),
                read = self.inner.read_response() => {
                    let response = match read {
                        Err(e) => return Err(ImapError::from_read(e)),
                        Ok(None) => return Err(NetError::Closed.into()),
                        Ok(Some(r)) => r,
                    };
                    match response.parsed() {
                        Response::Data { status: Status::Bye, outcome } => {
                            return Err(bye(outcome.information.as_deref()))
                        }
                        Response::Data { status: Status::Ok, outcome }
                            if outcome.information.as_deref() == Some(CAPTURED_MARK) =>
                        {
                            return Ok(WaitEnd::News)
                        }
                        Response::Done { tag, .. } => {
                            return Err(ImapError::Protocol(format!("a tagged reply {tag:?} with no command pending")))
                        }
                        other if announces_change(other, false) => {
                            self.changes.observe(other);
                            self.changed = true;
                            return Ok(WaitEnd::News);
                        }
                        other => self.changes.observe(other),
                    }
                }
            }
        }
    }

    /// Whether the server announced a change since the mailbox was opened, and forget it.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities.contains(&cap.to_ascii_uppercase())
    }

    async fn refresh_capabilities(&mut self) -> Result<(), ImapError> {
        let mut caps = HashSet::new();
        self.command("CAPABILITY", |r| {
            if let Response::Capabilities(list) = r {
                caps.extend(list.iter().map(capability_name));
            }
            Ok(())
        })
        .await?;
        self.capabilities = caps;
        Ok(())
    }

    /// Sends `command` and hands every untagged response to `on_untagged` until the tagged
    /// reply, which must be OK. A BYE ends the session with an error.
    pub async fn command<F>(&mut self, command: &str, on_untagged: F) -> Result<(), ImapError>
    where
        F: FnMut(&Response<'_>) -> Result<(), ImapError>,
    {
        self.settle_ahead().await?;
        let (tag, verb) = self.send(command).await?;
        self.finish(&tag, &verb, on_untagged).await
    }

    /// Sends `command`; returns its tag and its verb (for messages).
    async fn send(&mut self, command: &str) -> Result<(imap_proto::RequestId, String), ImapError> {
        let verb = command
            .split(' ')
            .take(if command.starts_with("UID ") { 2 } else { 1 })
            .collect::<Vec<_>>()
            .join(" ");
        match tokio::time::timeout(self.timeout, self.inner.run_command(command)).await {
            Err(_) => Err(NetError::Timeout {
                what: format!("sending {verb}"),
                after: self.timeout,
            }
            .into()),
            Ok(Err(e)) => Err(map_async_imap(e)),
            Ok(Ok(tag)) => Ok((tag, verb)),
        }
    }

    /// Reads the FETCH sent ahead (if any) to its end, dropping what it fetched: whatever runs
    /// next must find the stream in step. Its refusal does not matter (nobody asked yet).
    async fn settle_ahead(&mut self) -> Result<(), ImapError> {
        let Some(ahead) = self.ahead.take() else {
            return Ok(());
        };
        if ahead.done {
            return Ok(());
        }
        match self.finish(&ahead.tag, &ahead.verb, |_| Ok(())).await {
            Ok(()) | Err(ImapError::Rejected { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads the responses to the command tagged `tag` up to its tagged reply, which must be
    /// OK, handing every untagged one to `on_untagged`. A BYE ends the session with an error.
    /// The tagged reply of the FETCH sent ahead may come first (a server that answers
    /// pipelined commands out of order): it is noted, and that FETCH is asked again later.
    async fn finish<F>(
        &mut self,
        tag: &imap_proto::RequestId,
        verb: &str,
        mut on_untagged: F,
    ) -> Result<(), ImapError>
    where
        F: FnMut(&Response<'_>) -> Result<(), ImapError>,
    {
        let tag = tag.clone();
        let mut pending_error = None;
        loop {
            let response = next_response!(
                self.inner.read_response(),
                self.timeout,
                format!("the reply to {verb}")
            );
            match response.parsed() {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if *t == tag => {
                    if let Some(e) = pending_error {
                        return Err(e);
                    }
                    return match status {
                        Status::Ok => Ok(()),
                        other => {
                            let text = outcome.information.as_deref();
                            let hint = if text
                                .unwrap_or("")
                                .to_ascii_lowercase()
                                .contains("unsafe login")
                            {
                                " (this server wants the IMAP ID command before SELECT; mailpump sends it only when CAPABILITY lists ID)"
                            } else {
                                ""
                            };
                            Err(rejected(verb, other, text, hint))
                        }
                    };
                }
                Response::Done { tag: t, .. }
                    if self.ahead.as_ref().is_some_and(|a| a.tag == *t && !a.done) =>
                {
                    if let Some(a) = self.ahead.as_mut() {
                        a.done = true;
                        a.spoiled = true;
                    }
                    self.no_pipelining = true;
                    tracing::debug!(command = %verb, "pipelined_reply_out_of_order");
                }
                Response::Done { tag: t, .. } => {
                    return Err(ImapError::Protocol(format!(
                        "reply for unknown tag {t:?} while waiting for {verb}"
                    )));
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    return Err(bye(outcome.information.as_deref()));
                }
                Response::Data {
                    status: Status::No | Status::Bad,
                    outcome,
                } => {
                    // An untagged NO/BAD is a warning (e.g. `* NO [ALERT] ...`), not a failure.
                    tracing::warn!(command = %verb, text = outcome.information.as_deref().unwrap_or(""), "server_warning");
                }
                other => {
                    let fetch_expected = verb.ends_with("FETCH") || verb.ends_with("STORE");
                    if announces_change(other, fetch_expected) {
                        self.changed = true;
                    }
                    if self.opening_other {
                        if is_closed(other) {
                            // what came before was about the mailbox being closed
                            self.opening_other = false;
                            self.changes = Changes::default();
                        } else if !matches!(
                            other,
                            Response::Expunge(_)
                                | Response::Vanished { earlier: false, .. }
                                | Response::Fetch(..)
                        ) {
                            self.changes.observe(other);
                        }
                    } else if !(self.scanning && matches!(other, Response::Fetch(..))) {
                        self.changes.observe(other);
                    }
                    if pending_error.is_none() {
                        if let Err(e) = on_untagged(other) {
                            // keep reading until the tagged reply so the stream stays in step
                            pending_error = Some(e);
                        }
                    }
                }
            }
        }
    }

    /// EXAMINE (read-only) or, when `writable`, SELECT. With `resync` = (UIDVALIDITY, MODSEQ)
    /// known from before and QRESYNC enabled, the server reports at once every flag change and
    /// expunge since (`VANISHED (EARLIER)`, FETCH): they are in [`Session::take_changes`]. The
    /// changes of the mailbox open before are dropped: take them first.
    pub async fn open_mailbox(
        &mut self,
        mailbox: &str,
        writable: bool,
        resync: Option<(u32, u64)>,
    ) -> Result<MailboxInfo, ImapError> {
        let verb = if writable { "SELECT" } else { "EXAMINE" };
        let (mut uidvalidity, mut uidnext, mut exists) = (None, None, 0);
        let (mut highest, mut nomodseq) = (None, false);
        let mut resync = resync;
        if self.selected.as_ref().is_some_and(|(n, _)| n != mailbox) {
            // Responses about the mailbox open until now may come inside this SELECT, before
            // its [CLOSED]: close it first where the server can, so that every change the
            // SELECT reports is this mailbox's. Where it cannot, the QRESYNC report is not
            // asked for (CHANGEDSINCE follows instead), and nothing that could be the old
            // mailbox's (EXPUNGE, VANISHED, FETCH) is taken before [CLOSED].
            if !self.unselect().await? {
                resync = None;
                self.opening_other = true;
            }
        }
        if self.no_select_parameters {
            resync = None;
        }
        let parameter = match resync {
            _ if self.no_select_parameters => String::new(),
            Some((v, m)) if self.qresync && m > 0 => format!(" (QRESYNC ({v} {m}))"),
            // Dovecot's plain EXAMINE hides HIGHESTMODSEQ until CONDSTORE is asked for
            _ if self.condstore && !self.qresync => " (CONDSTORE)".to_string(),
            _ => String::new(),
        };
        self.selected = None;
        self.changes = Changes::default();
        let result = self
            .command(
                &format!("{verb} {}{parameter}", utf7::mailbox_arg(mailbox)),
                |r| {
                    match r {
                        Response::Data { outcome, .. } => match outcome.code {
                            Some(ResponseCode::UidValidity(v)) => uidvalidity = Some(v),
                            Some(ResponseCode::UidNext(n)) => uidnext = Some(n),
                            Some(ResponseCode::HighestModSeq(m)) => highest = Some(m),
                            // imap-proto does not know [NOMODSEQ]: it stays in the text
                            None if outcome
                                .information
                                .as_deref()
                                .is_some_and(|t| t.to_ascii_uppercase().contains("NOMODSEQ")) =>
                            {
                                nomodseq = true
                            }
                            _ => {}
                        },
                        Response::MailboxData(MailboxDatum::Exists(n)) => exists = *n,
                        _ => {}
                    }
                    Ok(())
                },
            )
            .await;
        self.opening_other = false;
        match result {
            Err(ImapError::Rejected { text, .. }) if !parameter.is_empty() => {
                // a server that lists CONDSTORE/QRESYNC but refuses them here: plain from now
                tracing::warn!(
                    mailbox,
                    parameter = parameter.trim(),
                    text,
                    "select_parameter_refused"
                );
                self.no_select_parameters = true;
                self.qresync = false;
                self.condstore = false;
                return Box::pin(self.open_mailbox(mailbox, writable, None)).await;
            }
            other => other?,
        }
        // What the mailbox held until now is what the SEARCH that follows sees.
        self.changed = false;
        self.cap_listings();
        let uidvalidity = uidvalidity
            .ok_or_else(|| ImapError::Protocol(format!("{verb} {mailbox} gave no UIDVALIDITY")))?;
        if resync.is_some_and(|(v, _)| v != uidvalidity) {
            // a QRESYNC with another UIDVALIDITY is silently a plain select: nothing it
            // reported (there should be nothing) is about the messages stored
            self.changes = Changes::default();
        }
        self.selected = Some((mailbox.to_string(), uidvalidity));
        // Fewer messages than at the last opening plus the UIDs assigned since: something went
        // that no EXPUNGE announced (it went while the mailbox was being opened again, and a
        // server announces nothing about the mailbox it closes). Without QRESYNC only a UID
        // comparison tells what; it stays due until one runs.
        if self
            .opened
            .insert(mailbox.to_string(), (uidvalidity, exists, uidnext))
            .is_some_and(|before| shrank(before, (uidvalidity, exists, uidnext)))
        {
            self.compare_due(mailbox);
        }
        Ok(MailboxInfo {
            uidvalidity,
            uidnext,
            exists,
            highest_modseq: if nomodseq { None } else { highest },
            resynced: parameter.contains("QRESYNC")
                && resync.is_some_and(|(v, _)| v == uidvalidity)
                && highest.is_some()
                && !nomodseq,
        })
    }

    /// `UID SEARCH UID <after+1>:* [SINCE d] [UNSEEN]`, sorted, strictly above `after`
    /// (servers always match the highest UID for `n:*`, even when it is below n).
    pub async fn search_after(
        &mut self,
        after: u32,
        since: Option<NaiveDate>,
        unseen_only: bool,
    ) -> Result<Vec<u32>, ImapError> {
        let mut query = format!("UID SEARCH UID {}:*", after.saturating_add(1));
        if let Some(d) = since {
            query.push_str(&format!(" SINCE {}", imap_date(d)));
        }
        if unseen_only {
            query.push_str(" UNSEEN");
        }
        let mut uids = Vec::new();
        self.command(&query, |r| {
            if let Response::MailboxData(MailboxDatum::Search(found)) = r {
                uids.extend(found.iter().copied().filter(|u| *u > after));
            }
            Ok(())
        })
        .await?;
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// Which of `uids` still exist (`UID SEARCH UID set`).
    pub async fn existing(&mut self, uids: &[u32]) -> Result<Vec<u32>, ImapError> {
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let mut found = Vec::new();
        self.command(&format!("UID SEARCH UID {}", uid_set(uids)), |r| {
            if let Response::MailboxData(MailboxDatum::Search(list)) = r {
                found.extend(list.iter().copied().filter(|u| wanted.contains(u)));
            }
            Ok(())
        })
        .await?;
        Ok(found)
    }

    /// RFC822.SIZE of each UID (to cut batches by bytes before asking for bodies).
    pub async fn fetch_sizes(&mut self, uids: &[u32]) -> Result<Vec<(u32, u64)>, ImapError> {
        let mut sizes = Vec::with_capacity(uids.len());
        self.command(
            &format!("UID FETCH {} (UID RFC822.SIZE)", uid_set(uids)),
            |r| {
                if let Response::Fetch(_, attrs) = r {
                    let (mut uid, mut size) = (None, None);
                    for a in attrs {
                        match a {
                            AttributeValue::Uid(u) => uid = Some(*u),
                            AttributeValue::Rfc822Size(s) => size = Some(*s as u64),
                            _ => {}
                        }
                    }
                    if let (Some(u), Some(s)) = (uid, size) {
                        sizes.push((u, s));
                    }
                }
                Ok(())
            },
        )
        .await?;
        sizes.sort_unstable();
        sizes.dedup_by_key(|(u, _)| *u);
        Ok(sizes)
    }

    /// `UID FETCH set (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])`: never sets \Seen.
    /// Untagged FETCHes without a body (flag updates for other messages) are ignored.
    pub async fn fetch_bodies(&mut self, uids: &[u32]) -> Result<Vec<FetchedMessage>, ImapError> {
        self.fetch_bodies_then(uids, None).await
    }

    /// [`Session::fetch_bodies`] of `uids`, with the FETCH of `next` (the batch after, if
    /// any) sent before this one's responses are read: the server starts on it while this one
    /// is read, instead of waiting a round trip for it (IMAP pipelining, RFC 3501 5.5). Its
    /// bytes wait in the socket until the next call asks for exactly `next`; anything else
    /// reads and drops them first. A server that answers the two out of order or interleaved
    /// is noticed (the FETCH ahead is then asked again) and gets no more pipelining in this
    /// session.
    pub async fn fetch_bodies_then(
        &mut self,
        uids: &[u32],
        next: Option<&[u32]>,
    ) -> Result<Vec<FetchedMessage>, ImapError> {
        let gmail = self.has_capability("X-GM-EXT-1");
        let cmd_for = |uids: &[u32]| {
            format!(
                "UID FETCH {} (UID FLAGS INTERNALDATE RFC822.SIZE{} BODY.PEEK[])",
                uid_set(uids),
                if gmail {
                    " X-GM-MSGID X-GM-THRID X-GM-LABELS"
                } else {
                    ""
                }
            )
        };
        // this batch's command: sent ahead already, or now
        let mut pipelined = false;
        let (tag, verb) = match self.ahead.take() {
            Some(a) if a.uids == uids && !a.spoiled => {
                pipelined = true;
                (a.tag, a.verb)
            }
            other => {
                self.ahead = other;
                self.settle_ahead().await?;
                self.send(&cmd_for(uids)).await?
            }
        };
        let next =
            next.filter(|n| !n.is_empty() && !self.no_pipelining && pipelining_allowed(&self.key));
        if let Some(next) = next {
            let (tag, verb) = self.send(&cmd_for(next)).await?;
            self.ahead = Some(Ahead {
                tag,
                verb,
                uids: next.to_vec(),
                spoiled: false,
                done: false,
            });
        }
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let ahead_uids: HashSet<u32> = next
            .map(|n| n.iter().copied().collect())
            .unwrap_or_default();
        let mut interleaved = false;
        let mut out = Vec::with_capacity(uids.len());
        let result = self
            .finish(&tag, &verb, |r| {
                if let Response::Fetch(_, attrs) = r {
                    if let Some(m) = fetched_message(attrs) {
                        if wanted.contains(&m.uid) {
                            out.push(m);
                        } else if ahead_uids.contains(&m.uid) {
                            // the batch ahead answered inside this one: it is asked again
                            interleaved = true;
                        }
                    }
                }
                Ok(())
            })
            .await;
        if interleaved {
            if let Some(a) = self.ahead.as_mut() {
                a.spoiled = true;
            }
            self.no_pipelining = true;
            tracing::debug!("pipelined_fetch_interleaved");
        }
        // (this batch was sent ahead, or one is queued behind it)
        let pipelined = pipelined || self.ahead.as_ref().is_some_and(|a| !a.done);
        if let (Err(ImapError::Net(NetError::Timeout { .. })), true) = (&result, pipelined) {
            // a server (or a proxy) that drops or stalls pipelined commands: this account
            // gets none from now on, so the next session makes progress
            forbid_pipelining(&self.key);
        }
        result?;
        out.sort_by_key(|m| m.uid);
        out.dedup_by_key(|m| m.uid);
        Ok(out)
    }

    /// Whether the server serves `uid` now, asked exactly as a batch asks (`BODY.PEEK[]`, so
    /// that a limit on bytes refuses the probe too): false when it refuses (tagged NO/BAD) or
    /// sends nothing for it.
    pub async fn probe(&mut self, uid: u32) -> Result<bool, ImapError> {
        let mut served = false;
        let result = self
            .command(&format!("UID FETCH {uid} (UID BODY.PEEK[])"), |r| {
                if let Response::Fetch(_, attrs) = r {
                    served |= attrs
                        .iter()
                        .any(|a| matches!(a, AttributeValue::Uid(u) if *u == uid));
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => Ok(served),
            Err(ImapError::Rejected { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `UID STORE set +FLAGS.SILENT (\Seen)` (only with `mark_seen = true`).
    pub async fn mark_seen(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        self.command(
            &format!("UID STORE {} +FLAGS.SILENT (\\Seen)", uid_set(uids)),
            |_| Ok(()),
        )
        .await
    }

    /// `NOOP`: returns the EXISTS count if the server announced one.
    pub async fn noop(&mut self) -> Result<Option<u32>, ImapError> {
        let mut exists = None;
        self.command("NOOP", |r| {
            if let Response::MailboxData(MailboxDatum::Exists(n)) = r {
                exists = Some(*n);
            }
            Ok(())
        })
        .await?;
        Ok(exists)
    }

    /// IDLE (RFC 2177) until the mailbox changes, `refresh` passes or `cancel` fires; then
    /// DONE and the tagged OK. No byte at all for `silence` (keepalives count) is a dead
    /// connection. Driven by hand: async-imap's IDLE handle restarts its timer on every
    /// keepalive, hangs on a tagged NO and reports EOF as a manual interrupt.
    pub async fn idle(
        &mut self,
        refresh: Duration,
        silence: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<IdleEnd, ImapError> {
        self.settle_ahead().await?;
        let timeout = self.timeout;
        let tag = match tokio::time::timeout(timeout, self.inner.run_command("IDLE")).await {
            Err(_) => {
                return Err(NetError::Timeout {
                    what: "sending IDLE".into(),
                    after: timeout,
                }
                .into())
            }
            Ok(Err(e)) => return Err(map_async_imap(e)),
            Ok(Ok(tag)) => tag,
        };
        let is_change = |r: &Response<'_>| {
            matches!(
                r,
                Response::MailboxData(MailboxDatum::Exists(_) | MailboxDatum::Recent(_))
                    | Response::Expunge(_)
                    | Response::Fetch(..)
                    | Response::Vanished { .. }
            )
        };
        // Wait for the continuation; a change announced before it still counts.
        let mut changed = false;
        loop {
            let response =
                next_response!(self.inner.read_response(), timeout, "the IDLE continuation");
            match response.parsed() {
                Response::Continue(_) => break,
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if *t == tag => {
                    return Err(rejected("IDLE", status, outcome.information.as_deref(), ""))
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => return Err(bye(outcome.information.as_deref())),
                other => {
                    changed |= is_change(other);
                    self.changes.observe(other);
                }
            }
        }
        let deadline = tokio::time::Instant::now() + refresh;
        let end = if changed {
            IdleEnd::Changed
        } else {
            loop {
                // read_response is cancel-safe: partial data stays in async-imap's buffer.
                tokio::select! {
                    _ = cancel.cancelled() => break IdleEnd::Cancelled,
                    _ = tokio::time::sleep_until(deadline) => break IdleEnd::Refresh,
                    read = tokio::time::timeout(silence, self.inner.read_response()) => {
                        let response = match read {
                            Err(_) => return Err(NetError::Timeout { what: "any data while idling (silence timeout)".into(), after: silence }.into()),
                            Ok(Err(e)) => return Err(ImapError::from_read(e)),
                            Ok(Ok(None)) => return Err(NetError::Closed.into()),
                            Ok(Ok(Some(r))) => r,
                        };
                        match response.parsed() {
                            Response::Data { status: Status::Bye, outcome } => {
                                return Err(bye(outcome.information.as_deref()))
                            }
                            Response::Done { tag: t, .. } if *t == tag => {
                                return Err(ImapError::Protocol("the server ended IDLE on its own".into()))
                            }
                            other if is_change(other) => {
                                self.changes.observe(other);
                                break IdleEnd::Changed;
                            }
                            // "* OK Still here" and friends: the connection is alive
                            other => self.changes.observe(other),
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, self.inner.run_command_untagged("DONE")).await {
            Err(_) => {
                return Err(NetError::Timeout {
                    what: "sending DONE".into(),
                    after: timeout,
                }
                .into())
            }
            Ok(Err(e)) => return Err(map_async_imap(e)),
            Ok(Ok(())) => {}
        }
        loop {
            let response = next_response!(self.inner.read_response(), timeout, "the reply to DONE");
            match response.parsed() {
                Response::Done {
                    tag: t,
                    status: Status::Ok,
                    ..
                } if *t == tag => return Ok(end),
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if *t == tag => {
                    return Err(rejected("IDLE", status, outcome.information.as_deref(), ""))
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => return Err(bye(outcome.information.as_deref())),
                other => self.changes.observe(other),
            }
        }
    }

    /// LOGOUT, best effort, bounded by `timeout`.
    pub async fn logout(mut self, timeout: Duration) {
        if self.ahead.is_some() {
            // a batch sent ahead would have to be read whole first: just close
            return;
        }
        self.timeout = timeout;
        let _ = tokio::time::timeout(timeout, self.command("LOGOUT", |_| Ok(()))).await;
    }
}

/// The message of a body FETCH response (UID and `BODY[]` present), else `None` (a flag
/// update, or a response without its UID).
fn fetched_message(attrs: &[AttributeValue<'_>]) -> Option<FetchedMessage> {
    let (mut uid, mut flags, mut date, mut size, mut body) = (None, Vec::new(), None, None, None);
    let (mut msgid, mut thrid, mut labels) = (None, None, Vec::new());
    for a in attrs {
        match a {
            AttributeValue::GmailMsgId(id) => msgid = Some(*id),
            AttributeValue::GmailThrId(id) => thrid = Some(*id),
            AttributeValue::GmailLabels(l) => {
                labels = l
                    .iter()
                    .map(|s| utf7::decode_mailbox(s).unwrap_or_else(|| s.to_string()))
                    .collect()
            }
            AttributeValue::Uid(u) => uid = Some(*u),
            AttributeValue::Flags(f) => flags = super::message_flags(f.iter()),
            AttributeValue::InternalDate(d) => date = parse_internal_date(d),
            AttributeValue::Rfc822Size(s) => size = Some(*s as u64),
            AttributeValue::BodySection {
                section: None,
                data,
                ..
            } => body = Some(data.as_deref().unwrap_or(&[])),
            _ => {}
        }
    }
    let (uid, body) = (uid?, body?);
    Some(FetchedMessage {
        uid,
        flags,
        internal_date: date,
        size: size.unwrap_or(body.len() as u64),
        body: body.to_vec(),
        gmail: msgid.map(|msgid| crate::store::GmailIds {
            msgid,
            thrid: thrid.unwrap_or(0),
            labels,
        }),
    })
}

/// `* OK [CLOSED]` (RFC 7162): the mailbox selected before is closed; imap-proto does not
/// know the code and leaves it in the text.
fn is_closed(r: &Response<'_>) -> bool {
    matches!(r, Response::Data { status: Status::Ok, outcome }
        if outcome.code.is_none()
            && outcome
                .information
                .as_deref()
                .is_some_and(|t| t.trim_start().to_ascii_uppercase().starts_with("[CLOSED]")))
}

/// The (UID, FLAGS, MODSEQ) of a FETCH response that has UID and FLAGS.
fn flags_of(r: &Response<'_>) -> Option<crate::store::FlagChange> {
    let Response::Fetch(_, attrs) = r else {
        return None;
    };
    let (mut uid, mut flags, mut modseq) = (None, None, None);
    for a in attrs {
        match a {
            AttributeValue::Uid(u) => uid = Some(*u),
            AttributeValue::Flags(f) => flags = Some(super::message_flags(f.iter())),
            AttributeValue::ModSeq(m) => modseq = Some(*m),
            _ => {}
        }
    }
    Some(crate::store::FlagChange {
        uid: uid?,
        flags: flags?,
        modseq,
    })
}

/// Whether a mailbox opened as `now` lost messages since it was opened as `before` (both
/// UIDVALIDITY, EXISTS, UIDNEXT): at most as many messages came as UIDs were assigned, so fewer
/// than the old count plus that means some went. A server that skips UIDs makes it say yes
/// without cause (a UID comparison that finds nothing); no UIDNEXT leaves only a count that
/// fell.
fn shrank(before: (u32, u32, Option<u32>), now: (u32, u32, Option<u32>)) -> bool {
    let ((v0, e0, u0), (v1, e1, u1)) = (before, now);
    if v0 != v1 {
        return false;
    }
    let came = match (u0, u1) {
        (Some(u0), Some(u1)) => u1.saturating_sub(u0),
        _ => 0,
    };
    (e1 as u64) < e0 as u64 + came as u64
}

/// Whether an untagged response announces a change of the mailbox. FETCH responses count only
/// where the command did not ask for them.
fn announces_change(r: &Response<'_>, fetch_expected: bool) -> bool {
    match r {
        Response::MailboxData(MailboxDatum::Exists(_) | MailboxDatum::Recent(_))
        | Response::Expunge(_)
        | Response::Vanished { .. } => true,
        Response::Fetch(..) => !fetch_expected,
        _ => false,
    }
}

/// Status texts come from the server: keep them to one short line.
fn clean_status_text(text: &str) -> String {
    // async-imap renders a login refusal as `code: None, info: Some("...")`: keep the text
    let text = match text
        .strip_prefix("code: ")
        .and_then(|t| t.split_once("info: Some(\""))
    {
        Some((_, info)) => info.strip_suffix("\")").unwrap_or(info),
        None => text,
    };
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = one_line.trim();
    if trimmed.chars().count() > 300 {
        format!("{}...", trimmed.chars().take(300).collect::<String>())
    } else {
        trimmed.to_string()
    }
}

/// The account of the scripted-server tests (every setting at its default).
#[cfg(test)]
fn test_account() -> Account {
    crate::config::from_toml_str(
        "[store]\nuri = \"mongodb://x\"\n[accounts.t]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n",
    )
    .unwrap()
    .accounts
    .remove(0)
}

/// A logged-in session over `client`, an in-memory pipe to a scripted server.
#[cfg(test)]
async fn memory_session(client: tokio::io::DuplexStream) -> Session {
    Session::establish(Transport::Memory(client), false, &test_account())
        .await
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn login_refusals_read_as_the_server_wrote_them() {
        assert_eq!(
            clean_status_text(
                "code: None, info: Some(\"[AUTHENTICATIONFAILED] Authentication failed.\")"
            ),
            "[AUTHENTICATIONFAILED] Authentication failed."
        );
        assert_eq!(clean_status_text(" plain\r\n"), "plain");
    }

    #[test]
    fn a_mailbox_shrank_when_it_holds_fewer_than_before_plus_the_uids_assigned_since() {
        // (UIDVALIDITY, EXISTS, UIDNEXT)
        assert!(!shrank((7, 4, Some(5)), (7, 4, Some(5))));
        assert!(shrank((7, 4, Some(5)), (7, 3, Some(5))), "one expunged");
        assert!(!shrank((7, 4, Some(5)), (7, 5, Some(6))), "one came");
        assert!(
            shrank((7, 4, Some(5)), (7, 4, Some(6))),
            "one came and one went: the count alone hides it"
        );
        assert!(
            !shrank((7, 4, Some(5)), (8, 1, Some(2))),
            "a new UIDVALIDITY"
        );
        assert!(shrank((7, 4, None), (7, 3, None)));
        assert!(!shrank((7, 4, None), (7, 4, None)));
    }

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[42]), "42");
        assert_eq!(uid_set(&[]), "");
    }

    #[test]
    fn search_dates_use_english_month_names() {
        assert_eq!(
            imap_date(NaiveDate::from_ymd_opt(2015, 6, 4).unwrap()),
            "04-Jun-2015"
        );
    }

    #[test]
    fn internal_dates_parse_with_space_padded_days() {
        let d = parse_internal_date(" 7-Jul-1996 02:44:25 -0700").unwrap();
        assert_eq!(d.to_rfc3339(), "1996-07-07T02:44:25-07:00");
        assert!(parse_internal_date("garbage").is_none());
    }

    /// What the scripted server does once IDLE is accepted.
    #[derive(Clone, Copy)]
    enum AfterIdle {
        /// "* OK Still here" every so often, forever.
        Keepalive(Duration),
        /// Nothing at all.
        Silence,
        /// "* N EXISTS" after a while.
        ExistsAfter(Duration),
        /// A tagged NO instead of the continuation.
        Refuse,
    }

    /// A scripted IMAP server on an in-memory pipe. Returns the lines it received.
    fn scripted_server(
        io: tokio::io::DuplexStream,
        after_idle: AfterIdle,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(io);
            let mut lines = tokio::io::BufReader::new(r).lines();
            let mut seen = Vec::new();
            w.write_all(b"* OK ready\r\n").await.unwrap();
            let mut idle_tag = String::new();
            let mut ticker: Option<tokio::task::JoinHandle<()>> = None;
            let w = std::sync::Arc::new(tokio::sync::Mutex::new(w));
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push(line.clone());
                let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                let reply = match rest
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_ascii_uppercase()
                    .as_str()
                {
                    _ if tag == "DONE" => {
                        if let Some(t) = ticker.take() {
                            t.abort();
                        }
                        format!("{idle_tag} OK Idle completed\r\n")
                    }
                    "LOGIN" => format!("{tag} OK Logged in\r\n"),
                    "CAPABILITY" => format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n"),
                    "LOGOUT" => format!("* BYE bye\r\n{tag} OK done\r\n"),
                    "IDLE" => {
                        idle_tag = tag.to_string();
                        match after_idle {
                            AfterIdle::Refuse => format!("{tag} NO [UNAVAILABLE] not now\r\n"),
                            AfterIdle::Silence => "+ idling\r\n".to_string(),
                            AfterIdle::Keepalive(every) => {
                                let w = w.clone();
                                ticker = Some(tokio::spawn(async move {
                                    loop {
                                        tokio::time::sleep(every).await;
                                        w.lock()
                                            .await
                                            .write_all(b"* OK Still here\r\n")
                                            .await
                                            .unwrap();
                                    }
                                }));
                                "+ idling\r\n".to_string()
                            }
                            AfterIdle::ExistsAfter(after) => {
                                let w = w.clone();
                                ticker = Some(tokio::spawn(async move {
                                    tokio::time::sleep(after).await;
                                    w.lock().await.write_all(b"* 5 EXISTS\r\n").await.unwrap();
                                }));
                                "+ idling\r\n".to_string()
                            }
                        }
                    }
                    _ => format!("{tag} BAD unknown\r\n"),
                };
                w.lock().await.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        })
    }

    async fn session_against(
        after_idle: AfterIdle,
    ) -> (Session, tokio::task::JoinHandle<Vec<String>>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let handle = scripted_server(server, after_idle);
        let session = memory_session(client).await;
        assert!(session.has_capability("IDLE"));
        (session, handle)
    }

    const REFRESH: Duration = Duration::from_secs(600);
    const SILENCE: Duration = Duration::from_secs(300);

    #[tokio::test(start_paused = true)]
    async fn idle_is_refreshed_on_time_although_keepalives_keep_coming() {
        let (mut session, server) =
            session_against(AfterIdle::Keepalive(Duration::from_secs(120))).await;
        let started = tokio::time::Instant::now();
        let end = session
            .idle(REFRESH, SILENCE, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(end, IdleEnd::Refresh);
        let took = started.elapsed();
        assert!(
            took >= REFRESH && took < REFRESH + Duration::from_secs(1),
            "{took:?}"
        );
        session.logout(Duration::from_secs(5)).await;
        let seen = server.await.unwrap();
        assert!(seen.iter().any(|l| l == "DONE"), "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_detected_within_the_silence_timeout() {
        let (mut session, _server) = session_against(AfterIdle::Silence).await;
        let started = tokio::time::Instant::now();
        let err = session
            .idle(REFRESH, SILENCE, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ImapError::Net(NetError::Timeout { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("silence timeout"));
        let took = started.elapsed();
        assert!(
            took >= SILENCE && took < SILENCE + Duration::from_secs(1),
            "{took:?}"
        );
    }

    /// A server that sends nothing at all while idling (RFC 2177 asks for no keepalives) is
    /// healthy: with the default settings its connection is refreshed, never declared dead.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_healthy_idle_connection_is_never_replaced_with_the_defaults() {
        let (mut session, server) = session_against(AfterIdle::Silence).await;
        let account = test_account();
        let s = &account.settings;
        let started = tokio::time::Instant::now();
        for _ in 0..12 {
            let end = session
                .idle(s.idle_refresh, s.silence_timeout, &CancellationToken::new())
                .await
                .unwrap();
            assert_eq!(end, IdleEnd::Refresh);
        }
        assert!(started.elapsed() >= Duration::from_secs(2 * 3600));
        session.logout(Duration::from_secs(5)).await;
        let seen = server.await.unwrap();
        assert_eq!(seen.iter().filter(|l| l.as_str() == "DONE").count(), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn exists_ends_idle_at_once() {
        let (mut session, _server) =
            session_against(AfterIdle::ExistsAfter(Duration::from_secs(30))).await;
        let started = tokio::time::Instant::now();
        let end = session
            .idle(REFRESH, SILENCE, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(end, IdleEnd::Changed);
        assert!(started.elapsed() < Duration::from_secs(31));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_idle_is_an_error_not_a_hang() {
        let (mut session, _server) = session_against(AfterIdle::Refuse).await;
        let err = session
            .idle(REFRESH, SILENCE, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ImapError::Rejected { command, .. } if command == "IDLE"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_ends_idle_with_done() {
        let (mut session, server) =
            session_against(AfterIdle::Keepalive(Duration::from_secs(120))).await;
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            c.cancel();
        });
        assert_eq!(
            session.idle(REFRESH, SILENCE, &cancel).await.unwrap(),
            IdleEnd::Cancelled
        );
        session.logout(Duration::from_secs(5)).await;
        let seen = server.await.unwrap();
        assert!(
            seen.iter().any(|l| l == "DONE") && seen.iter().any(|l| l.ends_with("LOGOUT")),
            "{seen:?}"
        );
    }

    #[test]
    fn provider_hints_name_the_fix() {
        assert!(login_hint("imap.qq.com").contains("authorization code"));
        assert_eq!(login_hint("imap.example.com"), "");
    }
}

#[cfg(test)]
mod switching_tests {
    use super::*;

    /// A QRESYNC server that, when asked to EXAMINE B while A is selected, first flushes what
    /// it held for A (`* VANISHED 41` and a flag FETCH), then `[CLOSED]` (RFC 7162 3.2.11).
    fn server(
        io: tokio::io::DuplexStream,
        unselect: bool,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> tokio::task::JoinHandle<()> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(io);
            let mut lines = tokio::io::BufReader::new(r).lines();
            w.write_all(b"* OK ready\r\n").await.unwrap();
            let mut selected = false;
            while let Ok(Some(line)) = lines.next_line().await {
                seen.lock().unwrap().push(line.clone());
                let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                let up = rest.to_ascii_uppercase();
                let reply = if up.starts_with("LOGIN") {
                    format!("{tag} OK Logged in\r\n")
                } else if up.starts_with("CAPABILITY") {
                    let extra = if unselect { " UNSELECT" } else { "" };
                    format!("* CAPABILITY IMAP4rev1 IDLE ENABLE CONDSTORE QRESYNC{extra}\r\n{tag} OK done\r\n")
                } else if up.starts_with("ENABLE") {
                    format!("* ENABLED QRESYNC\r\n{tag} OK enabled\r\n")
                } else if up.starts_with("UNSELECT") {
                    selected = false;
                    format!("{tag} OK unselected\r\n")
                } else if up.starts_with("EXAMINE \"A\"") || up.starts_with("EXAMINE A") {
                    selected = true;
                    format!("* 60 EXISTS\r\n* OK [UIDVALIDITY 5] ok\r\n* OK [UIDNEXT 61] ok\r\n* OK [HIGHESTMODSEQ 30] ok\r\n{tag} OK [READ-ONLY] done\r\n")
                } else if up.starts_with("EXAMINE") {
                    let held = if selected {
                        "* VANISHED 41\r\n* 3 FETCH (UID 40 FLAGS (\\Deleted) MODSEQ (31))\r\n* OK [CLOSED] A closed\r\n"
                    } else {
                        ""
                    };
                    selected = true;
                    format!("{held}* 50 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 100] ok\r\n* OK [HIGHESTMODSEQ 20] ok\r\n{tag} OK [READ-ONLY] done\r\n")
                } else {
                    format!("{tag} BAD unknown\r\n")
                };
                w.write_all(reply.as_bytes()).await.unwrap();
            }
        })
    }

    async fn switch(unselect: bool) -> (Option<Changes>, MailboxInfo, Vec<String>) {
        let (client, srv) = tokio::io::duplex(64 * 1024);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let _h = server(srv, unselect, seen.clone());
        let mut s = memory_session(client).await;
        assert!(s.qresync());
        s.open_mailbox("A", false, None).await.unwrap();
        let _ = s.take_changes().await.unwrap();
        let info = s.open_mailbox("B", false, Some((7, 10))).await.unwrap();
        let changes = s.take_changes().await.unwrap().map(|(name, v, c)| {
            assert_eq!((name.as_str(), v), ("B", 7));
            c
        });
        let lines = seen.lock().unwrap().clone();
        (changes, info, lines)
    }

    /// Nothing the server says about A while B is being opened is written to B.
    #[tokio::test]
    async fn what_the_old_mailbox_is_told_while_the_next_opens_is_never_the_new_ones() {
        // with UNSELECT: A is closed first, B is opened with its QRESYNC report
        let (changes, info, lines) = switch(true).await;
        assert!(lines.iter().any(|l| l.ends_with("UNSELECT")), "{lines:?}");
        assert!(info.resynced);
        let c = changes.unwrap_or_default();
        assert!(c.vanished.is_empty() && c.flags.is_empty(), "{c:?}");
        // without: no QRESYNC report asked for, and what precedes [CLOSED] is dropped
        let (changes, info, lines) = switch(false).await;
        assert!(!lines.iter().any(|l| l.ends_with("UNSELECT")), "{lines:?}");
        assert!(!info.resynced);
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("EXAMINE \"B\"") || l.ends_with("EXAMINE B")),
            "{lines:?}"
        );
        let c = changes.unwrap_or_default();
        assert!(c.vanished.is_empty() && c.flags.is_empty(), "{c:?}");
    }
}

#[cfg(test)]
mod pipelining_tests {
    use super::*;

    /// How the scripted server answers two FETCHes that arrive together.
    #[derive(Clone, Copy, PartialEq)]
    enum Answer {
        /// One after the other, as Dovecot does.
        Sequential,
        /// The second one's responses and tagged OK first.
        Reversed,
        /// The responses of both mixed, then both tagged OKs.
        Interleaved,
    }

    /// The FETCH response of `uid` (its body names it).
    fn response(seq: u32, uid: u32) -> String {
        let body = format!("Subject: m{uid}\r\n\r\nbody of {uid}\r\n");
        format!(
            "* {seq} FETCH (UID {uid} FLAGS () INTERNALDATE \"01-Jan-2024 00:00:00 +0000\" RFC822.SIZE {} BODY[] {{{}}}\r\n{body})\r\n",
            body.len(),
            body.len()
        )
    }

    /// The UIDs of `UID FETCH a:b (...)` or `UID FETCH a (...)`.
    fn uids_of(line: &str) -> Vec<u32> {
        let set = line.split(' ').nth(3).unwrap_or("");
        let mut out = Vec::new();
        for part in set.split(',') {
            match part.split_once(':') {
                Some((a, b)) => out.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap()),
                None => out.extend(part.parse::<u32>().ok()),
            }
        }
        out
    }

    /// A server with UIDs 1..=100 whose body FETCHes are answered in `order` when two are
    /// waiting. Returns the FETCH lines it received.
    fn server(
        io: tokio::io::DuplexStream,
        order: Answer,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> tokio::task::JoinHandle<()> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(io);
            let mut lines = tokio::io::BufReader::new(r).lines();
            w.write_all(b"* OK ready\r\n").await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                let tag = tag.to_string();
                let up = rest.to_ascii_uppercase();
                let reply = if up.starts_with("LOGIN") {
                    format!("{tag} OK Logged in\r\n")
                } else if up.starts_with("CAPABILITY") {
                    format!("* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n")
                } else if up.starts_with("EXAMINE") {
                    format!("* 100 EXISTS\r\n* OK [UIDVALIDITY 5] ok\r\n* OK [UIDNEXT 101] ok\r\n{tag} OK [READ-ONLY] done\r\n")
                } else if up.starts_with("UID FETCH") && up.contains("BODY.PEEK[]") {
                    seen.lock().unwrap().push(line.clone());
                    let uids = uids_of(&line);
                    let answer =
                        |uids: &[u32]| uids.iter().map(|u| response(*u, *u)).collect::<String>();
                    {
                        // a second FETCH pipelined behind this one? wait a moment for it,
                        // else answer this one alone
                        {
                            match tokio::time::timeout(
                                Duration::from_millis(200),
                                lines.next_line(),
                            )
                            .await
                            {
                                Ok(Ok(Some(second)))
                                    if second.to_ascii_uppercase().contains("BODY.PEEK[]") =>
                                {
                                    seen.lock().unwrap().push(second.clone());
                                    let tag2 = second.split(' ').next().unwrap().to_string();
                                    let uids2 = uids_of(&second);
                                    let (a, b) = (answer(&uids), answer(&uids2));
                                    let done1 = format!("{tag} OK fetched\r\n");
                                    let done2 = format!("{tag2} OK fetched\r\n");
                                    match order {
                                        Answer::Sequential => format!("{a}{done1}{b}{done2}"),
                                        Answer::Reversed => format!("{b}{done2}{a}{done1}"),
                                        Answer::Interleaved => {
                                            let mut mixed = String::new();
                                            let (ua, ub) = (uids.clone(), uids2.clone());
                                            for i in 0..ua.len().max(ub.len()) {
                                                if let Some(u) = ub.get(i) {
                                                    mixed.push_str(&response(*u, *u));
                                                }
                                                if let Some(u) = ua.get(i) {
                                                    mixed.push_str(&response(*u, *u));
                                                }
                                            }
                                            format!("{mixed}{done1}{done2}")
                                        }
                                    }
                                }
                                Ok(Ok(Some(other))) => {
                                    // not a FETCH: answer ours, then that one (LOGOUT here)
                                    let (t2, _) =
                                        other.split_once(' ').unwrap_or((other.as_str(), ""));
                                    format!(
                                        "{}{tag} OK fetched\r\n* BYE bye\r\n{t2} OK done\r\n",
                                        answer(&uids)
                                    )
                                }
                                _ => format!("{}{tag} OK fetched\r\n", answer(&uids)),
                            }
                        }
                    }
                } else if up.starts_with("LOGOUT") {
                    format!("* BYE bye\r\n{tag} OK done\r\n")
                } else {
                    format!("{tag} BAD unknown\r\n")
                };
                w.write_all(reply.as_bytes()).await.unwrap();
            }
        })
    }

    async fn session(order: Answer) -> (Session, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let (client, srv) = tokio::io::duplex(1024 * 1024);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let _h = server(srv, order, seen.clone());
        let mut s = memory_session(client).await;
        s.open_mailbox("INBOX", false, None).await.unwrap();
        (s, seen)
    }

    /// Ten batches of ten, each FETCH sent ahead of its turn: every message arrives once, in
    /// its own batch, with its own bytes, whatever order the server answers in; a server that
    /// mixes them up is asked again and gets no more pipelining.
    #[tokio::test]
    async fn pipelined_batches_get_exactly_their_messages_whatever_order_the_server_answers_in() {
        for order in [Answer::Sequential, Answer::Reversed, Answer::Interleaved] {
            let (mut s, seen) = session(order).await;
            let uids: Vec<u32> = (1..=100).collect();
            let batches: Vec<&[u32]> = uids.chunks(10).collect();
            for (i, batch) in batches.iter().enumerate() {
                let got = s
                    .fetch_bodies_then(batch, batches.get(i + 1).copied())
                    .await
                    .unwrap();
                let got_uids: Vec<u32> = got.iter().map(|m| m.uid).collect();
                assert_eq!(got_uids, batch.to_vec(), "batch {i}");
                for m in &got {
                    let body = String::from_utf8(m.body.clone()).unwrap();
                    assert!(body.contains(&format!("body of {}\r\n", m.uid)), "{body}");
                }
            }
            let fetches = seen.lock().unwrap().clone();
            match order {
                // one FETCH per batch, none repeated
                Answer::Sequential => assert_eq!(fetches.len(), 10, "{fetches:?}"),
                // the first mixed-up pair costs one FETCH again, then no more pipelining
                _ => {
                    assert_eq!(fetches.len(), 11, "{fetches:?}");
                    assert!(s.no_pipelining);
                }
            }
            s.logout(Duration::from_secs(5)).await;
        }
    }

    /// A FETCH sent ahead that nobody asks for (the pass was cancelled) is read to its end by
    /// the next command, which then works as always.
    #[tokio::test]
    async fn a_fetch_sent_ahead_and_never_asked_for_is_drained_by_the_next_command() {
        let (mut s, seen) = session(Answer::Sequential).await;
        let got = s.fetch_bodies_then(&[1, 2], Some(&[3, 4])).await.unwrap();
        assert_eq!(got.len(), 2);
        // another batch than the one sent ahead: that one is drained, this one fetched
        let got = s.fetch_bodies(&[7]).await.unwrap();
        assert_eq!(got.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![7]);
        assert!(s.ahead.is_none());
        assert_eq!(seen.lock().unwrap().len(), 3);
        s.logout(Duration::from_secs(5)).await;
    }
}
