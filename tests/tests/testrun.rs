//! The XDP program's verdicts on crafted frames, through BPF_PROG_TEST_RUN.
//! Each case checks the action and that exactly the expected counter moved.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::TestRun as _;
use firewall_common::{GEN_NEVER, Reason};
use firewall_tests::packet::{Ext, Frame, L4, arp};
use firewall_tests::{Harness, XDP_DROP, XDP_PASS};

const PEER4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 7);
const STRANGER4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 8);

fn peer6() -> Ipv6Addr {
    "2001:2:0:1::7".parse().unwrap()
}
fn stranger6() -> Ipv6Addr {
    "2001:2:0:1::8".parse().unwrap()
}

fn harness() -> Harness {
    let mut h = Harness::new();
    h.set_generation(3, [0, 0], [0, 0]);
    h.add_exact(PEER4.into(), 1, GEN_NEVER);
    h.add_exact(peer6().into(), 1, GEN_NEVER);
    h
}

#[track_caller]
fn expect(h: &Harness, f: &[u8], reason: Reason) {
    let (action, got) = h.run(f);
    assert_eq!(got, reason, "frame {f:02x?}");
    assert_eq!(
        action,
        if reason.passes() { XDP_PASS } else { XDP_DROP },
        "frame {f:02x?}"
    );
}

#[test]
fn peers_v4_v6_hit_and_miss() {
    firewall_tests::require_kernel!();
    let h = harness();
    expect(&h, &Frame::udp4(PEER4, 53).build(), Reason::Peer);
    expect(&h, &Frame::udp4(STRANGER4, 53).build(), Reason::DefaultDrop);
    expect(&h, &Frame::udp6(peer6(), 53).build(), Reason::Peer);
    expect(
        &h,
        &Frame::udp6(stranger6(), 53).build(),
        Reason::DefaultDrop,
    );
    // TCP and ICMP from a peer pass as well: the filter is by source.
    expect(
        &h,
        &Frame::new(
            PEER4.into(),
            Ipv4Addr::new(198, 18, 0, 1).into(),
            L4::Tcp {
                sport: 1,
                dport: 22,
            },
        )
        .build(),
        Reason::Peer,
    );
    expect(
        &h,
        &Frame::new(PEER4.into(), Ipv4Addr::new(198, 18, 0, 1).into(), L4::Icmp).build(),
        Reason::Peer,
    );
}

#[test]
fn vlan_and_qinq() {
    firewall_tests::require_kernel!();
    let h = harness();
    expect(
        &h,
        &Frame::udp4(PEER4, 53).vlan(0x8100, 10).build(),
        Reason::Peer,
    );
    expect(
        &h,
        &Frame::udp4(STRANGER4, 53).vlan(0x8100, 10).build(),
        Reason::DefaultDrop,
    );
    expect(
        &h,
        &Frame::udp6(peer6(), 53)
            .vlan(0x88a8, 100)
            .vlan(0x8100, 10)
            .build(),
        Reason::Peer,
    );
    expect(
        &h,
        &Frame::udp4(STRANGER4, 53)
            .vlan(0x88a8, 100)
            .vlan(0x8100, 10)
            .build(),
        Reason::DefaultDrop,
    );
    // A third tag could smuggle IP past a parser that stops at two: malformed.
    expect(
        &h,
        &Frame::udp4(PEER4, 53)
            .vlan(0x88a8, 1)
            .vlan(0x8100, 2)
            .vlan(0x8100, 3)
            .build(),
        Reason::Malformed,
    );
}

