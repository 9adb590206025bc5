//! Shared ABI between the XDP program and userspace, plus a pure-Rust reference
//! classifier that the kernel program is differentially tested against.
//!
//! Every `#[repr(C)]` type here uses explicit padding fields and only integer
//! members, so its layout has no hidden holes and `bpftool map dump` prints the
//! same field names userspace uses.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod classify;
pub mod flow;
#[cfg(feature = "overlay-toml")]
pub mod overlay_toml;

/// Bumped whenever a pinned map's key or value layout changes. A pin directory
/// holding maps of another ABI is refused instead of being silently reused.
pub const ABI_VERSION: u32 = 5;
/// `CTRL.magic`: "FWC1" in ASCII, so a hex dump shows what the map is.
pub const CTRL_MAGIC: u32 = u32::from_be_bytes(*b"FWC1");

/// `removed_gen` of an entry that is not scheduled for removal.
pub const GEN_NEVER: u64 = u64::MAX;

/// Names of the maps, which are also their pin file names.
pub mod names {
    pub const PEERS_V4: &str = "PEERS_V4";
    pub const PEERS_V6: &str = "PEERS_V6";
    pub const CIDR4_0: &str = "CIDR4_0";
    pub const CIDR4_1: &str = "CIDR4_1";
    pub const CIDR6_0: &str = "CIDR6_0";
    pub const CIDR6_1: &str = "CIDR6_1";
    pub const CTRL: &str = "CTRL";
    pub const COUNTERS: &str = "COUNTERS";
    /// The node's own flows, recorded on egress, whose replies pass.
    pub const FLOWS: &str = "FLOWS";
    /// Drop events for `firewall-ctl monitor`.
    pub const EVENTS: &str = "EVENTS";
    /// The per-CPU token buckets that rate-limit `EVENTS`.
    pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
    /// Which flow hashes may be in `FLOWS` (see `flow::filter_slot`).
    pub const FLOW_FILTER: &str = "FLOW_FILTER";
    /// Maps shared by every interface of one pin directory: one fleet
    /// allowlist, one flow table, one event stream.
    pub const SHARED: [&str; 11] = [
        PEERS_V4,
        PEERS_V6,
        CIDR4_0,
        CIDR4_1,
        CIDR6_0,
        CIDR6_1,
        CTRL,
        FLOWS,
        FLOW_FILTER,
        EVENTS,
        EVENT_BUCKET,
    ];
    /// The XDP program's function name.
    pub const PROGRAM: &str = "firewall";
    /// The TC egress program that records the node's own flows.
    pub const EGRESS_PROGRAM: &str = "egress";
}

/// Default capacities. `--max-peers` sets the peer tables' size at attach.
pub const DEFAULT_MAX_PEERS: u32 = 65_536;
pub const MAX_CIDRS: u32 = 16_384;

/// Exact peers live in a bucketed hash table of our own, held in a
/// `BPF_F_MMAPABLE` array: one array element is one bucket of `SLOTS` entries.
///
/// Why not `BPF_MAP_TYPE_HASH`: its lookup (a call into `__htab_map_lookup_elem`,
/// jhash, a chain walk and a `memcmp`) alone costs about 1.8-2.3x an XDP_PASS
/// program under BPF_PROG_TEST_RUN, which leaves nothing for parsing within a
/// 2x budget. An array lookup is inlined by the verifier to a bounds check and
/// an add, and scanning one bucket's keys is a few compares on one cache line.
/// Userspace writes the buckets directly through mmap, field by field, in an
/// order that keeps every intermediate state invisible (`firewall_ctl::table`).
pub const SLOTS: usize = 8;
/// Buckets are sized so that a full table is at most half occupied:
/// `buckets = next_pow2(max_peers / PEERS_PER_BUCKET)`.
pub const PEERS_PER_BUCKET: u32 = (SLOTS / 2) as u32;
/// An entry lives in its home bucket or, if that is full, in one of the next
/// `MAX_PROBE - 1` buckets (linear probing by bucket). The datapath follows a
/// bucket's `spill` count to know whether to look further, so a miss usually
/// reads one bucket.
pub const MAX_PROBE: u32 = 8;

/// One bucket of `PEERS_V4`. The keys come first and together (one cache line)
/// so a lookup compares them without touching the values.
///
/// A slot is empty iff `peer[i].removed_gen == 0`: a live entry always has a
/// removal generation of at least 1 (or `GEN_NEVER`), and the kernel creates
/// the array zeroed.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Bucket4 {
    /// Source addresses in network order, so bpftool prints `[198,18,0,1]`.
    pub addr: [[u8; 4]; SLOTS],
    /// How many entries whose home is an earlier bucket live past this one.
    /// Zero means a lookup can stop here.
    pub spill: u32,
    pub _pad: u32,
    pub peer: [PeerVal; SLOTS],
}

