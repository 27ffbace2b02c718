//! The configuration file: one typed tree, parsed from TOML and validated at
//! start. Every problem names the file, the key and what is wrong, so an
//! operator can fix it without reading code.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::path::normalize_prefix;

/// The whole configuration of one fencegate process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and their protections.
    #[serde(default)]
    pub server: ServerConfig,
    /// The store fencegate forwards to.
    pub upstream: UpstreamConfig,
    /// Where the durable epochs live.
    pub state: StateConfig,
    /// How writes carry their token and which methods are reads.
    #[serde(default)]
    pub fencing: FencingConfig,
    /// The coordination service; required when a domain has an election.
    pub etcd: Option<EtcdConfig>,
    /// The parts of the store, each guarded by one epoch.
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
}

/// `[server]`: the proxy and admin listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// A client must send its whole request head within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger ones get 431.
    pub max_header_bytes: usize,
    /// How long a shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Threads serving the proxy listener, each with its own event loop and
    /// connections to the store; 0 means one per CPU.
    pub workers: usize,
    /// Pins each serving thread to one CPU of those the process may use
    /// (see [`crate::affinity`]).
    pub pin_workers: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 65536,
            shutdown_grace: Duration::from_secs(30),
            workers: 0,
            pin_workers: false,
        }
    }
}

/// `[upstream]`: the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the store, `http://host:port` (no path).
    #[serde(deserialize_with = "deserialize_uri")]
    pub url: http::Uri,
    /// Time allowed to open a TCP connection to the store.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Time from the end of the forwarded body to the store's final response head.
    #[serde(with = "humantime_serde", default = "default_30s")]
    pub request_timeout: Duration,
    /// Longest pause allowed inside a body, in either direction.
    #[serde(with = "humantime_serde", default = "default_30s")]
    pub body_idle_timeout: Duration,
    /// Unanswered writes one store connection may carry (HTTP/1.1
    /// pipelining of small whole writes, see `pipeline`); 0 (the
    /// default) sends every request on a connection of its own.
    #[serde(default)]
    pub pipeline_depth: usize,
    /// Requests a pipelined connection carries before fencegate closes it;
    /// must stay below the store's own limit (nginx's `keepalive_requests`).
    #[serde(default = "default_pipeline_max_requests")]
    pub pipeline_max_requests: u64,
    /// Whether GETs and HEADs without a body are pipelined too, on lanes
    /// of their own, when `pipeline_depth` is above 0.
    #[serde(default = "default_true")]
    pub pipeline_reads: bool,
}

fn default_true() -> bool {
    true
}

fn default_pipeline_max_requests() -> u64 {
    500
}

/// The most unanswered writes a pipelined connection may carry.
pub const MAX_PIPELINE_DEPTH: usize = 256;

fn deserialize_uri<'de, D: serde::Deserializer<'de>>(d: D) -> Result<http::Uri, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a URL: {e}")))
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_30s() -> Duration {
    Duration::from_secs(30)
}

/// `[state]`: the redb file holding the epochs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Path of the state file; relative paths are taken from the working directory.
    pub path: PathBuf,
}

/// `[fencing]`: the token header and the read methods.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// Name of the header that carries the token.
    pub header: String,
    /// Methods forwarded without a token.
    pub read_methods: Vec<String>,
}

impl Default for FencingConfig {
    fn default() -> Self {
        Self {
            header: "Fencing-Token".to_owned(),
            read_methods: vec!["GET".into(), "HEAD".into(), "OPTIONS".into()],
        }
    }
}

/// `[etcd]`: where the elections live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members.
    pub endpoints: Vec<String>,
    /// `watch` (default) or `linearizable`.
    #[serde(default)]
    pub consistency: Consistency,
    /// `reject` (default) or `local`.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// Oldest leader view that may still decide.
    #[serde(with = "humantime_serde", default = "default_max_staleness")]
    pub max_staleness: Duration,
    /// Time allowed to open a connection to one member.
    #[serde(with = "humantime_serde", default = "default_etcd_connect_timeout")]
    pub connect_timeout: Duration,
    /// User to authenticate as; needs `password_file`.
    pub user: Option<String>,
    /// File holding the user's password (a trailing newline is ignored).
    pub password_file: Option<PathBuf>,
    /// TLS towards the members; required for `https://` endpoints.
    pub tls: Option<EtcdTlsConfig>,
}

