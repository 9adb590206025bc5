//! The TC egress program: records each flow the node starts (TCP, UDP, ICMP
//! and ICMPv6 echo, IPv4 and IPv6, through up to two in-packet VLAN tags and
//! the common IPv6 extension headers) in `FLOWS`, so the XDP program can pass
//! its replies. It never drops or changes a packet.
//!
//! It reads through `bpf_skb_load_bytes` (`TcContext::load`), which copes
//! with non-linear socket buffers, rather than direct packet access.

use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::bpf_ktime_get_coarse_ns, macros::classifier, programs::TcContext,
};
use firewall_common::flow::{
    FAMILY_V4, FAMILY_V6, FLOW_REFRESH_NS, FlowKey, FlowVal, filter_slot, flow_hash,
};

use super::{
    CTRL, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, FLOW_FILTER, FLOWS, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

#[classifier]
pub fn egress(ctx: TcContext) -> i32 {
    let _ = record(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn be16_at(ctx: &TcContext, off: usize) -> Option<u16> {
    ctx.load::<[u8; 2]>(off).ok().map(u16::from_be_bytes)
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
        let h = ctx.load::<[u8; 20]>(off).ok()?;
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
        let h = ctx.load::<[u8; 40]>(off).ok()?;
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
                    let f = ctx.load::<[u8; 4]>(l4).ok()?;
                    if u16::from_be_bytes([f[2], f[3]]) >> 3 != 0 {
                        return None;
                    }
                    next = f[0];
                    l4 += 8;
                }
                0 | 43 | 60 | 51 => {
                    let e = ctx.load::<[u8; 2]>(l4).ok()?;
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
        let p = ctx.load::<[u8; 4]>(l4).ok()?;
        k.local_port = u16::from_be_bytes([p[0], p[1]]);
        k.remote_port = u16::from_be_bytes([p[2], p[3]]);
    } else if proto == icmp {
        let p = ctx.load::<[u8; 8]>(l4).ok()?;
        if p[0] != echo_request {
            return None;
        }
        k.local_port = u16::from_be_bytes([p[4], p[5]]);
    } else {
        return None;
    }
    // The same coarse clock the reply rule reads (see reply::live).
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let h = flow_hash(&k, &ctrl.hash_seed);
    if let Some(v) = FLOWS.get_ptr_mut(h) {
        // SAFETY: a pointer to this hash's value, valid for the program run;
        // the XDP side only reads it.
        let same = unsafe { (*v).key == k };
        if same {
            // Refreshed at most once per FLOW_REFRESH_NS, so a busy flow
            // does not write a shared cache line on every packet.
            // SAFETY: as above.
            unsafe {
                if now.wrapping_sub((*v).last_seen_ns) >= FLOW_REFRESH_NS {
                    core::ptr::write_volatile(&mut (*v).last_seen_ns, now);
                }
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