/// One bucket of `PEERS_V6`; see [`Bucket4`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Bucket6 {
    pub addr: [[u8; 16]; SLOTS],
    pub spill: u32,
    pub _pad: u32,
    pub peer: [PeerVal; SLOTS],
}

/// The home-bucket hash of an IPv4 source given as its 4 bytes loaded as one
/// native-endian word (what both the datapath's load and
/// `u32::from_ne_bytes(octets)` produce). Multiply-shift with a random odd
/// multiplier from `CTRL`: one multiply in the datapath, and keyed, so an
/// address set cannot be chosen to pile into one bucket without the seed.
#[inline(always)]
pub fn hash4(word: u32, seed: &[u64; 4]) -> u32 {
    ((word as u64).wrapping_mul(seed[0]) >> 32) as u32
}

/// The home-bucket hash of an IPv6 source given as four native-endian words:
/// vector multiply-add-shift (Dietzfelbinger), four multiplies.
#[inline(always)]
pub fn hash6(w: [u32; 4], seed: &[u64; 4]) -> u32 {
    let t = (w[0] as u64)
        .wrapping_mul(seed[0])
        .wrapping_add((w[1] as u64).wrapping_mul(seed[1]))
        .wrapping_add((w[2] as u64).wrapping_mul(seed[2]))
        .wrapping_add((w[3] as u64).wrapping_mul(seed[3]));
    (t >> 32) as u32
}

/// The words [`hash6`] takes, from an address's bytes.
#[inline(always)]
pub fn words6(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Who put an entry in the peer maps. The controller only ever changes entries of
/// its own origin; operator entries stay until an operator removes them.
pub mod origin {
    pub const OPERATOR: u32 = 1;
    pub const DISCOVERY: u32 = 2;
}

/// One exact peer's slot in a bucket.
///
/// An entry is visible to a packet iff `added_gen <= CTRL.committed_gen < removed_gen`.
/// Staging generation G+1 inserts new entries with `added_gen = G+1` and marks
/// removals with `removed_gen = G+1`; neither is visible until the flip writes
/// `committed_gen = G+1`, after which both are, at once. A change of origin is a
/// removal of the old version plus an addition of the new one in the same
/// bucket, so the address stays visible throughout.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PeerVal {
    pub added_gen: u64,
    pub removed_gen: u64,
    /// Traffic through this entry: one for each tick of the kernel's clock
    /// (jiffies: 1-10 ms, by CONFIG_HZ) in which it passed a packet. Not a
    /// packet count: counting every packet wrote this cache line on every
    /// packet, and a peer whose packets land on several CPUs (RSS) then
    /// moved the line between them on every packet (2 ns a packet for IPv6
    /// on two vCPUs, `bench datapath`; more across sockets). It grows iff
    /// the peer sends, which is all the liveness veto reads. Incremented
    /// without atomics: two CPUs may count one tick twice, or once.
    pub hits: u64,
    pub origin: u32,
    /// The low 32 bits of jiffies at the last tick counted in `hits`;
    /// written only by the datapath.
    pub hit_tick: u32,
}

impl PeerVal {
    #[inline(always)]
    pub fn visible_at(&self, committed: u64) -> bool {
        self.added_gen <= committed && committed < self.removed_gen
    }
}

/// Key of the CIDR tries (`aya` and `aya-ebpf` both use this exact layout for
/// `lpm_trie::Key<[u8; N]>`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LpmKeyV4 {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

/// Key of the IPv6 CIDR tries.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LpmKeyV6 {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

/// Value of the CIDR tries. CIDR tries are not generation-tagged: a longest-prefix
/// match cannot skip an invisible entry (a staged /24 would shadow a live /16), so
/// CIDRs use two tries per family and `committed_gen & 1` selects the live one.
/// Only 4-byte aligned: the kernel places the value right after the 8-byte key.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct CidrVal {
    pub origin: u32,
    pub _pad: u32,
}

