//! Peer sets, their digests, and parsing of operator input.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

/// Who owns an entry (see `firewall_common::origin`).
pub type Origin = u32;
pub use firewall_common::origin::{DISCOVERY, OPERATOR};

/// A peer set: exact hosts (/32, /128) and CIDRs, each with its origin.
/// A BTreeMap so every iteration is deterministic (the simulator relies on it).
pub type PeerSet = BTreeMap<IpNet, Origin>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerParseError {
    #[error(
        "`{0}` is not an IP address or CIDR: write e.g. 198.18.0.7, 2001:2::7 or 198.18.4.0/24"
    )]
    Invalid(String),
    #[error("`{input}` has host bits set: did you mean {suggest}?")]
    HostBits { input: String, suggest: IpNet },
    #[error(
        "`{0}` would allow a large part of the internet (shorter than /{MIN_PREFIX_V4} for IPv4 or /{MIN_PREFIX_V6} for IPv6): if you mean it, pass --allow-broad"
    )]
    Broad(IpNet),
}

/// The shortest prefixes accepted without `--allow-broad`. A /8 is 16M
/// IPv4 hosts and a /32 a whole RIR allocation for IPv6: anything wider is
/// almost always a typo (`0.0.0.0/0`, `128.0.0.0/1`) that turns the
/// allowlist off. Discovery sources can never add one.
pub const MIN_PREFIX_V4: u8 = 8;
pub const MIN_PREFIX_V6: u8 = 32;

pub fn is_broad(n: &IpNet) -> bool {
    match n {
        IpNet::V4(n) => n.prefix_len() < MIN_PREFIX_V4,
        IpNet::V6(n) => n.prefix_len() < MIN_PREFIX_V6,
    }
}

/// An IPv4-mapped IPv6 address or prefix (`::ffff:198.18.0.7`, or
/// `::ffff:198.18.0.0/112`) is IPv4: packets from that host arrive as IPv4, so
/// the entry must live in the IPv4 tables or it never matches. Every input
/// path (CLI, file, etcd, Serf, the core's validation) goes through here.
pub fn normalize(n: IpNet) -> IpNet {
    if let IpNet::V6(v6) = n
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return IpNet::V4(
            ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .expect("96..=128 minus 96 is a valid v4 prefix"),
        );
    }
    n
}

/// Parse `ADDR` or `ADDR/LEN`. Host bits must be clear, so a typo like
/// 198.18.0.7/24 is caught rather than silently widened.
pub fn parse_peer(s: &str) -> Result<IpNet, PeerParseError> {
    let s = s.trim();
    let net = if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| PeerParseError::Invalid(s.to_string()))?
    } else {
        IpNet::from(
            s.parse::<IpAddr>()
                .map_err(|_| PeerParseError::Invalid(s.to_string()))?,
        )
    };
    if net.trunc() != net {
        return Err(PeerParseError::HostBits {
            input: s.to_string(),
            suggest: net.trunc(),
        });
    }
    Ok(normalize(net))
}

pub fn is_exact(n: &IpNet) -> bool {
    n.prefix_len() == n.max_prefix_len()
}

/// An order-independent summary of a set: count and a wrapping sum of entry
/// hashes. It can be updated per change (O(diff)) and recomputed from a full
/// read-back, and the two must agree: that is the verify step.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Digest {
    pub count: u64,
    pub sum: u64,
}

/// Hash of one entry. Hand-written because it must be stable across builds
/// and processes (the checksum is stored in the pinned control word and
/// compared with what another process computed), which std's randomly seeded
/// hashers are not. The address words, and family, prefix length and origin
/// are multiplied by independent odd constants (three multiplies that run in
/// parallel) and then pass the splitmix64 finaliser: about 4x faster than the
/// byte-at-a-time FNV it replaced, which was a tenth of a 1M-peer commit.
pub fn entry_hash(net: &IpNet, origin: Origin) -> u64 {
    let (hi, lo, family) = match net.addr() {
        IpAddr::V4(a) => (u32::from_be_bytes(a.octets()) as u64, 0, 4u64),
        IpAddr::V6(a) => {
            let b = a.octets();
            (
                u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
                6,
            )
        }
    };
    mix(hi, lo, family, net.prefix_len(), origin)
}

/// [`entry_hash`] of an exact IPv4 peer, from its address bytes (the
/// read-back of a large commit hashes a million table slots this way,
/// without building an `IpNet` for each).
pub fn exact_hash_v4(a: [u8; 4], origin: Origin) -> u64 {
    mix(u32::from_be_bytes(a) as u64, 0, 4, 32, origin)
}

