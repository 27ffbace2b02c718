//! One fencegate process from start to clean shutdown: reconcile the state
//! file with the configuration, start the committer, build the domains and
//! the data path, serve the proxy and admin listeners, drain, and record the
//! clean-shutdown mark.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::committer::Committer;
use crate::config::Config;
use crate::gate::{Gate, GateSettings, Gates};
use crate::metrics::{Metrics, NO_DOMAIN};
use crate::proxy::Proxy;
use crate::server::{self, Drain};
use crate::state::{StateError, StateFile, WantedDomain};

/// The two listeners, bound by the caller (tests bind port 0).
pub struct Listeners {
    /// Where writers connect.
    pub proxy: TcpListener,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/domains` are served.
    pub admin: TcpListener,
}

/// The domains of `config` as the state file knows them.
pub fn wanted_domains(config: &Config) -> Vec<WantedDomain> {
    config
        .domains
        .iter()
        .map(|d| WantedDomain {
            name: d.name.clone(),
            prefix: d.prefix.clone(),
        })
        .collect()
}

/// Runs fencegate until `shutdown` resolves and the connections drain.
/// `forget` names stored domains the configuration dropped on purpose.
pub async fn run(
    config: Config,
    state: StateFile,
    forget: &[String],
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StateError> {
    let metrics = Metrics::new();
    let start = state.start(&wanted_domains(&config), forget)?;
    let request_timeout = config.upstream.request_timeout;
    let crash_wait_until = (!start.was_clean).then(|| {
        tracing::warn!(
            wait = ?request_timeout,
            "the previous run did not shut down cleanly: each domain's first raise waits request_timeout from now, since its writes may still be in flight at the store"
        );
        tokio::time::Instant::now() + request_timeout
    });
    let (committer, committer_task) = Committer::spawn(state, metrics.clone());
    let settings = GateSettings {
        crash_wait_until,
        // A barrier normally ends by itself: unfinished bodies are aborted
        // and sent ones time out at request_timeout. This only guards
        // against a write that never ends.
        drain_limit: request_timeout + config.upstream.connect_timeout + Duration::from_secs(1),
        committer: committer.clone(),
    };
    let gates = config
        .domains
        .iter()
        .zip(&start.epochs)
        .map(|(d, epoch)| {
            tracing::info!(domain = %d.name, prefix = %d.prefix, epoch, "domain loaded");
            Arc::new(Gate::new(
                &d.name,
                d.prefix.clone(),
                d.election.clone(),
                *epoch,
                metrics.domain(&d.name),
                settings.clone(),
            ))
        })
        .collect();
    let proxy = Arc::new(Proxy::new(&config, Gates::new(gates), metrics.domain(NO_DOMAIN)));

    let serving = Arc::new(AtomicBool::new(true));
    let stop_admin = CancellationToken::new();
    let admin_router = admin::router(AdminState {
        proxy: proxy.clone(),
        metrics,
        serving: serving.clone(),
    });
    let admin_task = tokio::spawn(
        axum::serve(listeners.admin, admin_router)
            .with_graceful_shutdown(stop_admin.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(
        listen = %listeners.proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %config.upstream.url,
        "fencegate serving"
    );

    let drain = server::serve(listeners.proxy, proxy.clone(), &config.server, shutdown).await;
    serving.store(false, Ordering::SeqCst);
    // The clean mark promises the next start that no write of ours is still
    // in flight at the store; it is only true if every connection drained.
    if drain == Drain::Complete {
        match committer.close_clean().await {
            Ok(()) => tracing::info!("clean shutdown recorded"),
            Err(e) => tracing::error!(error = %e, "could not record the clean shutdown"),
        }
    } else {
        tracing::warn!("not recording a clean shutdown: requests were still in flight");
    }
    drop(settings);
    drop(committer);
    drop(proxy);
    let _ = committer_task.await;
    stop_admin.cancel();
    let _ = admin_task.await;
    Ok(())
}
