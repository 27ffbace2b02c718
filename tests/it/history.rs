//! A Jepsen-style history check of the fencing promise (SPEC.md: Admission
//! rule, Guarantee, Coordinator): real etcd, a real nginx store that logs
//! every write's token in completion order (one process: see
//! [`Nginx::process_ids`]), fencegate with two election domains, and
//! writers that campaign in etcd elections and write with their leader
//! revision as token.
//!
//! Leaders are deposed three ways, each a failover: the lease revoked
//! through etcd; an in-process writer that stops its keep-alive and its
//! writes until its lease runs out (a model of a stalled process); and a
//! real `leader_writer` process (examples/) frozen with SIGSTOP until its
//! lease runs out, then woken with SIGCONT. Deposed in-process writers keep
//! writing with their old token for a while; the woken process sends the
//! write it was about to send. fencegate is SIGKILLed and restarted (same
//! state file) during the run; writes sent meanwhile fail with connection
//! errors and are recorded as of unknown outcome.
//!
//! Every request is recorded (domain, path, token, send and answer times,
//! status, `Fencegate-Reason`), with every deposition: when etcd had
//! committed it (the revoke answered, or the successor's campaign returned)
//! and when fencegate showed it (`/domains` refusal mark above the deposed
//! token: fence ahead). In-process successors wait for that fence before
//! their first write. After the run, [`check`], a pure function over the
//! records, the store's access log and the durable epochs, looks for:
//!
//! 1. a token in the store's log below an earlier one, per domain;
//! 2. a write fencegate answered 2xx that the store does not have (or has
//!    with another token), a refused write the store has, a write the
//!    store has twice or that nobody sent;
//! 3. a deposed token admitted, or in the store, when sent after its
//!    deposition was visible: committed in etcd (linearizable mode) or
//!    shown by fencegate's fence (watch mode); a deposed token in the store
//!    after the successor's first write; a fence that never showed;
//! 4. a durable epoch (`fencegate epochs --json`, read after every SIGKILL
//!    and after the final stop) below a token fencegate had answered 2xx,
//!    or going down.
//!
//! Both modes run the same schedule; each prints one summary line.

use crate::example_writer::example_binary;
use crate::support::etcd::{client as etcd_client, client_with_timeout};
use crate::support::{
    format_duration, send_signal, Candidate, Etcd, Fencegate, FencegateConfig, LogEntry, Nginx,
};
use etcd_client::Client;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, OwnedRwLockReadGuard, RwLock};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------
// The schedule
// ---------------------------------------------------------------------

/// How a leader is deposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Deposal {
    /// Its lease is revoked through etcd (the key goes at once).
    LeaseRevoked,
    /// An in-process writer stops its keep-alive and its writes until the
    /// lease runs out and the successor is elected, then writes on.
    PausedPastLease,
    /// A real `leader_writer` process is SIGSTOPped until its lease runs
    /// out and the successor is elected, then SIGCONTed.
    SigstopPastLease,
}

/// One election domain and the depositions of its leaders, in order.
/// The leader of term `i` is deposed by `plan[i]`; it is a writer process
/// when that is [`Deposal::SigstopPastLease`], else an in-process writer.
struct DomainSpec {
    name: &'static str,
    prefix: &'static str,
    election: &'static str,
    plan: &'static [Deposal],
}

use Deposal::{LeaseRevoked, PausedPastLease, SigstopPastLease};

/// Leader changes per run, both domains together.
const FAILOVERS: usize = 10;
/// SIGKILLs (and restarts) of fencegate per run.
const FENCEGATE_KILLS: usize = 3;

/// Five failovers per domain: five lease revokes in all (three of them
/// hand over to a writer process), two in-process pauses, three real
/// SIGSTOPs.
const DOMAINS: [DomainSpec; 2] = [
    DomainSpec {
        name: "orders",
        prefix: "/orders/",
        election: "/orders-service/leader",
        plan: &[
            LeaseRevoked,
            SigstopPastLease,
            PausedPastLease,
            LeaseRevoked,
            SigstopPastLease,
        ],
    },
    DomainSpec {
        name: "billing",
        prefix: "/billing/",
        election: "/billing-service/leader",
        plan: &[
            PausedPastLease,
            LeaseRevoked,
            SigstopPastLease,
            LeaseRevoked,
            LeaseRevoked,
        ],
    },
];

/// When fencegate is SIGKILLed and restarted, from the start of the run
/// (later if a writer process leads then: see [`Ctx::kill_gate`]).
const KILL_AT: [Duration; FENCEGATE_KILLS] = [
    Duration::from_millis(2000),
    Duration::from_millis(5500),
    Duration::from_millis(9000),
];
const _: () = assert!(DOMAINS[0].plan.len() + DOMAINS[1].plan.len() == FAILOVERS);

/// In-process writers per domain; terms rotate over them, each
/// campaigning again with a new lease.
const IN_PROCESS_WRITERS: usize = 3;
/// How long a leader writes before its deposition begins.
const TERM: Duration = Duration::from_millis(700);
/// An in-process successor's wait between seeing the fence and its first
/// write: the deposed writer's writes meanwhile show fence ahead.
const SUCCESSOR_HOLD: Duration = Duration::from_millis(120);
/// How long a deposed in-process writer writes on once its successor
/// writes.
const DEPOSED_TAIL: Duration = Duration::from_millis(300);
/// Pause between one in-process writer's writes (each waits for its answer).
const WRITE_GAP: Duration = Duration::from_millis(4);
/// Pause after a write that got no answer (fencegate down).
const ERROR_GAP: Duration = Duration::from_millis(20);
/// Bound on one write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd's smallest lease (3.4 rounds smaller TTLs up to it): for leaders
/// deposed by running out their lease.
const SHORT_TTL: i64 = 2;
/// For leaders deposed by a revoke: never runs out during a run.
const LONG_TTL: i64 = 20;
/// The writer process's interval between writes: it is frozen in that
/// sleep, right after an answered write, so nothing is in flight.
const PROCESS_INTERVAL: Duration = Duration::from_millis(300);
/// Bound on a successor's election once the leader's lease stops.
const ELECTION_DEADLINE: Duration = Duration::from_secs(15);
/// Bound on fencegate's fence (refusal mark above the deposed token).
const FENCE_DEADLINE: Duration = Duration::from_secs(5);
/// Bound on one step of the schedule (a key to appear, a line, an exit).
const STEP: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_STALENESS: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------
// The history: plain records, and the checker over them
// ---------------------------------------------------------------------

/// The consistency mode fencegate runs in; decides which moment makes a
/// deposition binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consistency {
    Watch,
    Linearizable,
}

impl Consistency {
    fn toml(self) -> &'static str {
        match self {
            Consistency::Watch => "watch",
            Consistency::Linearizable => "linearizable",
        }
    }
}

