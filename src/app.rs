//! One fencegate process from start to clean shutdown: reconcile the state
//! file with the configuration, start the committer, build the domains and
//! the data path, serve the proxy and admin listeners, drain, and record the
//! clean-shutdown mark.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::admin::{self, AdminState, Phase};
use crate::affinity;
use crate::commands::Fatal;
use crate::committer::Committer;
use crate::config::Config;
use crate::coordinator::{Coordinator, Elected};
use crate::election::{ElectionView, ViewSettings};
use crate::gate::{Gate, GateSettings, Gates};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::server::{self, Drain, Stop};
use crate::state::{StateFile, WantedDomain};

/// How long a shutdown waits for the admin listener's connections, once
/// the proxy's have drained.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);

/// The two listeners, bound by the caller (tests bind port 0).
pub struct Listeners {
    /// Where writers connect.
    pub proxy: TcpListener,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/domains` are served.
    pub admin: TcpListener,
}

/// When to stop (from [`crate::shutdown::signals`]).
pub struct Shutdown {
    /// Resolves when the shutdown begins: readiness turns 503, the
    /// listeners stop taking connections, and the open ones drain for up
    /// to `shutdown_grace`.
    pub begin: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Resolves when that drain must end at once: the connections still
    /// open are cut, and no clean-shutdown mark is recorded if a write was
    /// among them.
    pub hurry: Pin<Box<dyn Future<Output = ()> + Send>>,
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

/// Runs fencegate until `shutdown` begins and the connections drain (or
/// `shutdown` hurries).
/// `forget` names stored domains the configuration dropped on purpose;
/// `etcd` is how to reach etcd, needed when a domain has an election.
pub async fn run(
    config: Config,
    state: StateFile,
    forget: &[String],
    etcd: Option<etcd_client::ConnectOptions>,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), Fatal> {
    let Shutdown {
        begin: mut shutdown,
        hurry,
    } = shutdown;
    let stop = Stop::default();
    let _hurry = AbortOnDropHandle::new(tokio::spawn({
        let hurry_token = stop.hurry.clone();
        async move {
            hurry.await;
            hurry_token.cancel();
        }
    }));
    // A signal before serving (while etcd is awaited) stops the start, and
    // the shutdown is as clean as any: nothing was forwarded.
    let mut signalled = false;
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // Before the state file is touched: a start that cannot pin fails
    // without spending the previous run's clean-shutdown mark.
    let cpus = (config.server.pin_workers)
        .then(|| affinity::placement(workers))
        .transpose()?;
    let metrics = Metrics::new();
    let request_timeout = config.upstream.request_timeout;
    let start = state.start(&wanted_domains(&config), forget, request_timeout)?;
    let crash_wait_until = start.crash_wait.map(|wait| {
        tracing::warn!(
            ?wait,
            "the previous run did not shut down cleanly: each domain's first raise waits this long from now (request_timeout, or a longer one still owed to a run before it), since its writes may still be in flight at the store"
        );
        tokio::time::Instant::now() + wait
    });
    let (committer, committer_task) = Committer::spawn(state, metrics.clone(), crash_wait_until);
    let settings = GateSettings {
        crash_wait_until,
        // A barrier normally ends by itself: unfinished bodies are aborted
        // and sent ones time out at request_timeout. This only guards
        // against a write that never ends.
        drain_limit: request_timeout + config.upstream.connect_timeout + Duration::from_secs(1),
        committer: committer.clone(),
    };
    let mut elected = Vec::new();
    let gates = config
        .domains
        .iter()
        .zip(start.epochs.iter().zip(&start.lowest_guards_before))
        .map(|(d, (epoch, lowest_before))| {
            tracing::info!(domain = %d.name, prefix = %d.prefix, epoch, election = ?d.election, "domain loaded");
            let domain_metrics = metrics.domain(&d.name);
            let view = match (&d.election, &config.etcd) {
                (Some(election), Some(etcd)) => Some(Arc::new(ElectionView::new(
                    d.name.as_str().into(),
                    election.clone(),
                    ViewSettings {
                        consistency: etcd.consistency,
                        on_unavailable: etcd.on_unavailable,
                        max_staleness: etcd.max_staleness,
                    },
                    metrics.election(&d.name),
                ))),
                _ => None,
            };
            // After a crash, a domain the configuration raised above the
            // epoch that guarded some of its paths (a nested domain merged
            // into it) admits its epoch only through a raise, which waits
            // out the crash wait: writes of the crashed run below it may
            // still be at the store, on those paths.
            let admitted = match lowest_before {
                Some(lowest) if !start.was_clean => (*lowest).min(*epoch),
                _ => *epoch,
            };
            let gate = Gate::new(
                &d.name,
                d.prefix.clone(),
                view.clone(),
                admitted,
                domain_metrics,
                settings.clone(),
            );
            let gate = Arc::new(gate.pending_raise_to(*epoch));
            if let Some(view) = view {
                elected.push(Elected {
                    gate: gate.clone(),
                    view,
                });
            }
            gate
        })
        .collect();
    // Until etcd answers, election domains refuse (or, in local mode, fall
    // back to their epochs); the first read also fences ahead to the leader.
    let coordinator = match (&config.etcd, etcd, elected.is_empty()) {
        (Some(etcd_config), Some(options), false) => {
            tracing::info!(endpoints = ?etcd_config.endpoints, consistency = ?etcd_config.consistency, "connecting to etcd");
            Some(Coordinator::start(etcd_config, options, elected))
        }
        _ => None,
    };
    let gates = Arc::new(Gates::new(gates));
    let outside = metrics.outside();
    let pipelined = metrics.pipelined.clone();
    let make_proxy = || Proxy::new(&config, gates.clone(), outside.clone(), pipelined.clone());

    let phase = Phase::default();
    let stop_admin = CancellationToken::new();
    let admin_router = admin::router(AdminState {
        gates: gates.clone(),
        metrics,
        phase: phase.clone(),
        committer: committer.clone(),
    });
    let mut admin_task = tokio::spawn(admin::serve(
        listeners.admin,
        admin_router,
        config.server.header_read_timeout,
        stop_admin.clone(),
    ));
    if let (Some(etcd), Some(coordinator)) = (&config.etcd, &coordinator) {
        // Serving before etcd first answers would refuse (or, in local
        // mode, decide without) writes that a healthy etcd settles in a
        // millisecond; connections wait in the listen backlog meanwhile.
        tokio::select! {
            answered = coordinator.first_views(etcd.max_staleness) => if !answered {
                tracing::warn!(
                    "etcd has not answered yet: serving anyway; election domains refuse writes (or, in local mode, use their epochs) until it does"
                );
            },
            () = shutdown.as_mut() => signalled = true,
        }
    }

    if !signalled {
        phase.serving();
        tracing::info!(
            listen = %listeners.proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            upstream = %config.upstream.url,
            "fencegate serving"
        );
    }

    // Readiness turns 503 as soon as shutdown begins, so load balancers
    // stop sending while the connections drain.
    let on_signal = {
        let (stop, phase) = (stop.begin.clone(), phase.clone());
        async move {
            if !signalled {
                shutdown.await;
            }
            phase.stopping();
            stop.cancel();
        }
    };
    tracing::debug!(workers, "serving threads");
    let serve = server::serve_workers(
        listeners.proxy,
        workers,
        cpus,
        make_proxy,
        gates.clone(),
        &config.server,
        stop,
    );
    tokio::pin!(serve);
    let ended = tokio::select! {
        // The signal first: one received while etcd was awaited stops the
        // workers before they take a connection.
        biased;
        () = on_signal => serve.await,
        ended = &mut serve => ended,
    };
    stop_admin.cancel();
    // The admin drain waits for every admin connection: one stuck in its
    // request head (until header_read_timeout) or not reading its answer
    // would keep the process, and the clean mark, waiting until the
    // orchestrator's SIGKILL. An admin answer takes microseconds, so one
    // still open after this is such a client.
    if tokio::time::timeout(ADMIN_DRAIN, &mut admin_task).await.is_err() {
        tracing::warn!(after = ?ADMIN_DRAIN, "closing admin connections that are still open");
        admin_task.abort();
    }
    // The views are no longer needed, and a fence-ahead raise must not
    // reach the committer after the clean mark.
    if let Some(coordinator) = coordinator {
        coordinator.stop().await;
    }
    // The clean mark promises the next start that no write of ours is still
    // at the store: every connection drained, and every write whose client
    // left has had its answer from the store too.
    let ended = ended.map_err(Fatal::Serve)?;
    if ended.drain != Drain::Complete || !ended.writes_ended {
        // The committer is not awaited here: connection tasks that outlived
        // the grace period still hold it, and the process is about to exit.
        let why = match (ended.writes_ended, ended.drain) {
            (false, _) => "writes were still in flight",
            (true, Drain::Cut) => "the drain was ended early, with requests in flight",
            (true, _) => "requests were still in flight",
        };
        tracing::warn!("not recording a clean shutdown: {why}");
        return Ok(());
    }
    // This start followed a crash, and the crashed run's writes may be at
    // the store until request_timeout from the start: a clean mark now
    // would let the next start raise at once, ahead of them.
    if crash_wait_until.is_some_and(|until| tokio::time::Instant::now() < until) {
        tracing::warn!(
            "not recording a clean shutdown: the crash wait has not passed since this start, which followed a crash, so writes of the crashed run may still be at the store"
        );
        return Ok(());
    }
    match committer.close_clean().await {
        Ok(()) => tracing::info!("clean shutdown recorded"),
        Err(e) => tracing::error!(error = %e, "could not record the clean shutdown"),
    }
    let _ = committer_task.await;
    Ok(())
}
