//! The proxy listener: accepts connections and serves each with hyper's
//! HTTP/1.1 server, with the header read timeout and head size limit that
//! protect it from slow or oversized clients, until shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::proxy::Proxy;

/// Whether every connection ended within the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// All in-flight requests finished.
    Complete,
    /// The grace period ran out with requests still in flight.
    TimedOut,
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// waits up to `settings.shutdown_grace` for open connections.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // hyper answers a bare 431 past this buffer; below it, fencegate's
        // own check answers 431 with a problem body at max_header_bytes.
        .max_buf_size((settings.max_header_bytes + 16 * 1024).max(8192))
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, most likely: back off rather
                    // than spin, and keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(grace = ?settings.shutdown_grace, "stopped accepting; draining connections");
    match tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => Drain::Complete,
        Err(_) => {
            tracing::warn!(grace = ?settings.shutdown_grace, "grace period ran out with requests in flight");
            Drain::TimedOut
        }
    }
}
