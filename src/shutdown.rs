//! The shutdown signal: SIGTERM or SIGINT (Ctrl-C).

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT received after this call. The
/// handlers are installed by the call itself, not when the future is first
/// polled: a signal during startup (waiting for etcd, say) must not take
/// the default action, an exit that leaves no clean-shutdown mark. Call it
/// inside the runtime.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let (terminate, interrupt) = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
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
            tokio::select! {
                () = wait(interrupt, "SIGINT") => tracing::info!("SIGINT received, shutting down"),
                () = wait(terminate, "SIGTERM") => tracing::info!("SIGTERM received, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received, shutting down");
        }
    }
}
