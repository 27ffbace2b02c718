//! Pipelining to the store (`upstream.pipeline_depth`): small whole writes
//! share a store connection, a *lane*, and are answered in order. What the
//! barrier promises must not change: a raise still takes back a lower
//! write of which not one byte was written, waits for the answers of those
//! that were, and no write is ever resent (reads, on lanes of their own,
//! go again through the pool when their lane ends unanswered). Run against [`ScriptedStore`]
//! (event order at the store; hyper answers one request of a connection
//! after another) and nginx (its `keepalive_requests` closing a pipelined
//! connection).

use crate::support::{
    client, Event, EventKind, Fault, Fencegate, FencegateConfig, Nginx, ScriptedStore, TRICKLE_CHUNK,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const DOMAIN: &str = "d";
const PREFIX: &str = "/d/";

#[derive(Debug)]
struct Reply {
    status: u16,
    reason: Option<String>,
}

impl Reply {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

async fn put(http: &reqwest::Client, base: &str, path: &str, token: &str) -> Reply {
    let response = http
        .put(format!("{base}{path}"))
        .header("Fencing-Token", token)
        .body(format!("body of {path} with token {token}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {path} (token {token}): {e}"));
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get("fencegate-reason")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let _ = response.bytes().await;
    Reply { status, reason }
}

fn spawn_put(
    http: &reqwest::Client,
    fg: &Fencegate,
    path: &str,
    token: &str,
) -> tokio::task::JoinHandle<Reply> {
    let (http, base, path, token) = (http.clone(), fg.url(), path.to_string(), token.to_string());
    tokio::spawn(async move { put(&http, &base, &path, &token).await })
}

/// fencegate with one serving thread (so every write takes the same
/// lanes) and pipelining at `depth`, in front of `upstream`, with the
/// domain `d` established at epoch 5 by a first write (which also opens
/// the first lane and, answered, lets it pipeline).
async fn pipelined(
    upstream: &str,
    depth: usize,
    tune: impl FnOnce(FencegateConfig) -> FencegateConfig,
) -> (Fencegate, reqwest::Client) {
    let config = FencegateConfig::new(upstream)
        .domain(DOMAIN, PREFIX)
        .workers(1)
        .pipeline_depth(depth);
    let fg = Fencegate::start(tune(config));
    let http = client();
    let first = put(&http, &fg.url(), "/d/establish", "5").await;
    assert!(first.is_success(), "establishing epoch 5: {first:?}");
    (fg, http)
}

/// Opens a lane to pipelining: a write in company (a lone write goes
/// through the pool, `Pipeline::depart`), answered, its lane's first. The
/// companion read stays in flight for `hold`, so the next write takes a
/// lane too.
async fn open_lane(store: &ScriptedStore, fg: &Fencegate, http: &reqwest::Client, hold: Duration) {
    let _companion = store.companion(&fg.url(), hold).await;
    let open = put(http, &fg.url(), "/d/open", "5").await;
    assert!(open.is_success(), "a lane's first write: {open:?}");
}

fn position(events: &[Event], path: &str, kind: EventKind) -> Option<usize> {
    events.iter().position(|e| e.path == path && e.kind == kind)
}

fn describe(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| format!("{:?} {} {:?}\n", e.token, e.path, e.kind))
        .collect()
}

async fn wait_head(store: &ScriptedStore, path: &str) {
    let arrived = store
        .wait_for(Duration::from_secs(10), |ev| {
            position(ev, path, EventKind::HeadArrived).is_some()
        })
        .await;
    assert!(
        arrived,
        "{path} never reached the store:\n{}",
        describe(&store.events())
    );
}

/// Writes that share a lane reach the store one after another: the store
/// reads the next only once it has answered the one before (which is how
/// a pipelined connection looks from the store), where the pool would
/// have sent them side by side on connections of their own.
#[tokio::test(flavor = "multi_thread")]
async fn writes_on_one_lane_reach_the_store_in_order_one_after_another() {
    const HOLD: Duration = Duration::from_millis(300);
    let store = ScriptedStore::start().await;
    let (fg, http) = pipelined(&store.url(), 8, |c| c).await;
    store.hold_token("5", HOLD);
    let _companion = store.companion(&fg.url(), Duration::from_secs(2)).await;
    let started = Instant::now();
    let mut writes = Vec::new();
    for i in 0..4 {
        writes.push(spawn_put(&http, &fg, &format!("/d/w{i}"), "5"));
        // In this order onto the lane.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for write in writes {
        let reply = write.await.unwrap();
        assert!(reply.is_success(), "{reply:?}");
    }
    let took = started.elapsed();
    let events = store.events();
    let log = describe(&events);
    for i in 0..3 {
        let answered = position(&events, &format!("/d/w{i}"), EventKind::Responded).expect(&log);
        let next = position(&events, &format!("/d/w{}", i + 1), EventKind::HeadArrived).expect(&log);
        assert!(
            next > answered,
            "w{} reached the store before w{i} was answered:\n{log}",
            i + 1
        );
    }
    assert!(took >= HOLD * 4, "four held writes on one lane took {took:?}");
}

/// A lower write decided sent on a lane (its bytes are behind another on
/// the store connection) is not aborted by a raise: the higher write waits
/// for its answer, and the store gets it whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_raise_waits_for_the_answers_of_lower_writes_pipelined_before_it() {
    let store = ScriptedStore::start().await;
    let (fg, http) = pipelined(&store.url(), 8, |c| c).await;
    open_lane(&store, &fg, &http, Duration::from_secs(2)).await;
    store.hold_token("5", Duration::from_millis(500));
    let a = spawn_put(&http, &fg, "/d/five-a", "5");
    wait_head(&store, "/d/five-a").await;
    let b = spawn_put(&http, &fg, "/d/five-b", "5");
    // Written behind five-a; the store has not read it yet.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(position(&store.events(), "/d/five-b", EventKind::HeadArrived).is_none());
    let six = put(&http, &fg.url(), "/d/six", "6").await;
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(
        a.is_success() && b.is_success(),
        "the lower writes sent before the raise: {a:?} {b:?}"
    );
    assert!(six.is_success(), "the higher write: {six:?}");
    let events = store.events();
    let log = describe(&events);
    let b_answered = position(&events, "/d/five-b", EventKind::Responded).expect(&log);
    let six_head = position(&events, "/d/six", EventKind::HeadArrived).expect(&log);
    assert!(
        six_head > b_answered,
        "the 6-write reached the store before five-b was answered:\n{log}"
    );
}

