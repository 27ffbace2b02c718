//! Pipelining to the store (opt-in: `upstream.pipeline_depth`) of small
//! whole writes and, on lanes of their own, of reads without a body
//! (`upstream.pipeline_reads`). Every other request goes through
//! [`crate::pool`], one connection per request in flight.
//!
//! A *lane* is a store connection that carries up to `depth` requests whose
//! answers have not come yet, in order (RFC 9112 §9.3.2). One `writev`
//! carries several requests, and the store reads several in one `recv`:
//! that is where the time goes (bench/RESULTS.md, steps 22 to 25). Each
//! lane has a task of its own (its *driver*) that writes what handlers
//! queued and reads the answers, in order, each whole (head and body, at
//! most [`MAX_ANSWER`] bytes for a write, [`MAX_READ_ANSWER`] for a
//! read), so that one slow reader never holds up the answers behind its
//! own; only a read's answer that streams is not read whole (below).
//!
//! What the barrier promises stays as it is, because only a request that
//! is here whole, head and body, takes a lane, and it is decided there:
//! - a request still queued (not one byte of it written) is aborted by a
//!   raise like any other, and leaves the queue;
//! - the driver decides a request sent (`Exchange::complete`) as it puts
//!   the request's bytes in the write, and only when everything decided
//!   before it is written: from then on a raise waits for its answer
//!   (rule 4b), as for a request the pool sent whole. The kernel takes
//!   the write whole unless its buffer is full; then the rest follows
//!   before anything else, and `request_timeout` bounds it like an answer
//!   (the connection is cut, and with it what was unsent);
//! - no write is ever resent: a write decided sent whose answer never
//!   comes (the store closed, or the connection was cut) fails with its
//!   outcome unknown. A request still queued on a lane that closes goes
//!   to another (not one byte of it was written, rule 6).
//!
//! Reads (GET and HEAD without a body, holding no ticket) are safe to send
//! again, so a read lane that ends with reads unanswered sends them again
//! through the pool ([`LaneError::Resend`]), as RFC 9112 §9.3.2 asks of a
//! client that pipelines, the connection reset too; only the read whose
//! own answer failed (late, malformed) fails. An answer that streams (over
//! [`MAX_READ_ANSWER`], too large to hold whole; still incomplete after
//! [`STREAM_AFTER`]; or still coming at `request_timeout`, its head in
//! time) is handed the lane's connection and streams on it
//! ([`Driver::hand_over`]); the reads behind it go again. Reads and writes
//! never share a lane: a write behind such a read would be lost with it.
//!
//! Only a request in company takes a lane ([`Pipeline::depart`]): one
//! alone has nothing to share a write call with, and the pool sends it
//! sooner.
//!
//! Costs, which is why it is opt-in: a slow answer holds up the requests
//! behind it (head-of-line blocking), a connection the store closes takes
//! the unanswered writes on it with it (so a lane retires itself after
//! `pipeline_max_requests`, which must stay below the store's own limit:
//! nginx's `keepalive_requests`, 1000 by default; or after what the store
//! said it takes in `Keep-Alive: max`), the reads behind an answer that
//! streams are sent twice, an answer the store cuts after it was seen to
//! stream reaches its client cut (as on the pool's path), and a lane opens
//! with one request and pipelines only after its first answer (RFC 9112
//! §9.3.2: the store may not keep connections open).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::body::Exchange;
use crate::codec::{self, BodyDecoder, Decoded, ResponseHead};
use crate::connector::{connect, KillHandle, Wire};
use crate::forward::ForwardError;
use crate::metrics::PipelineCounters;
use crate::pool::{Conn, HandedBody, StoreBody};

/// The largest request body a lane takes (the head comes on top); a
/// larger one goes through the pool. Bounded so that a lane's writes stay
/// well within what the kernel takes in one call.
pub const MAX_WHOLE: usize = 16 * 1024;

/// The most bytes of requests one write call carries.
const MAX_BATCH: usize = 64 * 1024;

/// The largest answer body a lane reads for one write. A larger one cuts
/// the lane: buffered whole, it would cost memory per write, and streamed
/// it would hold up every answer behind it for as long as its client reads.
pub const MAX_ANSWER: usize = 1024 * 1024;

/// How long a read's answer may stay incomplete on its lane before the
/// lane takes it for a stream and hands it its connection
/// ([`Driver::hand_over`]). The rest of an answer the store wrote in
/// pieces comes well within it; the next event of a stream, a long poll's
/// answer, or the rest of a body the store stalls on, does not. Its length
/// stated or not: a stalled answer of stated length would hold the reads
/// behind it until `request_timeout` too. The cost: an answer cut by the
/// store after it was handed over reaches its client cut, as on the pool's
/// path, where one cut sooner is sent again unseen.
const STREAM_AFTER: Duration = Duration::from_millis(50);

/// The largest answer body a read lane reads whole for one read. A read
/// may ask for anything the store holds; a larger answer streams on the
/// lane's connection ([`Driver::hand_over`]), and the reads behind it go
/// again through the pool.
pub const MAX_READ_ANSWER: usize = 64 * 1024;

/// Whether a request of this method goes on a read lane: a safe method,
/// which may be sent again when its lane ends unanswered (RFC 9110
/// §9.2.2, RFC 9112 §9.3.2).
pub fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// What a lane needs to know.
#[derive(Debug, Clone)]
pub struct LaneSettings {
    /// The store.
    pub host: String,
    /// The store's port.
    pub port: u16,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// From a request decided sent to its answer's head.
    pub request_timeout: Duration,
    /// How long an unused lane stays open.
    pub idle_timeout: Duration,
    /// Unanswered requests per lane.
    pub depth: usize,
    /// Requests per lane before it retires.
    pub max_requests: u64,
    /// Whether reads take lanes too (`upstream.pipeline_reads`).
    pub reads: bool,
    /// Counts the writes and reads lanes decide sent (one add per write
    /// call), and the reads they give back to be sent again.
    pub counters: PipelineCounters,
}

