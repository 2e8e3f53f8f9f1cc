//! A TCP fault proxy between the relay and RabbitMQ. It can pass traffic, drop every
//! open connection, refuse new ones, or blackhole (hold connections open while
//! forwarding nothing), and switch between these at any time.
//!
//! It can also make the open connections silent for good, the way a NAT or firewall
//! that lost its state does ([`FaultProxy::silence_live`]: both sides stay open, no
//! byte passes ever again), or half-open ([`FaultProxy::half_open_live`]: the
//! broker's side is closed, the relay's side stays open and hears nothing). Nothing
//! tells the relay; only heartbeats and missing confirms can.
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
    /// Bumped to make every open connection silent (or half-open) for good.
    fate: watch::Sender<(u64, Fate)>,
    cuts: Arc<AtomicU64>,
    silences: Arc<AtomicU64>,
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
        let (fate, fate_rx) = watch::channel((0u64, Fate::Silent));
        let task = tokio::spawn(accept_loop(listener, upstream, mode_rx, gen_rx, fate_rx));
        Ok(FaultProxy {
            addr,
            mode,
            generation,
            fate,
            cuts: Arc::new(AtomicU64::new(0)),
            silences: Arc::new(AtomicU64::new(0)),
            task,
        })
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

    /// Every open connection goes silent for good (both sides open, nothing passes,
    /// nothing closes), and new ones are held until [`Self::set`]`(Mode::Pass)`: a
    /// network path that lost its state.
    pub fn silence_live(&self) {
        self.doom(Fate::Silent);
    }

    /// Every open connection goes half-open: its broker side is closed, its relay side
    /// stays open and hears nothing. New ones are held until [`Self::set`]`(Mode::Pass)`.
    pub fn half_open_live(&self) {
        self.doom(Fate::HalfOpen);
    }

    fn doom(&self, fate: Fate) {
        self.silences.fetch_add(1, Ordering::Relaxed);
        self.set(Mode::Blackhole);
        self.fate.send_modify(|(n, f)| {
            *n += 1;
            *f = fate;
        });
    }

    /// How many times a silence (or half-open) was started.
    pub fn silences(&self) -> u64 {
        self.silences.load(Ordering::Relaxed)
    }
}

/// What happens to the open connections when they are doomed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Both sides stay open; nothing passes.
    Silent,
    /// The broker side closes; the relay side stays open and hears nothing.
    HalfOpen,
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    generation: watch::Receiver<u64>,
    fate: watch::Receiver<(u64, Fate)>,
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
        let fate = fate.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            pipe_pair(client, server, mode, generation, fate).await;
        });
    }
}

async fn pipe_pair(
    client: TcpStream,
    server: TcpStream,
    mode: watch::Receiver<Mode>,
    mut generation: watch::Receiver<u64>,
    mut fate: watch::Receiver<(u64, Fate)>,
) {
    let start = *generation.borrow_and_update();
    let doomed_at = fate.borrow_and_update().0;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let closed = async {
        while generation.changed().await.is_ok() {
            if *generation.borrow() != start {
                break;
            }
        }
    };
    let mut closed = std::pin::pin!(closed);
    let doomed = tokio::select! {
        _ = pipe(&mut cr, &mut sw, mode.clone()) => return,
        _ = pipe(&mut sr, &mut cw, mode) => return,
        _ = &mut closed => return,
        doomed = async {
            while fate.changed().await.is_ok() {
                let (n, f) = *fate.borrow();
                if n != doomed_at {
                    return Some(f);
                }
            }
            None
        } => doomed,
    };
    let Some(doomed) = doomed else { return };
    // Bytes in flight are lost; from now on nothing passes until the connection is
    // closed by drop_all, by the relay, or by the proxy going away. Whatever the
    // broker does with its side (it gives up on missed heartbeats too), the relay's
    // side stays open and hears nothing.
    let broker_side = (doomed == Fate::Silent).then_some((sr, sw));
    tokio::select! {
        _ = discard(&mut cr) => {}
        _ = &mut closed => {}
    }
    drop(broker_side);
}

/// Reads and drops everything until the peer closes.
async fn discard(from: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

async fn pipe(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
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
