//! The multi-node Serf lab with live traffic between all nodes: a node joins,
//! a node is killed, a controller is killed, the seed incident, a partition.
//! Outcomes are awaited with generous limits; no assertion is on elapsed time.

use std::time::Duration;

use firewall_tests::{
    lab::{Lab, Mesh, node_ip, pair_totals},
    wait_for,
};

/// Wait for every node in `nodes` to allow every one of `peers`; on timeout,
/// fail with the controllers' logs.
fn converge(lab: &Lab, nodes: &[u8], peers: &[u8], limit_s: u64) {
    if !wait_for(Duration::from_secs(limit_s), || {
        all_allow(lab, nodes, peers)
    }) {
        let logs: Vec<String> = lab
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "n{}: {}",
                    n.k,
                    std::fs::read_to_string(n.dir.join("state/daemon.log")).unwrap_or_default()
                )
            })
            .collect();
        panic!(
            "nodes {nodes:?} never all allowed {peers:?}:\n{}",
            logs.join("\n")
        );
    }
}

fn all_allow(lab: &Lab, nodes: &[u8], peers: &[u8]) -> bool {
    nodes.iter().all(|k| {
        let a = lab.allowed(*k);
        peers.iter().all(|p| a.contains(&node_ip(*p)))
    })
}

fn no_loss(log: &[(u64, u8, u8, bool)], live: &[u8]) {
    for ((s, d), (sent, got)) in pair_totals(log, live) {
        assert!(sent > 0, "n{s} sent nothing to n{d}");
        assert_eq!(sent, got, "n{s} -> n{d}: {sent} sent, {got} received");
    }
}

#[test]
fn serf_join_controller_kill_and_node_kill() {
    firewall_tests::require_kernel!();
    let mut lab = Lab::new(
        4,
        "grace_ms = 10000\ngraceful_grace_ms = 5000\nliveness_window_ms = 500",
    );
    for (k, seeds) in [(1u8, &[2u8, 3][..]), (2, &[1, 3]), (3, &[1, 2])] {
        lab.start_serf(k, seeds);
        lab.start_ctl(k);
    }
    converge(&lab, &[1, 2, 3], &[1, 2, 3], 60);

    // 1. A node joins: every other node allows it once Serf shows it alive.
    lab.start_serf(4, &[1, 2, 3]);
    lab.start_ctl(4);
    assert!(wait_for(Duration::from_secs(30), || lab
        .serf_members(1)
        .iter()
        .any(|(n, s)| n == "n4" && s == "alive")));
    assert!(
        wait_for(Duration::from_secs(30), || all_allow(
            &lab,
            &[1, 2, 3, 4],
            &[1, 2, 3, 4]
        )),
        "n4 never allowed everywhere"
    );

    // 2. The controller on n2 is killed: its datapath keeps enforcing.
    let mesh = Mesh::start(&lab, 20);
    std::thread::sleep(Duration::from_secs(1));
    lab.kill_ctl(2);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        all_allow(&lab, &[2], &[1, 3, 4]),
        "n2's datapath still holds its peers"
    );
    lab.start_ctl(2);

    // 3. n4 is killed: evicted everywhere after the grace, not before.
    std::thread::sleep(Duration::from_secs(1));
    mesh.silence(4);
    lab.kill_ctl(4);
    lab.kill_serf(4);
    assert!(wait_for(Duration::from_secs(30), || lab
        .serf_members(1)
        .iter()
        .any(|(n, s)| n == "n4" && s == "failed")));
    assert!(
        all_allow(&lab, &[1, 2, 3], &[4]),
        "Serf saying `failed` does not evict at once"
    );
    assert!(
        wait_for(Duration::from_secs(60), || [1u8, 2, 3]
            .iter()
            .all(|k| !lab.allowed(*k).contains(&node_ip(4)))),
        "n4 never evicted"
    );
    let log = mesh.stop();
    no_loss(&log, &[1, 2, 3]);
    for k in [1u8, 2, 3] {
        let ev = lab.evictions(k);
        assert_eq!(ev.len(), 1, "n{k} evicted exactly n4: {ev:?}");
        let (peer, since, at) = &ev[0];
        assert_eq!(peer, "198.18.0.14/32");
        assert!(
            *at >= since + 10_000,
            "n{k} evicted n4 {} ms after it went absent, grace is 10000",
            at - since
        );
    }
}

