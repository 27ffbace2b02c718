//! The connections to the store of one serving thread, kept open between
//! requests. Each worker has its own [`Pool`] (see [`crate::server`]), so
//! its lock is never contended and a request, its connection and the task
//! that drives the connection stay on one thread.
//!
//! hyper drives each connection in a task of its own; the pool holds the
//! sending half. A connection goes back to the pool only when its exchange
//! is over in both directions (the request body sent whole, the response
//! body read to its end), so a connection handed out is ready at once; one
//! that was cut, failed or abandoned halfway is dropped, which closes it.
//! Idle connections are reused most recently used first, and dropped after
//! `idle_timeout` unused (the store's own keep-alive timeout usually closes
//! them sooner).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::TrySendError;

use crate::connector::{connect, ConnectError, KillHandle};
use crate::forward::UpstreamBody;

/// One serving thread's connections to the store.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    /// Oldest first; checkouts take from the back.
    idle: Mutex<VecDeque<Idle>>,
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
    sender: SendRequest<UpstreamBody>,
    kill: KillHandle,
    reused: bool,
    pool: Arc<Shared>,
}

impl Pool {
    /// A pool of connections to `host:port`.
    pub fn new(host: &str, port: u16, connect_timeout: Duration, idle_timeout: Duration) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                idle: Mutex::new(VecDeque::new()),
                host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port,
                connect_timeout,
                idle_timeout,
            }),
        }
    }

    /// A connection ready to send: the most recently used idle one, or a
    /// new one.
    pub async fn checkout(&self) -> Result<Conn, ConnectError> {
        loop {
            let Some(idle) = self.shared.idle.lock().expect("pool lock").pop_back() else {
                break;
            };
            if idle.since.elapsed() > self.shared.idle_timeout {
                // The most recent is too old, so all of them are.
                self.shared.idle.lock().expect("pool lock").clear();
                break;
            }
            let mut conn = idle.conn;
            // Ready at once unless the store closed it meanwhile (then
            // this fails and the connection is dropped).
            if conn.sender.ready().await.is_ok() && !conn.kill.is_killed() {
                conn.reused = true;
                return Ok(conn);
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Conn, ConnectError> {
        let shared = &self.shared;
        let (stream, kill) = connect(&shared.host, shared.port, shared.connect_timeout).await?;
        let address = || format!("{}:{}", shared.host, shared.port);
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|e| ConnectError::Io(address(), std::io::Error::other(e)))?;
        tokio::spawn(async move {
            // Its errors reach the exchange that was using it, if any.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "store connection closed");
            }
        });
        Ok(Conn {
            sender,
            kill,
            reused: false,
            pool: shared.clone(),
        })
    }
}

impl Conn {
    /// The switch that cuts this connection.
    pub fn kill_handle(&self) -> &KillHandle {
        &self.kill
    }

    /// Whether this connection served an earlier request: a request it
    /// could not even start may be retried on another.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Sends `request`; if no byte of it was written, the error gives it back.
    pub fn send(
        &mut self,
        request: Request<UpstreamBody>,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>>
    {
        self.sender.try_send_request(request)
    }

    /// Puts the connection back for the next request: called when its
    /// exchange is over in both directions.
    fn recycle(self) {
        if self.kill.is_killed() || self.sender.is_closed() {
            return;
        }
        let shared = self.pool.clone();
        let now = Instant::now();
        let mut idle = shared.idle.lock().expect("pool lock");
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > shared.idle_timeout)
        {
            idle.pop_front();
        }
        idle.push_back(Idle {
            conn: self,
            since: now,
        });
    }
}

/// A response body from the store that returns its connection to the pool
/// once read to its end. Dropped before its end, it drops the connection:
/// the rest of the body is still on it.
pub struct PooledBody {
    body: Incoming,
    conn: Option<Conn>,
}

impl PooledBody {
    /// `body`, on `conn` if the connection may be reused after it (the
    /// request was sent whole). A body that is already over returns the
    /// connection at once.
    pub fn new(body: Incoming, conn: Option<Conn>) -> PooledBody {
        let mut pooled = PooledBody { body, conn };
        if pooled.body.is_end_stream() {
            pooled.recycle();
        }
        pooled
    }

    fn recycle(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.recycle();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.recycle(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.recycle(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
