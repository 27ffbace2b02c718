//! fencegate when the store misbehaves (SPEC.md: Responses, Guarantee,
//! HTTP): it refuses connections, resets in the middle of a request body,
//! closes without answering, answers a head and then breaks the body,
//! never answers, never reads a large body, answers early and leaves the
//! rest of a body unread, answers 500/503 itself, or closes an idle pooled
//! connection just as fencegate sends the next request on it.
//!
//! For each fault: the writer gets the right answer (502/504 with the
//! reason, or the store's own answer untouched, or a body that is visibly
//! cut short, never a short 2xx that looks complete); no request outlives
//! `request_timeout` by more than a loaded machine's slack; the epoch that a
//! faulty write raised stays raised, in `/domains` and in the state file
//! after a SIGKILL; a raise right after a faulty lower write is not held by
//! a barrier; fencegate keeps serving; and the fencegate process holds no
//! more file descriptors afterwards than before the first request (no
//! leaked sockets). The real binary runs in front of [`ScriptedStore`].
//!
//! Already covered elsewhere, not repeated here: the plain 502 and 504
//! answers (`responses.rs`), a raise aborting a lower body the store is not
//! reading and a lower write outliving `request_timeout` (`barrier.rs`).

use crate::support::{
    send_signal, take_request_head, EventKind, Fault, Fencegate, FencegateConfig, ScriptedStore,
};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DOMAIN: &str = "d";
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// Slack over `REQUEST_TIMEOUT` for any one answer on a loaded 2-core box.
const SLACK: Duration = Duration::from_secs(2);
/// How long a raw exchange may take before the test calls it hung.
const HANG: Duration = Duration::from_secs(10);
/// How long the fd count may take to settle after the store closes.
const FD_SETTLE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- helpers

/// The entries of `/proc/PID/fd`: what each descriptor points to.
fn fds(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    let mut list: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let target = std::fs::read_link(e.path()).map(|t| t.display().to_string());
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.unwrap_or_default()
            )
        })
        .collect();
    list.sort();
    list
}

/// The fd count once two samples 100 ms apart agree (at most 2 s).
async fn settled_fds(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = fds(pid).len();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = fds(pid).len();
        if now == last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Waits (≤ `FD_SETTLE`) until fencegate holds at most `baseline` fds;
/// returns how many it holds then.
async fn assert_fds_back(fg: &Fencegate, baseline: &[String]) -> usize {
    let pid = fg.pid().expect("fencegate runs");
    let deadline = Instant::now() + FD_SETTLE;
    loop {
        let now = fds(pid);
        if now.len() <= baseline.len() {
            return now.len();
        }
        if Instant::now() >= deadline {
            let extra: Vec<&String> = now.iter().filter(|f| !baseline.contains(f)).collect();
            panic!(
                "fencegate holds {} fds {FD_SETTLE:?} after the store closed every connection, {} \
                 before the first request: leaked descriptors (new or changed: {extra:#?})\n{}",
                now.len(),
                baseline.len(),
                log_tail(fg)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_tail(fg: &Fencegate) -> String {
    let text = fg.stderr_text();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
    format!("--- fencegate stderr (last 25 lines) ---\n{tail}")
}

/// fencegate with domain `d` at `/d/` in front of `store`, and the list of
/// its fds once settled, before any request.
async fn start(
    store: &ScriptedStore,
    tune: impl FnOnce(FencegateConfig) -> FencegateConfig,
) -> (Fencegate, Vec<String>) {
    let config = tune(
        FencegateConfig::new(&store.url())
            .domain(DOMAIN, "/d/")
            .request_timeout(REQUEST_TIMEOUT),
    );
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));
    let pid = fg.pid().expect("fencegate runs");
    settled_fds(pid).await;
    (fg, fds(pid))
}

/// A client with no pooled connections (so none to fencegate stays open
/// and counts against its fds), bounded per request.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(HANG)
        .build()
        .expect("build reqwest client")
}

/// A healthy `PUT path` with `token`; returns status, reason, time taken.
async fn put(fg: &Fencegate, path: &str, token: u64) -> (u16, Option<String>, Duration) {
    let started = Instant::now();
    let r = http()
        .put(format!("{}{path}", fg.url()))
        .header("Fencing-Token", token.to_string())
        .body("healthy")
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {path} (token {token}): {e}\n{}", log_tail(fg)));
    let status = r.status().as_u16();
    let reason = r
        .headers()
        .get("fencegate-reason")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let _ = r.bytes().await;
    (status, reason, started.elapsed())
}

#[track_caller]
fn assert_admitted(fg: &Fencegate, answer: &(u16, Option<String>, Duration), what: &str) {
    let (status, reason, _) = answer;
    assert!(
        (200..300).contains(status) && reason.is_none(),
        "{what}: expected the store's 2xx, got {status} {reason:?}\n{}",
        log_tail(fg)
    );
}

/// The domain stands at `epoch` (epoch and refusal mark, nothing in
/// flight), and the token below it is refused as stale.
async fn assert_fenced_at(fg: &Fencegate, epoch: u64, when: &str) {
    assert_eq!(
        marks(fg),
        (epoch, epoch, 0),
        "(epoch, refusal mark, writes in flight) {when}"
    );
    let stale = put(fg, &format!("/d/below-{epoch}"), epoch - 1).await;
    assert_eq!(
        (stale.0, stale.1.as_deref()),
        (412, Some("stale_epoch")),
        "token {} after the raise to {epoch}",
        epoch - 1
    );
}

/// `(epoch, refusal_mark, inflight_writes)` of `d` in `/domains`.
fn marks(fg: &Fencegate) -> (u64, u64, u64) {
    let text = fg.admin_get("/domains").body;
    let list: Value = serde_json::from_str(&text).expect("/domains is JSON");
    let d = list
        .as_array()
        .and_then(|l| l.iter().find(|d| d["name"] == DOMAIN))
        .cloned();
    let d = d.unwrap_or_else(|| panic!("no domain {DOMAIN} in /domains: {text}"));
    let get = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("/domains {k}: {d}"));
    (get("epoch"), get("refusal_mark"), get("inflight_writes"))
}

/// SIGKILL fencegate and read the durable epoch of the domain.
fn epoch_after_sigkill(fg: &mut Fencegate) -> u64 {
    fg.kill9();
    fg.durable_epoch(DOMAIN)
}

/// How a raw exchange ended on the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// fencegate closed the connection (EOF).
    Closed,
    /// The connection was reset (or another read error).
    Reset(String),
    /// Nothing more arrived within `HANG`: the request hung.
    Hung,
}

/// What a client saw of one exchange, byte for byte.
#[derive(Debug)]
struct Raw {
    bytes: Vec<u8>,
    ended: Ended,
    took: Duration,
}

