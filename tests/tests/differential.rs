//! Differential test: the kernel program and the pure-Rust reference
//! classifier (`firewall_common::classify`) must give the same verdict and the
//! same reason on at least 100,000 random and mutated frames per run, and the
//! kernel must never return XDP_ABORTED.
//!
//! The frames are built from a grammar (VLAN stacks, IPv4 options and
//! fragments, IPv6 extension chains, ports near the overlay rules, sources near
//! the peers) and then mutated (truncation, byte flips), so both well-formed
//! and broken frames reach every branch. The peer maps hold entries that are
//! visible, staged (not yet visible) and removed (no longer visible), so the
//! generation rules are compared too. The flow table holds live and expired
//! flows of non-peers, and the generator makes replies to them, echo
//! replies, and ICMP errors whose embedded packet is whole, truncated or
//! altered, so the reply rule is compared too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use firewall_common::{
    GEN_NEVER,
    classify::{PeerLookup, classify},
};
use firewall_tests::packet::{Ext, Frame, L4};
use firewall_tests::{FlowSet, Harness, XDP_ABORTED, XDP_PASS, flow_key};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};

const GEN: u64 = 10;

/// Sources drawn from a small pool so that hits, misses, staged and removed
/// entries, CIDR members and overlay members all occur often.
fn v4_pool() -> Vec<Ipv4Addr> {
    (0..16u8)
        .map(|i| Ipv4Addr::new(198, 18 + (i & 1), 7, i))
        .chain([
            Ipv4Addr::new(198, 19, 113, 5),
            Ipv4Addr::new(198, 19, 9, 77),
        ])
        .collect()
}
fn v6_pool() -> Vec<Ipv6Addr> {
    (0..16u16)
        .map(|i| {
            Ipv6Addr::new(
                0x2001,
                2,
                0,
                if i & 1 == 0 { 7 } else { 0xf007 },
                0,
                0,
                0,
                i,
            )
        })
        .chain([
            "2001:2:0:9::77".parse().unwrap(),
            "2001:2:0:1113::5".parse().unwrap(),
        ])
        .collect()
}

struct Peers {
    v4: Vec<([u8; 4], u64, u64)>,
    v6: Vec<([u8; 16], u64, u64)>,
}

impl PeerLookup for Peers {
    fn is_peer_v4(&self, s: [u8; 4]) -> bool {
        self.v4
            .iter()
            .any(|(a, add, rm)| *a == s && *add <= GEN && GEN < *rm)
            || (s[0] == 198 && s[1] == 19 && s[2] == 9)
    }
    fn is_peer_v6(&self, s: [u8; 16]) -> bool {
        self.v6
            .iter()
            .any(|(a, add, rm)| *a == s && *add <= GEN && GEN < *rm)
            || s[..8] == [0x20, 0x01, 0, 2, 0, 0, 0, 9]
    }
}

/// The node's end of the flows in the table, and its port for them.
const LOCAL4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
fn local6() -> Ipv6Addr {
    "2001:2::1".parse().unwrap()
}
const LOCAL_PORT: u16 = 40000;
const ECHO_ID: u16 = 77;

/// What the frame carries. `Error` is an ICMP error whose embedded packet
/// (built once the family is known) is one the node sent: to `inner_src`'s
/// pool address, cut to `cut` bytes past its IP header, one byte flipped.
#[derive(Clone, Debug)]
enum Payload {
    L4(L4),
    Error {
        typ: u8,
        inner: L4,
        inner_dst: usize,
        cut: usize,
        flip: Option<(usize, u8)>,
    },
}

fn l4() -> impl Strategy<Value = L4> {
    let port = prop_oneof![
        Just(4789u16),
        Just(7946),
        Just(2379),
        Just(53),
        Just(LOCAL_PORT),
        any::<u16>()
    ];
    prop_oneof![
        1 => (port.clone(), port.clone()).prop_map(|(s, d)| L4::Udp { sport: s, dport: d }),
        1 => (port.clone(), port).prop_map(|(s, d)| L4::Tcp { sport: s, dport: d }),
        1 => Just(L4::Icmp),
        3 => (128u8..=140).prop_map(|t| L4::Icmpv6 { typ: t }),
        1 => prop_oneof![Just(47u8), Just(132), any::<u8>()].prop_map(L4::Other),
        // Replies to the flows: from port 53 to the node's port, echo replies.
        2 => prop_oneof![Just(17u8), Just(6)].prop_map(|p| if p == 17 {
            L4::Udp { sport: 53, dport: LOCAL_PORT }
        } else {
            L4::Tcp { sport: 53, dport: LOCAL_PORT }
        }),
        1 => (prop_oneof![Just(0u8), Just(129), any::<u8>()], prop_oneof![Just(ECHO_ID), any::<u16>()])
            .prop_map(|(t, id)| L4::IcmpMsg {
                typ: t,
                code: 0,
                rest: [(id >> 8) as u8, id as u8, 0, 1],
                body: vec![],
            }),
    ]
}

