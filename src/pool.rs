//! The connections to the store of one serving thread, kept open between
//! requests, and the exchange of one request on one of them. Each worker
//! has its own [`Pool`] (see [`crate::server`]), so its lock is never
//! contended, and a request, its connection and its response body are
//! driven by the request's own task: no task per connection, no channel
//! between the handler and the connection.
//!
//! A connection enters the pool only when its exchange is over in both
//! directions: the request written whole and the response read to its
//! end, with nothing more from the store. A checkout therefore never
//! waits behind another exchange (it would wait with no timeout, and a
//! lower write could reach the store after a raise). A connection that was
//! cut, failed, answered early while its request body was still being sent,
//! or was abandoned halfway is dropped, which closes it with a reset.
//! Idle connections are reused most recently used first; one the store
//! closed meanwhile, or one unused for `idle_timeout`, is dropped at
//! checkout (seen from the readiness the runtime already holds, no system
//! call) or by a sweep within a second ([`sweep`]).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::body::{BodyError, Exchange};
use crate::codec::{self, BodyDecoder, CodecError, Decoded, Framing, ResponseHead};
use crate::connector::{connect, ConnectError, KillHandle, Wire};
use crate::forward::UpstreamBody;
use crate::pipeline::WholeBody;

/// Most body bytes taken from the client ahead of the store, as hyper's
/// write buffer did: a body that is ready faster than the store takes it
/// waits in the client's socket beyond that. A request the store answers
/// while some of this is still queued was answered early, and its
/// connection is not reused; bytes already in the kernel cannot be told
/// apart from bytes the store read (a proxy that pooled such a connection
/// would make the next request wait behind them, bounded by
/// `request_timeout`).
const MAX_QUEUED: usize = 256 * 1024;

/// How often idle connections are checked for a close by the store: hyper
/// ended such a connection at once from its task; here nothing polls an
/// idle connection, so a sweep closes them (and expired ones) within this.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// One serving thread's connections to the store.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    /// Oldest first; checkouts take from the back.
    idle: Mutex<VecDeque<Idle>>,
    /// Whether the sweep task runs (started with the first connection,
    /// inside the serving thread's runtime).
    sweeping: std::sync::atomic::AtomicBool,
    host: String,
    port: u16,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A connection to the store, checked out for one exchange.
pub struct Conn {
    wire: Arc<Wire>,
    kill: KillHandle,
    /// What the store sent that was not taken yet.
    read: BytesMut,
    /// The request head's buffer, kept for its allocation.
    head: Vec<u8>,
    /// What reading the answers keeps from one to the next. Boxed: a
    /// connection is moved whole through the exchange's futures.
    fields: Box<codec::Fields>,
    reused: bool,
    /// Weak: the pool holds its idle connections.
    pool: Weak<Shared>,
    /// The one timer of the exchanges on this connection (the stall watch
    /// while a body is sent, then `request_timeout`), kept with the
    /// connection: moving a registered timer's deadline later is one
    /// atomic store, where a new timer each time was a registration and a
    /// removal in the runtime's timer wheel.
    timer: Pin<Box<Sleep>>,
}

