//! What fencegate does with the parts of a message HTTP/1.1 frames per
//! connection (SPEC.md, HTTP): request trailers, transfer codings other
//! than `chunked`, and the version of the store's answer. A raw store
//! records every byte it receives.

use crate::support::{parse_response, raw_request, Fencegate, FencegateConfig};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw store: records every byte each connection sent, and answers
/// `answer` once `done(bytes)` says the request is whole.
struct ByteStore {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl ByteStore {
    async fn start(answer: &'static [u8], done: fn(&[u8]) -> bool) -> ByteStore {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let all = received.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let all = all.clone();
                tokio::spawn(async move {
                    let index = {
                        let mut all = all.lock().unwrap();
                        all.push(Vec::new());
                        all.len() - 1
                    };
                    let mut seen = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                seen.extend_from_slice(&chunk[..n]);
                                all.lock().unwrap()[index].extend_from_slice(&chunk[..n]);
                            }
                        }
                        if done(&seen) {
                            seen.clear();
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        ByteStore {
            addr,
            received,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn text(&self) -> String {
        let all = self.received.lock().unwrap();
        all.iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("\n--- next connection ---\n")
    }
}

impl Drop for ByteStore {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Sends `request` through fencegate (domain `d` at `/d/`) to a store
/// that answers `answer` once `done` says a request is whole; returns the
/// store, with what it received, and the raw answer the client got.
async fn through_fencegate(
    answer: &'static [u8],
    done: fn(&[u8]) -> bool,
    request: &[u8],
) -> (ByteStore, String) {
    let store = ByteStore::start(answer, done).await;
    let config = FencegateConfig::new(&store.url())
        .domain("d", "/d/")
        .workers(1)
        .request_timeout(Duration::from_secs(5));
    let raw = tokio::task::block_in_place(|| {
        let fg = Fencegate::start(config);
        raw_request(&fg.url(), request)
    });
    (store, raw)
}

/// The store's answer to a write.
const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";

/// A plain read, for the tests of the store's answers.
const GET: &[u8] = b"GET /d/x HTTP/1.1\r\nHost: h\r\n\r\n";

fn head_is_whole(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w == b"\r\n\r\n")
}

fn chunked_is_whole(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.contains("\r\n0\r\n") && text.ends_with("\r\n\r\n")
}

/// Request trailers reach the store without what no trailer may carry
/// (RFC 9110 §6.5.1: connection, framing and routing fields) and without
/// a second fencing token, which would reach the store unchecked; other
/// trailer fields go on.
#[tokio::test(flavor = "multi_thread")]
async fn request_trailers_lose_the_fields_no_trailer_may_carry() {
    let request = "PUT /d/x HTTP/1.1\r\nHost: h\r\nFencing-Token: 5\r\n\
                   Transfer-Encoding: chunked\r\nTE: trailers\r\n\r\n\
                   3\r\nabc\r\n0\r\nFencing-Token: 1\r\nContent-Length: 999\r\n\
                   Host: elsewhere\r\nConnection: close\r\nTransfer-Encoding: gzip\r\n\
                   Keep-Alive: timeout=1\r\nDigest-Of-Body: abc\r\n\r\n";
    let (store, raw) = through_fencegate(NO_CONTENT, chunked_is_whole, request.as_bytes()).await;
    let answer = parse_response(&raw);
    assert_eq!(answer.status, 204, "{answer:?}");
    let wire = store.text().to_ascii_lowercase();
    let trailer_section = wire.split("\r\n0\r\n").nth(1).unwrap_or("").to_owned();
    let leaked: Vec<&str> = [
        "fencing-token: 1",
        "content-length: 999",
        "host: elsewhere",
        "connection: close",
        "transfer-encoding: gzip",
        "keep-alive",
    ]
    .into_iter()
    .filter(|f| trailer_section.contains(f))
    .collect();
    assert!(
        leaked.is_empty(),
        "the store received these request trailer fields: {leaked:?}\n{wire}"
    );
    assert!(
        trailer_section.contains("digest-of-body: abc"),
        "an ordinary trailer field must go on:\n{wire}"
    );
}

/// A request body with a transfer coding besides `chunked` is refused
/// with 501 (RFC 9112 §6.1): hyper undoes only the chunks, so the store
/// would get the coded bytes as the content. Nothing reaches the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_transfer_coding_other_than_chunked_is_501() {
    let request = "PUT /d/x HTTP/1.1\r\nHost: h\r\nFencing-Token: 5\r\n\
                   Transfer-Encoding: gzip, chunked\r\n\r\n\
                   4\r\nGZIP\r\n0\r\n\r\n";
    let (store, raw) = through_fencegate(NO_CONTENT, chunked_is_whole, request.as_bytes()).await;
    let answer = parse_response(&raw);
    assert_eq!(answer.status, 501, "{raw}");
    assert_eq!(
        answer.header("fencegate-reason"),
        Some("not_implemented"),
        "{raw}"
    );
    assert_eq!(store.text(), "", "nothing may reach the store");
}

/// The same from the store: an answer with a coding besides `chunked`
/// becomes a 502 rather than a plain body of coded bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_response_transfer_coding_other_than_chunked_is_502() {
    let (_store, raw) = through_fencegate(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n",
        head_is_whole,
        GET,
    )
    .await;
    let answer = parse_response(&raw);
    assert_eq!(answer.status, 502, "{raw}");
    assert_eq!(
        answer.header("fencegate-reason"),
        Some("upstream_bad_response"),
        "{raw}"
    );
}

/// fencegate answers in its own HTTP version (RFC 9110 §6.2), not the
/// store's: an HTTP/1.0 answer from the store reaches an HTTP/1.1 client
/// as HTTP/1.1.
#[tokio::test(flavor = "multi_thread")]
async fn the_answer_carries_fencegates_version_not_the_stores() {
    let (_store, raw) = through_fencegate(
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
        head_is_whole,
        GET,
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 200"),
        "fencegate answered an HTTP/1.1 client:\n{raw}"
    );
    assert!(raw.ends_with("ok"), "the store's body:\n{raw}");
}

/// The fields a request's `Connection` names are hop-by-hop in its
/// trailers too (SPEC.md: removed both ways, RFC 9110 §7.6.1): the store
/// never receives them, in the head or after the body.
#[tokio::test(flavor = "multi_thread")]
async fn request_trailers_lose_the_fields_connection_names() {
    let request = "PUT /d/x HTTP/1.1\r\nHost: h\r\nFencing-Token: 5\r\nConnection: X-Secret\r\n\
                   X-Secret: head\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n\
                   3\r\nabc\r\n0\r\nX-Secret: trailer\r\nDigest-Of-Body: abc\r\n\r\n";
    let (store, raw) = through_fencegate(NO_CONTENT, chunked_is_whole, request.as_bytes()).await;
    assert_eq!(parse_response(&raw).status, 204, "{raw}");
    let wire = store.text().to_ascii_lowercase();
    assert!(
        !wire.contains("x-secret"),
        "the store received a field Connection names:\n{wire}"
    );
    assert!(
        wire.contains("digest-of-body: abc"),
        "an ordinary trailer field must go on:\n{wire}"
    );
}
