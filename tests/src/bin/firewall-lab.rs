//! The lab: `cargo xtask demo` and `cargo xtask bench` run this binary.
//!
//!   firewall-lab demo             a veth lab with real traffic from allowed and disallowed peers
//!   firewall-lab bench-datapath   BPF_PROG_TEST_RUN cost per packet against same-run baselines

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use aya::{
    EbpfLoader, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::{TestRun as _, Xdp},
};
use firewall_common::{CidrVal, Control, GEN_NEVER, PeerV4Key, PeerV6Key, PeerVal};
use firewall_ctl::packet::Frame;
use firewall_tests::{Ns, Pair, PinDir, fwctl_ok, kernel_available, sh, udp_delivered};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("bench-datapath") => bench_datapath(),
        Some("bench-controller") => bench_controller(),
        _ => {
            eprintln!("usage: firewall-lab <demo | bench-datapath | bench-controller>");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("firewall-lab: {e:#}");
        std::process::exit(1);
    }
}

fn demo() -> anyhow::Result<()> {
    if !kernel_available("demo") {
        bail!("the demo needs root and the XDP object: run `cargo xtask demo` as root");
    }
    println!("== veth lab: host A (protected) <-> host B (peers .2 allowed, .3 not)");
    let p = Pair::new(40);
    let pins = PinDir::new();
    println!(
        "{}",
        fwctl_ok(&p.a, &pins, &format!("attach --iface {}", p.a_if)).trim()
    );
    println!(
        "{}",
        fwctl_ok(&p.a, &pins, &format!("peers add {} {}", p.b4(2), p.b6(2))).trim()
    );
    println!(
        "\n{:<26} {:>6} {:>10} {:>10}",
        "source", "ping", "udp sent", "udp recv"
    );
    for (src, dst) in [
        (p.b4(2), p.a4()),
        (p.b4(3), p.a4()),
        (p.b6(2), p.a6()),
        (p.b6(3), p.a6()),
    ] {
        let ping = p.b.ping(src, dst);
        let got = udp_delivered(&p.b, src, &p.a, dst, 5555, 100);
        println!(
            "{:<26} {:>6} {:>10} {:>10}",
            src.to_string(),
            if ping { "ok" } else { "lost" },
            100,
            got
        );
    }
    println!("\n== firewall-ctl status");
    println!("{}", fwctl_ok(&p.a, &pins, "status"));
    println!(
        "== bpftool map dump pinned {}/PEERS_V4",
        pins.path.display()
    );
    println!(
        "{}",
        String::from_utf8_lossy(
            &sh(&format!(
                "bpftool map dump pinned {}/PEERS_V4",
                pins.path.display()
            ))
            .stdout
        )
    );
    println!("== cleaning up (namespaces and pins are removed)");
    Ok(())
}

/// Best of `runs` TEST_RUN batches of `repeat` packets: ns per packet. The
/// minimum is the least disturbed by other load on a shared machine.
fn ns_per_pkt(prog: &Xdp, pkt: &[u8], repeat: u32, runs: u32) -> anyhow::Result<f64> {
    let mut out = vec![0u8; pkt.len() + 256];
    let mut best = f64::MAX;
    for _ in 0..runs {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })?;
        best = best.min(r.duration.as_nanos() as f64);
    }
    Ok(best)
}

struct XdpFilter {
    ns: Ns,
    pin: PathBuf,
}

impl XdpFilter {
    /// xdp-filter from xdp-tools in allowlist mode (`-p deny`, IP features
    /// only), on a veth in its own namespace, with `hit` allowed by source.
    fn load(hit4: Ipv4Addr, hit6: Ipv6Addr, pins: &PinDir) -> anyhow::Result<Option<XdpFilter>> {
        let ns = Ns::new("fwbx");
        ns.sh_ok(
            "ip link add xfa type veth peer name xfb && ip link set xfa up && ip link set xfb up",
        );
        let o = ns.sh("xdp-filter load -p deny -f ipv4,ipv6 xfa");
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
    }
}

