//! `cargo xtask bench datapath`: the cost per packet of the firewall against
//! baselines measured in the same run, on the same footing.
//!
//! Method (see anchors.md and issue 10):
//! - Every program is attached in native mode to a veth of its own, as in
//!   production. BPF_PROG_TEST_RUN of an unattached program goes through a
//!   retpoline and has the XDP dispatcher rebuilt around each run; an
//!   attached one is a direct call, so mixing the two compares unlike things.
//! - The kernel reports a run's time per packet in whole nanoseconds, a fifth
//!   of the floor. So each run is timed from outside with CLOCK_MONOTONIC:
//!   runs of 200,000 packets (about 2 ms: short enough to be rarely
//!   preempted), divided by the count. The syscall's own cost, a few
//!   microseconds, adds under 0.05 ns per packet, the same to every program.
//! - 41 rounds; each round runs every (program, frame) cell once, in an order
//!   that alternates between rounds; a cell's result is its minimum, the run
//!   least disturbed by the rest of the machine.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::{
    EbpfLoader, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::{SchedClassifier, Xdp},
};
use firewall_common::{
    CidrVal, Control, GEN_NEVER, PeerVal,
    flow::{FlowKey, FlowVal, flow_hash},
};
use firewall_tests::{Ns, PinDir, flow_key, kernel_available, monotonic_ns, packet::Frame};

// The programs' return values (linux/bpf.h, linux/pkt_cls.h).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// How long each cell is measured.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Method {
    /// Packets per timed run.
    repeat: u32,
    /// Alternating rounds; a cell keeps its minimum.
    rounds: usize,
}

impl Method {
    /// What `cargo xtask bench datapath` measures with.
    pub(crate) const FULL: Method = Method {
        repeat: 200_000,
        rounds: 41,
    };
    /// The test run's smoke: every cell on its path, in both orders, with
    /// numbers too coarse to mean anything.
    #[cfg(test)]
    const SMOKE: Method = Method {
        repeat: 1_000,
        rounds: 2,
    };
}

/// The method for every table: `m.rounds` rounds, each running every cell
/// once in an order that reverses every round, and each cell's minimum.
fn min_of_rounds<C: Copy + Ord>(
    m: Method,
    cells: &[C],
    mut run: impl FnMut(C) -> anyhow::Result<f64>,
) -> anyhow::Result<BTreeMap<C, f64>> {
    let mut best = BTreeMap::new();
    for round in 0..m.rounds {
        let order: Vec<C> = if round % 2 == 0 {
            cells.to_vec()
        } else {
            cells.iter().rev().copied().collect()
        };
        for cell in order {
            let ns = run(cell)?;
            let b = best.entry(cell).or_insert(f64::MAX);
            *b = b.min(ns);
        }
    }
    Ok(best)
}

/// A UDP frame from `src:sport` to `dst:dport`.
fn udp_frame(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    Frame::new(src, dst, firewall_tests::packet::L4::Udp { sport, dport }).build()
}

/// One run of `repeat` packets, timed from outside: ns per packet. The
/// program must return `want` (a cell that took another path, say a reply
/// whose flow was evicted, would time the wrong thing).
fn wall_ns_per_pkt<P>(
    repeat: u32,
    prog: &P,
    pkt: &[u8],
    out: &mut [u8],
    want: u32,
) -> anyhow::Result<f64>
where
    P: for<'a> aya::programs::TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let t = Instant::now();
    let r = prog.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(out),
        repeat,
        ..Default::default()
    })?;
    let ns = t.elapsed().as_nanos() as f64 / repeat as f64;
    if r.return_value != want {
        bail!(
            "a benchmark cell returned {} where {want} was expected: it measured another path",
            r.return_value
        );
    }
    Ok(ns)
}

pub(crate) struct XdpFilter {
    ns: Ns,
    pin: PathBuf,
}

