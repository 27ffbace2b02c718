//! The data path: one request, top to bottom. Screen it, find its domain and
//! token, admit it (which may wait for a raise), forward it, and count it.
//! Refusals are [`Problem`]s, rendered in one place ([`crate::error`]).

use crate::metrics::PipelineCounters;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::body::{Exchange, GuardedBody, TrailerRules};
use crate::config::Config;
use crate::error::{Problem, Reason};
use crate::fencing::Access;
use crate::forward::{ForwardError, Upstream};
use crate::gate::{Gate, Gates, Ticket};
use crate::hop::{check_connection, is_method_override, list_items, same_field, Peer, RequestHop};
use crate::metrics::DomainMetrics;
use crate::path::{normalize, NormalPath};
use crate::pool::StoreBody;
use crate::token::{Token, TokenError};

/// WebDAV's target of COPY and MOVE.
const DESTINATION: HeaderName = HeaderName::from_static("destination");

/// What clients receive: fencegate's own answers, or the store's streamed.
pub type ProxyBody = Either<Full<Bytes>, GuardedBody<StoreBody>>;

/// Everything the data path needs, shared by every connection.
pub struct Proxy {
    gates: Arc<Gates>,
    upstream: Arc<Upstream>,
    fencing_header: HeaderName,
    read_methods: Vec<Method>,
    max_header_bytes: usize,
    /// Metrics of requests outside every domain.
    outside: DomainMetrics,
}

