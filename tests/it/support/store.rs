//! An in-process store that records when each request's head, body end
//! and response happen, can hold requests by token, and can misbehave on
//! a path ([`Fault`]): reset or close the connection part-way, answer a
//! head and then break the body, never read, or answer an error status.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The request head arrived (the body may not have).
    HeadArrived,
    /// The whole body (and trailers) arrived.
    BodyComplete,
    /// The body failed or ended short (the client aborted it).
    BodyFailed,
    /// The response head was handed to hyper.
    Responded,
    /// A [`Fault`] broke the exchange: the connection was reset or closed
    /// (`body` holds what of the request body had been read).
    Broken,
}

/// How the store misbehaves for requests to one path
/// ([`ScriptedStore::fault_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Read at least `n` bytes of the request body (or all of a shorter
    /// one), then reset the connection (RST: SO_LINGER 0) without answering.
    ResetAfterBodyBytes(usize),
    /// Read the whole request, then close the connection (FIN) without
    /// answering.
    CloseWithoutAnswer,
    /// Answer `200` with its head and `sent` bytes of a body that is
    /// declared longer (`Content-Length: declared`, or chunked when
    /// `None`), pause 200 ms so all of it is on the wire, then reset.
    ResetMidResponse { sent: usize, declared: Option<usize> },
    /// Never read the request body and never answer, until the store stops.
    NeverRead,
    /// Read the request body slowly: pause this long after each frame.
    ReadSlowly(Duration),
    /// Answer `200` at once, before reading the body; start reading it
    /// `read_after` later, in the background, and record how it ended
    /// (`BodyComplete` or `BodyFailed`, with the bytes read).
    AnswerEarly { read_after: Duration },
    /// Answer `200` `answer_after` after the head arrived, before reading
    /// the body (time for the client to have sent all of it, so that what
    /// the store leaves unread waits in the sender's buffers); leave the
    /// body unread for `close_after`, then close the connection and record
    /// `Broken`.
    AnswerEarlyThenClose {
        answer_after: Duration,
        close_after: Duration,
    },
    /// Read the whole request, then never answer, until the store stops.
    NeverAnswer,
    /// Read the whole request, then answer `status` with `body`.
    Answer { status: u16, body: &'static str },
    /// Read the whole request, then answer after this long.
    AnswerAfter(Duration),
    /// The first request to the path: read it whole, then reset the
    /// connection (RST) without answering. Later ones are answered as if
    /// there were no fault.
    ResetOnce,
    /// The first request to the path: answer `200` with `Content-Length:
    /// declared` and only `sent` bytes of it, then, `pause` later, close
    /// the connection (FIN). Later ones are answered as if there were no
    /// fault.
    CloseMidAnswerOnce {
        sent: usize,
        declared: usize,
        pause: Duration,
    },
    /// Answer `200` at once, with a chunked body of `chunks` pieces of
    /// [`TRICKLE_CHUNK`] bytes, one every `every` (the first at once).
    Trickle { chunks: usize, every: Duration },
    /// Answer `200` at once with `bytes` bytes, chunked (no stated length).
    AnswerChunked { bytes: usize },
    /// As [`Fault::Trickle`], with the body's length stated
    /// (`Content-Length`).
    TrickleStated { chunks: usize, every: Duration },
    /// Read the whole request, then answer as [`Fault::Trickle`] after
    /// this long (as [`Fault::TrickleStated`] if `stated`).
    TrickleAfter {
        after: Duration,
        chunks: usize,
        every: Duration,
        stated: bool,
    },
}

/// The size of each piece of a [`Fault::Trickle`] answer.
pub const TRICKLE_CHUNK: usize = 100;

#[derive(Debug, Clone)]
pub struct Event {
    pub token: Option<String>,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub kind: EventKind,
    pub at: Instant,
    /// The request headers (HeadArrived only; empty otherwise).
    pub headers: HeaderMap,
    /// The body (BodyComplete only; empty otherwise).
    pub body: Bytes,
    /// The trailers (BodyComplete only; empty otherwise).
    pub trailers: HeaderMap,
}

