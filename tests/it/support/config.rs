//! A builder for fencegate's TOML configuration (SPEC.md, Configuration).

use super::free_port;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// One `[[domains]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub prefix: String,
    pub election: Option<String>,
}

impl Domain {
    pub fn new(name: &str, prefix: &str) -> Domain {
        Domain {
            name: name.to_string(),
            prefix: prefix.to_string(),
            election: None,
        }
    }

    pub fn with_election(name: &str, prefix: &str, election: &str) -> Domain {
        Domain {
            election: Some(election.to_string()),
            ..Domain::new(name, prefix)
        }
    }
}

/// fencegate's configuration. `listen` and `admin_listen` get free
/// loopback ports; every other optional key is written only when set, so
/// fencegate's own defaults apply otherwise.
#[derive(Debug, Clone)]
pub struct FencegateConfig {
    pub listen: String,
    pub admin_listen: String,
    pub header_read_timeout: Option<Duration>,
    pub max_header_bytes: Option<u64>,
    pub shutdown_grace: Option<Duration>,
    /// `server.workers`: serving threads, each with its own store
    /// connections.
    pub workers: Option<usize>,
    /// `server.pin_workers`: each serving thread on a CPU of its own.
    pub pin_workers: Option<bool>,
    pub upstream_url: String,
    pub connect_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub body_idle_timeout: Option<Duration>,
    /// `upstream.pipeline_depth`: unanswered writes per store connection.
    pub pipeline_depth: Option<usize>,
    /// `upstream.pipeline_max_requests`.
    pub pipeline_max_requests: Option<u64>,
    /// `upstream.pipeline_reads`.
    pub pipeline_reads: Option<bool>,
    /// `None`: [`super::Fencegate`] puts the state file in its temp dir.
    pub state_path: Option<PathBuf>,
    pub fencing_header: Option<String>,
    pub read_methods: Option<Vec<String>>,
    /// The body of the `[etcd]` table, raw TOML (without the header).
    /// `None`: no `[etcd]` table at all.
    pub etcd: Option<String>,
    pub domains: Vec<Domain>,
    /// Raw TOML appended at the end (e.g. an unknown key for a
    /// check-config test).
    pub extra_toml: Option<String>,
}

impl FencegateConfig {
    /// A config proxying to `upstream_url` (e.g. `nginx.url()`), no domains.
    pub fn new(upstream_url: &str) -> FencegateConfig {
        FencegateConfig {
            listen: format!("127.0.0.1:{}", free_port()),
            admin_listen: format!("127.0.0.1:{}", free_port()),
            header_read_timeout: None,
            max_header_bytes: None,
            shutdown_grace: None,
            workers: None,
            pin_workers: None,
            upstream_url: upstream_url.to_string(),
            connect_timeout: None,
            request_timeout: None,
            body_idle_timeout: None,
            pipeline_depth: None,
            pipeline_max_requests: None,
            pipeline_reads: None,
            state_path: None,
            fencing_header: None,
            read_methods: None,
            etcd: None,
            domains: Vec::new(),
            extra_toml: None,
        }
    }

    pub fn domain(mut self, name: &str, prefix: &str) -> Self {
        self.domains.push(Domain::new(name, prefix));
        self
    }

    pub fn election_domain(mut self, name: &str, prefix: &str, election: &str) -> Self {
        self.domains.push(Domain::with_election(name, prefix, election));
        self
    }

    pub fn header_read_timeout(mut self, d: Duration) -> Self {
        self.header_read_timeout = Some(d);
        self
    }

