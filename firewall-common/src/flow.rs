//! The node's own flows (for passing their replies) and the drop events, as
//! the kernel and userspace share them.
//!
//! A flow is recorded by the TC egress program when the node sends a packet:
//! TCP and UDP by their ports, ICMP and ICMPv6 echo requests by their
//! identifier. The XDP program passes an inbound packet that nothing else
//! passed if it is the reverse of a live flow, or an ICMP/ICMPv6 error whose
//! embedded header is a packet of a live flow.

/// `FlowKey::family` values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// One flow the node started, from the node's side: `local` is the node's
/// address (the egress packet's source), `remote` the other end. TCP and UDP
/// use both ports; ICMP and ICMPv6 echo use `local_port` for the echo
/// identifier and leave `remote_port` 0. Addresses are in network order,
/// left-aligned (IPv4 uses the first 4 bytes, the rest are 0); ports in host
/// order, so bpftool prints the numbers people type.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C, align(8))]
pub struct FlowKey {
    pub remote: [u8; 16],
    pub local: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key as five native-endian words (it is 40 bytes, 8-aligned).
    #[inline(always)]
    pub fn words(&self) -> [u64; 5] {
        // SAFETY: FlowKey is #[repr(C, align(8))], 40 bytes of integers with
        // explicit padding: exactly five initialised, aligned u64s.
        unsafe { core::ptr::read(self as *const FlowKey as *const [u64; 5]) }
    }
}

/// The `FLOWS` key of a flow: a keyed 64-bit hash of its [`FlowKey`]
/// (seeds from `CTRL`, drawn per pin directory). The kernel hashes an 8-byte
/// key in a fraction of the time a 40-byte one takes (55 ns per lookup on
/// the benchmark VM for the whole key). The value holds the whole key and
/// every lookup compares it, so a hash collision can only make two flows
/// share (and overwrite) one entry, never let a packet match another flow.
#[inline(always)]
pub fn flow_hash(k: &FlowKey, seed: &[u64; 4]) -> u64 {
    let w = k.words();
    let mut h = seed[0] ^ 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    while i < 5 {
        h = (h ^ w[i]).wrapping_mul(seed[(i + 1) & 3] | 1);
        h ^= h >> 32;
        i += 1;
    }
    h
}

/// When the flow was first and last seen leaving the node, in
/// `bpf_ktime_get_coarse_ns` time (CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC
/// to within one scheduler tick, at a fraction of the cost). The TC program
/// refreshes
/// `last_seen_ns` at most once per [`FLOW_REFRESH_NS`], so a busy flow does
/// not write a shared cache line on every packet.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowVal {
    /// The flow itself: what a lookup by hash must match exactly.
    pub key: FlowKey,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// Default flow table capacity (`attach --max-flows`). An LRU table: when it
/// is full the least recently used flow goes, and a reply to it drops.
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;

/// One cache line of `FLOW_FILTER`: a byte per flow-hash slot.
///
/// The filter lets a packet that is not a reply skip the `FLOWS` lookup (a
/// kernel hash of the key and a bucket walk, most of what the reply rule
/// cost a dropped packet). A zero byte at a hash's slot means no flow with
/// that hash is in `FLOWS`; a set byte means there may be one. It has two
/// halves:
/// - the egress program, on recording a new flow, sets the flow's byte in
///   both halves, after the `FLOWS` insert and before the packet leaves (so
///   before any reply can arrive), and again with each refresh of a flow in
///   use (at most once a second);
/// - the XDP program reads the half `Control::flow_filter_half` names;
/// - the controller clears the other half, then sets the byte of every key
///   `FLOWS` holds, and flips `flow_filter_half` to it. A flow recorded
///   while it clears either has its byte set after the clear, or was in
///   `FLOWS` before the walk began and is found by the walk.
///
/// Bytes rather than bits: two CPUs recording two flows set two bytes with
/// plain stores, where a bit would need an atomic read-modify-write. A
/// wrong "absent" would drop a reply (fail closed); a wrong "present" costs
/// one lookup. Without a controller (a CLI-only node) bytes only
/// accumulate, and the filter tends to "present" everywhere: replies still
/// pass, drops cost what they did before it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct FilterLine {
    pub bytes: [u8; 64],
}

impl Default for FilterLine {
    fn default() -> Self {
        FilterLine { bytes: [0; 64] }
    }
}

/// Filter bytes per flow of `FLOWS`' capacity: with the table full, about
/// one slot in 16 is set, so 94% of packets with no flow skip the lookup.
pub const FILTER_BYTES_PER_FLOW: u32 = 16;

/// Lines in each half of `FLOW_FILTER` for a flow table of `max_flows`: a
/// power of two, at least one, at most [`FILTER_MAX_LINES`].
pub const fn filter_lines_for(max_flows: u32) -> u32 {
    let slots = (max_flows as u64 * FILTER_BYTES_PER_FLOW as u64).next_power_of_two();
    let lines = slots / 64;
    if lines == 0 {
        1
    } else if lines > FILTER_MAX_LINES as u64 {
        FILTER_MAX_LINES
    } else {
        lines as u32
    }
}

