//! The firewall on a node's own NIC, with real traffic through a veth pair:
//! the node's TCP, UDP and ping get their replies while the same remote's
//! unsolicited traffic drops; ICMP errors about live flows pass (and lower
//! the path MTU); late replies drop; observe mode; the drop monitor.
//!
//! Namespace `a` is the node (firewall attached), `b` a host that is not a
//! peer unless a test makes it one.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use firewall_tests::{
    Pair, PinDir, TempDir, Traffic, fwctl, fwctl_bin, fwctl_ok, packet::Frame, packet::L4,
    tcp_connects, udp_answers, udp_delivered, wait_for,
};

fn setup(net: u8, extra: &str) -> (Pair, PinDir) {
    let p = Pair::new(net);
    let pins = PinDir::new();
    fwctl_ok(&p.a, &pins, &format!("attach --iface {} {extra}", p.a_if));
    (p, pins)
}

fn counters(p: &Pair, pins: &PinDir) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&fwctl_ok(&p.a, pins, "stats --json")).unwrap();
    v[&p.a_if].clone()
}

fn counter(p: &Pair, pins: &PinDir, name: &str) -> u64 {
    counters(p, pins)[name].as_u64().unwrap()
}

#[test]
fn the_nodes_own_tcp_udp_and_ping_get_replies_and_the_same_remotes_other_traffic_drops() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(81, "");
    for (a, b, other) in [(p.a4(), p.b4(2), p.b4(3)), (p.a6(), p.b6(2), p.b6(3))] {
        // The node starts them: replies pass.
        assert!(
            tcp_connects(&p.a, a, &p.b, b, 8080),
            "TCP from the node to {b}"
        );
        assert_eq!(
            udp_answers(&p.a, a, &p.b, b, 5353, 5),
            5,
            "UDP answers from {b}"
        );
        assert!(p.a.ping(a, b), "ping from the node to {b}");
        // The same remote, unsolicited: a new connection, another port, a ping.
        assert!(
            !tcp_connects(&p.b, b, &p.a, a, 8081),
            "TCP into the node from {b}"
        );
        assert_eq!(udp_delivered(&p.b, b, &p.a, a, 9999, 5), 0, "UDP from {b}");
        assert!(!p.b.ping(b, a), "ping into the node from {b}");
        // A host the node never talked to.
        assert!(!p.b.ping(other, a), "ping from {other}");
    }
    let c = counters(&p, &pins);
    assert!(c["reply"].as_u64().unwrap() > 0, "{c}");
    assert!(c["default_drop"].as_u64().unwrap() > 0, "{c}");
    // `flows` lists what the node started, from its side.
    let flows: Vec<serde_json::Value> =
        serde_json::from_str(&fwctl_ok(&p.a, &pins, "flows --json")).unwrap();
    for (proto, remote, port) in [
        ("tcp", p.b4(2), 8080),
        ("udp", p.b4(2), 5353),
        ("udp", p.b6(2), 5353),
        ("icmp", p.b4(2), 0),
        ("icmpv6", p.b6(2), 0),
    ] {
        assert!(
            flows.iter().any(|f| f["proto"] == proto
                && f["remote"] == remote.to_string()
                && f["remote_port"] == port
                && f["live"] == true),
            "{proto} flow to {remote}:{port} in {flows:?}"
        );
    }
    let text = fwctl_ok(&p.a, &pins, "flows");
    assert!(text.contains(&format!("{}:8080", p.b4(2))), "{text}");
    // The flow table is BTF-typed: bpftool prints its field names.
    let dump = firewall_tests::sh_ok(&format!(
        "bpftool map dump pinned {}/FLOWS",
        pins.path.display()
    ));
    for field in [
        "\"remote_port\": 8080",
        "\"local_port\"",
        "\"last_seen_ns\"",
    ] {
        assert!(dump.contains(field), "{field} in {dump}");
    }
    // The pure allowlist: the node's own replies drop again.
    fwctl_ok(
        &p.a,
        &pins,
        &format!("attach --iface {} --replies off", p.a_if),
    );
    assert_eq!(udp_answers(&p.a, p.a4(), &p.b, p.b4(2), 5354, 3), 0);
    assert!(!p.a.ping(p.a4(), p.b4(2)));
    let st = fwctl_ok(&p.a, &pins, "status");
    assert!(st.contains("replies     off"), "{st}");
}

