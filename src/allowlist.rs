//! Per-source client allowlists: CIDR networks parsed with `std` only, matched
//! against the TCP peer address before any other work on a request.
//!
//! The peer is the address that opened the connection. `X-Forwarded-For` and similar
//! headers are never consulted: anyone can write them. Behind a proxy every request
//! comes from the proxy, so there the allowlist belongs in the proxy.
//!
//! A neutral module: `config` parses the lists, `http` matches peers against them,
//! and neither has to import the other for it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One network, e.g. `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_bits: u8,
}

/// Why a CIDR was refused; the message is shown to the operator at start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("`{0}` is not an IP address or network like 10.0.0.0/8 or 2001:db8::/32")]
    Address(String),
    /// The prefix length is not a number within the address family's width.
    #[error("`{0}`: the prefix length must be 0-32 for IPv4 and 0-128 for IPv6")]
    Prefix(String),
    /// Bits below the prefix are set, which usually means a typo.
    #[error("`{given}` has host bits set; did you mean `{suggested}`?")]
    HostBits {
        /// As written.
        given: String,
        /// With the host bits cleared.
        suggested: String,
    },
}

fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// The `prefix` leading bits of a `width`-bit value set, the rest clear.
fn mask(prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let all = if width == 128 { u128::MAX } else { (1u128 << width) - 1 };
    all & !((1u128 << (width - prefix)) - 1).min(all)
}

impl Cidr {
    /// Whether `addr` lies in this network. IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`,
    /// what a dual-stack listener reports for IPv4 clients) match IPv4 networks.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        let (a, width) = bits(addr);
        let (n, n_width) = bits(self.network);
        width == n_width && (a & mask(self.prefix_bits, width)) == n
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr_text.parse().map_err(|_| CidrError::Address(text.to_owned()))?;
        let (value, width) = bits(network);
        let prefix_bits = match prefix_text {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(bits) if bits <= width && !p.starts_with('+') => bits,
                _ => return Err(CidrError::Prefix(text.to_owned())),
            },
        };
        let cleared = value & mask(prefix_bits, width);
        if cleared != value {
            let base = match network {
                IpAddr::V4(_) => IpAddr::from(u32::try_from(cleared).unwrap_or(0).to_be_bytes()),
                IpAddr::V6(_) => IpAddr::from(cleared.to_be_bytes()),
            };
            return Err(CidrError::HostBits {
                given: text.to_owned(),
                suggested: format!("{base}/{prefix_bits}"),
            });
        }
        Ok(Cidr { network, prefix_bits })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_bits)
    }
}

/// The networks one source accepts requests from; empty means every address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    networks: Vec<Cidr>,
}

impl Allowlist {
    /// An allowlist of `networks`; an empty list allows everyone.
    pub fn new(networks: Vec<Cidr>) -> Self {
        Allowlist { networks }
    }

    /// True when no list is configured.
    pub fn allows_all(&self) -> bool {
        self.networks.is_empty()
    }

    /// Whether a request from `peer` may proceed. An unknown peer is refused when a
    /// list is configured: fail closed.
    pub fn allows(&self, peer: Option<IpAddr>) -> bool {
        if self.networks.is_empty() {
            return true;
        }
        peer.is_some_and(|ip| self.networks.iter().any(|n| n.contains(ip)))
    }

    /// The configured networks.
    pub fn networks(&self) -> &[Cidr] {
        &self.networks
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let cases: [(&str, &str, bool); 14] = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "::1", false),
            ("::1/128", "::1", true),
            ("::1", "::2", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "2001:db8::1", true),
            ("127.0.0.0/8", "::ffff:127.0.0.1", true),
            ("10.1.2.3/32", "10.1.2.3", true),
            ("10.1.2.0/31", "10.1.2.1", true),
        ];
        for (cidr, addr, want) in cases {
            let net: Cidr = cidr.parse().unwrap();
            assert_eq!(net.contains(ip(addr)), want, "{cidr} ∋ {addr}");
        }
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
    }

    #[test]
    fn bad_networks_are_refused_with_a_reason() {
        for text in ["", "x", "10.0.0/8", "10.0.0.0/", "10.0.0.0/33", "::/129", "10.0.0.0/-1", "10.0.0.0/+8"]
        {
            assert!(text.parse::<Cidr>().is_err(), "{text}");
        }
        let err = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert_eq!(err, CidrError::HostBits { given: "10.0.0.1/8".into(), suggested: "10.0.0.0/8".into() });
        let err = "2001:db8::1/32".parse::<Cidr>().unwrap_err().to_string();
        assert!(err.contains("2001:db8::/32"), "{err}");
    }

    #[test]
    fn empty_list_allows_all_and_a_list_fails_closed() {
        assert!(Allowlist::default().allows(None));
        assert!(Allowlist::default().allows(Some(ip("203.0.113.1"))));
        let list = Allowlist::new(vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]);
        assert!(list.allows(Some(ip("10.0.0.1"))));
        assert!(list.allows(Some(ip("::1"))));
        assert!(!list.allows(Some(ip("127.0.0.1"))));
        assert!(!list.allows(None));
    }
}
