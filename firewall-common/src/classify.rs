//! The reference classifier: the verdict rules written plainly over a byte slice.
//!
//! It is deliberately a separate implementation from the XDP parser (which walks
//! packet pointers under the verifier's rules), so the differential test compares
//! two codebases rather than one against itself. The rules, in order:
//!
//! 1. Frame structure. A frame shorter than Ethernet, a truncated VLAN tag, more
//!    than two VLAN tags, a truncated or wrong-version IP header, an IPv4 IHL
//!    below 5 or past the frame, `tot_len` below the IHL, an IPv6 extension
//!    chain that is truncated or longer than [`MAX_EXT_HEADERS`], or a first
//!    fragment whose TCP/UDP ports (4 bytes) or ICMPv6 header (4 bytes) is cut
//!    off: **Malformed**, dropped.
//! 2. Not IPv4/IPv6 (ARP, LLDP, ...): **NonIp**, passed.
//! 3. Source, protocol and ports match a compiled-in overlay rule: **Overlay**,
//!    passed. Later fragments carry no ports, so they only match rules without
//!    a port.
//! 4. Source is a committed peer, exact or by CIDR: **Peer**, passed.
//! 5. ICMPv6 types 133-137 (router/neighbour solicitation and advertisement,
//!    redirect) with hop limit 255 and no fragment header: **Neighbour**,
//!    passed. RFC 4861 makes a receiver discard neighbour discovery whose hop
//!    limit is not 255 (so it cannot have crossed a router), and RFC 6980
//!    forbids fragmenting it: anything else of those types is an off-link
//!    host using them to get through, and is dropped.
//! 6. A reply to one of the node's own live flows ([`FlowLookup`]): **Reply**,
//!    passed. A TCP or UDP packet (not a later fragment) whose reversed
//!    addresses and ports are a live flow; an ICMP echo reply (type 0) or
//!    ICMPv6 echo reply (129) whose identifier and reversed addresses are a
//!    live echo flow; or an ICMP error (destination unreachable 3, time
//!    exceeded 11) or ICMPv6 error (destination unreachable 1, packet too big
//!    2, time exceeded 3) whose embedded packet is one the node sent on a live
//!    flow. The outer ICMP header must be whole (8 bytes); the embedded header
//!    must be whole, of the outer family, not a later fragment, with 8 bytes
//!    of its transport header; an embedded IPv6 header is taken only with the
//!    transport header right after it (no extension headers). An error that
//!    fails any of that matches no flow.
//! 7. Everything else: **DefaultDrop**.