#[test]
fn ipv4_options_and_fragments() {
    firewall_tests::require_kernel!();
    let h = harness();
    let mut f = Frame::udp4(PEER4, 53);
    f.v4_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    expect(&h, &f.build(), Reason::Peer);
    f.src = STRANGER4.into();
    expect(&h, &f.build(), Reason::DefaultDrop);
    // 40 bytes of options (IHL 15).
    let mut f = Frame::udp4(STRANGER4, 4789);
    f.src = Ipv4Addr::new(198, 18, 3, 3).into();
    f.v4_options = vec![1; 40];
    expect(&h, &f.build(), Reason::Overlay);
    // A later fragment has no ports: it cannot match a port rule, but the
    // source check still applies.
    let mut frag = Frame::udp4(Ipv4Addr::new(198, 18, 3, 3), 4789);
    frag.v4_frag_offset = 0;
    expect(&h, &frag.build(), Reason::Overlay);
    frag.v4_frag_offset = 185;
    expect(&h, &frag.build(), Reason::DefaultDrop);
    let mut frag = Frame::udp4(PEER4, 4789);
    frag.v4_frag_offset = 185;
    expect(&h, &frag.build(), Reason::Peer);
}

#[test]
fn ipv6_extension_headers() {
    firewall_tests::require_kernel!();
    let h = harness();
    let overlay6: Ipv6Addr = "2001:2:0:f009::9".parse().unwrap();
    let chain = [
        Ext::HopByHop(0),
        Ext::DestOpts(1),
        Ext::Routing(0),
        Ext::Auth(1),
    ];
    let f = chain
        .iter()
        .cloned()
        .fold(Frame::udp6(overlay6, 4789), |f, e| f.ext(e));
    expect(&h, &f.build(), Reason::Overlay);
    let f = chain
        .iter()
        .cloned()
        .fold(Frame::udp6(stranger6(), 4789), |f, e| f.ext(e));
    expect(&h, &f.build(), Reason::DefaultDrop);
    // Five extension headers: past the walk's bound, malformed.
    let f = chain
        .iter()
        .cloned()
        .fold(Frame::udp6(peer6(), 53), |f, e| f.ext(e))
        .ext(Ext::DestOpts(0));
    expect(&h, &f.build(), Reason::Malformed);
    // First fragment keeps its ports; a later one does not.
    expect(
        &h,
        &Frame::udp6(overlay6, 4789)
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .build(),
        Reason::Overlay,
    );
    expect(
        &h,
        &Frame::udp6(overlay6, 4789)
            .ext(Ext::Fragment {
                offset: 100,
                more: false,
            })
            .build(),
        Reason::DefaultDrop,
    );
    expect(
        &h,
        &Frame::udp6(peer6(), 4789)
            .ext(Ext::Fragment {
                offset: 100,
                more: false,
            })
            .build(),
        Reason::Peer,
    );
}

#[test]
fn arp_and_neighbour_discovery_always_pass() {
    firewall_tests::require_kernel!();
    let h = harness();
    expect(&h, &arp(), Reason::NonIp);
    for typ in 133..=137 {
        let f = Frame::new(
            stranger6().into(),
            "ff02::1".parse::<Ipv6Addr>().unwrap().into(),
            L4::Icmpv6 { typ },
        )
        .hop_limit(255);
        expect(&h, &f.build(), Reason::Neighbour);
        // Also behind a hop-by-hop header (MLD-style) and a VLAN tag.
        expect(
            &h,
            &f.clone().ext(Ext::HopByHop(0)).vlan(0x8100, 7).build(),
            Reason::Neighbour,
        );
        // Off-link (hop limit below 255: it crossed a router, RFC 4861) or
        // fragmented (RFC 6980): not neighbour discovery, so a stranger's
        // packet of these types drops like any other.
        for hops in [64, 254, 1] {
            expect(&h, &f.clone().hop_limit(hops).build(), Reason::DefaultDrop);
        }
        expect(
            &h,
            &f.clone()
                .ext(Ext::Fragment {
                    offset: 0,
                    more: false,
                })
                .build(),
            Reason::DefaultDrop,
        );
    }
    // Echo requests from strangers are not neighbour discovery.
    let echo = Frame::new(
        stranger6().into(),
        "2001:2::1".parse::<Ipv6Addr>().unwrap().into(),
        L4::Icmpv6 { typ: 128 },
    );
    expect(&h, &echo.build(), Reason::DefaultDrop);
}