impl Pool {
    /// A pool of connections to `host:port`.
    pub fn new(host: &str, port: u16, connect_timeout: Duration, idle_timeout: Duration) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                idle: Mutex::new(VecDeque::new()),
                sweeping: std::sync::atomic::AtomicBool::new(false),
                host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port,
                connect_timeout,
                idle_timeout,
            }),
        }
    }

    /// A connection ready to send: the most recently used idle one, or a
    /// new one. Never waits for a pooled connection, only for a new one
    /// (within `connect_timeout`).
    pub async fn checkout(&self) -> Result<Conn, ConnectError> {
        loop {
            let Some(idle) = self.shared.idle.lock().expect("pool lock").pop_back() else {
                break;
            };
            let mut conn = idle.conn;
            if conn.wire.is_reusable() && idle.since.elapsed() <= self.shared.idle_timeout {
                conn.reused = true;
                return Ok(conn);
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Conn, ConnectError> {
        let shared = &self.shared;
        if !shared.sweeping.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(shared)));
        }
        let (wire, kill) = connect(&shared.host, shared.port, shared.connect_timeout).await?;
        Ok(Conn {
            wire,
            kill,
            read: BytesMut::new(),
            head: Vec::new(),
            fields: Box::default(),
            reused: false,
            pool: Arc::downgrade(shared),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }
}

/// Drops idle connections the store closed (or sent anything on), and
/// those unused for `idle_timeout`, every [`SWEEP_PERIOD`], until the pool
/// is gone.
async fn sweep(pool: Weak<Shared>) {
    let mut ticks = tokio::time::interval(SWEEP_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(shared) = pool.upgrade() else {
            return;
        };
        let now = Instant::now();
        // Dropped outside the lock: closing a socket is a system call.
        let closed: VecDeque<Idle> = {
            let mut idle = shared.idle.lock().expect("pool lock");
            let (keep, closed): (VecDeque<Idle>, VecDeque<Idle>) =
                std::mem::take(&mut *idle).into_iter().partition(|i| {
                    now.duration_since(i.since) <= shared.idle_timeout && i.conn.wire.is_reusable()
                });
            *idle = keep;
            closed
        };
        drop(closed);
    }
}

/// How an exchange failed before the final response head.
#[derive(Debug)]
pub enum ExchangeError {
    /// Writing failed before any byte of the request was taken: the
    /// request may go on another connection.
    Unsent(io::Error),
    /// The request body from the client failed or was aborted.
    Body(BodyError),
    /// The connection failed or closed (the request may have arrived).
    Io(io::Error),
    /// The store closed the connection without answering.
    Closed,
    /// The store's answer broke HTTP/1.1.
    Protocol(CodecError),
}

impl Conn {
    /// A pipelined lane's connection handed to the answer it is reading
    /// ([`crate::pipeline`]): `read` holds what came of it after its head.
    /// Belongs to no pool: it closes when that answer's body ends.
    pub fn handed_over(
        wire: Arc<Wire>,
        kill: KillHandle,
        read: BytesMut,
        fields: Box<codec::Fields>,
    ) -> Conn {
        Conn {
            wire,
            kill,
            read,
            head: Vec::new(),
            fields,
            reused: true,
            pool: Weak::new(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    /// The switch that cuts this connection.
    pub fn kill_handle(&self) -> &KillHandle {
        &self.kill
    }

    /// Whether this connection served an earlier request: a request it
    /// could not even start may be retried on another.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// This connection's timer, set to expire `timeout` from now (the
    /// exchange sets it through [`Conn::exchange`]'s second half).
    #[cfg(test)]
    fn request_timer(&mut self, timeout: Duration) -> Pin<&mut Sleep> {
        let mut timer = self.timer.as_mut();
        timer.as_mut().reset(tokio::time::Instant::now() + timeout);
        timer
    }

    /// The request head's buffer, empty, for [`Outgoing::new`].
    pub fn take_head_buffer(&mut self) -> Vec<u8> {
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        head
    }

    /// Gives the answer of the next exchange `map` to fill: the map of
    /// the request just encoded (see [`codec::Fields::lend`]).
    pub fn lend_map(&mut self, map: HeaderMap) {
        self.fields.lend(map);
    }

    /// Sends `out` and reads the store's final response head (1xx
    /// answers are skipped). Returns with the request still being sent
    /// if the store answered first. Also returns this connection's timer,
    /// which the exchange does not use, for a watch to run beside it.
    pub fn exchange<'a>(
        &'a mut self,
        out: &'a mut Outgoing,
        method: &'a Method,
    ) -> (
        impl std::future::Future<Output = Result<ResponseHead, ExchangeError>> + 'a,
        Pin<&'a mut Sleep>,
    ) {
        let Conn {
            wire,
            read,
            fields,
            timer,
            ..
        } = self;
        let wire: &Wire = wire;
        // A write that fails after some of the request went out stops the
        // sending, not the reading: a store that answers early and then
        // resets (a 413, say) has its answer read and passed on, rather
        // than a 502 that calls its outcome unknown.
        let mut write_failed = None;
        let exchange = poll_fn(move |cx| {
            if write_failed.is_none() && !out.is_done() {
                match out.poll_send(cx, wire) {
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                    Poll::Ready(Err(ExchangeError::Io(e))) => write_failed = Some(e),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                }
            }
            loop {
                // Nothing to parse before the store sent something (the
                // first poll, and the wake-up for its answer).
                let parsed = if read.is_empty() {
                    Ok(None)
                } else {
                    codec::parse_response_head(read, method, fields)
                };
                match parsed {
                    Ok(Some(head)) if head.status.is_informational() && head.status.as_u16() != 101 => {
                        continue
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(ExchangeError::Protocol(e))),
                }
                match std::task::ready!(wire.poll_read(cx, read)) {
                    Ok(0) => {
                        return Poll::Ready(Err(write_failed
                            .take()
                            .map_or(ExchangeError::Closed, ExchangeError::Io)))
                    }
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Err(ExchangeError::Io(write_failed.take().unwrap_or(e)))),
                }
            }
        });
        (exchange, timer.as_mut())
    }

    /// The connection's socket.
    pub fn wire_ref(&self) -> &Wire {
        &self.wire
    }

    /// A handle on the connection's socket, for sending the rest of a
    /// request the store answered early (see [`Outgoing::poll_send`]).
    pub fn wire(&self) -> Arc<Wire> {
        self.wire.clone()
    }

    /// The response body that follows `head`, read from this connection.
    /// `reusable`: whether the request was sent whole, so the connection
    /// may go back to the pool at the body's end. `out`'s head buffer
    /// returns to the connection.
    pub fn into_body(self, head: &ResponseHead, reusable: bool) -> StoreBody {
        let mut body = ConnBody {
            decoder: BodyDecoder::new(head.framing),
            reusable: reusable && head.keep_alive,
            conn: None,
        };
        if body.decoder.is_done() {
            // hyper's server may never poll a body that is over.
            self.recycle_if(body.reusable);
        } else {
            body.conn = Some(self);
        }
        StoreBody::Conn(body)
    }

    /// Keeps an `Outgoing`'s head buffer for the next exchange.
    pub fn reclaim(&mut self, mut out: Outgoing) {
        self.head = std::mem::take(&mut out.head);
        out.head_at = 0;
    }

    /// Offers the connection back if `reusable` and nothing unasked for
    /// is left from the store; drops it (closing it) otherwise.
    fn recycle_if(self, reusable: bool) {
        if reusable && self.read.is_empty() && !self.kill.is_killed() {
            self.enter_pool();
        }
    }

    /// Expired connections are left to the sweep and the checkout.
    fn enter_pool(self) {
        let Some(shared) = self.pool.upgrade() else {
            return;
        };
        let since = Instant::now();
        shared
            .idle
            .lock()
            .expect("pool lock")
            .push_back(Idle { conn: self, since });
    }
}

/// A request on its way to the store: what is left to write of it.
pub struct Outgoing {
    head: Vec<u8>,
    /// Bytes of `head` already written.
    head_at: usize,
    /// Body pieces (chunk lines and data) taken from the body, not yet
    /// written, and their length.
    queue: VecDeque<Bytes>,
    queued: usize,
    /// `None` once the body ended.
    body: Option<UpstreamBody>,
    chunked: bool,
    /// The forwarded write's exchange: a raise stops the request before
    /// any write (rule 4a: "not yet fully sent to the store"), and it is
    /// complete once its last byte is written.
    exchange: Option<Arc<Exchange>>,
}

impl Outgoing {
    /// A request of `head` (in `buffer`, from [`Conn::take_head_buffer`])
    /// and `body`, framed by `framing`; `first` is a frame already taken
    /// from the body.
    pub fn new<'h>(
        mut buffer: Vec<u8>,
        method: &Method,
        target: &str,
        fields: impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
        framing: Framing,
        body: UpstreamBody,
        first: Option<Frame<Bytes>>,
    ) -> Outgoing {
        codec::encode_request_head(&mut buffer, method, target, fields, framing);
        let ended = framing == Framing::Empty || body.is_end_stream() && framing != Framing::Chunked;
        let mut out = Outgoing {
            head: buffer,
            head_at: 0,
            queue: VecDeque::new(),
            queued: 0,
            exchange: body.exchange().cloned(),
            body: Some(body),
            chunked: framing == Framing::Chunked,
        };
        if let Some(frame) = first {
            out.take(frame);
        }
        if ended && out.body.is_some() {
            // Nothing (more) to take: dropping the body now tells its
            // exchange.
            out.end_body(None);
        }
        out
    }

    /// Whether no byte of the request was written yet.
    pub fn is_unsent(&self) -> bool {
        self.head_at == 0
    }

    /// Whether the whole request was written.
    pub fn is_done(&self) -> bool {
        self.body.is_none() && self.queue.is_empty() && self.head_at == self.head.len()
    }

    fn push(&mut self, bytes: Bytes) {
        self.queued += bytes.len();
        self.queue.push_back(bytes);
    }

    fn end_body(&mut self, trailers: Option<&HeaderMap>) {
        if self.chunked {
            self.push(codec::chunked_end(trailers));
        }
        // A whole body aborts nothing when dropped (one with nothing to
        // send is whole from the start, see `GuardedBody::forwarding`).
        self.body = None;
    }

    /// Queues a frame taken from the body.
    fn take(&mut self, frame: Frame<Bytes>) {
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if self.chunked => {
                self.push(codec::chunk_header(data.len()));
                self.push(data);
                self.push(Bytes::from_static(b"\r\n"));
            }
            Ok(data) => self.push(data),
            Err(frame) => {
                // Trailers end a body; only chunks can carry them.
                let trailers = frame.into_trailers().ok();
                self.end_body(trailers.as_ref());
            }
        }
    }

    /// Takes what the body has ready, up to [`MAX_QUEUED`].
    fn fill(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(());
            };
            if body.is_end_stream() {
                // Its last frame is taken: the body (and the write's place
                // in its generation, which it holds) goes now, not when
                // the queue drains.
                self.end_body(None);
                return Ok(());
            }
            if self.queued >= MAX_QUEUED {
                return Ok(());
            }
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => self.take(frame),
                Poll::Ready(Some(Err(e))) => return Err(ExchangeError::Body(e)),
                Poll::Ready(None) => self.end_body(None),
                Poll::Pending => return Ok(()),
            }
        }
    }

    /// Writes the request, taking the body's frames as they come, until
    /// it is all written. Ready(Ok) when done. A raise that aborts the
    /// body ends it with [`ExchangeError::Body`]. The caller decides what
    /// a failure means for the connection.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, wire: &Wire) -> Poll<Result<(), ExchangeError>> {
        loop {
            self.fill(cx)?;
            if self.is_done() {
                // Written whole: from here a raise waits for its answer.
                if self.exchange.as_ref().is_some_and(|e| !e.complete()) {
                    return Poll::Ready(Err(ExchangeError::Body(BodyError::Fenced)));
                }
                return Poll::Ready(Ok(()));
            }
            let mut slices = [IoSlice::new(&[]); 16];
            let mut count = 0;
            if self.head_at < self.head.len() {
                slices[0] = IoSlice::new(&self.head[self.head_at..]);
                count = 1;
            }
            for piece in self.queue.iter().take(slices.len() - count) {
                slices[count] = IoSlice::new(piece);
                count += 1;
            }
            if count == 0 {
                // Everything taken is written; the body has no more yet.
                return Poll::Pending;
            }
            // A raise that began before the request was written whole
            // stops it here (rule 4a).
            if self.exchange.as_ref().is_some_and(|e| e.must_stop()) {
                return Poll::Ready(Err(ExchangeError::Body(BodyError::Fenced)));
            }
            let unsent = self.is_unsent();
            let mut n = match std::task::ready!(wire.poll_write(cx, &slices[..count])) {
                Ok(n) => n,
                Err(e) if unsent => return Poll::Ready(Err(ExchangeError::Unsent(e))),
                Err(e) => return Poll::Ready(Err(ExchangeError::Io(e))),
            };
            let from_head = n.min(self.head.len() - self.head_at);
            self.head_at += from_head;
            n -= from_head;
            self.queued -= n;
            drop_written(&mut self.queue, n);
        }
    }
}