/// `[etcd.tls]`: how fencegate verifies etcd and, optionally, proves itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// PEM file of the CA that signed the members' certificates.
    pub ca_file: PathBuf,
    /// PEM client certificate, for members that require one; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name to verify in the members' certificates instead of the endpoint's host.
    pub server_name: Option<String>,
}

fn default_etcd_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_max_staleness() -> Duration {
    Duration::from_secs(5)
}

/// How writes in election domains are checked against etcd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The watched view decides, confirmed by a read when it may be behind.
    #[default]
    Watch,
    /// Every write waits for a read that started after it arrived.
    Linearizable,
}

/// What writes in election domains get while etcd cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// 503 `coordinator_unavailable`.
    #[default]
    Reject,
    /// The epoch rule alone decides.
    Local,
}

/// `[[domains]]`: one part of the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// Name used in metrics, logs and the state file.
    pub name: String,
    /// Path prefix; normalized to end in `/` and matched on whole segments.
    pub prefix: String,
    /// Optional etcd election prefix whose leader may write here.
    pub election: Option<String>,
}

/// A configuration that cannot be used: names the file, the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The configuration file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not fit the schema.
    #[error("{file}: {message}")]
    Parse {
        /// The configuration file.
        file: PathBuf,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("{file}: key `{key}`: {problem}")]
    Invalid {
        /// The configuration file.
        file: PathBuf,
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Config {
    /// Reads, parses and validates the file at `file`.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates `text`; `file` is only used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        config.validate().map_err(|(key, problem)| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            problem,
        })?;
        Ok(config)
    }

    /// Checks what types alone cannot say, and normalizes domain prefixes.
    fn validate(&mut self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_owned(), problem));
        if self.server.max_header_bytes < 1024 {
            return bad("server.max_header_bytes", "must be at least 1024".into());
        }
        if self.server.workers > 256 {
            return bad("server.workers", "at most 256 (0 means one per CPU)".into());
        }
        if self.server.header_read_timeout.is_zero() {
            return bad("server.header_read_timeout", "must be above zero".into());
        }
        // A deadline past what the clock can hold panics when it is set
        // ("400000000000y" parses): a year is beyond any sane timeout.
        let etcd = self.etcd.as_ref();
        for (key, value) in [
            (
                "server.header_read_timeout",
                Some(self.server.header_read_timeout),
            ),
            ("server.shutdown_grace", Some(self.server.shutdown_grace)),
            ("upstream.connect_timeout", Some(self.upstream.connect_timeout)),
            ("upstream.request_timeout", Some(self.upstream.request_timeout)),
            (
                "upstream.body_idle_timeout",
                Some(self.upstream.body_idle_timeout),
            ),
            ("etcd.max_staleness", etcd.map(|e| e.max_staleness)),
            ("etcd.connect_timeout", etcd.map(|e| e.connect_timeout)),
        ] {
            if value.is_some_and(|v| v > MAX_DURATION) {
                return bad(key, "must be at most 365d".into());
            }
        }
        // Caught here, the mistake is named; at start it was only the
        // second bind's "address already in use" (exit 69), which sends an
        // operator looking for another process.
        let (proxy, admin) = (self.server.listen, self.server.admin_listen);
        let same_port = proxy.port() == admin.port() && proxy.port() != 0;
        if same_port
            && (proxy.ip() == admin.ip() || proxy.ip().is_unspecified() || admin.ip().is_unspecified())
        {
            return bad(
                "server.admin_listen",
                format!(
                    "`{admin}` overlaps server.listen `{proxy}`: give the admin listener a port of its own"
                ),
            );
        }
        let url = &self.upstream.url;
        if url.scheme_str() != Some("http") {
            return bad("upstream.url", format!("`{url}`: only http:// is supported"));
        }
        if url.authority().is_none() {
            return bad("upstream.url", format!("`{url}`: needs a host and port"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return bad("upstream.url", format!("`{url}`: must not have a path"));
        }
        if url.authority().is_some_and(|a| a.as_str().contains('@')) {
            // Dropped silently before: the store saw requests without them.
            return bad(
                "upstream.url",
                "must not hold credentials: fencegate sends none of its own, and passes each client's Authorization on".into(),
            );
        }
        if let Some(own) = [self.server.listen, self.server.admin_listen]
            .into_iter()
            .find(|own| names_listener(url, *own))
        {
            // Each request would come back to fencegate, one hop deeper,
            // until request_timeout: a single GET held thousands of file
            // descriptors and ended in 504, which says nothing of the cause.
            return bad(
                "upstream.url",
                format!("`{url}` is fencegate's own listener `{own}`: give the store's address"),
            );
        }
        for (key, value) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.request_timeout", self.upstream.request_timeout),
            ("upstream.body_idle_timeout", self.upstream.body_idle_timeout),
        ] {
            if value.is_zero() {
                return bad(key, "must be above zero".into());
            }
        }
        if self.upstream.pipeline_depth > MAX_PIPELINE_DEPTH {
            return bad(
                "upstream.pipeline_depth",
                format!("must be at most {MAX_PIPELINE_DEPTH}"),
            );
        }
        if self.upstream.pipeline_max_requests == 0 {
            return bad("upstream.pipeline_max_requests", "must be above zero".into());
        }
        if self.state.path.as_os_str().is_empty() {
            return bad("state.path", "must not be empty".into());
        }
        if http::HeaderName::from_bytes(self.fencing.header.as_bytes()).is_err() {
            return bad(
                "fencing.header",
                format!("`{}` is not a header name", self.fencing.header),
            );
        }
        if crate::hop::is_hop_by_hop(&self.fencing.header) {
            return bad(
                "fencing.header",
                "must not be a hop-by-hop header: it would not reach the store".into(),
            );
        }
        if has_a_meaning_of_its_own(&self.fencing.header) {
            return bad(
                "fencing.header",
                format!(
                    "`{}` has a meaning of its own in HTTP or to fencegate: a token there would be read as both",
                    self.fencing.header
                ),
            );
        }
        for method in &self.fencing.read_methods {
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                return bad("fencing.read_methods", format!("`{method}` is not a method"));
            }
            if method.eq_ignore_ascii_case("CONNECT") {
                return bad("fencing.read_methods", "CONNECT is never forwarded".into());
            }
            // Methods are case-sensitive: `get` would be a method no client
            // sends, and GET a write.
            if let Some(known) = KNOWN_METHODS
                .iter()
                .find(|known| known.eq_ignore_ascii_case(method) && *known != method)
            {
                return bad(
                    "fencing.read_methods",
                    format!("`{method}`: methods are case-sensitive; write `{known}`"),
                );
            }
        }
        self.validate_domains()?;
        Ok(())
    }

    fn validate_domains(&mut self) -> Result<(), (String, String)> {
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, domain) in self.domains.iter_mut().enumerate() {
            let key = |field: &str| format!("domains[{i}].{field}");
            let name_ok = !domain.name.is_empty()
                && domain.name.len() <= 128
                && domain
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok {
                return Err((
                    key("name"),
                    format!(
                        "`{}`: use 1 to 128 of letters, digits, `-`, `_` and `.`",
                        domain.name
                    ),
                ));
            }
            if domain.name == "none" {
                return Err((
                    key("name"),
                    "`none` is reserved for paths outside every domain".into(),
                ));
            }
            if !names.insert(domain.name.clone()) {
                return Err((key("name"), format!("`{}` is used twice", domain.name)));
            }
            domain.prefix = normalize_prefix(&domain.prefix)
                .map_err(|e| (key("prefix"), format!("`{}`: {e}", domain.prefix)))?;
            if !prefixes.insert(domain.prefix.clone()) {
                return Err((key("prefix"), format!("`{}` is used twice", domain.prefix)));
            }
            if let Some(election) = &domain.election {
                if election.is_empty() || election.ends_with('/') {
                    return Err((
                        key("election"),
                        format!("`{election}`: give the election prefix without a trailing `/`"),
                    ));
                }
                if self.etcd.is_none() {
                    return Err((key("election"), "needs an [etcd] section with endpoints".into()));
                }
            }
        }
        if let Some(etcd) = &self.etcd {
            validate_etcd(etcd)?;
        }
        Ok(())
    }
}