/// The response a [`Raw`] holds, as far as it goes.
#[derive(Debug)]
struct Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Whether the body is complete by its framing: as long as its
    /// `Content-Length`, or chunked up to the last chunk.
    complete: bool,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// De-chunks `buf`: the data, and whether the last chunk arrived.
fn dechunk(mut buf: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(buf, b"\r\n") else {
            return (out, false);
        };
        let line = String::from_utf8_lossy(&buf[..eol]);
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16) else {
            return (out, false);
        };
        buf = &buf[eol + 2..];
        if size == 0 {
            return (out, find(buf, b"\r\n").is_some());
        }
        if buf.len() < size + 2 {
            out.extend_from_slice(&buf[..buf.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

impl Raw {
    /// Status, reason or body length, and the detail of a problem, for logs.
    fn summary(&self) -> String {
        let seen = self.seen();
        match seen.header("fencegate-reason") {
            Some(reason) => format!("{} {reason}: {}", seen.status, seen.json()["detail"]),
            None => format!(
                "{} with {} body bytes, complete: {}",
                seen.status,
                seen.body.len(),
                seen.complete
            ),
        }
    }

    /// The final response (interim 1xx skipped); panics without a head.
    fn seen(&self) -> Seen {
        let mut rest = &self.bytes[..];
        loop {
            let end =
                find(rest, b"\r\n\r\n").unwrap_or_else(|| panic!("no complete response head in {self:?}"));
            let head = String::from_utf8_lossy(&rest[..end]).into_owned();
            let body = &rest[end + 4..];
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line in {head:?}"));
            if (100..200).contains(&status) {
                rest = body;
                continue;
            }
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            let mut seen = Seen {
                status,
                headers,
                body: Vec::new(),
                complete: false,
            };
            let chunked = seen
                .header("transfer-encoding")
                .is_some_and(|t| t.contains("chunked"));
            let length = seen
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            (seen.body, seen.complete) = match (chunked, length) {
                (true, _) => dechunk(body),
                (false, Some(n)) => (body[..body.len().min(n)].to_vec(), body.len() >= n),
                // Delimited by close: complete only if closed cleanly.
                (false, None) => (body.to_vec(), self.ended == Ended::Closed),
            };
            return seen;
        }
    }
}

/// Writes `len` bytes of body (`x`s), `chunk` bytes at a time.
async fn write_filler(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    len: usize,
    chunk: usize,
) -> std::io::Result<()> {
    let chunk = vec![b'x'; chunk];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        writer.write_all(&chunk[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// Sends `METHOD path` with `token` and a body of `body_len` bytes over a
/// fresh connection (`Connection: close`), writing the body while reading,
/// and reads until fencegate closes, the connection breaks, or `HANG`.
async fn exchange(fg: &Fencegate, method: &str, path: &str, token: Option<u64>, body_len: usize) -> Raw {
    let started = Instant::now();
    let stream = TcpStream::connect(fg.addr()).await.expect("connect to fencegate");
    let (mut reader, mut writer) = stream.into_split();
    let token = token
        .map(|t| format!("Fencing-Token: {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: store.test\r\n{token}Content-Length: {body_len}\r\n\
         Connection: close\r\n\r\n"
    );
    let sending = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        write_filler(&mut writer, body_len, 64 << 10).await?;
        // Keep the write half open: a FIN is no part of the request.
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(writer)
    });
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let ended = loop {
        let left = HANG.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, reader.read(&mut buf)).await {
            Err(_) => break Ended::Hung,
            Ok(Ok(0)) => break Ended::Closed,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => break Ended::Reset(e.to_string()),
        }
    };
    sending.abort();
    Raw {
        bytes,
        ended,
        took: started.elapsed(),
    }
}

/// What the writer must get for a fault.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// fencegate's own answer with this status and reason, saying the
    /// store's outcome is unknown.
    Problem(u16, &'static str),
    /// The store's `200` head, then a body that is visibly cut short.
    Truncated,
    /// The store's own answer with this status and body, untouched.
    Store(u16, &'static str),
}

/// Asserts that `raw` is what `expect` says and came within the bound.
#[track_caller]
fn check(fg: &Fencegate, raw: &Raw, expect: Expect, what: &str) {
    assert_ne!(
        raw.ended,
        Ended::Hung,
        "{what}: hung for {HANG:?}: {raw:?}\n{}",
        log_tail(fg)
    );
    let bound = REQUEST_TIMEOUT + SLACK;
    assert!(
        raw.took < bound,
        "{what}: answered after {:?}, over {bound:?}\n{}",
        raw.took,
        log_tail(fg)
    );
    let seen = raw.seen();
    let context = || format!("{what}: {seen:?} (ended {:?})\n{}", raw.ended, log_tail(fg));
    match expect {
        Expect::Problem(status, reason) => {
            assert_eq!(seen.status, status, "{}", context());
            assert_eq!(seen.header("fencegate-reason"), Some(reason), "{}", context());
            assert!(
                seen.complete,
                "fencegate's own answer is cut short: {}",
                context()
            );
            let v = seen.json();
            assert_eq!(v["reason"], reason, "{}", context());
            let detail = v["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("outcome is unknown"),
                "SPEC: the detail says so: {v}"
            );
            if status == 504 {
                assert!(
                    raw.took + Duration::from_millis(50) >= REQUEST_TIMEOUT,
                    "{what}: 504 after {:?}, before request_timeout ({REQUEST_TIMEOUT:?})",
                    raw.took
                );
            }
        }
        Expect::Truncated => {
            assert_eq!(seen.status, 200, "{}", context());
            assert!(seen.header("fencegate-reason").is_none(), "{}", context());
            assert!(
                !seen.complete,
                "a body the store broke off reached the client as complete: {}",
                context()
            );
        }
        Expect::Store(status, body) => {
            assert_eq!(seen.status, status, "{}", context());
            assert!(
                seen.header("fencegate-reason").is_none(),
                "the store's own answer: {}",
                context()
            );
            assert!(seen.complete, "{}", context());
            assert_eq!(String::from_utf8_lossy(&seen.body), body, "{}", context());
        }
    }
}

/// One fault, end to end. Epoch 5 is established; a token-5 write meets
/// `fault` (on `/d/fault-5`); a raise to 6 right after it must not wait for
/// a barrier; a raise to 7 meets the fault (on `/d/fault-7`) and must stay
/// raised; fencegate keeps serving; its fds return to their count before
/// the first request once the store has closed every connection; and 7 is
/// the durable epoch after a SIGKILL.
async fn fault_scenario(fault: Fault, body_len: usize, expect: Expect) {
    let store = ScriptedStore::start().await;
    let (mut fg, baseline) = start(&store, |c| c).await;
    assert_admitted(&fg, &put(&fg, "/d/warm", 5).await, "establishing epoch 5");
    store.fault_path("/d/fault-5", fault);
    store.fault_path("/d/fault-7", fault);

    let lower = exchange(&fg, "PUT", "/d/fault-5", Some(5), body_len).await;
    check(&fg, &lower, expect, &format!("a token-5 write meeting {fault:?}"));
    let broken = store
        .events()
        .iter()
        .any(|e| e.path == "/d/fault-5" && e.kind == EventKind::Broken);
    let scripted_break = matches!(fault, Fault::ResetAfterBodyBytes(_) | Fault::CloseWithoutAnswer);
    assert_eq!(
        broken,
        scripted_break,
        "the store broke the exchange as scripted: {:?}",
        store.events()
    );

    let raise = put(&fg, "/d/after-5", 6).await;
    assert_admitted(&fg, &raise, "the raise to 6 after the faulty token-5 write");
    assert!(
        raise.2 < REQUEST_TIMEOUT,
        "the raise to 6 took {:?}: the faulty token-5 write held the barrier",
        raise.2
    );

    let higher = exchange(&fg, "PUT", "/d/fault-7", Some(7), body_len).await;
    check(&fg, &higher, expect, &format!("a raise to 7 meeting {fault:?}"));
    assert_fenced_at(&fg, 7, "after the faulty raise").await;

    // A read meeting the same fault gets the same kind of answer; it holds
    // no barrier, so nothing else is asked of it.
    let read = exchange(&fg, "GET", "/d/fault-5", None, 0).await;
    check(&fg, &read, expect, &format!("a read meeting {fault:?}"));
    assert_admitted(
        &fg,
        &put(&fg, "/d/after-7", 7).await,
        "a token-7 write after the faults",
    );
    let fetched = http()
        .get(format!("{}/d/after-7", fg.url()))
        .send()
        .await
        .expect("GET after the faults");
    // The scripted store answers every healthy request 201, reads too.
    assert_eq!(fetched.status().as_u16(), 201, "a read after the faults");
    let in_use = fds(fg.pid().expect("fencegate runs")).len();

    store.stop();
    let after = assert_fds_back(&fg, &baseline).await;
    assert_eq!(epoch_after_sigkill(&mut fg), 7, "the durable epoch after SIGKILL");
    eprintln!(
        "{fault:?}: token-5 write answered in {:?} ({:?}; {}), raise to 6 in {:?}, faulty raise to 7 in {:?}, \
         read in {:?}; fds {} before, {in_use} with the store's connections, {after} after",
        lower.took,
        lower.ended,
        lower.summary(),
        raise.2,
        higher.took,
        read.took,
        baseline.len()
    );
}

// ------------------------------------------------------------------ tests

/// The store reads 64 KiB of a 1 MiB body and resets: 502
/// `upstream_unreachable` (the store's outcome is unknown).
#[tokio::test(flavor = "multi_thread")]
async fn store_reset_in_the_middle_of_the_request_body_is_502() {
    fault_scenario(
        Fault::ResetAfterBodyBytes(64 << 10),
        1 << 20,
        Expect::Problem(502, "upstream_unreachable"),
    )
    .await;
}

/// The store reads the whole request and closes without a word: 502.
#[tokio::test(flavor = "multi_thread")]
async fn store_closing_without_an_answer_is_502() {
    fault_scenario(
        Fault::CloseWithoutAnswer,
        100,
        Expect::Problem(502, "upstream_unreachable"),
    )
    .await;
}

/// The store reads the whole request and never answers: 504 at
/// `request_timeout`, and the raise is not held past it.
#[tokio::test(flavor = "multi_thread")]
async fn store_never_answering_is_504_at_request_timeout() {
    fault_scenario(Fault::NeverAnswer, 100, Expect::Problem(504, "upstream_timeout")).await;
}

/// The store answers `200` with `Content-Length: 100000`, sends 1000
/// bytes and resets: the client sees the head and a body that ends short.
#[tokio::test(flavor = "multi_thread")]
async fn store_reset_in_the_middle_of_a_sized_response_body_is_visible_to_the_client() {
    let fault = Fault::ResetMidResponse {
        sent: 1000,
        declared: Some(100_000),
    };
    fault_scenario(fault, 100, Expect::Truncated).await;
}

/// The same with a chunked response: the last chunk must never be sent.
#[tokio::test(flavor = "multi_thread")]
async fn store_reset_in_the_middle_of_a_chunked_response_body_is_visible_to_the_client() {
    let fault = Fault::ResetMidResponse {
        sent: 1000,
        declared: None,
    };
    fault_scenario(fault, 100, Expect::Truncated).await;
}

/// The store's own 503 and 500 are its answers: passed on untouched, not
/// made into fencegate's, and the raise stays.
#[tokio::test(flavor = "multi_thread")]
async fn store_answering_503_or_500_is_passed_on_untouched() {
    let busy = Fault::Answer {
        status: 503,
        body: "store busy",
    };
    fault_scenario(busy, 100, Expect::Store(503, "store busy")).await;
    let broken = Fault::Answer {
        status: 500,
        body: "store broke",
    };
    fault_scenario(broken, 100, Expect::Store(500, "store broke")).await;
}

/// The store is down (its port refuses connections) when a raise arrives:
/// 502 `upstream_unreachable` saying nothing was sent, the raise stays
/// (it was durable before forwarding), and once the store is back the
/// same token is admitted.
#[tokio::test(flavor = "multi_thread")]
async fn store_refusing_connections_is_502_and_the_raise_stays() {
    let mut store = ScriptedStore::start().await;
    let (mut fg, baseline) = start(&store, |c| c).await;
    assert_admitted(&fg, &put(&fg, "/d/warm", 5).await, "establishing epoch 5");
    store.stop();
    // Let fencegate's pool see its idle connection closed.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let raise = exchange(&fg, "PUT", "/d/refused", Some(6), 100).await;
    check(
        &fg,
        &raise,
        Expect::Problem(502, "upstream_unreachable"),
        "a raise to 6 while the store refuses",
    );
    let detail = raise.seen().json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("nothing was sent"),
        "a refused connection sent nothing: {detail}"
    );
    assert_fenced_at(&fg, 6, "after the 502").await;
    let read = exchange(&fg, "GET", "/d/refused", None, 0).await;
    check(
        &fg,
        &read,
        Expect::Problem(502, "upstream_unreachable"),
        "a read while the store refuses",
    );

    store.restart().await;
    let again = put(&fg, "/d/refused", 6).await;
    assert_admitted(&fg, &again, "token 6 once the store is back");
    let heads = store
        .events()
        .iter()
        .filter(|e| e.kind == EventKind::HeadArrived)
        .count();
    assert_eq!(
        heads,
        2,
        "the store saw the warm-up and the retried write only: {:?}",
        store.events()
    );
    store.stop();
    let after = assert_fds_back(&fg, &baseline).await;
    assert_eq!(epoch_after_sigkill(&mut fg), 6, "the durable epoch after SIGKILL");
    eprintln!(
        "refused: raise answered in {:?}, read in {:?}; fds {} before, {after} after",
        raise.took,
        read.took,
        baseline.len()
    );
}

/// A store that reads a large body slowly but steadily, for longer than
/// several `body_idle_timeout`s in all, is not stalled.
#[tokio::test(flavor = "multi_thread")]
async fn store_reading_a_large_body_slowly_is_not_a_stall() {
    // The store pauses 50 ms after each frame it reads: it takes the body
    // at a steady pace for several idle periods, never pausing for one.
    // The body is larger than the socket buffers, and request_timeout
    // leaves the store time to drain them after the last byte left
    // fencegate.
    const IDLE: Duration = Duration::from_millis(200);
    const SIZE: usize = 12 << 20;
    let store = ScriptedStore::start().await;
    let (fg, _) = start(&store, |c| {
        c.body_idle_timeout(IDLE).request_timeout(Duration::from_secs(10))
    })
    .await;
    assert_admitted(&fg, &put(&fg, "/d/warm", 5).await, "establishing epoch 5");
    store.fault_path("/d/slow", Fault::ReadSlowly(Duration::from_millis(50)));

    let raw = exchange(&fg, "PUT", "/d/slow", Some(5), SIZE).await;
    let seen = raw.seen();
    assert!(
        (200..300).contains(&seen.status) && seen.header("fencegate-reason").is_none(),
        "a store reading steadily but slowly must get the whole body; after {:?}: {seen:?}\n{}",
        raw.took,
        log_tail(&fg)
    );
    assert!(
        raw.took > IDLE * 4,
        "the store read {SIZE} bytes in {:?}: too fast to test anything",
        raw.took
    );
    eprintln!(
        "slow store: {SIZE} bytes in {:?} with body_idle_timeout {IDLE:?}",
        raw.took
    );
}

/// A store that accepts the connection but never reads a 32 MiB body: its
/// socket buffers fill, so the body is never sent whole and the
/// `request_timeout` clock (which starts at the end of the body) never
/// starts. `body_idle_timeout` is "a stalled body, either direction"
/// (SPEC.md, Configuration): the writer must get 504 `upstream_timeout`
/// within `request_timeout` + `body_idle_timeout`, not hang; the write must
/// leave the domain; fencegate must keep serving and free the sockets.
#[tokio::test(flavor = "multi_thread")]
async fn store_never_reading_a_large_body_is_504_and_nothing_hangs() {
    const IDLE: Duration = Duration::from_secs(2);
    const SIZE: usize = 32 << 20;
    let store = ScriptedStore::start().await;
    let (mut fg, baseline) = start(&store, |c| c.body_idle_timeout(IDLE)).await;
    assert_admitted(&fg, &put(&fg, "/d/warm", 5).await, "establishing epoch 5");
    store.fault_path("/d/big", Fault::NeverRead);

    let raw = exchange(&fg, "PUT", "/d/big", Some(5), SIZE).await;
    let bound = REQUEST_TIMEOUT + IDLE + SLACK;
    let (epoch, mark, inflight) = marks(&fg);
    assert!(
        raw.ended != Ended::Hung && raw.took < bound,
        "a {SIZE}-byte write to a store that never reads got no answer within {:?} \
         (request_timeout {REQUEST_TIMEOUT:?}, body_idle_timeout {IDLE:?}); {} bytes came back, \
         /domains says {inflight} write(s) in flight\n{}",
        raw.took,
        raw.bytes.len(),
        log_tail(&fg)
    );
    let seen = raw.seen();
    assert_eq!(
        (seen.status, seen.header("fencegate-reason")),
        (504, Some("upstream_timeout")),
        "{seen:?}"
    );
    assert_eq!(
        (epoch, mark, inflight),
        (5, 5, 0),
        "(epoch, refusal mark, writes in flight)"
    );
    assert_admitted(
        &fg,
        &put(&fg, "/d/after", 5).await,
        "a write after the stalled one",
    );
    store.stop();
    let after = assert_fds_back(&fg, &baseline).await;
    assert_eq!(epoch_after_sigkill(&mut fg), 5, "the durable epoch after SIGKILL");
    eprintln!(
        "never read: answered in {:?}; fds {} before, {after} after",
        raw.took,
        baseline.len()
    );
}

/// Opens a write of `body_len` bytes with `token` to `path`, sends the
/// first `send` bytes of its body (in the background), and returns once
/// fencegate relays the store's early answer head, with the connection
/// still open and the body unfinished (the sending task keeps it so).
async fn early_answered_write(
    fg: &Fencegate,
    path: &str,
    token: u64,
    body_len: usize,
    send: usize,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::task::JoinHandle<std::io::Result<tokio::net::tcp::OwnedWriteHalf>>,
) {
    let stream = TcpStream::connect(fg.addr()).await.expect("connect to fencegate");
    let (mut reader, mut writer) = stream.into_split();
    let head =
        format!("PUT {path} HTTP/1.1\r\nHost: store.test\r\nFencing-Token: {token}\r\nContent-Length: {body_len}\r\n\r\n");
    let sending = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        write_filler(&mut writer, send, 1 << 20).await?;
        // Keep the body open: the client pauses (or is still blocked above).
        tokio::time::sleep(HANG).await;
        Ok::<_, std::io::Error>(writer)
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(HANG, reader.read(&mut buf))
            .await
            .expect("the early answer within HANG")
            .expect("read the early answer");
        assert!(n > 0, "fencegate closed before relaying the early answer");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "the store's early answer: {text}"
    );
    (reader, sending)
}

/// A store may answer a write before its body is whole. Until the body is
/// sent whole, that write still holds its generation, so a raise must still
/// abort it and cut its connection, as before the answer, and not wait for
/// a client that pauses or a store that stopped reading.
async fn raise_past_an_early_answered_lower_write(read_after: Duration, body_len: usize, send: usize) {
    const IDLE: Duration = Duration::from_secs(8);
    let store = ScriptedStore::start().await;
    let (fg, _) = start(&store, |c| {
        c.body_idle_timeout(IDLE).request_timeout(Duration::from_secs(8))
    })
    .await;
    assert_admitted(&fg, &put(&fg, "/d/warm", 5).await, "establishing epoch 5");
    store.fault_path("/d/early", Fault::AnswerEarly { read_after });
    // A small window: the unread body backs up into fencegate at once.
    store.set_receive_buffer(16 << 10);
    let _lower = early_answered_write(&fg, "/d/early", 5, body_len, send).await;

    let raise = put(&fg, "/d/six", 6).await;
    assert_admitted(&fg, &raise, "the raise to 6");
    assert!(
        raise.2 < Duration::from_secs(1),
        "the raise waited {:?} for a lower write the store had answered early \
         (body_idle_timeout {IDLE:?})\n{}",
        raise.2,
        log_tail(&fg)
    );
    // The lower body never completes at the store: its connection was cut.
    let ended = store
        .wait_for(read_after + Duration::from_secs(3), |events| {
            events.iter().any(|e| {
                e.path == "/d/early" && matches!(e.kind, EventKind::BodyFailed | EventKind::BodyComplete)
            })
        })
        .await;
    let early: Vec<_> = store
        .events()
        .into_iter()
        .filter(|e| e.path == "/d/early")
        .collect();
    assert!(ended, "the lower body never ended at the store: {early:?}");
    let last = early.last().expect("events of the lower write");
    assert_eq!(
        last.kind,
        EventKind::BodyFailed,
        "the lower body must be cut, not completed ({} bytes)",
        last.body.len()
    );
    assert_eq!(marks(&fg), (6, 6, 0), "(epoch, refusal mark, writes in flight)");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raise_cuts_a_lower_write_answered_early_whose_client_pauses() {
    raise_past_an_early_answered_lower_write(Duration::ZERO, 1 << 20, 100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raise_cuts_a_lower_write_answered_early_whose_store_stopped_reading() {
    raise_past_an_early_answered_lower_write(Duration::from_secs(2), 64 << 20, 64 << 20).await;
}

/// A store with a small receive buffer on every connection (the
/// warm-up's first), so a body it does not read backs up into fencegate,
/// and fencegate in front of it at epoch 5 with `idle` for the body's
/// idleness and `answer` for the response head.
async fn epoch_5_with_a_small_window(idle: Duration, answer: Duration) -> (ScriptedStore, Fencegate) {
    let store = ScriptedStore::start().await;
    let (fg, _) = start(&store, |c| c.body_idle_timeout(idle).request_timeout(answer)).await;
    store.set_receive_buffer(16 << 10);
    assert_admitted(&fg, &put(&fg, "/d/warm", 5).await, "establishing epoch 5");
    (store, fg)
}

/// [`epoch_5_with_a_small_window`], `timeout` for both, and a store that
/// answers writes to `/d/early` at once and reads their body only
/// `read_after` later.
async fn epoch_5_with_early_answers(read_after: Duration, timeout: Duration) -> (ScriptedStore, Fencegate) {
    let (store, fg) = epoch_5_with_a_small_window(timeout, timeout).await;
    store.fault_path("/d/early", Fault::AnswerEarly { read_after });
    (store, fg)
}

/// A write the kernel took whole is not yet at the store: the store may
/// answer before reading it all and leave some of it unsent in
/// fencegate's socket. That write keeps its place in its generation until
/// the kernel has sent its last byte, so a raise in the meantime cuts it
/// (the reset drops what is unsent) instead of letting those bytes reach
/// the store after the higher write's first. `before_answer`: how much of
/// the body the client sends before the store's early answer reaches it;
/// the rest follows the answer.
async fn raise_past_a_write_the_kernel_holds_unsent(before_answer: usize) {
    const READ_AFTER: Duration = Duration::from_secs(2);
    // Past the store's receive buffer (16 KiB, doubled by the kernel).
    const BODY: usize = 96 << 10;
    let (store, fg) = epoch_5_with_early_answers(READ_AFTER, Duration::from_secs(8)).await;
    let stream = TcpStream::connect(fg.addr()).await.expect("connect to fencegate");
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "PUT /d/early HTTP/1.1\r\nHost: store.test\r\nFencing-Token: 5\r\nContent-Length: {BODY}\r\n\r\n"
    );
    writer.write_all(head.as_bytes()).await.expect("send the head");
    write_filler(&mut writer, before_answer, 1 << 20)
        .await
        .expect("send the first part of the body");
    let mut answer = [0u8; 256];
    let n = tokio::time::timeout(HANG, reader.read(&mut answer))
        .await
        .expect("the early answer within HANG")
        .expect("read the early answer");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "the store's early answer: {}",
        String::from_utf8_lossy(&answer[..n])
    );
    write_filler(&mut writer, BODY - before_answer, 1 << 20)
        .await
        .expect("send the rest of the body");
    // The client's body is all with fencegate now, and what the store's
    // buffer did not take is unsent in fencegate's socket: the store reads
    // nothing for READ_AFTER.
    assert!(
        !no_write_in_flight(&fg, Duration::from_millis(500)).await,
        "the early-answered write left the domain while the kernel held its bytes unsent\n{}",
        log_tail(&fg)
    );

    let raise = put(&fg, "/d/six", 6).await;
    assert_admitted(&fg, &raise, "the raise to 6");
    assert!(
        raise.2 < Duration::from_secs(1),
        "the raise waited {:?} for the early-answered write\n{}",
        raise.2,
        log_tail(&fg)
    );
    // (Only the cut ends the body at the store: hyper, which the test
    // store runs on, leaves a body answered early open after its last
    // byte, so a body that arrives whole shows no event here.)
    let ended = store
        .wait_for(READ_AFTER + Duration::from_secs(3), |events| {
            events
                .iter()
                .any(|e| e.path == "/d/early" && e.kind == EventKind::BodyFailed)
        })
        .await;
    assert!(
        ended,
        "the lower write's connection was not cut: its unsent bytes reached the store after \
         the raise\n{}",
        timeline(&store.events())
    );
    assert_eq!(marks(&fg), (6, 6, 0), "(epoch, refusal mark, writes in flight)");
}

/// The kernel took the whole request before the store's answer came.
#[tokio::test(flavor = "multi_thread")]
async fn a_raise_cuts_an_early_answered_write_the_kernel_took_whole_before_the_answer() {
    raise_past_a_write_the_kernel_holds_unsent(96 << 10).await;
}

/// Most of the body followed the answer (`forward::finish_sending`).
#[tokio::test(flavor = "multi_thread")]
async fn a_raise_cuts_an_early_answered_write_the_kernel_took_whole_after_the_answer() {
    raise_past_a_write_the_kernel_holds_unsent(1 << 10).await;
}

/// The same write with no raise: once the store reads again and the
/// kernel sends the rest, the write leaves its generation at once, not
/// when the stall watch (`body_idle_timeout`) gives up on it.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_answered_write_leaves_its_generation_once_the_kernel_sent_it() {
    const READ_AFTER: Duration = Duration::from_secs(1);
    const BODY: usize = 96 << 10;
    let (_store, fg) = epoch_5_with_early_answers(READ_AFTER, Duration::from_secs(20)).await;
    let _lower = early_answered_write(&fg, "/d/early", 5, BODY, BODY).await;
    // (The store's own end of the body cannot be waited for: hyper, which
    // the test store runs on, leaves a body answered early open when its
    // last byte arrives. What it read is what counts here.)
    assert!(
        no_write_in_flight(&fg, READ_AFTER + Duration::from_secs(3)).await,
        "the write still holds its place 3 s after the store began to read it again\n{}",
        log_tail(&fg)
    );
    assert_eq!(marks(&fg), (5, 5, 0), "(epoch, refusal mark, writes in flight)");
}

/// How long the store leaves the body of a write to `/d/big-*` unread
/// after answering it early, before it closes the connection.
const UNREAD_FOR: Duration = Duration::from_secs(5);
/// The body of the write [`body_stuck_behind_an_early_answer`] leaves
/// stuck: more than the kernel holds of it (the store's receive buffer,
/// 16 KiB, and at most one segment buffer unsent in fencegate's socket:
/// TCP_NOTSENT_LOWAT), so some of it is always still to be written by
/// fencegate when the store answers (in fencegate's queue, at most
/// 256 KiB, and beyond that in its client's socket).
const STUCK_LEN: usize = 1 << 20;

/// Whether `d` has no write in flight, polling for up to `within`.
async fn no_write_in_flight(fg: &Fencegate, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if marks(fg).2 == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// fencegate with one serving thread (so one pool of store connections)
/// and epoch 5, and a token-5 write whose body fencegate could not write
/// whole: the store answered it early (1 s after its head, without reading
/// the body) and leaves the body unread for [`UNREAD_FOR`], keeping the
/// connection, so the rest of the body waits in fencegate (see
/// [`STUCK_LEN`]). The write still holds its place in the domain (its
/// request is not written whole) until a raise or the stall watch cuts it;
/// `body_idle_timeout` is 3 s so the stall watch leaves the state in place
/// for the test that follows. Returns fencegate, the client's side of the
/// write (held open) and its path. (`connect_timeout` 1 s makes the
/// barrier's safety limit 3.5 s.)
async fn body_stuck_behind_an_early_answer(
    store: &ScriptedStore,
) -> (
    Fencegate,
    (
        tokio::net::tcp::OwnedReadHalf,
        tokio::task::JoinHandle<std::io::Result<tokio::net::tcp::OwnedWriteHalf>>,
    ),
    String,
) {
    let (fg, _) = start(store, |c| {
        c.workers(1)
            .connect_timeout(Duration::from_secs(1))
            .body_idle_timeout(Duration::from_secs(3))
    })
    .await;
    // Every store connection, the warm-up's first, takes little of a body
    // the store does not read.
    store.set_receive_buffer(16 << 10);
    assert_admitted(&fg, &put(&fg, "/d/warm", 5).await, "establishing epoch 5");
    let path = "/d/big".to_string();
    let fault = Fault::AnswerEarlyThenClose {
        answer_after: Duration::from_secs(1),
        close_after: UNREAD_FOR,
    };
    store.fault_path(&path, fault);
    let (reader, sending) = early_answered_write(&fg, &path, 5, STUCK_LEN, STUCK_LEN).await;
    assert!(
        !no_write_in_flight(&fg, Duration::from_millis(100)).await,
        "the early-answered write left the domain with its body not written whole\n{}",
        log_tail(&fg)
    );
    (fg, (reader, sending), path)
}

/// What a raw exchange came to, even one with no answer.
fn outcome(raw: &Raw) -> String {
    match find(&raw.bytes, b"\r\n\r\n") {
        Some(_) => raw.summary(),
        None => format!("no answer, {:?}", raw.ended),
    }
}

/// The store's events, one a line: method, path, token, kind, and when
/// (after the first event).
fn timeline(events: &[crate::support::Event]) -> String {
    let Some(first) = events.first() else {
        return "(no events)".to_string();
    };
    let lines: Vec<String> = events
        .iter()
        .map(|e| {
            let at = e.at.duration_since(first.at);
            let token = e.token.as_deref().unwrap_or("-");
            format!("  {at:>12.3?} {} {} token {token} {:?}", e.method, e.path, e.kind)
        })
        .collect();
    lines.join("\n")
}

/// `fencegate_barrier_timeouts_total` of `d`.
fn barrier_timeouts(fg: &Fencegate) -> f64 {
    let text = fg.admin_get("/metrics").body;
    let series = format!("fencegate_barrier_timeouts_total{{domain=\"{DOMAIN}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series}in /metrics:\n{text}"))
}

/// A store may answer a request before reading its body and then stop
/// reading for a while, keeping the connection. The rest of the body is
/// then still to be written, and the connection is not ready for another
/// request until the store reads again or closes it. The pool must not
/// hand it out, or the next request waits behind that body, before its
/// `request_timeout` starts, for as long as the store pleases. (The
/// per-thread pool of c73a3d1 did: it pooled a connection once its body
/// was taken whole, and a checkout waited, with no timeout, for the
/// connection to become ready.) The next request must take another
/// connection and be answered at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_after_an_early_answer_whose_body_is_stuck_takes_another_connection() {
    let store = ScriptedStore::start().await;
    let (fg, _big, big_path) = body_stuck_behind_an_early_answer(&store).await;

    let next = exchange(&fg, "GET", "/d/next", None, 0).await;
    assert!(
        next.took < Duration::from_secs(1),
        "a bodiless read right after the early answer took {:?} ({}): it waited for the \
         connection whose body the store leaves unread for {UNREAD_FOR:?}\n{}",
        next.took,
        outcome(&next),
        log_tail(&fg)
    );
    check(
        &fg,
        &next,
        Expect::Store(201, ""),
        "a read right after the early answer",
    );
    let events = store.events();
    let head = events
        .iter()
        .position(|e| e.path == "/d/next" && e.kind == EventKind::HeadArrived)
        .expect("the read reached the store");
    assert!(
        !events[..head]
            .iter()
            .any(|e| e.path == big_path && e.kind == EventKind::Broken),
        "the read reached the store only after it closed {big_path}'s connection:\n{}",
        timeline(&events)
    );
    eprintln!("stuck body: the next read answered in {:?}", next.took);
}

/// The same with fencing, as the reviewer of c73a3d1 found it: a bodiless
/// write at the current epoch that waits behind the stuck body has its
/// body (none) sent whole, so a raise does not abort it but waits for it
/// in the barrier, which gives up at its safety limit and lets the raise
/// through; when the store then closes the stuck connection, the lower
/// write is sent on another and reaches the store after the raise. The
/// lower write must take another connection at once, be answered, and
/// reach the store before the raise, with no barrier giving up.
#[tokio::test(flavor = "multi_thread")]
async fn a_lower_write_after_an_early_answer_whose_body_is_stuck_reaches_the_store_before_the_raise() {
    let store = ScriptedStore::start().await;
    let (fg, _big, _) = body_stuck_behind_an_early_answer(&store).await;

    let lower = exchange(&fg, "DELETE", "/d/lower", Some(5), 0);
    let raise = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        put(&fg, "/d/raise", 6).await
    };
    let (lower, raise) = tokio::join!(lower, raise);

    let events = store.events();
    let head = |path: &str| {
        events
            .iter()
            .position(|e| e.path == path && e.kind == EventKind::HeadArrived)
    };
    let timeouts = barrier_timeouts(&fg);
    if let (Some(low), Some(high)) = (head("/d/lower"), head("/d/raise")) {
        assert!(
            low < high,
            "the token-5 DELETE reached the store after the raise to 6 (DELETE answered in {:?}: {}; \
             raise in {:?}; barrier timeouts {timeouts}); the store saw:\n{}\n{}",
            lower.took,
            outcome(&lower),
            raise.2,
            timeline(&events),
            log_tail(&fg)
        );
    }
    assert!(
        lower.took < Duration::from_secs(1),
        "the token-5 DELETE took {:?} ({}): it waited for the connection whose body the store \
         leaves unread for {UNREAD_FOR:?}\n{}",
        lower.took,
        outcome(&lower),
        log_tail(&fg)
    );
    check(&fg, &lower, Expect::Store(201, ""), "the token-5 DELETE");
    assert_admitted(&fg, &raise, "the raise to 6");
    assert_eq!(
        timeouts, 0.0,
        "fencegate_barrier_timeouts_total{{domain=\"{DOMAIN}\"}}"
    );
    assert_fenced_at(&fg, 6, "after the raise").await;
    eprintln!(
        "stuck body: the token-5 DELETE answered in {:?}, the raise to 6 in {:?}",
        lower.took, raise.2
    );
}

// ------------------------------------- a pooled connection closed by the store

/// A keep-alive store speaking raw HTTP/1.1: it answers every request head
/// `204 No Content` at once, records on which of its connections (numbered
/// from 0 in the order accepted) each request line arrived, and closes a
/// connection (FIN) on command. Dropping it stops it.
struct ConnStore {
    addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<StoreConn>>>,
    accept: tokio::task::JoinHandle<()>,
}

struct StoreConn {
    /// The request lines, in order.
    requests: Vec<String>,
    /// Closes the connection when sent or dropped.
    close: Option<tokio::sync::oneshot::Sender<()>>,
    closed: bool,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ConnStore {
    async fn start() -> ConnStore {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the store");
        let addr = listener.local_addr().expect("store address");
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<StoreConn>::new()));
        let shared = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (close, closing) = tokio::sync::oneshot::channel();
                let mut list = shared.lock().unwrap();
                let id = list.len();
                let task = tokio::spawn(ConnStore::serve(stream, id, shared.clone(), closing));
                list.push(StoreConn {
                    requests: Vec::new(),
                    close: Some(close),
                    closed: false,
                    task: Some(task),
                });
            }
        });
        ConnStore { addr, conns, accept }
    }

    async fn serve(
        mut stream: TcpStream,
        id: usize,
        conns: std::sync::Arc<std::sync::Mutex<Vec<StoreConn>>>,
        mut closing: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tokio::select! {
                _ = &mut closing => break,
                n = stream.read(&mut chunk) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(head) = take_request_head(&mut buf) {
                let line = head.lines().next().unwrap_or("").to_string();
                conns.lock().unwrap()[id].requests.push(line);
                if stream
                    .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        conns.lock().unwrap()[id].closed = true;
        // Dropping the stream closes it: a FIN, nothing being unread.
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The connections still open.
    fn open(&self) -> Vec<usize> {
        let conns = self.conns.lock().unwrap();
        (0..conns.len()).filter(|&id| !conns[id].closed).collect()
    }

    /// The connections on which `line` (e.g. "GET /x HTTP/1.1") arrived,
    /// once per arrival.
    fn seen_on(&self, line: &str) -> Vec<usize> {
        let conns = self.conns.lock().unwrap();
        let mut on = Vec::new();
        for (id, conn) in conns.iter().enumerate() {
            on.extend(conn.requests.iter().filter(|r| *r == line).map(|_| id));
        }
        on
    }

    /// Every connection with its request lines, for failure messages.
    fn summary(&self) -> String {
        let conns = self.conns.lock().unwrap();
        let lines: Vec<String> = conns
            .iter()
            .enumerate()
            .map(|(id, c)| {
                let state = if c.closed { "closed" } else { "open" };
                format!("  conn {id} ({state}): {:?}", c.requests)
            })
            .collect();
        lines.join("\n")
    }

    /// Closes connection `id` and waits (≤ 2 s) until it is closed.
    async fn close(&self, id: usize) {
        let close = self.conns.lock().unwrap()[id].close.take();
        if let Some(close) = close {
            let _ = close.send(());
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.conns.lock().unwrap()[id].closed {
            assert!(
                Instant::now() < deadline,
                "the store did not close its connection {id}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for ConnStore {
    fn drop(&mut self) {
        self.accept.abort();
        for conn in self.conns.lock().unwrap().iter_mut() {
            if let Some(task) = conn.task.take() {
                task.abort();
            }
        }
    }
}

/// Sends SIGSTOP or SIGCONT to fencegate and waits (≤ 5 s) until every one
/// of its threads is stopped, or none is.
fn signal_and_wait(fg: &Fencegate, signal: &str) {
    let pid = fg.pid().expect("fencegate runs");
    let want_stopped = signal == "STOP";
    tokio::task::block_in_place(|| send_signal(i64::from(pid), signal));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("fencegate's threads");
        let states: Vec<char> = tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            // The state follows the command, which is in parentheses.
            .filter_map(|stat| stat.rsplit_once(')')?.1.trim_start().chars().next())
            .collect();
        if states.iter().all(|&s| (s == 'T') == want_stopped) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fencegate's threads after SIG{signal}: states {states:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads one response from `stream` (≤ [`HANG`]): its status line and
/// whether fencegate keeps the connection open; the body is read by its
/// `Content-Length` (none for 204).
async fn read_response(stream: &mut TcpStream) -> Result<(String, bool), String> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf))),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read failed: {e}")),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap_or(0));
        while buf.len() < end + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.lines().next().unwrap_or("").to_string();
        let keep = !head.contains("connection: close") && buf.len() >= end + length;
        Ok((format!("{status} {:?}", &text[end.min(text.len())..]), keep))
    };
    tokio::time::timeout(HANG, read)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {HANG:?}")))
}

/// The store closes an idle pooled connection, and the next request is
/// checked out on it before fencegate's connection task has read the FIN
/// (hyper still calls it ready): hyper then reads the EOF before writing
/// anything and gives the request back unsent, and fencegate must send it
/// on another connection (forward.rs, `Upstream::send`), not answer 502.
///
/// The race is forced from outside: fencegate (one serving thread, one
/// event loop) is stopped with SIGSTOP, the store closes the pooled
/// connection and the client sends its next GET on a kept-alive
/// connection, and SIGCONT lets the event loop see both at once. Which it
/// handles first follows the order in which they arrived, so the cycles
/// alternate: the request first (the connection is still ready when it is
/// checked out: the resend), then the FIN first (the pool drops the closed
/// connection itself). Every GET must be answered 204 by the store, which
/// must have seen it once, on a new connection. (A GET on a new client
/// connection would always come after the FIN: the task serving it is
/// spawned when it is accepted, behind the store connection's task.)
#[tokio::test(flavor = "multi_thread")]
async fn a_request_on_a_pooled_connection_the_store_just_closed_is_sent_on_another() {
    const CYCLES: usize = 12;
    let store = ConnStore::start().await;
    let config = FencegateConfig::new(&store.url())
        .workers(1)
        .request_timeout(REQUEST_TIMEOUT);
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));
    let mut client = TcpStream::connect(fg.addr()).await.expect("connect to fencegate");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: store\r\n\r\n");

    let mut outcomes = Vec::new();
    for cycle in 0..CYCLES {
        let request_first = cycle % 2 == 0;
        let path = format!("/cycle-{cycle}");
        // A connection to pool, at first and after a cycle that left none
        // (one answered 502).
        if store.open().is_empty() {
            client
                .write_all(get(&format!("/warm-{cycle}")).as_bytes())
                .await
                .unwrap();
            let warm = read_response(&mut client).await;
            assert!(
                matches!(&warm, Ok((status, true)) if status.starts_with("HTTP/1.1 204")),
                "cycle {cycle}: a GET with no connection to the store open: {warm:?}\n{}",
                store.summary()
            );
        }
        // Time for the connection to enter the pool after its answer.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let open = store.open();
        assert_eq!(
            open.len(),
            1,
            "cycle {cycle}: the store should have one connection from fencegate open\n{}",
            store.summary()
        );
        let pooled = open[0];

        let started = Instant::now();
        signal_and_wait(&fg, "STOP");
        if request_first {
            client.write_all(get(&path).as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            store.close(pooled).await;
        } else {
            store.close(pooled).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(get(&path).as_bytes()).await.unwrap();
        }
        // Both are in fencegate's sockets before it runs again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        signal_and_wait(&fg, "CONT");
        let answer = read_response(&mut client).await;
        let took = started.elapsed();

        let order = if request_first {
            "request first"
        } else {
            "FIN first"
        };
        let seen_on = store.seen_on(&format!("GET {path} HTTP/1.1"));
        eprintln!(
            "pooled close, cycle {cycle} ({order}): {answer:?} in {took:?}, store saw it on {seen_on:?}"
        );
        let keep = matches!(&answer, Ok((_, true)));
        outcomes.push((cycle, order, answer, seen_on, pooled));
        if !keep {
            client = TcpStream::connect(fg.addr()).await.expect("connect to fencegate");
        }
    }

    let wrong: Vec<_> = outcomes
        .iter()
        .filter(|(_, _, answer, seen_on, pooled)| {
            let store_204 = matches!(answer, Ok((status, _)) if status.starts_with("HTTP/1.1 204"));
            !store_204 || seen_on.len() != 1 || seen_on[0] == *pooled
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {CYCLES} GETs sent just as the store closed the pooled connection were not the store's \
         204 on a new connection (cycle, order, answer, connections that saw it, the closed one):\n\
         {wrong:#?}\nthe store's connections:\n{}\n{}",
        wrong.len(),
        store.summary(),
        log_tail(&fg)
    );
}

/// `request_timeout` runs from the end of the forwarded body (SPEC.md,
/// Configuration): from the last byte written to the store, not from
/// fencegate taking the last frame from its client while up to 256 KiB
/// still wait in its own queue. A store that reads a 768 KiB body 16 KiB
/// at a time with 100 ms pauses (never idle for `body_idle_timeout`), then
/// answers, is not cut at `request_timeout` = 500 ms (it was, with a 504;
/// found by review).
#[tokio::test(flavor = "multi_thread")]
async fn request_timeout_runs_from_the_last_byte_written() {
    const SIZE: usize = 768 << 10;
    let (store, fg) = epoch_5_with_a_small_window(Duration::from_secs(5), Duration::from_millis(500)).await;
    store.fault_path("/d/slow", Fault::ReadSlowly(Duration::from_millis(100)));
    let raw = exchange(&fg, "PUT", "/d/slow", Some(5), SIZE).await;
    let seen = raw.seen();
    let complete = store
        .events()
        .iter()
        .any(|e| e.path == "/d/slow" && e.kind == EventKind::BodyComplete);
    assert!(
        (200..300).contains(&seen.status) && complete,
        "a store that reads steadily and answers at once got {} {:?} after {:?} (it read the \
         whole body: {complete})\n{}",
        seen.status,
        seen.header("fencegate-reason"),
        raw.took,
        log_tail(&fg)
    );
}

/// Rule 4(a): a raise aborts a lower write whose body is not yet sent
/// whole to the store, also when fencegate took all of it from the client
/// and most of it waits in fencegate's own queue (the store holds it 3 s
/// before reading). Before, that write counted as sent: the raise waited
/// behind it and the store completed it (found by review).
#[tokio::test(flavor = "multi_thread")]
async fn a_raise_aborts_a_lower_body_still_queued_in_fencegate() {
    const HOLD: Duration = Duration::from_secs(3);
    let (store, fg) = epoch_5_with_a_small_window(Duration::from_secs(8), Duration::from_secs(8)).await;
    store.hold_token_before_body("5", HOLD);
    let lower = exchange(&fg, "PUT", "/d/low", Some(5), 300 << 10);
    let higher = async {
        // By now the client has sent the whole lower body and fencegate
        // has taken it; most of it waits in fencegate's queue.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let started = Instant::now();
        (put(&fg, "/d/high", 6).await, started.elapsed())
    };
    let (low, (high, high_took)) = tokio::join!(lower, higher);
    let seen = low.seen();
    let low_complete = store
        .events()
        .iter()
        .any(|e| e.path == "/d/low" && e.kind == EventKind::BodyComplete);
    assert!(
        !(200..300).contains(&seen.status) && !low_complete,
        "the lower write was completed at the store after the raise began ({} after {:?}, \
         store saw its body whole: {low_complete})\n{}",
        seen.status,
        low.took,
        log_tail(&fg)
    );
    assert_admitted(&fg, &high, "the higher write");
    assert!(
        high_took < HOLD / 2,
        "the higher write waited {high_took:?}: for the lower one's store, not its abort"
    );
}

/// The same faults on pipelined connections (`upstream.pipeline_depth`).
mod pipelined;