impl XdpFilter {
    /// xdp-filter from xdp-tools in allowlist mode (`-p deny`, IP features
    /// only), natively on a veth in its own namespace, with `hit` allowed by
    /// source.
    fn load(hit4: Ipv4Addr, hit6: Ipv6Addr, pins: &PinDir) -> anyhow::Result<Option<XdpFilter>> {
        let ns = Ns::new("fwbx");
        ns.sh_ok(
            "ip link add xfa type veth peer name xfb && ip link set xfa up && ip link set xfb up",
        );
        let o = ns.sh("xdp-filter load -m native -p deny -f ipv4,ipv6 xfa");
        if !o.status.success() {
            eprintln!(
                "xdp-filter did not load: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return Ok(None);
        }
        ns.sh_ok(&format!(
            "xdp-filter ip -m src {hit4} && xdp-filter ip -m src {hit6}"
        ));
        let id = firewall_ctl::sys::xdp_state_in(&ns.path(), "xfa")
            .map(|(_, id)| id)
            .context("xdp-filter program id")?;
        std::fs::create_dir_all(&pins.path)?;
        let pin = pins.path.join("xdp-filter");
        firewall_tests::sh_ok(&format!("bpftool prog pin id {id} {}", pin.display()));
        Ok(Some(XdpFilter { ns, pin }))
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = self.ns.sh("xdp-filter unload xfa");
        let _ = std::fs::remove_file(&self.pin);
        // libxdp leaves its pin directory behind; remove it only if empty, so
        // another user's libxdp programs are never touched.
        let _ = std::fs::remove_dir("/sys/fs/bpf/xdp");
    }
}

/// The settings of `CTRL` a cell runs with.
#[derive(Copy, Clone, PartialEq)]
struct Setting {
    cidrs: bool,
    replies: bool,
    event_rate: u32,
}

const PURE: Setting = Setting {
    cidrs: false,
    replies: false,
    event_rate: 0,
};
const DEFAULTS: Setting = Setting {
    cidrs: false,
    replies: true,
    event_rate: 1000,
};

#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Prog {
    Floor,
    Lookup,
    Ours,
    OursCidr,
    OursDefaults,
    OursReplies,
    OursEvents,
    /// The bench-only copy of the firewall whose flow probe is free, with
    /// the defaults (see `bench::reply_free_probe` in firewall-ebpf).
    FreeProbe,
    XdpFilter,
}

