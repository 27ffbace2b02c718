//! Connections to the store that a raise can cut. Aborting a write whose
//! body is not sent whole must stop its bytes at once, even when the store
//! is not reading and the write is blocked on a full socket buffer. Each
//! connection comes with a [`KillHandle`]; killing it resets the
//! connection at once (the kernel drops what it still holds to send),
//! fails its next I/O, wakes whoever waits on it, and the pool never hands
//! it out again.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::BytesMut;
use rustix::event::{PollFd, PollFlags, Timespec};
use tokio::io::Interest;
use tokio::net::TcpStream;

struct Switch {
    /// The connection, to reset on a kill.
    wire: Weak<Wire>,
    killed: AtomicBool,
    /// The tasks waiting to read and to write: after an early answer the
    /// rest of a request body is written by another task than the one
    /// reading the response.
    reader: AtomicWaker,
    writer: AtomicWaker,
    /// Bytes the kernel took from this connection so far.
    written: AtomicU64,
}

/// Cuts one connection to the store.
#[derive(Clone)]
pub struct KillHandle(Arc<Switch>);

impl KillHandle {
    /// Resets the connection, makes it fail at its next I/O and wakes its
    /// tasks.
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::SeqCst);
        if let Some(wire) = self.0.wire.upgrade() {
            // connect(AF_UNSPEC) on a connected TCP socket is Linux's
            // tcp_disconnect: a reset is sent and the send queue purged
            // now, whoever still holds the socket (after an early answer
            // the response body does, and it may not be read for a while).
            // Closing it would wait for every holder; SO_LINGER 0 resets
            // it then too.
            let _ = rustix::net::connect_unspec(&wire.stream);
        }
        self.0.reader.wake();
        self.0.writer.wake();
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

/// A TCP connection to the store with a kill switch. Reads and writes
/// take `&self`, so one task may write while another reads.
pub struct Wire {
    stream: TcpStream,
    switch: Arc<Switch>,
}

impl Wire {
    /// Fails once killed; otherwise registers `waker` to wake on a kill.
    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> io::Result<()> {
        waker.register(cx.waker());
        if !self.switch.killed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // `kill` has reset the socket already: the kernel dropped what was
        // still queued to send.
        Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection cut by a raise",
        ))
    }

    /// Reads what the socket has into `buf`; 0 at the end of the stream.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        self.check(&self.switch.reader, cx)?;
        crate::codec::reserve_for_read(buf);
        let room = buf.capacity() - buf.len();
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            // A read that leaves room in the buffer drained the socket, so
            // its readiness is cleared as tokio's own `poll_read` does
            // (an edge-triggered socket reports new bytes anew): the next
            // wait goes to epoll instead of costing a read that finds
            // nothing, and an idle connection's readiness means that
            // something arrived (see `is_reusable`). A closure's
            // `WouldBlock` is what clears it.
            let mut drained = None;
            let result = self.stream.try_io(Interest::READABLE, || {
                let n = self.stream.try_read_buf(buf)?;
                if n > 0 && n < room {
                    drained = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (drained, result) {
                (Some(n), _) => return Poll::Ready(Ok(n)),
                // The readiness was stale and is now cleared.
                (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (None, result) => return Poll::Ready(result),
            }
        }
    }

    /// Writes from `bufs`, in order, as much as the socket takes.
    pub fn poll_write(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.check(&self.switch.writer, cx)?;
        let written = crate::socket::poll_send(&self.stream, cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.switch.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        written
    }

    /// Whether the kernel holds nothing unsent of what was written to
    /// this connection: every byte has gone out to the store (though
    /// maybe not yet been acknowledged), or the connection failed or was
    /// cut, which dropped what was unsent. One `poll` system call: with
    /// TCP_NOTSENT_LOWAT at one byte (see [`connect`]) the socket polls
    /// writable only when nothing is unsent.
    pub fn nothing_unsent(&self) -> bool {
        let mut fds = [PollFd::new(&self.stream, PollFlags::OUT)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(_) => fds[0]
                .revents()
                .intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP),
            // Not knowing is not nothing.
            Err(_) => false,
        }
    }

    /// Resolves once [`Wire::nothing_unsent`] holds. The kernel wakes epoll
    /// when the last unsent byte goes out (the poll that found some left
    /// asked it to).
    pub async fn sent_out(&self) {
        // tokio's write readiness may be stale; the poll is the truth, and
        // its `WouldBlock` clears the readiness for the next wait.
        let _ = self
            .stream
            .async_io(Interest::WRITABLE, || match self.nothing_unsent() {
                true => Ok(()),
                false => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            })
            .await;
    }

    /// Whether an idle connection may carry a request: not cut, and
    /// nothing arrived on it while idle (the store's close, or bytes no
    /// request asked for). Uses the readiness the runtime already has, so
    /// a live connection costs no system call; a close the runtime has not
    /// yet taken from epoll is missed, as it was with hyper's connection
    /// task (the request then fails as sent, or is resent if nothing of it
    /// was written).
    pub fn is_reusable(&self) -> bool {
        if self.switch.killed.load(Ordering::SeqCst) {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// TCP_NOTSENT_LOWAT: the kernel takes more of a request only when it
/// holds none of it unsent, so it never holds more than one write's worth
/// (one segment buffer, 64 KiB at most) that has not gone out, and the
/// socket polls writable only with nothing unsent ([`Wire::nothing_unsent`]).
/// Bytes in flight do not count: the link stays full.
const NOT_SENT_LIMIT: u32 = 1;

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
) -> Result<(Arc<Wire>, KillHandle), ConnectError> {
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
    // Every close of a store connection is a reset: fencegate closes one
    // only when idle, after an error, or after a finished exchange, and on the
    // error paths (an aborted or failed body) the bytes still queued must
    // be dropped, not delivered late.
    let socket = socket2::SockRef::from(&stream);
    socket
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| ConnectError::Io(address(), e))?;
    // The kernel keeps little of a request not yet sent; the rest waits
    // in fencegate (see `pool::MAX_QUEUED`), where a raise can drop it, an
    // early answer is seen as one, and `written` follows what the store
    // takes rather than what the send buffer grew to hold (it grows to
    // `tcp_wmem`'s maximum, 4 MiB by default). And whether the kernel
    // still holds any of a write unsent is one poll away.
    socket
        .set_tcp_notsent_lowat(NOT_SENT_LIMIT)
        .map_err(|e| ConnectError::Io(address(), e))?;
    let wire = Arc::new_cyclic(|wire| Wire {
        stream,
        switch: Arc::new(Switch {
            wire: wire.clone(),
            killed: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
            written: AtomicU64::new(0),
        }),
    });
    let kill = KillHandle(wire.switch.clone());
    Ok((wire, kill))
}
