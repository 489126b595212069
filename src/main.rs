//! The `mailpump` binary: parse the command line, load the config, start telemetry, hand over
//! to the command's module in [`mailpump::commands`], map the outcome to an exit code (0 ok,
//! 64 usage, 78 config, 1 anything else).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mailpump::commands;
use mailpump::config;
use mailpump::progress;
use mailpump::telemetry::{self, LogFormat, LogTo};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;
/// How long the runtime waits for blocking tasks at exit.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(500);

#[derive(Parser)]
#[command(
    name = "mailpump",
    version,
    about = "Stores every message of your IMAP mailboxes, parsed and raw, in MongoDB"
)]
struct Cli {
    /// Config file [default: $MAILPUMP_CONFIG, else /etc/mailpump/mailpump.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format: auto is text on a terminal, JSON otherwise
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: LogFormat,
    /// How often long work logs a `progress` event when no progress bar is shown
    #[arg(long, global = true, default_value = "10s", value_parser = duration)]
    progress_interval: Duration,
    #[command(subcommand)]
    command: Command,
}

fn duration(text: &str) -> Result<Duration, String> {
    config::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a duration such as 10s, 500ms or 1m"))
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: keep every mailbox live until SIGTERM/SIGINT (SIGHUP reloads the config)
    Run,
    /// One catch-up pass over every configured mailbox, then exit
    Sync {
        /// Also try every quarantined message again now (otherwise: once per quarantine_retry)
        #[arg(long)]
        retry_quarantined: bool,
    },
    /// Write stored messages to DIR/ACCOUNT/MAILBOX/<uid>.eml, with bodies and attachments
    Export {
        /// The account to export
        #[arg(long)]
        account: String,
        /// Only this mailbox
        #[arg(long)]
        mailbox: Option<String>,
        /// Only messages that arrived on or after this date (YYYY-MM-DD)
        #[arg(long)]
        since: Option<chrono::NaiveDate>,
        /// Where to write
        #[arg(long)]
        dir: PathBuf,
    },
    /// Each mailbox's state from the database (no IMAP); exit 1 if any is failing
    Status {
        /// One JSON object per mailbox, one per line
        #[arg(long)]
        json: bool,
        /// A mailbox whose last success is older is stale (exit 1): auto (three idle_refresh
        /// or poll_interval periods), off, or a duration such as 2d
        #[arg(long, default_value = "auto")]
        stale_after: commands::status::StaleAfter,
    },
    /// Compare each mailbox on the server with the store (UIDs, flags, sizes); exit 1 on any
    /// difference. Never modifies the server (EXAMINE, BODY.PEEK)
    Verify {
        /// Only this account
        #[arg(long)]
        account: Option<String>,
        /// Only this mailbox
        #[arg(long)]
        mailbox: Option<String>,
        /// Make the store match: fetch and store what is missing or differs, fix flags and
        /// expunge marks (exit 0 when everything was repaired)
        #[arg(long)]
        repair: bool,
        /// Also fetch every message and compare the SHA-256 of its bytes with raw.sha256
        #[arg(long)]
        deep: bool,
        /// One JSON object per mailbox, one per line
        #[arg(long)]
        json: bool,
    },
    /// Validate the config, reach the store, log in to every mailbox (all at once)
    Check {
        /// Only validate the configuration (no network): for systemd's ExecStartPre
        #[arg(long)]
        config_only: bool,
        /// Give up on whatever has not answered after this long
        #[arg(long, default_value = "30s", value_parser = duration)]
        deadline: Duration,
    },
    /// Get the first refresh token of an OAuth2 account (authorization code with PKCE) and
    /// write it to a file with mode 0600
    Auth {
        /// The account (auth = "oauth2", with client_id and a token endpoint)
        account: String,
        /// Where to write the refresh token (default: the account's refresh_token_file)
        #[arg(long)]
        out: Option<PathBuf>,
        /// The authorization endpoint (default: the provider's; required for custom)
        #[arg(long)]
        authorize_url: Option<String>,
        /// The redirect URI registered for the client
        #[arg(long, default_value = "http://localhost")]
        redirect_uri: String,
    },
    /// Ask the running daemon's /healthz (at [metrics] listen); exit 0 on 200: for health checks
    Health,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EX_USAGE),
            };
        }
    };
    let path = cli
        .config
        .or_else(|| std::env::var_os("MAILPUMP_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/mailpump/mailpump.toml"));
    // export and check --config-only never log in: they need no password source.
    let secrets = match &cli.command {
        Command::Export { .. }
        | Command::Check {
            config_only: true, ..
        } => config::Secrets::Skipped,
        Command::Auth { .. } => config::Secrets::Consent,
        _ => config::Secrets::Required,
    };
    // check, status, verify and health print a report on stdout: their logs go to stderr
    let log_to = match &cli.command {
        Command::Check { .. }
        | Command::Status { .. }
        | Command::Verify { .. }
        | Command::Health
        | Command::Auth { .. } => LogTo::Stderr,
        _ => LogTo::Stdout,
    };
    let log_format = cli.log_format.resolve(log_to);
    let config = match config::load_with(&path, secrets) {
        Ok(c) => c,
        Err(e) => {
            telemetry::init(log_format, None, log_to);
            tracing::error!(error = %e, path = %path.display(), "config_invalid");
            eprintln!("mailpump: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Bars only for a person watching a one-shot command; the daemon logs events.
    let bars = log_format == LogFormat::Text
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
        && !matches!(cli.command, Command::Run);
    progress::init(if bars {
        progress::Mode::Bars
    } else {
        progress::Mode::Events {
            interval: cli.progress_interval,
        }
    });
    telemetry::init(log_format, config.log_level.as_deref(), log_to);
    let mailboxes: usize = config.accounts.iter().map(|a| a.mailboxes.len()).sum();
    match mailpump::sys::raise_open_files_limit() {
        Some(n) if (n as usize) < mailboxes + 64 => {
            tracing::warn!(open_files_limit = n, mailboxes, "open_files_limit_low")
        }
        _ => {}
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "runtime_failed");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let ok = match cli.command {
            Command::Check {
                config_only: true, ..
            } => {
                println!("✓ config  {}", path.display());
                true
            }
            Command::Check { deadline, .. } => commands::check::check(&config, deadline).await,
            Command::Status { json, stale_after } => {
                commands::status::status(&config, json, stale_after).await
            }
            Command::Verify {
                account,
                mailbox,
                repair,
                deep,
                json,
            } => {
                let args = commands::verify::VerifyArgs {
                    account,
                    mailbox,
                    options: mailpump::verify::Options { repair, deep },
                    json,
                };
                return commands::verify::verify(&config, args).await;
            }
            Command::Run => commands::run::run(&path, config).await,
            Command::Health => commands::health::health(&config).await,
            Command::Auth {
                account,
                out,
                authorize_url,
                redirect_uri,
            } => {
                let options = commands::auth::AuthOptions {
                    account,
                    out,
                    authorize_url,
                    redirect_uri,
                };
                commands::auth::auth(&config, options).await
            }
            Command::Export {
                account,
                mailbox,
                since,
                dir,
            } => {
                let options = mailpump::export::ExportOptions {
                    account,
                    mailbox,
                    since,
                    dir,
                };
                commands::export::run(&config, options).await
            }
            Command::Sync { retry_quarantined } => {
                let shutdown = CancellationToken::new();
                if let Err(e) = mailpump::signals::listen(shutdown.clone()) {
                    tracing::error!(error = %e, "signal_setup_failed");
                    return 1;
                }
                let options = mailpump::sync::Options { retry_quarantined };
                commands::sync::sync_all(&config, options, shutdown).await
            }
        };
        u8::from(!ok)
    });
    // Blocking work still running (a parse of a pathological message) must not hold the exit
    // past the 10 s promise: the runtime waits for it at most this long.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    ExitCode::from(code)
}
