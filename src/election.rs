//! The leader view of one election: who etcd last said leads, at which
//! revision, how fresh that knowledge is, and the reads that confirm it.
//!
//! The view is written by the coordinator's tasks ([`crate::coordinator`])
//! and read by the gate on every write in the domain, so the read side is
//! lock-free: one `ArcSwap` load and a few atomics. Three rules keep it
//! honest:
//! - A view is versioned by the etcd revision it describes and is never
//!   replaced by an older one, whichever task (watch or read) brings it.
//! - Freshness comes from linearizable reads only: the age of the view is
//!   the time since the *start* of the last successful read, because a watch
//!   that went quiet cannot tell "nothing happened" from "cut off".
//! - A confirmation waits for a read that *started* after the request
//!   arrived ([`ReadQueue`]), and concurrent requests share it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{Consistency, OnUnavailable};
use crate::fencing::Leader;
use crate::gate::{wait_shard, WAIT_SHARDS};
use crate::metrics::ElectionMetrics;

/// How a view judges its own knowledge.
#[derive(Debug, Clone, Copy)]
pub struct ViewSettings {
    /// Whether every write waits for a read.
    pub consistency: Consistency,
    /// What writes get when the view is too old.
    pub on_unavailable: OnUnavailable,
    /// Oldest view that may still decide.
    pub max_staleness: Duration,
}

/// What etcd said about the election at one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The etcd revision this describes; 0 before the first answer.
    pub revision: i64,
    /// The leader's create revision; `None` when there is no candidate.
    pub leader: Option<u64>,
}

/// The leader view of one election domain.
pub struct ElectionView {
    /// The domain's name, for logs.
    pub domain: Arc<str>,
    /// The election prefix `P`; candidates are the keys under `P/`.
    pub prefix: String,
    /// How this view judges freshness and what writes wait for.
    pub settings: ViewSettings,
    snapshot: ArcSwap<Snapshot>,
    /// Serializes writers of `snapshot` so the version check and the store
    /// are one step; readers never take it.
    publish: Mutex<()>,
    /// Start of the last successful read, in nanoseconds after `base`, plus
    /// one; 0 when no read has succeeded yet.
    fresh_since: AtomicU64,
    base: Instant,
    /// The highest leader revision ever seen: the cap of `local` mode.
    highest_leader: AtomicU64,
    /// Set once etcd answered with a revision below what it had shown:
    /// the domain's epoch, or a revision this view already described.
    regressed: AtomicBool,
    /// Whether the last read succeeded, to log changes once.
    reachable: AtomicBool,
    /// Whether etcd ever answered a read of this view.
    answered: AtomicBool,
    /// New leader revisions, for the fence-ahead task.
    fence: watch::Sender<u64>,
    /// Shared confirmation reads.
    pub reads: ReadQueue,
    metrics: ElectionMetrics,
}

impl ElectionView {
    /// A view that knows nothing yet: no read, so not fresh.
    pub fn new(
        domain: Arc<str>,
        prefix: String,
        settings: ViewSettings,
        metrics: ElectionMetrics,
    ) -> ElectionView {
        metrics.leader_revision.set(0);
        ElectionView {
            domain,
            prefix,
            settings,
            snapshot: ArcSwap::from_pointee(Snapshot {
                revision: 0,
                leader: None,
            }),
            publish: Mutex::new(()),
            fresh_since: AtomicU64::new(0),
            base: Instant::now(),
            highest_leader: AtomicU64::new(0),
            regressed: AtomicBool::new(false),
            reachable: AtomicBool::new(true),
            answered: AtomicBool::new(false),
            fence: watch::Sender::new(0),
            reads: ReadQueue::default(),
            metrics,
        }
    }

    /// The newest snapshot.
    pub fn snapshot(&self) -> Snapshot {
        **self.snapshot.load()
    }

