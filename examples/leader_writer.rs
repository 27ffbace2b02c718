//! A leader that writes through fencegate: what a real service does with etcd.
//!
//! Copy this when you write a service whose leader writes to a store that
//! fencegate guards. The life of one writer, in order:
//!
//! 1. connect to etcd and grant a **session lease** (`--ttl`), kept alive
//!    in a background task every ttl/3;
//! 2. **campaign** on the election prefix (`--election`) with `--name` as
//!    the value, and wait until this writer leads;
//! 3. take the leader key's create revision (`LeaderKey::rev`) as the
//!    **fencing token**: it is what fencegate compares with the leader it
//!    sees in etcd, and it grows with every new leader;
//! 4. **write** through fencegate with the token in the fencing header, and
//!    stop at once when fencegate says this writer is fenced (412 with a
//!    `Fencegate-Reason` of `stale_epoch`, `superseded_leader`,
//!    `not_leader` or `no_leader`); retry a 503 after its `Retry-After`;
//! 5. on the way out, **resign** and **revoke the lease**, so the next
//!    leader does not wait for the TTL to run out.
//!
//! Watching your own lease is not enough: a process that stalls (a GC
//! pause, a stopped VM, a slow disk) wakes up believing it still leads and
//! sends the write it was about to send. `--pause-after K --pause-ms M`
//! plays exactly that: after K writes it stops its keep-alive and sleeps
//! M ms, long enough for the lease to expire and another writer to win,
//! then carries on with its old token. Only the store's side can refuse
//! that write, which is what fencegate is for. (A real stop, SIGSTOP then
//! SIGCONT, races the lease watchdog's expired timer against the write
//! loop: sometimes the watchdog wins and the writer stops without writing.
//! Watching the lease catches some stalls, never all.)
//!
//! # Running it
//!
//! With etcd on 127.0.0.1:2379 and fencegate on 127.0.0.1:8080 guarding
//! `/orders/` with `election = "/orders-service/leader"`:
//!
//! ```text
//! cargo run --example leader_writer -- --etcd http://127.0.0.1:2379 \
//!     --election /orders-service/leader --name A --writes 0 \
//!     --ttl 2 --pause-after 3 --pause-ms 5000
//! # in a second terminal, while A pauses:
//! cargo run --example leader_writer -- --etcd http://127.0.0.1:2379 \
//!     --election /orders-service/leader --name B --writes 5
//! ```
//!
//! `--etcd` may be repeated or comma-separated (`--etcd URL1,URL2,URL3`).
//! `--help` lists every option with its default.
//!
//! # Output
//!
//! One line per event on stdout, each starting with `NAME: `, e.g.
//!
//! ```text
//! A: campaigning on /orders-service/leader (lease 694d8c2a1f0b6e04, ttl 2s)
//! A: elected token=123
//! A: write /orders/A-1 token=123 -> 201
//! A: pausing 5000ms (lease keep-alive stopped)
//! A: resumed after 5000ms, still writing with token=123
//! A: fenced: 412 stale_epoch (token 123, epoch 130, leader 130)
//! A: resigned
//! A: lease revoked
//! ```
//!
//! # Exit codes
//!
//! - `0`: every write was done (`--writes N`), or the writer was stopped by
//!   Ctrl-C / SIGTERM;
//! - `2`: fenced: fencegate refused a write because this writer no longer
//!   leads, or the lease was lost (expired, or no keep-alive answer for a
//!   whole TTL);
//! - `1`: any other error (etcd unreachable, a refusal that means the
//!   request is wrong, 503 retries exhausted, the store failed, ...).

use clap::Parser;
use etcd_client::{Client, ConnectOptions, LeaderKey, ResignOptions};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on one etcd request that must not hang (grant, resign, revoke).
/// The campaign itself is never bounded: waiting is its job.
const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one write through fencegate, response head and body.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured; a larger one is shortened to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The command line.
#[derive(Parser, Debug)]
#[command(about = "A leader that writes through fencegate with its etcd election revision as token")]
struct Args {
    /// etcd endpoint URL; repeat the option or separate URLs with commas.
    #[arg(long = "etcd", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,

