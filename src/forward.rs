//! The store's side: the sending of one request over a pooled HTTP/1.1
//! connection ([`crate::pool`]) or a pipelined one ([`crate::pipeline`]),
//! with fencegate's timeouts. A request is resent only if no byte of it
//! was written, on a pooled connection the store had closed, or if it is
//! a read that a pipelined connection left unanswered (reads are safe to
//! repeat; a write never is).

use crate::metrics::PipelineCounters;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::body::{BodyError, Exchange, GuardedBody};
use crate::codec::{self, ResponseHead};
use crate::config::UpstreamConfig;
use crate::connector::{KillHandle, Wire};
use crate::error::causes;
use crate::gate::AbortSignal;
use crate::hop::RequestHop;
use crate::path::NormalPath;
use crate::pipeline::{self, LaneError, LaneSettings, Pipeline, Whole};
use crate::pool::{Conn, ExchangeError, Outgoing, Pool, StoreBody};

/// How long an unused connection to the store is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The body of a request on its way to the store.
pub type UpstreamBody = GuardedBody<Incoming>;

/// How sending to the store failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No connection could be made: nothing was sent.
    #[error("cannot connect to the store: {0}")]
    Connect(String),
    /// No final response head within `request_timeout` after the body.
    #[error("the store sent no response within {0:?} after the request")]
    Timeout(Duration),
    /// The store took none of the request body for `body_idle_timeout`.
    #[error("the store read none of the request body for {0:?}")]
    Stalled(Duration),
    /// A raise began before the body was sent whole; the request was aborted.
    #[error(
        "a higher epoch began before the body was sent whole; the request was aborted before it completed"
    )]
    Fenced,
    /// The client's body failed or stalled; the request was aborted.
    #[error("the request body from the client failed: {0}")]
    ClientBody(String),
    /// The exchange with the store broke.
    #[error("the exchange with the store failed: {0}")]
    Failed(String),
    /// The store's answer broke HTTP/1.1.
    #[error("the store's answer is not valid HTTP/1.1: {0}")]
    BadResponse(String),
    /// A write ahead of this one on its pipelined connection had no answer
    /// within `request_timeout`, and the connection was cut with this one
    /// sent: a raise waiting for it is let go without its answer, as for
    /// a [`ForwardError::Timeout`].
    #[error(
        "a write ahead of this one on its pipelined connection had no answer within {0:?}, and the connection was cut; this one was sent, and its outcome is unknown"
    )]
    CutBehindTimeout(Duration),
}

/// The store and how to reach it, with one serving thread's connections.
pub struct Upstream {
    pool: Pool,
    /// Lanes for small whole writes (and reads without a body, with
    /// `pipeline_reads`), where pipelining is on.
    pipeline: Option<Pipeline>,
    /// `Host` for requests that came without one (HTTP/1.0).
    host: HeaderValue,
    request_timeout: Duration,
    connect_timeout: Duration,
    /// Longest pause allowed inside a body, either direction.
    pub body_idle_timeout: Duration,
}

impl Upstream {
    /// The store of `config` (validated: http with an authority), with a
    /// pool of its own; `pipelined` counts what its lanes send, and the
    /// reads they give back to be sent again.
    pub fn new(config: &UpstreamConfig, pipelined: PipelineCounters) -> Upstream {
        let authority = config.url.authority().expect("validated upstream url");
        let port = authority.port_u16().unwrap_or(80);
        // Like the URL's authority, without any userinfo or default port.
        let host = match port {
            80 => authority.host().to_owned(),
            _ => format!("{}:{port}", authority.host()),
        };
        let store_host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let pipeline = (config.pipeline_depth > 0).then(|| {
            Pipeline::new(LaneSettings {
                host: store_host.to_owned(),
                port,
                connect_timeout: config.connect_timeout,
                request_timeout: config.request_timeout,
                idle_timeout: POOL_IDLE_TIMEOUT,
                depth: config.pipeline_depth,
                max_requests: config.pipeline_max_requests,
                reads: config.pipeline_reads,
                counters: pipelined,
            })
        });
        Upstream {
            pool: Pool::new(authority.host(), port, config.connect_timeout, POOL_IDLE_TIMEOUT),
            pipeline,
            host: HeaderValue::from_str(&host).expect("a URL's host is a valid header value"),
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
            body_idle_timeout: config.body_idle_timeout,
        }
    }

    /// The shortest timeout an exchange arms.
    pub fn shortest_timeout(&self) -> Duration {
        self.request_timeout
            .min(self.body_idle_timeout)
            .min(self.connect_timeout)
    }