    pub fn max_header_bytes(mut self, n: u64) -> Self {
        self.max_header_bytes = Some(n);
        self
    }

    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = Some(d);
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    pub fn pin_workers(mut self, pin: bool) -> Self {
        self.pin_workers = Some(pin);
        self
    }

    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = Some(d);
        self
    }

    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = Some(d);
        self
    }

    pub fn body_idle_timeout(mut self, d: Duration) -> Self {
        self.body_idle_timeout = Some(d);
        self
    }

    pub fn pipeline_depth(mut self, n: usize) -> Self {
        self.pipeline_depth = Some(n);
        self
    }

    pub fn pipeline_reads(mut self, on: bool) -> Self {
        self.pipeline_reads = Some(on);
        self
    }

    pub fn pipeline_max_requests(mut self, n: u64) -> Self {
        self.pipeline_max_requests = Some(n);
        self
    }

    pub fn state_path(mut self, p: impl Into<PathBuf>) -> Self {
        self.state_path = Some(p.into());
        self
    }

    pub fn fencing_header(mut self, name: &str) -> Self {
        self.fencing_header = Some(name.to_string());
        self
    }

    pub fn read_methods(mut self, methods: &[&str]) -> Self {
        self.read_methods = Some(methods.iter().map(|m| m.to_string()).collect());
        self
    }

    /// The raw body of the `[etcd]` table, e.g.
    /// `endpoints = ["http://127.0.0.1:2379"]\nmax_staleness = "2s"`.
    pub fn etcd_raw(mut self, body: &str) -> Self {
        self.etcd = Some(body.to_string());
        self
    }

    /// `[etcd]` with just `endpoints`.
    pub fn etcd_endpoints(self, endpoints: &[String]) -> Self {
        let list = endpoints.iter().map(|e| quote(e)).collect::<Vec<_>>().join(", ");
        self.etcd_raw(&format!("endpoints = [{list}]"))
    }

    pub fn extra_toml(mut self, raw: &str) -> Self {
        self.extra_toml = Some(raw.to_string());
        self
    }

    /// "http://LISTEN"
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// "http://ADMIN_LISTEN"
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_listen)
    }

    /// The TOML text. `state_path` must be set (Fencegate sets it).
    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t.push_str("[server]\n");
        kv(&mut t, "listen", &quote(&self.listen));
        kv(&mut t, "admin_listen", &quote(&self.admin_listen));
        opt_duration(&mut t, "header_read_timeout", self.header_read_timeout);
        if let Some(n) = self.max_header_bytes {
            kv(&mut t, "max_header_bytes", &n.to_string());
        }
        opt_duration(&mut t, "shutdown_grace", self.shutdown_grace);
        if let Some(n) = self.workers {
            kv(&mut t, "workers", &n.to_string());
        }
        if let Some(pin) = self.pin_workers {
            kv(&mut t, "pin_workers", &pin.to_string());
        }

        t.push_str("\n[upstream]\n");
        kv(&mut t, "url", &quote(&self.upstream_url));
        opt_duration(&mut t, "connect_timeout", self.connect_timeout);
        opt_duration(&mut t, "request_timeout", self.request_timeout);
        opt_duration(&mut t, "body_idle_timeout", self.body_idle_timeout);
        if let Some(n) = self.pipeline_depth {
            kv(&mut t, "pipeline_depth", &n.to_string());
        }
        if let Some(on) = self.pipeline_reads {
            kv(&mut t, "pipeline_reads", &on.to_string());
        }
        if let Some(n) = self.pipeline_max_requests {
            kv(&mut t, "pipeline_max_requests", &n.to_string());
        }

        t.push_str("\n[state]\n");
        let state = self
            .state_path
            .as_ref()
            .expect("FencegateConfig::to_toml: state_path not set");
        kv(&mut t, "path", &quote(&state.to_string_lossy()));

        if self.fencing_header.is_some() || self.read_methods.is_some() {
            t.push_str("\n[fencing]\n");
            if let Some(h) = &self.fencing_header {
                kv(&mut t, "header", &quote(h));
            }
            if let Some(methods) = &self.read_methods {
                let list = methods.iter().map(|m| quote(m)).collect::<Vec<_>>();
                kv(&mut t, "read_methods", &format!("[{}]", list.join(", ")));
            }
        }

        if let Some(etcd) = &self.etcd {
            t.push_str("\n[etcd]\n");
            t.push_str(etcd.trim_end());
            t.push('\n');
        }

        for d in &self.domains {
            t.push_str("\n[[domains]]\n");
            kv(&mut t, "name", &quote(&d.name));
            kv(&mut t, "prefix", &quote(&d.prefix));
            if let Some(e) = &d.election {
                kv(&mut t, "election", &quote(e));
            }
        }

        if let Some(extra) = &self.extra_toml {
            t.push('\n');
            t.push_str(extra.trim_end());
            t.push('\n');
        }
        t
    }
}

fn kv(t: &mut String, key: &str, value: &str) {
    let _ = writeln!(t, "{key} = {value}");
}

fn opt_duration(t: &mut String, key: &str, d: Option<Duration>) {
    if let Some(d) = d {
        kv(t, key, &quote(&format_duration(d)));
    }
}

/// "2s", "500ms", "250us", "7ns": the largest unit that is exact.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        "0s".to_string()
    } else if nanos % 1_000_000_000 == 0 {
        format!("{}s", nanos / 1_000_000_000)
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{}us", nanos / 1_000)
    } else {
        format!("{nanos}ns")
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_exact_units() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
    }

    #[test]
    fn toml_parses_and_has_spec_keys() {
        let c = FencegateConfig::new("http://127.0.0.1:1")
            .state_path("/tmp/s \"q\".redb")
            .request_timeout(Duration::from_millis(500))
            .read_methods(&["GET", "HEAD"])
            .etcd_endpoints(&["http://127.0.0.1:2379".to_string()])
            .domain("a", "/a/")
            .election_domain("b", "/b/", "/b-leader");
        let v: toml::Table = c.to_toml().parse().expect("valid TOML");
        assert_eq!(v["upstream"]["request_timeout"].as_str(), Some("500ms"));
        assert_eq!(v["state"]["path"].as_str(), Some("/tmp/s \"q\".redb"));
        assert_eq!(v["domains"].as_array().unwrap().len(), 2);
        assert_eq!(v["domains"][1]["election"].as_str(), Some("/b-leader"));
        assert!(v["etcd"]["endpoints"].is_array());
    }
}
