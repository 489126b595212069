//! POP3 (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS): the client, written here (mailpump depends
//! on no POP3 crate), over [`crate::net`] like IMAP.
//! Every reply is checked for `+OK`, every read has a timeout, multi-line replies are
//! dot-unstuffed exactly. `pass` is one poll, fed through [`crate::pipeline`].
//!
//! **Invariant:** nothing is deleted unless the session ends with a successful QUIT: DELE only
//! marks, and an aborted session (error, timeout, crash) deletes nothing.

pub mod pass;

use std::time::Duration;

use md5::{Digest, Md5};
use tokio::io::{AsyncWriteExt, BufReader};

use crate::config::{Account, Security};
use crate::error::ErrorClass;
use crate::net::{self, NetError, Transport};

/// The largest message RETR will accept (the same bound as IMAP's).
pub const MAX_MESSAGE: usize = 500 * 1024 * 1024;
/// A single reply line longer than this is a protocol error.
const MAX_LINE: usize = 1024 * 1024 + 1024;

#[derive(Debug, thiserror::Error)]
pub enum Pop3Error {
    /// Connecting, TLS, timeouts, a closed connection: [`crate::net`]'s errors and wording
    /// ("connection refused by host:port"), the same as IMAP's.
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("login rejected for {user}: {text}")]
    AuthRejected { user: String, text: String },
    #[error("the server does not offer SASL {mechanism} (CAPA SASL lists: {offered}): set mechanism in [oauth2] to one it offers, or check host and port")]
    MechanismNotOffered {
        mechanism: &'static str,
        offered: String,
    },
    /// No OAuth2 access token (token endpoint, token command).
    #[error(transparent)]
    OAuth(#[from] crate::oauth::TokenError),
    #[error("{command} failed: server said -ERR {text}")]
    Err { command: String, text: String },
    #[error("the server does not support UIDL: without it mailpump cannot tell messages apart across sessions, so it refuses to fetch (duplicates would follow)")]
    NoUidl,
    #[error(
        "server does not offer STLS: refusing to continue in plain text (security = \"starttls\")"
    )]
    NoStls,
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Pop3Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Pop3Error::Net(e) => e.class(),
            Pop3Error::OAuth(e) => e.class(),
            Pop3Error::MechanismNotOffered { .. } => ErrorClass::RetryLater,
            Pop3Error::AuthRejected { .. } | Pop3Error::NoStls => ErrorClass::RetryLater,
            Pop3Error::NoUidl => ErrorClass::Fatal,
            _ => ErrorClass::Retry,
        }
    }
}

/// One message on the server: its number in this session, its UIDL and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub number: u32,
    pub uidl: String,
    pub size: u64,
}

/// What one session's STAT, UIDL and LIST said about the maildrop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maildrop {
    /// The messages, as UIDL numbered them (sizes from LIST).
    pub messages: Vec<Listing>,
    /// How many messages STAT counted.
    pub stat_count: u32,
    /// How many numbered lines LIST gave.
    pub list_count: usize,
}

impl Maildrop {
    /// Why this listing cannot be taken as the whole maildrop, if it cannot: STAT, LIST and
    /// UIDL describe the same snapshot (RFC 1939: messages 1..=N at the start of the session),
    /// so any disagreement between them, a number outside 1..=N or a number or UIDL listed
    /// twice is a broken (or hostile) server. Fetching goes on; only conclusions drawn from
    /// what is *missing* (a message deleted on the server) need this.
    pub fn doubt(&self) -> Option<String> {
        let n = self.messages.len();
        if self.stat_count as usize != n {
            return Some(format!(
                "STAT counts {} messages, UIDL lists {n}",
                self.stat_count
            ));
        }
        if self.list_count != n {
            return Some(format!(
                "LIST lists {} messages, UIDL lists {n}",
                self.list_count
            ));
        }
        let mut numbers = std::collections::HashSet::new();
        let mut uidls = std::collections::HashSet::new();
        for l in &self.messages {
            if l.number == 0 || l.number as usize > n {
                return Some(format!("UIDL numbers a message {} of {n}", l.number));
            }
            if !numbers.insert(l.number) {
                return Some(format!("UIDL lists message {} twice", l.number));
            }
            if !uidls.insert(l.uidl.as_str()) {
                return Some("UIDL gives two messages the same unique id".into());
            }
        }
        None
    }
}

