//! Hostile input (issue 6): request smuggling, oversized and slow heads,
//! invalid bytes, absolute-form targets and Host tricks, malformed tokens.
//! Sent as exact bytes over TCP to fencegate in front of a real nginx
//! WebDAV store.
//!
//! Every test ends by checking nginx's access log, not only status codes:
//! the log must be exactly the admitted writes the test expects, and every
//! write that reached nginx must carry a token at or above its domain's
//! epoch ([`Rig::assert_fenced`]). Each test has positive controls (a valid
//! write is logged), so the "nothing reached the store" checks can fail.
//!
//! Setup: domains `orders` = `/orders/` (raised to 10) and `public` =
//! `/public/` (raised to 3). No root domain.

use crate::support::{
    parse_response, request_bytes as req, Fencegate, FencegateConfig, LogEntry, Nginx, RawResponse,
};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const ORDERS_EPOCH: u64 = 10;
const PUBLIC_EPOCH: u64 = 3;
const TOKEN: &str = "Fencing-Token: 10";
/// A valid token for `public`, stale for `orders`.
const PUBLIC_TOKEN: &str = "Fencing-Token: 3";

/// An expected refusal: status and `Fencegate-Reason`.
type Refusal = (u16, Option<&'static str>);

/// Like [`req`] with raw bytes spliced into the request line and headers.
fn req_bytes(target: &[u8], headers: &[&[u8]]) -> Vec<u8> {
    let mut s = b"PUT ".to_vec();
    s.extend_from_slice(target);
    s.extend_from_slice(b" HTTP/1.1\r\nHost: store.test\r\n");
    for h in headers {
        s.extend_from_slice(h);
        s.extend_from_slice(b"\r\n");
    }
    s.extend_from_slice(b"Content-Length: 1\r\n\r\nx");
    s
}

/// Write `bytes`, read until the server closes or `bound` passes. Returns
/// what was read and whether the server closed.
fn exchange(addr: &str, bytes: &[u8], bound: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).expect("connect to fencegate");
    let _ = s.write_all(bytes);
    let (buf, closed_at) = read_until_closed(&mut s, Instant::now() + bound);
    (show(&buf), closed_at.is_some())
}

/// Reads from `s` until the server closes it (or resets it) or `deadline`
/// passes. Returns what was read and when it closed, if it did.
fn read_until_closed(s: &mut TcpStream, deadline: Instant) -> (Vec<u8>, Option<Instant>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let closed_at = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut chunk) {
            Ok(0) => break Some(Instant::now()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break None,
            Err(_) => break Some(Instant::now()), // reset
        }
    };
    (buf, closed_at)
}

/// The status of every response in `text`.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// nginx behind fencegate, and the exact (method, uri, token) lines its
/// access log must hold.
struct Rig {
    nginx: Nginx,
    fg: Fencegate,
    expected: Vec<(String, String, Option<String>)>,
}

impl Rig {
    fn start(config: impl FnOnce(FencegateConfig) -> FencegateConfig) -> Rig {
        let nginx = Nginx::start();
        let base = FencegateConfig::new(&nginx.url())
            .domain("orders", "/orders/")
            .domain("public", "/public/");
        let fg = Fencegate::start(config(base));
        let mut rig = Rig {
            nginx,
            fg,
            expected: Vec::new(),
        };
        rig.admitted(&req("PUT /orders/raise", &[TOKEN], "r"), "/orders/raise", "10");
        rig.admitted(
            &req("PUT /public/raise", &[PUBLIC_TOKEN], "r"),
            "/public/raise",
            "3",
        );
        rig
    }

    fn log(&self) -> Vec<(String, String, Option<String>)> {
        self.log_at_least(0)
    }

    fn log_at_least(&self, n: usize) -> Vec<(String, String, Option<String>)> {
        self.nginx
            .log_entries_at_least(n)
            .iter()
            .map(LogEntry::request)
            .collect()
    }

    /// One request, one response (fencegate's own or nginx's).
    fn send(&self, bytes: &[u8]) -> (RawResponse, String) {
        let (raw, _) = exchange(&self.fg.addr(), &with_close(bytes), Duration::from_secs(5));
        let ctx = format!("request {:?}\nresponse {raw:?}", show(bytes));
        assert!(raw.contains("\r\n\r\n"), "no response: {ctx}");
        (parse_response(&raw), ctx)
    }

