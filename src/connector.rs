//! Connections to the store that a raise can cut. Aborting a write whose
//! body is not sent whole must stop its bytes at once, even when the store
//! is not reading and hyper is blocked flushing its buffer (where it never
//! polls the body again). Each connection comes with a [`KillHandle`];
//! killing it fails the connection's next I/O and closes the socket with a
//! reset (SO_LINGER 0), so queued bytes are dropped, and the pool never
//! hands it out again.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::net::TcpStream;

use crate::socket::SocketIo;

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

    /// Whether the connection was cut.
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::SeqCst)
    }

    /// Bytes written to the connection so far: how far the store has read.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }
}

/// A TCP connection to the store with a kill switch.
pub struct KillableStream {
    io: SocketIo,
    switch: Arc<Switch>,
}

impl KillableStream {
    /// Fails once killed; otherwise registers the task to wake on a kill.
    fn check(&mut self, cx: &Context<'_>) -> io::Result<()> {
        self.switch.waker.register(cx.waker());
        if !self.switch.killed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // The socket closes with a reset (SO_LINGER 0, set at connect): the
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

/// How connecting to the store failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No connection within `connect_timeout`.
    #[error("connecting to {0} timed out after {1:?}")]
    Timeout(String, Duration),
    /// The connection failed (refused, unreachable, no such host).
    #[error("cannot connect to {0}: {1}")]
    Io(String, #[source] io::Error),
}

/// Opens a connection to `host:port` within `timeout`, and its kill switch.
/// A name with several addresses is tried address by address, each with an
/// equal share of `timeout` (as hyper-util's connector does), so one
/// address that drops packets does not use up the whole budget.
pub async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(KillableStream, KillHandle), ConnectError> {
    let address = || format!("{host}:{port}");
    let addresses: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| ConnectError::Timeout(address(), timeout))?
        .map_err(|e| ConnectError::Io(address(), e))?
        .collect();
    let share = timeout / u32::try_from(addresses.len()).unwrap_or(u32::MAX).max(1);
    let mut failure = ConnectError::Io(
        address(),
        io::Error::new(io::ErrorKind::NotFound, "the name has no address"),
    );
    let mut connected = None;
    for candidate in addresses {
        match tokio::time::timeout(share, TcpStream::connect(candidate)).await {
            Ok(Ok(stream)) => {
                connected = Some(stream);
                break;
            }
            Ok(Err(e)) => failure = ConnectError::Io(address(), e),
            Err(_) => failure = ConnectError::Timeout(address(), share),
        }
    }
    let stream = connected.ok_or(failure)?;
    stream
        .set_nodelay(true)
        .map_err(|e| ConnectError::Io(address(), e))?;
    // Every close of a store connection is a reset: hyper closes one only
    // when idle, after an error, or after a finished exchange, and on the
    // error paths (an aborted or failed body) the bytes still queued must
    // be dropped, not delivered late.
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| ConnectError::Io(address(), e))?;
    let switch = Arc::<Switch>::default();
    let stream = KillableStream {
        io: SocketIo::new(stream),
        switch: switch.clone(),
    };
    Ok((stream, KillHandle(switch)))
}
