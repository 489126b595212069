//! Configuration: figment layers (defaults, TOML file, `MAILPUMP_` env), the raw shape that
//! serde reads, and the validated [`Config`] that the rest of the daemon trusts.
//!
//! Everything here is checked before anything connects anywhere: a bad config names the key
//! and makes `main` exit 78. Secrets are wrapped in [`Secret`], whose Debug/Display redact.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;
use figment::providers::{Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist (set --config or MAILPUMP_CONFIG)")]
    MissingFile { path: PathBuf },
    #[error("config: {key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// A secret string (password, MongoDB URI with credentials). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself: only for the code that sends it to its server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Env values arrive parsed as TOML values, so `PASSWORD=12345` is an integer: accept scalars.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSecret {
    Text(String),
    Int(i64),
    Bool(bool),
}

impl From<RawSecret> for Secret {
    fn from(raw: RawSecret) -> Self {
        match raw {
            RawSecret::Text(s) => Secret(s),
            RawSecret::Int(i) => Secret(i.to_string()),
            RawSecret::Bool(b) => Secret(b.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw shape (what serde reads)
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    store: Option<RawStore>,
    #[serde(default)]
    defaults: RawSettings,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
    metrics: Option<RawMetrics>,
    log: Option<RawLog>,
    limits: Option<RawLimits>,
    cluster: Option<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    enabled: Option<bool>,
    instance: Option<String>,
    lease_ttl: Option<String>,
    renew_every: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_inflight_bytes: Option<i64>,
}

/// `write_concern = "majority"` (journaled), or `{ w = "majority" | N, j = true|false }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawWriteConcern {
    Short(RawW),
    Full { w: Option<RawW>, j: Option<bool> },
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawW {
    Nodes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    uri: Option<RawSecret>,
    database: Option<String>,
    connect_timeout: Option<String>,
    op_timeout: Option<String>,
    max_inline_body: Option<i64>,
    inline_raw_max: Option<i64>,
    write_concern: Option<RawWriteConcern>,
    on_expunge: Option<String>,
    blob_sweep_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    unhealthy_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
}

/// Keys that may sit in `[defaults]` and in every account.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    idle: Option<bool>,
    idle_refresh: Option<String>,
    poll_interval: Option<String>,
    batch_size: Option<i64>,
    batch_bytes: Option<i64>,
    since: Option<String>,
    unseen_only: Option<bool>,
    mark_seen: Option<bool>,
    connect_timeout: Option<String>,
    command_timeout: Option<String>,
    silence_timeout: Option<String>,
    quarantine_after: Option<i64>,
    quarantine_min_age: Option<String>,
    quarantine_retry: Option<String>,
    max_connections: Option<i64>,
    discover_interval: Option<String>,
    flag_scan_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    protocol: Option<String>,
    host: Option<String>,
    port: Option<i64>,
    security: Option<String>,
    accept_invalid_certs: Option<bool>,
    ca_file: Option<PathBuf>,
    username: Option<RawSecretOrName>,
    password: Option<RawSecret>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    auth: Option<String>,
    oauth2: Option<RawOAuth2>,
    mailboxes: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    watch: Option<Vec<String>>,
    delete_after_store: Option<bool>,
    // per-account overrides of [defaults]
    idle: Option<bool>,
    idle_refresh: Option<String>,
    poll_interval: Option<String>,
    batch_size: Option<i64>,
    batch_bytes: Option<i64>,
    since: Option<String>,
    unseen_only: Option<bool>,
    mark_seen: Option<bool>,
    connect_timeout: Option<String>,
    command_timeout: Option<String>,
    silence_timeout: Option<String>,
    quarantine_after: Option<i64>,
    quarantine_min_age: Option<String>,
    quarantine_retry: Option<String>,
    max_connections: Option<i64>,
    discover_interval: Option<String>,
    flag_scan_interval: Option<String>,
}

/// `[accounts.NAME.oauth2]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth2 {
    provider: Option<String>,
    token_url: Option<String>,
    scope: Option<String>,
    client_id: Option<RawSecret>,
    client_secret: Option<RawSecret>,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    refresh_token: Option<RawSecret>,
    refresh_token_file: Option<PathBuf>,
    refresh_token_env: Option<String>,
    mechanism: Option<String>,
    access_token_command: Option<Vec<String>>,
}

/// A username may arrive from env as a number (`MAILPUMP_ACCOUNTS__QQ__USERNAME=123456`).
type RawSecretOrName = RawSecret;

impl RawAccount {
    fn overrides(&self) -> RawSettings {
        RawSettings {
            idle: self.idle,
            idle_refresh: self.idle_refresh.clone(),
            poll_interval: self.poll_interval.clone(),
            batch_size: self.batch_size,
            batch_bytes: self.batch_bytes,
            since: self.since.clone(),
            unseen_only: self.unseen_only,
            mark_seen: self.mark_seen,
            connect_timeout: self.connect_timeout.clone(),
            command_timeout: self.command_timeout.clone(),
            silence_timeout: self.silence_timeout.clone(),
            quarantine_after: self.quarantine_after,
            quarantine_min_age: self.quarantine_min_age.clone(),
            quarantine_retry: self.quarantine_retry.clone(),
            max_connections: self.max_connections,
            discover_interval: self.discover_interval.clone(),
            flag_scan_interval: self.flag_scan_interval.clone(),
        }
    }
}

impl RawSettings {
    /// `self` (an account's own keys) over `base` (the `[defaults]`).
    fn over(self, base: &RawSettings) -> RawSettings {
        RawSettings {
            idle: self.idle.or(base.idle),
            idle_refresh: self.idle_refresh.or_else(|| base.idle_refresh.clone()),
            poll_interval: self.poll_interval.or_else(|| base.poll_interval.clone()),
            batch_size: self.batch_size.or(base.batch_size),
            batch_bytes: self.batch_bytes.or(base.batch_bytes),
            since: self.since.or_else(|| base.since.clone()),
            unseen_only: self.unseen_only.or(base.unseen_only),
            mark_seen: self.mark_seen.or(base.mark_seen),
            connect_timeout: self
                .connect_timeout
                .or_else(|| base.connect_timeout.clone()),
            command_timeout: self
                .command_timeout
                .or_else(|| base.command_timeout.clone()),
            silence_timeout: self
                .silence_timeout
                .or_else(|| base.silence_timeout.clone()),
            quarantine_after: self.quarantine_after.or(base.quarantine_after),
            quarantine_min_age: self
                .quarantine_min_age
                .or_else(|| base.quarantine_min_age.clone()),
            quarantine_retry: self
                .quarantine_retry
                .or_else(|| base.quarantine_retry.clone()),
            max_connections: self.max_connections.or(base.max_connections),
            discover_interval: self
                .discover_interval
                .or_else(|| base.discover_interval.clone()),
            flag_scan_interval: self
                .flag_scan_interval
                .or_else(|| base.flag_scan_interval.clone()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated shape (what the daemon uses)
// ---------------------------------------------------------------------------------------------

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub accounts: Vec<Account>,
    pub metrics: Option<MetricsConfig>,
    pub limits: LimitsConfig,
    /// `[cluster]`: None when not enabled (one process serves every mailbox).
    pub cluster: Option<ClusterConfig>,
    /// Log filter directives from `[log] level` (RUST_LOG wins when set).
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub uri: Secret,
    pub database: String,
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    /// Text or HTML bodies larger than this many bytes go to the `blobs` bucket.
    pub max_inline_body: usize,
    /// Raw messages up to this many bytes are stored inside their document (`raw.data`),
    /// larger ones in the `blobs` bucket (0: always in the bucket).
    pub inline_raw_max: usize,
    /// What MongoDB must have done before a write counts as acknowledged.
    pub write_concern: WriteConcern,
    /// What a message deleted on the server does to its document.
    pub on_expunge: OnExpunge,
    /// Blobs no document refers to any more, untouched this long, are removed (by the daemon,
    /// every this long, only with `on_expunge = "delete"`).
    pub blob_sweep_after: Duration,
}

/// `[store] on_expunge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExpunge {
    /// The document stays and gets `expunged_at` (archives).
    #[default]
    Mark,
    /// The document is removed; its blobs go with the next sweep once nothing refers to them.
    Delete,
}

/// `[store] write_concern`. The default, majority and journaled, is what makes "acknowledged"
/// mean "survives a crash of the database" (POP3 `delete_after_store` relies on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteConcern {
    pub w: WriteAck,
    pub journal: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteAck {
    Majority,
    Nodes(u32),
    Tag(String),
}

impl Default for WriteConcern {
    fn default() -> Self {
        WriteConcern {
            w: WriteAck::Majority,
            journal: true,
        }
    }
}

/// `[limits]`: process-wide bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Bytes of mail that every fetch together may hold in memory (fetched, parsed, being
    /// stored), over all mailboxes.
    pub max_inflight_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_inflight_bytes: 512 * 1024 * 1024,
        }
    }
}