    /// Session lease TTL in seconds: how long the leadership survives this
    /// process once its keep-alives stop.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..))]
    ttl: i64,

    /// The election prefix P (fencegate's `election` for the domain).
    #[arg(long)]
    election: String,

    /// This writer's name: the election value, the output prefix, and part
    /// of every key it writes.
    #[arg(long)]
    name: String,

    /// fencegate's listener.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    proxy: String,

    /// Keys written are PATH_PREFIX + NAME + "-" + i.
    #[arg(long, default_value = "/orders/")]
    path_prefix: String,

    /// The fencing header (fencegate's `[fencing] header`).
    #[arg(long, default_value = "Fencing-Token")]
    header: String,

    /// How many writes; 0 writes until fenced or stopped.
    #[arg(long, default_value_t = 10)]
    writes: u64,

    /// Time between writes: "200ms", "2s", "1.5s" (a bare number is ms).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    interval: Duration,

    /// After this many writes, simulate a process pause (see --pause-ms).
    #[arg(long, requires = "pause_ms")]
    pause_after: Option<u64>,

    /// How long the pause lasts, in ms. The lease keep-alive stops for good
    /// when the pause starts, as in a process that stalls mid-loop.
    #[arg(long, requires = "pause_after")]
    pause_ms: Option<u64>,

    /// How many times one write is retried after a 503 from fencegate.
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
}

/// How a run ended; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Every write done, or stopped by a signal: exit 0.
    Done,
    /// This writer no longer leads: exit 2.
    Fenced,
    /// Anything else went wrong: exit 1.
    Failed,
}

/// The one place that prints: every line starts with `NAME: `.
#[derive(Clone)]
struct Say {
    name: String,
}

impl Say {
    fn line(&self, message: impl std::fmt::Display) {
        // Rust's stdout is line-buffered: each line is out when printed,
        // even into a pipe, so a test can follow the writer live.
        println!("{}: {message}", self.name);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let say = Say {
        name: args.name.clone(),
    };
    let stop = CancellationToken::new();
    tokio::spawn(cancel_on_signal(stop.clone()));

    match run(&args, &say, &stop).await {
        Outcome::Done => ExitCode::SUCCESS,
        Outcome::Fenced => ExitCode::from(2),
        Outcome::Failed => ExitCode::from(1),
    }
}

/// The writer's whole life: lease, campaign, writes, and the clean-up that
/// follows whatever ended the writes.
async fn run(args: &Args, say: &Say, stop: &CancellationToken) -> Outcome {
    // No request timeout on this client: `ConnectOptions::with_timeout`
    // would also cancel a campaign that is still waiting for an older
    // leader to go, and a cancelled campaign deletes our candidate key.
    // Requests that must not hang are bounded one by one instead.
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
    let client = match Client::connect(&args.etcd, Some(options)).await {
        Ok(client) => client,
        Err(e) => {
            say.line(format_args!("error: connect to etcd {:?}: {e}", args.etcd));
            return Outcome::Failed;
        }
    };

    let lease_id = match bounded(client.clone().lease_grant(args.ttl, None)).await {
        Ok(resp) => resp.id(),
        Err(e) => {
            say.line(format_args!("error: lease grant (ttl {}s): {e}", args.ttl));
            return Outcome::Failed;
        }
    };
    let (lost_tx, lost_rx) = watch::channel(None);
    let keepalive = tokio::spawn(keep_lease_alive(client.clone(), lease_id, args.ttl, lost_tx));

    say.line(format_args!(
        "campaigning on {} (lease {lease_id:x}, ttl {}s)",
        args.election, args.ttl
    ));
    let mut campaigner = client.clone();
    let campaign = campaigner.campaign(args.election.as_str(), args.name.as_str(), lease_id);
    let mut lost = lost_rx.clone();
    let leader = tokio::select! {
        result = campaign => match result.map(|mut r| r.take_leader()) {
            Ok(Some(leader)) => Some(leader),
            Ok(None) => {
                say.line("error: campaign answered without a leader key");
                None
            }
            Err(e) => {
                say.line(format_args!("error: campaign on {}: {e}", args.election));
                None
            }
        },
        // Dropping the campaign makes etcd delete our candidate key.
        _ = stop.cancelled() => {
            say.line("interrupted while campaigning");
            None
        }
        why = lease_lost(&mut lost) => {
            say.line(format_args!("lease lost while campaigning: {why}"));
            None
        }
    };

    let mut keepalive = Some(keepalive);
    let outcome = match &leader {
        Some(leader) => {
            // The leader key's create revision is the token: etcd orders all
            // revisions, so every later leader's token is higher. (A
            // campaign can even return after our key is gone, e.g. when the
            // lease ran out while we waited; we need not check: fencegate
            // asks etcd and refuses that token with `not_leader`.)
            let token = leader.rev();
            say.line(format_args!("elected token={token}"));
            let writer = Writer::new(args, say, token);
            writer.write_all(&mut keepalive, lost_rx, stop).await
        }
        None if stop.is_cancelled() => Outcome::Done,
        None => Outcome::Failed,
    };

    if let Some(task) = keepalive.take() {
        task.abort();
    }
    give_up_leadership(&client, leader, lease_id, say).await;
    outcome
}

/// Writes through fencegate with one token.
struct Writer<'a> {
    args: &'a Args,
    say: &'a Say,
    http: reqwest::Client,
    token: i64,
}