/// A lower write still queued in its lane (the lane is new and waits for
/// its first answer before it pipelines, RFC 9112 §9.3.2) has not one
/// byte at the store: a raise takes it back, it is refused, and it never
/// reaches the store, while the writes already sent are answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_raise_takes_back_a_lower_write_still_queued_in_its_lane() {
    let store = ScriptedStore::start().await;
    // Two requests per lane: a first write and five-a fill the first
    // lane, so five-b opens a second, where five-c queues behind it.
    let (fg, http) = pipelined(&store.url(), 4, |c| c.pipeline_max_requests(2)).await;
    open_lane(&store, &fg, &http, Duration::from_secs(3)).await;
    store.hold_token("5", Duration::from_millis(800));
    let a = spawn_put(&http, &fg, "/d/five-a", "5");
    wait_head(&store, "/d/five-a").await;
    let b = spawn_put(&http, &fg, "/d/five-b", "5");
    wait_head(&store, "/d/five-b").await;
    let c = spawn_put(&http, &fg, "/d/five-c", "5");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let six = put(&http, &fg.url(), "/d/six", "6").await;
    let (a, b, c) = (a.await.unwrap(), b.await.unwrap(), c.await.unwrap());
    assert!(
        a.is_success() && b.is_success(),
        "the writes sent before the raise: {a:?} {b:?}"
    );
    assert_eq!(
        (c.status, c.reason.as_deref()),
        (412, Some("stale_epoch")),
        "the queued lower write: {c:?}"
    );
    assert!(six.is_success(), "the higher write: {six:?}");
    // Give a wrongly sent five-c time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = store.events();
    let log = describe(&events);
    assert!(
        position(&events, "/d/five-c", EventKind::HeadArrived).is_none(),
        "five-c reached the store:\n{log}"
    );
    let b_answered = position(&events, "/d/five-b", EventKind::Responded).expect(&log);
    let six_head = position(&events, "/d/six", EventKind::HeadArrived).expect(&log);
    assert!(six_head > b_answered, "{log}");
}

/// A read still queued in its lane when its client leaves is taken out of
/// the queue and never reaches the store, as on the pool's path, where a
/// read whose client left before it was sent is never sent. (A write runs
/// to its end on either path even when its client leaves.)
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_read_whose_client_left_never_reaches_the_store() {
    use tokio::io::AsyncWriteExt;
    let store = ScriptedStore::start().await;
    let (fg, http) = pipelined(&store.url(), 8, |c| c).await;
    let _companion = store.companion(&fg.url(), Duration::from_secs(20)).await;
    // The first read lane waits for its first answer before it pipelines:
    // the reads behind it queue.
    store.fault_path("/first", Fault::AnswerAfter(Duration::from_millis(1500)));
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("{}{path}", fg.url()));
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    let first = get("/first");
    wait_head(&store, "/first").await;
    let mut leaving = tokio::net::TcpStream::connect(fg.addr()).await.unwrap();
    leaving
        .write_all(b"GET /left HTTP/1.1\r\nhost: fg\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(leaving);
    let after = get("/after");
    assert_eq!(first.await.unwrap().unwrap(), 201, "/first");
    assert_eq!(after.await.unwrap().unwrap(), 201, "/after");
    // Give a wrongly kept /left time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = store.events();
    assert!(
        position(&events, "/left", EventKind::HeadArrived).is_none(),
        "/left, whose client left while it was queued, reached the store:\n{}",
        describe(&events)
    );
    assert!(
        fg.pipelined_reads() >= 2,
        "precondition: /first and /after took a lane ({} reads did)",
        fg.pipelined_reads()
    );
}