#[test]
fn overlay_port_rules() {
    firewall_tests::require_kernel!();
    let h = harness();
    let underlay = Ipv4Addr::new(198, 18, 200, 9);
    expect(&h, &Frame::udp4(underlay, 4789).build(), Reason::Overlay);
    expect(
        &h,
        &Frame::udp4(underlay, 4790).build(),
        Reason::DefaultDrop,
    );
    let tcp = |sport, dport| {
        Frame::new(
            underlay.into(),
            Ipv4Addr::new(198, 18, 0, 1).into(),
            L4::Tcp { sport, dport },
        )
        .build()
    };
    expect(&h, &tcp(50000, 7946), Reason::Overlay);
    expect(&h, &tcp(7946, 50000), Reason::Overlay);
    expect(&h, &tcp(2379, 50000), Reason::Overlay);
    expect(&h, &tcp(50000, 2379), Reason::DefaultDrop);
    // The right port from outside the overlay prefix is not overlay traffic.
    expect(
        &h,
        &Frame::udp4(Ipv4Addr::new(198, 19, 113, 9), 4789).build(),
        Reason::DefaultDrop,
    );
    expect(
        &h,
        &Frame::udp6("2001:2:0:f005::5".parse().unwrap(), 4789).build(),
        Reason::Overlay,
    );
    expect(
        &h,
        &Frame::udp6("2001:2:1::5".parse().unwrap(), 4789).build(),
        Reason::DefaultDrop,
    );
}

#[test]
fn cidr_peers_follow_the_live_slot() {
    firewall_tests::require_kernel!();
    let mut h = Harness::new();
    h.add_cidr(0, "198.19.4.0/24".parse().unwrap());
    h.add_cidr(1, "198.19.5.0/24".parse().unwrap());
    h.add_cidr(0, "2001:2:0:4::/64".parse().unwrap());
    let in4 = Frame::udp4(Ipv4Addr::new(198, 19, 4, 200), 53).build();
    let in5 = Frame::udp4(Ipv4Addr::new(198, 19, 5, 200), 53).build();
    let in6 = Frame::udp6("2001:2:0:4::99".parse().unwrap(), 53).build();
    h.set_generation(2, [1, 1], [1, 0]);
    expect(&h, &in4, Reason::Peer);
    expect(&h, &in5, Reason::DefaultDrop);
    expect(&h, &in6, Reason::Peer);
    h.set_generation(3, [1, 1], [1, 0]);
    expect(&h, &in4, Reason::DefaultDrop);
    expect(&h, &in5, Reason::Peer);
    expect(&h, &in6, Reason::DefaultDrop);
    // A zero count in the live slot skips the trie (the fast path).
    h.set_generation(2, [0, 1], [0, 0]);
    expect(&h, &in4, Reason::DefaultDrop);
}

#[test]
fn generation_tags_decide_visibility() {
    firewall_tests::require_kernel!();
    let mut h = Harness::new();
    let staged = Ipv4Addr::new(198, 19, 2, 1);
    let removed = Ipv4Addr::new(198, 19, 2, 2);
    let live = Ipv4Addr::new(198, 19, 2, 3);
    h.add_exact(staged.into(), 6, GEN_NEVER);
    h.add_exact(removed.into(), 1, 6);
    h.add_exact(live.into(), 2, GEN_NEVER);
    h.set_generation(5, [0, 0], [0, 0]);
    expect(&h, &Frame::udp4(staged, 53).build(), Reason::DefaultDrop);
    expect(&h, &Frame::udp4(removed, 53).build(), Reason::Peer);
    expect(&h, &Frame::udp4(live, 53).build(), Reason::Peer);
    h.set_generation(6, [0, 0], [0, 0]);
    expect(&h, &Frame::udp4(staged, 53).build(), Reason::Peer);
    expect(&h, &Frame::udp4(removed, 53).build(), Reason::DefaultDrop);
    expect(&h, &Frame::udp4(live, 53).build(), Reason::Peer);
}

