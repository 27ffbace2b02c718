//! etcd as the coordinator: one client for the process, and three tasks
//! per election domain that keep its [`ElectionView`] true.
//!
//! - The **reader** makes the linearizable reads: for requests waiting on a
//!   confirmation (shared, see [`crate::election::ReadQueue`]) and, when
//!   none asks, every `max_staleness / 3` so the view never goes stale
//!   while etcd is healthy. Only its reads (and the watcher's) make the
//!   view fresh.
//! - The **watcher** reads every candidate, then watches the prefix from
//!   the read's revision + 1, so a leader change reaches the view within a
//!   round trip. On any trouble (error, cancel, compaction, a stream that
//!   stops answering progress requests) it reads again and watches again:
//!   a watch is a hint, a read is the truth.
//! - The **fencer** raises the domain's epoch to each new leader's revision
//!   (fence ahead). It is separate so the view tasks never wait on a
//!   barrier or a commit.
//!
//! Each call to etcd goes to one member (see [`first_answer`]), so every
//! read and every watch start is made of attempts, retried and hedged
//! until one answers: losing a minority of members is no outage.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, GetResponse, Identity, SortOrder, SortTarget,
    TlsOptions, WatchOptions,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{EtcdConfig, EtcdTlsConfig};
use crate::election::ElectionView;
use crate::error::causes;
use crate::gate::Gate;
use crate::token::Token;

/// Why the etcd settings cannot be used; names the key.
#[derive(Debug, thiserror::Error)]
#[error("etcd.{key}: {problem}")]
pub struct SettingsError {
    /// The offending key under `[etcd]`.
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// The connection options for `config`, reading the password and TLS
/// files. Everything that can be checked without etcd is checked here, so
/// a wrong file stops the start (exit 64) instead of becoming a bare
/// "transport error" on every retry.
pub fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, SettingsError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        // HTTP/2 pings find a member that stopped answering (hung, or cut
        // off without a reset). etcd refuses pings more often than every 5 s.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        // A member cut off from the raft leader fails requests and watches
        // at once instead of serving an old state.
        .with_require_leader(true)
        .with_auto_token_refresh(true);
    if let (Some(user), Some(file)) = (&config.user, &config.password_file) {
        let password = String::from_utf8(read("password_file", file)?).map_err(|_| SettingsError {
            key: "password_file",
            problem: format!("`{}` is not UTF-8", file.display()),
        })?;
        let password = password.strip_suffix('\n').unwrap_or(&password);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(SettingsError {
                key: "password_file",
                problem: format!("`{}` is empty", file.display()),
            });
        }
        options = options.with_user(user.clone(), password.to_owned());
    }
    if let Some(tls) = &config.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    Ok(options)
}

fn tls_options(tls: &EtcdTlsConfig) -> Result<TlsOptions, SettingsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let bad = |key: &'static str, problem: String| SettingsError { key, problem };
    let certificates = |key: &'static str, path: &Path| -> Result<Vec<u8>, SettingsError> {
        let pem = read(key, path)?;
        let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
        match parsed {
            Ok(certs) if !certs.is_empty() => Ok(pem),
            Ok(_) => Err(bad(key, format!("`{}` holds no PEM certificate", path.display()))),
            Err(e) => Err(bad(key, format!("`{}`: {e}", path.display()))),
        }
    };
    let mut options =
        TlsOptions::new().ca_certificate(Certificate::from_pem(certificates("tls.ca_file", &tls.ca_file)?));
    if let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) {
        let cert_pem = certificates("tls.cert_file", cert_file)?;
        let key_pem = read("tls.key_file", key_file)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            bad(
                "tls.key_file",
                format!("`{}`: no private key: {e}", key_file.display()),
            )
        })?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .filter_map(Result::ok)
            .collect();
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            bad(
                "tls.key_file",
                format!(
                    "`{}` does not fit `{}`: {e}",
                    key_file.display(),
                    cert_file.display()
                ),
            )
        })?;
        options = options.identity(Identity::from_pem(cert_pem, key_pem));
    }
    if let Some(name) = &tls.server_name {
        if ServerName::try_from(name.as_str()).is_err() {
            return Err(bad(
                "tls.server_name",
                format!("`{name}` is not a DNS name or IP address"),
            ));
        }
        options = options.domain_name(name.clone());
    }
    Ok(options)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|e| SettingsError {
        key,
        problem: format!("cannot read `{}`: {e}", path.display()),
    })
}

