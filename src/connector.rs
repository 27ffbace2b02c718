//! Connections to the store that a raise can cut. Aborting a write whose
//! body is not sent whole must stop its bytes at once, even when the store
//! is not reading and hyper is blocked flushing its buffer (where it never
//! polls the body again). Each connection carries a [`KillHandle`] in its
//! metadata; killing it fails the connection's next I/O, closes the socket
//! with a reset (SO_LINGER 0) so queued bytes are dropped, and keeps it out
//! of the pool.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Default)]
struct Switch {
    killed: AtomicBool,
    waker: AtomicWaker,
    /// Bytes the kernel took from this connection so far.
    written: AtomicU64,
}

/// Cuts one connection to the store.
#[derive(Clone)]
pub struct KillHandle(Arc<Switch>);

impl KillHandle {
    /// Makes the connection fail at its next I/O and wakes its task.
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::SeqCst);
        self.0.waker.wake();
    }

    /// Cuts the connection described by `connected`, if it is one of ours,
    /// and keeps it out of the pool.
    pub fn kill_connection(connected: &Connected) {
        connected.poison();
        if let Some(handle) = KillHandle::of(connected) {
            handle.kill();
        }
    }

    /// The handle of the connection described by `connected`, if it is ours.
    pub fn of(connected: &Connected) -> Option<KillHandle> {
        let mut extensions = http::Extensions::new();
        connected.get_extras(&mut extensions);
        extensions.get::<KillHandle>().cloned()
    }

    /// Bytes written to the connection so far: how far the store has read.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }
}

/// A TCP connection to the store with a kill switch.
pub struct KillableStream {
    io: TokioIo<TcpStream>,
    switch: Arc<Switch>,
}

impl KillableStream {
    /// Fails once killed; otherwise registers the task to wake on a kill.
    fn check(&mut self, cx: &Context<'_>) -> io::Result<()> {
        self.switch.waker.register(cx.waker());
        if !self.switch.killed.load(Ordering::SeqCst) {
            return Ok(());
        } // The socket closes with a reset (SO_LINGER 0, set at connect): the
          // kernel drops what is still queued to send.
        Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection cut by a raise",
        ))
    }
}

impl KillableStream {
    fn count(&self, written: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written {
            self.switch.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl Read for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for KillableStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.count(&written);
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.count(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connection for KillableStream {
    fn connected(&self) -> Connected {
        self.io.connected().extra(KillHandle(self.switch.clone()))
    }
}

/// An [`HttpConnector`] whose connections are [`KillableStream`]s.
#[derive(Clone)]
pub struct KillableConnector(pub HttpConnector);

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<KillableStream, Box<dyn std::error::Error + Send + Sync>>> + Send>>;

impl tower::Service<Uri> for KillableConnector {
    type Response = KillableStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Uri>::poll_ready(&mut self.0, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = tower::Service::<Uri>::call(&mut self.0, uri);
        Box::pin(async move {
            let io = connecting.await?;
            // Every close of a store connection is a reset: hyper closes one
            // only when idle, after an error, or after a finished exchange,
            // and on the error paths (an aborted or failed body) the bytes
            // still queued must be dropped, not delivered late.
            socket2::SockRef::from(io.inner()).set_linger(Some(Duration::ZERO))?;
            Ok(KillableStream {
                io,
                switch: Arc::default(),
            })
        })
    }
}