/// Takes the `n` bytes a write call took off the front of `queue`.
pub fn drop_written(queue: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let front = queue.front_mut().expect("written bytes were queued");
        if n < front.len() {
            front.advance(n);
            break;
        }
        n -= front.len();
        queue.pop_front();
    }
}

impl Drop for Outgoing {
    /// A request dropped before it was written whole never will be:
    /// whoever waits on its exchange learns it now.
    fn drop(&mut self) {
        if let (Some(exchange), false) = (&self.exchange, self.is_done()) {
            exchange.abort();
        }
    }
}

/// How reading a response body from the store failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection failed (reset, cut by a raise).
    #[error("reading the response body from the store failed: {0}")]
    Io(#[from] io::Error),
    /// The body broke its framing, or ended early.
    #[error("{0}")]
    Protocol(#[from] CodecError),
}

/// A response body from the store.
pub enum StoreBody {
    /// Read from a pooled connection.
    Conn(ConnBody),
    /// The whole answer to a pipelined request ([`crate::pipeline`]).
    Whole(WholeBody),
    /// A pipelined read's answer that streams: what its lane had read of
    /// the body, then the rest from the lane's connection, handed over.
    /// Boxed: rare, and it would make every answer's body larger.
    Handed(Box<HandedBody>),
}

/// See [`StoreBody::Handed`].
pub struct HandedBody {
    /// What of the body was read before the connection was handed over.
    first: Option<Bytes>,
    rest: ConnBody,
}

impl HandedBody {
    /// The body whose first bytes are `first` (decoded), and whose rest
    /// `decoder` reads from `conn`, which closes at its end.
    pub fn new(first: Bytes, decoder: BodyDecoder, conn: Conn) -> HandedBody {
        HandedBody {
            first: (!first.is_empty()).then_some(first),
            rest: ConnBody {
                decoder,
                reusable: false,
                conn: Some(conn),
            },
        }
    }
}

impl Body for StoreBody {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        match self.get_mut() {
            StoreBody::Conn(body) => Pin::new(body).poll_frame(cx),
            StoreBody::Whole(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(|never| match never {}))),
            StoreBody::Handed(body) => match body.first.take() {
                Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
                None => Pin::new(&mut body.rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            StoreBody::Conn(body) => body.is_end_stream(),
            StoreBody::Whole(body) => body.is_end_stream(),
            StoreBody::Handed(body) => body.first.is_none() && body.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            StoreBody::Conn(body) => body.size_hint(),
            StoreBody::Whole(body) => body.size_hint(),
            StoreBody::Handed(body) => {
                let first = body.first.as_ref().map_or(0, |b| b.len() as u64);
                match body.rest.decoder.remaining() {
                    Some(n) => SizeHint::with_exact(first + n),
                    None => SizeHint::default(),
                }
            }
        }
    }
}

/// A response body from the store, read from its connection by whoever
/// polls it, which offers the connection back to the pool at its end.
/// Dropped before its end, it drops the connection: the rest of the body
/// is still on it.
pub struct ConnBody {
    decoder: BodyDecoder,
    /// Whether the connection may carry another exchange after this body.
    reusable: bool,
    /// `None` once the body ended.
    conn: Option<Conn>,
}

impl ConnBody {
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.recycle_if(self.reusable);
        }
    }
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let decoded = match this
                .decoder
                .decode(&mut conn.read, conn.fields.connection_named())
            {
                Ok(Decoded::More) => match std::task::ready!(conn.wire.poll_read(cx, &mut conn.read)) {
                    Ok(0) => {
                        // The store closed: the end of a body that runs
                        // until then, else a truncated one.
                        this.reusable = false;
                        this.decoder.at_eof()
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                other => other,
            };
            return match decoded {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Ok(Decoded::Trailers(trailers)) => {
                    this.finish();
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Ok(Decoded::End) => {
                    this.finish();
                    Poll::Ready(None)
                }
                Ok(Decoded::More) => continue,
                Err(e) => {
                    this.conn = None;
                    Poll::Ready(Some(Err(e.into())))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// An answer's body and head are moved whole through the exchange's
    /// futures, and LLVM moves up to 128 bytes inline: past that, every
    /// move is a call to memcpy. A `Vec` more in each (the names a store's
    /// `Connection` lists, now in `codec::Fields`) cost every request some
    /// 600 instructions, 3 %, with nothing else to show for it.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn an_answers_body_and_head_are_moved_inline() {
        assert!(std::mem::size_of::<StoreBody>() <= 128);
        assert!(std::mem::size_of::<ConnBody>() <= 128);
        assert!(std::mem::size_of::<ResponseHead>() <= 128);
    }

    /// A pooled connection keeps one timer for every exchange, and each
    /// exchange moves its deadline later. A timer that still fired at an
    /// earlier exchange's deadline would answer 504 early.
    #[tokio::test]
    async fn an_exchange_timer_moved_later_expires_at_its_new_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let pool = Pool::new("127.0.0.1", port, Duration::from_secs(1), Duration::from_secs(60));
        let mut conn = pool.checkout().await.unwrap();
        let mut first = conn.request_timer(Duration::from_millis(100));
        std::future::poll_fn(|cx| {
            assert!(
                first.as_mut().poll(cx).is_pending(),
                "a fresh deadline has not passed"
            );
            Poll::Ready(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let moved = tokio::time::Instant::now();
        conn.request_timer(Duration::from_millis(200)).await;
        let waited = moved.elapsed();
        assert!(
            waited >= Duration::from_millis(200),
            "the timer fired {waited:?} after it was moved 200 ms later: at the first deadline"
        );
    }
}
