//! The shutdown signal: SIGTERM or SIGINT (Ctrl-C). SIGHUP is logged and
//! ignored: its default action (a closed terminal, `systemctl reload`,
//! `kill -HUP` sent out of habit to reload) would end the process with no
//! drain and no clean-shutdown mark, and fencegate does not reload its
//! configuration.

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT received after this call. The
/// handlers are installed by the call itself, not when the future is first
/// polled: a signal during startup (waiting for etcd, say) must not take
/// the default action, an exit that leaves no clean-shutdown mark. Call it
/// inside the runtime.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let (terminate, interrupt, hangup) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |listener: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
                match listener {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for {name}");
                        std::future::pending::<()>().await;
                    }
                }
            };
            // Once installed, tokio's handler stays: a SIGHUP after this
            // future is done (during the drain) is ignored too.
            let ignore_hangups = async move {
                let Ok(mut hangups) = hangup else {
                    return std::future::pending::<()>().await;
                };
                while hangups.recv().await.is_some() {
                    tracing::warn!(
                        "SIGHUP received and ignored: fencegate does not reload its configuration; \
                         restart it (SIGTERM drains) to apply a change"
                    );
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                () = wait(interrupt, "SIGINT") => tracing::info!("SIGINT received, shutting down"),
                () = wait(terminate, "SIGTERM") => tracing::info!("SIGTERM received, shutting down"),
                () = ignore_hangups => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received, shutting down");
        }
    }
}