/// One serving thread's lanes. Each serving thread has its own (see
/// [`crate::server`]), so its lock is never contended.
pub struct Pipeline {
    /// Lanes for writes.
    writes: Mutex<Vec<Arc<Lane>>>,
    /// Lanes for reads, apart: a read's large or late answer ends its lane,
    /// which must not cost a write its outcome.
    reads: Mutex<Vec<Arc<Lane>>>,
    settings: Arc<LaneSettings>,
    /// Requests on their way to the store from this serving thread, by
    /// either path (see [`Pipeline::depart`]).
    departing: AtomicUsize,
}

/// A request counted on its way to the store (see [`Pipeline::depart`])
/// until this drops.
pub struct Departure<'a> {
    departing: &'a AtomicUsize,
}

impl Departure<'_> {
    /// Whether another request is on its way to the store from this
    /// serving thread now.
    pub fn in_company(&self) -> bool {
        self.departing.load(Ordering::Relaxed) > 1
    }
}

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        self.departing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request, head and body, encoded and ready to go.
pub struct Whole {
    /// The bytes to write.
    pub bytes: Bytes,
    /// How many of them are the head (its blank line included).
    pub head_len: usize,
    /// Its method (the answer to a HEAD has no body).
    pub method: Method,
    /// The request's exchange: decided sent by the lane's driver.
    pub exchange: Arc<Exchange>,
}

/// The store's answer to a pipelined request: read whole, or, a read's
/// that streams, with the lane's connection to read the rest from.
pub struct Answer {
    /// Its head.
    pub head: ResponseHead,
    /// Its body.
    pub body: StoreBody,
}

/// What a lane says of a request.
pub type Reply = Result<Answer, LaneError>;

/// Why a lane gave a request back.
#[derive(Debug)]
pub enum LaneError {
    /// Not one byte of it was written, and the lane is closing: the
    /// request may go on another.
    Unsent(Whole),
    /// It failed; the error says whether it reached the store.
    Failed(ForwardError),
    /// A read that was sent but not answered: its lane ended before its
    /// answer (or an answer ahead of it streams on the lane's connection).
    /// A safe method, it goes again through the pool.
    Resend,
}

impl std::fmt::Debug for Whole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Whole")
            .field("method", &self.method)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// A request waiting for its answer. Dropped before the lane replied (a
/// raise aborted it, or a read's client left), it takes the request out of
/// the lane's queue if not one byte of it was written: on the pool's path
/// too, a read whose handler is gone before it was sent is never sent. (A
/// write's exchange runs to its end on either path even when its client
/// leaves, `proxy::Detachable`: a client that leaves is not the end of a
/// write.)
pub struct Waiting {
    lane: Arc<Lane>,
    exchange: Arc<Exchange>,
    reply: oneshot::Receiver<Reply>,
    /// The lane replied: nothing of the request is left in its queue.
    replied: bool,
}

impl Waiting {
    /// The lane's answer, or that it gave the request back. Cancel safe.
    pub async fn reply(&mut self) -> Result<Reply, oneshot::error::RecvError> {
        let reply = (&mut self.reply).await;
        self.replied = true;
        reply
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.replied {
            return;
        }
        let mut state = self.lane.lock();
        state
            .queued
            .retain(|q| !Arc::ptr_eq(&q.whole.exchange, &self.exchange));
    }
}

impl Pipeline {
    /// No lanes yet; they open as requests come.
    pub fn new(settings: LaneSettings) -> Pipeline {
        Pipeline {
            writes: Mutex::new(Vec::new()),
            reads: Mutex::new(Vec::new()),
            settings: Arc::new(settings),
            departing: AtomicUsize::new(0),
        }
    }

    /// Whether reads take lanes too.
    pub fn takes_reads(&self) -> bool {
        self.settings.reads
    }

    /// Counts a read its lane left unanswered, going again through the
    /// pool.
    pub fn resent(&self) {
        self.settings.counters.resent.inc();
    }

    /// Counts a request on its way to the store until the departure
    /// drops. A request with no other in company has nothing to share a
    /// write call with: the pool sends it at once, where a lane would add
    /// a hop through its driver task and cost a lone writer latency
    /// (bench/RESULTS.md, step 24). The counter is this serving
    /// thread's own, so it is never contended.
    pub fn depart(&self) -> Departure<'_> {
        self.departing.fetch_add(1, Ordering::Relaxed);
        Departure {
            departing: &self.departing,
        }
    }

    /// Queues `whole` on the first lane of its kind (read or write) with
    /// room, opening one if none has. Filling lanes in order rather than
    /// spreading the requests keeps each write call carrying as many
    /// requests as there are.
    pub fn enqueue(&self, whole: Whole) -> Waiting {
        let (tx, rx) = oneshot::channel();
        let exchange = whole.exchange.clone();
        let reads = is_read(&whole.method);
        let set = if reads { &self.reads } else { &self.writes };
        let mut lanes = set.lock().expect("pipeline lock");
        lanes.retain(|lane| !lane.lock().dead);
        let depth = self.settings.depth;
        // The request goes in under the same lock that saw the room: a
        // driver ends its lane (`dead`) and takes its queue under that
        // lock, so a request pushed after a separate check could land on a
        // lane nobody serves. (Each serving thread has its own pipeline
        // and its drivers run on that thread, so today nothing runs
        // between the two; the lock is what keeps it so.)
        let mut queued = Some(Queued { whole, reply: tx });
        let mut lane = None;
        for candidate in lanes.iter() {
            let mut state = candidate.lock();
            if state.has_room(depth) {
                state.queue(queued.take().expect("queued once"));
                lane = Some(candidate.clone());
                break;
            }
        }
        let lane = lane.unwrap_or_else(|| {
            let lane = Lane::open(self.settings.clone(), reads);
            lane.lock().queue(queued.take().expect("queued once"));
            lanes.push(lane.clone());
            lane
        });
        drop(lanes);
        Waiting {
            lane,
            exchange,
            reply: rx,
            replied: false,
        }
    }
}

