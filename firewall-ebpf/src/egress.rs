//! The TC egress program: records each flow the node starts (TCP, UDP, ICMP
//! and ICMPv6 echo, IPv4 and IPv6, through up to two in-packet VLAN tags and
//! the common IPv6 extension headers) in `FLOWS`, so the XDP program can pass
//! its replies. It never drops or changes a packet.
//!
//! It reads headers straight from the socket buffer's linear part, where
//! the stack builds the headers it sends, and falls back to
//! `bpf_skb_load_bytes` (`TcContext::load`), which copes with paged data,
//! for any header that is not there (see `load`).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use firewall_common::flow::{
    FAMILY_V4, FAMILY_V6, FLOW_REFRESH_NS, FlowKey, FlowVal, filter_slot, flow_hash,
};

use super::{
    CTRL, EGRESS_CLOCK, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, FLOW_FILTER, FLOWS,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

#[classifier]
pub fn egress(ctx: TcContext) -> i32 {
    let _ = record(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn be16_at(ctx: &TcContext, off: usize) -> Option<u16> {
    load::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

/// `size_of::<T>()` bytes at `off`: straight from the packet when they are
/// in the socket buffer's linear part (the stack builds the headers it
/// sends there), else through `bpf_skb_load_bytes`, which copes with
/// paged data. The helper is a call and a copy: three or more of them per
/// packet were most of what recording cost (`cargo xtask bench datapath`).
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bytes lie within the linear data, just checked; every
        // caller reads a byte array, valid for any bits, read unaligned.
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    } else {
        ctx.load::<T>(off).ok()
    }
}

#[inline(always)]
fn record(ctx: &TcContext) -> Option<()> {
    let ctrl = CTRL.get(0)?;
    if ctrl.replies == 0 {
        return None;
    }
    let mut ethertype = be16_at(ctx, 12)?;
    let mut off = 14usize;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16_at(ctx, off + 2)?;
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = be16_at(ctx, off + 2)?;
            off += 4;
        }
    }
    let mut k = FlowKey::default();
    let (proto, l4, icmp, echo_request) = if ethertype == ETH_P_IP {
        let h = load::<[u8; 20]>(ctx, off)?;
        let ihl = ((h[0] & 0xf) as usize) * 4;
        // Later fragments carry no ports: the first fragment recorded the flow.
        if h[0] >> 4 != 4 || ihl < 20 || u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return None;
        }
        k.family = FAMILY_V4;
        k.local[..4].copy_from_slice(&h[12..16]);
        k.remote[..4].copy_from_slice(&h[16..20]);
        (h[9], off + ihl, IPPROTO_ICMP, 8u8)
    } else if ethertype == ETH_P_IPV6 {
        let h = load::<[u8; 40]>(ctx, off)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        k.family = FAMILY_V6;
        k.local.copy_from_slice(&h[8..24]);
        k.remote.copy_from_slice(&h[24..40]);
        let mut next = h[6];
        let mut l4 = off + 40;
        for _ in 0..4 {
            match next {
                44 => {
                    let f = load::<[u8; 4]>(ctx, l4)?;
                    if u16::from_be_bytes([f[2], f[3]]) >> 3 != 0 {
                        return None;
                    }
                    next = f[0];
                    l4 += 8;
                }
                0 | 43 | 60 | 51 => {
                    let e = load::<[u8; 2]>(ctx, l4)?;
                    l4 += if next == 51 {
                        (e[1] as usize + 2) * 4
                    } else {
                        (e[1] as usize + 1) * 8
                    };
                    next = e[0];
                }
                _ => break,
            }
        }
        (next, l4, IPPROTO_ICMPV6, 128u8)
    } else {
        return None;
    };
    k.proto = proto;
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        let p = load::<[u8; 4]>(ctx, l4)?;
        k.local_port = u16::from_be_bytes([p[0], p[1]]);
        k.remote_port = u16::from_be_bytes([p[2], p[3]]);
    } else if proto == icmp {
        let p = load::<[u8; 8]>(ctx, l4)?;
        if p[0] != echo_request {
            return None;
        }
        k.local_port = u16::from_be_bytes([p[4], p[5]]);
    } else {
        return None;
    }
    // The same coarse clock the reply rule reads, cached per tick the same
    // way (see clock.rs).
    let clock = EGRESS_CLOCK.get_ptr_mut(0)?;
    // SAFETY: this CPU's value, valid for the program run; per-CPU, so no
    // other program run touches it meanwhile.
    let now = unsafe { (*clock).now_ns() };
    let h = flow_hash(&k, &ctrl.hash_seed);
    if let Some(v) = FLOWS.get_ptr_mut(h) {
        // SAFETY: a pointer to this hash's value, valid for the program run;
        // the XDP side only reads it.
        let same = unsafe { (*v).key == k };
        if same {
            // Refreshed at most once per FLOW_REFRESH_NS, so a busy flow
            // does not write a shared cache line on every packet.
            // SAFETY: as above.
            let stale = unsafe { now.wrapping_sub((*v).last_seen_ns) >= FLOW_REFRESH_NS };
            if stale {
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(&mut (*v).last_seen_ns, now) };
                // The filter bytes again, with the refresh: nothing should
                // ever have cleared them, but if anything did, a flow that
                // is in use gets them back within a second.
                mark(h, ctrl.flow_filter_lines);
            }
            return Some(());
        }
        // Another flow with the same 64-bit hash: the newer one takes the
        // entry (the older one's replies drop until it speaks again).
    }
    if FLOWS
        .insert(
            h,
            FlowVal {
                key: k,
                first_seen_ns: now,
                last_seen_ns: now,
            },
            0,
        )
        .is_ok()
    {
        // After the insert, before the packet leaves: see FilterLine.
        mark(h, ctrl.flow_filter_lines);
    }
    Some(())
}

/// Set `h`'s byte in both halves of `FLOW_FILTER`.
#[inline(always)]
fn mark(h: u64, lines: u32) {
    if lines == 0 {
        return;
    }
    for half in 0..2 {
        let (line, byte) = filter_slot(h, lines, half);
        if let Some(l) = FLOW_FILTER.get_ptr_mut(line) {
            // SAFETY: a pointer to this line's value, valid for the program
            // run; `byte` < 64. A one-byte store: another CPU setting
            // another byte of the line cannot undo it.
            unsafe { core::ptr::write_volatile(&mut (*l).bytes[byte], 1) };
        }
    }
}