/// The single value of `CTRL`, an mmapable array. The datapath reads only
/// `committed_gen` and the live slot of `cidr*_count`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Control {
    /// The flip word. Written with one aligned 8-byte atomic store through mmap,
    /// so no reader can see a torn value.
    pub committed_gen: u64,
    /// `committed_gen + 1` while a generation is staged and not yet flipped.
    pub staged_gen: u64,
    pub magic: u32,
    pub abi_version: u32,
    /// Entries in each CIDR trie slot. Zero in the live slot lets the datapath
    /// skip the LPM lookup entirely.
    pub cidr4_count: [u32; 2],
    pub cidr6_count: [u32; 2],
    /// Number of entries (exact + CIDR) and an order-independent checksum of
    /// them, per slot like the CIDR tries: staging writes the standby slot, so
    /// the flip makes the live slot describe the committed generation at the
    /// same instant, and a crash between the two cannot leave them disagreeing.
    pub peer_count: [u64; 2],
    pub checksum: [u64; 2],
    /// Multipliers of [`hash4`]/[`hash6`], odd, drawn once when the pin
    /// directory is created and fixed for the tables' lifetime.
    pub hash_seed: [u64; 4],
    /// Bucket index masks of `PEERS_V4` and `PEERS_V6` (bucket count - 1,
    /// a power of two): the datapath reads them here rather than having the
    /// table size compiled in, since `--max-peers` sets it at attach.
    pub bucket_mask: [u32; 2],
    /// `flow::POLICY_ENFORCE` or `flow::POLICY_OBSERVE`. Written alone with
    /// one aligned 4-byte store (`firewall-ctl policy`), read by the datapath
    /// only on the drop path: every interface of the pin directory switches
    /// at once, with no reload.
    pub policy: u32,
    /// 1: pass replies to the node's own flows (the default); 0: the pure
    /// allowlist (`attach --replies off`).
    pub replies: u32,
    /// Drop events per second per CPU; 0 turns events off.
    pub event_rate: u32,
    /// The half of `FLOW_FILTER` the reply rule reads (0 or 1). The
    /// controller rebuilds the other half and flips this word with one
    /// aligned store (see `flow::filter_slot`).
    pub flow_filter_half: u32,
    /// Idle timeouts of a flow, indexed by `flow::timeout_index`: TCP, UDP,
    /// ICMP/ICMPv6 echo.
    pub flow_timeout_ns: [u64; 3],
    /// Lines (`flow::FilterLine`) in each half of `FLOW_FILTER`, a power of
    /// two; 0 (a directory attached before the filter was sized) turns the
    /// filter off, and every would-drop packet looks its flow up.
    pub flow_filter_lines: u32,
    pub _pad: u32,
}

/// Per-CPU counters, one per verdict reason.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
#[repr(C)]
pub struct Counters {
    pub overlay: u64,
    pub peer: u64,
    pub nonip: u64,
    pub neighbour: u64,
    pub reply: u64,
    pub default_drop: u64,
    pub malformed: u64,
    /// Observe mode: packets that passed but enforce would have dropped, by
    /// reason. Their index is the reason's plus [`WOULD_DROP_OFFSET`].
    pub would_drop_default: u64,
    pub would_drop_malformed: u64,
    /// Drop events written to `EVENTS`, and those the rate limit (or a full
    /// ring) suppressed.
    pub events: u64,
    pub events_suppressed: u64,
}

/// `Counters` index of a would-drop count: the drop reason's index plus this.
pub const WOULD_DROP_OFFSET: usize = 2;
/// `Counters` indices of the event counts.
pub const COUNTER_EVENTS: usize = 9;
pub const COUNTER_EVENTS_SUPPRESSED: usize = 10;

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.overlay += o.overlay;
        self.peer += o.peer;
        self.nonip += o.nonip;
        self.neighbour += o.neighbour;
        self.reply += o.reply;
        self.default_drop += o.default_drop;
        self.malformed += o.malformed;
        self.would_drop_default += o.would_drop_default;
        self.would_drop_malformed += o.would_drop_malformed;
        self.events += o.events;
        self.events_suppressed += o.events_suppressed;
    }
    pub fn get(&self, r: Reason) -> u64 {
        match r {
            Reason::Overlay => self.overlay,
            Reason::Peer => self.peer,
            Reason::NonIp => self.nonip,
            Reason::Neighbour => self.neighbour,
            Reason::Reply => self.reply,
            Reason::DefaultDrop => self.default_drop,
            Reason::Malformed => self.malformed,
        }
    }
    /// Packets of a drop reason that observe mode passed (0 for pass reasons).
    pub fn would_drop(&self, r: Reason) -> u64 {
        match r {
            Reason::DefaultDrop => self.would_drop_default,
            Reason::Malformed => self.would_drop_malformed,
            _ => 0,
        }
    }
}

/// Why a packet got its verdict. The discriminants index `Counters`' fields.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Reason {
    Overlay,
    Peer,
    NonIp,
    Neighbour,
    /// A reply to one of the node's own flows, or an ICMP error about one.
    Reply,
    DefaultDrop,
    Malformed,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Overlay,
        Reason::Peer,
        Reason::NonIp,
        Reason::Neighbour,
        Reason::Reply,
        Reason::DefaultDrop,
        Reason::Malformed,
    ];
    pub fn passes(self) -> bool {
        matches!(
            self,
            Reason::Overlay | Reason::Peer | Reason::NonIp | Reason::Neighbour | Reason::Reply
        )
    }
    pub fn name(self) -> &'static str {
        match self {
            Reason::Overlay => "overlay",
            Reason::Peer => "peer",
            Reason::NonIp => "nonip",
            Reason::Neighbour => "neighbour",
            Reason::Reply => "reply",
            Reason::DefaultDrop => "default_drop",
            Reason::Malformed => "malformed",
        }
    }
}

