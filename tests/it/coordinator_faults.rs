//! fencegate when etcd fails (SPEC.md, Coordinator; Admin listener): a
//! killed member and a hung (SIGSTOPped) one in `reject` mode, a watch that
//! fell behind and finds its start revision compacted, a 3-member cluster
//! losing its raft leader or a follower (killed or hung, in both
//! consistency modes), and `on_unavailable = "local"`.
//! Real etcd processes, a real nginx store, the fencegate binary.
//!
//! `max_staleness` is 1500 ms throughout, so fencegate reads the election
//! at least every 500 ms. A deposition that fencegate notices well within
//! those 500 ms, several times in a row, was delivered by the watch.

use crate::support::etcd::{client, client_with_timeout, wait_writable};
use crate::support::{
    format_duration, http_get, send_signal, Candidate, Etcd, EtcdCluster, Fencegate, FencegateConfig, Nginx,
    RawResponse,
};
use etcd_client::Client;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const DOMAIN: &str = "orders";
const PREFIX: &str = "/orders/";
const ELECTION: &str = "/orders-service/leader";
const MAX_STALENESS: Duration = Duration::from_millis(1500);
/// Allowed beyond `MAX_STALENESS` before the first 503 after etcd is lost:
/// the check granularity of the test and a loaded 2-core machine.
const STALENESS_MARGIN: Duration = Duration::from_millis(500);
/// A deposition noticed within this (a tenth of `MAX_STALENESS`, under a
/// third of the 500 ms between periodic reads) came through the watch.
const WATCH_BOUND: Duration = Duration::from_millis(150);
/// Depositions measured in a row: with periodic reads alone, each would
/// land within `WATCH_BOUND` with a chance of 0.3; all three with 0.027.
const WATCH_ROUNDS: usize = 3;
/// Long enough that no lease runs out during an outage of a few seconds.
const LEASE_TTL: i64 = 15;
/// Bound on one write through fencegate.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on any single step a test waits for.
const STEP: Duration = Duration::from_secs(5);
/// Between polls.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------- helpers

/// fencegate with one election domain in front of `nginx`, etcd at
/// `endpoints`, `max_staleness = 1500ms` and the given `on_unavailable`.
fn config(nginx: &Nginx, endpoints: &[String], on_unavailable: &str) -> FencegateConfig {
    config_with(nginx, endpoints, on_unavailable, "watch")
}

/// The same with the given `consistency`.
fn config_with(
    nginx: &Nginx,
    endpoints: &[String],
    on_unavailable: &str,
    consistency: &str,
) -> FencegateConfig {
    let list = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>();
    let etcd = format!(
        "endpoints = [{}]\non_unavailable = \"{on_unavailable}\"\nconsistency = \"{consistency}\"\nmax_staleness = \"{}\"",
        list.join(", "),
        format_duration(MAX_STALENESS)
    );
    FencegateConfig::new(&nginx.url())
        .request_timeout(Duration::from_secs(5))
        .etcd_raw(&etcd)
        .election_domain(DOMAIN, PREFIX, ELECTION)
}

/// One client for every write: no pooled connections (each write on its
/// own connection, as a refusal closes it anyway), bounded per request.
fn http() -> &'static reqwest::Client {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(WRITE_TIMEOUT)
            .build()
            .expect("build reqwest client")
    })
}

/// `PUT path` with `token` through fencegate. Status 0 (the error as the
/// body) when there is no answer within `WRITE_TIMEOUT`.
async fn put(fg: &Fencegate, path: &str, token: i64) -> RawResponse {
    let request = http()
        .put(format!("{}{path}", fg.url()))
        .header("Fencing-Token", token.to_string())
        .body("x");
    let r = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            return RawResponse {
                body: format!("no answer: {e}"),
                ..RawResponse::default()
            }
        }
    };
    let headers = r.headers().iter();
    let headers = headers.map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()));
    RawResponse {
        status: r.status().as_u16(),
        headers: headers.collect(),
        body: r.text().await.unwrap_or_else(|e| format!("body failed: {e}")),
        interim: Vec::new(),
    }
}

fn reason(a: &RawResponse) -> Option<&str> {
    a.header("fencegate-reason")
}

/// A 2xx from the store itself.
fn admitted(a: &RawResponse) -> bool {
    (200..300).contains(&a.status) && reason(a).is_none()
}

/// A refusal of a deposed leader: 412 `stale_epoch` or `superseded_leader`.
fn fenced(a: &RawResponse) -> bool {
    a.status == 412 && matches!(reason(a), Some("stale_epoch" | "superseded_leader"))
}

/// A 503 `coordinator_unavailable`.
fn unavailable(a: &RawResponse) -> bool {
    a.status == 503 && reason(a) == Some("coordinator_unavailable")
}

/// "status reason" for reports.
fn brief(a: &RawResponse) -> String {
    format!("{} {}", a.status, reason(a).unwrap_or("-"))
}

/// The last 40 lines fencegate wrote to stderr, for failure messages.
fn log_tail(fg: &Fencegate) -> String {
    let text = fg.stderr_text();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    format!("--- fencegate stderr (last 40 lines) ---\n{tail}")
}

#[track_caller]
fn assert_admitted(fg: &Fencegate, a: &RawResponse, what: &str) {
    assert!(
        admitted(a),
        "{what}: expected a 2xx from the store, got {a:#?}\n{}",
        log_tail(fg)
    );
}

