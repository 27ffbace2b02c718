//! The subcommands behind the binary, and the exit codes they end with
//! (sysexits: 64 bad configuration or usage, 73 cannot create, 74 state
//! unreadable or output not writable, 69 a service unavailable).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::affinity::AffinityError;
use crate::app::{self, Listeners};
use crate::config::{Config, ConfigError};
use crate::state::{StateError, StateFile};

/// Bad configuration or usage.
pub const EX_USAGE: u8 = 64;
/// A service (a listener address, the admin endpoint) is unavailable.
pub const EX_UNAVAILABLE: u8 = 69;
/// The state file cannot be created.
pub const EX_CANTCREAT: u8 = 73;
/// The state file is missing or unreadable, or the output not writable.
pub const EX_IOERR: u8 = 74;

/// A command that could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// See [`ConfigError`].
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// See [`StateError`].
    #[error(transparent)]
    State(#[from] StateError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The serving threads could not be started.
    #[error("cannot serve the proxy listener: {0}")]
    Serve(std::io::Error),
    /// See [`AffinityError`].
    #[error(transparent)]
    Affinity(#[from] AffinityError),
    /// A usage error found after parsing.
    #[error("{0}")]
    Usage(String),
    /// The health check failed.
    #[error("{0}")]
    Unhealthy(String),
    /// The command's output could not be written (a closed pipe, a full
    /// disk). For `epochs set` the epoch was set all the same.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl Fatal {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Fatal::Config(_) | Fatal::Usage(_) => EX_USAGE,
            // `epochs set --domain` naming a domain the file does not have.
            Fatal::State(StateError::ForgottenDomain { .. } | StateError::UnknownDomain { .. }) => EX_USAGE,
            Fatal::State(StateError::AlreadyExists(_)) => EX_CANTCREAT,
            Fatal::State(_) | Fatal::Output(_) => EX_IOERR,
            Fatal::Bind { .. } | Fatal::Serve(_) | Fatal::Affinity(_) | Fatal::Unhealthy(_) => EX_UNAVAILABLE,
        }
    }
}

/// `fencegate run`: serve until SIGTERM or SIGINT, then drain (until a
/// second one).
pub async fn run(config_path: &Path, forget: &[String]) -> Result<(), Fatal> {
    let config = Config::load(config_path)?;
    let etcd = etcd_options(config_path, &config)?;
    let state = StateFile::open(&config.state.path)?;
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Fatal::Bind { addr, source })
    };
    let listeners = Listeners {
        proxy: bind(config.server.listen).await?,
        admin: bind(config.server.admin_listen).await?,
    };
    let signals = crate::shutdown::signals();
    let shutdown = app::Shutdown {
        begin: Box::pin(signals.first()),
        hurry: Box::pin(signals.second()),
    };
    app::run(config, state, forget, etcd, listeners, shutdown).await?;
    Ok(())
}

/// How to reach etcd; reading the password and TLS files now turns a wrong
/// path into a configuration error at start rather than endless retries.
fn etcd_options(config_path: &Path, config: &Config) -> Result<Option<etcd_client::ConnectOptions>, Fatal> {
    let Some(etcd) = &config.etcd else {
        return Ok(None);
    };
    let options = crate::coordinator::connect_options(etcd).map_err(|e| ConfigError::Invalid {
        file: config_path.to_owned(),
        key: format!("etcd.{}", e.key),
        problem: e.problem,
    })?;
    Ok(Some(options))
}

/// Writes a line of a command's output. Not `println!`, which panics when
/// stdout fails (a closed pipe, a full disk): the exit code would be 101,
/// a crash's, after `epochs set` had set the epoch.
fn say(line: std::fmt::Arguments) -> Result<(), Fatal> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(Fatal::Output)
}

/// `fencegate init`: create the state file with every domain at epoch 0.
pub fn init(config_path: &Path) -> Result<(), Fatal> {
    let config = Config::load(config_path)?;
    StateFile::create(&config.state.path, &app::wanted_domains(&config))?;
    say(format_args!(
        "created {} with {} domain(s) at epoch 0",
        config.state.path.display(),
        config.domains.len()
    ))
}

