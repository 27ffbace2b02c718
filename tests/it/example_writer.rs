//! Proves `examples/leader_writer.rs`, the reference writer, against the
//! real thing: etcd, fencegate with an election domain, and nginx as the
//! store. A writer that campaigns, writes with its leader revision as
//! token and exits 0; and the failover story: a leader that stalls past its
//! lease is replaced, and when it wakes up its next write is refused (412,
//! exit 2) with nothing of it reaching the store after the new leader's
//! first write.
//!
//! The example's binary is built by `cargo build --examples` (and by a
//! plain `cargo test`, which builds examples too); the test finds it beside
//! its own binary and fails with that hint when it is missing.

use crate::support::{leader_rev, Etcd, Fencegate, FencegateConfig, LogEntry, Nginx};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const ELECTION: &str = "/orders-service/leader";
/// Bound on a writer's start, campaign and first write.
const STEP: Duration = Duration::from_secs(15);

/// `target/<profile>/examples/leader_writer`, found from this test binary
/// (`target/<profile>/deps/it-HASH`), so `CARGO_TARGET_DIR` is honoured.
pub(crate) fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()));
    let path = profile_dir.join("examples").join("leader_writer");
    assert!(
        path.is_file(),
        "the example binary {} is missing: run `cargo build --examples` first \
         (scripts/test does; `cargo test --all-targets` builds examples only as test harnesses)",
        path.display()
    );
    path
}

/// A running `leader_writer` with its stdout lines collected as they come.
/// Dropping it SIGKILLs it.
struct Writer {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Writer {
    /// `leader_writer --name NAME --etcd ETCD --election ELECTION --proxy
    /// PROXY ARGS...`.
    fn spawn(name: &str, etcd: &Etcd, proxy: &str, args: &[&str]) -> Writer {
        let binary = example_binary();
        let mut child = Command::new(&binary)
            .args(["--name", name, "--etcd", &etcd.endpoint(), "--election", ELECTION])
            .args(["--proxy", proxy])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = BufReader::new(child.stdout.take().expect("stdout piped"));
        let mut err = child.stderr.take().expect("stderr piped");
        let readers = vec![
            std::thread::spawn({
                let lines = lines.clone();
                move || {
                    for line in out.lines().map_while(Result::ok) {
                        lines.lock().unwrap().push((Instant::now(), line));
                    }
                }
            }),
            std::thread::spawn({
                let stderr = stderr.clone();
                move || {
                    let mut text = String::new();
                    let _ = err.read_to_string(&mut text);
                    stderr.lock().unwrap().push_str(&text);
                }
            }),
        ];
        Writer {
            name: name.to_string(),
            child,
            lines,
            stderr,
            readers,
        }
    }

    /// Every stdout line so far.
    fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Stdout and stderr so far, for failure messages.
    fn transcript(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.lines().join("\n"),
            self.name,
            self.stderr.lock().unwrap()
        )
    }