/// Whether `url` (validated: http with an authority) names the listener
/// bound at `own`: the same port on the same address, or on a loopback
/// address when `own` listens on every address. A host name other than
/// `localhost` is not resolved here.
fn names_listener(url: &http::Uri, own: SocketAddr) -> bool {
    let Some(authority) = url.authority() else {
        return false;
    };
    if authority.port_u16().unwrap_or(80) != own.port() {
        return false;
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) if host.eq_ignore_ascii_case("localhost") => own.ip(),
        Err(_) => return false,
    };
    ip == own.ip() || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
}

/// The methods of HTTP and WebDAV, in the case clients send them.
const KNOWN_METHODS: [&str; 15] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
];

/// The longest duration a setting may take.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Header fields that frame the message, route it, or that fencegate reads
/// or writes for a purpose of their own: as the fencing header, a client's
/// `Content-Length: 7` or `Host: 7` would be read as token 7 too.
fn has_a_meaning_of_its_own(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "content-type"
            | "content-encoding"
            | "content-range"
            | "expect"
            | "trailer"
            | "destination"
            | "overwrite"
            | "forwarded"
            | "x-forwarded-for"
            | "authorization"
    ) || crate::hop::METHOD_OVERRIDES.iter().any(|h| h.as_str() == name)
}

