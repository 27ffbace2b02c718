//! etcd 3.4 as the test's own processes: one member ([`Etcd`]) or a
//! cluster on loopback ([`EtcdCluster`]), plus async helpers on
//! `etcd_client` for writers that campaign in an election ([`Candidate`],
//! [`leader_rev`]).
//!
//! Every member listens on 127.0.0.1 only, keeps its data in a temp dir and
//! logs (zap) to a file there; start panics with the log tail when a member
//! is not healthy within a bounded time. Dropping kills every process.

use super::free_port;
use super::process::{read_text, require_binary, send_signal, wait_timeout};
use etcd_client::{
    Client, CompactionOptions, ConnectOptions, GetOptions, LeaderKey, ResignOptions, SortOrder, SortTarget,
};
use std::fs::File;
use std::future::Future;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// A single member is healthy ~0.3 s after launch.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Three members need each other before any is healthy (~2.5 s).
const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// One health probe (a linearizable get).
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Bound on the helpers' single requests (`leader_rev`, compaction, ...).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a campaign: long enough for any test that waits for a lease to
/// run out, short enough that a hung test fails.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(60);

/// What a member needs beyond the plain-HTTP defaults: TLS on the client
/// URL, extra flags, and how health probes connect (certificates,
/// credentials). Set by `super::etcd_secure`; the default is plain HTTP.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemberExtras {
    /// The client URL is `https://` (the member serves TLS there).
    pub https: bool,
    /// Appended to the command line after the harness's own flags.
    pub args: Vec<String>,
    /// The base of every health probe's connect options (TLS, user).
    pub probe_options: ConnectOptions,
}

/// One etcd process: its name, ports, data dir and, while running, child.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Holds `data/`, `etcd.log`, `etcd.stdout`, `etcd.stderr`.
    dir: PathBuf,
    initial_cluster: String,
    /// The same for every member of one cluster.
    cluster_token: String,
    child: Option<Child>,
    paused: bool,
    extras: MemberExtras,
}

impl Member {
    fn new(name: String, dir: PathBuf) -> Member {
        std::fs::create_dir_all(&dir).expect("create etcd member dir");
        Member {
            name,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            initial_cluster: String::new(),
            cluster_token: String::new(),
            child: None,
            paused: false,
            extras: MemberExtras::default(),
        }
    }

