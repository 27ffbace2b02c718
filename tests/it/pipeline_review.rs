//! Review of the pipelined path (`upstream.pipeline_depth`, src/pipeline.rs):
//! a write on a lane must end within the configured timeouts, and a raise
//! must not wait on a lower write that already has its answer any longer
//! than it would on the pool's path.

use crate::support::{Fencegate, FencegateConfig};
use serde_json::Value;
use std::time::{Duration, Instant};

const DOMAIN: &str = "d";
/// Far longer than any answer below should take.
const HANG: Duration = Duration::from_secs(20);

fn log_tail(fg: &Fencegate) -> String {
    let text = fg.stderr_text();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
    format!("--- fencegate stderr (last 25 lines) ---\n{tail}")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(HANG)
        .build()
        .expect("build reqwest client")
}

/// `PUT path` with `token`: status, `Fencegate-Reason`, time taken (status 0
/// when no answer came within [`HANG`]).
async fn put(fg: &Fencegate, path: &str, token: u64) -> (u16, Option<String>, Duration) {
    let started = Instant::now();
    let r = http()
        .put(format!("{}{path}", fg.url()))
        .header("Fencing-Token", token.to_string())
        .body("healthy")
        .send()
        .await;
    let Ok(r) = r else {
        return (0, None, started.elapsed());
    };
    let status = r.status().as_u16();
    let reason = r
        .headers()
        .get("fencegate-reason")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let _ = r.bytes().await;
    (status, reason, started.elapsed())
}

/// (epoch, refusal mark, writes in flight) of the domain.
fn marks(fg: &Fencegate) -> (u64, u64, u64) {
    let text = fg.admin_get("/domains").body;
    let list: Value = serde_json::from_str(&text).expect("/domains is JSON");
    let d = list
        .as_array()
        .and_then(|l| l.iter().find(|d| d["name"] == DOMAIN))
        .cloned()
        .unwrap_or_else(|| panic!("no domain {DOMAIN} in /domains: {text}"));
    let get = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("/domains {k}: {d}"));
    (get("epoch"), get("refusal_mark"), get("inflight_writes"))
}

fn start(config: FencegateConfig) -> Fencegate {
    tokio::task::block_in_place(|| Fencegate::start(config))
}

/// With pipelining on and the store down, a write gets 502
/// `upstream_unreachable` within `connect_timeout`, as on the pool's path:
/// a lane that cannot connect must not hand its writes back to be queued
/// on a new lane that cannot connect either, for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_write_to_a_store_that_is_down_gets_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let fg = start(
        FencegateConfig::new(&url)
            .domain(DOMAIN, "/d/")
            .connect_timeout(Duration::from_millis(500))
            .pipeline_depth(4),
    );
    let answer = put(&fg, "/d/x", 5).await;
    assert_eq!(
        (answer.0, answer.1.as_deref()),
        (502, Some("upstream_unreachable")),
        "a write to a store that is down, after {:?}\n{}",
        answer.2,
        log_tail(&fg)
    );
    assert!(answer.2 < Duration::from_secs(5), "took {:?}", answer.2);
    assert_eq!(marks(&fg).2, 0, "no write left in flight");
}
