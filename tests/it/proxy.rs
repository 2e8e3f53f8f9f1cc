//! A TCP fault proxy between the relay and RabbitMQ. It can pass traffic, drop every
//! open connection, refuse new ones, or blackhole (hold connections open while
//! forwarding nothing), and switch between these at any time.
//!
//! Shared by the fault tests and the soak example (`examples/soak.rs`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Close new connections at once.
    Refuse,
    /// Accept and hold connections, forwarding nothing.
    Blackhole,
}

/// A running proxy; dropping it stops accepting.
pub struct FaultProxy {
    /// Address the relay should connect to.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to close every open connection.
    generation: watch::Sender<u64>,
    cuts: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (generation, gen_rx) = watch::channel(0u64);
        let task = tokio::spawn(accept_loop(listener, upstream, mode_rx, gen_rx));
        Ok(FaultProxy { addr, mode, generation, cuts: Arc::new(AtomicU64::new(0)), task })
    }

    /// An AMQP URL for the relay that goes through the proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Switches the mode for new traffic (and, for Blackhole, for open connections).
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every open connection now.
    pub fn drop_all(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
    }

    /// How many times [`Self::drop_all`] was called.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    generation: watch::Receiver<u64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let current = *mode.borrow();
        if current == Mode::Refuse {
            drop(client);
            continue;
        }
        let mode = mode.clone();
        let generation = generation.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            pipe_pair(client, server, mode, generation).await;
        });
    }
}

async fn pipe_pair(
    client: TcpStream,
    server: TcpStream,
    mode: watch::Receiver<Mode>,
    mut generation: watch::Receiver<u64>,
) {
    let start = *generation.borrow_and_update();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, mode.clone());
    let down = pipe(sr, cw, mode);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = async {
            while generation.changed().await.is_ok() {
                if *generation.borrow() != start {
                    break;
                }
            }
        } => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // While blackholed, hold the bytes until traffic passes again.
        while *mode.borrow() == Mode::Blackhole {
            if mode.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
