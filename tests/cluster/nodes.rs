//! The three-node test cluster, driven through `tests/cluster/rabbit-cluster.sh`: which
//! node leads a quorum queue, which node a relay process is connected to, and the
//! faults (SIGKILL, restart, graceful `stop_app`/`start_app`).

use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

/// Node numbers of the cluster.
pub const NODES: [u8; 3] = [1, 2, 3];

/// The cluster `run.sh` started; `HOOKRELAY_CLUSTER_SCRIPT` and `HRC_DIR` name it.
#[derive(Debug, Clone)]
pub struct Cluster {
    script: String,
    /// `amqp://` URL of node 1, 2, 3 (index 0, 1, 2).
    pub urls: Vec<String>,
}

impl Cluster {
    /// The cluster of this run, or a panic that says how to start one.
    pub fn from_env() -> Cluster {
        let Ok(script) = std::env::var("HOOKRELAY_CLUSTER_SCRIPT") else {
            panic!(
                "the cluster tests need the 3-node test cluster: run them with `bash tests/cluster/run.sh` \
                 (it starts the cluster, runs these tests and tears it down)"
            );
        };
        let cluster = Cluster { script, urls: Vec::new() };
        let out = cluster.script(&["urls"]);
        let urls: Vec<String> = out.lines().map(str::to_owned).filter(|l| l.starts_with("amqp://")).collect();
        assert_eq!(urls.len(), 3, "rabbit-cluster.sh urls printed {out:?}");
        Cluster { urls, ..cluster }
    }

    /// Runs the script with `args`; panics with its output when it fails.
    fn script(&self, args: &[&str]) -> String {
        let out = Command::new("bash").arg(&self.script).args(args).output().expect("bash runs");
        assert!(
            out.status.success(),
            "rabbit-cluster.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the script without waiting the caller's thread (it blocks for seconds).
    async fn script_async(&self, args: &[&str]) -> String {
        let this = self.clone();
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            this.script(&refs)
        })
        .await
        .expect("script task")
    }

    /// AMQP port of node `n`.
    pub fn port(&self, n: u8) -> u16 {
        let url = &self.urls[usize::from(n) - 1];
        let hostport = url.rsplit('@').next().and_then(|s| s.split('/').next()).unwrap_or("");
        hostport.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the cluster URL")
    }

    /// SIGKILLs node `n`'s Erlang VM.
    pub async fn kill(&self, n: u8) {
        self.script_async(&["kill", &n.to_string()]).await;
    }

    /// Restarts node `n` and waits until it runs.
    pub async fn start(&self, n: u8) {
        self.script_async(&["start", &n.to_string()]).await;
    }

    /// `rabbitmqctl stop_app` (`start_app`) on node `n`: a graceful stop of the broker
    /// application with the VM still up.
    pub async fn app(&self, n: u8, start: bool) {
        let verb = if start { "start_app" } else { "stop_app" };
        self.script_async(&["ctl", &n.to_string(), verb]).await;
    }

    /// The node leading quorum queue `queue` and its member count, asked of the first
    /// node that answers.
    pub async fn quorum(&self, queue: &str) -> Option<(u8, usize)> {
        for n in NODES {
            let this = self.clone();
            let out = tokio::task::spawn_blocking(move || {
                let args = ["list_queues", "-q", "name", "leader", "members", "--formatter", "json"];
                Command::new("bash").arg(&this.script).args(["ctl", &n.to_string()]).args(args).output()
            })
            .await
            .expect("ctl task");
            let Ok(out) = out else { continue };
            if !out.status.success() {
                continue;
            }
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let Some(row) = rows.as_array().into_iter().flatten().find(|r| r["name"] == queue) else {
                continue;
            };
            let members = row["members"].as_array().map_or(0, Vec::len);
            if let Some(leader) = row["leader"].as_str().and_then(node_number) {
                return Some((leader, members));
            }
        }
        None
    }

    /// The node leading quorum queue `queue`.
    pub async fn leader(&self, queue: &str) -> Option<u8> {
        self.quorum(queue).await.map(|(leader, _)| leader)
    }

    /// Waits until queue `queue` has a leader on a running node; returns it.
    pub async fn await_leader(&self, queue: &str, limit: Duration) -> u8 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(n) = self.leader(queue).await {
                return n;
            }
            assert!(Instant::now() < deadline, "queue {queue} has no leader after {limit:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node that process `pid` holds an established AMQP connection to (from `ss`).
    pub fn node_of(&self, pid: u32) -> Option<u8> {
        let out = Command::new("ss").args(["-Htnp", "state", "established"]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let needle = format!("pid={pid},");
        for line in text.lines().filter(|l| l.contains(&needle)) {
            // Columns: Recv-Q Send-Q Local:Port Peer:Port Process
            let Some(peer) = line.split_whitespace().nth(3) else { continue };
            let port: Option<u16> = peer.rsplit(':').next().and_then(|p| p.parse().ok());
            if let Some(n) = NODES.into_iter().find(|n| Some(self.port(*n)) == port) {
                return Some(n);
            }
        }
        None
    }

    /// Waits until process `pid` is connected to some node; returns it.
    pub async fn await_node_of(&self, pid: u32, limit: Duration) -> u8 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(n) = self.node_of(pid) {
                return n;
            }
            assert!(Instant::now() < deadline, "relay {pid} has no broker connection after {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `hrc2@localhost` → 2.
fn node_number(node: &str) -> Option<u8> {
    let name = node.split('@').next()?;
    let n: u8 = name.chars().rev().take_while(char::is_ascii_digit).collect::<String>().parse().ok()?;
    NODES.contains(&n).then_some(n)
}