pub(crate) fn bench_datapath(m: Method) -> anyhow::Result<()> {
    if !kernel_available("bench-datapath") {
        bail!("the benchmark needs root and the XDP object");
    }
    let hit4 = Ipv4Addr::new(198, 19, 0, 7);
    let miss4 = Ipv4Addr::new(198, 19, 9, 7);
    let hit6: Ipv6Addr = "2001:2:0:1::7".parse()?;
    let miss6: Ipv6Addr = "2001:2:0:1::9:7".parse()?;
    let (local4, local6) = (
        Ipv4Addr::new(198, 18, 255, 1),
        "2001:2:ff::1".parse::<Ipv6Addr>()?,
    );
    // Room for every flow below: the object's default table (65,536) would
    // quietly evict a third of them.
    let max_flows = 131_072u32;
    let filter_lines = firewall_common::flow::filter_lines_for(max_flows);
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("FLOWS", max_flows)
        .map_max_entries("FLOW_FILTER", 2 * filter_lines)
        .load(firewall_tests::BENCH_OBJ)?;
    for name in [
        "firewall",
        "pass_floor",
        "lookup_floor",
        "lookup_floor6",
        "reply_free_probe",
    ] {
        let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into()?;
        p.load()?;
    }
    for name in ["egress", "tc_floor"] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into()?;
        p.load()?;
    }
    // After loading: the programs hold the maps, so the tables can be taken out.
    let (t4, t6) = firewall_tests::peer_tables(&mut ebpf);
    {
        let v = PeerVal {
            added_gen: 1,
            removed_gen: GEN_NEVER,
            hits: 0,
            origin: 2,
            hit_tick: 0,
        };
        // The same 10,001 sources per family in our table and in the kernel
        // hash maps the bare-lookup programs read.
        let mut f4: HashMap<_, [u8; 4], u32> = ebpf.map_mut("HASH_FLOOR").unwrap().try_into()?;
        for a in table_peers_v4().map(|a| a.octets()) {
            t4.insert(a, v)?;
            f4.insert(a, 1, 0)?;
        }
        t4.insert(hit4.octets(), v)?;
        f4.insert(hit4.octets(), 1, 0)?;
        let mut f6: HashMap<_, [u8; 16], u32> = ebpf.map_mut("HASH_FLOOR6").unwrap().try_into()?;
        for a in table_peers_v6().map(|a| a.octets()) {
            t6.insert(a, v)?;
            f6.insert(a, 1, 0)?;
        }
        t6.insert(hit6.octets(), v)?;
        f6.insert(hit6.octets(), 1, 0)?;
    }
    // CIDR peers: one /24 (/64) per family in the live slot, applied only
    // while CTRL counts them.
    {
        let mut c4: LpmTrie<_, [u8; 4], CidrVal> = ebpf.map_mut("CIDR4_0").unwrap().try_into()?;
        c4.insert(
            &Key::new(24, [198, 19, 50, 0]),
            CidrVal { origin: 2, _pad: 0 },
            0,
        )?;
        let mut c6: LpmTrie<_, [u8; 16], CidrVal> = ebpf.map_mut("CIDR6_0").unwrap().try_into()?;
        c6.insert(
            &Key::new(64, Ipv6Addr::new(0x2001, 2, 0, 0x50, 0, 0, 0, 0).octets()),
            CidrVal { origin: 2, _pad: 0 },
            0,
        )?;
    }
    // 100,000 live flows of the node's own (none of them the frames'), and
    // the two the reply frames answer.
    let reply4 = Ipv4Addr::new(198, 19, 7, 7);
    let reply6: Ipv6Addr = "2001:2:0:7::7".parse()?;
    let mut hashes = Vec::new();
    {
        let mut flows: HashMap<_, u64, FlowVal> = ebpf.map_mut("FLOWS").unwrap().try_into()?;
        let now = monotonic_ns();
        let mut add = |key: FlowKey| -> anyhow::Result<()> {
            let val = FlowVal {
                key,
                first_seen_ns: now,
                last_seen_ns: now,
            };
            let h = flow_hash(&key, &firewall_tests::TEST_SEED);
            flows.insert(h, val, 0)?;
            hashes.push(h);
            Ok(())
        };
        for i in 0..50_000u32 {
            let b = i.to_be_bytes();
            add(flow_key(
                17,
                local4.into(),
                40000,
                Ipv4Addr::new(198, 18, b[2], b[3]).into(),
                53,
            ))?;
            add(flow_key(
                6,
                local6.into(),
                40000,
                Ipv6Addr::new(0x2001, 2, 0, 3, 0, 0, 0, i as u16).into(),
                443,
            ))?;
        }
        add(flow_key(17, local4.into(), 40000, reply4.into(), 53))?;
        add(flow_key(17, local6.into(), 40000, reply6.into(), 53))?;
    }
    // Their bytes in both halves of the filter, as the egress program sets them.
    let live_flows = {
        let mut lines =
            vec![firewall_common::flow::FilterLine::default(); 2 * filter_lines as usize];
        for &h in &hashes {
            for half in 0..2 {
                let (l, b) = firewall_common::flow::filter_slot(h, filter_lines, half);
                lines[l as usize].bytes[b] = 1;
            }
        }
        let mut f: Array<_, firewall_common::flow::FilterLine> =
            ebpf.map_mut("FLOW_FILTER").unwrap().try_into()?;
        for (i, l) in lines.iter().enumerate() {
            if l.bytes.iter().any(|&b| b != 0) {
                f.set(i as u32, l, 0)?;
            }
        }
        let flows: HashMap<_, u64, FlowVal> = ebpf.map("FLOWS").unwrap().try_into()?;
        flows.keys().flatten().count()
    };
    let set_ctrl = |ebpf: &mut aya::Ebpf, s: Setting| -> anyhow::Result<()> {
        let mut c: Array<_, Control> = ebpf.map_mut("CTRL").unwrap().try_into()?;
        let n = u32::from(s.cidrs);
        c.set(
            0,
            Control {
                committed_gen: 2,
                cidr4_count: [n, 0],
                cidr6_count: [n, 0],
                replies: u32::from(s.replies),
                event_rate: s.event_rate,
                flow_timeout_ns: [3_600_000_000_000; 3],
                flow_filter_lines: filter_lines,
                ..firewall_tests::test_control(&t4, &t6)
            },
            0,
        )?;
        Ok(())
    };

    // Every program natively on a veth of its own.
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.path)?;
    let ns = Ns::new("fwbd");
    let names = [
        "firewall",
        "pass_floor",
        "lookup_floor",
        "lookup_floor6",
        "reply_free_probe",
    ];
    for (i, name) in names.iter().enumerate() {
        let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into()?;
        let path = pins.path.join(name);
        p.pin(&path)?;
        ns.sh_ok(&format!(
            "ip link add xd{i}a type veth peer name xd{i}b && ip link set xd{i}a up && ip link set xd{i}b up && ip link set dev xd{i}a xdpdrv pinned {}",
            path.display()
        ));
    }
    let open = |name: &str| Xdp::from_pin(pins.path.join(name), aya_obj_attach());
    let (fw, floor, look4, look6, free) = (
        open("firewall")?,
        open("pass_floor")?,
        open("lookup_floor")?,
        open("lookup_floor6")?,
        open("reply_free_probe")?,
    );
    let xf = XdpFilter::load(hit4, hit6, &pins)?;
    let xf_prog = match &xf {
        Some(x) => Some(Xdp::from_pin(&x.pin, aya_obj_attach())?),
        None => None,
    };

    // Frames, and which cells each is measured in.
    let udp4 = |s: Ipv4Addr| Frame::udp4(s, 53).build();
    let udp6 = |s: Ipv6Addr| Frame::udp6(s, 53).build();
    let reply = |s: IpAddr, d: IpAddr| udp_frame(s, 53, d, 40000);
    let frames: Vec<(&str, Vec<u8>, bool)> = vec![
        ("v4 hit", udp4(hit4), false),
        ("v4 miss", udp4(miss4), false),
        ("v6 hit", udp6(hit6), true),
        ("v6 miss", udp6(miss6), true),
        ("v4 reply", reply(reply4.into(), local4.into()), false),
        ("v6 reply", reply(reply6.into(), local6.into()), true),
    ];
    let mut cells: Vec<(usize, Prog)> = Vec::new();
    for (fi, (name, _, _)) in frames.iter().enumerate() {
        cells.push((fi, Prog::Floor));
        cells.push((fi, Prog::Lookup));
        if name.ends_with("reply") {
            // Ours (replies off) drops the frame after the peer miss: the
            // part of a reply hit that comes before the reply rule.
            cells.extend([
                (fi, Prog::Ours),
                (fi, Prog::FreeProbe),
                (fi, Prog::OursDefaults),
            ]);
            continue;
        }
        cells.extend([
            (fi, Prog::Ours),
            (fi, Prog::OursCidr),
            (fi, Prog::OursDefaults),
            (fi, Prog::OursReplies),
            (fi, Prog::OursEvents),
        ]);
        if xf_prog.is_some() {
            cells.push((fi, Prog::XdpFilter));
        }
    }
    let mut out = vec![0u8; 2048];
    let best = min_of_rounds(m, &cells, |(fi, prog)| {
        let (name, pkt, v6) = &frames[fi];
        // What each cell must return: hits pass; misses drop; a reply frame
        // passes only where the reply rule is on.
        let (pass, drop) = (XDP_PASS, XDP_DROP);
        let want = match prog {
            Prog::Floor => pass,
            _ if name.ends_with("hit") => pass,
            _ if name.ends_with("miss") => drop,
            Prog::FreeProbe | Prog::OursDefaults => pass,
            _ => drop,
        };
        Ok(match prog {
            Prog::Floor => wall_ns_per_pkt(m.repeat, &floor, pkt, &mut out, want)?,
            Prog::Lookup => wall_ns_per_pkt(
                m.repeat,
                if *v6 { &look6 } else { &look4 },
                pkt,
                &mut out,
                want,
            )?,
            Prog::Ours
            | Prog::OursCidr
            | Prog::OursDefaults
            | Prog::OursReplies
            | Prog::OursEvents
            | Prog::FreeProbe => {
                set_ctrl(
                    &mut ebpf,
                    match prog {
                        Prog::Ours => PURE,
                        Prog::OursCidr => Setting {
                            cidrs: true,
                            ..PURE
                        },
                        Prog::OursReplies => Setting {
                            replies: true,
                            ..PURE
                        },
                        Prog::OursEvents => Setting {
                            event_rate: 1000,
                            ..PURE
                        },
                        _ => DEFAULTS,
                    },
                )?;
                wall_ns_per_pkt(
                    m.repeat,
                    if prog == Prog::FreeProbe { &free } else { &fw },
                    pkt,
                    &mut out,
                    want,
                )?
            }
            Prog::XdpFilter => {
                wall_ns_per_pkt(m.repeat, xf_prog.as_ref().unwrap(), pkt, &mut out, want)?
            }
        })
    })?;

    println!(
        "BPF_PROG_TEST_RUN of programs each attached natively to a veth of its own; wall clock over runs of {} packets, minimum of {} alternating rounds",
        m.repeat, m.rounds
    );
    let set = {
        let f: Array<_, firewall_common::flow::FilterLine> =
            ebpf.map("FLOW_FILTER").unwrap().try_into()?;
        (0..filter_lines)
            .map(|i| {
                f.get(&i, 0)
                    .map(|l| l.bytes.iter().filter(|&&b| b != 0).count())
            })
            .sum::<Result<usize, _>>()?
    };
    println!(
        "tables: 10,001 exact peers per family (ours and the bare lookups' hash maps), {live_flows} live flows (capacity {max_flows}, filter {:.1}% set); 64-78 B UDP frames\n",
        100.0 * set as f64 / (filter_lines as f64 * 64.0)
    );
    println!(
        "ours = the pure allowlist (replies off, events off); +CIDR = a /24 (/64) CIDR peer present;\n+replies = replies on (100k flows); +events = events on (1000/s/CPU, the ring full: a flood); defaults = both\n"
    );
    println!(
        "{:<9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>8} {:>10} {:>8}",
        "frame",
        "floor",
        "bare",
        "ours",
        "+CIDR",
        "+replies",
        "+events",
        "defaults",
        "xdp-filt",
        "ours-fl",
        "ours/bare",
        "xf/ours"
    );
    let get = |fi: usize, p: Prog| best.get(&(fi, p)).copied();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
    let mut goals: Vec<(String, f64, f64, bool)> = Vec::new();
    for (fi, (name, _, _)) in frames.iter().enumerate() {
        let fl = get(fi, Prog::Floor).unwrap();
        let bare = get(fi, Prog::Lookup).unwrap();
        let ours = get(fi, Prog::Ours);
        let def = get(fi, Prog::OursDefaults);
        let xf = get(fi, Prog::XdpFilter);
        println!(
            "{:<9} {:>7.2} {:>7.2} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>8} {:>10} {:>8}",
            name,
            fl,
            bare,
            fmt(ours),
            fmt(get(fi, Prog::OursCidr)),
            fmt(get(fi, Prog::OursReplies)),
            fmt(get(fi, Prog::OursEvents)),
            fmt(def),
            fmt(xf),
            fmt(ours.map(|o| o - fl)),
            ours.map_or("-".into(), |o| format!("{:.2}", o / bare)),
            match (xf, ours) {
                (Some(x), Some(o)) => format!("{:.2}", x / o),
                _ => "-".into(),
            }
        );
        if let (Some(o), false) = (ours, name.ends_with("reply")) {
            goals.push((
                format!("{name}: ours / bare lookup"),
                o / bare,
                1.0,
                o <= bare,
            ));
            if let Some(x) = xf {
                goals.push((
                    format!("{name}: xdp-filter / ours"),
                    x / o,
                    1.5,
                    x / o >= 1.5,
                ));
            }
        }
        if name.ends_with("reply") {
            let d = def.unwrap();
            goals.push((
                format!("{name}: reply hit / bare lookup"),
                d / bare,
                1.0,
                d <= bare,
            ));
        } else if name.ends_with("miss") {
            let d = def.unwrap();
            goals.push((
                format!("{name}: drop with 100k flows and events on / bare lookup"),
                d / bare,
                1.5,
                d / bare <= 1.5,
            ));
        }
    }
    println!("\nns per packet; ours-fl = ours minus the floor (what the firewall itself costs)\n");
    let mut met = 0;
    for (what, value, goal, ok) in &goals {
        println!(
            "{:<66} {:>6.2}  goal {} {:<4}  {}",
            what,
            value,
            if what.contains("xdp-filter") {
                ">="
            } else {
                "<="
            },
            goal,
            if *ok { "met" } else { "NOT MET" }
        );
        met += usize::from(*ok);
    }
    println!("\n{met} of {} goals met", goals.len());
    print_reply_breakdown(&frames, &get)?;
    set_ctrl(&mut ebpf, DEFAULTS)?;
    bench_two_cpus(
        m,
        &pins.path.join("firewall"),
        [
            (
                udp4(hit4),
                udp4(Ipv4Addr::from(in_another_bucket(
                    &t4,
                    hit4.octets(),
                    table_peers_v4().map(|a| a.octets()),
                )?)),
            ),
            (
                udp6(hit6),
                udp6(Ipv6Addr::from(in_another_bucket(
                    &t6,
                    hit6.octets(),
                    table_peers_v6().map(|a| a.octets()),
                )?)),
            ),
        ],
    )?;
    bench_egress(m, &mut ebpf, &set_ctrl, (local4, reply4), (local6, reply6))?;
    drop(xf_prog);
    drop(xf);
    drop(ns);
    Ok(())
}