pub struct Pop3Session {
    stream: BufReader<Transport>,
    timeout: Duration,
    capabilities: Vec<String>,
    user: String,
}

/// Removes POP3's byte-stuffing from one line of a multi-line reply.
fn unstuff(line: &[u8]) -> &[u8] {
    if line.starts_with(b"..") {
        &line[1..]
    } else {
        line
    }
}

fn apop_digest(timestamp: &str, password: &str) -> String {
    hex::encode(Md5::digest(format!("{timestamp}{password}").as_bytes()))
}

/// The `<...@...>` timestamp of an APOP-capable greeting.
fn apop_timestamp(greeting: &str) -> Option<&str> {
    let start = greeting.find('<')?;
    let end = greeting[start..].find('>')? + start;
    let ts = &greeting[start..=end];
    ts.contains('@').then_some(ts)
}

impl Pop3Session {
    /// Connects (TLS, STLS or plain), reads the greeting, logs in (APOP when offered on a
    /// plain connection, else USER/PASS) and reads CAPA.
    pub async fn connect(account: &Account) -> Result<Pop3Session, Pop3Error> {
        let connect_timeout = account.settings.connect_timeout;
        let tcp = net::tcp_connect(&account.host, account.port, connect_timeout).await?;
        let transport = match account.security {
            Security::Tls => {
                net::tls_handshake(tcp, &account.host, &account.tls, connect_timeout).await?
            }
            _ => Transport::Plain(tcp),
        };
        let mut s = Pop3Session {
            stream: BufReader::new(transport),
            timeout: account.settings.command_timeout,
            capabilities: Vec::new(),
            user: account.username.clone(),
        };
        let greeting = s.status_line("the greeting").await?;
        s.read_capabilities().await?;
        if account.security == Security::StartTls {
            if !s.has_capability("STLS") {
                return Err(Pop3Error::NoStls);
            }
            s.simple("STLS").await?;
            let tls = net::upgrade(
                s.stream,
                "STLS +OK",
                &account.host,
                &account.tls,
                connect_timeout,
            )
            .await?;
            s.stream = BufReader::new(tls);
            s.read_capabilities().await?; // RFC 2595: capabilities may change after STLS
        }

        match &account.oauth2 {
            Some(oauth) => s.oauth_login(account, oauth.mechanism).await?,
            None => s.password_login(account, &greeting).await?,
        }
        // Some servers only list their full capabilities once logged in.
        s.read_capabilities().await?;
        Ok(s)
    }

    /// APOP when offered on a plain connection, else USER/PASS.
    async fn password_login(&mut self, account: &Account, greeting: &str) -> Result<(), Pop3Error> {
        let password = account.password.expose();
        let apop = apop_timestamp(greeting).map(str::to_string);
        let login = match (&apop, account.security) {
            (Some(ts), Security::Plain) => {
                let cmd = format!("APOP {} {}", account.username, apop_digest(ts, password));
                self.send_line(&cmd).await?;
                self.status_line("APOP").await
            }
            _ => {
                self.send_line(&format!("USER {}", account.username))
                    .await?;
                match self.status_line("USER").await {
                    Err(e) => Err(e),
                    Ok(_) => {
                        self.send_line(&format!("PASS {password}")).await?;
                        self.status_line("PASS").await
                    }
                }
            }
        };
        match login {
            Ok(_) => Ok(()),
            Err(Pop3Error::Err { text, .. }) => Err(Pop3Error::AuthRejected {
                user: account.username.clone(),
                text,
            }),
            Err(e) => Err(e),
        }
    }

    /// The SASL mechanisms CAPA lists.
    fn sasl_mechanisms(&self) -> Vec<String> {
        self.capabilities
            .iter()
            .filter_map(|c| {
                let mut words = c.split_whitespace();
                words
                    .next()
                    .filter(|w| w.eq_ignore_ascii_case("SASL"))
                    .map(|_| words.map(str::to_ascii_uppercase).collect::<Vec<_>>())
            })
            .flatten()
            .collect()
    }

