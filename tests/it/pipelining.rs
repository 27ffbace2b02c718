//! One client connection carrying several requests (SPEC.md, "HTTP"):
//! pipelined reads, admitted and refused writes, bodies and `Expect`, on
//! one keep-alive connection. A refused write's body is never read, so the
//! connection closes after the refusal: its bytes, whatever they look
//! like, must never be taken for a next request that reaches the store,
//! and the answers come back in request order.

use crate::support::{EventKind, Fault, Fencegate, FencegateConfig, Nginx, ScriptedStore};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

fn config(upstream: &str) -> FencegateConfig {
    FencegateConfig::new(upstream).domain("orders", "/orders/")
}

/// A request as exact text: `Host`, the given header lines, `Content-Length`
/// and the body.
fn request(method: &str, target: &str, headers: &[&str], body: &str) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: store.test\r\n");
    for line in headers {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text + &format!("Content-Length: {}\r\n\r\n{body}", body.len())
}

/// Writes `bytes` on one connection and reads until fencegate closes it (or
/// 5 s pass): everything answered, and whether it was closed.
fn until_close(addr: &str, bytes: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).expect("connect to fencegate");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A refusal may close before everything was written.
    let _ = stream.write_all(bytes);
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
    let closed = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A reset after a refusal is a close too.
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

/// The status of each final response in `text`: no body here contains a
/// status line, and a body need not end in a line break.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .filter(|s| *s >= 200)
        .collect()
}

/// nginx's access log as "METHOD URI TOKEN" lines, once it has `n` or 2 s
/// passed, then 300 ms more for anything that should not be there.
fn store_log(nginx: &Nginx, n: usize) -> Vec<String> {
    nginx.log_entries_at_least(n);
    std::thread::sleep(Duration::from_millis(300));
    nginx.log_entries().into_iter().map(|e| e.line()).collect()
}

/// A request that is admitted (token 5, the epoch) if anything ever parses
/// it: the body of each refused write below.
const SMUGGLED: &str =
    "PUT /orders/smuggled HTTP/1.1\r\nHost: store.test\r\nFencing-Token: 5\r\nContent-Length: 1\r\n\r\nx";

#[test]
fn a_refused_writes_body_is_never_a_next_request() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let addr = fg.addr();
    let admitted = request(
        "PUT",
        "/orders/a",
        &["Fencing-Token: 5", "Connection: close"],
        "one",
    );
    let (text, _) = until_close(&addr, admitted.as_bytes());
    assert_eq!(statuses(&text), [201], "{text}");
    let mut log = vec!["PUT /orders/a 5".to_string()];

    // (label, the refused write as sent, its status) after a read and an
    // admitted write on the same connection, with a read pipelined after
    // it that must never be answered.
    let chunked = format!(
        "PUT /orders/b HTTP/1.1\r\nHost: store.test\r\nFencing-Token: 4\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
        SMUGGLED.len()
    );
    let refused = [
        (
            "stale",
            request("PUT", "/orders/b", &["Fencing-Token: 4"], SMUGGLED),
            412,
        ),
        ("tokenless", request("PUT", "/orders/b", &[], SMUGGLED), 428),
        (
            "stale, Expect with the body sent at once",
            request(
                "PUT",
                "/orders/b",
                &["Fencing-Token: 4", "Expect: 100-continue"],
                SMUGGLED,
            ),
            412,
        ),
        ("stale, chunked", chunked, 412),
        (
            "stale read with a body",
            request("GET", "/orders/a", &["Fencing-Token: 4"], SMUGGLED),
            412,
        ),
        (
            "HTTP/1.0 keep-alive, stale",
            request(
                "PUT",
                "/orders/b",
                &["Fencing-Token: 4", "Connection: keep-alive"],
                SMUGGLED,
            )
            .replacen("HTTP/1.1", "HTTP/1.0", 1),
            412,
        ),
    ];
    for (label, write, status) in &refused {
        let bytes = [
            request("GET", "/orders/a", &[], ""),
            request("PUT", "/orders/a", &["Fencing-Token: 5"], "two"),
            write.clone(),
            request("GET", "/orders/after", &[], ""),
        ]
        .concat();
        let (text, closed) = until_close(&addr, bytes.as_bytes());
        assert_eq!(
            statuses(&text),
            [200, 204, *status],
            "{label}: answers in order\n{text}"
        );
        assert!(
            closed,
            "{label}: the connection stayed open after the refusal\n{text}"
        );
        // Only `close`: hyper once made it `close, keep-alive` for an
        // HTTP/1.0 client, which reads as a connection that stays open.
        let refusal = &text[text.rfind("HTTP/1.").unwrap()..];
        assert!(
            refusal.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{label}: the refusal says it closes, and only that\n{text}"
        );
        log.extend(["GET /orders/a -".to_string(), "PUT /orders/a 5".to_string()]);
        assert_eq!(
            store_log(&nginx, log.len()),
            log,
            "{label}: what reached the store"
        );
    }
    assert!(!nginx.data_dir().join("orders/smuggled").exists());
}