    /// Whether every write must wait for a read that started after it arrived.
    pub fn linearizable(&self) -> bool {
        self.settings.consistency == Consistency::Linearizable
    }

    /// What the admission rule may use of this view now. `confirmation` is
    /// the outcome of a read the request waited for, if it waited for one.
    pub fn leader(&self, confirmation: Option<bool>) -> Leader {
        if self.is_regressed() {
            return Leader::Regressed;
        }
        let usable = confirmation.unwrap_or_else(|| self.is_fresh());
        if !usable {
            return match self.settings.on_unavailable {
                OnUnavailable::Reject => Leader::Unavailable,
                OnUnavailable::Local => {
                    let snapshot = self.snapshot();
                    Leader::Local {
                        highest: self.highest_leader.load(SeqCst),
                        // "No candidate" at revision R: every key created
                        // up to R is gone, its token deposed.
                        deposed_through: match snapshot.leader {
                            None => u64::try_from(snapshot.revision).unwrap_or(0),
                            Some(_) => 0,
                        },
                    }
                }
            };
        }
        Leader::View {
            revision: self.snapshot().leader,
            confirmed: confirmation == Some(true),
        }
    }

    /// Time since the start of the last successful read; `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        match self.fresh_since.load(SeqCst) {
            0 => None,
            nanos => {
                let at = self.base + Duration::from_nanos(nanos - 1);
                Some(Instant::now().saturating_duration_since(at))
            }
        }
    }

    /// Whether the view is young enough to decide.
    pub fn is_fresh(&self) -> bool {
        self.age().is_some_and(|age| age <= self.settings.max_staleness)
    }

    /// Whether etcd went back below this domain's epoch during this run.
    pub fn is_regressed(&self) -> bool {
        self.regressed.load(SeqCst)
    }

    /// Whether writes here can be decided now: `/readyz` asks every view.
    pub fn is_ready(&self) -> bool {
        !self.is_regressed() && (self.settings.on_unavailable == OnUnavailable::Local || self.is_fresh())
    }

    /// Sets the age gauge; ages change by themselves, so this runs when
    /// scraped. A view never read counts as infinitely old.
    pub fn update_age_gauge(&self) {
        let age = self.age().map_or(f64::INFINITY, |a| a.as_secs_f64());
        self.metrics.view_age.set(age);
    }

    /// Counts a request that waited for a confirming read.
    pub fn count_confirmation(&self) {
        self.metrics.confirmations.inc();
    }

    /// Leader revisions as they appear, for the fence-ahead task.
    pub fn subscribe_leaders(&self) -> watch::Receiver<u64> {
        self.fence.subscribe()
    }

    /// Counts a read the reader starts (`fencegate_leader_reads_total`).
    pub fn count_read(&self) {
        self.metrics.leader_reads.inc();
    }

    /// The least revision a linearizable read starting now may answer
    /// with, the domain's epoch being `epoch`: every token admitted was a
    /// leader revision etcd showed, and the view describes a revision etcd
    /// had reached. Taken before the read starts.
    pub fn floor(&self, epoch: u64) -> u64 {
        epoch.max(u64::try_from(self.snapshot().revision).unwrap_or(0))
    }

    /// Records a successful linearizable read that started at `started`
    /// and answered at `revision`, `floor` ([`ElectionView::floor`]) being
    /// taken before it started.
    pub fn record_read(&self, started: Instant, revision: i64, leader: Option<u64>, floor: u64) {
        // etcd answered, whatever it said.
        self.answered.store(true, SeqCst);
        if !self.reachable.swap(true, SeqCst) {
            tracing::info!(domain = %self.domain, election = %self.prefix, "etcd reachable again");
        }
        if u64::try_from(revision).unwrap_or(0) < floor {
            // A linearizable read cannot show less than etcd ever showed:
            // unless etcd lost its history. Such an answer neither changes
            // the view nor keeps it fresh (a restored etcd's leader is not
            // the one the view holds, and the view's is deposed there).
            // Under the publish lock: no publish that began before this
            // may install what etcd says after it.
            let _serial = self.publish.lock().unwrap_or_else(|e| e.into_inner());
            if !self.regressed.swap(true, SeqCst) {
                tracing::error!(
                    domain = %self.domain, etcd_revision = revision, floor,
                    "etcd answered with a revision below one it had shown (the domain's epoch or a revision read before; restored from an old backup?): writes here get 503 coordinator_regressed until fencegate is restarted after etcd is repaired, and the epoch lowered with `fencegate epochs set` if etcd's revision is below it"
                );
            }
            return;
        }
        // The leader first, freshness second: the gate checks freshness and
        // then loads the leader, so it never pairs a renewed freshness with
        // the leader of a view that had gone stale.
        self.publish(revision, leader);
        let nanos =
            u64::try_from(started.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1);
        self.fresh_since.fetch_max(nanos + 1, SeqCst);
    }

    /// Whether etcd has answered this view's reads, the last one included
    /// (`fencegate_etcd_up`, computed over every view when scraped).
    pub fn is_reachable(&self) -> bool {
        self.answered.load(SeqCst) && self.reachable.load(SeqCst)
    }

    /// Records that etcd could not be reached: a read that no member
    /// answered within its budget (each read tries several, see
    /// [`crate::coordinator`]), or a failed connection. One member's
    /// failure is not this, so the gauge and the log speak of etcd only.
    pub fn record_failure(&self, error: &dyn std::fmt::Display) {
        if self.reachable.swap(false, SeqCst) {
            tracing::warn!(domain = %self.domain, election = %self.prefix, error = %error, "etcd unreachable");
        }
    }

    /// Installs what etcd says held at `revision`, unless the view already
    /// describes that revision or a later one, or etcd lost history.
    pub fn publish(&self, revision: i64, leader: Option<u64>) {
        let _serial = self.publish.lock().unwrap_or_else(|e| e.into_inner());
        // Once etcd lost history, nothing it says is installed, however
        // far its revision climbs: it hands out again revisions that were
        // tokens. Its leader would be fenced ahead to, and the durable
        // epoch raised above the real etcd's leader, whom an operator's
        // repair (restoring that etcd) would then find refused.
        if self.is_regressed() {
            return;
        }
        let old = self.snapshot();
        if revision <= old.revision {
            return;
        }
        self.snapshot.store(Arc::new(Snapshot { revision, leader }));
        if leader == old.leader {
            return;
        }
        tracing::info!(
            domain = %self.domain, election = %self.prefix, revision,
            from = ?old.leader, to = ?leader, "leader changed"
        );
        let gauge = leader.map_or(0, |l| i64::try_from(l).unwrap_or(i64::MAX));
        self.metrics.leader_revision.set(gauge);
        if let Some(l) = leader {
            self.highest_leader.fetch_max(l, SeqCst);
            self.fence.send_if_modified(|highest| {
                let newer = l > *highest;
                if newer {
                    *highest = l;
                }
                newer
            });
        }
    }
}