#[test]
fn a_late_reply_after_the_idle_timeout_drops() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(82, "--flow-timeouts udp=2");
    let (a, b) = (p.a4(), p.b4(2));
    let server =
        p.b.run(move || UdpSocket::bind(SocketAddr::new(b, 7100)).unwrap());
    let client = p.a.run(move || {
        let c = UdpSocket::bind(SocketAddr::new(a, 0)).unwrap();
        c.connect(SocketAddr::new(b, 7100)).unwrap();
        c
    });
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    client.send(b"request").unwrap();
    let mut buf = [0u8; 32];
    let (_, from) = server.recv_from(&mut buf).unwrap();
    server.send_to(b"on time", from).unwrap();
    assert!(client.recv(&mut buf).is_ok(), "the prompt reply arrives");
    // Silence from the node for longer than the UDP timeout (2 s).
    std::thread::sleep(Duration::from_secs(4));
    let before = counter(&p, &pins, "default_drop");
    server.send_to(b"too late", from).unwrap();
    assert!(client.recv(&mut buf).is_err(), "the late reply drops");
    assert!(counter(&p, &pins, "default_drop") > before);
    // The node speaks again: the flow is live again.
    client.send(b"again").unwrap();
    let (_, from) = server.recv_from(&mut buf).unwrap();
    server.send_to(b"on time", from).unwrap();
    assert!(client.recv(&mut buf).is_ok());
}

/// The Internet checksum (RFC 1071).
#[test]
fn the_flow_filter_is_rebuilt_from_the_flow_table_and_every_live_flows_reply_survives_it() {
    firewall_tests::require_kernel!();
    use firewall_ctl::datapath::flows::FlowFilter;
    let (p, pins) = setup(86, "");
    let (a, b) = (p.a4(), p.b4(2));
    let server =
        p.b.run(move || UdpSocket::bind(SocketAddr::new(b, 7200)).unwrap());
    let client = |port: u16| {
        let c = p.a.run(move || {
            let c = UdpSocket::bind(SocketAddr::new(a, port)).unwrap();
            c.connect(SocketAddr::new(b, 7200)).unwrap();
            c
        });
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        c
    };
    // A request, then the server's answer: does it reach the client?
    let round = |c: &UdpSocket| {
        c.send(b"request").unwrap();
        let mut buf = [0u8; 32];
        let (_, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(b"reply", from).unwrap();
        c.recv(&mut buf).is_ok()
    };
    let first = client(7201);
    assert!(round(&first), "a reply before any rebuild");
    let filter = FlowFilter::open(&pins.path).unwrap();
    let (set, slots) = filter.fill();
    assert!(set >= 1 && slots >= 64 * 1024, "{set} of {slots}");
    let st: serde_json::Value =
        serde_json::from_str(&fwctl_ok(&p.a, &pins, "status --json")).unwrap();
    assert_eq!(st["datapath"]["flow_filter_set"], set, "{st}");

    // A rebuild flips the half in force; the flow's byte is in the new one.
    let half = filter.active_half();
    let r = filter.rebuild().unwrap();
    assert_eq!(filter.active_half(), 1 - half);
    assert!(r.flows >= 1 && r.set >= 1, "{r:?}");
    assert!(round(&first), "a reply after one rebuild");
    // A flow recorded now (egress marks both halves) gets its replies in
    // this half, and both keep them across the next flip.
    let second = client(7202);
    assert!(round(&second), "a new flow's reply");
    filter.rebuild().unwrap();
    assert_eq!(filter.active_half(), half);
    assert!(
        round(&first) && round(&second),
        "replies after two rebuilds"
    );

    // Flows that left the table leave the filter at the next rebuild.
    {
        let mut flows: aya::maps::HashMap<_, u64, firewall_common::flow::FlowVal> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
                aya::maps::MapData::from_pin(pins.path.join("FLOWS")).unwrap(),
            ))
            .unwrap();
        let keys: Vec<u64> = flows.keys().flatten().collect();
        for k in keys {
            flows.remove(&k).unwrap();
        }
    }
    let r = filter.rebuild().unwrap();
    assert_eq!((r.flows, r.set), (0, 0), "{r:?}");
    // And the node speaking again records the flow, byte and all.
    assert!(round(&first), "a reply once the node speaks again");
    assert!(filter.fill().0 >= 1);
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Send an ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6)
/// from `router` in namespace `b` to `local`, about `inner` (an IP packet
/// the node sent), through a raw socket: the kernel builds the IP header.
fn send_too_big(p: &Pair, router: IpAddr, local: IpAddr, mtu: u16, inner: Vec<u8>) {
    p.b.run(move || {
        let v6 = router.is_ipv6();
        let proto = if v6 {
            libc::IPPROTO_ICMPV6
        } else {
            libc::IPPROTO_ICMP
        };
        let mut msg = if v6 {
            vec![2, 0, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8]
        } else {
            vec![3, 4, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8]
        };
        msg.extend_from_slice(&inner);
        if !v6 {
            // ICMPv6 raw sockets have the kernel fill in the checksum.
            let c = checksum(&msg);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
        }
        firewall_tests::raw_send(router, local, proto, &msg).expect("send the ICMP error");
    });
}

