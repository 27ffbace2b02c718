//! Pipelining to the store (`upstream.pipeline_depth`, src/pipeline.rs)
//! against a store that misbehaves: a write on a lane ends within the
//! configured timeouts, and a raise waits on a lower write that already has
//! its answer no longer than it would on the pool's path. (A store that is
//! down: `store_pipelining::a_store_that_refuses_connections_...`.) The
//! helpers are `store_faults`'s.

use super::{log_tail, marks, put, DOMAIN, HANG};
use crate::support::{Fault, Fencegate, FencegateConfig, ScriptedStore};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn start(config: FencegateConfig) -> Fencegate {
    tokio::task::block_in_place(|| Fencegate::start(config))
}

/// fencegate with domain `d` and lanes of 4 on one serving thread (every
/// write takes the same lanes) in front of `store`; `tune` adds to it.
fn lanes(store: &ScriptedStore, tune: impl FnOnce(FencegateConfig) -> FencegateConfig) -> Fencegate {
    start(tune(
        FencegateConfig::new(&store.url())
            .domain(DOMAIN, "/d/")
            .workers(1)
            .pipeline_depth(4),
    ))
}

/// [`lanes`] in front of `store`, whose connections get the smallest
/// receive window, so that most of a 16 KiB write waits in fencegate's
/// socket until the store reads it; timeouts long enough never to be what
/// ends a write.
fn small_window(store: &ScriptedStore, tune: impl FnOnce(FencegateConfig) -> FencegateConfig) -> Fencegate {
    store.set_receive_buffer(2048);
    lanes(store, |c| {
        tune(
            c.request_timeout(Duration::from_secs(10))
                .body_idle_timeout(Duration::from_secs(10)),
        )
    })
}

/// A store may answer a pipelined write before it has read it all, and then
/// stop reading; the rest waits unsent in fencegate's socket. Until it has
/// gone out, the write keeps its place in its generation, and a raise cuts
/// its connection at once (as on the pool's path, `forward::until_sent_out`)
/// rather than wait for the store to read again (or `request_timeout`).
#[tokio::test(flavor = "multi_thread")]
async fn a_raise_cuts_a_pipelined_write_answered_early_that_the_kernel_holds() {
    const READ_AFTER: Duration = Duration::from_secs(4);
    const BODY: usize = 16 << 10;
    let store = ScriptedStore::start().await;
    let fg = small_window(&store, |c| c);
    store.fault_path(
        "/d/early",
        Fault::AnswerEarly {
            read_after: READ_AFTER,
        },
    );
    // One client connection, in company (writes that are whole when
    // handled take a lane): large writes first, so that fencegate's
    // listener reads a whole write at once (hyper's read size grows), and
    // the last one is whole when handled.
    let _companion = store.companion(&fg.url(), Duration::from_secs(3)).await;
    let mut stream = TcpStream::connect(fg.addr()).await.expect("connect to fencegate");
    for path in ["/d/w1", "/d/w2", "/d/w3", "/d/w4", "/d/early"] {
        let status = raw_put(&mut stream, path, 5, BODY).await;
        assert_eq!(status / 100, 2, "write {path}: {status}\n{}", log_tail(&fg));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fg.pipelined_writes() > 0, "precondition: the writes took a lane");
    let held = marks(&fg).2;
    if held == 0 {
        panic!(
            "precondition: the early-answered write left its generation at once (its bytes all \
             went out, or it did not take a lane); the test proves nothing"
        );
    }
    let raise = put(&fg, "/d/six", 6).await;
    assert_eq!(raise.0 / 100, 2, "the raise to 6: {raise:?}\n{}", log_tail(&fg));
    assert!(
        raise.2 < Duration::from_secs(1),
        "the raise waited {:?} for a lower pipelined write the store had answered (the store reads \
         again after {READ_AFTER:?})\n{}",
        raise.2,
        log_tail(&fg)
    );
    assert_eq!(marks(&fg), (6, 6, 0), "(epoch, refusal mark, writes in flight)");
}