#[test]
fn truncated_at_every_byte() {
    firewall_tests::require_kernel!();
    let h = harness();
    let frames = [
        Frame::udp4(PEER4, 53).vlan(0x8100, 5).build(),
        Frame::new(
            PEER4.into(),
            Ipv4Addr::new(198, 18, 0, 1).into(),
            L4::Tcp { sport: 1, dport: 2 },
        )
        .build(),
        Frame::udp6(peer6(), 53)
            .ext(Ext::HopByHop(1))
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .build(),
        Frame::new(
            stranger6().into(),
            "ff02::1".parse::<Ipv6Addr>().unwrap().into(),
            L4::Icmpv6 { typ: 135 },
        )
        .build(),
    ];
    let overlay = h.overlay();
    struct P;
    impl firewall_common::classify::PeerLookup for P {
        fn is_peer_v4(&self, s: [u8; 4]) -> bool {
            s == PEER4.octets()
        }
        fn is_peer_v6(&self, s: [u8; 16]) -> bool {
            s == peer6().octets()
        }
    }
    for f in frames {
        // TEST_RUN refuses frames shorter than an Ethernet header (EINVAL).
        for len in 14..=f.len() {
            let cut = &f[..len];
            let want = firewall_common::classify::classify(
                cut,
                &overlay,
                &P,
                &firewall_common::classify::NoFlows,
            );
            let (action, got) = h.run(cut);
            assert_eq!(got, want, "cut at {len}: {cut:02x?}");
            assert_eq!(action == XDP_PASS, want.passes());
        }
        // Truncated before the source address is known: always malformed.
        expect(&h, &f[..20], Reason::Malformed);
    }
}

#[test]
fn overlay_reads_back_from_the_loaded_program() {
    firewall_tests::require_kernel!();
    let h = Harness::new();
    let rules = h.overlay();
    let path = std::env::var("FIREWALL_OVERLAY")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../overlay.toml").into());
    let text = std::fs::read_to_string(path).unwrap();
    let want: Vec<_> = firewall_common::overlay_toml::parse(&text)
        .unwrap()
        .into_iter()
        .map(|r| r.rule)
        .collect();
    assert_eq!(rules, want);
    assert!(rules.iter().any(|r| r.dport == 4789 && r.family == 4));
}

#[test]
fn a_peer_past_a_full_home_bucket_is_found_by_following_spill() {
    firewall_tests::require_kernel!();
    let mut h = Harness::new();
    h.set_generation(3, [0, 0], [0, 0]);
    // Nine sources of 2001:2::/48 with the same home bucket: eight fill it,
    // the ninth spills into the next one. (Multiply-shift spreads runs of
    // consecutive addresses almost perfectly, so scattered ones are searched.)
    let mask = h.v6.buckets() - 1;
    let home = |a: Ipv6Addr| {
        firewall_common::hash6(
            firewall_common::words6(&a.octets()),
            &firewall_tests::TEST_SEED,
        ) & mask
    };
    let scattered = |i: u64| {
        let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 7);
        Ipv6Addr::from((0x2001_0002_0000u128 << 80) | (x as u128))
    };
    let mut by_home: std::collections::HashMap<u32, Vec<Ipv6Addr>> = Default::default();
    let same = (0..1_000_000u64)
        .map(scattered)
        .find_map(|a| {
            let v = by_home.entry(home(a)).or_default();
            v.push(a);
            (v.len() == 10).then(|| v.clone())
        })
        .expect("ten sources sharing a bucket");
    for a in &same[..9] {
        h.add_exact((*a).into(), 1, GEN_NEVER);
    }
    let rows = h.v6.find(&same[8].octets());
    assert_eq!(rows.len(), 1);
    assert_ne!(
        rows[0].0.bucket,
        home(same[8]),
        "the ninth lives past its home"
    );
    for a in &same[..9] {
        expect(&h, &Frame::udp6(*a, 53).build(), Reason::Peer);
    }
    // A stranger with the same home scans on, and misses.
    expect(&h, &Frame::udp6(same[9], 53).build(), Reason::DefaultDrop);
}

