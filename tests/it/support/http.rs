//! HTTP clients for tests: reqwest for ordinary requests, raw sockets for
//! exact bytes (malformed requests reqwest would fix up).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Default bound for [`raw_request`].
pub const RAW_TIMEOUT: Duration = Duration::from_secs(5);

/// A reqwest client that never uses a proxy from the environment, with a
/// 30 s overall timeout per request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client")
}

/// `LINE HTTP/1.1`, `Host`, the given header lines, `Content-Length`, body:
/// a request's exact bytes for [`raw_request`].
pub fn request_bytes(line: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut s = format!("{line} HTTP/1.1\r\nHost: store.test\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.into_bytes()
}

/// Write `bytes` exactly as given to `addr` ("127.0.0.1:P" or
/// "http://127.0.0.1:P") and read until the first final (non-1xx) response
/// is complete, the server closes, or 5 s pass. Returns what was read,
/// interim responses included. Panics if it cannot connect.
pub fn raw_request(addr: &str, bytes: &[u8]) -> String {
    raw_request_timeout(addr, bytes, RAW_TIMEOUT)
}

/// [`raw_request`] with its own bound.
pub fn raw_request_timeout(addr: &str, bytes: &[u8], timeout: Duration) -> String {
    let buf = try_raw(addr, bytes, timeout, false).unwrap_or_else(|e| panic!("raw_request to {addr}: {e}"));
    String::from_utf8_lossy(&buf).into_owned()
}

/// Like [`raw_request`] but reads until the server closes or `timeout`
/// passes, e.g. for pipelined requests.
pub fn raw_request_until_close(addr: &str, bytes: &[u8], timeout: Duration) -> String {
    let buf = try_raw(addr, bytes, timeout, true).unwrap_or_else(|e| panic!("raw_request to {addr}: {e}"));
    String::from_utf8_lossy(&buf).into_owned()
}

/// A blocking `GET path` with `Connection: close`; errors on connect
/// failure or when no complete response arrives within `timeout`.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> io::Result<RawResponse> {
    let host = strip_scheme(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let buf = try_raw(addr, req.as_bytes(), timeout, false)?;
    if response_end(&buf, false).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("incomplete response: {:?}", String::from_utf8_lossy(&buf)),
        ));
    }
    Ok(parse_response(&String::from_utf8_lossy(&buf)))
}

fn strip_scheme(addr: &str) -> &str {
    let a = addr.strip_prefix("http://").unwrap_or(addr);
    a.split('/').next().unwrap_or(a)
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    strip_scheme(addr)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))
}

fn try_raw(addr: &str, bytes: &[u8], timeout: Duration, until_close: bool) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&resolve(addr)?, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    // The server may answer and close before reading everything (431, a
    // refusal with `Connection: close`): a failed write still gets read.
    let _ = stream.write_all(bytes);
    let head = bytes.starts_with(b"HEAD ");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if !until_close && response_end(&buf, head).is_some() {
            return Ok(buf);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(buf);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Timeout or reset: return what arrived.
            Err(_) => return Ok(buf),
        }
    }
}

/// A parsed HTTP/1.1 response (the first final one).
#[derive(Debug, Clone, Default)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when `Transfer-Encoding: chunked`.
    pub body: String,
    /// The interim (1xx) status codes that came before it.
    pub interim: Vec<u16>,
}

impl RawResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Parse what [`raw_request`] returned. Panics when there is no status
/// line; a truncated body is returned as far as it goes.
pub fn parse_response(text: &str) -> RawResponse {
    let mut rest = text;
    let mut interim = Vec::new();
    loop {
        let (head, after) = rest
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response head in {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?} in {text:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        if (100..200).contains(&status) && status != 101 {
            interim.push(status);
            rest = after;
            continue;
        }
        let mut resp = RawResponse {
            status,
            headers,
            body: String::new(),
            interim,
        };
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        resp.body = if chunked {
            dechunk(after)
        } else if let Some(len) = resp.header("content-length").and_then(|v| v.parse().ok()) {
            after.get(..len).unwrap_or(after).to_string()
        } else {
            after.to_string()
        };
        return resp;
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size_line, after)) = s.split_once("\r\n") {
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        if size == 0 {
            break;
        }
        out.push_str(after.get(..size).unwrap_or(after));
        s = after.get(size + 2..).unwrap_or("");
    }
    out
}

/// For test stores: takes the first complete request head off `buf` and
/// returns it, request line first ("PUT /x HTTP/1.1\r\n..."); `None`
/// until a head is complete.
pub fn take_request_head(buf: &mut Vec<u8>) -> Option<String> {
    let end = find(buf, b"\r\n\r\n")?;
    let head: Vec<u8> = buf.drain(..end + 4).collect();
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The end of the first final response in `buf`, if it is complete.
fn response_end(buf: &[u8], head_request: bool) -> Option<usize> {
    let mut start = 0;
    loop {
        let head_end = start + find(&buf[start..], b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&buf[start..head_end]).to_ascii_lowercase();
        let status: u16 = head.split(' ').nth(1)?.trim().parse().ok()?;
        if (100..200).contains(&status) && status != 101 {
            start = head_end;
            continue;
        }
        if head_request || status == 101 || status == 204 || status == 304 {
            return Some(head_end);
        }
        let header = |name: &str| {
            head.split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
        };
        if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            return chunked_end(&buf[head_end..]).map(|n| head_end + n);
        }
        if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            return (buf.len() >= head_end + len).then_some(head_end + len);
        }
        return None; // delimited by close
    }
}

fn chunked_end(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    loop {
        let line_end = pos + find(&buf[pos..], b"\r\n")?;
        let line = String::from_utf8_lossy(&buf[pos..line_end]);
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            if buf[pos..].starts_with(b"\r\n") {
                return Some(pos + 2);
            }
            return find(&buf[pos..], b"\r\n\r\n").map(|n| pos + n + 4);
        }
        pos += size + 2;
        if pos > buf.len() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_complete_responses() {
        let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(response_end(cl, false), Some(cl.len()));
        assert_eq!(response_end(&cl[..cl.len() - 1], false), None);
        let ch = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        assert_eq!(response_end(ch, false), Some(ch.len()));
        let r = parse_response(std::str::from_utf8(ch).unwrap());
        assert_eq!((r.status, r.body.as_str(), r.interim), (200, "ok", vec![100]));
    }
}