#[test]
fn serf_seed_incident_loses_no_packet() {
    firewall_tests::require_kernel!();
    // A short grace on purpose: the guards, not the grace, must hold.
    let mut lab = Lab::new(
        4,
        "grace_ms = 5000\ngraceful_grace_ms = 5000\nliveness_window_ms = 500",
    );
    for (k, seeds) in [
        (1u8, &[2u8, 3, 4][..]),
        (2, &[1]),
        (3, &[1, 2, 4]),
        (4, &[1, 2, 3]),
    ] {
        lab.start_serf(k, seeds);
        lab.start_ctl(k);
    }
    converge(&lab, &[1, 2, 3, 4], &[1, 2, 3, 4], 60);
    let mesh = Mesh::start(&lab, 20);
    std::thread::sleep(Duration::from_secs(2));
    mesh.silence(1);
    lab.kill_ctl(1);
    lab.kill_serf(1);
    std::thread::sleep(Duration::from_secs(1));
    // n2's agent reports only itself until push/pull from n3 or n4 reaches
    // it (each pushes every 30 s to one random alive node). Catch that window
    // right after the restart; if a push/pull happens to land first, restart
    // again, so the scenario does not depend on luck.
    let mut seen_alone = false;
    for _attempt in 0..3 {
        lab.kill_serf(2);
        lab.start_serf(2, &[1]);
        seen_alone = wait_for(Duration::from_secs(2), || {
            let m = lab.serf_members(2);
            m.iter().any(|(n, s)| n == "n2" && s == "alive")
                && m.iter().all(|(n, s)| n == "n2" || s != "alive")
        });
        if seen_alone {
            break;
        }
    }
    assert!(
        seen_alone,
        "n2's agent never reported only itself after a restart"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        all_allow(&lab, &[2], &[3, 4]),
        "n2 keeps its peers while its agent sees only itself"
    );
    assert!(
        // Push/pull from n3 or n4 is the only way back (see firewall-lab's
        // replay): 240 s makes a miss about one run in 65,000.
        wait_for(Duration::from_secs(240), || lab
            .serf_members(2)
            .iter()
            .filter(|(n, s)| n != "n2" && s == "alive")
            .count()
            >= 2),
        "n2's agent never recovered"
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = mesh.stop();
    no_loss(&log, &[2, 3, 4]);
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lab.node(2).dir.join("state/status.json")).unwrap(),
    )
    .unwrap();
    assert!(
        lab.evictions(2)
            .iter()
            .all(|(p, _, _)| p == "198.18.0.11/32"),
        "n2 evicted only the dead n1, if anything: {st}"
    );
}

#[test]
fn serf_partition_holds_and_heals() {
    firewall_tests::require_kernel!();
    let mut lab = Lab::new(4, "grace_ms = 120000\ngraceful_grace_ms = 60000");
    for (k, seeds) in [
        (1u8, &[2u8, 3, 4][..]),
        (2, &[1, 3, 4]),
        (3, &[1, 2, 4]),
        (4, &[1, 2, 3]),
    ] {
        lab.start_serf(k, seeds);
        lab.start_ctl(k);
    }
    converge(&lab, &[1, 2, 3, 4], &[1, 2, 3, 4], 60);
    lab.partition(3);
    // The isolated node sees everyone failed after 25-32 s.
    assert!(
        wait_for(Duration::from_secs(60), || lab
            .serf_members(3)
            .iter()
            .filter(|(n, s)| n != "n3" && s == "failed")
            .count()
            == 3),
        "n3 never saw the others fail"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        all_allow(&lab, &[3], &[1, 2, 4]),
        "the guards keep n3's peers while it sees everyone failed"
    );
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lab.node(3).dir.join("state/status.json")).unwrap(),
    )
    .unwrap();
    assert!(
        !st["core"]["alarms"].as_array().unwrap().is_empty(),
        "an alarm shows: {st}"
    );
    lab.heal(3);
    assert!(
        wait_for(Duration::from_secs(90), || (1..=4).all(|k| lab
            .serf_members(k)
            .iter()
            .filter(|(_, s)| s == "alive")
            .count()
            == 4)),
        "Serf never converged after the heal"
    );
    assert!(all_allow(&lab, &[1, 2, 3, 4], &[1, 2, 3, 4]));
    // The bridge-level cut left neighbour entries FAILED on both sides, and
    // Serf converging says nothing about every pair having re-resolved. One
    // run lost n3 -> n1's first 400 ms of the mesh to that. Resolve every
    // pair first (a ping through the firewall, retried while ARP settles);
    // the mesh after it must still lose nothing.
    for a in 1..=4u8 {
        for b in (1..=4u8).filter(|b| *b != a) {
            assert!(
                wait_for(Duration::from_secs(10), || lab
                    .node(a)
                    .ns
                    .ping(node_ip(a), node_ip(b))),
                "n{a} cannot reach n{b} after the heal"
            );
        }
    }
    let mesh = Mesh::start(&lab, 20);
    std::thread::sleep(Duration::from_secs(2));
    no_loss(&mesh.stop(), &[1, 2, 3, 4]);
}