/// [`entry_hash`] of an exact IPv6 peer, from its address bytes.
pub fn exact_hash_v6(a: [u8; 16], origin: Origin) -> u64 {
    mix(
        u64::from_be_bytes(a[..8].try_into().expect("8 bytes")),
        u64::from_be_bytes(a[8..].try_into().expect("8 bytes")),
        6,
        128,
        origin,
    )
}

#[inline(always)]
fn mix(hi: u64, lo: u64, family: u64, prefix_len: u8, origin: Origin) -> u64 {
    let tag = (family << 40) | ((prefix_len as u64) << 32) | origin as u64;
    let mut z = hi.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ lo.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ tag.wrapping_mul(0x1656_67b1_9e37_79f9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Digest {
    pub fn of(set: &PeerSet) -> Digest {
        let mut d = Digest::default();
        for (n, o) in set {
            d.add(n, *o);
        }
        d
    }
    pub fn add(&mut self, net: &IpNet, origin: Origin) {
        self.add_hash(entry_hash(net, origin));
    }
    /// Count an entry by its [`entry_hash`].
    pub fn add_hash(&mut self, h: u64) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(h);
    }
    pub fn remove(&mut self, net: &IpNet, origin: Origin) {
        self.count -= 1;
        self.sum = self.sum.wrapping_sub(entry_hash(net, origin));
    }
}

/// A change to the committed set. `add` also changes the origin of an entry
/// that exists with another origin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub add: Vec<(IpNet, Origin)>,
    pub remove: Vec<IpNet>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
    /// The changes that turn `from` into `to`.
    pub fn between(from: &PeerSet, to: &PeerSet) -> Changes {
        let add = to
            .iter()
            .filter(|(n, o)| from.get(n) != Some(o))
            .map(|(n, o)| (*n, *o))
            .collect();
        let remove = from
            .keys()
            .filter(|n| !to.contains_key(n))
            .copied()
            .collect();
        Changes { add, remove }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(
            parse_peer("198.18.0.7").unwrap().to_string(),
            "198.18.0.7/32"
        );
        assert_eq!(
            parse_peer("2001:2::/48").unwrap().to_string(),
            "2001:2::/48"
        );
        assert!(matches!(
            parse_peer("198.18.0.7/24"),
            Err(PeerParseError::HostBits { .. })
        ));
        let e = parse_peer("198.18.0.7/24").unwrap_err().to_string();
        assert!(e.contains("198.18.0.0/24"), "{e}");
        assert!(matches!(
            parse_peer("nope"),
            Err(PeerParseError::Invalid(_))
        ));
        assert!(matches!(
            parse_peer("1.2.3.4/33"),
            Err(PeerParseError::Invalid(_))
        ));
    }

    proptest::proptest! {
        /// The read-back hashes table slots by their bytes; the commit
        /// hashes the same peers as `IpNet`s: they must agree, or every
        /// large commit fails its verification.
        #[test]
        fn the_raw_hashes_equal_the_entry_hash(v4: [u8; 4], v6: [u8; 16], origin: u32) {
            let n4 = IpNet::from(IpAddr::from(v4));
            let n6 = IpNet::from(IpAddr::from(v6));
            proptest::prop_assert_eq!(exact_hash_v4(v4, origin), entry_hash(&n4, origin));
            proptest::prop_assert_eq!(exact_hash_v6(v6, origin), entry_hash(&n6, origin));
        }
    }

    #[test]
    fn digest_is_order_independent_and_incremental() {
        let a: PeerSet = [("198.18.0.1/32", 1), ("198.18.1.0/24", 2)]
            .into_iter()
            .map(|(n, o)| (n.parse().unwrap(), o))
            .collect();
        let mut d = Digest::default();
        for (n, o) in a.iter().rev() {
            d.add(n, *o);
        }
        assert_eq!(d, Digest::of(&a));
        d.remove(&"198.18.0.1/32".parse().unwrap(), 1);
        assert_eq!(d.count, 1);
        // Origin is part of an entry's identity for verification.
        assert_ne!(
            entry_hash(&"198.18.0.1/32".parse().unwrap(), 1),
            entry_hash(&"198.18.0.1/32".parse().unwrap(), 2)
        );
    }

    #[test]
    fn changes_between() {
        let p = |s: &str| s.parse::<IpNet>().unwrap();
        let from: PeerSet = [(p("198.18.0.1/32"), 1), (p("198.18.0.2/32"), 2)].into();
        let to: PeerSet = [(p("198.18.0.2/32"), 1), (p("198.18.0.3/32"), 2)].into();
        let c = Changes::between(&from, &to);
        assert_eq!(
            c.add,
            vec![(p("198.18.0.2/32"), 1), (p("198.18.0.3/32"), 2)]
        );
        assert_eq!(c.remove, vec![p("198.18.0.1/32")]);
    }
}
