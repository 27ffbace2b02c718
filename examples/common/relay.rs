//! What the relays of `bench/run` share (`tcp_relay`, `pipe_relay`): their
//! common arguments, and one listening socket accepted from by several
//! threads, each a single-threaded tokio runtime, like fencegate's serving
//! threads.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// The arguments every relay takes.
#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// Address to accept clients on (loopback).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The store the clients' requests go to.
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Worker threads, each a single-threaded runtime.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

/// Binds `args.listen` and runs `worker` on `args.workers` threads, each
/// on its own single-threaded runtime with the listening socket, until
/// every one has ended; the first error is returned.
pub fn serve<F, Fut>(args: &RelayArgs, worker: F) -> io::Result<()>
where
    F: Fn(TcpListener) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = io::Result<()>>,
{
    let listener = std::net::TcpListener::bind(args.listen)?;
    listener.set_nonblocking(true)?;
    let mut threads = Vec::new();
    for _ in 0..args.workers.max(1) {
        let listener = listener.try_clone()?;
        let worker = worker.clone();
        threads.push(std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move { worker(TcpListener::from_std(listener)?).await })
        }));
    }
    for thread in threads {
        thread.join().expect("a relay worker panicked")?;
    }
    Ok(())
}