    /// `AUTH XOAUTH2|OAUTHBEARER` with the account's cached token; when the server refuses it,
    /// once more with a refreshed one. A second refusal is a rejected login.
    async fn oauth_login(
        &mut self,
        account: &Account,
        mechanism: crate::config::Mechanism,
    ) -> Result<(), Pop3Error> {
        let offered = self.sasl_mechanisms();
        if !offered.iter().any(|m| m == mechanism.name()) {
            return Err(Pop3Error::MechanismNotOffered {
                mechanism: mechanism.name(),
                offered: if offered.is_empty() {
                    "nothing".into()
                } else {
                    offered.join(" ")
                },
            });
        }
        let tokens = crate::oauth::tokens_for(account).ok_or_else(|| {
            Pop3Error::Protocol("an OAuth2 login for an account without [oauth2]".into())
        })?;
        let token = tokens.token().await?;
        let Err(first) = self.bearer_attempt(account, mechanism, &token).await? else {
            return Ok(());
        };
        tracing::info!(account = %account.name, reason = %first, "oauth_token_refused");
        let token = tokens.after_refusal(&token).await?;
        match self.bearer_attempt(account, mechanism, &token).await? {
            Ok(()) => Ok(()),
            Err(why) => Err(Pop3Error::AuthRejected {
                user: account.username.clone(),
                text: format!("{why}; the OAuth2 token was refused again after a refresh (check that `username` is the account that gave consent and the scope)"),
            }),
        }
    }

