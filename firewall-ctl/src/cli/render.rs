//! Human-readable rendering of the datapath status and the daemon's typed
//! plan and status (the same types the daemon writes, so a renamed field
//! fails to compile here).

use crate::{
    daemon::contract::{ControllerStatus, Plan},
    datapath::status,
};

pub(super) fn print_status(st: &status::Status) {
    let d = &st.datapath;
    let s = &d.settings;
    // The policy first: in observe mode nothing is being dropped.
    println!(
        "policy      {}",
        match s.policy {
            crate::datapath::ctrl::Policy::Enforce =>
                "enforce (packets the allowlist does not pass are dropped)",
            crate::datapath::ctrl::Policy::Observe =>
                "OBSERVE (every packet passes; what enforce would drop is counted as would-drop)",
        }
    );
    println!(
        "replies     {}; flows {} of {} (idle timeouts tcp {} s, udp {} s, icmp {} s)",
        if s.replies { "on" } else { "off" },
        d.flows.map_or("?".into(), |n| n.to_string()),
        d.max_flows,
        s.flow_timeout_s[0],
        s.flow_timeout_s[1],
        s.flow_timeout_s[2]
    );
    println!(
        "flow filter {} of {} slots set{}",
        d.flow_filter_set.map_or("?".into(), |n| n.to_string()),
        d.flow_filter_slots,
        match d.flow_filter_set {
            Some(n) if d.flow_filter_slots > 0 && n * 2 > d.flow_filter_slots =>
                " (over half: is the controller running? it rebuilds the filter)",
            _ => "",
        }
    );
    println!(
        "events      {}",
        if s.event_rate == 0 {
            "off".to_string()
        } else {
            format!(
                "up to {} per second per CPU (`firewall-ctl monitor`)",
                s.event_rate
            )
        }
    );
    println!("pin dir     {}", st.pin_dir.display());
    println!(
        "generation  {} committed{}",
        d.committed_generation,
        if d.staged_generation > d.committed_generation {
            format!(", {} staged (not flipped)", d.staged_generation)
        } else {
            String::new()
        }
    );
    println!(
        "peers       {} (checksum {}), live CIDR tries: {} v4 / {} v6, capacity {} per family",
        d.peer_count, d.checksum, d.cidr4_live, d.cidr6_live, d.capacity_per_family
    );
    for m in &d.maps {
        println!("  map {:<9} id {:<6} {}", m.name, m.id, m.path.display());
    }
    if st.interfaces.is_empty() {
        println!("no interface attached");
    }
    for i in &st.interfaces {
        println!(
            "\ninterface {} (ifindex {}): {}",
            i.iface,
            i.ifindex.map_or("?".into(), |x| x.to_string()),
            if i.attached {
                format!("attached, mode {}", i.mode.as_deref().unwrap_or("?"))
            } else {
                "NOT attached".into()
            }
        );
        println!(
            "  program id {} tag {}  link id {}",
            i.prog_id.map_or("?".into(), |x| x.to_string()),
            i.prog_tag.as_deref().unwrap_or("?"),
            i.link_id.map_or("?".into(), |x| x.to_string())
        );
        if let Some(m) = &i.counters_map {
            println!("  map {:<9} id {:<6} {}", m.name, m.id, m.path.display());
        }
        println!(
            "  egress     {}",
            if i.egress_attached {
                format!(
                    "TC program {} records this node's flows",
                    i.egress_prog_id.map_or("?".into(), |x| x.to_string())
                )
            } else {
                "NOT attached: replies to this node's own connections drop".into()
            }
        );
        println!("  counters   {}", counters_line(&i.counters));
        println!(
            "  overlay allowlist compiled into the loaded program ({} rules):",
            i.overlay.len()
        );
        for r in &i.overlay {
            let mut s = format!("    {:<20} {}", r.cidr, r.proto);
            if let Some(p) = r.dport {
                s += &format!(" dport {p}");
            }
            if let Some(p) = r.sport {
                s += &format!(" sport {p}");
            }
            println!("{s}");
        }
        if let Some(p) = &i.problem {
            println!("  problem: {p}");
        }
    }
}

