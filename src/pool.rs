//! The connections to the store of one serving thread, kept open between
//! requests. Each worker has its own [`Pool`] (see [`crate::server`]), so
//! its lock is never contended and a request, its connection and the task
//! that drives the connection stay on one thread.
//!
//! hyper drives each connection in a task of its own; the pool holds the
//! sending half. A connection is offered back when its response body was
//! read to its end, and enters the pool only once hyper says it is ready
//! for another request: the request may still be queued in hyper's write
//! buffer behind a store that answered early and stopped reading, and a
//! checkout must never wait behind another exchange (it would wait with no
//! timeout, and a lower write could reach the store after a raise). Until
//! then a small task waits for it; most connections are ready at once. A
//! connection that was cut, failed or abandoned halfway is dropped, which
//! closes it. Idle connections are reused most recently used first, and
//! dropped after `idle_timeout` unused, at the next checkout or return
//! (there is no reaper: the store's keep-alive timeout closes an idle
//! connection, and hyper then ends it).

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
use tokio::time::Sleep;

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
            // Only ready connections enter the pool; one that is not ready
            // any more was closed by the store meanwhile, and is dropped.
            if conn.sender.is_ready()
                && !conn.kill.is_killed()
                && idle.since.elapsed() <= self.shared.idle_timeout
            {
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
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
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

    /// This connection's timer, for the exchange that holds it to set.
    pub fn timer(&mut self) -> Pin<&mut Sleep> {
        self.timer.as_mut()
    }

    /// This connection's timer, set to expire `timeout` from now.
    pub fn request_timer(&mut self, timeout: Duration) -> Pin<&mut Sleep> {
        let mut timer = self.timer.as_mut();
        timer.as_mut().reset(tokio::time::Instant::now() + timeout);
        timer
    }

    /// Sends `request`; if no byte of it was written, the error gives it back.
    pub fn send(
        &mut self,
        request: Request<UpstreamBody>,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>>
    {
        self.sender.try_send_request(request)
    }

    /// Offers the connection back once its response was read whole. It
    /// enters the pool when hyper is ready to send on it again: at once
    /// when the exchange is over in both directions, else from a task that
    /// waits for that (and drops it if the connection closes instead, or
    /// stays unready for the idle timeout).
    fn recycle(mut self) {
        if self.sender.is_closed() {
            return;
        }
        if self.sender.is_ready() {
            self.enter_pool();
            return;
        }
        // Bounded: after a flush hyper may not look for a new request until
        // the store sends something, so a connection whose request tail
        // drained late can stay unready; it is then closed after the idle
        // timeout rather than kept open for as long as the store allows.
        let wait = self.pool.idle_timeout;
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(wait, self.sender.ready()).await {
                self.enter_pool();
            }
        });
    }

    /// Pools the connection unless it was cut meanwhile.
    fn enter_pool(self) {
        if self.kill.is_killed() {
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

/// A response body from the store that offers its connection back to the
/// pool once read to its end. Dropped before its end, it drops the
/// connection: the rest of the body is still on it.
pub struct PooledBody {
    body: Incoming,
    conn: Option<Conn>,
}

impl PooledBody {
    /// `body`, received on `conn`. A body that is already over offers the
    /// connection back at once.
    pub fn new(body: Incoming, conn: Conn) -> PooledBody {
        let conn = Some(conn);
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
            // Trailers end a chunked body: hyper's server stops polling
            // after them, so the end would never be seen.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || self.body.is_end_stream() => {
                self.recycle()
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

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