    /// The request target at the store (origin form): the normalized path
    /// and the original query. A target already in that form is kept as
    /// it is (the common case, which saves building and parsing a new one).
    pub fn uri(&self, original: Uri, path: &NormalPath) -> Uri {
        if original.scheme().is_none() && original.path() == path.as_str() {
            return original;
        }
        let path_and_query = match original.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        Uri::from(PathAndQuery::try_from(path_and_query).expect("a normalized path is a valid URI path"))
    }

    /// Sends `request`, its head written as `hop` says, and waits for the
    /// final response head. A raise in the write's domain before its body
    /// was sent whole aborts it.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
        hop: &RequestHop,
        exchange: &Arc<Exchange>,
    ) -> Result<Response<StoreBody>, ForwardError> {
        let (mut parts, body) = request.into_parts();
        let framing = codec::request_framing(&parts.method, body.size_hint().exact(), hop.had_length());
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut body = body;
        // What of the body is already here is taken before the yield, in
        // the same poll: taking it from hyper wakes hyper's connection
        // task, which is this request's own, and the two wakes then make
        // one poll of the connection instead of two (step 21). A raise
        // meanwhile still stops it: `Outgoing` checks the fence before
        // every write.
        let mut first = None;
        if !body.is_end_stream() {
            match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(Some(Ok(frame))) => first = Some(frame),
                Poll::Ready(Some(Err(e))) => return Err(classify(ExchangeError::Body(e))),
                Poll::Ready(None) | Poll::Pending => {}
            }
        }
        // Counted until the answer's head is here: a small whole write, or
        // a read without a body, takes a lane only in company (see
        // `Pipeline::depart`).
        let departure = self.pipeline.as_ref().map(Pipeline::depart);
        let mut yielded = false;
        if let (Some(pipeline), Some(departure)) = (&self.pipeline, &departure) {
            if !departure.in_company() {
                // Alone so far. The rest of the serving thread's turn may
                // bring company: requests that arrive together come one
                // after another, and the first of them finds the others
                // not yet counted. So the yield the pool's path takes
                // anyway (below) comes first, then the count is read again.
                tokio::task::yield_now().await;
                yielded = true;
            }
            if let Some(whole) = departure
                .in_company()
                .then(|| {
                    let reads = pipeline.takes_reads();
                    whole_request(
                        &parts, target, hop, &self.host, framing, &body, &first, exchange, reads,
                    )
                })
                .flatten()
            {
                // Whole (the body is here, and ended): the lane sends it.
                if let Some(response) = self.send_pipelined(pipeline, whole, exchange).await? {
                    return Ok(response);
                }
                // A read its lane gave back unanswered (the lane ended, or
                // an answer ahead of it streams on the lane's connection):
                // the pool sends it again.
            }
        }
        // The serving thread finishes its turn first (its other ready
        // connections' heads are read), so requests that arrived together
        // reach the store together: the store is woken once for them, not
        // once per request, which on a shared host cost the proxy more
        // kernel time than the yield costs (bench/RESULTS.md, step 17).
        if !yielded {
            tokio::task::yield_now().await;
        }
        let mut body = Some(body);
        let mut pending: Option<Outgoing> = None;
        loop {
            // A raise while the connection is being made aborts the write
            // before any byte of it is sent.
            let mut conn = tokio::select! {
                biased;
                conn = self.pool.checkout() => conn.map_err(|e| ForwardError::Connect(causes(&e)))?,
                Err(why) = while_unsent(exchange, None, self.body_idle_timeout, None) => return Err(why),
            };
            let mut out = match pending.take() {
                Some(out) => out,
                None => Outgoing::new(
                    conn.take_head_buffer(),
                    &parts.method,
                    target,
                    hop.fields(&parts.headers, &self.host),
                    framing,
                    body.take().expect("the body goes into the first request"),
                    first.take(),
                ),
            };
            // The head is encoded: the request's map takes the answer (an
            // empty one when the request is resent on another connection).
            conn.lend_map(std::mem::take(&mut parts.headers));
            let kill = conn.kill_handle().clone();
            let reused = conn.is_reused();
            let timeout = self.request_timeout;
            let result = {
                let (response, mut timer) = conn.exchange(&mut out, &parts.method);
                let deadline = async {
                    if let Err(cut_short) = while_unsent(
                        exchange,
                        Some(&kill),
                        self.body_idle_timeout,
                        Some(timer.as_mut()),
                    )
                    .await
                    {
                        return cut_short;
                    }
                    timer.as_mut().reset(Instant::now() + timeout);
                    timer.as_mut().await;
                    // The store's outcome is unknown: the connection is cut so
                    // nothing more of this write can reach the store.
                    kill.kill();
                    ForwardError::Timeout(timeout)
                };
                // The exchange first: it sends the body, so the deadline's
                // watch then finds it decided without waiting. Polled the
                // other way round, that watch waited first and the body's
                // end woke this task again for nothing (one poll of hyper's
                // connection in two of a write). The body checks the fence
                // before each frame (`GuardedBody`), the connection before
                // each write (`Outgoing`).
                tokio::select! {
                    biased;
                    result = response => result,
                    error = deadline => return Err(error),
                }
            };
            match result {
                Ok(head) => return Ok(self.respond(conn, head, out, exchange, kill)),
                // Nothing was written: the store had closed this pooled
                // connection. Another one may take the request.
                Err(ExchangeError::Unsent(_)) if reused && !kill.is_killed() => pending = Some(out),
                Err(failed) => return Err(classify(failed)),
            }
        }
    }

    /// Sends a small whole write, or a read without a body, on a
    /// pipelined connection ([`crate::pipeline`]) and waits for its answer.
    /// A raise before the lane decided it sent takes it out of its lane
    /// unsent. `None`: a read to send again through the pool.
    async fn send_pipelined(
        &self,
        pipeline: &Pipeline,
        mut whole: Whole,
        exchange: &Arc<Exchange>,
    ) -> Result<Option<Response<StoreBody>>, ForwardError> {
        // A write handed back unsent (its lane closed) is queued again,
        // maybe behind another lane's first request: each stay in a lane
        // is bounded (by its connect, its first answer or its oldest
        // request's `request_timeout`), and a write handed back after one
        // connect and first answer's worth of waiting fails, unsent. Read
        // only then: no timer on the way of every write.
        let started = Instant::now();
        let budget = self.connect_timeout + self.request_timeout;
        loop {
            let mut waiting = pipeline.enqueue(whole);
            // The lane's driver bounds the wait once the request is sent
            // (`request_timeout`), and a lane that cannot connect fails it.
            // Until it is sent, only a raise counts here; dropped, the
            // wait takes the request out of its lane's queue.
            let reply = tokio::select! {
                biased;
                reply = waiting.reply() => reply,
                Err(why) = while_unsent(exchange, None, self.body_idle_timeout, None) => return Err(why),
            };
            match reply {
                Ok(Ok(answer)) => return Ok(Some(store_response(answer.head, answer.body))),
                // Only read lanes give a request back sent, and they carry
                // no write; a write is never sent twice.
                Ok(Err(LaneError::Resend)) if !exchange.holds_ticket() => {
                    pipeline.resent();
                    return Ok(None);
                }
                Ok(Err(LaneError::Resend)) => {
                    return Err(ForwardError::Failed(
                        "the pipelined connection ended before answering this write; its outcome is unknown"
                            .to_owned(),
                    ))
                }
                // Not one byte of it was written: another lane may take
                // it, unless it has waited for one long enough.
                Ok(Err(LaneError::Unsent(_))) if started.elapsed() >= budget && exchange.abort() => {
                    return Err(ForwardError::Connect(format!(
                        "no pipelined connection to the store sent the request within {budget:?}; nothing of it was sent"
                    )));
                }
                Ok(Err(LaneError::Unsent(back))) => whole = back,
                Ok(Err(LaneError::Failed(e))) => return Err(e),
                Err(_) => {
                    return Err(ForwardError::Failed(
                        "the pipelined connection ended without a word on this write".to_owned(),
                    ))
                }
            }
        }
    }

    /// The response to hand to the client. A request the store answered
    /// before it was sent whole goes on being sent (HTTP/1.1 lets a body
    /// go on after an early answer) from a task of its own.
    fn respond(
        &self,
        mut conn: Conn,
        head: ResponseHead,
        out: Outgoing,
        exchange: &Arc<Exchange>,
        kill: KillHandle,
    ) -> Response<StoreBody> {
        // Whether the connection may go back to the pool after the answer.
        let mut reusable = out.is_done();
        if reusable {
            conn.reclaim(out);
            // A write answered before the store read all of it may still
            // have bytes unsent in the kernel: the write keeps its place
            // until they have gone out, and the connection is not reused.
            if exchange.holds_ticket() && !conn.wire_ref().nothing_unsent() {
                reusable = false;
                let (wire, exchange, idle) = (conn.wire(), exchange.clone(), self.body_idle_timeout);
                tokio::spawn(async move { until_sent_out(&wire, exchange, &kill, idle).await });
            }
        } else if head.status == StatusCode::SWITCHING_PROTOCOLS {
            // The connection speaks another protocol now (and the answer
            // becomes a 502): the rest of the request has nowhere to go.
            kill.kill();
        } else {
            finish_sending(conn.wire(), out, exchange.clone(), kill, self.body_idle_timeout);
        }
        let body = conn.into_body(&head, reusable);
        store_response(head, body)
    }
}