pub(super) fn print_plan(plan: &Plan) {
    println!(
        "generation {} committed; source: {} with {} members",
        plan.generation, plan.source.kind, plan.source.members
    );
    if let Some(f) = &plan.freeze {
        println!("deletions frozen: {f}");
    }
    let list = |what: &str, items: Vec<String>| {
        println!("{what}: {}", if items.is_empty() { "nothing" } else { "" });
        for i in items {
            println!("  {i}");
        }
    };
    list(
        "would add",
        plan.would_add.iter().map(|n| n.to_string()).collect(),
    );
    list(
        "would evict",
        plan.would_evict
            .iter()
            .map(|e| {
                format!(
                    "{} (absent since {} ms{})",
                    e.peer,
                    e.absent_since_ms,
                    if e.graceful { ", left gracefully" } else { "" }
                )
            })
            .collect(),
    );
    list("held", plan.held.iter().map(|n| n.to_string()).collect());
    list(
        "kept past the grace by the liveness rule",
        plan.kept_alive.iter().map(liveness_line).collect(),
    );
    list(
        "absent, not yet due",
        plan.absent_not_yet_due
            .iter()
            .map(|a| {
                format!(
                    "{} since {} ms, evict at {} ms",
                    a.peer, a.since_ms, a.evict_at_ms
                )
            })
            .collect(),
    );
}

pub(super) fn print_controller(ctl: Option<&ControllerStatus>) {
    let Some(v) = ctl else {
        println!(
            "\ncontroller: no status file (is `firewall-ctl run` running with this --state-dir?)"
        );
        return;
    };
    let c = &v.core;
    println!(
        "\ncontroller pid {} ({}), synced {}, last result: {}",
        v.pid,
        if v.running { "running" } else { "stopped" },
        c.synced,
        c.last_result.as_deref().unwrap_or("none")
    );
    for a in &c.alarms {
        println!("  ALARM {a}");
    }
    for a in &c.absent {
        println!(
            "  absent {} since {} ms, evict at {} ms{}",
            a.peer,
            a.since_ms,
            a.evict_at_ms,
            if a.graceful { " (left gracefully)" } else { "" }
        );
    }
    for a in c
        .awaiting_approval
        .iter()
        .filter(|a| !c.held.contains(&a.peer))
    {
        println!(
            "  held when its grace ends in {} s: {} (run `firewall-ctl approve` to review)",
            a.evict_at_ms.saturating_sub(c.now_ms).div_ceil(1000),
            a.peer
        );
    }
    for h in &c.held {
        println!("  held   {h} (run `firewall-ctl approve` to review)");
    }
    for l in &c.liveness {
        println!("  kept   {}", liveness_line(l));
    }
}

/// One peer the liveness rule keeps: why, what traffic, until when.
fn liveness_line(l: &firewall_controller::core::LivenessView) -> String {
    match l.state.as_str() {
        "traffic" => format!(
            "{}: discovery says gone, traffic says alive (traffic in {} ticks, last at {} ms); evicted at {} ms unless traffic continues (grace ended at {} ms)",
            l.peer,
            l.traffic_ticks,
            l.last_traffic_ms.unwrap_or(0),
            l.deadline_ms,
            l.grace_end_ms
        ),
        _ => format!(
            "{}: watching its traffic for a whole window before evicting it, until {} ms (grace ended at {} ms)",
            l.peer, l.deadline_ms, l.grace_end_ms
        ),
    }
}

/// Every counter of one interface on one line.
pub(super) fn counters_line(c: &firewall_common::Counters) -> String {
    format!(
        "pass: overlay {} peer {} nonip {} neighbour {} reply {} | drop: default {} malformed {} | would drop (observe): default {} malformed {} | events {} suppressed {}",
        c.overlay,
        c.peer,
        c.nonip,
        c.neighbour,
        c.reply,
        c.default_drop,
        c.malformed,
        c.would_drop_default,
        c.would_drop_malformed,
        c.events,
        c.events_suppressed
    )
}