    /// Must be answered with a 4xx and reach nothing. `reason`: the
    /// `Fencegate-Reason` required, or `None` for "a 400, from fencegate or
    /// from hyper's parser" (then a reason, if any, must be in `allowed`).
    fn refused(&self, bytes: &[u8], status: u16, reason: Option<&str>, allowed: &[&str]) {
        let (resp, ctx) = self.send(bytes);
        let got = resp.header("fencegate-reason");
        match reason {
            Some(want) => assert_eq!((resp.status, got), (status, Some(want)), "{ctx}"),
            None => {
                assert_eq!(resp.status, status, "{ctx}");
                if let Some(r) = got {
                    assert!(allowed.contains(&r), "reason {r:?} not in {allowed:?}: {ctx}");
                }
            }
        }
        self.settle();
        assert_eq!(
            self.log(),
            self.expected,
            "{ctx}\nthe refused request reached the store"
        );
    }

    /// Must be forwarded and logged by nginx as `PUT uri token`.
    fn admitted(&mut self, bytes: &[u8], uri: &str, token: &str) -> RawResponse {
        let (resp, ctx) = self.send(bytes);
        assert_eq!(resp.header("fencegate-reason"), None, "{ctx}\nnot forwarded");
        assert!((200..300).contains(&resp.status), "{ctx}");
        let method = show(bytes).split(' ').next().unwrap_or_default().to_string();
        self.expected
            .push((method, uri.to_string(), Some(token.to_string())));
        self.wait_log(&ctx);
        resp
    }

    /// nginx logs after answering: wait until the log has what is expected.
    fn wait_log(&self, ctx: &str) {
        assert_eq!(self.log_at_least(self.expected.len()), self.expected, "{ctx}");
    }

    /// Give a request that should not have reached nginx time to show up.
    fn settle(&self) {
        std::thread::sleep(Duration::from_millis(30));
    }

    /// Every write that reached nginx carries a token at or above its
    /// domain's epoch at that time (the epochs only move during setup,
    /// whose raises are the first entries), and lies in a domain.
    fn assert_fenced(&self) {
        let entries: Vec<LogEntry> = self.nginx.log_entries();
        for e in &entries {
            if matches!(e.method.as_str(), "GET" | "HEAD" | "OPTIONS") {
                continue;
            }
            let floor = if e.uri.starts_with("/orders/") {
                ORDERS_EPOCH
            } else if e.uri.starts_with("/public/") {
                PUBLIC_EPOCH
            } else {
                panic!("a write outside every domain reached the store: {e:?}\nlog: {entries:#?}");
            };
            let token = e.token.as_deref().and_then(|t| t.parse::<u64>().ok());
            assert!(
                token.is_some_and(|t| t >= floor),
                "a tokenless or stale write reached the store: {e:?} (epoch {floor})\nlog: {entries:#?}"
            );
            assert!(
                !e.uri.contains("evil"),
                "a smuggled write reached the store: {e:?}"
            );
        }
    }

    /// Nothing late arrived; the log is exactly what was expected and fenced.
    fn finish(self) {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(self.log(), self.expected, "the store's log at the end");
        self.assert_fenced();
        let evil = walk(&self.nginx.data_dir())
            .into_iter()
            .filter(|p| p.contains("evil"))
            .collect::<Vec<_>>();
        assert!(evil.is_empty(), "smuggled files in the store: {evil:?}");
    }
}

