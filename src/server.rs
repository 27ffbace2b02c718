//! The proxy listener: accepts connections and serves each with hyper's
//! HTTP/1.1 server, with the header read timeout and head size limit that
//! protect it from slow or oversized clients, until shutdown.
//!
//! Like nginx's workers, connections are served by several threads, each
//! with a single-threaded event loop of its own that keeps its own
//! connections to the store. A request and its exchange with the store
//! then stay on one thread: no wake-ups across threads and no shared
//! connection pool on the data path. The domains' state is shared
//! (atomics), and so are the committer and the coordinator, which run on
//! the main runtime.
//!
//! One acceptor, on the main runtime, hands each new connection to the
//! worker with the fewest open connections. Workers that accepted from the
//! shared socket themselves split a burst of connections by who woke
//! first: the first to wake took the whole backlog, and in 6 of 12 runs
//! of wrk's 64 keep-alive connections one thread served all of them while
//! the other idled (bench/RESULTS.md, step 12).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::affinity;
use crate::config::ServerConfig;
use crate::drain::Connections;
use crate::gate::Gates;
use crate::hop::Peer;
use crate::proxy::Proxy;
use crate::socket::SocketIo;
use crate::timer::Clock;

/// Whether every connection ended within the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// All in-flight requests finished.
    Complete,
    /// The grace period ran out with requests still in flight.
    TimedOut,
    /// The drain was ended early ([`Stop::hurry`]) with requests still in
    /// flight.
    Cut,
}

/// When the workers stop.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// Stop taking connections, and drain the open ones for up to
    /// `shutdown_grace`.
    pub begin: CancellationToken,
    /// End that drain now: the connections still open are closed when
    /// their serving threads end.
    pub hurry: CancellationToken,
}

/// How the workers ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Whether every connection drained within the grace period.
    pub drain: Drain,
    /// Whether every write had its answer from the store by then.
    pub writes_ended: bool,
}

/// Serves `listener` with `workers` threads until `stop` begins, then
/// drains (until it hurries). `proxy` builds each worker's data path.
/// With `cpus` (from [`affinity::placement`]), worker `i` is pinned to
/// `cpus[i]`.
pub async fn serve_workers(
    listener: TcpListener,
    workers: usize,
    cpus: Option<Vec<usize>>,
    proxy: impl Fn() -> Proxy,
    gates: Arc<Gates>,
    settings: &ServerConfig,
    stop: Stop,
) -> std::io::Result<Ended> {
    let workers = workers.max(1);
    if let Some(cpus) = &cpus {
        tracing::info!(?cpus, "pinning the serving threads to these CPUs, in order");
    }
    let open: Arc<[AtomicUsize]> = (0..workers).map(|_| AtomicUsize::new(0)).collect();
    // Every event loop is built before the first connection is taken, so a
    // start short of file descriptors fails here, with its error, instead
    // of a serving thread dying on it later.
    let runtimes = (0..workers)
        .map(|_| tokio::runtime::Builder::new_current_thread().enable_all().build())
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut inboxes = Vec::with_capacity(workers);
    let mut done = Vec::new();
    for (i, runtime) in runtimes.into_iter().enumerate() {
        let (inbox, arrivals) = mpsc::unbounded_channel();
        inboxes.push(inbox);
        let proxy = Arc::new(proxy());
        let gates = gates.clone();
        let settings = settings.clone();
        let stop = stop.clone();
        let open = OpenCount {
            open: open.clone(),
            worker: i,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cpu = cpus.as_ref().and_then(|cpus| cpus.get(i).copied());
        std::thread::Builder::new()
            // Within the 15 bytes Linux keeps of a thread's name (`/proc`, `top -H`).
            .name(format!("fg-worker-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = affinity::pin_current_thread(cpu) {
                        // It serves all the same, where the kernel places it.
                        tracing::warn!(worker = i, cpu, error = %e, "could not pin a serving thread");
                    }
                }
                let ended = runtime.block_on(async move {
                    let clock = Clock::new(proxy.shortest_timeout().min(settings.header_read_timeout));
                    let anchor = tokio::spawn(clock.clone().run());
                    let relays: Vec<_> = gates
                        .iter()
                        .filter_map(|gate| gate.election.clone())
                        .map(|view| tokio::spawn(async move { view.reads.relay().await }))
                        .collect();
                    let (drain, deadline) = serve(arrivals, open, proxy, &settings, clock, &stop).await;
                    // Dropping this runtime would cancel the exchanges still
                    // holding back a raise; wait for them like for the
                    // connections, so the clean mark is never a lie, within
                    // the same grace period.
                    let writes_ended = writes_ended(&gates, deadline, &stop.hurry).await;
                    anchor.abort();
                    relays.iter().for_each(tokio::task::JoinHandle::abort);
                    Ended { drain, writes_ended }
                });
                let _ = tx.send(ended);
            })?;
        done.push(rx);
    }
    accept(listener, &inboxes, &open, stop.begin.cancelled()).await;
    // Each worker stops at `stop` too; its inbox closing is the same news.
    drop(inboxes);
    let mut all = Ended {
        drain: Drain::Complete,
        writes_ended: true,
    };
    for rx in done {
        let ended = rx.await.unwrap_or(Ended {
            drain: Drain::TimedOut,
            writes_ended: false,
        });
        if ended.drain != Drain::Complete {
            all.drain = ended.drain;
        }
        all.writes_ended &= ended.writes_ended;
    }
    Ok(all)
}