    /// One `AUTH` with a bearer token: Ok(Ok) logged in, Ok(Err(why)) the token was refused.
    /// The initial response goes with the command unless that would make the line longer than
    /// RFC 5034's 255 octets; an error challenge is answered with an empty line.
    async fn bearer_attempt(
        &mut self,
        account: &Account,
        mechanism: crate::config::Mechanism,
        token: &crate::oauth::AccessToken,
    ) -> Result<Result<(), String>, Pop3Error> {
        use crate::oauth::sasl;
        let initial = sasl::encoded_initial_response(
            mechanism,
            &account.username,
            &account.host,
            account.port,
            &token.secret,
        );
        let with_ir = format!("AUTH {} {}", mechanism.name(), initial.expose());
        let mut challenge = None;
        let mut initial_sent = false;
        if with_ir.len() + 2 <= 255 {
            self.send_line(&with_ir).await?;
            initial_sent = true;
        } else {
            self.send_line(&format!("AUTH {}", mechanism.name()))
                .await?;
        }
        drop(with_ir);
        // a server that keeps sending `+` lines must not hold the login for ever
        let mut continuations = 0;
        let reply = loop {
            let mut buf = Vec::new();
            self.raw_line(&mut buf).await?;
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if line == "+" || line.starts_with("+ ") {
                continuations += 1;
                if continuations > 4 {
                    return Err(Pop3Error::Protocol(
                        "the server kept asking for more during AUTH".into(),
                    ));
                }
                if !initial_sent {
                    self.send_line(initial.expose()).await?;
                    initial_sent = true;
                } else if challenge.is_none() {
                    challenge = Some(sasl::decode(line[1..].trim()).unwrap_or_default());
                    self.send_line("").await?;
                } else {
                    // a second challenge: abort the exchange, the server answers -ERR
                    self.send_line("*").await?;
                }
                continue;
            }
            break line;
        };
        if reply.starts_with("+OK") {
            return Ok(Ok(()));
        }
        let Some(text) = reply.strip_prefix("-ERR") else {
            return Err(Pop3Error::Protocol(format!(
                "expected +OK or -ERR after AUTH, got {:?}",
                reply.chars().take(100).collect::<String>()
            )));
        };
        let text: String = text.trim().chars().take(300).collect();
        if challenge.is_none() && text.to_ascii_uppercase().contains("[SYS/TEMP]") {
            // Dovecot's answer when it cannot reach the identity provider: not our token.
            return Err(Pop3Error::Err {
                command: "AUTH".into(),
                text,
            });
        }
        Ok(Err(match &challenge {
            Some(c) => format!("-ERR {text} ({})", sasl::describe_challenge(c)),
            None => format!("-ERR {text}"),
        }))
    }

    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| {
            c.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(cap))
        })
    }

    async fn send_line(&mut self, line: &str) -> Result<(), Pop3Error> {
        let write = async {
            let w = self.stream.get_mut();
            w.write_all(line.as_bytes()).await?;
            w.write_all(b"\r\n").await?;
            w.flush().await
        };
        Ok(net::within(self.timeout, "sending a POP3 command", write).await?)
    }

    /// One raw line (with its line ending), under the timeout, at most MAX_LINE bytes.
    async fn raw_line(&mut self, buf: &mut Vec<u8>) -> Result<(), Pop3Error> {
        net::read_line(
            &mut self.stream,
            buf,
            MAX_LINE,
            self.timeout,
            "a POP3 reply",
        )
        .await?;
        if buf.ends_with(b"\n") {
            Ok(())
        } else if buf.len() >= MAX_LINE {
            Err(Pop3Error::Protocol(format!(
                "a reply line longer than {MAX_LINE} bytes"
            )))
        } else {
            Err(NetError::Closed.into())
        }
    }

    /// A status line: `+OK text` gives the text, `-ERR text` an error.
    async fn status_line(&mut self, command: &str) -> Result<String, Pop3Error> {
        let mut buf = Vec::new();
        self.raw_line(&mut buf).await?;
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        if let Some(rest) = line.strip_prefix("+OK") {
            Ok(rest.trim().to_string())
        } else if let Some(rest) = line.strip_prefix("-ERR") {
            Err(Pop3Error::Err {
                command: command.split(' ').next().unwrap_or(command).to_string(),
                text: rest.trim().chars().take(300).collect(),
            })
        } else {
            Err(Pop3Error::Protocol(format!(
                "expected +OK or -ERR after {command}, got {:?}",
                line.chars().take(100).collect::<String>()
            )))
        }
    }

    async fn simple(&mut self, command: &str) -> Result<String, Pop3Error> {
        self.send_line(command).await?;
        self.status_line(command).await
    }

    /// The body of a multi-line reply, dot-unstuffed, each line keeping its line ending.
    async fn multiline(&mut self, limit: usize) -> Result<Vec<u8>, Pop3Error> {
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            self.raw_line(&mut line).await?;
            if line == b".\r\n" || line == b".\n" {
                return Ok(out);
            }
            out.extend_from_slice(unstuff(&line));
            if out.len() > limit {
                return Err(Pop3Error::Protocol(format!(
                    "a multi-line reply larger than {limit} bytes"
                )));
            }
        }
    }

    async fn read_capabilities(&mut self) -> Result<(), Pop3Error> {
        self.send_line("CAPA").await?;
        match self.status_line("CAPA").await {
            Ok(_) => {
                let body = self.multiline(64 * 1024).await?;
                self.capabilities = String::from_utf8_lossy(&body)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect();
                Ok(())
            }
            // CAPA is optional (RFC 2449): a server without it just has no extensions.
            Err(Pop3Error::Err { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// STAT: (count, total size).
    pub async fn stat(&mut self) -> Result<(u32, u64), Pop3Error> {
        let text = self.simple("STAT").await?;
        let mut words = text.split_whitespace();
        match (
            words.next().and_then(|w| w.parse().ok()),
            words.next().and_then(|w| w.parse().ok()),
        ) {
            (Some(n), Some(size)) => Ok((n, size)),
            _ => Err(Pop3Error::Protocol(format!(
                "unreadable STAT reply {text:?}"
            ))),
        }
    }

    /// STAT, UIDL and LIST together: every message with its unique id and size, by number,
    /// and the counts to judge the listing by ([`Maildrop::doubt`]).
    pub async fn maildrop(&mut self) -> Result<Maildrop, Pop3Error> {
        let (stat_count, _) = self.stat().await?;
        let (messages, list_count) = self.uidl_and_list().await?;
        Ok(Maildrop {
            messages,
            stat_count,
            list_count,
        })
    }

    /// UIDL and LIST together: every message with its unique id and size, by number.
    pub async fn listing(&mut self) -> Result<Vec<Listing>, Pop3Error> {
        Ok(self.uidl_and_list().await?.0)
    }

    /// UIDL then LIST: the messages, and how many numbered lines LIST gave.
    async fn uidl_and_list(&mut self) -> Result<(Vec<Listing>, usize), Pop3Error> {
        self.send_line("UIDL").await?;
        match self.status_line("UIDL").await {
            Ok(_) => {}
            Err(Pop3Error::Err { .. }) => return Err(Pop3Error::NoUidl),
            Err(e) => return Err(e),
        }
        let uidls = self.multiline(256 * 1024 * 1024).await?;
        self.simple("LIST").await?;
        let sizes = self.multiline(256 * 1024 * 1024).await?;
        let mut size_of = std::collections::HashMap::new();
        for line in String::from_utf8_lossy(&sizes).lines() {
            let mut w = line.split_whitespace();
            if let (Some(Ok(n)), Some(Ok(s))) = (
                w.next().map(str::parse::<u32>),
                w.next().map(str::parse::<u64>),
            ) {
                size_of.insert(n, s);
            }
        }
        let list_count = size_of.len();
        let mut out = Vec::new();
        for line in String::from_utf8_lossy(&uidls).lines() {
            let mut w = line.split_whitespace();
            let (Some(Ok(number)), Some(uidl)) = (w.next().map(str::parse::<u32>), w.next()) else {
                return Err(Pop3Error::Protocol(format!(
                    "unreadable UIDL line {line:?}"
                )));
            };
            out.push(Listing {
                number,
                uidl: uidl.to_string(),
                size: size_of.get(&number).copied().unwrap_or(0),
            });
        }
        Ok((out, list_count))
    }

    /// RETR: the exact message bytes.
    pub async fn retr(&mut self, number: u32) -> Result<Vec<u8>, Pop3Error> {
        self.simple(&format!("RETR {number}")).await?;
        self.multiline(MAX_MESSAGE).await
    }

    /// DELE: marks for deletion; the server deletes only at a successful QUIT.
    pub async fn dele(&mut self, number: u32) -> Result<(), Pop3Error> {
        self.simple(&format!("DELE {number}")).await.map(|_| ())
    }

    /// QUIT: commits deletions. Must succeed for anything marked to be deleted.
    pub async fn quit(mut self) -> Result<(), Pop3Error> {
        self.simple("QUIT").await.map(|_| ())
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_is_removed_exactly_once() {
        assert_eq!(unstuff(b"..hidden\r\n"), b".hidden\r\n");
        assert_eq!(unstuff(b"...\r\n"), b"..\r\n");
        assert_eq!(unstuff(b"plain\r\n"), b"plain\r\n");
    }

    fn drop_of(uidls: &[(u32, &str)], stat: u32, list: usize) -> Maildrop {
        Maildrop {
            messages: uidls
                .iter()
                .map(|(n, u)| Listing {
                    number: *n,
                    uidl: u.to_string(),
                    size: 10,
                })
                .collect(),
            stat_count: stat,
            list_count: list,
        }
    }

    #[test]
    fn a_listing_is_trusted_only_when_stat_list_and_uidl_agree() {
        assert_eq!(drop_of(&[(1, "a"), (2, "b")], 2, 2).doubt(), None);
        assert_eq!(drop_of(&[], 0, 0).doubt(), None);
        // the hostile case: STAT says there is mail, UIDL lists none
        assert!(drop_of(&[], 3, 3)
            .doubt()
            .unwrap()
            .contains("STAT counts 3"));
        assert!(drop_of(&[(1, "a")], 1, 0).doubt().unwrap().contains("LIST"));
        assert!(drop_of(&[(1, "a"), (1, "b")], 2, 2).doubt().is_some());
        assert!(drop_of(&[(1, "a"), (2, "a")], 2, 2).doubt().is_some());
        assert!(drop_of(&[(1, "a"), (5, "b")], 2, 2).doubt().is_some());
    }

    #[test]
    fn apop_uses_the_rfc_1939_example() {
        let ts = apop_timestamp("+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>").unwrap();
        assert_eq!(
            apop_digest(ts, "tanstaaf"),
            "c4c9334bac560ecc979e58001b3e22fb"
        );
        assert_eq!(apop_timestamp("+OK Dovecot ready."), None);
    }
}
