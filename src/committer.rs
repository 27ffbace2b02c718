//! Group commit of epoch raises. One task owns the state file; raises queue
//! here, and every raise that arrives while a commit is running shares the
//! next one, so 64 concurrent raises cost about two fsyncs, not 64.
//!
//! redb is blocking, so each commit runs on the blocking pool. After a failed
//! commit the file is closed and reopened before the next one, since redb's
//! in-memory state may no longer match the file (and redb refuses every later
//! transaction on that handle). The state file's lock file stays locked
//! meanwhile ([`StateLock`]), so no other fencegate opens the file between.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::state::{CrashWait, StateError, StateFile, StateLock};

/// A commit that did not become durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CommitError(Arc<str>);

enum Message {
    Raise {
        domain: Arc<str>,
        value: u64,
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
    Close {
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
}

/// How often a state file closed by a failed commit is tried again while
/// no raise comes, so readiness returns once the disk is fixed.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// The handle raises go through; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<Message>,
    /// Whether the state file is open: false from a failed commit until
    /// it is reopened (`/readyz`).
    open: Arc<AtomicBool>,
    /// Whether the commit task has ended: after the clean close, or when
    /// a commit panicked (redb panics on some damage), after which no
    /// raise can be made durable until a restart.
    ended: Arc<AtomicBool>,
}

impl Committer {
    /// Starts the commit task, which owns `state` from now on.
    /// `crash_wait_until`: the end of this start's crash wait, if it
    /// followed a crash. The task settles it when it ends
    /// ([`StateFile::settle_crash_wait`]), and a raise committed after it
    /// settles its domain's kept lower guard ([`StateFile::raise`]).
    pub fn spawn(
        state: StateFile,
        metrics: Metrics,
        crash_wait_until: Option<tokio::time::Instant>,
    ) -> (Committer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicBool::new(true));
        let ended = Arc::new(AtomicBool::new(false));
        let lock = state.lock();
        let task = tokio::spawn(run(
            state,
            lock,
            rx,
            metrics,
            open.clone(),
            EndedOnDrop(ended.clone()),
            crash_wait_until,
        ));
        (Committer { tx, open, ended }, task)
    }

    /// Whether the state file is open, so a raise can be made durable.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst) && !self.has_ended()
    }

    /// Whether the commit task has ended (closed cleanly, or panicked).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Makes `domain`'s stored epoch at least `value`, durably.
    pub async fn raise(&self, domain: Arc<str>, value: u64) -> Result<(), CommitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Message::Raise { domain, value, reply })
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Records the clean-shutdown mark and closes the file. Call it only
    /// when no write is in flight any more.
    pub async fn close_clean(&self) -> Result<(), CommitError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Message::Close { reply }).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

fn closed() -> CommitError {
    CommitError("the state file is closed".into())
}

/// Marks the commit task ended when it ends, however it ends: dropped with
/// the task's future, so also when a commit's panic unwinds it.
struct EndedOnDrop(Arc<AtomicBool>);

impl Drop for EndedOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The file, or its lock while it waits to be reopened after a failure.
enum Slot {
    Open(StateFile),
    Broken(Arc<StateLock>),
    Closed,
}

