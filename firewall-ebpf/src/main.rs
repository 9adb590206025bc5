//! The XDP firewall.
//!
//! Verdict order (the reference classifier in `firewall_common::classify` states
//! the same rules over a byte slice and is differentially tested against this):
//! malformed -> drop; non-IP -> pass; compiled-in overlay -> pass; committed
//! peer (exact or CIDR) -> pass; IPv6 neighbour discovery -> pass; a reply to
//! one of the node's own live flows, or an ICMP error about one -> pass
//! ([`reply`]); else drop.
//!
//! Beside it: the TC egress program that records those flows ([`egress`]),
//! and the drop path's events and observe policy ([`events`]). The pass path
//! touches none of them.
//!
//! Every packet-touching helper is `#[inline(always)]`: a non-inlined helper
//! taking the context makes LLVM pass `data_end` in a register that the verifier
//! then refuses to do arithmetic on.
#![no_std]
#![no_main]

mod clock;
mod egress;
mod events;
mod reply;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use firewall_common::{
    Bucket4, Bucket6, CidrVal, Control, Counters, DEFAULT_MAX_PEERS, MAX_CIDRS, MAX_PROBE,
    OVERLAY_MAGIC, OverlayRule, OverlayTable, PEERS_PER_BUCKET, Reason, SLOTS,
    flow::{
        DEFAULT_MAX_FLOWS, DropEvent, EventBucket, FAMILY_V4, FAMILY_V6, FilterLine, FlowVal,
        filter_lines_for,
    },
    hash4, hash6,
};

// `firewall()` indexes the counters by reason; pin the enum to that order.
const _: () = {
    assert!(Reason::Overlay as u32 == 0 && Reason::Peer as u32 == 1);
    assert!(Reason::NonIp as u32 == 2 && Reason::Neighbour as u32 == 3);
    assert!(Reason::Reply as u32 == 4);
    assert!(Reason::DefaultDrop as u32 == 5 && Reason::Malformed as u32 == 6);
    assert!(core::mem::size_of::<Counters>() == 8 * COUNTER_SLOTS);
};
/// `Counters` is this many u64s, indexed by reason (and see events.rs).
const COUNTER_SLOTS: usize = 11;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

// overlay_v4() and overlay_v6(): the compiled-in allowlist as straight-line
// compares, and OVERLAY_TABLE, its read-back copy in .rodata.
include!(concat!(env!("OUT_DIR"), "/overlay.rs"));

const BPF_F_MMAPABLE: usize = 1 << 10;

const DEFAULT_BUCKETS: usize = (DEFAULT_MAX_PEERS / PEERS_PER_BUCKET) as usize;

// Exact peers: bucketed hash tables in mmapable arrays (why, and the slot
// protocol, in firewall_common::SLOTS and firewall_ctl::table). The size here
// is the default; attach sets it from --max-peers and CTRL.bucket_mask says it.
#[btf_map]
static PEERS_V4: Array<Bucket4, DEFAULT_BUCKETS, BPF_F_MMAPABLE> = Array::new();
#[btf_map]
static PEERS_V6: Array<Bucket6, DEFAULT_BUCKETS, BPF_F_MMAPABLE> = Array::new();
// CIDR peers: two tries per family, the live one is `committed_gen & 1`.
#[btf_map]
static CIDR4_0: LpmTrie<[u8; 4], CidrVal, { MAX_CIDRS as usize }> = LpmTrie::new();
#[btf_map]
static CIDR4_1: LpmTrie<[u8; 4], CidrVal, { MAX_CIDRS as usize }> = LpmTrie::new();
#[btf_map]
static CIDR6_0: LpmTrie<[u8; 16], CidrVal, { MAX_CIDRS as usize }> = LpmTrie::new();
#[btf_map]
static CIDR6_1: LpmTrie<[u8; 16], CidrVal, { MAX_CIDRS as usize }> = LpmTrie::new();
// The committed generation. MMAPABLE so userspace flips it with one atomic store.
#[btf_map]
static CTRL: Array<Control, 1, BPF_F_MMAPABLE> = Array::new();
#[btf_map]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();
// The node's own flows, written by the TC egress program, read by the reply
// rule, keyed by `flow_hash` (the value holds the whole flow, compared on
// every lookup). LRU: a full table forgets the least recently used flow. Its
// size is the default; attach sets it from --max-flows.
#[btf_map]
static FLOWS: LruHashMap<u64, FlowVal, { DEFAULT_MAX_FLOWS as usize }> = LruHashMap::new();
// Which flow hashes may be in FLOWS, two halves (see
// firewall_common::flow::FilterLine). Sized for the default capacity here;
// attach sizes it from --max-flows, and CTRL.flow_filter_lines says it.
#[btf_map]
static FLOW_FILTER: Array<
    FilterLine,
    { 2 * filter_lines_for(DEFAULT_MAX_FLOWS) as usize },
    BPF_F_MMAPABLE,