#[test]
fn an_origin_change_keeps_two_versions_and_the_address_visible() {
    firewall_tests::require_kernel!();
    // Generation 5 is committed; 6 changes the origin of both peers: the old
    // versions are marked removed at 6, the new ones added at 6. Both before
    // and after the flip, exactly one version is visible.
    let mut h = Harness::new();
    for a in [IpAddr::from(PEER4), IpAddr::from(peer6())] {
        h.add_exact(a, 2, 6);
        h.add_exact(a, 6, GEN_NEVER);
    }
    for generation in [5, 6] {
        h.set_generation(generation, [0, 0], [0, 0]);
        expect(&h, &Frame::udp4(PEER4, 53).build(), Reason::Peer);
        expect(&h, &Frame::udp6(peer6(), 53).build(), Reason::Peer);
    }
    // Before 2 or from a later removal on, neither version is.
    h.set_generation(1, [0, 0], [0, 0]);
    expect(&h, &Frame::udp4(PEER4, 53).build(), Reason::DefaultDrop);
    expect(&h, &Frame::udp6(peer6(), 53).build(), Reason::DefaultDrop);
}

#[test]
fn a_peers_hits_count_ticks_with_traffic_not_packets() {
    firewall_tests::require_kernel!();
    let h = harness();
    let val = |v6: bool| {
        let rows = if v6 {
            h.v6.find(&peer6().octets())
        } else {
            h.v4.find(&PEER4.octets())
        };
        assert_eq!(rows.len(), 1);
        rows[0].1
    };
    let mut out = vec![0u8; 256];
    for v6 in [false, true] {
        let frame = if v6 {
            Frame::udp6(peer6(), 53).build()
        } else {
            Frame::udp4(PEER4, 53).build()
        };
        // The first packet counts, and records its tick.
        expect(&h, &frame, Reason::Peer);
        let first = val(v6);
        assert_eq!(first.hits, 1, "v6={v6}");
        // 100,000 more in one run: each tick the run spans counts once at
        // most (the ticks only move forward), so the counter grows by no
        // more than the ticks between the first count and the last one,
        // where a packet counter would grow by 100,000.
        let r = h
            .prog()
            .test_run(aya::programs::TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: 100_000,
                ..Default::default()
            })
            .expect("test run");
        assert_eq!(r.return_value, XDP_PASS);
        let after = val(v6);
        let ticks = after.hit_tick.wrapping_sub(first.hit_tick) as u64;
        assert!(
            after.hits - first.hits <= ticks,
            "v6={v6}: {} counted over {ticks} ticks",
            after.hits - first.hits
        );
        // Traffic in a later tick always counts: what the liveness veto reads.
        let grew = (0..400).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            expect(&h, &frame, Reason::Peer);
            val(v6).hits > after.hits
        });
        assert!(grew, "v6={v6}: a packet in a later tick did not count");
    }
}

#[test]
fn the_verifier_keeps_three_quarters_of_its_budget() {
    firewall_tests::require_kernel!();
    // The kernel stops at 1M processed instructions. Unrolled bucket scans
    // inlined where packet pointers were still live once cost 490k: every
    // parse path walked them again. Keep a wide margin, so a change that
    // multiplies paths fails here and not at a user's attach.
    let h = Harness::new();
    let n = h
        .prog()
        .info()
        .unwrap()
        .verified_instruction_count()
        .expect("the kernel reports verified instructions");
    println!("verifier processed {n} instructions");
    assert!(n <= 250_000, "verifier processed {n} instructions");
}