/// How one write ended, seen by its writer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A response; `reason` is its `Fencegate-Reason` (absent when the
    /// store answered).
    Status { code: u16, reason: Option<String> },
    /// No connection (fencegate down): nothing was sent.
    NotSent(String),
    /// The connection failed after the request may have gone out: the
    /// store may or may not have it.
    Unknown(String),
}

impl Outcome {
    fn status(code: u16, reason: Option<&str>) -> Outcome {
        Outcome::Status {
            code,
            reason: reason.map(str::to_string),
        }
    }

    /// The store took it and fencegate relayed its 2xx.
    fn admitted(&self) -> bool {
        matches!(
            self,
            Outcome::Status {
                code: 200..=299,
                reason: None
            }
        )
    }

    /// fencegate refused it as fenced (412).
    fn fenced(&self) -> bool {
        matches!(
            self,
            Outcome::Status {
                code: 412,
                reason: Some(_)
            }
        )
    }

    /// fencegate answered it itself without forwarding anything: any
    /// reason but the two whose store outcome is unknown.
    fn never_forwarded(&self) -> bool {
        match self {
            Outcome::Status { reason: Some(r), .. } => r != "upstream_unreachable" && r != "upstream_timeout",
            Outcome::NotSent(_) => true,
            _ => false,
        }
    }

    fn unknown(&self) -> bool {
        matches!(self, Outcome::NotSent(_) | Outcome::Unknown(_))
    }
}

/// One request a writer sent. Times are offsets from the start of the run:
/// `sent` is taken before the request leaves (never later than it), `done`
/// after its answer arrived.
#[derive(Debug, Clone)]
struct Write {
    domain: String,
    writer: String,
    /// Unique per write (a writer process's 503 retries reuse it).
    path: String,
    token: i64,
    sent: Duration,
    done: Duration,
    outcome: Outcome,
}

/// A leader's deposition and the moments it became visible.
#[derive(Debug, Clone)]
struct Deposition {
    domain: String,
    kind: Deposal,
    old_token: i64,
    new_token: i64,
    /// etcd had committed it: the revoke was answered, or the successor's
    /// campaign returned.
    etcd_visible: Duration,
    /// fencegate's `/domains` showed a refusal mark above `old_token`;
    /// `None` if it did not within [`FENCE_DEADLINE`].
    fence_visible: Option<Duration>,
}

/// The durable epochs of a stopped fencegate (`epochs --json`), read at
/// `at`: after a SIGKILL, or after the final stop (`last`).
#[derive(Debug, Clone)]
struct Checkpoint {
    label: String,
    at: Duration,
    epochs: BTreeMap<String, i64>,
    last: bool,
}

/// Everything [`check`] looks at.
struct History {
    consistency: Consistency,
    /// (name, prefix) of every domain.
    domains: Vec<(String, String)>,
    writes: Vec<Write>,
    depositions: Vec<Deposition>,
    /// The store's access log, in completion order.
    store: Vec<LogEntry>,
    checkpoints: Vec<Checkpoint>,
}

/// What [`check`] found: the violations, and counts that show what the
/// history exercised.
#[derive(Debug, Default)]
struct Findings {
    violations: Vec<String>,
    /// Writes with a deposed token sent after the deposition was binding.
    deposed_after_visible: usize,
    /// Of those, refused with 412.
    deposed_after_visible_fenced: usize,
    /// Deposed-token writes refused after the fence showed and before the
    /// successor's first write was sent: fence ahead at work.
    fenced_before_successor_wrote: usize,
    /// Deposed-token writes admitted after etcd committed the deposition
    /// but before fencegate showed it (allowed in watch mode only).
    admitted_in_view_lag: usize,
}

/// The domain whose prefix `path` starts with.
fn domain_of<'a>(domains: &'a [(String, String)], path: &str) -> Option<&'a str> {
    domains
        .iter()
        .filter(|(_, prefix)| path.starts_with(prefix.as_str()))
        .max_by_key(|(_, prefix)| prefix.len())
        .map(|(name, _)| name.as_str())
}