/// The store's answer as the response to hand on. The version stays
/// fencegate's own (RFC 9110 §6.2): the store's framed only the store's
/// side.
fn store_response(head: ResponseHead, body: StoreBody) -> Response<StoreBody> {
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    response
}

/// `request` encoded whole, head and body, if it may take a pipelined
/// connection: a PUT or DELETE write (it holds a ticket) whose body, at
/// most [`pipeline::MAX_WHOLE`] bytes, is all here, or, with `reads`, a
/// GET or HEAD without a body. Anything else streams through the pool.
/// Only idempotent methods (RFC 9112 §9.3.2): a lane that ends fails the
/// writes sent on it with their outcome unknown, and a writer may send a
/// PUT or DELETE again after that, not a POST; the reads it sends again
/// itself.
#[allow(clippy::too_many_arguments)]
fn whole_request(
    parts: &http::request::Parts,
    target: &str,
    hop: &RequestHop,
    host: &HeaderValue,
    framing: codec::Framing,
    body: &UpstreamBody,
    first: &Option<http_body::Frame<bytes::Bytes>>,
    exchange: &Arc<Exchange>,
    reads: bool,
) -> Option<Whole> {
    // A read with a ticket is a write in a read's clothes (a method
    // override): it is never sent twice.
    let read = reads
        && !exchange.holds_ticket()
        && pipeline::is_read(&parts.method)
        && framing == codec::Framing::Empty;
    let write = exchange.holds_ticket() && matches!(parts.method, http::Method::PUT | http::Method::DELETE);
    if !body.is_end_stream() || !(read || write) {
        return None;
    }
    let data = match first {
        Some(frame) => frame.data_ref()?.clone(),
        None => bytes::Bytes::new(),
    };
    let fits = match framing {
        codec::Framing::Empty => data.is_empty(),
        codec::Framing::Length(n) => n == data.len() as u64 && data.len() <= pipeline::MAX_WHOLE,
        codec::Framing::Chunked | codec::Framing::UntilClose => false,
    };
    if !fits {
        return None;
    }
    let mut buffer = Vec::with_capacity(512 + data.len());
    codec::encode_request_head(
        &mut buffer,
        &parts.method,
        target,
        hop.fields(&parts.headers, host),
        framing,
    );
    let head_len = buffer.len();
    buffer.extend_from_slice(&data);
    Some(Whole {
        head_len,
        bytes: buffer.into(),
        method: parts.method.clone(),
        exchange: exchange.clone(),
    })
}

