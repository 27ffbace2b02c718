//! One client connection carrying several requests (SPEC.md, "HTTP"):
//! pipelined reads, admitted and refused writes, bodies and `Expect`, on
//! one keep-alive connection. A refused write's body is never read, so the
//! connection closes after the refusal: its bytes, whatever they look
//! like, must never be taken for a next request that reaches the store,
//! and the answers come back in request order.

use crate::support::{EventKind, Fencegate, FencegateConfig, Nginx, ScriptedStore};
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
    let admitted = request("PUT", "/orders/a", &["Fencing-Token: 5"], "one");
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
    let head = request("HEAD", "/orders/k", &[], "");
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

    store.clear_holds();
    store.hold_token("6", Duration::from_millis(500));
    let addr = fg.addr();
    let body = "w".repeat(100_000);
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(request("PUT", "/orders/gone", &["Fencing-Token: 6"], &body).as_bytes())
            .unwrap();
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
    store.wait_for(Duration::from_secs(5), ended).await;
    let events = store.events_for("6");
    let complete: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::BodyComplete)
        .collect();
    for e in &complete {
        assert_eq!(e.body.len(), 100_000, "a write forwarded in part: {events:?}");
    }
}