    /// The first line starting with `NAME: ` + `prefix`, and when it came;
    /// panics after `timeout`.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> (Instant, String) {
        let wanted = format!("{}: {prefix}", self.name);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.starts_with(&wanted))
            {
                return found.clone();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("no line {wanted:?} within {timeout:?}\n{}", self.transcript());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for the exit (panics after `timeout`); the exit code.
    fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} still ran after {timeout:?}\n{}", self.name, self.transcript());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The pipes close with the process: collect the last lines.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status.code().unwrap_or_else(|| {
            panic!(
                "{} killed by a signal: {status}\n{}",
                self.name,
                self.transcript()
            )
        })
    }

    /// The token from `NAME: elected token=T`.
    fn token(&mut self) -> i64 {
        let (_, line) = self.wait_line("elected token=", STEP);
        let token = line.rsplit('=').next().unwrap_or_default();
        token.parse().unwrap_or_else(|_| panic!("bad token in {line:?}"))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// etcd, nginx, and fencegate guarding `/orders/` with the election.
fn start_stack() -> (Etcd, Nginx, Fencegate) {
    // Fail before starting anything when the example is not built.
    example_binary();
    let etcd = Etcd::start();
    let nginx = Nginx::start();
    let config = FencegateConfig::new(&nginx.url())
        .etcd_endpoints(&etcd.endpoints())
        .election_domain("orders", "/orders/", ELECTION);
    let fg = Fencegate::start(config);
    (etcd, nginx, fg)
}

/// The store's PUTs under `/orders/`, in completion order, once its log
/// holds at least `at_least` lines.
fn store_writes(nginx: &Nginx, at_least: usize) -> Vec<LogEntry> {
    nginx
        .log_entries_at_least(at_least)
        .into_iter()
        .filter(|e| e.method == "PUT" && e.uri.starts_with("/orders/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn writer_campaigns_writes_and_resigns() {
    let (etcd, nginx, fg) = start_stack();
    let mut a = Writer::spawn("A", &etcd, &fg.url(), &["--writes", "3", "--interval", "50ms"]);
    let token = a.token();
    let code = a.wait_exit(STEP);
    let lines = a.lines();
    assert_eq!(code, 0, "A must exit 0 after its writes\n{}", a.transcript());

    for i in 1..=3 {
        let line = format!("A: write /orders/A-{i} token={token} -> 201");
        assert!(lines.contains(&line), "missing {line:?}\n{}", a.transcript());
    }
    assert!(lines.iter().any(|l| l == "A: resigned"), "{}", a.transcript());
    assert!(
        lines.iter().any(|l| l == "A: lease revoked"),
        "{}",
        a.transcript()
    );

    let writes: Vec<_> = store_writes(&nginx, 3)
        .into_iter()
        .map(|e| (e.uri, e.token, e.status))
        .collect();
    let want: Vec<_> = (1..=3)
        .map(|i| (format!("/orders/A-{i}"), Some(token.to_string()), 201))
        .collect();
    assert_eq!(writes, want, "the store's record of A's writes");

    // Resigning gave up the leadership at once: nobody leads now.
    let etcd_client = crate::support::etcd::client(&etcd.endpoints()).await;
    assert_eq!(
        leader_rev(&etcd_client, ELECTION).await,
        None,
        "A's key is left in etcd"
    );
}

/// A stalls past its lease (2 s) while leading; B wins and writes; A wakes
/// and is fenced on its very next write.
#[tokio::test(flavor = "multi_thread")]
async fn paused_leader_is_fenced_after_failover() {
    const TTL_SECS: u64 = 2;
    let pause_ms = TTL_SECS * 1000 + 3000;
    let (etcd, nginx, fg) = start_stack();

    let mut a = Writer::spawn(
        "A",
        &etcd,
        &fg.url(),
        &[
            "--writes",
            "0",
            "--ttl",
            &TTL_SECS.to_string(),
            "--interval",
            "100ms",
            "--pause-after",
            "2",
            "--pause-ms",
            &pause_ms.to_string(),
        ],
    );
    let a_token = a.token();
    let (paused_at, _) = a.wait_line("pausing", STEP);

    // B campaigns while A's key still exists, and wins once A's lease runs
    // out (A's keep-alive stopped with the pause).
    let mut b = Writer::spawn("B", &etcd, &fg.url(), &["--writes", "2"]);
    let b_token = b.token();
    let (b_elected_at, _) = b.wait_line("elected", STEP);
    let b_code = b.wait_exit(STEP);
    let (b_last_write_at, _) = b.wait_line("write /orders/B-2", Duration::ZERO);
    assert_eq!(b_code, 0, "B must exit 0 after its 2 writes\n{}", b.transcript());
    assert!(
        b_token > a_token,
        "B's token {b_token} must be above A's {a_token}"
    );
    let b_lines = b.lines();
    for i in 1..=2 {
        let line = format!("B: write /orders/B-{i} token={b_token} -> 201");
        assert!(b_lines.contains(&line), "missing {line:?}\n{}", b.transcript());
    }
    assert!(
        a.lines().iter().all(|l| !l.starts_with("A: resumed")),
        "A resumed before B finished: the pause is too short for this machine\n{}\n{}",
        a.transcript(),
        b.transcript()
    );

    // A wakes, writes once with its old token, is refused, and stops.
    let a_code = a.wait_exit(Duration::from_millis(pause_ms) + STEP);
    let (fenced_at, fenced) = a.wait_line("fenced: 412 ", Duration::ZERO);
    let (resumed_at, _) = a.wait_line("resumed", Duration::ZERO);
    assert_eq!(a_code, 2, "A must exit 2 when fenced\n{}", a.transcript());
    let reason = fenced.split_whitespace().nth(3).unwrap_or_default();
    assert!(
        ["stale_epoch", "superseded_leader"].contains(&reason),
        "A is refused as deposed, got {fenced:?}"
    );
    assert!(fenced.contains(&format!("token {a_token}")), "{fenced:?}");
    let a_lines = a.lines();
    let after_resume = a_lines.iter().skip_while(|l| !l.starts_with("A: resumed"));
    let a_writes_after: Vec<_> = after_resume.filter(|l| l.starts_with("A: write ")).collect();
    assert!(
        a_writes_after.is_empty(),
        "A wrote after waking: {a_writes_after:?}\n{}",
        a.transcript()
    );

    // The store: A's 2 writes, then B's 2, and nothing with A's token after
    // B's first write.
    let writes = store_writes(&nginx, 4);
    let tokens: Vec<_> = writes
        .iter()
        .map(|e| e.token.clone().unwrap_or_default())
        .collect();
    let (a_tok, b_tok) = (a_token.to_string(), b_token.to_string());
    let first_b = tokens
        .iter()
        .position(|t| *t == b_tok)
        .unwrap_or_else(|| panic!("no write of B in the store: {writes:?}"));
    assert!(
        tokens[first_b..].iter().all(|t| *t != a_tok),
        "a write with A's token {a_tok} reached the store after B's first: {writes:?}"
    );
    assert_eq!(
        tokens,
        [a_tok.clone(), a_tok.clone(), b_tok.clone(), b_tok.clone()],
        "store writes: {writes:?}"
    );

    // fencegate's view agrees: the domain's epoch is B's token.
    let domains: Value = serde_json::from_str(&fg.admin_get("/domains").body).expect("/domains JSON");
    let orders = domains
        .as_array()
        .and_then(|all| all.iter().find(|d| d["name"] == "orders"))
        .unwrap_or_else(|| panic!("no orders domain in {domains}"));
    assert_eq!(orders["epoch"], b_token, "{orders}");

    eprintln!(
        "A paused -> B elected: {:?} (ttl {TTL_SECS}s); B elected -> B's 2nd write done: {:?}; \
         A resumed -> A fenced: {:?} ({fenced})",
        b_elected_at - paused_at,
        b_last_write_at - b_elected_at,
        fenced_at - resumed_at
    );
    assert!(
        b_elected_at - paused_at >= Duration::from_millis(500),
        "B won {:?} after A paused: before A's lease could have expired",
        b_elected_at - paused_at
    );
}