> = Array::new();
// Where classify left off for a packet it would drop (see reply::remember).
#[btf_map]
static PARSED: PerCpuArray<reply::Parsed, 1> = PerCpuArray::new();
// The egress program's per-CPU reading of the coarse clock (see clock.rs;
// the reply rule keeps its own in PARSED).
#[btf_map]
static EGRESS_CLOCK: PerCpuArray<clock::Clock, 1> = PerCpuArray::new();
// Drop events for `firewall-ctl monitor`: 1 MiB holds about 6,000 of them.
#[btf_map]
static EVENTS: RingBuf<DropEvent, { 1 << 20 }> = RingBuf::new();
// The events' per-CPU token buckets.
#[btf_map]
static EVENT_BUCKET: PerCpuArray<EventBucket, 1> = PerCpuArray::new();

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

#[xdp]
pub fn firewall(ctx: XdpContext) -> u32 {
    verdict::<false>(&ctx)
}

/// The firewall's verdict. `FREE_PROBE` is true only in the benchmark's
/// bound-measuring copy (`bench::reply_free_probe`, see `reply::live`); the
/// shipped object instantiates `false` alone.
#[inline(always)]
fn verdict<const FREE_PROBE: bool>(ctx: &XdpContext) -> u32 {
    let mut reason = classify(ctx);
    // The reply rule runs here, after classify has returned, not inside its
    // parse paths: at this point only the reason is live, so the verifier
    // checks the rule once instead of once per parse path (inside classify
    // it exceeded the verifier's 1M-instruction budget).
    if reason as u32 == Reason::DefaultDrop as u32 && reply::check::<FREE_PROBE>(ctx) {
        reason = Reason::Reply;
    }
    if reason as u32 <= Reason::Reply as u32 {
        count(reason as usize);
        xdp_action::XDP_PASS
    } else {
        if reason as u32 == Reason::Malformed as u32 {
            anchor_overlay_table();
        }
        events::drop_path(ctx, reason)
    }
}

/// Add one to this CPU's counter `idx` (`Counters` as u64s: the reason is
/// the index, so one add instead of a branch per reason). Per-CPU: no atomics.
#[inline(always)]
fn count(idx: usize) {
    if idx >= COUNTER_SLOTS {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: `c` is this CPU's Counters value, `idx` < its u64 count.
        unsafe { *(c as *mut u64).add(idx) += 1 };
    }
}

// The benchmark baselines (`pass_floor`, `lookup_floor`) are built only
// with the `bench` feature, into the lab's object: the shipped object holds
// the firewall alone.
#[cfg(feature = "bench")]
mod bench;

/// One load from the read-back overlay table, so the verifier lists its
/// `.rodata` map among the program's maps and `status` can find it there. It
/// sits on the malformed path, which is cold.
#[inline(always)]
fn anchor_overlay_table() {
    // SAFETY: a read of a static's field; volatile only so the table is kept.
    unsafe { core::ptr::read_volatile(&OVERLAY_TABLE.count) };
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Reason {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Reason::Malformed;
    };
    // SAFETY: `eth` came from ptr_at, bounds-checked against the packet end.
    let mut ethertype = u16::from_be(unsafe { (*eth).ether_type });
    let mut off = EthHdr::LEN;
    // Up to two tags (802.1Q, or 802.1ad outer + 802.1Q inner), unrolled.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(t) = ptr_at::<[u8; 4]>(ctx, off) else {
            return Reason::Malformed;
        };
        // SAFETY: `t` came from ptr_at, bounds-checked against the packet end.
        ethertype = be16(unsafe { [(*t)[2], (*t)[3]] });
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(t) = ptr_at::<[u8; 4]>(ctx, off) else {
                return Reason::Malformed;
            };
            // SAFETY: `t` came from ptr_at, bounds-checked against the packet end.
            ethertype = be16(unsafe { [(*t)[2], (*t)[3]] });
            off += 4;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return Reason::Malformed;
            }
        }
    }
    match ethertype {
        ETH_P_IP => classify_v4(ctx, off),
        ETH_P_IPV6 => classify_v6(ctx, off),
        _ => Reason::NonIp,
    }
}