/// The 10,000 IPv4 peers the benchmark's tables hold besides the hit frame's.
fn table_peers_v4() -> impl Iterator<Item = Ipv4Addr> {
    (0..10_000u32).map(|i| {
        let b = i.to_be_bytes();
        Ipv4Addr::new(198, 19, b[2] | 0x80, b[3])
    })
}

/// The 10,000 IPv6 peers the benchmark's tables hold besides the hit frame's.
fn table_peers_v6() -> impl Iterator<Item = Ipv6Addr> {
    (0..10_000u32).map(|i| Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, (i >> 16) as u16, i as u16))
}

/// The first of `candidates` that lives in another bucket of `t` than `of`
/// (so on another cache line), by where the table put them.
fn in_another_bucket<F: firewall_ctl::datapath::table::Family>(
    t: &firewall_ctl::datapath::table::Table<F>,
    of: F::Addr,
    mut candidates: impl Iterator<Item = F::Addr>,
) -> anyhow::Result<F::Addr> {
    let bucket = |a: &F::Addr| t.find(a).first().map(|(slot, _)| slot.bucket);
    let home = bucket(&of).context("the hit frame's peer is not in the table")?;
    candidates
        .find(|a| bucket(a).is_some_and(|b| b != home))
        .context("no peer in another bucket")
}