fn payload() -> impl Strategy<Value = Payload> {
    // Error types of both families, and a few that are not errors.
    let typ = prop_oneof![Just(3u8), Just(11), Just(1), Just(2), Just(12), any::<u8>()];
    let inner = prop_oneof![
        Just(L4::Udp {
            sport: LOCAL_PORT,
            dport: 53
        }),
        Just(L4::Tcp {
            sport: LOCAL_PORT,
            dport: 53
        }),
        Just(L4::IcmpMsg {
            typ: 8,
            code: 0,
            rest: [0, ECHO_ID as u8, 0, 1],
            body: vec![]
        }),
        Just(L4::IcmpMsg {
            typ: 128,
            code: 0,
            rest: [0, ECHO_ID as u8, 0, 1],
            body: vec![]
        }),
        l4(),
    ];
    prop_oneof![
        3 => l4().prop_map(Payload::L4),
        1 => (
            typ,
            inner,
            0usize..18,
            prop_oneof![3 => Just(usize::MAX), 1 => 0usize..48],
            prop::option::weighted(0.25, (0usize..48, any::<u8>())),
        )
            .prop_map(|(typ, inner, inner_dst, cut, flip)| Payload::Error {
                typ,
                inner,
                inner_dst,
                cut,
                flip,
            }),
    ]
}

/// The payload as an L4 of the outer frame, the embedded packet built for
/// the outer family.
fn to_l4(p: Payload, v6: bool) -> L4 {
    match p {
        Payload::L4(l4) => l4,
        Payload::Error {
            typ,
            inner,
            inner_dst,
            cut,
            flip,
        } => {
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                (
                    local6().into(),
                    v6_pool()[inner_dst % v6_pool().len()].into(),
                )
            } else {
                (LOCAL4.into(), v4_pool()[inner_dst % v4_pool().len()].into())
            };
            let mut body = Frame::new(src, dst, inner).ip_bytes();
            let hdr: usize = if v6 { 40 } else { 20 };
            body.truncate(hdr.saturating_add(cut).min(body.len()));
            if let Some((i, b)) = flip {
                let i = i % body.len().max(1);
                if let Some(x) = body.get_mut(i) {
                    *x = b;
                }
            }
            L4::IcmpMsg {
                typ,
                code: 4,
                rest: [0, 0, 0x05, 0x00],
                body,
            }
        }
    }
}

