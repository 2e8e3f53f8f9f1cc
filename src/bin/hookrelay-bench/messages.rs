//! The workload: signed Patreon fixture bodies (plus padded and trimmed variants so the
//! mix spans 1–8 KiB), and the exact envelope bytes the relay would publish for each.
//!
//! The raw publisher and the HTTP load generator draw from the same list in the same
//! order, so both sides move the same bytes.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, bail};
use bytes::Bytes;
use hookrelay::envelope::{self, Envelope};
use hookrelay::verify::patreon::{PatreonVerifier, sign};
use lapin::BasicProperties;
use serde_json::Value;

/// The one source the bench relay is configured with.
pub const SOURCE: &str = "patreon";
/// CloudEvents `source` the relay derives for [`SOURCE`].
pub const CE_SOURCE: &str = "/webhooks/patreon";
/// The secret every bench body is signed with (the fixtures' v2 members secret).
pub const SECRET: &str = "fixture-v2-webhook-secret-NOT-REAL-b7d31a08e6";

/// Which body sizes to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeMix {
    /// Every valid fixture as it is, plus a 1 KiB and an 8 KiB variant of each.
    Mixed,
    /// Every body padded or trimmed to exactly this many bytes.
    Fixed(usize),
}

impl std::str::FromStr for SizeMix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "mixed" {
            return Ok(SizeMix::Mixed);
        }
        let n: usize = s.parse().map_err(|_| format!("`{s}`: expected `mixed` or a byte count"))?;
        if !(256..=1024 * 1024).contains(&n) {
            return Err(format!("{n}: body size must be 256 B to 1 MiB"));
        }
        Ok(SizeMix::Fixed(n))
    }
}

/// One delivery: what the HTTP side posts and what the raw side publishes.
pub struct Message {
    /// Request body (the bytes Patreon would send).
    pub body: Bytes,
    /// `X-Patreon-Event`.
    pub event: String,
    /// `X-Patreon-Signature` over `body` with [`SECRET`].
    pub signature: String,
    /// The envelope the relay builds for `body` (its `time` differs per request, its
    /// length does not).
    pub envelope: Envelope,
    /// AMQP properties the relay attaches to `envelope`.
    pub properties: BasicProperties,
}

/// The workload, shared read-only by every worker.
pub struct Workload {
    /// Messages in sending order; worker `i` of `n` sends `i, i+n, i+2n, …` modulo the length.
    pub messages: Vec<Message>,
}

impl Workload {
    /// Loads the fixtures under `fixtures` (the `tests/fixtures` folder) and builds the mix.
    pub fn load(fixtures: &Path, mix: SizeMix) -> anyhow::Result<Arc<Workload>> {
        let index_path = fixtures.join("patreon/INDEX.json");
        let index: Vec<Value> = serde_json::from_slice(
            &std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?,
        )
        .with_context(|| format!("parsing {}", index_path.display()))?;
        let mut bodies: Vec<(Vec<u8>, String)> = Vec::new();
        for entry in &index {
            if entry["expect"].as_str() != Some("valid") {
                continue;
            }
            let (Some(file), Some(trigger)) = (entry["body_file"].as_str(), entry["trigger"].as_str()) else {
                continue;
            };
            let path = fixtures.join(file);
            let raw = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            match mix {
                SizeMix::Mixed => {
                    bodies.push((resize(&raw, 1024)?, trigger.to_owned()));
                    bodies.push((raw.clone(), trigger.to_owned()));
                    bodies.push((resize(&raw, 8192)?, trigger.to_owned()));
                }
                SizeMix::Fixed(n) => bodies.push((resize(&raw, n)?, trigger.to_owned())),
            }
        }
        if bodies.is_empty() {
            bail!("no valid Patreon fixtures listed in {}", index_path.display());
        }
        let verifier = PatreonVerifier::new([SECRET.as_bytes()]);
        let now = SystemTime::now();
        let mut messages = Vec::with_capacity(bodies.len());
        for (body, event) in bodies {
            let signature = sign(SECRET.as_bytes(), &body);
            let verified = verifier
                .verify(Some(signature.as_bytes()), Some(event.as_bytes()), &body)
                .map_err(|e| anyhow::anyhow!("a bench body does not verify: {e}"))?;
            let target =
                envelope::Target { source_name: SOURCE, ce_source: CE_SOURCE, type_prefix: "com.patreon" };
            let envelope = envelope::build(&verified, &target, now);
            let properties = hookrelay::publish::amqp::properties(&envelope);
            messages.push(Message { body: Bytes::from(body), event, signature, envelope, properties });
        }
        Ok(Arc::new(Workload { messages }))
    }

    /// `(smallest, mean, largest)` body sizes in bytes.
    pub fn body_sizes(&self) -> (usize, usize, usize) {
        sizes(self.messages.iter().map(|m| m.body.len()))
    }

    /// `(smallest, mean, largest)` envelope sizes in bytes.
    pub fn envelope_sizes(&self) -> (usize, usize, usize) {
        sizes(self.messages.iter().map(|m| m.envelope.body.len()))
    }
}

fn sizes(it: impl Iterator<Item = usize> + Clone) -> (usize, usize, usize) {
    let n = it.clone().count().max(1);
    let min = it.clone().min().unwrap_or(0);
    let max = it.clone().max().unwrap_or(0);
    (min, it.sum::<usize>() / n, max)
}

/// A JSON document of exactly `target` bytes made from `raw`: padded with a trailing
/// `"pad"` member when `raw` is shorter, otherwise reduced to its `data.id`/`data.type`
/// and padded up to size.
pub fn resize(raw: &[u8], target: usize) -> anyhow::Result<Vec<u8>> {
    const PAD_OVERHEAD: usize = r#","pad":"""#.len();
    let base: Vec<u8> = if raw.len() + PAD_OVERHEAD <= target {
        raw.to_vec()
    } else {
        let doc: Value = serde_json::from_slice(raw).context("a fixture is not JSON")?;
        let data = &doc["data"];
        let small = serde_json::json!({"data": {"id": data["id"], "type": data["type"]}});
        serde_json::to_vec(&small)?
    };
    let Some(close) = base.iter().rposition(|&b| b == b'}') else {
        bail!("a fixture is not a JSON object");
    };
    if base.len() + PAD_OVERHEAD > target {
        bail!("cannot make a {target}-byte body from a {}-byte document", base.len());
    }
    let pad = target - base.len() - PAD_OVERHEAD;
    let mut out = Vec::with_capacity(target);
    out.extend_from_slice(&base[..close]);
    out.extend_from_slice(br#","pad":""#);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(br#""}"#);
    out.extend_from_slice(&base[close + 1..]);
    Ok(out)
}
