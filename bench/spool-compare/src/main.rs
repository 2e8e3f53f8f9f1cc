//! Throwaway comparison of hookrelay's segment-log spool with redb and fjall
//! for the spool's pattern: many concurrent appenders, each append durable
//! (group commit: one durable commit per batch of queued appends), then an
//! in-order drain with durable removals.
//!
//! Usage: spool-compare <spool|redb|fjall> [records] [appenders] [payload_bytes] [drain_batch]
//! Prints one line of figures. Fsyncs of the whole process are counted from
//! outside with strace (see run.sh); the spool also counts its own.

#[allow(dead_code)]
#[path = "../../../src/spool/mod.rs"]
mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use spool::{Spool, SpoolOptions, SpoolRecord};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn record(i: usize, payload_bytes: usize) -> SpoolRecord {
    let mut r = SpoolRecord {
        source: "github".into(),
        routing_key: "webhooks.github.push".into(),
        event_id: format!("evt-{i:010}"),
        envelope: Bytes::new(),
    };
    let env_len = payload_bytes.saturating_sub(r.payload_len());
    // Incompressible bytes (xorshift), so fjall's journal compression does
    // not turn the comparison into a compression benchmark.
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let env: Vec<u8> = (0..env_len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    r.envelope = Bytes::from(env);
    r
}

/// A store driven through a group-commit writer thread (redb, fjall).
trait Store: Send + 'static {
    /// Appends all payloads in one durable commit.
    fn append_group(&mut self, first_key: u64, payloads: &[Vec<u8>]) -> Result<(), BoxError>;
    /// Up to `max` records with keys > `after`, in key order.
    fn read_batch(&mut self, after: Option<u64>, max: usize) -> Result<Vec<(u64, Vec<u8>)>, BoxError>;
    /// Removes keys `from..=to` durably.
    fn remove_range(&mut self, from: u64, to: u64) -> Result<(), BoxError>;
}

struct RedbStore {
    db: redb::Database,
}

const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("spool");

impl RedbStore {
    fn open(dir: &Path) -> Result<Self, BoxError> {
        std::fs::create_dir_all(dir)?;
        let db = redb::Database::create(dir.join("spool.redb"))?;
        let tx = db.begin_write()?;
        tx.open_table(TABLE)?;
        tx.commit()?;
        Ok(Self { db })
    }
}

