//! A small OAuth2 identity provider on 127.0.0.1 for the tests: a token endpoint (the
//! refresh-token grant, short-lived access tokens, optional refresh-token rotation) and the
//! RFC 7662 introspection endpoint Dovecot's `passdb { driver = oauth2 }` calls. Every request
//! is logged; switches make it answer 503, `invalid_grant`, or refuse tokens at introspection.
//! HTTP/1.1 by hand, one request per connection (`Connection: close`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const CLIENT_ID: &str = "mailpump-test";
pub const CLIENT_SECRET: &str = "client-secret-7f3a";
/// What Dovecot authenticates its introspection calls with.
pub const DOVECOT_CLIENT: &str = "dovecot";
pub const DOVECOT_SECRET: &str = "dovecot-secret-91c2";

/// One request to the token endpoint.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The user of the refresh token presented, when it was a known one.
    pub user: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    lifetime: Duration,
    rotate: bool,
    token_down: bool,
    /// refresh token -> user
    refresh: HashMap<String, String>,
    /// refresh tokens that answer invalid_grant
    revoked: HashSet<String>,
    /// access token -> (user, expiry)
    access: HashMap<String, (String, Instant)>,
    /// introspections to answer `active: false` whatever the token (a refused token)
    refuse_next: u32,
    token_log: Vec<TokenRequest>,
    /// authorization code -> (user, PKCE challenge)
    codes: HashMap<String, (String, String)>,
    introspections: u32,
    /// every secret handed out, for the no-secret-in-output checks
    issued: Vec<String>,
    counter: u64,
}

pub struct Idp {
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    /// Starts the provider; access tokens live `lifetime`.
    pub async fn start(lifetime: Duration) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            lifetime,
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        Idp {
            url: format!("http://127.0.0.1:{port}"),
            state,
            task,
        }
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.url)
    }

    /// A new refresh token for `user`.
    pub fn refresh_token(&self, user: &str) -> String {
        let mut st = self.state.lock().unwrap();
        st.counter += 1;
        let token = format!("rt-{user}-{}-{}", st.counter, super::unique_id());
        st.refresh.insert(token.clone(), user.to_string());
        st.issued.push(token.clone());
        token
    }

    /// A valid access token for `user`, as a token helper would print it.
    pub fn access_token(&self, user: &str) -> String {
        let mut st = self.state.lock().unwrap();
        issue_access(&mut st, user)
    }

    /// An authorization code for `user` bound to the PKCE `challenge` (what the provider's
    /// consent page would give the browser).
    pub fn authorization_code(&self, user: &str, challenge: &str) -> String {
        let mut st = self.state.lock().unwrap();
        st.counter += 1;
        let code = format!("code-{}-{}", st.counter, super::unique_id());
        st.codes
            .insert(code.clone(), (user.to_string(), challenge.to_string()));
        st.issued.push(code.clone());
        code
    }

    pub fn set_rotate(&self, on: bool) {
        self.state.lock().unwrap().rotate = on;
    }
    /// The token endpoint answers 503 (introspection goes on).
    pub fn set_token_down(&self, down: bool) {
        self.state.lock().unwrap().token_down = down;
    }
    /// Every refresh token of `user` answers invalid_grant from now on.
    pub fn revoke(&self, user: &str) {
        let mut st = self.state.lock().unwrap();
        let tokens: Vec<String> = st
            .refresh
            .iter()
            .filter(|(_, u)| *u == user)
            .map(|(t, _)| t.clone())
            .collect();
        st.revoked.extend(tokens);
    }
    /// The next `n` introspections say `active: false`.
    pub fn refuse_next(&self, n: u32) {
        self.state.lock().unwrap().refuse_next = n;
    }
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().token_log.clone()
    }
    /// Token requests for `user`'s refresh tokens.
    pub fn token_requests_for(&self, user: &str) -> Vec<TokenRequest> {
        self.token_requests()
            .into_iter()
            .filter(|r| r.user.as_deref() == Some(user))
            .collect()
    }
    pub fn introspections(&self) -> u32 {
        self.state.lock().unwrap().introspections
    }
    /// Every token handed out plus the client secrets: none may appear in any output.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = self.state.lock().unwrap().issued.clone();
        out.push(CLIENT_SECRET.to_string());
        out
    }
}

fn issue_access(st: &mut State, user: &str) -> String {
    st.counter += 1;
    let token = format!("at-{}-{}", st.counter, super::unique_id());
    let expiry = Instant::now() + st.lifetime;
    st.access.insert(token.clone(), (user.to_string(), expiry));
    st.issued.push(token.clone());
    token
}

fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((decode(k), decode(v)))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