/// `[cluster]`: replicas share the mailboxes through leases in MongoDB (`crate::cluster`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// This replica's name in `leases` and `instances` (default: hostname-pid).
    pub instance: String,
    pub lease_ttl: Duration,
    pub renew_every: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub listen: String,
    pub unhealthy_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Imap,
    Pop3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Implicit TLS from the first byte (993, 995).
    Tls,
    /// Plain connection upgraded with STARTTLS (IMAP) / STLS (POP3); refused if not offered.
    StartTls,
    /// No encryption at all.
    Plain,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsOptions {
    pub accept_invalid_certs: bool,
    pub ca_file: Option<PathBuf>,
}

/// Per-mailbox behaviour: `[defaults]` overlaid with the account's own keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub idle: bool,
    pub idle_refresh: Duration,
    pub poll_interval: Duration,
    pub batch_size: usize,
    /// Upper bound on the bytes one UID FETCH asks for (a batch is cut at whichever comes first).
    pub batch_bytes: u64,
    pub since: Option<NaiveDate>,
    pub unseen_only: bool,
    pub mark_seen: bool,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// While idling: no byte at all for this long means a dead connection. Always longer than
    /// `idle_refresh`, so that a quiet, healthy server (RFC 2177 asks for no keepalives) is
    /// never taken for a dead one.
    pub silence_timeout: Duration,
    /// A UID is quarantined only after failing in this many sessions ...
    pub quarantine_after: u32,
    /// ... spread over at least this long (the first failure to the latest).
    pub quarantine_min_age: Duration,
    /// Quarantined UIDs are tried again on their own this often.
    pub quarantine_retry: Duration,
    /// IMAP connections this account may hold at once, whatever `watch` asks for.
    pub max_connections: usize,
    /// How often the folder list is read again (NOTIFY reports changes sooner where offered).
    pub discover_interval: Duration,
    /// Without CONDSTORE (or QRESYNC for deletions): how often every flag is read again and the
    /// server's UIDs compared with the stored ones.
    pub flag_scan_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub name: String,
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub tls: TlsOptions,
    pub username: String,
    /// Empty for `auth = "oauth2"` (and when secrets were skipped).
    pub password: Secret,
    /// `auth = "oauth2"`: how to get access tokens and which mechanism logs in with them.
    pub oauth2: Option<OAuth2>,
    /// Folder selectors: names, `"*"`, globs, special-use names (`crate::folders`).
    pub mailboxes: Vec<String>,
    /// Selectors of folders left out (default `\\Junk`, `\\Trash` when a wildcard is used).
    pub exclude: Vec<String>,
    /// Selectors of the folders that get their own IDLE connection (default `INBOX`).
    pub watch: Vec<String>,
    pub delete_after_store: bool,
    pub settings: Settings,
}

/// Which bearer-token SASL mechanism an OAuth2 account logs in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Google's XOAUTH2 (also Microsoft's): the default.
    XOAuth2,
    /// RFC 7628 OAUTHBEARER.
    OAuthBearer,
}

impl Mechanism {
    /// The SASL name, as in `AUTH=XOAUTH2` and `AUTHENTICATE XOAUTH2`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// `[accounts.NAME.oauth2]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2 {
    pub mechanism: Mechanism,
    pub source: TokenSource,
}

/// Where access tokens come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    /// The refresh-token grant at a token endpoint.
    Endpoint(TokenEndpoint),
    /// `access_token_command`: a program (argv, no shell) that prints the token.
    Command(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Google,
    Microsoft,
    Custom,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenEndpoint {
    pub provider: Provider,
    pub token_url: String,
    pub scope: Option<String>,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub refresh_token: Secret,
    /// Where the refresh token was read from, so that a rotated one can be written back.
    pub refresh_token_file: Option<PathBuf>,
}

/// The token endpoints of the presets.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const MICROSOFT_TOKEN_URL: &str = "https://login.microsoftonline.com/common/oauth2/v2.0/token";

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Top-level sections that `MAILPUMP_*` env variables may address. Others (MAILPUMP_CONFIG,
/// MAILPUMP_TEST_*) are not configuration keys and are left alone.
const ENV_SECTIONS: &[&str] = &[
    "store", "defaults", "accounts", "metrics", "log", "limits", "cluster",
];

/// Keys whose env values stay byte-for-byte strings (figment's own Env provider reads values as
/// TOML: `0123` would become 123, `true` a boolean, `1e5` a float).
const STRING_KEYS: &[&str] = &[
    "uri",
    "database",
    "host",
    "username",
    "password",
    "password_file",
    "password_env",
    "auth",
    "provider",
    "token_url",
    "scope",
    "client_id",
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "refresh_token",
    "refresh_token_file",
    "refresh_token_env",
    "mechanism",
    "ca_file",
    "protocol",
    "security",
    "since",
    "listen",
    "level",
    "instance",
    "lease_ttl",
    "renew_every",
    "idle_refresh",
    "poll_interval",
    "connect_timeout",
    "command_timeout",
    "silence_timeout",
    "op_timeout",
    "unhealthy_after",
    "quarantine_min_age",
    "quarantine_retry",
    "discover_interval",
    "flag_scan_interval",
    "blob_sweep_after",
];

/// Puts `value` at `path` in `dict`, making the tables on the way.
fn insert_path(dict: &mut figment::value::Dict, path: &[&str], value: figment::value::Value) {
    use figment::value::{Dict, Value};
    match path {
        [] => {}
        [leaf] => {
            dict.insert(leaf.to_string(), value);
        }
        [head, rest @ ..] => {
            let entry = dict
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            } else {
                let mut inner = Dict::new();
                insert_path(&mut inner, rest, value);
                *entry = Value::from(inner);
            }
        }
    }
}

/// Whether the commands that will run need the account passwords. `export` and
/// `check --config-only` never log in: a password source they cannot read is no error for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Required,
    Skipped,
    /// `mailpump auth`: the OAuth2 client secrets are read, refresh tokens (which it is about
    /// to get) and passwords are not, and a missing refresh token is no error.
    Consent,
}

impl Secrets {
    /// What to do with password sources.
    fn for_passwords(self) -> Secrets {
        if self == Secrets::Consent {
            Secrets::Skipped
        } else {
            self
        }
    }
}

/// `MAILPUMP_*` variables as a figment provider: `__` between levels, keys lowercased, values of
/// [`STRING_KEYS`] kept exactly as set, other values read as TOML scalars (numbers, booleans,
/// arrays). Variables outside [`ENV_SECTIONS`] (MAILPUMP_CONFIG, MAILPUMP_TEST_*) are ignored.
struct EnvProvider;