fn ext() -> impl Strategy<Value = Ext> {
    prop_oneof![
        (0u8..3).prop_map(Ext::HopByHop),
        (0u8..3).prop_map(Ext::Routing),
        (0u8..3).prop_map(Ext::DestOpts),
        (0u8..3).prop_map(Ext::Auth),
        (prop_oneof![Just(0u16), 1u16..8191], any::<bool>())
            .prop_map(|(o, m)| Ext::Fragment { offset: o, more: m }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    Truncate(usize),
    Flip(usize, u8),
}

fn frame() -> impl Strategy<Value = Vec<u8>> {
    let vlans = prop::collection::vec(
        (prop_oneof![Just(0x8100u16), Just(0x88a8)], 0u16..4095),
        0..=3,
    );
    let v4 = (
        0..v4_pool().len(),
        payload(),
        prop_oneof![Just(0usize), 1usize..=10],
        prop_oneof![3 => Just(0u16), 1 => 1u16..8191],
        0usize..40,
    )
        .prop_map(|(i, l4, opt_words, frag, pay)| {
            let mut f =
                Frame::new(v4_pool()[i].into(), LOCAL4.into(), to_l4(l4, false)).payload(pay);
            f.v4_options = vec![1; opt_words * 4];
            f.v4_frag_offset = frag;
            f
        });
    let v6 = (
        0..v6_pool().len(),
        payload(),
        prop::collection::vec(ext(), 0..=5),
        0usize..40,
        // Neighbour discovery is only valid at 255: both sides of the rule.
        prop_oneof![4 => Just(255u8), 1 => Just(64), 1 => any::<u8>()],
    )
        .prop_map(|(i, l4, exts, pay, hops)| {
            let mut f = Frame::new(v6_pool()[i].into(), local6().into(), to_l4(l4, true))
                .payload(pay)
                .hop_limit(hops);
            f.v6_ext = exts;
            f
        });
    let mutation = prop_oneof![
        4 => Just(Mutation::None),
        2 => (0usize..200).prop_map(Mutation::Truncate),
        2 => (0usize..120, any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
    ];
    (prop_oneof![v4, v6], vlans, mutation, 0u8..20).prop_map(|(mut f, vlans, m, arp)| {
        f.vlans = vlans;
        let mut bytes = f.build();
        if arp == 0 {
            bytes[12] = 0x08;
            bytes[13] = 0x06;
        }
        match m {
            Mutation::None => {}
            Mutation::Truncate(n) => bytes.truncate(n.max(14)),
            Mutation::Flip(i, b) => {
                let i = i % bytes.len();
                bytes[i] = b;
            }
        }
        bytes
    })
}

#[test]
fn kernel_agrees_with_reference_on_100k_frames() {
    firewall_tests::require_kernel!();
    let mut h = Harness::new();
    let mut peers = Peers {
        v4: vec![],
        v6: vec![],
    };
    // Every third pooled source is a visible peer, every third+1 staged for
    // the next generation, every third+2 removed at this one.
    for (i, a) in v4_pool().iter().take(16).enumerate() {
        let (add, rm) = [(1, GEN_NEVER), (GEN + 1, GEN_NEVER), (1, GEN)][i % 3];
        h.add_exact((*a).into(), add, rm);
        peers.v4.push((a.octets(), add, rm));
    }
    for (i, a) in v6_pool().iter().take(16).enumerate() {
        let (add, rm) = [(1, GEN_NEVER), (GEN + 1, GEN_NEVER), (1, GEN)][i % 3];
        h.add_exact((*a).into(), add, rm);
        peers.v6.push((a.octets(), add, rm));
    }
    // GEN is even: slot 0 is live; slot 1 holds a CIDR that must not apply.
    h.add_cidr(0, "198.19.9.0/24".parse().unwrap());
    h.add_cidr(0, "2001:2:0:9::/64".parse().unwrap());
    h.add_cidr(1, "198.19.113.0/24".parse().unwrap());
    h.add_cidr(1, "2001:2:0:1113::/64".parse().unwrap());
    h.set_generation(GEN, [1, 1], [1, 1]);
    let overlay = h.overlay();
    // Flows to every pooled address (their peer entries decide first for the
    // visible ones): live for i % 2 == 0, idle for two hours (past the
    // harness's one-hour timeouts) otherwise, which the reference does not
    // hold.
    let mut flows = FlowSet::default();
    let ends: Vec<(IpAddr, IpAddr)> = v4_pool()
        .iter()
        .map(|a| (IpAddr::from(LOCAL4), IpAddr::from(*a)))
        .chain(
            v6_pool()
                .iter()
                .map(|a| (IpAddr::from(local6()), IpAddr::from(*a))),
        )
        .collect();
    for (i, (local, remote)) in ends.into_iter().enumerate() {
        let icmp = if local.is_ipv6() { 58 } else { 1 };
        for k in [
            flow_key(17, local, LOCAL_PORT, remote, 53),
            flow_key(6, local, LOCAL_PORT, remote, 53),
            flow_key(icmp, local, ECHO_ID, remote, 0),
        ] {
            if i % 2 == 0 {
                h.add_flow(k, 0);
                flows.0.insert(k);
            } else {
                h.add_flow(k, 7_200_000_000_000);
            }
        }
    }

    let cases: u32 = std::env::var("DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let seen = std::cell::RefCell::new(std::collections::HashMap::new());
    let result = runner.run(&frame(), |pkt| {
        let want = classify(&pkt, &overlay, &peers, &flows);
        let (action, got) = h.run(&pkt);
        prop_assert_ne!(action, XDP_ABORTED);
        prop_assert_eq!(got, want, "frame {:02x?}", pkt);
        prop_assert_eq!(action == XDP_PASS, want.passes());
        *seen.borrow_mut().entry(want).or_insert(0u32) += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    eprintln!("verdicts over {cases} frames: {seen:?}");
    // The generator must actually reach every verdict, or the test proves little.
    for r in firewall_common::Reason::ALL {
        assert!(
            seen.get(&r).copied().unwrap_or(0) > cases / 200,
            "reason {r:?} seen only {:?} times",
            seen.get(&r)
        );
    }
}
