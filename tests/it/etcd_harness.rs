//! Proves the etcd harness: members start, stop, hang and come back; a
//! candidate's revision is the leader revision a view reads; revoke,
//! resign and an expired lease depose a leader; a waiting candidate takes
//! over with a higher revision; a cluster survives a killed member.
//! No fencegate involved.

use crate::support::etcd::{client, client_with_timeout, wait_writable};
use crate::support::{leader_rev, Candidate, Etcd, EtcdCluster};
use std::time::{Duration, Instant};

/// Bound on any single step a test waits for.
const STEP: Duration = Duration::from_secs(5);

async fn get_value(c: &mut etcd_client::Client, key: &str) -> Option<String> {
    let resp = tokio::time::timeout(STEP, c.get(key, None))
        .await
        .unwrap_or_else(|_| panic!("get {key}: no answer within {STEP:?}"))
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    resp.kvs()
        .first()
        .map(|kv| kv.value_str().expect("UTF-8 value").to_string())
}

async fn put(c: &mut etcd_client::Client, key: &str, value: &str) -> i64 {
    let resp = tokio::time::timeout(STEP, c.put(key, value, None))
        .await
        .unwrap_or_else(|_| panic!("put {key}: no answer within {STEP:?}"))
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
    resp.header().expect("header").revision()
}