/// When requests asked while the last read was in flight, the next read
/// expects all but `1/HOLD_SLACK` (rounded up) of the requests that joined
/// the last one (see [`ReadQueue`]). Measured in linearizable mode
/// (bench/RESULTS.md, step 14): writes arriving at their own pace, 5,000 to
/// 15,000 a second, waited 30 % less (p50), with twice the reads; writers
/// that wait for each answer, 2 to 64 of them, kept their throughput.
/// Slack on every read instead cost them one writer in N: 36 % of the
/// throughput at 2 connections, 26 % at 4, 9 % at 8.
const HOLD_SLACK: u64 = 16;

/// Linearizable reads shared by the requests waiting for one.
///
/// Reads are numbered as they start. A request notes the number of the
/// last read started when it arrived; any read with a higher number started
/// after it, so the request waits for the first such read to finish. One
/// read is in flight at a time and serves every request that arrived
/// before it started, so a burst of writes costs one or two reads, not one
/// each.
///
/// When a read is due, the reader may hold it a little for the writes it
/// expects: as many as joined the previous read. Those writers were
/// answered when that read ended, and writers that wait for each answer
/// send their next write one store round trip later; a read started
/// before they arrive serves few of them, and the rest wait a whole read
/// more. The hold ends when that many requests have asked since the
/// previous read started, or at the deadline the reader gives
/// ([`next`](ReadQueue::next)); a read nobody waits for is never held.
///
/// Writes that arrive at their own pace, not in answer to the last ones,
/// are what a held read gathers in its interval, so expecting as many
/// makes the next interval as long again: the intervals only ever grow, to
/// the deadline. Such writes also ask while a read is in flight, which
/// writers that wait for each answer (all inside the read) do not, unless
/// one missed the read; when some did, the next read expects a sixteenth
/// fewer ([`HOLD_SLACK`]), and each hold tends to be shorter than the last
/// (bench/RESULTS.md, step 14).
///
/// The reader runs on the main runtime, and the waiting requests on the
/// serving threads. Woken one by one from the reader's thread, each would
/// cost a wake-up across runtimes (a system call). So each serving thread
/// runs a [`relay`](ReadQueue::relay): requests wait in their thread's own
/// list, and the reader wakes only the relays, which wake their thread's
/// requests locally. Requests on a thread without a relay wait for the
/// reader directly.
#[derive(Default)]
pub struct ReadQueue {
    /// Number of the last read started.
    started: AtomicU64,
    /// Highest read number a waiting request needs.
    wanted: AtomicU64,
    /// Number of the last read finished.
    finished: AtomicU64,
    /// Number of the last read that succeeded.
    succeeded: AtomicU64,
    wake_reader: Notify,
    /// Woken when a read finishes: the relays, and requests on threads
    /// without one.
    read_done: Notify,
    /// Per thread (see [`wait_shard`]): requests waiting for their relay.
    relayed: [Notify; WAIT_SHARDS],
    /// Per thread: whether a relay runs there.
    relaying: [AtomicBool; WAIT_SHARDS],
    /// Requests that have asked for a read, ever.
    asked: AtomicU64,
    /// `asked` when the last read started.
    asked_at_start: AtomicU64,
    /// `asked` when the last read finished.
    asked_at_finish: AtomicU64,
    /// The `asked` count the next read is held for: `asked_at_start` plus
    /// the requests that joined the last read, less the slack if given.
    expected: AtomicU64,
    /// Woken by the request that brings `asked` to `expected`.
    expected_arrived: Notify,
}