/// A pipelined write whose answer does not come within `request_timeout`
/// is cut with its connection (504); the write sent behind it on the same
/// connection was sent, so its outcome is unknown (502), and it is not
/// resent. The next write takes a new lane.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_write_past_request_timeout_cuts_its_lane() {
    let store = ScriptedStore::start().await;
    let (fg, http) = pipelined(&store.url(), 8, |c| c.request_timeout(Duration::from_millis(400))).await;
    // The companion is cut at request_timeout, which changes nothing here.
    open_lane(&store, &fg, &http, Duration::from_secs(2)).await;
    store.hold_token("5", Duration::from_secs(3));
    let a = spawn_put(&http, &fg, "/d/slow", "5");
    wait_head(&store, "/d/slow").await;
    let b = spawn_put(&http, &fg, "/d/behind", "5");
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(
        (a.status, a.reason.as_deref()),
        (504, Some("upstream_timeout")),
        "{a:?}"
    );
    assert_eq!(
        (b.status, b.reason.as_deref()),
        (502, Some("upstream_unreachable")),
        "{b:?}"
    );
    store.clear_holds();
    let next = put(&http, &fg.url(), "/d/next", "5").await;
    assert!(next.is_success(), "a write after the cut: {next:?}");
    let events = store.events();
    let sent_behind = events
        .iter()
        .filter(|e| e.path == "/d/behind" && e.kind == EventKind::HeadArrived)
        .count();
    assert!(
        sent_behind <= 1,
        "the write behind was resent:\n{}",
        describe(&events)
    );
}

/// Drives `writers` × `each` writes of distinct paths through `fg`, each
/// writer one after another, and returns each path's status.
async fn write_many(fg: &Fencegate, writers: usize, each: usize) -> HashMap<String, Reply> {
    let http = client();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (http, base) = (http.clone(), fg.url());
        tasks.push(tokio::spawn(async move {
            let mut replies = Vec::new();
            for i in 0..each {
                let path = format!("/d/w{w}-{i}");
                replies.push((path.clone(), put(&http, &base, &path, "5").await));
            }
            replies
        }));
    }
    let mut all = HashMap::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// nginx closes a connection after `keepalive_requests` answers. Writes
/// pipelined behind the last one were sent and are never answered: they
/// fail as outcome unknown, and none is resent (each path reaches nginx at
/// most once, every write answered 2xx exactly once).
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_closes_a_pipelined_connection_gets_no_write_twice() {
    let nginx = Nginx::start_with("keepalive_requests 3;");
    let (fg, _http) = pipelined(&nginx.url(), 8, |c| c.pipeline_max_requests(100)).await;
    let replies = write_many(&fg, 8, 10).await;
    let entries = nginx.log_entries_at_least(replies.values().filter(|r| r.is_success()).count() + 1);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for e in &entries {
        *seen.entry(e.uri.clone()).or_default() += 1;
    }
    for (path, reply) in &replies {
        let times = seen.get(path).copied().unwrap_or(0);
        if reply.is_success() {
            assert_eq!(times, 1, "{path} answered {reply:?} reached nginx {times} times");
        } else {
            assert_eq!(
                (reply.status, reply.reason.as_deref()),
                (502, Some("upstream_unreachable")),
                "{path}"
            );
            assert!(times <= 1, "{path} ({reply:?}) reached nginx {times} times");
        }
    }
    assert!(fg.pipelined_writes() > 0, "precondition: writes took lanes");
}

/// With `pipeline_max_requests` at or below the store's own limit, a lane
/// retires before the store closes it, so no write is lost to the close.
#[tokio::test(flavor = "multi_thread")]
async fn lanes_that_retire_before_the_store_closes_them_lose_no_write() {
    no_write_lost("keepalive_requests 3;", 3).await;
}

