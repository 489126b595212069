//! OAuth2 access tokens for `auth = "oauth2"` accounts, and the SASL strings they log in with
//! (`sasl`).
//!
//! Each account has one [`Tokens`] cache, shared by all of its mailbox tasks (and by `check`
//! and `sync` within one process): [`tokens_for`] keeps them in a process-wide registry keyed
//! by account name, replaced when the account's `[oauth2]` table changes (a reload). The cache
//! holds the access token in memory only, behind a tokio mutex, so that however many mailboxes
//! ask at once there is one request to the token endpoint at a time. A token is refreshed
//! shortly before `expires_in` runs out, and after the mail server refused it (once: the
//! caller retries once). A rotated refresh token replaces the configured one in memory and is
//! written back to `refresh_token_file` when it came from there (atomically, same mode).
//!
//! Failures: an endpoint that is down, slow or answers 5xx/429 is retryable, and the failure is
//! shared with every mailbox asking within [`FAILURE_COOLDOWN`]; `invalid_grant` and
//! `invalid_client` are fatal for the account and remembered, so the endpoint is never asked
//! again until the configuration changes. No token or secret is ever logged: errors carry
//! the endpoint's error code and a scrubbed description only.

pub mod sasl;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex as StdMutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::{Account, OAuth2, Secret, TokenEndpoint, TokenSource};
use crate::error::ErrorClass;

/// How long one token request may take, connecting included.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `access_token_command` may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a token printed by `access_token_command` is used before the command runs again
/// (token helpers keep their own cache; a refused token runs it again at once).
pub const COMMAND_TOKEN_TTL: Duration = Duration::from_secs(60);
/// A failed refresh is answered to every mailbox of the account asking within this long,
/// without another request.
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(2);
/// ... doubling with every failure in a row, up to this.
pub const MAX_FAILURE_COOLDOWN: Duration = Duration::from_secs(300);
/// At most one refresh per this long (or per token lifetime, if shorter) because the mail
/// server refused a token.
pub const REFUSED_REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Longest lifetime believed from `expires_in` (a huge one would overflow the clock).
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// The lifetime assumed when the endpoint sends no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);

/// Why no access token could be had. Every text names the account; none carries a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("account {account}: the OAuth2 token endpoint {url} is unreachable: {detail}")]
    Unreachable {
        account: String,
        url: String,
        detail: String,
    },
    #[error(
        "account {account}: the OAuth2 token endpoint {url} did not answer within {}s",
        after.as_secs()
    )]
    Timeout {
        account: String,
        url: String,
        after: Duration,
    },
    #[error("account {account}: the OAuth2 token endpoint {url} answered HTTP {status} (temporarily unavailable){detail}")]
    Unavailable {
        account: String,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("account {account}: the OAuth2 refresh token was refused (invalid_grant{detail}): the consent was revoked or has expired. Get a new refresh token (README, \"OAuth2\": the first refresh token), put it where refresh_token, refresh_token_file or refresh_token_env of [accounts.{account}.oauth2] points, then restart mailpump or reload it (SIGHUP)")]
    InvalidGrant { account: String, detail: String },
    #[error("account {account}: the OAuth2 token endpoint refused the client (invalid_client{detail}): check client_id and client_secret of [accounts.{account}.oauth2]")]
    InvalidClient { account: String, detail: String },
    #[error("account {account}: the OAuth2 token endpoint refused the refresh: HTTP {status} {error}{detail}")]
    Refused {
        account: String,
        status: u16,
        error: String,
        detail: String,
    },
    #[error("account {account}: the OAuth2 token endpoint's answer carries no usable access_token: {detail}")]
    BadAnswer { account: String, detail: String },
    #[error("account {account}: access_token_command {program}: {detail}")]
    Command {
        account: String,
        program: String,
        detail: String,
        class: ErrorClass,
    },
}

impl TokenError {
    pub fn class(&self) -> ErrorClass {
        match self {
            TokenError::Unreachable { .. }
            | TokenError::Timeout { .. }
            | TokenError::Unavailable { .. }
            | TokenError::BadAnswer { .. } => ErrorClass::Retry,
            TokenError::InvalidGrant { .. } | TokenError::InvalidClient { .. } => ErrorClass::Fatal,
            TokenError::Refused { .. } => ErrorClass::RetryLater,
            TokenError::Command { class, .. } => *class,
        }
    }
}

/// An access token handed to a login, with the generation it belongs to (so that a refusal
/// refreshes only when nobody refreshed meanwhile).
#[derive(Clone, Debug)]
pub struct AccessToken {
    pub secret: Secret,
    generation: u64,
}