impl Store for RedbStore {
    fn append_group(&mut self, first_key: u64, payloads: &[Vec<u8>]) -> Result<(), BoxError> {
        let tx = self.db.begin_write()?; // default durability: Immediate
        {
            let mut t = tx.open_table(TABLE)?;
            for (i, p) in payloads.iter().enumerate() {
                t.insert(first_key + i as u64, p.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn read_batch(&mut self, after: Option<u64>, max: usize) -> Result<Vec<(u64, Vec<u8>)>, BoxError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TABLE)?;
        let start = after.map_or(0, |k| k + 1);
        let mut out = Vec::new();
        for item in t.range(start..)?.take(max) {
            let (k, v) = item?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn remove_range(&mut self, from: u64, to: u64) -> Result<(), BoxError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(TABLE)?;
            for k in from..=to {
                t.remove(k)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

struct FjallStore {
    db: fjall::Database,
    ks: fjall::Keyspace,
}

impl FjallStore {
    fn open(dir: &Path) -> Result<Self, BoxError> {
        let db = fjall::Database::builder(dir).open()?;
        let ks = db.keyspace("spool", fjall::KeyspaceCreateOptions::default)?;
        Ok(Self { db, ks })
    }
}

impl Store for FjallStore {
    fn append_group(&mut self, first_key: u64, payloads: &[Vec<u8>]) -> Result<(), BoxError> {
        let mut b = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for (i, p) in payloads.iter().enumerate() {
            b.insert(&self.ks, (first_key + i as u64).to_be_bytes(), p.as_slice());
        }
        b.commit()?;
        Ok(())
    }

    fn read_batch(&mut self, after: Option<u64>, max: usize) -> Result<Vec<(u64, Vec<u8>)>, BoxError> {
        let start = after.map_or(0, |k| k + 1).to_be_bytes();
        let mut out = Vec::new();
        for g in self.ks.range(start..).take(max) {
            let (k, v) = g.into_inner()?;
            let mut kb = [0u8; 8];
            kb.copy_from_slice(&k);
            out.push((u64::from_be_bytes(kb), v.to_vec()));
        }
        Ok(out)
    }

    fn remove_range(&mut self, from: u64, to: u64) -> Result<(), BoxError> {
        let mut b = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for k in from..=to {
            b.remove(&self.ks, k.to_be_bytes());
        }
        b.commit()?;
        Ok(())
    }
}

type Ack = oneshot::Sender<Result<(), String>>;

/// Same group commit as the spool's writer: take everything queued, one
/// durable commit, ack all.
fn group_writer<S: Store>(mut store: S, mut rx: mpsc::Receiver<(Vec<u8>, Ack)>) -> (S, u64) {
    let mut next_key = 0u64;
    let mut groups = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        let mut bytes = batch[0].0.len();
        while bytes < 8 << 20 {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.0.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let (payloads, acks): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let res = store.append_group(next_key, &payloads);
        next_key += payloads.len() as u64;
        groups += 1;
        for a in acks {
            let _ = a.send(res.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
    }
    (store, groups)
}

struct Figures {
    append_secs: f64,
    groups: u64,
    drain_secs: f64,
    drained: usize,
}

async fn run_store<S: Store>(
    store: S,
    records: usize,
    appenders: usize,
    payload_bytes: usize,
    drain_batch: usize,
) -> Result<Figures, BoxError> {
    let (tx, rx) = mpsc::channel::<(Vec<u8>, Ack)>(4096);
    let writer = std::thread::spawn(move || group_writer(store, rx));
    let payloads: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..records)
            .map(|i| record(i, payload_bytes).encode_payload())
            .collect::<Result<_, _>>()?,
    );
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let tx = tx.clone();
        let payloads = payloads.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = a;
            while i < payloads.len() {
                let (ack, done) = oneshot::channel();
                tx.send((payloads[i].clone(), ack)).await.map_err(|e| e.to_string())?;
                done.await.map_err(|e| e.to_string())??;
                i += appenders;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let append_secs = t0.elapsed().as_secs_f64();
    drop(tx);
    let (mut store, groups) = writer.join().map_err(|_| "writer panicked")?;
    settle();

    let t1 = Instant::now();
    let drained = tokio::task::spawn_blocking(move || -> Result<usize, String> {
        let mut after = None;
        let mut n = 0;
        loop {
            let batch = store.read_batch(after, drain_batch).map_err(|e| e.to_string())?;
            let (Some((first, _)), Some((last, _))) = (batch.first(), batch.last()) else {
                break;
            };
            let (first, last) = (*first, *last);
            for (_, v) in &batch {
                SpoolRecord::decode_payload(Bytes::copy_from_slice(v)).map_err(|e| e.to_string())?;
            }
            store.remove_range(first, last).map_err(|e| e.to_string())?;
            n += batch.len();
            after = Some(last);
        }
        Ok(n)
    })
    .await??;
    Ok(Figures {
        append_secs,
        groups,
        drain_secs: t1.elapsed().as_secs_f64(),
        drained,
    })
}

async fn run_spool(
    dir: &Path,
    records: usize,
    appenders: usize,
    payload_bytes: usize,
    drain_batch: usize,
) -> Result<(Figures, String), BoxError> {
    let (spool, _) = Spool::open(
        dir,
        SpoolOptions {
            max_bytes: u64::MAX,
            segment_bytes: 16 << 20,
        },
    )
    .await?;
    let recs: Arc<Vec<SpoolRecord>> =
        Arc::new((0..records).map(|i| record(i, payload_bytes)).collect());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let spool = spool.clone();
        let recs = recs.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = a;
            while i < recs.len() {
                spool.append(recs[i].clone()).await?;
                i += appenders;
            }
            Ok::<(), spool::SpoolError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let append_secs = t0.elapsed().as_secs_f64();
    let after_append = spool.stats();
    settle();
    let t1 = Instant::now();
    let mut drained = 0;
    loop {
        let batch = spool.peek_batch(drain_batch).await?;
        let Some((last, _)) = batch.last() else { break };
        spool.remove_through(*last).await?;
        drained += batch.len();
    }
    let drain_secs = t1.elapsed().as_secs_f64();
    let end = spool.stats();
    let note = format!(
        "internal: append fsyncs={} drain fsyncs={} (cursor writes {})",
        after_append.fsyncs,
        end.fsyncs - after_append.fsyncs,
        end.cursor_writes
    );
    Ok((
        Figures {
            append_secs,
            groups: after_append.commit_groups,
            drain_secs,
            drained,
        },
        note,
    ))
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let engine = args.get(1).map(String::as_str).unwrap_or("spool").to_string();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let records = arg(2, 20_000);
    let appenders = arg(3, 64);
    let payload_bytes = arg(4, 4096);
    let drain_batch = arg(5, 256);
    let dir: PathBuf = std::env::temp_dir().join(format!("spool-compare-{engine}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (f, note) = rt.block_on(async {
        match engine.as_str() {
            "spool" => run_spool(&dir, records, appenders, payload_bytes, drain_batch).await,
            "redb" => run_store(RedbStore::open(&dir)?, records, appenders, payload_bytes, drain_batch)
                .await
                .map(|f| (f, String::new())),
            "fjall" => run_store(FjallStore::open(&dir)?, records, appenders, payload_bytes, drain_batch)
                .await
                .map(|f| (f, String::new())),
            other => Err(format!("unknown engine {other}").into()),
        }
    })?;
    let disk = dir_size(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if f.drained != records {
        return Err(format!("drained {} of {records}", f.drained).into());
    }
    println!(
        "{engine:<6} records={records} appenders={appenders} payload={payload_bytes}B | append {:>8.0} ev/s ({:.2}s, {} groups, {:.1} rec/group) | drain {:>8.0} ev/s ({:.2}s, batch {drain_batch}) | disk after drain {} KiB {note}",
        records as f64 / f.append_secs,
        f.append_secs,
        f.groups,
        records as f64 / f.groups.max(1) as f64,
        records as f64 / f.drain_secs,
        f.drain_secs,
        disk / 1024,
    );
    Ok(())
}

/// Lets background writeback of the append phase finish before the drain
/// phase is timed (the same for every engine).
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_size(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}