use crate::{
    OverlayRule, Reason,
    flow::{FAMILY_V4, FAMILY_V6, FlowKey},
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers walked before giving up (hop-by-hop, routing,
/// fragment, destination options, AH).
pub const MAX_EXT_HEADERS: usize = 4;
pub const MAX_VLAN_TAGS: usize = 2;

pub const IPPROTO_ICMP: u8 = 1;

/// The peer set as the classifier sees it.
pub trait PeerLookup {
    fn is_peer_v4(&self, src: [u8; 4]) -> bool;
    fn is_peer_v6(&self, src: [u8; 16]) -> bool;
}

/// The flow table as the classifier sees it: is this flow (from the node's
/// side) recorded and not idle past its timeout?
pub trait FlowLookup {
    fn is_live(&self, key: &FlowKey) -> bool;
}

/// No flows: the pure allowlist (`--replies off`).
pub struct NoFlows;

impl FlowLookup for NoFlows {
    fn is_live(&self, _: &FlowKey) -> bool {
        false
    }
}

fn be16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

/// Classify one Ethernet frame.
pub fn classify(
    pkt: &[u8],
    overlay: &[OverlayRule],
    peers: &impl PeerLookup,
    flows: &impl FlowLookup,
) -> Reason {
    if pkt.len() < 14 {
        return Reason::Malformed;
    }
    let mut ethertype = be16(pkt, 12);
    let mut off = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        if off + 4 > pkt.len() {
            return Reason::Malformed;
        }
        ethertype = be16(pkt, off + 2);
        off += 4;
    }
    match ethertype {
        ETH_P_8021Q | ETH_P_8021AD => Reason::Malformed, // a third tag
        ETH_P_IP => classify_v4(pkt, off, overlay, peers, flows),
        ETH_P_IPV6 => classify_v6(pkt, off, overlay, peers, flows),
        _ => Reason::NonIp,
    }
}

fn classify_v4(
    pkt: &[u8],
    off: usize,
    overlay: &[OverlayRule],
    peers: &impl PeerLookup,
    flows: &impl FlowLookup,
) -> Reason {
    if off + 20 > pkt.len() {
        return Reason::Malformed;
    }
    let vihl = pkt[off];
    let ihl = ((vihl & 0xf) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 || off + ihl > pkt.len() {
        return Reason::Malformed;
    }
    if (be16(pkt, off + 2) as usize) < ihl {
        return Reason::Malformed;
    }
    let later_fragment = be16(pkt, off + 6) & 0x1fff != 0;
    let proto = pkt[off + 9];
    let mut src = [0u8; 4];
    src.copy_from_slice(&pkt[off + 12..off + 16]);
    let l4 = off + ihl;
    let mut ports = None;
    if !later_fragment && (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        if l4 + 4 > pkt.len() {
            return Reason::Malformed;
        }
        ports = Some((be16(pkt, l4), be16(pkt, l4 + 2)));
    }
    if overlay.iter().any(|r| r.matches(4, &src, proto, ports)) {
        return Reason::Overlay;
    }
    if peers.is_peer_v4(src) {
        return Reason::Peer;
    }
    if !later_fragment
        && let Some(k) = reply_key(pkt, FAMILY_V4, off + 12, off + 16, proto, l4)
        && flows.is_live(&k)
    {
        return Reason::Reply;
    }
    Reason::DefaultDrop
}

fn addr_at(pkt: &[u8], at: usize, family: u8) -> [u8; 16] {
    let n = if family == FAMILY_V4 { 4 } else { 16 };
    let mut a = [0u8; 16];
    a[..n].copy_from_slice(&pkt[at..at + n]);
    a
}

/// The flow (from the node's side) an inbound packet answers, if it is of a
/// kind that can answer one. `src_at`/`dst_at` are the outer addresses'
/// offsets, `l4` the transport header's; the caller has checked the IP header.
fn reply_key(
    pkt: &[u8],
    family: u8,
    src_at: usize,
    dst_at: usize,
    proto: u8,
    l4: usize,
) -> Option<FlowKey> {
    let key = |remote, local, remote_port, local_port, proto| FlowKey {
        remote,
        local,
        remote_port,
        local_port,
        proto,
        family,
        _pad: [0; 2],
    };
    let (remote, local) = (addr_at(pkt, src_at, family), addr_at(pkt, dst_at, family));
    let icmp = if family == FAMILY_V4 {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        if l4 + 4 > pkt.len() {
            return None;
        }
        return Some(key(remote, local, be16(pkt, l4), be16(pkt, l4 + 2), proto));
    }
    if proto != icmp || l4 + 8 > pkt.len() {
        return None;
    }
    let (echo_reply, errors): (u8, &[u8]) = if family == FAMILY_V4 {
        (0, &[3, 11])
    } else {
        (129, &[1, 2, 3])
    };
    let typ = pkt[l4];
    if typ == echo_reply {
        return Some(key(remote, local, 0, be16(pkt, l4 + 4), proto));
    }
    if !errors.contains(&typ) {
        return None;
    }
    // The embedded packet: one the node sent, so its source is the local end.
    let inner = l4 + 8;
    let (isrc, idst, iproto, il4) = if family == FAMILY_V4 {
        if inner + 20 > pkt.len() || pkt[inner] >> 4 != 4 {
            return None;
        }
        let ihl = ((pkt[inner] & 0xf) as usize) * 4;
        if ihl < 20 || be16(pkt, inner + 6) & 0x1fff != 0 {
            return None;
        }
        (inner + 12, inner + 16, pkt[inner + 9], inner + ihl)
    } else {
        if inner + 40 > pkt.len() || pkt[inner] >> 4 != 6 {
            return None;
        }
        (inner + 8, inner + 24, pkt[inner + 6], inner + 40)
    };
    if il4 + 8 > pkt.len() {
        return None;
    }
    let (local, remote) = (addr_at(pkt, isrc, family), addr_at(pkt, idst, family));
    let echo_request = if family == FAMILY_V4 { 8 } else { 128 };
    if iproto == IPPROTO_TCP || iproto == IPPROTO_UDP {
        Some(key(
            remote,
            local,
            be16(pkt, il4 + 2),
            be16(pkt, il4),
            iproto,
        ))
    } else if iproto == icmp && pkt[il4] == echo_request {
        Some(key(remote, local, 0, be16(pkt, il4 + 4), iproto))
    } else {
        None
    }
}

fn is_ext_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60)
}