struct Cached {
    token: Secret,
    refresh_at: Instant,
    lifetime: Duration,
    generation: u64,
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    generation: u64,
    /// A refresh token the endpoint rotated in, replacing the configured one.
    rotated: Option<Secret>,
    /// The last retryable failure, shared with whoever asks within the cooldown.
    failure: Option<(Instant, TokenError)>,
    /// Retryable failures in a row: the cooldown doubles with each (the account's own backoff,
    /// whatever number of mailboxes ask).
    failures: u32,
    /// When a refusal by the mail server last made us refresh: a refusal that is not about the
    /// token (too many connections, IMAP switched off) must not refresh on every attempt.
    refused_refresh_at: Option<Instant>,
    /// invalid_grant / invalid_client: answered to everyone, the endpoint is not asked again.
    dead: Option<TokenError>,
}

/// One account's access tokens (see the module doc).
pub struct Tokens {
    account: String,
    config: OAuth2,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

static REGISTRY: LazyLock<StdMutex<HashMap<String, Arc<Tokens>>>> =
    LazyLock::new(|| StdMutex::new(HashMap::new()));

/// The token cache of `account` (None for password accounts): the same one for every caller
/// while the account's `[oauth2]` table stays the same.
pub fn tokens_for(account: &Account) -> Option<Arc<Tokens>> {
    let config = account.oauth2.as_ref()?;
    let mut map = crate::error::lock(&REGISTRY);
    if let Some(t) = map.get(&account.name) {
        if t.config == *config {
            return Some(t.clone());
        }
    }
    let t = Arc::new(Tokens::new(&account.name, config.clone()));
    map.insert(account.name.clone(), t.clone());
    Some(t)
}

/// The shared HTTP client: no redirects (a token request is never re-sent elsewhere), a
/// timeout on every request.
fn http() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(HTTP_TIMEOUT)
                .connect_timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("mailpump/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| error_chain(&e))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// An error with its sources, one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let shown = s.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = s.source();
    }
    text
}

/// `text` on one line, at most 200 characters, with every `secret` replaced by `***`.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "***");
    }
    let out = out.trim();
    if out.chars().count() > 200 {
        format!("{}...", out.chars().take(200).collect::<String>())
    } else {
        out.to_string()
    }
}

/// The endpoint without credentials (`user:secret@`), query or fragment, for error texts.
pub(crate) fn shown_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit('@').next().unwrap_or(authority);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// How long before expiry a token is replaced: a fifth of its life, at most a minute.
fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(Duration::from_secs(60))
}