fn bench_datapath() -> anyhow::Result<()> {
    if !kernel_available("bench-datapath") {
        bail!("the benchmark needs root and the XDP object");
    }
    let repeat = 1_000_000;
    let runs = 5;
    let hit4 = Ipv4Addr::new(198, 19, 0, 7);
    let miss4 = Ipv4Addr::new(198, 19, 9, 7);
    let hit6: Ipv6Addr = "2001:2:0:1::7".parse()?;
    let miss6: Ipv6Addr = "2001:2:0:1::9:7".parse()?;
    let frames = [
        ("v4 hit", Frame::udp4(hit4, 53).build()),
        ("v4 miss", Frame::udp4(miss4, 53).build()),
        ("v6 hit", Frame::udp6(hit6, 53).build()),
        ("v6 miss", Frame::udp6(miss6, 53).build()),
    ];
    let mut ebpf = EbpfLoader::new().load(firewall_ctl::EBPF_OBJ)?;
    {
        let mut m: HashMap<_, PeerV4Key, PeerVal> = ebpf.map_mut("PEERS_V4").unwrap().try_into()?;
        let v = PeerVal {
            added_gen: 1,
            removed_gen: GEN_NEVER,
            hits: 0,
            origin: 2,
            _pad: 0,
        };
        for i in 0..10_000u32 {
            let b = i.to_be_bytes();
            m.insert(
                PeerV4Key {
                    addr: [198, 19, b[2] | 0x80, b[3]],
                },
                v,
                0,
            )?;
        }
        m.insert(
            PeerV4Key {
                addr: hit4.octets(),
            },
            v,
            0,
        )?;
        let mut m6: HashMap<_, PeerV6Key, PeerVal> =
            ebpf.map_mut("PEERS_V6").unwrap().try_into()?;
        for i in 0..10_000u32 {
            m6.insert(
                PeerV6Key {
                    addr: Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, (i >> 16) as u16, i as u16).octets(),
                },
                v,
                0,
            )?;
        }
        m6.insert(
            PeerV6Key {
                addr: hit6.octets(),
            },
            v,
            0,
        )?;
    }
    for name in ["firewall", "pass_floor", "lookup_floor"] {
        let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into()?;
        p.load()?;
    }
    let set_ctrl = |ebpf: &mut aya::Ebpf, cidrs: u32| -> anyhow::Result<()> {
        let mut c: Array<_, Control> = ebpf.map_mut("CTRL").unwrap().try_into()?;
        c.set(
            0,
            Control {
                committed_gen: 2,
                cidr4_count: [cidrs, 0],
                cidr6_count: [cidrs, 0],
                ..Default::default()
            },
            0,
        )?;
        Ok(())
    };
    set_ctrl(&mut ebpf, 0)?;
    let pins = PinDir::new();
    let xf = XdpFilter::load(hit4, hit6, &pins)?;
    let xf_prog = match &xf {
        Some(x) => Some(Xdp::from_pin(&x.pin, aya_obj_attach())?),
        None => None,
    };

    let (fw, floor, lookup) = (
        reopen(&mut ebpf, "firewall"),
        reopen(&mut ebpf, "pass_floor"),
        reopen(&mut ebpf, "lookup_floor"),
    );

    println!(
        "BPF_PROG_TEST_RUN, best of {runs} x {repeat} packets, 64-78 B UDP frames; ratios are to the XDP_PASS floor of the same run"
    );
    println!("peer maps: 10,001 IPv4 + 10,001 IPv6 exact entries\n");
    println!(
        "{:<9} {:>9} {:>10} {:>9} {:>11} {:>12} {:>11} {:>12} {:>14}",
        "frame",
        "floor ns",
        "ours ns",
        "ours x",
        "ours+CIDR x",
        "lookup-only x",
        "xdp-filter x",
        "vs xdp-filter",
        "goal"
    );
    let mut worst = (0f64, 0f64, f64::MAX);
    for (name, f) in &frames {
        set_ctrl(&mut ebpf, 0)?;
        let fl = ns_per_pkt(&floor, f, repeat, runs)?;
        let ours = ns_per_pkt(&fw, f, repeat, runs)?;
        let look = if name.starts_with("v4") {
            Some(ns_per_pkt(&lookup, f, repeat, runs)?)
        } else {
            None
        };
        let xdpf = match &xf_prog {
            Some(p) => Some(ns_per_pkt(p, f, repeat, runs)?),
            None => None,
        };
        // CIDR peers present: one /24 per family in the live slot.
        {
            let mut t4: LpmTrie<_, [u8; 4], CidrVal> =
                ebpf.map_mut("CIDR4_0").unwrap().try_into()?;
            t4.insert(
                &Key::new(24, [198, 19, 50, 0]),
                CidrVal { origin: 2, _pad: 0 },
                0,
            )?;
            let mut t6: LpmTrie<_, [u8; 16], CidrVal> =
                ebpf.map_mut("CIDR6_0").unwrap().try_into()?;
            t6.insert(
                &Key::new(64, Ipv6Addr::new(0x2001, 2, 0, 0x50, 0, 0, 0, 0).octets()),
                CidrVal { origin: 2, _pad: 0 },
                0,
            )?;
        }
        set_ctrl(&mut ebpf, 1)?;
        let cidr = ns_per_pkt(&fw, f, repeat, runs)?;
        let fl2 = ns_per_pkt(&floor, f, repeat, runs)?;
        let floor_ns = fl.min(fl2);
        let (r, rc) = (ours / floor_ns, cidr / floor_ns);
        worst.0 = worst.0.max(r);
        worst.1 = worst.1.max(rc);
        if let Some(x) = xdpf {
            worst.2 = worst.2.min(x / ours);
        }
        println!(
            "{:<9} {:>9.1} {:>10.1} {:>9.2} {:>11.2} {:>12} {:>11} {:>12} {:>14}",
            name,
            floor_ns,
            ours,
            r,
            rc,
            look.map_or("-".into(), |l| format!("{:.2}", l / floor_ns)),
            xdpf.map_or("n/a".into(), |x| format!("{:.2}", x / floor_ns)),
            xdpf.map_or("n/a".into(), |x| format!("{:.2}x faster", x / ours)),
            "<=2.0 / <=2.5",
        );
    }
    println!(
        "\nworst: ours {:.2}x (goal <= 2.0), with CIDR peers {:.2}x (goal <= 2.5), vs xdp-filter {}",
        worst.0,
        worst.1,
        if worst.2 == f64::MAX {
            "n/a".into()
        } else {
            format!("{:.2}x faster (goal >= 1.4)", worst.2)
        }
    );
    drop(xf_prog);
    drop(xf);
    Ok(())
}