/// What fencegate said to one write.
enum WriteResult {
    /// The store took it.
    Stored,
    /// Stop: see the outcome.
    Stop(Outcome),
}

impl<'a> Writer<'a> {
    fn new(args: &'a Args, say: &'a Say, token: i64) -> Writer<'a> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(WRITE_TIMEOUT)
            .build()
            .expect("build the HTTP client");
        Writer {
            args,
            say,
            http,
            token,
        }
    }

    /// The write loop: `--writes` writes (or until fenced / stopped), every
    /// `--interval`, with the pause of `--pause-after` in the middle.
    async fn write_all(
        &self,
        keepalive: &mut Option<JoinHandle<()>>,
        mut lost: watch::Receiver<Option<String>>,
        stop: &CancellationToken,
    ) -> Outcome {
        let mut i: u64 = 0;
        loop {
            if self.args.writes != 0 && i >= self.args.writes {
                return Outcome::Done;
            }
            if i > 0 {
                // A writer that knows it lost its lease stops before the
                // next write. fencegate is there for the writer that does
                // not know yet (see the pause below).
                tokio::select! {
                    _ = tokio::time::sleep(self.args.interval) => {}
                    _ = stop.cancelled() => {
                        self.say.line(format_args!("interrupted after {i} writes"));
                        return Outcome::Done;
                    }
                    why = lease_lost(&mut lost) => {
                        self.say.line(format_args!("fenced: lease lost ({why})"));
                        return Outcome::Fenced;
                    }
                }
            }
            if Some(i) == self.args.pause_after {
                if let Some(outcome) = self.pause(keepalive, stop).await {
                    return outcome;
                }
            }
            i += 1;
            match self.write_one(i, stop).await {
                WriteResult::Stored => {}
                WriteResult::Stop(outcome) => return outcome,
            }
        }
    }

    /// Simulate a stalled process: the keep-alive stops (its timer does not
    /// fire while the process is frozen) and nothing happens for
    /// `--pause-ms`. Then the loop carries on with the old token, as a
    /// process waking up mid-loop does: the write it was about to send goes
    /// out before any news about its lease could reach it. `Some` when
    /// stopped by a signal during the pause.
    async fn pause(
        &self,
        keepalive: &mut Option<JoinHandle<()>>,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        let ms = self.args.pause_ms.unwrap_or(0);
        if let Some(task) = keepalive.take() {
            task.abort();
        }
        self.say
            .line(format_args!("pausing {ms}ms (lease keep-alive stopped)"));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = stop.cancelled() => {
                self.say.line("interrupted while paused");
                return Some(Outcome::Done);
            }
        }
        self.say.line(format_args!(
            "resumed after {ms}ms, still writing with token={}",
            self.token
        ));
        None
    }

    /// One PUT of `PATH_PREFIX NAME-i`, retried after 503s (at most
    /// `--max-retries` times, each wait bounded by `MAX_RETRY_AFTER`).
    async fn write_one(&self, i: u64, stop: &CancellationToken) -> WriteResult {
        let path = format!("{}{}-{i}", self.args.path_prefix, self.args.name);
        let url = format!("{}{path}", self.args.proxy.trim_end_matches('/'));
        let body = format!(
            "{{\"writer\":{},\"seq\":{i},\"token\":{}}}\n",
            serde_json::Value::from(self.args.name.as_str()),
            self.token
        );
        let mut retries = 0;
        loop {
            let sent = self
                .http
                .put(&url)
                .header(self.args.header.as_str(), self.token.to_string())
                .header("Content-Type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(e) => {
                    // Never retried: the store may or may not have it.
                    self.say.line(format_args!("error: write {path}: {e}"));
                    return WriteResult::Stop(Outcome::Failed);
                }
            };
            let status = response.status();
            let reason = header_text(&response, "fencegate-reason");
            let retry_after = header_text(&response, "retry-after");
            let problem = response.text().await.unwrap_or_default();

            if status.is_success() {
                self.say.line(format_args!(
                    "write {path} token={} -> {}",
                    self.token,
                    status.as_u16()
                ));
                return WriteResult::Stored;
            }
            match (status.as_u16(), reason.as_deref()) {
                // Fenced: another writer leads (or none does). Stop at once;
                // campaigning again is the only way back.
                (412, Some(r @ ("stale_epoch" | "superseded_leader" | "not_leader" | "no_leader"))) => {
                    self.say.line(format_args!(
                        "fenced: 412 {r} ({})",
                        fenced_detail(self.token, &problem)
                    ));
                    return WriteResult::Stop(Outcome::Fenced);
                }
                // fencegate cannot decide right now (etcd unreachable, state
                // file failing): nothing was forwarded, so retrying is safe.
                (503, Some(r)) if retries < self.args.max_retries => {
                    retries += 1;
                    let wait = retry_delay(retry_after.as_deref());
                    self.say.line(format_args!(
                        "write {path} token={} -> 503 {r}, retry {retries}/{} in {}ms",
                        self.token,
                        self.args.max_retries,
                        wait.as_millis()
                    ));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => {
                            self.say.line(format_args!("interrupted while retrying {path}"));
                            return WriteResult::Stop(Outcome::Done);
                        }
                    }
                }
                // Anything else: a request fencegate calls wrong (no_domain,
                // malformed_token, ...), retries exhausted, or the store's
                // own failure (no Fencegate-Reason). For 502/504 the store's
                // outcome is unknown.
                (code, reason) => {
                    let after = if code == 503 && retries > 0 {
                        format!(" after {retries} retries")
                    } else {
                        String::new()
                    };
                    self.say.line(format_args!(
                        "error: write {path} token={} -> {code} {}{after}: {}",
                        self.token,
                        reason.unwrap_or("(from the store)"),
                        one_line(&problem)
                    ));
                    return WriteResult::Stop(Outcome::Failed);
                }
            }
        }
    }
}