#[test]
fn keep_alive_and_close_are_honoured_on_pipelined_requests() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let addr = fg.addr();
    let put = request("PUT", "/orders/k", &["Fencing-Token: 5"], "k");
    let get10 =
        request("GET", "/orders/k", &["Connection: keep-alive"], "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    let head =
        request("HEAD", "/orders/k", &["Connection: keep-alive"], "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    let options = request("OPTIONS", "/orders/k", &[], "");
    let last = request("GET", "/orders/k", &["Connection: close"], "");
    let never = request("PUT", "/orders/never", &["Fencing-Token: 5"], "n");
    let bytes = [put, get10, head, options, last, never].concat();
    let (text, closed) = until_close(&addr, bytes.as_bytes());
    let got = statuses(&text);
    assert_eq!(
        got.len(),
        5,
        "one answer each up to `Connection: close`: {got:?}\n{text}"
    );
    assert_eq!(got, [201, 200, 200, 405, 200], "{text}");
    assert!(
        closed,
        "the connection stayed open after `Connection: close`\n{text}"
    );
    let lines = store_log(&nginx, 5);
    let want = [
        "PUT /orders/k 5",
        "GET /orders/k -",
        "HEAD /orders/k -",
        "OPTIONS /orders/k -",
        "GET /orders/k -",
    ];
    assert_eq!(lines, want, "what reached the store");
}

/// A refusal made while the write before it on the connection is still at
/// the store comes after that write's answer; and a client that goes away
/// right after sending a whole write still has it sent whole.
#[tokio::test(flavor = "multi_thread")]
async fn answers_keep_request_order_and_a_gone_client_s_write_is_whole() {
    let store = ScriptedStore::start().await;
    let fg = Fencegate::start(config(&store.url()));
    let addr = fg.addr();
    store.hold_token("5", Duration::from_millis(800));
    let bytes = [
        request("PUT", "/orders/o", &["Fencing-Token: 5"], "slow"),
        request("PUT", "/orders/o", &["Fencing-Token: 4"], "stale"),
    ]
    .concat();
    let (text, closed) = tokio::task::spawn_blocking(move || until_close(&addr, bytes.as_bytes()))
        .await
        .unwrap();
    let got = statuses(&text);
    assert_eq!(got.len(), 2, "{text}");
    assert!(
        (200..300).contains(&got[0]) && got[1] == 412,
        "answers in order: {got:?}\n{text}"
    );
    assert!(closed, "{text}");

    // A client that goes away right after sending a whole write: its
    // write goes whole or not at all, and a raise still waits for it.
    store.clear_holds();
    store.hold_token("6", Duration::from_millis(800));
    let addr = fg.addr();
    let body = "w".repeat(10_000);
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let write = request("PUT", "/orders/gone", &["Fencing-Token: 6"], &body);
        stream.write_all(write.as_bytes()).unwrap();
        let _ = stream.shutdown(Shutdown::Both);
    })
    .await
    .unwrap();
    let ended = |events: &[crate::support::Event]| {
        events.iter().any(|e| {
            e.token.as_deref() == Some("6")
                && matches!(
                    e.kind,
                    EventKind::BodyComplete | EventKind::BodyFailed | EventKind::Broken
                )
        })
    };
    // Had the write not been forwarded at all, nothing arrives.
    store.wait_for(Duration::from_secs(2), ended).await;
    let addr = fg.addr();
    let raise = request(
        "PUT",
        "/orders/raise",
        &["Fencing-Token: 7", "Connection: close"],
        "r",
    );
    let (text, _) = tokio::task::spawn_blocking(move || until_close(&addr, raise.as_bytes()))
        .await
        .unwrap();
    assert_eq!(statuses(&text), [201], "{text}");
    let events = store.events();
    let at = |token: &str, kind: EventKind| {
        events
            .iter()
            .find(|e| e.token.as_deref() == Some(token) && e.kind == kind)
            .map(|e| e.at)
    };
    if let Some(e) = events
        .iter()
        .find(|e| e.token.as_deref() == Some("6") && e.kind == EventKind::BodyComplete)
    {
        assert_eq!(e.body.len(), 10_000, "a write forwarded in part: {events:?}");
        let (answered, raised) = (at("6", EventKind::Responded), at("7", EventKind::HeadArrived));
        assert!(
            answered.is_some() && raised.is_some() && answered <= raised,
            "the raise reached the store before the gone client's write was answered: {events:?}"
        );
    }
}

/// `(epoch, refusal_mark, inflight_writes)` of `orders` in `/domains`.
fn marks(fg: &Fencegate) -> (u64, u64, u64) {
    let text = fg.admin_get("/domains").body;
    let list: serde_json::Value = serde_json::from_str(&text).expect("/domains is JSON");
    let d = list
        .as_array()
        .and_then(|l| l.iter().find(|d| d["name"] == "orders"))
        .cloned();
    let d = d.unwrap_or_else(|| panic!("no domain orders in /domains: {text}"));
    let get = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("/domains {k}: {d}"));
    (get("epoch"), get("refusal_mark"), get("inflight_writes"))
}