/// Drives 8 writers of 10 writes each through lanes retiring after
/// `max_requests`, in front of nginx with `http_extra`: every write
/// succeeds and reaches nginx once.
async fn no_write_lost(http_extra: &str, max_requests: u64) {
    let nginx = Nginx::start_with(http_extra);
    let (fg, _http) = pipelined(&nginx.url(), 8, |c| c.pipeline_max_requests(max_requests)).await;
    let replies = write_many(&fg, 8, 10).await;
    let failed: Vec<_> = replies.iter().filter(|(_, r)| !r.is_success()).collect();
    assert!(failed.is_empty(), "writes failed: {failed:?}");
    let entries = nginx.log_entries_at_least(replies.len() + 1);
    assert_eq!(entries.len(), replies.len() + 1, "every write reached nginx once");
    assert!(fg.pipelined_writes() > 0, "precondition: writes took lanes");
}

/// A store that states how many more requests it takes on a connection
/// (`Keep-Alive: max`) is taken at its word: with `pipeline_max_requests`
/// above nginx's limit, lanes retire before nginx closes them, and no
/// write is lost to the close (against
/// `a_store_that_closes_a_pipelined_connection_gets_no_write_twice`). nginx
/// plays Apache httpd, which states it only to a request whose
/// `Connection` carries `keep-alive` (`ap_set_keepalive`).
#[tokio::test(flavor = "multi_thread")]
async fn lanes_retire_before_a_store_that_states_its_limit_closes_them() {
    // 3 requests a connection, and 2 more said in every answer to a
    // request that asks: after the first answer, a lane sends 2 at most.
    no_write_lost(
        "keepalive_requests 3;\n\
         map $http_connection $keep_alive { ~*keep-alive \"timeout=60, max=2\"; default \"\"; }\n\
         add_header Keep-Alive $keep_alive;",
        100,
    )
    .await;
}

/// A `Keep-Alive: max` too large to add to (a broken or hostile store)
/// leaves lanes as they are: the driver that added it overflowed and
/// panicked, failing writes the store had applied (502).
#[tokio::test(flavor = "multi_thread")]
async fn a_keep_alive_max_too_large_to_add_to_fails_no_write() {
    no_write_lost(
        "add_header Keep-Alive \"timeout=60, max=18446744073709551615\";",
        100,
    )
    .await;
}

