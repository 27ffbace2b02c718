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

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A TCP connection as hyper's I/O, writing with `send` and `sendmsg`.
pub struct SocketIo {
    io: TokioIo<TcpStream>,
}

impl SocketIo {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> SocketIo {
        SocketIo {
            io: TokioIo::new(stream),
        }
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
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // tokio's own write is a `send`.
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let [one] = bufs {
            // A bodiless message, or a lone chunk: no vector to pass.
            return self.poll_write(cx, one);
        }
        poll_send(self.io.inner(), cx, bufs)
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
        let mut io = SocketIo::new(client);
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