/// `Connection: close` added after the first line, so the server ends the
/// exchange after one answer (no 5 s wait for a keep-alive connection).
fn with_close(bytes: &[u8]) -> Vec<u8> {
    let Some(eol) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return bytes.to_vec();
    };
    let mut out = bytes[..eol + 2].to_vec();
    out.extend_from_slice(b"Connection: close\r\n");
    out.extend_from_slice(&bytes[eol + 2..]);
    out
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn smuggling_never_lands_a_tokenless_write() {
    let mut rig = Rig::start(|c| c);
    let evil = "PUT /orders/evil HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\ne";
    let n = evil.len();
    let te = "Transfer-Encoding: chunked\r\n";
    // (label, framing header lines, body). Sent with and without a valid
    // token on the outer request: `evil` is a second, tokenless request to
    // whoever reads the framing differently (fencegate or nginx behind it).
    let attempts: Vec<(&str, String, String)> = vec![
        (
            "CL then TE",
            format!("Content-Length: {}\r\n{te}", 5 + n),
            format!("0\r\n\r\n{evil}"),
        ),
        (
            "TE then CL",
            format!("{te}Content-Length: 6\r\n"),
            format!("1\r\nx\r\n0\r\n\r\n{evil}"),
        ),
        (
            "two lengths",
            format!("Content-Length: 1\r\nContent-Length: {}\r\n", 1 + n),
            format!("x{evil}"),
        ),
        (
            "two lengths in one header",
            format!("Content-Length: 1, {}\r\n", 1 + n),
            format!("x{evil}"),
        ),
        (
            "chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n".into(),
            format!("1\r\nx\r\n0\r\n\r\n{evil}"),
        ),
        (
            "identity, chunked with a length",
            format!("Transfer-Encoding: identity, chunked\r\nContent-Length: {n}\r\n"),
            format!("0\r\n\r\n{evil}"),
        ),
        (
            "space before colon",
            format!("Transfer-Encoding : chunked\r\nContent-Length: {n}\r\n"),
            format!("0\r\n\r\n{evil}"),
        ),
        (
            "xchunked",
            format!("Transfer-Encoding: xchunked\r\nContent-Length: {n}\r\n"),
            evil.to_string(),
        ),
        (
            "two TE headers",
            format!("{te}Transfer-Encoding: identity\r\nContent-Length: {n}\r\n"),
            format!("0\r\n\r\n{evil}"),
        ),
        (
            "TE with a tab and a length",
            format!("Transfer-Encoding:\tchunked\r\nContent-Length: {n}\r\n"),
            format!("0\r\n\r\n{evil}"),
        ),
        (
            "chunk size with a sign",
            te.into(),
            format!("+1\r\nx\r\n0\r\n\r\n{evil}"),
        ),
        ("chunk size 0x", te.into(), format!("0x1\r\nx\r\n0\r\n\r\n{evil}")),
        (
            "chunk size overflow",
            te.into(),
            format!("10000000000000001\r\nx\r\n0\r\n\r\n{evil}"),
        ),
        (
            "chunk ext with bare LF",
            te.into(),
            format!("1;a\nb\r\nx\r\n0\r\n\r\n{evil}"),
        ),
        (
            "negative length",
            "Content-Length: -1\r\n".into(),
            evil.to_string(),
        ),
    ];
    for (label, framing, body) in &attempts {
        for token in ["", "Fencing-Token: 10\r\n"] {
            let bytes = format!("PUT /orders/s HTTP/1.1\r\nHost: store.test\r\n{token}{framing}\r\n{body}");
            let (text, _) = exchange(&rig.fg.addr(), bytes.as_bytes(), Duration::from_secs(3));
            let got = statuses(&text);
            eprintln!("smuggling {label} (token: {}): {got:?}", !token.is_empty());
            assert!(!got.is_empty(), "{label}: no answer\n{bytes:?}");
            // With a token the outer write may be admitted (a framing hyper
            // accepts); then nginx must log exactly it, never `evil`. A
            // coding besides `chunked` is refused with 501.
            for s in &got {
                assert!(
                    (400..500).contains(s) || *s == 501 || (!token.is_empty() && (200..300).contains(s)),
                    "{label}: {got:?}\n{bytes:?}\n{text}"
                );
            }
            if got.iter().any(|s| (200..300).contains(s)) {
                rig.expected
                    .push(("PUT".into(), "/orders/s".into(), Some("10".into())));
                rig.wait_log(label);
            }
            rig.settle();
            assert_eq!(rig.log(), rig.expected, "{label}: {bytes:?}\n{text}");
            rig.assert_fenced();
        }
    }

    // The task's classic: a tokened PUT whose Content-Length covers a whole
    // tokenless request. It is only a body, stored byte for byte.
    let outer =
        format!("PUT /orders/x HTTP/1.1\r\nHost: store.test\r\n{TOKEN}\r\nContent-Length: {n}\r\n\r\n{evil}");
    rig.admitted(outer.as_bytes(), "/orders/x", "10");
    let stored = std::fs::read_to_string(rig.nginx.data_dir().join("orders/x")).expect("orders/x stored");
    assert_eq!(stored, evil, "the hidden request is the body");
    // The same with a short length: what follows is a second request on the
    // connection, judged by fencegate on its own (no token: 428).
    let outer = format!("PUT /orders/y HTTP/1.1\r\nHost: store.test\r\n{TOKEN}\r\nContent-Length: 1\r\n\r\nyPUT /orders/evil HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\n\r\ne");
    let (text, closed) = exchange(&rig.fg.addr(), outer.as_bytes(), Duration::from_secs(5));
    assert!(closed, "the server closes after the second answer: {text}");
    assert_eq!(statuses(&text), [201, 428], "{text}");
    rig.expected
        .push(("PUT".into(), "/orders/y".into(), Some("10".into())));
    rig.wait_log("short length");

    // The pooled upstream connections still frame correctly afterwards.
    rig.admitted(&req("PUT /orders/after", &[TOKEN], "ok"), "/orders/after", "10");
    rig.finish();
}