/// A new connection on its way to a worker.
type Arrival = (std::net::TcpStream, SocketAddr);

/// Accepts until `stop`, handing each connection to the worker with the
/// fewest open connections.
async fn accept(
    listener: TcpListener,
    inboxes: &[mpsc::UnboundedSender<Arrival>],
    open: &[AtomicUsize],
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut next = 0;
    let mut acceptor = Acceptor::new(listener, "proxy");
    while let Some((stream, peer)) = acceptor.next(&mut stop).await {
        // Leaves this runtime's event loop for the worker's.
        let Ok(mut stream) = stream.into_std() else {
            continue;
        };
        loop {
            let worker = least_loaded(open, &mut next);
            open[worker].fetch_add(1, Ordering::Relaxed);
            match inboxes[worker].send((stream, peer)) {
                Ok(()) => break,
                Err(mpsc::error::SendError((back, _))) => {
                    // That worker's event loop is gone (it panicked): it
                    // gets nothing more, and the others still serve.
                    open[worker].store(usize::MAX / 2, Ordering::Relaxed);
                    stream = back;
                    if open.iter().all(|n| n.load(Ordering::Relaxed) >= usize::MAX / 2) {
                        tracing::error!("every serving thread has ended; not accepting");
                        return;
                    }
                }
            }
        }
    }
}

/// A listener's connections, one at a time, that rides out failed
/// accepts: out of file descriptors, most likely, it backs off rather than
/// spin (the connections already open keep being served), and logs the
/// run of failures once ([`AcceptTrouble`]). The proxy's acceptor and the
/// admin listener each have one.
pub(crate) struct Acceptor {
    listener: TcpListener,
    trouble: AcceptTrouble,
}

