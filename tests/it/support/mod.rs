//! Test support: real processes on free loopback ports, and HTTP helpers.
//!
//! - [`require_binary`], [`free_port`]
//! - [`Etcd`], [`EtcdCluster`]: etcd members on loopback; [`etcd::client`],
//!   [`Candidate`], [`leader_rev`]: writers campaigning in an election
//! - [`SecureEtcd`], [`Pki`], [`EtcdTable`]: etcd with TLS (client
//!   certificates) and/or user/password auth, and fencegate's `[etcd]`
//!   table for it
//! - [`Nginx`]: a WebDAV store with a token-recording access log
//! - [`FencegateConfig`], [`Domain`]: the TOML of SPEC.md's Configuration
//! - [`Fencegate`]: `fencegate init` + `fencegate run` in a temp dir
//! - [`ScriptedStore`]: an in-process store that records event order
//! - [`client`], [`raw_request`], [`RawResponse`]: HTTP clients
//! - [`Tmpfs`]: a small tmpfs to fill up (the state file's disk full)
//!
//! Every wait is bounded; nothing binds anything but 127.0.0.1.
// Not every test module uses every helper.
#![allow(dead_code, unused_imports)]

mod config;
pub mod etcd;
pub mod etcd_secure;
mod fencegate;
mod http;
mod nginx;
mod process;
mod store;
mod tmpfs;

pub use config::{format_duration, Domain, FencegateConfig};
pub use etcd::{leader_rev, Candidate, Etcd, EtcdCluster};
pub use etcd_secure::{EtcdTable, Pki, SecureEtcd};
pub use fencegate::{binary as fencegate_binary, Fencegate, RunExit};
pub use http::{
    client, http_get, parse_response, raw_request, raw_request_timeout, request_bytes, take_request_head,
    RawResponse,
};
pub use nginx::{LogEntry, Nginx};
pub use process::{require_binary, run_bounded, send_signal, wait_timeout};
pub use store::{Event, EventKind, Fault, ScriptedStore, TRICKLE_CHUNK};
pub use tmpfs::Tmpfs;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// A free TCP port on 127.0.0.1: bind port 0, take the port, close.
///
/// Ports are never handed out twice by one test process, so tests running
/// in parallel threads do not race each other for the same port.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("free_port: no new free port on 127.0.0.1 after 1000 tries");
}

/// The value of `name{domain="DOMAIN"}` in Prometheus text.
pub fn metric_value(text: &str, name: &str, domain: &str) -> Option<f64> {
    let series = format!("{name}{{domain=\"{domain}\"}}");
    let rest = text.lines().find_map(|l| l.strip_prefix(&series))?;
    rest.split_whitespace().next()?.parse().ok()
}