/// A store connection carrying pipelined requests: writes, or reads.
struct Lane {
    state: Mutex<LaneState>,
    /// A read lane: its requests may be sent again when it ends.
    reads: bool,
}

struct Queued {
    whole: Whole,
    reply: oneshot::Sender<Reply>,
}

/// A request decided sent, waiting for its answer.
struct Sent {
    method: Method,
    /// Holds a write's place in its generation until its answer is read
    /// whole (and its bytes are out of the kernel); a read's holds none.
    exchange: Arc<Exchange>,
    reply: oneshot::Sender<Reply>,
    deadline: Instant,
    /// `LaneState::decided_bytes` once its bytes were queued: its last
    /// byte has left the lane's queue once `written_bytes` reaches it.
    end: u64,
    /// Sent behind another request not yet answered: its answer waits for
    /// that one's, so part of its `request_timeout` may be spent there.
    /// On a read lane, cleared when that answer ends within the read's
    /// deadline, which then runs from there ([`Driver::parse`]).
    behind: bool,
}

#[derive(Default)]
struct LaneState {
    /// Requests not yet decided: not one byte of them written.
    queued: VecDeque<Queued>,
    /// Requests decided sent, oldest first: their answers come in this order.
    sent: VecDeque<Sent>,
    /// Bytes decided sent that the kernel has not taken yet.
    unwritten: VecDeque<Bytes>,
    /// Bytes decided sent on this lane, and bytes the kernel took.
    decided_bytes: u64,
    written_bytes: u64,
    /// Bytes known to have left the kernel too: `written_bytes` when the
    /// kernel was last seen holding nothing unsent. A lane's kernel queue
    /// may hold a later write's bytes (another domain's, say) while an
    /// earlier write's are all out: `Wire::nothing_unsent` alone would
    /// hold the earlier one's ticket, and a raise would cut the lane.
    out_bytes: u64,
    /// Requests decided sent on this lane, and answers read.
    requests: u64,
    answers: u64,
    /// The most requests the store said it takes on this connection
    /// (`Keep-Alive: max`), if it did.
    store_limit: Option<u64>,
    /// No more requests: the lane is closing (retired, or the store said
    /// it closes).
    closing: bool,
    /// The driver is gone; the lane takes nothing.
    dead: bool,
    driver: Option<Waker>,
}

impl LaneState {
    fn has_room(&self, depth: usize) -> bool {
        !self.closing && !self.dead && self.queued.len() + self.sent.len() < depth
    }

    /// Queues a request and wakes the driver.
    fn queue(&mut self, queued: Queued) {
        self.queued.push_back(queued);
        if let Some(driver) = self.driver.take() {
            driver.wake();
        }
    }

    /// Whether the request whose last byte is `end` has left the lane's
    /// queue (or the lane dropped it) and the kernel, given whether the
    /// kernel holds nothing unsent now.
    fn is_out(&self, end: u64, nothing_unsent: impl FnOnce() -> bool) -> bool {
        end <= self.out_bytes || ((self.written_bytes >= end || self.dead) && nothing_unsent())
    }
}

impl Lane {
    fn open(settings: Arc<LaneSettings>, reads: bool) -> Arc<Lane> {
        let lane = Arc::new(Lane {
            state: Mutex::new(LaneState::default()),
            reads,
        });
        tokio::spawn(drive(lane.clone(), settings));
        lane
    }

    /// The lane's state. A driver that panicked holding it poisoned it;
    /// its lane is ended then ([`Ends`]), and a dead lane is only emptied
    /// and pruned, so the state is taken as it is.
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the lane dead and takes out what it held: the requests
    /// decided sent and those queued, to be answered by the caller.
    fn empty(&self) -> (VecDeque<Sent>, VecDeque<Queued>) {
        let mut state = self.lock();
        state.dead = true;
        state.closing = true;
        state.unwritten.clear();
        let sent = std::mem::take(&mut state.sent);
        let queued = std::mem::take(&mut state.queued);
        (sent, queued)
    }

    /// Ends the lane: every request decided sent fails with `failure`
    /// (its outcome is unknown); every queued one is given back to go on
    /// another lane, or, with `give_back` false, fails with `failure` too.
    fn end(&self, mut failure: impl FnMut() -> ForwardError, give_back: bool) {
        let (sent, queued) = self.empty();
        for s in sent {
            let _ = s.reply.send(Err(LaneError::Failed(failure())));
        }
        for q in queued {
            let why = match give_back {
                true => LaneError::Unsent(q.whole),
                false => LaneError::Failed(failure()),
            };
            let _ = q.reply.send(Err(why));
        }
    }

    /// Ends a read lane: the oldest read sent fails with `front` if its
    /// own answer failed, and every other read sent goes again through
    /// the pool (a client that pipelines SHOULD retry the requests left
    /// unanswered when a connection closes: RFC 9112 §9.3.2; they are
    /// safe). Queued ones are given back.
    fn end_reads(&self, mut front: Option<ForwardError>) {
        let (sent, queued) = self.empty();
        for s in sent {
            let why = match front.take() {
                Some(failure) => LaneError::Failed(failure),
                None => LaneError::Resend,
            };
            let _ = s.reply.send(Err(why));
        }
        for q in queued {
            let _ = q.reply.send(Err(LaneError::Unsent(q.whole)));
        }
    }
}

/// `request` (its head `head_len` bytes, ending in a blank line) with
/// `Connection: keep-alive` added to its head.
fn asking_keep_alive(request: &Bytes, head_len: usize) -> Bytes {
    const FIELD: &[u8] = b"connection: keep-alive\r\n\r\n";
    let mut out = Vec::with_capacity(request.len() + FIELD.len() - 2);
    out.extend_from_slice(&request[..head_len - 2]);
    out.extend_from_slice(FIELD);
    out.extend_from_slice(&request[head_len..]);
    out.into()
}

