//! Fields a store may act on besides the request line and the token:
//! method overrides (in either spelling, and as what a collection's
//! DELETE, MOVE or COPY may reach), the same fields in trailers, and the
//! fencing header's underscore twin. (Found by review; each test failed
//! before its fix.)

use crate::support::{
    parse_response, raw_request, request_bytes as req, EventKind, Fencegate, FencegateConfig, RawResponse,
    ScriptedStore,
};
use std::time::Duration;

/// Sends `bytes` as they are (from a multi-threaded test's worker) and
/// reads the answer, parsed and as text.
fn send(fg: &Fencegate, bytes: impl AsRef<[u8]>) -> (RawResponse, String) {
    let text = tokio::task::block_in_place(|| raw_request(&fg.addr(), bytes.as_ref()));
    (parse_response(&text), text)
}

fn heads(store: &ScriptedStore) -> Vec<(String, String)> {
    store
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::HeadArrived)
        .map(|e| (e.method, e.path))
        .collect()
}

/// SPEC makes any request with a method-override header a write, because
/// a store may honour it: `POST /d/` with `X-HTTP-Method-Override: DELETE`
/// is, to such a store, `DELETE /d/`. fencegate refuses `DELETE /d/` when
/// `/d/` holds another domain (`check_subtree`), and so it must refuse the
/// same DELETE (or a MOVE of, or COPY onto, the collection) in override
/// clothes, which would remove `sub`'s paths judged only against `d`.
/// (`check_subtree` looked at the request line's method only.)
#[tokio::test(flavor = "multi_thread")]
async fn an_overridden_method_may_not_reach_a_nested_domain() {
    let store = ScriptedStore::start().await;
    let config = FencegateConfig::new(&store.url())
        .domain("d", "/d/")
        .domain("sub", "/d/sub/");
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));
    let d = "Fencing-Token: 100";
    // Raise d to 100; sub's own writer writes at 500.
    let (resp, text) = send(&fg, req("PUT /d/a", &[d], "a"));
    assert_eq!(resp.status, 201, "{text}");
    let (resp, text) = send(&fg, req("PUT /d/sub/x", &["Fencing-Token: 500"], "x"));
    assert_eq!(resp.status, 201, "{text}");
    let before = heads(&store);
    // Control: the plain DELETE is refused.
    let (resp, text) = send(&fg, req("DELETE /d/", &[d], ""));
    assert_eq!(
        (resp.status, resp.header("fencegate-reason")),
        (403, Some("cross_domain")),
        "{text}"
    );
    let overridden: &[(&str, &[&str])] = &[
        ("POST /d/", &["X-HTTP-Method-Override: DELETE"]),
        ("GET /d/", &["X-HTTP-Method: DELETE"]),
        ("POST /d", &["X-Method-Override: delete"]),
        (
            "POST /d/",
            &["X-HTTP-Method-Override: MOVE", "Destination: /d/moved/"],
        ),
        (
            "POST /d/src/",
            &["X-HTTP-Method-Override: COPY", "Destination: /d/"],
        ),
    ];
    for (line, extra) in overridden {
        let headers: Vec<&str> = extra.iter().copied().chain([d]).collect();
        let (resp, text) = send(&fg, req(line, &headers, ""));
        assert_eq!(
            (resp.status, resp.header("fencegate-reason")),
            (403, Some("cross_domain")),
            "{line} {extra:?}: an overridden DELETE/MOVE/COPY of a collection holding `sub` went on\n{text}"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(heads(&store), before, "a refused request reached the store");
}

/// CGI-style stores (Python's wsgiref, gunicorn before 22, any store that
/// builds `HTTP_*` variables) read `X_HTTP_Method_Override` and
/// `X-HTTP-Method-Override` as one field, so a `GET` overridden to
/// `DELETE` through the underscore spelling is a write. (Names were
/// compared exactly, and the tokenless GET went on as a read.)
#[tokio::test(flavor = "multi_thread")]
async fn underscore_spellings_of_an_override_are_writes() {
    let store = ScriptedStore::start().await;
    let config = FencegateConfig::new(&store.url()).domain("orders", "/orders/");
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));
    let (resp, text) = send(&fg, req("PUT /orders/a", &["Fencing-Token: 10"], "a"));
    assert_eq!(resp.status, 201, "{text}");
    let before = heads(&store);
    for header in [
        "X_HTTP_Method_Override: DELETE",
        "X_HTTP_METHOD: DELETE",
        "X_Method-Override: DELETE",
    ] {
        let (resp, text) = send(&fg, req("GET /orders/a", &[header], ""));
        assert_eq!(
            (resp.status, resp.header("fencegate-reason")),
            (428, Some("missing_token")),
            "GET with `{header}` went on as a read\n{text}"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        heads(&store),
        before,
        "a tokenless overridden write reached the store"
    );
}

