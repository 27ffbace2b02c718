//! Bypass attempts: requests shaped to reach the store without a valid
//! token, or to be judged in one domain and land in another (SPEC.md,
//! Admission rule, Reads, Writes, Paths, HTTP). Each is sent as exact bytes
//! and must be refused without leaving a trace at the store: no line in
//! nginx's access log, no file in its data dir. Each group has positive
//! controls (the same request with a valid token does reach the store), so
//! the "nothing reached the store" checks can fail.
//!
//! Setup: domains `orders` = `/orders/` (epoch raised to 10) and `billing`
//! = `/billing/` (raised to 20); no root domain, so other paths lie in no
//! domain. The harness calls are blocking (processes, raw sockets), so
//! these are plain tests, except the one that needs the in-process
//! ScriptedStore to see the raw forwarded target.

use crate::support::{
    parse_response, raw_request, request_bytes as req, EventKind, Fencegate, FencegateConfig, Nginx,
    RawResponse, ScriptedStore,
};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// The orders epoch after [`Rig::start`].
const ORDERS: &str = "Fencing-Token: 10";
/// The billing epoch after [`Rig::start`].
const BILLING: &str = "Fencing-Token: 20";
/// Below both epochs.
const STALE: &str = "Fencing-Token: 5";

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// fencegate's own refusal: this status and `Fencegate-Reason`.
    Refused(u16, &'static str),
    /// fencegate's own answer with this status, whatever its reason.
    Own(u16),
    /// A 400, from fencegate (`bad_path`) or from hyper's parser (bytes it
    /// will not parse never reach fencegate's code).
    Any400,
}
use Expect::*;

const MISSING: Expect = Refused(428, "missing_token");
const STALE_EPOCH: Expect = Refused(412, "stale_epoch");
const BAD_PATH: Expect = Refused(400, "bad_path");
const NO_DOMAIN: Expect = Refused(403, "no_domain");
const CROSS: Expect = Refused(403, "cross_domain");

fn put(target: &str, headers: &[&str]) -> Vec<u8> {
    req(&format!("PUT {target}"), headers, "x")
}

/// (method, `$uri`, token) of one access-log line.
type Entry = (String, String, Option<String>);

fn entry(method: &str, uri: &str, token: &str) -> Entry {
    (method.to_string(), uri.to_string(), Some(token.to_string()))
}

fn token_of(header: &str) -> &str {
    header.split(':').nth(1).unwrap_or_default().trim()
}

/// nginx behind fencegate, and what nginx's access log must hold.
struct Rig {
    nginx: Nginx,
    fg: Fencegate,
    expected: Vec<Entry>,
}

impl Rig {
    /// Starts both and raises orders to 10 (`/orders/raise`) and billing to
    /// 20 (`/billing/raise`) through fencegate.
    fn start() -> Rig {
        let nginx = Nginx::start();
        let fg = Fencegate::start(
            FencegateConfig::new(&nginx.url())
                .domain("orders", "/orders/")
                .domain("billing", "/billing/"),
        );
        let mut rig = Rig {
            nginx,
            fg,
            expected: Vec::new(),
        };
        for (path, token) in [("/orders/raise", ORDERS), ("/billing/raise", BILLING)] {
            rig.admitted(&put(path, &[token]), ("PUT", path, token));
        }
        rig
    }

    fn log(&self) -> Vec<Entry> {
        self.log_at_least(0)
    }

    fn log_at_least(&self, n: usize) -> Vec<Entry> {
        self.nginx
            .log_entries_at_least(n)
            .iter()
            .map(|e| e.request())
            .collect()
    }

    fn send(&self, bytes: &[u8]) -> (RawResponse, String) {
        send(&self.fg, bytes)
    }

