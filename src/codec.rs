//! HTTP/1.1 on the wire to the store: the request head fencegate writes,
//! the framing of its body, and the parsing of the store's answer (RFC
//! 9112). Pure functions over buffers; the I/O is in [`crate::pool`] and
//! [`crate::pipeline`].
//!
//! Written for one peer and one job, so it does less than a general
//! client: it treats every message it cannot frame for certain as the end
//! of the connection, and refuses a head it cannot read rather than
//! guessing. Pipelining is [`crate::pipeline`]'s: it reads a lane's
//! answers one after another with these same functions. Parsing is
//! httparse's, the parser hyper uses.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, StatusCode, Version};

use crate::hop;

/// The longest response head (or chunked trailer section) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields a response head (or trailer section) may have.
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// How the store's answer broke the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// A head (or trailer section) over [`MAX_HEAD_BYTES`].
    #[error("the response head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// A head httparse or `http` refused.
    #[error("the response head is malformed: {0}")]
    Malformed(String),
    /// A Content-Length that is not one decimal length.
    #[error("the response has an invalid Content-Length")]
    BadContentLength,
    /// A chunk-size line or chunk end that is not RFC 9112's.
    #[error("the response body has a malformed chunk")]
    BadChunk,
    /// The connection ended inside a body that had a length or chunks.
    #[error("the store closed the connection before the end of the response body")]
    Truncated,
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the store closes the connection (responses only).
    UntilClose,
}

/// The framing fencegate gives a request: the body's length where it is
/// known, else chunks. A body known to be empty gets no framing header
/// unless the client sent one or the method is one that carries a body.
pub fn request_framing(method: &Method, exact: Option<u64>, had_length: bool) -> Framing {
    match exact {
        Some(0) if !had_length && !matches!(*method, Method::PUT | Method::POST | Method::PATCH) => {
            Framing::Empty
        }
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    }
}

/// Appends a request head to `out`, with the header lines `fields`
/// ([`crate::hop::RequestHop::fields`]). Framing headers among them are
/// ignored: `framing` decides them, so the head can never disagree with
/// the bytes that follow.
pub fn encode_request_head<'h>(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    fields: impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    framing: Framing,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in fields {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// The line that opens a chunk of `len` bytes.
pub fn chunk_header(len: usize) -> Bytes {
    Bytes::from(format!("{len:x}\r\n"))
}