/// The answer being read.
struct Reading {
    head: ResponseHead,
    decoder: BodyDecoder,
    body: BytesMut,
    trailers: Option<Box<HeaderMap>>,
}

/// How a lane's connection ended.
enum Ended {
    /// Idle, retired or closed by the store with nothing owed.
    Quietly,
    /// With requests unanswered, the oldest one's own answer at fault
    /// (failed, late, malformed): they fail with this. On a read lane a
    /// failed connection is no read's fault: only late or malformed is.
    Failing(ForwardError),
    /// With requests unanswered, none of them at fault: the store closed
    /// after an answer, or in the middle of a read's.
    /// Writes fail with this (their outcome is unknown); reads go again.
    Unanswered(ForwardError),
    /// A read lane's connection went to its oldest read, whose answer
    /// streams ([`Driver::hand_over`]); the reads behind it go again.
    HandedOver,
}

/// Ends its lane when dropped: a driver task that ends otherwise than by
/// returning (a panic, or its runtime shut down) must not leave handlers
/// waiting on a lane that looks alive. The connection is cut first, as on
/// the driver's own failing end: the writes sent on it leave their
/// generations with `end`, and nothing more of them may reach the store
/// after (an early-answer hold may keep the socket open). After the
/// driver's own end, a second changes nothing.
struct Ends {
    lane: Arc<Lane>,
    /// The connection's, once there is one.
    kill: Option<KillHandle>,
}

impl Drop for Ends {
    fn drop(&mut self) {
        if let Some(kill) = &self.kill {
            kill.kill();
        }
        if self.lane.reads {
            self.lane.end_reads(None);
            return;
        }
        self.lane.end(
            || {
                ForwardError::Failed(
                    "the pipelined connection's task ended; the outcome is unknown".to_owned(),
                )
            },
            true,
        );
    }
}

/// A lane's task: connects, then writes and reads until the lane ends.
async fn drive(lane: Arc<Lane>, settings: Arc<LaneSettings>) {
    let mut ends = Ends {
        lane: lane.clone(),
        kill: None,
    };
    let connected = connect(&settings.host, settings.port, settings.connect_timeout).await;
    let (wire, kill) = match connected {
        Ok((wire, kill)) => {
            ends.kill = Some(kill.clone());
            (wire, kill)
        }
        Err(e) => {
            // Nothing was written, but the writes queued here fail like a
            // checkout from the pool that cannot connect: given back, they
            // would open lane after lane that cannot connect either, and
            // never be answered.
            let message = crate::error::causes(&e);
            lane.end(|| ForwardError::Connect(message.clone()), false);
            return;
        }
    };
    let mut driver = Driver {
        lane: &lane,
        settings: &settings,
        wire: wire.clone(),
        kill: kill.clone(),
        read: BytesMut::new(),
        fields: Box::default(),
        reading: None,
        timer: Box::pin(tokio::time::sleep(settings.idle_timeout)),
        timer_at: None,
        incomplete_since: None,
    };
    let ended = poll_fn(|cx| driver.poll(cx)).await;
    // Ended as it should: what to cut is decided below (a quiet end keeps
    // the connection open for an early-answered write still going out).
    ends.kill = None;
    match ended {
        // The connection is the streaming read's now: not cut here.
        Ended::HandedOver => lane.end_reads(None),
        Ended::Quietly => lane.end(
            || ForwardError::Failed("the pipelined connection closed".to_owned()),
            true,
        ),
        ended if lane.reads => {
            kill.kill();
            // Only the oldest read's own answer, late or malformed, fails
            // it. A connection that failed (reset by the store, a write
            // refused) is no read's fault: they all go again.
            lane.end_reads(match ended {
                Ended::Failing(failure @ (ForwardError::Timeout(_) | ForwardError::BadResponse(_))) => {
                    Some(failure)
                }
                _ => None,
            });
        }
        Ended::Failing(failure) | Ended::Unanswered(failure) => {
            // Nothing more of what was unwritten may reach the store.
            kill.kill();
            let message = failure.to_string();
            // Cut by the oldest write's request timeout, the writes behind
            // it are let go without their answers too: counted like it
            // where a raise waited for them.
            let timed_out = match failure {
                ForwardError::Timeout(after) => Some(after),
                _ => None,
            };
            let mut first = Some(failure);
            lane.end(
                || {
                    first.take().unwrap_or_else(|| match timed_out {
                        Some(after) => ForwardError::CutBehindTimeout(after),
                        None => ForwardError::Failed(format!(
                            "a write ahead of this one on its pipelined connection failed ({message}); \
                             this one was sent, and its outcome is unknown"
                        )),
                    })
                },
                true,
            );
        }
    }
}

struct Driver<'a> {
    lane: &'a Arc<Lane>,
    settings: &'a LaneSettings,
    wire: Arc<Wire>,
    kill: KillHandle,
    read: BytesMut,
    fields: Box<codec::Fields>,
    reading: Option<Reading>,
    /// The oldest unanswered request's deadline, or the idle timeout.
    timer: Pin<Box<Sleep>>,
    /// What `timer` is set to: `Some(deadline)` of a request.
    timer_at: Option<Instant>,
    /// Since when the read answer being read has been incomplete: at
    /// [`STREAM_AFTER`] it is taken for a stream.
    incomplete_since: Option<Instant>,
}