    /// `bytes` must be refused as `expect` says and reach nothing.
    fn refused(&self, bytes: &[u8], expect: Expect) {
        let (resp, ctx) = self.send(bytes);
        let reason = resp.header("fencegate-reason");
        match expect {
            Refused(status, want) => {
                assert_eq!((resp.status, reason), (status, Some(want)), "{ctx}");
            }
            Own(status) => {
                assert_eq!(resp.status, status, "{ctx}");
                assert!(
                    reason.is_some_and(|r| !r.is_empty()),
                    "no Fencegate-Reason: {ctx}"
                );
            }
            Any400 => {
                assert_eq!(resp.status, 400, "{ctx}");
                if let Some(r) = reason {
                    assert_eq!(r, "bad_path", "{ctx}");
                }
            }
        }
        assert_eq!(
            self.log(),
            self.expected,
            "{ctx}\nthe refused request reached the store"
        );
    }

    /// `bytes` must reach nginx and be logged as `want` (method, `$uri`,
    /// token header line).
    fn admitted(&mut self, bytes: &[u8], want: (&str, &str, &str)) -> RawResponse {
        let (resp, ctx) = self.send(bytes);
        assert_eq!(resp.header("fencegate-reason"), None, "{ctx}\nnot forwarded");
        self.expected.push(entry(want.0, want.1, token_of(want.2)));
        self.wait_log(&ctx);
        resp
    }

    /// nginx writes its log line after answering: wait for it.
    fn wait_log(&self, ctx: &str) {
        assert_eq!(self.log_at_least(self.expected.len()), self.expected, "{ctx}");
    }

    /// Nothing late reached the store, and its data dir holds `files`.
    fn finish(self, files: &[&str]) {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(self.log(), self.expected, "the store's log at the end");
        let want: BTreeSet<String> = files.iter().map(|f| f.to_string()).collect();
        assert_eq!(files_under(&self.nginx.data_dir()), want, "files in the store");
    }
}

/// `bytes` sent to `fg`: the response, and the exchange as text for
/// assertion messages.
fn send(fg: &Fencegate, bytes: &[u8]) -> (RawResponse, String) {
    let raw = raw_request(&fg.addr(), bytes);
    let ctx = format!("request {:?}\nresponse {raw}", String::from_utf8_lossy(bytes));
    assert!(raw.contains("\r\n\r\n"), "no response: {ctx}");
    (parse_response(&raw), ctx)
}

/// nginx and fencegate with domain `d` = `/d/` and `sub` nested in it at
/// `sub_prefix`, and `files` written through fencegate (path, token line).
fn nested_domains(sub_prefix: &str, files: &[(&str, &str)]) -> (Nginx, Fencegate) {
    let nginx = Nginx::start();
    let fg = Fencegate::start(
        FencegateConfig::new(&nginx.url())
            .domain("d", "/d/")
            .domain("sub", sub_prefix),
    );
    for (path, token) in files {
        let (resp, ctx) = send(&fg, &put(path, &[token]));
        assert!(matches!(resp.status, 201 | 204), "{ctx}");
    }
    (nginx, fg)
}