/// Check the history against the fencing promise; see the module docs for
/// the four properties. Pure: no I/O, no clock.
fn check(h: &History) -> Findings {
    let mut f = Findings::default();
    let v = &mut f.violations;

    // The store's log, per domain, with each entry's token and position.
    let mut store_by_domain: BTreeMap<&str, Vec<(usize, i64, &LogEntry)>> = BTreeMap::new();
    let mut store_by_path: HashMap<&str, Vec<&LogEntry>> = HashMap::new();
    for (i, e) in h.store.iter().enumerate() {
        let Some(domain) = domain_of(&h.domains, &e.uri) else {
            v.push(format!("store: entry {i} {e:?} lies in no domain"));
            continue;
        };
        let Some(token) = e.token.as_deref().and_then(|t| t.parse::<i64>().ok()) else {
            v.push(format!("store: entry {i} {e:?} in {domain} has no valid token"));
            continue;
        };
        store_by_domain.entry(domain).or_default().push((i, token, e));
        store_by_path.entry(e.uri.as_str()).or_default().push(e);
    }

    // 1. Per domain, tokens in completion order never go down.
    for (domain, entries) in &store_by_domain {
        let mut highest: Option<(usize, i64)> = None;
        for &(i, token, e) in entries {
            match highest {
                Some((at, high)) if token < high => v.push(format!(
                    "1 order: {domain}: store entry {i} {} (token {token}, status {}) completed after \
                     entry {at} with token {high}",
                    e.uri, e.status
                )),
                Some((_, high)) if token <= high => {}
                _ => highest = Some((i, token)),
            }
        }
    }

    // 2. Every admitted write is in the store, with its token; nothing
    // refused, duplicated or unsent is.
    let mut writes_by_path: HashMap<&str, Vec<&Write>> = HashMap::new();
    for w in &h.writes {
        writes_by_path.entry(w.path.as_str()).or_default().push(w);
    }
    for w in h.writes.iter().filter(|w| w.outcome.admitted()) {
        let stored = store_by_path
            .get(w.path.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let token = w.token.to_string();
        let found = stored
            .iter()
            .any(|e| e.token.as_deref() == Some(token.as_str()) && (200..300).contains(&e.status));
        if !found {
            v.push(format!(
                "2 lost: {} answered {:?} to {} (token {}, writer {}, sent at {:?}) but the store has {stored:?}",
                w.domain, w.outcome, w.path, w.token, w.writer, w.sent
            ));
        }
    }
    for (path, writes) in &writes_by_path {
        if writes.iter().all(|w| w.outcome.never_forwarded()) {
            if let Some(stored) = store_by_path.get(path) {
                v.push(format!(
                    "2 forwarded a refusal: every attempt at {path} was answered by fencegate \
                     ({:?}) but the store has {stored:?}",
                    writes.iter().map(|w| &w.outcome).collect::<Vec<_>>()
                ));
            }
        }
    }
    for (path, stored) in &store_by_path {
        if stored.len() > 1 {
            v.push(format!(
                "2 duplicate: the store has {path} {} times: {stored:?}",
                stored.len()
            ));
        }
        let sent = writes_by_path.get(path).map(Vec::as_slice).unwrap_or_default();
        for e in stored {
            if !sent.iter().any(|w| Some(w.token.to_string()) == e.token) {
                v.push(format!(
                    "2 unsent: the store has {e:?}, but no writer sent {path} with that token"
                ));
            }
        }
    }

    // 3. Depositions.
    let mut writes_by_token: HashMap<(&str, i64), Vec<&Write>> = HashMap::new();
    for w in &h.writes {
        writes_by_token
            .entry((w.domain.as_str(), w.token))
            .or_default()
            .push(w);
    }
    for d in &h.depositions {
        let what = format!(
            "{} {:?} {} -> {} (etcd {:?}, fence {:?})",
            d.domain, d.kind, d.old_token, d.new_token, d.etcd_visible, d.fence_visible
        );
        if d.fence_visible.is_none() {
            v.push(format!(
                "3 no fence: {what}: fencegate's refusal mark never rose above {}",
                d.old_token
            ));
        }
        let binding = match h.consistency {
            Consistency::Linearizable => Some(d.etcd_visible),
            Consistency::Watch => d.fence_visible,
        };
        let old = writes_by_token
            .get(&(d.domain.as_str(), d.old_token))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let successor_first_sent = writes_by_token
            .get(&(d.domain.as_str(), d.new_token))
            .and_then(|ws| ws.iter().map(|w| w.sent).min());
        for w in old {
            if let Some(binding) = binding.filter(|b| w.sent >= *b) {
                f.deposed_after_visible += 1;
                f.deposed_after_visible_fenced += usize::from(w.outcome.fenced());
                if w.outcome.admitted() {
                    v.push(format!(
                        "3 deposed admitted: {what}: {} with token {} sent at {:?} (binding {binding:?}) \
                         got {:?}",
                        w.path, w.token, w.sent, w.outcome
                    ));
                }
                if let Some(stored) = store_by_path.get(w.path.as_str()) {
                    v.push(format!(
                        "3 deposed stored: {what}: {} sent at {:?} (binding {binding:?}, outcome {:?}) \
                         is in the store: {stored:?}",
                        w.path, w.sent, w.outcome
                    ));
                }
            }
            if let (Some(fence), Some(first)) = (d.fence_visible, successor_first_sent) {
                if w.sent >= fence && w.sent < first && w.outcome.fenced() {
                    f.fenced_before_successor_wrote += 1;
                }
            }
            let in_lag = w.sent >= d.etcd_visible && d.fence_visible.is_none_or(|fence| w.sent < fence);
            if in_lag && w.outcome.admitted() {
                f.admitted_in_view_lag += 1;
            }
        }
        // Fence ahead in the store: nothing of the deposed token after the
        // successor's first write.
        let entries = store_by_domain
            .get(d.domain.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some(first_new) = entries.iter().position(|&(_, t, _)| t == d.new_token) {
            for &(i, _, e) in entries[first_new..].iter().filter(|&&(_, t, _)| t == d.old_token) {
                v.push(format!(
                    "3 fence ahead: {what}: store entry {i} {} with the deposed token after the \
                     successor's first write (entry {})",
                    e.uri, entries[first_new].0
                ));
            }
        }
    }

    // 4. Durable epochs cover every admitted token and never go down.
    for (domain, _) in &h.domains {
        let mut previous: Option<(&str, i64)> = None;
        let ws: Vec<&Write> = h.writes.iter().filter(|w| &w.domain == domain).collect();
        let max_sent = ws.iter().map(|w| w.token).max().unwrap_or(0);
        let mut checkpoints: Vec<&Checkpoint> = h.checkpoints.iter().collect();
        checkpoints.sort_by_key(|c| (c.at, c.last));
        for c in checkpoints {
            let epoch = c.epochs.get(domain).copied().unwrap_or(0);
            if let Some((label, before)) = previous {
                if epoch < before {
                    v.push(format!(
                        "4 epoch down: {domain}: durable epoch {epoch} {} below {before} {label}",
                        c.label
                    ));
                }
            }
            previous = Some((&c.label, epoch));
            let admitted = ws
                .iter()
                .filter(|w| w.outcome.admitted() && (c.last || w.done <= c.at));
            if let Some(w) = admitted.max_by_key(|w| w.token).filter(|w| w.token > epoch) {
                v.push(format!(
                    "4 epoch behind: {domain}: durable epoch {epoch} {} ({:?}) below token {} of {} \
                     answered {:?} at {:?}",
                    c.label, c.at, w.token, w.path, w.outcome, w.done
                ));
            }
            if c.last {
                let stored = store_by_domain
                    .get(domain.as_str())
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let stored_2xx = stored.iter().filter(|(_, _, e)| (200..300).contains(&e.status));
                if let Some(&(i, token, _)) = stored_2xx
                    .max_by_key(|(_, t, _)| *t)
                    .filter(|(_, t, _)| *t > epoch)
                {
                    v.push(format!(
                        "4 epoch behind the store: {domain}: final durable epoch {epoch} below token \
                         {token} of store entry {i}"
                    ));
                }
            }
            if epoch > max_sent {
                v.push(format!(
                    "4 epoch from nowhere: {domain}: durable epoch {epoch} {} above every token sent \
                     ({max_sent})",
                    c.label
                ));
            }
        }
    }
    f
}

// ---------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------

/// What every task of a run shares.
struct Ctx {
    t0: Instant,
    proxy: String,
    admin: String,
    etcd_endpoints: Vec<String>,
    admin_http: reqwest::Client,
    writes: Mutex<Vec<Write>>,
    depositions: Mutex<Vec<Deposition>>,
    /// Held (shared) while a writer process leads: `leader_writer` stops
    /// at its first connection error, so fencegate is not killed then.
    kill_gate: Arc<RwLock<()>>,
    /// What the writer processes did once woken, one line each.
    process_ends: Mutex<Vec<String>>,
}

impl Ctx {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn record(&self, w: Write) {
        self.writes.lock().unwrap().push(w);
    }

    /// The refusal mark of `domain` in `/domains`; `None` while fencegate
    /// does not answer (it may be restarting).
    async fn refusal_mark(&self, domain: &str) -> Option<i64> {
        let resp = self
            .admin_http
            .get(format!("{}/domains", self.admin))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        let list: Value = serde_json::from_slice(&resp.bytes().await.ok()?).ok()?;
        let d = list.as_array()?.iter().find(|d| d["name"] == domain)?;
        d["refusal_mark"].as_i64()
    }

    /// Poll `/domains` until the refusal mark of `domain` is above
    /// `old_token` (the deposed leader is fenced); when it was seen.
    async fn wait_fence(&self, domain: &str, old_token: i64) -> Option<Duration> {
        let deadline = Instant::now() + FENCE_DEADLINE;
        loop {
            if self
                .refusal_mark(domain)
                .await
                .is_some_and(|mark| mark > old_token)
            {
                return Some(self.now());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
}

/// `PUT proxy+path` with `token`.
async fn put(http: &reqwest::Client, proxy: &str, path: &str, token: i64) -> Outcome {
    let sent = http
        .put(format!("{proxy}{path}"))
        .header("Fencing-Token", token.to_string())
        .body(format!("{path} {token}\n"))
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let reason = resp
                .headers()
                .get("fencegate-reason")
                .and_then(|r| r.to_str().ok())
                .map(str::to_string);
            let _ = resp.bytes().await;
            Outcome::Status { code, reason }
        }
        Err(e) if e.is_connect() => Outcome::NotSent(error_chain(&e)),
        Err(e) => Outcome::Unknown(error_chain(&e)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

/// What the schedule tells an in-process writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    /// Send nothing (the write in flight finishes): a stalled process.
    Pause,
    Stop,
}

/// An in-process writer: writes one after another with one token until
/// stopped, recording each in [`Ctx::writes`].
struct InProcessWriter {
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

impl InProcessWriter {
    fn start(ctx: &Arc<Ctx>, d: &'static DomainSpec, writer: &str, term: usize, token: i64) -> Self {
        let (control, rx) = watch::channel(Control::Run);
        let task = tokio::spawn(write_loop(ctx.clone(), d, writer.to_string(), term, token, rx));
        InProcessWriter { control, task }
    }

    fn set(&self, c: Control) {
        let _ = self.control.send(c);
    }

    async fn stop(self) {
        self.set(Control::Stop);
        tokio::time::timeout(WRITE_TIMEOUT + STEP, self.task)
            .await
            .expect("an in-process writer did not stop")
            .expect("an in-process writer panicked");
    }
}

async fn write_loop(
    ctx: Arc<Ctx>,
    d: &'static DomainSpec,
    writer: String,
    term: usize,
    token: i64,
    mut control: watch::Receiver<Control>,
) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(WRITE_TIMEOUT)
        .build()
        .expect("build reqwest client");
    let mut seq = 0u64;
    loop {
        let state = *control.borrow_and_update();
        match state {
            Control::Stop => return,
            Control::Pause => {
                if control.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Control::Run => {}
        }
        seq += 1;
        let path = format!("{}{writer}-t{term}-{seq}", d.prefix);
        let sent = ctx.now();
        let outcome = put(&http, &ctx.proxy, &path, token).await;
        let gap = if outcome.unknown() { ERROR_GAP } else { WRITE_GAP };
        ctx.record(Write {
            domain: d.name.to_string(),
            writer: writer.clone(),
            path,
            token,
            sent,
            done: ctx.now(),
            outcome,
        });
        tokio::select! {
            _ = tokio::time::sleep(gap) => {}
            changed = control.changed() => if changed.is_err() { return },
        }
    }
}

/// A running `leader_writer` (examples/) with its stdout lines, each with
/// when it arrived. Holds the kill gate while alive; dropping it SIGKILLs it.
struct WriterProcess {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _gate: OwnedRwLockReadGuard<()>,
}

impl WriterProcess {
    async fn spawn(ctx: &Arc<Ctx>, d: &DomainSpec, name: &str) -> WriterProcess {
        let gate = ctx.kill_gate.clone().read_owned().await;
        let binary = example_binary();
        let mut child = Command::new(&binary)
            .args([
                "--name",
                name,
                "--election",
                d.election,
                "--path-prefix",
                d.prefix,
            ])
            .args(["--etcd", &ctx.etcd_endpoints.join(","), "--proxy", &ctx.proxy])
            .args(["--ttl", &SHORT_TTL.to_string(), "--writes", "0"])
            .args([
                "--interval",
                &format_duration(PROCESS_INTERVAL),
                "--max-retries",
                "20",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().expect("stdout piped"));
        let reader = std::thread::spawn({
            let (lines, t0) = (lines.clone(), ctx.t0);
            move || {
                for line in out.lines().map_while(Result::ok) {
                    lines.lock().unwrap().push((t0.elapsed(), line));
                }
            }
        });
        WriterProcess {
            name: name.to_string(),
            child,
            lines,
            reader: Some(reader),
            _gate: gate,
        }
    }

    fn lines(&self) -> Vec<(Duration, String)> {
        self.lines.lock().unwrap().clone()
    }

    fn transcript(&self) -> String {
        let lines: Vec<String> = self
            .lines()
            .into_iter()
            .map(|(t, l)| format!("{t:?} {l}"))
            .collect();
        lines.join("\n")
    }

    /// The first line at index `from` or later that starts with
    /// `NAME: ` + `prefix`: its index, arrival and text.
    async fn wait_line(&self, from: usize, prefix: &str) -> (usize, Duration, String) {
        let wanted = format!("{}: {prefix}", self.name);
        let deadline = Instant::now() + STEP;
        loop {
            let found = self
                .lines()
                .into_iter()
                .enumerate()
                .skip(from)
                .find(|(_, (_, l))| l.starts_with(&wanted) && (prefix != "write " || l.contains("-> 2")));
            if let Some((i, (t, l))) = found {
                return (i, t, l);
            }
            assert!(
                Instant::now() < deadline,
                "no line {wanted:?} (from line {from}) within {STEP:?}\n{}",
                self.transcript()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn token(&self) -> (i64, Duration) {
        let (_, at, line) = self.wait_line(0, "elected token=").await;
        let token = line.rsplit('=').next().and_then(|t| t.parse().ok());
        (token.unwrap_or_else(|| panic!("bad token in {line:?}")), at)
    }

    fn signal(&self, signal: &str) {
        let pid = i64::from(self.child.id());
        tokio::task::block_in_place(|| send_signal(pid, signal));
    }

    /// Wait for the exit (bounded) and the last lines; the exit code.
    async fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + STEP;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs {STEP:?} after it was woken\n{}",
                self.name,
                self.transcript()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if let Some(reader) = self.reader.take() {
            tokio::task::block_in_place(|| reader.join().expect("stdout reader"));
        }
        status.code()
    }
}

impl Drop for WriterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The writes of a writer process from its stdout lines. `resumed` is
/// when it was SIGCONTed, if it was frozen with nothing in flight: a write
/// answered after that was sent after it.
fn process_writes(
    d: &DomainSpec,
    name: &str,
    token: i64,
    lines: &[(Duration, String)],
    resumed: Option<Duration>,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut next_seq = 1u64;
    let mut previous = Duration::ZERO;
    let me = format!("{name}: ");
    for (at, line) in lines {
        let Some(text) = line.strip_prefix(&me) else {
            continue;
        };
        let sent = match resumed {
            Some(r) if *at >= r => r.max(previous),
            _ => previous,
        };
        previous = *at;
        let next_path = format!("{}{name}-{next_seq}", d.prefix);
        let (path, outcome) = if let Some(rest) = text.strip_prefix("write ") {
            // "write PATH token=T -> CODE" or "... -> 503 REASON, retry ..."
            let path = rest.split(" token=").next().unwrap_or_default().to_string();
            let answer = rest.split("-> ").nth(1).unwrap_or_default();
            let mut words = answer.split([' ', ',']);
            let code: u16 = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            let reason = words.next().filter(|r| !r.is_empty());
            (path, Outcome::status(code, reason))
        } else if let Some(rest) = text.strip_prefix("fenced: 412 ") {
            let reason = rest.split_whitespace().next();
            (next_path, Outcome::status(412, reason))
        } else if let Some(rest) = text.strip_prefix("error: write ") {
            // "error: write PATH token=T -> CODE REASON...: body" or
            // "error: write PATH: connection error".
            match rest.split_once(" token=") {
                Some((path, after)) => {
                    let answer = after.split("-> ").nth(1).unwrap_or_default();
                    let mut words = answer.split(' ');
                    let code = words.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                    let reason = words.next().filter(|r| !r.starts_with('('));
                    (path.to_string(), Outcome::status(code, reason))
                }
                None => {
                    let (path, error) = rest.split_once(": ").unwrap_or((rest, ""));
                    (path.to_string(), Outcome::Unknown(error.to_string()))
                }
            }
        } else {
            continue;
        };
        if outcome.admitted() {
            next_seq += 1;
        }
        writes.push(Write {
            domain: d.name.to_string(),
            writer: name.to_string(),
            path,
            token,
            sent,
            done: *at,
            outcome,
        });
    }
    writes
}

/// The leader of a term.
enum Leader {
    InProcess {
        candidate: Box<Candidate>,
        writer: InProcessWriter,
    },
    Process {
        process: WriterProcess,
        token: i64,
    },
}

impl Leader {
    fn token(&self) -> i64 {
        match self {
            Leader::InProcess { candidate, .. } => candidate.rev(),
            Leader::Process { token, .. } => *token,
        }
    }
}

/// The next leader, campaigning while the current one leads.
enum Successor {
    InProcess {
        name: String,
        campaign: JoinHandle<(Candidate, Duration)>,
    },
    Process(WriterProcess),
}

/// A successor once elected.
enum Elected {
    InProcess { name: String, candidate: Box<Candidate> },
    Process(WriterProcess),
}

/// A deposed leader, until it retires.
enum Deposed {
    /// An in-process writer, writing on (after its pause, if paused);
    /// `lease` holds a paused writer's candidate, whose lease ran out.
    Writing {
        writer: InProcessWriter,
        lease: Option<Box<Candidate>>,
    },
    /// A SIGSTOPped writer process.
    Frozen {
        process: WriterProcess,
        token: i64,
        stopped_at: Duration,
        /// Stopped with no write in flight.
        clean: bool,
    },
}

/// Counts of one domain's run.
#[derive(Debug, Default)]
struct DomainRun {
    /// (how the leader was deposed, how many times).
    failovers: BTreeMap<Deposal, usize>,
}

/// The writer of in-process term `term`.
fn in_process_name(term: usize) -> String {
    format!("w{}", term % IN_PROCESS_WRITERS)
}

fn ttl_for(deposal: Option<Deposal>) -> i64 {
    match deposal {
        Some(PausedPastLease | SigstopPastLease) => SHORT_TTL,
        _ => LONG_TTL,
    }
}

/// Waits until `election` has `n` candidates (keys under `election/`).
async fn wait_candidates(c: &Client, election: &str, n: i64) {
    let deadline = Instant::now() + STEP;
    loop {
        let now = crate::support::etcd::candidates(c, election).await;
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{election}: {now} candidates, expected {n}, after {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// One domain's schedule: terms, depositions, successors.
async fn run_domain(ctx: Arc<Ctx>, d: &'static DomainSpec) -> DomainRun {
    let campaigns = etcd_client(&ctx.etcd_endpoints).await;
    let queries = client_with_timeout(&ctx.etcd_endpoints, Duration::from_secs(2)).await;
    let mut run = DomainRun::default();
    let mut retiring: Vec<JoinHandle<()>> = Vec::new();

    assert_ne!(d.plan.first(), Some(&SigstopPastLease), "term 0 is in-process");
    let name = in_process_name(0);
    let candidate = tokio::time::timeout(
        STEP,
        Candidate::campaign(&campaigns, d.election, &name, ttl_for(d.plan.first().copied())),
    )
    .await
    .expect("the first campaign");
    let candidate = Box::new(candidate);
    let writer = InProcessWriter::start(&ctx, d, &name, 0, candidate.rev());
    let mut leader = Leader::InProcess { candidate, writer };

    for (i, &kind) in d.plan.iter().enumerate() {
        let term = i + 1;
        if matches!(leader, Leader::InProcess { .. }) {
            tokio::time::sleep(TERM).await;
        }
        let next_kind = d.plan.get(term).copied();
        let successor = if next_kind == Some(SigstopPastLease) {
            Successor::Process(WriterProcess::spawn(&ctx, d, &format!("p{term}")).await)
        } else {
            let (c, name, t0) = (campaigns.clone(), in_process_name(term), ctx.t0);
            let ttl = ttl_for(next_kind);
            let campaign = tokio::spawn({
                let name = name.clone();
                async move {
                    let candidate = Candidate::campaign(&c, d.election, &name, ttl).await;
                    (candidate, t0.elapsed())
                }
            });
            Successor::InProcess { name, campaign }
        };
        wait_candidates(&queries, d.election, 2).await;
        let old_token = leader.token();

        // Depose; `deposed` keeps what must write on or wake up.
        let mut revoked_at = None;
        let deposed = match (kind, leader) {
            (LeaseRevoked, Leader::InProcess { candidate, writer }) => {
                (*candidate).revoke().await;
                revoked_at = Some(ctx.now());
                Deposed::Writing { writer, lease: None }
            }
            (
                PausedPastLease,
                Leader::InProcess {
                    mut candidate,
                    writer,
                },
            ) => {
                writer.set(Control::Pause);
                candidate.stop_keepalive();
                Deposed::Writing {
                    writer,
                    lease: Some(candidate),
                }
            }
            (SigstopPastLease, Leader::Process { process, token }) => {
                let from = process.lines().len();
                let (_, answered_at, _) = process.wait_line(from, "write ").await;
                process.signal("STOP");
                let stopped_at = ctx.now();
                Deposed::Frozen {
                    process,
                    token,
                    stopped_at,
                    // Frozen in its sleep between writes (nothing in
                    // flight) if the signal came well within the interval.
                    clean: stopped_at - answered_at < PROCESS_INTERVAL / 2,
                }
            }
            (kind, _) => panic!("{}: plan {kind:?} does not fit term {i}'s leader", d.name),
        };

        // The successor's election.
        let (elected, new_token, elected_at) = match successor {
            Successor::InProcess { name, campaign } => {
                let (candidate, at) = tokio::time::timeout(ELECTION_DEADLINE, campaign)
                    .await
                    .unwrap_or_else(|_| panic!("{}: {name} not elected within {ELECTION_DEADLINE:?}", d.name))
                    .expect("campaign task");
                let token = candidate.rev();
                let candidate = Box::new(candidate);
                (Elected::InProcess { name, candidate }, token, at)
            }
            Successor::Process(process) => {
                let (token, at) = process.token().await;
                (Elected::Process(process), token, at)
            }
        };
        let etcd_visible = revoked_at.unwrap_or(elected_at);
        let fence_visible = ctx.wait_fence(d.name, old_token).await;
        ctx.depositions.lock().unwrap().push(Deposition {
            domain: d.name.to_string(),
            kind,
            old_token,
            new_token,
            etcd_visible,
            fence_visible,
        });
        *run.failovers.entry(kind).or_default() += 1;

        // The deposed leader writes on (or wakes), then retires.
        match deposed {
            Deposed::Writing { writer, lease } => {
                writer.set(Control::Run);
                drop(lease);
                retiring.push(tokio::spawn(async move {
                    tokio::time::sleep(SUCCESSOR_HOLD + DEPOSED_TAIL).await;
                    writer.stop().await;
                }));
            }
            Deposed::Frozen {
                process,
                token,
                stopped_at,
                clean,
            } => {
                // Taken before the signal: the process sends nothing
                // before it.
                let woken_at = ctx.now();
                process.signal("CONT");
                let ctx = ctx.clone();
                retiring.push(tokio::spawn(async move {
                    retire_process(&ctx, d, process, token, stopped_at, clean, woken_at).await;
                }));
            }
        }

        // The successor leads: an in-process one writes after the hold.
        leader = match elected {
            Elected::InProcess { name, candidate } => {
                tokio::time::sleep(SUCCESSOR_HOLD).await;
                let writer = InProcessWriter::start(&ctx, d, &name, term, candidate.rev());
                Leader::InProcess { candidate, writer }
            }
            Elected::Process(process) => Leader::Process {
                process,
                token: new_token,
            },
        };
    }

    tokio::time::sleep(TERM).await;
    match leader {
        Leader::InProcess { writer, .. } => writer.stop().await,
        Leader::Process { .. } => panic!("{}: the last term is in-process", d.name),
    }
    for task in retiring {
        task.await.expect("a retiring writer panicked");
    }
    run
}

/// Wait for a woken writer process to exit; record its writes and what it
/// did once woken.
async fn retire_process(
    ctx: &Ctx,
    d: &DomainSpec,
    mut process: WriterProcess,
    token: i64,
    stopped_at: Duration,
    clean: bool,
    woken_at: Duration,
) {
    let code = process.wait_exit().await;
    let lines = process.lines();
    let writes = process_writes(d, &process.name, token, &lines, clean.then_some(woken_at));
    let woken: Vec<&str> = lines
        .iter()
        .filter(|(at, _)| *at >= woken_at)
        .map(|(_, l)| l.as_str())
        .collect();
    ctx.process_ends.lock().unwrap().push(format!(
        "{} {} token {token}: stopped {stopped_at:?} (nothing in flight: {clean}), woken {woken_at:?}, \
         exit {code:?}: {woken:?}",
        d.name, process.name
    ));
    writes.into_iter().for_each(|w| ctx.record(w));
}

/// The durable epochs of a stopped fencegate, by domain.
fn durable_epochs(fg: &Fencegate) -> BTreeMap<String, i64> {
    let epochs = fg.durable_epochs().into_iter();
    epochs
        .map(|(name, epoch)| (name, i64::try_from(epoch).expect("an epoch below 2^63")))
        .collect()
}

/// SIGKILL fencegate at [`KILL_AT`], read its durable epochs while it is
/// down, restart it on the same state file.
async fn kill_and_restart(ctx: Arc<Ctx>, mut fg: Fencegate) -> (Fencegate, Vec<Checkpoint>, Vec<Duration>) {
    let mut checkpoints = Vec::new();
    let mut outages = Vec::new();
    for (k, at) in KILL_AT.iter().enumerate() {
        tokio::time::sleep(at.saturating_sub(ctx.now())).await;
        let _gate = ctx.kill_gate.write().await;
        let ctx = ctx.clone();
        let (back, checkpoint, outage) = tokio::task::spawn_blocking(move || {
            fg.kill9();
            let at = ctx.now();
            let epochs = durable_epochs(&fg);
            fg.start_again();
            let label = format!("after SIGKILL {}", k + 1);
            let outage = ctx.now() - at;
            (
                fg,
                Checkpoint {
                    label,
                    at,
                    epochs,
                    last: false,
                },
                outage,
            )
        })
        .await
        .expect("SIGKILL and restart of fencegate");
        fg = back;
        checkpoints.push(checkpoint);
        outages.push(outage);
    }
    (fg, checkpoints, outages)
}

/// `pipeline_depth`: `upstream.pipeline_depth`, for the run with the
/// writes pipelined to the store.
async fn run_history(consistency: Consistency, pipeline_depth: Option<usize>) {
    let started = Instant::now();
    example_binary();
    let etcd = tokio::task::block_in_place(Etcd::start);
    let nginx = tokio::task::block_in_place(Nginx::start);
    let processes = nginx.process_ids();
    assert_eq!(
        processes.len(),
        1,
        "the store must be one nginx process (its access log is then in completion order), \
         found {processes:?}"
    );

    let etcd_body = format!(
        "endpoints = [\"{}\"]\nconsistency = \"{}\"\nmax_staleness = \"{}\"",
        etcd.endpoint(),
        consistency.toml(),
        format_duration(MAX_STALENESS)
    );
    let mut config = FencegateConfig::new(&nginx.url())
        .etcd_raw(&etcd_body)
        .request_timeout(REQUEST_TIMEOUT)
        .shutdown_grace(Duration::from_secs(5));
    for d in &DOMAINS {
        config = config.election_domain(d.name, d.prefix, d.election);
    }
    if let Some(depth) = pipeline_depth {
        // One serving thread: the domains' writers' requests keep each
        // other company, and only a write in company takes a lane
        // (`Pipeline::depart`).
        config = config.pipeline_depth(depth).workers(1);
    }
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));

    let ctx = Arc::new(Ctx {
        t0: Instant::now(),
        proxy: fg.url(),
        admin: fg.admin_url(),
        etcd_endpoints: etcd.endpoints(),
        admin_http: reqwest::Client::builder().no_proxy().build().expect("reqwest"),
        writes: Mutex::new(Vec::new()),
        depositions: Mutex::new(Vec::new()),
        kill_gate: Arc::new(RwLock::new(())),
        process_ends: Mutex::new(Vec::new()),
    });
    let killer = tokio::spawn(kill_and_restart(ctx.clone(), fg));
    let domains: Vec<_> = DOMAINS
        .iter()
        .map(|d| tokio::spawn(run_domain(ctx.clone(), d)))
        .collect();
    let mut failovers: BTreeMap<Deposal, usize> = BTreeMap::new();
    for run in domains {
        for (kind, n) in run.await.expect("a domain's schedule failed").failovers {
            *failovers.entry(kind).or_default() += n;
        }
    }
    let ran = ctx.now();
    let (mut fg, mut checkpoints, outages) = killer.await.expect("the SIGKILL task failed");

    let status = tokio::task::block_in_place(|| fg.terminate());
    assert!(
        status.success(),
        "fencegate's final stop: {status}\n{}",
        fg.stderr_text()
    );
    checkpoints.push(Checkpoint {
        label: "after the final stop".to_string(),
        at: ctx.now(),
        epochs: durable_epochs(&fg),
        last: true,
    });

    let writes = std::mem::take(&mut *ctx.writes.lock().unwrap());
    let admitted = writes.iter().filter(|w| w.outcome.admitted()).count();
    let store = tokio::task::block_in_place(|| nginx.log_entries_at_least(admitted));
    if pipeline_depth.is_some() {
        let pipelined = store.iter().filter(|e| e.pipelined).count();
        assert!(
            pipelined > 0,
            "precondition: no write reached nginx pipelined behind another ({} in the log)",
            store.len()
        );
    }
    let history = History {
        consistency,
        domains: DOMAINS
            .iter()
            .map(|d| (d.name.to_string(), d.prefix.to_string()))
            .collect(),
        writes,
        depositions: ctx.depositions.lock().unwrap().clone(),
        store,
        checkpoints,
    };
    let found = check(&history);

    let w = &history.writes;
    let count = |f: &dyn Fn(&Outcome) -> bool| w.iter().filter(|w| f(&w.outcome)).count();
    let fenced = count(&Outcome::fenced);
    let unavailable = count(&|o| matches!(o, Outcome::Status { code: 503, .. }));
    let unknown = count(&Outcome::unknown);
    let other = w.len() - admitted - fenced - unavailable - unknown;
    let stored_paths: std::collections::HashSet<&str> =
        history.store.iter().map(|e| e.uri.as_str()).collect();
    let unknown_stored = w
        .iter()
        .filter(|w| w.outcome.unknown() && stored_paths.contains(w.path.as_str()))
        .count();
    let process_ends = ctx.process_ends.lock().unwrap().clone();
    let woken_writes = process_ends.iter().filter(|l| l.contains("fenced: 412")).count();
    let failover_total: usize = failovers.values().sum();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for o in w.iter().map(|w| &w.outcome) {
        if let Outcome::Status {
            code,
            reason: Some(r),
        } = o
        {
            *reasons.entry(format!("{code} {r}")).or_default() += 1;
        }
    }
    for end in &process_ends {
        eprintln!("history {}: writer process {end}", consistency.toml());
    }
    eprintln!(
        "history {mode}: {wall:?} wall ({ran:?} of writing); writes sent {sent}, admitted {admitted}, \
         refused 412 {fenced}, 503 {unavailable}, unknown (connection failed) {unknown} (in the store \
         {unknown_stored}), other {other}; \
         store entries {stored}; failovers {failover_total} {failovers:?}; fencegate SIGKILLs {kills} \
         (outages {outages:?}); deposed writes sent after the deposition was binding {after} \
         (412 {after_fenced}), of which refused before the successor's first write {ahead}; \
         admitted in the view lag {lag}; SIGSTOPped processes refused on waking {woken_writes} of {procs}; \
         refusals by reason {reasons:?}; violations {violations}",
        mode = consistency.toml(),
        wall = started.elapsed(),
        sent = w.len(),
        stored = history.store.len(),
        kills = outages.len(),
        after = found.deposed_after_visible,
        after_fenced = found.deposed_after_visible_fenced,
        ahead = found.fenced_before_successor_wrote,
        lag = found.admitted_in_view_lag,
        procs = process_ends.len(),
        violations = found.violations.len(),
    );
    assert!(
        found.violations.is_empty(),
        "{} violations of the fencing promise in {} mode:\n{}\n--- fencegate stderr ---\n{}",
        found.violations.len(),
        consistency.toml(),
        found.violations.join("\n"),
        fg.stderr_text()
    );

    // Not vacuous: the schedule ran in full and exercised each path.
    assert_eq!(failover_total, FAILOVERS, "failovers {failovers:?}");
    assert_eq!(outages.len(), FENCEGATE_KILLS, "fencegate SIGKILLs");
    assert!(admitted >= 200, "only {admitted} writes admitted");
    assert!(unknown >= 1, "no write met a fencegate outage");
    assert!(
        found.deposed_after_visible >= 50,
        "only {} deposed writes sent after their deposition was binding",
        found.deposed_after_visible
    );
    assert!(
        found.fenced_before_successor_wrote >= 10,
        "only {} deposed writes refused before the successor wrote (fence ahead)",
        found.fenced_before_successor_wrote
    );
    let sigstops = DOMAINS
        .iter()
        .flat_map(|d| d.plan)
        .filter(|k| **k == SigstopPastLease)
        .count();
    assert_eq!(
        process_ends.len(),
        sigstops,
        "writer processes woken: {process_ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_holds_in_watch_mode() {
    run_history(Consistency::Watch, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_holds_in_linearizable_mode() {
    run_history(Consistency::Linearizable, None).await;
}

/// The same schedule with the writes pipelined to the store
/// (`upstream.pipeline_depth`): lanes shared by the domains, the leaders'
/// writes and the deposed ones' on the same store connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_holds_with_writes_pipelined_to_the_store() {
    run_history(Consistency::Watch, Some(8)).await;
}

// ---------------------------------------------------------------------
// The checker on hand-made histories
// ---------------------------------------------------------------------

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn write(path: &str, token: i64, sent: u64, outcome: Outcome) -> Write {
    Write {
        domain: "orders".to_string(),
        writer: "w".to_string(),
        path: path.to_string(),
        token,
        sent: ms(sent),
        done: ms(sent + 1),
        outcome,
    }
}

fn entry(path: &str, token: i64, status: u16) -> LogEntry {
    LogEntry {
        method: "PUT".to_string(),
        uri: path.to_string(),
        token: Some(token.to_string()),
        status,
        request_length: 100,
        pipelined: false,
    }
}

fn epochs(orders: i64) -> BTreeMap<String, i64> {
    BTreeMap::from([("orders".to_string(), orders)])
}

/// Leader 5 writes twice; it is deposed by 7 (committed at 10 ms, fenced
/// at 12 ms); its write at 15 ms is refused; 7 writes at 20 ms. fencegate
/// is killed at 8 ms (epoch 5) and stopped at the end (epoch 7).
fn clean_history(consistency: Consistency) -> History {
    let ok = || Outcome::status(201, None);
    History {
        consistency,
        domains: vec![("orders".to_string(), "/orders/".to_string())],
        writes: vec![
            write("/orders/a1", 5, 1, ok()),
            write("/orders/a2", 5, 5, ok()),
            write("/orders/a3", 5, 15, Outcome::status(412, Some("stale_epoch"))),
            write("/orders/a4", 5, 9, Outcome::NotSent("refused".to_string())),
            write("/orders/b1", 7, 20, ok()),
        ],
        depositions: vec![Deposition {
            domain: "orders".to_string(),
            kind: LeaseRevoked,
            old_token: 5,
            new_token: 7,
            etcd_visible: ms(10),
            fence_visible: Some(ms(12)),
        }],
        store: vec![
            entry("/orders/a1", 5, 201),
            entry("/orders/a2", 5, 201),
            entry("/orders/b1", 7, 201),
        ],
        checkpoints: vec![
            Checkpoint {
                label: "after SIGKILL 1".to_string(),
                at: ms(8),
                epochs: epochs(5),
                last: false,
            },
            Checkpoint {
                label: "after the final stop".to_string(),
                at: ms(30),
                epochs: epochs(7),
                last: true,
            },
        ],
    }
}

#[track_caller]
fn assert_found(h: &History, kind: &str) -> Findings {
    let found = check(h);
    assert!(
        found.violations.iter().any(|v| v.starts_with(kind)),
        "expected a {kind:?} violation, got {:#?}",
        found.violations
    );
    found
}

#[test]
fn checker_accepts_a_clean_history() {
    for consistency in [Consistency::Watch, Consistency::Linearizable] {
        let found = check(&clean_history(consistency));
        assert!(found.violations.is_empty(), "{:#?}", found.violations);
        assert_eq!(found.deposed_after_visible, 1);
        assert_eq!(found.deposed_after_visible_fenced, 1);
        assert_eq!(found.fenced_before_successor_wrote, 1);
    }
}

#[test]
fn checker_reports_a_token_that_goes_down_in_the_store() {
    let mut h = clean_history(Consistency::Watch);
    // The deposed leader's 2xx write completes after the successor's.
    h.store.swap(1, 2);
    assert_found(&h, "1 order");
    assert_found(&h, "3 fence ahead");
}

#[test]
fn checker_reports_lost_refused_duplicated_and_unsent_writes() {
    let mut h = clean_history(Consistency::Watch);
    h.store.remove(1);
    assert_found(&h, "2 lost");

    let mut h = clean_history(Consistency::Watch);
    h.store.push(entry("/orders/a4", 5, 201));
    assert_found(&h, "2 forwarded a refusal");

    let mut h = clean_history(Consistency::Watch);
    h.store.push(entry("/orders/b1", 7, 204));
    assert_found(&h, "2 duplicate");

    let mut h = clean_history(Consistency::Watch);
    h.store.push(entry("/orders/zz", 7, 201));
    assert_found(&h, "2 unsent");
}

#[test]
fn checker_reports_a_deposed_write_admitted_after_its_deposition_was_binding() {
    // Sent at 11 ms: after etcd committed the deposition (10 ms), before
    // fencegate's fence showed (12 ms).
    let lagging = |consistency| {
        let mut h = clean_history(consistency);
        h.writes
            .push(write("/orders/a5", 5, 11, Outcome::status(201, None)));
        h.store.insert(2, entry("/orders/a5", 5, 201));
        h
    };
    // Linearizable: binding from the commit on.
    let found = assert_found(&lagging(Consistency::Linearizable), "3 deposed admitted");
    assert!(found.violations.iter().any(|v| v.starts_with("3 deposed stored")));
    // Watch: binding from the fence on; the view's lag is allowed.
    let found = check(&lagging(Consistency::Watch));
    assert!(found.violations.is_empty(), "{:#?}", found.violations);
    assert_eq!(found.admitted_in_view_lag, 1);

    // After the fence, in watch mode too.
    let mut h = clean_history(Consistency::Watch);
    h.writes[2].outcome = Outcome::status(201, None);
    h.store.insert(2, entry("/orders/a3", 5, 201));
    assert_found(&h, "3 deposed admitted");

    let mut h = clean_history(Consistency::Watch);
    h.depositions[0].fence_visible = None;
    assert_found(&h, "3 no fence");
}

#[test]
fn checker_reports_durable_epochs_below_admitted_tokens_or_going_down() {
    let mut h = clean_history(Consistency::Watch);
    h.checkpoints[0].epochs = epochs(4);
    assert_found(&h, "4 epoch behind");

    let mut h = clean_history(Consistency::Watch);
    h.checkpoints[1].epochs = epochs(6);
    assert_found(&h, "4 epoch behind");
    assert_found(&h, "4 epoch behind the store");

    let mut h = clean_history(Consistency::Watch);
    h.checkpoints[0].epochs = epochs(7);
    h.checkpoints[0].at = ms(25);
    h.checkpoints[1].epochs = epochs(7);
    h.checkpoints.push(Checkpoint {
        label: "after SIGKILL 2".to_string(),
        at: ms(26),
        epochs: epochs(5),
        last: false,
    });
    assert_found(&h, "4 epoch down");

    let mut h = clean_history(Consistency::Watch);
    h.checkpoints[1].epochs = epochs(9);
    assert_found(&h, "4 epoch from nowhere");
}

#[test]
fn writer_process_lines_become_writes() {
    let d = &DOMAINS[0];
    let lines: Vec<(Duration, String)> = [
        (1, "p1: campaigning on /orders-service/leader (lease 1, ttl 2s)"),
        (2, "p1: elected token=5"),
        (3, "p1: write /orders/p1-1 token=5 -> 201"),
        (
            4,
            "p1: write /orders/p1-2 token=5 -> 503 coordinator_unavailable, retry 1/20 in 1000ms",
        ),
        (5, "p1: write /orders/p1-2 token=5 -> 201"),
        (9, "p1: fenced: 412 stale_epoch (token 5, epoch 7, leader 7)"),
        (10, "p1: resigned"),
    ]
    .into_iter()
    .map(|(t, l)| (ms(t), l.to_string()))
    .collect();
    let writes = process_writes(d, "p1", 5, &lines, Some(ms(8)));
    let got: Vec<(&str, Duration, Duration, &Outcome)> = writes
        .iter()
        .map(|w| (w.path.as_str(), w.sent, w.done, &w.outcome))
        .collect();
    assert_eq!(
        got,
        [
            ("/orders/p1-1", ms(2), ms(3), &Outcome::status(201, None)),
            (
                "/orders/p1-2",
                ms(3),
                ms(4),
                &Outcome::status(503, Some("coordinator_unavailable"))
            ),
            ("/orders/p1-2", ms(4), ms(5), &Outcome::status(201, None)),
            (
                "/orders/p1-3",
                ms(8),
                ms(9),
                &Outcome::status(412, Some("stale_epoch"))
            ),
        ]
    );
    let lost = [(
        ms(1),
        "p1: error: write /orders/p1-1: connection refused".to_string(),
    )];
    let writes = process_writes(d, "p1", 5, &lost, None);
    assert_eq!(
        writes[0].outcome,
        Outcome::Unknown("connection refused".to_string())
    );
}