/// A request's trailers lose a second fencing token (it would reach the
/// store unchecked), but not the other fields fencegate judges in the
/// head either: a method override (a tokenless chunked `GET` is a read,
/// and its trailer says DELETE) or a `Destination` (a COPY judged on its
/// head's `/orders/b` carries `/billing/x` in its trailer). A store that
/// merges trailers into the head (Apache httpd's `MergeTrailers on`,
/// frameworks that read both as one map) would act on fields fencegate
/// never judged.
#[tokio::test(flavor = "multi_thread")]
async fn trailers_do_not_carry_fields_fencegate_judges_in_the_head() {
    let store = ScriptedStore::start().await;
    let config = FencegateConfig::new(&store.url())
        .domain("orders", "/orders/")
        .domain("billing", "/billing/");
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));
    let (resp, text) = send(
        &fg,
        "PUT /orders/a HTTP/1.1\r\nHost: h\r\nFencing-Token: 10\r\nContent-Length: 1\r\n\r\na",
    );
    assert_eq!(resp.status, 201, "{text}");
    let (resp, text) = send(
        &fg,
        "PUT /billing/a HTTP/1.1\r\nHost: h\r\nFencing-Token: 20\r\nContent-Length: 1\r\n\r\na",
    );
    assert_eq!(resp.status, 201, "{text}");
    let requests = [
        "GET /orders/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
         1\r\nx\r\n0\r\nX-HTTP-Method-Override: DELETE\r\nX-Method-Override: DELETE\r\n\r\n",
        "COPY /orders/a HTTP/1.1\r\nHost: h\r\nFencing-Token: 10\r\nDestination: /orders/b\r\n\
         Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nDestination: /billing/x\r\n\r\n",
    ];
    for request in requests {
        let (resp, text) = send(&fg, request);
        let judged = ["x-http-method-override", "x-method-override", "destination"];
        let reached: Vec<String> = store
            .events()
            .iter()
            .filter(|e| e.kind == EventKind::BodyComplete)
            .flat_map(|e| {
                e.trailers
                    .keys()
                    .map(|k| k.as_str().to_owned())
                    .collect::<Vec<_>>()
            })
            .filter(|k| judged.contains(&k.as_str()))
            .collect();
        assert!(
            reached.is_empty() || resp.header("fencegate-reason").is_some(),
            "trailer fields fencegate judges only in the head reached the store: {reached:?}\n{request}\n{text}"
        );
    }
}

/// The same fold makes `Fencing_Token` beside `Fencing-Token` a second
/// value of the fencing header to a CGI-style store, which SPEC refuses as
/// `malformed_token` ("the header given more than once"): a store that
/// checks the token again would read one fencegate never judged. (It was
/// forwarded beside the checked one.) Alone, the twin is no token, to
/// fencegate as before: a write without the header is `missing_token`, a
/// read goes on.
#[tokio::test(flavor = "multi_thread")]
async fn an_underscore_twin_of_the_fencing_header_is_a_second_token() {
    let store = ScriptedStore::start().await;
    let config = FencegateConfig::new(&store.url()).domain("orders", "/orders/");
    let fg = tokio::task::block_in_place(|| Fencegate::start(config));
    let (resp, text) = send(&fg, req("PUT /orders/a", &["Fencing-Token: 10"], "a"));
    assert_eq!(resp.status, 201, "{text}");
    let before = heads(&store);
    for twin in ["Fencing_Token: 999", "FENCING_TOKEN: 5"] {
        let (resp, text) = send(&fg, req("PUT /orders/b", &["Fencing-Token: 10", twin], "b"));
        assert_eq!(
            (resp.status, resp.header("fencegate-reason")),
            (400, Some("malformed_token")),
            "`{twin}` went on beside the checked token\n{text}"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(heads(&store), before, "a second token reached the store");
    let (resp, text) = send(&fg, req("PUT /orders/b", &["Fencing_Token: 10"], "b"));
    assert_eq!(
        (resp.status, resp.header("fencegate-reason")),
        (428, Some("missing_token")),
        "a write with the twin alone\n{text}"
    );
    let (resp, text) = send(&fg, req("GET /orders/a", &["Fencing_Token: 10"], ""));
    // The scripted store answers every request 201.
    assert_eq!(
        (resp.status, resp.header("fencegate-reason")),
        (201, None),
        "a read with the twin alone goes on\n{text}"
    );
}
