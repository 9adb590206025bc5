//! The reply rule: an inbound packet that nothing else passed passes if it
//! answers one of the node's own live flows (recorded by [`super::egress`]).
//! Runs only on the would-drop path, so peers and the overlay never pay for
//! it. `firewall_common::classify` states the same rule over a byte slice.

use aya_ebpf::programs::XdpContext;
use firewall_common::{
    Control,
    flow::{FAMILY_V4, FAMILY_V6, FlowKey, filter_slot, flow_hash, timeout_index},
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use super::{
    CTRL, FLOW_FILTER, FLOWS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, PARSED, be16,
    clock::Clock, ptr_at,
};

/// What classify learned of a packet it is about to drop: where its IP and
/// transport headers are, its protocol and family. Kept in a per-CPU map
/// rather than returned, so the verifier sees the reply rule's inputs as
/// plain unknown numbers and verifies it once (see `firewall`).
#[repr(C)]
pub(super) struct Parsed {
    l3: u32,
    l4: u32,
    proto: u32,
    /// 4 or 6; 0 when the packet cannot be a reply (a later fragment).
    family: u32,
    /// The packet's length, so a stale record (left by another packet) is
    /// never taken for this one's.
    len: u32,
    _pad: u32,
    /// This CPU's last reading of the coarse clock.
    clock: Clock,
}

#[inline(always)]
pub(super) fn remember(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    proto: u8,
    later_fragment: bool,
    family: u8,
) {
    if let Some(p) = PARSED.get_ptr_mut(0) {
        // SAFETY: this CPU's record, valid for the program run.
        // Field by field: the clock cache stays.
        unsafe {
            (*p).l3 = l3 as u32;
            (*p).l4 = l4 as u32;
            (*p).proto = proto as u32;
            (*p).family = if later_fragment { 0 } else { family as u32 };
            (*p).len = (ctx.data_end() - ctx.data()) as u32;
        };
    }
}

/// The reply rule for a packet classify would drop.
#[inline(always)]
pub(super) fn check<const FREE_PROBE: bool>(ctx: &XdpContext) -> bool {
    let Some(ctrl) = CTRL.get(0) else {
        return false;
    };
    if ctrl.replies == 0 {
        return false;
    }
    let Some(p) = PARSED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's record, valid for the program run; per-CPU, so no
    // other program run touches it meanwhile.
    let p = unsafe { &mut *p };
    if p.len != (ctx.data_end() - ctx.data()) as u32 {
        return false;
    }
    // Bounds for the verifier (and for any record): headers start within
    // the first 64 bytes, transport headers within the first 4 KiB (an XDP
    // frame is at most a page). The verifier only trusts a packet bounds
    // check whose offset it knows to be below 64 KiB, inner headers included.
    let (l3, l4) = (p.l3 as usize, p.l4 as usize);
    if l3 > 64 || l4 > 4096 {
        return false;
    }
    let proto = p.proto as u8;
    match p.family {
        4 => reply_v4::<FREE_PROBE>(ctx, ctrl, p, l3, l4, proto),
        6 => reply_v6::<FREE_PROBE>(ctx, ctrl, p, l3, l4, proto),
        _ => false,
    }
}

/// Is `key` recorded and not idle past its protocol's timeout?
///
/// `FREE_PROBE` (the benchmark's copy only, never shipped: it would pass
/// strangers whose hash shares a set filter byte) stops after the filter
/// byte, as if the flow table's lookup, key compare and liveness check cost
/// nothing: the bound on what any flow table could make a reply hit cost
/// while peers are checked first. The benchmark runs it with the filter on.
#[inline(always)]
fn live<const FREE_PROBE: bool>(ctrl: &Control, rec: &mut Parsed, key: &FlowKey) -> bool {
    let h = flow_hash(key, &ctrl.hash_seed);
    let lines = ctrl.flow_filter_lines;
    if lines != 0 {
        // SAFETY: `ctrl` is a valid reference into the CTRL array value; the
        // controller flips this word alone, with one aligned store, after
        // writing the half it names (x86 loads are acquires, see
        // `generation_of`).
        let half = unsafe { core::ptr::read_volatile(&ctrl.flow_filter_half) };
        let (line, byte) = filter_slot(h, lines, half);
        // Not in FLOWS (see FilterLine): no lookup needed.
        match FLOW_FILTER.get(line) {
            Some(l) if l.bytes[byte] != 0 => {}
            _ => return false,
        }
    }
    if FREE_PROBE {
        return true;
    }
    let Some(v) = FLOWS.get_ptr(h) else {
        return false;
    };
    // SAFETY: as below; the key is written only when the entry is created.
    let stored = unsafe { (*v).key.words() };
    let want = key.words();
    if stored[0] != want[0]
        || stored[1] != want[1]
        || stored[2] != want[2]
        || stored[3] != want[3]
        || stored[4] != want[4]
    {
        return false;
    }
    // SAFETY: a pointer to the map value for this key, valid for the program
    // run; the egress program may store a newer time concurrently (an aligned
    // 8-byte store), which a volatile read sees whole.
    let last = unsafe { core::ptr::read_volatile(&(*v).last_seen_ns) };
    let now = rec.clock.now_ns();
    // A flow refreshed after `now` was read is live.
    now <= last || now - last <= ctrl.flow_timeout_ns[timeout_index(key.proto)]
}

#[inline(always)]
fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut w = [0u8; 16];
    w[0] = a[0];
    w[1] = a[1];
    w[2] = a[2];
    w[3] = a[3];
    w
}

#[inline(always)]
fn key(family: u8, proto: u8, remote: [u8; 16], local: [u8; 16]) -> FlowKey {
    FlowKey {
        remote,
        local,
        remote_port: 0,
        local_port: 0,
        proto,
        family,
        _pad: [0; 2],
    }
}