#[tokio::test(flavor = "multi_thread")]
async fn candidate_rev_is_the_leader_rev() {
    let started = Instant::now();
    let etcd = Etcd::start();
    eprintln!("single member healthy after {:?}", started.elapsed());
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));

    let c = client(&etcd.endpoints()).await;
    assert_eq!(leader_rev(&c, "/svc/leader").await, None, "no candidate yet");

    let a = Candidate::campaign(&c, "/svc/leader", "writer-a", 10).await;
    assert!(a.rev() > 0);
    assert_eq!(leader_rev(&c, "/svc/leader").await, Some(a.rev()));
    assert_eq!(a.key(), format!("/svc/leader/{:x}", a.lease_id()));

    // The election service agrees with the query.
    let mut e = c.clone();
    let leader = e.leader("/svc/leader").await.expect("leader()");
    let kv = leader.kv().expect("leader kv");
    assert_eq!(kv.create_revision(), a.rev());
    assert_eq!(kv.value_str().unwrap(), "writer-a");
    assert_eq!(kv.lease(), a.lease_id());

    // Another election is independent, and a sibling prefix is not in it.
    let mut kv_client = c.clone();
    put(&mut kv_client, "/svc/leaderboard", "x").await;
    let b = Candidate::campaign(&c, "/other/leader", "writer-b", 10).await;
    assert!(b.rev() > a.rev());
    assert_eq!(leader_rev(&c, "/svc/leader").await, Some(a.rev()));
    assert_eq!(leader_rev(&c, "/other/leader").await, Some(b.rev()));
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_and_resign_depose_at_once() {
    let etcd = Etcd::start();
    let c = client(&etcd.endpoints()).await;

    let a = Candidate::campaign(&c, "/svc/leader", "a", 30).await;
    let a_rev = a.rev();
    a.revoke().await;
    assert_eq!(
        leader_rev(&c, "/svc/leader").await,
        None,
        "revoke deletes at once"
    );

    let b = Candidate::campaign(&c, "/svc/leader", "b", 30).await;
    assert!(b.rev() > a_rev);
    assert_eq!(leader_rev(&c, "/svc/leader").await, Some(b.rev()));
    b.resign().await;
    assert_eq!(
        leader_rev(&c, "/svc/leader").await,
        None,
        "resign deletes at once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_candidate_takes_over_with_a_higher_rev() {
    let etcd = Etcd::start();
    let c = client(&etcd.endpoints()).await;

    let a = Candidate::campaign(&c, "/svc/leader", "a", 30).await;
    let c2 = c.clone();
    let mut waiting = tokio::spawn(async move { Candidate::campaign(&c2, "/svc/leader", "b", 30).await });

    // B waits while A leads; its key exists, younger than A's.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut waiting)
            .await
            .is_err(),
        "B must not lead while A does"
    );
    assert_eq!(leader_rev(&c, "/svc/leader").await, Some(a.rev()));

    let a_rev = a.rev();
    let revoked = Instant::now();
    a.revoke().await;
    let b = tokio::time::timeout(STEP, waiting)
        .await
        .expect("B leads within 5 s of A's revoke")
        .expect("B's campaign task");
    eprintln!("waiting candidate led {:?} after revoke", revoked.elapsed());
    assert!(b.rev() > a_rev, "B's rev {} > A's {a_rev}", b.rev());
    assert_eq!(leader_rev(&c, "/svc/leader").await, Some(b.rev()));
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_expires_only_without_keepalive() {
    let etcd = Etcd::start();
    let c = client(&etcd.endpoints()).await;

    let kept = Candidate::campaign(&c, "/kept/leader", "kept", 2).await;
    let mut lapsing = Candidate::campaign(&c, "/lapsing/leader", "lapsing", 2).await;
    let stopped = Instant::now();
    lapsing.stop_keepalive();

    let deadline = stopped + Duration::from_secs(8);
    while leader_rev(&c, "/lapsing/leader").await.is_some() {
        assert!(Instant::now() < deadline, "lease of 2 s not expired after 8 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lapsed = stopped.elapsed();
    eprintln!("key of a 2 s lease deleted {lapsed:?} after keepalive stopped");
    assert!(
        lapsed >= Duration::from_millis(1000),
        "expired too early: {lapsed:?}"
    );

    // Past its TTL several times over, the kept-alive leader still leads.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(stopped.elapsed())).await;
    assert_eq!(leader_rev(&c, "/kept/leader").await, Some(kept.rev()));
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_member_times_out_then_answers() {
    let mut etcd = Etcd::start();
    let mut c = client(&etcd.endpoints()).await;
    put(&mut c, "k", "v1").await;

    etcd.pause();
    let hung = tokio::time::timeout(Duration::from_millis(500), c.get("k", None)).await;
    assert!(hung.is_err(), "a paused member must not answer: {hung:?}");
    let mut timed = client_with_timeout(&etcd.endpoints(), Duration::from_millis(500)).await;
    let started = Instant::now();
    let err = timed.get("k", None).await.expect_err("timeout client errs");
    assert!(started.elapsed() < Duration::from_secs(3));
    eprintln!("get on a paused member: {err}");

    etcd.resume();
    assert_eq!(get_value(&mut c, "k").await.as_deref(), Some("v1"));
    assert_eq!(get_value(&mut timed, "k").await.as_deref(), Some("v1"));

    // Drop kills a paused member too.
    let pid = etcd.pid();
    etcd.pause();
    drop(etcd);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "etcd pid {pid} survived drop while paused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_and_restart_keep_data() {
    let mut etcd = Etcd::start();
    let mut c = client(&etcd.endpoints()).await;
    let rev = put(&mut c, "k", "kept").await;
    let old_pid = etcd.pid();

    etcd.kill();
    let mut timed = client_with_timeout(&etcd.endpoints(), Duration::from_millis(500)).await;
    assert!(timed.get("k", None).await.is_err(), "a killed member answers");

    let started = Instant::now();
    etcd.restart();
    eprintln!("restart healthy after {:?}", started.elapsed());
    assert_ne!(etcd.pid(), old_pid);

    let mut fresh = client(&etcd.endpoints()).await;
    assert_eq!(get_value(&mut fresh, "k").await.as_deref(), Some("kept"));
    assert!(put(&mut fresh, "k2", "after").await > rev, "revisions go on");

    // The client made before the kill reconnects by itself.
    let deadline = Instant::now() + STEP;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), c.get("k2", None)).await {
            Ok(Ok(resp)) => {
                assert_eq!(resp.kvs()[0].value_str().unwrap(), "after");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "old client did not reconnect: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_removes_old_revisions() {
    let etcd = Etcd::start();
    let mut c = client(&etcd.endpoints()).await;
    let first = put(&mut c, "k", "1").await;
    put(&mut c, "k", "2").await;
    let compacted = etcd.compact_to_latest().await;
    assert!(compacted > first);
    let old = c
        .get("k", Some(etcd_client::GetOptions::new().with_revision(first)))
        .await;
    let err = old.expect_err("a read below the compaction fails");
    assert!(err.to_string().contains("compacted"), "{err}");
    assert_eq!(get_value(&mut c, "k").await.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_survives_a_killed_member() {
    let started = Instant::now();
    let mut cluster = EtcdCluster::start(3);
    eprintln!("3-member cluster healthy after {:?}", started.elapsed());
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);

    let mut all = client(&endpoints).await;
    put(&mut all, "k", "before").await;

    // Kill the raft leader: the harder case (a follower's death changes
    // nothing for the others).
    let leader = cluster.raft_leader().await.expect("a raft leader");
    eprintln!("raft leader is member {leader}");
    cluster.kill_member(leader);
    let rest: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| endpoints[i].clone())
        .collect();
    let took = wait_writable(&rest, Duration::from_secs(10)).await;
    eprintln!("survivors writable {took:?} after the raft leader was killed");
    let new_leader = cluster.raft_leader().await.expect("a new raft leader");
    assert_ne!(new_leader, leader);
    let mut survivors = client(&rest).await;
    put(&mut survivors, "k", "during").await;
    assert_eq!(get_value(&mut survivors, "k").await.as_deref(), Some("during"));
    let cand = Candidate::campaign(&survivors, "/svc/leader", "a", 10).await;
    assert_eq!(leader_rev(&survivors, "/svc/leader").await, Some(cand.rev()));

    // A client given all three endpoints routes around the dead one.
    let deadline = Instant::now() + STEP;
    for _ in 0..6 {
        match tokio::time::timeout(Duration::from_secs(1), all.get("k", None)).await {
            Ok(Ok(resp)) => assert_eq!(resp.kvs()[0].value_str().unwrap(), "during"),
            other => assert!(
                Instant::now() < deadline,
                "all-endpoint client keeps failing: {other:?}"
            ),
        }
    }

    let started = Instant::now();
    cluster.restart_member(leader);
    eprintln!("member restart healthy after {:?}", started.elapsed());
    let mut first = client(&[cluster.endpoint(leader)]).await;
    assert_eq!(get_value(&mut first, "k").await.as_deref(), Some("during"));
    assert_eq!(leader_rev(&first, "/svc/leader").await, Some(cand.rev()));
}
