//! The admin listener: health, readiness, what fencegate believes about each
//! domain, and Prometheus metrics. Kept off the proxy port so scraping and
//! probing never compete with writes, and never reach the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::metrics::Metrics;
use crate::proxy::Proxy;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The data path, for its domains.
    pub proxy: Arc<Proxy>,
    /// The registry to render.
    pub metrics: Metrics,
    /// True while the proxy serves writes; false once shutdown began.
    pub serving: Arc<AtomicBool>,
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

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.serving.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
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
        .proxy
        .gates()
        .iter()
        .map(|gate| {
            let marks = gate.marks();
            DomainView {
                name: gate.name.to_string(),
                prefix: gate.prefix.clone(),
                election: gate.election.clone(),
                epoch: marks.epoch,
                refusal_mark: marks.refusal,
                leader_revision: None,
                view_age_seconds: None,
                inflight_writes: gate.inflight_writes(),
            }
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Json(views)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}