/// Every file under `dir`, relative, `/`-separated.
fn files_under(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("under dir");
                out.insert(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out
}

/// Write `bytes` and read until the server closes (bounded at 5 s).
fn until_close(addr: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to fencegate");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The status of every response in `text`.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[test]
fn encoded_and_dotted_paths_are_judged_where_they_land() {
    let mut rig = Rig::start();
    let table: &[(&str, &[&str], Expect)] = &[
        ("/%6Frders/x", &[], MISSING),
        ("/%6frders/x", &[], MISSING),
        ("/%6Frders/x", &[STALE], STALE_EPOCH),
        ("/x/../orders/a", &[], MISSING),
        ("/x/%2e%2E/orders/a", &[], MISSING),
        ("/./orders/a", &[], MISSING),
        ("/orders/./a", &[], MISSING),
        ("//orders//a", &[], MISSING),
        ("/orders", &[], MISSING),
        // Judged in billing (epoch 20), where the orders token is stale.
        ("/orders/../billing/a", &[], MISSING),
        ("/orders/../billing/a", &[ORDERS], STALE_EPOCH),
        ("/orders/%2e%2e/billing/a", &[ORDERS], STALE_EPOCH),
        ("/%62illing/a", &[ORDERS], STALE_EPOCH),
        // An orders token cannot climb out of the store's root either.
        ("/orders/../../billing/a", &[ORDERS], BAD_PATH),
    ];
    for (target, headers, expect) in table {
        rig.refused(&put(target, headers), *expect);
    }
    for (target, token, uri) in [
        ("/%6Frders/x", ORDERS, "/orders/x"),
        ("/orders/./sub/../a", ORDERS, "/orders/a"),
        ("//orders//b", ORDERS, "/orders/b"),
        ("/orders/../billing/c", BILLING, "/billing/c"),
    ] {
        rig.admitted(&put(target, &[token]), ("PUT", uri, token));
    }
    rig.finish(&[
        "orders/raise",
        "billing/raise",
        "orders/x",
        "orders/a",
        "orders/b",
        "billing/c",
    ]);
}

#[test]
fn paths_a_store_could_read_differently_are_bad_paths() {
    let mut rig = Rig::start();
    let table: &[(&str, Expect)] = &[
        ("/orders%2Fa", BAD_PATH),
        ("/orders%2fa", BAD_PATH),
        ("/x%2F..%2Forders/a", BAD_PATH),
        ("/orders;x/a", BAD_PATH),
        ("/orders/a;jsessionid=1", BAD_PATH),
        ("/orders/a%5Cb", BAD_PATH),
        ("/orders%5c..%5cbilling/a", BAD_PATH),
        ("/orders/a%00", BAD_PATH),
        ("/orders/a%0d%0aX:1", BAD_PATH),
        ("/orders/a%09b", BAD_PATH),
        ("/orders/a%7F", BAD_PATH),
        ("/orders/a%", BAD_PATH),
        ("/orders/a%zz", BAD_PATH),
        ("/%2e%2e/orders/a", BAD_PATH),
        ("/orders/../../orders/a", BAD_PATH),
        ("*", BAD_PATH),
        ("/orders\\a", BAD_PATH),
        ("/x\\..\\orders/a", BAD_PATH),
        ("/orders/caf\u{e9}", BAD_PATH),
        // Raw control bytes: hyper's parser may refuse them before fencegate.
        ("/orders/a\x00b", Any400),
        ("/orders/a\x01b", Any400),
        ("/orders/a\x7fb", Any400),
        ("/orders/a\x1bb", Any400),
    ];
    // Refused with or without a valid token: a token never makes a bad path good.
    for (target, expect) in table {
        for headers in [&[][..], &[ORDERS][..]] {
            rig.refused(&put(target, headers), *expect);
        }
    }
    rig.admitted(&put("/orders/ok", &[ORDERS]), ("PUT", "/orders/ok", ORDERS));
    rig.admitted(&put("/orders/a%20b", &[ORDERS]), ("PUT", "/orders/a b", ORDERS));
    rig.finish(&["orders/raise", "billing/raise", "orders/ok", "orders/a b"]);
}

/// `OPTIONS *` (the asterisk-form, RFC 9112 §3.2.4: about the server as a
/// whole) is a read in no domain, and goes to the store as it came; any
/// other method with it is a bad path. (It was a bad path for OPTIONS too.)
#[test]
fn options_asterisk_reaches_the_store_as_it_came() {
    let mut rig = Rig::start();
    let options = b"OPTIONS * HTTP/1.1\r\nHost: store\r\n\r\n";
    let (resp, ctx) = rig.send(options);
    assert_eq!(resp.header("fencegate-reason"), None, "{ctx}\nnot forwarded");
    // nginx does not serve the asterisk-form: its own 400, logged as a
    // request it could not read, is what says it got there.
    assert_eq!(
        (resp.status, resp.header("server").map(|s| s.starts_with("nginx"))),
        (400, Some(true)),
        "{ctx}"
    );
    rig.expected.push(("-".to_string(), "-".to_string(), None));
    rig.wait_log(&ctx);
    rig.refused(&put("*", &[ORDERS]), BAD_PATH);
    rig.finish(&["orders/raise", "billing/raise"]);
}

#[test]
fn domains_are_case_sensitive_and_whole_segments() {
    let mut rig = Rig::start();
    for target in [
        "/ORDERS/a",
        "/Orders/a",
        "/%4Frders/a",
        "/ordersX/a",
        "/order/a",
        "/BILLING/a",
        "/",
        "/elsewhere/a",
    ] {
        for headers in [&[][..], &[ORDERS][..]] {
            rig.refused(&put(target, headers), NO_DOMAIN);
        }
    }
    rig.admitted(&put("/orders/a", &[ORDERS]), ("PUT", "/orders/a", ORDERS));
    rig.finish(&["orders/raise", "billing/raise", "orders/a"]);
}

#[test]
fn overrides_and_unknown_methods_are_writes() {
    let mut rig = Rig::start();
    let table: &[(&str, &[&str], Expect)] = &[
        ("POST /orders/m", &["X-HTTP-Method-Override: DELETE"], MISSING),
        ("GET /orders/m", &["X-HTTP-Method-Override: DELETE"], MISSING),
        ("GET /orders/m", &["X-HTTP-Method: PUT"], MISSING),
        ("GET /orders/m", &["X-Method-Override: PUT"], MISSING),
        ("GET /orders/m", &["x-http-method-override: GET"], MISSING),
        ("OPTIONS /orders/m", &["X-HTTP-Method: DELETE"], MISSING),
        ("HEAD /orders/m", &["X-Method-Override: DELETE"], MISSING),
        ("GET /elsewhere/m", &["X-HTTP-Method-Override: DELETE"], NO_DOMAIN),
        ("GET /orders/m", &["X-HTTP-Method: DELETE", STALE], STALE_EPOCH),
        ("DELETE /orders/raise", &[], MISSING),
        ("DELETE /orders", &[], MISSING),
        ("PURGE /orders/m", &[], MISSING),
        ("FOO /orders/m", &[], MISSING),
        ("PROPPATCH /orders/m", &[], MISSING),
        ("MKCOL /orders/m/", &[], MISSING),
        ("LOCK /orders/m", &[], MISSING),
        ("put /orders/m", &[], MISSING),
        ("get /orders/m", &[], MISSING),
        ("Get /orders/m", &[], MISSING),
    ];
    for (line, headers, expect) in table {
        rig.refused(&req(line, headers, ""), *expect);
    }
    let get = req(
        "GET /orders/raise",
        &["X-HTTP-Method-Override: DELETE", ORDERS],
        "",
    );
    let resp = rig.admitted(&get, ("GET", "/orders/raise", ORDERS));
    assert_eq!(resp.status, 200, "nginx serves the GET");
    let proppatch = req("PROPPATCH /orders/m", &[ORDERS], "");
    rig.admitted(&proppatch, ("PROPPATCH", "/orders/m", ORDERS));
    let mkcol = req("MKCOL /orders/m/", &[ORDERS], "");
    rig.admitted(&mkcol, ("MKCOL", "/orders/m/", ORDERS));
    // MKCOL made a directory, which files_under does not list.
    rig.finish(&["orders/raise", "billing/raise"]);
}

#[test]
fn copy_and_move_stay_in_their_domain() {
    let mut rig = Rig::start();
    rig.admitted(&put("/orders/a", &[ORDERS]), ("PUT", "/orders/a", ORDERS));
    let dests = [
        "/billing/a",
        "http://store.test/billing/a",
        "http://evil.example/billing/a",
        "/orders/../billing/a",
        "/orders/%2e%2e/billing/a",
        "/%62illing/a",
        "//billing//a",
        "/elsewhere/a",
        "/ORDERS/a",
    ];
    for method in ["MOVE", "COPY"] {
        let line = format!("{method} /orders/a");
        for dest in dests {
            for token in [ORDERS, BILLING] {
                let d = format!("Destination: {dest}");
                rig.refused(&req(&line, &[&d, token], ""), CROSS);
            }
        }
        let bad = ["Destination: /orders%2F..%2Fbilling/a", ORDERS];
        rig.refused(&req(&line, &bad, ""), BAD_PATH);
        rig.refused(&req(&line, &["Destination: /orders/b"], ""), MISSING);
        // Judged in billing by its source: the orders token is stale there.
        let from = format!("{method} /orders/../billing/raise");
        rig.refused(&req(&from, &["Destination: /billing/z", ORDERS], ""), STALE_EPOCH);
    }
    // Two Destinations, one in billing: refused, or copied in orders only.
    let mut files = vec!["orders/raise", "billing/raise", "orders/b", "orders/c"];
    for (i, pair) in [["/orders/d0", "/billing/d0"], ["/billing/d1", "/orders/d1"]]
        .iter()
        .enumerate()
    {
        let [d0, d1] = pair.map(|d| format!("Destination: {d}"));
        let (resp, ctx) = rig.send(&req("COPY /orders/a", &[&d0, &d1, ORDERS], ""));
        if resp.header("fencegate-reason").is_some() {
            assert!((400..500).contains(&resp.status), "{ctx}");
        } else {
            rig.expected.push(entry("COPY", "/orders/a", "10"));
            files.push(["orders/d0", "orders/d1"][i]);
        }
        rig.wait_log(&ctx);
    }
    let mv = req("MOVE /orders/a", &["Destination: /orders/b", ORDERS], "");
    let resp = rig.admitted(&mv, ("MOVE", "/orders/a", ORDERS));
    assert!(matches!(resp.status, 201 | 204), "nginx moved the file: {resp:?}");
    let cp = req("COPY /orders/b", &["Destination: /orders/./x/../c", ORDERS], "");
    let resp = rig.admitted(&cp, ("COPY", "/orders/b", ORDERS));
    assert!(
        matches!(resp.status, 201 | 204),
        "nginx copied the file: {resp:?}"
    );
    rig.finish(&files);
}

#[test]
fn connection_may_not_strip_the_token() {
    let mut rig = Rig::start();
    for conn in [
        &["Connection: fencing-token"][..],
        &["Connection: Fencing-Token"],
        &["Connection: keep-alive, FENCING-TOKEN"],
        &["Connection: close", "Connection: fencing-token"],
        &["Connection: host"],
    ] {
        for token in [ORDERS, STALE] {
            let headers: Vec<&str> = conn.iter().copied().chain([token]).collect();
            rig.refused(&put("/orders/h", &headers), Own(400));
        }
        rig.refused(&put("/orders/h", conn), Own(400));
    }
    let h2c = [
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
    ];
    rig.refused(&put("/orders/h", &h2c), MISSING);
    let keep = put("/orders/h", &["Connection: keep-alive", ORDERS]);
    rig.admitted(&keep, ("PUT", "/orders/h", ORDERS));
    let other = put("/orders/i", &["Connection: x-other", "X-Other: 1", ORDERS]);
    rig.admitted(&other, ("PUT", "/orders/i", ORDERS));
    rig.finish(&["orders/raise", "billing/raise", "orders/h", "orders/i"]);
}

#[test]
fn absolute_form_is_judged_on_its_path() {
    let mut rig = Rig::start();
    let table: &[(&str, &[&str], Expect)] = &[
        ("http://evil.example/orders/a", &[], MISSING),
        ("http://evil.example/x/../orders/a", &[], MISSING),
        ("http://evil.example/%6Frders/a", &[STALE], STALE_EPOCH),
        ("http://evil.example/orders/../billing/a", &[ORDERS], STALE_EPOCH),
        ("http://evil.example/elsewhere/a", &[ORDERS], NO_DOMAIN),
        ("http://evil.example/orders%2Fa", &[ORDERS], BAD_PATH),
        ("http://evil.example", &[ORDERS], NO_DOMAIN),
        ("evil.example:80", &[ORDERS], Any400),
        ("http://u@evil.example/orders/a", &[], MISSING),
    ];
    for (target, headers, expect) in table {
        rig.refused(&put(target, headers), *expect);
    }
    let abs = put("http://evil.example/orders/./a", &[ORDERS]);
    rig.admitted(&abs, ("PUT", "/orders/a", ORDERS));
    rig.finish(&["orders/raise", "billing/raise", "orders/a"]);
}

#[test]
fn smuggling_and_pipelining_do_not_slip_a_write_through() {
    let mut rig = Rig::start();
    let hidden = "PUT /orders/hidden HTTP/1.1\r\nHost: store.test\r\nContent-Length: 1\r\n\r\nh";
    let (te, n) = ("Transfer-Encoding: chunked\r\n", hidden.len());
    // (label, framing header lines, body); `hidden` is a second request to
    // whoever reads the framing differently.
    let attempts = [
        (
            "CL then TE",
            format!("Content-Length: {}\r\n{te}", 5 + n),
            format!("0\r\n\r\n{hidden}"),
        ),
        (
            "TE then CL",
            format!("{te}Content-Length: 3\r\n"),
            format!("1\r\nx\r\n0\r\n\r\n{hidden}"),
        ),
        (
            "two lengths",
            format!("Content-Length: 1\r\nContent-Length: {}\r\n", 1 + n),
            format!("x{hidden}"),
        ),
        (
            "TE not chunked",
            format!("Transfer-Encoding: xchunked\r\nContent-Length: {n}\r\n"),
            hidden.into(),
        ),
        (
            "TE chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n".into(),
            format!("1\r\nx\r\n0\r\n\r\n{hidden}"),
        ),
    ];
    for (label, framing, body) in &attempts {
        let bytes = format!("PUT /orders/s HTTP/1.1\r\nHost: store.test\r\n{framing}\r\n{body}");
        let text = until_close(&rig.fg.addr(), bytes.as_bytes());
        let got = statuses(&text);
        assert!(
            !got.is_empty() && got.iter().all(|s| (400..500).contains(s)),
            "{label}: every answer must be a refusal, got {got:?}\n{text}"
        );
        assert_eq!(rig.log(), rig.expected, "{label}: reached the store\n{text}");
    }

    // A tokenless write pipelined after an admitted one on one connection.
    let admitted = String::from_utf8(put("/orders/p1", &[ORDERS])).unwrap();
    let pipelined = format!(
        "{admitted}PUT /orders/p2 HTTP/1.1\r\nHost: store.test\r\nConnection: close\r\n\
         Content-Length: 1\r\n\r\ny"
    );
    let text = until_close(&rig.fg.addr(), pipelined.as_bytes());
    assert_eq!(statuses(&text), [201, 428], "{text}");
    rig.expected.push(entry("PUT", "/orders/p1", "10"));
    rig.wait_log("pipelined");

    // The admitted write's body is what fencegate read, never a second
    // request for the store: a chunked body hiding a tokenless request.
    let outer = format!(
        "PUT /orders/p3 HTTP/1.1\r\nHost: store.test\r\n{ORDERS}\r\nContent-Length: {n}\r\n\
         {te}\r\n1\r\nz\r\n0\r\n\r\n{hidden}"
    );
    let text = until_close(&rig.fg.addr(), outer.as_bytes());
    let got = statuses(&text);
    assert_eq!(got.len(), 1, "one answer, then close: {text}");
    if (200..300).contains(&got[0]) {
        rig.expected.push(entry("PUT", "/orders/p3", "10"));
    }
    rig.wait_log("CL+TE with a token");
    let mut files = vec!["orders/raise", "billing/raise", "orders/p1"];
    if rig.expected.len() == 4 {
        files.push("orders/p3");
        let body = std::fs::read_to_string(rig.nginx.data_dir().join("orders/p3")).unwrap();
        assert_eq!(body, "z", "the chunked body, not the Content-Length framing");
    }
    rig.finish(&files);
}

/// nginx normalizes paths itself, so its log cannot tell whether fencegate
/// forwarded the normal form: a store that records the raw target can.
#[tokio::test(flavor = "multi_thread")]
async fn the_checked_path_is_the_forwarded_path() {
    let store = ScriptedStore::start().await;
    let config = FencegateConfig::new(&store.url()).domain("orders", "/orders/");
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));
    // (request line, extra header, path and query the store must see)
    let cases = [
        ("PUT /%6Frders/x", "", "/orders/x", None),
        ("PUT /orders/./sub/../a", "", "/orders/a", None),
        ("PUT //orders//b", "", "/orders/b", None),
        (
            "PUT http://evil.example/x/../orders/c?q=/../b",
            "",
            "/orders/c",
            Some("q=/../b"),
        ),
        ("PUT /orders/%7e%41%3f", "", "/orders/~A%3F", None),
        (
            "MOVE /orders/a",
            "Destination: /orders/./d/../e",
            "/orders/a",
            None,
        ),
        (
            "COPY /orders/a",
            "Destination: http://h.test//orders/%66",
            "/orders/a",
            None,
        ),
    ];
    for (line, extra, path, query) in cases {
        let headers: Vec<&str> = [extra, ORDERS].into_iter().filter(|h| !h.is_empty()).collect();
        let text = tokio::task::block_in_place(|| raw_request(&fg.addr(), &req(line, &headers, "x")));
        assert_eq!(parse_response(&text).status, 201, "{line}: {text}");
        let head = store
            .events()
            .into_iter()
            .rfind(|e| e.kind == EventKind::HeadArrived)
            .expect("the store saw the request");
        assert_eq!(
            (head.path.as_str(), head.query.as_deref()),
            (path, query),
            "{line}"
        );
        assert_eq!(
            head.token.as_deref(),
            Some("10"),
            "{line}: the token is forwarded"
        );
    }
    let dests: Vec<String> = store
        .events()
        .iter()
        .filter_map(|e| e.headers.get("destination"))
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        dests,
        ["/orders/e", "http://h.test/orders/f"],
        "Destinations forwarded in normal form"
    );
}

