//! The measurements of `bench/run` that wrk cannot make. Not an example of
//! how to use fencegate (see `leader_writer.rs` for that): a small blocking
//! HTTP/1.1 client over keep-alive connections, and subcommands that
//! print their results as markdown tables.
//!
//! - `failover`: a chain of etcd candidates under an election prefix; a
//!   probe thread sends the leader's token as fast as one keep-alive
//!   connection allows; the leader's lease is revoked, and the time from
//!   etcd's answer to the revoke to the probe's first 412 is recorded, for
//!   every failover.
//! - `raise`: durable raises, one at a time (each write carries epoch + 1)
//!   against writes at the current epoch; then bursts of concurrent raises
//!   released together, with the commits each burst used (from
//!   `fencegate_epoch_persist_seconds_count`).
//! - `idle`: opens N keep-alive connections, sends one GET on each, and
//!   holds them, so the proxy's RSS can be read meanwhile.
//! - `startup`: time from exec of `fencegate run` to `/readyz` 200.
//! - `etcd-reads`: what one read costs etcd, with nothing else running:
//!   sequential reads of an election prefix as fencegate's reader makes
//!   them, and serializable ones, timed, with etcd's CPU time read from
//!   `/proc` around them.
//! - `open-loop`: fenced writes that arrive at their own pace (Poisson, at
//!   a set rate), not in answer to the last ones as wrk's do; latency is
//!   counted from when each write was due, so a write that waits for a
//!   free connection counts its wait. Each connection's thread sleeps until
//!   its write is due, and Linux wakes it some 50 to 100 µs late: that is
//!   in every sample, and a large share of watch mode's.
//!
//! Every loop is bounded in count and time; every address is loopback.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use etcd_client::{Client, GetOptions, PutOptions, SortOrder, SortTarget};

/// The body of every write: 128 bytes, as in the wrk runs.
const BODY: [u8; 128] = [b'x'; 128];
/// Bound on any single reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "fencegate benchmark client (used by bench/run)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Failover detection time: etcd revoke answered → first 412.
    Failover(FailoverArgs),
    /// Durable raise latency, alone and in concurrent bursts.
    Raise(RaiseArgs),
    /// Hold N idle keep-alive connections (each sent one GET).
    Idle(IdleArgs),
    /// Time from exec to /readyz 200.
    Startup(StartupArgs),
    /// Wall and etcd CPU time per read, one read at a time.
    EtcdReads(EtcdReadsArgs),
    /// Fenced writes at a set rate, each arriving independently.
    OpenLoop(OpenLoopArgs),
}

#[derive(Args, Debug)]
struct FailoverArgs {
    /// etcd client URL.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// The election prefix P of the fencegate domain that `--path` lies in.
    #[arg(long)]
    election: String,
    /// fencegate's proxy listener.
    #[arg(long)]
    proxy: SocketAddr,
    /// The path the probe writes to.
    #[arg(long, default_value = "/bench/probe")]
    path: String,
    /// How many failovers.
    #[arg(long, default_value_t = 100)]
    failovers: usize,
    /// Probe connections, one thread each, all sending the leader's token.
    #[arg(long, default_value_t = 1)]
    probes: usize,
    /// Successful probe writes with a new leader's token before its lease
    /// is revoked (the probe is at full speed by then).
    #[arg(long, default_value_t = 100)]
    warm_writes: u64,
    /// The probe rate the run must reach (writes/s); below it, exit 1.
    #[arg(long, default_value_t = 2000.0)]
    min_rate: f64,
}

