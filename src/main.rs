//! The `mailpump` binary: parse the command line, load the config, start telemetry, run the
//! command, map the outcome to an exit code (0 ok, 64 usage, 78 config, 1 anything else).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailpump::telemetry::{self, LogFormat};
use mailpump::{commands, config, signals, supervisor};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;
/// How long the runtime waits for blocking tasks at exit.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(500);

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
    /// Log format
    #[arg(long, global = true, value_enum, default_value = "json")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
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
    /// Validate the config, reach the store, log in to every mailbox
    Check {
        /// Only validate the configuration (no network): for systemd's ExecStartPre
        #[arg(long)]
        config_only: bool,
    },
    /// Ask the running daemon's /healthz (at [metrics] listen); exit 0 on 200: for health checks
    Health,
}

/// One connection per mailbox: 1,000 mailboxes need more descriptors than the usual soft limit
/// of 1,024. Raise the soft limit to the hard one (what systemd's LimitNOFILE or ulimit -Hn
/// allows); returns the new soft limit.
fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return Some(wanted.rlim_cur);
            }
        }
    }
    Some(limit.rlim_cur)
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
        Command::Export { .. } | Command::Check { config_only: true } => config::Secrets::Skipped,
        _ => config::Secrets::Required,
    };
    let config = match config::load_with(&path, secrets) {
        Ok(c) => c,
        Err(e) => {
            telemetry::init(cli.log_format, None);
            tracing::error!(error = %e, path = %path.display(), "config_invalid");
            eprintln!("mailpump: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    telemetry::init(cli.log_format, config.log_level.as_deref());
    let mailboxes: usize = config.accounts.iter().map(|a| a.mailboxes.len()).sum();
    match raise_open_files_limit() {
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
    let ok = runtime.block_on(async {
        match cli.command {
            Command::Check { config_only: true } => {
                println!("ok    config  {}", path.display());
                true
            }
            Command::Check { config_only: false } => commands::check_all(&config).await,
            Command::Health => commands::health::health(&config).await,
            Command::Run => {
                let shutdown = CancellationToken::new();
                let signals = match signals::listen(shutdown.clone()) {
                    Ok(rx) => rx,
                    Err(e) => {
                        tracing::error!(error = %e, "signal_setup_failed");
                        return false;
                    }
                };
                let (limits, budget) = (commands::limits(&config), commands::budget(&config));
                supervisor::run(&path, config, limits, budget, shutdown, signals).await
            }
            Command::Export {
                account,
                mailbox,
                since,
                dir,
            } => {
                let store = match mailpump::store::Store::connect(&config.store).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "store_unreachable");
                        return false;
                    }
                };
                let options = mailpump::export::ExportOptions {
                    account,
                    mailbox,
                    since,
                    dir,
                };
                let result = mailpump::export::export(&store, &options).await;
                store.shutdown(commands::STORE_SHUTDOWN).await;
                match result {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::error!(error = %e, "export_failed");
                        false
                    }
                }
            }
            Command::Sync { retry_quarantined } => {
                let shutdown = CancellationToken::new();
                if let Err(e) = signals::listen(shutdown.clone()) {
                    tracing::error!(error = %e, "signal_setup_failed");
                    return false;
                }
                let options = mailpump::sync::Options { retry_quarantined };
                commands::sync_all(&config, options, shutdown).await
            }
        }
    });
    // Blocking work still running (a parse of a pathological message) must not hold the exit
    // past the 10 s promise: the runtime waits for it at most this long.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
