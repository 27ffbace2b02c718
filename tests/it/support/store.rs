//! An in-process store that records when each request's head, body end
//! and response happen, and can hold requests by token.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The request head arrived (the body may not have).
    HeadArrived,
    /// The whole body (and trailers) arrived.
    BodyComplete,
    /// The body failed or ended short (the client aborted it).
    BodyFailed,
    /// The response head was handed to hyper.
    Responded,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub token: Option<String>,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub kind: EventKind,
    pub at: Instant,
    /// The request headers (HeadArrived only; empty otherwise).
    pub headers: HeaderMap,
    /// The body (BodyComplete only; empty otherwise).
    pub body: Bytes,
    /// The trailers (BodyComplete only; empty otherwise).
    pub trailers: HeaderMap,
}

struct Shared {
    header: String,
    status: AtomicU16,
    events: Mutex<Vec<Event>>,
    /// token → hold between body end and response.
    holds: Mutex<HashMap<String, Duration>>,
    /// token → hold between head and reading the body.
    body_holds: Mutex<HashMap<String, Duration>>,
}

/// A store on 127.0.0.1 running on the test's tokio runtime. It answers
/// every request with 201 (see [`ScriptedStore::set_status`]) and an empty
/// body after reading the whole request body. Dropping it stops it.
pub struct ScriptedStore {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl ScriptedStore {
    /// Start on a free port; tokens are read from `Fencing-Token`.
    pub async fn start() -> ScriptedStore {
        ScriptedStore::start_with_header("Fencing-Token").await
    }

    /// Start, reading tokens from `header`.
    pub async fn start_with_header(header: &str) -> ScriptedStore {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ScriptedStore on 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            header: header.to_string(),
            status: AtomicU16::new(201),
            events: Mutex::new(Vec::new()),
            holds: Mutex::new(HashMap::new()),
            body_holds: Mutex::new(HashMap::new()),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        ScriptedStore {
            addr,
            shared,
            shutdown,
        }
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Hold requests carrying `token` for `d` after their body is complete,
    /// before answering.
    pub fn hold_token(&self, token: &str, d: Duration) {
        lock(&self.shared.holds).insert(token.to_string(), d);
    }

    /// Hold requests carrying `token` for `d` after their head arrived,
    /// before reading the body (and before `100 Continue` is sent).
    pub fn hold_token_before_body(&self, token: &str, d: Duration) {
        lock(&self.shared.body_holds).insert(token.to_string(), d);
    }

    /// Remove every hold (requests already holding keep their sleep).
    pub fn clear_holds(&self) {
        lock(&self.shared.holds).clear();
        lock(&self.shared.body_holds).clear();
    }

    /// The status of every later response (201 at start).
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// Every event so far, in arrival order.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.shared.events).clone()
    }

    /// The events of requests carrying `token`.
    pub fn events_for(&self, token: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.token.as_deref() == Some(token))
            .collect()
    }

    /// Poll (every 5 ms, at most `timeout`) until `pred(events)` holds;
    /// false on timeout.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Event]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&lock(&self.shared.events)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stop accepting and close every connection. Idempotent.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for ScriptedStore {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, hyper::Error> {
    let token = req
        .headers()
        .get(shared.header.as_str())
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let record = |kind, headers: HeaderMap, body: Bytes, trailers: HeaderMap| {
        lock(&shared.events).push(Event {
            token: token.clone(),
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            kind,
            at: Instant::now(),
            headers,
            body,
            trailers,
        });
    };
    record(
        EventKind::HeadArrived,
        req.headers().clone(),
        Bytes::new(),
        HeaderMap::new(),
    );

    let held =
        |map: &Mutex<HashMap<String, Duration>>| token.as_ref().and_then(|t| lock(map).get(t).copied());
    if let Some(d) = held(&shared.body_holds) {
        tokio::time::sleep(d).await;
    }

    let mut body = req.into_body();
    let mut data = BytesMut::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers.extend(t);
                    }
                }
            },
            Err(e) => {
                record(
                    EventKind::BodyFailed,
                    HeaderMap::new(),
                    data.freeze(),
                    HeaderMap::new(),
                );
                return Err(e);
            }
        }
    }
    record(EventKind::BodyComplete, HeaderMap::new(), data.freeze(), trailers);

    if let Some(d) = held(&shared.holds) {
        tokio::time::sleep(d).await;
    }

    let status = StatusCode::from_u16(shared.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::CREATED);
    record(
        EventKind::Responded,
        HeaderMap::new(),
        Bytes::new(),
        HeaderMap::new(),
    );
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = status;
    Ok(resp)
}
