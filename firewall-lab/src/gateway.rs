//! `cargo xtask demo --scenario gateway`: the seed's trigger, a gateway
//! reload, replayed at fleet scale (12 nodes, two segments, two topologies),
//! naive against guarded, with the table and an SVG.

use anyhow::bail;
use firewall_tests::{
    kernel_available,
    lab::{GatewayRun, gateway_losses, gateway_run},
};

/// Nodes per segment: 12 in all, the issue's minimum, and what 2 cores carry
/// (see the footprint line the report prints).
const PER_SEGMENT: u8 = 6;

pub(crate) fn demo(which: Option<&str>) -> anyhow::Result<()> {
    if !kernel_available("gateway") {
        bail!("the gateway scenario needs root, the XDP object and serf (run `cargo xtask setup`)");
    }
    let mut runs = Vec::new();
    for naive in match which {
        Some("naive") => vec![true],
        Some("guarded") => vec![false],
        _ => vec![true, false],
    } {
        eprintln!(
            "== gateway reload: {}",
            if naive { "naive" } else { "guarded" }
        );
        runs.push(gateway_run(naive, PER_SEGMENT).map_err(anyhow::Error::msg)?);
    }
    report(&runs)
}

fn report(runs: &[GatewayRun]) -> anyhow::Result<()> {
    println!(
        "\nThe seed's trigger at fleet scale: 12 nodes in two segments joined by a gateway, Serf across all, topologies a (n1-n6) and b (n7-n12) by tag, every controller following both."
    );
    println!(
        "The gateway's links go down for 8 s and come back; meanwhile n1's agent restarts with its seed beyond the gateway, so its list for topology b is empty."
    );
    println!(
        "UDP between every pair every 50 ms. Lost = a 100 ms slot of a pair with nothing delivered.\n"
    );
    println!(
        "{:<28} {:<5} {:>8} {:>14} {:>14} {:>14} {:>8}",
        "mode", "node", "recv'd", "lost across", "lost other", "lost after", "evicted"
    );
    println!(
        "{:<28} {:<5} {:>8} {:>14} {:>14} {:>14} {:>8}",
        "", "", "", "the outage", "in the reload", "it was back", ""
    );
    for r in runs {
        let l = gateway_losses(r);
        for k in &r.nodes {
            let v = l.get(k).copied().unwrap_or_default();
            println!(
                "{:<28} {:<5} {:>8} {:>14} {:>14} {:>14} {:>8}",
                r.mode,
                format!("n{k}"),
                v.sent - v.across_outage - v.other_outage - v.after,
                v.across_outage,
                v.other_outage,
                v.after,
                r.evictions.get(k).copied().unwrap_or(0)
            );
        }
    }
    println!(
        "\nlost across the outage: between the segments while the gateway was down (the outage's own, unavoidable); lost other: anything else before the gateway was back (a firewall dropping a live peer); lost after: once the gateway was back."
    );
    println!();
    for r in runs {
        let l = gateway_losses(r);
        let after: u64 = l.values().map(|v| v.after).sum();
        let other: u64 = l.values().map(|v| v.other_outage).sum();
        let outage: u64 = l.values().map(|v| v.across_outage).sum();
        let evicted: usize = r.evictions.values().sum();
        println!(
            "{:<28} lost after the gateway was back: {after}; avoidable losses during the reload: {other}; across the outage: {outage}; evictions: {evicted}; every pair talks again {} after the gateway is back",
            r.mode,
            r.all_talk_ms
                .map_or("not within 120 s".to_string(), |ms| format!(
                    "{:.1} s",
                    ms as f64 / 1000.0
                ))
        );
        println!(
            "{:<28} footprint: 12 Serf agents and 12 controllers, {:.0} MB resident in all, {:.1} CPU-s over {:.0} s ({:.0}% of one core)",
            "",
            r.rss_mb,
            r.cpu_s,
            r.wall_s,
            100.0 * r.cpu_s / r.wall_s
        );
        for (t, e) in &r.events {
            println!("  [{}] t={:.1}s {e}", r.mode, *t as f64 / 1000.0);
        }
    }
    let svg = svg(runs);
    let dir = std::path::Path::new("target/demo");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("gateway.svg"), svg)?;
    println!("\ntimeline: {}", dir.join("gateway.svg").display());
    Ok(())
}

/// Packets per second delivered across the whole fleet, one panel per mode,
/// the outage shaded. Hand-written SVG: one polyline a panel.
fn svg(runs: &[GatewayRun]) -> String {
    let (w, ph, left, top) = (900.0, 200.0, 60.0, 30.0);
    let tmax = runs
        .iter()
        .flat_map(|r| r.log.iter().map(|e| e.0))
        .max()
        .unwrap_or(1) as f64;
    // 12 nodes x 11 peers x 20 pps.
    let ymax = 3000.0;
    let mut s = crate::svg::open(w, left, ph, top, runs.len());
    for (i, r) in runs.iter().enumerate() {
        let y0 = 20.0 + i as f64 * (ph + top + 40.0);
        let base = y0 + top + ph;
        let x = |t: u64| left + t as f64 / tmax * w;
        s += &format!(
            r#"<text x="{left}" y="{}" font-weight="bold">{}: packets/s delivered between all 12 nodes</text>"#,
            y0 + 12.0,
            r.mode
        );
        s += &format!(
            r##"<rect x="{}" y="{}" width="{}" height="{ph}" fill="#f3d9d9"/>"##,
            x(r.down_ms),
            y0 + top,
            x(r.up_ms) - x(r.down_ms)
        );
        s += &crate::svg::axes(
            left,
            w,
            y0 + top,
            ph,
            &[0.0, 1000.0, 2000.0, 3000.0],
            ymax,
            tmax,
        );
        let mut buckets = std::collections::BTreeMap::<u64, u64>::new();
        for (t, _, _, recv) in &r.log {
            if *recv {
                *buckets.entry(t / 500).or_default() += 1;
            }
        }
        let nb = r.log.iter().map(|e| e.0).max().unwrap_or(0) / 500;
        let pts: Vec<String> = (0..nb)
            .map(|b| {
                let pps = buckets.get(&b).copied().unwrap_or(0) as f64 * 2.0;
                format!("{:.1},{:.1}", x(b * 500), base - pps.min(ymax) / ymax * ph)
            })
            .collect();
        s += &format!(
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            pts.join(" ")
        );
        for (t, e) in &r.events {
            s += &format!(
                r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{base}" stroke="#888" stroke-dasharray="3,3"/><text x="{2}" y="{3}" fill="#555">{4}</text>"##,
                x(*t),
                y0 + top,
                x(*t) + 3.0,
                y0 + top + 12.0,
                e.split(':').next().unwrap_or(e)
            );
        }
    }
    s + "</svg>"
}