/// A DELETE or MOVE of a collection that holds another domain's prefix
/// would reach that domain's paths with this domain's token (nginx's
/// WebDAV DELETE is recursive): refused as `cross_domain`, and nothing
/// reaches the store. Within a domain both go on. (A `/d/` DELETE with
/// `d`'s token 100 removed `sub`'s files, written at 500: found by review.)
#[test]
fn a_delete_or_move_may_not_reach_a_nested_domain() {
    let (nginx, fg) = nested_domains(
        "/d/sub/",
        &[("/d/a", "Fencing-Token: 100"), ("/d/sub/x", "Fencing-Token: 500")],
    );
    let before = nginx.log_entries_at_least(2).len();
    for (line, headers) in [
        ("DELETE /d/", vec!["Fencing-Token: 100"]),
        ("DELETE /d", vec!["Fencing-Token: 100"]),
        ("MOVE /d/", vec!["Fencing-Token: 100", "Destination: /d/moved/"]),
    ] {
        let (resp, ctx) = send(&fg, &req(line, &headers, ""));
        assert_eq!(
            (resp.status, resp.header("fencegate-reason")),
            (403, Some("cross_domain")),
            "{ctx}"
        );
        assert!(resp.body.contains("sub"), "the refusal names the domain: {ctx}");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        nginx.log_entries().len(),
        before,
        "a refused request reached the store"
    );
    assert!(files_under(&nginx.data_dir()).contains("d/sub/x"));
    // Controls: inside one domain, both go on.
    let (resp, ctx) = send(&fg, &req("DELETE /d/a", &["Fencing-Token: 100"], ""));
    assert!(matches!(resp.status, 200 | 204), "{ctx}");
    let (resp, ctx) = send(&fg, &req("DELETE /d/sub/", &["Fencing-Token: 500"], ""));
    assert!(resp.header("fencegate-reason").is_none(), "{ctx}");
}