#[inline(always)]
fn committed() -> Option<&'static Control> {
    CTRL.get(0)
}

/// The committed generation, read once per packet, explicitly: the exact
/// lookup and the CIDR slot choice must judge the packet by the same
/// generation, and a plain field read may be repeated or moved by the
/// compiler. A volatile load is one 8-byte load; on x86-64 every load is an
/// acquire, so the buckets read after it are at least as new as the flip
/// (userspace stores the generation with Release). firewall-ctl refuses to
/// build for other architectures, where this would need a load-acquire.
#[inline(always)]
fn generation_of(ctrl: &Control) -> u64 {
    // SAFETY: `ctrl` is a valid reference into the CTRL array value.
    unsafe { core::ptr::read_volatile(&ctrl.committed_gen) }
}

// The exact-peer lookups. The generation is read (once) before any bucket, so a
// slot that userspace is writing for the staged generation (committed + 1) is
// invisible to this packet however its fields interleave with our reads. Keys
// are compared as whole words: the buckets are 8-byte aligned array values,
// so `addr[i]` is 4-aligned (v4) or 8-aligned (v6).

/// Count a hit once per tick (see `PeerVal::hits`): a read of the slot,
/// which the key compare has just brought into this CPU's cache, and a
/// write only when the tick has moved on, so CPUs sharing a peer do not
/// pass its cache line back and forth on every packet.
#[inline(always)]
fn count_hit(p: &mut firewall_common::PeerVal) {
    // SAFETY: bpf_jiffies64 has no preconditions (the verifier inlines it
    // as a load of jiffies).
    let tick = unsafe { aya_ebpf::helpers::bpf_jiffies64() } as u32;
    if p.hit_tick != tick {
        p.hit_tick = tick;
        p.hits += 1;
    }
}

#[inline(always)]
fn peer_v4(ctrl: &Control, generation: u64, word: u32) -> bool {
    let mask = ctrl.bucket_mask[0];
    let mut b = hash4(word, &ctrl.hash_seed);
    for _ in 0..MAX_PROBE {
        let Some(bucket) = PEERS_V4.get_ptr_mut(b & mask) else {
            return false;
        };
        // SAFETY: a pointer into the array map's value for this index, valid for
        // the program run; concurrent userspace writes are single aligned words.
        let bucket = unsafe { &mut *bucket };
        for i in 0..SLOTS {
            // SAFETY: addr[i] is 4 bytes at a 4-aligned offset of the bucket.
            let k = unsafe { core::ptr::read(bucket.addr[i].as_ptr() as *const u32) };
            if k == word && bucket.peer[i].visible_at(generation) {
                count_hit(&mut bucket.peer[i]);
                return true;
            }
        }
        if bucket.spill == 0 {
            return false;
        }
        b = b.wrapping_add(1);
    }
    false
}

#[inline(always)]
fn peer_v6(ctrl: &Control, generation: u64, hi: u64, lo: u64) -> bool {
    let mask = ctrl.bucket_mask[1];
    // The BPF target is little-endian: the low half of a native u64 load is
    // the first 4 bytes, as `firewall_common::words6` takes them.
    let mut b = hash6(
        [hi as u32, (hi >> 32) as u32, lo as u32, (lo >> 32) as u32],
        &ctrl.hash_seed,
    );
    for _ in 0..MAX_PROBE {
        let Some(bucket) = PEERS_V6.get_ptr_mut(b & mask) else {
            return false;
        };
        // SAFETY: a pointer into the array map's value for this index, valid for
        // the program run; concurrent userspace writes are single aligned words.
        let bucket = unsafe { &mut *bucket };
        for i in 0..SLOTS {
            let k = bucket.addr[i].as_ptr() as *const u64;
            // SAFETY: addr[i] is 16 bytes at an 8-aligned offset: two aligned words.
            let (k_hi, k_lo) = unsafe { (core::ptr::read(k), core::ptr::read(k.add(1))) };
            if k_hi == hi && k_lo == lo && bucket.peer[i].visible_at(generation) {
                count_hit(&mut bucket.peer[i]);
                return true;
            }
        }
        if bucket.spill == 0 {
            return false;
        }
        b = b.wrapping_add(1);
    }
    false
}

