//! BPF_PROG_TEST_RUN over a fresh, unpinned copy of the program with its own
//! maps.

use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, Xdp},
};
use firewall_common::{
    CidrVal, Control, Counters, PeerVal, Reason,
    flow::{FlowKey, FlowVal},
};
use firewall_ctl::datapath::table::{Table, V4, V6};

/// A fresh, unpinned copy of the program with its own maps, for TEST_RUN.
pub struct Harness {
    pub ebpf: Ebpf,
    pub v4: Table<V4>,
    pub v6: Table<V6>,
}

/// Hash seeds for unpinned test copies (a pin directory draws its own).
pub const TEST_SEED: [u64; 4] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
];

/// Map both exact-peer tables of an object whose programs are already loaded
/// (this takes the maps out of `ebpf`, closing its fds: a program loaded later
/// could not reference them).
pub fn peer_tables(ebpf: &mut Ebpf) -> (Table<V4>, Table<V6>) {
    let mut take = |name: &str| -> (aya::maps::MapData, u32) {
        match ebpf.take_map(name).expect("peer table") {
            aya::maps::Map::Array(d) => {
                let n = d.info().expect("map info").max_entries();
                (d, n)
            }
            _ => panic!("{name} is not an array"),
        }
    };
    let (d4, n4) = take("PEERS_V4");
    let (d6, n6) = take("PEERS_V6");
    (
        Table::mmap(std::os::fd::AsFd::as_fd(d4.fd()), n4, TEST_SEED).expect("mmap PEERS_V4"),
        Table::mmap(std::os::fd::AsFd::as_fd(d6.fd()), n6, TEST_SEED).expect("mmap PEERS_V6"),
    )
}

/// The control word a test copy runs with: its seeds and table sizes, the
/// reply rule on (as in production) with an hour's timeout for every
/// protocol, enforce, and no drop events (a test that wants them sets a
/// rate).
pub fn test_control(v4: &Table<V4>, v6: &Table<V6>) -> Control {
    Control {
        hash_seed: TEST_SEED,
        bucket_mask: [v4.buckets() - 1, v6.buckets() - 1],
        replies: 1,
        flow_timeout_ns: [3_600_000_000_000; 3],
        flow_filter_lines: TEST_FILTER_LINES,
        ..Default::default()
    }
}

/// `FLOW_FILTER` lines per half in the object as built (its default size).
pub const TEST_FILTER_LINES: u32 =
    firewall_common::flow::filter_lines_for(firewall_common::flow::DEFAULT_MAX_FLOWS);

/// Write `value` into `hash`'s byte in half `half` of an unpinned object's
/// `FLOW_FILTER`.
fn write_filter_byte(ebpf: &mut aya::Ebpf, hash: u64, half: u32, value: u8) {
    let mut m: Array<_, firewall_common::flow::FilterLine> =
        ebpf.map_mut("FLOW_FILTER").unwrap().try_into().unwrap();
    let (line, byte) = firewall_common::flow::filter_slot(hash, TEST_FILTER_LINES, half);
    let mut l = m.get(&line, 0).unwrap();
    l.bytes[byte] = value;
    m.set(line, l, 0).unwrap();
}

