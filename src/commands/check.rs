//! `mailpump check`: reach the store and log in to every configured mailbox, all at once,
//! within one overall deadline; print one line per mailbox (✓ or ✗, what failed) and, for the
//! failures people meet most (one connection per account: providers cap them) (wrong password, QQ and NetEase authorization codes, 163's
//! "Unsafe Login", certificates, refused connections, timeouts, unknown hosts), a line saying
//! how to fix it. True only when everything passed.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{LOGOUT_TIMEOUT, STORE_SHUTDOWN};
use crate::config::{Account, Config, Protocol};
use crate::imap::Session;
use crate::store::Store;

/// How long `check` waits for all mailboxes together unless `--deadline` says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// The verdict on one mailbox (or the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub name: String,
    pub result: Result<String, String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.result {
            Ok(what) => write!(f, "✓ {}  {what}", self.name),
            Err(why) => {
                write!(f, "✗ {}  {why}", self.name)?;
                if let Some(h) = &self.hint {
                    write!(f, "\n    hint: {h}")?;
                }
                Ok(())
            }
        }
    }
}

/// How to fix `error` (the text of a failed connect, login or EXAMINE on `account`), when it
/// is a failure with a well-known cause.
pub fn hint(account: &Account, error: &str) -> Option<String> {
    let e = error.to_ascii_lowercase();
    let host = account.host.to_ascii_lowercase();
    let endpoint = format!("{}:{}", account.host, account.port);
    let is = |suffixes: &[&str]| suffixes.iter().any(|s| host.ends_with(s));
    if let Some(h) = oauth_hint(account, &e) {
        return Some(h);
    }
    if e.contains("unsafe login") {
        return Some("NetEase (163/126/yeah.net) refuses SELECT from clients it does not know: switch IMAP on in the web settings (设置 → POP3/SMTP/IMAP), log in with the client authorization code (客户端授权码); mailpump sends the IMAP ID it asks for".into());
    }
    if e.contains("login rejected") || e.contains("authenticationfailed") {
        return Some(if is(&["qq.com"]) {
            "QQ Mail wants the authorization code (授权码) generated under 设置 → 账户 → POP3/IMAP/SMTP服务 (switch IMAP on there), not the QQ password".into()
        } else if is(&["163.com", "126.com", "yeah.net"]) {
            "NetEase wants the client authorization code (客户端授权码) from 设置 → POP3/SMTP/IMAP (switch IMAP on there), not the web password".into()
        } else if is(&["gmail.com", "googlemail.com"]) {
            "Gmail wants an app password (Google account → Security → 2-Step Verification → App passwords), with IMAP on in Gmail's settings".into()
        } else {
            format!("the server refused the username or password: check `username` and the password source of [accounts.{}]", account.name)
        });
    }
    if e.contains("connection refused") {
        return Some(format!("nothing accepts connections on {endpoint}: check `host` and `port` (993 for security = \"tls\", 143 for \"starttls\"/\"plain\"; POP3: 995/110) and that the server runs"));
    }
    if e.contains("certificate") || e.contains("self signed") || e.contains("self-signed") {
        return Some(format!("the TLS certificate of {endpoint} is not trusted or not for this host name: use the host name the certificate names, or point `ca_file` at the CA that signed it"));
    }
    if e.contains("starttls") || e.contains("stls") {
        return Some("the server offers no STARTTLS on this port: use security = \"tls\" (usually port 993/995), or \"plain\" only on a trusted network".into());
    }
    if e.contains("failed to lookup")
        || e.contains("name or service not known")
        || e.contains("no address")
    {
        return Some(format!(
            "the host name {} does not resolve: check `host`",
            account.host
        ));
    }
    if e.contains("timed out") {
        return Some(format!("{endpoint} did not answer in time: a firewall dropping the packets, the wrong port for the security mode (TLS on a plain port waits for ever), or a slow server (raise `connect_timeout`/`command_timeout`)"));
    }
    if e.contains("mailbox")
        && (e.contains("nonexistent")
            || e.contains("doesn't exist")
            || e.contains("not exist")
            || e.contains("unknown"))
    {
        return Some(format!("no such folder on the server: check `mailboxes` of [accounts.{}] (names are case-sensitive except INBOX)", account.name));
    }
    None
}