impl Driver<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        loop {
            let mut progress = false;
            // Reading first: a close by the store that is already here is
            // seen before another request goes onto the connection.
            match self.poll_read(cx) {
                Poll::Ready(Ok(Some(ended))) => return Poll::Ready(ended),
                Poll::Ready(Ok(None)) => progress = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Ended::Failing(e)),
                Poll::Pending => {}
            }
            match self.poll_write(cx) {
                Poll::Ready(Ok(())) => progress = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Ended::Failing(e)),
                Poll::Pending => {}
            }
            if progress {
                continue;
            }
            let mut state = self.lane.lock();
            if state.closing && state.sent.is_empty() {
                return Poll::Ready(Ended::Quietly);
            }
            // The timer: the oldest unanswered request's deadline (or,
            // sooner, when its answer is taken for a stream), or, with
            // none, the idle timeout from now.
            let front = state.sent.front().map(|s| {
                self.incomplete_since
                    .map_or(s.deadline, |since| s.deadline.min(since + STREAM_AFTER))
            });
            let held_up = state.sent.front().is_some_and(|s| s.behind);
            let idle = state.sent.is_empty() && state.queued.is_empty();
            state.driver = Some(cx.waker().clone());
            drop(state);
            if front != self.timer_at || (idle && self.timer_at.is_some()) {
                self.timer_at = front;
                let at = front.unwrap_or_else(|| Instant::now() + self.settings.idle_timeout);
                self.timer.as_mut().reset(at);
            }
            if !idle && front.is_none() {
                // Requests queued behind a lane that is not open yet to
                // pipelining (waiting for its first answer) or retiring:
                // they wait for the answers, which wake the driver.
                return Poll::Pending;
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(match front {
                    None => Ended::Quietly,
                    // A read whose head is here is not late
                    // (`request_timeout` ends at the head): its answer
                    // streams, or its body is slow, and it streams.
                    Some(_) if self.lane.reads && self.reading.is_some() => self.hand_over(),
                    // A read sent behind another whose answer ended only
                    // after this one's deadline spent its time waiting for
                    // that answer (the store answers a connection's
                    // requests one after another): it is not late itself,
                    // and goes again on a connection of its own, where its
                    // own answer is timed, with the reads behind it. (One
                    // whose turn came in time was timed from then.)
                    Some(_) if self.lane.reads && held_up => {
                        Ended::Unanswered(ForwardError::Timeout(self.settings.request_timeout))
                    }
                    Some(_) => Ended::Failing(ForwardError::Timeout(self.settings.request_timeout)),
                });
            }
            return Poll::Pending;
        }
    }

    /// Decides what may go and writes it. Ready(Ok) when bytes were
    /// written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ForwardError>> {
        let mut state = self.lane.lock();
        if state.unwritten.is_empty() {
            self.decide(&mut state);
        }
        if state.unwritten.is_empty() {
            return Poll::Pending;
        }
        // A request not yet answered whose last byte was written before
        // this call, not known to be out: one `poll` tells whether it is,
        // so that its answer need not wait on the bytes written now. (One
        // request at a time, there is none: its answer's check polls.)
        let (out, written) = (state.out_bytes, state.written_bytes);
        let unknown = state
            .sent
            .iter()
            .find(|s| s.end > out)
            .is_some_and(|s| s.end <= written);
        if unknown && self.wire.nothing_unsent() {
            state.out_bytes = written;
        }
        let mut slices = [IoSlice::new(&[]); 64];
        let mut count = 0;
        for piece in state.unwritten.iter().take(slices.len()) {
            slices[count] = IoSlice::new(piece);
            count += 1;
        }
        let n = match std::task::ready!(self.wire.poll_write(cx, &slices[..count])) {
            Ok(n) => n,
            Err(e) => {
                return Poll::Ready(Err(ForwardError::Failed(format!(
                    "writing to the store failed: {e}; the outcome is unknown"
                ))))
            }
        };
        state.written_bytes += n as u64;
        crate::pool::drop_written(&mut state.unwritten, n);
        Poll::Ready(Ok(()))
    }

    /// Moves queued requests to the write, deciding each sent, as far as
    /// the lane's depth and one write's size allow.
    fn decide(&self, state: &mut LaneState) {
        let now = Instant::now();
        let mut batch = 0;
        let mut decided = 0;
        while let Some(next) = state.queued.front() {
            let open = state.answers > 0 || state.requests == 0;
            if !open
                || state.closing
                || state.sent.len() >= self.settings.depth
                || (batch > 0 && batch + next.whole.bytes.len() > MAX_BATCH)
            {
                break;
            }
            let Queued { mut whole, reply } = state.queued.pop_front().expect("front exists");
            // From here a raise waits for this write's answer. One that
            // began already aborts it (rule 4a), as `pool::Outgoing` does
            // before every write, even if its handler has not yet seen it.
            if whole.exchange.must_stop() || !whole.exchange.complete() {
                let _ = reply.send(Err(LaneError::Failed(ForwardError::Fenced)));
                continue;
            }
            if state.requests == 0 {
                // A lane's first request, sent alone, asks the store to
                // say how many requests it takes (Apache httpd says so only
                // to a request with `Connection: keep-alive`); its answer
                // comes before the lane pipelines. One head rewritten a
                // lane: the field on every request cost the store and
                // fencegate 5 to 12 % of pipelined throughput (step 24).
                whole.bytes = asking_keep_alive(&whole.bytes, whole.head_len);
            }
            batch += whole.bytes.len();
            decided += 1;
            state.decided_bytes += whole.bytes.len() as u64;
            let end = state.decided_bytes;
            state.unwritten.push_back(whole.bytes);
            let behind = !state.sent.is_empty();
            state.sent.push_back(Sent {
                method: whole.method,
                exchange: whole.exchange,
                reply,
                deadline: now + self.settings.request_timeout,
                end,
                behind,
            });
            state.requests += 1;
            if state.requests
                >= self
                    .settings
                    .max_requests
                    .min(state.store_limit.unwrap_or(u64::MAX))
            {
                state.closing = true;
            }
        }
        if decided > 0 {
            let sent = match self.lane.reads {
                true => &self.settings.counters.reads,
                false => &self.settings.counters.writes,
            };
            sent.inc_by(decided);
        }
        if state.closing {
            // Not one byte of these was written: they go on another lane.
            for q in std::mem::take(&mut state.queued) {
                let _ = q.reply.send(Err(LaneError::Unsent(q.whole)));
            }
        }
    }

    /// Reads answers and hands each to its request. Ready(Ok(None)) when
    /// something was read, Ready(Ok(Some)) when the lane ended.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Ended>, ForwardError>> {
        let mut eof = false;
        match self.wire.poll_read(cx, &mut self.read) {
            Poll::Ready(Ok(0)) => eof = true,
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => {
                return Poll::Ready(Err(ForwardError::Failed(format!(
                    "the pipelined connection to the store failed: {e}; the outcome is unknown"
                ))))
            }
            Poll::Pending => return Poll::Pending,
        }
        // Answers handed over wait here until their requests' last bytes
        // have gone out, from the lane's own queue and then from the
        // kernel (see `forward::until_sent_out`): only then may their
        // writes leave their generations. Bytes of later requests still
        // in the kernel are no reason to hold them (`out_bytes`).
        let mut answered = Vec::new();
        let result = self.parse(eof, &mut answered);
        if answered.is_empty() {
            return result;
        }
        let mut state = self.lane.lock();
        let mut kernel_clear = None;
        let mut out = Vec::new();
        let mut held = Vec::new();
        for (exchange, end) in answered {
            // A read holds no place in a generation: nothing waits for
            // its bytes to go out.
            if !exchange.holds_ticket()
                || state.is_out(end, || {
                    *kernel_clear.get_or_insert_with(|| self.wire.nothing_unsent())
                })
            {
                out.push(exchange);
            } else {
                held.push((exchange, end));
            }
        }
        if kernel_clear == Some(true) {
            state.out_bytes = state.written_bytes;
        }
        drop(state);
        drop(out);
        for (exchange, end) in held {
            // Rare: a store answers what it has not read whole. This write
            // keeps its place until the rest has gone out, within
            // `request_timeout`; a raise meanwhile cuts the connection (the
            // reset drops what is unsent), as on the pool's path.
            let (lane, wire, kill) = (self.lane.clone(), self.wire.clone(), self.kill.clone());
            let deadline = Instant::now() + self.settings.request_timeout;
            tokio::spawn(async move {
                {
                    // Out of the lane's queue (or dropped with the lane),
                    // and out of the kernel.
                    let out = || lane.lock().is_out(end, || wire.nothing_unsent());
                    // A raise in the write's domain, or its deadline.
                    let give_up = async {
                        tokio::select! {
                            () = crate::forward::fenced(exchange.abort_signal()) => {}
                            () = tokio::time::sleep_until(deadline) => {}
                        }
                    };
                    tokio::pin!(give_up);
                    loop {
                        tokio::select! {
                            biased;
                            () = wire.sent_out() => {
                                if out() {
                                    break;
                                }
                                // The driver writes the rest when it runs.
                                tokio::task::yield_now().await;
                            }
                            () = &mut give_up => {
                                if !out() {
                                    kill.kill();
                                }
                                break;
                            }
                        }
                    }
                }
                // Only now, with every byte out or the connection cut, does
                // the write leave its generation.
                drop(exchange);
            });
        }
        result
    }

    /// Hands the lane's connection to the oldest read, whose answer's head
    /// is here and whose body streams (over [`MAX_READ_ANSWER`];
    /// incomplete for [`STREAM_AFTER`]; or still coming at
    /// `request_timeout`): its handler gets the head and what came of
    /// the body now, and reads the rest from the connection, as on the
    /// pool's path, which closes at the body's end.
    /// The reads sent behind it go again through the pool: their answers
    /// would come only after that end.
    fn hand_over(&mut self) -> Ended {
        let Reading {
            head, decoder, body, ..
        } = self.reading.take().expect("an answer is being read");
        let conn = Conn::handed_over(
            self.wire.clone(),
            self.kill.clone(),
            std::mem::take(&mut self.read),
            std::mem::take(&mut self.fields),
        );
        let sent = {
            let mut state = self.lane.lock();
            state.closing = true;
            state.sent.pop_front().expect("the answer's request")
        };
        let body = HandedBody::new(body.freeze(), decoder, conn);
        let _ = sent.reply.send(Ok(Answer {
            head,
            body: StoreBody::Handed(Box::new(body)),
        }));
        Ended::HandedOver
    }

    /// Parses what was read. `eof`: the store closed after it.
    fn parse(
        &mut self,
        eof: bool,
        answered: &mut Vec<(Arc<Exchange>, u64)>,
    ) -> Poll<Result<Option<Ended>, ForwardError>> {
        // Read once, when a read behind an answer read now needs it.
        let mut now = None;
        loop {
            let state = self.lane.lock();
            let Some(front) = state.sent.front() else {
                drop(state);
                if !self.read.is_empty() {
                    return Poll::Ready(Err(ForwardError::BadResponse(
                        "the store sent bytes no request asked for".to_owned(),
                    )));
                }
                if eof {
                    return Poll::Ready(Ok(Some(Ended::Quietly)));
                }
                return Poll::Ready(Ok(None));
            };
            if self.reading.is_none() {
                if self.read.is_empty() && !eof {
                    return Poll::Ready(Ok(None));
                }
                let method = front.method.clone();
                drop(state);
                match codec::parse_response_head(&mut self.read, &method, &mut self.fields) {
                    Ok(Some(head)) if head.status.is_informational() && head.status.as_u16() != 101 => {
                        continue
                    }
                    Ok(Some(head)) if head.status.as_u16() == 101 => {
                        return Poll::Ready(Err(ForwardError::BadResponse(
                            "the store switched protocols, which fencegate never tunnels".to_owned(),
                        )))
                    }
                    Ok(Some(head)) => {
                        if !head.keep_alive {
                            // The store closes after this answer (it says
                            // `close`, or its body ends with the connection):
                            // nothing more may go on the connection while
                            // its body comes, or it would go unanswered (a
                            // write with its outcome unknown). Queued
                            // requests go on another lane.
                            self.lane.lock().closing = true;
                        }
                        let too_large = self.lane.reads
                            && matches!(head.framing, codec::Framing::Length(n) if n > MAX_READ_ANSWER as u64);
                        self.reading = Some(Reading {
                            decoder: BodyDecoder::new(head.framing),
                            head,
                            body: BytesMut::new(),
                            trailers: None,
                        });
                        if too_large {
                            // Said at once: it streams on the connection
                            // before the reads behind it wait for much.
                            return Poll::Ready(Ok(Some(self.hand_over())));
                        }
                    }
                    Ok(None) if eof => {
                        // Maybe the store's idle close, crossing the
                        // request: not the request's fault.
                        return Poll::Ready(Ok(Some(Ended::Unanswered(ForwardError::Failed(
                            "the store closed the connection without answering".to_owned(),
                        )))));
                    }
                    Ok(None) => return Poll::Ready(Ok(None)),
                    Err(e) => return Poll::Ready(Err(ForwardError::BadResponse(e.to_string()))),
                }
                continue;
            }
            drop(state);
            let reading = self.reading.as_mut().expect("an answer is being read");
            let mut too_large = false;
            let done = loop {
                let decoded = match reading
                    .decoder
                    .decode(&mut self.read, self.fields.connection_named())
                {
                    Ok(Decoded::More) if eof => match reading.decoder.at_eof() {
                        // The store closed in the middle of a read's
                        // answer: nothing of it has reached the client,
                        // and the close is the connection's end, not the
                        // read's fault (a reset there ends the lane the
                        // same way).
                        Err(_) if self.lane.reads => {
                            return Poll::Ready(Ok(Some(Ended::Unanswered(ForwardError::Failed(
                                "the store closed the connection in the middle of an answer".to_owned(),
                            )))));
                        }
                        ended => ended,
                    },
                    other => other,
                };
                match decoded {
                    Ok(Decoded::Data(data)) => {
                        if self.lane.reads && reading.body.len() + data.len() > MAX_READ_ANSWER {
                            // Of no stated length (a stated one is seen at
                            // the head): what came of it goes first, and
                            // the rest streams.
                            reading.body.extend_from_slice(&data);
                            too_large = true;
                            break false;
                        }
                        if reading.body.len() + data.len() > MAX_ANSWER {
                            return Poll::Ready(Err(ForwardError::Failed(format!(
                                "the store's answer to a pipelined write is over {MAX_ANSWER} bytes"
                            ))));
                        }
                        reading.body.extend_from_slice(&data);
                    }
                    Ok(Decoded::Trailers(trailers)) => {
                        reading.trailers = Some(Box::new(trailers));
                        break true;
                    }
                    Ok(Decoded::End) => break true,
                    Ok(Decoded::More) => break false,
                    Err(e) => return Poll::Ready(Err(ForwardError::BadResponse(e.to_string()))),
                }
            };
            if too_large {
                return Poll::Ready(Ok(Some(self.hand_over())));
            }
            if !done {
                if self.lane.reads && self.incomplete_since.is_none() {
                    // A read's answer that is not here whole may be a
                    // stream (events, a long poll) that ends only when the
                    // store decides, or a body the store is slow to
                    // produce: read whole, it would hold up every read
                    // behind it until `request_timeout`. Still incomplete
                    // after `STREAM_AFTER`, it streams.
                    self.incomplete_since = Some(Instant::now());
                }
                return Poll::Ready(Ok(None));
            }
            self.incomplete_since = None;
            let Reading {
                head, body, trailers, ..
            } = self.reading.take().expect("an answer was being read");
            let mut state = self.lane.lock();
            let sent = state.sent.pop_front().expect("the answer's request");
            state.answers += 1;
            if self.lane.reads {
                if let Some(next) = state.sent.front_mut() {
                    // The store takes up the read behind only now: timed
                    // from here (at most twice `request_timeout` from its
                    // sending), it fails 504 only if its own answer is
                    // late, and is sent once. One whose deadline passed
                    // already was held up: it goes again (`poll`).
                    let now = *now.get_or_insert_with(Instant::now);
                    if now <= next.deadline {
                        next.deadline = now + self.settings.request_timeout;
                        next.behind = false;
                    }
                }
            }
            if let Some(max) = self.fields.keep_alive_max() {
                // The store takes `max` more requests on this connection
                // (Apache httpd says so in every answer, and closes after
                // them): the lane retires before, so that no write is sent
                // that the store would not answer. Read as counting this
                // answer's request too, which may leave one unused: what
                // `max` counts differs between servers.
                // Saturating: `max` is the store's word, any number.
                let limit = state.answers.saturating_add(max.saturating_sub(1));
                let limit = state.store_limit.map_or(limit, |l| l.min(limit));
                state.store_limit = Some(limit);
                if state.requests >= limit {
                    state.closing = true;
                }
            }
            let keep_alive = head.keep_alive && !eof;
            if !keep_alive {
                state.closing = true;
            }
            drop(state);
            answered.push((sent.exchange, sent.end));
            let _ = sent.reply.send(Ok(Answer {
                head,
                body: StoreBody::Whole(WholeBody {
                    data: (!body.is_empty()).then(|| body.freeze()),
                    trailers,
                }),
            }));
            if !keep_alive {
                // The store closes after this answer: the requests sent
                // after it will not be answered.
                let unanswered = !self.lane.lock().sent.is_empty();
                return Poll::Ready(Ok(Some(if unanswered {
                    Ended::Unanswered(ForwardError::Failed(
                        "the store closed a pipelined connection before answering this write; \
                         its outcome is unknown"
                            .to_owned(),
                    ))
                } else {
                    Ended::Quietly
                })));
            }
        }
    }
}