/// `fencegate check-config`.
pub fn check_config(config_path: &Path) -> Result<(), Fatal> {
    let config = Config::load(config_path)?;
    etcd_options(config_path, &config)?;
    say(format_args!(
        "{}: valid ({} domain(s))",
        config_path.display(),
        config.domains.len()
    ))
}

/// `fencegate epochs`: print the durable epochs of a stopped proxy.
pub fn epochs(config_path: &Path, json: bool) -> Result<(), Fatal> {
    let config = Config::load(config_path)?;
    let domains = StateFile::read_only(&config.state.path).map_err(|e| match e {
        StateError::InUse(path) => Fatal::Usage(format!(
            "state file {} is in use by a running fencegate: read its epochs at http://{}/metrics or /domains",
            path.display(),
            config.server.admin_listen
        )),
        other => Fatal::State(other),
    })?;
    if json {
        say(format_args!(
            "{}",
            serde_json::to_string_pretty(&domains).expect("serializable")
        ))?;
    } else {
        say(format_args!("{:<24} {:<32} {:>20}", "DOMAIN", "PREFIX", "EPOCH"))?;
        for d in domains {
            say(format_args!("{:<24} {:<32} {:>20}", d.name, d.prefix, d.epoch))?;
        }
    }
    Ok(())
}

/// `fencegate epochs set --force`: the only way to lower an epoch.
pub fn epochs_set(config_path: &Path, domain: &str, value: u64, force: bool) -> Result<(), Fatal> {
    if !force {
        return Err(Fatal::Usage(
            "refusing to change an epoch without --force: lowering one re-admits deposed leaders; stop the proxy first".into(),
        ));
    }
    if crate::token::Token::new(value).is_none() && value != 0 {
        return Err(Fatal::Usage(format!(
            "--value {value}: an epoch is at most {} (tokens are positive int64)",
            crate::token::Token::MAX
        )));
    }
    let config = Config::load(config_path)?;
    let state = StateFile::open(&config.state.path).map_err(|e| match e {
        StateError::InUse(path) => Fatal::Usage(format!(
            "state file {} is in use by a running fencegate: stop the proxy first, then run `epochs set` again (a running proxy keeps its epochs in memory: it would neither see nor keep the new value)",
            path.display()
        )),
        other => Fatal::State(other),
    })?;
    let old = state.force_set(domain, value)?;
    tracing::warn!(domain, old, new = value, "epoch set by operator");
    say(format_args!("domain {domain}: epoch {old} -> {value}"))
}

/// Where to reach a listener bound to `listen`: an address taking every
/// interface is reached on the loopback of its own family. (`[::]` on
/// 127.0.0.1 fails where `net.ipv6.bindv6only = 1` keeps IPv4 off the
/// IPv6 socket; `::1` reaches it either way.)
fn dial_address(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
        _ => {}
    }
    addr
}

/// `fencegate healthcheck`: exit 0 when the admin `/healthz` answers 200.
pub fn healthcheck(config_path: &Path) -> Result<(), Fatal> {
    let config = Config::load(config_path)?;
    let addr = dial_address(config.server.admin_listen);
    let unhealthy = |e: std::io::Error| Fatal::Unhealthy(format!("http://{addr}/healthz: {e}"));
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(unhealthy)?;
    stream.set_read_timeout(Some(timeout)).map_err(unhealthy)?;
    stream.set_write_timeout(Some(timeout)).map_err(unhealthy)?;
    write!(stream, "GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(unhealthy)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(unhealthy)?;
    let status_line = answer.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(Fatal::Unhealthy(format!(
            "http://{addr}/healthz answered `{status_line}`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `healthcheck` dials an unspecified listen address on the loopback of
    /// its family: `[::]` was dialled on 127.0.0.1, which fails where
    /// `bindv6only = 1` (found by review; binding `[::]` in a test would
    /// leave loopback, so the mapping is tested here).
    #[test]
    fn an_unspecified_listen_address_is_dialled_on_its_own_loopback() {
        let dial = |listen: &str| dial_address(listen.parse().unwrap()).to_string();
        assert_eq!(dial("0.0.0.0:9100"), "127.0.0.1:9100");
        assert_eq!(dial("[::]:9100"), "[::1]:9100");
        assert_eq!(dial("10.1.2.3:9100"), "10.1.2.3:9100");
        assert_eq!(dial("[fd00::1]:9100"), "[fd00::1]:9100");
    }
}
