//! Lanes (`upstream.pipeline_depth`) against a store whose answers are
//! scripted byte by byte ([`WireStore`]): what a lane does with answers
//! hyper would never send, in the order and at the moments the test
//! chooses.

use crate::support::{client, Fencegate, FencegateConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One step of a scripted answer.
#[derive(Debug, Clone)]
enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait this long.
    Pause(Duration),
    /// Close the connection (FIN), reading nothing more from it.
    Close,
}

/// A request the store read: on which connection, what.
#[derive(Debug, Clone)]
struct Seen {
    conn: usize,
    path: String,
}

/// A store on 127.0.0.1 that reads requests one after another on each
/// connection (pipelined ones in order, as HTTP/1.1 servers do) and
/// answers each as scripted for its path, by default `201` with no body.
/// Dropping it stops it.
struct WireStore {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    scripts: Arc<Mutex<HashMap<String, Vec<Step>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for WireStore {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl WireStore {
    async fn start() -> WireStore {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let scripts = Arc::new(Mutex::new(HashMap::new()));
        let accept = {
            let (seen, scripts) = (seen.clone(), scripts.clone());
            tokio::spawn(async move {
                let mut conns = Vec::new();
                for conn in 0.. {
                    let Ok((stream, _)) = listener.accept().await else {
                        break;
                    };
                    let (seen, scripts) = (seen.clone(), scripts.clone());
                    conns.push(AbortOnDrop(tokio::spawn(serve(conn, stream, seen, scripts))));
                }
            })
        };
        WireStore {
            addr,
            seen,
            scripts,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn script(&self, path: &str, steps: Vec<Step>) {
        self.scripts.lock().unwrap().insert(path.to_owned(), steps);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits up to 10 s for a request to `path` to have been read.
    async fn wait_seen(&self, path: &str) -> Seen {
        for _ in 0..2000 {
            if let Some(s) = self.seen().into_iter().find(|s| s.path == path) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{path} never reached the store: {:?}", self.seen());
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(
    conn: usize,
    mut stream: TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    scripts: Arc<Mutex<HashMap<String, Vec<Step>>>>,
) {
    let mut buf = Vec::new();
    loop {
        // One request head, then its body (Content-Length only).
        let (head_len, path, length) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = request.parse(&buf) {
                let length = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |h| {
                        std::str::from_utf8(h.value).unwrap().trim().parse().unwrap()
                    });
                break (n, request.path.unwrap().to_owned(), length);
            }
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_len + length {
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_len + length);
        seen.lock().unwrap().push(Seen {
            conn,
            path: path.clone(),
        });
        let steps = scripts.lock().unwrap().get(&path).cloned().unwrap_or_else(|| {
            vec![Step::Send(
                b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n".to_vec(),
            )]
        });
        for step in steps {
            match step {
                Step::Send(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Close => {
                    let _ = stream.shutdown().await;
                    // Lingers so that what fencegate sends meanwhile is not
                    // answered with a reset.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return;
                }
            }
        }
    }
}

const DOMAIN: &str = "d";
const PREFIX: &str = "/d/";

async fn put(http: &reqwest::Client, base: &str, path: &str) -> (u16, Option<String>) {
    let response = http
        .put(format!("{base}{path}"))
        .header("Fencing-Token", "5")
        .body(format!("body of {path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get("fencegate-reason")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let _ = response.bytes().await;
    (status, reason)
}

fn spawn_put(
    http: &reqwest::Client,
    fg: &Fencegate,
    path: &str,
) -> tokio::task::JoinHandle<(u16, Option<String>)> {
    let (http, base, path) = (http.clone(), fg.url(), path.to_owned());
    tokio::spawn(async move { put(&http, &base, &path).await })
}

/// fencegate with one serving thread and pipelining on, in front of
/// `store`, epoch 5 established, a read held in flight at the store (so
/// that writes have company and take lanes) and a write lane opened to
/// pipelining by its first write, answered.
async fn with_an_open_write_lane(
    store: &WireStore,
) -> (Fencegate, reqwest::Client, tokio::task::JoinHandle<()>) {
    let config = FencegateConfig::new(&store.url())
        .domain(DOMAIN, PREFIX)
        .workers(1)
        .pipeline_depth(8)
        .pipeline_reads(false);
    let fg = Fencegate::start(config);
    let http = client();
    assert_eq!(put(&http, &fg.url(), "/d/establish").await.0, 201);
    store.script(
        "/companion",
        vec![
            Step::Pause(Duration::from_secs(8)),
            Step::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()),
        ],
    );
    let companion = {
        let (http, url) = (http.clone(), format!("{}/companion", fg.url()));
        tokio::spawn(async move {
            let _ = http.get(url).send().await;
        })
    };
    store.wait_seen("/companion").await;
    let before = fg.pipelined_writes();
    assert_eq!(put(&http, &fg.url(), "/d/open").await.0, 201);
    assert_eq!(
        fg.pipelined_writes(),
        before + 1,
        "precondition: /d/open took a lane"
    );
    (fg, http, companion)
}

/// A write lane's answer whose head says the store closes after it
/// (`Connection: close`, or a body delimited by the close) is the lane's
/// last: no write may go on that connection once the head is here, since
/// the store will answer none of them and each would fail with its outcome
/// unknown (502). A write that comes while the body is still on its way
/// goes on another lane and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn no_write_goes_on_a_lane_whose_store_said_it_closes() {
    for (name, head) in [
        (
            "connection-close",
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 10\r\n\r\nfirst"[..],
        ),
        ("until-close", &b"HTTP/1.1 200 OK\r\n\r\nfirst"[..]),
    ] {
        let store = WireStore::start().await;
        let (fg, http, _companion) = with_an_open_write_lane(&store).await;
        store.script(
            "/d/closing",
            vec![
                Step::Send(head.to_vec()),
                Step::Pause(Duration::from_millis(600)),
                Step::Send(b"-rest".to_vec()),
                Step::Close,
            ],
        );
        let closing = spawn_put(&http, &fg, "/d/closing");
        store.wait_seen("/d/closing").await;
        // The head that says the store closes is on its way.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let behind = put(&http, &fg.url(), "/d/behind").await;
        assert_eq!(closing.await.unwrap().0, 200, "{name}: the closing answer");
        assert_eq!(
            behind.0,
            201,
            "{name}: a write sent after the store said it closes the connection: {behind:?}; store saw {:?}",
            store.seen()
        );
        let (closing, behind) = (
            store.wait_seen("/d/closing").await,
            store.wait_seen("/d/behind").await,
        );
        assert_ne!(closing.conn, behind.conn, "{name}: on the closing connection");
    }
}

/// A read lane to test on: a scripted store, fencegate with one serving
/// thread and `pipeline_depth = 8`, and a companion read whose answer the
/// store holds for 8 s, so the reads sent meanwhile are in company and
/// take a lane.
struct ReadLane {
    store: WireStore,
    fg: Fencegate,
    http: reqwest::Client,
    _companion: tokio::task::JoinHandle<Answer>,
}

/// A client's answer: status, `Content-Length`, body, and how long it took.
type Answer = (u16, Option<String>, String, Duration);

impl ReadLane {
    async fn start(request_timeout: Option<Duration>) -> ReadLane {
        let store = WireStore::start().await;
        let mut config = FencegateConfig::new(&store.url())
            .domain(DOMAIN, PREFIX)
            .workers(1)
            .pipeline_depth(8);
        if let Some(timeout) = request_timeout {
            config = config.request_timeout(timeout);
        }
        let fg = Fencegate::start(config);
        store.script(
            "/companion",
            vec![
                Step::Pause(Duration::from_secs(8)),
                Step::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()),
            ],
        );
        let http = client();
        let companion = send(&http, &fg.url(), reqwest::Method::GET, "/companion");
        store.wait_seen("/companion").await;
        ReadLane {
            store,
            fg,
            http,
            _companion: companion,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> tokio::task::JoinHandle<Answer> {
        send(&self.http, &self.fg.url(), method, path)
    }

    fn get(&self, path: &str) -> tokio::task::JoinHandle<Answer> {
        self.request(reqwest::Method::GET, path)
    }
}

/// Sends a request to `base` in the background.
fn send(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
) -> tokio::task::JoinHandle<Answer> {
    let (http, url) = (http.clone(), format!("{base}{path}"));
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let response = http.request(method, url).send().await.unwrap();
        let status = response.status().as_u16();
        let length = response
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, length, response.text().await.unwrap(), started.elapsed())
    })
}

/// A store's 200 answer with `body`.
fn answer(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// A read held up behind a slow answer on its lane (head-of-line: the store
/// answers a lane's requests one after another) is not late itself: when
/// the slow answer came within `request_timeout` and left the read too
/// little of its own, the read is timed from that answer's end, rather
/// than fail with 504. (It failed: its deadline ran from when it was sent
/// behind the slow one.)
#[tokio::test(flavor = "multi_thread")]
async fn a_read_held_up_behind_a_slow_answer_is_not_failed_as_late() {
    // The companion is cut at request_timeout, which changes nothing here:
    // the reads below are in company with each other.
    let lane = ReadLane::start(Some(Duration::from_millis(1000))).await;
    let (store, fg) = (&lane.store, &lane.fg);
    let get = |path: &str| {
        let answer = lane.get(path);
        async move {
            let (status, _, body, _) = answer.await.unwrap();
            (status, body)
        }
    };
    assert_eq!(get("/open").await.0, 201, "the lane's first read");
    // Each takes the store 700 ms and 500 ms: within request_timeout, but
    // not one after the other.
    store.script(
        "/slow",
        vec![
            Step::Pause(Duration::from_millis(700)),
            Step::Send(answer("slow")),
        ],
    );
    store.script(
        "/behind",
        vec![
            Step::Pause(Duration::from_millis(500)),
            Step::Send(answer("behind")),
        ],
    );
    let reads_before = fg.pipelined_reads();
    // Each request is sent when `get` is called; its future only waits.
    let slow = get("/slow");
    store.wait_seen("/slow").await;
    let behind = get("/behind");
    assert_eq!(slow.await, (200, "slow".to_owned()));
    assert_eq!(
        behind.await,
        (200, "behind".to_owned()),
        "a read held up behind a slow answer; store saw {:?}",
        store.seen()
    );
    assert_eq!(
        fg.pipelined_reads(),
        reads_before + 2,
        "precondition: both took the lane"
    );
}

/// Answers without a body (to a HEAD, a 204, a 304, whatever length their
/// heads state) and informational ones (100, 103) before a final answer
/// are framed right on a lane: each read pipelined behind them gets its
/// own answer, and a HEAD's stated length reaches its client.
#[tokio::test(flavor = "multi_thread")]
async fn bodiless_and_informational_answers_keep_a_read_lane_in_step() {
    let lane = ReadLane::start(None).await;
    let (store, fg) = (&lane.store, &lane.fg);
    let request = |method: reqwest::Method, path: &str| lane.request(method, path);
    store.script(
        "/first",
        vec![
            Step::Pause(Duration::from_millis(300)),
            Step::Send(answer("first")),
        ],
    );
    store.script(
        "/head",
        vec![Step::Send(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n".to_vec(),
        )],
    );
    store.script(
        "/informed",
        vec![Step::Send(
            [
                &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n"[..],
                &answer("informed"),
            ]
            .concat(),
        )],
    );
    store.script(
        "/none",
        vec![Step::Send(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())],
    );
    store.script(
        "/same",
        vec![Step::Send(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 12\r\n\r\n".to_vec(),
        )],
    );
    store.script("/last", vec![Step::Send(answer("last"))]);
    let first = request(reqwest::Method::GET, "/first");
    store.wait_seen("/first").await;
    let mut rest = Vec::new();
    for (method, path) in [
        (reqwest::Method::HEAD, "/head"),
        (reqwest::Method::GET, "/informed"),
        (reqwest::Method::GET, "/none"),
        (reqwest::Method::GET, "/same"),
        (reqwest::Method::GET, "/last"),
    ] {
        rest.push((path, request(method, path)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(first.await.unwrap().2, "first");
    let mut got = Vec::new();
    for (path, task) in rest {
        let (status, length, body, _) = task.await.unwrap();
        got.push((path, status, body));
        if path == "/head" {
            assert_eq!(length.as_deref(), Some("100000"), "a HEAD's stated length");
        }
    }
    let want = vec![
        ("/head", 200, String::new()),
        ("/informed", 200, "informed".to_owned()),
        ("/none", 204, String::new()),
        ("/same", 304, String::new()),
        ("/last", 200, "last".to_owned()),
    ];
    assert_eq!(got, want, "store saw {:?}", store.seen());
    let seen = store.seen();
    let lane = seen.iter().find(|s| s.path == "/first").unwrap().conn;
    assert_eq!(
        seen.iter().filter(|s| s.conn == lane).count(),
        6,
        "precondition: all on one lane: {seen:?}"
    );
    assert_eq!(fg.pipeline_resent(), 0);
}

/// A read whose own answer is late, sent behind one the store answered at
/// once, fails with 504 at its own `request_timeout` and reaches the store
/// once: it was not held up. (Found by review of the fix above: every read
/// sent behind another was taken at its deadline for one held up, so this
/// one was sent to the store a second time, through the pool, and its
/// client waited twice `request_timeout` for the 504, while a store already
/// too slow did its work twice.) A read held up behind a slow answer is
/// timed from that answer's end, and sent once too.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_read_behind_a_quick_answer_fails_once_and_in_time() {
    let request_timeout = Duration::from_millis(1000);
    let lane = ReadLane::start(Some(request_timeout)).await;
    let (store, fg) = (&lane.store, &lane.fg);
    let get = |path: &str| {
        let answer = lane.get(path);
        async move {
            let (status, _, _, took) = answer.await.unwrap();
            (status, took)
        }
    };
    assert_eq!(get("/open").await.0, 201, "the lane's first read");
    store.script(
        "/quick",
        vec![
            Step::Pause(Duration::from_millis(100)),
            Step::Send(answer("quick")),
        ],
    );
    store.script(
        "/late",
        vec![Step::Pause(Duration::from_secs(4)), Step::Send(answer("late"))],
    );
    let reads_before = fg.pipelined_reads();
    let quick = get("/quick");
    store.wait_seen("/quick").await;
    let late = get("/late");
    assert_eq!(quick.await.0, 200);
    let (status, waited) = late.await;
    assert_eq!(
        fg.pipelined_reads(),
        reads_before + 2,
        "precondition: both took the lane"
    );
    let sent = store.seen().iter().filter(|s| s.path == "/late").count();
    assert_eq!(
        (status, sent),
        (504, 1),
        "a read late on its own, behind a quick answer: waited {waited:?}; store saw {:?}",
        store.seen()
    );
    assert!(
        waited < request_timeout + Duration::from_millis(600),
        "its 504 came after {waited:?}, request_timeout {request_timeout:?}"
    );
    assert_eq!(fg.pipeline_resent(), 0, "sent again");
}
