//! Every status and reason the data path gives (SPEC.md, "Responses made by
//! fencegate"), against a real nginx store and the fencegate binary, plus
//! the admitted path: the store's answers and bodies pass through untouched.

use crate::support::{
    client, free_port, parse_response, raw_request, EventKind, Fencegate, FencegateConfig, Nginx,
    RawResponse, ScriptedStore, Tmpfs,
};
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

type Answer = RawResponse;

/// `method url` through reqwest, with an optional token and extra headers.
async fn send(method: &str, url: &str, token: Option<&str>, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut req = client()
        .request(method.parse().unwrap(), url)
        .body(body.to_string());
    for (k, v) in token.map(|t| ("Fencing-Token", t)).iter().chain(headers) {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let headers = r.headers().iter();
    let headers = headers.map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()));
    Answer {
        status: r.status().as_u16(),
        headers: headers.collect(),
        body: r.text().await.expect("read response body"),
        interim: Vec::new(),
    }
}

async fn put(url: &str, token: Option<&str>, body: &str) -> Answer {
    send("PUT", url, token, &[], body).await
}

async fn get(url: &str, token: Option<&str>) -> Answer {
    send("GET", url, token, &[], "").await
}

/// A request as exact text: `Host`, the given headers, `Content-Length`, body.
fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: store.test\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text + &format!("Content-Length: {}\r\n\r\n{body}", body.len())
}

/// Sends exact bytes over a raw socket; the first final response.
fn raw(addr: &str, text: &str) -> Answer {
    parse_response(&raw_request(addr, text.as_bytes()))
}

/// A raw `PUT target` with `headers` and `body` to fencegate.
fn raw_put(fg: &Fencegate, target: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    raw(&fg.addr(), &request("PUT", target, headers, body))
}

/// Asserts one of fencegate's own answers (RFC 9457) and returns its body.
#[track_caller]
fn problem(a: &Answer, status: u16, reason: &str) -> Value {
    assert_eq!(a.status, status, "status of {a:#?}");
    assert_eq!(a.header("fencegate-reason"), Some(reason), "{a:#?}");
    let content_type = a.header("content-type");
    assert_eq!(content_type, Some("application/problem+json"), "{a:#?}");
    let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("body not JSON ({e}): {a:#?}"));
    for field in ["type", "title", "detail"] {
        let text = v[field].as_str().unwrap_or_default();
        assert!(!text.is_empty(), "problem `{field}` is a non-empty string: {v}");
    }
    let fields = (v["status"].as_u64(), v["reason"].as_str());
    assert_eq!(fields, (Some(status.into()), Some(reason)), "{v}");
    v
}

/// Asserts the problem's `domain`, `token` and `epoch` (those given).
#[track_caller]
fn context(v: &Value, domain: &str, token: Option<u64>, epoch: Option<u64>) {
    assert_eq!(v["domain"], domain, "problem `domain`: {v}");
    if let Some(t) = token {
        assert_eq!(v["token"], t, "problem `token`: {v}");
    }
    if let Some(e) = epoch {
        assert_eq!(v["epoch"], e, "problem `epoch`: {v}");
    }
}

fn config(upstream: &str) -> FencegateConfig {
    FencegateConfig::new(upstream).domain("orders", "/orders/")
}

/// Asserts nginx's whole access log, as "METHOD URI TOKEN" lines (`-`: no
/// token), is `want`.
#[track_caller]
fn assert_log<S: AsRef<str>>(nginx: &Nginx, want: &[S]) {
    let log: Vec<String> = (nginx.log_entries_at_least(want.len()).into_iter())
        .map(|e| e.line())
        .collect();
    let want: Vec<&str> = want.iter().map(AsRef::as_ref).collect();
    assert_eq!(log, want, "nginx's access log: what reached the store");
}