struct Shared {
    header: String,
    status: AtomicU16,
    events: Mutex<Vec<Event>>,
    /// token → hold between body end and response.
    holds: Mutex<HashMap<String, Duration>>,
    /// token → hold between head and reading the body.
    body_holds: Mutex<HashMap<String, Duration>>,
    /// path → how to misbehave.
    faults: Mutex<HashMap<String, Fault>>,
    /// Receive buffer of new connections, if set (SO_RCVBUF).
    receive_buffer: Mutex<Option<usize>>,
    /// The listening socket (a second descriptor of it), whose SO_RCVBUF
    /// new connections start with: the window a connection first offers
    /// follows the listener's buffer, not one set after the accept.
    listening: Mutex<Option<socket2::Socket>>,
}

/// A store on 127.0.0.1 running on the test's tokio runtime. It answers
/// every request with 201 (see [`ScriptedStore::set_status`]) and an empty
/// body after reading the whole request body. Dropping it stops it.
pub struct ScriptedStore {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// Ends the accept loop alone ([`ScriptedStore::stop_accepting`]).
    accepting: watch::Sender<bool>,
}

/// A second descriptor of `listener`, to set its options from the test.
fn listening(listener: &TcpListener) -> socket2::Socket {
    socket2::SockRef::from(listener)
        .try_clone()
        .expect("dup the ScriptedStore's listening socket")
}

impl ScriptedStore {
    /// Start on a free port; tokens are read from `Fencing-Token`.
    pub async fn start() -> ScriptedStore {
        ScriptedStore::start_with_header("Fencing-Token").await
    }

    /// Start, reading tokens from `header`.
    pub async fn start_with_header(header: &str) -> ScriptedStore {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ScriptedStore on 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            header: header.to_string(),
            status: AtomicU16::new(201),
            events: Mutex::new(Vec::new()),
            holds: Mutex::new(HashMap::new()),
            body_holds: Mutex::new(HashMap::new()),
            faults: Mutex::new(HashMap::new()),
            receive_buffer: Mutex::new(None),
            listening: Mutex::new(Some(listening(&listener))),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (accepting, accepting_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx, accepting_rx));
        ScriptedStore {
            addr,
            shared,
            shutdown,
            accepting,
        }
    }

    /// After [`ScriptedStore::stop`]: listen on the same address again
    /// (retrying for up to 5 s while the port is still taken), keeping the
    /// events, holds and faults.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("ScriptedStore::restart: bind {} again: {e}", self.addr),
            }
        };
        if let Some(bytes) = *lock(&self.shared.receive_buffer) {
            let _ = socket2::SockRef::from(&listener).set_recv_buffer_size(bytes);
        }
        *lock(&self.shared.listening) = Some(listening(&listener));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (accepting, accepting_rx) = watch::channel(false);
        tokio::spawn(accept_loop(
            listener,
            self.shared.clone(),
            shutdown_rx,
            accepting_rx,
        ));
        self.shutdown = shutdown;
        self.accepting = accepting;
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Hold requests carrying `token` for `d` after their body is complete,
    /// before answering.
    pub fn hold_token(&self, token: &str, d: Duration) {
        lock(&self.shared.holds).insert(token.to_string(), d);
    }

    /// Hold requests carrying `token` for `d` after their head arrived,
    /// before reading the body (and before `100 Continue` is sent).
    pub fn hold_token_before_body(&self, token: &str, d: Duration) {
        lock(&self.shared.body_holds).insert(token.to_string(), d);
    }

    /// Misbehave as `fault` for every later request to `path`.
    /// Gives new connections a receive buffer of `bytes` (SO_RCVBUF), so a
    /// body the store does not read backs up to fencegate sooner.
    pub fn set_receive_buffer(&self, bytes: usize) {
        *lock(&self.shared.receive_buffer) = Some(bytes);
        if let Some(listener) = lock(&self.shared.listening).as_ref() {
            let _ = listener.set_recv_buffer_size(bytes);
        }
    }

    pub fn fault_path(&self, path: &str, fault: Fault) {
        lock(&self.shared.faults).insert(path.to_string(), fault);
    }

    /// Remove every hold (requests already holding keep their sleep).
    pub fn clear_holds(&self) {
        lock(&self.shared.holds).clear();
        lock(&self.shared.body_holds).clear();
    }

    /// The status of every later response (201 at start).
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// Every event so far, in arrival order.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.shared.events).clone()
    }

    /// How many requests to `path` reached the store (their heads).
    pub fn heads_at(&self, path: &str) -> usize {
        lock(&self.shared.events)
            .iter()
            .filter(|e| e.path == path && e.kind == EventKind::HeadArrived)
            .count()
    }

    /// The events of requests carrying `token`.
    pub fn events_for(&self, token: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.token.as_deref() == Some(token))
            .collect()
    }

    /// Poll (every 5 ms, at most `timeout`) until `pred(events)` holds;
    /// false on timeout.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Event]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&lock(&self.shared.events)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Keeps a read through fencegate at `fencegate_url` in flight for
    /// `hold` (this store answers it then; the task ends with its answer):
    /// a write that comes meanwhile has company on its way to the store,
    /// and takes a lane where pipelining is on (`Pipeline::depart`). Each
    /// call reads a path of its own, returned once its head is here.
    pub async fn companion(&self, fencegate_url: &str, hold: Duration) -> tokio::task::JoinHandle<()> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = format!("/companion-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.fault_path(&path, Fault::AnswerAfter(hold));
        let (http, url) = (super::client(), format!("{fencegate_url}{path}"));
        let read = tokio::spawn(async move {
            let _ = http.get(url).send().await;
        });
        let arrived = self
            .wait_for(Duration::from_secs(10), |events| {
                events
                    .iter()
                    .any(|e| e.path == path && e.kind == EventKind::HeadArrived)
            })
            .await;
        assert!(arrived, "the companion read {path} never reached the store");
        read
    }

    /// Stop accepting and close every connection. Idempotent.
    pub fn stop(&self) {
        self.stop_accepting();
        let _ = self.shutdown.send(true);
    }

    /// Stop listening (new connections are refused), keeping the
    /// connections open and their requests going. Idempotent.
    pub fn stop_accepting(&self) {
        // The second descriptor would keep the port listening.
        lock(&self.shared.listening).take();
        let _ = self.accepting.send(true);
    }
}

