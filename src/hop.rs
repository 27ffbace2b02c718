//! Header hygiene between the client and the store: hop-by-hop headers are
//! removed both ways (RFC 9110 §7.6.1, and whatever `Connection` names), and
//! the client's address is added in `X-Forwarded-For` and `Forwarded`.
//!
//! Neither direction edits a header map. A request's head is written from
//! the client's map through [`RequestHop`], which leaves out what must not
//! go on and adds fencegate's lines; a response's map is built by
//! [`crate::codec`] without the hop-by-hop headers. Editing the map cost
//! a hash per removal and a regrowth of the map for the two forwarding
//! headers on every request (bench/RESULTS.md, step 18).

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, FORWARDED, HOST, TE};

/// `X-Forwarded-For`, `Forwarded`, `Host`, `TE` and `Connection` as names a head can
/// borrow for as long as it likes.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static FORWARDED_NAME: HeaderName = FORWARDED;
static HOST_NAME: HeaderName = HOST;
static TE_NAME: HeaderName = TE;
static CONNECTION_NAME: HeaderName = CONNECTION;
static TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
/// `TE` is hop-by-hop, and its sender must say so (RFC 9110 §10.1.4).
static TE_OPTION: HeaderValue = HeaderValue::from_static("te");

/// Whether `name` is hop-by-hop: meaningful for one connection only, never
/// forwarded. A `HeaderName` is lower-case, so one `match` on its text
/// decides it (comparing it with eight names one by one was a twentieth
/// of a read's instructions).
pub fn hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_lower(name.as_str())
}

