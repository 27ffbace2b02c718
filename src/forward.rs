//! The store's side: a pooled HTTP/1.1 client and the sending of one
//! request with fencegate's timeouts. Requests are never retried here; the
//! pool itself resends only a request of which no byte was written.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{capture_connection, CaptureConnection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{BodyError, Exchange, GuardedBody};
use crate::config::UpstreamConfig;
use crate::connector::{KillHandle, KillableConnector};
use crate::error::causes;
use crate::gate::AbortSignal;
use crate::path::NormalPath;

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
}

/// The store and how to reach it.
pub struct Upstream {
    client: Client<KillableConnector, UpstreamBody>,
    scheme: Scheme,
    authority: Authority,
    request_timeout: Duration,
    connect_timeout: Duration,
    /// Longest pause allowed inside a body, either direction.
    pub body_idle_timeout: Duration,
}

impl Upstream {
    /// A pooled client for the store of `config` (validated: http with an authority).
    pub fn new(config: &UpstreamConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http1_preserve_header_case(false)
            .build(KillableConnector(connector));
        Upstream {
            client,
            scheme: config.url.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: config.url.authority().cloned().expect("validated upstream url"),
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

    /// The store's URI for a normalized path and the original query.
    pub fn uri(&self, path: &NormalPath, query: Option<&str>) -> Uri {
        let path_and_query = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(
                PathAndQuery::try_from(path_and_query).expect("a normalized path is a valid URI path"),
            )
            .build()
            .expect("scheme, authority and path make a URI")
    }

    /// Sends `request` and waits for the final response head. A raise in
    /// the write's domain before its body was sent whole aborts it.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        exchange: &Arc<Exchange>,
    ) -> Result<Response<Incoming>, ForwardError> {
        // Writes may need their connection cut (on a raise, a stall or a
        // timeout).
        let connection = exchange.abort_signal().map(|_| capture_connection(&mut request));
        let response = self.client.request(request);
        let deadline = async {
            if let Err(cut_short) = while_unsent(exchange, connection.as_ref(), self.body_idle_timeout).await
            {
                return cut_short;
            }
            tokio::time::sleep(self.request_timeout).await;
            // The store's outcome is unknown: the connection is cut so
            // nothing more of this write can reach the store.
            cut(connection.as_ref());
            ForwardError::Timeout(self.request_timeout)
        };
        tokio::select! {
            result = response => {
                let response = result.map_err(classify)?;
                if let (Some(connection), false) = (connection, exchange.is_sent()) {
                    guard_unsent_body(exchange.clone(), connection, self.body_idle_timeout);
                }
                Ok(response)
            }
            error = deadline => Err(error),
        }
    }
}

/// Keeps fencing a write whose store answered before its body was sent
/// whole (a store may answer early, and HTTP/1.1 lets the body go on).
/// The write still holds its place in the generation until its body ends,
/// so a raise must still be able to abort it, and a store that stops
/// reading must not hold the raise: [`while_unsent`] goes on watching, in a
/// task of its own.
fn guard_unsent_body(exchange: Arc<Exchange>, connection: CaptureConnection, idle: Duration) {
    tokio::spawn(async move {
        let _ = while_unsent(&exchange, Some(&connection), idle).await;
    });
}

/// Watches a forwarded request until its body is sent whole (or dropped),
/// then resolves. Before that, a raise in the write's domain, or a store
/// that takes none of the body for `idle`, aborts the body and cuts the
/// connection: the body may be stuck in the connection's buffer behind a
/// store that is not reading, and no byte of it may reach the store after
/// the raise. A body sent whole meanwhile is not aborted: its write waits
/// for its answer like any other.
async fn while_unsent(
    exchange: &Exchange,
    connection: Option<&CaptureConnection>,
    idle: Duration,
) -> Result<(), ForwardError> {
    let why = tokio::select! {
        biased;
        () = exchange.wait_decided() => return Ok(()),
        () = fenced(exchange.abort_signal()) => ForwardError::Fenced,
        stalled = store_stalls(exchange, connection, idle) => stalled,
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
    connection: Option<&CaptureConnection>,
    idle: Duration,
) -> ForwardError {
    let progress = || {
        let written = connection
            .and_then(|c| c.connection_metadata().as_ref().and_then(KillHandle::of))
            .map(|handle| handle.written());
        (exchange.frames(), written)
    };
    let mut seen = progress();
    loop {
        tokio::time::sleep(idle).await;
        let now = progress();
        if now == seen && !exchange.awaiting_client() {
            return ForwardError::Stalled(idle);
        }
        seen = now;
    }
}

/// Cuts the connection a request was sent on, if it is known.
fn cut(connection: Option<&CaptureConnection>) {
    if let Some(capture) = connection {
        if let Some(connected) = capture.connection_metadata().as_ref() {
            KillHandle::kill_connection(connected);
        }
    }
}

async fn fenced(fence: Option<&AbortSignal>) {
    match fence {
        Some(fence) => fence.raised().await,
        None => std::future::pending().await,
    }
}

/// Sorts a client error by where it came from.
fn classify(e: hyper_util::client::legacy::Error) -> ForwardError {
    let mut source = e.source();
    while let Some(inner) = source {
        if let Some(body) = inner.downcast_ref::<BodyError>() {
            return match body {
                BodyError::Fenced => ForwardError::Fenced,
                other => ForwardError::ClientBody(other.to_string()),
            };
        }
        source = inner.source();
    }
    if e.is_connect() {
        return ForwardError::Connect(causes(&e));
    }
    ForwardError::Failed(causes(&e))
}
