//! The serving thread's clock: a ticking task that keeps tokio's timers
//! cheap to arm, and the coarse timer hyper's header read timeout runs on.
//!
//! Each serving thread runs one [`Clock`]. Its tick does two jobs:
//!
//! - It anchors tokio's timer wheel. When tokio registers a timer that
//!   expires before the event loop's next planned wake-up, it wakes the
//!   loop through its eventfd: a `write` syscall, then an extra
//!   `epoll_wait`, on almost every request, because at the moment the loop
//!   parks under load most connections wait for the store and have no
//!   timer armed. A tick that always comes sooner than any timeout a
//!   request arms keeps the planned wake-up early enough that registering
//!   them never needs the eventfd.
//! - It expires hyper's header read timers. hyper arms one for every head
//!   it waits for and drops it when the head has come: on tokio's timers
//!   that was a boxed timer registered in and removed from the wheel on
//!   every request, 975 instructions of a read's 21,700 (bench/RESULTS.md,
//!   step 18). Here arming one is an entry in a slab, and it fires at the
//!   first tick after its deadline: at most one period late, and the period
//!   is at most half the header read timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// One serving thread's clock: [`Clock::run`] ticks it, [`Clock::timer`]
/// hands hyper timers that fire on its ticks.
#[derive(Clone)]
pub struct Clock {
    period: Duration,
    sleepers: Arc<Mutex<Slab<Sleeper>>>,
}

/// An armed timer: its deadline, and the task to wake when it passes.
struct Sleeper {
    deadline: Instant,
    waker: Option<Waker>,
}

impl Clock {
    /// A clock whose tick comes before any timeout of `shortest_timeout`
    /// or more can pass: every half of it, at most 1 s, at least 10 ms.
    pub fn new(shortest_timeout: Duration) -> Clock {
        Clock {
            period: (shortest_timeout / 2).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            sleepers: Arc::new(Mutex::new(Slab::new())),
        }
    }

    /// The time between two ticks.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Ticks until dropped (or aborted).
    pub async fn run(self) {
        let mut ticks = tokio::time::interval(self.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.expire(Instant::now());
        }
    }

    /// Wakes every timer whose deadline is `now` or earlier.
    fn expire(&self, now: Instant) {
        let mut sleepers = self.sleepers.lock().expect("clock lock");
        for (_, sleeper) in sleepers.iter_mut() {
            if sleeper.deadline <= now {
                if let Some(waker) = sleeper.waker.take() {
                    waker.wake();
                }
            }
        }
    }

    /// A timer for hyper on this clock.
    pub fn timer(&self) -> CoarseTimer {
        CoarseTimer(self.clone())
    }
}

/// hyper's [`hyper::rt::Timer`] on a [`Clock`].
#[derive(Clone)]
pub struct CoarseTimer(Clock);

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep {
            deadline,
            key: None,
            clock: self.0.clone(),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<CoarseSleep>() {
            Some(mut coarse) => coarse.as_mut().set_deadline(deadline),
            None => *sleep = self.sleep_until(deadline),
        }
    }
}

/// A timer that fires at the first tick of its clock after its deadline.
struct CoarseSleep {
    deadline: Instant,
    /// Its entry among the clock's sleepers, from its first poll.
    key: Option<usize>,
    clock: Clock,
}

impl CoarseSleep {
    fn set_deadline(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.get_mut();
        this.deadline = deadline;
        if let Some(key) = this.key {
            this.clock.sleepers.lock().expect("clock lock")[key].deadline = deadline;
        }
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut sleepers = this.clock.sleepers.lock().expect("clock lock");
        let Some(key) = this.key else {
            this.key = Some(sleepers.insert(Sleeper {
                deadline: this.deadline,
                waker: Some(cx.waker().clone()),
            }));
            return Poll::Pending;
        };
        let sleeper = &mut sleepers[key];
        // The tick took the waker: the deadline passed.
        if sleeper.waker.is_none() && sleeper.deadline <= Instant::now() {
            return Poll::Ready(());
        }
        match &sleeper.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => sleeper.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.clock.sleepers.lock().expect("clock lock").remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;

    #[test]
    fn the_period_is_half_the_shortest_timeout_within_bounds() {
        assert_eq!(
            Clock::new(Duration::from_secs(10)).period(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Clock::new(Duration::from_secs(1)).period(),
            Duration::from_millis(500)
        );
        assert_eq!(
            Clock::new(Duration::from_millis(4)).period(),
            Duration::from_millis(10)
        );
    }

    /// Waits for `sleep` to fire; a failure, not a hang, if it never does.
    async fn fires(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) {
        tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| sleep.as_mut().poll(cx)),
        )
        .await
        .expect("the sleep fired within 5 s");
    }

    // On real time: hyper's timers take `std::time::Instant`s, which a
    // paused tokio clock does not move.
    #[tokio::test]
    async fn a_sleep_fires_at_the_first_tick_after_its_deadline_and_not_before() {
        let clock = Clock::new(Duration::from_millis(200));
        let ticking = tokio::spawn(clock.clone().run());
        let timer = clock.timer();
        let start = Instant::now();
        let mut sleep = timer.sleep(Duration::from_millis(250));
        fires(&mut sleep).await;
        let took = start.elapsed();
        // Ticks every 100 ms: the one at 300 ms is the first past 250.
        assert!(took >= Duration::from_millis(250), "fired early: {took:?}");
        assert!(took <= Duration::from_millis(1000), "fired late: {took:?}");
        drop(sleep);
        // A reset moves an armed timer's deadline.
        let start = Instant::now();
        let mut sleep = timer.sleep(Duration::from_secs(60));
        let pending = std::future::poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx))).await;
        assert!(pending.is_pending());
        timer.reset(&mut sleep, Instant::now() + Duration::from_millis(100));
        fires(&mut sleep).await;
        let took = start.elapsed();
        assert!(
            (Duration::from_millis(100)..Duration::from_millis(400)).contains(&took),
            "{took:?}"
        );
        drop(sleep);
        assert!(
            clock.sleepers.lock().unwrap().is_empty(),
            "a dropped timer leaves the clock"
        );
        ticking.abort();
    }
}
