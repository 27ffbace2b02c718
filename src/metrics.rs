//! Prometheus metrics. Labels are domain names (`none` outside every domain)
//! and outcomes, never paths or tokens, so cardinality is fixed at start.
//! Every labelled child is resolved once here, so the data path only touches
//! atomics.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::Reason;

/// Buckets for a proxy: tens of microseconds to seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The label of requests outside every domain.
pub const NO_DOMAIN: &str = "none";

/// Every metric of the process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    epoch: IntGaugeVec,
    leader_revision: IntGaugeVec,
    view_age: GaugeVec,
    barrier_timeouts: IntCounterVec,
    confirmations: IntCounterVec,
    leader_reads: IntCounterVec,
    inflight: IntGaugeVec,
    /// Time of one durable epoch commit (a group commit counts once).
    pub epoch_persist: Histogram,
    /// 1 while etcd answers every election domain's reads, 0 otherwise;
    /// exported once an election domain exists, and set when scraped.
    pub etcd_up: IntGauge,
    /// Requests sent to the store on pipelined connections.
    pub pipelined: PipelineCounters,
}

/// What pipelined connections count, resolved once.
#[derive(Debug, Clone)]
pub struct PipelineCounters {
    /// Writes sent on write lanes.
    pub writes: IntCounter,
    /// Reads sent on read lanes.
    pub reads: IntCounter,
    /// Reads a read lane left unanswered, sent again through the pool.
    pub resent: IntCounter,
}

/// The metrics of one domain (or of `none`), resolved once.
#[derive(Clone)]
pub struct DomainMetrics {
    forwarded: IntCounter,
    refused: Vec<IntCounter>,
    /// Whole request time as fencegate sees it.
    pub request_duration: Histogram,
    /// Time from sending to the store until its response head.
    pub upstream_duration: Histogram,
    /// The durable epoch.
    pub epoch: IntGauge,
    /// Lower writes that outlived `request_timeout` while a raise waited.
    pub barrier_timeouts: IntCounter,
    /// Writes in flight.
    pub inflight: IntGauge,
}

/// The leader-view metrics of one election domain.
#[derive(Clone)]
pub struct ElectionMetrics {
    /// The leader revision in the view (0 when there is no leader).
    pub leader_revision: IntGauge,
    /// Age of the view, set when scraped.
    pub view_age: Gauge,
    /// Requests that waited for a confirming etcd read.
    pub confirmations: IntCounter,
    /// Linearizable reads of the election made by the reader.
    pub leader_reads: IntCounter,
}

impl DomainMetrics {
    /// Counts one request by its outcome.
    pub fn count(&self, outcome: Result<(), Reason>) {
        match outcome {
            Ok(()) => self.forwarded.inc(),
            Err(reason) => self.refused[reason_index(reason)].inc(),
        }
    }
}

fn reason_index(reason: Reason) -> usize {
    Reason::ALL
        .iter()
        .position(|r| *r == reason)
        .expect("every reason is in Reason::ALL")
}