impl Proxy {
    /// The data path for `config`, with the domains' live state in `gates`.
    /// Each serving thread has its own, with its own pool of connections
    /// to the store; the domains are shared.
    /// `pipelined` counts the writes and reads its lanes send, and the
    /// reads sent again, if pipelining is on.
    pub fn new(
        config: &Config,
        gates: Arc<Gates>,
        outside: DomainMetrics,
        pipelined: PipelineCounters,
    ) -> Proxy {
        Proxy {
            gates,
            upstream: Arc::new(Upstream::new(&config.upstream, pipelined)),
            fencing_header: HeaderName::from_bytes(config.fencing.header.as_bytes())
                .expect("validated header name"),
            read_methods: config
                .fencing
                .read_methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).expect("validated method"))
                .collect(),
            max_header_bytes: config.server.max_header_bytes,
            outside,
        }
    }

    /// The shortest timeout the exchange with the store arms.
    pub fn shortest_timeout(&self) -> std::time::Duration {
        self.upstream.shortest_timeout()
    }

    /// Longest pause allowed inside a body, either direction: also how long
    /// a client may take nothing of its answer.
    pub fn body_idle_timeout(&self) -> std::time::Duration {
        self.upstream.body_idle_timeout
    }

    /// The domains.
    pub fn gates(&self) -> &Gates {
        &self.gates
    }

    /// Answers one request from `peer`.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>, peer: Arc<Peer>) -> Response<ProxyBody> {
        let started = Instant::now();
        let body_unread = !request.body().is_end_stream();
        let version = request.version();
        let mut domain = None;
        let result = self.process(request, &peer, &mut domain).await;
        let metrics = domain.as_ref().map_or(&self.outside, |g| &g.metrics);
        metrics.request_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => {
                metrics.count(Ok(()));
                response
            }
            Err(problem) => {
                metrics.count(Err(problem.reason));
                log_refusal(&problem);
                let mut response = problem.into_response(body_unread);
                if body_unread {
                    closing_for(version, &mut response);
                }
                response.map(Either::Left)
            }
        }
    }

    async fn process(
        &self,
        request: Request<Incoming>,
        peer: &Peer,
        domain: &mut Option<Arc<Gate>>,
    ) -> Result<Response<ProxyBody>, Problem> {
        if let Err(mut problem) = self.screen(&request) {
            // Refused for its head, but its path may still lie in a domain:
            // the refusal counts there and names it (`none` is for paths
            // outside every domain). Only refusals pay for the lookup.
            if let Some(gate) = normalize(request.uri().path())
                .ok()
                .and_then(|path| self.gates.find(&path).cloned())
            {
                gate.annotate(&mut problem, None);
                *domain = Some(gate);
            }
            return Err(problem);
        }
        let path = match request.uri().path() {
            // The asterisk-form asks about the server as a whole: OPTIONS
            // only (RFC 9112 §3.2.4), in no domain, and it goes on as it
            // came, a read (unless `read_methods` left OPTIONS out).
            "*" if request.method() == Method::OPTIONS => NormalPath::asterisk(),
            raw => normalize(raw).map_err(|e| Problem::new(Reason::BadPath, e.to_string()))?,
        };
        let access = self.access(&request);
        let gate = self.gates.find(&path).cloned();
        *domain = gate.clone();
        let token =
            Token::from_values(request.headers().get_all(&self.fencing_header).iter()).and_then(|token| {
                // Beside the token, `Fencing_Token` is the same field to a
                // CGI-style store: a second value, which it might read instead
                // of the one judged. Alone it is no token, as to fencegate.
                let twin = || {
                    request
                        .headers()
                        .keys()
                        .any(|name| *name != self.fencing_header && same_field(name, &self.fencing_header))
                };
                match token {
                    Some(_) if twin() => Err(TokenError::Repeated),
                    token => Ok(token),
                }
            });
        let metrics = gate.as_ref().map_or(&self.outside, |g| &g.metrics);
        let _inflight = (access == Access::Write).then(|| InflightGuard::enter(&metrics.inflight));
        let result = self
            .admit_and_forward(request, &path, peer, access, gate.as_ref(), token)
            .await;
        // Whatever failed, the writer learns the domain, token and epoch.
        result.map_err(|mut problem| {
            if let Some(gate) = &gate {
                gate.annotate(&mut problem, token.ok().flatten());
            }
            problem
        })
    }

    async fn admit_and_forward(
        &self,
        request: Request<Incoming>,
        path: &NormalPath,
        peer: &Peer,
        access: Access,
        gate: Option<&Arc<Gate>>,
        token: Result<Option<Token>, TokenError>,
    ) -> Result<Response<ProxyBody>, Problem> {
        let token = token
            .map_err(|e| Problem::new(Reason::MalformedToken, format!("`{}`: {e}", self.fencing_header)));
        let ticket = match (gate, access, token?) {
            (None, Access::Write, _) => {
                return Err(Problem::new(
                    Reason::NoDomain,
                    format!("writes to `{path}` are not allowed: the path lies in no fenced domain"),
                ));
            }
            (None, Access::Read, _) | (Some(_), Access::Read, None) => None,
            (Some(gate), Access::Write, None) => {
                return Err(Problem::new(
                    Reason::MissingToken,
                    format!(
                        "a write to domain `{}` needs the `{}` header",
                        gate.name, self.fencing_header
                    ),
                ));
            }
            (Some(gate), access, Some(token)) => {
                if access == Access::Write {
                    let destination = self.check_destination(&request, gate, token)?;
                    self.check_subtree(&request, path, destination.as_ref(), gate, token)?;
                }
                gate.admit(token, access).await?
            }
        };
        let metrics = gate.map_or(&self.outside, |g| &g.metrics);
        self.forward(request, path, peer, ticket, metrics).await
    }

    /// Refusals that need no domain: CONNECT, oversized heads, and a
    /// `Connection` header that would strip the token or `Host`.
    fn screen(&self, request: &Request<Incoming>) -> Result<(), Problem> {
        if request.method() == Method::CONNECT {
            return Err(Problem::new(
                Reason::MethodNotAllowed,
                "CONNECT is not supported: fencegate never tunnels",
            ));
        }
        let uri = request.uri();
        let mut hosts = 0;
        let head_bytes = request.method().as_str().len()
            + uri.path_and_query().map_or(1, |p| p.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len() + 8)
            + 12
            + request
                .headers()
                .iter()
                .map(|(k, v)| {
                    hosts += usize::from(k == HOST);
                    k.as_str().len() + v.len() + 4
                })
                .sum::<usize>();
        if head_bytes > self.max_header_bytes {
            return Err(Problem::new(
                Reason::HeaderTooLarge,
                format!(
                    "the request head has {head_bytes} bytes, more than the limit of {}",
                    self.max_header_bytes
                ),
            ));
        }
        // RFC 9112 §3.2: which of two would the store take? And an
        // HTTP/1.1 request names its host.
        if hosts > 1 || (hosts == 0 && request.version() == Version::HTTP_11) {
            return Err(Problem::new(
                Reason::BadRequest,
                match hosts {
                    0 => "an HTTP/1.1 request needs a Host header",
                    _ => "the Host header was given more than once",
                },
            ));
        }
        // hyper undoes `chunked` only, and refuses a request whose last
        // coding is not `chunked`; any coding before it would reach the
        // store undone, as if it were the content (RFC 9112 §6.1).
        if request.body().size_hint().exact().is_none() {
            let codings = request.headers().get_all(TRANSFER_ENCODING).iter();
            if let Some(other) = codings
                .flat_map(|value| list_items(value.as_bytes()))
                .find(|coding| !coding.eq_ignore_ascii_case(b"chunked"))
            {
                return Err(Problem::new(
                    Reason::NotImplemented,
                    format!(
                        "the transfer coding `{}` is not supported: only `chunked` is",
                        String::from_utf8_lossy(other)
                    ),
                ));
            }
        }
        check_connection(request.headers(), &self.fencing_header).map_err(|named| {
            Problem::new(
                Reason::BadRequest,
                format!(
                    "the Connection header names `{}`, which fencegate must forward",
                    named.0
                ),
            )
        })
    }

    /// A read only if its method is a read method and nothing overrides it.
    fn access(&self, request: &Request<Incoming>) -> Access {
        // A scan of the few names a request has costs less than hashing
        // each override's name for a lookup.
        let overridden = request.headers().keys().any(is_method_override);
        if !overridden && self.read_methods.contains(request.method()) {
            Access::Read
        } else {
            Access::Write
        }
    }

    /// A DELETE or MOVE of a collection removes everything under it, and
    /// a COPY or MOVE onto one replaces everything under it (WebDAV's
    /// `Overwrite: T`, the default): a collection that holds another
    /// domain's prefix would have that domain's paths changed with this
    /// domain's token, so it is refused like a `Destination` outside the
    /// domain.
    fn check_subtree(
        &self,
        request: &Request<Incoming>,
        path: &NormalPath,
        destination: Option<&NormalPath>,
        gate: &Gate,
        token: Token,
    ) -> Result<(), Problem> {
        // The method the store may act on: the request line's, or any a
        // method-override header names (a store that honours one deletes
        // `/d/` for `POST /d/` overridden to DELETE).
        let overrides = request
            .headers()
            .iter()
            .filter(|(name, _)| is_method_override(name))
            .flat_map(|(_, value)| list_items(value.as_bytes()));
        let (mut source, mut target) = (None, None);
        for method in std::iter::once(request.method().as_str().as_bytes()).chain(overrides) {
            if method.eq_ignore_ascii_case(b"DELETE") {
                source = Some(path);
            } else if method.eq_ignore_ascii_case(b"MOVE") {
                (source, target) = (Some(path), destination);
            } else if method.eq_ignore_ascii_case(b"COPY") {
                target = destination;
            }
        }
        for (collection, role) in [(source, "source"), (target, "Destination")] {
            let Some(collection) = collection else {
                continue;
            };
            if let Some(other) = self.gates.nested_in(collection, gate) {
                return Err(gate.problem(
                    Reason::CrossDomain,
                    token,
                    format!(
                        "the {} {role} `{collection}` holds domain `{}` (`{}`), whose paths it would change",
                        request.method(),
                        other.name,
                        other.prefix
                    ),
                ));
            }
        }
        Ok(())
    }

    /// COPY and MOVE must stay in their domain; their `Destination` is
    /// normalized like the path and forwarded in that form. Returns it,
    /// normalized, if there is one.
    fn check_destination(
        &self,
        request: &Request<Incoming>,
        gate: &Gate,
        token: Token,
    ) -> Result<Option<NormalPath>, Problem> {
        let mut values = request.headers().get_all(&DESTINATION).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(Problem::new(
                Reason::BadRequest,
                "the Destination header was given more than once",
            ));
        }
        let (path, _) = normalized_destination(value).map_err(|e| Problem::new(Reason::BadPath, e))?;
        match self.gates.find(&path) {
            Some(other) if std::ptr::eq(other.as_ref(), gate) => Ok(Some(path)),
            _ => Err(gate.problem(
                Reason::CrossDomain,
                token,
                format!("the Destination `{path}` lies outside domain `{}`", gate.name),
            )),
        }
    }

    /// Sends an admitted request to the store and streams its answer back.
    async fn forward(
        &self,
        request: Request<Incoming>,
        path: &NormalPath,
        peer: &Peer,
        ticket: Option<Ticket>,
        metrics: &DomainMetrics,
    ) -> Result<Response<ProxyBody>, Problem> {
        let (mut parts, body) = request.into_parts();
        let client_version = parts.version;
        parts.uri = self.upstream.uri(std::mem::take(&mut parts.uri), path);
        parts.version = Version::HTTP_11;
        if let Some(destination) = parts.headers.get(&DESTINATION) {
            let (_, rewritten) =
                normalized_destination(destination).map_err(|e| Problem::new(Reason::BadPath, e))?;
            parts.headers.insert(DESTINATION, rewritten);
        }
        let hop = RequestHop::new(&parts.headers, peer);
        // Only a body of unknown length (chunked) can end in trailers.
        let trailers = body.size_hint().exact().is_none().then(|| TrailerRules {
            fencing_header: self.fencing_header.clone(),
            connection_named: hop.connection_named().to_vec(),
        });
        // Even a request without a body is complete only once its head is
        // written (`pool::Outgoing`): until then a raise aborts it (rule
        // 4a), while it waits for a connection too.
        let exchange = Exchange::new(ticket, trailers);
        let body = GuardedBody::new(body, self.upstream.body_idle_timeout).forwarding(exchange.clone());
        let sent_at = Instant::now();
        let request = Request::from_parts(parts, body);
        let result = if exchange.holds_ticket() {
            // A write's exchange holds the ticket until the store's response
            // head (or the timeout that cuts the connection). A client that
            // goes away must not release the barrier while its write is
            // still at the store, so if this handler is dropped, the
            // exchange finishes in a task of its own.
            let upstream = self.upstream.clone();
            let task_exchange = exchange.clone();
            Detachable::new(
                async move { upstream.send(request, &hop, &task_exchange).await },
                &exchange,
                metrics,
            )
            .await
        } else {
            // A read holds back no raise: it may simply end with its client.
            self.upstream.send(request, &hop, &exchange).await
        };
        count_barrier_timeout(&result, &exchange, &metrics.barrier_timeouts);
        metrics.upstream_duration.observe(sent_at.elapsed().as_secs_f64());
        let response = result.map_err(forward_problem)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Problem::new(
                Reason::UpstreamBadResponse,
                "the store switched protocols, which fencegate never tunnels",
            ));
        }
        // The codec kept only the end-to-end headers.
        let (parts, body) = response.into_parts();
        let body = GuardedBody::new(body, self.upstream.body_idle_timeout);
        let mut response = Response::from_parts(parts, Either::Right(body));
        if response.body().size_hint().exact().is_none() {
            // Of unknown length, the answer to an HTTP/1.0 client ends
            // with the connection.
            closing_for(client_version, &mut response);
        }
        Ok(response)
    }
}