/// The last chunk and the trailer section that ends a chunked body.
pub fn chunked_end(trailers: Option<&HeaderMap>) -> Bytes {
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A response head from the store.
#[derive(Debug)]
pub struct ResponseHead {
    /// Its status (never 1xx other than 101: those are skipped).
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// Its end-to-end fields: the hop-by-hop ones (RFC 9110 §7.6.1), those
    /// its `Connection` names, and a `Content-Length` that does not frame
    /// the body are consumed here.
    pub headers: HeaderMap,
    /// How its body is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another exchange afterwards.
    pub keep_alive: bool,
}

/// What a head's framing and connection fields say, gathered as the
/// fields are read.
#[derive(Default)]
struct HopFields {
    /// The one value of the `Content-Length` lines, if any were given.
    length: Option<Result<u64, CodecError>>,
    /// The field was given as more than one value (`5, 5`, or two lines).
    length_repeated: bool,
    /// `Transfer-Encoding` was given; `chunked` if its last coding is;
    /// `other_coding` if any is not `chunked`.
    has_coding: bool,
    chunked: bool,
    other_coding: bool,
    /// What `Connection` says. Read before the other fields, so those it
    /// names are left out in order (a removal afterwards would move the
    /// last field into the gap).
    connection: hop::ConnectionOptions,
    /// `Keep-Alive`'s `max`, if it gave one.
    keep_alive_max: Option<u64>,
}

impl HopFields {
    /// Takes note of one field; whether it stays out of the map: a
    /// hop-by-hop field (`Connection` among them), or one `Connection`
    /// names.
    fn read(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        let hop_by_hop = match name.as_str() {
            "content-length" => {
                self.length_repeated |= self.length.is_some() || value.contains(&b',');
                if !matches!(self.length, Some(Err(_))) {
                    self.length = Some(content_length(value, self.length.take()));
                }
                false
            }
            "transfer-encoding" => {
                self.has_coding = true;
                for coding in hop::list_items(value) {
                    self.chunked = coding.eq_ignore_ascii_case(b"chunked");
                    self.other_coding |= !self.chunked;
                }
                true
            }
            "keep-alive" => {
                // Given twice, the smaller: a lane that retires early
                // costs a connection, one that retires late loses writes.
                self.keep_alive_max = match (keep_alive_max(value), self.keep_alive_max) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                true
            }
            other => hop::is_hop_by_hop_lower(other),
        };
        hop_by_hop || self.connection.names(name)
    }
}

/// What reading one connection's answers keeps from one to the next.
#[derive(Default)]
pub struct Fields {
    /// The previous answer's field names as spelled, and as names, in
    /// their order. A store sends the same ones every time, and comparing
    /// the bytes costs a fraction of making the name anew
    /// (`HeaderName::from_bytes` lowercases and looks it up).
    names: Vec<(Vec<u8>, HeaderName)>,
    /// The map the next answer's fields go into (see [`Fields::lend`]).
    map: HeaderMap,
    /// The fields the last answer's `Connection` named (rarely any): its
    /// trailers lose them too ([`BodyDecoder::decode`]). Kept here rather
    /// than in the head or the decoder, which are moved whole through the
    /// exchange's futures, where each byte more costs every answer.
    connection_named: Vec<HeaderName>,
    /// The last answer's `Keep-Alive: max` (see [`Fields::keep_alive_max`]).
    keep_alive_max: Option<u64>,
}

/// The `max` of a `Keep-Alive` field (`timeout=5, max=100`, RFC 2068
/// §19.7.1.1), if it has a valid one.
fn keep_alive_max(value: &[u8]) -> Option<u64> {
    hop::list_items(value).find_map(|item| {
        let (name, n) = item.split_at(item.iter().position(|b| *b == b'=')?);
        if !name.trim_ascii().eq_ignore_ascii_case(b"max") {
            return None;
        }
        let n = n[1..].trim_ascii();
        let n = n
            .strip_prefix(b"\"")
            .and_then(|n| n.strip_suffix(b"\""))
            .unwrap_or(n);
        std::str::from_utf8(n).ok()?.parse().ok()
    })
}

impl Fields {
    /// How many more requests the store said it takes on this connection
    /// in the last answer's `Keep-Alive` (Apache httpd sends it), if it did:
    /// a pipelining client stops sending before the store closes.
    pub fn keep_alive_max(&self) -> Option<u64> {
        self.keep_alive_max
    }

    /// The fields the last answer's `Connection` named, beyond the
    /// hop-by-hop ones: its trailers lose them too.
    pub fn connection_named(&self) -> &[HeaderName] {
        &self.connection_named
    }

    /// Gives the next answer `map` to fill, emptied: the request's map,
    /// whose head is written, so one map per connection goes round
    /// between hyper and the store instead of two allocated per request.
    pub fn lend(&mut self, mut map: HeaderMap) {
        map.clear();
        self.map = map;
    }

    /// The name of the `i`-th field, spelled `raw`.
    fn name(&mut self, i: usize, raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
        if let Some((spelled, name)) = self.names.get(i) {
            if spelled == raw {
                return Ok(name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw)?;
        if let Some((spelled, known)) = self.names.get_mut(i) {
            spelled.clear();
            spelled.extend_from_slice(raw);
            *known = name.clone();
        } else {
            self.names.push((raw.to_vec(), name.clone()));
        }
        Ok(name)
    }
}

/// Parses the response head at the start of `buf`, and removes it from
/// `buf`. `None` while the head is incomplete. `method` is the request's:
/// the answer to a HEAD has no body, whatever its head says. `fields` are
/// the connection's, for the next answer to reuse.
pub fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
    fields: &mut Fields,
) -> Result<Option<ResponseHead>, CodecError> {
    // Uninitialized slots: 100 of them zeroed for every answer cost more
    // than parsing the three or four it has.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(CodecError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(CodecError::Malformed(format!(
                "more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return Err(CodecError::Malformed(e.to_string())),
    };
    if len > MAX_HEAD_BYTES {
        return Err(CodecError::HeadTooLarge);
    }
    let status = StatusCode::from_u16(response.code.unwrap_or(0))
        .map_err(|_| CodecError::Malformed("invalid status code".into()))?;
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // The values are slices of a copy of the head: the read buffer stays
    // the connection's alone, so its room is reused for the next answer
    // (splitting the head off shared it, and the next read allocated).
    let head = Bytes::copy_from_slice(&buf[..len]);
    let mut hop_fields = HopFields::default();
    for field in response.headers.iter() {
        if field.name.eq_ignore_ascii_case("connection") {
            hop_fields.connection.read(field.value);
        }
    }
    let mut headers = std::mem::take(&mut fields.map);
    headers.reserve(response.headers.len());
    for (i, field) in response.headers.iter().enumerate() {
        let name = fields.name(i, field.name.as_bytes()).map_err(|_| {
            CodecError::Malformed(format!("invalid header name `{}`", field.name.escape_debug()))
        })?;
        if hop_fields.read(&name, field.value) {
            continue;
        }
        let start = field.value.as_ptr() as usize - buf.as_ptr() as usize;
        let value = HeaderValue::from_maybe_shared(head.slice(start..start + field.value.len()))
            .map_err(|_| CodecError::Malformed(format!("invalid value of header `{name}`")))?;
        headers.append(name, value);
    }
    buf.advance(len);
    if version == Version::HTTP_10 && hop_fields.has_coding {
        // RFC 9112 §6.1: faulty framing, whatever else the head says.
        return Err(CodecError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 response".into(),
        ));
    }
    // A length given as a list, or one that is no length at all, as
    // `Some(the one length, if there is one)`.
    let unusual_length = match &hop_fields.length {
        Some(Ok(n)) if hop_fields.length_repeated => Some(Some(*n)),
        Some(Err(_)) => Some(None),
        _ => None,
    };
    let (framing, framing_sure) = response_framing(status, method, &mut hop_fields)?;
    if hop_fields.other_coding && framing != Framing::Empty {
        // Only `chunked` is undone here, and hyper would frame the answer
        // anew: any other coding would reach the client as if it were the
        // content. An answer without a body (HEAD, 204, 304) has nothing
        // coded, and its coding only describes what a GET would get.
        return Err(CodecError::Malformed(
            "a transfer coding other than chunked, which fencegate does not pass on".into(),
        ));
    }
    if !framing_sure {
        // Read by its Transfer-Encoding (RFC 9112 §6.3): the length must
        // not reach the client, which would frame the body by it.
        headers.remove(CONTENT_LENGTH);
    } else if let Some(length) = unusual_length {
        // `5, 5` stands for one length, but a client may refuse it (RFC
        // 9110 §8.6): it gets the one value. An invalid length can reach
        // this point only on a bodiless answer, whose length frames
        // nothing: it is dropped rather than passed on.
        match length {
            Some(n) => {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
            None => {
                headers.remove(CONTENT_LENGTH);
            }
        }
    }
    // RFC 9112 §9.3: `close` ends the connection whatever else
    // `Connection` says; HTTP/1.0 persists only with `keep-alive`.
    let persistent =
        !hop_fields.connection.close && (version != Version::HTTP_10 || hop_fields.connection.keep_alive);
    // After a 101 the connection speaks another protocol.
    let keep_alive = framing_sure
        && framing != Framing::UntilClose
        && status != StatusCode::SWITCHING_PROTOCOLS
        && persistent;
    // Swapped, not assigned: the previous answer's names (rarely any) go
    // with the rest of `hop_fields`, with no drop of their own here.
    std::mem::swap(&mut fields.connection_named, &mut hop_fields.connection.named);
    fields.keep_alive_max = hop_fields.keep_alive_max;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// How the body of a response is delimited (RFC 9112 §6.3), and whether
/// that is beyond doubt (a response with both Transfer-Encoding and
/// Content-Length is read by the former, and its connection not reused).
fn response_framing(
    status: StatusCode,
    method: &Method,
    fields: &mut HopFields,
) -> Result<(Framing, bool), CodecError> {
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
    {
        return Ok((Framing::Empty, true));
    }
    if fields.has_coding {
        let framing = if fields.chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
        return Ok((framing, fields.length.is_none()));
    }
    match fields.length.take() {
        Some(length) => length.map(|n| (Framing::Length(n), true)),
        None => Ok((Framing::UntilClose, true)),
    }
}

/// The one length all Content-Length values agree on, `earlier` being
/// the previous lines' (RFC 9110 §8.6: a list of identical values may
/// stand for one; anything else is an error).
fn content_length(value: &[u8], earlier: Option<Result<u64, CodecError>>) -> Result<u64, CodecError> {
    let mut length = earlier.transpose()?;
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(CodecError::BadContentLength);
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(CodecError::BadContentLength);
        }
        length = Some(n);
    }
    length.ok_or(CodecError::BadContentLength)
}