fn aya_obj_attach() -> aya_obj::programs::XdpAttachType {
    aya_obj::programs::XdpAttachType::Interface
}

/// A second handle on a loaded program, so the maps of `ebpf` stay mutable
/// while it runs (aya's `Xdp` is not Clone): pin it briefly and reopen it.
fn reopen(ebpf: &mut aya::Ebpf, name: &str) -> Xdp {
    let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
    let path = PathBuf::from(format!("/sys/fs/bpf/{}", firewall_tests::unique("fwbp")));
    p.pin(&path).expect("pin program");
    let x = Xdp::from_pin(&path, aya_obj_attach()).expect("reopen program");
    let _ = std::fs::remove_file(&path);
    x
}

fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage fills a struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn v6_peer(i: u32) -> ipnet::IpNet {
    ipnet::IpNet::V6(
        Ipv6Addr::new(0x2001, 2, 0, 0x100 + (i >> 16) as u16, 0, 0, 0, i as u16).into(),
    )
}

/// Commits of 1k, 100k and 1M peers through the full stage/verify/flip path,
/// against the raw BPF_MAP_UPDATE_BATCH floor on a map of the same kind in
/// the same run, plus single-peer changes into a 1M set and peak RSS.
fn bench_controller() -> anyhow::Result<()> {
    use firewall_ctl::{
        commit::{Committed, commit},
        kernel::KernelStore,
        peers::{Changes, DISCOVERY},
    };
    use std::time::Instant;
    if !kernel_available("bench-controller") {
        bail!("the benchmark needs root and the XDP object");
    }
    let ns = Ns::new("fwbc");
    ns.sh_ok("ip link add xca type veth peer name xcb && ip link add xfa type veth peer name xfb && ip link set xca up && ip link set xfa up");
    let (pins, floor_pins) = (PinDir::new(), PinDir::new());
    let (p1, p2) = (pins.path.clone(), floor_pins.path.clone());
    ns.run(move || -> anyhow::Result<()> {
        firewall_ctl::attach::attach(
            "xca",
            firewall_ctl::attach::Mode::Auto,
            &p1,
            false,
            Some(1_100_000),
        )?;
        firewall_ctl::attach::attach(
            "xfa",
            firewall_ctl::attach::Mode::Auto,
            &p2,
            false,
            Some(1_100_000),
        )?;
        Ok(())
    })?;
    let floor_map = aya::maps::MapData::from_pin(floor_pins.path.join("PEERS_V6"))?;
    let mut store = KernelStore::open(&pins.path)?;
    println!(
        "commit = stage (batch update) + verify (read-back: per entry up to 1,024 changes, full count+checksum above) + flip + collect"
    );
    println!(
        "floor  = one BPF_MAP_UPDATE_BATCH of the same entries into an identical map, same run\n"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8} {:>10}",
        "commit", "ours ms", "floor ms", "ratio", "goal"
    );
    let mut worst_full = 0f64;
    for n in [1_000u32, 100_000, 1_000_000] {
        let (mut cur, _) = Committed::adopt(&mut store)?;
        let changes = Changes {
            add: (0..n).map(|i| (v6_peer(i), DISCOVERY)).collect(),
            remove: vec![],
        };
        let t = Instant::now();
        commit(&mut store, &mut cur, changes)?;
        let ours = t.elapsed().as_secs_f64() * 1e3;
        let keys: Vec<firewall_common::PeerV6Key> = (0..n)
            .map(|i| match v6_peer(i) {
                ipnet::IpNet::V6(a) => firewall_common::PeerV6Key {
                    addr: a.addr().octets(),
                },
                _ => unreachable!(),
            })
            .collect();
        let vals = vec![
            PeerVal {
                added_gen: 1,
                removed_gen: GEN_NEVER,
                hits: 0,
                origin: 2,
                _pad: 0
            };
            n as usize
        ];
        let t = Instant::now();
        firewall_ctl::batch::update(std::os::fd::AsFd::as_fd(floor_map.fd()), &keys, &vals)
            .map_err(|(_, e)| e)?;
        let floor = t.elapsed().as_secs_f64() * 1e3;
        firewall_ctl::batch::delete(std::os::fd::AsFd::as_fd(floor_map.fd()), &keys)?;
        worst_full = worst_full.max(ours / floor);
        println!(
            "{:<28} {:>12.1} {:>12.1} {:>8.2} {:>10}",
            format!("full sync, {n} peers"),
            ours,
            floor,
            ours / floor,
            "<= 3x"
        );
        if n == 1_000_000 {
            // Single-peer changes into the 1M set: add one, remove it, 20 times.
            let mut times = Vec::new();
            for k in 0..20u32 {
                let p = v6_peer(2_000_000 + k);
                let t = Instant::now();
                commit(
                    &mut store,
                    &mut cur,
                    Changes {
                        add: vec![(p, DISCOVERY)],
                        remove: vec![],
                    },
                )?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                commit(
                    &mut store,
                    &mut cur,
                    Changes {
                        add: vec![],
                        remove: vec![p],
                    },
                )?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{:<28} {:>12.2} {:>12} {:>8} {:>10}",
                "1 change into 1M (median)",
                times[times.len() / 2],
                "-",
                "-",
                "<= 10 ms"
            );
            println!(
                "{:<28} {:>12.2} {:>12} {:>8} {:>10}",
                "1 change into 1M (max)",
                times[times.len() - 1],
                "-",
                "-",
                ""
            );
            println!(
                "\npeak RSS with 1M peers committed: {:.0} MB (goal <= 200 MB)",
                peak_rss_mb()
            );
        }
        // Back to empty for the next size.
        let all: Vec<_> = cur.set.keys().copied().collect();
        commit(
            &mut store,
            &mut cur,
            Changes {
                add: vec![],
                remove: all,
            },
        )?;
    }
    println!("worst full-sync ratio: {worst_full:.2}x (goal <= 3x)");
    let dir = pins.path.clone();
    let fdir = floor_pins.path.clone();
    ns.run(move || {
        let _ = firewall_ctl::attach::detach("xca", &dir, true);
        let _ = firewall_ctl::attach::detach("xfa", &fdir, true);
    });
    Ok(())
}