/// Makes `response`, which ends its connection, say so and only so to an
/// HTTP/1.0 client. To one that asked for keep-alive, hyper appends
/// `keep-alive` to the `Connection` of a response it takes for HTTP/1.1
/// (a refusal's `close, keep-alive`; a close-delimited answer's
/// `keep-alive`), and a client that looks for `keep-alive` takes the
/// connection for one that stays open. An HTTP/1.0 response gets no such
/// token, and hyper closes its connection unless it says `keep-alive`.
fn closing_for<B>(client_version: Version, response: &mut Response<B>) {
    if client_version == Version::HTTP_10 {
        *response.version_mut() = Version::HTTP_10;
    }
}

/// A write's exchange with the store: it runs inline, and is moved to a
/// task of its own if it is dropped before it finished, so it always runs
/// to its end. Cheaper than spawning every write's exchange for the rare
/// client that disconnects. A detached write stays counted in
/// `fencegate_inflight_requests` until its end (the handler's own count
/// ends with the handler), and a cut at `request_timeout` is counted there
/// as it is inline.
struct Detachable<'a, F>
where
    F: Future<Output = Result<Response<StoreBody>, ForwardError>> + Send + 'static,
{
    future: Option<Pin<Box<F>>>,
    exchange: &'a Arc<Exchange>,
    metrics: &'a DomainMetrics,
}