impl Metrics {
    /// Registers every metric, the process collector included.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["domain"]).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, &["domain"]).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let requests = counter(
            "fencegate_requests_total",
            "Requests by domain and outcome (forwarded or the refusal reason).",
            &["domain", "outcome"],
        );
        let request_duration = histogram(
            "fencegate_request_duration_seconds",
            "Time from request head to response head, as fencegate sees it.",
        );
        let upstream_duration = histogram(
            "fencegate_upstream_duration_seconds",
            "Time from sending a request to the store until its response head.",
        );
        let epoch = int_gauge("fencegate_epoch", "The durable epoch of each domain.");
        let leader_revision = int_gauge(
            "fencegate_leader_revision",
            "The leader revision in each domain's view (0 when there is no leader).",
        );
        let view_age = GaugeVec::new(
            Opts::new(
                "fencegate_leader_view_age_seconds",
                "Time since the start of the last successful linearizable read of the election.",
            ),
            &["domain"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(view_age.clone()))
            .expect("unique metric");
        let barrier_timeouts = counter(
            "fencegate_barrier_timeouts_total",
            "Lower-token writes that outlived request_timeout while a raise waited for them.",
            &["domain"],
        );
        let confirmations = counter(
            "fencegate_leader_confirmations_total",
            "Requests that waited for a linearizable etcd read of the election (rule 3 or linearizable mode).",
            &["domain"],
        );
        let leader_reads = counter(
            "fencegate_leader_reads_total",
            "Linearizable etcd reads of the election made by the reader (confirmations share them).",
            &["domain"],
        );
        let inflight = int_gauge("fencegate_inflight_requests", "Writes in flight to the store.");
        let epoch_persist = Histogram::with_opts(
            HistogramOpts::new(
                "fencegate_epoch_persist_seconds",
                "Time of one durable epoch commit (concurrent raises share one).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(epoch_persist.clone()))
            .expect("unique metric");
        let etcd_up =
            IntGauge::new("fencegate_etcd_up", "1 while etcd answers, 0 otherwise.").expect("valid metric");
        // Counters of their own, not one with a label for reads and
        // writes: labels are domains and outcomes only (SPEC, metrics).
        let writes = IntCounter::new(
            "fencegate_upstream_pipelined_total",
            "Writes sent to the store on pipelined connections (upstream.pipeline_depth; 0 while it is off).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(writes.clone()))
            .expect("unique metric");
        let reads = IntCounter::new(
            "fencegate_upstream_pipelined_reads_total",
            "Reads sent to the store on pipelined connections (upstream.pipeline_reads).",
        )
        .expect("valid metric");
        registry.register(Box::new(reads.clone())).expect("unique metric");
        let resent = IntCounter::new(
            "fencegate_upstream_pipeline_resent_total",
            "Reads a pipelined connection left unanswered (it ended, or an answer ahead of \
             them streams on it), sent again on a connection of their own.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(resent.clone()))
            .expect("unique metric");
        let pipelined = PipelineCounters {
            writes,
            reads,
            resent,
        };
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            epoch,
            leader_revision,
            view_age,
            barrier_timeouts,
            confirmations,
            leader_reads,
            inflight,
            epoch_persist,
            etcd_up,
            pipelined,
        }
    }

    /// Resolves the children of one domain, registering every outcome at
    /// zero so dashboards see them before they happen.
    pub fn domain(&self, name: &str) -> DomainMetrics {
        self.resolve(name, true)
    }

    /// The requests outside every domain: only their counts and durations
    /// are exported, since they have no epoch, barrier or writes in flight.
    pub fn outside(&self) -> DomainMetrics {
        self.resolve(NO_DOMAIN, false)
    }

    fn resolve(&self, name: &str, has_state: bool) -> DomainMetrics {
        let gauge = |vec: &IntGaugeVec| match has_state {
            true => vec.with_label_values(&[name]),
            false => IntGauge::new("unexported", "-").expect("valid metric"),
        };
        let barrier_timeouts = match has_state {
            true => self.barrier_timeouts.with_label_values(&[name]),
            false => IntCounter::new("unexported", "-").expect("valid metric"),
        };
        let refused = Reason::ALL
            .iter()
            .map(|r| self.requests.with_label_values(&[name, r.as_str()]))
            .collect();
        DomainMetrics {
            forwarded: self.requests.with_label_values(&[name, "forwarded"]),
            refused,
            request_duration: self.request_duration.with_label_values(&[name]),
            upstream_duration: self.upstream_duration.with_label_values(&[name]),
            epoch: gauge(&self.epoch),
            barrier_timeouts,
            inflight: gauge(&self.inflight),
        }
    }

    /// Resolves the leader-view children of an election domain. Only
    /// election domains have them, so a plain domain never shows a view.
    pub fn election(&self, name: &str) -> ElectionMetrics {
        // etcd_up means something only where there is etcd; registering it
        // again for a second election domain is refused, which is fine.
        let _ = self.registry.register(Box::new(self.etcd_up.clone()));
        ElectionMetrics {
            leader_revision: self.leader_revision.with_label_values(&[name]),
            view_age: self.view_age.with_label_values(&[name]),
            confirmations: self.confirmations.with_label_values(&[name]),
            leader_reads: self.leader_reads.with_label_values(&[name]),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
