//! fencegate talking to etcd over TLS (with a client certificate) and
//! with user/password auth, including re-authentication after the auth
//! token expires (SPEC.md, Coordinator: "TLS and user/password as
//! etcd-client offers; on an expired auth token, reconnect and
//! authenticate again"), and the configuration errors of `[etcd.tls]`,
//! `user` and `password_file`.
//!
//! The `harness_*` tests prove the secure etcd itself (no fencegate).

use crate::support::etcd_secure::{FENCEGATE_USER, WRITER_USER};
use crate::support::{
    client, leader_rev, send_signal, Candidate, EtcdTable, Fencegate, FencegateConfig, Nginx, RawResponse,
    SecureEtcd,
};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, TlsOptions, WatchOptions};
use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Bound on one step a test waits for (an etcd request, a campaign after
/// a revoke, fencegate becoming ready).
const STEP: Duration = Duration::from_secs(5);
/// Bound on one request through fencegate.
const REQUEST: Duration = Duration::from_secs(5);

const DOMAIN: &str = "orders";
const PREFIX: &str = "/orders/";
/// The election used everywhere here.
const ELECTION: &str = "/orders-service/leader";
/// Lease TTL of the candidates: only a revoke deposes a leader.
const LEASE_TTL: i64 = 15;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One get through `options` against `endpoints`, bounded: the error text,
/// or `None` when it succeeded.
async fn get_error(endpoints: &[String], options: ConnectOptions, key: &str) -> Option<String> {
    let options = options.with_timeout(Duration::from_secs(2));
    let attempt = async {
        let mut c = Client::connect(endpoints, Some(options)).await?;
        c.get(key, None).await
    };
    match tokio::time::timeout(STEP, attempt).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {STEP:?}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_tls_member_serves_only_verified_clients() {
    let started = Instant::now();
    let etcd = SecureEtcd::builder().tls().start();
    eprintln!(
        "TLS member (with a fresh PKI) healthy after {:?}",
        started.elapsed()
    );
    assert!(
        etcd.endpoint().starts_with("https://127.0.0.1:"),
        "{}",
        etcd.endpoint()
    );

    // etcdctl with the CA and the client certificate works.
    etcd.etcdctl_root(&["put", "/k", "v"]);
    assert_eq!(
        etcd.etcdctl_root(&["get", "--print-value-only", "/k"]).trim(),
        "v"
    );

    // etcd-client (rustls) with the CA and the client certificate works.
    let pki = etcd.pki();
    let good = ConnectOptions::new().with_tls(pki.tls_options());
    assert_eq!(get_error(&etcd.endpoints(), good, "/k").await, None);

    // Without a client certificate etcd refuses (--client-cert-auth).
    let ca_only = TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(
        std::fs::read(pki.ca_file()).unwrap(),
    ));
    let err = get_error(&etcd.endpoints(), ConnectOptions::new().with_tls(ca_only), "/k").await;
    eprintln!("no client certificate: {err:?}");
    assert!(err.is_some(), "a client without a certificate was served");

    // Trusting another CA, the client refuses etcd's certificate.
    let other = TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(
            std::fs::read(pki.other_ca_file()).unwrap(),
        ))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(pki.client_cert()).unwrap(),
            std::fs::read(pki.client_key()).unwrap(),
        ));
    let err = get_error(&etcd.endpoints(), ConnectOptions::new().with_tls(other), "/k").await;
    eprintln!("another CA: {err:?}");
    assert!(err.is_some(), "a client trusting another CA accepted etcd");

    // Plain HTTP on the TLS port gets nothing.
    let plain = format!("http://127.0.0.1:{}", etcd.endpoint().rsplit(':').next().unwrap());
    let err = get_error(&[plain], ConnectOptions::new(), "/k").await;
    assert!(err.is_some(), "plain HTTP was served on the TLS client URL");

    // Writers campaign over TLS.
    let c = etcd.writer_client().await;
    let a = Candidate::campaign(&c, ELECTION, "a", 5).await;
    assert_eq!(leader_rev(&c, ELECTION).await, Some(a.rev()));
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_auth_member_users_roles_and_token_expiry() {
    let started = Instant::now();
    let etcd = SecureEtcd::builder().auth(&[ELECTION], 1).start();
    eprintln!("auth member set up after {:?}", started.elapsed());
    let under = format!("{ELECTION}/");
    let fg = (FENCEGATE_USER, etcd.fencegate_password());

    // fencegate may read the election, nothing else, and write nothing.
    let out = etcd.etcdctl(Some(fg), &["get", "--prefix", &under]);
    assert!(
        out.status.success(),
        "fencegate reads {under}: {}",
        text(&out.stderr)
    );
    for args in [
        vec!["put", "/orders-service/leader/x", "v"],
        vec!["get", "/other"],
    ] {
        let out = etcd.etcdctl(Some(fg), &args);
        assert!(!out.status.success(), "fencegate may not {args:?}");
        assert!(
            text(&out.stderr).contains("permission denied"),
            "{}",
            text(&out.stderr)
        );
    }
    // A wrong password is refused by name.
    let out = etcd.etcdctl(Some((FENCEGATE_USER, "wrong")), &["get", "--prefix", &under]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("authentication failed"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        etcd.failed_authentications(FENCEGATE_USER) >= 1,
        "etcd logs a failed authentication"
    );

    // Writers campaign as `writer`; fencegate's user sees the leader.
    let writers = etcd.writer_client().await;
    let a = Candidate::campaign(&writers, ELECTION, "a", 5).await;
    let reader = etcd.fencegate_client().await;
    assert_eq!(leader_rev(&reader, ELECTION).await, Some(a.rev()));

    // A plain client (no automatic refresh) and a watch, both as fencegate.
    let no_refresh = etcd
        .connect_options(None)
        .with_user(FENCEGATE_USER, etcd.fencegate_password());
    let mut plain = Client::connect(etcd.endpoints(), Some(no_refresh))
        .await
        .expect("connect");
    plain
        .get(under.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let mut stream = plain
        .watch(under.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");

    // A waiting candidate keeps waiting past the token TTL.
    let w2 = writers.clone();
    let waiting = tokio::spawn(async move { Candidate::campaign(&w2, ELECTION, "b", 5).await });

    // Idle for 3 TTLs: the tokens expire.
    let deleted_before = etcd.deleted_tokens(FENCEGATE_USER);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deleted = etcd.deleted_tokens(FENCEGATE_USER);
    eprintln!("fencegate tokens deleted: {deleted_before} before the idle time, {deleted} after");
    assert!(
        deleted > deleted_before,
        "no fencegate token expired in 3 s with a 1 s TTL"
    );
    let err = plain
        .get(under.as_str(), Some(GetOptions::new().with_prefix()))
        .await;
    let err = err.expect_err("a get with an expired token and no refresh must fail");
    eprintln!("get with an expired token: {err}");
    assert!(err.to_string().contains("invalid auth token"), "{err}");
    // With automatic refresh, the same get succeeds (re-authenticates).
    assert_eq!(leader_rev(&reader, ELECTION).await, Some(a.rev()));

    // The watch made before the expiry: does it still deliver events?
    let a_rev = a.rev();
    a.revoke().await;
    let b = tokio::time::timeout(STEP, waiting)
        .await
        .expect("b leads within 5 s of a's revoke")
        .expect("campaign task");
    assert!(b.rev() > a_rev);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && seen.len() < 2 {
        match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            Ok(Ok(Some(resp))) => {
                if resp.canceled() {
                    seen.push(format!("canceled: {}", resp.cancel_reason()));
                    break;
                }
                for e in resp.events() {
                    let kind = if e.event_type() == EventType::Put {
                        "put"
                    } else {
                        "delete"
                    };
                    seen.push(kind.to_string());
                }
            }
            Ok(Ok(None)) => {
                seen.push("stream ended".to_string());
                break;
            }
            Ok(Err(e)) => {
                seen.push(format!("error: {e}"));
                break;
            }
            Err(_) => {}
        }
    }
    eprintln!("watch created before the token expired, after it: {seen:?}");
    // etcd 3.4 checks a watch's token when the watch is created only: one
    // made before the expiry keeps delivering.
    assert!(seen.contains(&"delete".to_string()), "{seen:?}");

    // A watch created on an expired token: the call succeeds, and the
    // stream's first message is "created" and "canceled" at once, with
    // the reason in the message (no gRPC error that a client library's
    // automatic refresh would catch): a watcher must authenticate again
    // itself, e.g. by a get through a refreshing client first.
    let mut late = plain
        .watch(under.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .expect("a watch call with an expired token still returns a stream");
    let first = tokio::time::timeout(STEP, late.message())
        .await
        .expect("first watch message within 5 s")
        .expect("watch message")
        .expect("a message, not the end");
    eprintln!(
        "new watch with an expired token: created={} canceled={} reason={:?}",
        first.created(),
        first.canceled(),
        first.cancel_reason()
    );
    assert!(first.canceled(), "{first:?}");
    assert!(first.cancel_reason().contains("invalid auth token"), "{first:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_tls_and_auth_restart_keeps_only_unpersisted_tokens() {
    let mut etcd = SecureEtcd::builder().tls().auth(&[ELECTION], 30).start();
    let under = format!("{ELECTION}/");
    let no_refresh = etcd
        .connect_options(None)
        .with_user(FENCEGATE_USER, etcd.fencegate_password());
    // X authenticates, then a write is applied (and persisted with its
    // raft index), then Y authenticates.
    let mut x = Client::connect(etcd.endpoints(), Some(no_refresh.clone()))
        .await
        .expect("connect x");
    x.get(under.as_str(), None).await.expect("x before the restart");
    let mut root = etcd.root_client().await;
    root.put("/written", "after x", None).await.expect("put");
    tokio::time::sleep(Duration::from_millis(300)).await; // the backend commits every 100 ms
    let mut y = Client::connect(etcd.endpoints(), Some(no_refresh))
        .await
        .expect("connect y");
    y.get(under.as_str(), None).await.expect("y before the restart");

    let started = Instant::now();
    etcd.restart();
    eprintln!(
        "TLS+auth member healthy again {:?} after restart",
        started.elapsed()
    );

    // A simple token is assigned when its Authenticate raft entry is
    // applied, in memory only. At start etcd re-applies the entries after
    // the last index its backend persisted (with the last write): Y's
    // token comes back (with a fresh TTL), X's does not.
    let answer = |r: Result<etcd_client::GetResponse, etcd_client::Error>| match r {
        Ok(_) => "accepted".to_string(),
        Err(e) => e.to_string(),
    };
    let deadline = Instant::now() + STEP;
    let y_after = loop {
        match tokio::time::timeout(Duration::from_secs(1), y.get(under.as_str(), None)).await {
            Ok(r) => break answer(r),
            Err(_) => assert!(Instant::now() < deadline, "no answer after the restart"),
        }
    };
    let x_after = answer(x.get(under.as_str(), None).await);
    eprintln!("after the restart: token X (before the write): {x_after}; token Y (after it): {y_after}");
    assert_eq!(y_after, "accepted");
    assert!(x_after.contains("invalid auth token"), "{x_after}");

    // A refreshing client authenticates again by itself; users are kept.
    let reader = etcd.fencegate_client().await;
    assert_eq!(leader_rev(&reader, ELECTION).await, None);
    let users = etcd.etcdctl_root(&["user", "list"]);
    assert!(
        users.contains(FENCEGATE_USER) && users.contains(WRITER_USER),
        "{users}"
    );
}

// ---------------------------------------------------------------------
// fencegate in front of nginx, configured for the secure etcd
// ---------------------------------------------------------------------

/// One election domain `orders` in front of `nginx` with `table` as its
/// `[etcd]`.
fn config(nginx: &Nginx, table: &EtcdTable) -> FencegateConfig {
    FencegateConfig::new(&nginx.url())
        .etcd_raw(&table.render())
        .election_domain(DOMAIN, PREFIX, ELECTION)
}

/// Async access to one running fencegate: data path and admin listener.
struct Proxy {
    http: reqwest::Client,
    url: String,
    admin: String,
}

impl Proxy {
    fn new(fg: &Fencegate) -> Proxy {
        Proxy {
            http: client(),
            url: fg.url(),
            admin: fg.admin_url(),
        }
    }

    async fn put(&self, path: &str, token: i64) -> RawResponse {
        let url = format!("{}{path}", self.url);
        let r = self
            .http
            .put(&url)
            .header("Fencing-Token", token.to_string())
            .body(format!("written with token {token}"))
            .timeout(REQUEST)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {url} (token {token}): {e}"));
        answer(r).await
    }

    async fn admin_get(&self, path: &str) -> RawResponse {
        let url = format!("{}{path}", self.admin);
        let r = self
            .http
            .get(&url)
            .timeout(REQUEST)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        answer(r).await
    }

    async fn readyz(&self) -> u16 {
        self.admin_get("/readyz").await.status
    }

    /// The `orders` object of the admin `/domains`.
    async fn domain(&self) -> Value {
        let resp = self.admin_get("/domains").await;
        assert_eq!(resp.status, 200, "/domains: {resp:?}");
        let list: Value = serde_json::from_str(&resp.body)
            .unwrap_or_else(|e| panic!("/domains is not JSON ({e}): {}", resp.body));
        let found = list
            .as_array()
            .and_then(|l| l.iter().find(|d| d["name"] == DOMAIN));
        found
            .cloned()
            .unwrap_or_else(|| panic!("no domain {DOMAIN} in /domains: {list}"))
    }

    /// Poll `GET /readyz` until 200, ≤ `timeout`; how long it took.
    async fn wait_ready(&self, timeout: Duration, fg: &Fencegate) -> Duration {
        let started = Instant::now();
        loop {
            if self.readyz().await == 200 {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "/readyz not 200 within {timeout:?}; /domains: {}\n--- fencegate stderr ---\n{}",
                self.domain().await,
                fg.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn answer(r: reqwest::Response) -> RawResponse {
    let headers = r.headers().iter();
    let headers = headers.map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()));
    RawResponse {
        status: r.status().as_u16(),
        headers: headers.collect(),
        body: r.text().await.expect("read response body"),
        interim: Vec::new(),
    }
}

#[track_caller]
fn assert_admitted(r: &RawResponse, what: &str) {
    assert!(
        matches!(r.status, 201 | 204) && r.header("fencegate-reason").is_none(),
        "{what}: expected the store's 201/204, got {r:?}"
    );
}

#[track_caller]
fn assert_fenced(r: &RawResponse, what: &str) {
    let reason = r.header("fencegate-reason").unwrap_or("");
    assert!(
        r.status == 412 && matches!(reason, "stale_epoch" | "superseded_leader"),
        "{what}: expected 412 stale_epoch or superseded_leader, got {r:?}"
    );
}

#[track_caller]
fn assert_unavailable(r: &RawResponse, what: &str) {
    assert!(
        r.status == 503
            && r.header("fencegate-reason") == Some("coordinator_unavailable")
            && r.header("retry-after").is_some(),
        "{what}: expected 503 coordinator_unavailable with Retry-After, got {r:?}"
    );
}

fn as_i64(v: &Value, field: &str) -> Option<i64> {
    v.get(field).and_then(Value::as_i64)
}

fn spawn_campaign(c: &Client, value: &str) -> JoinHandle<Candidate> {
    let c = c.clone();
    let value = value.to_string();
    tokio::spawn(async move { Candidate::campaign(&c, ELECTION, &value, LEASE_TTL).await })
}

/// The waiting candidate, once it leads (≤ 5 s).
async fn leads(waiting: JoinHandle<Candidate>) -> Candidate {
    tokio::time::timeout(STEP, waiting)
        .await
        .expect("the waiting candidate leads within 5 s")
        .expect("campaign task")
}

/// For `window`: every write with `token` is 503 coordinator_unavailable,
/// `/readyz` is 503, and `/domains` shows no leader: fencegate never got
/// a view. Returns how many writes were tried.
async fn assert_never_a_view(p: &Proxy, token: i64, window: Duration, what: &str) -> usize {
    let started = Instant::now();
    let mut writes = 0;
    while started.elapsed() < window {
        writes += 1;
        assert_unavailable(&p.put("/orders/x", token).await, what);
        assert_eq!(p.readyz().await, 503, "{what}: /readyz");
        let d = p.domain().await;
        assert!(
            d["leader_revision"].is_null(),
            "{what}: a leader in /domains: {d}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writes
}

/// The lines of fencegate's stderr that mention etcd, TLS or auth (for
/// the report), at most `n`.
fn etcd_lines(fg: &Fencegate, n: usize) -> String {
    let text = fg.stderr_text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            ["etcd", "tls", "certificate", "auth", "coordinator"]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    lines[..lines.len().min(n)].join("\n")
}

// ---------------------------------------------------------------------
// TLS with a client certificate
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_client_certificate_admits_the_leader_and_refuses_the_superseded() {
    let etcd = SecureEtcd::builder().tls().start();
    let nginx = Nginx::start();
    let writers = etcd.writer_client().await;
    let a = Candidate::campaign(&writers, ELECTION, "a", LEASE_TTL).await;

    let table = etcd.etcd_table().with("max_staleness = \"2s\"");
    let fg = Fencegate::start(config(&nginx, &table));
    let p = Proxy::new(&fg);
    let ready = p.wait_ready(STEP, &fg).await;
    eprintln!("TLS: ready {ready:?} after healthy");
    assert_admitted(&p.put("/orders/a", a.rev()).await, "leader a over TLS");

    let waiting = spawn_campaign(&writers, "b");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a_rev = a.rev();
    a.revoke().await;
    let b = leads(waiting).await;
    assert_admitted(&p.put("/orders/b", b.rev()).await, "new leader b over TLS");
    assert_fenced(&p.put("/orders/a", a_rev).await, "superseded leader a");
    assert_eq!(p.readyz().await, 200, "/readyz over TLS");
    let d = p.domain().await;
    assert_eq!(as_i64(&d, "leader_revision"), Some(b.rev()), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_wrong_ca_wrong_name_or_no_client_certificate_never_give_a_view() {
    let etcd = SecureEtcd::builder().tls().start();
    let nginx = Nginx::start();
    let writers = etcd.writer_client().await;
    let a = Candidate::campaign(&writers, ELECTION, "a", LEASE_TTL).await;
    let good = etcd.etcd_table().with("max_staleness = \"1s\"");
    let window = Duration::from_millis(2500);

    let mut wrong_ca = good.clone();
    wrong_ca.ca_file = Some(etcd.pki().other_ca_file());
    let mut wrong_name = good.clone();
    wrong_name.server_name = Some("not-etcd.invalid".to_string());
    let mut no_cert = good.clone();
    no_cert.cert_file = None;
    no_cert.key_file = None;

    let mut fg = Fencegate::init_only(config(&nginx, &good));
    for (what, table) in [
        ("a CA that did not sign etcd's certificate", &wrong_ca),
        ("server_name not in etcd's certificate", &wrong_name),
        ("no client certificate (etcd has --client-cert-auth)", &no_cert),
    ] {
        fg.rewrite_config(config(&nginx, table));
        let before = fg.stderr_text().len();
        fg.start_again();
        let p = Proxy::new(&fg);
        let writes = assert_never_a_view(&p, a.rev(), window, what).await;
        let log = fg.stderr_text()[before..].to_string();
        eprintln!("--- {what}: {writes} writes, all 503; fencegate logged:");
        for line in log.lines().filter(|l| l.contains("etcd")).take(3) {
            eprintln!("    {line}");
        }
        // A clean stop: a crashed run's first raise would wait 30 s.
        assert!(fg.terminate().success(), "SIGTERM: {}", fg.stderr_text());
    }

    // The same etcd, state and leader with the right TLS options (and a
    // server_name that is in the certificate): admitted.
    let mut right = good.clone();
    right.server_name = Some("localhost".to_string());
    fg.rewrite_config(config(&nginx, &right));
    fg.start_again();
    let p = Proxy::new(&fg);
    p.wait_ready(STEP, &fg).await;
    assert_admitted(
        &p.put("/orders/a", a.rev()).await,
        "control: the right CA and certificate",
    );
}

// ---------------------------------------------------------------------
// user and password
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn auth_with_the_right_password_admits_the_leader() {
    let etcd = SecureEtcd::builder().auth(&[ELECTION], 300).start();
    let nginx = Nginx::start();
    let writers = etcd.writer_client().await;
    let a = Candidate::campaign(&writers, ELECTION, "a", LEASE_TTL).await;

    // The password file ends with a newline, which is not the password.
    let table = etcd.etcd_table().with("max_staleness = \"2s\"");
    let fg = Fencegate::start(config(&nginx, &table));
    let p = Proxy::new(&fg);
    p.wait_ready(STEP, &fg).await;
    assert_admitted(&p.put("/orders/a", a.rev()).await, "leader a with auth");

    let waiting = spawn_campaign(&writers, "b");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a_rev = a.rev();
    a.revoke().await;
    let b = leads(waiting).await;
    assert_admitted(&p.put("/orders/b", b.rev()).await, "new leader b with auth");
    assert_fenced(&p.put("/orders/a", a_rev).await, "superseded leader a with auth");
    assert_eq!(p.readyz().await, 200);
    assert_eq!(
        etcd.failed_authentications(FENCEGATE_USER),
        0,
        "fencegate failed to authenticate"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_with_a_wrong_password_is_unavailable_and_says_authentication_failed() {
    let etcd = SecureEtcd::builder().auth(&[ELECTION], 300).start();
    let nginx = Nginx::start();
    let writers = etcd.writer_client().await;
    let a = Candidate::campaign(&writers, ELECTION, "a", LEASE_TTL).await;

    let mut wrong = etcd.etcd_table().with("max_staleness = \"1s\"");
    wrong.password_file = Some(etcd.password_file("wrong.password", "not-the-password"));
    let mut fg = Fencegate::start(config(&nginx, &wrong));
    let p = Proxy::new(&fg);
    let writes = assert_never_a_view(&p, a.rev(), Duration::from_millis(2500), "wrong password").await;

    let stderr = fg.stderr_text();
    eprintln!(
        "--- wrong password: {writes} writes, all 503; fencegate logged:\n{}",
        etcd_lines(&fg, 8)
    );
    assert!(
        stderr.to_lowercase().contains("authentication failed"),
        "fencegate's log does not say authentication failed:\n{stderr}"
    );
    let attempts = etcd.failed_authentications(FENCEGATE_USER);
    eprintln!("etcd logged {attempts} failed authentications of {FENCEGATE_USER} in ~2.5 s");
    assert!(attempts >= 1, "etcd saw no authentication attempt");

    // Control: the same fencegate and state with the right password file
    // (stopped cleanly: a crashed run's first raise would wait 30 s).
    assert!(fg.terminate().success(), "SIGTERM: {}", fg.stderr_text());
    fg.rewrite_config(config(&nginx, &etcd.etcd_table().with("max_staleness = \"1s\"")));
    fg.start_again();
    let p = Proxy::new(&fg);
    p.wait_ready(STEP, &fg).await;
    assert_admitted(&p.put("/orders/a", a.rev()).await, "control: the right password");
}

// ---------------------------------------------------------------------
// Auth token expiry
// ---------------------------------------------------------------------

/// Token TTL of the expiry test's etcd: expired 1–2 s after last use.
const SHORT_TOKEN_TTL: u32 = 1;
/// fencegate reads the election at least every 3 s then: each periodic
/// read finds its token expired.
const EXPIRY_MAX_STALENESS: &str = "9s";

/// Depose `old` (revoke its lease) so that `waiting` leads, at a moment
/// when the last read of the election started 0.3–0.8 s ago, and wait
/// until `/domains` shows the epoch raised to the new leader's revision
/// (fence ahead). fencegate's periodic reads come every `read_period`
/// (as measured), so the next one is due no sooner than `read_period` −
/// 0.8 s after the revoke: a raise well before that was delivered by the
/// watch (directly, or by a read the watch event started), not by the
/// periodic read. Returns the new leader and the time to the raise.
async fn failover_seen_by_the_watch(
    p: &Proxy,
    old: Candidate,
    waiting: JoinHandle<Candidate>,
    read_period: f64,
    what: &str,
) -> (Candidate, Duration) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let age_at_revoke = loop {
        let age = p.domain().await["view_age_seconds"].as_f64().unwrap_or(-1.0);
        if (0.3..0.8).contains(&age) {
            break age;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: view age never in 0.3..0.8 s (last {age})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The raise must come this long after the revoke at the latest.
    let bound = read_period - age_at_revoke - 0.4;
    assert!(
        bound >= 0.5,
        "{what}: fencegate reads the election every {read_period:.2} s: too often to tell the watch \
         from a periodic read"
    );
    let revoked = Instant::now();
    old.revoke().await;
    let new = leads(waiting).await;
    loop {
        let d = p.domain().await;
        if as_i64(&d, "epoch") == Some(new.rev()) {
            let took = revoked.elapsed();
            let age = d["view_age_seconds"].as_f64().unwrap_or(-1.0);
            eprintln!(
                "{what}: epoch raised to {} {took:?} after the revoke (the next periodic read was \
                 due ≥ {:.2} s after it); view age then {age:.3} s",
                new.rev(),
                read_period - age_at_revoke
            );
            return (new, took);
        }
        assert!(
            revoked.elapsed().as_secs_f64() < bound,
            "{what}: epoch not raised to {} within {bound:.2} s of the revoke, before the next \
             periodic read: the watch did not deliver the new leader: {d}",
            new.rev()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes by `leader` every 250 ms for `span`, each admitted, while
/// `/domains` is sampled: returns the largest view age seen (about the
/// period of fencegate's reads of the election).
async fn keep_writing(p: &Proxy, leader: &Candidate, span: Duration, what: &str) -> f64 {
    let started = Instant::now();
    let mut max_age: f64 = 0.0;
    let mut n = 0;
    while started.elapsed() < span {
        n += 1;
        assert_admitted(
            &p.put(&format!("/orders/w{n}"), leader.rev()).await,
            &format!("{what}: write {n}"),
        );
        let age = p.domain().await["view_age_seconds"].as_f64().unwrap_or(f64::MAX);
        max_age = max_age.max(age);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    max_age
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_auth_tokens_are_renewed_for_reads_and_the_watch() {
    let mut etcd = SecureEtcd::builder()
        .tls()
        .auth(&[ELECTION], SHORT_TOKEN_TTL)
        .start();
    let nginx = Nginx::start();
    let writers = etcd.writer_client().await;
    let a = Candidate::campaign(&writers, ELECTION, "a", LEASE_TTL).await;
    // b waits through the whole idle span, its own token expiring too.
    let waiting_b = spawn_campaign(&writers, "b");

    let table = etcd
        .etcd_table()
        .with(&format!("max_staleness = \"{EXPIRY_MAX_STALENESS}\""));
    let mut fg = Fencegate::start(config(&nginx, &table));
    let p = Proxy::new(&fg);
    p.wait_ready(STEP, &fg).await;

    // 1. Seven token TTLs and more: a leader writing (the hot path does not
    //    touch etcd), fencegate's periodic reads finding their token expired.
    let deleted_before = etcd.deleted_tokens(FENCEGATE_USER);
    let max_age = keep_writing(&p, &a, Duration::from_secs(7), "steady leader a").await;
    let deleted = etcd.deleted_tokens(FENCEGATE_USER) - deleted_before;
    eprintln!("7 s of writes: {deleted} fencegate tokens expired in etcd; largest view age {max_age:.3} s");
    assert!(
        deleted >= 2,
        "fencegate's token expired only {deleted} times in 7 s (TTL 1 s)"
    );
    assert!(
        max_age < 4.0,
        "reads of the election stopped succeeding after the token expired (view age {max_age} s)\n\
         --- fencegate ---\n{}",
        etcd_lines(&fg, 20)
    );
    assert_eq!(p.readyz().await, 200);

    // 2. A failover after the expiry: the watch made with the first
    //    (long expired) token still delivers it.
    let a_rev = a.rev();
    let (b, took) = failover_seen_by_the_watch(&p, a, waiting_b, max_age, "failover after expiry").await;
    assert_fenced(
        &p.put("/orders/a", a_rev).await,
        "deposed a after the token expiry",
    );
    assert_admitted(
        &p.put("/orders/b", b.rev()).await,
        "new leader b after the token expiry",
    );
    eprintln!("failover after token expiry: fenced ahead in {took:?}");

    // 3. A reconnect with an expired token: fencegate is stopped (SIGSTOP)
    //    while etcd restarts (breaking every stream) and until no token
    //    issued before the restart can be valid (see
    //    harness_tls_and_auth_restart_keeps_only_unpersisted_tokens). On
    //    SIGCONT it must authenticate again for its read and watch again
    //    with the new token.
    let pid = i64::from(fg.pid().expect("fencegate runs"));
    send_signal(pid, "STOP");
    let stopped = Instant::now();
    etcd.restart();
    // Tokens replayed from the WAL get a fresh TTL at the restart: after
    // 2 TTLs plus the keeper's 1 s tick none is left.
    tokio::time::sleep(Duration::from_secs(2 * u64::from(SHORT_TOKEN_TTL) + 1)).await;
    send_signal(pid, "CONT");
    eprintln!(
        "fencegate stopped for {:?} across the etcd restart",
        stopped.elapsed()
    );
    let resumed = Instant::now();
    // Writes by b are admitted again once fencegate reads again (at once,
    // or after a 503 while the view is stale).
    loop {
        let r = p.put("/orders/b", b.rev()).await;
        if matches!(r.status, 201 | 204) {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(12),
            "no write of leader b admitted within 12 s of resuming: {r:?}\n--- fencegate ---\n{}",
            etcd_lines(&fg, 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.wait_ready(Duration::from_secs(12), &fg).await;
    eprintln!(
        "after the etcd restart: admitted and ready {:?} after resuming",
        resumed.elapsed()
    );

    let waiting_c = spawn_campaign(&writers, "c");
    let b_rev = b.rev();
    let (c, took) =
        failover_seen_by_the_watch(&p, b, waiting_c, max_age, "failover after the reconnect").await;
    assert_fenced(&p.put("/orders/b", b_rev).await, "deposed b after the reconnect");
    assert_admitted(
        &p.put("/orders/c", c.rev()).await,
        "new leader c after the reconnect",
    );
    eprintln!("failover after the reconnect with an expired token: fenced ahead in {took:?}");
    let failed = etcd.failed_authentications(FENCEGATE_USER);
    assert_eq!(failed, 0, "fencegate's password was refused {failed} times");
    fg.kill9();
}

// ---------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------

fn output_text(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// `check-config` on `table` as `[etcd]` (nginx is never contacted).
fn check(table: &EtcdTable) -> (Fencegate, Output) {
    let fg = Fencegate::prepare(config_for_check(table));
    let out = fg.run_cli(&["check-config"]);
    (fg, out)
}

fn config_for_check(table: &EtcdTable) -> FencegateConfig {
    FencegateConfig::new("http://127.0.0.1:9")
        .etcd_raw(&table.render())
        .election_domain(DOMAIN, PREFIX, ELECTION)
}

#[test]
fn check_config_names_the_key_of_each_etcd_security_error() {
    // Certificates and password files that exist; no etcd runs.
    let pki = crate::support::Pki::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let password_file = dir.path().join("fencegate.password");
    std::fs::write(&password_file, "pw\n").unwrap();
    let valid = EtcdTable {
        endpoints: vec!["https://127.0.0.1:2379".to_string()],
        user: Some("fencegate".to_string()),
        password_file: Some(password_file.clone()),
        tls: true,
        ca_file: Some(pki.ca_file()),
        cert_file: Some(pki.client_cert()),
        key_file: Some(pki.client_key()),
        ..EtcdTable::default()
    };
    let (_fg, out) = check(&valid);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the valid config: {}",
        output_text(&out)
    );

    let missing_ca = dir.path().join("no-such-ca.pem");
    let missing_password = dir.path().join("no-such.password");
    let empty_password = dir.path().join("empty.password");
    std::fs::write(&empty_password, "\n").unwrap();
    let endpoints_of = |url: &str| vec![url.to_string()];
    let cases: Vec<(&str, EtcdTable, Vec<String>)> = vec![
        (
            "https endpoint without [etcd.tls]",
            EtcdTable {
                tls: false,
                ..valid.clone()
            },
            vec!["etcd.endpoints".into(), "[etcd.tls]".into()],
        ),
        (
            "cert_file without key_file",
            EtcdTable {
                key_file: None,
                ..valid.clone()
            },
            vec!["etcd.tls.key_file".into()],
        ),
        (
            "key_file without cert_file",
            EtcdTable {
                cert_file: None,
                ..valid.clone()
            },
            vec!["etcd.tls.cert_file".into()],
        ),
        (
            "user without password_file",
            EtcdTable {
                password_file: None,
                ..valid.clone()
            },
            vec!["etcd.password_file".into()],
        ),
        (
            "password_file without user",
            EtcdTable {
                user: None,
                ..valid.clone()
            },
            vec!["etcd.user".into()],
        ),
        (
            "http endpoint with [etcd.tls]",
            EtcdTable {
                endpoints: endpoints_of("http://127.0.0.1:2379"),
                ..valid.clone()
            },
            vec!["etcd.endpoints".into()],
        ),
        // Files that are not there are found by check-config already, not
        // at the first connection: a file that is missing at start will
        // not appear by retrying.
        (
            "a ca_file that does not exist",
            EtcdTable {
                ca_file: Some(missing_ca.clone()),
                ..valid.clone()
            },
            vec![
                "etcd.tls.ca_file".into(),
                missing_ca.to_string_lossy().into_owned(),
            ],
        ),
        (
            "a password_file that does not exist",
            EtcdTable {
                password_file: Some(missing_password.clone()),
                ..valid.clone()
            },
            vec![
                "etcd.password_file".into(),
                missing_password.to_string_lossy().into_owned(),
            ],
        ),
        // Files that exist but cannot work: found at start too, not left to
        // become a bare "transport error" on every connection attempt.
        (
            "a key_file that does not fit cert_file",
            EtcdTable {
                key_file: Some(pki.server_key()),
                ..valid.clone()
            },
            vec!["etcd.tls.key_file".into(), "does not fit".into()],
        ),
        (
            "a ca_file that holds no certificate",
            EtcdTable {
                ca_file: Some(password_file.clone()),
                ..valid.clone()
            },
            vec!["etcd.tls.ca_file".into()],
        ),
        (
            "an empty server_name",
            EtcdTable {
                server_name: Some(String::new()),
                ..valid.clone()
            },
            vec!["etcd.tls.server_name".into()],
        ),
        (
            "an empty password file",
            EtcdTable {
                password_file: Some(empty_password.clone()),
                ..valid.clone()
            },
            vec!["etcd.password_file".into(), "empty".into()],
        ),
    ];
    for (what, table, needles) in cases {
        let (_fg, out) = check(&table);
        let stderr = text(&out.stderr);
        eprintln!(
            "check-config, {what}: exit {:?}: {}",
            out.status.code(),
            stderr.trim()
        );
        assert_eq!(out.status.code(), Some(64), "{what}: {}", output_text(&out));
        for needle in &needles {
            assert!(
                stderr.contains(needle.as_str()),
                "{what}: the error does not name `{needle}`:\n{stderr}"
            );
        }
    }

    // `run` refuses the same file the same way (exit 64), before serving.
    let table = EtcdTable {
        ca_file: Some(missing_ca.clone()),
        ..valid.clone()
    };
    let run = Fencegate::spawn_run_expect_exit(config_for_check(&table));
    eprintln!(
        "run, missing ca_file: exit {:?}: {}",
        run.code(),
        run.stderr.trim()
    );
    assert_eq!(run.code(), Some(64), "run with a missing ca_file: {}", run.stderr);
    assert!(run.stderr.contains("etcd.tls.ca_file"), "{}", run.stderr);
}