async fn serve(mut stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, mut body) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_string();
            break (head, buf[pos + 4..].to_vec());
        }
    };
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let path = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let params = form(&String::from_utf8_lossy(&body));
    let (status, json) = {
        let mut st = state.lock().unwrap();
        if path.starts_with("/token") {
            token(&mut st, &params)
        } else if path.starts_with("/introspect") {
            introspect(&mut st, &params)
        } else {
            (404, serde_json::json!({"error": "not_found"}))
        }
    };
    let body = json.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn token(st: &mut State, p: &HashMap<String, String>) -> (u16, serde_json::Value) {
    let presented = p.get("refresh_token").cloned().unwrap_or_default();
    let user = st.refresh.get(&presented).cloned();
    let (status, json) = if st.token_down {
        (503, serde_json::json!({"error": "temporarily_unavailable"}))
    } else if p.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        || p.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
    {
        (401, serde_json::json!({"error": "invalid_client"}))
    } else if p.get("grant_type").map(String::as_str) == Some("authorization_code") {
        return code_grant(st, p);
    } else if p.get("grant_type").map(String::as_str) != Some("refresh_token") {
        (400, serde_json::json!({"error": "unsupported_grant_type"}))
    } else if user.is_none() || st.revoked.contains(&presented) {
        (
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        )
    } else {
        let user = user.clone().unwrap();
        let access = issue_access(st, &user);
        let mut answer = serde_json::json!({
            "access_token": access,
            "expires_in": st.lifetime.as_secs(),
            "token_type": "Bearer",
            "scope": "mail",
        });
        if st.rotate {
            st.refresh.remove(&presented);
            st.counter += 1;
            let next = format!("rt-{user}-{}-{}", st.counter, super::unique_id());
            st.refresh.insert(next.clone(), user.clone());
            st.issued.push(next.clone());
            answer["refresh_token"] = serde_json::Value::from(next);
        }
        (200, answer)
    };
    st.token_log.push(TokenRequest { user, status });
    (status, json)
}

/// The authorization-code grant: the code once, its PKCE verifier, a redirect_uri.
fn code_grant(st: &mut State, p: &HashMap<String, String>) -> (u16, serde_json::Value) {
    use base64::Engine;
    use sha2::Digest;
    let code = p.get("code").cloned().unwrap_or_default();
    let verifier = p.get("code_verifier").cloned().unwrap_or_default();
    let Some((user, challenge)) = st.codes.remove(&code) else {
        return (400, serde_json::json!({"error": "invalid_grant"}));
    };
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    if computed != challenge || p.get("redirect_uri").is_none() {
        return (
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "PKCE verification failed"}),
        );
    }
    st.counter += 1;
    let refresh = format!("rt-{user}-{}-{}", st.counter, super::unique_id());
    st.refresh.insert(refresh.clone(), user.clone());
    st.issued.push(refresh.clone());
    let access = issue_access(st, &user);
    st.token_log.push(TokenRequest {
        user: Some(user),
        status: 200,
    });
    (
        200,
        serde_json::json!({"access_token": access, "refresh_token": refresh, "expires_in": st.lifetime.as_secs(), "token_type": "Bearer"}),
    )
}

fn introspect(st: &mut State, p: &HashMap<String, String>) -> (u16, serde_json::Value) {
    st.introspections += 1;
    if p.get("client_id").map(String::as_str) != Some(DOVECOT_CLIENT)
        || p.get("client_secret").map(String::as_str) != Some(DOVECOT_SECRET)
    {
        return (401, serde_json::json!({"error": "invalid_client"}));
    }
    let token = p.get("token").cloned().unwrap_or_default();
    if st.refuse_next > 0 {
        st.refuse_next -= 1;
        return (200, serde_json::json!({"active": false}));
    }
    match st.access.get(&token) {
        Some((user, expiry)) if Instant::now() < *expiry => (
            200,
            serde_json::json!({"active": true, "username": user, "scope": "mail"}),
        ),
        _ => (200, serde_json::json!({"active": false})),
    }
}

/// The Dovecot config that validates bearer tokens with this provider (services notes:
/// "Dovecot with OAuth2 logins"), written next to the Dovecot's own config.
pub fn dovecot_extra(idp: &Idp) -> String {
    format!(
        "auth_mechanisms = plain login xoauth2 oauthbearer\n\
         passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = @DIR@/dovecot-oauth2.conf.ext\n}}\n\
         service anvil {{\n  unix_listener anvil-auth-penalty {{\n    mode = 0\n  }}\n}}\n\
         # introspection at {}\n",
        idp.url
    )
}

/// The `dovecot-oauth2.conf.ext` for `idp`.
pub fn dovecot_oauth2_conf(idp: &Idp) -> String {
    format!(
        "introspection_url = {}/introspect\nintrospection_mode = post\nclient_id = {DOVECOT_CLIENT}\nclient_secret = {DOVECOT_SECRET}\nusername_attribute = username\nactive_attribute = active\nactive_value = true\n",
        idp.url
    )
}
