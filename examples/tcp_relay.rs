//! The floor contender of `bench/run`: a TCP relay that knows nothing of
//! HTTP. Each client connection gets its own store connection, and bytes
//! are copied both ways as they come. It parses nothing, adds no header,
//! pools nothing and checks nothing, so it makes the fewest system calls
//! any proxy can make for a request and its answer: one read and one write
//! on each side. Its throughput bounds what any HTTP proxy built on
//! read/write system calls can reach on this machine, fencegate included.
//!
//! Like fencegate, it runs one single-threaded tokio runtime per worker,
//! every worker accepting from the same listening socket.
//!
//! `cargo run --release --example tcp_relay -- --listen 127.0.0.1:8090
//! --upstream 127.0.0.1:8081 [--workers 2]`

#[path = "common/relay.rs"]
mod relay;

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "a TCP relay: the floor of what a proxy costs (bench/run)")]
struct Cli {
    #[command(flatten)]
    relay: relay::RelayArgs,
}

fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let upstream = cli.relay.upstream;
    relay::serve(&cli.relay, move |listener| accept_loop(listener, upstream))
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            // A failed connect or a reset just ends this pair: the client
            // sees its connection close, as with any relay.
            let Ok(store) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = store.set_nodelay(true);
            let (mut client, mut store) = (client, store);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut store).await;
        });
    }
}