/// The two-CPU table's cells: one CPU alone; both CPUs at once on one
/// peer; both at once on two peers in different buckets.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TwoCpus {
    Alone,
    SamePeer,
    TwoPeers,
}

/// Test runs on CPUs 0 and 1 at once, started together: what a peer whose
/// packets land on several cores (RSS on a multi-queue NIC) costs per
/// packet against two peers that share no cache line. Each worker holds its
/// own descriptor of the attached firewall; a cell's value is the mean of
/// the two workers' ns per packet (one worker for `Alone`).
fn bench_two_cpus(
    m: Method,
    fw_pin: &std::path::Path,
    frames: [(Vec<u8>, Vec<u8>); 2],
) -> anyhow::Result<()> {
    use std::sync::{Arc, Barrier, mpsc};
    // SAFETY: sysconf has no preconditions.
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        println!("\ntwo CPUs: not run (this machine has one CPU online)");
        return Ok(());
    }
    type Job = (Vec<u8>, Arc<Barrier>, mpsc::Sender<anyhow::Result<f64>>);
    let mut workers = Vec::new();
    for cpu in 0..2usize {
        let (tx, rx) = mpsc::channel::<Job>();
        let pin = fw_pin.to_path_buf();
        let repeat = m.repeat;
        let h = std::thread::spawn(move || -> anyhow::Result<()> {
            // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET
            // writes within it; sched_setaffinity(0, ..) pins this thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                    bail!(
                        "pinning the benchmark thread to CPU {cpu}: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
            let prog = Xdp::from_pin(&pin, aya_obj_attach())?;
            let mut out = vec![0u8; 2048];
            for (pkt, start, reply) in rx {
                start.wait();
                let _ = reply.send(wall_ns_per_pkt(repeat, &prog, &pkt, &mut out, XDP_PASS));
            }
            Ok(())
        });
        workers.push((tx, h));
    }
    let cells: Vec<(usize, TwoCpus)> = (0..frames.len())
        .flat_map(|f| [TwoCpus::Alone, TwoCpus::SamePeer, TwoCpus::TwoPeers].map(|w| (f, w)))
        .collect();
    let best = min_of_rounds(m, &cells, |(fi, which)| {
        let (a, b) = &frames[fi];
        let jobs: Vec<Vec<u8>> = match which {
            TwoCpus::Alone => vec![a.clone()],
            TwoCpus::SamePeer => vec![a.clone(), a.clone()],
            TwoCpus::TwoPeers => vec![a.clone(), b.clone()],
        };
        let start = Arc::new(Barrier::new(jobs.len()));
        let (tx, rx) = mpsc::channel();
        for (w, pkt) in workers.iter().zip(jobs.iter()) {
            w.0.send((pkt.clone(), start.clone(), tx.clone()))
                .map_err(|_| anyhow::anyhow!("a benchmark worker stopped"))?;
        }
        drop(tx);
        let ns: Vec<f64> = rx.iter().collect::<anyhow::Result<_>>()?;
        if ns.len() != jobs.len() {
            bail!("a benchmark worker stopped");
        }
        Ok(ns.iter().sum::<f64>() / ns.len() as f64)
    })?;
    for (tx, h) in workers {
        drop(tx);
        h.join()
            .map_err(|_| anyhow::anyhow!("a benchmark worker panicked"))??;
    }
    println!(
        "\ntwo CPUs at once (test runs on CPUs 0 and 1 started together, mean of the two; same method)"
    );
    println!(
        "{:<9} {:>9} {:>14} {:>10} {:>16}",
        "frame", "one CPU", "two, one peer", "two peers", "one-peer cost"
    );
    for (fi, name) in ["v4 hit", "v6 hit"].iter().enumerate() {
        let g = |w: TwoCpus| best[&(fi, w)];
        println!(
            "{:<9} {:>9.2} {:>14.2} {:>10.2} {:>16.2}",
            name,
            g(TwoCpus::Alone),
            g(TwoCpus::SamePeer),
            g(TwoCpus::TwoPeers),
            g(TwoCpus::SamePeer) - g(TwoCpus::TwoPeers)
        );
    }
    Ok(())
}