/// What a body decoder found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section of a chunked body; the body is over.
    Trailers(HeaderMap),
    /// The body is over.
    End,
    /// More bytes are needed.
    More,
}

/// Takes a response body out of a connection's read buffer.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes left of a sized body.
    Length(u64),
    /// The next chunk-size line.
    ChunkSize,
    /// This many bytes left of the current chunk.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk.
    Trailers,
    UntilClose,
    Done,
}

impl BodyDecoder {
    /// A decoder for a body framed by `framing`.
    pub fn new(framing: Framing) -> BodyDecoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        BodyDecoder { state }
    }

    /// Whether the body is over.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes left of a sized body, if it is one.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body from `buf`, removed from it. Its
    /// trailers lose the hop-by-hop fields and `connection_named`, the
    /// fields its head's `Connection` named ([`Fields::connection_named`]).
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        connection_named: &[HeaderName],
    ) -> Result<Decoded, CodecError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) => {
                    let Some((data, rest)) = take_up_to(buf, left) else {
                        return Ok(Decoded::More);
                    };
                    self.state = if rest == 0 {
                        State::Done
                    } else {
                        State::Length(rest)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, _)))
                        if used > MAX_CHUNK_LINE || !is_chunk_size_line(&buf[..used]) =>
                    {
                        return Err(CodecError::BadChunk)
                    }
                    Ok(httparse::Status::Complete((used, 0))) => {
                        let _ = buf.split_to(used);
                        self.state = State::Trailers;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = buf.split_to(used);
                        self.state = State::ChunkData(size);
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(CodecError::BadChunk)
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                    Err(_) => return Err(CodecError::BadChunk),
                },
                State::ChunkData(left) => {
                    let Some((data, rest)) = take_up_to(buf, left) else {
                        return Ok(Decoded::More);
                    };
                    self.state = if rest == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(rest)
                    };
                    return Ok(Decoded::Data(data));
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(CodecError::BadChunk);
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => return self.trailers(buf, connection_named),
            }
        }
    }

    fn trailers(
        &mut self,
        buf: &mut BytesMut,
        connection_named: &[HeaderName],
    ) -> Result<Decoded, CodecError> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (used, fields) = match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete(done)) => done,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(CodecError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(Decoded::More),
            Err(e) => return Err(CodecError::Malformed(format!("trailers: {e}"))),
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for field in fields.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| CodecError::Malformed("invalid trailer name".into()))?;
            // Hop-by-hop in a trailer as in the head (RFC 9110 §7.6.1):
            // hyper writes every trailer the head's `Trailer` declares.
            if hop::hop_by_hop(&name) || connection_named.contains(&name) {
                continue;
            }
            let value = HeaderValue::from_bytes(field.value)
                .map_err(|_| CodecError::Malformed(format!("invalid value of trailer `{name}`")))?;
            trailers.append(name, value);
        }
        let _ = buf.split_to(used);
        self.state = State::Done;
        Ok(if trailers.is_empty() {
            Decoded::End
        } else {
            Decoded::Trailers(trailers)
        })
    }

    /// What the end of the connection means at this point of the body.
    pub fn at_eof(&mut self) -> Result<Decoded, CodecError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(Decoded::End)
            }
            _ => Err(CodecError::Truncated),
        }
    }
}