fn validate_etcd(etcd: &EtcdConfig) -> Result<(), (String, String)> {
    let bad = |key: &str, problem: String| Err((format!("etcd.{key}"), problem));
    if etcd.endpoints.is_empty() {
        return bad("endpoints", "needs at least one endpoint".into());
    }
    for endpoint in &etcd.endpoints {
        let uri: http::Uri = match endpoint.parse() {
            Ok(uri) => uri,
            Err(e) => return bad("endpoints", format!("`{endpoint}` is not a URL: {e}")),
        };
        match uri.scheme_str() {
            Some("http") if etcd.tls.is_some() => {
                return bad(
                    "endpoints",
                    format!("`{endpoint}`: [etcd.tls] is set, so every endpoint must be https://"),
                );
            }
            Some("http") => {}
            Some("https") if etcd.tls.is_none() => {
                return bad(
                    "endpoints",
                    format!("`{endpoint}`: https:// needs an [etcd.tls] section with ca_file"),
                );
            }
            Some("https") => {}
            _ => {
                return bad(
                    "endpoints",
                    format!("`{endpoint}`: use http://host:port or https://host:port"),
                )
            }
        }
        if uri.authority().is_none() {
            return bad("endpoints", format!("`{endpoint}`: needs a host and port"));
        }
    }
    if etcd.max_staleness < Duration::from_millis(30) {
        return bad("max_staleness", "must be at least 30ms".into());
    }
    if etcd.connect_timeout.is_zero() {
        return bad("connect_timeout", "must be above zero".into());
    }
    match (&etcd.user, &etcd.password_file) {
        (Some(user), _) if user.is_empty() => return bad("user", "must not be empty".into()),
        (Some(_), None) => return bad("password_file", "is needed with `user`".into()),
        (None, Some(_)) => return bad("user", "is needed with `password_file`".into()),
        _ => {}
    }
    if let Some(tls) = &etcd.tls {
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => return bad("tls.key_file", "is needed with `cert_file`".into()),
            (None, Some(_)) => return bad("tls.cert_file", "is needed with `key_file`".into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [upstream]
        url = "http://127.0.0.1:8081"
        [state]
        path = "data/fencegate.redb"
        [[domains]]
        name = "orders"
        prefix = "/orders"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_file_gets_defaults_and_normalized_prefix() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.domains[0].prefix, "/orders/");
        assert_eq!(config.fencing.header, "Fencing-Token");
        assert_eq!(config.upstream.request_timeout, Duration::from_secs(30));
        assert_eq!(config.server.max_header_bytes, 65536);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[state]", "[state]\nflavour = 1");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("test.toml") && err.contains("flavour"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = MINIMAL.replace("[state]", "[server]\nmax_header_bytes = \"big\"\n[state]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("max_header_bytes"), "{err}");
    }

    /// Methods are case-sensitive (RFC 9110 §9.1): `get` is a method of
    /// its own, so `read_methods = ["get"]` was accepted and made every
    /// GET a write (428 without a token), and `"options"` a CORS
    /// preflight's too (found by review). A known method spelled in
    /// another case is refused, naming the spelling that works.
    #[test]
    fn a_read_method_in_the_wrong_case_is_refused() {
        for (method, want) in [("get", "GET"), ("Options", "OPTIONS"), ("propfind", "PROPFIND")] {
            let text = format!("[fencing]\nread_methods = [\"HEAD\", \"{method}\"]\n{MINIMAL}");
            match parse(&text) {
                Err(ConfigError::Invalid { key, problem, .. }) => {
                    assert_eq!(key, "fencing.read_methods");
                    assert!(problem.contains(want), "{problem}");
                }
                other => panic!("`{method}` accepted: {other:?}"),
            }
        }
        // A method of the store's own, in its own case, is still accepted.
        let text = format!("[fencing]\nread_methods = [\"GET\", \"SEARCH\", \"report\"]\n{MINIMAL}");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (
                MINIMAL.replace("http://127.0.0.1:8081", "https://x:1"),
                "upstream.url",
            ),
            (
                MINIMAL.replace("http://127.0.0.1:8081", "http://x:1/base"),
                "upstream.url",
            ),
            (
                MINIMAL.replace("\"/orders\"", "\"/a/../../b\""),
                "domains[0].prefix",
            ),
            (MINIMAL.replace("\"orders\"", "\"none\""), "domains[0].name"),
            (
                format!("{MINIMAL}\n[[domains]]\nname = \"orders\"\nprefix = \"/x/\""),
                "domains[1].name",
            ),
            (
                format!("{MINIMAL}\n[[domains]]\nname = \"o2\"\nprefix = \"/orders/\""),
                "domains[1].prefix",
            ),
            (format!("{MINIMAL}election = \"/e\""), "domains[0].election"),
            (
                format!("[server]\nadmin_listen = \"127.0.0.1:8080\"\n{MINIMAL}"),
                "server.admin_listen",
            ),
            (
                format!("[server]\nlisten = \"0.0.0.0:9100\"\n{MINIMAL}"),
                "server.admin_listen",
            ),
            (
                format!("[fencing]\nheader = \"Connection\"\n{MINIMAL}"),
                "fencing.header",
            ),
            (
                format!("[fencing]\nheader = \"Content-Length\"\n{MINIMAL}"),
                "fencing.header",
            ),
            (
                format!("[fencing]\nheader = \"host\"\n{MINIMAL}"),
                "fencing.header",
            ),
            (
                format!("[fencing]\nheader = \"X-HTTP-Method-Override\"\n{MINIMAL}"),
                "fencing.header",
            ),
            (
                MINIMAL.replace("http://127.0.0.1:8081", "http://user:secret@127.0.0.1:8081"),
                "upstream.url",
            ),
            // Forwarding to its own listeners: a loop (found by review).
            (
                MINIMAL.replace("http://127.0.0.1:8081", "http://127.0.0.1:8080"),
                "upstream.url",
            ),
            (
                MINIMAL.replace("http://127.0.0.1:8081", "http://localhost:9100"),
                "upstream.url",
            ),
            (
                format!("[server]\nlisten = \"0.0.0.0:8081\"\n{MINIMAL}"),
                "upstream.url",
            ),
            (
                format!("[server]\nlisten = \"[::]:8081\"\n{MINIMAL}"),
                "upstream.url",
            ),
            (
                MINIMAL.replace("[state]", "request_timeout = \"400000000000y\"\n[state]"),
                "upstream.request_timeout",
            ),
            (
                format!("[server]\nshutdown_grace = \"366d\"\n{MINIMAL}"),
                "server.shutdown_grace",
            ),
            (
                format!(
                    "{MINIMAL}\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nmax_staleness = \"400d\""
                ),
                "etcd.max_staleness",
            ),
        ];
        for (text, key) in cases {
            match parse(&text) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key),
                other => panic!("expected an error on {key}, got {other:?}"),
            }
        }
    }
}