impl figment::Provider for EnvProvider {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("MAILPUMP_* environment variables")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        let mut root = Dict::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name
                .get(..9)
                .filter(|p| p.eq_ignore_ascii_case("MAILPUMP_"))
                .map(|_| &name[9..])
            else {
                continue;
            };
            let key = rest.to_ascii_lowercase();
            let path: Vec<&str> = key.split("__").collect();
            if path.len() < 2
                || !ENV_SECTIONS.contains(&path[0])
                || path.iter().any(|p| p.is_empty())
            {
                continue;
            }
            let Some(value) = value.to_str() else {
                return Err(figment::Error::from(format!(
                    "{}: the value of {name} is not valid UTF-8",
                    path.join(".")
                )));
            };
            let leaf = path[path.len() - 1];
            let value = if STRING_KEYS.contains(&leaf) {
                Value::from(value.to_string())
            } else {
                value
                    .parse::<Value>()
                    .unwrap_or_else(|_| Value::from(value.to_string()))
            };
            insert_path(&mut root, &path, value);
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

/// Loads `path` (which must exist), then `MAILPUMP_*` env over it, and validates, reading
/// every password source.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, Secrets::Required)
}

/// [`load`], reading password sources only when `secrets` is [`Secrets::Required`].
pub fn load_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    from_figment(
        Figment::new().merge(Toml::file(path)).merge(EnvProvider),
        secrets,
    )
}

/// Parses a TOML string (no env): for tests and the example-config check.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    from_figment(Figment::new().merge(Toml::string(text)), Secrets::Required)
}

fn from_figment(figment: Figment, secrets: Secrets) -> Result<Config, ConfigError> {
    let raw: RawConfig = figment.extract().map_err(figment_error)?;
    validate(raw, secrets)
}

fn figment_error(err: figment::Error) -> ConfigError {
    // figment chains every problem it found; the first names the key well enough.
    let first = err.into_iter().next();
    match first {
        Some(e) => {
            let key = if e.path.is_empty() {
                "(top level)".to_string()
            } else {
                e.path.join(".")
            };
            invalid(key, e.kind.to_string())
        }
        None => invalid("(top level)", "unreadable configuration"),
    }
}

fn validate(raw: RawConfig, secrets: Secrets) -> Result<Config, ConfigError> {
    let store = raw
        .store
        .ok_or_else(|| invalid("store", "missing section [store] (uri, database)"))?;
    let store = StoreConfig {
        uri: store
            .uri
            .map(Secret::from)
            .ok_or_else(|| invalid("store.uri", "missing"))?,
        database: match store.database {
            Some(d) if !d.is_empty() && !d.contains(['/', '.', ' ', '"', '$']) => d,
            Some(d) => return Err(invalid("store.database", format!("invalid name {d:?}"))),
            None => "mailpump".to_string(),
        },
        connect_timeout: duration_or("store.connect_timeout", store.connect_timeout, "10s")?,
        op_timeout: duration_or("store.op_timeout", store.op_timeout, "60s")?,
        max_inline_body: match store.max_inline_body {
            None => 1024 * 1024,
            // Text and HTML together stay under 8 MiB, far from the 16 MiB document limit.
            Some(n) if (1024..=4 * 1024 * 1024).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "store.max_inline_body",
                    format!("{n} is outside 1024..=4194304 bytes"),
                ))
            }
        },
        inline_raw_max: match store.inline_raw_max {
            None => crate::parse::DEFAULT_INLINE_RAW,
            // with parse's 12 MiB budget for the parsed part, still under MongoDB's 16 MiB
            Some(n) if (0..=crate::parse::MAX_INLINE_RAW as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    "store.inline_raw_max",
                    format!("{n} is outside 0..={} bytes", crate::parse::MAX_INLINE_RAW),
                ))
            }
        },
        write_concern: write_concern(store.write_concern)?,
        on_expunge: match store.on_expunge.as_deref() {
            None | Some("mark") => OnExpunge::Mark,
            Some("delete") => OnExpunge::Delete,
            Some(other) => {
                return Err(invalid(
                    "store.on_expunge",
                    format!("{other:?}: expected \"mark\" or \"delete\""),
                ))
            }
        },
        blob_sweep_after: {
            let d = duration_or("store.blob_sweep_after", store.blob_sweep_after, "1h")?;
            if d < Duration::from_secs(1) {
                return Err(invalid("store.blob_sweep_after", "must be at least 1s"));
            }
            d
        },
    };
    if !store.uri.expose().starts_with("mongodb://")
        && !store.uri.expose().starts_with("mongodb+srv://")
    {
        return Err(invalid(
            "store.uri",
            "must start with mongodb:// or mongodb+srv://",
        ));
    }

    let mut accounts = Vec::new();
    for (name, account) in raw.accounts {
        accounts.push(validate_account(&name, account, &raw.defaults, secrets)?);
    }
    if accounts.is_empty() {
        return Err(invalid(
            "accounts",
            "no account configured (add an [accounts.NAME] table)",
        ));
    }

    let metrics = match raw.metrics {
        None => None,
        Some(m) => match m.listen {
            None => None,
            Some(listen) => {
                if listen.parse::<std::net::SocketAddr>().is_err() {
                    return Err(invalid(
                        "metrics.listen",
                        format!("{listen:?} is not an address like 127.0.0.1:9464"),
                    ));
                }
                Some(MetricsConfig {
                    listen,
                    unhealthy_after: duration_or(
                        "metrics.unhealthy_after",
                        m.unhealthy_after,
                        "10m",
                    )?,
                })
            }
        },
    };

    let limits = match raw.limits.and_then(|l| l.max_inflight_bytes) {
        None => LimitsConfig::default(),
        Some(n) if (16 * 1024 * 1024..=1 << 40).contains(&n) => LimitsConfig {
            max_inflight_bytes: n as u64,
        },
        Some(n) => {
            return Err(invalid(
                "limits.max_inflight_bytes",
                format!("{n} is outside 16 MiB..=1 TiB"),
            ))
        }
    };

    let cluster = match raw.cluster {
        Some(c) if c.enabled.unwrap_or(false) => Some(cluster(c)?),
        _ => None,
    };

    Ok(Config {
        store,
        accounts,
        metrics,
        limits,
        cluster,
        log_level: raw.log.and_then(|l| l.level),
    })
}

fn cluster(c: RawCluster) -> Result<ClusterConfig, ConfigError> {
    let lease_ttl = duration_or("cluster.lease_ttl", c.lease_ttl, "30s")?;
    if lease_ttl < Duration::from_secs(2) {
        return Err(invalid("cluster.lease_ttl", "must be at least 2s"));
    }
    let renew_every = match c.renew_every {
        None => lease_ttl / 3,
        Some(text) => {
            let d = duration_or("cluster.renew_every", Some(text), "")?;
            // a renewal must have time to fail and be retried before the lease runs out
            if d.is_zero() || d > lease_ttl / 2 {
                return Err(invalid(
                    "cluster.renew_every",
                    format!(
                        "must be more than 0s and at most half of lease_ttl ({:?})",
                        lease_ttl / 2
                    ),
                ));
            }
            d
        }
    };
    let instance = match c.instance {
        Some(name) if !name.is_empty() && name.len() <= 200 && !name.contains(char::is_control) => {
            name
        }
        Some(name) => {
            return Err(invalid(
                "cluster.instance",
                format!("{name:?}: 1 to 200 characters, no control characters"),
            ))
        }
        None => default_instance(),
    };
    Ok(ClusterConfig {
        instance,
        lease_ttl,
        renew_every,
    })
}

/// hostname-pid: unique on one host, readable in `mailpump status`.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "mailpump".into());
    format!("{host}-{}", std::process::id())
}

