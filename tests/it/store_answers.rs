//! The store's answers on the wire, byte for byte: fencegate reads the
//! store's side of HTTP/1.1 with a codec of its own (src/codec.rs), so
//! answers that nginx never sends are scripted here by a raw TCP store:
//! informational answers before the final one, answers framed in ways that
//! cannot be trusted, and answers that run until the store closes. Each
//! test also checks which store connection the next request takes: a
//! connection whose answer was not framed beyond doubt is never reused.

use crate::support::{client, parse_response, raw_request, take_request_head, Fencegate, FencegateConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A store that answers each request head with the bytes scripted for its
/// path (a bodiless `204` otherwise), then closes the connection if the
/// script says so, and records on which connection (numbered from 0 in the
/// order accepted) each request arrived.
struct RawStore {
    addr: std::net::SocketAddr,
    arrivals: Arc<Mutex<Vec<(usize, String)>>>,
    /// Every request head, whole, in order of arrival.
    heads: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// What the store sends for a path: the bytes, and whether it closes the
/// connection after them.
type Script = HashMap<&'static str, (&'static [u8], bool)>;

impl RawStore {
    async fn start(script: Script) -> RawStore {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the store");
        let addr = listener.local_addr().expect("store address");
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (record, all_heads) = (arrivals.clone(), heads.clone());
        let script = Arc::new(script);
        let accept = tokio::spawn(async move {
            let mut id = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let (record, heads) = (record.clone(), all_heads.clone());
                tokio::spawn(RawStore::serve(stream, id, record, heads, script.clone()));
                id += 1;
            }
        });
        RawStore {
            addr,
            arrivals,
            heads,
            accept,
        }
    }

    async fn serve(
        mut stream: TcpStream,
        id: usize,
        record: Arc<Mutex<Vec<(usize, String)>>>,
        heads: Arc<Mutex<Vec<String>>>,
        script: Arc<Script>,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(head) = take_request_head(&mut buf) {
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                record.lock().unwrap().push((id, path.clone()));
                heads.lock().unwrap().push(head);
                let (answer, close) = script
                    .get(path.as_str())
                    .copied()
                    .unwrap_or((b"HTTP/1.1 204 No Content\r\n\r\n", false));
                if stream.write_all(answer).await.is_err() || close {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The store connection each request for `path` arrived on, in order.
    fn connections_of(&self, path: &str) -> Vec<usize> {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals
            .iter()
            .filter(|(_, p)| p == path)
            .map(|(id, _)| *id)
            .collect()
    }

    fn arrivals(&self) -> String {
        format!("{:?}", self.arrivals.lock().unwrap())
    }
}

impl Drop for RawStore {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// fencegate with one serving thread (one pool of store connections) in
/// front of `store`.
fn gate(store: &RawStore) -> Fencegate {
    let config = FencegateConfig::new(&store.url())
        .domain("d", "/d/")
        .workers(1)
        .request_timeout(Duration::from_secs(5));
    tokio::task::block_in_place(|| Fencegate::start(config))
}

/// GETs `path` through fencegate: status, `Fencegate-Reason`, body.
async fn get(fg: &Fencegate, path: &str) -> (u16, Option<String>, String) {
    let http = client();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        http.get(format!("{}{path}", fg.url())).send(),
    )
    .await
    .unwrap_or_else(|_| panic!("GET {path}: no answer within 10 s"))
    .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get("fencegate-reason")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response
        .text()
        .await
        .unwrap_or_else(|e| format!("<body failed: {e}>"));
    (status, reason, body)
}

/// `path` is answered `want`, and the request after it (`/d/next`) goes
/// on the same store connection if `reused`, else on a new one.
async fn check(store: &RawStore, fg: &Fencegate, path: &str, want: (u16, Option<&str>, &str), reused: bool) {
    let (status, reason, body) = get(fg, path).await;
    let what = format!("GET {path}");
    if want.1.is_some() {
        assert_eq!((status, reason.as_deref()), (want.0, want.1), "{what}: {body}");
    } else {
        assert_eq!((status, reason.as_deref(), body.as_str()), want, "{what}");
    }
    check_next(store, fg, path, reused).await;
}

/// The request after the last one for `path` (`/d/next`) goes on the same
/// store connection if `reused`, else on a new one.
async fn check_next(store: &RawStore, fg: &Fencegate, path: &str, reused: bool) {
    let what = format!("GET {path}");
    let before = store.connections_of("/d/next").len();
    let (status, _, _) = get(fg, "/d/next").await;
    assert_eq!(status, 204, "the request after {what}");
    let on = store.connections_of(path);
    let next = store.connections_of("/d/next");
    assert_eq!(next.len(), before + 1, "{}", store.arrivals());
    let (answered_on, next_on) = (*on.last().unwrap(), *next.last().unwrap());
    assert_eq!(
        answered_on == next_on,
        reused,
        "after {what}, the next request went on store connection {next_on}, the answer came on \
         {answered_on}: that connection should {}be reused\n{}",
        if reused { "" } else { "not " },
        store.arrivals()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn informational_answers_are_skipped_and_the_final_one_forwarded() {
    let mut script = Script::new();
    script.insert(
        "/d/hints",
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    check(&store, &fg, "/d/hints", (201, None, "ok"), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_that_cannot_be_framed_are_502_and_their_connection_is_dropped() {
    let mut script = Script::new();
    // Two lengths that differ: either could be the truth (RFC 9110 §8.6).
    script.insert(
        "/d/two-lengths",
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
            false,
        ),
    );
    script.insert(
        "/d/bad-length",
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false),
    );
    script.insert("/d/not-http", (b"HTTX/1.1 200 OK\r\n\r\n", false));
    script.insert("/d/bad-header", (b"HTTP/1.1 200 OK\r\nx y: 1\r\n\r\n", false));
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    let refused = (502, Some("upstream_bad_response"), "");
    for path in ["/d/two-lengths", "/d/bad-length", "/d/not-http", "/d/bad-header"] {
        check(&store, &fg, path, refused, false).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_with_both_framings_is_read_by_its_chunks_and_its_connection_dropped() {
    let mut script = Script::new();
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and the
    // connection is not to be trusted after such a message.
    script.insert(
        "/d/both",
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n",
            false,
        ),
    );
    script.insert(
        "/d/chunked",
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            false,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    check(&store, &fg, "/d/both", (200, None, "ok"), false).await;
    check(&store, &fg, "/d/chunked", (200, None, "abcde"), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_that_run_until_the_store_closes_arrive_whole() {
    let mut script = Script::new();
    script.insert("/d/http10", (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", true));
    script.insert(
        "/d/close",
        (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 4\r\n\r\nbye!",
            true,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    check(&store, &fg, "/d/http10", (200, None, "until the end"), false).await;
    check(&store, &fg, "/d/close", (200, None, "bye!"), false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_stay_on_their_hop_both_ways() {
    let mut script = Script::new();
    script.insert(
        "/d/hop",
        (
            b"HTTP/1.1 200 OK\r\nx-private: 1\r\nConnection: keep-alive, X-Private\r\n\
              Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nx-kept: yes\r\n\
              content-length: 2\r\n\r\nok",
            false,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    let request = "GET /d/hop HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\n\
                   X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: gzip, trailers\r\n\
                   Proxy-Authorization: Basic eA==\r\nUpgrade: h2c\r\nX-Forwarded-For: 10.0.0.1\r\n\
                   X-Forwarded-For: 10.0.0.2\r\nx-kept: yes\r\nConnection: close\r\n\r\n";
    let addr = fg.url();
    let answer = tokio::task::block_in_place(|| raw_request(&addr, request.as_bytes()));
    let answer = parse_response(&answer);
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"), "{answer:?}");
    let mut names: Vec<String> = answer
        .headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .collect();
    names.retain(|n| !["date", "content-length", "connection"].contains(&n.as_str()));
    assert_eq!(
        names,
        ["x-kept"],
        "the client got the store's hop headers: {answer:?}"
    );
    // The only `Connection` is hyper's own, for the client's `close`.
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");

    let head = store.heads.lock().unwrap()[0].to_ascii_lowercase();
    let mut fields: Vec<&str> = head.split("\r\n").skip(1).filter(|l| !l.is_empty()).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "connection: te",
            "forwarded: for=127.0.0.1;proto=http",
            "host: h",
            "te: trailers",
            "x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1",
            "x-kept: yes",
        ],
        "the store got the client's hop headers: {head}"
    );
}

/// A client that accepts trailers says `TE: trailers` with the
/// `Connection: TE` that RFC 9110 §10.1.4 asks of every sender of TE.
/// fencegate forwards trailers, so the store is asked for them too (a
/// store may send them only to a client that accepts them, as hyper's
/// server does). Before, `Connection: TE` made fencegate drop the ask.
#[tokio::test(flavor = "multi_thread")]
async fn a_clients_te_trailers_reaches_the_store_as_fencegates_own() {
    let store = RawStore::start(Script::new()).await;
    let fg = gate(&store);
    let request = "GET /d/te HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nConnection: TE\r\n\r\n";
    let addr = fg.url();
    let answer = tokio::task::block_in_place(|| raw_request(&addr, request.as_bytes()));
    assert_eq!(parse_response(&answer).status, 204, "{answer}");
    let head = store.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(
        head.contains("\r\nte: trailers\r\n") && head.contains("\r\nconnection: te\r\n"),
        "the store was not asked for trailers: {head}"
    );
}

/// RFC 9112 §3.2: a request with two `Host` lines (which would the store
/// take?), or an HTTP/1.1 request without one, is 400 and reaches no
/// store. An HTTP/1.0 request without `Host` goes on, with the store's.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_one_host_is_400() {
    let store = RawStore::start(Script::new()).await;
    let fg = gate(&store);
    let addr = fg.url();
    for request in [
        "GET /d/hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "GET /d/nohost HTTP/1.1\r\n\r\n",
        "GET /d/hosts HTTP/1.0\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    ] {
        let answer = tokio::task::block_in_place(|| raw_request(&addr, request.as_bytes()));
        let r = parse_response(&answer);
        assert_eq!(r.status, 400, "{request:?}: {answer}");
        assert_eq!(r.header("fencegate-reason"), Some("bad_request"), "{answer}");
    }
    assert!(
        store.heads.lock().unwrap().is_empty(),
        "{:?}",
        store.heads.lock().unwrap()
    );
    let answer = tokio::task::block_in_place(|| raw_request(&addr, b"GET /d/old HTTP/1.0\r\n\r\n"));
    assert_eq!(parse_response(&answer).status, 204, "{answer}");
}

/// RFC 9112 §9.3: `close` ends the connection whatever else `Connection`
/// says; in HTTP/1.0 `keep-alive` keeps it only without `close`. The
/// store here says close and leaves the connection open, so a reuse shows
/// (fencegate reused it: the HTTP/1.0 rule read `keep-alive` alone).
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_store_says_close_on_is_not_reused_whatever_else_connection_says() {
    let mut script = Script::new();
    script.insert(
        "/d/close-10",
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
    );
    script.insert(
        "/d/close-11",
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n\
              content-length: 2\r\n\r\nok",
            false,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    check(&store, &fg, "/d/close-10", (200, None, "ok"), false).await;
    check(&store, &fg, "/d/close-11", (200, None, "ok"), false).await;
}

/// A chunk-size line without a size is no last chunk (RFC 9112 §7.1,
/// `1*HEXDIG`; hyper's decoder refuses it): the body fails, and what the
/// store sends after it is never read as the next request's answer. It was
/// read as the end of the body, and the connection went back to the pool.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_without_a_size_fails_the_body_and_its_connection_is_dropped() {
    let mut script = Script::new();
    script.insert(
        "/d/no-size",
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n\r\n\r\n",
            false,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    // The head may go out before the body fails, or not at all.
    let url = format!("{}/d/no-size", fg.url());
    let outcome = match tokio::time::timeout(Duration::from_secs(10), client().get(url).send()).await {
        Err(_) => panic!("GET /d/no-size: no answer within 10 s"),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(response)) => response.text().await.map_err(|e| e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "the client got a whole body from a broken chunked one: {outcome:?}"
    );
    check_next(&store, &fg, "/d/no-size", false).await;
}

/// Hop-by-hop fields stay on their hop in trailers too (SPEC.md: removed
/// both ways): the store's trailer section loses the fields RFC 9110
/// §7.6.1 lists and those its head's `Connection` names, as the request's
/// trailers do on the way to the store. They reached the client: hyper
/// writes every trailer the head's `Trailer` declares but for framing and
/// routing ones.
#[tokio::test(flavor = "multi_thread")]
async fn the_stores_trailers_lose_their_hop_by_hop_fields() {
    let mut script = Script::new();
    script.insert(
        "/d/trailers",
        (
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\n\
              Trailer: keep-alive, proxy-authenticate, x-secret, x-sum\r\n\
              transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nKeep-Alive: timeout=5\r\n\
              Proxy-Authenticate: Basic\r\nX-Secret: 1\r\nX-Sum: 9\r\n\r\n",
            false,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    let request = "GET /d/trailers HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    let addr = fg.url();
    let answer = tokio::task::block_in_place(|| raw_request(&addr, request.as_bytes()));
    let trailers = answer
        .split_once("\r\n0\r\n")
        .map(|(_, t)| t.to_ascii_lowercase())
        .unwrap_or_else(|| panic!("no chunked body: {answer:?}"));
    assert!(
        trailers.contains("x-sum: 9"),
        "the end-to-end trailer is lost: {answer:?}"
    );
    for hop in ["keep-alive", "proxy-authenticate", "x-secret"] {
        assert!(
            !trailers.contains(hop),
            "the store's trailer {hop} reached the client: {answer:?}"
        );
    }
}

/// Answers without a body whatever their head says (RFC 9112 §6.3: 204,
/// 304, any answer to HEAD), and a 101 that fencegate never tunnels
/// (502): the bytes a store sends after such a head are no body, and
/// never the next request's answer.
#[tokio::test(flavor = "multi_thread")]
async fn bytes_after_an_answer_without_a_body_are_never_the_next_answer() {
    let mut script = Script::new();
    let next = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nSECRET";
    let leak =
        |head: &str| -> &'static [u8] { Box::leak(format!("{head}{next}").into_bytes().into_boxed_slice()) };
    script.insert(
        "/d/204",
        (
            leak("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello"),
            false,
        ),
    );
    script.insert(
        "/d/304",
        (
            leak("HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
            false,
        ),
    );
    script.insert(
        "/d/head",
        (leak("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"), false),
    );
    script.insert(
        "/d/head-clean",
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
    );
    script.insert(
        "/d/switch",
        (
            leak("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"),
            false,
        ),
    );
    script.insert(
        "/d/switch-bare",
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    check(&store, &fg, "/d/204", (204, None, ""), false).await;
    check(&store, &fg, "/d/304", (304, None, ""), false).await;
    let bad = (502, Some("upstream_bad_response"), "");
    check(&store, &fg, "/d/switch", bad, false).await;
    check(&store, &fg, "/d/switch-bare", bad, false).await;
    for (path, reused) in [("/d/head", false), ("/d/head-clean", true)] {
        let response = client()
            .head(format!("{}{path}", fg.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
        assert_eq!(response.status(), 200, "HEAD {path}");
        assert_eq!(response.headers()["content-length"], "5", "HEAD {path}");
        check_next(&store, &fg, path, reused).await;
    }
}

/// An HTTP/1.0 client knows no transfer coding (RFC 9112 §6.1): a chunked
/// answer reaches it decoded, without `Transfer-Encoding`, its end marked
/// by the close; the store's `Content-Length` beside the chunks never
/// reaches it either.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_answer_reaches_an_http_10_client_decoded_and_delimited_by_the_close() {
    let mut script = Script::new();
    script.insert(
        "/d/chunked",
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n\
              3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 9\r\n\r\n",
            false,
        ),
    );
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    let addr = fg.url();
    let request = b"GET /d/chunked HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n";
    let answer = tokio::task::block_in_place(|| raw_request(&addr, request));
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {answer:?}"));
    let head = head.to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.0 200") || head.starts_with("http/1.1 200"),
        "{answer:?}"
    );
    assert!(
        !head.contains("transfer-encoding") && !head.contains("content-length"),
        "{answer:?}"
    );
    assert_eq!(body, "abcde", "{answer:?}");
    // Its end is the close: the head may not say the connection stays.
    assert!(!head.contains("keep-alive"), "{answer:?}");
}

/// A head longer than fencegate reads (64 KiB), or with more fields than
/// it takes (100), is 502 and its connection dropped: the rest of it is
/// never read as the next answer.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_answer_heads_are_502_and_their_connection_is_dropped() {
    let leak = |text: String| -> &'static [u8] { Box::leak(text.into_bytes().into_boxed_slice()) };
    let mut script = Script::new();
    let long = format!(
        "HTTP/1.1 200 OK\r\nx-long: {}\r\ncontent-length: 2\r\n\r\nok",
        "a".repeat(70 * 1024)
    );
    script.insert("/d/long", (leak(long), false));
    let many: String = (0..=100).map(|i| format!("x-{i}: 1\r\n")).collect();
    let many = format!("HTTP/1.1 200 OK\r\n{many}content-length: 2\r\n\r\nok");
    script.insert("/d/many", (leak(many), false));
    let store = RawStore::start(script).await;
    let fg = gate(&store);
    let bad = (502, Some("upstream_bad_response"), "");
    check(&store, &fg, "/d/long", bad, false).await;
    check(&store, &fg, "/d/many", bad, false).await;
}