#[inline(always)]
fn classify_v4(ctx: &XdpContext, off: usize) -> Reason {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
        return Reason::Malformed;
    };
    // SAFETY: `ip` came from ptr_at, bounds-checked against the packet end.
    let ip = unsafe { &*ip };
    let vihl = ip.vihl;
    let ihl = ((vihl & 0xf) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || (be16(ip.tot_len) as usize) < ihl {
        return Reason::Malformed;
    }
    if ctx.data() + off + ihl > ctx.data_end() {
        return Reason::Malformed;
    }
    let later_fragment = be16(ip.frags) & 0x1fff != 0;
    let proto = ip.proto;
    // One 4-byte load instead of four byte loads: packet memory has no alignment
    // requirement for the verifier, and `read_unaligned` keeps Rust honest.
    // SAFETY: src_addr is 4 bytes inside the bounds-checked IPv4 header.
    let src_raw =
        unsafe { core::ptr::read_unaligned(core::ptr::addr_of!(ip.src_addr) as *const u32) };
    let src_bytes = src_raw.to_ne_bytes();
    let mut l4 = None;
    if !later_fragment && (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        let Some(p) = ptr_at::<[u8; 4]>(ctx, off + ihl) else {
            return Reason::Malformed;
        };
        l4 = Some(p);
    }
    if overlay_v4(u32::from_be(src_raw), proto, l4) {
        return Reason::Overlay;
    }
    let Some(ctrl) = committed() else {
        return Reason::DefaultDrop;
    };
    let generation = generation_of(ctrl);
    if peer_v4(ctrl, generation, src_raw) {
        return Reason::Peer;
    }
    let key = Key::new(32, src_bytes);
    let hit = if generation & 1 == 0 {
        if ctrl.cidr4_count[0] == 0 {
            None
        } else {
            CIDR4_0.get(&key)
        }
    } else if ctrl.cidr4_count[1] == 0 {
        None
    } else {
        CIDR4_1.get(&key)
    };
    if hit.is_some() {
        return Reason::Peer;
    }
    reply::remember(ctx, off, off + ihl, proto, later_fragment, FAMILY_V4);
    Reason::DefaultDrop
}

