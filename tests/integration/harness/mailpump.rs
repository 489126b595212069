//! Runs the real `mailpump` binary with a config written for the test, and reads its JSON logs.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

use super::{Dovecot, TestDb, User};

/// One `[accounts.NAME]` table.
#[derive(Clone)]
pub struct AccountSpec {
    pub name: String,
    pub port: u16,
    pub security: &'static str,
    pub username: String,
    pub password: String,
    /// Extra TOML lines for the account (mailboxes, ca_file, batch_size, ...).
    pub extra: Vec<String>,
}

impl AccountSpec {
    pub fn plain(name: &str, dovecot: &Dovecot, user: &User) -> AccountSpec {
        Self::on_port(name, dovecot.imap_port, user)
    }
    /// A plain-IMAP account for `user` on any server listening on 127.0.0.1:`port`.
    pub fn on_port(name: &str, port: u16, user: &User) -> AccountSpec {
        AccountSpec {
            name: name.to_string(),
            port,
            security: "plain",
            username: user.name.clone(),
            password: user.password.clone(),
            extra: Vec::new(),
        }
    }
    pub fn with(mut self, line: impl Into<String>) -> AccountSpec {
        self.extra.push(line.into());
        self
    }
}

pub struct Mailpump {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

/// What one run printed.
pub struct Run {
    pub output: Output,
    pub logs: Vec<Value>,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).to_string()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).to_string()
    }
    /// Log events with this message.
    pub fn events(&self, message: &str) -> Vec<&Value> {
        self.logs
            .iter()
            .filter(|l| l["message"] == message)
            .collect()
    }
    pub fn event(&self, message: &str) -> &Value {
        self.events(message)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no {message:?} event in:\n{}", self.stdout()))
    }
}

pub fn parse_logs(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every secret in a config: passwords and the store URI's credentials.
pub fn secrets_in(toml: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in toml.lines() {
        let line = line.trim();
        for key in ["password = ", "client_secret = ", "refresh_token = "] {
            if let Some(v) = line.strip_prefix(key) {
                out.push(v.trim_matches('"').to_string());
            }
        }
        if let Some(v) = line.strip_prefix("uri = ") {
            let uri = v.trim_matches('"');
            if let Some((userinfo, _)) = uri.trim_start_matches("mongodb://").split_once('@') {
                out.push(userinfo.to_string());
                if let Some((_, pw)) = userinfo.split_once(':') {
                    out.push(pw.to_string());
                }
            }
        }
    }
    out.retain(|s| s.len() >= 2);
    out
}

/// The check every test's output goes through: no secret of its config ever appears.
pub fn assert_no_secrets(secrets: &[String], output: &str) {
    for secret in secrets {
        assert!(
            !output.contains(secret.as_str()),
            "a secret ({} chars) appeared in mailpump's output:\n{output}",
            secret.len()
        );
    }
}

impl Mailpump {
    pub fn secrets(&self) -> Vec<String> {
        secrets_in(&std::fs::read_to_string(&self.config).unwrap_or_default())
    }

    pub fn new(db: &TestDb, accounts: &[AccountSpec]) -> Mailpump {
        Self::new_with_store(db, "", accounts)
    }

    /// [`Mailpump::new`] with `store` (TOML lines) added to the `[store]` table.
    pub fn new_with_store(db: &TestDb, store: &str, accounts: &[AccountSpec]) -> Mailpump {
        let mut toml = format!(
            "[store]\nuri = \"{}\"\ndatabase = \"{}\"\nconnect_timeout = \"5s\"\n{store}\n\n",
            db.uri, db.name
        );
        toml.push_str("[defaults]\ncommand_timeout = \"30s\"\nconnect_timeout = \"5s\"\n\n");
        for a in accounts {
            // an empty password: an OAuth2 account (its extra lines carry auth and [oauth2])
            let password = if a.password.is_empty() {
                String::new()
            } else {
                format!("password = \"{}\"\n", a.password)
            };
            toml.push_str(&format!(
                "[accounts.{}]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"{}\"\nusername = \"{}\"\n{password}{}\n\n",
                a.name, a.port, a.security, a.username, a.extra.join("\n")
            ));
        }
        Self::from_toml(&toml)
    }

    pub fn from_toml(toml: &str) -> Mailpump {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mailpump.toml");
        std::fs::write(&config, toml).unwrap();
        Mailpump { dir, config }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailpump"));
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.env_remove("RUST_LOG").env_remove("MAILPUMP_CONFIG");
        cmd
    }

    /// Runs to completion (blocking: call from spawn_blocking in async tests).
    pub fn run(&self, args: &[&str]) -> Run {
        let output = self.command(args).output().expect("run mailpump");
        let logs = parse_logs(&output.stdout);
        let run = Run { output, logs };
        assert_no_secrets(&self.secrets(), &(run.stdout() + &run.stderr()));
        run
    }

    pub async fn run_async(&self, args: &[&str]) -> Run {
        let mut cmd = tokio::process::Command::from(self.command(args));
        let output = cmd.output().await.expect("run mailpump");
        let logs = parse_logs(&output.stdout);
        let run = Run { output, logs };
        assert_no_secrets(&self.secrets(), &(run.stdout() + &run.stderr()));
        run
    }
}