/// Sends the rest of a request whose store answered before it was sent
/// whole (HTTP/1.1 lets a body go on after an early answer). The write
/// holds its place in its generation until the kernel has sent its last
/// byte, so a raise still cuts it (the reset drops what the kernel holds
/// too), and so does a store that takes none of it for `idle`: before the
/// request was written whole through [`while_unsent`], after that by
/// watching the bytes the kernel takes. A request that fails or is aborted
/// on the way has its connection cut: nothing more of it may reach the
/// store.
fn finish_sending(
    wire: Arc<Wire>,
    mut out: Outgoing,
    exchange: Arc<Exchange>,
    connection: KillHandle,
    idle: Duration,
) {
    tokio::spawn(async move {
        let flush = std::future::poll_fn(|cx| out.poll_send(cx, &wire));
        tokio::pin!(flush);
        let completed = tokio::select! {
            biased;
            sent = &mut flush => sent.is_ok(),
            decided = while_unsent(&exchange, Some(&connection), idle, None) => {
                if decided.is_err() {
                    return;
                }
                tokio::select! {
                    biased;
                    sent = &mut flush => sent.is_ok(),
                    () = fenced(exchange.abort_signal()) => false,
                    _ = store_stalls(&exchange, Some(&connection), idle, None) => false,
                }
            }
        };
        if completed {
            until_sent_out(&wire, exchange, &connection, idle).await;
        } else {
            connection.kill();
        }
    });
}