/// "token 123, epoch 130, leader 130" from a refusal's problem+json body
/// (fields `epoch` and `leader`, each shown when present).
fn fenced_detail(token: i64, problem: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(problem).unwrap_or_default();
    let mut detail = format!("token {token}");
    for field in ["epoch", "leader"] {
        if let Some(value) = json.get(field).filter(|v| !v.is_null()) {
            detail += &format!(", {field} {value}");
        }
    }
    detail
}

/// `Retry-After` in seconds (fencegate sends an integer), at least 100 ms
/// and at most `MAX_RETRY_AFTER`; 1 s when absent or unreadable.
fn retry_delay(retry_after: Option<&str>) -> Duration {
    let secs = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs).clamp(Duration::from_millis(100), MAX_RETRY_AFTER)
}

fn header_text(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A response body on one line, shortened: for error messages.
fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(300) {
        Some((at, _)) => format!("{}...", &flat[..at]),
        None => flat,
    }
}

/// Keep `lease_id` alive every ttl/3 until aborted. Reports on `lost` (and
/// returns) when etcd says the lease is gone, or when no keep-alive has
/// been answered for a whole TTL: the lease may have expired by then, so
/// the writer must not assume it still leads. Errors in between (an etcd
/// member restarting) reopen the keep-alive stream.
async fn keep_lease_alive(
    mut client: Client,
    lease_id: i64,
    ttl_secs: i64,
    lost: watch::Sender<Option<String>>,
) {
    let ttl = Duration::from_secs(ttl_secs as u64);
    let period = ttl / 3;
    let mut stream = None;
    // A keep-alive refreshes the lease when etcd receives it; counting from
    // when it was sent errs on the safe side.
    let mut refreshed = Instant::now();
    loop {
        let sent = Instant::now();
        // Every step of a round, reconnecting included, is bounded by the
        // moment the lease would run out without it.
        let lease_end = tokio::time::Instant::from_std(refreshed + ttl);
        let round = tokio::time::timeout_at(lease_end, async {
            let (keeper, responses) = match &mut stream {
                Some(open) => open,
                None => stream.insert(client.lease_keep_alive(lease_id).await?),
            };
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match round {
            Err(_) => {
                let _ = lost.send(Some(format!("no keep-alive answer for {ttl_secs}s")));
                return;
            }
            Ok(Ok(Some(resp))) if resp.ttl() <= 0 => {
                let _ = lost.send(Some("lease expired".to_string()));
                return;
            }
            Ok(Ok(Some(_))) => {
                refreshed = sent;
                tokio::time::sleep(period.saturating_sub(sent.elapsed())).await;
            }
            // The stream ended or failed: open a new one shortly.
            Ok(Ok(None)) | Ok(Err(_)) => {
                stream = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Resolves with the reason once the keep-alive task reports the lease
/// lost; never resolves if it does not (or has been stopped).
async fn lease_lost(lost: &mut watch::Receiver<Option<String>>) -> String {
    match lost.wait_for(Option::is_some).await {
        Ok(why) => why.clone().unwrap_or_default(),
        Err(_) => std::future::pending().await,
    }
}

/// Resign (if this writer was elected) and revoke the lease, so the next
/// candidate takes over at once instead of after the TTL. Errors are
/// reported and otherwise ignored: a writer that was fenced usually holds
/// nothing any more, and etcd's resign only deletes the key if it is still
/// this leader's (same key, same create revision).
async fn give_up_leadership(client: &Client, leader: Option<LeaderKey>, lease_id: i64, say: &Say) {
    if let Some(leader) = leader {
        let options = ResignOptions::new().with_leader(leader);
        match bounded(client.clone().resign(Some(options))).await {
            Ok(_) => say.line("resigned"),
            Err(e) => say.line(format_args!("resign: {e} (ignored)")),
        }
    }
    match bounded(client.clone().lease_revoke(lease_id)).await {
        Ok(_) => say.line("lease revoked"),
        Err(e) if e.contains("lease not found") => say.line("lease already expired"),
        Err(e) => say.line(format_args!("lease revoke: {e} (ignored)")),
    }
}

/// An etcd request bounded by `ETCD_REQUEST_TIMEOUT`.
async fn bounded<T>(
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, request).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {ETCD_REQUEST_TIMEOUT:?}")),
    }
}

/// Cancel `stop` on Ctrl-C (SIGINT) or SIGTERM.
async fn cancel_on_signal(stop: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
}

/// "200ms", "2s", "1.5s", or a bare number of milliseconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        (text, 1e-3)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 200ms or 2s"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a duration like 200ms or 2s"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}