/// Where a reply hit's time goes, from differences between cells of this
/// run, and the least a reply hit could cost with any flow table while
/// peers are checked first (the bench-only copy whose flow probe is free).
fn print_reply_breakdown(
    frames: &[(&str, Vec<u8>, bool)],
    get: &dyn Fn(usize, Prog) -> Option<f64>,
) -> anyhow::Result<()> {
    let replies: Vec<usize> = (0..frames.len())
        .filter(|&fi| frames[fi].0.ends_with("reply"))
        .collect();
    let hit_frame = |v6: bool| {
        (0..frames.len()).find(|&fi| frames[fi].0 == if v6 { "v6 hit" } else { "v4 hit" })
    };
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        (
            "classify up to the peer miss (ours, replies off: a drop)",
            vec![],
        ),
        (
            "the reply rule with the flow probe free (bench-only copy)",
            vec![],
        ),
        ("the flow probe: LRU lookup, key compare, liveness", vec![]),
        ("a reply hit (defaults)", vec![]),
        ("the bare lookup, same frame (a miss: it drops)", vec![]),
        (
            "the bare lookup on the hit frame (a hit: it passes)",
            vec![],
        ),
    ];
    let mut budget = Vec::new();
    let mut bound = Vec::new();
    let mut vs_bare_hit = Vec::new();
    for &fi in &replies {
        let cell = |fi: usize, p: Prog| {
            get(fi, p).with_context(|| format!("no {p:?} cell for {}", frames[fi].0))
        };
        let (fl, bare, ours, free, hit) = (
            cell(fi, Prog::Floor)?,
            cell(fi, Prog::Lookup)?,
            cell(fi, Prog::Ours)?,
            cell(fi, Prog::FreeProbe)?,
            cell(fi, Prog::OursDefaults)?,
        );
        let h = hit_frame(frames[fi].2).context("no hit frame")?;
        let bare_hit = cell(h, Prog::Lookup)? - cell(h, Prog::Floor)?;
        for (row, v) in rows.iter_mut().zip([
            ours - fl,
            free - ours,
            hit - free,
            hit - fl,
            bare - fl,
            bare_hit,
        ]) {
            row.1.push(v);
        }
        budget.push(bare - ours);
        bound.push(free / bare);
        vs_bare_hit.push(hit / (fl + bare_hit));
    }
    let names: Vec<&str> = replies.iter().map(|&fi| frames[fi].0).collect();
    println!("\nwhere a reply hit's time goes, ns above the floor");
    print!("{:<60}", "");
    for n in &names {
        print!(" {n:>9}");
    }
    println!();
    let line = |label: &str, vals: &[f64]| {
        print!("{label:<60}");
        for v in vals {
            print!(" {v:>9.2}");
        }
        println!();
    };
    for (label, vals) in &rows {
        line(label, vals);
    }
    line(
        "left for the whole reply rule to match the bare lookup",
        &budget,
    );
    line("a reply hit with the flow probe free / bare lookup", &bound);
    line(
        "a reply hit / the bare lookup that hits (for reference)",
        &vs_bare_hit,
    );
    println!(
        "with the peers checked first, the reply rule (parse, key, hash, probe, compare, liveness)\nhas only the budget above; the first ratio is the least any flow table reaches with this parse and hash"
    );
    Ok(())
}

