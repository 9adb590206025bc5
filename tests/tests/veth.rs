//! Real traffic through veth pairs between network namespaces: ping, UDP and
//! TCP over IPv4, IPv6 and a VLAN sub-interface, with the firewall attached by
//! the firewall-ctl binary (which exits, leaving the pinned program enforcing).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use firewall_tests::{Pair, PinDir, fwctl, fwctl_ok, sh_ok, tcp_connects, udp_delivered};

const PORT: u16 = 5555; // not an overlay port

fn setup(net: u8) -> (Pair, PinDir) {
    let p = Pair::new(net);
    let pins = PinDir::new();
    fwctl_ok(&p.a, &pins, &format!("attach --iface {}", p.a_if));
    (p, pins)
}

#[test]
fn allowed_and_disallowed_peers_v4_v6_udp_tcp_ping() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(21);
    // firewall-ctl has exited: the pinned link keeps the program enforcing.
    assert!(!p.b.ping(p.b4(2), p.a4()), "default drop before any peer");
    fwctl_ok(&p.a, &pins, &format!("peers add {} {}", p.b4(2), p.b6(2)));
    for (src, other, dst) in [(p.b4(2), p.b4(3), p.a4()), (p.b6(2), p.b6(3), p.a6())] {
        assert!(p.b.ping(src, dst), "ping from peer {src}");
        assert!(!p.b.ping(other, dst), "ping from non-peer {other}");
        assert_eq!(
            udp_delivered(&p.b, src, &p.a, dst, PORT, 50),
            50,
            "udp from peer {src}"
        );
        assert_eq!(
            udp_delivered(&p.b, other, &p.a, dst, PORT, 50),
            0,
            "udp from non-peer {other}"
        );
        assert!(
            tcp_connects(&p.b, src, &p.a, dst, PORT + 1),
            "tcp from peer {src}"
        );
        assert!(
            !tcp_connects(&p.b, other, &p.a, dst, PORT + 2),
            "tcp from non-peer {other}"
        );
    }
    let stats = fwctl_ok(&p.a, &pins, "stats --json");
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let c = &v[&p.a_if];
    assert!(c["peer"].as_u64().unwrap() >= 100, "{stats}");
    assert!(c["default_drop"].as_u64().unwrap() >= 100, "{stats}");
}

#[test]
fn peers_add_and_remove_take_effect_cidrs_included() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(22);
    fwctl_ok(&p.a, &pins, &format!("peers add 198.18.{}.0/29", p.net));
    assert!(p.b.ping(p.b4(5), p.a4()), "inside the CIDR");
    assert!(!p.b.ping(p.b4(9), p.a4()), "outside the CIDR (.8/29)");
    fwctl_ok(&p.a, &pins, &format!("peers add {}", p.b4(9)));
    assert!(p.b.ping(p.b4(9), p.a4()));
    fwctl_ok(
        &p.a,
        &pins,
        &format!("peers remove 198.18.{}.0/29 {}", p.net, p.b4(9)),
    );
    assert!(!p.b.ping(p.b4(5), p.a4()));
    assert!(!p.b.ping(p.b4(9), p.a4()));
    let list = fwctl_ok(&p.a, &pins, "peers list --json");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0,
        "{list}"
    );
    // Bad input changes nothing and says what to do.
    let o = fwctl(&p.a, &pins, &format!("peers add {} 198.18.1.7/24", p.b4(2)));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("did you mean 198.18.1.0/24"));
    assert!(
        !p.b.ping(p.b4(2), p.a4()),
        "the valid half of a bad command was not applied"
    );
}