/// One election domain as the coordinator serves it.
pub struct Elected {
    /// The domain.
    pub gate: Arc<Gate>,
    /// Its leader view (the same one the gate reads).
    pub view: Arc<ElectionView>,
}

/// The coordinator's tasks; dropping it stops them.
pub struct Coordinator {
    tasks: JoinSet<()>,
    views: Vec<Arc<ElectionView>>,
}

impl Coordinator {
    /// Connects to etcd in the background (retrying until it can) and then
    /// keeps every view in `elected` current.
    pub fn start(config: &EtcdConfig, options: ConnectOptions, elected: Vec<Elected>) -> Coordinator {
        let mut tasks = JoinSet::new();
        let endpoints = config.endpoints.clone();
        let period = refresh_period(config.max_staleness);
        let views = elected.iter().map(|e| e.view.clone()).collect();
        tasks.spawn(async move {
            let client = connect(&endpoints, options, &elected).await;
            let mut domain_tasks = JoinSet::new();
            for Elected { gate, view } in elected {
                domain_tasks.spawn(reader(client.clone(), view.clone(), gate.clone(), period));
                domain_tasks.spawn(watcher(client.clone(), view.clone(), gate.clone(), period));
                domain_tasks.spawn(fencer(view, gate));
            }
            // These tasks run until the coordinator is dropped, which
            // drops this future and with it the set, aborting them.
            while domain_tasks.join_next().await.is_some() {}
        });
        Coordinator { tasks, views }
    }