/// A pipelined request's answer body, read whole.
#[derive(Debug, Default)]
pub struct WholeBody {
    data: Option<Bytes>,
    /// Boxed: rare, and the answer's body is moved whole.
    trailers: Option<Box<HeaderMap>>,
}

impl Body for WholeBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(*t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, &self.trailers) {
            (data, None) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounter;

    #[test]
    fn a_lanes_first_request_asks_for_keep_alive_in_its_head() {
        let request = Bytes::from_static(b"PUT /a HTTP/1.1\r\nhost: s\r\ncontent-length: 3\r\n\r\nabc");
        let head_len = request.len() - 3;
        assert_eq!(
            &asking_keep_alive(&request, head_len)[..],
            b"PUT /a HTTP/1.1\r\nhost: s\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\nabc"
        );
        let bodiless = Bytes::from_static(b"DELETE /a HTTP/1.1\r\nhost: s\r\n\r\n");
        assert_eq!(
            &asking_keep_alive(&bodiless, bodiless.len())[..],
            b"DELETE /a HTTP/1.1\r\nhost: s\r\nconnection: keep-alive\r\n\r\n"
        );
    }

    /// A request of `method` with no body, encoded.
    fn bodiless(method: Method) -> Whole {
        let bytes = Bytes::from(format!(
            "{method} / HTTP/1.1\r\nhost: s\r\ncontent-length: 0\r\n\r\n"
        ));
        Whole {
            head_len: bytes.len(),
            bytes,
            method,
            exchange: Exchange::new(None, None),
        }
    }