impl Tokens {
    pub fn new(account: &str, config: OAuth2) -> Tokens {
        Tokens {
            account: account.to_string(),
            config,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// A token that is not about to expire: the cached one, or a fresh one.
    pub async fn token(self: &Arc<Self>) -> Result<AccessToken, TokenError> {
        self.get(None).await
    }

    /// A token to retry with after the server refused `refused`: a fresh one, unless another
    /// mailbox already replaced it meanwhile.
    pub async fn after_refusal(
        self: &Arc<Self>,
        refused: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        self.get(Some(refused.generation)).await
    }

    /// Runs the lookup (and any refresh) in a task of its own: a caller dropped midway (SIGTERM,
    /// a reload, `check`'s deadline) never drops a token response, whose rotated refresh token
    /// would otherwise be lost, and with it the account at providers that revoke a reused one.
    async fn get(self: &Arc<Self>, refused: Option<u64>) -> Result<AccessToken, TokenError> {
        let this = self.clone();
        tokio::spawn(async move { this.get_inner(refused).await })
            .await
            .unwrap_or_else(|e| {
                Err(TokenError::BadAnswer {
                    account: self.account.clone(),
                    detail: format!("the token lookup failed: {e}"),
                })
            })
    }

    async fn get_inner(&self, refused: Option<u64>) -> Result<AccessToken, TokenError> {
        let mut st = self.state.lock().await;
        if let Some(e) = &st.dead {
            return Err(e.clone());
        }
        if let Some((generation, lifetime, refresh_at)) = st
            .current
            .as_ref()
            .map(|c| (c.generation, c.lifetime, c.refresh_at))
        {
            let mut was_refused = refused == Some(generation);
            // At most one refusal-driven refresh per token lifetime (5 min at most): a server
            // that refuses a token it was just given is refusing something else.
            let window = lifetime.min(REFUSED_REFRESH_EVERY);
            if was_refused && st.refused_refresh_at.is_some_and(|t| t.elapsed() < window) {
                tracing::warn!(account = %self.account, "oauth_refusal_not_about_the_token");
                was_refused = false;
            }
            if was_refused {
                st.refused_refresh_at = Some(Instant::now());
            }
            if !was_refused && Instant::now() < refresh_at {
                let c = st.current.as_ref().expect("checked above");
                return Ok(AccessToken {
                    secret: c.token.clone(),
                    generation: c.generation,
                });
            }
            if was_refused {
                st.current = None;
            }
        }
        if let Some((at, e)) = &st.failure {
            let cooldown = FAILURE_COOLDOWN
                .saturating_mul(1u32 << st.failures.saturating_sub(1).min(8))
                .min(MAX_FAILURE_COOLDOWN);
            if at.elapsed() < cooldown {
                return Err(e.clone());
            }
        }
        let fetched = match &self.config.source {
            TokenSource::Endpoint(ep) => self.refresh(ep, &mut st).await,
            TokenSource::Command(argv) => self.run_command(argv).await,
        };
        match fetched {
            Ok((token, lifetime)) => {
                st.generation += 1;
                st.failure = None;
                st.failures = 0;
                let generation = st.generation;
                st.current = Some(Cached {
                    token: token.clone(),
                    refresh_at: Instant::now() + lifetime - refresh_margin(lifetime),
                    lifetime,
                    generation,
                });
                Ok(AccessToken {
                    secret: token,
                    generation,
                })
            }
            Err(e) => {
                st.current = None;
                if e.class() == ErrorClass::Fatal {
                    tracing::error!(account = %self.account, error = %e, "oauth_account_stopped");
                    st.dead = Some(e.clone());
                } else {
                    tracing::warn!(account = %self.account, error = %e, "oauth_token_failed");
                    st.failure = Some((Instant::now(), e.clone()));
                    st.failures = st.failures.saturating_add(1);
                }
                Err(e)
            }
        }
    }

    /// The refresh-token grant: a form POST to the token endpoint.
    async fn refresh(
        &self,
        ep: &TokenEndpoint,
        st: &mut State,
    ) -> Result<(Secret, Duration), TokenError> {
        let account = self.account.clone();
        let mut refresh_token = st
            .rotated
            .clone()
            .unwrap_or_else(|| ep.refresh_token.clone());
        // The file is the truth when there is one: another mailpump process (`check`, `sync`
        // beside the daemon) may have rotated the token and written the new one there; using
        // our older copy would be a reuse that some providers punish by revoking the chain.
        if let Some(path) = &ep.refresh_token_file {
            if let Ok(text) = tokio::fs::read_to_string(path).await {
                let text = text.trim();
                if !text.is_empty() && text != refresh_token.expose() {
                    refresh_token = Secret::new(text.to_string());
                }
            }
        }
        let secrets: Vec<&str> = [
            Some(refresh_token.expose()),
            ep.client_secret.as_ref().map(Secret::expose),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
            ("client_id", ep.client_id.as_str()),
        ];
        if let Some(s) = &ep.client_secret {
            form.push(("client_secret", s.expose()));
        }
        if let Some(scope) = &ep.scope {
            form.push(("scope", scope.as_str()));
        }
        let json = post_form(&account, &ep.token_url, &form, &secrets).await?;
        let status = 200;
        let text = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let Some(access) = text("access_token").filter(|t| !t.trim().is_empty()) else {
            return Err(TokenError::BadAnswer {
                account,
                detail: format!("HTTP {status} without an access_token"),
            });
        };
        let lifetime = json
            .get("expires_in")
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.trim().parse().ok()))
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s).min(MAX_LIFETIME))
            .unwrap_or(DEFAULT_LIFETIME);
        let mut rotated = false;
        if let Some(new) = text("refresh_token").filter(|t| !t.is_empty()) {
            if new != refresh_token.expose() {
                rotated = true;
                let new = Secret::new(new);
                st.rotated = Some(new.clone());
                if let Some(path) = &ep.refresh_token_file {
                    let path = path.clone();
                    let written = tokio::task::spawn_blocking(move || write_back(&path, &new))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                    match written {
                        Ok(()) => {
                            tracing::info!(account = %self.account, file = %ep.refresh_token_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "oauth_refresh_token_saved")
                        }
                        Err(e) => {
                            tracing::error!(account = %self.account, file = %ep.refresh_token_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), error = %e, "oauth_refresh_token_not_saved")
                        }
                    }
                }
            }
        }
        tracing::info!(
            account = %self.account,
            expires_in_s = lifetime.as_secs(),
            rotated,
            "oauth_token_refreshed"
        );
        Ok((Secret::new(access), lifetime))
    }

    /// `access_token_command`: argv, no shell, a timeout; stdout is the token, stderr is logged
    /// with the token taken out.
    async fn run_command(&self, argv: &[String]) -> Result<(Secret, Duration), TokenError> {
        let program = argv[0].clone();
        let fail = |detail: String, class: ErrorClass| TokenError::Command {
            account: self.account.clone(),
            program: program.clone(),
            detail,
            class,
        };
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| {
            let class = if e.kind() == std::io::ErrorKind::NotFound
                || e.kind() == std::io::ErrorKind::PermissionDenied
            {
                ErrorClass::Fatal
            } else {
                ErrorClass::Retry
            };
            fail(format!("cannot start it: {e}"), class)
        })?;
        let output = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
            Err(_) => {
                return Err(fail(
                    format!(
                        "gave no token within {}s (killed)",
                        COMMAND_TIMEOUT.as_secs()
                    ),
                    ErrorClass::Retry,
                ))
            }
            Ok(Err(e)) => return Err(fail(format!("failed: {e}"), ErrorClass::Retry)),
            Ok(Ok(o)) => o,
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let token = stdout.trim().to_string();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stderr.trim().is_empty() {
            let shown = scrub(&stderr, &[token.as_str()]);
            tracing::warn!(account = %self.account, program = %program, stderr = %shown, "oauth_token_command_stderr");
        }
        if !output.status.success() {
            return Err(fail(
                format!("exited with {}", output.status),
                ErrorClass::RetryLater,
            ));
        }
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(fail(
                "printed no token (stdout must be the access token alone)".into(),
                ErrorClass::RetryLater,
            ));
        }
        tracing::info!(account = %self.account, program = %program, "oauth_token_refreshed");
        Ok((Secret::new(token), COMMAND_TOKEN_TTL))
    }
}