#[test]
fn bpftool_dump_shows_field_names() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(23);
    fwctl_ok(
        &p.a,
        &pins,
        &format!("peers add {} 198.18.{}.0/24", p.b4(2), p.net + 1),
    );
    let d = |m: &str| {
        sh_ok(&format!(
            "bpftool map dump pinned {}/{m}",
            pins.path.display()
        ))
    };
    // `peers list --json` names the bucket an exact peer lives in; bpftool
    // looks that one bucket up, as the README tells operators to.
    let rows: serde_json::Value =
        serde_json::from_str(&fwctl_ok(&p.a, &pins, "peers list --json")).unwrap();
    let bucket = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["peer"] == format!("{}/32", p.b4(2)))
        .and_then(|r| r["bucket"].as_u64())
        .unwrap_or_else(|| panic!("no bucket for the exact peer in {rows}"));
    let key: String = (bucket as u32)
        .to_le_bytes()
        .iter()
        .map(|b| format!(" {b}"))
        .collect();
    let peers = sh_ok(&format!(
        "bpftool map lookup pinned {}/PEERS_V4 key{key}",
        pins.path.display()
    ));
    for field in [
        "\"addr\": [",
        "[198,18,23,2]",
        "\"spill\": 0",
        "\"added_gen\": 1",
        "\"removed_gen\": 18446744073709551615",
        "\"hits\"",
        "\"origin\": 1",
    ] {
        assert!(
            peers
                .replace([' ', '\n'], "")
                .contains(&field.replace(' ', "")),
            "{field} missing in {peers}"
        );
    }
    let ctrl = d("CTRL");
    assert!(
        ctrl.contains("\"committed_gen\": 1") && ctrl.contains("\"cidr4_count\""),
        "{ctrl}"
    );
    let counters = sh_ok(&format!(
        "bpftool map dump pinned {}/ifaces/{}/COUNTERS",
        pins.path.display(),
        p.a_if
    ));
    assert!(
        counters.contains("\"default_drop\"") && counters.contains("\"cpu\""),
        "{counters}"
    );
    let cidr = d("CIDR4_1");
    assert!(
        cidr.contains("\"prefixlen\": 24") || cidr.contains("\"prefix_len\": 24"),
        "{cidr}"
    );
}

#[test]
fn atomic_replace_keeps_peers_and_loses_no_packets() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(24);
    fwctl_ok(&p.a, &pins, &format!("peers add {}", p.b4(2)));
    let before: serde_json::Value =
        serde_json::from_str(&fwctl_ok(&p.a, &pins, "status --json")).unwrap();
    // A steady UDP stream from the peer while the program is replaced twice.
    let (src, dst) = (p.b4(2), p.a4());
    let rx =
        p.a.run(move || UdpSocket::bind(SocketAddr::new(dst, PORT)).unwrap());
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let bpath = p.b.path();
    let sender = firewall_tests::spawn_in(bpath, move || {
        let tx = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
        let mut sent = 0u32;
        while !d2.load(Ordering::Relaxed) || sent < 500 {
            tx.send_to(&sent.to_be_bytes(), SocketAddr::new(dst, PORT))
                .unwrap();
            sent += 1;
            std::thread::sleep(Duration::from_micros(500));
        }
        sent
    });
    let counter = std::thread::spawn(move || {
        let mut got = 0u32;
        let mut buf = [0u8; 8];
        while rx.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    for _ in 0..2 {
        let out = fwctl_ok(&p.a, &pins, &format!("attach --iface {}", p.a_if));
        assert!(out.contains("replaced"), "{out}");
    }
    done.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let got = counter.join().unwrap();
    assert_eq!(got, sent, "packets from a peer lost across atomic replace");
    let after: serde_json::Value =
        serde_json::from_str(&fwctl_ok(&p.a, &pins, "status --json")).unwrap();
    let (bi, ai) = (&before["interfaces"][0], &after["interfaces"][0]);
    assert_eq!(bi["link_id"], ai["link_id"], "same link");
    assert_ne!(bi["prog_id"], ai["prog_id"], "new program");
    assert_eq!(after["datapath"]["peer_count"], 1);
    assert!(!p.b.ping(p.b4(3), p.a4()), "still enforcing after replace");
}

#[test]
fn detach_restores_traffic_and_reattach_keeps_peers() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(25);
    fwctl_ok(&p.a, &pins, &format!("peers add {}", p.b4(2)));
    assert!(!p.b.ping(p.b4(3), p.a4()));
    fwctl_ok(&p.a, &pins, &format!("detach --iface {}", p.a_if));
    assert!(p.b.ping(p.b4(3), p.a4()), "traffic flows once detached");
    assert!(
        !p.a.sh_ok(&format!("ip link show dev {}", p.a_if))
            .contains("xdp"),
        "no XDP left"
    );
    fwctl_ok(&p.a, &pins, &format!("attach --iface {}", p.a_if));
    assert!(p.b.ping(p.b4(2), p.a4()), "peers survived detach");
    assert!(!p.b.ping(p.b4(3), p.a4()));
    fwctl_ok(&p.a, &pins, &format!("detach --iface {} --purge", p.a_if));
    assert!(
        !pins.path.join("PEERS_V4").exists(),
        "purge removes the maps"
    );
}