    /// Waits until every view has had its first answer from etcd, or
    /// `limit` passed; returns whether they all did.
    pub async fn first_views(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            // Answered: read, or found regressed (which no wait repairs).
            if self.views.iter().all(|v| v.age().is_some() || v.is_regressed()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every task.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

/// How often the view is read even when nothing asks.
fn refresh_period(max_staleness: Duration) -> Duration {
    (max_staleness / 3).max(Duration::from_millis(10))
}

/// Connects, retrying with backoff. Only authentication touches the
/// network here; without a user the client connects lazily.
async fn connect(endpoints: &[String], options: ConnectOptions, elected: &[Elected]) -> Client {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        match Client::connect(endpoints, Some(options.clone())).await {
            Ok(client) => return client,
            Err(e) => {
                // etcd says "etcdserver: authentication failed, invalid user
                // ID or password"; retrying cannot fix that, but an operator can.
                if e.to_string().contains("authentication failed") {
                    tracing::error!(error = %e, "etcd authentication failed: check etcd.user and etcd.password_file");
                }
                let e = causes(&e);
                for Elected { view, .. } in elected {
                    view.record_failure(&e);
                }
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// Reads of one election start at most this often (4,000 a second), a
/// bound on what one fencegate asks of etcd for each election domain
/// however its writes arrive. Under load the hold below spaces reads more
/// widely.
const MIN_READ_INTERVAL: Duration = Duration::from_micros(250);

/// The latest a read waits, counted from the previous read's start, for
/// the writes it expects (as many as joined the previous read, a sixteenth
/// fewer when requests asked while it was in flight; see
/// [`crate::election::ReadQueue`]). Measured in linearizable mode
/// (bench/RESULTS.md, step 13): at 64 connections 44.7k writes a second
/// against 33.2k when each read started at the next timer tick, with fewer
/// reads per write (1 ms gained half as much); with one writer, 2,042
/// against 791, since a lone writer is the one write expected and is not
/// held at all. A read held to the end starts at most this plus a timer
/// tick after the one before (without the hold, about 1.4 ms under load);
/// writes that arrive at their own pace held every read that long until
/// the hold left some slack (step 14, `HOLD_SLACK`).
const MAX_READ_HOLD: Duration = Duration::from_millis(2);

/// After a failed read the next one starts no sooner than this, even for
/// waiting requests (a failed read answers them at once): a member that
/// refuses at once would otherwise be asked again every MIN_READ_INTERVAL.
const FAILED_READ_PAUSE: Duration = Duration::from_millis(10);

/// The reader task: linearizable reads of the leader, on demand and on a timer.
async fn reader(client: Client, view: Arc<ElectionView>, gate: Arc<Gate>, period: Duration) {
    let kv = client.kv_client();
    let key = candidates_prefix(&view.prefix);
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
        .with_keys_only();
    let mut backoff = Backoff::new(period);
    let mut hedge = Hedge::default();
    let mut refresh_at = Instant::now();
    let mut last_start = Instant::now()
        .checked_sub(MIN_READ_INTERVAL)
        .unwrap_or_else(Instant::now);
    let mut not_before = last_start + MIN_READ_INTERVAL;
    loop {
        let seq = view
            .reads
            .next(refresh_at, not_before, last_start + MAX_READ_HOLD)
            .await;
        view.count_read();
        // Taken before the read: anything admitted by then came from a view
        // at a revision this linearizable read cannot be below.
        let floor = regression_floor(&view, &gate);
        let started = Instant::now();
        last_start = started;
        // Every attempt starts after `seq` was numbered, so after each
        // request that joins this read arrived: whichever answers may
        // confirm them. Its own start is the one freshness counts from.
        let answer = first_answer(period, &mut hedge, || {
            let mut kv = kv.clone();
            let options = options.clone();
            let key = key.as_str();
            async move { with_header(kv.get(key, Some(options)).await) }
        })
        .await;
        let ok = match answer {
            Ok((attempt_started, (header_revision, resp))) => {
                let leader = resp.kvs().first().map(|kv| kv.create_revision());
                view.record_read(attempt_started, header_revision, leader.and_then(revision), floor);
                backoff.reset();
                refresh_at = started + period;
                true
            }
            Err(failed) => {
                view.record_failure(&failed);
                false
            }
        };
        not_before = started + MIN_READ_INTERVAL;
        if !ok {
            let now = Instant::now();
            refresh_at = now + backoff.next();
            not_before = not_before.max(now + FAILED_READ_PAUSE);
        }
        view.reads.finish(seq, ok);
    }
}

/// The largest watch response the watcher decodes.
const WATCH_MESSAGE_LIMIT: usize = 256 << 20;

/// The watcher task: read all candidates, watch for changes, repeat on trouble.
async fn watcher(client: Client, view: Arc<ElectionView>, gate: Arc<Gate>, period: Duration) {
    let mut backoff = Backoff::new(Duration::from_secs(1));
    let mut hedge = Hedge::default();
    loop {
        let trouble = watch_once(&client, &view, &gate, period, &mut backoff, &mut hedge).await;
        // The reader reports etcd going away; this only says why the watch
        // had to start over, which matters when it keeps doing so.
        tracing::debug!(domain = %view.domain, %trouble, "election watch ended; reading again");
        tokio::time::sleep(backoff.next()).await;
    }
}

/// One read-then-watch cycle; returns why it ended.
async fn watch_once(
    client: &Client,
    view: &ElectionView,
    gate: &Gate,
    period: Duration,
    backoff: &mut Backoff,
    hedge: &mut Hedge,
) -> String {
    let key = candidates_prefix(&view.prefix);
    let kv = client.kv_client();
    let floor = regression_floor(view, gate);
    let read = first_answer(period, hedge, || {
        let mut kv = kv.clone();
        let key = key.as_str();
        // Keys only: the election is keys and create revisions, and the
        // candidates' values together may exceed the client's 4 MiB
        // decoding limit (the read would then fail every cycle, and the
        // watch never start).
        async move {
            with_header(
                kv.get(key, Some(GetOptions::new().with_prefix().with_keys_only()))
                    .await,
            )
        }
    });
    let (started, (read_revision, resp)) = match read.await {
        Ok(answer) => answer,
        Err(failed) => return format!("read failed: {failed}"),
    };
    let mut candidates = Candidates::default();
    for kv in resp.kvs() {
        candidates.put(kv.key(), kv.create_revision());
    }
    view.record_read(started, read_revision, candidates.leader(), floor);

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(read_revision + 1);
    // One watch response may carry several events with values of up to
    // etcd's request limit each (1.5 MiB by default): more than tonic's
    // default 4 MiB, which would fail the watch on every start.
    let watch_client = client
        .watch_client()
        .max_decoding_message_size(WATCH_MESSAGE_LIMIT);
    // A watch that starts on a lost member would cost a whole period
    // before the next cycle; started like a read, it lands on a live one.
    let watch = first_answer(period, hedge, || {
        let mut watch_client = watch_client.clone();
        let (key, options) = (key.as_str(), options.clone());
        async move {
            watch_client
                .watch(key, Some(options))
                .await
                .map_err(|e| causes(&e))
        }
    });
    let (mut requests, mut stream) = match watch.await {
        Ok((_, stream)) => stream.split(),
        Err(failed) => return format!("watch failed: {failed}"),
    };
    // A hung member keeps the stream open and silent; progress requests
    // it does not answer tell it apart from a quiet election.
    let liveness = period.max(Duration::from_millis(500));
    let mut awaiting_progress = false;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = tokio::time::sleep(liveness) => {
                if awaiting_progress {
                    return format!("the watch did not answer a progress request within {liveness:?}");
                }
                if let Err(e) = requests.request_progress().await {
                    return format!("progress request failed: {e}");
                }
                awaiting_progress = true;
                continue;
            }
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => return "the watch stream ended".into(),
            Err(e) => return format!("watch error: {}", causes(&e)),
        };
        awaiting_progress = false;
        if resp.compact_revision() > 0 {
            tracing::warn!(
                domain = %view.domain, compact_revision = resp.compact_revision(), watched_from = read_revision + 1,
                "watch start revision was compacted; reading again"
            );
            return "compacted".into();
        }
        if resp.canceled() {
            return format!("watch canceled: {}", resp.cancel_reason());
        }
        if resp.created() {
            backoff.reset();
        }
        let mut newest = 0;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => candidates.put(kv.key(), kv.create_revision()),
                EventType::Delete => candidates.delete(kv.key()),
            }
            newest = newest.max(kv.mod_revision());
        }
        if newest > 0 {
            // Events arrive in revision order and the set started from a
            // full read, so after them it is the election at `newest`.
            view.publish(newest, candidates.leader());
        }
    }
}

/// The fencer task: fence ahead to every new leader.
async fn fencer(view: Arc<ElectionView>, gate: Arc<Gate>) {
    let mut leaders = view.subscribe_leaders();
    loop {
        let leader = *leaders.borrow_and_update();
        if let Some(token) = revision(leader).and_then(Token::new) {
            if gate.marks().refusal < token.get() {
                // In a task of its own: a raise may wait (for the barrier,
                // or after a crash), and a newer leader seen meanwhile must
                // have its refusal mark set at once, not after that raise.
                let (gate, view) = (gate.clone(), view.clone());
                tokio::spawn(async move {
                    let started = Instant::now();
                    match gate.fence_ahead(token).await {
                        Ok(()) => tracing::info!(
                            domain = %view.domain, leader = token.get(), took = ?started.elapsed(),
                            "fenced ahead to the new leader"
                        ),
                        Err(problem) => tracing::warn!(
                            domain = %view.domain, leader = token.get(), detail = %problem.detail,
                            "could not fence ahead; the new leader's first write will raise"
                        ),
                    }
                });
            }
        }
        if leaders.changed().await.is_err() {
            return;
        }
    }
}

/// The least revision a read of `view` starting now may answer with
/// ([`ElectionView::floor`]). The refusal mark counts, not only the epoch
/// the gate admits: after a crash, a domain that took a nested domain's
/// higher epoch admits the lower one until it raises (see `app`), while
/// its durable epoch, the one etcd must not be below (SPEC), is its
/// refusal mark. Any other refusal mark is a token etcd showed as leader.
fn regression_floor(view: &ElectionView, gate: &Gate) -> u64 {
    let marks = gate.marks();
    view.floor(marks.epoch.max(marks.refusal))
}

/// A read's answer with the revision of its header, or why it is no answer.
fn with_header(answer: Result<GetResponse, etcd_client::Error>) -> Result<(i64, GetResponse), String> {
    let resp = answer.map_err(|e| causes(&e))?;
    match resp.header() {
        Some(header) => Ok((header.revision(), resp)),
        None => Err("a read answered without a header".into()),
    }
}

/// Runs `attempt` until one succeeds or `budget` has passed since the
/// first began; returns the answer and the start of the attempt that gave
/// it, or why none did.
///
/// etcd-client sends each call to one member, picked at random (tonic's
/// balanced channel: power of two choices, and every member reports a
/// load of 0), and a member that died or hangs stays among those picked:
/// its calls fail at once (connection refused) or never answer. So a
/// single call is no measure of the cluster. The first attempt that fails
/// is followed by another at once, balanced again (so most likely sent
/// elsewhere); and while no attempt has answered, another joins those in
/// flight every hedge delay ([`Hedge`]), failed or hung alike. The first
/// answer wins; the rest are dropped, which cancels their calls. Only when
/// no attempt answered within the budget does the caller say etcd is
/// unreachable.
///
/// The spacing stays even, and the delay is at most a twentieth of the
/// budget, because the choice of member is random: with one member of
/// three lost, a read fails only if every attempt lands on it, with odds
/// (1/3)^attempts: 1 in 3.5 billion for 20. Delays doubling from 10 ms
/// would make 7 attempts in 500 ms and fail one read in 2,000, every half
/// second under linearizable load. The price is paid only when no member
/// answers: one call per delay, each cancelled when the read ends.
async fn first_answer<T, F>(
    budget: Duration,
    hedge: &mut Hedge,
    mut attempt: impl FnMut() -> F,
) -> Result<(Instant, T), String>
where
    F: Future<Output = Result<T, String>>,
{
    /// What ended one wait.
    enum Event<T> {
        Answered(usize, Result<T, String>),
        NextDue,
        OutOfTime,
    }
    let deadline = Instant::now() + budget;
    let delay = hedge.delay(budget);
    let mut running: Vec<(Instant, Pin<Box<F>>)> = Vec::with_capacity(1);
    let mut next_due = Instant::now();
    let mut attempts = 0_usize;
    let mut last_error = None;
    loop {
        let now = Instant::now();
        if now >= next_due && now < deadline {
            running.push((now, Box::pin(attempt())));
            attempts += 1;
            next_due = now + delay;
        }
        let answered = poll_fn(|cx| {
            for (i, (_, call)) in running.iter_mut().enumerate() {
                if let Poll::Ready(answer) = call.as_mut().poll(cx) {
                    return Poll::Ready((i, answer));
                }
            }
            Poll::Pending
        });
        let event = tokio::select! {
            (i, answer) = answered => Event::Answered(i, answer),
            () = tokio::time::sleep_until(next_due), if next_due < deadline => Event::NextDue,
            () = tokio::time::sleep_until(deadline) => Event::OutOfTime,
        };
        match event {
            Event::Answered(i, Ok(answer)) => {
                let (started, _) = running.swap_remove(i);
                hedge.observe(started.elapsed());
                return Ok((started, answer));
            }
            Event::Answered(i, Err(e)) => {
                running.swap_remove(i);
                tracing::debug!(error = %e, "an etcd call failed; trying again");
                if last_error.is_none() {
                    next_due = Instant::now();
                }
                last_error = Some(e);
            }
            Event::NextDue => {}
            Event::OutOfTime => {
                return Err(match last_error {
                    Some(e) => {
                        format!("no member answered within {budget:?} ({attempts} attempts; last error: {e})")
                    }
                    None => {
                        format!("no member answered within {budget:?} ({attempts} attempts, all unanswered)")
                    }
                });
            }
        }
    }
}

/// When an attempt that has not answered gets company: a few times what
/// answers usually take (smoothed as TCP smooths round trips), at least
/// [`Hedge::FLOOR`] and at most a twentieth of the budget (see
/// [`first_answer`]), so a hung member costs a read a little time, not
/// its budget, and a healthy but slow etcd is not asked everything twice.
#[derive(Default)]
struct Hedge {
    /// Smoothed time of the attempts that answered.
    typical: Duration,
}

impl Hedge {
    /// Below this, a second attempt would mostly duplicate one that is
    /// merely queued behind others (a loaded machine, a busy member). With
    /// one member of three hung, a third of the reads wait this long, a
    /// ninth twice as long.
    const FLOOR: Duration = Duration::from_millis(10);
    /// How many typical answer times an attempt may take before company.
    const FACTOR: u32 = 4;

    fn delay(&self, budget: Duration) -> Duration {
        (self.typical * Hedge::FACTOR).max(Hedge::FLOOR).min(budget / 20)
    }

    fn observe(&mut self, took: Duration) {
        self.typical = (self.typical * 7 + took) / 8;
    }
}

/// The candidates of an election: key → create revision.
#[derive(Default)]
struct Candidates(HashMap<Vec<u8>, i64>);

impl Candidates {
    fn put(&mut self, key: &[u8], create_revision: i64) {
        self.0.insert(key.to_vec(), create_revision);
    }

    fn delete(&mut self, key: &[u8]) {
        self.0.remove(key);
    }

    /// The leader: the oldest candidate.
    fn leader(&self) -> Option<u64> {
        self.0.values().copied().min().and_then(revision)
    }
}

/// The keys of an election's candidates start with `P/`.
fn candidates_prefix(election: &str) -> String {
    format!("{election}/")
}

/// A revision from etcd as a token value; etcd revisions are positive.
fn revision(r: impl TryInto<u64>) -> Option<u64> {
    r.try_into().ok().filter(|r| *r > 0)
}

/// Exponential backoff from 50 ms up to a ceiling.
struct Backoff {
    next: Duration,
    ceiling: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    fn new(ceiling: Duration) -> Backoff {
        Backoff {
            next: Backoff::FIRST.min(ceiling),
            ceiling,
        }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.ceiling);
        now
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST.min(self.ceiling);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_candidate_leads() {
        let mut c = Candidates::default();
        assert_eq!(c.leader(), None);
        c.put(b"/e/b", 20);
        c.put(b"/e/a", 10);
        assert_eq!(c.leader(), Some(10));
        c.put(b"/e/a", 10); // a proclaim rewrites the value, not the revision
        c.delete(b"/e/a");
        assert_eq!(c.leader(), Some(20));
        c.delete(b"/e/b");
        assert_eq!(c.leader(), None);
    }

    const BUDGET: Duration = Duration::from_millis(500);

    /// Attempts numbered from 1, each answering after `answer(n)` with
    /// `Ok(n)`, or an error, or never (`None`); counts them in `made`.
    fn attempts<'a>(
        made: &'a std::cell::Cell<u32>,
        answer: impl Fn(u32) -> Option<(Duration, bool)> + 'a,
    ) -> impl FnMut() -> Pin<Box<dyn Future<Output = Result<u32, String>>>> + 'a {
        move || {
            made.set(made.get() + 1);
            let n = made.get();
            let answer = answer(n);
            Box::pin(async move {
                let Some((after, ok)) = answer else {
                    return std::future::pending().await;
                };
                tokio::time::sleep(after).await;
                if ok {
                    Ok(n)
                } else {
                    Err(format!("attempt {n} refused"))
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_not_dropped_for_its_hedge() {
        let made = std::cell::Cell::new(0);
        let began = Instant::now();
        let mut hedge = Hedge::default();
        let slow = |n| Some((Duration::from_millis(if n == 1 { 15 } else { 50 }), true));
        let (started, n) = first_answer(BUDGET, &mut hedge, attempts(&made, slow))
            .await
            .expect("the first attempt answers");
        assert_eq!((n, started, made.get()), (1, began, 2));
        assert_eq!(began.elapsed(), Duration::from_millis(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_that_refuses_everything_fails_after_the_budget() {
        let made = std::cell::Cell::new(0);
        let began = Instant::now();
        let mut hedge = Hedge::default();
        let refused = first_answer(
            BUDGET,
            &mut hedge,
            attempts(&made, |_| Some((Duration::ZERO, false))),
        )
        .await;
        let error = refused.expect_err("nothing answers");
        assert_eq!(began.elapsed(), BUDGET);
        // At 0 and at once again, then every 10 ms up to 490 ms.
        assert_eq!(made.get(), 51, "{error}");
        assert_eq!(
            error,
            "no member answered within 500ms (51 attempts; last error: attempt 51 refused)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_that_answers_nothing_gets_one_call_per_hedge_delay() {
        let made = std::cell::Cell::new(0);
        let began = Instant::now();
        let mut hedge = Hedge::default();
        let hung = first_answer(BUDGET, &mut hedge, attempts(&made, |_| None)).await;
        let error = hung.expect_err("nothing answers");
        assert_eq!(began.elapsed(), BUDGET);
        assert_eq!(
            error,
            "no member answered within 500ms (50 attempts, all unanswered)"
        );
    }

    /// Reads whose first attempts (none, one or two) land on a lost
    /// member: a failed first attempt costs nothing, a hung one a hedge
    /// delay, and the answer counts from the start of its own attempt.
    #[tokio::test(start_paused = true)]
    async fn reads_whose_first_attempts_land_on_a_lost_member_succeed_soon() {
        let mut hedge = Hedge::default();
        let delay = Hedge::FLOOR;
        let answered = Some((Duration::from_millis(1), true));
        let expect = [
            // (lost member, attempts lost, time taken, start of the answer)
            ("refused", 1, Duration::from_millis(1), Duration::ZERO),
            ("refused", 2, delay + Duration::from_millis(1), delay),
            ("hung", 1, delay + Duration::from_millis(1), delay),
            ("hung", 2, delay * 2 + Duration::from_millis(1), delay * 2),
        ];
        for (how, lost, took, answer_started) in expect {
            let lost_answer = match how {
                "refused" => Some((Duration::ZERO, false)),
                _ => None,
            };
            let made = std::cell::Cell::new(0);
            let began = Instant::now();
            let (started, n) = first_answer(
                BUDGET,
                &mut hedge,
                attempts(&made, |n| if n <= lost { lost_answer } else { answered }),
            )
            .await
            .unwrap_or_else(|e| panic!("{how} × {lost}: {e}"));
            assert_eq!(
                (n, began.elapsed(), started - began),
                (lost + 1, took, answer_started),
                "{how} × {lost}"
            );
        }
    }

    #[test]
    fn the_hedge_delay_follows_typical_answers_within_bounds() {
        let budget = Duration::from_secs(5);
        let mut hedge = Hedge::default();
        assert_eq!(hedge.delay(budget), Hedge::FLOOR, "nothing known yet");
        for _ in 0..50 {
            hedge.observe(Duration::from_millis(1));
        }
        assert_eq!(hedge.delay(budget), Hedge::FLOOR, "fast answers: the floor");
        for _ in 0..50 {
            hedge.observe(Duration::from_millis(20));
        }
        let delay = hedge.delay(budget);
        assert!(
            delay > Duration::from_millis(70) && delay <= Duration::from_millis(80),
            "four times a typical 20 ms: {delay:?}"
        );
        assert_eq!(
            hedge.delay(BUDGET),
            BUDGET / 20,
            "at least 20 attempts per budget"
        );
        hedge.observe(Duration::from_secs(10));
        assert_eq!(hedge.delay(budget), budget / 20, "however slow the answers");
    }

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(300));
        let got: Vec<_> = (0..4).map(|_| b.next().as_millis()).collect();
        assert_eq!(got, [50, 100, 200, 300]);
        b.reset();
        assert_eq!(b.next().as_millis(), 50);
    }
}