fn classify_v6(
    pkt: &[u8],
    off: usize,
    overlay: &[OverlayRule],
    peers: &impl PeerLookup,
    flows: &impl FlowLookup,
) -> Reason {
    if off + 40 > pkt.len() || pkt[off] >> 4 != 6 {
        return Reason::Malformed;
    }
    let mut next = pkt[off + 6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&pkt[off + 8..off + 24]);
    let hop_limit = pkt[off + 7];
    let mut l4 = off + 40;
    let mut later_fragment = false;
    let mut fragmented = false;
    for _ in 0..MAX_EXT_HEADERS {
        if !is_ext_header(next) {
            break;
        }
        if next == 44 {
            // Fragment header: fixed 8 bytes; the offset is the top 13 bits of bytes 2..4.
            if l4 + 8 > pkt.len() {
                return Reason::Malformed;
            }
            later_fragment |= be16(pkt, l4 + 2) >> 3 != 0;
            fragmented = true;
            next = pkt[l4];
            l4 += 8;
        } else {
            if l4 + 2 > pkt.len() {
                return Reason::Malformed;
            }
            let len = if next == 51 {
                (pkt[l4 + 1] as usize + 2) * 4 // AH counts 4-byte units, minus 2
            } else {
                (pkt[l4 + 1] as usize + 1) * 8
            };
            next = pkt[l4];
            l4 += len;
        }
    }
    if is_ext_header(next) {
        return Reason::Malformed;
    }
    let mut ports = None;
    let mut icmp_type = None;
    if !later_fragment {
        if next == IPPROTO_TCP || next == IPPROTO_UDP {
            if l4 + 4 > pkt.len() {
                return Reason::Malformed;
            }
            ports = Some((be16(pkt, l4), be16(pkt, l4 + 2)));
        } else if next == IPPROTO_ICMPV6 {
            if l4 + 4 > pkt.len() {
                return Reason::Malformed;
            }
            icmp_type = Some(pkt[l4]);
        }
    }
    if overlay.iter().any(|r| r.matches(6, &src, next, ports)) {
        return Reason::Overlay;
    }
    if peers.is_peer_v6(src) {
        return Reason::Peer;
    }
    if matches!(icmp_type, Some(133..=137)) && hop_limit == 255 && !fragmented {
        return Reason::Neighbour;
    }
    if !later_fragment
        && let Some(k) = reply_key(pkt, FAMILY_V6, off + 8, off + 24, next, l4)
        && flows.is_live(&k)
    {
        return Reason::Reply;
    }
    Reason::DefaultDrop
}

/// What `firewall-ctl monitor` shows of a captured frame: its VLAN tags, and
/// the addresses, protocol and ports as far as the captured bytes go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    /// VLAN ids, outermost first.
    pub vlans: [Option<u16>; MAX_VLAN_TAGS],
    pub ethertype: u16,
    /// `FAMILY_V4` or `FAMILY_V6`; 0 for a frame that is not IP (or is cut
    /// before its addresses).
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The transport protocol (past IPv6 extension headers), if reached.
    pub proto: Option<u8>,
    /// TCP/UDP ports, or an ICMP type and code.
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp: Option<(u8, u8)>,
}

/// Decode what can be decoded of a (possibly truncated) frame. Never fails:
/// a malformed frame yields what precedes the damage.
pub fn headers(pkt: &[u8]) -> Headers {
    let mut h = Headers::default();
    if pkt.len() < 14 {
        return h;
    }
    let mut ethertype = be16(pkt, 12);
    let mut off = 14;
    for v in h.vlans.iter_mut() {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        if off + 4 > pkt.len() {
            return h;
        }
        *v = Some(be16(pkt, off) & 0x0fff);
        ethertype = be16(pkt, off + 2);
        off += 4;
    }
    h.ethertype = ethertype;
    let (proto, l4) = match ethertype {
        ETH_P_IP if off + 20 <= pkt.len() => {
            h.family = FAMILY_V4;
            h.src = addr_at(pkt, off + 12, FAMILY_V4);
            h.dst = addr_at(pkt, off + 16, FAMILY_V4);
            if be16(pkt, off + 6) & 0x1fff != 0 {
                h.proto = Some(pkt[off + 9]);
                return h;
            }
            (pkt[off + 9], off + ((pkt[off] & 0xf) as usize) * 4)
        }
        ETH_P_IPV6 if off + 40 <= pkt.len() => {
            h.family = FAMILY_V6;
            h.src = addr_at(pkt, off + 8, FAMILY_V6);
            h.dst = addr_at(pkt, off + 24, FAMILY_V6);
            let mut next = pkt[off + 6];
            let mut l4 = off + 40;
            for _ in 0..MAX_EXT_HEADERS {
                if !is_ext_header(next) || l4 + 8 > pkt.len() {
                    break;
                }
                let len = match next {
                    44 => 8,
                    51 => (pkt[l4 + 1] as usize + 2) * 4,
                    _ => (pkt[l4 + 1] as usize + 1) * 8,
                };
                next = pkt[l4];
                l4 += len;
            }
            (next, l4)
        }
        _ => return h,
    };
    if is_ext_header(proto) {
        return h;
    }
    h.proto = Some(proto);
    if l4 + 4 <= pkt.len() {
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            h.sport = Some(be16(pkt, l4));
            h.dport = Some(be16(pkt, l4 + 2));
        } else if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 {
            h.icmp = Some((pkt[l4], pkt[l4 + 1]));
        }
    }
    h
}