#[test]
fn oversized_heads_are_431_and_never_forwarded() {
    let mut rig = Rig::start(|c| c.max_header_bytes(4096));
    let big = format!("X-Pad: {}", "a".repeat(6000));
    let huge = format!("X-Pad: {}", "a".repeat(64 * 1024));
    let many: Vec<String> = (0..300).map(|i| format!("X-H{i}: {}", "b".repeat(20))).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    // Whitespace around a value is not counted by fencegate's own check
    // (it measures the parsed head), but hyper's buffer bounds it.
    let long_token = format!("Fencing-Token: 10{}", " ".repeat(24 * 1024));
    // Fencegate's own check (answers with a reason) and hyper's buffer
    // limit (limit + 16 KiB) both answer 431.
    for (label, headers) in [
        ("one big header, valid token", vec![big.as_str(), TOKEN]),
        ("one big header, no token", vec![big.as_str()]),
        ("a huge header", vec![huge.as_str(), TOKEN]),
        ("300 small headers", many.iter().copied().chain([TOKEN]).collect()),
        ("a padded token", vec![long_token.as_str()]),
    ] {
        let bytes = req("PUT /orders/big", &headers, "x");
        let (resp, ctx) = rig.send(&bytes);
        assert_eq!(resp.status, 431, "{label}: {}", &ctx[..ctx.len().min(300)]);
        if let Some(r) = resp.header("fencegate-reason") {
            assert_eq!(r, "header_too_large", "{label}");
        }
        rig.settle();
        assert_eq!(rig.log(), rig.expected, "{label}: reached the store");
    }
    let (resp, _) = rig.send(&req("PUT /orders/big", &[&big, TOKEN], "x"));
    assert_eq!(
        resp.header("fencegate-reason"),
        Some("header_too_large"),
        "a head within hyper's buffer gets fencegate's own 431: {resp:?}"
    );
    // A long request line: 431 or 414, never forwarded.
    let long_path = format!("PUT /orders/{}", "p".repeat(8000));
    let (resp, ctx) = rig.send(&req(&long_path, &[TOKEN], "x"));
    assert!(matches!(resp.status, 414 | 431), "{}", &ctx[..300]);
    rig.settle();
    assert_eq!(rig.log(), rig.expected, "the long line reached the store");
    // Control: a head just under the limit is admitted.
    let fits = format!("X-Pad: {}", "a".repeat(3000));
    rig.admitted(
        &req("PUT /orders/fits", &[&fits, TOKEN], "x"),
        "/orders/fits",
        "10",
    );
    rig.finish();
}

#[test]
fn slowloris_does_not_starve_the_listener() {
    let mut rig = Rig::start(|c| c.header_read_timeout(Duration::from_secs(1)));
    let addr = rig.fg.addr();
    let partial = b"PUT /orders/slow HTTP/1.1\r\nHost: store.test\r\nFencing-Token: 10\r\nX-Slow: a";
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.write_all(partial).expect("write partial head");
        stalled.push((s, Instant::now()));
    }
    // A drip feed: one byte every 200 ms, so an idle timer never fires.
    let drip_addr = addr.clone();
    let drip = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&drip_addr).expect("connect");
        let start = Instant::now();
        for b in partial.iter().cycle() {
            if s.write_all(&[*b]).is_err() || start.elapsed() > Duration::from_secs(6) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    });

    // A normal request on a fresh connection is answered at once.
    let t = Instant::now();
    let (resp, ctx) = rig.send(&req("PUT /orders/normal", &[TOKEN], "n"));
    let took = t.elapsed();
    assert_eq!(resp.status, 201, "{ctx}");
    assert!(
        took < Duration::from_secs(1),
        "a normal write took {took:?} behind 200 stalled heads"
    );
    rig.expected
        .push(("PUT".into(), "/orders/normal".into(), Some("10".into())));
    rig.wait_log("normal");
    let t = Instant::now();
    let (resp, ctx) = rig.send(b"GET /public/raise HTTP/1.1\r\nHost: store.test\r\n\r\n");
    let read_took = t.elapsed();
    assert_eq!((resp.status, resp.body.as_str()), (200, "r"), "{ctx}");
    assert!(read_took < Duration::from_secs(1), "a read took {read_took:?}");
    rig.expected.push(("GET".into(), "/public/raise".into(), None));
    rig.wait_log("read");

    // Every stalled connection is closed about header_read_timeout after it
    // began, with no answer but perhaps a 408.
    let mut lifetimes = Vec::new();
    for (mut s, opened) in stalled {
        let (buf, closed_at) = read_until_closed(&mut s, opened + Duration::from_secs(4));
        let text = show(&buf);
        let closed_at =
            closed_at.unwrap_or_else(|| panic!("a stalled connection still open after 4 s: {text:?}"));
        assert!(
            statuses(&text).iter().all(|s| *s == 408),
            "stalled connection got {text:?}"
        );
        lifetimes.push(closed_at - opened);
    }
    let (min, max) = (lifetimes.iter().min().unwrap(), lifetimes.iter().max().unwrap());
    assert!(
        *min >= Duration::from_millis(800),
        "closed before the timeout: {min:?}"
    );
    assert!(*max < Duration::from_secs(3), "closed late: {max:?}");
    let dripped = drip.join().expect("drip thread");
    eprintln!("slowloris: normal write {took:?}, read {read_took:?}; stalled closed after {min:?}..{max:?}; drip-fed head closed after {dripped:?}");
    assert!(
        dripped < Duration::from_secs(3),
        "a drip-fed head kept its connection for {dripped:?}: the timeout must bound the whole head"
    );
    rig.finish();
}

