//! The `hookrelay` binary as a child process: its own config file and free ports,
//! stdout and stderr captured to files, waited for, signalled, and killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::*;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_hookrelay");

/// Writes `toml` to `{dir}/{name}.toml` and runs `hookrelay --config <it> check-config`.
pub fn check_config(dir: &Path, name: &str, toml: &str) -> std::process::Output {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml).unwrap();
    Command::new(BIN).arg("--config").arg(&file).arg("check-config").output().unwrap()
}

/// An address nothing listens on right now.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running relay process.
pub struct Child {
    child: std::process::Child,
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Child {
    /// Runs `hookrelay --config {dir}/{name}.toml` with `config` on free ports, with
    /// `RUST_LOG` unset unless `env` sets it. Output goes to `{dir}/{name}.stdout`
    /// and `.stderr`.
    pub fn spawn(dir: &Path, name: &str, config: RelayConfig, env: &[(&str, &str)]) -> Child {
        let (ingest, admin) = (free_addr(), free_addr());
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, config.listen(ingest, admin).toml()).unwrap();
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut command = Command::new(BIN);
        command.arg("--config").arg(&file).env_remove("RUST_LOG");
        command.envs(env.iter().copied());
        let child = command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Child { child, ingest, admin, stdout, stderr }
    }

    /// Everything it wrote so far, stdout then stderr.
    pub fn output(&self) -> String {
        let out = std::fs::read(&self.stdout).unwrap_or_default();
        let err = std::fs::read(&self.stderr).unwrap_or_default();
        format!("{}\n{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))
    }

    /// Waits until the admin listener answers 200 on `path` (`/healthz`: up,
    /// `/readyz`: ready); fails with the output if it exits or takes over 20 s.
    pub async fn wait_for(&mut self, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("relay exited with {status}: {}", self.output());
            }
            if tokio::net::TcpStream::connect(self.admin).await.is_ok()
                && get(self.admin, path).await.0 == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "relay not answering {path}: {}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "relay did not exit: {}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits up to 20 s for a clean exit.
    pub async fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "exit {status}: {}", self.output());
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