/// VLAN-tagged traffic over the wire. This kernel is built without
/// CONFIG_VLAN_8021Q and without bridge VLAN filtering, so no VLAN
/// sub-interface can exist on it; instead the peer side writes real 802.1Q and
/// QinQ frames onto the veth, and a packet socket behind the XDP program counts
/// which ones it passed.
#[test]
fn vlan_tagged_frames_on_the_wire() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(26);
    fwctl_ok(&p.a, &pins, &format!("peers add {} {}", p.b4(2), p.b6(2)));
    let (dmac, smac) = (
        firewall_tests::mac_of(&p.a, &p.a_if),
        firewall_tests::mac_of(&p.b, &p.b_if),
    );
    let mut sport = 20000u16;
    let mut build = |src: IpAddr, dst: IpAddr, tags: &[(u16, u16)]| {
        sport += 1;
        let mut f = firewall_tests::packet::Frame::new(
            src,
            dst,
            firewall_tests::packet::L4::Udp { sport, dport: PORT },
        )
        .payload(16);
        for t in tags {
            f = f.vlan(t.0, t.1);
        }
        let mut b = f.build();
        b[..6].copy_from_slice(&dmac);
        b[6..12].copy_from_slice(&smac);
        (sport, b)
    };
    for tags in [
        &[(0x8100u16, 10u16)][..],
        &[(0x88a8, 100), (0x8100, 10)][..],
    ] {
        let mut allowed = Vec::new();
        let mut denied = Vec::new();
        for _ in 0..20 {
            allowed.push(build(p.b4(2), p.a4(), tags));
            allowed.push(build(p.b6(2), p.a6(), tags));
            denied.push(build(p.b4(3), p.a4(), tags));
            denied.push(build(p.b6(3), p.a6(), tags));
        }
        assert_eq!(
            firewall_tests::raw_frames_passed(&p, allowed),
            40,
            "tagged frames from peers pass ({tags:?})"
        );
        assert_eq!(
            firewall_tests::raw_frames_passed(&p, denied),
            0,
            "tagged frames from non-peers are dropped ({tags:?})"
        );
    }
}

#[test]
fn another_tools_program_is_refused_without_force() {
    firewall_tests::require_kernel!();
    let p = Pair::new(27);
    let pins = PinDir::new();
    let foreign = PinDir::new();
    // Another tool's program: our pass_floor, loaded and attached by iproute2.
    std::fs::create_dir_all(&foreign.path).unwrap();
    {
        let mut ebpf = aya::Ebpf::load(firewall_tests::BENCH_OBJ).unwrap();
        let prog: &mut aya::programs::Xdp =
            ebpf.program_mut("pass_floor").unwrap().try_into().unwrap();
        prog.load().unwrap();
        prog.pin(foreign.path.join("prog")).unwrap();
    }
    p.a.sh_ok(&format!(
        "ip link set dev {} xdpgeneric pinned {}/prog",
        p.a_if,
        foreign.path.display()
    ));
    let o = fwctl(&p.a, &pins, &format!("attach --iface {}", p.a_if));
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert!(p.b.ping(p.b4(3), p.a4()), "the other program is untouched");
    fwctl_ok(&p.a, &pins, &format!("attach --iface {} --force", p.a_if));
    assert!(!p.b.ping(p.b4(3), p.a4()), "ours replaced it");
}

#[test]
fn a_full_map_is_refused_before_the_flip() {
    firewall_tests::require_kernel!();
    let p = Pair::new(28);
    let pins = PinDir::new();
    fwctl_ok(
        &p.a,
        &pins,
        &format!("attach --iface {} --max-peers 4", p.a_if),
    );
    fwctl_ok(
        &p.a,
        &pins,
        &format!("peers add {} {} 198.19.250.1", p.b4(2), p.b4(3)),
    );
    let o = fwctl(&p.a, &pins, &format!("peers add {} 198.19.250.2", p.b4(4)));
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is full")
            && err.contains("--max-peers")
            && err.contains("nothing was committed"),
        "{err}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&fwctl_ok(&p.a, &pins, "status --json")).unwrap();
    assert_eq!(
        st["datapath"]["committed_generation"], 1,
        "no new generation"
    );
    assert_eq!(
        st["datapath"]["staged_generation"], 1,
        "nothing left staged"
    );
    assert!(
        p.b.ping(p.b4(2), p.a4()) && !p.b.ping(p.b4(4), p.a4()),
        "the old generation stays in force"
    );
    // A different capacity on existing pins is refused with what to do.
    let o = fwctl(
        &p.a,
        &pins,
        &format!("attach --iface {} --max-peers 8", p.a_if),
    );
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--purge"));
}
