//! The proxy listener: accepts connections and serves each with hyper's
//! HTTP/1.1 server, with the header read timeout and head size limit that
//! protect it from slow or oversized clients, until shutdown.
//!
//! Like nginx's workers, the listener is served by several threads, each
//! with a single-threaded event loop of its own that accepts connections
//! from the shared socket and keeps its own connections to the store. A
//! request and its exchange with the store then stay on one thread: no
//! wake-ups across threads and no shared connection pool on the data path.
//! The domains' state is shared (atomics), and so are the committer and
//! the coordinator, which run on the main runtime.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::gate::Gates;
use crate::hop::Peer;
use crate::proxy::Proxy;
use crate::socket::SocketIo;

/// Whether every connection ended within the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// All in-flight requests finished.
    Complete,
    /// The grace period ran out with requests still in flight.
    TimedOut,
}

/// How the workers ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Whether every connection drained within the grace period.
    pub drain: Drain,
    /// Whether every write had its answer from the store by then.
    pub writes_ended: bool,
}

/// Serves `listener` with `workers` threads until `stop` is cancelled, then
/// drains. `proxy` builds each worker's data path.
pub async fn serve_workers(
    listener: TcpListener,
    workers: usize,
    proxy: impl Fn() -> Proxy,
    gates: Arc<Gates>,
    settings: &ServerConfig,
    stop: CancellationToken,
) -> std::io::Result<Ended> {
    let listener = listener.into_std()?;
    let mut done = Vec::new();
    for i in 0..workers.max(1) {
        let listener = listener.try_clone()?;
        let proxy = Arc::new(proxy());
        let gates = gates.clone();
        let settings = settings.clone();
        let stop = stop.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("fencegate-worker-{i}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a worker's event loop");
                let ended = runtime.block_on(async move {
                    let shortest = proxy.shortest_timeout().min(settings.header_read_timeout);
                    let anchor = tokio::spawn(timer_anchor(anchor_period(shortest)));
                    let relays: Vec<_> = gates
                        .iter()
                        .filter_map(|gate| gate.election.clone())
                        .map(|view| tokio::spawn(async move { view.reads.relay().await }))
                        .collect();
                    let listener = TcpListener::from_std(listener).expect("a listening socket");
                    let drain = serve(listener, proxy, &settings, stop.cancelled_owned()).await;
                    // Dropping this runtime would cancel the exchanges still
                    // holding back a raise; wait for them like for the
                    // connections, so the clean mark is never a lie.
                    let writes_ended = writes_ended(&gates, settings.shutdown_grace).await;
                    anchor.abort();
                    relays.iter().for_each(tokio::task::JoinHandle::abort);
                    Ended { drain, writes_ended }
                });
                let _ = tx.send(ended);
            })?;
        done.push(rx);
    }
    let mut all = Ended {
        drain: Drain::Complete,
        writes_ended: true,
    };
    for rx in done {
        let ended = rx.await.unwrap_or(Ended {
            drain: Drain::TimedOut,
            writes_ended: false,
        });
        if ended.drain == Drain::TimedOut {
            all.drain = Drain::TimedOut;
        }
        all.writes_ended &= ended.writes_ended;
    }
    Ok(all)
}

/// Keeps a timer that expires before any timeout a request arms.
///
/// Every request arms timers: hyper's header read timeout, then fencegate's
/// connect, body idle and request timeouts. When tokio registers a timer that expires before the
/// event loop's next planned wake-up, it wakes the loop through its eventfd:
/// a `write` syscall, then an extra `epoll_wait`, on almost every request,
/// because at the moment the loop parks under load most connections wait
/// for the store and have no timer armed. A timer that always expires
/// sooner than any of those keeps the planned wake-up early enough that
/// registering them never needs the eventfd. Its price: one wake-up per
/// period per worker, idle or not.
async fn timer_anchor(period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
    }
}

/// Half the shortest timeout a request arms, at most 1 s (at least 10 ms).
fn anchor_period(shortest_timeout: Duration) -> Duration {
    (shortest_timeout / 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Waits until no write is in flight in any domain, up to `limit`.
async fn writes_ended(gates: &Gates, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if gates.iter().all(|g| g.inflight_writes() == 0) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// waits up to `settings.shutdown_grace` for open connections.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // hyper answers a bare 431 past this buffer; below it, fencegate's
        // own check answers 431 with a problem body at max_header_bytes.
        .max_buf_size((settings.max_header_bytes + 16 * 1024).max(8192))
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, most likely: back off rather
                    // than spin, and keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let client = Arc::new(Peer::new(peer));
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, client).await) }
        });
        let connection = graceful.watch(http.serve_connection(SocketIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(grace = ?settings.shutdown_grace, "stopped accepting; draining connections");
    match tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => Drain::Complete,
        Err(_) => {
            tracing::warn!(grace = ?settings.shutdown_grace, "grace period ran out with requests in flight");
            Drain::TimedOut
        }
    }
}
