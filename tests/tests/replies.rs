//! The reply rule, observe mode and drop events through BPF_PROG_TEST_RUN:
//! replies to live flows pass and nothing else from the same remote does;
//! ICMP errors pass only when their embedded packet is a live flow's, and
//! truncated or lying embedded headers match nothing; observe passes what
//! enforce drops and counts it; events carry the packet and obey the rate.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::RingBuf;
use firewall_common::{
    Reason,
    flow::{DropEvent, POLICY_ENFORCE, POLICY_OBSERVE},
};
use firewall_tests::packet::{Ext, Frame, L4};
use firewall_tests::{Harness, XDP_DROP, XDP_PASS, flow_key};

const LOCAL4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const REMOTE4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 7);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 254);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 8);
fn local6() -> Ipv6Addr {
    "2001:2::1".parse().unwrap()
}
fn remote6() -> Ipv6Addr {
    "2001:2:0:200::7".parse().unwrap()
}
fn router6() -> Ipv6Addr {
    "2001:2:0:200::fe".parse().unwrap()
}
const LPORT: u16 = 40000;
const ECHO_ID: u16 = 77;
const HOUR_NS: u64 = 3_600_000_000_000;

/// Live UDP, TCP and echo flows from the node to REMOTE (v4 and v6), and an
/// expired UDP flow to OTHER4 (idle two hours, past the one-hour timeout).
fn harness() -> Harness {
    let mut h = Harness::new();
    h.set_generation(3, [0, 0], [0, 0]);
    for (l, r, icmp) in [
        (IpAddr::from(LOCAL4), IpAddr::from(REMOTE4), 1),
        (local6().into(), remote6().into(), 58),
    ] {
        h.add_flow(flow_key(17, l, LPORT, r, 53), 0);
        h.add_flow(flow_key(6, l, LPORT, r, 443), 0);
        h.add_flow(flow_key(icmp, l, ECHO_ID, r, 0), 0);
    }
    h.add_flow(
        flow_key(17, LOCAL4.into(), LPORT, OTHER4.into(), 53),
        2 * HOUR_NS,
    );
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

fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Frame {
    Frame::new(src, dst, L4::Udp { sport, dport })
}

fn echo(src: IpAddr, dst: IpAddr, typ: u8, id: u16) -> Frame {
    Frame::new(
        src,
        dst,
        L4::IcmpMsg {
            typ,
            code: 0,
            rest: [(id >> 8) as u8, id as u8, 0, 1],
            body: vec![],
        },
    )
}

/// An ICMP(v6) error from `router` about `inner`, an IP packet the node sent.
fn error(router: IpAddr, local: IpAddr, typ: u8, code: u8, inner: Vec<u8>) -> Frame {
    Frame::new(
        router,
        local,
        L4::IcmpMsg {
            typ,
            code,
            rest: [0, 0, 0x05, 0x00],
            body: inner,
        },
    )
}

#[test]
fn replies_to_live_flows_pass_and_nothing_else_from_that_remote() {
    firewall_tests::require_kernel!();
    let mut h = harness();
    let (l4, r4, l6, r6) = (
        IpAddr::from(LOCAL4),
        IpAddr::from(REMOTE4),
        IpAddr::from(local6()),
        IpAddr::from(remote6()),
    );
    for (l, r) in [(l4, r4), (l6, r6)] {
        let er = if l.is_ipv6() { 129 } else { 0 };
        // The replies.
        expect(&h, &udp(r, l, 53, LPORT).build(), Reason::Reply);
        expect(
            &h,
            &Frame::new(
                r,
                l,
                L4::Tcp {
                    sport: 443,
                    dport: LPORT,
                },
            )
            .build(),
            Reason::Reply,
        );
        expect(&h, &echo(r, l, er, ECHO_ID).build(), Reason::Reply);
        // The same remote, another port or protocol, or a new connection.
        expect(&h, &udp(r, l, 54, LPORT).build(), Reason::DefaultDrop);
        expect(&h, &udp(r, l, 53, LPORT + 1).build(), Reason::DefaultDrop);
        expect(
            &h,
            &Frame::new(
                r,
                l,
                L4::Tcp {
                    sport: 53,
                    dport: LPORT,
                },
            )
            .build(),
            Reason::DefaultDrop,
        );
        expect(
            &h,
            &Frame::new(
                r,
                l,
                L4::Tcp {
                    sport: 50000,
                    dport: 22,
                },
            )
            .build(),
            Reason::DefaultDrop,
        );
        expect(
            &h,
            &echo(r, l, er, ECHO_ID + 1).build(),
            Reason::DefaultDrop,
        );
        // An echo *request* from the remote is not a reply.
        let req = if l.is_ipv6() { 128 } else { 8 };
        expect(&h, &echo(r, l, req, ECHO_ID).build(), Reason::DefaultDrop);
    }
    // Another host claiming to answer the flow.
    expect(
        &h,
        &udp(OTHER4.into(), l4, 53, LPORT + 1).build(),
        Reason::DefaultDrop,
    );
    // An idle flow past its timeout.
    expect(
        &h,
        &udp(OTHER4.into(), l4, 53, LPORT).build(),
        Reason::DefaultDrop,
    );
    // A later fragment carries no ports: not a reply.
    let mut frag = udp(r4, l4, 53, LPORT);
    frag.v4_frag_offset = 100;
    expect(&h, &frag.build(), Reason::DefaultDrop);
    let frag6 = udp(r6, l6, 53, LPORT).ext(Ext::Fragment {
        offset: 9,
        more: false,
    });
    expect(&h, &frag6.build(), Reason::DefaultDrop);
    // Through VLAN tags and IPv6 extension headers, as ingress parses them.
    expect(
        &h,
        &udp(r4, l4, 53, LPORT).vlan(0x8100, 7).build(),
        Reason::Reply,
    );
    expect(
        &h,
        &udp(r6, l6, 53, LPORT).ext(Ext::DestOpts(1)).build(),
        Reason::Reply,
    );
    // The timeout is per protocol: a UDP timeout below the flows' idle time.
    h.set_control(|c| c.flow_timeout_ns[1] = 1);
    // The datapath's clock is coarse (one tick): wait several ticks.
    std::thread::sleep(std::time::Duration::from_millis(50));
    expect(&h, &udp(r4, l4, 53, LPORT).build(), Reason::DefaultDrop);
    expect(&h, &echo(r4, l4, 0, ECHO_ID).build(), Reason::Reply);
    // --replies off: the pure allowlist.
    h.set_control(|c| {
        c.flow_timeout_ns = [HOUR_NS; 3];
        c.replies = 0;
    });
    expect(&h, &udp(r4, l4, 53, LPORT).build(), Reason::DefaultDrop);
    expect(&h, &echo(r6, l6, 129, ECHO_ID).build(), Reason::DefaultDrop);
}

#[test]
fn an_entry_under_a_flows_hash_but_holding_another_flow_matches_nothing() {
    firewall_tests::require_kernel!();
    let mut h = Harness::new();
    h.set_generation(3, [0, 0], [0, 0]);
    let (l, r) = (IpAddr::from(LOCAL4), IpAddr::from(REMOTE4));
    let wanted = flow_key(17, l, LPORT, r, 53);
    let other = flow_key(17, l, LPORT + 1, r, 53);
    // The table slot the reply will look up holds a different flow, as
    // after a 64-bit hash collision: the lookup finds it and must refuse it.
    let slot = firewall_common::flow::flow_hash(&wanted, &firewall_tests::TEST_SEED);
    h.add_flow_at(slot, other, 0);
    expect(&h, &udp(r, l, 53, LPORT).build(), Reason::DefaultDrop);
    expect(&h, &udp(r, l, 53, LPORT + 1).build(), Reason::DefaultDrop);
    h.add_flow(wanted, 0);
    expect(&h, &udp(r, l, 53, LPORT).build(), Reason::Reply);
}

#[test]
fn the_flow_filter_decides_which_packets_look_the_flow_up() {
    firewall_tests::require_kernel!();
    let mut h = Harness::new();
    h.set_generation(3, [0, 0], [0, 0]);
    let (l, r) = (IpAddr::from(LOCAL4), IpAddr::from(REMOTE4));
    let key = flow_key(17, l, LPORT, r, 53);
    let hash = firewall_common::flow::flow_hash(&key, &firewall_tests::TEST_SEED);
    let reply = udp(r, l, 53, LPORT).build();
    h.add_flow(key, 0);
    expect(&h, &reply, Reason::Reply);
    // Its byte cleared in the half in force: the datapath must take the
    // flow for absent without looking (this is what spares a drop the
    // lookup), though FLOWS still holds it.
    h.unmark_filter(hash);
    expect(&h, &reply, Reason::DefaultDrop);
    // The other half still has it (egress marks both): flipping to it, as
    // a rebuild does, brings the reply back.
    h.set_control(|c| c.flow_filter_half = 1);
    expect(&h, &reply, Reason::Reply);
    h.unmark_filter(hash);
    expect(&h, &reply, Reason::DefaultDrop);
    // A filter of size 0 (off): every packet looks its flow up.
    h.set_control(|c| c.flow_filter_lines = 0);
    expect(&h, &reply, Reason::Reply);
}

#[test]
fn egress_records_what_the_node_starts_through_tags_and_extension_headers_and_nothing_else() {
    firewall_tests::require_kernel!();
    let mut h = Harness::new();
    h.set_generation(3, [0, 0], [0, 0]);
    let (l4, r4, l6, r6) = (
        IpAddr::from(LOCAL4),
        IpAddr::from(REMOTE4),
        IpAddr::from(local6()),
        IpAddr::from(remote6()),
    );
    let chain = [Ext::HopByHop(0), Ext::DestOpts(1), Ext::Routing(0)];
    let with_chain = |f: Frame| chain.iter().cloned().fold(f, |f, e| f.ext(e));
    // (what the node sends, the flow it must record)
    let recorded = [
        (udp(l4, r4, 41000, 53), flow_key(17, l4, 41000, r4, 53)),
        (
            Frame::new(
                l4,
                r4,
                L4::Tcp {
                    sport: 41001,
                    dport: 443,
                },
            )
            .vlan(0x8100, 10),
            flow_key(6, l4, 41001, r4, 443),
        ),
        (
            udp(l6, r6, 41002, 123).vlan(0x88a8, 100).vlan(0x8100, 10),
            flow_key(17, l6, 41002, r6, 123),
        ),
        (
            with_chain(udp(l6, r6, 41003, 53)),
            flow_key(17, l6, 41003, r6, 53),
        ),
        (echo(l4, r4, 8, 0x4242), flow_key(1, l4, 0x4242, r4, 0)),
        (echo(l6, r6, 128, 0x4343), flow_key(58, l6, 0x4343, r6, 0)),
    ];
    for (frame, key) in &recorded {
        assert_eq!(
            h.egress(&frame.build()),
            0,
            "egress never drops (TC_ACT_OK)"
        );
        let hash = firewall_common::flow::flow_hash(key, &firewall_tests::TEST_SEED);
        let flows = h.flows();
        assert!(
            flows.iter().any(|(k, v)| *k == hash && v.key == *key),
            "{key:?} recorded from {frame:?}: {flows:?}"
        );
        assert!(h.filter_marked(hash), "{key:?}'s filter byte");
    }
    let n = h.flows().len();
    assert_eq!(n, recorded.len());
    // Not flows: an echo reply, ICMP that is not echo, another protocol, a
    // later fragment (no ports), three tags.
    for frame in [
        echo(l4, r4, 0, 0x4444),
        echo(l6, r6, 129, 0x4444),
        Frame::new(l4, r4, L4::Other(47)),
        udp(l6, r6, 41004, 53).ext(Ext::Fragment {
            offset: 100,
            more: false,
        }),
        udp(l4, r4, 41005, 53)
            .vlan(0x88a8, 1)
            .vlan(0x8100, 2)
            .vlan(0x8100, 3),
    ] {
        assert_eq!(h.egress(&frame.build()), 0);
        assert_eq!(h.flows().len(), n, "nothing recorded for {frame:?}");
    }
    // A flow in use gets its filter bytes back with its next refresh (at
    // most a second apart), should anything have cleared them.
    let (frame, key) = &recorded[0];
    let hash = firewall_common::flow::flow_hash(key, &firewall_tests::TEST_SEED);
    h.add_flow_at(hash, *key, 2_000_000_000);
    h.unmark_filter(hash);
    assert!(!h.filter_marked(hash));
    h.egress(&frame.build());
    assert!(h.filter_marked(hash), "re-marked with the refresh");
    // Replies off: nothing is recorded.
    h.set_control(|c| c.replies = 0);
    h.egress(&udp(l4, r4, 41006, 53).build());
    assert_eq!(h.flows().len(), n);
}

#[test]
fn icmp_errors_pass_only_about_live_flows_and_truncated_or_lying_ones_drop() {
    firewall_tests::require_kernel!();
    let h = harness();
    let (l4, r4, l6, r6) = (
        IpAddr::from(LOCAL4),
        IpAddr::from(REMOTE4),
        IpAddr::from(local6()),
        IpAddr::from(remote6()),
    );
    let sent4 = udp(l4, r4, LPORT, 53).payload(20).ip_bytes();
    let sent6 = udp(l6, r6, LPORT, 53).payload(20).ip_bytes();
    let (rt4, rt6) = (IpAddr::from(ROUTER4), IpAddr::from(router6()));
    // Fragmentation needed / packet too big / time exceeded / unreachable.
    expect(
        &h,
        &error(rt4, l4, 3, 4, sent4.clone()).build(),
        Reason::Reply,
    );
    expect(
        &h,
        &error(rt4, l4, 11, 0, sent4.clone()).build(),
        Reason::Reply,
    );
    expect(
        &h,
        &error(rt4, l4, 3, 3, sent4.clone()).build(),
        Reason::Reply,
    );
    expect(
        &h,
        &error(rt6, l6, 2, 0, sent6.clone()).build(),
        Reason::Reply,
    );
    expect(
        &h,
        &error(rt6, l6, 1, 4, sent6.clone()).build(),
        Reason::Reply,
    );
    expect(
        &h,
        &error(rt6, l6, 3, 0, sent6.clone()).build(),
        Reason::Reply,
    );
    // About the echo and TCP flows.
    let ping4 = echo(l4, r4, 8, ECHO_ID).ip_bytes();
    let ping6 = echo(l6, r6, 128, ECHO_ID).ip_bytes();
    expect(&h, &error(rt4, l4, 11, 0, ping4).build(), Reason::Reply);
    expect(&h, &error(rt6, l6, 3, 0, ping6).build(), Reason::Reply);
    let syn = Frame::new(
        l4,
        r4,
        L4::Tcp {
            sport: LPORT,
            dport: 443,
        },
    )
    .ip_bytes();
    expect(&h, &error(rt4, l4, 3, 4, syn).build(), Reason::Reply);

    // Not an error type: a redirect, an echo request, a v4 type in v6.
    expect(
        &h,
        &error(rt4, l4, 5, 0, sent4.clone()).build(),
        Reason::DefaultDrop,
    );
    expect(
        &h,
        &error(rt6, l6, 11, 0, sent6.clone()).build(),
        Reason::DefaultDrop,
    );
    // No flow: another port, another destination, the reverse direction.
    let other = udp(l4, r4, LPORT, 54).ip_bytes();
    expect(
        &h,
        &error(rt4, l4, 3, 4, other).build(),
        Reason::DefaultDrop,
    );
    let elsewhere = udp(l4, OTHER4.into(), LPORT + 1, 53).ip_bytes();
    expect(
        &h,
        &error(rt4, l4, 3, 4, elsewhere).build(),
        Reason::DefaultDrop,
    );
    let reverse = udp(r4, l4, 53, LPORT).ip_bytes();
    expect(
        &h,
        &error(rt4, l4, 3, 4, reverse).build(),
        Reason::DefaultDrop,
    );
    // Truncated: the embedded header, or its first 8 transport bytes.
    for cut in [0, 1, 19, 20, 23, 27] {
        let mut t = sent4.clone();
        t.truncate(cut);
        expect(&h, &error(rt4, l4, 3, 4, t).build(), Reason::DefaultDrop);
    }
    for cut in [0, 39, 40, 47] {
        let mut t = sent6.clone();
        t.truncate(cut);
        expect(&h, &error(rt6, l6, 2, 0, t).build(), Reason::DefaultDrop);
    }
    // The outer ICMP header itself cut short.
    let whole = error(rt4, l4, 3, 4, sent4.clone()).build();
    expect(&h, &whole[..14 + 20 + 6], Reason::DefaultDrop);
    // Lying headers: IHL below 5, another IP version, a later fragment.
    let mut ihl = sent4.clone();
    ihl[0] = 0x44;
    expect(&h, &error(rt4, l4, 3, 4, ihl).build(), Reason::DefaultDrop);
    let mut ver = sent4.clone();
    ver[0] = 0x65;
    expect(&h, &error(rt4, l4, 3, 4, ver).build(), Reason::DefaultDrop);
    let mut frag = sent4.clone();
    frag[7] = 8;
    expect(&h, &error(rt4, l4, 3, 4, frag).build(), Reason::DefaultDrop);
    let mut proto = sent4.clone();
    proto[9] = 6;
    expect(
        &h,
        &error(rt4, l4, 3, 4, proto).build(),
        Reason::DefaultDrop,
    );
    let mut ver6 = sent6.clone();
    ver6[0] = 0x40;
    expect(&h, &error(rt6, l6, 2, 0, ver6).build(), Reason::DefaultDrop);
    // An embedded IPv6 packet with an extension header is not walked.
    let ext = udp(l6, r6, LPORT, 53).ext(Ext::DestOpts(0)).ip_bytes();
    expect(&h, &error(rt6, l6, 2, 0, ext).build(), Reason::DefaultDrop);
    // An embedded IPv6 packet inside an IPv4 error, and the reverse.
    expect(
        &h,
        &error(rt4, l4, 3, 4, sent6.clone()).build(),
        Reason::DefaultDrop,
    );
    expect(
        &h,
        &error(rt6, l6, 2, 0, sent4.clone()).build(),
        Reason::DefaultDrop,
    );
}

#[test]
fn observe_passes_what_enforce_drops_and_counts_it_as_would_drop() {
    firewall_tests::require_kernel!();
    let mut h = harness();
    let stranger = udp(OTHER4.into(), LOCAL4.into(), 5000, 22).build();
    let malformed = &stranger[..14 + 10];
    let reply = udp(REMOTE4.into(), LOCAL4.into(), 53, LPORT).build();
    h.set_control(|c| c.policy = POLICY_OBSERVE);
    let before = h.counters();
    assert_eq!(h.run(&stranger), (XDP_PASS, Reason::DefaultDrop));
    assert_eq!(h.run(malformed), (XDP_PASS, Reason::Malformed));
    assert_eq!(h.run(&reply), (XDP_PASS, Reason::Reply));
    let after = h.counters();
    assert_eq!(after.would_drop_default - before.would_drop_default, 1);
    assert_eq!(after.would_drop_malformed - before.would_drop_malformed, 1);
    assert_eq!(after.default_drop, before.default_drop, "nothing dropped");
    assert_eq!(after.malformed, before.malformed);
    assert_eq!(after.reply - before.reply, 1);
    h.set_control(|c| c.policy = POLICY_ENFORCE);
    assert_eq!(h.run(&stranger), (XDP_DROP, Reason::DefaultDrop));
    assert_eq!(h.run(malformed), (XDP_DROP, Reason::Malformed));
    // An unknown policy word enforces.
    h.set_control(|c| c.policy = 7);
    assert_eq!(h.run(&stranger), (XDP_DROP, Reason::DefaultDrop));
}

fn drain(ring: &mut RingBuf<aya::maps::MapData>) -> Vec<DropEvent> {
    let mut v = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= size_of::<DropEvent>());
        // SAFETY: the record holds a DropEvent (checked), plain integers.
        v.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DropEvent>()) });
    }
    v
}

