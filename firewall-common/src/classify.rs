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
//! 6. Everything else: **DefaultDrop**.

use crate::{OverlayRule, Reason};

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

/// The peer set as the classifier sees it.
pub trait PeerLookup {
    fn is_peer_v4(&self, src: [u8; 4]) -> bool;
    fn is_peer_v6(&self, src: [u8; 16]) -> bool;
}

fn be16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

/// Classify one Ethernet frame.
pub fn classify(pkt: &[u8], overlay: &[OverlayRule], peers: &impl PeerLookup) -> Reason {
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
        ETH_P_IP => classify_v4(pkt, off, overlay, peers),
        ETH_P_IPV6 => classify_v6(pkt, off, overlay, peers),
        _ => Reason::NonIp,
    }
}

fn classify_v4(pkt: &[u8], off: usize, overlay: &[OverlayRule], peers: &impl PeerLookup) -> Reason {
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
    Reason::DefaultDrop
}

fn is_ext_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60)
}

fn classify_v6(pkt: &[u8], off: usize, overlay: &[OverlayRule], peers: &impl PeerLookup) -> Reason {
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
    Reason::DefaultDrop
}