/// Asserts one of fencegate's own answers (SPEC.md, Responses) and
/// returns its problem+json body.
#[track_caller]
fn assert_problem(fg: &Fencegate, a: &RawResponse, status: u16, want: &str) -> Value {
    assert_eq!(
        (a.status, reason(a)),
        (status, Some(want)),
        "expected {status} {want}: {a:#?}\n{}",
        log_tail(fg)
    );
    assert_eq!(
        a.header("content-type"),
        Some("application/problem+json"),
        "{a:#?}"
    );
    let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("body not JSON ({e}): {a:#?}"));
    assert_eq!(
        (v["status"].as_u64(), v["reason"].as_str()),
        (Some(status.into()), Some(want)),
        "{v}"
    );
    assert_eq!(v["domain"], DOMAIN, "{v}");
    if status == 503 {
        let retry = a.header("retry-after");
        assert!(
            retry.is_some_and(|r| !r.trim().is_empty()),
            "503 without Retry-After: {a:#?}"
        );
    }
    v
}

/// This test's domain in the admin `/domains`.
fn domain_view(fg: &Fencegate) -> Value {
    let resp = fg.admin_get("/domains");
    assert_eq!(resp.status, 200, "/domains: {resp:?}");
    let list: Value =
        serde_json::from_str(&resp.body).unwrap_or_else(|e| panic!("/domains ({e}): {}", resp.body));
    let domains = list
        .as_array()
        .unwrap_or_else(|| panic!("/domains is not a list: {list}"));
    let found = domains.iter().find(|d| d["name"] == DOMAIN);
    found
        .unwrap_or_else(|| panic!("no domain {DOMAIN} in /domains: {list}"))
        .clone()
}

/// Wait until fencegate's view shows `rev` as the leader.
async fn wait_view_leader(fg: &Fencegate, rev: i64) {
    wait_view_shows(fg, Some(rev)).await;
}

/// Wait until fencegate's view shows `leader` (`None`: no candidate).
async fn wait_view_shows(fg: &Fencegate, leader: Option<i64>) {
    let deadline = Instant::now() + STEP;
    loop {
        let view = domain_view(fg);
        if view["leader_revision"].as_i64() == leader {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fencegate's view did not show leader {leader:?} within {STEP:?}: {view}\n{}",
            log_tail(fg)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The value of the unlabelled metric `name` in `/metrics`.
fn metric(fg: &Fencegate, name: &str) -> Option<f64> {
    let text = fg.admin_get("/metrics").body;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Poll `/metrics` until `name` is `want` (≤ `bound`); how long it took.
async fn wait_metric(fg: &Fencegate, name: &str, want: f64, bound: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = metric(fg, name);
        if got == Some(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "{name} is {got:?}, not {want}, after {bound:?}\n{}",
            log_tail(fg)
        );
        tokio::time::sleep(POLL).await;
    }
}

fn readyz(fg: &Fencegate) -> u16 {
    fg.admin_get("/readyz").status
}

/// Poll `/readyz` until it answers `want` (≤ `bound`); how long it took.
async fn wait_readyz(fg: &Fencegate, want: u16, bound: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = readyz(fg);
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "/readyz is {got}, not {want}, after {bound:?}\n{}",
            log_tail(fg)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// PUT with `token` until fencegate admits it (≤ `bound`); returns the time
/// since `since` and the distinct answers seen before ("status reason").
async fn until_admitted(
    fg: &Fencegate,
    token: i64,
    since: Instant,
    bound: Duration,
) -> (Duration, Vec<String>) {
    let deadline = Instant::now() + bound;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let a = put(fg, "/orders/k", token).await;
        if admitted(&a) {
            return (since.elapsed(), seen);
        }
        if !seen.contains(&brief(&a)) {
            seen.push(brief(&a));
        }
        assert!(
            Instant::now() < deadline,
            "token {token} not admitted within {bound:?}; answers seen: {seen:?}; last {a:#?}\n{}",
            log_tail(fg)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Start campaigning as `value` in the background and return once its key
/// exists (it waits behind the current leader).
async fn campaign_behind(c: &Client, value: &str) -> tokio::task::JoinHandle<Candidate> {
    Candidate::campaign_behind(c, ELECTION, value, LEASE_TTL).await
}

/// Await a campaign that should lead by now.
async fn leads(task: tokio::task::JoinHandle<Candidate>) -> Candidate {
    tokio::time::timeout(STEP, task)
        .await
        .unwrap_or_else(|_| panic!("the waiting candidate did not lead within {STEP:?}"))
        .expect("campaign task")
}

/// Revoke `leader`'s lease while a new candidate (`next`, campaigning
/// through `c`) waits; returns the new leader and the time from just
/// before the revoke until fencegate refused the deposed token (412).
/// Asserts the new leader is admitted at once after.
async fn depose(fg: &Fencegate, c: &Client, leader: Candidate, next: &str) -> (Candidate, Duration) {
    let waiting = campaign_behind(c, next).await;
    let old = leader.rev();
    let started = Instant::now();
    leader.revoke().await;
    let deadline = started + STEP;
    let refused = loop {
        let a = put(fg, "/orders/k", old).await;
        if !admitted(&a) {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "deposed token {old} still admitted {STEP:?} after its lease was revoked\n{}",
            log_tail(fg)
        );
    };
    let took = started.elapsed();
    assert!(
        fenced(&refused),
        "deposed token {old}: expected 412, got {refused:#?}\n{}",
        log_tail(fg)
    );
    let new = leads(waiting).await;
    assert!(new.rev() > old);
    assert_admitted(
        fg,
        &put(fg, "/orders/k", new.rev()).await,
        "the new leader's first write",
    );
    (new, took)
}

/// `WATCH_ROUNDS` depositions in a row, each noticed within `WATCH_BOUND`.
/// Returns the last leader and the measured times.
async fn assert_watch_delivers(
    fg: &Fencegate,
    c: &Client,
    mut leader: Candidate,
) -> (Candidate, Vec<Duration>) {
    let mut times = Vec::new();
    for round in 0..WATCH_ROUNDS {
        let (next, took) = depose(fg, c, leader, &format!("watch-round-{round}")).await;
        times.push(took);
        leader = next;
    }
    assert!(
        times.iter().all(|t| *t <= WATCH_BOUND),
        "depositions noticed after {times:?}: not all within {WATCH_BOUND:?}, so not by the watch \
         (a periodic read comes every {:?})\n{}",
        MAX_STALENESS / 3,
        log_tail(fg)
    );
    (leader, times)
}

/// Polls `/readyz` in a thread every 20 ms until stopped.
struct ReadyzPoller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, u16)>>,
}

impl ReadyzPoller {
    fn start(admin: String) -> ReadyzPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let status = http_get(&admin, "/readyz", Duration::from_secs(1)).map_or(0, |r| r.status);
                samples.push((Instant::now(), status));
                std::thread::sleep(POLL);
            }
            samples
        });
        ReadyzPoller { stop, thread }
    }

    /// Stop; the windows in which `/readyz` was not 200, each from its
    /// first such sample to the next 200 (or the last sample), relative
    /// to `since`; and the number of samples.
    fn finish(self, since: Instant) -> (Vec<(Duration, Duration)>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.join().expect("readyz poller");
        let mut windows = Vec::new();
        let mut open: Option<Instant> = None;
        for &(at, status) in &samples {
            match (status == 200, open) {
                (false, None) => open = Some(at),
                (true, Some(from)) => {
                    windows.push((from.saturating_duration_since(since), at - from));
                    open = None;
                }
                _ => {}
            }
        }
        if let (Some(from), Some(&(last, _))) = (open, samples.last()) {
            windows.push((from.saturating_duration_since(since), last - from));
        }
        (windows, samples.len())
    }
}