/// A client that goes away while its write waits for a raise (behind a
/// lower write still at the store) leaves the raise to end as it would
/// have: the higher token is then admitted at once, the lower refused, and
/// nothing of the gone write reaches the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_while_its_raise_waits_leaves_the_domain_sound() {
    let store = ScriptedStore::start().await;
    let fg = Fencegate::start(config(&store.url()));
    let send = |bytes: String| {
        let addr = fg.addr();
        tokio::task::spawn_blocking(move || until_close(&addr, bytes.as_bytes()))
    };
    let (text, _) = send(request(
        "PUT",
        "/orders/w",
        &["Fencing-Token: 5", "Connection: close"],
        "w",
    ))
    .await
    .unwrap();
    assert_eq!(statuses(&text), [201], "{text}");
    store.hold_token("5", Duration::from_millis(1500));
    let lower = send(request(
        "PUT",
        "/orders/held",
        &["Fencing-Token: 5", "Connection: close"],
        "h",
    ));
    assert!(
        store
            .wait_for(Duration::from_secs(3), |e| e
                .iter()
                .any(|e| e.path == "/orders/held"))
            .await
    );
    let addr = fg.addr();
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let write = request("PUT", "/orders/gone", &["Fencing-Token: 6"], "g");
        stream.write_all(write.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let _ = stream.shutdown(Shutdown::Both);
    })
    .await
    .unwrap();
    let (text, _) = lower.await.unwrap();
    assert!(statuses(&text)[0] < 300, "{text}");
    std::thread::sleep(Duration::from_millis(300));
    let (text, _) = send(request(
        "PUT",
        "/orders/after",
        &["Fencing-Token: 6", "Connection: close"],
        "a",
    ))
    .await
    .unwrap();
    assert_eq!(statuses(&text), [201], "{text}");
    let (text, _) = send(request(
        "PUT",
        "/orders/late",
        &["Fencing-Token: 5", "Connection: close"],
        "l",
    ))
    .await
    .unwrap();
    assert_eq!(statuses(&text), [412], "{text}");
    assert_eq!(marks(&fg), (6, 6, 0), "(epoch, refusal mark, writes in flight)");
    // Dropped with its client, or sent whole after the raise: never in part.
    let gone: Vec<_> = store
        .events()
        .into_iter()
        .filter(|e| e.path == "/orders/gone")
        .collect();
    let whole = gone
        .iter()
        .any(|e| e.kind == EventKind::BodyComplete && e.body.as_ref() == b"g");
    assert!(
        gone.is_empty() || whole,
        "the gone write reached the store in part: {gone:?}"
    );
}

/// A write the store answers before reading its body, with a read
/// pipelined behind it: the body still goes whole (it is what the client
/// framed), and the read is answered after it, never taken from the body.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_pipelined_behind_an_early_answered_write_waits_its_turn() {
    let store = ScriptedStore::start().await;
    let fg = Fencegate::start(config(&store.url()));
    store.fault_path(
        "/orders/early",
        Fault::AnswerEarly {
            read_after: Duration::from_millis(300),
        },
    );
    let body = format!("{SMUGGLED}{}", "b".repeat(200_000));
    let bytes = [
        request("PUT", "/orders/early", &["Fencing-Token: 5"], &body),
        request("GET", "/orders/next", &["Connection: close"], ""),
    ]
    .concat();
    let addr = fg.addr();
    let (text, closed) = tokio::task::spawn_blocking(move || until_close(&addr, bytes.as_bytes()))
        .await
        .unwrap();
    assert!(closed, "{text}");
    let got = statuses(&text);
    assert!(got.len() <= 2 && got.first() == Some(&200), "{got:?}\n{text}");
    let ended = |events: &[crate::support::Event]| {
        events.iter().any(|e| {
            e.path == "/orders/early" && matches!(e.kind, EventKind::BodyComplete | EventKind::BodyFailed)
        })
    };
    assert!(
        store.wait_for(Duration::from_secs(3), ended).await,
        "{:?}",
        store.events()
    );
    let events = store.events();
    let smuggled: Vec<_> = events.iter().filter(|e| e.path == "/orders/smuggled").collect();
    assert!(smuggled.is_empty(), "{smuggled:?}");
    let early: Vec<_> = events
        .iter()
        .filter(|e| e.path == "/orders/early" && e.kind == EventKind::BodyComplete)
        .collect();
    assert!(early.iter().all(|e| e.body.len() == body.len()), "{events:?}");
    let next = events.iter().position(|e| e.path == "/orders/next");
    if got.len() == 2 {
        assert!(next.is_some(), "answered without the store: {text}");
    }
}