fn write_concern(raw: Option<RawWriteConcern>) -> Result<WriteConcern, ConfigError> {
    let key = "store.write_concern";
    let (w, j) = match raw {
        None => return Ok(WriteConcern::default()),
        Some(RawWriteConcern::Short(w)) => (Some(w), None),
        Some(RawWriteConcern::Full { w, j }) => (w, j),
    };
    let w = match w {
        None => WriteAck::Majority,
        Some(RawW::Nodes(n)) if (0..=50).contains(&n) => WriteAck::Nodes(n as u32),
        Some(RawW::Nodes(n)) => return Err(invalid(key, format!("w = {n} is outside 0..=50"))),
        Some(RawW::Text(t)) if t == "majority" => WriteAck::Majority,
        Some(RawW::Text(t)) => match t.parse::<u32>() {
            Ok(n) if n <= 50 => WriteAck::Nodes(n),
            _ if !t.trim().is_empty() => WriteAck::Tag(t),
            _ => {
                return Err(invalid(
                    key,
                    "w must be \"majority\", a number or a tag name",
                ))
            }
        },
    };
    if w == WriteAck::Nodes(0) {
        return Err(invalid(
            key,
            "w = 0 (unacknowledged) would let the checkpoint move past writes nobody confirmed",
        ));
    }
    Ok(WriteConcern {
        w,
        journal: j.unwrap_or(true),
    })
}

fn validate_account(
    name: &str,
    raw: RawAccount,
    defaults: &RawSettings,
    secrets: Secrets,
) -> Result<Account, ConfigError> {
    let key = |field: &str| format!("accounts.{name}.{field}");
    let overrides = raw.overrides();
    if name.is_empty()
        || name.contains("__")
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        return Err(invalid(
            format!("accounts.{name}"),
            "account names must be lowercase letters, digits, '-' or '_' (so that MAILPUMP_ACCOUNTS__NAME__* can reach them)",
        ));
    }

    let protocol = match raw.protocol.as_deref().unwrap_or("imap") {
        "imap" => Protocol::Imap,
        "pop3" => Protocol::Pop3,
        other => {
            return Err(invalid(
                key("protocol"),
                format!("{other:?} is not imap or pop3"),
            ))
        }
    };
    let security = match raw.security.as_deref().unwrap_or("tls") {
        "tls" => Security::Tls,
        "starttls" => Security::StartTls,
        "plain" => Security::Plain,
        other => {
            return Err(invalid(
                key("security"),
                format!("{other:?} is not tls, starttls or plain"),
            ))
        }
    };
    let host = match raw.host {
        Some(h) if !h.trim().is_empty() => h,
        _ => return Err(invalid(key("host"), "missing")),
    };
    let port = match raw.port {
        None => match (protocol, security) {
            (Protocol::Imap, Security::Tls) => 993,
            (Protocol::Imap, _) => 143,
            (Protocol::Pop3, Security::Tls) => 995,
            (Protocol::Pop3, _) => 110,
        },
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => return Err(invalid(key("port"), format!("{p} is outside 1..=65535"))),
    };
    if let Some(ca) = &raw.ca_file {
        if let Err(e) = std::fs::metadata(ca).and_then(|_| std::fs::read(ca).map(|_| ())) {
            return Err(invalid(
                key("ca_file"),
                format!("cannot read {}: {e}", ca.display()),
            ));
        }
    }
    let username = match raw.username.map(Secret::from) {
        Some(u) if !u.expose().is_empty() => u.expose().to_string(),
        _ => return Err(invalid(key("username"), "missing")),
    };

    let auth = raw.auth.as_deref().unwrap_or("password");
    let (password, oauth2) = match auth {
        "password" => {
            if raw.oauth2.is_some() {
                return Err(invalid(
                    key("oauth2"),
                    "set auth = \"oauth2\" to log in with it (auth is \"password\")",
                ));
            }
            let password = secret_source(
                &key("password"),
                "password",
                SecretSources {
                    inline: raw.password,
                    file: raw.password_file,
                    env: raw.password_env,
                },
                secrets.for_passwords(),
            )?
            .ok_or_else(|| {
                invalid(
                    key("password"),
                    "missing: set one of password, password_file or password_env",
                )
            })?;
            (password.secret, None)
        }
        "oauth2" => {
            if raw.password.is_some() || raw.password_file.is_some() || raw.password_env.is_some() {
                return Err(invalid(
                    key("password"),
                    "not used with auth = \"oauth2\": leave password, password_file and password_env out",
                ));
            }
            let Some(o) = raw.oauth2 else {
                return Err(invalid(
                    key("oauth2"),
                    format!("missing: auth = \"oauth2\" needs an [accounts.{name}.oauth2] table"),
                ));
            };
            (
                Secret::new(""),
                Some(validate_oauth2(&key("oauth2"), o, protocol, secrets)?),
            )
        }
        other => {
            return Err(invalid(
                key("auth"),
                format!("{other:?} is not \"password\" or \"oauth2\""),
            ))
        }
    };

    let mailboxes = match (protocol, raw.mailboxes) {
        (_, None) => vec!["INBOX".to_string()],
        (Protocol::Pop3, Some(list)) if list != ["INBOX"] => {
            return Err(invalid(
                key("mailboxes"),
                "POP3 has one mailbox: leave mailboxes out",
            ))
        }
        (_, Some(list)) if list.is_empty() => {
            return Err(invalid(
                key("mailboxes"),
                "empty list: name at least one mailbox",
            ))
        }
        (_, Some(list)) => {
            let mut seen = std::collections::HashSet::new();
            for m in &list {
                if m.is_empty() || m.contains(['\r', '\n', '\0']) {
                    return Err(invalid(key("mailboxes"), format!("invalid name {m:?}")));
                }
                if !seen.insert(m) {
                    return Err(invalid(key("mailboxes"), format!("{m:?} listed twice")));
                }
            }
            list
        }
    };
    let selectors =
        |field: &str, list: Option<Vec<String>>| -> Result<Option<Vec<String>>, ConfigError> {
            let Some(list) = list else { return Ok(None) };
            if protocol == Protocol::Pop3 {
                return Err(invalid(key(field), "POP3 has one mailbox: leave it out"));
            }
            for m in &list {
                crate::folders::Selector::parse(m).map_err(|why| invalid(key(field), why))?;
            }
            Ok(Some(list))
        };
    for m in &mailboxes {
        crate::folders::Selector::parse(m).map_err(|why| invalid(key("mailboxes"), why))?;
    }
    let wildcard = mailboxes.iter().any(|m| {
        !matches!(
            crate::folders::Selector::parse(m),
            Ok(crate::folders::Selector::Name(_))
        )
    });
    let exclude = selectors("exclude", raw.exclude)?.unwrap_or_else(|| {
        if wildcard {
            vec!["\\Junk".to_string(), "\\Trash".to_string()]
        } else {
            Vec::new()
        }
    });
    let watch = selectors("watch", raw.watch)?.unwrap_or_else(|| vec!["INBOX".to_string()]);
    let delete_after_store = raw.delete_after_store.unwrap_or(false);
    if delete_after_store && protocol == Protocol::Imap {
        return Err(invalid(
            key("delete_after_store"),
            "only for POP3 accounts (IMAP mailboxes are never modified)",
        ));
    }

    let settings = validate_settings(&format!("accounts.{name}"), overrides.over(defaults))?;
    Ok(Account {
        name: name.to_string(),
        protocol,
        host,
        port,
        security,
        tls: TlsOptions {
            accept_invalid_certs: raw.accept_invalid_certs.unwrap_or(false),
            ca_file: raw.ca_file,
        },
        username,
        password,
        oauth2,
        mailboxes,
        exclude,
        watch,
        delete_after_store,
        settings,
    })
}

