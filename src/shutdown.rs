//! The shutdown signals. The first SIGTERM or SIGINT (Ctrl-C) begins the
//! drain; a second one ends it at once, for an operator who will not wait
//! out `shutdown_grace` (the requests still in flight are cut, and no
//! clean-shutdown mark is recorded). SIGHUP is logged and ignored: its
//! default action (a closed terminal, `systemctl reload`, `kill -HUP` sent
//! out of habit to reload) would end the process with no drain and no
//! clean-shutdown mark, and fencegate does not reload its configuration.

use std::time::Duration;

use tokio::sync::watch;

/// A second signal this soon after the first is taken as the same one
/// delivered twice: Ctrl-C reaches every process in the terminal's
/// foreground group, so a wrapper that forwards it to fencegate doubles
/// it, and a drain cut short by that would cost the clean mark.
pub const SAME_SIGNAL_WITHIN: Duration = Duration::from_millis(500);

/// Counts the shutdown signals received (the first two count).
pub struct Signals {
    received: watch::Receiver<u8>,
}

impl Signals {
    /// Resolves once the first SIGTERM or SIGINT has come.
    pub fn first(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        wait_for(self.received.clone(), 1)
    }

    /// Resolves once a second one has come, at least
    /// [`SAME_SIGNAL_WITHIN`] after the first.
    pub fn second(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        wait_for(self.received.clone(), 2)
    }
}

async fn wait_for(mut received: watch::Receiver<u8>, count: u8) {
    // A closed channel (no handler could be installed) never resolves.
    if received.wait_for(|&n| n >= count).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Installs the handlers now, not when a future is first polled: a signal
/// during startup (waiting for etcd, say) must not take the default
/// action, an exit that leaves no clean-shutdown mark. Call it inside the
/// runtime.
pub fn signals() -> Signals {
    let (count, received) = watch::channel(0u8);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for {name}");
                None
            }
        };
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let hangup = listen(SignalKind::hangup(), "SIGHUP");
        tokio::spawn(count_signals(terminate, interrupt, hangup, count));
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let mut first = None;
        while tokio::signal::ctrl_c().await.is_ok() {
            if !counted(&count, &mut first, "Ctrl-C") {
                break;
            }
        }
    });
    Signals { received }
}

#[cfg(unix)]
async fn count_signals(
    mut terminate: Option<tokio::signal::unix::Signal>,
    mut interrupt: Option<tokio::signal::unix::Signal>,
    mut hangup: Option<tokio::signal::unix::Signal>,
    count: watch::Sender<u8>,
) {
    // Once installed, tokio's handlers stay for the life of the process,
    // so a signal after the second (or a SIGHUP at any time) is ignored.
    async fn next(listener: &mut Option<tokio::signal::unix::Signal>) {
        let received = match listener {
            Some(listener) => listener.recv().await.is_some(),
            None => false,
        };
        if !received {
            std::future::pending::<()>().await;
        }
    }
    let mut first = None;
    loop {
        let name = tokio::select! {
            () = next(&mut terminate) => "SIGTERM",
            () = next(&mut interrupt) => "SIGINT",
            () = next(&mut hangup) => {
                tracing::warn!(
                    "SIGHUP received and ignored: fencegate does not reload its configuration; \
                     restart it (SIGTERM drains) to apply a change"
                );
                continue;
            }
        };
        if !counted(&count, &mut first, name) {
            // Signals past the second change nothing; SIGHUPs are still
            // ignored with their message.
            terminate = None;
            interrupt = None;
        }
    }
}

/// Counts one shutdown signal; false once two have counted.
fn counted(count: &watch::Sender<u8>, first: &mut Option<tokio::time::Instant>, name: &str) -> bool {
    let now = tokio::time::Instant::now();
    match *first {
        None => {
            *first = Some(now);
            tracing::info!(
                "{name} received, shutting down: draining requests in flight (a second {name} ends the drain at once)"
            );
            count.send_replace(1);
            true
        }
        Some(at) if now.duration_since(at) < SAME_SIGNAL_WITHIN => {
            tracing::info!(
                "{name} received again within {SAME_SIGNAL_WITHIN:?} of the first: taken as the same signal"
            );
            true
        }
        Some(_) => {
            tracing::warn!(
                "second {name} received: ending the drain now; requests still in flight are cut (their writes' outcomes are unknown to their clients) and no clean shutdown is recorded"
            );
            count.send_replace(2);
            false
        }
    }
}
