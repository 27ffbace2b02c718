//! An experiment of `bench/run` (not a contender by default): an HTTP
//! relay that pipelines the requests of many clients onto a few store
//! connections, so that the requests one serving thread reads in a turn
//! reach the store in one write, and the store's answers come back in as
//! few reads. It frames messages by `Content-Length` only (enough for the
//! benchmark's 128-byte PUTs, GETs and 204 answers), adds no header and
//! checks nothing. It answers one question: can any proxy go below the
//! bare TCP relay's cost (`examples/tcp_relay.rs`, one read and one write
//! per message on each side) on this machine, and by how much, if it gives
//! up one store connection per request in flight?
//!
//! With `--spin-ns N` it also burns N ns of CPU per request in the serving
//! thread, in user space: a second question (`PIPE_SPINS` in `bench/run`,
//! bench/RESULTS.md step 29), what each microsecond of a proxy's own work
//! per request costs in throughput when everything else is the relay's.
//!
//! `cargo run --release --example pipe_relay -- --listen 127.0.0.1:8091
//! --upstream 127.0.0.1:8081 [--workers 2] [--store-connections 1]
//! [--spin-ns 0]`

#[path = "common/relay.rs"]
mod relay;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

#[derive(Parser, Debug)]
#[command(about = "an HTTP relay that pipelines to the store (a bench/run experiment)")]
struct Cli {
    #[command(flatten)]
    relay: relay::RelayArgs,
    /// Store connections per worker, each carrying pipelined requests.
    #[arg(long, default_value_t = 1)]
    store_connections: usize,
    /// CPU time to burn per request, in user space, before it goes on.
    #[arg(long, default_value_t = 0)]
    spin_ns: u64,
}

/// One request on its way to the store, and where its answer goes.
struct Job {
    request: Bytes,
    reply: oneshot::Sender<Bytes>,
}

fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let (upstream, conns) = (cli.relay.upstream, cli.store_connections.max(1));
    let spin = Duration::from_nanos(cli.spin_ns);
    relay::serve(&cli.relay, move |listener| {
        worker(listener, upstream, conns, spin)
    })
}

async fn worker(
    listener: TcpListener,
    upstream: SocketAddr,
    conns: usize,
    spin: Duration,
) -> std::io::Result<()> {
    let mut stores = Vec::new();
    for _ in 0..conns {
        let store = TcpStream::connect(upstream).await?;
        store.set_nodelay(true)?;
        let (rd, wr) = store.into_split();
        let (jobs, jobs_rx) = mpsc::unbounded_channel::<Job>();
        let (waiting, waiting_rx) = mpsc::unbounded_channel::<oneshot::Sender<Bytes>>();
        tokio::spawn(store_writer(wr, jobs_rx, waiting));
        tokio::spawn(store_reader(rd, waiting_rx));
        stores.push(jobs);
    }
    let mut next = 0;
    loop {
        let (client, _) = listener.accept().await?;
        let _ = client.set_nodelay(true);
        let store = stores[next % stores.len()].clone();
        next += 1;
        tokio::spawn(serve(client, store, spin));
    }
}

/// Reads a client's requests one by one, hands each to the store
/// connection, and writes its answer back.
async fn serve(mut client: TcpStream, store: mpsc::UnboundedSender<Job>, spin: Duration) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let whole = {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(head)) => {
                    Some(head + content_length(request.headers)).filter(|n| *n <= buf.len())
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return,
            }
        };
        let Some(n) = whole else {
            match client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        };
        burn(spin);
        let (reply, answer) = oneshot::channel();
        let request = buf.split_to(n).freeze();
        if store.send(Job { request, reply }).is_err() {
            return;
        }
        let Ok(answer) = answer.await else { return };
        if client.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Writes every request queued by the end of the serving thread's turn in
/// one write.
async fn store_writer(
    mut store: tokio::net::tcp::OwnedWriteHalf,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    waiting: mpsc::UnboundedSender<oneshot::Sender<Bytes>>,
) {
    let mut out = Vec::with_capacity(64 * 1024);
    while let Some(first) = jobs.recv().await {
        // The clients woken in this turn queue their requests first.
        tokio::task::yield_now().await;
        out.clear();
        let mut job = Some(first);
        while let Some(Job { request, reply }) = job {
            out.extend_from_slice(&request);
            if waiting.send(reply).is_err() {
                return;
            }
            job = jobs.try_recv().ok();
        }
        if store.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Reads the store's answers, in order, and hands each to its request.
async fn store_reader(
    mut store: tokio::net::tcp::OwnedReadHalf,
    mut waiting: mpsc::UnboundedReceiver<oneshot::Sender<Bytes>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            let whole = {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut answer = httparse::Response::new(&mut headers);
                match answer.parse(&buf) {
                    Ok(httparse::Status::Complete(head)) => {
                        let body = match answer.code {
                            Some(204 | 304) => 0,
                            _ => content_length(answer.headers),
                        };
                        Some(head + body).filter(|n| *n <= buf.len())
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(_) => return,
                }
            };
            let Some(n) = whole else { break };
            let answer = buf.split_to(n).freeze();
            let Some(reply) = waiting.recv().await else {
                return;
            };
            let _ = reply.send(answer);
        }
        match store.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Busy-waits `spin` on the monotonic clock (read in user space, through
/// the vDSO), standing for a proxy's own work on a request. A preemption
/// during the wait counts as spent, so under contention it burns a little
/// less than `spin`.
fn burn(spin: Duration) {
    if spin.is_zero() {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < spin {
        std::hint::spin_loop();
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}