/// 64 MiB a half: reached at 4M flows; a larger table (up to 16M) fills
/// more of its filter instead of taking more memory.
pub const FILTER_MAX_LINES: u32 = 1 << 20;

/// Where `hash`'s byte is in half `half` of a filter of `lines` lines per
/// half (a power of two): (the array index, the byte in that line). The
/// line comes from the hash's high bits, the byte from its low six, so the
/// two never reuse the same bits.
#[inline(always)]
pub fn filter_slot(hash: u64, lines: u32, half: u32) -> (u32, usize) {
    let line = ((hash >> 32) as u32) & lines.wrapping_sub(1);
    ((half & 1) * lines + line, (hash & 63) as usize)
}

/// Default idle timeouts (`attach --flow-timeouts`), in seconds. TCP's is
/// long because an idle connection is still a connection (Linux conntrack
/// keeps an established one for 5 days); the node's keepalives refresh it.
/// UDP matches conntrack's `nf_conntrack_udp_timeout_stream` order of
/// magnitude for request/response protocols (DNS, NTP). ICMP echo is short.
pub const DEFAULT_TCP_TIMEOUT_S: u32 = 3600;
pub const DEFAULT_UDP_TIMEOUT_S: u32 = 120;
pub const DEFAULT_ICMP_TIMEOUT_S: u32 = 30;

/// `Control::flow_timeout_ns` index for a protocol.
#[inline(always)]
pub fn timeout_index(proto: u8) -> usize {
    match proto {
        6 => 0,
        17 => 1,
        _ => 2,
    }
}

/// Bytes of each dropped packet an event carries.
pub const EVENT_CAPTURE: usize = 128;

/// One dropped (or, in observe mode, would-be-dropped) packet, written by the
/// XDP program into the `EVENTS` ring buffer. The addresses, protocol, ports
/// and VLAN are decoded in userspace from `data`, with the same parser the
/// reference classifier uses, so the drop path in the kernel only copies.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the packet was seen.
    pub time_ns: u64,
    pub ifindex: u32,
    /// The packet's length on the wire.
    pub len: u32,
    /// `Reason` as u32.
    pub reason: u32,
    /// 1 when the policy was observe and the packet passed.
    pub observed: u32,
    /// Bytes of `data` that hold the packet (at most [`EVENT_CAPTURE`]).
    pub cap_len: u32,
    pub _pad: u32,
    pub data: [u8; EVENT_CAPTURE],
}

/// Per-CPU token bucket of the event rate limit (`EVENT_BUCKET`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct EventBucket {
    /// Tokens, scaled by 1e9 (one event costs 1e9), so refills are integer.
    pub tokens: u64,
    pub last_ns: u64,
    /// `jiffies` when the bucket last refilled. An empty bucket refills only
    /// when the tick has moved on: jiffies is one load (the verifier inlines
    /// `bpf_jiffies64`), where a clock read is a helper call, so a flood
    /// pays for at most one clock read per tick per CPU.
    pub last_jiffies: u64,
}

/// Default event rate (`attach --event-rate`), per CPU: enough to see a
/// scan or a misconfigured peer in detail, far below what would cost the
/// drop path under a flood. The burst equals one second's worth.
pub const DEFAULT_EVENT_RATE: u32 = 1000;

/// `Control::policy` values. Observe passes every packet and counts what
/// enforce would have dropped.
pub const POLICY_ENFORCE: u32 = 0;
pub const POLICY_OBSERVE: u32 = 1;

#[cfg(test)]
mod filter_tests {
    use super::*;

    #[test]
    fn filter_sizes_are_powers_of_two_within_bounds() {
        for n in [1u32, 64, 1000, 65_536, 100_000, 4_194_304, 16_777_216] {
            let l = filter_lines_for(n);
            assert!(l.is_power_of_two() && l <= FILTER_MAX_LINES, "{n}: {l}");
            if (n as u64) * FILTER_BYTES_PER_FLOW as u64 <= FILTER_MAX_LINES as u64 * 64 {
                assert!(l as u64 * 64 >= n as u64 * FILTER_BYTES_PER_FLOW as u64);
            }
        }
        assert_eq!(filter_lines_for(65_536), 16_384);
    }

    #[test]
    fn slots_stay_in_their_half() {
        let lines = filter_lines_for(1000);
        let mut h = 0x1234_5678_9abc_def1u64;
        for _ in 0..10_000 {
            h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17);
            for half in 0..2 {
                let (line, byte) = filter_slot(h, lines, half);
                assert!(line / lines == half && byte < 64);
                // The other half's slot is the same place, one half along.
                assert_eq!(filter_slot(h, lines, 1 - half).0 % lines, line % lines);
            }
        }
    }
}