#[test]
fn an_icmp_error_about_a_live_flow_passes_and_lowers_the_path_mtu_and_one_about_no_flow_drops() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(83, "");
    for (a, b, router, stranger, mtu, ip) in [
        (p.a4(), p.b4(2), p.b4(9), p.b4(3), 1200u16, "-4"),
        (p.a6(), p.b6(2), p.b6(9), p.b6(3), 1280, "-6"),
    ] {
        // A listener on the remote, so it answers with no port unreachable
        // of its own (which would pass as a reply too).
        let listener =
            p.b.run(move || UdpSocket::bind(SocketAddr::new(b, 7000)).unwrap());
        // A connected UDP socket on the node: a live flow, and a socket for
        // the kernel to deliver the error to.
        let client = p.a.run(move || {
            let c = UdpSocket::bind(SocketAddr::new(a, 0)).unwrap();
            c.connect(SocketAddr::new(b, 7000)).unwrap();
            c.send(b"big").unwrap();
            c
        });
        let lport = client.local_addr().unwrap().port();
        let sent = Frame::new(
            a,
            b,
            L4::Udp {
                sport: lport,
                dport: 7000,
            },
        )
        .ip_bytes();
        // The datagram may wait for neighbour resolution: the flow exists
        // once the egress program has seen it leave.
        assert!(wait_for(Duration::from_secs(5), || {
            let flows: Vec<serde_json::Value> =
                serde_json::from_str(&fwctl_ok(&p.a, &pins, "flows --json")).unwrap();
            flows
                .iter()
                .any(|f| f["remote"] == b.to_string() && f["local_port"] == lport)
        }));
        let replies = counter(&p, &pins, "reply");
        send_too_big(&p, router, a, mtu, sent[..sent.len().min(48)].to_vec());
        assert!(
            wait_for(Duration::from_secs(5), || counter(&p, &pins, "reply")
                > replies),
            "the error about {b} passes as a reply: {}",
            counters(&p, &pins)
        );
        let route = format!("ip {ip} route get {b}");
        assert!(
            wait_for(Duration::from_secs(5), || p
                .a
                .sh_ok(&route)
                .contains(&format!("mtu {mtu}"))),
            "the path MTU to {b} drops to {mtu}: {}",
            p.a.sh_ok(&route)
        );
        // The same error about a flow the node never had: dropped, and the
        // path MTU to that host stays.
        let none = Frame::new(
            a,
            stranger,
            L4::Udp {
                sport: lport,
                dport: 7001,
            },
        )
        .ip_bytes();
        let drops = counter(&p, &pins, "default_drop");
        send_too_big(&p, router, a, mtu, none[..none.len().min(48)].to_vec());
        assert!(wait_for(Duration::from_secs(5), || counter(
            &p,
            &pins,
            "default_drop"
        ) > drops));
        let route = format!("ip {ip} route get {stranger}");
        assert!(!p.a.sh_ok(&route).contains("mtu"), "{}", p.a.sh_ok(&route));
        drop((client, listener));
    }
}