/// POSTs `form` to `token_url`; the JSON of a 2xx answer, or the error the answer means.
async fn post_form(
    account: &str,
    token_url: &str,
    form: &[(&str, &str)],
    secrets: &[&str],
) -> Result<serde_json::Value, TokenError> {
    let url = shown_url(token_url);
    let account = account.to_string();
    let client = http().map_err(|detail| TokenError::Unreachable {
        account: account.to_string(),
        url: url.clone(),
        detail,
    })?;
    let request = client
        .post(token_url)
        .header(reqwest::header::ACCEPT, "application/json")
        .form(form)
        .send();
    let response = match tokio::time::timeout(HTTP_TIMEOUT, request).await {
        Err(_) => {
            return Err(TokenError::Timeout {
                account: account.to_string(),
                url,
                after: HTTP_TIMEOUT,
            })
        }
        Ok(Err(e)) if e.is_timeout() => {
            return Err(TokenError::Timeout {
                account: account.to_string(),
                url,
                after: HTTP_TIMEOUT,
            })
        }
        Ok(Err(e)) => {
            let e = e.without_url();
            return Err(TokenError::Unreachable {
                account: account.to_string(),
                url,
                detail: scrub(&error_chain(&e), secrets),
            });
        }
        Ok(Ok(r)) => r,
    };
    let status = response.status().as_u16();
    let body = match tokio::time::timeout(HTTP_TIMEOUT, response.bytes()).await {
        Err(_) => {
            return Err(TokenError::Timeout {
                account: account.to_string(),
                url,
                after: HTTP_TIMEOUT,
            })
        }
        Ok(Err(e)) => {
            return Err(TokenError::Unreachable {
                account: account.to_string(),
                url,
                detail: scrub(&error_chain(&e.without_url()), secrets),
            })
        }
        Ok(Ok(b)) => b,
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let text = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    if !(200..300).contains(&status) {
        let error = text("error").unwrap_or_default();
        let detail = text("error_description")
            .map(|d| format!(": {}", scrub(&d, secrets)))
            .unwrap_or_default();
        return Err(match (status, error.as_str()) {
            (_, "invalid_grant") => TokenError::InvalidGrant { account, detail },
            (_, "invalid_client" | "unauthorized_client") => {
                TokenError::InvalidClient { account, detail }
            }
            (401, "") => TokenError::InvalidClient { account, detail },
            (429 | 500..=599, _) | (_, "temporarily_unavailable") => TokenError::Unavailable {
                account: account.to_string(),
                url,
                status,
                detail,
            },
            _ => TokenError::Refused {
                account: account.to_string(),
                status,
                error: scrub(&error, secrets),
                detail,
            },
        });
    }
    Ok(json.unwrap_or(serde_json::Value::Null))
}

/// The authorization-code grant with PKCE (`mailpump auth`): the refresh token it yields.
pub async fn exchange_code(
    account: &str,
    ep: &TokenEndpoint,
    code: &str,
    redirect_uri: &str,
    verifier: &str,
) -> Result<Secret, TokenError> {
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("client_id", ep.client_id.as_str()),
        ("code_verifier", verifier),
    ];
    if let Some(s) = &ep.client_secret {
        form.push(("client_secret", s.expose()));
    }
    let secrets: Vec<&str> = [Some(code), ep.client_secret.as_ref().map(Secret::expose)]
        .into_iter()
        .flatten()
        .collect();
    let json = post_form(account, &ep.token_url, &form, &secrets).await?;
    match json.get("refresh_token").and_then(|v| v.as_str()) {
        Some(t) if !t.trim().is_empty() => Ok(Secret::new(t.trim())),
        _ => Err(TokenError::BadAnswer {
            account: account.to_string(),
            detail: "the answer has no refresh_token (Google: add access_type=offline and prompt=consent; Microsoft: the offline_access scope)".into(),
        }),
    }
}