impl<'a, F> Detachable<'a, F>
where
    F: Future<Output = Result<Response<StoreBody>, ForwardError>> + Send + 'static,
{
    fn new(future: F, exchange: &'a Arc<Exchange>, metrics: &'a DomainMetrics) -> Detachable<'a, F> {
        Detachable {
            future: Some(Box::pin(future)),
            exchange,
            metrics,
        }
    }
}

impl<F> Future for Detachable<'_, F>
where
    F: Future<Output = Result<Response<StoreBody>, ForwardError>> + Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let inner = self.future.as_mut().expect("polled after it finished");
        let output = std::task::ready!(inner.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for Detachable<'_, F>
where
    F: Future<Output = Result<Response<StoreBody>, ForwardError>> + Send + 'static,
{
    fn drop(&mut self) {
        if let Some(unfinished) = self.future.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                // Cloned only here: detaching is rare, every write is not.
                let exchange = self.exchange.clone();
                let inflight = self.metrics.inflight.clone();
                let barrier_timeouts = self.metrics.barrier_timeouts.clone();
                inflight.inc();
                runtime.spawn(async move {
                    let result = unfinished.await;
                    count_barrier_timeout(&result, &exchange, &barrier_timeouts);
                    inflight.dec();
                });
            }
        }
    }
}

