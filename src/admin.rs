//! The admin listener: health, readiness, what fencegate believes about each
//! domain, and Prometheus metrics. Kept off the proxy port so scraping and
//! probing never compete with writes, and never reach the store.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::committer::Committer;
use crate::gate::Gates;
use crate::metrics::Metrics;
use crate::server::Acceptor;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The domains.
    pub gates: Arc<Gates>,
    /// The registry to render.
    pub metrics: Metrics,
    /// Whether the proxy serves yet, or still.
    pub phase: Phase,
    /// The state file's writer: whether the file is open.
    pub committer: Committer,
}

/// Where the process is in its life, as `/readyz` tells it: the admin
/// listener answers from the start, but the proxy serves only once etcd
/// answered (or `max_staleness` passed), and stops at the first signal.
#[derive(Clone, Default)]
pub struct Phase(Arc<AtomicU8>);

impl Phase {
    const STARTING: u8 = 0;
    const SERVING: u8 = 1;
    const STOPPING: u8 = 2;

    /// The proxy takes connections from now on.
    pub fn serving(&self) {
        // Never back from stopping.
        let _ = self
            .0
            .compare_exchange(Self::STARTING, Self::SERVING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Shutdown began: no new connections.
    pub fn stopping(&self) {
        self.0.store(Self::STOPPING, Ordering::SeqCst);
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/domains", get(domains))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves `router` on `listener` until `stop`, then waits for the
/// connections still open to finish their requests. Each connection has
/// `header_read_timeout`, like the proxy listener's: axum's own server has
/// none, so a connection that never sent a whole head (a scanner, a probe
/// cut off mid-request) stayed open for good, holding a file descriptor
/// the proxy listener and the store connections need too.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = crate::drain::Connections::new();
    let mut acceptor = Acceptor::new(listener, "admin");
    while let Some((stream, _)) = acceptor.next(stop.cancelled()).await {
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: axum::http::Request<Incoming>| {
            // A router is always ready: no `poll_ready` needed.
            let mut router = router.clone();
            async move { tower::Service::call(&mut router, request).await }
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(acceptor);
    connections.stop().await;
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.phase.0.load(Ordering::SeqCst) {
        // Writes sent now would wait in the listen backlog until etcd
        // answers or max_staleness passes, whatever the mode.
        Phase::STARTING => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: starting (waiting for etcd's first answer, up to max_staleness)\n".to_owned(),
            )
        }
        Phase::STOPPING => return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".to_owned()),
        _ => {}
    }
    if state.committer.has_ended() {
        // A commit panicked (the log says why): no raise can be made
        // durable until fencegate is restarted.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the commit task has stopped (see the log); restart fencegate\n".to_owned(),
        );
    }
    if !state.committer.is_open() {
        // After a failed commit, until the file is reopened: no raise can
        // be made durable, so a new leader's writes would all get 503.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the state file is closed after a failed commit (retried every second)\n".to_owned(),
        );
    }
    // A domain whose writes would all get 503 makes the whole proxy unready:
    // a load balancer should prefer a replica that can decide.
    let stuck: Vec<String> = state
        .gates
        .iter()
        .filter_map(|gate| {
            let view = gate.election.as_ref()?;
            if view.is_ready() {
                return None;
            }
            let why = if view.is_regressed() {
                "etcd went back below a revision it had shown".to_owned()
            } else {
                match view.age() {
                    None => "no answer from etcd yet".to_owned(),
                    Some(age) => format!("leader view is {:.1}s old", age.as_secs_f64()),
                }
            };
            Some(format!("{}: {why}", gate.name))
        })
        .collect();
    if stuck.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", stuck.join("; ")),
        )
    }
}

/// One domain as `/domains` shows it.
#[derive(Serialize)]
struct DomainView {
    name: String,
    prefix: String,
    election: Option<String>,
    epoch: u64,
    refusal_mark: u64,
    leader_revision: Option<u64>,
    view_age_seconds: Option<f64>,
    inflight_writes: usize,
}

async fn domains(State(state): State<AdminState>) -> Json<Vec<DomainView>> {
    let mut views: Vec<DomainView> = state
        .gates
        .iter()
        .map(|gate| {
            let marks = gate.marks();
            let view = gate.election.as_deref();
            DomainView {
                name: gate.name.to_string(),
                prefix: gate.prefix.clone(),
                election: view.map(|v| v.prefix.clone()),
                epoch: gate.reported_epoch(),
                refusal_mark: marks.refusal,
                leader_revision: view.and_then(|v| v.snapshot().leader),
                view_age_seconds: view.and_then(|v| v.age()).map(|a| a.as_secs_f64()),
                inflight_writes: gate.inflight_writes(),
            }
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Json(views)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    // etcd is up when every election domain's reads are answered: one
    // domain's reads failing (its user may not read its prefix) must not
    // be hidden by another's, whichever read last.
    let mut up = None;
    for view in state.gates.iter().filter_map(|g| g.election.as_ref()) {
        view.update_age_gauge();
        up = Some(up.unwrap_or(true) && view.is_reachable());
    }
    if let Some(up) = up {
        state.metrics.etcd_up.set(i64::from(up));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}