impl Drop for ScriptedStore {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    mut accepting: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = accepting.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        if let Some(bytes) = *lock(&shared.receive_buffer) {
            let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(bytes);
        }
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let reset = Arc::new(AtomicBool::new(false));
            let tap = Tap {
                stream,
                reset: reset.clone(),
            };
            let service = service_fn(move |req| handle(shared.clone(), reset.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(tap), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// A connection to the store that closes with a reset (SO_LINGER 0) when
/// a fault asked for one: hyper drops the connection after a service or
/// body error, and the socket's linger is set just before it closes.
struct Tap {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tap {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The store's response bodies: empty, whole, or broken part-way.
enum Answer {
    Empty,
    Full(Option<Bytes>),
    /// As `Full`, without stating its length: chunked.
    Chunked(Option<Bytes>),
    /// Sends `first`, waits `wait` from then, then fails after asking for
    /// a reset.
    Broken {
        first: Option<Bytes>,
        wait: Duration,
        pause: Pin<Box<tokio::time::Sleep>>,
        /// Set to end the connection with a reset; `None`: a close (FIN).
        reset: Option<Arc<AtomicBool>>,
    },
    /// Sends `left` pieces, one each time `pause` ends, `every` apart.
    Trickle {
        left: usize,
        every: Duration,
        pause: Pin<Box<tokio::time::Sleep>>,
    },
}

impl Body for Answer {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Answer::Empty => Poll::Ready(None),
            Answer::Full(data) | Answer::Chunked(data) => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            Answer::Broken {
                first,
                wait,
                pause,
                reset,
            } => {
                if let Some(first) = first.take() {
                    // From now: hyper writes the piece out before it
                    // polls again and finds the pause running.
                    pause.as_mut().reset(tokio::time::Instant::now() + *wait);
                    return Poll::Ready(Some(Ok(Frame::data(first))));
                }
                std::task::ready!(pause.as_mut().poll(cx));
                if let Some(reset) = reset {
                    reset.store(true, Ordering::SeqCst);
                }
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "scripted fault: reset in the middle of the response body",
                ))))
            }
            Answer::Trickle { left, every, pause } => {
                if *left == 0 {
                    return Poll::Ready(None);
                }
                std::task::ready!(pause.as_mut().poll(cx));
                *left -= 1;
                pause.as_mut().reset(tokio::time::Instant::now() + *every);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b't'; TRICKLE_CHUNK])))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Answer::Empty | Answer::Full(None) | Answer::Chunked(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Empty => SizeHint::with_exact(0),
            Answer::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Answer::Chunked(_) | Answer::Broken { .. } | Answer::Trickle { .. } => SizeHint::default(),
        }
    }
}