impl ReadQueue {
    /// A mark to take when a request arrives; reads after it started later.
    pub fn arrival(&self) -> u64 {
        self.started.load(SeqCst)
    }

    /// Waits for a read that started after `arrival`; true if it succeeded.
    pub async fn confirm(&self, arrival: u64) -> bool {
        let need = arrival + 1;
        self.wanted.fetch_max(need, SeqCst);
        self.wake_reader.notify_one();
        if self.asked.fetch_add(1, SeqCst) + 1 == self.expected.load(SeqCst) {
            self.expected_arrived.notify_one();
        }
        let shard = wait_shard();
        loop {
            let relayed = self.relaying[shard].load(SeqCst);
            let list = match relayed {
                true => &self.relayed[shard],
                false => &self.read_done,
            };
            let done = list.notified();
            tokio::pin!(done);
            // Registered before the checks: a read finishing after them
            // wakes it (through the relay, which registers for the next
            // read before it relays), and so does a relay that ends.
            done.as_mut().enable();
            if relayed && !self.relaying[shard].load(SeqCst) {
                // The relay ended before this registered: wait for the reader.
                continue;
            }
            if self.finished.load(SeqCst) >= need {
                return self.succeeded.load(SeqCst) >= need;
            }
            done.await;
        }
    }

    /// Relays the end of every read to the requests of this thread; runs
    /// until dropped (with the thread's runtime).
    pub async fn relay(&self) {
        let shard = wait_shard();
        /// Stops the relaying when the relay ends: requests waiting for it
        /// are woken to wait for the reader instead.
        struct Stop<'a>(&'a ReadQueue, usize);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.relaying[self.1].store(false, SeqCst);
                self.0.relayed[self.1].notify_waiters();
            }
        }
        let _stop = Stop(self, shard);
        self.relaying[shard].store(true, SeqCst);
        loop {
            let next = self.read_done.notified();
            tokio::pin!(next);
            next.as_mut().enable();
            // Wakes every request that registered before this point; one
            // registering later finds the read finished, or is woken by
            // the next pass.
            self.relayed[shard].notify_waiters();
            next.await;
        }
    }

    /// For the reader: waits until a request needs a read that has not
    /// started yet, or until `refresh_at`, and not before `not_before`;
    /// then, if requests wait, holds the read for the ones expected (see
    /// the type's description) until `hold_until` at the latest. Returns
    /// the number of the read it may now start. Requests that arrive until
    /// then join this read.
    pub async fn next(&self, refresh_at: Instant, not_before: Instant, hold_until: Instant) -> u64 {
        loop {
            let woken = self.wake_reader.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.wanted.load(SeqCst) > self.started.load(SeqCst) {
                break;
            }
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(refresh_at) => break,
            }
        }
        // Checked first: tokio's timers tick in milliseconds, and even a
        // deadline already passed can wait for the next tick.
        if Instant::now() < not_before {
            tokio::time::sleep_until(not_before).await;
        }
        // Writers that wait for each answer were all inside the last read;
        // requests that asked while it was in flight came at their own
        // pace (or missed it), and only then does the hold leave slack.
        // Lowered before the checks below, which see it.
        let last_start = self.asked_at_start.load(SeqCst);
        if self.asked_at_finish.load(SeqCst) > last_start {
            let joined = self.expected.load(SeqCst) - last_start;
            self.expected.fetch_sub(joined.div_ceil(HOLD_SLACK), SeqCst);
        }
        loop {
            let arrived = self.expected_arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let nobody_waits = self.wanted.load(SeqCst) <= self.started.load(SeqCst);
            let all_came = self.asked.load(SeqCst) >= self.expected.load(SeqCst);
            // The deadline is checked here too, for the timer's tick.
            if nobody_waits || all_came || Instant::now() >= hold_until {
                break;
            }
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep_until(hold_until) => break,
            }
        }
        let asked = self.asked.load(SeqCst);
        let joined = asked - self.asked_at_start.swap(asked, SeqCst);
        self.expected.store(asked + joined, SeqCst);
        self.started.fetch_add(1, SeqCst) + 1
    }

    /// For the reader: read `seq` ended, successfully or not.
    pub fn finish(&self, seq: u64, ok: bool) {
        self.asked_at_finish.store(self.asked.load(SeqCst), SeqCst);
        if ok {
            self.succeeded.fetch_max(seq, SeqCst);
        }
        self.finished.fetch_max(seq, SeqCst);
        self.read_done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request asking for a read now, as a task; its answer is whether
    /// the read it waited for succeeded.
    fn confirm(q: &Arc<ReadQueue>) -> tokio::task::JoinHandle<bool> {
        let (q, arrival) = (q.clone(), q.arrival());
        tokio::spawn(async move { q.confirm(arrival).await })
    }

    fn view(on_unavailable: OnUnavailable) -> ElectionView {
        let metrics = crate::metrics::Metrics::new().election("d");
        let settings = ViewSettings {
            consistency: Consistency::Watch,
            on_unavailable,
            max_staleness: Duration::from_secs(5),
        };
        ElectionView::new("d".into(), "/e".into(), settings, metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_revision_never_replaces_the_view() {
        let v = view(OnUnavailable::Reject);
        v.publish(10, Some(7));
        v.publish(9, Some(3));
        v.publish(10, None);
        assert_eq!(
            v.snapshot(),
            Snapshot {
                revision: 10,
                leader: Some(7)
            }
        );
        v.publish(12, Some(11));
        assert_eq!(v.snapshot().leader, Some(11));
        assert_eq!(*v.subscribe_leaders().borrow(), 11);
    }

    /// `fencegate_etcd_up` counts a view as up once etcd answered its
    /// last read, even with a revision below the epoch (etcd is up, just
    /// regressed), and not before any answer.
    #[tokio::test(start_paused = true)]
    async fn a_view_is_reachable_once_its_last_read_was_answered() {
        let v = view(OnUnavailable::Reject);
        assert!(!v.is_reachable(), "no read yet");
        v.record_read(Instant::now(), 10, Some(7), 0);
        assert!(v.is_reachable());
        v.record_failure(&"no member answered");
        assert!(!v.is_reachable());
        v.record_read(Instant::now(), 3, Some(2), 9);
        assert!(v.is_regressed());
        assert!(v.is_reachable(), "a regressed answer is still an answer");
    }

    /// Once etcd answered below what it had shown, nothing it says later
    /// is installed, however far its revision climbs: not its leader, and
    /// no new leader for the fence-ahead task.
    #[tokio::test(start_paused = true)]
    async fn a_regressed_view_installs_nothing_more() {
        let v = view(OnUnavailable::Reject);
        v.record_read(Instant::now(), 500, Some(100), v.floor(100));
        v.record_read(Instant::now(), 3, None, v.floor(100));
        assert!(v.is_regressed());
        v.record_read(Instant::now(), 900, Some(800), v.floor(100));
        v.publish(901, Some(850));
        assert_eq!(
            v.snapshot(),
            Snapshot {
                revision: 500,
                leader: Some(100)
            }
        );
        assert_eq!(
            *v.subscribe_leaders().borrow(),
            100,
            "fenced ahead to a regressed etcd's leader"
        );
        assert_eq!(v.leader(None), Leader::Regressed);
    }

    /// A read that started after the view described revision 500 and
    /// answers at 350 proves etcd lost history (restored from a backup
    /// taken above the epoch): the view is regressed, and the answer
    /// neither replaces its leader nor keeps it fresh.
    #[tokio::test(start_paused = true)]
    async fn an_answer_below_a_revision_the_view_saw_is_a_regression() {
        let v = view(OnUnavailable::Reject);
        let epoch = 100;
        assert_eq!(v.floor(epoch), 100, "nothing read yet: the epoch");
        v.record_read(Instant::now(), 500, Some(100), v.floor(epoch));
        assert_eq!(v.floor(epoch), 500);
        tokio::time::advance(Duration::from_secs(1)).await;
        let age = v.age();
        v.record_read(Instant::now(), 350, Some(350), v.floor(epoch));
        assert!(v.is_regressed());
        assert_eq!(v.leader(None), Leader::Regressed);
        assert_eq!(
            v.snapshot().leader,
            Some(100),
            "the restored etcd's leader is not installed"
        );
        assert_eq!(v.age(), age, "nor does its answer renew freshness");
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_runs_from_the_start_of_the_last_read() {
        let v = view(OnUnavailable::Reject);
        assert_eq!(v.leader(None), Leader::Unavailable, "no read yet");
        let started = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        v.record_read(started, 5, Some(5), 0);
        assert_eq!(
            v.leader(None),
            Leader::View {
                revision: Some(5),
                confirmed: false
            }
        );
        tokio::time::advance(Duration::from_millis(4001)).await;
        assert_eq!(v.leader(None), Leader::Unavailable, "5 s after the read began");
        assert!(!v.is_ready());
        assert_eq!(
            v.leader(Some(true)),
            Leader::View {
                revision: Some(5),
                confirmed: true
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn local_mode_caps_at_the_highest_leader_seen() {
        let v = view(OnUnavailable::Local);
        v.record_read(Instant::now(), 8, Some(8), 0);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            v.leader(None),
            Leader::Local {
                highest: 8,
                deposed_through: 0
            }
        );
        assert!(v.is_ready(), "local mode serves without etcd");
    }

    #[tokio::test(start_paused = true)]
    async fn a_revision_below_the_epoch_latches_regressed() {
        let v = view(OnUnavailable::Reject);
        v.record_read(Instant::now(), 50, Some(40), 100);
        assert_eq!(v.leader(None), Leader::Regressed);
        v.record_read(Instant::now(), 500, Some(400), 100);
        assert_eq!(v.leader(Some(true)), Leader::Regressed, "stays until restart");
    }

    #[tokio::test]
    async fn a_confirmation_waits_for_a_read_that_started_after_it() {
        let q = Arc::new(ReadQueue::default());
        // Read 1 (a periodic one) is in flight before the request arrives.
        let first = q.next(Instant::now(), Instant::now(), Instant::now()).await;
        let arrival = q.arrival();
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.confirm(arrival).await }
        });
        q.finish(first, true);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "read 1 started before the request");
        let second = q
            .next(
                Instant::now() + Duration::from_secs(60),
                Instant::now(),
                Instant::now(),
            )
            .await;
        assert_eq!(second, 2);
        q.finish(second, true);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_held_back_by_not_before_takes_the_requests_that_arrive_meanwhile() {
        let q = Arc::new(ReadQueue::default());
        let first = confirm(&q);
        let reader = tokio::spawn({
            let q = q.clone();
            async move {
                let far = Instant::now() + Duration::from_secs(60);
                let not_before = Instant::now() + Duration::from_millis(1);
                q.next(far, not_before, not_before).await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(q.arrival(), 0, "the read has not started: it is held back");
        let second = confirm(&q);
        tokio::time::advance(Duration::from_millis(1)).await;
        let seq = reader.await.unwrap();
        assert_eq!(seq, 1);
        q.finish(seq, true);
        assert!(
            first.await.unwrap() && second.await.unwrap(),
            "both joined read 1"
        );
        assert_eq!(q.started.load(SeqCst), 1, "one read served both");
    }

    #[tokio::test]
    async fn a_relay_wakes_its_threads_confirmations_and_its_end_hands_them_back() {
        let q = Arc::new(ReadQueue::default());
        let relay = tokio::spawn({
            let q = q.clone();
            async move { q.relay().await }
        });
        tokio::task::yield_now().await;
        let waiters: Vec<_> = (0..10).map(|_| confirm(&q)).collect();
        tokio::task::yield_now().await;
        let seq = q
            .next(
                Instant::now() + Duration::from_secs(60),
                Instant::now(),
                Instant::now(),
            )
            .await;
        q.finish(seq, true);
        for w in waiters {
            assert!(w.await.unwrap(), "woken through the relay");
        }
        // A request waiting in the relay's list when the relay stops waits
        // for the reader instead.
        let late = confirm(&q);
        tokio::task::yield_now().await;
        relay.abort();
        let _ = relay.await;
        let seq = q
            .next(
                Instant::now() + Duration::from_secs(60),
                Instant::now(),
                Instant::now(),
            )
            .await;
        q.finish(seq, true);
        let woken = tokio::time::timeout(Duration::from_secs(5), late).await;
        assert!(woken.expect("not stranded by the relay's end").unwrap());
    }

    /// The hold: a read is held until as many requests asked as joined the
    /// read before it, but for a sixteenth (rounded up) of them when
    /// requests asked while that read was in flight; or until
    /// `hold_until`. A read nobody waits for is not held.
    #[tokio::test(start_paused = true)]
    async fn a_read_is_held_for_the_requests_that_joined_the_last_one() {
        let q = Arc::new(ReadQueue::default());
        let far = Instant::now() + Duration::from_secs(60);
        let hold = Duration::from_millis(2);
        let read = |q: &Arc<ReadQueue>| {
            let q = q.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                // Bounded, so a hold that never ends fails the test.
                let next = q.next(far, started, started + hold);
                let seq = tokio::time::timeout(Duration::from_secs(30), next)
                    .await
                    .expect("the read never started");
                (seq, started.elapsed())
            })
        };
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        let confirm_all = |batch: Vec<tokio::task::JoinHandle<bool>>| async move {
            for w in batch {
                assert!(w.await.unwrap());
            }
        };
        // Read 1: seventeen requests join it, and one asks while it is in flight.
        let batch: Vec<_> = (0..17).map(|_| confirm(&q)).collect();
        settle().await;
        let (seq, held) = read(&q).await.unwrap();
        assert_eq!(
            (seq, held),
            (1, Duration::ZERO),
            "nothing joined a read before: no hold"
        );
        let during = vec![confirm(&q)];
        settle().await;
        q.finish(seq, true);
        confirm_all(batch).await;
        settle().await;
        assert!(!during[0].is_finished(), "asked after read 1 started");
        // Read 2 expects 17 - 2 = 15 requests: the one above and 14 more.
        // Nothing asks while read 2 is in flight: read 3 expects all 15.
        let mut waiting = during;
        for (seq_wanted, why) in [(2, "the slack"), (3, "no slack")] {
            waiting.extend((waiting.len()..14).map(|_| confirm(&q)));
            settle().await;
            let reader = read(&q);
            settle().await;
            assert!(!reader.is_finished(), "{why}: held for the fifteenth request");
            waiting.push(confirm(&q));
            let (seq, held) = reader.await.unwrap();
            assert_eq!(
                (seq, held),
                (seq_wanted, Duration::ZERO),
                "{why}: started by the fifteenth request, not the deadline"
            );
            q.finish(seq, true);
            confirm_all(std::mem::take(&mut waiting)).await;
        }
        // Read 4 expects 15 again; two come: it starts at the deadline.
        let two: Vec<_> = (0..2).map(|_| confirm(&q)).collect();
        settle().await;
        let (seq, held) = read(&q).await.unwrap();
        assert_eq!((seq, held), (4, hold), "held until the deadline");
        q.finish(seq, true);
        confirm_all(two).await;
        // A periodic read with nobody waiting is not held, though read 5
        // would expect two requests.
        let due = Instant::now();
        let seq = q.next(due, due, due + hold).await;
        assert_eq!((seq, due.elapsed()), (5, Duration::ZERO), "nobody waits: no hold");
        // A floor that has passed does not wait for the timer's next tick.
        let one = confirm(&q);
        settle().await;
        let floor = Instant::now();
        tokio::time::advance(Duration::from_micros(300)).await;
        let due = Instant::now();
        let seq = q.next(far, floor + Duration::from_micros(250), due + hold).await;
        assert_eq!((seq, due.elapsed()), (6, Duration::ZERO), "the floor had passed");
        q.finish(seq, true);
        assert!(one.await.unwrap());
    }

    #[tokio::test]
    async fn concurrent_confirmations_share_one_read() {
        let q = Arc::new(ReadQueue::default());
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let q = q.clone();
                let arrival = q.arrival();
                tokio::spawn(async move { q.confirm(arrival).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let seq = q
            .next(
                Instant::now() + Duration::from_secs(60),
                Instant::now(),
                Instant::now(),
            )
            .await;
        q.finish(seq, false);
        for w in waiters {
            assert!(!w.await.unwrap(), "the shared read failed");
        }
        assert_eq!(q.started.load(SeqCst), 1);
    }
}