    fn whole() -> Whole {
        bodiless(Method::PUT)
    }

    fn read() -> Whole {
        bodiless(Method::GET)
    }

    /// `whole` as a lane holds it once decided sent.
    fn sent(whole: Whole, reply: oneshot::Sender<Reply>) -> Sent {
        Sent {
            method: whole.method,
            exchange: whole.exchange,
            reply,
            deadline: Instant::now(),
            end: 0,
            behind: false,
        }
    }

    fn settings() -> LaneSettings {
        let counter = |name: &str| IntCounter::new(name, name).unwrap();
        LaneSettings {
            host: "127.0.0.1".to_owned(),
            // Nothing listens on port 1: the lanes' drivers fail to connect.
            port: 1,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            depth: 8,
            max_requests: 100,
            reads: true,
            counters: PipelineCounters {
                writes: counter("writes"),
                reads: counter("reads"),
                resent: counter("resent"),
            },
        }
    }

    /// A read lane ends when an answer on it streams or its connection
    /// fails, and then sends the reads behind again: a write there would be
    /// sent twice. So reads and writes never share a lane.
    #[tokio::test]
    async fn reads_and_writes_take_lanes_of_their_own() {
        let pipeline = Pipeline::new(settings());
        let first_write = pipeline.enqueue(whole());
        let first_read = pipeline.enqueue(read());
        let write = pipeline.enqueue(whole());
        let read = pipeline.enqueue(read());
        assert!(!first_write.lane.reads && first_read.lane.reads);
        assert!(!Arc::ptr_eq(&first_write.lane, &first_read.lane));
        assert!(Arc::ptr_eq(&first_write.lane, &write.lane));
        assert!(Arc::ptr_eq(&first_read.lane, &read.lane));
    }