impl Acceptor {
    /// `name` (`proxy` or `admin`) tells the listeners apart in the log.
    pub(crate) fn new(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            trouble: AcceptTrouble::new(name),
        }
    }

    /// The next connection, or `None` once `stop` resolves: a stop already
    /// given takes no more connections.
    pub(crate) async fn next(&mut self, stop: impl Future<Output = ()>) -> Option<(TcpStream, SocketAddr)> {
        tokio::pin!(stop);
        loop {
            // No clock read and no timer unless a run of failures is ending.
            let settles = self.trouble.settles_at();
            let settled = async {
                match settles {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut stop => return None,
                () = settled => self.trouble.ended(),
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => {
                        self.trouble.accepted();
                        return Some(pair);
                    }
                    Err(e) => {
                        self.trouble.failed(&e);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    }
}

impl Drop for Acceptor {
    /// A run of failed accepts going on when the listener stops is logged
    /// as ended, if accepts had succeeded again.
    fn drop(&mut self) {
        self.trouble.ended();
    }
}

/// How long an acceptor waits after a failed accept before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How often a run of failed accepts is logged again while it lasts.
const ACCEPT_TROUBLE_LOG_EVERY: Duration = Duration::from_secs(10);

/// A run of failed accepts, logged when it starts, every
/// [`ACCEPT_TROUBLE_LOG_EVERY`] while it lasts, and when it ends: out of
/// file descriptors, the acceptor retries every [`ACCEPT_BACKOFF`], and a
/// line per retry would flood the log just when an operator reads it.
///
/// A run ends once accepts have gone on for [`ACCEPT_TROUBLE_LOG_EVERY`]
/// without failing (or the listener stops): out of files under a steady
/// stream of connections, each one that leaves frees a file, one accept
/// succeeds and the next fails again, and ending the run at each success
/// logged two lines per connection served.
struct AcceptTrouble {
    /// Which listener: `proxy` or `admin`.
    listener: &'static str,
    /// When the run began and when it was last logged, if one is going on.
    since: Option<(Instant, Instant)>,
    failures: u64,
    /// When accepts began to succeed again in the run, if none failed since.
    accepting_since: Option<Instant>,
}

impl AcceptTrouble {
    /// No trouble yet on `listener`.
    fn new(listener: &'static str) -> AcceptTrouble {
        AcceptTrouble {
            listener,
            since: None,
            failures: 0,
            accepting_since: None,
        }
    }

    /// Counts a failed accept, logging it if it begins a run (or the run
    /// was last logged [`ACCEPT_TROUBLE_LOG_EVERY`] ago).
    fn failed(&mut self, error: &std::io::Error) {
        let now = Instant::now();
        self.failures += 1;
        match &mut self.since {
            None => {
                tracing::warn!(
                    listener = self.listener, error = %error,
                    "accept failed (out of file descriptors? see `ulimit -n`); retrying every {ACCEPT_BACKOFF:?}, logged again every {ACCEPT_TROUBLE_LOG_EVERY:?} while it lasts"
                );
                self.since = Some((now, now));
            }
            Some((began, logged)) if now.duration_since(*logged) >= ACCEPT_TROUBLE_LOG_EVERY => {
                tracing::warn!(
                    listener = self.listener, error = %error, failures = self.failures, lasting = ?now.duration_since(*began),
                    "accept still failing"
                );
                *logged = now;
            }
            Some(_) => {}
        }
        self.accepting_since = None;
    }

    /// Counts an accept that succeeded: the run, if one is going on, may
    /// be ending ([`AcceptTrouble::settles_at`]).
    fn accepted(&mut self) {
        if self.since.is_some() && self.accepting_since.is_none() {
            self.accepting_since = Some(Instant::now());
        }
    }

    /// When the run ends if no accept fails before: `None` while none is
    /// ending.
    fn settles_at(&self) -> Option<tokio::time::Instant> {
        self.accepting_since
            .map(|since| tokio::time::Instant::from_std(since + ACCEPT_TROUBLE_LOG_EVERY))
    }

    /// Ends the run of failed accepts if accepts succeed again, logging
    /// it: when it settled, or when the listener stops.
    fn ended(&mut self) {
        if let (Some((began, _)), Some(accepting)) = (self.since, self.accepting_since.take()) {
            tracing::info!(
                listener = self.listener, failures = self.failures, lasted = ?accepting.duration_since(began),
                "accepting connections again"
            );
            self.since = None;
            self.failures = 0;
        }
    }
}

/// The worker with the fewest open connections; among equals, the first
/// from `next` on, so that equal workers take turns.
fn least_loaded(open: &[AtomicUsize], next: &mut usize) -> usize {
    let n = open.len();
    let start = *next % n;
    let chosen = (0..n)
        .map(|k| (start + k) % n)
        .min_by_key(|&i| open[i].load(Ordering::Relaxed))
        .expect("at least one worker");
    *next = chosen + 1;
    chosen
}

/// One worker's count of open connections, for the acceptor to compare.
#[derive(Clone)]
struct OpenCount {
    open: Arc<[AtomicUsize]>,
    worker: usize,
}

/// Counts one of a worker's connections as open until dropped.
struct Opened(OpenCount);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.open[self.0.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits until no write is in flight in any domain, up to `deadline` or
/// until `hurry`.
async fn writes_ended(gates: &Gates, deadline: tokio::time::Instant, hurry: &CancellationToken) -> bool {
    loop {
        if gates.iter().all(|g| g.inflight_writes() == 0) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline || hurry.is_cancelled() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves the connections that arrive in `arrivals` until `stop` begins
/// (or the acceptor is gone), then waits up to `settings.shutdown_grace`
/// for those still open, or until `stop` hurries. Returns the end of that
/// grace period too, which bounds the rest of the shutdown.
async fn serve(
    mut arrivals: mpsc::UnboundedReceiver<Arrival>,
    open: OpenCount,
    proxy: Arc<Proxy>,
    settings: &ServerConfig,
    clock: Clock,
    stop: &Stop,
) -> (Drain, tokio::time::Instant) {
    let shutdown = stop.begin.cancelled();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(clock.timer())
        .header_read_timeout(settings.header_read_timeout)
        // hyper answers a bare 431 past this buffer; below it, fencegate's
        // own check answers 431 with a problem body at max_header_bytes.
        .max_buf_size((settings.max_header_bytes + 16 * 1024).max(8192))
        .keep_alive(true);
    let connections = Connections::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            arrived = arrivals.recv() => match arrived {
                Some(arrival) => arrival,
                None => break,
            },
            () = &mut shutdown => break,
        };
        // The acceptor counted it; this guard uncounts it when it ends.
        let opened = Opened(open.clone());
        let Ok(stream) = TcpStream::from_std(stream) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = SocketIo::new(stream, proxy.body_idle_timeout());
        let proxy = proxy.clone();
        let client = Arc::new(Peer::new(peer));
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, client).await) }
        });
        let connection = connections.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            let _opened = opened;
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // Connections handed over but not yet taken are closed unserved.
    arrivals.close();
    drop(arrivals);
    tracing::info!(grace = ?settings.shutdown_grace, "stopped accepting; draining connections");
    let deadline = tokio::time::Instant::now() + settings.shutdown_grace;
    let drain = tokio::select! {
        // A drain that ended as the signal came is complete.
        biased;
        drained = tokio::time::timeout_at(deadline, connections.stop()) => match drained {
            Ok(()) => Drain::Complete,
            Err(_) => {
                tracing::warn!(grace = ?settings.shutdown_grace, "grace period ran out with requests in flight");
                Drain::TimedOut
            }
        },
        // The connections still open close with this serving thread.
        () = stop.hurry.cancelled() => Drain::Cut,
    };
    (drain, deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(counts: &[usize]) -> Vec<AtomicUsize> {
        counts.iter().map(|&n| AtomicUsize::new(n)).collect()
    }

    #[test]
    fn a_new_connection_goes_to_the_worker_with_the_fewest() {
        let open = loads(&[3, 1, 2]);
        let mut next = 0;
        assert_eq!(least_loaded(&open, &mut next), 1);
    }

    #[test]
    fn a_burst_of_connections_is_split_evenly() {
        // wrk opens its 64 connections at once: each worker gets 32.
        let open = loads(&[0, 0]);
        let mut next = 0;
        for _ in 0..64 {
            let chosen = least_loaded(&open, &mut next);
            open[chosen].fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(
            open.iter().map(|n| n.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            [32, 32]
        );
    }

    #[test]
    fn equal_workers_take_turns() {
        let open = loads(&[5, 5, 5]);
        let mut next = 0;
        let picks: Vec<usize> = (0..6).map(|_| least_loaded(&open, &mut next)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