/// A write queued on a lane behind that lane's first request (a lane
/// pipelines only after its first answer) is handed back when that request
/// times out, and queued again behind the next lane's first request, and so
/// on: against a store that never answers, the writes behind waited one
/// `request_timeout` more per write ahead of them (and, with writes coming
/// all the time, without bound). A write waits for a lane to send it at
/// most `connect_timeout` + `request_timeout`, then at most
/// `request_timeout` for its answer.
#[tokio::test(flavor = "multi_thread")]
async fn writes_queued_behind_a_lanes_first_request_wait_a_bounded_time() {
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
    let store = ScriptedStore::start().await;
    store.fault_path("/d/hang", Fault::NeverAnswer);
    let fg = lanes(&store, |c| {
        c.connect_timeout(Duration::from_millis(500))
            .request_timeout(REQUEST_TIMEOUT)
    });
    // No write before: the four open the first lane together (in
    // company), and three of them wait there for the first one's answer.
    let _companion = store.companion(&fg.url(), Duration::from_secs(3)).await;
    let (a, b, c, d) = tokio::join!(
        put(&fg, "/d/hang", 5),
        put(&fg, "/d/hang", 5),
        put(&fg, "/d/hang", 5),
        put(&fg, "/d/hang", 5)
    );
    let answers = [a, b, c, d];
    for answer in &answers {
        assert!(
            answer.0 >= 500 && answer.2 < Duration::from_millis(2800),
            "every write to a store that never answers ends within connect_timeout + \
             2 × request_timeout: {answers:?}\n{}",
            log_tail(&fg)
        );
    }
    assert_eq!(marks(&fg).2, 0, "no write left in flight");
    assert!(fg.pipelined_writes() > 0, "precondition: the writes took a lane");
}