/// A COPY or MOVE onto an existing collection replaces everything under it
/// (nginx deletes the destination first, `Overwrite: T` being WebDAV's
/// default): onto one that holds another domain's prefix, it is refused as
/// `cross_domain` and that domain's files stay. (Found by review: `sub`'s
/// file went with `d`'s token.)
#[test]
fn a_copy_or_move_may_not_land_on_a_nested_domain() {
    for method in ["MOVE", "COPY"] {
        let (nginx, fg) = nested_domains(
            "/d/x/sub/",
            &[
                ("/d/src/f", "Fencing-Token: 100"),
                ("/d/x/own", "Fencing-Token: 100"),
                ("/d/x/sub/y", "Fencing-Token: 500"),
            ],
        );
        let headers = [
            "Fencing-Token: 100",
            "Destination: /d/x/",
            "Depth: infinity",
            "Overwrite: T",
        ];
        let (resp, ctx) = send(&fg, &req(&format!("{method} /d/src/"), &headers, ""));
        assert_eq!(
            (resp.status, resp.header("fencegate-reason")),
            (403, Some("cross_domain")),
            "{ctx}"
        );
        let files = files_under(&nginx.data_dir());
        assert!(
            files.contains("d/x/sub/y"),
            "{method}: sub's file is gone: {files:?}"
        );
        // Control: onto a collection inside `d` alone, it goes on.
        let headers = ["Fencing-Token: 100", "Destination: /d/y/", "Depth: infinity"];
        let (resp, ctx) = send(&fg, &req(&format!("{method} /d/src/"), &headers, ""));
        assert!(resp.header("fencegate-reason").is_none(), "{ctx}");
    }
}