#[derive(Args, Debug)]
struct RaiseArgs {
    /// fencegate's proxy listener.
    #[arg(long)]
    proxy: SocketAddr,
    /// fencegate's admin listener (for /metrics).
    #[arg(long)]
    admin: SocketAddr,
    /// The domain `--path` lies in (its `fencegate_epoch` is read first).
    #[arg(long, default_value = "raise")]
    domain: String,
    /// The path written to.
    #[arg(long, default_value = "/raise/obj")]
    path: String,
    /// Sequential raises (each followed by a write at the new epoch).
    #[arg(long, default_value_t = 500)]
    sequential: usize,
    /// Bursts of concurrent raises, of each kind (distinct, same token).
    #[arg(long, default_value_t = 20)]
    bursts: usize,
    /// Writers per burst.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Args, Debug)]
struct IdleArgs {
    /// The proxy to hold connections to.
    #[arg(long)]
    target: SocketAddr,
    /// How many connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The path each connection GETs once.
    #[arg(long, default_value = "/bench/idle")]
    path: String,
    /// How long to hold them at most (the caller normally kills us first).
    #[arg(long, default_value_t = 60)]
    hold_secs: u64,
}

#[derive(Args, Debug)]
struct StartupArgs {
    /// The fencegate binary.
    #[arg(long)]
    bin: PathBuf,
    /// Its configuration (state file already created).
    #[arg(long)]
    config: PathBuf,
    /// Its admin listener.
    #[arg(long)]
    admin: SocketAddr,
    /// How many starts.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Where fencegate's output goes.
    #[arg(long, default_value = "/dev/null")]
    log: PathBuf,
}

#[derive(Args, Debug)]
struct EtcdReadsArgs {
    /// etcd client URL.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// etcd's process id (its CPU time is read from /proc).
    #[arg(long)]
    pid: u32,
    /// The election prefix read (with a trailing `/`, as the reader reads it).
    #[arg(long, default_value = "/bench/leader/")]
    prefix: String,
    /// Reads of each kind.
    #[arg(long, default_value_t = 2000)]
    reads: u32,
}

#[derive(Args, Debug)]
struct OpenLoopArgs {
    /// The row's label.
    #[arg(long)]
    label: String,
    /// fencegate's proxy listener.
    #[arg(long)]
    proxy: SocketAddr,
    /// fencegate's admin listener (its read counter is read around the run).
    #[arg(long)]
    admin: SocketAddr,
    /// The election domain `--path` lies in.
    #[arg(long, default_value = "bench")]
    domain: String,
    /// The path written to.
    #[arg(long, default_value = "/bench/obj")]
    path: String,
    /// The leader's token.
    #[arg(long)]
    token: u64,
    /// Writes per second, offered (exponential gaps between them).
    #[arg(long)]
    rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Connections, one thread each; a write due while all are busy waits.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    connections: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Failover(a) => failover(&a),
        Cmd::Raise(a) => raise(&a),
        Cmd::Idle(a) => idle(&a),
        Cmd::Startup(a) => startup(&a),
        Cmd::EtcdReads(a) => etcd_reads(&a),
        Cmd::OpenLoop(a) => open_loop(&a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench_client: error: {e}");
            ExitCode::from(2)
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

// ---------------------------------------------------------------- HTTP

/// One answer, read whole.
struct Reply {
    status: u16,
    /// `Fencegate-Reason`, when fencegate answered itself.
    reason: Option<String>,
    close: bool,
    body: Vec<u8>,
}

/// A blocking HTTP/1.1 keep-alive connection, reconnected when closed.
struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    /// Sends `request` (head and body in one buffer) and reads the answer.
    fn send(&mut self, request: &[u8]) -> io::Result<Reply> {
        self.connect()?;
        let stream = self.stream.as_mut().expect("connected above");
        let result = stream
            .write_all(request)
            .and_then(|()| read_reply(stream, &mut self.buf));
        match &result {
            Ok(reply) if !reply.close => {}
            _ => self.stream = None,
        }
        result
    }
}

fn put_request(path: &str, token: u64) -> Vec<u8> {
    let mut r = format!(
        "PUT {path} HTTP/1.1\r\nHost: bench\r\nFencing-Token: {token}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        BODY.len()
    )
    .into_bytes();
    r.extend_from_slice(&BODY);
    r
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads until `buf` holds at least `len` bytes.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
    let mut chunk = [0u8; 8192];
    while buf.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Reads more until `needle` appears at or after `from`; its position.
fn fill_until(stream: &mut TcpStream, buf: &mut Vec<u8>, from: usize, needle: &[u8]) -> io::Result<usize> {
    loop {
        if let Some(i) = find(&buf[from..], needle) {
            return Ok(from + i);
        }
        let want = buf.len() + 1;
        fill(stream, buf, want)?;
    }
}

fn read_reply(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Reply> {
    buf.clear();
    let head_end = fill_until(stream, buf, 0, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let (mut length, mut chunked, mut close, mut reason) = (None, false, false, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "fencegate-reason" => reason = Some(value.to_owned()),
            _ => {}
        }
    }
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if chunked {
        let mut body = Vec::new();
        let mut pos = head_end;
        loop {
            let line_end = fill_until(stream, buf, pos, b"\r\n")?;
            let size_text = String::from_utf8_lossy(&buf[pos..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            pos = line_end + 2;
            if size == 0 {
                // Trailers, then the blank line.
                fill_until(stream, buf, pos.saturating_sub(2), b"\r\n\r\n")?;
                break;
            }
            fill(stream, buf, pos + size + 2)?;
            body.extend_from_slice(&buf[pos..pos + size]);
            pos += size + 2;
        }
        body
    } else if let Some(len) = length {
        fill(stream, buf, head_end + len)?;
        buf[head_end..head_end + len].to_vec()
    } else {
        // Delimited by close: read to the end.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        close = true;
        let mut body = buf[head_end..].to_vec();
        body.extend_from_slice(&rest);
        body
    };
    Ok(Reply {
        status,
        reason,
        close,
        body,
    })
}

// ---------------------------------------------------------------- stats

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A markdown row of p50/p90/p99/max (ms) over `samples`.
fn row(label: &str, samples: &[f64]) -> String {
    let s = sorted(samples.to_vec());
    format!(
        "| {label} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
        s.len(),
        pct(&s, 50.0),
        pct(&s, 90.0),
        pct(&s, 99.0),
        s.last().copied().unwrap_or(f64::NAN),
        s.first().copied().unwrap_or(f64::NAN),
    )
}

const TABLE_HEAD: &str =
    "| what | n | p50 ms | p90 ms | p99 ms | max ms | min ms |\n|---|---|---|---|---|---|---|";

/// Reads one sample value of `metric` (exact name with labels) from /metrics.
fn scrape(admin: SocketAddr, metric: &str) -> Res<f64> {
    let reply = Conn::new(admin).send(&get_request("/metrics"))?;
    let text = String::from_utf8_lossy(&reply.body);
    text.lines()
        .find_map(|l| l.strip_prefix(metric).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("{metric} not found in /metrics").into())
}

// ---------------------------------------------------------------- failover

/// What the probe threads share with the conductor.
#[derive(Default)]
struct ProbeState {
    /// The token to send; 0 while idle.
    token: AtomicU64,
    stop: AtomicBool,
    sent: AtomicU64,
    errors: AtomicU64,
    /// Answers that were neither 2xx nor 412.
    other: AtomicU64,
    /// The token of the last 2xx and how many 2xx it had.
    ok_token: AtomicU64,
    ok_count: AtomicU64,
    /// Every first refusal per (token, probe): token, when, reason.
    refusals: Mutex<Vec<(u64, Instant, String)>>,
}

fn probe_loop(state: &ProbeState, addr: SocketAddr, path: &str) {
    let mut conn = Conn::new(addr);
    let mut request = Vec::new();
    let mut request_token = 0;
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !state.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let token = state.token.load(Ordering::Acquire);
        if token == 0 || token == refused {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        if token != request_token {
            request = put_request(path, token);
            request_token = token;
        }
        state.sent.fetch_add(1, Ordering::Relaxed);
        match conn.send(&request) {
            Ok(reply) if (200..300).contains(&reply.status) => {
                if state.ok_token.swap(token, Ordering::AcqRel) != token {
                    state.ok_count.store(0, Ordering::Release);
                }
                state.ok_count.fetch_add(1, Ordering::AcqRel);
            }
            Ok(reply) if reply.status == 412 => {
                let at = Instant::now();
                refused = token;
                let reason = reply.reason.unwrap_or_else(|| "(store's own 412)".into());
                state
                    .refusals
                    .lock()
                    .expect("not poisoned")
                    .push((token, at, reason));
            }
            Ok(reply) => {
                state.other.fetch_add(1, Ordering::Relaxed);
                if state.other.load(Ordering::Relaxed) < 5 {
                    eprintln!(
                        "probe: unexpected {} {:?}: {}",
                        reply.status,
                        reply.reason,
                        String::from_utf8_lossy(&reply.body)
                    );
                }
            }
            Err(e) => {
                if state.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("probe: {e}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn failover(args: &FailoverArgs) -> Res<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let state = Arc::new(ProbeState::default());
    let probes: Vec<_> = (0..args.probes.max(1))
        .map(|_| {
            let state = state.clone();
            let (addr, path) = (args.proxy, args.path.clone());
            std::thread::spawn(move || probe_loop(&state, addr, &path))
        })
        .collect();
    let result = runtime.block_on(conduct_failovers(args, &state));
    state.stop.store(true, Ordering::Relaxed);
    for p in probes {
        let _ = p.join();
    }
    result
}

/// One failover's record.
struct Failover {
    /// Revoke answered → first 412, ms (negative: the 412 came first).
    detection_ms: f64,
    revoke_rtt_ms: f64,
    /// Probe writes/s from the new token's first write to the refusal.
    rate: f64,
    reason: String,
}

async fn campaign(client: &mut Client, election: &str) -> Res<(i64, u64)> {
    let lease = client.lease_grant(60, None).await?.id();
    let key = format!("{election}/{lease:x}");
    let put = client
        .put(key, "bench", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let revision = put.header().ok_or("put without header")?.revision();
    Ok((lease, u64::try_from(revision)?))
}

async fn conduct_failovers(args: &FailoverArgs, state: &ProbeState) -> Res<bool> {
    let mut client = Client::connect([args.etcd.as_str()], None).await?;
    let prefix = format!("{}/", args.election);
    let mut leader = campaign(&mut client, &args.election).await?;
    let oldest = client
        .get(
            prefix.as_str(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1),
            ),
        )
        .await?;
    let first = oldest.kvs().first().map_or(0, |kv| kv.create_revision());
    if u64::try_from(first).ok() != Some(leader.1) {
        return Err(format!("the election {prefix} already had candidates: use a fresh prefix").into());
    }
    let mut records = Vec::new();
    let mut timeouts = 0;
    let started = Instant::now();
    for i in 0..args.failovers {
        // B campaigns and waits behind A (the leader).
        let next = campaign(&mut client, &args.election).await?;
        let window_start = Instant::now();
        let sent_before = state.sent.load(Ordering::Relaxed);
        state.token.store(leader.1, Ordering::Release);
        let warm_deadline = Instant::now() + Duration::from_secs(10);
        while !(state.ok_token.load(Ordering::Acquire) == leader.1
            && state.ok_count.load(Ordering::Acquire) >= args.warm_writes)
        {
            if Instant::now() > warm_deadline {
                return Err(format!(
                    "failover {i}: token {} was never admitted (sent {}, errors {}, other {})",
                    leader.1,
                    state.sent.load(Ordering::Relaxed),
                    state.errors.load(Ordering::Relaxed),
                    state.other.load(Ordering::Relaxed)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let asked = Instant::now();
        client.lease_revoke(leader.0).await?;
        let answered = Instant::now();
        let refusal_deadline = answered + Duration::from_secs(5);
        let refusal = loop {
            let first = state
                .refusals
                .lock()
                .expect("not poisoned")
                .iter()
                .filter(|r| r.0 == leader.1)
                .min_by_key(|r| r.1)
                .cloned();
            if let Some(r) = first {
                break Some(r);
            }
            if Instant::now() > refusal_deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        match refusal {
            Some((_, at, reason)) => {
                let detection_ms = if at >= answered {
                    ms(at - answered)
                } else {
                    -ms(answered - at)
                };
                let sent = state.sent.load(Ordering::Relaxed) - sent_before;
                let window = at.saturating_duration_since(window_start).as_secs_f64();
                records.push(Failover {
                    detection_ms,
                    revoke_rtt_ms: ms(answered - asked),
                    rate: sent as f64 / window.max(1e-9),
                    reason,
                });
            }
            None => {
                timeouts += 1;
                eprintln!("failover {i}: no refusal of token {} within 5 s", leader.1);
            }
        }
        leader = next;
    }
    let total = started.elapsed();
    state.token.store(0, Ordering::Release);
    let _ = client.lease_revoke(leader.0).await;

    let detection: Vec<f64> = records.iter().map(|r| r.detection_ms).collect();
    let rtt: Vec<f64> = records.iter().map(|r| r.revoke_rtt_ms).collect();
    let rates = sorted(records.iter().map(|r| r.rate).collect());
    let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
    for r in &records {
        *reasons.entry(r.reason.as_str()).or_default() += 1;
    }
    let before_answer = detection.iter().filter(|d| **d < 0.0).count();
    println!(
        "### Failover detection ({} failovers, {} probe connection(s))\n",
        args.failovers, args.probes
    );
    println!("{TABLE_HEAD}");
    println!("{}", row("revoke answered → first 412", &detection));
    println!("{}", row("revoke round trip (etcd)", &rtt));
    println!();
    println!(
        "- probe rate while leading (writes/s): min {:.0}, p50 {:.0}, max {:.0} (target ≥ {:.0})",
        rates.first().copied().unwrap_or(0.0),
        pct(&rates, 50.0),
        rates.last().copied().unwrap_or(0.0),
        args.min_rate
    );
    println!("- refusals that arrived before etcd's answer to the revoke (negative times): {before_answer}");
    println!("- failovers without a refusal within 5 s: {timeouts}");
    println!("- first refusal's reason: {reasons:?}");
    println!(
        "- probe totals: {} writes, {} errors, {} other answers, {:.1} s",
        state.sent.load(Ordering::Relaxed),
        state.errors.load(Ordering::Relaxed),
        state.other.load(Ordering::Relaxed),
        total.as_secs_f64()
    );
    let p99 = pct(&sorted(detection.clone()), 99.0);
    println!(
        "- target: detection p99 ≤ 5 ms in watch mode: {} ({p99:.3} ms)",
        if p99 <= 5.0 && timeouts == 0 {
            "PASS"
        } else {
            "FAIL"
        }
    );
    let rate_ok = rates.first().is_some_and(|r| *r >= args.min_rate);
    if !rate_ok {
        println!(
            "- WARNING: the probe ran below {:.0} writes/s in some failover",
            args.min_rate
        );
    }
    Ok(timeouts == 0 && rate_ok && !records.is_empty())
}

// ---------------------------------------------------------------- raise

fn raise(args: &RaiseArgs) -> Res<bool> {
    let epoch_metric = format!("fencegate_epoch{{domain=\"{}\"}}", args.domain);
    let count_metric = "fencegate_epoch_persist_seconds_count";
    let sum_metric = "fencegate_epoch_persist_seconds_sum";
    let mut token = scrape(args.admin, &epoch_metric)? as u64;
    let mut conn = Conn::new(args.proxy);
    let mut ok = true;
    let write = |conn: &mut Conn, token: u64, ok: &mut bool| -> Res<f64> {
        let (took, admitted) = timed_put(conn, &args.path, token)?;
        *ok &= admitted;
        Ok(took)
    };
    // The first write raises from whatever the epoch was; warm the pool.
    token += 1;
    write(&mut conn, token, &mut ok)?;
    for _ in 0..20 {
        write(&mut conn, token, &mut ok)?;
    }

    let (count0, sum0) = (scrape(args.admin, count_metric)?, scrape(args.admin, sum_metric)?);
    let (mut raises, mut same) = (Vec::new(), Vec::new());
    for _ in 0..args.sequential {
        token += 1;
        raises.push(write(&mut conn, token, &mut ok)?);
        same.push(write(&mut conn, token, &mut ok)?);
    }
    let (count1, sum1) = (scrape(args.admin, count_metric)?, scrape(args.admin, sum_metric)?);
    let commits = count1 - count0;
    let commit_mean_ms = if commits > 0.0 {
        (sum1 - sum0) / commits * 1e3
    } else {
        f64::NAN
    };
    let single = pct(&sorted(raises.clone()), 50.0);

    println!("### Epoch raise latency (a plain domain, one keep-alive connection)\n");
    println!("{TABLE_HEAD}");
    println!("{}", row("write raising the epoch (token = epoch + 1)", &raises));
    println!("{}", row("write at the current epoch", &same));
    println!();
    println!(
        "- commits for {} sequential raises: {commits} (fencegate_epoch_persist_seconds: mean {commit_mean_ms:.3} ms per commit)",
        args.sequential
    );
    let same_p50 = pct(&sorted(same.clone()), 50.0);
    println!(
        "- raise cost over a write at the epoch (p50): {:.3} ms\n",
        single - same_p50
    );

    println!(
        "### {} concurrent raises released together ({} bursts of each kind)\n",
        args.concurrency, args.bursts
    );
    println!("| tokens | bursts | burst time p50 ms | p90 ms | max ms | median (burst − its baseline burst) ÷ one commit | commits per burst p50 (max) | admitted p50 | refused (412) p50 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // The kinds take turns, burst by burst, so each raise burst is compared
    // with a baseline burst run under the same machine conditions.
    const KINDS: [Kind; 3] = [Kind::Current, Kind::Distinct, Kind::Same];
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    let mut commits = [Vec::new(), Vec::new(), Vec::new()];
    let mut admitted = [Vec::new(), Vec::new(), Vec::new()];
    let mut refused = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..args.bursts {
        for (i, kind) in KINDS.into_iter().enumerate() {
            let base = token;
            let count_before = scrape(args.admin, count_metric)?;
            let outcome = burst(args, base, kind)?;
            let count_after = scrape(args.admin, count_metric)?;
            token = match kind {
                Kind::Current => base,
                Kind::Distinct => base + args.concurrency as u64,
                Kind::Same => base + 1,
            };
            times[i].push(outcome.0);
            commits[i].push(count_after - count_before);
            admitted[i].push(outcome.1 as f64);
            refused[i].push(outcome.2 as f64);
            if outcome.3 > 0 {
                ok = false;
                eprintln!("raise: {} answers were neither 2xx nor 412", outcome.3);
            }
            // The next burst's writers must see the new epoch settled.
            write(&mut conn, token, &mut ok)?;
        }
    }
    let mut verdicts = Vec::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let (t, c) = (sorted(times[i].clone()), sorted(commits[i].clone()));
        let p50 = pct(&t, 50.0);
        // Median over bursts of (this burst − the baseline burst before it).
        let extra = sorted(times[i].iter().zip(&times[0]).map(|(x, b)| x - b).collect());
        let cost = pct(&extra, 50.0) / commit_mean_ms;
        let label = match kind {
            Kind::Current => "the current epoch (no raise: the baseline)",
            Kind::Distinct => "distinct (epoch+1 … epoch+N)",
            Kind::Same => "the same (epoch+1)",
        };
        if kind != Kind::Current {
            verdicts.push(format!(
                "- target: {} concurrent raises ({}) cost ≤ 2 commits: {} ({} commits per burst p50, {cost:.1} commits' time over the baseline)",
                args.concurrency,
                if kind == Kind::Distinct { "distinct tokens" } else { "one token" },
                if pct(&c, 50.0) <= 2.0 && cost <= 2.0 { "PASS" } else { "FAIL" },
                pct(&c, 50.0),
            ));
        }
        println!(
            "| {label} | {} | {p50:.3} | {:.3} | {:.3} | {cost:.1} | {} ({}) | {} | {} |",
            t.len(),
            pct(&t, 90.0),
            t.last().copied().unwrap_or(f64::NAN),
            pct(&c, 50.0),
            c.last().copied().unwrap_or(f64::NAN),
            pct(&sorted(admitted[i].clone()), 50.0),
            pct(&sorted(refused[i].clone()), 50.0),
        );
    }
    println!();
    for v in &verdicts {
        println!("{v}");
    }
    println!(
        "(one commit = {commit_mean_ms:.3} ms, fencegate's mean commit time in the sequential run above; the baseline is a burst of the same size with no raise, so the difference is what the raises cost)"
    );
    Ok(ok)
}

/// One write; its time in ms and whether it was admitted (2xx).
fn timed_put(conn: &mut Conn, path: &str, token: u64) -> Res<(f64, bool)> {
    let request = put_request(path, token);
    let start = Instant::now();
    let reply = conn.send(&request)?;
    let took = ms(start.elapsed());
    let admitted = (200..300).contains(&reply.status);
    if !admitted {
        eprintln!("raise: token {token}: {} {:?}", reply.status, reply.reason);
    }
    Ok((took, admitted))
}

/// The tokens of a burst's writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// All at the current epoch: no raise, the cost of the burst itself.
    Current,
    /// epoch+1 … epoch+N: every writer a raise, the highest wins.
    Distinct,
    /// All epoch+1: one raise shared by every writer.
    Same,
}

/// One burst: `concurrency` connections, opened first; then every request
/// is written from this one thread in a tight loop (no thread wake-up skew),
/// and the answers are read. Returns (ms from the first write to the last
/// answer, 2xx, 412, other).
fn burst(args: &RaiseArgs, base: u64, kind: Kind) -> Res<(f64, usize, usize, usize)> {
    let mut conns = Vec::with_capacity(args.concurrency);
    let mut requests = Vec::with_capacity(args.concurrency);
    for k in 0..args.concurrency {
        let token = match kind {
            Kind::Current => base,
            Kind::Distinct => base + 1 + k as u64,
            Kind::Same => base + 1,
        };
        requests.push(put_request(&args.path, token));
        let mut conn = Conn::new(args.proxy);
        conn.connect()?;
        conns.push(conn);
    }
    let released = Instant::now();
    for (conn, request) in conns.iter_mut().zip(&requests) {
        conn.stream.as_mut().expect("connected").write_all(request)?;
    }
    // Reading in order: an answer that came early is read at once, so the
    // last read ends when the last answer arrives.
    let (mut ok, mut refused, mut other) = (0, 0, 0);
    for conn in &mut conns {
        let stream = conn.stream.as_mut().expect("connected");
        match read_reply(stream, &mut conn.buf)?.status {
            200..=299 => ok += 1,
            412 => refused += 1,
            _ => other += 1,
        }
    }
    Ok((ms(released.elapsed()), ok, refused, other))
}

// ---------------------------------------------------------------- idle

fn idle(args: &IdleArgs) -> Res<bool> {
    let request = get_request(&args.path);
    let mut held = Vec::with_capacity(args.connections);
    let mut failed = 0;
    for _ in 0..args.connections {
        let mut conn = Conn::new(args.target);
        match conn.send(&request) {
            Ok(reply) if conn.stream.is_some() && reply.status < 500 => held.push(conn),
            Ok(reply) => {
                failed += 1;
                eprintln!("idle: {} (connection not kept)", reply.status);
            }
            Err(e) => {
                failed += 1;
                eprintln!("idle: {e}");
            }
        }
    }
    println!("held {} connections ({failed} failed)", held.len());
    io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs(args.hold_secs));
    Ok(failed == 0)
}

// ---------------------------------------------------------------- startup

fn readyz(admin: SocketAddr) -> bool {
    let mut conn = Conn::new(admin);
    matches!(conn.send(&get_request("/readyz")), Ok(r) if r.status == 200)
}

fn startup(args: &StartupArgs) -> Res<bool> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)?;
    let mut times = Vec::new();
    let mut ok = true;
    for i in 0..args.runs {
        let start = Instant::now();
        let mut child = Command::new(&args.bin)
            .args(["run", "--config"])
            .arg(&args.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .spawn()?;
        let deadline = start + Duration::from_secs(30);
        let mut ready = false;
        while Instant::now() < deadline {
            if readyz(args.admin) {
                ready = true;
                break;
            }
            if child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let took = start.elapsed();
        if ready {
            times.push(ms(took));
        } else {
            ok = false;
            eprintln!("startup {i}: not ready after {took:?}");
        }
        // A clean stop, so the next start is not a restart after a crash.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let stop_deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > stop_deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    println!("### Startup: exec of `fencegate run` → /readyz 200\n");
    println!("{TABLE_HEAD}");
    println!("{}", row("exec → ready", &times));
    Ok(ok)
}

// ---------------------------------------------------------------- etcd-reads

/// User + system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or("unexpected /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); 12 and 13 here.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SC_CLK_TCK is 100 on Linux.
    Ok(ticks / 100.0)
}

fn etcd_reads(args: &EtcdReadsArgs) -> Res<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = Client::connect([args.etcd.as_str()], None).await?;
        // The reader's read (coordinator.rs): the oldest candidate, keys only.
        let reader = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        let kinds = [
            ("linearizable (fencegate's reader)", reader.clone()),
            ("serializable (the same read)", reader.with_serializable()),
        ];
        println!("| read, one at a time | µs per read | etcd CPU µs per read |");
        println!("|---|---|---|");
        for (label, options) in kinds {
            // Warm the connection and etcd's caches.
            for _ in 0..args.reads.min(100) {
                client.get(args.prefix.as_str(), Some(options.clone())).await?;
            }
            let cpu0 = cpu_seconds(args.pid)?;
            let started = Instant::now();
            for _ in 0..args.reads {
                client.get(args.prefix.as_str(), Some(options.clone())).await?;
            }
            let wall = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds(args.pid)? - cpu0;
            let n = f64::from(args.reads);
            println!("| {label} | {:.0} | {:.0} |", wall / n * 1e6, cpu / n * 1e6);
        }
        Ok(true)
    })
}

// ---------------------------------------------------------------- open loop

/// Due times of `n` writes arriving independently at `rate` per second:
/// exponential gaps from a fixed seed, so every run offers the same load.
fn poisson_schedule(rate: f64, n: usize) -> Vec<Duration> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut at = 0.0_f64;
    (0..n)
        .map(|_| {
            // xorshift64*; 53 bits to a uniform in (0, 1].
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
            let u = (bits as f64 + 1.0) / (1u64 << 53) as f64;
            at += -u.ln() / rate;
            Duration::from_secs_f64(at)
        })
        .collect()
}

fn open_loop(args: &OpenLoopArgs) -> Res<bool> {
    if !(args.rate > 0.0 && args.seconds > 0.0) {
        return Err("--rate and --seconds must be positive".into());
    }
    let n = (args.rate * args.seconds).round() as usize;
    let schedule = Arc::new(poisson_schedule(args.rate, n));
    let next = Arc::new(AtomicU64::new(0));
    let request = Arc::new(put_request(&args.path, args.token));
    let reads = format!("fencegate_leader_reads_total{{domain=\"{}\"}}", args.domain);
    // None for a build older than the counter.
    let reads0 = scrape(args.admin, &reads).ok();
    // Connected before the clock starts: the first writes would pay for it.
    let mut conns = Vec::with_capacity(args.connections.into());
    for _ in 0..args.connections {
        let mut conn = Conn::new(args.proxy);
        conn.connect()?;
        conns.push(conn);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (schedule, next, request) = (schedule.clone(), next.clone(), request.clone());
            std::thread::spawn(move || {
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(offset) = schedule.get(i) else { break };
                    let due = start + *offset;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    match conn.send(&request) {
                        Ok(reply) if (200..300).contains(&reply.status) => {
                            latencies.push(ms(due.elapsed()));
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::with_capacity(n), 0);
    for worker in workers {
        let (l, e) = worker.join().map_err(|_| "an open-loop worker panicked")?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let reads = reads0.and_then(|r0| Some(scrape(args.admin, &reads).ok()? - r0));
    let s = sorted(latencies);
    println!(
        "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
        args.label,
        args.rate,
        s.len() as f64 / elapsed,
        pct(&s, 50.0),
        pct(&s, 90.0),
        pct(&s, 99.0),
        s.last().copied().unwrap_or(f64::NAN),
        errors,
        reads.map_or("–".into(), |r| format!("{r:.0}")),
        match reads {
            Some(r) if r > 0.0 => format!("{:.1}", s.len() as f64 / r),
            _ => "–".into(),
        },
    );
    Ok(errors == 0)
}