fn stored(nginx: &Nginx, path: &str) -> String {
    std::fs::read_to_string(nginx.data_dir().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `epoch` of `name` in the admin listener's `/domains`.
fn admin_epoch(fg: &Fencegate, name: &str) -> u64 {
    let list: Value = serde_json::from_str(&fg.admin_get("/domains").body).expect("/domains is JSON");
    let domains = list.as_array().expect("/domains is a JSON list");
    let domain = domains.iter().find(|d| d["name"] == name);
    let domain = domain.unwrap_or_else(|| panic!("no domain {name} in /domains: {list}"));
    domain["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer epoch: {domain}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn write_without_token_is_428_missing_token() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let url = format!("{}/orders/a", fg.url());
    let v = problem(&put(&url, None, "x").await, 428, "missing_token");
    context(&v, "orders", None, None);
    assert!(v.get("token").is_none(), "no token was given: {v}");
    // Control: the same write with a token is admitted, and only it arrives.
    assert_eq!(put(&url, Some("1"), "y").await.status, 201);
    assert_log(&nginx, &["PUT /orders/a 1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_tokens_are_400() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()).domain("max", "/max/"));
    let url = format!("{}/orders/a", fg.url());
    let bad = [
        "abc",
        "12a",
        "0",
        "007",
        "+5",
        "-5",
        "1.5",
        "9223372036854775808",
        "99999999999999999999",
    ];
    for token in bad {
        let v = problem(&put(&url, Some(token), "x").await, 400, "malformed_token");
        assert!(v.get("token").is_none(), "token {token:?} has no value: {v}");
    }
    for twice in [
        [("Fencing-Token", "5"), ("Fencing-Token", "5")],
        [("Fencing-Token", "5, 6"); 2],
    ] {
        let v = problem(&raw_put(&fg, "/orders/a", &twice, "x"), 400, "malformed_token");
        assert!(v.get("token").is_none(), "{twice:?}: {v}");
    }

    // Controls: the largest token, and whitespace around a token, are valid.
    let max = put(&format!("{}/max/a", fg.url()), Some("9223372036854775807"), "x").await;
    assert_eq!(max.status, 201, "i64::MAX is a valid token: {max:?}");
    let ows = raw_put(&fg, "/orders/a", &[("Fencing-Token", " \t7 ")], "x");
    assert_eq!(ows.status, 201, "whitespace around a token is allowed: {ows:?}");
    assert_log(&nginx, &["PUT /max/a 9223372036854775807", "PUT /orders/a 7"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_write_is_412_and_never_reaches_the_store() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let url = format!("{}/orders/s", fg.url());
    assert_eq!(put(&url, Some("5"), "five").await.status, 201);
    let v = problem(&put(&url, Some("4"), "four").await, 412, "stale_epoch");
    context(&v, "orders", Some(4), Some(5));
    // The hot path: the current epoch is admitted again.
    assert_eq!(put(&url, Some("5"), "five again").await.status, 204);
    assert_log(&nginx, &["PUT /orders/s 5", "PUT /orders/s 5"]);
    assert_eq!(stored(&nginx, "orders/s"), "five again");
}

#[tokio::test(flavor = "multi_thread")]
async fn admitted_requests_reach_the_store_and_come_back_untouched() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let url = format!("{}/orders/dir/f.txt", fg.url());
    let created = put(&url, Some("3"), "first").await;
    assert_eq!(created.status, 201, "{created:?}");
    let replaced = put(&url, Some("3"), "second").await;
    assert_eq!(replaced.status, 204, "{replaced:?}");
    for a in [&created, &replaced] {
        let server = a.header("server").unwrap_or_default();
        assert!(server.starts_with("nginx"), "{a:?}");
        assert!(a.header("fencegate-reason").is_none(), "{a:?}");
    }
    let through = get(&url, None).await;
    let direct = get(&format!("{}/orders/dir/f.txt", nginx.url()), None).await;
    assert_eq!((through.status, through.body.as_str()), (200, "second"));
    let names = [
        "server",
        "etag",
        "last-modified",
        "content-length",
        "content-type",
    ];
    for h in names {
        assert!(through.header(h).is_some(), "nginx sends {h}: {through:?}");
        assert_eq!(through.header(h), direct.header(h), "header {h} changed");
    }
    // A read outside every domain is forwarded too: nginx's own 404.
    let outside = get(&format!("{}/elsewhere/x", fg.url()), None).await;
    assert_eq!(outside.status, 404, "{outside:?}");
    assert!(outside.header("fencegate-reason").is_none(), "{outside:?}");
    assert_eq!(send("DELETE", &url, Some("3"), &[], "").await.status, 204);
    let want = [
        "PUT /orders/dir/f.txt 3",
        "PUT /orders/dir/f.txt 3",
        "GET /orders/dir/f.txt -",
        "GET /orders/dir/f.txt -",
        "GET /elsewhere/x -",
        "DELETE /orders/dir/f.txt 3",
    ];
    assert_log(&nginx, &want);
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_with_a_token_are_checked_but_never_raise_the_epoch() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let url = format!("{}/orders/r", fg.url());
    assert_eq!(put(&url, Some("5"), "data").await.status, 201);
    let v = problem(&get(&url, Some("4")).await, 412, "stale_epoch");
    context(&v, "orders", Some(4), Some(5));
    problem(&get(&url, Some("05")).await, 400, "malformed_token");
    for token in ["5", "9"] {
        let a = get(&url, Some(token)).await;
        assert_eq!((a.status, a.body.as_str()), (200, "data"), "token {token}");
    }
    assert_eq!(admin_epoch(&fg, "orders"), 5, "a read raised the epoch");
    // Not even the refusal mark moved: a write at 6 (< 9) is admitted.
    assert_eq!(put(&url, Some("6"), "six").await.status, 204);
    assert_eq!(admin_epoch(&fg, "orders"), 6);
    let want = [
        "PUT /orders/r 5",
        "GET /orders/r 5",
        "GET /orders/r 9",
        "PUT /orders/r 6",
    ];
    assert_log(&nginx, &want);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_outside_domains_and_across_domains_are_403() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()).domain("billing", "/billing/"));
    // Prefixes match whole segments: `/ordersx/` is not in `/orders/`.
    for (path, token) in [
        ("/elsewhere/x", Some("1")),
        ("/elsewhere/x", None),
        ("/ordersx/a", Some("1")),
    ] {
        let a = put(&format!("{}{path}", fg.url()), token, "x").await;
        problem(&a, 403, "no_domain");
    }

    let src = format!("{}/orders/src", fg.url());
    assert_eq!(put(&src, Some("2"), "s").await.status, 201);
    let host = fg.addr();
    let cross = [
        ("MOVE", format!("http://{host}/billing/x")),
        ("COPY", "/billing/x".to_string()),
        ("MOVE", "/elsewhere/x".to_string()),
        ("COPY", format!("http://{host}/orders/../billing/x")),
    ];
    for (method, destination) in cross {
        let a = send(method, &src, Some("2"), &[("Destination", &destination)], "").await;
        context(&problem(&a, 403, "cross_domain"), "orders", Some(2), Some(2));
    }
    // Control: a COPY inside the domain reaches nginx.
    let inside = format!("http://{host}/orders/copy");
    let a = send("COPY", &src, Some("2"), &[("Destination", &inside)], "").await;
    assert!(matches!(a.status, 201 | 204), "{a:?}");
    assert_eq!(stored(&nginx, "orders/copy"), "s");
    assert_log(&nginx, &["PUT /orders/src 2", "COPY /orders/src 2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_paths_are_400() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let token = [("Fencing-Token", "1")];
    let encoded = ["/orders/%2Fx", "/orders/%2fx", "/orders/a%5Cb", "/orders/a%00b"];
    let raw_bytes = ["/orders/a\\b", "/orders/a;b", "/..", "/orders/../../x"];
    for target in encoded.into_iter().chain(raw_bytes) {
        let a = raw_put(&fg, target, &token, "x");
        assert_eq!(a.status, 400, "PUT {target}: {a:?}");
        problem(&a, 400, "bad_path");
    }
    // The path checked is the one forwarded, for reads too.
    let read = raw(&fg.addr(), &request("GET", "/orders/%2Fx", &[], ""));
    problem(&read, 400, "bad_path");
    let control = raw_put(&fg, "/orders/ok", &token, "x");
    assert_eq!(control.status, 201, "{control:?}");
    assert_log(&nginx, &["PUT /orders/ok 1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_405() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let connect = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    problem(&raw(&fg.addr(), connect), 405, "method_not_allowed");
    assert_eq!(
        raw_put(&fg, "/orders/k", &[("Fencing-Token", "1")], "x").status,
        201
    );
    assert_log(&nginx, &["PUT /orders/k 1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_head_is_431() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()).max_header_bytes(2048));
    let (big, small) = ("a".repeat(4096), "a".repeat(1000));
    for method in ["PUT", "GET"] {
        let headers = [("Fencing-Token", "1"), ("X-Pad", big.as_str())];
        let req = request(method, "/orders/h", &headers, "");
        let v = problem(&raw(&fg.addr(), &req), 431, "header_too_large");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.contains("2048"), "the detail names the limit: {v}");
    }
    let headers = [("Fencing-Token", "1"), ("X-Pad", small.as_str())];
    let a = raw_put(&fg, "/orders/h", &headers, "x");
    assert_eq!(a.status, 201, "a head under the limit is admitted: {a:?}");
    assert_log(&nginx, &["PUT /orders/h 1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_naming_the_token_or_host_is_400() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let named = [
        "fencing-token",
        "Fencing-Token",
        "host",
        "keep-alive, Host",
        "keep-alive",
    ];
    for connection in named {
        let headers = [("Fencing-Token", "1"), ("Connection", connection)];
        let a = raw_put(&fg, "/orders/c", &headers, "x");
        if connection == "keep-alive" {
            assert_eq!(a.status, 201, "control: {a:?}");
        } else {
            assert_eq!(a.status, 400, "Connection: {connection}: {a:?}");
            problem(&a, 400, "bad_request");
        }
    }
    assert_log(&nginx, &["PUT /orders/c 1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_store_is_502() {
    let fg = Fencegate::start(config(&format!("http://127.0.0.1:{}", free_port())));
    let url = format!("{}/orders/u", fg.url());
    let v = problem(&put(&url, Some("3"), "x").await, 502, "upstream_unreachable");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("connect to the store"), "not reached: {v}");
    assert!(detail.contains("outcome is unknown"), "SPEC: detail says so: {v}");
    problem(&get(&url, None).await, 502, "upstream_unreachable");
    // SPEC: `domain`, `token`, `epoch` where known; they are, for this write.
    context(&v, "orders", Some(3), Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_store_is_504() {
    let store = ScriptedStore::start().await;
    store.hold_token("7", Duration::from_secs(4));
    let cfg = config(&store.url()).request_timeout(Duration::from_millis(500));
    let fg = tokio::task::block_in_place(|| Fencegate::start(cfg));
    let started = Instant::now();
    let a = put(&format!("{}/orders/slow", fg.url()), Some("7"), "x").await;
    let took = started.elapsed();
    let v = problem(&a, 504, "upstream_timeout");
    let about_500ms = took >= Duration::from_millis(450) && took < Duration::from_millis(3000);
    assert!(about_500ms, "504 after {took:?}, want about 500ms");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("outcome is unknown"), "SPEC: detail says so: {v}");
    let kinds: Vec<_> = store.events_for("7").iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::HeadArrived, EventKind::BodyComplete]);
    // SPEC: `domain`, `token`, `epoch` where known; they are, for this write.
    context(&v, "orders", Some(7), Some(7));
}

#[tokio::test(flavor = "multi_thread")]
async fn unwritable_state_file_is_503_until_space_returns() {
    let nginx = Nginx::start();
    let tmpfs = Tmpfs::mount("1m"); // declared before `fg`: unmounted after fencegate is gone
    let mut fg = Fencegate::start(config(&nginx.url()).state_path(tmpfs.path().join("state.redb")));
    let url = format!("{}/orders/state", fg.url());
    assert_eq!(put(&url, Some("1"), "one").await.status, 201);
    let filler = tmpfs.fill();

    // redb writes a commit into pages the file already has where it can, so
    // the first raises on a full disk may still fit. Raise until one fails.
    let (mut durable, mut refused) = (1u64, None);
    for t in 2..=64u64 {
        let a = put(&url, Some(&t.to_string()), "x").await;
        if a.status == 503 {
            refused = Some((t, a));
            break;
        }
        assert_eq!(a.status, 204, "raise to {t} on a full tmpfs: {a:?}");
        durable = t;
    }
    let (t, a) = refused.expect("63 raises on a full tmpfs all succeeded: redb never hit ENOSPC");
    eprintln!("full tmpfs: {} raise(s) fit before the 503 at {t}", durable - 1);
    let v = problem(&a, 503, "state_unavailable");
    context(&v, "orders", Some(t), Some(durable));
    let retry = a.header("retry-after").expect("503 always carries Retry-After");
    assert!(retry.parse::<u64>().is_ok() || retry.ends_with("GMT"), "{retry}");
    assert_eq!(admin_epoch(&fg, "orders"), durable);
    // The refusal mark stays at the failed raise: the old epoch is fenced.
    let old = put(&url, Some(&durable.to_string()), "old").await;
    let v = problem(&old, 412, "stale_epoch");
    context(&v, "orders", Some(durable), Some(durable));

    std::fs::remove_file(&filler).expect("remove filler");
    let again = put(&url, Some(&t.to_string()), "retried").await;
    assert_eq!(again.status, 204, "after space returns: {again:?}");
    assert_eq!(admin_epoch(&fg, "orders"), t);
    // Neither the 503 nor the stale write reached nginx: each token once.
    let want: Vec<_> = (1..=durable)
        .chain([t])
        .map(|k| format!("PUT /orders/state {k}"))
        .collect();
    assert_log(&nginx, &want);
    assert_eq!(stored(&nginx, "orders/state"), "retried");

    // The commit made on the reopened file is durable.
    assert!(fg.terminate().success(), "clean shutdown: {}", fg.stderr_text());
    let out = fg.run_cli(&["epochs", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "epochs: {stderr}");
    let epochs: Value = serde_json::from_slice(&out.stdout).expect("epochs --json");
    let orders = (epochs[0]["name"].as_str(), epochs[0]["epoch"].as_u64());
    assert_eq!(orders, (Some("orders"), Some(t)), "{epochs}");
}

/// Writes `text`, reads until the server closes (or 3 s): the first final
/// response, and whether the connection was closed.
fn exchange_until_close(addr: &str, text: &str) -> (Answer, bool) {
    let mut stream = TcpStream::connect(addr).expect("connect to fencegate");
    stream.write_all(text.as_bytes()).expect("send request");
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
    let closed = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => break !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    };
    (parse_response(&String::from_utf8_lossy(&buf)), closed)
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_of_writes_with_a_body_close_and_never_send_100_continue() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let url = format!("{}/orders/e", fg.url());
    assert_eq!(put(&url, Some("5"), "x").await.status, 201);
    let cases = [
        ("/orders/e", vec![], 428, "missing_token"),
        ("/orders/e", vec![("Fencing-Token", "4")], 412, "stale_epoch"),
        ("/elsewhere/e", vec![("Fencing-Token", "5")], 403, "no_domain"),
        ("/orders/%2Fe", vec![("Fencing-Token", "5")], 400, "bad_path"),
    ];
    for (target, mut headers, status, reason) in cases {
        let (a, closed) = exchange_until_close(&fg.addr(), &request("PUT", target, &headers, "hello"));
        problem(&a, status, reason);
        assert_eq!(a.header("connection"), Some("close"), "{reason}: {a:?}");
        assert!(closed, "{reason}: the connection stayed open");

        // The same with `Expect: 100-continue` and the body held back.
        headers.push(("Expect", "100-continue"));
        let head = request("PUT", target, &headers, "").replace("Length: 0", "Length: 5");
        let (a, closed) = exchange_until_close(&fg.addr(), &head);
        assert!(a.interim.is_empty(), "{reason}: 100 Continue sent: {a:?}");
        problem(&a, status, reason);
        assert_eq!(a.header("connection"), Some("close"), "{reason} (Expect): {a:?}");
        assert!(closed, "{reason} (Expect): the connection stayed open");
    }

    // Control: an admitted write with Expect gets 100 Continue, then nginx's 204.
    let mut stream = TcpStream::connect(fg.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let headers = [("Fencing-Token", "5"), ("Expect", "100-continue")];
    let head = request("PUT", "/orders/e", &headers, "").replace("Length: 0", "Length: 5");
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"later").unwrap();
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).expect("final response");
        assert!(n > 0, "closed before the final response");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(parse_response(&String::from_utf8_lossy(&buf)).status, 204);
    assert_eq!(stored(&nginx, "orders/e"), "later");
    assert_log(&nginx, &["PUT /orders/e 5", "PUT /orders/e 5"]);
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[track_caller]
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
    let (n, m) = (got.len(), want.len());
    let same = n == m && first_diff.is_none();
    assert!(same, "{what}: {n} bytes, want {m}; first diff at {first_diff:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_8_mib_body_arrives_and_returns_byte_for_byte() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let body = random_bytes(8 << 20, 0x5EED_F00D);
    let url = format!("{}/orders/big.bin", fg.url());
    let http = client();
    let put = http.put(&url).header("Fencing-Token", "1").body(body.clone());
    assert_eq!(put.send().await.expect("PUT 8 MiB").status().as_u16(), 201);
    let on_disk = std::fs::read(nginx.data_dir().join("orders/big.bin")).expect("stored file");
    assert_same_bytes(&on_disk, &body, "file in nginx's data dir");
    let got = http.get(&url).send().await.expect("GET 8 MiB");
    assert_eq!(got.status().as_u16(), 200);
    let got = got.bytes().await.expect("GET body");
    assert_same_bytes(&got, &body, "GET through fencegate");
}

const CHUNKED_PUT: &str = "PUT /orders/chunked.txt HTTP/1.1\r\nHost: store.test\r\n\
    Fencing-Token: 1\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
    7\r\nhello, \r\n8\r\nchunked \r\n5\r\nworld\r\n0\r\nX-Checksum: abc123\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_put_is_stored_by_nginx() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(config(&nginx.url()));
    let a = raw(&fg.addr(), CHUNKED_PUT);
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(stored(&nginx, "orders/chunked.txt"), "hello, chunked world");
    assert_log(&nginx, &["PUT /orders/chunked.txt 1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_put_keeps_its_body_and_trailers() {
    let store = ScriptedStore::start().await;
    let fg = tokio::task::block_in_place(|| Fencegate::start(config(&store.url())));
    let addr = fg.addr();
    let a = tokio::task::spawn_blocking(move || raw(&addr, CHUNKED_PUT)).await;
    let a = a.unwrap();
    assert_eq!(a.status, 201, "{a:?}");
    let events = store.events_for("1");
    let done = events.iter().find(|e| e.kind == EventKind::BodyComplete);
    let done = done.unwrap_or_else(|| panic!("the body never completed at the store: {events:?}"));
    assert_eq!(&done.body[..], b"hello, chunked world");
    let checksum = done.trailers.get("x-checksum").map(|v| v.as_bytes());
    let trailers = &done.trailers;
    assert_eq!(checksum, Some(&b"abc123"[..]), "trailers forwarded: {trailers:?}");
}

/// A 405 says what is allowed (RFC 9110 §15.5.6): fencegate's own, to
/// CONNECT, lists the methods it forwards.
#[tokio::test(flavor = "multi_thread")]
async fn the_405_to_connect_carries_allow() {
    let fg = Fencegate::start(FencegateConfig::new("http://127.0.0.1:9").domain("orders", "/orders/"));
    let connect = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    let a = raw(&fg.addr(), connect);
    assert_eq!(a.status, 405, "{a:?}");
    let allow = a
        .header("allow")
        .unwrap_or_else(|| panic!("a 405 without Allow: {a:?}"));
    assert!(allow.contains("PUT") && !allow.contains("CONNECT"), "{allow}");
}