/// How to fix an OAuth2 failure (`e` lower-cased), for `auth = "oauth2"` accounts.
fn oauth_hint(account: &Account, e: &str) -> Option<String> {
    let oauth = account.oauth2.as_ref()?;
    let name = &account.name;
    let token_url = match &oauth.source {
        crate::config::TokenSource::Endpoint(ep) => crate::oauth::shown_url(&ep.token_url),
        crate::config::TokenSource::Command(_) => String::new(),
    };
    if e.contains("invalid_grant") {
        return Some(format!("the refresh token is no longer valid (consent revoked or expired; Google expires it after 7 days while the app is in \"Testing\", and on a password change): get a new refresh token as the README's OAuth2 section shows and put it where refresh_token / refresh_token_file / refresh_token_env of [accounts.{name}.oauth2] points"));
    }
    if e.contains("invalid_client") {
        return Some(format!("the token endpoint does not accept this client: check client_id and client_secret of [accounts.{name}.oauth2] (Google: the OAuth client ID of type \"Desktop app\" and its secret; Microsoft: the Application (client) ID, with \"Allow public client flows\" on when there is no secret)"));
    }
    if e.contains("token endpoint") && (e.contains("unreachable") || e.contains("did not answer")) {
        return Some(format!("could not reach the token endpoint {token_url}: check token_url (or provider), DNS, the firewall, and HTTPS_PROXY if this machine needs a proxy"));
    }
    if e.contains("token endpoint") && e.contains("temporarily unavailable") {
        return Some("the token endpoint has trouble of its own (HTTP 5xx or 429): the daemon retries by itself".into());
    }
    if e.contains("token endpoint refused the refresh") {
        return Some(format!("the token endpoint refused the request: check scope and the app registration of [accounts.{name}.oauth2]"));
    }
    if e.contains("refused again after a refresh") || e.contains("login rejected") {
        return Some(format!("the mail server refused the access token: check that `username` of [accounts.{name}] is the account that gave consent, the scope (Gmail https://mail.google.com/; Microsoft https://outlook.office.com/IMAP.AccessAsUser.All or POP.AccessAsUser.All, with offline_access) and that IMAP/POP is switched on for the mailbox (Microsoft 365: the admin center's \"Mail apps\")"));
    }
    if e.contains("does not offer auth=") || e.contains("does not offer sasl") {
        return Some(format!("the server offers no {} login here: try mechanism = \"xoauth2\" or \"oauthbearer\", or check host and port", oauth.mechanism.name()));
    }
    if e.contains("access_token_command") {
        return Some("run the access_token_command by hand as the user mailpump runs as: it must print the access token alone on stdout and exit 0 within 30 s".into());
    }
    None
}

