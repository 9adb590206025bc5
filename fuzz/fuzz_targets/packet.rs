//! The XDP program against the reference classifier, on whatever frames the
//! fuzzer makes: the same reason, the verdict that reason implies, and never
//! XDP_ABORTED. Needs root (BPF_PROG_TEST_RUN), as every kernel test does.
#![no_main]

use std::{cell::RefCell, net::IpAddr};

use firewall_common::{
    GEN_NEVER,
    classify::{PeerLookup, classify},
};
use firewall_tests::{FlowSet, Harness, XDP_ABORTED, XDP_PASS, flow_key};
use libfuzzer_sys::fuzz_target;

const GEN: u64 = 4;

/// Visible, staged (GEN + 1) and removed (at GEN) peers, and a live CIDR.
const PEERS: [(&str, u64, u64); 6] = [
    ("198.18.7.1", 1, GEN_NEVER),
    ("198.18.7.2", GEN + 1, GEN_NEVER),
    ("198.18.7.3", 1, GEN),
    ("2001:2:0:7::1", 1, GEN_NEVER),
    ("2001:2:0:7::2", GEN + 1, GEN_NEVER),
    ("2001:2:0:7::3", 1, GEN),
];

struct Reference;

impl PeerLookup for Reference {
    fn is_peer_v4(&self, s: [u8; 4]) -> bool {
        visible(IpAddr::from(s)) || (s[0] == 198 && s[1] == 19 && s[2] == 9)
    }
    fn is_peer_v6(&self, s: [u8; 16]) -> bool {
        visible(IpAddr::from(s)) || s[..8] == [0x20, 0x01, 0, 2, 0, 0, 0, 9]
    }
}

fn visible(a: IpAddr) -> bool {
    PEERS
        .iter()
        .any(|(p, add, rm)| p.parse::<IpAddr>().unwrap() == a && *add <= GEN && GEN < *rm)
}

/// Live flows from the node (198.18.0.1 / 2001:2::1, port 40000 or echo id
/// 77) to 198.18.7.9 / 2001:2:0:7::9 (port 53): replies and ICMP errors
/// about them pass.
fn flows() -> Vec<firewall_common::flow::FlowKey> {
    let mut v = Vec::new();
    for (l, r, icmp) in [
        ("198.18.0.1", "198.18.7.9", 1u8),
        ("2001:2::1", "2001:2:0:7::9", 58),
    ] {
        let (l, r): (IpAddr, IpAddr) = (l.parse().unwrap(), r.parse().unwrap());
        v.push(flow_key(17, l, 40000, r, 53));
        v.push(flow_key(6, l, 40000, r, 53));
        v.push(flow_key(icmp, l, 77, r, 0));
    }
    v
}

type State = (Harness, Vec<firewall_common::OverlayRule>, FlowSet);

thread_local! {
    static H: RefCell<Option<State>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    // BPF_PROG_TEST_RUN takes frames from an Ethernet header up to a page.
    if data.len() < 14 || data.len() > 1500 {
        return;
    }
    H.with(|h| {
        let mut h = h.borrow_mut();
        let (h, overlay, live) = h.get_or_insert_with(|| {
            let mut h = Harness::new();
            for (p, add, rm) in PEERS {
                h.add_exact(p.parse().unwrap(), add, rm);
            }
            h.add_cidr(0, "198.19.9.0/24".parse().unwrap());
            h.add_cidr(0, "2001:2:0:9::/64".parse().unwrap());
            h.set_generation(GEN, [1, 0], [1, 0]);
            let mut live = FlowSet::default();
            for k in flows() {
                h.add_flow(k, 0);
                live.0.insert(k);
            }
            let overlay = h.overlay();
            (h, overlay, live)
        });
        let want = classify(data, overlay, &Reference, live);
        let (action, got) = h.run(data);
        assert_ne!(action, XDP_ABORTED);
        assert_eq!(got, want, "frame {data:02x?}");
        assert_eq!(action == XDP_PASS, want.passes());
    });
});
