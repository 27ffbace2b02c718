//! Graceful shutdown of one serving thread's client connections: when the
//! thread stops, each connection finishes the request it is serving,
//! then closes, and the thread waits for the last one.
//!
//! hyper-util's `GracefulShutdown` does the same through a watch channel
//! whose change every connection polls each time it is polled: 360
//! instructions of a read's 21,400, three polls per request
//! (bench/RESULTS.md, step 18). Here a connection reads one flag per poll;
//! the stop wakes every connection once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use slab::Slab;
use tokio::sync::Notify;

/// The connections of one serving thread.
#[derive(Default)]
pub struct Connections {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// One entry per watched connection, with its task's waker once it has
    /// been polled.
    connections: Mutex<Slab<Option<Waker>>>,
    /// Told when the last connection ends.
    emptied: Notify,
}

impl Connections {
    /// A set with no connection yet.
    pub fn new() -> Connections {
        Connections::default()
    }

    /// `connection`, shut down gracefully when [`Connections::stop`] is called.
    pub fn watch<C: GracefulConnection>(&self, connection: C) -> Watched<C> {
        let key = self.shared.connections.lock().expect("drain lock").insert(None);
        Watched {
            connection: Box::pin(connection),
            shared: self.shared.clone(),
            key,
            registered: false,
            told: false,
        }
    }

    /// The number of connections still open.
    pub fn count(&self) -> usize {
        self.shared.connections.lock().expect("drain lock").len()
    }

    /// Tells every connection to finish, and waits until all have ended.
    pub async fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, waker) in self.shared.connections.lock().expect("drain lock").iter_mut() {
            if let Some(waker) = waker.take() {
                waker.wake();
            }
        }
        loop {
            let emptied = self.shared.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

/// A connection that finishes its request and closes when its thread stops.
pub struct Watched<C> {
    connection: Pin<Box<C>>,
    shared: Arc<Shared>,
    key: usize,
    /// Whether its task's waker is where `stop` finds it.
    registered: bool,
    /// Whether hyper was told to shut the connection down.
    told: bool,
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.told {
            // The task's waker is kept once (a task's waker does not
            // change); the flag is read after it, and `stop` sets the flag
            // before it takes the wakers, so no connection misses the stop.
            if !this.registered {
                this.shared.connections.lock().expect("drain lock")[this.key] = Some(cx.waker().clone());
                this.registered = true;
            }
            if this.shared.stopping.load(Ordering::SeqCst) {
                this.told = true;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        this.connection.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        let mut connections = self.shared.connections.lock().expect("drain lock");
        connections.remove(self.key);
        if connections.is_empty() {
            self.shared.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A hyper connection over an in-memory pipe that answers every
    /// request with 200 after `delay`.
    fn connection(
        io: tokio::io::DuplexStream,
        delay: Duration,
    ) -> impl GracefulConnection<Error = hyper::Error> {
        let service = hyper::service::service_fn(move |_request| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        });
        hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(io), service)
    }

    #[tokio::test]
    async fn a_stop_lets_the_request_in_flight_finish_then_closes_every_connection() {
        let connections = Connections::new();
        let (mut busy, busy_server) = tokio::io::duplex(4096);
        let (mut idle, idle_server) = tokio::io::duplex(4096);
        tokio::spawn(connections.watch(connection(busy_server, Duration::from_millis(300))));
        tokio::spawn(connections.watch(connection(idle_server, Duration::ZERO)));
        assert_eq!(connections.count(), 2);
        busy.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), connections.stop())
            .await
            .expect("every connection ended");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "the request in flight was cut short"
        );
        assert_eq!(connections.count(), 0);
        let mut answer = String::new();
        busy.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        let mut rest = Vec::new();
        assert_eq!(
            idle.read_to_end(&mut rest).await.unwrap(),
            0,
            "the idle connection is closed"
        );
    }

    #[tokio::test]
    async fn a_connection_first_polled_after_the_stop_closes_too() {
        let connections = Arc::new(Connections::new());
        let (mut client, server) = tokio::io::duplex(4096);
        let watched = connections.watch(connection(server, Duration::ZERO));
        let stopping = connections.clone();
        let stopped = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), stopping.stop())
                .await
                .is_ok()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !stopped.is_finished(),
            "the stop waits for the connection not yet polled"
        );
        tokio::spawn(watched);
        assert!(
            stopped.await.unwrap(),
            "the stop ended once the late connection closed"
        );
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