/// One secret's three possible sources (`NAME`, `NAME_file`, `NAME_env`).
struct SecretSources {
    inline: Option<RawSecret>,
    file: Option<PathBuf>,
    env: Option<String>,
}

/// A secret read from its one source, with where it came from.
struct ReadSecret {
    secret: Secret,
    file: Option<PathBuf>,
}

/// Reads the one source of secret `base` (`password`, `client_secret`, ...) whose keys sit
/// under `key`'s parent; `None` when none is set. With [`Secrets::Skipped`] nothing is read and
/// the secret is empty.
fn secret_source(
    key: &str,
    base: &str,
    sources: SecretSources,
    secrets: Secrets,
) -> Result<Option<ReadSecret>, ConfigError> {
    let sibling = |suffix: &str| format!("{key}{suffix}");
    let SecretSources { inline, file, env } = sources;
    let file_kept = file.clone();
    let secret = match (inline, file, env) {
        (None, None, None) => return Ok(None),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(invalid(
                key,
                format!("set only one of {base}, {base}_file or {base}_env"),
            ))
        }
        _ if secrets == Secrets::Skipped => Secret::new(""),
        (Some(p), None, None) => {
            let p = Secret::from(p);
            if p.expose().is_empty() {
                return Err(invalid(key, "empty"));
            }
            p
        }
        (None, Some(file), None) => match std::fs::read_to_string(&file) {
            Ok(text) => {
                let text = text.trim_end_matches(['\r', '\n']);
                if text.is_empty() {
                    return Err(invalid(
                        sibling("_file"),
                        format!("{} is empty", file.display()),
                    ));
                }
                Secret(text.to_string())
            }
            Err(e) => {
                return Err(invalid(
                    sibling("_file"),
                    format!("cannot read {}: {e}", file.display()),
                ))
            }
        },
        (None, None, Some(var)) => match std::env::var(&var) {
            Ok(value) if !value.is_empty() => Secret(value),
            Ok(_) => {
                return Err(invalid(
                    sibling("_env"),
                    format!("environment variable {var} is empty"),
                ))
            }
            Err(_) => {
                return Err(invalid(
                    sibling("_env"),
                    format!("environment variable {var} is not set"),
                ))
            }
        },
    };
    Ok(Some(ReadSecret {
        secret,
        file: file_kept,
    }))
}

/// Whether `url` may carry secrets: https, or http to this machine only.
fn token_url_ok(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.is_empty() => h,
        _ => host,
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

fn validate_oauth2(
    prefix: &str,
    raw: RawOAuth2,
    protocol: Protocol,
    secrets: Secrets,
) -> Result<OAuth2, ConfigError> {
    let key = |field: &str| format!("{prefix}.{field}");
    let mechanism = match raw.mechanism.as_deref().unwrap_or("xoauth2") {
        "xoauth2" => Mechanism::XOAuth2,
        "oauthbearer" => Mechanism::OAuthBearer,
        other => {
            return Err(invalid(
                key("mechanism"),
                format!("{other:?} is not xoauth2 or oauthbearer"),
            ))
        }
    };
    let client_secret_set = raw.client_secret.is_some()
        || raw.client_secret_file.is_some()
        || raw.client_secret_env.is_some();
    let refresh_token_set = raw.refresh_token.is_some()
        || raw.refresh_token_file.is_some()
        || raw.refresh_token_env.is_some();
    if let Some(argv) = raw.access_token_command {
        let endpoint_keys = [
            ("provider", raw.provider.is_some()),
            ("token_url", raw.token_url.is_some()),
            ("scope", raw.scope.is_some()),
            ("client_id", raw.client_id.is_some()),
            ("client_secret", client_secret_set),
            ("refresh_token", refresh_token_set),
        ];
        if let Some((name, _)) = endpoint_keys.iter().find(|(_, set)| *set) {
            return Err(invalid(
                key(name),
                "not used with access_token_command (the command gets the token itself): leave one of them out",
            ));
        }
        if argv.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(invalid(
                key("access_token_command"),
                "must name a program: [\"/path/to/helper\", \"arg\", ...]",
            ));
        }
        return Ok(OAuth2 {
            mechanism,
            source: TokenSource::Command(argv),
        });
    }
    let provider = match raw.provider.as_deref().unwrap_or("custom") {
        "google" => Provider::Google,
        "microsoft" => Provider::Microsoft,
        "custom" => Provider::Custom,
        other => {
            return Err(invalid(
                key("provider"),
                format!("{other:?} is not google, microsoft or custom"),
            ))
        }
    };
    let token_url = match (raw.token_url, provider) {
        (Some(url), _) => url,
        (None, Provider::Google) => GOOGLE_TOKEN_URL.to_string(),
        (None, Provider::Microsoft) => MICROSOFT_TOKEN_URL.to_string(),
        (None, Provider::Custom) => {
            return Err(invalid(
                key("token_url"),
                "missing: required with provider = \"custom\" (or set provider = \"google\" / \"microsoft\", or access_token_command)",
            ))
        }
    };
    if !token_url_ok(&token_url) {
        return Err(invalid(
            key("token_url"),
            format!(
                "{:?} must be an https:// URL (http:// only to 127.0.0.1/localhost)",
                crate::oauth::shown_url(&token_url)
            ),
        ));
    }
    let scope = match (raw.scope, provider) {
        (Some(s), _) if s.trim().is_empty() => None,
        (Some(s), _) => Some(s),
        (None, Provider::Google) => Some("https://mail.google.com/".to_string()),
        (None, Provider::Microsoft) => Some(
            match protocol {
                Protocol::Imap => "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
                Protocol::Pop3 => "https://outlook.office.com/POP.AccessAsUser.All offline_access",
            }
            .to_string(),
        ),
        (None, Provider::Custom) => None,
    };
    let client_id = match raw.client_id.map(Secret::from) {
        Some(id) if !id.expose().trim().is_empty() => id.expose().to_string(),
        _ => return Err(invalid(key("client_id"), "missing")),
    };
    let client_secret = secret_source(
        &key("client_secret"),
        "client_secret",
        SecretSources {
            inline: raw.client_secret,
            file: raw.client_secret_file,
            env: raw.client_secret_env,
        },
        if secrets == Secrets::Consent {
            Secrets::Required
        } else {
            secrets
        },
    )?
    .map(|s| s.secret);
    let refresh = secret_source(
        &key("refresh_token"),
        "refresh_token",
        SecretSources {
            inline: raw.refresh_token,
            file: raw.refresh_token_file,
            env: raw.refresh_token_env,
        },
        secrets.for_passwords(),
    )?;
    let refresh = match (refresh, secrets) {
        (Some(r), _) => Some(r),
        (None, Secrets::Consent) => Some(ReadSecret {
            secret: Secret::new(""),
            file: None,
        }),
        (None, _) => None,
    }
    .ok_or_else(|| {
        invalid(
            key("refresh_token"),
            "missing: set one of refresh_token, refresh_token_file or refresh_token_env (or access_token_command); README, OAuth2, tells how to get one",
        )
    })?;
    Ok(OAuth2 {
        mechanism,
        source: TokenSource::Endpoint(TokenEndpoint {
            provider,
            token_url,
            scope,
            client_id,
            client_secret,
            refresh_token: refresh.secret,
            refresh_token_file: refresh.file,
        }),
    })
}