// ------------------------------------------------- a lost member, reject

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// SIGKILL: connections are refused at once.
    Kill,
    /// SIGSTOP: connections hang, no error ever comes.
    Pause,
}

/// SPEC.md: "while the view is older than max_staleness, writes in
/// election domains get 503 coordinator_unavailable" (with Retry-After),
/// /readyz is 503; after etcd returns, writes are admitted again, and the
/// watch (not only the periodic read) is back.
async fn outage_in_reject_mode(outage: Outage) {
    let nginx = Nginx::start();
    let mut etcd = Etcd::start();
    let fg = Fencegate::start(config(&nginx, &etcd.endpoints(), "reject"));
    let c = client(&etcd.endpoints()).await;
    let a = Candidate::campaign(&c, ELECTION, "a", LEASE_TTL).await;
    wait_view_leader(&fg, a.rev()).await;
    assert_admitted(&fg, &put(&fg, "/orders/k", a.rev()).await, "A before the outage");
    assert_eq!(readyz(&fg), 200, "/readyz before the outage\n{}", log_tail(&fg));
    assert_eq!(
        metric(&fg, "fencegate_etcd_up"),
        Some(1.0),
        "fencegate_etcd_up before the outage"
    );

    let lost = Instant::now();
    match outage {
        Outage::Kill => etcd.kill(),
        Outage::Pause => etcd.pause(),
    }
    // A's writes are admitted until the view is too old, then 503.
    let mut admitted_during = 0;
    let mut last_admitted = None;
    let refused = loop {
        let sent = lost.elapsed();
        let a_put = put(&fg, "/orders/k", a.rev()).await;
        if !admitted(&a_put) {
            break (sent, lost.elapsed(), a_put);
        }
        admitted_during += 1;
        last_admitted = Some(sent);
        assert!(
            lost.elapsed() < MAX_STALENESS + STEP,
            "A still admitted {:?} after etcd was lost ({outage:?})\n{}",
            lost.elapsed(),
            log_tail(&fg)
        );
        tokio::time::sleep(POLL).await;
    };
    let (sent, answered, first_refusal) = refused;
    let problem = assert_problem(&fg, &first_refusal, 503, "coordinator_unavailable");
    println!(
        "coordinator_faults[{outage:?}]: first 503 coordinator_unavailable for a write sent {sent:?} \
         (answered {answered:?}) after etcd was lost; {admitted_during} writes admitted before, the last \
         sent at {last_admitted:?}; Retry-After {:?}; problem {problem}",
        first_refusal.header("retry-after")
    );
    assert!(
        answered <= MAX_STALENESS + STALENESS_MARGIN,
        "writes refused only {answered:?} after etcd was lost ({outage:?}): more than max_staleness \
         {MAX_STALENESS:?} + {STALENESS_MARGIN:?}\n{}",
        log_tail(&fg)
    );
    // Nor too early: the last read before the loss started at most one
    // refresh period (max_staleness / 3) before it, and the view decides
    // until it is max_staleness old.
    let earliest = MAX_STALENESS - MAX_STALENESS / 3 - Duration::from_millis(100);
    assert!(
        sent >= earliest,
        "writes refused already {sent:?} after etcd was lost ({outage:?}), before the view could be \
         {MAX_STALENESS:?} old (reads come every {:?})\n{}",
        MAX_STALENESS / 3,
        log_tail(&fg)
    );
    for _ in 0..3 {
        let again = put(&fg, "/orders/k", a.rev()).await;
        assert_problem(&fg, &again, 503, "coordinator_unavailable");
    }
    let waited = wait_readyz(&fg, 503, Duration::from_millis(500)).await;
    let age = domain_view(&fg)["view_age_seconds"].as_f64();
    assert!(
        age.is_some_and(|s| s > MAX_STALENESS.as_secs_f64()),
        "/domains view_age_seconds {age:?} while writes get 503"
    );
    wait_metric(&fg, "fencegate_etcd_up", 0.0, STEP).await;
    println!(
        "coordinator_faults[{outage:?}]: /readyz 503 ({waited:?} after the first 503 write), view age \
         {age:?} s, fencegate_etcd_up 0 seen by {:?} after etcd was lost",
        lost.elapsed()
    );

    // etcd returns.
    let back = Instant::now();
    match outage {
        Outage::Kill => tokio::task::block_in_place(|| etcd.restart()),
        Outage::Pause => etcd.resume(),
    }
    let healthy = back.elapsed();
    let (took, seen) = until_admitted(&fg, a.rev(), back, Duration::from_secs(15)).await;
    let ready = wait_readyz(&fg, 200, STEP).await;
    let up = wait_metric(&fg, "fencegate_etcd_up", 1.0, STEP).await;
    println!(
        "coordinator_faults[{outage:?}]: etcd healthy {healthy:?} after restart/resume; A admitted again \
         {took:?} after it (answers before: {seen:?}); /readyz 200 {ready:?} and fencegate_etcd_up 1 \
         {up:?} after that"
    );

    // The watch is back: give fencegate two periodic reads' time to have
    // re-established it, then depose leaders and time the refusals.
    tokio::time::sleep(MAX_STALENESS * 2 / 3).await;
    let (last, times) = assert_watch_delivers(&fg, &c, a).await;
    println!("coordinator_faults[{outage:?}]: after recovery, depositions refused after {times:?}");
    assert_admitted(&fg, &put(&fg, "/orders/k", last.rev()).await, "the last leader");
    assert_eq!(readyz(&fg), 200, "/readyz at the end\n{}", log_tail(&fg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_killed_rejects_after_max_staleness_and_recovers_with_the_watch() {
    outage_in_reject_mode(Outage::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_hung_rejects_after_max_staleness_and_recovers_with_the_watch() {
    outage_in_reject_mode(Outage::Pause).await;
}

// ------------------------------------------------------------- compaction

/// Values written while fencegate is stopped: enough bytes to fill the
/// watch stream's HTTP/2 window (2 MiB), gRPC's send quota and etcd's
/// per-watcher buffer of 128 responses, so etcd drops the watcher to its
/// unsynced set, where a compaction past it cancels it as compacted.
/// Measured with a watch that is not read: 163 events of 64 KiB queue up,
/// then etcd answers "compacted"; 400 leaves a wide margin.
const FILL_PUTS: usize = 400;
const FILL_BYTES: usize = 64 * 1024;

/// SPEC.md: "On any watch error, cancel, disconnect or compaction: read
/// again, watch again". fencegate is frozen (SIGSTOP) while 400 × 64 KiB
/// of events pile up on its watch, the leader changes, and the history is
/// compacted; after SIGCONT (2 s later, so its view is stale) its watch
/// finds its revision compacted, and fencegate never admits the deposed
/// leader, admits the new one, and its new watch delivers the next
/// deposition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_behind_a_compaction_reads_again_and_keeps_fencing() {
    let nginx = Nginx::start();
    let etcd = Etcd::start();
    let fg = Fencegate::start(config(&nginx, &etcd.endpoints(), "reject"));
    let c = client(&etcd.endpoints()).await;
    let a = Candidate::campaign(&c, ELECTION, "a", LEASE_TTL).await;
    wait_view_leader(&fg, a.rev()).await;
    assert_admitted(&fg, &put(&fg, "/orders/k", a.rev()).await, "A before the freeze");
    let b_waiting = campaign_behind(&c, "b").await;
    let compacted_lines_before = fg.stderr_text().matches("compacted").count();

    let pid = i64::from(fg.pid().expect("fencegate runs"));
    send_signal(pid, "STOP");
    let frozen = Instant::now();
    // A candidate key younger than A and B (never the leader), rewritten
    // with large values, then deleted.
    let filler = format!("{ELECTION}/filler");
    let value = vec![b'f'; FILL_BYTES];
    let mut kv = client_with_timeout(&etcd.endpoints(), STEP).await;
    for i in 0..FILL_PUTS {
        kv.put(filler.as_str(), value.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("filler put {i}: {e}"));
    }
    let filled = frozen.elapsed();
    // The leader changes where only a read can see it.
    let a_rev = a.rev();
    a.revoke().await;
    let b = leads(b_waiting).await;
    kv.delete(filler.as_str(), None)
        .await
        .expect("delete the filler key");
    let compact_rev = etcd.compact_to_latest().await;
    // Frozen longer than max_staleness: when fencegate wakes, its view is
    // stale, so no write may be admitted on it (SPEC: reject mode).
    let until = frozen + MAX_STALENESS + Duration::from_millis(500);
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    let cont = Instant::now();
    send_signal(pid, "CONT");
    println!(
        "coordinator_faults[compaction]: fencegate frozen {:?}; {FILL_PUTS} puts of {FILL_BYTES} bytes \
         took {filled:?}; A ({a_rev}) revoked, B ({}) leads; compacted to {compact_rev}",
        cont - frozen,
        b.rev()
    );

    // The deposed leader is refused: 503 while the view is stale, then 412.
    let mut seen: Vec<String> = Vec::new();
    let refused = loop {
        let r = put(&fg, "/orders/k", a_rev).await;
        assert!(
            !admitted(&r),
            "deposed A ({a_rev}) admitted after the freeze\n{}",
            log_tail(&fg)
        );
        if fenced(&r) {
            break cont.elapsed();
        }
        assert!(
            unavailable(&r),
            "deposed A: unexpected answer {r:#?}\n{}",
            log_tail(&fg)
        );
        if !seen.contains(&brief(&r)) {
            seen.push(brief(&r));
        }
        assert!(
            cont.elapsed() < STEP,
            "A not refused with 412 within {STEP:?}\n{}",
            log_tail(&fg)
        );
        tokio::time::sleep(POLL).await;
    };
    let (b_took, b_seen) = until_admitted(&fg, b.rev(), cont, STEP).await;
    println!(
        "coordinator_faults[compaction]: after SIGCONT, A refused (412) at {refused:?} (before: {seen:?}); \
         B admitted at {b_took:?} (before: {b_seen:?})"
    );
    assert!(
        refused <= MAX_STALENESS,
        "the leader change was noticed {refused:?} after SIGCONT (max_staleness {MAX_STALENESS:?})"
    );

    // fencegate saw the compaction (SPEC's log line names it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = fg.stderr_text();
        if text.matches("compacted").count() > compacted_lines_before {
            let line = text
                .lines()
                .rfind(|l| l.contains("compacted"))
                .unwrap_or_default();
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with \"compacted\" within 10 s of SIGCONT: fencegate's watch never learned that \
             its start revision was compacted ({FILL_PUTS} × {FILL_BYTES} bytes queued)\n{}",
            log_tail(&fg)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "coordinator_faults[compaction]: seen {:?} after SIGCONT: {line}",
        cont.elapsed()
    );
    assert!(
        line.contains(&compact_rev.to_string()),
        "the compaction log line should name compact revision {compact_rev}: {line}"
    );

    // And the new watch delivers.
    tokio::time::sleep(MAX_STALENESS * 2 / 3).await;
    let (last, times) = assert_watch_delivers(&fg, &c, b).await;
    println!("coordinator_faults[compaction]: after the compaction, depositions refused after {times:?}");
    assert_admitted(&fg, &put(&fg, "/orders/k", last.rev()).await, "the last leader");
    assert_eq!(readyz(&fg), 200, "/readyz at the end\n{}", log_tail(&fg));
}

// -------------------------------------------------------------- a cluster

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Follower,
    RaftLeader,
}

/// SPEC.md: "Several endpoints (a cluster); losing a minority of members is
/// no outage." fencegate knows all three members; one is killed; it keeps
/// admitting the leader and fences a deposed one after a failover.
async fn lose_a_member(which: Member) {
    let nginx = Nginx::start();
    let mut cluster = tokio::task::block_in_place(|| EtcdCluster::start(3));
    let endpoints = cluster.endpoints();
    let fg = Fencegate::start(config(&nginx, &endpoints, "reject"));
    let c = client(&endpoints).await;
    let a = Candidate::campaign(&c, ELECTION, "a", LEASE_TTL).await;
    wait_view_leader(&fg, a.rev()).await;
    assert_admitted(&fg, &put(&fg, "/orders/k", a.rev()).await, "A before the kill");
    assert_eq!(readyz(&fg), 200);

    let raft_leader = cluster.raft_leader().await.expect("a raft leader");
    let victim = match which {
        Member::RaftLeader => raft_leader,
        Member::Follower => (0..3).find(|&i| i != raft_leader).expect("a follower"),
    };
    let rest: Vec<String> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| endpoints[i].clone())
        .collect();
    let poller = ReadyzPoller::start(fg.config().admin_listen.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let killed = Instant::now();
    cluster.kill_member(victim);
    // A keeps writing for two staleness periods.
    let mut refusals: Vec<(Duration, String)> = Vec::new();
    let mut writes = 0;
    while killed.elapsed() < MAX_STALENESS * 2 {
        let r = put(&fg, "/orders/k", a.rev()).await;
        writes += 1;
        if !admitted(&r) {
            refusals.push((killed.elapsed(), brief(&r)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writable = wait_writable(&rest, Duration::from_secs(10)).await;
    let (_, seen) = until_admitted(&fg, a.rev(), Instant::now(), STEP).await;
    assert!(
        seen.is_empty(),
        "A refused after the cluster was writable again: {seen:?}"
    );

    // A failover: B (through the survivors) takes over from A.
    let survivors = client(&rest).await;
    let (b, deposed) = depose(&fg, &survivors, a, "b").await;
    assert_admitted(&fg, &put(&fg, "/orders/k", b.rev()).await, "B after the failover");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (windows, samples) = poller.finish(killed);
    println!(
        "coordinator_faults[{which:?} m{} killed]: {writes} writes by A in {:?}, refused: {refusals:?}; \
         survivors writable {writable:?} after wait_writable started; /readyz not 200 in {windows:?} \
         (start after the kill, length) of {samples} samples; deposed A refused {deposed:?} after the revoke",
        victim + 1,
        MAX_STALENESS * 2
    );
    assert!(
        deposed <= MAX_STALENESS / 3,
        "deposed leader refused only after {deposed:?}"
    );
    assert_eq!(readyz(&fg), 200, "/readyz at the end\n{}", log_tail(&fg));
    match which {
        Member::Follower => {
            assert!(
                refusals.is_empty(),
                "writes refused after a follower died: {refusals:?}"
            );
            assert!(
                windows.is_empty(),
                "/readyz not 200 after a follower died: {windows:?}"
            );
        }
        Member::RaftLeader => {
            // Linearizable reads wait for a new raft leader (a follower
            // campaigns after 1–2 s, etcd's randomized election timeout),
            // and the last read before the kill started up to 500 ms
            // earlier: with max_staleness 1.5 s a short 503 window is
            // etcd's, not fencegate's. It must end soon after a leader is
            // elected (a read retry backs off at most 500 ms).
            let longest = windows.iter().map(|w| w.1).max().unwrap_or_default();
            assert!(
                longest <= MAX_STALENESS * 2,
                "/readyz not 200 for {longest:?} after the raft leader died: {windows:?}"
            );
            assert!(
                refusals.iter().all(|(_, r)| r == "503 coordinator_unavailable"),
                "A's refusals after the raft leader died: {refusals:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_follower_killed_is_no_outage() {
    lose_a_member(Member::Follower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_raft_leader_killed_keeps_fencing() {
    lose_a_member(Member::RaftLeader).await;
}

/// How long the leader keeps writing once a follower is lost: 16 periodic
/// reads, and in linearizable mode hundreds of confirmations. Each call is
/// sent to one member picked at random: a read that were not retried
/// would land on the lost follower once in three, and this many reads
/// show it (in every run before reads were retried).
const FOLLOWER_LOST_SPAN: Duration = Duration::from_secs(8);

/// The answers to writes sent one after another for `span`: the refusals
/// ("status reason", time since `since`) and each write's duration.
async fn keep_writing(
    fg: &Fencegate,
    token: i64,
    since: Instant,
    span: Duration,
) -> (Vec<(Duration, String)>, Vec<Duration>) {
    let started = Instant::now();
    let mut refusals = Vec::new();
    let mut took = Vec::new();
    while started.elapsed() < span {
        let sent = Instant::now();
        let r = put(fg, "/orders/k", token).await;
        took.push(sent.elapsed());
        if !admitted(&r) {
            refusals.push((since.elapsed(), brief(&r)));
        }
        tokio::time::sleep(POLL).await;
    }
    (refusals, took)
}

/// "p50 .. p99 .. max" of write durations, in ms.
fn latencies(took: &mut [Duration]) -> String {
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// SPEC.md: "losing a minority of members is no outage", for every read
/// fencegate makes. etcd-client sends each call to a member picked at
/// random, the lost one included, so a read must try again elsewhere
/// before it counts as failed: no write is refused, the view stays fresh
/// (/readyz 200), nothing says etcd is unreachable, and a write that waits
/// for a confirmation (linearizable mode) is answered well within the
/// refresh period (max_staleness / 3), the bound of one read.
async fn writes_with_a_follower_lost(consistency: &str, outage: Outage) {
    let nginx = Nginx::start();
    let mut cluster = tokio::task::block_in_place(|| EtcdCluster::start(3));
    let endpoints = cluster.endpoints();
    let fg = Fencegate::start(config_with(&nginx, &endpoints, "reject", consistency));
    let raft_leader = cluster.raft_leader().await.expect("a raft leader");
    let victim = (0..3).find(|&i| i != raft_leader).expect("a follower");
    // The writer's own client (its lease keep-alive) avoids the member about
    // to be lost: this test is about fencegate's reads, not the writer's.
    let rest: Vec<String> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| endpoints[i].clone())
        .collect();
    let c = client(&rest).await;
    let a = Candidate::campaign(&c, ELECTION, "a", LEASE_TTL).await;
    wait_view_leader(&fg, a.rev()).await;
    let (_, seen) = until_admitted(&fg, a.rev(), Instant::now(), STEP).await;
    assert!(seen.is_empty(), "A refused with every member up: {seen:?}");
    let (refused, mut took_before) = keep_writing(&fg, a.rev(), Instant::now(), Duration::from_secs(1)).await;
    assert!(refused.is_empty(), "A refused with every member up: {refused:?}");

    let poller = ReadyzPoller::start(fg.config().admin_listen.clone());
    let lost = Instant::now();
    match outage {
        Outage::Kill => cluster.kill_member(victim),
        Outage::Pause => cluster.pause_member(victim),
    }
    let (refused, mut took) = keep_writing(&fg, a.rev(), lost, FOLLOWER_LOST_SPAN).await;
    let (windows, samples) = poller.finish(lost);
    if outage == Outage::Pause {
        cluster.resume_member(victim);
    }
    let log = fg.stderr_text();
    let unreachable = log.matches("etcd unreachable").count();
    let writes = took.len();
    let slowest = took.iter().copied().max().unwrap_or_default();
    println!(
        "coordinator_faults[{consistency}, follower m{} {outage:?}]: {writes} writes by A in \
         {FOLLOWER_LOST_SPAN:?}, {} refused {:?}; write time {} (all members up: {}); /readyz not 200 in \
         {windows:?} of {samples} samples; \"etcd unreachable\" logged {unreachable} times",
        victim + 1,
        refused.len(),
        refused.iter().take(5).collect::<Vec<_>>(),
        latencies(&mut took),
        latencies(&mut took_before),
    );
    assert!(
        refused.is_empty(),
        "{} of {writes} writes by the leader refused with one follower of three {outage:?}: first {:?}\n{}",
        refused.len(),
        refused.iter().take(5).collect::<Vec<_>>(),
        log_tail(&fg)
    );
    assert!(
        windows.is_empty(),
        "/readyz not 200 with one follower of three {outage:?}: {windows:?}"
    );
    assert_eq!(
        unreachable,
        0,
        "\"etcd unreachable\" logged with a majority of members up\n{}",
        log_tail(&fg)
    );
    assert_eq!(metric(&fg, "fencegate_etcd_up"), Some(1.0), "fencegate_etcd_up");
    assert!(
        slowest <= MAX_STALENESS / 3,
        "a write took {slowest:?} with one follower {outage:?}: more than one read's bound ({:?})",
        MAX_STALENESS / 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_follower_killed_linearizable_writes_are_confirmed() {
    writes_with_a_follower_lost("linearizable", Outage::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_follower_hung_linearizable_writes_are_confirmed() {
    writes_with_a_follower_lost("linearizable", Outage::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_follower_hung_keeps_the_view_fresh() {
    writes_with_a_follower_lost("watch", Outage::Pause).await;
}

// ----------------------------------------------------- on_unavailable local

/// SPEC.md: `on_unavailable = "local"`: rules 1, 2, 4, 5 decide, a token
/// above the last confirmed leader revision is refused (503), /readyz stays
/// 200 while writes are served; once etcd is back, rule 3 applies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_mode_keeps_the_epoch_rule_while_etcd_is_down() {
    let nginx = Nginx::start();
    let mut etcd = Etcd::start();
    let fg = Fencegate::start(config(&nginx, &etcd.endpoints(), "local"));
    let c = client(&etcd.endpoints()).await;
    let a = Candidate::campaign(&c, ELECTION, "a", LEASE_TTL).await;
    let a_rev = a.rev();
    assert!(a_rev >= 2, "A's revision {a_rev}: A-1 must be a valid token");
    wait_view_leader(&fg, a_rev).await;
    assert_admitted(&fg, &put(&fg, "/orders/k", a_rev).await, "A before the outage");
    assert_eq!(domain_view(&fg)["epoch"].as_i64(), Some(a_rev), "epoch = A");

    let lost = Instant::now();
    etcd.kill();
    // A is admitted all along, also once the view is older than max_staleness.
    let mut statuses = Vec::new();
    while lost.elapsed() < MAX_STALENESS + STALENESS_MARGIN {
        let r = put(&fg, "/orders/k", a_rev).await;
        assert_admitted(
            &fg,
            &r,
            &format!("A {:?} after etcd was killed (local mode)", lost.elapsed()),
        );
        statuses.push(r.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let age = domain_view(&fg)["view_age_seconds"].as_f64();
    assert!(
        age.is_some_and(|s| s > MAX_STALENESS.as_secs_f64()),
        "view age {age:?} s: not stale yet"
    );

    let fresh = put(&fg, "/orders/fresh-during-outage", a_rev).await;
    assert_eq!(
        (fresh.status, reason(&fresh)),
        (201, None),
        "A's write to a new path: {fresh:#?}"
    );
    let below = put(&fg, "/orders/k", a_rev - 1).await;
    assert_problem(&fg, &below, 412, "stale_epoch");
    let asked = Instant::now();
    let above = put(&fg, "/orders/k", a_rev + 5).await;
    let above_took = asked.elapsed();
    let problem = assert_problem(&fg, &above, 503, "coordinator_unavailable");
    assert_eq!(
        readyz(&fg),
        200,
        "/readyz in local mode while writes are served\n{}",
        log_tail(&fg)
    );
    let up = wait_metric(&fg, "fencegate_etcd_up", 0.0, STEP).await;
    assert_eq!(
        domain_view(&fg)["epoch"].as_i64(),
        Some(a_rev),
        "the epoch did not move"
    );
    println!(
        "coordinator_faults[local]: {} writes by A admitted during {:?} without etcd; view age {age:?} s; \
         A-1 412 stale_epoch, A+5 503 in {above_took:?} ({}, Retry-After {:?}); fencegate_etcd_up 0 \
         (polled {up:?})",
        statuses.len(),
        lost.elapsed(),
        problem["detail"],
        above.header("retry-after")
    );

    // etcd returns: rule 3 again. A+5 is no candidate: 412 not_leader.
    let back = Instant::now();
    tokio::task::block_in_place(|| etcd.restart());
    let healthy = back.elapsed();
    let mut seen: Vec<String> = Vec::new();
    let not_leader = loop {
        let r = put(&fg, "/orders/k", a_rev + 5).await;
        assert!(!admitted(&r), "A+5 admitted after etcd returned: {r:#?}");
        if r.status == 412 {
            assert_problem(&fg, &r, 412, "not_leader");
            break back.elapsed();
        }
        assert!(
            unavailable(&r),
            "A+5: unexpected answer {r:#?}\n{}",
            log_tail(&fg)
        );
        if !seen.contains(&brief(&r)) {
            seen.push(brief(&r));
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "A+5 still 503 after 15 s\n{}",
            log_tail(&fg)
        );
        tokio::time::sleep(POLL).await;
    };
    assert_admitted(&fg, &put(&fg, "/orders/k", a_rev).await, "A after etcd returned");
    wait_readyz(&fg, 200, STEP).await;
    wait_metric(&fg, "fencegate_etcd_up", 1.0, STEP).await;
    tokio::time::sleep(MAX_STALENESS * 2 / 3).await;
    let (b, deposed) = depose(&fg, &c, a, "b").await;
    println!(
        "coordinator_faults[local]: etcd healthy {healthy:?} after restart; A+5 412 not_leader at \
         {not_leader:?} (before: {seen:?}); deposed A refused {deposed:?} after the revoke"
    );
    assert!(
        deposed <= WATCH_BOUND,
        "deposition noticed after {deposed:?}\n{}",
        log_tail(&fg)
    );
    assert_admitted(&fg, &put(&fg, "/orders/k", b.rev()).await, "B");
}

// ------------------------------------ the view's last word; large candidates

/// In `local` mode, a leader whose key fencegate saw deleted (the
/// election left without a candidate, so nothing fenced ahead) stays
/// refused once etcd cannot be reached. fencegate knew it was deposed: its
/// view said "no candidate", and it answered 412 `no_leader` a moment
/// before; the token cannot lead again (a new campaign gets a new
/// revision). (Found by review: it was admitted again, since its token
/// equals the highest leader seen and the epoch, which was all local mode
/// checked.) The first write below comes while the view is still fresh
/// (within `max_staleness` of its last read); only its confirmation fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_mode_refuses_a_leader_seen_deposed_without_successor() {
    let nginx = Nginx::start();
    let mut etcd = Etcd::start();
    let fg = Fencegate::start(config(&nginx, &etcd.endpoints(), "local"));
    let c = client(&etcd.endpoints()).await;
    let a = Candidate::campaign(&c, ELECTION, "a", LEASE_TTL).await;
    let a_rev = a.rev();
    wait_view_leader(&fg, a_rev).await;
    assert_admitted(&fg, &put(&fg, "/orders/k", a_rev).await, "A while it leads");

    // A's lease is revoked (its writer paused past its TTL, say): the
    // election has no candidate, and fencegate sees it.
    a.revoke().await;
    wait_view_shows(&fg, None).await;
    let refused = put(&fg, "/orders/k", a_rev).await;
    assert_problem(&fg, &refused, 412, "no_leader");

    // etcd becomes unreachable; the deposed writer carries on.
    etcd.kill();
    let lost = Instant::now();
    let mut admitted_at = Vec::new();
    while lost.elapsed() < MAX_STALENESS + STALENESS_MARGIN {
        let r = put(&fg, "/orders/k", a_rev).await;
        if admitted(&r) {
            admitted_at.push(lost.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        admitted_at.is_empty(),
        "token {a_rev}, seen deposed (no candidate) by fencegate, was admitted {} times after etcd \
         went away (first {:?} after, view age then well under max_staleness {MAX_STALENESS:?})\n{}",
        admitted_at.len(),
        admitted_at.first(),
        log_tail(&fg)
    );
}

/// Candidates whose values are large (each within etcd's 1.5 MiB request
/// limit, together over the gRPC client's 4 MiB decoding limit) do not
/// keep the watch from starting: values are no part of the election (only
/// keys and create revisions), and depositions are still noticed through
/// the watch. (Found by review: the watcher's read of every candidate
/// fetched their values and failed every cycle, so fence ahead and the
/// refusal of a deposed leader waited for the periodic read, up to
/// `max_staleness / 3`, and each failed read was retried at once and then
/// every hedge delay, each attempt fetching the whole prefix again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_candidate_values_do_not_keep_the_watch_from_starting() {
    const BIG: usize = 1_000_000;
    let nginx = Nginx::start();
    let etcd = Etcd::start();
    let c = client(&etcd.endpoints()).await;
    let a = Candidate::campaign(&c, ELECTION, "a", LEASE_TTL).await;
    let mut waiting = std::collections::VecDeque::new();
    for i in 0..8 {
        let value = format!("{i}{}", "v".repeat(BIG));
        waiting.push_back(campaign_behind(&c, &value).await);
    }
    // fencegate starts with the candidates in place: its watcher's first
    // read is of all of them (about 8 MB).
    let fg = Fencegate::start(config(&nginx, &etcd.endpoints(), "reject"));
    wait_view_leader(&fg, a.rev()).await;
    assert_admitted(&fg, &put(&fg, "/orders/k", a.rev()).await, "A");
    // Give the watcher time to start over and fail (or succeed).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut leader = a;
    let mut times = Vec::new();
    for round in 0..4 {
        let old = leader.rev();
        let started = Instant::now();
        leader.revoke().await;
        loop {
            let r = put(&fg, "/orders/k", old).await;
            if !admitted(&r) {
                assert!(
                    fenced(&r),
                    "round {round}: deposed {old}: {r:#?}\n{}",
                    log_tail(&fg)
                );
                break;
            }
            assert!(started.elapsed() < STEP, "deposed {old} admitted for {STEP:?}");
        }
        times.push(started.elapsed());
        leader = leads(waiting.pop_front().expect("a candidate")).await;
        assert_admitted(&fg, &put(&fg, "/orders/k", leader.rev()).await, "the new leader");
    }
    assert!(
        times.iter().all(|t| *t <= WATCH_BOUND),
        "depositions noticed after {times:?}: not all within {WATCH_BOUND:?}, so not by the watch \
         (a periodic read comes every {:?})\n{}",
        MAX_STALENESS / 3,
        log_tail(&fg)
    );
}

/// `/readyz` in local mode is 200 "while writes are being served" (SPEC.md,
/// Admin listener). At start fencegate waits up to `max_staleness` for
/// etcd before it serves, writes waiting in the listen backlog meanwhile;
/// with etcd away, local mode answered 200 through that wait, so a load
/// balancer sent writes that hung for up to `max_staleness` (found by
/// review: 200 at once, a write answered after 4.5 s). It is 503 until
/// the proxy serves, and 200 once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_mode_is_not_ready_while_the_start_waits_for_etcd() {
    let nginx = Nginx::start();
    // Nothing listens there: etcd never answers.
    let nowhere = [format!("http://127.0.0.1:{}", crate::support::free_port())];
    // A start wait long enough that a loaded machine cannot miss it.
    let wait = Duration::from_secs(5);
    let fg = Fencegate::start(
        FencegateConfig::new(&nginx.url())
            .etcd_raw(&format!(
                "endpoints = [\"{}\"]\non_unavailable = \"local\"\nmax_staleness = \"{}\"",
                nowhere[0],
                format_duration(wait)
            ))
            .election_domain(DOMAIN, PREFIX, ELECTION),
    );
    // Fencegate::start returns once /healthz answers, well within the
    // wait for etcd.
    let r = fg.admin_get("/readyz");
    assert_eq!(
        r.status,
        503,
        "/readyz while the proxy does not serve yet: {r:?}\n{}",
        log_tail(&fg)
    );
    wait_readyz(&fg, 200, wait + STEP).await;
    // Served now, not held in the backlog for what is left of the wait.
    let started = Instant::now();
    let answer = put(&fg, "/orders/k", 1).await;
    assert!(answer.status != 0, "no answer: {answer:?}");
    assert!(
        started.elapsed() < wait / 2,
        "/readyz said 200 but a write took {:?}",
        started.elapsed()
    );
}
