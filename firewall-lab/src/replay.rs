//! `cargo xtask demo`: the seed incident replayed in a 4-node Serf lab, once
//! with the naive controller and once guarded, and the report (table, SVG).

use anyhow::bail;
use firewall_tests::kernel_available;
use std::collections::BTreeMap;

/// One replay of the seed incident in a 4-node Serf lab, with live traffic
/// between every pair of nodes:
///   n1 is n2's only Serf seed. n1 dies (agent and node). Then n2's Serf
///   agent restarts: with its seed down it reports only itself for ~30 s,
///   which is the post-mortem's "empty node list".
pub(crate) struct Replay {
    pub(crate) mode: &'static str,
    pub(crate) log: Vec<(u64, u8, u8, bool)>,
    pub(crate) events: Vec<(u64, String)>,
    pub(crate) evictions: BTreeMap<u8, Vec<String>>,
}

pub(crate) fn replay(naive: bool) -> anyhow::Result<Replay> {
    use firewall_tests::lab::{Lab, Mesh};
    use std::time::{Duration, Instant};
    let (guards, mode) = firewall_tests::lab::comparison(naive);
    eprintln!("== replay: {mode}");
    let mut lab = Lab::new(4, guards);
    // n2's only seed is n1; the others know everyone.
    let seeds: [(u8, &[u8]); 4] = [(1, &[2, 3, 4]), (2, &[1]), (3, &[1, 2, 4]), (4, &[1, 2, 3])];
    for (k, s) in seeds {
        lab.start_serf(k, s);
    }
    for k in 1..=4 {
        lab.start_ctl(k);
    }
    let t = Instant::now();
    while !(1..=4).all(|k| lab.allowed(k).len() == 4) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the lab did not converge in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "   converged: every node allows all 4 nodes ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let mesh = Mesh::start(&lab, 20);
    let mut events = Vec::new();
    std::thread::sleep(Duration::from_secs(3));
    events.push((mesh.now_ms(), "n1 dies (n2's only seed)".to_string()));
    mesh.silence(1);
    lab.kill_ctl(1);
    lab.kill_serf(1);
    std::thread::sleep(Duration::from_secs(1));
    events.push((
        mesh.now_ms(),
        "n2's Serf agent restarts, seed down: it sees only itself".to_string(),
    ));
    lab.kill_serf(2);
    lab.start_serf(2, &[1]);
    // Until n2's agent hears of the others again (push/pull, ~30 s).
    let t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let m = lab.serf_members(2);
        if m.iter().filter(|(n, s)| n != "n2" && s == "alive").count() >= 2 {
            events.push((mesh.now_ms(), "n2's agent sees n3 and n4 again".to_string()));
            break;
        }
        // Only the others' push/pull can tell n2's new agent about them:
        // every 30 s each of n3 and n4 picks one random alive member, so an
        // interval misses n2 with probability 1/4. 100 s (three intervals)
        // failed about one run in 64; 240 s fails about one in 65,000.
        if t.elapsed() > Duration::from_secs(240) {
            let log = std::fs::read_to_string(lab.node(2).dir.join("serf.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            let n3 = lab.serf_members(3);
            bail!(
                "n2's agent never recovered; n3 sees {n3:?}; n2's serf log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    std::thread::sleep(Duration::from_secs(5));
    let log = mesh.stop();
    let evictions = (2..=4)
        .map(|k| (k, lab.evictions(k).into_iter().map(|(p, _, _)| p).collect()))
        .collect();
    Ok(Replay {
        mode,
        log,
        events,
        evictions,
    })
}

pub(crate) fn replay_main(which: Option<&str>) -> anyhow::Result<()> {
    if !kernel_available("replay") {
        bail!("the replay needs root, the XDP object and serf (run `cargo xtask setup`)");
    }
    let runs = match which {
        Some("naive") => vec![replay(true)?],
        Some("guarded") => vec![replay(false)?],
        _ => vec![replay(true)?, replay(false)?],
    };
    report(&runs)
}

pub(crate) fn demo() -> anyhow::Result<()> {
    replay_main(None)
}

/// Losses among live nodes, per receiving node: (sent, lost, first loss ms, last loss ms).
pub(crate) fn losses(r: &Replay) -> BTreeMap<u8, (u64, u64, Option<u64>, Option<u64>)> {
    let live = [2u8, 3, 4];
    let mut out: BTreeMap<u8, (u64, u64, Option<u64>, Option<u64>)> = BTreeMap::new();
    // Match sends to receives per (src, dst) in 100 ms buckets: a bucket whose
    // sends did not all arrive is a loss at that time.
    let mut sent: BTreeMap<(u8, u8, u64), u64> = BTreeMap::new();
    let mut got: BTreeMap<(u8, u8, u64), u64> = BTreeMap::new();
    for (t, s, d, recv) in &r.log {
        if live.contains(s) && live.contains(d) {
            let key = (*s, *d, t / 100);
            *(if *recv {
                got.entry(key)
            } else {
                sent.entry(key)
            })
            .or_default() += 1;
        }
    }
    for ((s, d, b), n) in &sent {
        let e = out.entry(*d).or_default();
        e.0 += n;
        let arrived = got.get(&(*s, *d, *b)).copied().unwrap_or(0)
            + got.get(&(*s, *d, b + 1)).copied().unwrap_or(0);
        if arrived == 0 {
            e.1 += n;
            e.2 = Some(e.2.map_or(b * 100, |x: u64| x.min(b * 100)));
            e.3 = Some(e.3.map_or(b * 100, |x: u64| x.max(b * 100)));
        }
    }
    out
}

pub(crate) fn report(runs: &[Replay]) -> anyhow::Result<()> {
    println!(
        "\nThe seed incident, replayed: n1 (n2's only seed) dies, then n2's Serf agent restarts and reports only itself for ~30 s."
    );
    println!(
        "Live traffic: every node sends UDP to every other node every 20 ms. Counted between the live nodes n2, n3, n4.\n"
    );
    println!(
        "{:<28} {:<6} {:>8} {:>8} {:>16} {:>28}",
        "mode", "node", "recv'd", "lost", "time to recover", "evicted by this node"
    );
    for r in runs {
        let l = losses(r);
        for k in 2u8..=4 {
            let (sent, lost, first, last) = l.get(&k).copied().unwrap_or_default();
            let recover = match (first, last) {
                (Some(a), Some(b)) => format!("{:.1} s", (b - a + 100) as f64 / 1000.0),
                _ => "no loss".into(),
            };
            let ev = &r.evictions[&k];
            println!(
                "{:<28} {:<6} {:>8} {:>8} {:>16} {:>28}",
                r.mode,
                format!("n{k}"),
                sent - lost,
                lost,
                recover,
                if ev.is_empty() {
                    "none".to_string()
                } else {
                    format!(
                        "{} ({})",
                        ev.len(),
                        ev.iter()
                            .map(|p| p
                                .trim_end_matches("/32")
                                .rsplit('.')
                                .next()
                                .unwrap_or("")
                                .to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }
            );
        }
    }
    for r in runs {
        for (t, e) in &r.events {
            println!("  [{}] t={:.1}s {e}", r.mode, *t as f64 / 1000.0);
        }
    }
    let svg = crate::svg::timeline_svg(runs);
    let dir = std::path::Path::new("target/demo");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("incident.svg"), &svg)?;
    println!("\ntimeline: {}", dir.join("incident.svg").display());
    Ok(())
}
