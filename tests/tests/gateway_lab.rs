//! The seed's trigger at fleet scale, guarded: 12 nodes in two segments
//! joined by a gateway, Serf across all, two topologies, the gateway reloads
//! and one node's list for a topology comes back empty. Once the gateway is
//! back nothing is lost, nobody was evicted, and every pair talks again.
//! (`cargo xtask demo --scenario gateway` runs it naive too.)

use firewall_tests::{
    lab::{gateway_losses, gateway_run},
    tool_available,
};

#[test]
fn a_gateway_reload_at_fleet_scale_loses_nothing_once_the_gateway_is_back() {
    firewall_tests::require_kernel!();
    let test = "a_gateway_reload_at_fleet_scale_loses_nothing_once_the_gateway_is_back";
    if !tool_available(test, "/usr/bin/serf") {
        return;
    }
    let r = gateway_run(false, 6).unwrap_or_else(|e| panic!("{e}"));
    let l = gateway_losses(&r);
    // The reload really cut the segments apart.
    let outage: u64 = l.values().map(|v| v.across_outage).sum();
    assert!(
        outage > 0,
        "the gateway reload dropped nothing: it did not happen"
    );
    for (k, v) in &l {
        assert!(v.sent > 0, "n{k} received nothing");
        assert_eq!(
            v.after, 0,
            "n{k} lost {} packets after the gateway was back",
            v.after
        );
        assert_eq!(
            v.other_outage, 0,
            "n{k} lost {} packets from its own segment during the reload",
            v.other_outage
        );
    }
    let evicted: usize = r.evictions.values().sum();
    assert_eq!(evicted, 0, "evictions: {:?}", r.evictions);
    assert!(
        r.all_talk_ms.is_some(),
        "not every pair talked again within 120 s of the gateway's return"
    );
}