/// nginx decodes every escape in a path (and in `Destination`) once, so
/// `%40` and `@`, or `%7C` and `|`, name the same file: a domain whose
/// prefix holds such a character is reached by either spelling, and both
/// must be judged in it. (Found by review: `/d/a%40b/x` was judged in `d`,
/// and `d`'s token 100 overwrote, copied onto and deleted the files of
/// `/d/a@b/`, written at 500.)
#[test]
fn every_spelling_of_a_prefix_lies_in_its_domain() {
    let nginx = Nginx::start();
    let fg = Fencegate::start(
        FencegateConfig::new(&nginx.url())
            .domain("d", "/d/")
            .domain("at", "/d/a@b/")
            .domain("bar", "/d/x%7Cy/"),
    );
    let (low, high) = ("Fencing-Token: 100", "Fencing-Token: 500");
    for (path, token) in [("/d/f", low), ("/d/a@b/x", high), ("/d/x%7Cy/x", high)] {
        let (resp, ctx) = send(&fg, &put(path, &[token]));
        assert_eq!(resp.status, 201, "{ctx}");
    }
    let before = nginx.log_entries_at_least(3).len();
    let stale = [
        ("PUT /d/a%40b/x", None),
        ("PUT /d/a%40b/new", None),
        ("PUT /d/x|y/x", None),
        ("PUT /d/x%7cy/x", None),
        ("DELETE /d/a%40b/", None),
        ("DELETE /d/a%40b", None),
        ("DELETE /d/x|y", None),
        ("COPY /d/f", Some("Destination: /d/a%40b/x")),
        ("MOVE /d/f", Some("Destination: /d/x|y/x")),
    ];
    for (line, destination) in stale {
        let headers: Vec<&str> = destination.into_iter().chain([low]).collect();
        let (resp, ctx) = send(&fg, &req(line, &headers, "x"));
        assert!(
            matches!(
                (resp.status, resp.header("fencegate-reason")),
                (412, Some("stale_epoch")) | (403, Some("cross_domain"))
            ),
            "a lower token reached a nested domain: {ctx}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        nginx.log_entries().len(),
        before,
        "a refused request reached the store"
    );
    let want: BTreeSet<String> = ["d/f", "d/a@b/x", "d/x|y/x"]
        .iter()
        .map(|f| f.to_string())
        .collect();
    assert_eq!(files_under(&nginx.data_dir()), want, "files in the store");
    // Control: the nested domain's own token goes on, in either spelling.
    for path in ["/d/a%40b/y", "/d/x|y/y"] {
        let (resp, ctx) = send(&fg, &put(path, &[high]));
        assert_eq!(resp.status, 201, "{ctx}");
    }
}