/// [`hop_by_hop`] of a lower-case name.
pub fn is_hop_by_hop_lower(name: &str) -> bool {
    // `close` is no header, but RFC 9110 §7.6.1 reserves the name so a
    // field called so cannot pass as one the `Connection: close` names.
    matches!(
        name,
        "connection"
            | "close"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// Whether `name`, in any case, is hop-by-hop, so it would never reach the store.
pub fn is_hop_by_hop(name: &str) -> bool {
    is_hop_by_hop_lower(&name.to_ascii_lowercase())
}

/// Method-override headers: a request carrying one is a write whatever its method.
pub static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Whether `name` is a method override: one of [`METHOD_OVERRIDES`], or
/// one spelled with `_` for a `-`. CGI-style stores (Python's wsgiref,
/// gunicorn before 22, anything that builds `HTTP_*` variables) read
/// `X_HTTP_Method_Override` as `X-HTTP-Method-Override`.
pub fn is_method_override(name: &HeaderName) -> bool {
    METHOD_OVERRIDES.iter().any(|o| same_field(name, o))
}

/// Whether `name` is `of`, or `of` spelled with `_` for some `-`: the same
/// field to a store that folds both into `HTTP_*` variables.
pub fn same_field(name: &HeaderName, of: &HeaderName) -> bool {
    let (name, of) = (name.as_str().as_bytes(), of.as_str().as_bytes());
    name.len() == of.len()
        && name
            .iter()
            .zip(of)
            .all(|(n, o)| n == o || (*n == b'_' && *o == b'-'))
}

/// A `Connection` header that would strip a header fencegate relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedHeader(pub String);

/// The options of one `Connection` value (or the codings of one `TE`):
/// comma-separated, trimmed, empty ones skipped.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// Refuses a `Connection` header that names `Host` or the fencing header:
/// removing those as hop-by-hop would forward a write without its token.
pub fn check_connection(headers: &HeaderMap, fencing_header: &HeaderName) -> Result<(), ProtectedHeader> {
    for value in headers.get_all(CONNECTION) {
        for option in list_items(value.as_bytes()) {
            if option.eq_ignore_ascii_case(HOST.as_str().as_bytes())
                || option.eq_ignore_ascii_case(fencing_header.as_str().as_bytes())
            {
                return Err(ProtectedHeader(
                    String::from_utf8_lossy(option).to_ascii_lowercase(),
                ));
            }
        }
    }
    Ok(())
}

/// What `Connection` values say (RFC 9110 §7.6.1), read in one pass over
/// each: the `close`, `keep-alive` and `te` options, and the headers they
/// name beyond the hop-by-hop ones (which go anyway).
#[derive(Debug, Default)]
pub struct ConnectionOptions {
    /// `close`: the connection ends after this message.
    pub close: bool,
    /// `keep-alive`: an HTTP/1.0 connection persists.
    pub keep_alive: bool,
    /// Other headers named, to be left out (rarely any).
    pub named: Vec<HeaderName>,
}

impl ConnectionOptions {
    /// Takes note of one `Connection` value.
    pub fn read(&mut self, value: &[u8]) {
        // Nearly every `Connection` is one of these: no list to split.
        if value.eq_ignore_ascii_case(b"keep-alive") {
            self.keep_alive = true;
            return;
        }
        if value.eq_ignore_ascii_case(b"close") {
            self.close = true;
            return;
        }
        for option in list_items(value) {
            // The usual options, read without making a `HeaderName` of them.
            if option.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if option.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if let Ok(name) = HeaderName::from_bytes(option) {
                // Not deduplicated: a name given twice costs one more
                // comparison in `names`, where checking every name against
                // those before it cost O(n²) for a list a client chose (a
                // 64 KiB head names some 16,000 fields).
                if !hop_by_hop(&name) {
                    self.named.push(name);
                }
            }
        }
    }

    /// Whether `name` is one of the headers named.
    pub fn names(&self, name: &HeaderName) -> bool {
        !self.named.is_empty() && self.named.contains(name)
    }
}

/// How a request's head reaches the store, decided by one pass over its
/// headers: which of the client's headers go on, and the lines fencegate
/// adds (`Host` for a request without one, `TE: trailers` with its
/// `Connection: te`, and the forwarding headers).
#[derive(Debug)]
pub struct RequestHop {
    /// What the client's `Connection` says.
    connection: ConnectionOptions,
    has_host: bool,
    had_length: bool,
    /// The client asked for trailers, which fencegate forwards.
    trailers: bool,
    x_forwarded_for: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
}

impl RequestHop {
    /// The plan for `headers`, a request from `peer`.
    pub fn new(headers: &HeaderMap, peer: &Peer) -> RequestHop {
        let mut connection = ConnectionOptions::default();
        let (mut has_host, mut had_length, mut trailers) = (false, false, false);
        let (mut earlier_xff, mut earlier_forwarded) = (false, false);
        // Every value, so each name is seen once per line.
        for (name, value) in headers {
            match name.as_str() {
                "host" => has_host = true,
                "content-length" => had_length = true,
                "te" => trailers |= list_items(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"trailers")),
                "connection" => connection.read(value.as_bytes()),
                "x-forwarded-for" => earlier_xff = true,
                "forwarded" => earlier_forwarded = true,
                _ => {}
            }
        }
        // A header `Connection` names is gone before anything reads it.
        let x_forwarded_for = if earlier_xff && !connection.names(&X_FORWARDED_FOR) {
            joined(headers, &X_FORWARDED_FOR, &peer.ip.to_string())
        } else {
            peer.xff.clone()
        };
        let forwarded = if earlier_forwarded && !connection.names(&FORWARDED_NAME) {
            joined(headers, &FORWARDED_NAME, &forwarded_element(peer.ip))
        } else {
            peer.forwarded.clone()
        };
        RequestHop {
            had_length: had_length && !connection.names(&CONTENT_LENGTH),
            // TE is always this hop's alone (`Connection: te` only says
            // so again): fencegate forwards trailers, so it asks the store
            // for them when its client accepts them.
            trailers,
            connection,
            has_host,
            x_forwarded_for,
            forwarded,
        }
    }

    /// Whether the client sent a `Content-Length`.
    pub fn had_length(&self) -> bool {
        self.had_length
    }

    /// The fields the client's `Connection` names (beyond the hop-by-hop
    /// ones): its trailers lose them too.
    pub fn connection_named(&self) -> &[HeaderName] {
        &self.connection.named
    }

    /// Whether the client's header `name` goes on to the store.
    /// `Expect` stays behind: fencegate answers `100-continue` itself.
    fn forwards(&self, name: &HeaderName) -> bool {
        !(hop_by_hop(name)
            || matches!(name.as_str(), "expect" | "x-forwarded-for" | "forwarded")
            || self.connection.names(name))
    }

    /// The header lines of the head sent to the store: the client's that
    /// go on, in their order, then fencegate's. `host` is the store's
    /// authority, for a request that came without a `Host` (HTTP/1.0).
    pub fn fields<'a>(
        &'a self,
        headers: &'a HeaderMap,
        host: &'a HeaderValue,
    ) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
        let added = [
            (&HOST_NAME, (!self.has_host).then_some(host)),
            (&TE_NAME, self.trailers.then_some(&TRAILERS)),
            (&CONNECTION_NAME, self.trailers.then_some(&TE_OPTION)),
            (&X_FORWARDED_FOR, self.x_forwarded_for.as_ref()),
            (&FORWARDED_NAME, self.forwarded.as_ref()),
        ];
        headers.iter().filter(|(name, _)| self.forwards(name)).chain(
            added
                .into_iter()
                .filter_map(|(name, value)| value.map(|v| (name, v))),
        )
    }
}