    /// A read lane that ends fails its oldest read with the failure of
    /// that read's own answer, if it was at fault, and sends every other
    /// read sent on it again (RFC 9112 §9.3.2); queued ones are given back.
    #[test]
    fn a_read_lane_that_ends_sends_its_reads_again() {
        for at_fault in [true, false] {
            let lane = Lane {
                state: Mutex::new(LaneState::default()),
                reads: true,
            };
            let mut replies = Vec::new();
            {
                let mut state = lane.lock();
                for _ in 0..2 {
                    let (tx, rx) = oneshot::channel();
                    state.sent.push_back(sent(read(), tx));
                    replies.push(rx);
                }
                let (tx, rx) = oneshot::channel();
                state.queued.push_back(Queued {
                    whole: read(),
                    reply: tx,
                });
                replies.push(rx);
            }
            let failure = ForwardError::Timeout(Duration::from_secs(1));
            lane.end_reads(at_fault.then_some(failure));
            let got: Vec<Reply> = replies.into_iter().map(|mut rx| rx.try_recv().unwrap()).collect();
            match at_fault {
                true => assert!(matches!(got[0], Err(LaneError::Failed(ForwardError::Timeout(_))))),
                false => assert!(matches!(got[0], Err(LaneError::Resend))),
            }
            assert!(matches!(got[1], Err(LaneError::Resend)));
            assert!(matches!(got[2], Err(LaneError::Unsent(_))));
            assert!(lane.lock().dead);
        }
    }

    /// A driver that panics, even holding its lane's lock, ends its lane:
    /// its connection is cut, the write it sent fails (its outcome
    /// unknown), the queued one is handed back unsent, and the lane takes
    /// nothing more.
    #[tokio::test]
    async fn a_driver_that_panics_ends_its_lane() {
        let lane = Arc::new(Lane {
            state: Mutex::new(LaneState::default()),
            reads: false,
        });
        let (sent_tx, sent_rx) = oneshot::channel();
        let (queued_tx, queued_rx) = oneshot::channel();
        {
            let mut state = lane.lock();
            state.sent.push_back(sent(whole(), sent_tx));
            state.queued.push_back(Queued {
                whole: whole(),
                reply: queued_tx,
            });
        }
        let store = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = store.local_addr().unwrap().port();
        let (_wire, kill) = connect("127.0.0.1", port, Duration::from_secs(5)).await.unwrap();
        let driver = {
            let (lane, kill) = (lane.clone(), kill.clone());
            tokio::spawn(async move {
                let _ends = Ends {
                    lane: lane.clone(),
                    kill: Some(kill),
                };
                let _state = lane.lock();
                panic!("a bug in the driver");
            })
        };
        assert!(driver.await.unwrap_err().is_panic());
        let within = Duration::from_secs(5);
        let (sent, queued) = tokio::time::timeout(within, async { (sent_rx.await, queued_rx.await) })
            .await
            .expect("the lane's writes were answered");
        assert!(matches!(
            sent,
            Ok(Err(LaneError::Failed(ForwardError::Failed(_))))
        ));
        assert!(matches!(queued, Ok(Err(LaneError::Unsent(_)))));
        assert!(lane.lock().dead && !lane.lock().has_room(8));
        assert!(kill.is_killed(), "the connection was cut");
    }
}