/// Whether a chunk-size line httparse took, CRLF included, is RFC 9112's
/// (§7.1): it starts with the size, and its extensions hold no bare LF.
/// httparse takes a line without a size (`\r\n`, `;ext\r\n`) as the last
/// chunk, which would end the body where the store did not, and the
/// connection would go back to the pool with the rest of the answer still
/// to come; hyper's own decoder refuses both.
fn is_chunk_size_line(line: &[u8]) -> bool {
    line[0].is_ascii_hexdigit() && !line[..line.len() - 2].contains(&b'\n')
}

/// Up to `left` bytes from the front of `buf`, and how many of `left`
/// remain after them; `None` while `buf` is empty.
fn take_up_to(buf: &mut BytesMut, left: u64) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let take = left.min(buf.len() as u64);
    Some((buf.split_to(take as usize).freeze(), left - take))
}

/// Makes room in `buf` for at least one more read.
pub fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8 * 1024);
    }
    debug_assert!(buf.remaining_mut() > 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str, method: Method) -> Result<Option<ResponseHead>, CodecError> {
        parse_response_head(&mut BytesMut::from(bytes), &method, &mut Fields::default())
    }

    fn framing(bytes: &str) -> (Framing, bool) {
        let h = head(bytes, Method::GET).unwrap().unwrap();
        (h.framing, h.keep_alive)
    }

    #[test]
    fn request_heads_carry_exactly_one_framing_of_fencegates_choosing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("store"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert("fencing-token", HeaderValue::from_static("7"));
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::PUT,
            "/a?b",
            headers.iter(),
            Framing::Length(12),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "PUT /a?b HTTP/1.1\r\nhost: store\r\nfencing-token: 7\r\ncontent-length: 12\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::POST,
            "/",
            HeaderMap::new().iter(),
            Framing::Chunked,
        );
        assert_eq!(out, b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(request_framing(&Method::GET, Some(0), false), Framing::Empty);
        assert_eq!(request_framing(&Method::GET, Some(0), true), Framing::Length(0));
        assert_eq!(request_framing(&Method::PUT, Some(0), false), Framing::Length(0));
        assert_eq!(request_framing(&Method::DELETE, None, false), Framing::Chunked);
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }

    #[test]
    fn response_heads_are_framed_by_rfc_9112() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
            (Framing::Chunked, true)
        );
        // Both: chunked wins, and the connection is not trusted again.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"),
            (Framing::Chunked, false)
        );
        // Other codings are not undone, so the answer is refused rather
        // than passed on as if the coded bytes were the content.
        for coded in ["gzip", "gzip, chunked", "chunked, gzip"] {
            let answer = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {coded}\r\n\r\n");
            assert!(head(&answer, Method::GET).is_err(), "{coded}");
        }
        // Without a body there is nothing coded: the answer goes through.
        for (text, method) in [
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                Method::HEAD,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                Method::GET,
            ),
            (
                "HTTP/1.1 204 No Content\r\ntransfer-encoding: identity\r\n\r\n",
                Method::DELETE,
            ),
        ] {
            let h = head(text, method.clone()).unwrap().unwrap();
            assert_eq!(h.framing, Framing::Empty, "{method} {text:?}");
        }
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Framing::UntilClose, false));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
            (Framing::Length(0), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"),
            (Framing::Length(0), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 0\r\nConnection: Keep-Alive\r\n\r\n"),
            (Framing::Length(0), true)
        );
        assert_eq!(
            framing("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"),
            (Framing::Empty, false)
        );
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        // Lengths that are not one value reach the client as one value,
        // or, where they frame nothing and are invalid, not at all.
        let length_sent = |text: &str, method: Method| -> Vec<String> {
            let h = head(text, method).unwrap().unwrap();
            let values = h.headers.get_all(CONTENT_LENGTH).iter();
            values.map(|v| v.to_str().unwrap().to_owned()).collect()
        };
        assert_eq!(
            length_sent("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", Method::GET),
            ["5"]
        );
        assert_eq!(
            length_sent(
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
                Method::GET
            ),
            ["5"]
        );
        assert_eq!(
            length_sent("HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n", Method::HEAD),
            ["7"]
        );
        assert!(length_sent("HTTP/1.1 200 OK\r\ncontent-length: 7, 8\r\n\r\n", Method::HEAD).is_empty());
        assert!(length_sent(
            "HTTP/1.1 204 No Content\r\ncontent-length: x\r\n\r\n",
            Method::GET
        )
        .is_empty());
        assert_eq!(
            length_sent("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::GET),
            ["5"]
        );
        for bad in ["5, 6", "-1", "", "0x5", "99999999999999999999"] {
            let text = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert_eq!(
                head(&text, Method::GET).unwrap_err(),
                CodecError::BadContentLength,
                "{bad}"
            );
        }
    }

    /// RFC 9112 §9.3: a `close` option ends the connection whatever else
    /// `Connection` says, in HTTP/1.0 too, where `keep-alive` alone keeps
    /// it (hyper's client reads it so: a later `keep-alive` must not undo
    /// an earlier `close`).
    #[test]
    fn a_close_option_ends_the_connection_whatever_else_connection_says() {
        for text in [
            "HTTP/1.0 200 OK\r\ncontent-length: 0\r\nConnection: keep-alive, close\r\n\r\n",
            "HTTP/1.0 200 OK\r\ncontent-length: 0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
            "HTTP/1.0 200 OK\r\ncontent-length: 0\r\nConnection: Keep-Alive\r\nConnection: Close\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
        ] {
            assert_eq!(framing(text), (Framing::Length(0), false), "{text:?}");
        }
    }

    /// The fields of `text`, parsed with `fields`, as (name, value) pairs.
    fn fields_of(text: &str, fields: &mut Fields) -> Vec<(String, String)> {
        let head = parse_response_head(&mut BytesMut::from(text), &Method::GET, fields)
            .unwrap()
            .unwrap();
        head.headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn a_connections_answers_get_their_own_names_whatever_the_last_one_sent() {
        let mut fields = Fields::default();
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(
            fields_of(
                "HTTP/1.1 200 OK\r\nServer: a\r\nX-Thing: 1\r\nContent-Length: 0\r\n\r\n",
                &mut fields
            ),
            pairs(&[("server", "a"), ("x-thing", "1"), ("content-length", "0")])
        );
        // The same names in another case, then names in other places, a
        // new one and one fewer: each answer has exactly its own.
        assert_eq!(
            fields_of(
                "HTTP/1.1 200 OK\r\nSERVER: b\r\nx-thing: 2\r\ncontent-length: 0\r\n\r\n",
                &mut fields
            ),
            pairs(&[("server", "b"), ("x-thing", "2"), ("content-length", "0")])
        );
        assert_eq!(
            fields_of(
                "HTTP/1.1 200 OK\r\nX-Thing: 3\r\nServer: c\r\nDate: d\r\nContent-Length: 0\r\n\r\n",
                &mut fields
            ),
            pairs(&[
                ("x-thing", "3"),
                ("server", "c"),
                ("date", "d"),
                ("content-length", "0")
            ])
        );
        assert_eq!(
            fields_of("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &mut fields),
            pairs(&[("content-length", "0")])
        );
    }

    #[test]
    fn a_lent_map_comes_back_with_the_answers_fields_only() {
        let mut request = HeaderMap::new();
        request.insert("x-request", HeaderValue::from_static("1"));
        request.insert("fencing-token", HeaderValue::from_static("7"));
        let mut fields = Fields::default();
        fields.lend(request);
        assert_eq!(
            fields_of(
                "HTTP/1.1 200 OK\r\nX-Answer: 2\r\nContent-Length: 0\r\n\r\n",
                &mut fields
            ),
            [
                ("x-answer".to_owned(), "2".to_owned()),
                ("content-length".to_owned(), "0".to_owned())
            ]
        );
    }

    #[test]
    fn a_head_is_taken_whole_from_the_buffer_and_its_values_kept() {
        let mut buf =
            BytesMut::from("HTTP/1.1 201 Created\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 3\r\n\r\nabcHTTP");
        assert!(parse_response_head(
            &mut BytesMut::from("HTTP/1.1 201 Cre"),
            &Method::GET,
            &mut Fields::default()
        )
        .unwrap()
        .is_none());
        let h = parse_response_head(&mut buf, &Method::PUT, &mut Fields::default())
            .unwrap()
            .unwrap();
        assert_eq!(h.status, StatusCode::CREATED);
        let values: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&buf[..], b"abcHTTP");
        let mut decoder = BodyDecoder::new(h.framing);
        assert_eq!(
            decoder.decode(&mut buf, &[]).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(decoder.decode(&mut buf, &[]).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"HTTP", "bytes after the body stay in the buffer");
    }

    /// `Keep-Alive: max` is read from each answer (the field itself is
    /// hop-by-hop and goes no further), and forgotten on one without it.
    #[test]
    fn keep_alive_max_is_read_from_each_answer() {
        let mut fields = Fields::default();
        let mut max = |text: &str| {
            let h = parse_response_head(&mut BytesMut::from(text), &Method::PUT, &mut fields)
                .unwrap()
                .unwrap();
            assert!(h.headers.get("keep-alive").is_none(), "{text}");
            fields.keep_alive_max()
        };
        let ok = "HTTP/1.1 204 No Content\r\n";
        for (fields, expected) in [
            ("Keep-Alive: timeout=5, max=100\r\n", Some(100)),
            ("", None),
            ("keep-alive: MAX = \"7\" , timeout=5\r\n", Some(7)),
            ("Keep-Alive: timeout=5\r\nKeep-Alive: max=2\r\n", Some(2)),
            // Given twice, the smaller.
            ("Keep-Alive: max=2\r\nKeep-Alive: max=9\r\n", Some(2)),
            ("Keep-Alive: max=9\r\nKeep-Alive: max=2\r\n", Some(2)),
        ] {
            assert_eq!(max(&format!("{ok}{fields}\r\n")), expected, "{fields}");
        }
        for bad in ["max", "max=", "max=-1", "max=x", "maximum=3", "timeout=5"] {
            assert_eq!(max(&format!("{ok}Keep-Alive: {bad}\r\n\r\n")), None, "{bad}");
        }
    }

    #[test]
    fn a_heads_hop_by_hop_fields_are_consumed_and_the_rest_kept_in_order() {
        let h = head(
            "HTTP/1.1 200 OK\r\nx-secret: 1\r\nServer: s\r\nConnection: keep-alive, X-Secret\r\n\
             Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\n\
             Proxy-Authenticate: Basic\r\netag: \"e\"\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, true));
        let names: Vec<_> = h.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["server", "etag"]);
        // A length beside chunked coding does not frame the body, so it
        // does not reach the client either.
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(h.headers.is_empty());
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(h.headers[CONTENT_LENGTH], "5");
    }

    #[test]
    fn oversized_and_malformed_heads_are_refused() {
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&long, Method::GET).unwrap_err(), CodecError::HeadTooLarge);
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nx y: 1\r\n\r\n", Method::GET),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            head("HTTX/1.1 200 OK\r\n\r\n", Method::GET),
            Err(CodecError::Malformed(_))
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let text = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(head(&text, Method::GET), Err(CodecError::Malformed(_))));
    }

    /// Decodes `wire` fed in pieces of `step` bytes; the body and trailers.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), CodecError> {
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf, &[])? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::Trailers(t) => return Ok((body, Some(t), buf)),
                Decoded::End => return Ok((body, None, buf)),
                Decoded::More if fed < wire.len() => {
                    let to = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..to]);
                    fed = to;
                }
                Decoded::More => return decoder.at_eof().map(|_| (body, None, buf)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 9\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (body, trailers, rest) = dechunk(wire, step).unwrap();
            assert_eq!(body, b"hello world", "step {step}");
            assert_eq!(trailers.unwrap()["x-sum"], "9");
            assert!(
                b"NEXT".starts_with(&rest),
                "step {step}: only what follows the body is left"
            );
        }
        let (body, trailers, _) = dechunk(b"3\r\nabc\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!((body.as_slice(), trailers), (&b"abc"[..], None));
    }

    /// A trailer section loses what its head would have lost: the
    /// hop-by-hop fields and those the head's `Connection` names.
    #[test]
    fn trailers_lose_the_hop_by_hop_fields_of_their_head() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nConnection: X-Secret\r\ntransfer-encoding: chunked\r\n\r\n\
             0\r\nKeep-Alive: 1\r\nX-Secret: 2\r\nX-Sum: 3\r\nConnection: close\r\n\r\n",
        );
        let mut fields = Fields::default();
        let h = parse_response_head(&mut buf, &Method::GET, &mut fields)
            .unwrap()
            .unwrap();
        let mut decoder = BodyDecoder::new(h.framing);
        let Decoded::Trailers(trailers) = decoder.decode(&mut buf, fields.connection_named()).unwrap() else {
            panic!("no trailers");
        };
        let names: Vec<_> = trailers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-sum"]);
        // None left: the body simply ends.
        let mut buf = BytesMut::from("0\r\nKeep-Alive: 1\r\n\r\n");
        assert_eq!(
            BodyDecoder::new(Framing::Chunked).decode(&mut buf, &[]).unwrap(),
            Decoded::End
        );
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        assert_eq!(
            dechunk(b"3\r\nabcX\r\n0\r\n\r\n", 64).unwrap_err(),
            CodecError::BadChunk
        );
        assert_eq!(dechunk(b"zz\r\n", 64).unwrap_err(), CodecError::BadChunk);
        assert_eq!(
            dechunk(b"ffffffffffffffffff\r\n", 64).unwrap_err(),
            CodecError::BadChunk
        );
        assert_eq!(dechunk(b"5\r\nab", 64).unwrap_err(), CodecError::Truncated);
        // A chunk-size line must start with the size (RFC 9112 §7.1:
        // 1*HEXDIG): one without is no last chunk, and the bytes after it
        // are not the end of the answer. hyper's own decoder refuses both
        // ("missing size digit"), and a bare LF in an extension.
        for wire in [
            &b"3\r\nabc\r\n\r\n\r\n"[..],
            b"3\r\nabc\r\n;ext\r\n\r\n",
            b"\r\n\r\n",
            b"1;a\nb\r\nx\r\n0\r\n\r\n",
        ] {
            assert_eq!(
                dechunk(wire, 64).unwrap_err(),
                CodecError::BadChunk,
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(dechunk(long.as_bytes(), 64).unwrap_err(), CodecError::BadChunk);
    }

    #[test]
    fn a_sized_body_ends_short_only_as_an_error() {
        let mut decoder = BodyDecoder::new(Framing::Length(4));
        let mut buf = BytesMut::from("ab");
        assert_eq!(
            decoder.decode(&mut buf, &[]).unwrap(),
            Decoded::Data(Bytes::from_static(b"ab"))
        );
        assert_eq!(decoder.remaining(), Some(2));
        assert_eq!(decoder.at_eof().unwrap_err(), CodecError::Truncated);
        let mut until_close = BodyDecoder::new(Framing::UntilClose);
        assert_eq!(until_close.at_eof().unwrap(), Decoded::End);
    }
}