/// A 200 whose body is `chunks` pieces of [`TRICKLE_CHUNK`] bytes, one
/// every `every`, the first at once; its length in `Content-Length` if
/// `stated`, else chunked.
fn trickle(chunks: usize, every: Duration, stated: bool) -> Response<Answer> {
    let mut resp = Response::new(Answer::Trickle {
        left: chunks,
        every,
        pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
    });
    *resp.status_mut() = StatusCode::OK;
    if stated {
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, (chunks * TRICKLE_CHUNK).into());
    }
    resp
}

/// An error that makes hyper drop the connection without answering.
fn scripted(what: &str) -> Box<dyn std::error::Error + Send + Sync> {
    format!("scripted fault: {what}").into()
}

async fn handle(
    shared: Arc<Shared>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Answer>, Box<dyn std::error::Error + Send + Sync>> {
    let token = req
        .headers()
        .get(shared.header.as_str())
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let record = |kind, headers: HeaderMap, body: Bytes, trailers: HeaderMap| {
        lock(&shared.events).push(Event {
            token: token.clone(),
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            kind,
            at: Instant::now(),
            headers,
            body,
            trailers,
        });
    };
    record(
        EventKind::HeadArrived,
        req.headers().clone(),
        Bytes::new(),
        HeaderMap::new(),
    );

    let fault = {
        let mut faults = lock(&shared.faults);
        match faults.get(&path).copied() {
            Some(Fault::ResetOnce) => {
                faults.remove(&path);
                Some(Fault::ResetAfterBodyBytes(0))
            }
            Some(once @ Fault::CloseMidAnswerOnce { .. }) => {
                faults.remove(&path);
                Some(once)
            }
            other => other,
        }
    };
    if fault == Some(Fault::NeverRead) {
        // Until the store stops, which drops this future with its connection.
        std::future::pending::<()>().await;
    }
    let early = match fault {
        Some(Fault::AnswerEarly { read_after }) => Some((Duration::ZERO, read_after, false)),
        Some(Fault::AnswerEarlyThenClose {
            answer_after,
            close_after,
        }) => Some((answer_after, close_after, true)),
        _ => None,
    };
    if let Some((answer_after, read_after, close)) = early {
        tokio::time::sleep(answer_after).await;
        let mut body = req.into_body();
        let (shared, token, method, path, query) = (
            shared.clone(),
            token.clone(),
            method.clone(),
            path.clone(),
            query.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(read_after).await;
            let mut data = BytesMut::new();
            let kind = loop {
                if close {
                    // hyper closes a connection whose request body was
                    // dropped unread.
                    drop(body);
                    break EventKind::Broken;
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(chunk) = frame.data_ref() {
                            data.extend_from_slice(chunk);
                        }
                    }
                    Some(Err(_)) => break EventKind::BodyFailed,
                    None => break EventKind::BodyComplete,
                }
            };
            lock(&shared.events).push(Event {
                token,
                method,
                path,
                query,
                kind,
                at: Instant::now(),
                headers: HeaderMap::new(),
                body: data.freeze(),
                trailers: HeaderMap::new(),
            });
        });
        record(
            EventKind::Responded,
            HeaderMap::new(),
            Bytes::new(),
            HeaderMap::new(),
        );
        let mut resp = Response::new(Answer::Empty);
        *resp.status_mut() = StatusCode::OK;
        return Ok(resp);
    }
    let held =
        |map: &Mutex<HashMap<String, Duration>>| token.as_ref().and_then(|t| lock(map).get(t).copied());
    if let Some(d) = held(&shared.body_holds) {
        tokio::time::sleep(d).await;
    }

    let mut body = req.into_body();
    let mut data = BytesMut::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers.extend(t);
                    }
                }
            },
            Err(e) => {
                record(
                    EventKind::BodyFailed,
                    HeaderMap::new(),
                    data.freeze(),
                    HeaderMap::new(),
                );
                return Err(e.into());
            }
        }
        if let Some(Fault::ResetAfterBodyBytes(n)) = fault {
            if data.len() >= n {
                break;
            }
        }
        if let Some(Fault::ReadSlowly(pause)) = fault {
            tokio::time::sleep(pause).await;
        }
    }
    match fault {
        Some(Fault::ResetAfterBodyBytes(_)) => {
            record(
                EventKind::Broken,
                HeaderMap::new(),
                data.freeze(),
                HeaderMap::new(),
            );
            reset.store(true, Ordering::SeqCst);
            return Err(scripted("reset after part of the request body"));
        }
        Some(Fault::CloseWithoutAnswer) => {
            record(EventKind::BodyComplete, HeaderMap::new(), data.freeze(), trailers);
            record(
                EventKind::Broken,
                HeaderMap::new(),
                Bytes::new(),
                HeaderMap::new(),
            );
            return Err(scripted("closed without answering"));
        }
        _ => {}
    }
    record(EventKind::BodyComplete, HeaderMap::new(), data.freeze(), trailers);
    if fault == Some(Fault::NeverAnswer) {
        std::future::pending::<()>().await;
    }
    if let Some(Fault::AnswerAfter(d)) = fault {
        tokio::time::sleep(d).await;
    }

    if let Some(d) = held(&shared.holds) {
        tokio::time::sleep(d).await;
    }

    let status = StatusCode::from_u16(shared.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::CREATED);
    record(
        EventKind::Responded,
        HeaderMap::new(),
        Bytes::new(),
        HeaderMap::new(),
    );
    let mut resp = match fault {
        Some(Fault::ResetMidResponse { sent, declared }) => {
            let mut resp = Response::new(Answer::Broken {
                first: Some(Bytes::from(vec![b'r'; sent])),
                wait: Duration::from_millis(200),
                pause: Box::pin(tokio::time::sleep(Duration::from_millis(200))),
                reset: Some(reset),
            });
            if let Some(len) = declared {
                resp.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, len.into());
            }
            *resp.status_mut() = StatusCode::OK;
            return Ok(resp);
        }
        Some(Fault::CloseMidAnswerOnce {
            sent,
            declared,
            pause,
        }) => {
            let mut resp = Response::new(Answer::Broken {
                first: Some(Bytes::from(vec![b'r'; sent])),
                wait: pause,
                pause: Box::pin(tokio::time::sleep(pause)),
                reset: None,
            });
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, declared.into());
            *resp.status_mut() = StatusCode::OK;
            return Ok(resp);
        }
        Some(Fault::TrickleAfter {
            after,
            chunks,
            every,
            stated,
        }) => {
            tokio::time::sleep(after).await;
            return Ok(trickle(chunks, every, stated));
        }
        Some(Fault::AnswerChunked { bytes }) => {
            let mut resp = Response::new(Answer::Chunked(Some(Bytes::from(vec![b'c'; bytes]))));
            *resp.status_mut() = StatusCode::OK;
            return Ok(resp);
        }
        Some(Fault::TrickleStated { chunks, every }) => {
            return Ok(trickle(chunks, every, true));
        }
        Some(Fault::Trickle { chunks, every }) => {
            return Ok(trickle(chunks, every, false));
        }
        Some(Fault::Answer { status, body }) => {
            let mut resp = Response::new(Answer::Full(Some(Bytes::from_static(body.as_bytes()))));
            *resp.status_mut() = StatusCode::from_u16(status).expect("a valid scripted status");
            return Ok(resp);
        }
        _ => Response::new(Answer::Empty),
    };
    *resp.status_mut() = status;
    Ok(resp)
}