/// One compiled-in overlay rule, in the form the read-back table stores it.
/// `family` is 4 or 6; `proto` 0 means any; `dport`/`sport` 0 means any (a port
/// implies TCP or UDP); `addr` is in network order, left-aligned (IPv4 uses 4
/// bytes). Source ports exist because the filter is stateless: the replies to a
/// node's own TCP connections to a gossip or etcd port come *from* that port.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct OverlayRule {
    pub family: u8,
    pub prefix_len: u8,
    pub proto: u8,
    pub _pad: u8,
    pub dport: u16,
    pub sport: u16,
    pub addr: [u8; 16],
}

/// Upper bound on compiled-in overlay rules: they become straight-line compares
/// in the hot path, so the list must stay short.
pub const OVERLAY_MAX: usize = 32;
/// Marks the read-back copy of the overlay table inside the program's `.rodata`.
pub const OVERLAY_MAGIC: [u8; 8] = *b"FWOVRLY1";

/// The overlay table as embedded in `.rodata`. `status` finds it through the
/// loaded program's map ids, so what it prints is what the kernel runs, not
/// what a file on disk says today.
#[derive(Copy, Clone, Debug)]
#[repr(C)]
pub struct OverlayTable {
    pub magic: [u8; 8],
    pub count: u32,
    pub _pad: u32,
    pub rules: [OverlayRule; OVERLAY_MAX],
}

impl OverlayRule {
    /// Does this rule allow a packet from `src` (network order, `family` bytes)
    /// with IP protocol `proto` and `(sport, dport)` (None when the packet has
    /// no visible L4 ports: other protocols, later fragments)?
    pub fn matches(&self, family: u8, src: &[u8], proto: u8, ports: Option<(u16, u16)>) -> bool {
        if self.family != family {
            return false;
        }
        if !prefix_contains(&self.addr[..src.len()], self.prefix_len, src) {
            return false;
        }
        if self.proto != 0 && self.proto != proto {
            return false;
        }
        if self.dport == 0 && self.sport == 0 {
            return true;
        }
        match ports {
            Some((sport, dport)) => {
                (self.dport == 0 || self.dport == dport) && (self.sport == 0 || self.sport == sport)
            }
            None => false,
        }
    }
}

/// Whether `addr` lies in `net/len` (both network order, same length).
pub fn prefix_contains(net: &[u8], len: u8, addr: &[u8]) -> bool {
    let len = len as usize;
    let full = len / 8;
    if net[..full] != addr[..full] {
        return false;
    }
    let rem = len % 8;
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    net[full] & mask == addr[full] & mask
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type below is #[repr(C)], made of integers and arrays of
    // integers with its padding spelled out as fields (the layout asserts
    // below check the sizes): every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Bucket4 {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::Bucket6 {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::PeerVal {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::CidrVal {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::Control {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::LpmKeyV4 {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::LpmKeyV6 {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::flow::FlowKey {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::flow::FlowVal {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::flow::DropEvent {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::flow::EventBucket {}
    // SAFETY: as for Bucket4.
    unsafe impl aya::Pod for super::flow::FilterLine {}
}

// Layout asserts: a change here changes the kernel ABI and must bump ABI_VERSION.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Bucket4>() == 32 + 8 + 32 * SLOTS);
    assert!(size_of::<Bucket6>() == 128 + 8 + 32 * SLOTS);
    // Array values of an MMAPABLE map are laid out back to back; a multiple of
    // 8 keeps every bucket's u64 fields aligned in userspace's mapping.
    assert!(size_of::<Bucket4>().is_multiple_of(8) && size_of::<Bucket6>().is_multiple_of(8));
    assert!(size_of::<PeerVal>() == 32);
    assert!(size_of::<CidrVal>() == 8);
    assert!(size_of::<Control>() == 160);
    assert!(size_of::<flow::FilterLine>() == 64);
    assert!(size_of::<Counters>() == 88);
    assert!(size_of::<flow::FlowKey>() == 40);
    assert!(size_of::<flow::FlowVal>() == 56);
    assert!(size_of::<flow::DropEvent>() == 32 + flow::EVENT_CAPTURE);
    assert!(size_of::<flow::EventBucket>() == 24);
    assert!(size_of::<OverlayRule>() == 24);
    assert!(size_of::<OverlayTable>() == 16 + 24 * OVERLAY_MAX);
};