/// A store that refuses connections fails a pipelined write at once, as
/// it fails any other (502, nothing sent): the write is not handed from
/// one new lane to the next.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_refuses_connections_fails_a_pipelined_write_at_once() {
    let store = ScriptedStore::start().await;
    let (fg, http) = pipelined(&store.url(), 8, |c| c).await;
    // In company, the write takes a lane, whose connection is refused.
    let _companion = store.companion(&fg.url(), Duration::from_secs(10)).await;
    store.stop_accepting();
    let started = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(5), put(&http, &fg.url(), "/d/refused", "5"))
        .await
        .expect("a write to a store that refuses connections was answered");
    assert_eq!(
        (reply.status, reply.reason.as_deref()),
        (502, Some("upstream_unreachable")),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

/// Reads through `fg` of every path in `paths`, `readers` at a time (each
/// reader one after another), with each answer's status and body.
async fn read_many(fg: &Fencegate, readers: usize, paths: &[String]) -> Vec<(String, u16, bytes::Bytes)> {
    let http = client();
    let mut tasks = Vec::new();
    for r in 0..readers {
        let mine: Vec<String> = paths.iter().skip(r).step_by(readers).cloned().collect();
        let (http, base) = (http.clone(), fg.url());
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for path in mine {
                let response = http
                    .get(format!("{base}{path}"))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("GET {path}: {e}"));
                let status = response.status().as_u16();
                let body = response
                    .bytes()
                    .await
                    .unwrap_or_else(|e| panic!("GET {path}'s body: {e}"));
                answers.push((path, status, body));
            }
            answers
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// Files in nginx's root, each of `size(i)` bytes of its own content, and
/// their paths, each read `times` times.
fn files(
    nginx: &Nginx,
    count: usize,
    times: usize,
    size: impl Fn(usize) -> usize,
) -> (Vec<String>, HashMap<String, Vec<u8>>) {
    let dir = nginx.data_dir().join("r");
    std::fs::create_dir_all(&dir).unwrap();
    let mut contents = HashMap::new();
    for i in 0..count {
        let body: Vec<u8> = format!("file {i} ").bytes().cycle().take(size(i)).collect();
        std::fs::write(dir.join(format!("f{i}")), &body).unwrap();
        contents.insert(format!("/r/f{i}"), body);
    }
    let paths = (0..times)
        .flat_map(|_| contents.keys().cloned().collect::<Vec<_>>())
        .collect();
    (paths, contents)
}

fn assert_answers(answers: &[(String, u16, bytes::Bytes)], contents: &HashMap<String, Vec<u8>>) {
    for (path, status, body) in answers {
        assert_eq!(*status, 200, "GET {path}");
        assert!(
            body[..] == contents[path][..],
            "GET {path}: {} bytes, not its file's {}",
            body.len(),
            contents[path].len()
        );
    }
}

/// Reads `times` times each of `count` files in nginx's root (file `i`
/// of `size(i)` bytes), 8 readers at a time, through a fencegate
/// pipelining at depth 8 (`tune`d), and checks every answer against its
/// file. Returns the fencegate, for its counters.
async fn read_files(
    nginx: &Nginx,
    tune: impl FnOnce(FencegateConfig) -> FencegateConfig,
    count: usize,
    times: usize,
    size: impl Fn(usize) -> usize,
) -> Fencegate {
    let (fg, _http) = pipelined(&nginx.url(), 8, tune).await;
    let (paths, contents) = files(nginx, count, times, size);
    let answers = read_many(&fg, 8, &paths).await;
    assert_answers(&answers, &contents);
    fg
}

/// Checks the preconditions of a test of read lanes that end: reads took
/// lanes, and some went again through the pool (`why`).
fn assert_reads_went_again(fg: &Fencegate, why: &str) {
    assert!(fg.pipelined_reads() > 0, "precondition: reads took lanes");
    assert!(fg.pipeline_resent() > 0, "precondition: {why}");
}

/// Reads in company share read lanes (`upstream.pipeline_reads`, on by
/// default), and each gets its own file's answer, in order.
#[tokio::test(flavor = "multi_thread")]
async fn reads_in_company_share_a_lane_and_each_gets_its_own_answer() {
    let nginx = Nginx::start();
    let fg = read_files(&nginx, |c| c, 40, 5, |i| 1 + i * 97).await;
    assert!(fg.pipelined_reads() > 0, "precondition: reads took lanes");
    assert_eq!(fg.pipeline_resent(), 0, "no lane left a read unanswered");
    let pipelined_at_nginx = nginx
        .log_entries_at_least(40 * 5 + 1)
        .iter()
        .filter(|e| e.pipelined && e.method == "GET")
        .count();
    assert!(pipelined_at_nginx > 0, "nginx saw no GET pipelined");
}

/// With `pipeline_reads = false`, reads never take a lane (writes still do).
#[tokio::test(flavor = "multi_thread")]
async fn reads_stay_off_lanes_when_asked() {
    let nginx = Nginx::start();
    let fg = read_files(&nginx, |c| c.pipeline_reads(false), 40, 5, |i| 1 + i * 97).await;
    assert_eq!(fg.pipelined_reads(), 0);
}

/// An answer too large to read whole on a lane (over 64 KiB) streams on
/// the lane's connection, and the reads behind it go again through the
/// pool: every read gets its whole file, large or small.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_whose_answer_is_too_large_for_a_lane_streams_on_it() {
    let nginx = Nginx::start();
    // One file in four over the limit (200 KiB; nginx says its length in
    // the head, so the lane hands it over there).
    let size = |i| if i % 4 == 0 { 200 * 1024 + i } else { 1 + i * 131 };
    let fg = read_files(&nginx, |c| c, 24, 4, size).await;
    assert_reads_went_again(&fg, "reads were behind a large answer");
}

/// Reads `path` once, in company (so on a read lane; fencegate's
/// `request_timeout` as given), with `fault` at the store, and checks what
/// the streaming tests below promise: the whole answer (`len` bytes, 200),
/// one arrival at the store, nothing sent again. Returns how long the
/// answer's head took to reach the client.
async fn read_once_on_a_lane(path: &str, fault: Fault, len: usize, request_timeout: Duration) -> Duration {
    let store = ScriptedStore::start().await;
    let (fg, http) = pipelined(&store.url(), 8, |c| c.request_timeout(request_timeout)).await;
    let _companion = store.companion(&fg.url(), Duration::from_secs(20)).await;
    store.fault_path(path, fault);
    let sent = Instant::now();
    let response = http.get(format!("{}{path}", fg.url())).send().await.unwrap();
    let head_took = sent.elapsed();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    assert_eq!(fg.pipelined_reads(), 1, "precondition: {path} took a lane");
    assert_eq!((status, body.len()), (200, len), "{path}");
    let heads = store.heads_at(path);
    assert_eq!(heads, 1, "{path} reached the store {heads} times");
    assert_eq!(fg.pipeline_resent(), 0, "nothing was sent again");
    head_took
}

/// The same, seen at the store: a large answer on a lane reaches its
/// client whole, and the read is sent once. (Sent again through the pool,
/// it reached the store twice.)
#[tokio::test(flavor = "multi_thread")]
async fn a_read_whose_answer_is_too_large_for_a_lane_is_sent_once() {
    const LARGE: usize = 100 * 1024;
    let body: &'static str = Box::leak("l".repeat(LARGE).into_boxed_str());
    let fault = Fault::Answer { status: 200, body };
    read_once_on_a_lane("/large", fault, LARGE, Duration::from_secs(30)).await;
}

/// The same for an answer of no stated length (chunked) that the store
/// writes at once: past 64 KiB it streams on the lane's connection, sent
/// once. (Taken as too large to hold, it was sent again through the pool.)
#[tokio::test(flavor = "multi_thread")]
async fn a_large_answer_of_no_stated_length_is_sent_once() {
    const LARGE: usize = 200 * 1024;
    let fault = Fault::AnswerChunked { bytes: LARGE };
    read_once_on_a_lane("/large", fault, LARGE, Duration::from_secs(30)).await;
}

/// nginx closes a connection after `keepalive_requests` answers. Reads
/// pipelined behind its last answer go again through the pool (they are
/// safe): none fails, where writes in the same place fail as outcome
/// unknown (`a_store_that_closes_a_pipelined_connection_gets_no_write_twice`).
#[tokio::test(flavor = "multi_thread")]
async fn reads_behind_a_store_that_closes_a_lane_go_again_and_none_fails() {
    let nginx = Nginx::start_with("keepalive_requests 3;");
    let fg = read_files(&nginx, |c| c.pipeline_max_requests(100), 40, 4, |i| 1 + i * 97).await;
    assert_reads_went_again(&fg, "nginx closed lanes with reads unanswered");
}

/// Reads ending their lanes (large answers, nginx's closes) cost no write
/// its outcome: reads and writes take lanes of their own.
#[tokio::test(flavor = "multi_thread")]
async fn reads_that_end_their_lanes_fail_no_write() {
    let nginx = Nginx::start_with("keepalive_requests 1000;");
    let (fg, _http) = pipelined(&nginx.url(), 8, |c| c).await;
    let (paths, contents) = files(&nginx, 16, 6, |i| if i % 2 == 0 { 100 * 1024 } else { 10 });
    let fg = std::sync::Arc::new(fg);
    let reads = {
        let fg = fg.clone();
        tokio::spawn(async move { read_many(&fg, 6, &paths).await })
    };
    let writes = write_many(&fg, 6, 20).await;
    let answers = reads.await.unwrap();
    assert_answers(&answers, &contents);
    let failed: Vec<_> = writes.iter().filter(|(_, r)| !r.is_success()).collect();
    assert!(failed.is_empty(), "writes failed: {failed:?}");
    // And none was sent twice.
    let entries = nginx.log_entries_at_least(answers.len() + writes.len() + 1);
    let mut puts: HashMap<&str, usize> = HashMap::new();
    for e in entries.iter().filter(|e| e.method == "PUT") {
        *puts.entry(e.uri.as_str()).or_default() += 1;
    }
    for path in writes.keys() {
        assert_eq!(puts.get(path.as_str()), Some(&1), "{path} reached nginx once");
    }
    assert!(fg.pipelined_writes() > 0, "precondition: writes took lanes");
    assert!(fg.pipeline_resent() > 0, "precondition: read lanes ended");
}

/// GETs `path` through `fg` from a task of its own: the answer's status
/// and body length.
fn spawn_get(
    http: &reqwest::Client,
    fg: &Fencegate,
    path: String,
) -> tokio::task::JoinHandle<reqwest::Result<(u16, usize)>> {
    let (http, url) = (http.clone(), format!("{}{path}", fg.url()));
    tokio::spawn(async move {
        let response = http.get(url).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.bytes().await?.len()))
    })
}