#[test]
fn observe_counts_what_enforce_drops_and_switching_loses_no_peer_packet() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(84, "--policy observe");
    fwctl_ok(&p.a, &pins, &format!("peers add {}", p.b4(2)));
    let st: serde_json::Value =
        serde_json::from_str(&fwctl_ok(&p.a, &pins, "status --json")).unwrap();
    assert_eq!(st["datapath"]["settings"]["policy"], "observe");
    let text = fwctl_ok(&p.a, &pins, "status");
    assert!(
        text.starts_with("policy      OBSERVE"),
        "the policy comes first: {text}"
    );
    // A 2 kHz stream from the peer through every switch.
    let traffic = Traffic::start_every(
        &p.b,
        &[p.b4(2)],
        &p.a,
        p.a4(),
        6000,
        Duration::from_micros(500),
    );
    std::thread::sleep(Duration::from_millis(300));
    // Observe: a stranger's ping passes and counts as would-drop.
    let would = counter(&p, &pins, "would_drop_default");
    assert!(p.b.ping(p.b4(3), p.a4()), "observe passes a non-peer");
    assert!(counter(&p, &pins, "would_drop_default") > would);
    let drops = counter(&p, &pins, "default_drop");
    // Enforce: the same ping drops.
    let out = fwctl_ok(&p.a, &pins, "policy enforce");
    assert!(out.contains("policy enforce (was observe)"), "{out}");
    assert!(!p.b.ping(p.b4(3), p.a4()), "enforce drops a non-peer");
    assert!(counter(&p, &pins, "default_drop") > drops);
    // Observe again, and a re-attach keeps it.
    fwctl_ok(&p.a, &pins, "policy observe");
    fwctl_ok(&p.a, &pins, &format!("attach --iface {}", p.a_if));
    assert!(p.b.ping(p.b4(3), p.a4()), "the policy survives re-attach");
    // The re-attach swapped the egress program under its link: still one.
    let iface = p.a_if.clone();
    let egress = p.a.run(move || {
        aya::programs::SchedClassifier::query_tcx(&iface, aya::programs::TcAttachType::Egress)
            .map(|(_, progs)| progs.len())
            .unwrap()
    });
    assert_eq!(egress, 1, "one egress program after re-attach");
    fwctl_ok(&p.a, &pins, "policy enforce");
    std::thread::sleep(Duration::from_millis(300));
    let (_, sent, got) = traffic.stop()[0];
    assert!(sent > 1000, "the stream ran ({sent} sent)");
    assert_eq!(got, sent, "the peer lost packets across the switches");
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn monitor(p: &Pair, pins: &PinDir, args: &str) -> std::process::Child {
    Command::new("nsenter")
        .arg(format!("--net={}", p.a.path().display()))
        .arg(fwctl_bin())
        .arg("--pin-dir")
        .arg(&pins.path)
        .args(["monitor"])
        .args(args.split_whitespace())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn monitor")
}