/// Replaces the refresh token in `path` atomically: a temporary file beside it with the same
/// mode (and owner, where allowed), synced, renamed over it, the directory synced.
pub fn write_back(path: &Path, token: &Secret) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path)?;
    write_atomically(
        path,
        token,
        meta.permissions().mode() & 0o7777,
        Some((meta.uid(), meta.gid())),
    )
}

/// Writes `token` to `path` (new or replaced) atomically with `mode` (`mailpump auth`).
pub fn write_secret_file(path: &Path, token: &Secret, mode: u32) -> std::io::Result<()> {
    write_atomically(path, token, mode, None)
}

fn write_atomically(
    path: &Path,
    token: &Secret,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "refresh_token".into());
    let tmp: PathBuf = dir.join(format!(
        ".{name}.mailpump-{}-{}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600 & mode)
            .open(&tmp)?;
        f.write_all(token.expose().as_bytes())?;
        f.write_all(b"\n")?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(&tmp, Some(uid), Some(gid));
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens from a helper that prints a new token each run and counts its runs in a file.
    fn counting_helper(dir: &std::path::Path) -> Arc<Tokens> {
        let count = dir.join("runs");
        let script = format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo token-number-$n",
            c = count.display()
        );
        Arc::new(Tokens::new(
            "work",
            OAuth2 {
                mechanism: crate::config::Mechanism::XOAuth2,
                source: TokenSource::Command(vec!["/bin/sh".into(), "-c".into(), script]),
            },
        ))
    }

    #[tokio::test]
    async fn a_refusal_refreshes_once_per_window_not_on_every_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = counting_helper(dir.path());
        let runs = || std::fs::read_to_string(dir.path().join("runs")).unwrap();
        let first = tokens.token().await.unwrap();
        assert_eq!(runs().trim(), "1");
        // the server refused it: one fresh token
        let second = tokens.after_refusal(&first).await.unwrap();
        assert_eq!(runs().trim(), "2");
        assert_ne!(first.secret.expose(), second.secret.expose());
        // refused again at once (too many connections, IMAP off...): no new request
        let third = tokens.after_refusal(&second).await.unwrap();
        assert_eq!(runs().trim(), "2");
        assert_eq!(third.secret.expose(), second.secret.expose());
    }

    #[test]
    fn scrub_hides_secrets_and_clips() {
        assert_eq!(
            scrub("bad token abcd1234\n", &["abcd1234"]),
            "bad token ***"
        );
        assert_eq!(scrub(&"x".repeat(300), &[]).len(), 203);
        assert_eq!(shown_url("https://h/t?x=1"), "https://h/t");
        assert_eq!(
            shown_url("https://id:s3cret@idp.example:8443/oauth/token?k=v"),
            "https://idp.example:8443/oauth/token"
        );
        assert_eq!(shown_url("https://h"), "https://h");
    }

    #[test]
    fn margins() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(5)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn classes() {
        let a = || "a".to_string();
        assert_eq!(
            TokenError::InvalidGrant {
                account: a(),
                detail: String::new()
            }
            .class(),
            ErrorClass::Fatal
        );
        let e = TokenError::Timeout {
            account: a(),
            url: "u".into(),
            after: HTTP_TIMEOUT,
        };
        assert_eq!(e.class(), ErrorClass::Retry);
        let text = TokenError::InvalidGrant {
            account: "gmail".into(),
            detail: String::new(),
        }
        .to_string();
        assert!(
            text.contains("account gmail") && text.contains("refresh token"),
            "{text}"
        );
    }

    #[test]
    fn write_back_keeps_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_back(&path, &Secret::new("new-token")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new-token\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