/// Sends `PUT path` with `token` and a `len`-byte body on `stream` in one
/// write, and reads the status of its answer (0 when none came).
async fn raw_put(stream: &mut TcpStream, path: &str, token: u64, len: usize) -> u16 {
    let mut request = format!(
        "PUT {path} HTTP/1.1\r\nHost: store.test\r\nFencing-Token: {token}\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(&vec![b'x'; len]);
    stream.write_all(&request).await.expect("send a write");
    let mut answer = [0u8; 1024];
    let n = match tokio::time::timeout(HANG, stream.read(&mut answer)).await {
        Ok(Ok(n)) => n,
        _ => return 0,
    };
    let text = String::from_utf8_lossy(&answer[..n]);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A lane is shared by every domain. A write answered while the kernel
/// still holds unsent bytes of a *later* write on its lane (here another
/// domain's, which the store has not read yet) has sent all of its own:
/// a raise in its domain must neither wait for nor cut those later bytes.
/// It was held until the kernel held nothing unsent at all, and the raise
/// then cut the lane, failing the other domain's write (502, outcome
/// unknown) though nothing of the raised domain was left to go out.
#[tokio::test(flavor = "multi_thread")]
async fn a_raise_does_not_cut_another_domains_write_pipelined_behind_an_answered_one() {
    const OTHER: &str = "e";
    const BODY: usize = 16 << 10;
    let store = ScriptedStore::start().await;
    // Most of the other domain's write waits in fencegate's socket while
    // the store has not read its body.
    let fg = small_window(&store, |c| c.domain(OTHER, "/e/"));
    // Large writes first on one client connection, so that fencegate's
    // listener reads a whole write at once (hyper's read size grows) and
    // the other domain's write takes the lane; they open it too.
    let _companion = store.companion(&fg.url(), Duration::from_secs(2)).await;
    let mut stream = TcpStream::connect(fg.addr()).await.expect("connect to fencegate");
    for i in 0..4 {
        let status = raw_put(&mut stream, &format!("/d/w{i}"), 5, BODY).await;
        assert_eq!(status / 100, 2, "warm-up write {i}: {status}\n{}", log_tail(&fg));
    }
    // d's write is answered after 300 ms; e's, sent behind it on the same
    // lane, is read 3 s after its head reached the store.
    store.hold_token("5", Duration::from_millis(300));
    store.hold_token_before_body("7", Duration::from_secs(3));
    let fg_ref = &fg;
    let other = async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        raw_put(&mut stream, "/e/other", 7, BODY).await
    };
    let raise = async move {
        let answered = put(fg_ref, "/d/first", 5).await;
        // At once: e's write is still unread at the store.
        let held = marks(fg_ref).2;
        let raised = put(fg_ref, "/d/six", 6).await;
        (answered, held, raised)
    };
    let before = fg.pipelined_writes();
    let ((answered, held, raised), other) = tokio::join!(raise, other);
    // d's first write and e's: both on the lane (the raise, too, if it
    // found company).
    assert!(
        fg.pipelined_writes() >= before + 2,
        "precondition: both writes took a lane ({before} before, {} after)",
        fg.pipelined_writes()
    );
    assert_eq!(
        answered.0 / 100,
        2,
        "d's first write: {answered:?}\n{}",
        log_tail(&fg)
    );
    assert_eq!(raised.0 / 100, 2, "the raise to 6: {raised:?}\n{}", log_tail(&fg));
    assert_eq!(
        other / 100,
        2,
        "the other domain's write, pipelined behind d's answered one, was failed by d's raise \
         (d's write held its place after its answer: {held} in flight)\n{}",
        log_tail(&fg)
    );
    assert_eq!(marks(&fg), (6, 6, 0), "(epoch, refusal mark, writes in flight)");
}

/// Every lower write a raise waited for and that fencegate cut without its
/// answer is the SPEC's one exception, counted in
/// `fencegate_barrier_timeouts_total`. When a lane's oldest write outlives
/// `request_timeout`, the lane is cut, and so are the writes sent behind
/// it: fully sent, the raise waiting for them too, and let go without an
/// answer. Only the oldest was counted.
#[tokio::test(flavor = "multi_thread")]
async fn every_pipelined_write_a_raise_waited_for_and_a_timeout_cut_is_counted() {
    let store = ScriptedStore::start().await;
    store.fault_path("/d/hang", Fault::NeverAnswer);
    let fg = lanes(&store, |c| c.request_timeout(Duration::from_secs(1)));
    // In company, the writes take a lane (the warm-up opens it).
    let _companion = store.companion(&fg.url(), Duration::from_secs(3)).await;
    let warm = put(&fg, "/d/warm", 5).await;
    assert_eq!(warm.0 / 100, 2, "warm-up: {warm:?}\n{}", log_tail(&fg));
    let before = fg.pipelined_writes();
    let fg_ref = &fg;
    let lower = |delay: u64| async move {
        tokio::time::sleep(Duration::from_millis(delay)).await;
        put(fg_ref, "/d/hang", 5).await
    };
    let (a, b, raised) = tokio::join!(lower(0), lower(100), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        put(fg_ref, "/d/six", 6).await
    });
    assert!(
        a.0 >= 500 && b.0 >= 500,
        "lower writes: {a:?} {b:?}\n{}",
        log_tail(&fg)
    );
    assert_eq!(raised.0 / 100, 2, "the raise to 6: {raised:?}\n{}", log_tail(&fg));
    assert!(
        fg.pipelined_writes() >= before + 2,
        "precondition: both lower writes took a lane"
    );
    let text = fg.admin_get("/metrics").body;
    let counted = crate::support::metric_value(&text, "fencegate_barrier_timeouts_total", DOMAIN);
    assert_eq!(
        counted,
        Some(2.0),
        "both lower writes the raise waited for were cut without an answer"
    );
}