/// fencegate pipelining (tuned by `tune`) in front of a scripted store,
/// with company held past the test (so reads take lanes) and a read lane
/// open to pipelining: its first read answered.
async fn with_an_open_read_lane(
    tune: impl FnOnce(FencegateConfig) -> FencegateConfig,
) -> (ScriptedStore, Fencegate, reqwest::Client) {
    let store = ScriptedStore::start().await;
    let (fg, http) = pipelined(&store.url(), 8, tune).await;
    // Detached: it holds its read at the store for 20 s.
    let _companion = store.companion(&fg.url(), Duration::from_secs(20)).await;
    let open = http.get(format!("{}/open", fg.url())).send().await.unwrap();
    assert_eq!(open.status(), 201, "a read lane's first read");
    assert_eq!(
        fg.pipelined_reads(),
        1,
        "precondition: the first read took a lane"
    );
    (store, fg, http)
}

/// A read whose answer is late fails at `request_timeout` as on the pool
/// (504), and the reads pipelined behind it on its lane, which the store
/// had not answered, go again through the pool and are answered.
#[tokio::test(flavor = "multi_thread")]
async fn reads_behind_a_late_answer_go_again_and_are_answered() {
    let (store, fg, http) = with_an_open_read_lane(|c| c.request_timeout(Duration::from_secs(1))).await;
    store.fault_path("/late", Fault::AnswerAfter(Duration::from_secs(20)));
    let late = {
        let (http, url) = (http.clone(), format!("{}/late", fg.url()));
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    wait_head(&store, "/late").await;
    let started = Instant::now();
    let behind: Vec<_> = (0..3)
        .map(|i| {
            let (http, url) = (http.clone(), format!("{}/behind-{i}", fg.url()));
            tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    for (i, task) in behind.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), 201, "/behind-{i}");
    }
    assert_eq!(late.await.unwrap().unwrap(), 504, "/late");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the reads behind waited {:?}",
        started.elapsed()
    );
    assert!(fg.pipelined_reads() >= 2, "precondition: /late took the lane");
    assert!(
        fg.pipeline_resent() >= 1,
        "precondition: reads were behind /late on its lane"
    );
}