fn validate_settings(prefix: &str, raw: RawSettings) -> Result<Settings, ConfigError> {
    let key = |field: &str| format!("{prefix}.{field}");
    let idle_refresh = duration_or(&key("idle_refresh"), raw.idle_refresh, "10m")?;
    if idle_refresh > Duration::from_secs(29 * 60) {
        return Err(invalid(
            key("idle_refresh"),
            "must be under 29m (RFC 2177: servers may drop IDLE after 30 minutes)",
        ));
    }
    let batch_size = match raw.batch_size {
        None => 100,
        Some(n) if (1..=10_000).contains(&n) => n as usize,
        Some(n) => {
            return Err(invalid(
                key("batch_size"),
                format!("{n} is outside 1..=10000"),
            ))
        }
    };
    let batch_bytes = match raw.batch_bytes {
        None => 64 * 1024 * 1024,
        Some(n) if (1024 * 1024..=256 * 1024 * 1024).contains(&n) => n as u64,
        Some(n) => {
            return Err(invalid(
                key("batch_bytes"),
                format!("{n} is outside 1 MiB..=256 MiB"),
            ))
        }
    };
    let since =
        match raw.since {
            None => None,
            Some(s) => Some(NaiveDate::parse_from_str(&s, "%Y-%m-%d").map_err(|_| {
                invalid(key("since"), format!("{s:?} is not a date like 2015-06-14"))
            })?),
        };
    // Silence must outlast the refresh: a server that sends nothing while idling (RFC 2177 asks
    // for no keepalives) is healthy until the refresh's DONE goes unanswered.
    let silence_timeout = match raw.silence_timeout {
        None => idle_refresh + Duration::from_secs(60),
        Some(text) => {
            let d = duration_or(&key("silence_timeout"), Some(text), "")?;
            if d <= idle_refresh {
                return Err(invalid(
                    key("silence_timeout"),
                    format!(
                        "{} must be longer than {} ({}s): a quiet, healthy IDLE would be taken for a dead connection",
                        key("silence_timeout"),
                        key("idle_refresh"),
                        idle_refresh.as_secs()
                    ),
                ));
            }
            d
        }
    };
    let quarantine_after = match raw.quarantine_after {
        None => 3,
        Some(n) if (1..=1000).contains(&n) => n as u32,
        Some(n) => {
            return Err(invalid(
                key("quarantine_after"),
                format!("{n} is outside 1..=1000"),
            ))
        }
    };
    let quarantine_min_age = match raw.quarantine_min_age.as_deref() {
        None => Duration::from_secs(3600),
        Some(text) => parse_duration(text).ok_or_else(|| {
            invalid(
                key("quarantine_min_age"),
                format!("{text:?} is not a duration like \"0s\", \"30m\", \"1h\""),
            )
        })?,
    };
    Ok(Settings {
        idle: raw.idle.unwrap_or(true),
        idle_refresh,
        poll_interval: duration_or(&key("poll_interval"), raw.poll_interval, "60s")?,
        batch_size,
        batch_bytes,
        since,
        unseen_only: raw.unseen_only.unwrap_or(false),
        mark_seen: raw.mark_seen.unwrap_or(false),
        connect_timeout: duration_or(&key("connect_timeout"), raw.connect_timeout, "30s")?,
        command_timeout: duration_or(&key("command_timeout"), raw.command_timeout, "120s")?,
        silence_timeout,
        quarantine_after,
        quarantine_min_age,
        quarantine_retry: duration_or(&key("quarantine_retry"), raw.quarantine_retry, "1d")?,
        max_connections: match raw.max_connections {
            None => 5,
            Some(n) if (1..=100).contains(&n) => n as usize,
            Some(n) => {
                return Err(invalid(
                    key("max_connections"),
                    format!("{n} is outside 1..=100"),
                ))
            }
        },
        discover_interval: {
            let d = duration_or(&key("discover_interval"), raw.discover_interval, "5m")?;
            if d < Duration::from_secs(1) {
                return Err(invalid(key("discover_interval"), "must be at least 1s"));
            }
            d
        },
        flag_scan_interval: {
            let d = duration_or(&key("flag_scan_interval"), raw.flag_scan_interval, "15m")?;
            if d < Duration::from_secs(1) {
                return Err(invalid(key("flag_scan_interval"), "must be at least 1s"));
            }
            d
        },
    })
}

fn duration_or(key: &str, value: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    let text = value.as_deref().unwrap_or(default);
    match parse_duration(text) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(invalid(
            key,
            format!("{text:?} is not a duration like \"500ms\", \"90s\", \"10m\", \"1h\""),
        )),
    }
}