/// The egress table's cells: the TC floor, egress with replies off (it
/// returns at once), egress recording.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Egress {
    Floor,
    RepliesOff,
    Recording,
}

/// What the TC egress program costs each packet the node sends, for a flow
/// it already records (the steady state of a busy connection: a lookup,
/// and a refresh at most once a second), against a TC floor. A new flow's
/// insert is paid once per flow and is not in this table: a test run
/// repeats one packet, so only its first run inserts.
fn bench_egress(
    m: Method,
    ebpf: &mut aya::Ebpf,
    set_ctrl: &dyn Fn(&mut aya::Ebpf, Setting) -> anyhow::Result<()>,
    v4: (Ipv4Addr, Ipv4Addr),
    v6: (Ipv6Addr, Ipv6Addr),
) -> anyhow::Result<()> {
    let out_frame = |l: IpAddr, r: IpAddr| udp_frame(l, 40000, r, 53);
    let frames = [
        ("v4 out", out_frame(v4.0.into(), v4.1.into())),
        ("v6 out", out_frame(v6.0.into(), v6.1.into())),
    ];
    let mut out = vec![0u8; 2048];
    let cells: Vec<(usize, Egress)> = (0..frames.len())
        .flat_map(|f| [Egress::Floor, Egress::RepliesOff, Egress::Recording].map(|w| (f, w)))
        .collect();
    let best = min_of_rounds(m, &cells, |(fi, which)| {
        let pkt = &frames[fi].1;
        let prog = match which {
            Egress::Floor => "tc_floor",
            Egress::RepliesOff => {
                set_ctrl(ebpf, PURE)?;
                "egress"
            }
            Egress::Recording => {
                set_ctrl(
                    ebpf,
                    Setting {
                        replies: true,
                        ..PURE
                    },
                )?;
                "egress"
            }
        };
        let p: &SchedClassifier = ebpf.program(prog).unwrap().try_into()?;
        wall_ns_per_pkt(m.repeat, p, pkt, &mut out, TC_ACT_OK)
    })?;
    println!(
        "\nTC egress, per packet the node sends (socket-buffer test runs, both programs unattached, same method)"
    );
    println!(
        "{:<9} {:>9} {:>12} {:>10} {:>14}",
        "frame", "tc floor", "replies off", "recording", "recording-fl"
    );
    for (fi, (name, _)) in frames.iter().enumerate() {
        let g = |w: Egress| best[&(fi, w)];
        println!(
            "{:<9} {:>9.2} {:>12.2} {:>10.2} {:>14.2}",
            name,
            g(Egress::Floor),
            g(Egress::RepliesOff),
            g(Egress::Recording),
            g(Egress::Recording) - g(Egress::Floor)
        );
    }
    Ok(())
}

pub(crate) fn aya_obj_attach() -> aya_obj::programs::XdpAttachType {
    aya_obj::programs::XdpAttachType::Interface
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cell of every table runs on the path it claims (each run
    /// checks its verdict), on the real kernel: a benchmark that measured
    /// another path, or could not set up, fails here rather than in the
    /// next person's measurement.
    #[test]
    fn the_datapath_benchmark_runs_every_cell_on_its_path() {
        firewall_tests::require_kernel!();
        bench_datapath(Method::SMOKE).expect("bench datapath, smoke");
    }
}