/// `name`'s earlier hops' values, all of them in order, then `own`, as
/// one line (RFC 9110 §5.3: several lines are one list, so none is lost).
fn joined(headers: &HeaderMap, name: &HeaderName, own: &str) -> Option<HeaderValue> {
    let mut joined = Vec::new();
    for earlier in headers.get_all(name) {
        joined.extend_from_slice(earlier.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(own.as_bytes());
    HeaderValue::from_bytes(&joined).ok()
}

/// A connection's client as fencegate names it to the store. The values
/// are made once per connection: formatting the address on every request
/// was a measurable share of the data path.
pub struct Peer {
    ip: IpAddr,
    /// `X-Forwarded-For` when the request has none.
    xff: Option<HeaderValue>,
    /// `Forwarded` when the request has none.
    forwarded: Option<HeaderValue>,
}

impl Peer {
    /// The client at `address`.
    pub fn new(address: SocketAddr) -> Peer {
        let ip = address.ip();
        Peer {
            ip,
            xff: HeaderValue::from_str(&ip.to_string()).ok(),
            forwarded: HeaderValue::from_str(&forwarded_element(ip)).ok(),
        }
    }
}

/// One `Forwarded` element for `ip` (RFC 7239 §6: IPv6 in brackets, quoted).
fn forwarded_element(ip: IpAddr) -> String {
    if ip.is_ipv6() {
        format!("for=\"[{ip}]\";proto=http")
    } else {
        format!("for={ip};proto=http")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in list {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    /// The header lines a request of `list` from `peer` carries to the store.
    fn sent(list: &[(&str, &str)], peer: &str) -> Vec<(String, String)> {
        let map = headers(list);
        let hop = RequestHop::new(&map, &Peer::new(peer.parse().unwrap()));
        let host = HeaderValue::from_static("store:80");
        hop.fields(&map, &host)
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    fn lines(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_stay_behind() {
        let out = sent(
            &[
                ("connection", "keep-alive, X-Secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("upgrade", "websocket"),
                ("transfer-encoding", "chunked"),
                ("te", "gzip, trailers"),
                ("expect", "100-continue"),
                ("proxy-authorization", "x"),
                ("fencing-token", "5"),
                ("host", "store"),
            ],
            "127.0.0.1:5000",
        );
        assert_eq!(
            out,
            lines(&[
                ("fencing-token", "5"),
                ("host", "store"),
                ("te", "trailers"),
                ("connection", "te"),
                ("x-forwarded-for", "127.0.0.1"),
                ("forwarded", "for=127.0.0.1;proto=http"),
            ])
        );
        // `TE` with the `Connection: te` RFC 9110 §10.1.4 asks of every
        // sender of TE: the client accepts trailers, so fencegate asks the
        // store for them (its own hop's TE); a request without `Host`
        // (HTTP/1.0) gets the store's.
        let out = sent(&[("connection", "te"), ("te", "trailers")], "127.0.0.1:5000");
        assert_eq!(
            out,
            lines(&[
                ("host", "store:80"),
                ("te", "trailers"),
                ("connection", "te"),
                ("x-forwarded-for", "127.0.0.1"),
                ("forwarded", "for=127.0.0.1;proto=http"),
            ])
        );
        assert!(is_hop_by_hop("Keep-Alive") && is_hop_by_hop("TE") && !is_hop_by_hop("fencing-token"));
        // A field named `Close` never passes (RFC 9110 §7.6.1); a length
        // `Connection` names does not count as the client's.
        let map = headers(&[
            ("connection", "close, content-length"),
            ("close", "1"),
            ("content-length", "0"),
        ]);
        let hop = RequestHop::new(&map, &Peer::new("127.0.0.1:5000".parse().unwrap()));
        assert!(!hop.had_length());
        let host = HeaderValue::from_static("store:80");
        assert!(hop
            .fields(&map, &host)
            .all(|(k, _)| k != "close" && k != "content-length"));
    }

    /// A `Connection` that names thousands of fields (a client's 64 KiB
    /// head holds some 16,000) leaves out each field it names. What that
    /// costs (in proportion to the names; each was once compared with every
    /// one before it, O(n²), seconds of a serving thread) is measured in
    /// `benches/admission.rs`, group `hop`, not timed here.
    #[test]
    fn a_connection_naming_thousands_of_fields_leaves_out_each_of_them() {
        let value: Vec<String> = (0..16_000).map(|i| format!("{i:x}")).collect();
        let mut list = vec![
            ("connection", value.join(",")),
            ("host", "store".to_owned()),
            ("x-kept", "1".to_owned()),
        ];
        // As many fields as hyper lets a head have, each checked against
        // the names.
        list.extend((0..96).map(|i| (["a", "b"][i % 2], i.to_string())));
        let pairs: Vec<(&str, &str)> = list.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let map = headers(&pairs);
        let host = HeaderValue::from_static("store:80");
        let hop = RequestHop::new(&map, &Peer::new("127.0.0.1:5000".parse().unwrap()));
        let sent: Vec<&str> = hop.fields(&map, &host).map(|(k, _)| k.as_str()).collect();
        // `a` and `b` are among the names (10 and 11 in hex).
        assert!(sent.contains(&"x-kept"), "{sent:?}");
        assert!(!sent.iter().any(|k| *k == "a" || *k == "b"), "{sent:?}");
    }

    #[test]
    fn overrides_are_known_in_either_spelling() {
        for name in [
            "x-http-method-override",
            "x_http_method_override",
            "x-http_method",
            "x_method-override",
        ] {
            assert!(is_method_override(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "x-http-method-overrid",
            "x_http_method_overridex",
            "x-forwarded-for",
            "x__method-override",
        ] {
            assert!(!is_method_override(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn connection_may_not_name_the_token_or_host() {
        let token = HeaderName::from_static("fencing-token");
        assert!(check_connection(&headers(&[("connection", "close")]), &token).is_ok());
        assert_eq!(
            check_connection(&headers(&[("connection", "keep-alive, Fencing-Token")]), &token),
            Err(ProtectedHeader("fencing-token".into()))
        );
        assert!(check_connection(
            &headers(&[("connection", "close"), ("connection", "host")]),
            &token
        )
        .is_err());
    }

    #[test]
    fn forwarded_headers_append() {
        let forwarding = |list: &[(&str, &str)], peer: &str| -> Vec<(String, String)> {
            sent(list, peer)
                .into_iter()
                .filter(|(k, _)| k != "host")
                .collect()
        };
        assert_eq!(
            forwarding(&[("x-forwarded-for", "10.0.0.1")], "127.0.0.1:5000"),
            lines(&[
                ("x-forwarded-for", "10.0.0.1, 127.0.0.1"),
                ("forwarded", "for=127.0.0.1;proto=http"),
            ])
        );
        assert_eq!(
            forwarding(&[], "[::1]:5000"),
            lines(&[
                ("x-forwarded-for", "::1"),
                ("forwarded", "for=\"[::1]\";proto=http")
            ])
        );
        assert_eq!(
            forwarding(&[("forwarded", "for=10.0.0.1")], "[::1]:5000"),
            lines(&[
                ("x-forwarded-for", "::1"),
                ("forwarded", "for=10.0.0.1, for=\"[::1]\";proto=http"),
            ])
        );
        // Two lines of earlier hops are one list (RFC 9110 §5.3): none is lost.
        assert_eq!(
            forwarding(
                &[("x-forwarded-for", "10.0.0.1"), ("x-forwarded-for", "10.0.0.2")],
                "127.0.0.1:5000"
            ),
            lines(&[
                ("x-forwarded-for", "10.0.0.1, 10.0.0.2, 127.0.0.1"),
                ("forwarded", "for=127.0.0.1;proto=http"),
            ])
        );
        // Earlier hops that `Connection` names are gone: ours stands alone.
        assert_eq!(
            forwarding(
                &[("connection", "x-forwarded-for"), ("x-forwarded-for", "10.0.0.1")],
                "127.0.0.1:5000"
            ),
            lines(&[
                ("x-forwarded-for", "127.0.0.1"),
                ("forwarded", "for=127.0.0.1;proto=http")
            ])
        );
    }
}