async fn run(
    state: StateFile,
    lock: Arc<StateLock>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    metrics: Metrics,
    open: Arc<AtomicBool>,
    _ended: EndedOnDrop,
    crash_wait_until: Option<tokio::time::Instant>,
) {
    let mut slot = Slot::Open(state);
    let mut settle_at = crash_wait_until;
    loop {
        let first = if let (Some(at), Slot::Open(_)) = (settle_at, &slot) {
            tokio::select! {
                message = rx.recv() => message,
                () = tokio::time::sleep_until(at) => {
                    // Once, whatever comes of it: a failure leaves the
                    // longer wait owed, which is safe (only slower).
                    settle_at = None;
                    let Some(settled) = blocking(move || settle(slot)).await else {
                        return hold_until_exit(lock);
                    };
                    slot = settled;
                    open.store(matches!(slot, Slot::Open(_)), Ordering::SeqCst);
                    continue;
                }
            }
        } else if matches!(slot, Slot::Broken(_)) {
            tokio::select! {
                message = rx.recv() => message,
                () = tokio::time::sleep(REOPEN_EVERY) => {
                    // No raise is waiting: try the file again (an empty
                    // commit only reopens it).
                    let reopen = move || commit(slot, &BTreeMap::new(), CrashWait::Running, false).0;
                    let Some(reopened) = blocking(reopen).await else {
                        return hold_until_exit(lock);
                    };
                    slot = reopened;
                    open.store(matches!(slot, Slot::Open(_)), Ordering::SeqCst);
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(first) = first else {
            return;
        };
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut updates: BTreeMap<String, u64> = BTreeMap::new();
        let mut raise_replies = Vec::new();
        let mut close_replies = Vec::new();
        for message in batch {
            match message {
                Message::Raise { domain, value, reply } => {
                    let entry = updates.entry(domain.to_string()).or_default();
                    *entry = (*entry).max(value);
                    raise_replies.push(reply);
                }
                Message::Close { reply } => close_replies.push(reply),
            }
        }
        let close = !close_replies.is_empty();
        // A gate's raise waited it out before it came here; checked again
        // here, so that what a start kept is never settled on a caller's word.
        let crash_wait = match crash_wait_until {
            Some(until) if tokio::time::Instant::now() < until => CrashWait::Running,
            _ => CrashWait::Over,
        };
        let started = Instant::now();
        // A panic drops the replies with the task: every raise waiting
        // here is answered as not durable (503).
        let Some((returned, result)) = blocking(move || commit(slot, &updates, crash_wait, close)).await
        else {
            return hold_until_exit(lock);
        };
        slot = returned;
        open.store(matches!(slot, Slot::Open(_)), Ordering::SeqCst);
        if !raise_replies.is_empty() {
            metrics.epoch_persist.observe(started.elapsed().as_secs_f64());
        }
        let result = result.map_err(|e| {
            tracing::error!(error = %e, "epoch commit failed; raises are refused until the state file works again");
            CommitError(e.to_string().into())
        });
        for reply in raise_replies.into_iter().chain(close_replies) {
            let _ = reply.send(result.clone());
        }
        if close {
            return;
        }
    }
}

/// Runs a blocking part of a commit. A panic in it (redb panics on some
/// damage it meets mid-run) ends the commit task: the file's state is
/// unknown, so no raise is made durable again until a restart, which
/// reads the file afresh and waits out the crash wait. `/readyz` says so
/// ([`Committer::has_ended`]), and the file stays locked
/// ([`hold_until_exit`]).
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => Some(done),
        Err(e) => {
            tracing::error!(error = %e, "a commit panicked: raises are refused until fencegate is restarted");
            None
        }
    }
}

/// After a commit panicked: the file went with the panic, and redb's lock
/// with it, while this process still serves writes at the epochs it read.
/// The lock file stays locked until the process exits, so no second
/// fencegate takes the file meanwhile.
fn hold_until_exit(lock: Arc<StateLock>) {
    std::mem::forget(lock);
}

/// Settles the crash wait that has just passed; blocking. A failed commit
/// leaves the file to be reopened, as any other does.
fn settle(slot: Slot) -> Slot {
    let Slot::Open(state) = slot else {
        return slot;
    };
    match state.settle_crash_wait() {
        Ok(settled) => {
            if settled {
                tracing::info!("the crash wait has run out: a start after a crash of this run waits for this run's request_timeout only");
            }
            Slot::Open(state)
        }
        Err(e) => {
            tracing::error!(error = %e, "could not record that the crash wait has passed; raises are refused until the state file works again");
            Slot::Broken(state.close())
        }
    }
}

/// Commits `updates` (and the clean mark when closing); blocking.
fn commit(
    slot: Slot,
    updates: &BTreeMap<String, u64>,
    crash_wait: CrashWait,
    close: bool,
) -> (Slot, Result<(), StateError>) {
    let state = match slot {
        Slot::Open(state) => state,
        Slot::Broken(lock) => match StateFile::reopen(&lock) {
            Ok(state) => {
                tracing::info!(path = %state.path().display(), "state file reopened");
                state
            }
            Err(e) => return (Slot::Broken(lock), Err(e)),
        },
        Slot::Closed => return (Slot::Closed, Ok(())),
    };
    #[cfg(test)]
    if updates.contains_key(tests::PANICS) {
        panic!("a commit that panics, as redb may on a damaged file");
    }
    let mut result = if updates.is_empty() {
        Ok(())
    } else {
        state.raise(updates, crash_wait)
    };
    if close && result.is_ok() {
        result = state.set_clean(true);
    }
    match (&result, close) {
        (_, true) => (Slot::Closed, result),
        (Ok(()), false) => (Slot::Open(state), result),
        // redb's handle is closed (and its lock on the file released) so
        // that it can be reopened; the lock file stays locked.
        (Err(_), false) => (Slot::Broken(state.close()), result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::WantedDomain;

    /// A domain whose commit panics.
    pub(super) const PANICS: &str = "\u{0}panics";

    /// A commit that panics ends the commit task, and says so: raises get
    /// an error (503), `/readyz` stops saying ready, and the state file
    /// stays locked against a second fencegate while this one still
    /// serves writes at the epochs it read (found by review: the task
    /// died on an `expect`, /readyz stayed 200, and the lock went with the
    /// dropped file).
    #[tokio::test]
    async fn a_commit_that_panics_ends_the_task_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let domains = [WantedDomain {
            name: "orders".into(),
            prefix: "/orders/".into(),
        }];
        let state = StateFile::create(&path, &domains).unwrap();
        state.start(&domains, &[], Duration::from_secs(30)).unwrap();
        let (committer, task) = Committer::spawn(state, Metrics::new(), None);
        committer.raise("orders".into(), 3).await.unwrap();
        assert!(committer.is_open() && !committer.has_ended());

        let panicked = committer.raise(PANICS.into(), 1).await;
        assert!(panicked.is_err(), "a raise whose commit panicked: {panicked:?}");
        let _ = task.await;
        assert!(committer.has_ended() && !committer.is_open());
        assert!(committer.raise("orders".into(), 4).await.is_err());
        let second = StateFile::open(&path).map(|_| ());
        assert!(
            matches!(second, Err(StateError::InUse(_))),
            "a second opener while this process lives: {second:?}"
        );
    }
}