/// Parses `"500ms"`, `"90s"`, `"10m"`, `"2h"`, `"1d"` (one number, one unit).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [store]
        uri = "mongodb://127.0.0.1:27017"
        [accounts.work]
        host = "imap.example.com"
        username = "me"
        password = "pw"
    "#;

    fn err(text: &str) -> String {
        from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = from_toml_str(MINIMAL).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.port, 993);
        assert_eq!(a.security, Security::Tls);
        assert_eq!(a.mailboxes, vec!["INBOX"]);
        assert_eq!(a.settings.batch_size, 100);
        assert_eq!(a.settings.idle_refresh, Duration::from_secs(600));
        assert_eq!(a.settings.poll_interval, Duration::from_secs(60));
        assert!(a.settings.idle && !a.settings.mark_seen && !a.settings.unseen_only);
        assert_eq!(c.store.database, "mailpump");
    }

    #[test]
    fn example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../config/mailpump.example.toml");
        let c = from_toml_str(text).expect("config/mailpump.example.toml must be valid");
        let minimal = from_toml_str(MINIMAL).unwrap();
        // every key in [defaults] of the example carries its default value
        let mut example = c.accounts[0].settings.clone();
        example.since = None; // the example shows the optional `since`
        assert_eq!(example, minimal.accounts[0].settings);
        assert_eq!(c.store.op_timeout, minimal.store.op_timeout);
        assert_eq!(c.store.max_inline_body, minimal.store.max_inline_body);
        assert_eq!(c.store.inline_raw_max, minimal.store.inline_raw_max);
        assert_eq!(c.store.on_expunge, minimal.store.on_expunge);
        assert_eq!(c.store.blob_sweep_after, minimal.store.blob_sweep_after);
    }

    #[test]
    fn on_expunge_and_the_flag_scan() {
        let c = from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.store.on_expunge, OnExpunge::Mark);
        assert_eq!(c.store.blob_sweep_after, Duration::from_secs(3600));
        assert_eq!(
            c.accounts[0].settings.flag_scan_interval,
            Duration::from_secs(900)
        );
        let with = |line: &str| MINIMAL.replacen("[store]", &format!("[store]\n{line}"), 1);
        let c = from_toml_str(&with("on_expunge = \"delete\"")).unwrap();
        assert_eq!(c.store.on_expunge, OnExpunge::Delete);
        let e = err(&with("on_expunge = \"purge\""));
        assert!(e.contains("store.on_expunge") && e.contains("purge"), "{e}");
        let e = err(&with("blob_sweep_after = \"0s\""));
        assert!(e.contains("store.blob_sweep_after"), "{e}");
        let e = err(&MINIMAL.replacen(
            "[accounts.work]",
            "[accounts.work]\nflag_scan_interval = \"soon\"",
            1,
        ));
        assert!(e.contains("flag_scan_interval"), "{e}");
    }

    #[test]
    fn cluster_defaults_and_errors_name_their_key() {
        assert_eq!(from_toml_str(MINIMAL).unwrap().cluster, None);
        let with = |t: &str| format!("{MINIMAL}\n[cluster]\n{t}\n");
        assert_eq!(
            from_toml_str(&with("enabled = false")).unwrap().cluster,
            None
        );
        let c = from_toml_str(&with("enabled = true"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(30));
        assert_eq!(c.renew_every, Duration::from_secs(10));
        assert!(
            c.instance.ends_with(&format!("-{}", std::process::id())),
            "{c:?}"
        );
        let c = from_toml_str(&with(
            "enabled = true\ninstance = \"pod-7\"\nlease_ttl = \"6s\"\nrenew_every = \"1s\"",
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(
            (c.instance.as_str(), c.lease_ttl, c.renew_every),
            ("pod-7", Duration::from_secs(6), Duration::from_secs(1))
        );
        let e = err(&with("enabled = true\nlease_ttl = \"1s\""));
        assert!(e.contains("cluster.lease_ttl"), "{e}");
        let e = err(&with("enabled = true\nrenew_every = \"20s\""));
        assert!(
            e.contains("cluster.renew_every") && e.contains("half"),
            "{e}"
        );
        let e = err(&with("enabled = true\ninstance = \"\""));
        assert!(e.contains("cluster.instance"), "{e}");
        let e = err(&with("enabled = true\nleases = 3"));
        assert!(e.contains("unknown field") && e.contains("leases"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{MINIMAL}\nfoo = 1\n"));
        assert!(e.contains("unknown field") && e.contains("foo"), "{e}");
        let e = err(&MINIMAL.replace("username", "usrname"));
        assert!(e.contains("accounts.work") && e.contains("usrname"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = err(&format!("{MINIMAL}\nport = \"x\"\n"));
        assert!(e.contains("accounts.work.port"), "{e}");
    }

    #[test]
    fn port_out_of_range_is_named() {
        let e = err(&format!("{MINIMAL}\nport = 70000\n"));
        assert!(
            e.contains("accounts.work.port") && e.contains("70000"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_is_named() {
        let e = err(&MINIMAL.replace(
            "[accounts.work]",
            "[defaults]\npoll_interval = \"soon\"\n[accounts.work]",
        ));
        assert!(
            e.contains("accounts.work.poll_interval") && e.contains("soon"),
            "{e}"
        );
    }

    #[test]
    fn empty_mailbox_list_is_an_error() {
        let e = err(&format!("{MINIMAL}\nmailboxes = []\n"));
        assert!(e.contains("accounts.work.mailboxes"), "{e}");
    }

    #[test]
    fn missing_password_file_is_named() {
        let e = err(&MINIMAL.replace("password = \"pw\"", "password_file = \"/nonexistent/pw\""));
        assert!(
            e.contains("accounts.work.password_file") && e.contains("/nonexistent/pw"),
            "{e}"
        );
    }

    #[test]
    fn two_password_sources_are_refused() {
        let e = err(&format!("{MINIMAL}\npassword_env = \"X\"\n"));
        assert!(e.contains("only one"), "{e}");
    }

    #[test]
    fn uppercase_account_names_are_refused() {
        let e = err(&MINIMAL.replace("accounts.work", "accounts.Work"));
        assert!(e.contains("lowercase"), "{e}");
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let c = from_toml_str(&MINIMAL.replace("pw", "hunter2")).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("mongodb://"), "{shown}");
    }

    #[test]
    fn numeric_passwords_are_accepted() {
        let c = from_toml_str(&MINIMAL.replace("\"pw\"", "12345")).unwrap();
        assert_eq!(c.accounts[0].password.expose(), "12345");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1.5h"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("10"), None);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn env_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("MAILPUMP_ACCOUNTS__WORK__PASSWORD", "67890");
            jail.set_env("MAILPUMP_STORE__DATABASE", "other");
            jail.set_env("MAILPUMP_TEST_SOMETHING", "ignored");
            let c = load(&path).map_err(|e| e.to_string())?;
            assert_eq!(c.accounts[0].password.expose(), "67890");
            assert_eq!(c.store.database, "other");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn env_strings_stay_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("MAILPUMP_ACCOUNTS__WORK__PASSWORD", "0123");
            jail.set_env("MAILPUMP_ACCOUNTS__WORK__USERNAME", "007");
            jail.set_env("MAILPUMP_ACCOUNTS__WORK__HOST", "1e5");
            jail.set_env("MAILPUMP_ACCOUNTS__WORK__PORT", "1143");
            jail.set_env("MAILPUMP_DEFAULTS__IDLE", "false");
            let c = load(&path).map_err(|e| e.to_string())?;
            let a = &c.accounts[0];
            assert_eq!(a.password.expose(), "0123");
            assert_eq!(a.username, "007");
            assert_eq!(a.host, "1e5");
            assert_eq!(a.port, 1143);
            assert!(!a.settings.idle);
            jail.set_env("MAILPUMP_ACCOUNTS__WORK__PASSWORD", "true");
            assert_eq!(
                load(&path).map_err(|e| e.to_string())?.accounts[0]
                    .password
                    .expose(),
                "true"
            );
            Ok(())
        });
    }

    #[test]
    fn silence_must_outlast_the_idle_refresh() {
        let c = from_toml_str(MINIMAL).unwrap();
        assert!(c.accounts[0].settings.silence_timeout > c.accounts[0].settings.idle_refresh);
        let e = err(&MINIMAL.replace(
            "[accounts.work]",
            "[defaults]\nidle_refresh = \"10m\"\nsilence_timeout = \"5m\"\n[accounts.work]",
        ));
        assert!(
            e.contains("accounts.work.silence_timeout") && e.contains("accounts.work.idle_refresh"),
            "{e}"
        );
        // a shorter refresh moves the default silence with it
        let c = from_toml_str(&format!("{MINIMAL}\nidle_refresh = \"2m\"\n")).unwrap();
        assert_eq!(
            c.accounts[0].settings.silence_timeout,
            Duration::from_secs(180)
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn empty_passwords_are_refused_and_skipped_secrets_are_not_read() {
        let e = err(&MINIMAL.replace("password = \"pw\"", "password = \"\""));
        assert!(
            e.contains("accounts.work.password") && e.contains("empty"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("pw");
        std::fs::write(&empty, "\n").unwrap();
        let e = err(&MINIMAL.replace(
            "password = \"pw\"",
            &format!("password_file = \"{}\"", empty.display()),
        ));
        assert!(
            e.contains("accounts.work.password_file") && e.contains("empty"),
            "{e}"
        );
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            MINIMAL.replace(
                "password = \"pw\"",
                "password_env = \"MAILPUMP_TEST_NEVER_SET\"",
            ),
        )
        .unwrap();
        // inside a Jail: other tests set MAILPUMP_* variables of their own meanwhile
        figment::Jail::expect_with(|_jail| {
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains("MAILPUMP_TEST_NEVER_SET"), "{e}");
            let c = load_with(&path, Secrets::Skipped).map_err(|e| e.to_string())?;
            assert_eq!(c.accounts[0].password.expose(), "");
            Ok(())
        });
    }

    #[test]
    fn write_concern_and_limits() {
        let c = from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.store.write_concern, WriteConcern::default());
        assert_eq!(c.store.write_concern.w, WriteAck::Majority);
        assert!(c.store.write_concern.journal);
        assert_eq!(c.limits.max_inflight_bytes, 512 * 1024 * 1024);
        let with =
            |extra: &str| MINIMAL.replace("[accounts.work]", &format!("{extra}\n[accounts.work]"));
        let c = from_toml_str(&with("write_concern = { w = 1, j = false }")).unwrap();
        assert_eq!(
            c.store.write_concern,
            WriteConcern {
                w: WriteAck::Nodes(1),
                journal: false
            }
        );
        let e = err(&with("write_concern = { w = 0 }"));
        assert!(e.contains("store.write_concern"), "{e}");
        let e = err(&format!("{MINIMAL}\n[limits]\nmax_inflight_bytes = 1000\n"));
        assert!(e.contains("limits.max_inflight_bytes"), "{e}");
    }

    #[test]
    fn quarantine_settings_have_defaults_and_allow_zero_age() {
        let s = &from_toml_str(MINIMAL).unwrap().accounts[0].settings;
        assert_eq!(
            (s.quarantine_after, s.quarantine_min_age),
            (3, Duration::from_secs(3600))
        );
        assert_eq!(s.quarantine_retry, Duration::from_secs(86400));
        let c = from_toml_str(&format!(
            "{MINIMAL}\nquarantine_min_age = \"0s\"\nquarantine_after = 1\n"
        ))
        .unwrap();
        assert_eq!(c.accounts[0].settings.quarantine_min_age, Duration::ZERO);
        let e = err(&format!("{MINIMAL}\nquarantine_after = 0\n"));
        assert!(e.contains("accounts.work.quarantine_after"), "{e}");
    }

    const OAUTH: &str = r#"
        [store]
        uri = "mongodb://127.0.0.1:27017"
        [accounts.gmail]
        host = "imap.gmail.com"
        username = "me@gmail.com"
        auth = "oauth2"
        [accounts.gmail.oauth2]
        provider = "google"
        client_id = "id.apps.googleusercontent.com"
        client_secret = "csecret"
        refresh_token = "1//rtoken"
    "#;

    #[test]
    fn oauth2_google_preset() {
        let c = from_toml_str(OAUTH).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.password.expose(), "");
        let o = a.oauth2.as_ref().unwrap();
        assert_eq!(o.mechanism, Mechanism::XOAuth2);
        let TokenSource::Endpoint(ep) = &o.source else {
            panic!("endpoint expected")
        };
        assert_eq!(ep.provider, Provider::Google);
        assert_eq!(ep.token_url, GOOGLE_TOKEN_URL);
        assert_eq!(ep.scope.as_deref(), Some("https://mail.google.com/"));
        assert_eq!(ep.client_secret.as_ref().unwrap().expose(), "csecret");
        assert_eq!(ep.refresh_token.expose(), "1//rtoken");
        assert!(ep.refresh_token_file.is_none());
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("csecret") && !shown.contains("rtoken"),
            "{shown}"
        );
    }

    #[test]
    fn oauth2_microsoft_scope_follows_the_protocol() {
        let text = OAUTH
            .replace("\"google\"", "\"microsoft\"\nmechanism = \"oauthbearer\"")
            .replace("username =", "protocol = \"pop3\"\nusername =");
        let c = from_toml_str(&text).unwrap();
        let o = c.accounts[0].oauth2.as_ref().unwrap();
        assert_eq!(o.mechanism, Mechanism::OAuthBearer);
        let TokenSource::Endpoint(ep) = &o.source else {
            panic!()
        };
        assert_eq!(ep.token_url, MICROSOFT_TOKEN_URL);
        assert_eq!(
            ep.scope.as_deref(),
            Some("https://outlook.office.com/POP.AccessAsUser.All offline_access")
        );
    }

    #[test]
    fn oauth2_errors_name_their_keys() {
        let e = err(&OAUTH.replace("provider = \"google\"", ""));
        assert!(e.contains("accounts.gmail.oauth2.token_url"), "{e}");
        let e = err(&OAUTH.replace(
            "provider = \"google\"",
            "token_url = \"http://idp.example.com/t\"",
        ));
        assert!(
            e.contains("accounts.gmail.oauth2.token_url") && e.contains("https"),
            "{e}"
        );
        let e = err(&OAUTH.replace("client_id = \"id.apps.googleusercontent.com\"", ""));
        assert!(e.contains("accounts.gmail.oauth2.client_id"), "{e}");
        let e = err(&OAUTH.replace("refresh_token = \"1//rtoken\"", ""));
        assert!(
            e.contains("accounts.gmail.oauth2.refresh_token") && e.contains("missing"),
            "{e}"
        );
        let e = err(&format!("{OAUTH}\nrefresh_token_env = \"X\"\n"));
        assert!(
            e.contains("accounts.gmail.oauth2.refresh_token") && e.contains("only one"),
            "{e}"
        );
        let e = err(&OAUTH.replace("provider = \"google\"", "provider = \"yahoo\""));
        assert!(e.contains("accounts.gmail.oauth2.provider"), "{e}");
        let e = err(&format!("{OAUTH}\nmechanism = \"plain\"\n"));
        assert!(e.contains("accounts.gmail.oauth2.mechanism"), "{e}");
        let e = err(&format!("{OAUTH}\nfoo = 1\n"));
        assert!(
            e.contains("accounts.gmail.oauth2") && e.contains("foo"),
            "{e}"
        );
        let e = err(&OAUTH.replace("auth = \"oauth2\"", "auth = \"kerberos\""));
        assert!(e.contains("accounts.gmail.auth"), "{e}");
        let e = err(&OAUTH.replace("auth = \"oauth2\"", "auth = \"oauth2\"\npassword = \"pw\""));
        assert!(
            e.contains("accounts.gmail.password") && e.contains("oauth2"),
            "{e}"
        );
        let e = err(&OAUTH.replace("auth = \"oauth2\"", ""));
        assert!(
            e.contains("accounts.gmail.oauth2") && e.contains("auth"),
            "{e}"
        );
        let e = err(OAUTH.split("[accounts.gmail.oauth2]").next().unwrap());
        assert!(
            e.contains("accounts.gmail.oauth2") && e.contains("missing"),
            "{e}"
        );
        let e = err(&format!(
            "{OAUTH}\naccess_token_command = [\"/bin/helper\"]\n"
        ));
        assert!(e.contains("access_token_command"), "{e}");
        let e = err(&OAUTH.replace(
            "refresh_token = \"1//rtoken\"",
            "refresh_token_file = \"/nonexistent/rt\"",
        ));
        assert!(
            e.contains("accounts.gmail.oauth2.refresh_token_file"),
            "{e}"
        );
    }

    #[test]
    fn oauth2_token_command_and_files() {
        let c = from_toml_str(&format!(
            "{}\n[accounts.gmail.oauth2]\naccess_token_command = [\"/usr/local/bin/helper\", \"gmail\"]\n",
            OAUTH.split("[accounts.gmail.oauth2]").next().unwrap()
        ))
        .unwrap();
        assert_eq!(
            c.accounts[0].oauth2.as_ref().unwrap().source,
            TokenSource::Command(vec!["/usr/local/bin/helper".into(), "gmail".into()])
        );
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path().join("rt");
        std::fs::write(&rt, "from-file\n").unwrap();
        let c = from_toml_str(&OAUTH.replace(
            "refresh_token = \"1//rtoken\"",
            &format!(
                "refresh_token_file = \"{}\"\ntoken_url = \"http://127.0.0.1:8080/token\"",
                rt.display()
            ),
        ))
        .unwrap();
        let TokenSource::Endpoint(ep) = &c.accounts[0].oauth2.as_ref().unwrap().source else {
            panic!()
        };
        assert_eq!(ep.refresh_token.expose(), "from-file");
        assert_eq!(ep.refresh_token_file.as_deref(), Some(rt.as_path()));
        assert_eq!(ep.token_url, "http://127.0.0.1:8080/token");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn oauth2_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, OAUTH).unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("MAILPUMP_ACCOUNTS__GMAIL__OAUTH2__REFRESH_TOKEN", "0123");
            jail.set_env("MAILPUMP_ACCOUNTS__GMAIL__OAUTH2__CLIENT_ID", "42");
            jail.set_env("MAILPUMP_ACCOUNTS__GMAIL__OAUTH2__MECHANISM", "oauthbearer");
            let c = load(&path).map_err(|e| e.to_string())?;
            let o = c.accounts[0].oauth2.as_ref().unwrap();
            assert_eq!(o.mechanism, Mechanism::OAuthBearer);
            let TokenSource::Endpoint(ep) = &o.source else {
                panic!()
            };
            assert_eq!(ep.refresh_token.expose(), "0123");
            assert_eq!(ep.client_id, "42");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_reported() {
        let e = load(Path::new("/nonexistent/mailpump.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/mailpump.toml"));
    }
}