/// Set `hash`'s byte in both halves, as the egress program does when it
/// records a flow.
fn mark_filter(ebpf: &mut aya::Ebpf, hash: u64) {
    for half in 0..2 {
        write_filter_byte(ebpf, hash, half, 1);
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    firewall_ctl::datapath::flows::monotonic_ns()
}

impl Harness {
    pub fn new() -> Harness {
        let mut ebpf = EbpfLoader::new()
            .load(firewall_ctl::EBPF_OBJ)
            .expect("load object");
        let p: &mut Xdp = ebpf.program_mut("firewall").unwrap().try_into().unwrap();
        p.load().expect("verifier accepts the program");
        let (v4, v6) = peer_tables(&mut ebpf);
        Harness { ebpf, v4, v6 }
    }
    pub fn prog(&self) -> &Xdp {
        self.ebpf.program("firewall").unwrap().try_into().unwrap()
    }
    pub fn set_generation(&mut self, generation: u64, cidr4: [u32; 2], cidr6: [u32; 2]) {
        self.set_control(|c| {
            c.committed_gen = generation;
            c.cidr4_count = cidr4;
            c.cidr6_count = cidr6;
        });
    }
    /// Change the control word (starting from what it holds, or the test
    /// defaults when it is still zero).
    pub fn set_control(&mut self, f: impl FnOnce(&mut Control)) {
        let mut m: Array<_, Control> = self.ebpf.map_mut("CTRL").unwrap().try_into().unwrap();
        let mut c = m.get(&0, 0).unwrap();
        if c.hash_seed == [0; 4] {
            c = test_control(&self.v4, &self.v6);
        }
        f(&mut c);
        m.set(0, c, 0).unwrap();
    }
    /// Record a flow as the egress program would, last seen `idle_ns` ago.
    pub fn add_flow(&mut self, key: FlowKey, idle_ns: u64) {
        self.add_flow_at(
            firewall_common::flow::flow_hash(&key, &TEST_SEED),
            key,
            idle_ns,
        );
    }
    /// Store `key` under the table key `hash`, whatever `key` hashes to:
    /// a collision, as far as the datapath can tell.
    pub fn add_flow_at(&mut self, hash: u64, key: FlowKey, idle_ns: u64) {
        let mut m: HashMap<_, u64, FlowVal> =
            self.ebpf.map_mut("FLOWS").unwrap().try_into().unwrap();
        let t = monotonic_ns().saturating_sub(idle_ns);
        m.insert(
            hash,
            FlowVal {
                key,
                first_seen_ns: t,
                last_seen_ns: t,
            },
            0,
        )
        .unwrap();
        mark_filter(&mut self.ebpf, hash);
    }
    /// Clear `hash`'s byte in the filter half in force: the datapath then
    /// takes the flow for absent, whatever FLOWS holds.
    pub fn unmark_filter(&mut self, hash: u64) {
        let ctrl: Array<_, Control> = self.ebpf.map("CTRL").unwrap().try_into().unwrap();
        let half = ctrl.get(&0, 0).unwrap().flow_filter_half;
        write_filter_byte(&mut self.ebpf, hash, half, 0);
    }
    /// Run the TC egress program on `frame`, as if the node sent it
    /// (loaded on first use). Returns its verdict.
    pub fn egress(&mut self, frame: &[u8]) -> i32 {
        let p: &mut SchedClassifier = self.ebpf.program_mut("egress").unwrap().try_into().unwrap();
        if p.fd().is_err() {
            p.load().expect("verifier accepts the egress program");
        }
        let mut out = vec![0u8; frame.len() + 256];
        p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("test run")
        .return_value as i32
    }
    /// Every (table key, value) in FLOWS.
    pub fn flows(&self) -> Vec<(u64, FlowVal)> {
        let m: HashMap<_, u64, FlowVal> = self.ebpf.map("FLOWS").unwrap().try_into().unwrap();
        m.iter().map(|r| r.unwrap()).collect()
    }
    /// Is `hash`'s byte set in both halves of FLOW_FILTER?
    pub fn filter_marked(&self, hash: u64) -> bool {
        let m: Array<_, firewall_common::flow::FilterLine> =
            self.ebpf.map("FLOW_FILTER").unwrap().try_into().unwrap();
        (0..2).all(|half| {
            let (line, byte) = firewall_common::flow::filter_slot(hash, TEST_FILTER_LINES, half);
            m.get(&line, 0).unwrap().bytes[byte] != 0
        })
    }
    pub fn add_exact(&mut self, addr: IpAddr, added: u64, removed: u64) {
        let v = PeerVal {
            added_gen: added,
            removed_gen: removed,
            hits: 0,
            origin: 1,
            hit_tick: 0,
        };
        match addr {
            IpAddr::V4(a) => self.v4.insert(a.octets(), v).map(drop),
            IpAddr::V6(a) => self.v6.insert(a.octets(), v).map(drop),
        }
        .expect("a free slot");
    }
    pub fn add_cidr(&mut self, slot: usize, net: ipnet::IpNet) {
        let v = CidrVal { origin: 1, _pad: 0 };
        match net {
            ipnet::IpNet::V4(n) => {
                let mut m: LpmTrie<_, [u8; 4], CidrVal> = self
                    .ebpf
                    .map_mut(["CIDR4_0", "CIDR4_1"][slot])
                    .unwrap()
                    .try_into()
                    .unwrap();
                m.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), v, 0)
                    .unwrap();
            }
            ipnet::IpNet::V6(n) => {
                let mut m: LpmTrie<_, [u8; 16], CidrVal> = self
                    .ebpf
                    .map_mut(["CIDR6_0", "CIDR6_1"][slot])
                    .unwrap()
                    .try_into()
                    .unwrap();
                m.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), v, 0)
                    .unwrap();
            }
        }
    }
    pub fn counters(&self) -> Counters {
        let m: PerCpuArray<_, Counters> = self.ebpf.map("COUNTERS").unwrap().try_into().unwrap();
        let mut t = Counters::default();
        for c in m.get(&0, 0).unwrap().iter() {
            t.add(c);
        }
        t
    }
    /// Run one frame: (XDP action, the reason whose counter moved, or whose
    /// would-drop counter moved in observe mode).
    pub fn run(&self, pkt: &[u8]) -> (u32, Reason) {
        let before = self.counters();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = self
            .prog()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("test_run");
        let after = self.counters();
        let moved: Vec<Reason> = Reason::ALL
            .into_iter()
            .filter(|r| {
                after.get(*r) + after.would_drop(*r) != before.get(*r) + before.would_drop(*r)
            })
            .collect();
        assert_eq!(
            moved.len(),
            1,
            "exactly one counter moves per packet, got {moved:?}"
        );
        (r.return_value, moved[0])
    }
    /// The overlay table, read back from the loaded program.
    pub fn overlay(&self) -> Vec<firewall_common::OverlayRule> {
        firewall_ctl::datapath::status::overlay_of(&self.prog().info().unwrap())
            .expect("overlay table")
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// A flow as the egress program records it, from the node's side.
pub fn flow_key(
    proto: u8,
    local: IpAddr,
    local_port: u16,
    remote: IpAddr,
    remote_port: u16,
) -> FlowKey {
    let (family, l, r) = match (local, remote) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            let mut a = [0u8; 16];
            let mut b = [0u8; 16];
            a[..4].copy_from_slice(&l.octets());
            b[..4].copy_from_slice(&r.octets());
            (firewall_common::flow::FAMILY_V4, a, b)
        }
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            (firewall_common::flow::FAMILY_V6, l.octets(), r.octets())
        }
        _ => panic!("a flow's ends are of one family"),
    };
    FlowKey {
        remote: r,
        local: l,
        remote_port,
        local_port,
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The reference classifier's view of a flow table: the live flows.
#[derive(Default)]
pub struct FlowSet(pub std::collections::HashSet<FlowKey>);

impl firewall_common::classify::FlowLookup for FlowSet {
    fn is_live(&self, key: &FlowKey) -> bool {
        self.0.contains(key)
    }
}