/// A read whose answer streams (no stated length, its body coming slowly:
/// an event stream, a long poll) is neither late nor sent twice: the SPEC's
/// `request_timeout` ends at the final response head, and a lane that
/// cannot read the answer whole hands the read its connection, where it
/// streams as on the pool, bounded only by `body_idle_timeout`. (Read
/// whole, it got 504 at `request_timeout`; then it was sent again through
/// the pool after that wait.)
#[tokio::test(flavor = "multi_thread")]
async fn a_read_whose_body_comes_slowly_streams_on_its_lane() {
    let every = Duration::from_millis(400);
    let fault = Fault::Trickle { chunks: 6, every };
    read_once_on_a_lane("/slow", fault, 6 * TRICKLE_CHUNK, Duration::from_secs(1)).await;
}

/// The same with the body's length stated: the lane hands the read its
/// connection once the body is seen to come slowly (50 ms), and the head
/// goes on to the client then, with the rest streaming after it. Sent
/// once. (Read whole on the lane, its head reached the client only with
/// the last piece, 2 s later.)
#[tokio::test(flavor = "multi_thread")]
async fn a_read_of_stated_length_whose_body_comes_slowly_streams_on_its_lane() {
    let every = Duration::from_millis(400);
    let fault = Fault::TrickleStated { chunks: 6, every };
    let head_took = read_once_on_a_lane("/slow", fault, 6 * TRICKLE_CHUNK, Duration::from_secs(30)).await;
    assert!(
        head_took < Duration::from_millis(1500),
        "the head of an answer 2 s in coming reached the client after {head_took:?}"
    );
}

/// An answer that the store writes in pieces close together is no
/// stream: the lane reads it whole, and the reads behind it are answered
/// on the lane, each sent once. (Taken for a stream at its first
/// incomplete read, it ended the lane and sent them all again.)
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_written_in_pieces_close_together_is_read_whole_on_its_lane() {
    pieces_close_together(false).await;
}

/// The same with the answer's length stated.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_of_stated_length_written_in_pieces_close_together_is_read_whole_on_its_lane() {
    pieces_close_together(true).await;
}

async fn pieces_close_together(stated: bool) {
    let (store, fg, http) = with_an_open_read_lane(|c| c).await;
    let chunks = 3;
    store.fault_path(
        "/pieces",
        Fault::TrickleAfter {
            after: Duration::from_millis(700),
            chunks,
            every: Duration::from_millis(5),
            stated,
        },
    );
    let get = |path: String| spawn_get(&http, &fg, path);
    let pieces = get("/pieces".to_owned());
    wait_head(&store, "/pieces").await;
    let behind: Vec<_> = (0..3).map(|i| get(format!("/behind-{i}"))).collect();
    assert_eq!(
        pieces.await.unwrap().unwrap(),
        (200, chunks * TRICKLE_CHUNK),
        "/pieces"
    );
    for (i, task) in behind.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap().0, 201, "/behind-{i}");
    }
    assert!(
        fg.pipelined_reads() >= 5,
        "precondition: the reads behind /pieces took its lane ({} reads did)",
        fg.pipelined_reads()
    );
    assert_eq!(fg.pipeline_resent(), 0, "reads were sent again");
}

/// The reads pipelined behind an answer that streams go again through the
/// pool as soon as it is seen to stream, and are answered while it goes
/// on: read whole, it held them until its end.
#[tokio::test(flavor = "multi_thread")]
async fn reads_behind_an_answer_that_streams_go_again_at_once() {
    reads_behind_a_slow_answer(false).await;
}

/// The same behind an answer of stated length whose body the store is
/// slow to write: read whole, it held the reads behind it until
/// `request_timeout` (10 s here), or until its end.
#[tokio::test(flavor = "multi_thread")]
async fn reads_behind_a_slow_answer_of_stated_length_go_again_at_once() {
    reads_behind_a_slow_answer(true).await;
}

