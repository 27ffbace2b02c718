//! Writing to a TCP connection with the socket system calls, for both
//! sides: hyper's I/O on the listener's connections (`SocketIo`), and
//! [`poll_send`], which the store side (`connector::Wire`) writes with.
//!
//! hyper writes a message as a vectored write (the head and each body
//! chunk a buffer of its own), and tokio turns a vectored write into
//! `writev`, which takes the file path through the kernel (file position
//! lock, permission and notification hooks) before it reaches the socket.
//! `send` and `sendmsg` go to the socket directly. In this project's
//! benchmark that took about 1 µs of kernel time off each proxied request,
//! out of 9.5 to 10.8 (bench/RESULTS.md, step 8), for the same bytes in the
//! same segments. Reads already use `recv`.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// TCP_NOTSENT_LOWAT of a client connection: the most the kernel holds
/// of an answer not yet sent. A client slower than half of it per
/// `body_idle_timeout` (about 1 KiB/s at the default 30 s) is cut as
/// stalled.
/// Bytes in flight do not count: the link stays full.
const CLIENT_NOT_SENT_LIMIT: u32 = 64 * 1024;

/// A TCP connection as hyper's I/O, writing with `send` and `sendmsg`.
/// A write the client takes nothing of for `write_stall_limit` fails.
pub struct SocketIo {
    io: TokioIo<TcpStream>,
    /// A client that stops reading its answer would otherwise hold its
    /// connection, and the store connection its answer comes from, for
    /// good: hyper stops polling the answer's body (whose idle timer bounds
    /// only the store's pauses) while the socket is full, and has no write
    /// timeout of its own.
    stall: WriteStall,
}

impl SocketIo {
    /// Wraps a connected stream; a write that waits longer than
    /// `write_stall_limit` for the client to take some of it fails.
    pub fn new(stream: TcpStream, write_stall_limit: Duration) -> SocketIo {
        // The stall clock is reset when the client takes some of a write,
        // which the kernel tells by polling the socket writable. Without a
        // limit on what it holds unsent, a full socket polls writable only
        // once a third of its send buffer drained (over a megabyte on
        // loopback, 4 MiB at tcp_wmem's maximum): a client reading 100 KB/s
        // looked stalled for seconds. With it, a client that takes half of
        // the limit is seen taking it. Failing, it only makes the clock
        // stricter, as before.
        let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(CLIENT_NOT_SENT_LIMIT);
        SocketIo {
            io: TokioIo::new(stream),
            stall: WriteStall {
                limit: write_stall_limit,
                timer: None,
                waiting: false,
            },
        }
    }

    fn poll_send_one(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // tokio's own write is a `send`.
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.stall.judge(cx, written)
    }
}

/// The clock of a write that waits for the client.
struct WriteStall {
    limit: Duration,
    /// Armed at the first write that has to wait, and reused: a client that
    /// reads as fast as it is written to costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the last write had to wait.
    waiting: bool,
}

impl WriteStall {
    /// Passes on a write's outcome, failing a write that has waited for
    /// longer than the limit since the client last took a byte.
    #[inline(always)]
    fn judge(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if written.is_ready() {
            self.waiting = false;
            return written;
        }
        self.wait(cx)
    }

    /// A write that has to wait: arms the timer if it is the first, and
    /// fails the write once the timer ran out.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let deadline = Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            timer.as_mut().reset(deadline);
            self.waiting = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing of its answer for {:?}", self.limit),
            )));
        }
        Poll::Pending
    }
}

impl Read for SocketIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for SocketIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send_one(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let [one] = bufs {
            // A bodiless message, or a lone chunk: no vector to pass.
            return this.poll_send_one(cx, one);
        }
        let written = poll_send(this.io.inner(), cx, bufs);
        this.stall.judge(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Writes `bufs` to `stream` with one `sendmsg` (MSG_NOSIGNAL: a closed
/// peer is an error, never a signal) once the socket is writable.
pub fn poll_send(stream: &TcpStream, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(stream).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)
        });
        match sent {
            // The readiness was stale; try_io cleared it, so the next
            // poll waits for the socket to drain.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_vectored_write_sends_every_buffer_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut io = SocketIo::new(client, Duration::from_secs(5));
        let parts: [&[u8]; 3] = [b"PUT / HTTP/1.1\r\n\r\n", b"body ", b"and more"];
        let mut sent = 0;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        while sent < total {
            // What is left of the three buffers after `sent` bytes.
            let mut skip = sent;
            let rest: Vec<IoSlice<'_>> = parts
                .iter()
                .filter_map(|p| {
                    let from = skip.min(p.len());
                    skip -= from;
                    (from < p.len()).then(|| IoSlice::new(&p[from..]))
                })
                .collect();
            sent += std::future::poll_fn(|cx| Pin::new(&mut io).poll_write_vectored(cx, &rest))
                .await
                .unwrap();
        }
        drop(io);
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, parts.concat());
    }
}
