//! Header hygiene between the client and the store: hop-by-hop headers are
//! removed both ways (RFC 9110 §7.6.1, and whatever `Connection` names), and
//! the client's address is added in `X-Forwarded-For` and `Forwarded`.

use std::net::{IpAddr, SocketAddr};

use http::header::{
    Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, EXPECT, FORWARDED, HOST, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
};

// Names as `HeaderName`s, not strings: a lookup by string parses and
// hashes the name on every request.

/// Hop-by-hop headers: meaningful for one connection only, never forwarded.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

const HOP_BY_HOP_COUNT: usize = 8;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Whether `name` is hop-by-hop, so it would never reach the store.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// Method-override headers: a request carrying one is a write whatever its method.
pub const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// A `Connection` header that would strip a header fencegate relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedHeader(pub String);

/// The header names listed in `Connection`, lower-cased.
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
}

/// Refuses a `Connection` header that names `Host` or the fencing header:
/// removing those as hop-by-hop would forward a write without its token.
pub fn check_connection(headers: &HeaderMap, fencing_header: &HeaderName) -> Result<(), ProtectedHeader> {
    for name in connection_options(headers) {
        if name == HOST.as_str() || name == fencing_header.as_str() {
            return Err(ProtectedHeader(name));
        }
    }
    Ok(())
}

/// Removes hop-by-hop headers and those named in `Connection`. On requests,
/// `TE: trailers` survives, since it asks the store for trailers we forward;
/// `Expect` goes too, since fencegate answers `100-continue` itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, is_request: bool) {
    // One pass over the names finds what is there: most messages carry no
    // hop-by-hop header but `Connection`, and a `remove` of an absent name
    // still hashes it (ten of them were a tenth of a read's instructions).
    let mut present = [false; HOP_BY_HOP_COUNT];
    let mut expect = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        } else if name == EXPECT {
            expect = is_request;
        }
    }
    if present[0] {
        for named in connection_named(headers) {
            headers.remove(named);
        }
    }
    let wants_trailers = is_request
        && present[HOP_BY_HOP.iter().position(|h| h == TE).expect("TE is hop-by-hop")]
        && headers
            .get_all(TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
    if expect {
        headers.remove(EXPECT);
    }
    if wants_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// The headers present in `headers` that its `Connection` header names
/// (`Connection: keep-alive` names a header that is rarely there).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for option in headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
    {
        let option = option.trim_ascii();
        if let Some(name) = headers
            .keys()
            .find(|k| k.as_str().as_bytes().eq_ignore_ascii_case(option))
        {
            named.push(name.clone());
        }
    }
    named
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

/// Appends the client's address to `X-Forwarded-For` and `Forwarded`.
pub fn add_forwarded(headers: &mut HeaderMap, peer: &Peer) {
    append_hop(headers, X_FORWARDED_FOR, &peer.xff, || peer.ip.to_string());
    append_hop(headers, FORWARDED, &peer.forwarded, || forwarded_element(peer.ip));
}

/// Sets `name` to its earlier hops' values, all of them in order, then
/// ours; or to `own` (made once per connection) when there were none. One
/// lookup either way.
fn append_hop(
    headers: &mut HeaderMap,
    name: HeaderName,
    own: &Option<HeaderValue>,
    element: impl Fn() -> String,
) {
    match headers.entry(name) {
        Entry::Vacant(slot) => {
            if let Some(own) = own {
                slot.insert(own.clone());
            }
        }
        Entry::Occupied(mut slot) => {
            let mut joined = Vec::new();
            for earlier in slot.iter() {
                joined.extend_from_slice(earlier.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(element().as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                slot.insert(value);
            }
        }
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

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("expect", "100-continue"),
            ("fencing-token", "5"),
            ("host", "store"),
        ]);
        strip_hop_by_hop(&mut map, true);
        let mut names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["fencing-token", "host", "te"]);
        assert_eq!(map["te"], "trailers");
    }

    #[test]
    fn connection_may_not_name_the_token_or_host() {
        let token = HeaderName::from_static("fencing-token");
        assert!(check_connection(&headers(&[("connection", "close")]), &token).is_ok());
        assert!(check_connection(&headers(&[("connection", "keep-alive, Fencing-Token")]), &token).is_err());
        assert!(check_connection(
            &headers(&[("connection", "close"), ("connection", "host")]),
            &token
        )
        .is_err());
    }

    #[test]
    fn forwarded_headers_append() {
        let mut map = headers(&[("x-forwarded-for", "10.0.0.1")]);
        add_forwarded(&mut map, &Peer::new("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(map["forwarded"], "for=127.0.0.1;proto=http");
        let mut map = HeaderMap::new();
        add_forwarded(&mut map, &Peer::new("[::1]:5000".parse().unwrap()));
        assert_eq!(map["x-forwarded-for"], "::1");
        assert_eq!(map["forwarded"], "for=\"[::1]\";proto=http");
        let mut map = headers(&[("forwarded", "for=10.0.0.1")]);
        add_forwarded(&mut map, &Peer::new("[::1]:5000".parse().unwrap()));
        assert_eq!(map["forwarded"], "for=10.0.0.1, for=\"[::1]\";proto=http");
        // Two lines of earlier hops are one list (RFC 9110 §5.3): none is lost.
        let mut map = headers(&[("x-forwarded-for", "10.0.0.1"), ("x-forwarded-for", "10.0.0.2")]);
        add_forwarded(&mut map, &Peer::new("127.0.0.1:5000".parse().unwrap()));
        let all: Vec<_> = map.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["10.0.0.1, 10.0.0.2, 127.0.0.1"]);
    }
}