    fn endpoint(&self) -> String {
        let scheme = if self.extras.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn spawn(&mut self, binary: &Path) {
        assert!(self.child.is_none(), "etcd {} is already running", self.name);
        let out = File::create(self.dir.join("etcd.stdout")).expect("create etcd.stdout");
        let err = File::create(self.dir.join("etcd.stderr")).expect("create etcd.stderr");
        let mut cmd = Command::new(binary);
        // Nothing from the caller's environment configures the member.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(self.endpoint())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.cluster_token)
            .arg("--logger=zap")
            .arg("--log-outputs")
            .arg(self.log_path())
            .args(&self.extras.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        self.child = Some(child);
        self.paused = false;
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("etcd {} is not running", self.name))
            .id()
    }

    /// SIGKILL (resuming first if paused) and wait. Idempotent.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = i64::from(child.id());
            if self.paused {
                send_signal(-pid, "CONT");
                self.paused = false;
            }
            send_signal(-pid, "KILL");
            let _ = child.kill();
            if wait_timeout(&mut child, Duration::from_secs(5)).is_none() {
                panic!("etcd {} (pid {pid}) did not die after SIGKILL", self.name);
            }
        }
    }

    fn pause(&mut self) {
        send_signal(-i64::from(self.pid()), "STOP");
        self.paused = true;
    }

    fn resume(&mut self) {
        send_signal(-i64::from(self.pid()), "CONT");
        self.paused = false;
    }

    /// Whether the child exited; its status in the message.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(format!("etcd {} exited: {status}", self.name))
            }
            _ => None,
        }
    }

    /// `what`, then the tails of the member's log and stderr.
    fn failure(&self, what: &str) -> String {
        format!(
            "{what}\n--- {} (last 40 lines) ---\n{}\n--- etcd.stderr (last 40 lines) ---\n{}",
            self.log_path().display(),
            tail(&read_text(&self.log_path()), 40),
            tail(&read_text(&self.dir.join("etcd.stderr")), 40),
        )
    }

    fn port_taken(&self) -> bool {
        let text = read_text(&self.log_path()) + &read_text(&self.dir.join("etcd.stderr"));
        text.contains("address already in use")
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Wait until every member in `members` answers a linearizable get (which
/// needs a raft leader), each probe bounded, all within `timeout`.
fn wait_healthy(members: &mut [&mut Member], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    for member in members.iter_mut() {
        let addr = ([127, 0, 0, 1], member.client_port).into();
        loop {
            if let Some(exit) = member.exited() {
                return Err(member.failure(&exit));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() && probe(member).is_ok()
            {
                break;
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "etcd {} ({}) not healthy within {timeout:?}: last probe: {}",
                    member.name,
                    member.endpoint(),
                    probe(member).err().unwrap_or_default()
                );
                return Err(member.failure(&msg));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// One bounded linearizable get against `member`, connecting with its
/// probe options (TLS, and root's credentials once auth is on).
fn probe(member: &Member) -> Result<(), String> {
    let endpoint = member.endpoint();
    let options = member
        .extras
        .probe_options
        .clone()
        .with_connect_timeout(PROBE_TIMEOUT)
        .with_timeout(PROBE_TIMEOUT);
    block_on(async move {
        let attempt = async {
            let mut c = Client::connect([endpoint], Some(options)).await?;
            c.get("fencegate-test-probe", None).await.map(|_| ())
        };
        match tokio::time::timeout(PROBE_TIMEOUT * 2, attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("probe timed out".to_string()),
        }
    })
}

/// Run `fut` to completion on a fresh current-thread runtime in its own
/// thread: callable from sync code and from inside a tokio test alike.
fn block_on<F: Future + Send>(fut: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build probe runtime")
                .block_on(fut)
        })
        .join()
        .expect("probe thread panicked")
    })
}

/// A single running etcd member on free loopback ports.
/// Dropping it SIGKILLs it (resuming it first if paused).
pub struct Etcd {
    // Declared before `_dir`: the process dies before its dir is removed.
    member: Member,
    _dir: TempDir,
}

impl Etcd {
    /// Start one member and wait (≤ 10 s) until a linearizable get
    /// succeeds; panics with the log tail otherwise.
    pub fn start() -> Etcd {
        Etcd::start_with(MemberExtras::default())
    }

    /// [`Etcd::start`] with `extras` (TLS, extra flags, probe options),
    /// kept for [`Etcd::restart`].
    pub(crate) fn start_with(extras: MemberExtras) -> Etcd {
        let binary = require_binary("etcd", "etcd-server");
        let mut last_error = String::new();
        // A port taken between free_port() and etcd's bind: try others.
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("fencegate-etcd-")
                .tempdir()
                .expect("create etcd temp dir");
            let mut member = Member::new("n1".to_string(), dir.path().join("n1"));
            member.extras = extras.clone();
            member.initial_cluster = format!("n1={}", member.peer_url());
            member.cluster_token = format!("fencegate-test-{}", member.client_port);
            member.spawn(&binary);
            let mut etcd = Etcd { member, _dir: dir };
            match wait_healthy(&mut [&mut etcd.member], START_TIMEOUT) {
                Ok(()) => return etcd,
                Err(e) if etcd.member.port_taken() => last_error = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last_error}");
    }

    /// Replace the health probes' connect options (e.g. with credentials
    /// once auth is enabled), used by [`Etcd::restart`] from then on.
    pub(crate) fn set_probe_options(&mut self, options: ConnectOptions) {
        self.member.extras.probe_options = options;
    }

    /// `http://127.0.0.1:PORT` (`https://` for a TLS member): the client URL.
    pub fn endpoint(&self) -> String {
        self.member.endpoint()
    }

    /// `[endpoint()]`, for [`client`].
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    pub fn client_port(&self) -> u16 {
        self.member.client_port
    }

    /// The pid of the running member (it leads its own process group).
    /// Panics when it is not running.
    pub fn pid(&self) -> u32 {
        self.member.pid()
    }

    /// The member's data dir (kept across [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.member.dir.join("data")
    }

    /// The zap log.
    pub fn log(&self) -> String {
        read_text(&self.member.log_path())
    }

    /// SIGKILL the member and wait for it. Idempotent.
    pub fn kill(&mut self) {
        self.member.kill();
    }

    /// Kill it if running, then start it again with the same data dir and
    /// ports, and wait (≤ 10 s) until healthy.
    pub fn restart(&mut self) {
        self.member.kill();
        self.member.spawn(&require_binary("etcd", "etcd-server"));
        if let Err(e) = wait_healthy(&mut [&mut self.member], START_TIMEOUT) {
            panic!("restart: {e}");
        }
    }

    /// SIGSTOP: a hung member. Its port still accepts connections (the
    /// kernel's backlog), but nothing is answered until [`Etcd::resume`].
    pub fn pause(&mut self) {
        self.member.pause();
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&mut self) {
        self.member.resume();
    }

    /// Compact the history up to the current revision (physically); returns
    /// that revision. Watches and reads below it then fail as compacted.
    pub async fn compact_to_latest(&self) -> i64 {
        compact_to_latest(&self.endpoints()).await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.member.kill();
    }
}

/// `n` etcd members on loopback forming one cluster.
/// Dropping it SIGKILLs every member.
pub struct EtcdCluster {
    members: Vec<Member>,
    _dir: TempDir,
}

impl EtcdCluster {
    /// Start `n` members (named m1..mN) with `--initial-cluster-state new`
    /// and wait (≤ 20 s) until each answers a linearizable get.
    pub fn start(n: usize) -> EtcdCluster {
        assert!(n >= 1, "a cluster needs at least one member");
        let binary = require_binary("etcd", "etcd-server");
        let mut last_error = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("fencegate-etcd-cluster-")
                .tempdir()
                .expect("create etcd temp dir");
            let mut members: Vec<Member> = (1..=n)
                .map(|i| Member::new(format!("m{i}"), dir.path().join(format!("m{i}"))))
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url()))
                .collect::<Vec<_>>()
                .join(",");
            let cluster_token = format!("fencegate-test-{}", members[0].client_port);
            for m in &mut members {
                m.initial_cluster = initial_cluster.clone();
                m.cluster_token = cluster_token.clone();
                m.spawn(&binary);
            }
            let mut cluster = EtcdCluster { members, _dir: dir };
            let result = {
                let mut refs: Vec<&mut Member> = cluster.members.iter_mut().collect();
                wait_healthy(&mut refs, CLUSTER_START_TIMEOUT)
            };
            match result {
                Ok(()) => return cluster,
                Err(e) if cluster.members.iter().any(Member::port_taken) => last_error = e,
                Err(e) => panic!("{e}\n{}", cluster.logs_of_others()),
            }
        }
        panic!("{last_error}");
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Every member's client URL, member 0 first.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Member `i`'s client URL (`i` in `0..len()`; member i is named m{i+1}).
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].endpoint()
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].pid()
    }

    pub fn log(&self, i: usize) -> String {
        read_text(&self.members[i].log_path())
    }

    /// SIGKILL member `i` and wait for it. Idempotent.
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Start member `i` again (killing it first if running) with its data
    /// dir and ports; wait (≤ 10 s) until it answers a linearizable get.
    pub fn restart_member(&mut self, i: usize) {
        let member = &mut self.members[i];
        member.kill();
        member.spawn(&require_binary("etcd", "etcd-server"));
        if let Err(e) = wait_healthy(&mut [member], START_TIMEOUT) {
            panic!("restart_member({i}): {e}");
        }
    }

    /// SIGSTOP member `i`.
    pub fn pause_member(&mut self, i: usize) {
        self.members[i].pause();
    }

    /// SIGCONT member `i`.
    pub fn resume_member(&mut self, i: usize) {
        self.members[i].resume();
    }

    /// The index of the member that is raft leader, as the running members
    /// report it (each asked once, ≤ 1 s); `None` if none knows one.
    pub async fn raft_leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() || m.paused {
                continue;
            }
            let mut c = client_with_timeout(&[m.endpoint()], PROBE_TIMEOUT).await;
            let Ok(status) = c.status().await else {
                continue;
            };
            let me = status.header().map(|h| h.member_id());
            if me == Some(status.leader()) {
                return Some(i);
            }
        }
        None
    }

    fn logs_of_others(&self) -> String {
        self.members
            .iter()
            .map(|m| m.failure(&format!("member {}", m.name)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

/// A client for `endpoints` with no request timeout (a request timeout
/// would also cancel a campaign that is still waiting), connect timeout 2 s.
pub async fn client(endpoints: &[String]) -> Client {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    Client::connect(endpoints, Some(options))
        .await
        .unwrap_or_else(|e| panic!("etcd client for {endpoints:?}: {e}"))
}

/// A client whose every request fails after `timeout`: for gets and puts
/// that must not hang on a hung member. Never campaign with it.
pub async fn client_with_timeout(endpoints: &[String], timeout: Duration) -> Client {
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    Client::connect(endpoints, Some(options))
        .await
        .unwrap_or_else(|e| panic!("etcd client for {endpoints:?}: {e}"))
}

/// Put a probe key through `endpoints` (each attempt bounded by 500 ms)
/// until one succeeds; panics after `timeout`. Returns how long it took.
///
/// After the raft leader of a cluster dies, the survivors elect a new one
/// in ~1–3 s; a request issued meanwhile is not refused but hangs (up to
/// etcd's own request timeout, ~7 s). Call this before asserting on writes.
pub async fn wait_writable(endpoints: &[String], timeout: Duration) -> Duration {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < timeout {
        let mut c = client_with_timeout(endpoints, Duration::from_millis(500)).await;
        match c.put("fencegate-test-writable", "", None).await {
            Ok(_) => return started.elapsed(),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("etcd {endpoints:?} not writable within {timeout:?}: {last}");
}

/// Compact `endpoints`' history up to the current revision; returns it.
pub async fn compact_to_latest(endpoints: &[String]) -> i64 {
    let mut c = client_with_timeout(endpoints, REQUEST_TIMEOUT).await;
    let resp = c
        .get("fencegate-test-compact", None)
        .await
        .unwrap_or_else(|e| panic!("get before compaction: {e}"));
    let rev = resp.header().expect("response header").revision();
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap_or_else(|e| panic!("compact to {rev}: {e}"));
    rev
}

/// The current leader's revision (its key's create revision: the token
/// fencegate expects) by query, as SPEC.md's view reads it: the oldest key
/// under `election + "/"`. `None` when there is no candidate at all.
/// Panics on an error or after 10 s.
pub async fn leader_rev(client: &Client, election: &str) -> Option<i64> {
    let mut c = client.clone();
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1);
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, c.get(format!("{election}/"), Some(options)))
        .await
        .unwrap_or_else(|_| panic!("leader_rev({election}): no answer within {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("leader_rev({election}): {e}"));
    resp.kvs().first().map(|kv| kv.create_revision())
}

/// How many candidates campaign in `election` (its keys under
/// `election + "/"`). Panics on an error or after 10 s.
pub async fn candidates(client: &Client, election: &str) -> i64 {
    let mut c = client.clone();
    let options = GetOptions::new().with_prefix().with_count_only();
    tokio::time::timeout(REQUEST_TIMEOUT, c.get(format!("{election}/"), Some(options)))
        .await
        .unwrap_or_else(|_| panic!("candidates({election}): no answer within {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("candidates({election}): {e}"))
        .count()
}

/// Aborts the task when dropped.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// A writer that campaigned and won: a lease kept alive in the background
/// and its leader key. Dropping it stops the keepalive only (as if the
/// writer crashed): the key lives on until the lease's TTL runs out.
pub struct Candidate {
    client: Client,
    leader: LeaderKey,
    lease_id: i64,
    keepalive: AbortOnDrop,
}

impl Candidate {
    /// Grant a lease of `ttl_secs`, keep it alive in a background task,
    /// and campaign in `election` with `value`. Returns once this
    /// candidate leads: while another leads, it waits (spawn it to keep
    /// going). Panics on an error or after 60 s. Give it a client from
    /// [`client`]: a request timeout would cancel a waiting campaign.
    /// Dropping the future while it waits makes etcd delete this
    /// candidate's key (the lease stays until its TTL).
    pub async fn campaign(client: &Client, election: &str, value: &str, ttl_secs: i64) -> Candidate {
        let mut c = client.clone();
        let lease_id = tokio::time::timeout(REQUEST_TIMEOUT, c.lease_grant(ttl_secs, None))
            .await
            .unwrap_or_else(|_| panic!("lease grant: no answer within {REQUEST_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("lease grant (ttl {ttl_secs}s): {e}"))
            .id();
        let keepalive = AbortOnDrop(Some(tokio::spawn(keep_alive(client.clone(), lease_id, ttl_secs))));
        let mut resp = tokio::time::timeout(CAMPAIGN_TIMEOUT, c.campaign(election, value, lease_id))
            .await
            .unwrap_or_else(|_| panic!("campaign in {election}: not leader within {CAMPAIGN_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("campaign in {election}: {e}"));
        let leader = resp
            .take_leader()
            .unwrap_or_else(|| panic!("campaign in {election}: response without a leader key"));
        Candidate {
            client: client.clone(),
            leader,
            lease_id,
            keepalive,
        }
    }

    /// The leader key's create revision: the fencing token.
    pub fn rev(&self) -> i64 {
        self.leader.rev()
    }

    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// The leader key: `election + "/" + lease id in hex`.
    pub fn key(&self) -> String {
        self.leader.key_str().expect("leader key is UTF-8").to_string()
    }

    pub fn leader_key(&self) -> &LeaderKey {
        &self.leader
    }

    /// Revoke the lease: etcd deletes the key at once. In a cluster that
    /// just lost a member, the client may still pick the dead one for a
    /// request: a failed attempt is retried a few times ("lease not found"
    /// after a retry means the first attempt did it).
    /// [`Candidate::campaign`] in a task, returned once the candidate's key
    /// exists: it waits behind the current leader, and the task ends when
    /// it leads. Panics if the key does not appear within 10 s.
    pub async fn campaign_behind(
        client: &Client,
        election: &str,
        value: &str,
        ttl_secs: i64,
    ) -> JoinHandle<Candidate> {
        let before = candidates(client, election).await;
        let (c, election_owned, value) = (client.clone(), election.to_string(), value.to_string());
        let task =
            tokio::spawn(async move { Candidate::campaign(&c, &election_owned, &value, ttl_secs).await });
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while candidates(client, election).await <= before {
            assert!(
                Instant::now() < deadline,
                "the campaign's key did not appear in {election} within {REQUEST_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task
    }

    pub async fn revoke(mut self) {
        self.keepalive = AbortOnDrop(None);
        let mut last = String::new();
        for attempt in 0..5 {
            match tokio::time::timeout(REQUEST_TIMEOUT, self.client.lease_revoke(self.lease_id)).await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) if attempt > 0 && e.to_string().contains("lease not found") => return,
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no answer within {REQUEST_TIMEOUT:?}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("lease revoke {:x}: {last}", self.lease_id);
    }

    /// Resign: etcd deletes the key at once. The lease is no longer kept
    /// alive (it holds no key now) and runs out after its TTL.
    pub async fn resign(mut self) {
        let options = ResignOptions::new().with_leader(self.leader.clone());
        tokio::time::timeout(REQUEST_TIMEOUT, self.client.resign(Some(options)))
            .await
            .unwrap_or_else(|_| panic!("resign: no answer within {REQUEST_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("resign {}: {e}", self.key()));
    }

    /// Stop keeping the lease alive: the key is deleted when its TTL runs
    /// out (a writer that hangs or is cut off).
    pub fn stop_keepalive(&mut self) {
        self.keepalive = AbortOnDrop(None);
    }
}

/// Keep `lease_id` alive every ttl/3 until aborted, re-opening the stream
/// after errors (a member restarted or killed). Stops when etcd says the
/// lease is gone (TTL 0).
async fn keep_alive(client: Client, lease_id: i64, ttl_secs: i64) {
    let period = Duration::from_millis((ttl_secs.max(1) as u64 * 1000) / 3);
    let mut c = client;
    loop {
        let (mut keeper, mut stream) = match c.lease_keep_alive(lease_id).await {
            Ok(pair) => pair,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(period, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() <= 0 => return,
                Ok(Ok(Some(_))) => {}
                _ => break,
            }
            tokio::time::sleep(period).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