/// Holds a write in its generation until the kernel has sent the last
/// byte of its request. The kernel took the request whole, but a store
/// that answered before reading it all may have left some of it unsent in
/// fencegate's socket, and those bytes would reach the store after a
/// higher write's first. Until they have gone out, a raise cuts the
/// connection (the reset drops them), and so does a store that takes none
/// of them for `idle`.
async fn until_sent_out(wire: &Wire, exchange: Arc<Exchange>, connection: &KillHandle, idle: Duration) {
    let sent = tokio::select! {
        biased;
        () = wire.sent_out() => true,
        () = fenced(exchange.abort_signal()) => false,
        _ = store_stalls(&exchange, Some(connection), idle, None) => false,
    };
    if !sent {
        connection.kill();
    }
    // Only now, with every byte sent or the connection cut, does the
    // write leave its generation.
    drop(exchange);
}

/// Watches a forwarded request until its body is sent whole (or dropped),
/// then resolves. Before that, a raise in the write's domain, or a store
/// that takes none of the body for `idle`, aborts the body and cuts the
/// connection: the body may be stuck in the connection's buffer behind a
/// store that is not reading, and no byte of it may reach the store after
/// the raise. A body sent whole meanwhile is not aborted: its write waits
/// for its answer like any other. The stall watch runs on `timer`, the
/// connection's, where there is one. Without a connection (one is being
/// made) only a raise counts: the store was sent nothing to be slow with,
/// and `connect_timeout` bounds the wait (a request without a body, which
/// is decided only once its head is written, got 504 there).
async fn while_unsent(
    exchange: &Exchange,
    connection: Option<&KillHandle>,
    idle: Duration,
    timer: Option<Pin<&mut Sleep>>,
) -> Result<(), ForwardError> {
    let why = tokio::select! {
        biased;
        () = exchange.wait_decided() => return Ok(()),
        () = fenced(exchange.abort_signal()) => ForwardError::Fenced,
        stalled = store_stalls(exchange, connection, idle, timer), if connection.is_some() => stalled,
    };
    if !exchange.abort() {
        return Ok(());
    }
    cut(connection);
    Err(why)
}

/// Resolves when the store took none of the body for `idle` while it had
/// bytes to take. A store that stops reading leaves the body unpolled
/// behind a full socket buffer, where the body's own idle timer cannot run
/// (that one bounds the client's pauses), so this watch bounds the
/// store's. Progress is a new frame taken from the client or, where the
/// connection is known (writes), a byte the kernel took from it. TCP opens
/// its window in steps, so a store reading slower than about its receive
/// buffer per `idle` looks stalled.
async fn store_stalls(
    exchange: &Exchange,
    connection: Option<&KillHandle>,
    idle: Duration,
    timer: Option<Pin<&mut Sleep>>,
) -> ForwardError {
    let mut own = None;
    let mut timer = match timer {
        Some(timer) => timer,
        None => own.insert(Box::pin(tokio::time::sleep(idle))).as_mut(),
    };
    let progress = || (exchange.frames(), connection.map(KillHandle::written));
    let mut seen = progress();
    loop {
        timer.as_mut().reset(Instant::now() + idle);
        timer.as_mut().await;
        let now = progress();
        if now == seen && !exchange.awaiting_client() {
            return ForwardError::Stalled(idle);
        }
        seen = now;
    }
}

/// Cuts the connection a request was sent on, if it is known.
fn cut(connection: Option<&KillHandle>) {
    if let Some(handle) = connection {
        handle.kill();
    }
}

/// Resolves once a raise began in the write's domain (never for a read).
pub(crate) async fn fenced(fence: Option<&AbortSignal>) {
    match fence {
        Some(fence) => fence.raised().await,
        None => std::future::pending().await,
    }
}

/// Sorts a failed exchange by where it failed.
fn classify(e: ExchangeError) -> ForwardError {
    match e {
        ExchangeError::Body(BodyError::Fenced) => ForwardError::Fenced,
        ExchangeError::Body(other) => ForwardError::ClientBody(other.to_string()),
        ExchangeError::Unsent(e) | ExchangeError::Io(e) => ForwardError::Failed(e.to_string()),
        ExchangeError::Closed => {
            ForwardError::Failed("the store closed the connection without answering".to_owned())
        }
        ExchangeError::Protocol(e) => ForwardError::BadResponse(e.to_string()),
    }
}
