//! The broker nodes a relay may connect to, and the order it tries them in (pure).
//!
//! One round tries every node once, starting at a random one (so that replicas given
//! the same list spread over the cluster); a round after a lost connection starts at
//! the node after the one that was lost. The supervisor waits its backoff only between
//! full rounds. URLs are secrets: everything printable is the node's `host:port`.

use lapin::uri::AMQPUri;
use secrecy::{ExposeSecret, SecretString};

/// The configured nodes and where the next round starts.
pub struct Nodes {
    urls: Vec<SecretString>,
    labels: Vec<String>,
    next: usize,
}

impl Nodes {
    /// The nodes of `urls` (in the configured order); the first round starts at
    /// `start` (modulo their number).
    pub fn new(urls: Vec<SecretString>, start: usize) -> Self {
        let labels = urls.iter().map(|u| label(u.expose_secret())).collect();
        let next = if urls.is_empty() { 0 } else { start % urls.len() };
        Nodes { urls, labels, next }
    }

    /// The node indices of one round, in the order to try them.
    pub fn round(&self) -> impl Iterator<Item = usize> + use<> {
        let (n, first) = (self.urls.len(), self.next);
        (0..n).map(move |k| (first + k) % n)
    }

    /// Node `i`'s URL (a secret).
    pub fn url(&self, i: usize) -> &SecretString {
        &self.urls[i]
    }

    /// Node `i` as it may be printed: `host:port`.
    pub fn label(&self, i: usize) -> &str {
        &self.labels[i]
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Records a connection to node `i`: once it is lost, the next round starts at
    /// the node after it.
    pub fn connected(&mut self, i: usize) {
        self.next = (i + 1) % self.urls.len().max(1);
    }
}

/// `host:port` of an AMQP URL, without user, password, vhost or query.
fn label(url: &str) -> String {
    match url.parse::<AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "(invalid URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(start: usize) -> Nodes {
        let urls = ["amqp://u:pw1@a:5672/%2f", "amqp://u:pw2@b:5673/v", "amqps://u:pw3@c/%2f?frame_max=8192"];
        Nodes::new(urls.iter().map(|u| SecretString::from(*u)).collect(), start)
    }

    #[test]
    fn a_round_tries_every_node_once_from_the_start() {
        assert_eq!(nodes(0).round().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(nodes(2).round().collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(nodes(7).round().collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(Nodes::new(Vec::new(), 3).round().count(), 0);
    }

    #[test]
    fn after_a_loss_the_next_round_starts_past_the_lost_node() {
        let mut n = nodes(0);
        n.connected(1);
        assert_eq!(n.round().collect::<Vec<_>>(), [2, 0, 1]);
        n.connected(2);
        assert_eq!(n.round().collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn labels_are_host_and_port_only() {
        let n = nodes(0);
        assert_eq!((n.label(0), n.label(1), n.label(2)), ("a:5672", "b:5673", "c:5671"));
        assert_eq!(n.len(), 3);
        let bad = Nodes::new(vec![SecretString::from("http://u:hunter2@x")], 0);
        assert!(!bad.label(0).contains("hunter2"));
    }
}
