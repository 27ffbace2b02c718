//! Bodies in flight through the proxy, streamed frame by frame, never
//! buffered whole. [`GuardedBody`] adds what a fencing proxy needs around a
//! body: an idle timeout in both directions, and for a forwarded write the
//! [`Exchange`] that decides, atomically, whether its body completed or was
//! aborted by a raise.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CONTENT_LENGTH, HOST, TRAILER};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::gate::{AbortSignal, Ticket};

const SENDING: u8 = 0;
const SENT: u8 = 1;
const ABORTED: u8 = 2;

/// One forwarded request's progress, shared by the handler and the body
/// that the connection to the store is sending.
pub struct Exchange {
    /// `SENDING`, then either `SENT` (the last byte was handed over) or
    /// `ABORTED` (the last byte never will be). Decided once, by CAS, so a
    /// write is never both answered "fenced" and completed at the store.
    state: AtomicU8,
    /// Wakes whoever waits for the state to leave `SENDING`. One waiter at
    /// a time: the exchange's sender, which watches the body while it
    /// connects, then while it sends, then (after an early answer) from the
    /// guard's task; a `Notify` cost a waiter list for that one waiter.
    decided: AtomicWaker,
    /// Frames the body handed to the connection so far: the store's reading
    /// of the body is seen as this count moving.
    frames: AtomicU64,
    /// Whether the body is waiting for its client (then a pause is the
    /// client's, bounded by the body's own idle timer, not the store's).
    awaiting_client: AtomicBool,
    /// Held until both the handler and the body are done, so a raise waits
    /// for this write to leave the connection.
    ticket: Option<Ticket>,
    /// What the trailers lose besides what no trailer may carry, for a
    /// body that may end in them (chunked).
    trailers: Option<TrailerRules>,
}

/// The fields a request's trailers lose that only its head can tell.
#[derive(Debug)]
pub struct TrailerRules {
    /// The fencing header: the token the store sees must be the one
    /// fencegate checked.
    pub fencing_header: HeaderName,
    /// The fields the request's `Connection` names: hop-by-hop in the
    /// trailers as in the head (RFC 9110 §7.6.1). Rarely any.
    pub connection_named: Vec<HeaderName>,
}

impl Exchange {
    /// A new exchange; `ticket` is the write's place in its generation.
    /// `trailers` is given for a body that may end in trailers: the fields
    /// it names are removed from them with those no trailer may carry.
    pub fn new(ticket: Option<Ticket>, trailers: Option<TrailerRules>) -> Arc<Exchange> {
        Arc::new(Exchange {
            state: AtomicU8::new(SENDING),
            decided: AtomicWaker::new(),
            frames: AtomicU64::new(0),
            awaiting_client: AtomicBool::new(false),
            ticket,
            trailers,
        })
    }

    /// Whether this exchange holds a write's place in its generation.
    pub fn holds_ticket(&self) -> bool {
        self.ticket.is_some()
    }

    /// A write's signal that a raise began in its domain.
    pub fn abort_signal(&self) -> Option<&AbortSignal> {
        self.ticket.as_ref().map(Ticket::abort_signal)
    }

    /// Whether a raise began while this write was in flight.
    pub fn is_fenced(&self) -> bool {
        self.ticket.as_ref().is_some_and(Ticket::is_fenced)
    }

    /// Records that the whole request was written to the connection (the
    /// kernel has its last byte: `pool::Outgoing`). False if it had been
    /// aborted first.
    pub fn complete(&self) -> bool {
        match self.state.compare_exchange(SENDING, SENT, SeqCst, SeqCst) {
            Ok(_) => {
                self.decided.wake();
                true
            }
            Err(state) => state == SENT,
        }
    }

    /// Aborts the body unless it was already sent whole. True if aborted.
    pub fn abort(&self) -> bool {
        match self.state.compare_exchange(SENDING, ABORTED, SeqCst, SeqCst) {
            Ok(_) => {
                self.decided.wake();
                true
            }
            Err(state) => state == ABORTED,
        }
    }

    /// Whether the body was aborted.
    pub fn is_aborted(&self) -> bool {
        self.state.load(SeqCst) == ABORTED
    }