/// IPv4: the IP header at `off` (checked by classify), the transport header
/// at `l4`.
#[inline(always)]
fn reply_v4<const FREE_PROBE: bool>(
    ctx: &XdpContext,
    ctrl: &Control,
    rec: &mut Parsed,
    off: usize,
    l4: usize,
    proto: u8,
) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return false;
    };
    // SAFETY: `ip` came from ptr_at, bounds-checked against the packet end.
    let ip = unsafe { &*ip };
    let mut k = key(FAMILY_V4, proto, v4(ip.src_addr), v4(ip.dst_addr));
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        let Some(p) = ptr_at::<[u8; 4]>(ctx, l4) else {
            return false;
        };
        // SAFETY: `p` came from ptr_at, bounds-checked against the packet end.
        let p = unsafe { *p };
        k.remote_port = be16([p[0], p[1]]);
        k.local_port = be16([p[2], p[3]]);
        return live::<FREE_PROBE>(ctrl, rec, &k);
    }
    if proto != IPPROTO_ICMP {
        return false;
    }
    let Some(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
        return false;
    };
    // SAFETY: `h` came from ptr_at, bounds-checked against the packet end.
    let h = unsafe { *h };
    if h[0] == 0 {
        // Echo reply: the identifier is the flow's local port.
        k.local_port = be16([h[4], h[5]]);
        return live::<FREE_PROBE>(ctrl, rec, &k);
    }
    if h[0] != 3 && h[0] != 11 {
        return false;
    }
    // Destination unreachable (fragmentation needed included) or time
    // exceeded: the embedded header is a packet the node sent.
    let inner = l4 + 8;
    let Some(iip) = ptr_at::<Ipv4Hdr>(ctx, inner) else {
        return false;
    };
    // SAFETY: `iip` came from ptr_at, bounds-checked against the packet end.
    let iip = unsafe { &*iip };
    let vihl = iip.vihl;
    let iihl = ((vihl & 0xf) as usize) * 4;
    if vihl >> 4 != 4 || iihl < Ipv4Hdr::LEN || be16(iip.frags) & 0x1fff != 0 {
        return false;
    }
    let Some(t) = ptr_at::<[u8; 8]>(ctx, inner + iihl) else {
        return false;
    };
    // SAFETY: `t` came from ptr_at, bounds-checked against the packet end.
    let t = unsafe { *t };
    let iproto = iip.proto;
    k = key(FAMILY_V4, iproto, v4(iip.dst_addr), v4(iip.src_addr));
    inner_ports(&mut k, iproto, t, IPPROTO_ICMP, 8) && live::<FREE_PROBE>(ctrl, rec, &k)
}

/// The flow's ports from the first 8 bytes of an embedded transport header.
#[inline(always)]
fn inner_ports(k: &mut FlowKey, iproto: u8, t: [u8; 8], icmp: u8, echo_request: u8) -> bool {
    if iproto == IPPROTO_TCP || iproto == IPPROTO_UDP {
        k.local_port = be16([t[0], t[1]]);
        k.remote_port = be16([t[2], t[3]]);
        true
    } else if iproto == icmp && t[0] == echo_request {
        k.local_port = be16([t[4], t[5]]);
        true
    } else {
        false
    }
}

/// IPv6: the IP header at `off` (checked by the caller), the transport
/// header at `l4` past any extension headers, of protocol `next`.
#[inline(always)]
fn reply_v6<const FREE_PROBE: bool>(
    ctx: &XdpContext,
    ctrl: &Control,
    rec: &mut Parsed,
    off: usize,
    l4: usize,
    next: u8,
) -> bool {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return false;
    };
    // SAFETY: `ip` came from ptr_at, bounds-checked against the packet end.
    let ip = unsafe { &*ip };
    let mut k = key(FAMILY_V6, next, ip.src_addr, ip.dst_addr);
    if next == IPPROTO_TCP || next == IPPROTO_UDP {
        let Some(p) = ptr_at::<[u8; 4]>(ctx, l4) else {
            return false;
        };
        // SAFETY: `p` came from ptr_at, bounds-checked against the packet end.
        let p = unsafe { *p };
        k.remote_port = be16([p[0], p[1]]);
        k.local_port = be16([p[2], p[3]]);
        return live::<FREE_PROBE>(ctrl, rec, &k);
    }
    if next != IPPROTO_ICMPV6 {
        return false;
    }
    let Some(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
        return false;
    };
    // SAFETY: `h` came from ptr_at, bounds-checked against the packet end.
    let h = unsafe { *h };
    if h[0] == 129 {
        k.local_port = be16([h[4], h[5]]);
        return live::<FREE_PROBE>(ctrl, rec, &k);
    }
    // Destination unreachable, packet too big, time exceeded.
    if h[0] != 1 && h[0] != 2 && h[0] != 3 {
        return false;
    }
    let inner = l4 + 8;
    let Some(iip) = ptr_at::<Ipv6Hdr>(ctx, inner) else {
        return false;
    };
    // SAFETY: `iip` came from ptr_at, bounds-checked against the packet end.
    let iip = unsafe { &*iip };
    if iip.vcf[0] >> 4 != 6 {
        return false;
    }
    let Some(t) = ptr_at::<[u8; 8]>(ctx, inner + Ipv6Hdr::LEN) else {
        return false;
    };
    // SAFETY: `t` came from ptr_at, bounds-checked against the packet end.
    let t = unsafe { *t };
    let iproto = iip.next_hdr;
    k = key(FAMILY_V6, iproto, iip.dst_addr, iip.src_addr);
    inner_ports(&mut k, iproto, t, IPPROTO_ICMPV6, 128) && live::<FREE_PROBE>(ctrl, rec, &k)
}