async fn reads_behind_a_slow_answer(stated: bool) {
    let (store, fg, http) = with_an_open_read_lane(|c| c.request_timeout(Duration::from_secs(10))).await;
    let chunks = 10;
    store.fault_path(
        "/stream",
        Fault::TrickleAfter {
            after: Duration::from_millis(700),
            chunks,
            every: Duration::from_millis(300),
            stated,
        },
    );
    let get = |path: String| spawn_get(&http, &fg, path);
    let started = Instant::now();
    let stream = get("/stream".to_owned());
    wait_head(&store, "/stream").await;
    let behind: Vec<_> = (0..3).map(|i| get(format!("/behind-{i}"))).collect();
    for (i, task) in behind.into_iter().enumerate() {
        let (status, _) = task.await.unwrap().unwrap();
        assert_eq!(status, 201, "/behind-{i}");
    }
    let behind_took = started.elapsed();
    let (status, len) = stream.await.unwrap().unwrap();
    assert_eq!((status, len), (200, chunks * TRICKLE_CHUNK), "/stream");
    assert!(
        fg.pipelined_reads() >= 5,
        "precondition: the reads behind /stream took its lane ({} reads did)",
        fg.pipelined_reads()
    );
    assert!(
        behind_took < Duration::from_millis(2000),
        "the reads behind a 3.7 s stream were answered after {behind_took:?}"
    );
    assert_eq!(fg.pipeline_resent(), 3, "the reads behind went again");
}

/// A store that resets a read lane's connection (RST) leaves its reads
/// unanswered, the oldest too, and none of them at fault: they all go
/// again through the pool. Only a read whose own answer is late (504) or
/// malformed (502) fails (README, `upstream.pipeline_reads`).
#[tokio::test(flavor = "multi_thread")]
async fn reads_on_a_lane_the_store_resets_go_again() {
    let (store, fg, http) = with_an_open_read_lane(|c| c).await;
    // The store resets the lane's connection at this read, and answers it
    // when it comes again.
    store.fault_path("/flaky", Fault::ResetOnce);
    let flaky = http.get(format!("{}/flaky", fg.url())).send().await.unwrap();
    assert_eq!(fg.pipelined_reads(), 2, "precondition: /flaky took the lane");
    let heads = store.heads_at("/flaky");
    assert_eq!(flaky.status(), 201, "/flaky reached the store {heads} times");
    assert_eq!(fg.pipeline_resent(), 1);
}

/// The same with a close (FIN) in the middle of a read's answer: the read
/// goes again, where taking the cut answer as malformed failed it (502).
#[tokio::test(flavor = "multi_thread")]
async fn a_read_lane_closed_in_the_middle_of_an_answer_sends_it_again() {
    // Well within `STREAM_AFTER`: the answer is not yet taken for one
    // that streams.
    let (_store, fg, cut) = read_cut_on_a_lane("/cut", Duration::from_millis(5)).await;
    assert_eq!(cut.status(), 201, "/cut");
    assert_eq!(fg.pipeline_resent(), 1);
}

/// An answer the store stalls on is handed its lane's connection (it
/// streams), and from then on it is the client's as on the pool's path: a
/// close by the store reaches the client as a cut body, and the read is
/// not sent again behind its client's back (it got a head already).
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_cut_after_it_was_seen_to_stream_reaches_its_client_cut() {
    let (store, fg, stalled) = read_cut_on_a_lane("/stalled", Duration::from_millis(300)).await;
    assert_eq!(stalled.status(), 200, "the head went on once the answer streamed");
    let body = stalled.bytes().await;
    assert!(body.is_err(), "a cut body must not end as if whole: {body:?}");
    let heads = store.heads_at("/stalled");
    assert_eq!(heads, 1, "/stalled reached the store {heads} times");
    assert_eq!(fg.pipeline_resent(), 0, "nothing was sent again");
}

/// GETs `path` on an open read lane, whose store answers it once with 10
/// of 100 stated bytes and closes `pause` later: the store, fencegate and
/// the answer.
async fn read_cut_on_a_lane(path: &str, pause: Duration) -> (ScriptedStore, Fencegate, reqwest::Response) {
    let (store, fg, http) = with_an_open_read_lane(|c| c).await;
    let fault = Fault::CloseMidAnswerOnce {
        sent: 10,
        declared: 100,
        pause,
    };
    store.fault_path(path, fault);
    let answer = http.get(format!("{}{path}", fg.url())).send().await.unwrap();
    assert_eq!(fg.pipelined_reads(), 2, "precondition: {path} took the lane");
    (store, fg, answer)
}