    /// Whether the request must stop before its next frame or write: it
    /// was aborted, or a raise began before it was written whole (which
    /// aborts it now).
    pub fn must_stop(&self) -> bool {
        (self.is_fenced() && self.abort()) || self.is_aborted()
    }

    /// Frames handed to the connection so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Relaxed)
    }

    /// Whether the body is waiting for its client to send more.
    pub fn awaiting_client(&self) -> bool {
        self.awaiting_client.load(Relaxed)
    }

    /// Whether the whole body was handed to the connection.
    pub fn is_sent(&self) -> bool {
        self.state.load(SeqCst) == SENT
    }

    /// Resolves once the body was sent whole or aborted (a body dropped
    /// before its end is aborted). One waiter at a time (see `decided`).
    pub async fn wait_decided(&self) {
        std::future::poll_fn(|cx| {
            if self.state.load(SeqCst) != SENDING {
                return Poll::Ready(());
            }
            self.decided.register(cx.waker());
            // Checked again after registering: a decision in between woke
            // no one.
            if self.state.load(SeqCst) != SENDING {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// Why a body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The other side's body failed (a client that went away, a short body).
    #[error("body failed: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
    /// Nothing arrived within the idle timeout.
    #[error("body idle for longer than {0:?}")]
    Idle(Duration),
    /// A raise began in the domain before this body was sent whole.
    #[error("body aborted: a higher epoch began before it was sent whole")]
    Fenced,
}

/// Takes out of a request's trailers what no trailer may carry (RFC 9110
/// §6.5.1): fields of one connection, framing and routing
/// (`Content-Length`, `Host`), and a second fencing token, which would
/// reach the store unchecked (the header given twice is refused; in a
/// trailer it would come too late to refuse), a method override or a
/// `Destination` (judged in the head alone), and the fields the head's
/// `Connection` names.
fn keep_trailers(trailers: &mut HeaderMap, rules: Option<&TrailerRules>) {
    let forbidden = |name: &HeaderName| {
        crate::hop::hop_by_hop(name)
            || *name == CONTENT_LENGTH
            || *name == HOST
            || *name == TRAILER
            // Fields fencegate judges in the head only: a store that
            // merges trailers into the head would act on them unjudged.
            || crate::hop::is_method_override(name)
            || name.as_str() == "destination"
            || rules.is_some_and(|r| {
                crate::hop::same_field(name, &r.fencing_header) || r.connection_named.contains(name)
            })
    };
    if trailers.keys().any(forbidden) {
        let mut kept = HeaderMap::with_capacity(trailers.len());
        for (name, value) in trailers.iter().filter(|(name, _)| !forbidden(name)) {
            kept.append(name.clone(), value.clone());
        }
        *trailers = kept;
    }
}

/// A body with an idle timeout and, for forwarded writes, an abort.
pub struct GuardedBody<B> {
    inner: B,
    /// Armed only when the inner body first makes us wait, so a body that
    /// is ready at once (most small writes) costs no timer.
    idle: Option<Pin<Box<Sleep>>>,
    idle_timeout: Duration,
    /// Whether the last poll left us waiting on the other side.
    waiting: bool,
    exchange: Option<Arc<Exchange>>,
    ended: bool,
    /// Its last frame (or its end) was handed over: the body is whole, and
    /// whether the request is complete is for the connection to say.
    whole: bool,
}

impl<B> GuardedBody<B> {
    /// A body that fails after `idle_timeout` without a frame.
    pub fn new(inner: B, idle_timeout: Duration) -> GuardedBody<B> {
        GuardedBody {
            inner,
            idle: None,
            idle_timeout,
            waiting: false,
            exchange: None,
            ended: false,
            whole: false,
        }
    }

    /// Ties the body to a forwarded write: it reports completion to
    /// `exchange`, and stops at its next frame once a raise began in the
    /// write's domain. (The exchange's sender watches the raise while the
    /// body waits, and cuts the connection: see [`crate::forward`].)
    pub fn forwarding(mut self, exchange: Arc<Exchange>) -> GuardedBody<B>
    where
        B: Body,
    {
        // A body with nothing to send is whole from the start: dropped
        // untaken it aborts nothing, and its request is complete once the
        // connection wrote the head.
        self.whole = self.inner.is_end_stream();
        self.exchange = Some(exchange);
        self
    }

    /// Ends the body with `error`.
    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.ended = true;
        Poll::Ready(Some(Err(error)))
    }

    /// The forwarded write's exchange, if this body is one's.
    pub fn exchange(&self) -> Option<&Arc<Exchange>> {
        self.exchange.as_ref()
    }
}

impl<B> Drop for GuardedBody<B> {
    /// A body dropped before its end will never be sent whole: whoever
    /// waits on its exchange learns it now. (A whole one is the
    /// connection's to complete, once it has written it.)
    fn drop(&mut self) {
        if let (Some(exchange), false) = (&self.exchange, self.whole) {
            exchange.abort();
        }
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let aborted = this.exchange.as_ref().is_some_and(|e| e.must_stop());
        if aborted {
            return this.fail(BodyError::Fenced);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // The last frame of a sized body, or the trailers of a
                // chunked one: the body is whole. The request is complete
                // only once the connection wrote it all (`pool::Outgoing`,
                // which checks the fence before every write, like this
                // body before every frame).
                if frame.is_trailers() || this.inner.is_end_stream() {
                    this.ended = true;
                    this.whole = true;
                }
                this.waiting = false;
                let mut frame = frame;
                if let Some(exchange) = &this.exchange {
                    exchange.frames.fetch_add(1, Relaxed);
                    exchange.awaiting_client.store(false, Relaxed);
                    if let Some(trailers) = frame.trailers_mut() {
                        keep_trailers(trailers, exchange.trailers.as_ref());
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(BodyError::Source(e.into())),
            Poll::Ready(None) => {
                this.ended = true;
                // An ended body waits for nobody: a stall from here on is
                // the store's (`forward::finish_sending` watches for it).
                if let Some(exchange) = &this.exchange {
                    exchange.awaiting_client.store(false, Relaxed);
                }
                // A chunked body is complete only with its last chunk, which
                // the connection writes when it sees this end.
                this.whole = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                // The idle clock starts when the other side makes us wait,
                // not at the last frame: time the connection spent not
                // polling us (backpressure) is not the other side's pause.
                let timeout = this.idle_timeout;
                let deadline = Instant::now() + timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.waiting {
                    idle.as_mut().reset(deadline);
                    this.waiting = true;
                    if let Some(exchange) = &this.exchange {
                        exchange.awaiting_client.store(true, Relaxed);
                    }
                }
                if idle.as_mut().poll(cx).is_ready() {
                    return this.fail(BodyError::Idle(timeout));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body taken whole leaves its exchange open: the request is
    /// complete only once the connection has written it (`pool::Outgoing`).
    #[tokio::test]
    async fn a_whole_body_leaves_completion_to_the_connection() {
        let exchange = Exchange::new(None, None);
        let body = GuardedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            Duration::from_secs(5),
        )
        .forwarding(exchange.clone());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abc");
        assert!(!exchange.is_aborted(), "dropped whole, it aborted nothing");
        assert!(exchange.complete());
    }

    #[tokio::test]
    async fn an_aborted_exchange_never_hands_over_the_last_frame() {
        let exchange = Exchange::new(None, None);
        assert!(exchange.abort());
        let body = GuardedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            Duration::from_secs(5),
        )
        .forwarding(exchange.clone());
        let err = body.collect().await.unwrap_err();
        assert!(matches!(err, BodyError::Fenced), "{err}");
        assert!(!exchange.complete());
    }

    #[tokio::test]
    async fn a_waiter_learns_a_decision_made_after_it_began_waiting() {
        let exchange = Exchange::new(None, None);
        let waiter = tokio::spawn({
            let exchange = exchange.clone();
            async move { exchange.wait_decided().await }
        });
        // The waiter runs until it waits (single-threaded test runtime).
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing was decided yet");
        assert!(exchange.complete());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the decision woke the waiter")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let body = GuardedBody::new(ChannelBody(rx), Duration::from_secs(3));
        let err = body.collect().await.unwrap_err();
        assert!(matches!(err, BodyError::Idle(_)), "{err}");
    }

    /// A body fed by a channel, which stalls while the sender is idle.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx)
        }
    }
}
