//! Benchmark baselines, compiled only with the `bench` feature (the lab's
//! object). They share the firewall's maps and helpers so a benchmark measures
//! them in the same object and the same run as `firewall`.

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    btf_maps::HashMap,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use network_types::eth::EthHdr;

use super::ptr_at;

const BPF_F_NO_PREALLOC: usize = 1;

// Only for the `lookup_floor` benchmark baseline: a kernel hash map of sources.
#[btf_map]
static HASH_FLOOR: HashMap<[u8; 4], u32, 16_384, BPF_F_NO_PREALLOC> = HashMap::new();

/// The benchmark floor: the cheapest possible XDP program, measured in the same
/// run as `firewall` so ratios survive machine drift.
#[xdp]
pub fn pass_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark baseline: parse nothing but the IPv4 source at a fixed offset and
/// do one `BPF_MAP_TYPE_HASH` lookup of it: what any source filter built on the
/// kernel's hash map costs at least, shown next to ours in the benchmark.
#[xdp]
pub fn lookup_floor(ctx: XdpContext) -> u32 {
    let Some(p) = ptr_at::<[u8; 4]>(&ctx, EthHdr::LEN + 12) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: `p` came from ptr_at, which checked it lies within the packet.
    if HASH_FLOOR.get_ptr(unsafe { &*p }).is_some() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

// The IPv6 counterpart of `lookup_floor`: one hash lookup of the 16-byte
// source at a fixed offset.
#[btf_map]
static HASH_FLOOR6: HashMap<[u8; 16], u32, 16_384, BPF_F_NO_PREALLOC> = HashMap::new();

/// Benchmark baseline: what any IPv6 source filter built on the kernel's hash
/// map costs at least.
#[xdp]
pub fn lookup_floor6(ctx: XdpContext) -> u32 {
    let Some(p) = ptr_at::<[u8; 16]>(&ctx, EthHdr::LEN + 8) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: `p` came from ptr_at, which checked it lies within the packet.
    if HASH_FLOOR6.get_ptr(unsafe { &*p }).is_some() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// The firewall with the flow table's probe made free (see `reply::live`):
/// the benchmark runs it on reply frames to show the least a reply hit
/// could cost while peers are checked first, whatever the flow table.
/// Never in the shipped object: it passes any packet whose flow hash meets
/// a set filter byte.
#[xdp]
pub fn reply_free_probe(ctx: XdpContext) -> u32 {
    super::verdict::<true>(&ctx)
}

/// The egress benchmark's floor: the cheapest TC program, run the same way
/// as `egress` (both unattached: a socket-buffer test run calls either
/// through the same indirect call, with no dispatcher).
#[classifier]
pub fn tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