/// Sends `GET /public/big` for a file far larger than the socket buffers
/// between the store and the client hold, on a connection with a small
/// receive window (the client side holds little, whatever the host's
/// tcp_rmem lets autotuning reach). Returns the connection, with a 5 s read
/// timeout, and the file's size.
fn get_a_big_answer_through_a_small_window(rig: &Rig) -> (TcpStream, usize) {
    let size = 64 << 20;
    std::fs::write(rig.nginx.data_dir().join("public/big"), vec![0x5A; size]).expect("write the file");
    let mut s = TcpStream::connect(rig.fg.addr()).expect("connect");
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(16 * 1024)
        .expect("SO_RCVBUF");
    s.write_all(b"GET /public/big HTTP/1.1\r\nHost: store.test\r\n\r\n")
        .expect("send the request");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    (s, size)
}

/// A client that stops reading its answer is cut once it has taken nothing
/// for `body_idle_timeout`, like one that stops sending its body: its
/// connection and the store's are closed, not held for good (nginx's
/// `send_timeout`). Before, only a pause of the store's was timed, and a
/// client that read the head of a large answer and no more kept both
/// connections open until the store gave up, or forever.
#[test]
fn a_client_that_stops_reading_its_answer_is_cut_after_body_idle_timeout() {
    let idle = Duration::from_secs(1);
    let mut rig = Rig::start(|c| c.body_idle_timeout(idle));
    let (mut s, size) = get_a_big_answer_through_a_small_window(&rig);
    let mut head = [0u8; 1024];
    let n = s.read(&mut head).expect("the answer's head");
    assert!(
        show(&head[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        show(&head[..n])
    );

    // The client stops reading; then reads what is left.
    std::thread::sleep(idle * 4);
    let (rest, closed) = read_until_closed(&mut s, Instant::now() + Duration::from_secs(20));
    let got = n + rest.len();
    assert!(
        closed.is_some() && got < size,
        "a client that took nothing for {:?} still had its answer ({got} of {size} bytes, closed: {})",
        idle * 4,
        closed.is_some()
    );
    // The store's connection was closed too, so nginx ended the request.
    rig.expected.push(("GET".into(), "/public/big".into(), None));
    rig.wait_log("the cut GET");
}

/// A client that reads its answer slowly but steadily is no stalled
/// client: it takes bytes well within every `body_idle_timeout`, so its
/// answer goes on, and the store connection behind it stays open. (Found
/// by review: the write stall timer is reset only when a write is taken,
/// and the kernel reports a full socket writable again only once a third
/// of its send buffer drained, over a megabyte on loopback: a client
/// reading 200 KB/s waited seconds for that, and was cut at 1 s.)
#[test]
fn a_client_that_reads_its_answer_slowly_but_steadily_is_not_cut() {
    let idle = Duration::from_secs(1);
    let mut rig = Rig::start(|c| c.body_idle_timeout(idle));
    let (mut s, _) = get_a_big_answer_through_a_small_window(&rig);
    // 8 KiB every 40 ms, about 200 KB/s, for five idle timeouts.
    let mut chunk = [0u8; 8192];
    let mut got = 0;
    let reading = Instant::now();
    while reading.elapsed() < idle * 5 {
        let n = s.read(&mut chunk).expect("the answer goes on");
        assert!(
            n > 0,
            "the answer ended after {got} bytes in {:?}",
            reading.elapsed()
        );
        got += n;
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(
        rig.log(),
        rig.expected,
        "the store connection was cut while its client read {got} bytes in {:?}",
        reading.elapsed()
    );
    drop(s);
    rig.expected.push(("GET".into(), "/public/big".into(), None));
    rig.wait_log("the GET whose client left");
}

/// The admin listener is protected like the proxy's: a connection that
/// sends no head, or only part of one, is closed about
/// `header_read_timeout` after it opened, while a whole request is still
/// answered. (axum's server has no header read timeout: such connections
/// stayed open for good, each holding a file descriptor of the process
/// that the proxy listener and the store connections need too.)
#[test]
fn admin_connections_without_a_whole_head_are_closed_after_header_read_timeout() {
    let rig = Rig::start(|c| c.header_read_timeout(Duration::from_secs(1)));
    let admin = rig.fg.config().admin_listen.clone();
    let mut stalled = Vec::new();
    for partial in [&b""[..], b"GET /metrics HTTP/1.1\r\nHost: admin\r\n"] {
        let mut s = TcpStream::connect(&admin).expect("connect to admin");
        s.write_all(partial).expect("write");
        stalled.push((s, Instant::now(), show(partial)));
    }
    assert_eq!(
        rig.fg.admin_get("/healthz").status,
        200,
        "a whole request is answered"
    );
    for (mut s, opened, sent) in stalled {
        let (buf, closed_at) = read_until_closed(&mut s, opened + Duration::from_secs(5));
        let text = show(&buf);
        let closed_at = closed_at
            .unwrap_or_else(|| panic!("an admin connection that sent {sent:?} was still open after 5 s"));
        assert!(
            statuses(&text).iter().all(|s| *s == 408),
            "a stalled admin connection got {text:?}"
        );
        let lived = closed_at - opened;
        assert!(
            lived >= Duration::from_millis(800),
            "closed before the timeout: {lived:?}"
        );
    }
    rig.finish();
}

/// Reads one response with a `Content-Length` body from `s`.
fn read_one_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        let text = show(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .map_or(0, |v| v.parse::<usize>().unwrap());
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
        let n = s.read(&mut chunk).expect("a response");
        assert!(n > 0, "closed before a whole response: {:?}", show(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The header read timeout bounds every head on a keep-alive connection,
/// not only the first: after a few answered requests, a connection that
/// stalls inside its next head, or sends nothing at all, is closed about
/// `header_read_timeout` later.
#[test]
fn heads_after_the_first_on_a_connection_are_bounded_too() {
    let mut rig = Rig::start(|c| c.header_read_timeout(Duration::from_secs(1)));
    let addr = rig.fg.addr();
    let mut stalling = TcpStream::connect(&addr).expect("connect");
    let mut idle = TcpStream::connect(&addr).expect("connect");
    let mut answered = [Instant::now(); 2];
    for round in 0..3 {
        if round > 0 {
            // Less than the timeout between heads: answered, not closed.
            std::thread::sleep(Duration::from_millis(300));
        }
        for (i, s) in [&mut stalling, &mut idle].into_iter().enumerate() {
            s.write_all(b"GET /public/raise HTTP/1.1\r\nHost: store.test\r\n\r\n")
                .unwrap();
            let text = read_one_response(s);
            answered[i] = Instant::now();
            assert_eq!(statuses(&text), [200], "{text:?}");
            rig.expected.push(("GET".into(), "/public/raise".into(), None));
        }
    }
    stalling
        .write_all(b"PUT /orders/slow HTTP/1.1\r\nHost: store.test\r\nX-Slow: a")
        .unwrap();
    // The timer of the next head starts when the last answer has gone out.
    for (i, name) in ["stalled head", "idle"].into_iter().enumerate() {
        let s = if i == 0 { &mut stalling } else { &mut idle };
        let (_, closed_at) = read_until_closed(s, answered[i] + Duration::from_secs(4));
        let after =
            closed_at.unwrap_or_else(|| panic!("{name}: still open 4 s after its last answer")) - answered[i];
        assert!(
            after >= Duration::from_millis(800),
            "{name}: closed early, after {after:?}"
        );
        assert!(
            after < Duration::from_secs(3),
            "{name}: closed late, after {after:?}"
        );
        eprintln!("{name}: closed {after:?} after its last answer");
    }
    rig.wait_log("the keep-alive reads");
    rig.finish();
}

#[test]
fn invalid_bytes_in_paths_and_headers_are_400() {
    let mut rig = Rig::start(|c| c);
    let token = TOKEN.as_bytes();
    // Paths: raw non-UTF-8, control bytes; encoded NUL, slash, climb.
    let paths: &[&[u8]] = &[
        b"/orders/a\xffb",
        b"/orders/\xc3\x28",
        b"/orders/caf\xe9",
        b"/orders/\xed\xa0\x80",
        b"/orders/a\x00b",
        b"/orders/a\x01b",
        b"/orders/a\x7fb",
        b"/orders/a\rb",
        b"/orders/a%00",
        b"/orders/a%00/../b",
        b"/orders%2Fa",
        b"/public%2F..%2Forders/a",
        b"/public/..%2Forders/a",
        b"/../orders/a",
        b"/orders/../../orders/a",
        b"/%2e%2e/orders/a",
    ];
    for path in paths {
        for headers in [&[][..], &[token][..]] {
            let bytes = req_bytes(path, headers);
            rig.refused(&bytes, 400, None, &["bad_path"]);
        }
    }
    // Header values and names: control bytes and invalid UTF-8 around or in
    // the token, and in other headers of a tokenless write.
    let heads: &[&[&[u8]]] = &[
        &[b"Fencing-Token: 1\x000"],
        &[b"Fencing-Token: 10\x00"],
        &[b"Fencing-Token: \xff10"],
        &[b"Fencing-Token: 10\xc3\x28"],
        &[b"Fencing-Token: 1\x7f"],
        &[b"Fencing-Token: 10\rX: 1"],
        &[b"Fencing-Token\x00: 10"],
        &[b"Fencing Token: 10"],
        &[b"Fencing-Token:10", b"X-Note: a\x00b"],
        &[b"X-Note: a\x01b", b"Fencing-Token: 10"],
        &[b" Fencing-Token: 10"],
        &[b"X-Note: a", b"\tFencing-Token: 10"],
    ];
    for headers in heads {
        let bytes = req_bytes(b"/orders/h", headers);
        rig.refused(&bytes, 400, None, &["malformed_token", "bad_path"]);
    }
    // Bytes hyper accepts (obs-text) in another header of a tokenless write:
    // refused as missing_token; with a token it is judged like any write.
    rig.refused(
        &req_bytes(b"/orders/h", &[b"X-Note: caf\xe9\xff"]),
        428,
        Some("missing_token"),
        &[],
    );
    let ok = req_bytes(b"/orders/h", &[b"X-Note: caf\xe9\xff", token]);
    rig.admitted(&ok, "/orders/h", "10");
    rig.admitted(&req_bytes(b"/orders/a%20b", &[token]), "/orders/a b", "10");
    // Encoded non-UTF-8 stays encoded and lies in orders: a write there.
    rig.refused(
        &req_bytes(b"/orders/%c3%28", &[]),
        428,
        Some("missing_token"),
        &[],
    );
    rig.finish();
}

#[test]
fn absolute_form_and_host_tricks_are_judged_on_the_forwarded_path() {
    let mut rig = Rig::start(|c| c);
    let missing: Refusal = (428, Some("missing_token"));
    let stale: Refusal = (412, Some("stale_epoch"));
    let table: &[(&str, &[&str], Refusal)] = &[
        ("PUT http://evil.example/orders/x", &[], missing),
        ("PUT http://x/public/../orders/x", &[], missing),
        ("PUT http://x/public/../orders/x", &[PUBLIC_TOKEN], stale),
        ("PUT http://x/public/%2e%2e/orders/x", &[PUBLIC_TOKEN], stale),
        ("PUT https://evil.example/orders/x", &[], missing),
        ("PUT http://public@evil.example/orders/x", &[], missing),
        ("PUT http://evil.example:1/orders/x", &[PUBLIC_TOKEN], stale),
        (
            "PUT http://evil.example/elsewhere/x",
            &[TOKEN],
            (403, Some("no_domain")),
        ),
        (
            "PUT http://evil.example/public/..%2Forders/x",
            &[PUBLIC_TOKEN],
            (400, Some("bad_path")),
        ),
        ("DELETE http://evil.example/orders/raise", &[], missing),
        (
            "MOVE http://evil.example/public/raise",
            &["Destination: /orders/evil", PUBLIC_TOKEN],
            (403, Some("cross_domain")),
        ),
        (
            "MOVE /public/raise",
            &[
                "Destination: http://evil.example/public/../orders/evil",
                PUBLIC_TOKEN,
            ],
            (403, Some("cross_domain")),
        ),
    ];
    for (line, headers, (status, reason)) in table {
        rig.refused(&req(line, headers, "x"), *status, *reason, &[]);
    }
    // Host tricks on a tokenless write: the Host never picks a domain.
    for hosts in [
        &["Host: public.store.test"][..],
        &["Host: evil.example", "Host: store.test"],
        &["Host: store.test/public/.."],
        &["Host: evil.example:80@store.test"],
    ] {
        let mut bytes = b"PUT /orders/x HTTP/1.1\r\n".to_vec();
        for h in hosts {
            bytes.extend_from_slice(h.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"Content-Length: 1\r\n\r\nx");
        let (resp, ctx) = rig.send(&bytes);
        assert!((400..500).contains(&resp.status), "{ctx}");
        rig.settle();
        assert_eq!(rig.log(), rig.expected, "{ctx}\nreached the store");
        // With the public token the orders write is stale, whatever Host says.
        let mut stale = bytes.clone();
        let at = stale.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        stale.splice(at..at, b"\r\nFencing-Token: 3".iter().copied());
        let (resp, ctx) = rig.send(&stale);
        assert!((400..500).contains(&resp.status), "{ctx}");
        rig.settle();
        assert_eq!(rig.log(), rig.expected, "{ctx}\nreached the store");
    }
    // Controls: absolute form with a valid token lands at the normalized path.
    rig.admitted(
        &req("PUT http://evil.example/public/../orders/abs", &[TOKEN], "a"),
        "/orders/abs",
        "10",
    );
    let other_host =
        b"PUT /orders/host HTTP/1.1\r\nHost: evil.example\r\nFencing-Token: 10\r\nContent-Length: 1\r\n\r\nh";
    rig.admitted(other_host, "/orders/host", "10");
    rig.finish();
}

#[test]
fn odd_tokens_are_400_malformed_token() {
    let mut rig = Rig::start(|c| c);
    let values: &[&str] = &[
        "+10",
        "010",
        "0",
        "00",
        "-10",
        "1 0",
        "1\t0",
        "10 10",
        "10,10",
        "10, 10",
        "10;",
        "1e1",
        "0x0a",
        "10.0",
        "9223372036854775808",
        "18446744073709551616",
        "99999999999999999999999",
        "\u{ff11}\u{ff10}",
        "\u{0661}\u{0660}",
        "10\u{a0}",
        "\"10\"",
        "=10",
    ];
    for v in values {
        let h = format!("Fencing-Token: {v}");
        rig.refused(
            &req("PUT /orders/t", &[&h], "x"),
            400,
            Some("malformed_token"),
            &[],
        );
    }
    // The header given more than once, in any spelling, even with equal values.
    let repeats: &[&[&str]] = &[
        &[TOKEN, TOKEN],
        &["Fencing-Token: 10", "fencing-token: 11"],
        &["FENCING-TOKEN: 11", "Fencing-Token: 10"],
        &["Fencing-Token: 10", "Fencing-Token: "],
        &["Fencing-Token: ", "Fencing-Token: 10"],
    ];
    for headers in repeats {
        rig.refused(
            &req("PUT /orders/t", headers, "x"),
            400,
            Some("malformed_token"),
            &[],
        );
    }
    // An empty value: missing or malformed, never admitted.
    for v in ["Fencing-Token:", "Fencing-Token:   "] {
        let (resp, ctx) = rig.send(&req("PUT /orders/t", &[v], "x"));
        assert!(
            matches!(
                (resp.status, resp.header("fencegate-reason")),
                (400, Some("malformed_token")) | (428, Some("missing_token"))
            ),
            "{ctx}"
        );
        rig.settle();
        assert_eq!(rig.log(), rig.expected, "{ctx}");
    }
    // Controls: whitespace around the token and the largest token are valid.
    rig.admitted(
        &req("PUT /orders/t", &["Fencing-Token: \t10 \t"], "x"),
        "/orders/t",
        "10",
    );
    let max = "Fencing-Token: 9223372036854775807";
    rig.admitted(
        &req("PUT /public/max", &[max], "x"),
        "/public/max",
        "9223372036854775807",
    );
    rig.finish();
}