/// Counts a write cut at `request_timeout` while a raise waited for it
/// (its own, or, pipelined, that of a write ahead of it on its
/// connection): the one exception to the guarantee
/// (`fencegate_barrier_timeouts_total`).
fn count_barrier_timeout<T>(
    result: &Result<T, ForwardError>,
    exchange: &Exchange,
    barrier_timeouts: &prometheus::IntCounter,
) {
    let cut = matches!(
        result,
        Err(ForwardError::Timeout(_) | ForwardError::CutBehindTimeout(_))
    );
    if cut && exchange.is_fenced() {
        barrier_timeouts.inc();
    }
}

/// Counts a write in `fencegate_inflight_requests` until dropped.
struct InflightGuard<'a>(&'a prometheus::IntGauge);

impl<'a> InflightGuard<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> InflightGuard<'a> {
        gauge.inc();
        InflightGuard(gauge)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The Destination header's normalized path, and the header rewritten
/// with it (the form that is judged is the form that is forwarded).
fn normalized_destination(value: &HeaderValue) -> Result<(NormalPath, HeaderValue), String> {
    let uri = http::Uri::try_from(value.as_bytes()).map_err(|e| format!("Destination: {e}"))?;
    let path = normalize(uri.path()).map_err(|e| format!("Destination: {e}"))?;
    let text = match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}{path}"),
        _ => path.to_string(),
    };
    let header = HeaderValue::from_str(&text).map_err(|e| format!("Destination: {e}"))?;
    Ok((path, header))
}

fn forward_problem(e: ForwardError) -> Problem {
    let reason = match e {
        ForwardError::Connect(_) | ForwardError::Failed(_) | ForwardError::CutBehindTimeout(_) => {
            Reason::UpstreamUnreachable
        }
        ForwardError::Timeout(_) | ForwardError::Stalled(_) => Reason::UpstreamTimeout,
        ForwardError::Fenced => Reason::StaleEpoch,
        ForwardError::BadResponse(_) => Reason::UpstreamBadResponse,
        ForwardError::ClientBody(_) => Reason::BadRequest,
    };
    let detail = match e {
        ForwardError::Connect(_) => format!("{e}; nothing was sent"),
        _ => e.to_string(),
    };
    Problem::new(reason, detail)
}

fn log_refusal(problem: &Problem) {
    let domain = problem.domain.as_deref().unwrap_or(crate::metrics::NO_DOMAIN);
    let reason = problem.reason.as_str();
    match problem.reason {
        Reason::UpstreamUnreachable
        | Reason::UpstreamTimeout
        | Reason::UpstreamBadResponse
        | Reason::StateUnavailable => {
            tracing::warn!(domain, reason, token = problem.token, epoch = problem.epoch, detail = %problem.detail, "request failed");
        }
        Reason::StaleEpoch
        | Reason::SupersededLeader
        | Reason::NotLeader
        | Reason::NoLeader
        | Reason::CoordinatorUnavailable
        | Reason::CoordinatorRegressed => {
            tracing::info!(
                domain,
                reason,
                token = problem.token,
                epoch = problem.epoch,
                "write refused"
            );
        }
        _ => tracing::debug!(domain, reason, detail = %problem.detail, "request refused"),
    }
}