#[test]
fn drop_events_carry_the_packet_and_obey_the_rate_limit() {
    firewall_tests::require_kernel!();
    let mut h = harness();
    let mut ring: RingBuf<_> = RingBuf::try_from(h.ebpf.take_map("EVENTS").unwrap()).unwrap();
    let stranger = udp(OTHER4.into(), LOCAL4.into(), 5000, 22)
        .payload(200)
        .build();
    let short = udp(OTHER4.into(), LOCAL4.into(), 5000, 23).build();
    let peerless_reply = udp(REMOTE4.into(), LOCAL4.into(), 53, LPORT).build();

    // Off by default in the harness: nothing is emitted or counted.
    h.run(&stranger);
    assert!(drain(&mut ring).is_empty());
    assert_eq!(h.counters().events + h.counters().events_suppressed, 0);

    // 3 per second per CPU: a burst of 40 drops gives at most 3 per CPU
    // (plus what refills meanwhile) and counts the rest as suppressed.
    h.set_control(|c| c.event_rate = 3);
    for _ in 0..40 {
        h.run(&stranger);
    }
    h.run(&peerless_reply); // passes: no event
    let c = h.counters();
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    assert_eq!(c.events + c.events_suppressed, 40, "{c:?}");
    assert!(c.events >= 1 && c.events <= 3 * cpus + 2, "{c:?}");
    let events = drain(&mut ring);
    assert_eq!(events.len() as u64, c.events);
    let e = events[0];
    assert_eq!(e.reason, Reason::DefaultDrop as u32);
    assert_eq!(e.observed, 0);
    assert_eq!(e.len as usize, stranger.len());
    assert_eq!(e.cap_len, 128, "the first 128 bytes of a longer packet");
    assert_eq!(&e.data[..], &stranger[..128]);

    // A frame shorter than the capture is captured whole; observe marks it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    h.set_control(|c| c.policy = POLICY_OBSERVE);
    assert_eq!(h.run(&short).0, XDP_PASS);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].cap_len as usize, short.len());
    assert_eq!(&events[0].data[..short.len()], &short[..]);
    assert_eq!(events[0].observed, 1);
}