/// The store check: `Ok(what)` or the error.
async fn check_store(config: crate::config::StoreConfig) -> Result<String, String> {
    match Store::connect(&config).await {
        Ok(store) => {
            store.shutdown(STORE_SHUTDOWN).await;
            Ok(format!(
                "database {:?} reachable, indexes in place",
                config.database
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// One account's checks over ONE connection (providers cap connections per account: Gmail
/// 15, many 10): login, then EXAMINE of each mailbox in turn. Each verdict is sent as soon as
/// it is known, tagged with the mailbox's index in `all`.
async fn check_account(
    account: Account,
    mailboxes: Vec<(usize, String)>,
    tx: mpsc::UnboundedSender<(usize, Result<String, String>)>,
    folder_lines: mpsc::UnboundedSender<String>,
) {
    let started = Instant::now();
    if crate::folders::fixed_mailboxes(&account).is_none() {
        let Some((i, _)) = mailboxes.first() else {
            return;
        };
        let verdict = check_folders(&account, &folder_lines).await;
        let _ = tx.send((*i, verdict));
        return;
    }
    if account.protocol == Protocol::Pop3 {
        let result = async {
            let mut s = crate::pop3::Pop3Session::connect(&account).await?;
            let (count, size) = s.stat().await?;
            let uidl = s.listing().await.map(|_| ());
            s.quit().await?;
            uidl.map(|_| (count, size))
        }
        .await
        .map(|(count, size)| {
            format!(
                "{count} messages, {size} bytes (POP3, {} ms)",
                started.elapsed().as_millis()
            )
        })
        .map_err(|e| e.to_string());
        for (i, _) in &mailboxes {
            let _ = tx.send((*i, result.clone()));
        }
        return;
    }
    let mut session = match Session::connect(&account).await {
        Ok(s) => s,
        Err(e) => {
            for (i, _) in &mailboxes {
                let _ = tx.send((*i, Err(e.to_string())));
            }
            return;
        }
    };
    for (i, mailbox) in &mailboxes {
        let result = crate::sync::examine(&mut session, mailbox).await;
        let _ = tx.send((
            *i,
            result
                .map(|info| {
                    format!(
                        "{} messages, uidvalidity {} ({} ms)",
                        info.exists,
                        info.uidvalidity,
                        started.elapsed().as_millis()
                    )
                })
                .map_err(|e| e.to_string()),
        ));
    }
    session
        .logout(LOGOUT_TIMEOUT.min(account.settings.command_timeout))
        .await;
}

/// Folder sync: the folders the server lists, each synced one EXAMINEd and printed with how
/// the daemon would follow it, each left out printed with the reason. One connection.
async fn check_folders(
    account: &Account,
    lines: &mpsc::UnboundedSender<String>,
) -> Result<String, String> {
    let started = Instant::now();
    let mut session = Session::connect(account).await.map_err(|e| e.to_string())?;
    let prefix =
        crate::folders::personal_prefix(&session.namespaces().await.map_err(|e| e.to_string())?);
    let (listed, _) = session.list_folders().await.map_err(|e| e.to_string())?;
    let found: Vec<crate::folders::Folder> = listed.iter().map(Into::into).collect();
    let plan = crate::folders::Selection::of(account).plan(&found, prefix.as_deref());
    let shared_by = if session.has_capability("NOTIFY") {
        "NOTIFY"
    } else {
        "STATUS poll"
    };
    let (mut failed, mut watched, mut shared) = (0, 0, 0);
    for (name, follow) in &plan.synced {
        let how = match follow {
            crate::folders::Follow::Watch => {
                watched += 1;
                "IDLE"
            }
            crate::folders::Follow::Shared => {
                shared += 1;
                shared_by
            }
        };
        let line = match crate::sync::examine(&mut session, name).await {
            Ok(info) => Line {
                name: format!("{}/{name}", account.name),
                result: Ok(format!(
                    "{} messages, uidvalidity {}, followed by {how}",
                    info.exists, info.uidvalidity
                )),
                hint: None,
            },
            Err(e) => {
                failed += 1;
                let text = e.to_string();
                Line {
                    name: format!("{}/{name}", account.name),
                    hint: hint(account, &text),
                    result: Err(text),
                }
            }
        };
        let _ = lines.send(line.to_string());
    }
    for (name, why) in &plan.left_out {
        let _ = lines.send(format!("- {}/{name}  left out: {why}", account.name));
    }
    if !plan.demoted.is_empty() {
        let _ = lines.send(format!(
            "- {}: max_connections = {} leaves no own connection for {} watched folder(s): followed by {shared_by} instead",
            account.name,
            account.settings.max_connections,
            plan.demoted.len()
        ));
    }
    session
        .logout(LOGOUT_TIMEOUT.min(account.settings.command_timeout))
        .await;
    let summary = format!(
        "{} folders synced ({watched} by IDLE, {shared} by {shared_by}, {} connections at most), {} left out ({} ms)",
        plan.synced.len(),
        watched + 1,
        plan.left_out.len(),
        started.elapsed().as_millis()
    );
    if failed > 0 {
        Err(format!(
            "{failed} of {} folders could not be opened; {summary}",
            plan.synced.len()
        ))
    } else {
        Ok(summary)
    }
}

/// Every mailbox of `config` with its account, in config order (a POP3 account's `mailboxes`
/// is always `["INBOX"]`: config allows nothing else).
/// A folder-sync account has one entry, `*`, whose verdict sums up its folders.
fn mailboxes(config: &Config) -> Vec<(Account, String)> {
    config
        .accounts
        .iter()
        .flat_map(|a| {
            let names = crate::folders::fixed_mailboxes(a)
                .unwrap_or_else(|| vec![crate::supervisor::ACCOUNT_UNIT.to_string()]);
            names.into_iter().map(move |m| (a.clone(), m))
        })
        .collect()
}

/// The store line's index among the verdicts.
const STORE: usize = usize::MAX;

/// Runs every check at once (one connection per account); prints each line as it is known.
/// True when all passed.
pub async fn check(config: &Config, deadline: Duration) -> bool {
    let all = mailboxes(config);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (folder_tx, mut folder_rx) = mpsc::unbounded_channel::<String>();
    let mut tasks = JoinSet::new();
    {
        let (tx, store) = (tx.clone(), config.store.clone());
        tasks.spawn(async move {
            let _ = tx.send((STORE, check_store(store).await));
        });
    }
    for account in &config.accounts {
        let mine: Vec<(usize, String)> = all
            .iter()
            .enumerate()
            .filter(|(_, (a, _))| a.name == account.name)
            .map(|(i, (_, m))| (i, m.clone()))
            .collect();
        tasks.spawn(check_account(
            account.clone(),
            mine,
            tx.clone(),
            folder_tx.clone(),
        ));
    }
    drop(tx);
    drop(folder_tx);
    let mut pending: Vec<bool> = vec![true; all.len()];
    let mut store_pending = true;
    let mut all_ok = true;
    let timer = tokio::time::sleep(deadline);
    tokio::pin!(timer);
    loop {
        let (i, result) = tokio::select! {
            biased;
            Some(line) = folder_rx.recv() => {
                println!("{line}");
                continue;
            }
            verdict = rx.recv() => match verdict {
                Some(v) => v,
                None => break, // every check has answered
            },
            _ = &mut timer => {
                tasks.abort_all();
                let why = format!("no answer within the {}s deadline", deadline.as_secs());
                if store_pending {
                    println!("{}", Line { name: "store".into(), result: Err(why.clone()), hint: Some("the database did not answer: check [store] uri and that MongoDB runs".into()) });
                }
                for (i, (account, mailbox)) in all.iter().enumerate() {
                    if pending[i] {
                        println!("{}", Line { name: format!("{}/{mailbox}", account.name), result: Err(why.clone()), hint: hint(account, "timed out") });
                    }
                }
                all_ok = false;
                break;
            }
        };
        all_ok &= result.is_ok();
        let line = if i == STORE {
            store_pending = false;
            Line {
                name: "store".into(),
                hint: result.is_err().then(|| {
                    "check [store] uri (host, port, credentials, authSource) and that MongoDB runs"
                        .to_string()
                }),
                result,
            }
        } else {
            pending[i] = false;
            let (account, mailbox) = &all[i];
            Line {
                name: format!("{}/{mailbox}", account.name),
                hint: result.as_ref().err().and_then(|e| hint(account, e)),
                result,
            }
        };
        println!("{line}");
    }
    // a check task that panicked sent nothing for its mailboxes (after the deadline every
    // pending one was already printed)
    if !timer.is_elapsed() {
        for (i, (account, mailbox)) in all.iter().enumerate() {
            if pending[i] {
                println!(
                    "✗ {}/{mailbox}  the check itself failed (internal error)",
                    account.name
                );
                all_ok = false;
            }
        }
        all_ok &= !store_pending;
    }
    tasks.abort_all();
    tracing::info!(mailboxes = all.len(), ok = all_ok, "check_finished");
    all_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(host: &str) -> Account {
        let text = format!("[store]\nuri = \"mongodb://127.0.0.1:1\"\n[accounts.work]\nhost = \"{host}\"\nusername = \"me\"\npassword = \"pw\"\n");
        crate::config::from_toml_str(&text)
            .unwrap()
            .accounts
            .remove(0)
    }

    #[test]
    fn common_failures_get_their_fix() {
        let login = "login rejected for me: [AUTHENTICATIONFAILED] Authentication failed.";
        assert!(hint(&account("imap.qq.com"), login)
            .unwrap()
            .contains("授权码"));
        assert!(hint(&account("imap.163.com"), login)
            .unwrap()
            .contains("客户端授权码"));
        assert!(hint(&account("imap.gmail.com"), login)
            .unwrap()
            .contains("app password"));
        assert!(hint(&account("mail.example.com"), login)
            .unwrap()
            .contains("accounts.work"));
        let unsafe_login =
            "EXAMINE failed: server said NO Unsafe Login. Please contact kefu@188.com for help";
        assert!(hint(&account("imap.163.com"), unsafe_login)
            .unwrap()
            .contains("IMAP ID"));
        let refused = "connection refused by 127.0.0.1:1";
        assert!(hint(&account("127.0.0.1"), refused)
            .unwrap()
            .contains("port"));
        let cert = "TLS: error:0A000086:SSL routines::certificate verify failed";
        assert!(hint(&account("h"), cert).unwrap().contains("ca_file"));
        assert!(hint(&account("h"), "timed out after 5s waiting for greeting").is_some());
        assert_eq!(hint(&account("h"), "protocol error: odd"), None);
    }

    #[test]
    fn lines_read_well() {
        let ok = Line {
            name: "work/INBOX".into(),
            result: Ok("3 messages".into()),
            hint: None,
        };
        assert_eq!(ok.to_string(), "✓ work/INBOX  3 messages");
        let bad = Line {
            name: "work/INBOX".into(),
            result: Err("connection refused by h:1".into()),
            hint: Some("fix it".into()),
        };
        assert_eq!(
            bad.to_string(),
            "✗ work/INBOX  connection refused by h:1\n    hint: fix it"
        );
    }
}