#[inline(always)]
fn classify_v6(ctx: &XdpContext, off: usize) -> Reason {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return Reason::Malformed;
    };
    // SAFETY: `ip` came from ptr_at, bounds-checked against the packet end.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Reason::Malformed;
    }
    let mut next = ip.next_hdr;
    let mut l4 = off + Ipv6Hdr::LEN;
    let mut later_fragment = false;
    let mut fragmented = false;
    // Bounded walk over the common extension headers; each length is at most
    // 2 KiB, so the offset stays within what the verifier accepts.
    for _ in 0..4 {
        match next {
            44 => {
                let Some(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
                    return Reason::Malformed;
                };
                // SAFETY: `h` came from ptr_at, bounds-checked against the packet end.
                let h = unsafe { *h };
                later_fragment |= be16([h[2], h[3]]) >> 3 != 0;
                fragmented = true;
                next = h[0];
                l4 += 8;
            }
            0 | 43 | 60 | 51 => {
                let Some(h) = ptr_at::<[u8; 2]>(ctx, l4) else {
                    return Reason::Malformed;
                };
                // SAFETY: `h` came from ptr_at, bounds-checked against the packet end.
                let h = unsafe { *h };
                let len = if next == 51 {
                    (h[1] as usize + 2) * 4
                } else {
                    (h[1] as usize + 1) * 8
                };
                next = h[0];
                l4 += len;
            }
            _ => break,
        }
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        return Reason::Malformed;
    }
    let mut ports = None;
    let mut icmp = None;
    if !later_fragment && (next == IPPROTO_TCP || next == IPPROTO_UDP || next == IPPROTO_ICMPV6) {
        let Some(p) = ptr_at::<[u8; 4]>(ctx, l4) else {
            return Reason::Malformed;
        };
        if next == IPPROTO_ICMPV6 {
            icmp = Some(p)
        } else {
            ports = Some(p)
        }
    }
    let src_ptr = core::ptr::addr_of!(ip.src_addr) as *const u64;
    // Decide neighbour discovery now, while the ICMPv6 header pointer is at
    // hand: past this point only scalars are live, so the verifier can prune
    // every parse path that reaches the peer lookup as one state instead of
    // walking the lookup's unrolled compares once per path.
    // Neighbour discovery is only itself with hop limit 255 (RFC 4861: it
    // cannot have crossed a router) and unfragmented (RFC 6980); otherwise
    // any host anywhere could send those types through.
    let neighbour = match icmp {
        // SAFETY: `p` came from ptr_at: 4 bytes of ICMPv6 header within the packet.
        Some(p) => (133..=137).contains(&unsafe { (*p)[0] }) && ip.hop_limit == 255 && !fragmented,
        None => false,
    };
    // SAFETY: src_ptr is the 16-byte source address inside the checked header.
    let hi_ne = unsafe { core::ptr::read_unaligned(src_ptr) };
    // SAFETY: the second half of the same 16-byte address.
    let lo_ne = unsafe { core::ptr::read_unaligned(src_ptr.add(1)) };
    if overlay_v6(u64::from_be(hi_ne), u64::from_be(lo_ne), next, ports) {
        return Reason::Overlay;
    }
    if let Some(ctrl) = committed() {
        let generation = generation_of(ctrl);
        if peer_v6(ctrl, generation, hi_ne, lo_ne) {
            return Reason::Peer;
        }
        // Built only when a trie is in use, from the words already loaded:
        // `Key` is packed, and copying the address into it from the packet
        // compiled to a call of a byte-at-a-time `memmove` subprogram, 16
        // iterations on every IPv6 packet the peers did not pass (about
        // 15 ns, most of a v6 miss).
        let key = || Key6 {
            prefix_len: 128,
            data: [
                hi_ne as u32,
                (hi_ne >> 32) as u32,
                lo_ne as u32,
                (lo_ne >> 32) as u32,
            ],
        };
        let hit = if generation & 1 == 0 {
            if ctrl.cidr6_count[0] == 0 {
                None
            } else {
                CIDR6_0.get(key().as_key())
            }
        } else if ctrl.cidr6_count[1] == 0 {
            None
        } else {
            CIDR6_1.get(key().as_key())
        };
        if hit.is_some() {
            return Reason::Peer;
        }
    }
    if neighbour {
        return Reason::Neighbour;
    }
    reply::remember(ctx, off, l4, next, later_fragment, FAMILY_V6);
    Reason::DefaultDrop
}

/// An IPv6 LPM key with the layout of aya's packed `Key<[u8; 16]>` (the
/// prefix length, then the address's bytes in order), 4-aligned, so the
/// address goes in as four word stores (the verifier wants stack stores
/// aligned, and the words come from the two loads the lookup already made).
#[repr(C)]
struct Key6 {
    prefix_len: u32,
    data: [u32; 4],
}

const _: () = assert!(
    core::mem::size_of::<Key6>() == core::mem::size_of::<Key<[u8; 16]>>()
        && core::mem::align_of::<Key<[u8; 16]>>() == 1
);

impl Key6 {
    #[inline(always)]
    fn as_key(&self) -> &Key<[u8; 16]> {
        // SAFETY: same size, and `Key` is packed (alignment 1, asserted
        // above), so any `Key6` is a valid `Key<[u8; 16]>`: a u32 prefix
        // length, then 16 plain bytes, which on this little-endian target
        // are the address's bytes in order (the words were loaded from them).
        unsafe { &*(self as *const Key6 as *const Key<[u8; 16]>) }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
