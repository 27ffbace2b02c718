//! The `fencegate` binary: parses the command line, starts logging and hands
//! over to the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fencegate::commands::{self, Fatal};

/// jemalloc rather than glibc's malloc. hyper gives each message it parses
/// a new 8 KiB read buffer (the last one is still shared with the message),
/// a size glibc serves from its bins under a lock, not from its per-thread
/// cache; jemalloc's thread caches cover it. Measured (bench/RESULTS.md):
/// 4-5 % fewer instructions per request, and less memory with 1,000 idle
/// connections (26.8 against 28.6 MB), since glibc's arenas fragment.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A storage-side fencing proxy: refuses writes from deposed leaders.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "config/fencegate.toml")]
    config: PathBuf,
    /// Log line format; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM or SIGINT.
    Run {
        /// Drop the stored epoch of a domain the configuration no longer has.
        #[arg(long, value_name = "NAME")]
        forget_domain: Vec<String>,
    },
    /// Create the state file, every domain at epoch 0.
    Init,
    /// Validate the configuration: exit 0 when valid, 64 otherwise.
    CheckConfig,
    /// Print the durable epochs (the proxy must be stopped).
    Epochs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<EpochsAction>,
    },
    /// Exit 0 when the admin /healthz answers (for container health checks).
    Healthcheck,
}

#[derive(Subcommand)]
enum EpochsAction {
    /// Set a domain's epoch to any value, lower included (proxy stopped).
    Set {
        /// The domain.
        #[arg(long)]
        domain: String,
        /// The new epoch.
        #[arg(long)]
        value: u64,
        /// Required: lowering an epoch re-admits deposed leaders.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` print and succeed; a mistake in the
        // arguments is a usage error like any other (not clap's own 2).
        Err(e) => {
            let _ = e.print();
            return match e.use_stderr() {
                true => ExitCode::from(commands::EX_USAGE),
                false => ExitCode::SUCCESS,
            };
        }
    };
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Run { forget_domain } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| Fatal::Usage(format!("cannot start the runtime: {e}")))
            .and_then(|rt| rt.block_on(commands::run(&cli.config, &forget_domain))),
        Command::Init => commands::init(&cli.config),
        Command::CheckConfig => commands::check_config(&cli.config),
        Command::Epochs { json, action: None } => commands::epochs(&cli.config, json),
        Command::Epochs {
            action: Some(EpochsAction::Set { domain, value, force }),
            ..
        } => commands::epochs_set(&cli.config, &domain, value, force),
        Command::Healthcheck => commands::healthcheck(&cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr fails (a full disk)
            // and would turn every exit code into 101.
            let _ = writeln!(std::io::stderr(), "fencegate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_tracing(format: LogFormat) {
    // A RUST_LOG the filter cannot parse falls back to info, said once
    // logging is up: silently, an operator asking for more learnt nothing.
    let (filter, invalid) = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (
            tracing_subscriber::EnvFilter::new("info"),
            std::env::var("RUST_LOG").ok().map(|value| (value, e)),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr on a full disk, a pipe
        // whose reader died) is lost, and nothing more: by default the
        // subscriber reports it with `eprintln!`, which panics when stderr
        // fails too, killing whichever task logged (a request, the
        // committer, the signal handler) or the start itself.
        .log_internal_errors(false)
        // Colour codes only for a person at a terminal, not for log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some((value, e)) = invalid {
        tracing::warn!("RUST_LOG=`{value}` is not a valid filter ({e}): logging at info");
    }
}