#[test]
fn monitor_shows_drops_as_json_and_pcap_and_a_flood_is_rate_limited_in_the_kernel() {
    firewall_tests::require_kernel!();
    let (p, pins) = setup(85, "--event-rate 50");
    let dir = TempDir::new();
    // JSON lines: the drop's reason and addresses.
    // Eight events, four of each family: the kernel's own MLD reports from
    // the other namespace are default drops too, and with room for only two
    // events one of them once took the IPv6 packet's place (a CI failure).
    let m = monitor(
        &p,
        &pins,
        "--json --count 8 --duration 30 --reason default-drop",
    );
    for _ in 0..4 {
        assert_eq!(udp_delivered(&p.b, p.b4(3), &p.a, p.a4(), 9999, 1), 0);
        assert_eq!(udp_delivered(&p.b, p.b6(3), &p.a, p.a6(), 9999, 1), 0);
    }
    let out = m.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (src, dst) in [(p.b4(3), p.a4()), (p.b6(3), p.a6())] {
        assert!(
            events.iter().any(|e| e["reason"] == "default_drop"
                && e["src"] == src.to_string()
                && e["dst"] == dst.to_string()
                && e["proto"] == "udp"
                && e["dport"] == 9999
                && e["iface"] == p.a_if.as_str()
                && e["observed"] == false),
            "{src} -> {dst} in {events:?}"
        );
    }
    // A second monitor on the same pin directory is refused while one runs.
    let mut first = monitor(&p, &pins, "--duration 30");
    // Let the first one take the lock before the second tries: started
    // together, the second could win and the first be the one refused.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first monitor runs"
    );
    assert_eq!(
        fwctl(&p.a, &pins, "monitor --count 1 --duration 1")
            .status
            .code(),
        Some(5),
        "a second monitor is refused"
    );
    first.kill().unwrap();
    let _ = first.wait();
    // pcap: tcpdump reads it back.
    let pcap = dir.0.join("drops.pcap");
    let m = monitor(
        &p,
        &pins,
        &format!("--pcap {} --count 2 --duration 30", pcap.display()),
    );
    assert_eq!(udp_delivered(&p.b, p.b4(4), &p.a, p.a4(), 9998, 2), 0);
    let out = m.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let td = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&td.stdout);
    assert!(
        td.status.success(),
        "{}",
        String::from_utf8_lossy(&td.stderr)
    );
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains(&format!("> {}.9998: UDP", p.a4())), "{text}");
    assert!(text.contains(&format!("IP {}.", p.b4(4))), "{text}");
    // A flood of 20,000 dropped frames: at 50 events per second per CPU most
    // are suppressed (and counted) in the kernel, and the monitor's memory
    // stays flat.
    let mut m = Command::new("nsenter")
        .arg(format!("--net={}", p.a.path().display()))
        .arg(fwctl_bin())
        .arg("--pin-dir")
        .arg(&pins.path)
        .args(["monitor", "--json", "--duration", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kb(m.id());
    let before = counters(&p, &pins);
    let (dmac, smac) = (
        firewall_tests::mac_of(&p.a, &p.a_if),
        firewall_tests::mac_of(&p.b, &p.b_if),
    );
    let frames: Vec<(u16, Vec<u8>)> = (1..=20_000u16)
        .map(|sport| {
            let mut b = Frame::new(p.b4(5), p.a4(), L4::Udp { sport, dport: 9997 })
                .payload(16)
                .build();
            b[..6].copy_from_slice(&dmac);
            b[6..12].copy_from_slice(&smac);
            (sport, b)
        })
        .collect();
    assert_eq!(firewall_tests::raw_frames_passed(&p, frames), 0);
    let after = counters(&p, &pins);
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    // At least the flood (the peer namespace's own multicast listener
    // reports may add a drop or two).
    assert!(d("default_drop") >= 20_000, "{after}");
    assert_eq!(
        d("events") + d("events_suppressed"),
        d("default_drop"),
        "every drop is either an event or a suppressed one: {after}"
    );
    assert!(d("events_suppressed") > 10_000, "{after}");
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kb(m.id());
    assert!(
        rss_after < rss_before + 4096,
        "monitor RSS grew from {rss_before} kB to {rss_after} kB"
    );
    m.kill().unwrap();
    let _ = m.wait();
}
