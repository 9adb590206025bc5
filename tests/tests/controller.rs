//! The controller with live traffic: a file source that goes empty, partial
//! and back; a peer removed for good; and a controller SIGKILLed in the middle
//! of commits, again and again.

use std::{net::IpAddr, path::Path, time::Duration};

use firewall_tests::{
    Daemon, Pair, PinDir, TempDir, Traffic, fwctl_ok, wait_for, write_peers, write_raw,
};

const PORT: u16 = 6000;

fn config(dir: &Path, pins: &PinDir, iface: &str, guards: &str) -> std::path::PathBuf {
    let cfg = dir.join("firewall.toml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces = [\"{iface}\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\ntick_ms = 100\n[discovery]\nkind = \"file\"\npath = \"{}\"\npoll_ms = 200\n[guards]\n{guards}\n",
            pins.path.display(),
            dir.join("state").display(),
            dir.join("peers.json").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    cfg
}

/// The committed peers; empty until the daemon has attached.
fn peer_list(p: &Pair, pins: &PinDir) -> Vec<String> {
    let o = firewall_tests::fwctl(&p.a, pins, "peers list --json");
    if !o.status.success() {
        return vec![];
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["peer"].as_str().unwrap().to_string())
        .collect()
}

/// Write the first peers file, start `firewall-ctl run` with `guards` (and
/// extra environment), and wait until the initial peers are committed.
fn start(
    p: &Pair,
    pins: &PinDir,
    dir: &TempDir,
    initial: &[IpAddr],
    guards: &str,
    env: &[(&str, &str)],
) -> (std::path::PathBuf, std::path::PathBuf, Daemon) {
    let peers = dir.0.join("peers.json");
    write_peers(&peers, 1, initial);
    let cfg = config(&dir.0, pins, &p.a_if, guards);
    let d = Daemon::start_env(&p.a, &cfg, &dir.0.join("state"), env);
    assert!(
        wait_for(Duration::from_secs(20), || peer_list(p, pins).len()
            == initial.len()),
        "peers never committed: {}",
        d.log()
    );
    (peers, cfg, d)
}

fn assert_no_loss(report: &[(IpAddr, u32, u32)], live: &[IpAddr]) {
    for (src, sent, got) in report {
        if live.contains(src) {
            assert!(*sent > 0, "{src} sent nothing");
            assert_eq!(
                sent, got,
                "packets from live peer {src} were lost: sent {sent}, received {got}"
            );
        }
    }
}

#[test]
fn empty_then_partial_then_back_loses_no_packet() {
    firewall_tests::require_kernel!();
    let p = Pair::new(31);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let live = [p.b4(2), p.b4(3), p.b4(4)];
    // A short grace: it is the guards, not the grace, that must keep the peers.
    let (peers, _cfg, d) = start(
        &p,
        &pins,
        &dir,
        &live,
        "grace_ms = 3000\ngraceful_grace_ms = 1000\nliveness_window_ms = 500",
        &[],
    );
    let traffic = Traffic::start(&p.b, &live, &p.a, p.a4(), PORT, 10);
    std::thread::sleep(Duration::from_secs(2));
    // Empty for 20 s: a complete result with no members.
    write_raw(&peers, r#"{"revision": 2, "peers": []}"#);
    std::thread::sleep(Duration::from_secs(20));
    // Then partial: one member only, flagged incomplete; then a half-written file.
    write_raw(
        &peers,
        &format!(
            r#"{{"revision": 3, "complete": false, "peers": [{{"addr": "{}"}}]}}"#,
            live[0]
        ),
    );
    std::thread::sleep(Duration::from_secs(4));
    write_raw(&peers, r#"{"revision": 4, "peers": [{"addr": "198.18"#);
    std::thread::sleep(Duration::from_secs(4));
    write_peers(&peers, 5, &live);
    std::thread::sleep(Duration::from_secs(2));
    let report = traffic.stop();
    assert_no_loss(&report, &live);
    assert_eq!(peer_list(&p, &pins).len(), 3);
    let audit = d.audit();
    assert!(
        audit
            .iter()
            .all(|e| e["evicted"].as_array().is_none_or(|a| a.is_empty())),
        "nothing may be evicted: {audit:?}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("state/status.json")).unwrap())
            .unwrap();
    assert!(
        status["core"]["alarms"].as_array().unwrap().is_empty(),
        "back to clean: {status}"
    );
    drop(d);
}

#[test]
fn a_peer_removed_for_good_is_evicted_after_the_grace() {
    firewall_tests::require_kernel!();
    let p = Pair::new(32);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let live = [p.b4(2), p.b4(3), p.b4(4)];
    let gone = p.b4(5);
    let (peers, _cfg, d) = start(
        &p,
        &pins,
        &dir,
        &[live[0], live[1], live[2], gone],
        "grace_ms = 2000\ngraceful_grace_ms = 2000\nliveness_window_ms = 500",
        &[],
    );
    let traffic = Traffic::start(
        &p.b,
        &[live[0], live[1], live[2], gone],
        &p.a,
        p.a4(),
        PORT,
        10,
    );
    write_peers(&peers, 2, &live);
    assert!(
        wait_for(Duration::from_secs(30), || !peer_list(&p, &pins)
            .contains(&format!("{gone}/32"))),
        "never evicted: {}",
        d.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let report = traffic.stop();
    assert_no_loss(&report, &live);
    let (_, sent, got) = report.iter().find(|(s, _, _)| *s == gone).unwrap();
    assert!(
        got < sent,
        "the evicted peer's traffic is dropped after eviction"
    );
    // The controller's own record: evicted no earlier than absent_since + grace.
    let ev = d
        .audit()
        .into_iter()
        .find(|e| e["event"] == "commit" && !e["evicted"].as_array().unwrap().is_empty())
        .expect("an eviction in the audit log");
    let absent_since = ev["evicted"][0]["absent_since_ms"].as_u64().unwrap();
    assert_eq!(ev["evicted"][0]["peer"], format!("{gone}/32"));
    assert!(ev["ts_ms"].as_u64().unwrap() >= absent_since + 2000, "{ev}");
}

#[test]
fn repeated_sigkill_mid_commit_loses_no_packet_and_never_half_stages() {
    firewall_tests::require_kernel!();
    let p = Pair::new(33);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let live = [p.b4(2), p.b4(3), p.b4(4)];
    // Evictions as fast as the churn: tiny grace, no shrink guard, big budget.
    // The failpoint holds each commit 150 ms between stage and flip, so the
    // kills below land inside that window rather than by luck.
    let fp = [("FIREWALL_CTL_FAILPOINTS", "stage-to-flip-delay-ms=150")];
    let (peers, cfg, mut d) = start(
        &p,
        &pins,
        &dir,
        &live,
        "grace_ms = 300\ngraceful_grace_ms = 300\nliveness_window_ms = 500\nmax_shrink_fraction = 1.0\nmax_shrink_count = 100000\nevict_burst = 100000\nevict_rate_per_min = 6000000\nevict_max_per_window = 1000000",
        &fp,
    );
    let traffic = Traffic::start(&p.b, &live, &p.a, p.a4(), PORT, 5);
    // Churn: a changing set of 5,000..15,000 extra peers, rewritten every
    // 50 ms, so that staging takes long enough for kills to land inside it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let peers2 = peers.clone();
    let live2 = live;
    let churn = std::thread::spawn(move || {
        let mut rev = 2u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let extra = 5000 + (rev * 7919 % 10000) as u32;
            let shift = (rev * 104729 % 5000) as u32;
            let mut all: Vec<IpAddr> = live2.to_vec();
            all.extend((0..extra).map(|i| {
                let k = i + shift;
                IpAddr::from([198, 19, (k / 250 % 250) as u8, (k % 250) as u8])
            }));
            write_peers(&peers2, rev, &all);
            rev += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut kills = 0;
    let mut mid_stage = 0;
    let mut seed = 12345u64;
    while kills < 30 && (kills < 12 || mid_stage < 6) {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(200 + (seed >> 33) % 600));
        d.kill(libc::SIGKILL);
        kills += 1;
        // Right after the kill: what packets see is exactly a committed
        // generation (its live count and checksum match the visible set),
        // even when the kill landed between stage and flip.
        let st: serde_json::Value =
            serde_json::from_str(&fwctl_ok(&p.a, &pins, "status --json")).unwrap();
        if st["datapath"]["staged_generation"].as_u64()
            > st["datapath"]["committed_generation"].as_u64()
        {
            mid_stage += 1;
        }
        let list: serde_json::Value =
            serde_json::from_str(&fwctl_ok(&p.a, &pins, "peers list --json")).unwrap();
        let set: firewall_ctl::peers::PeerSet = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["peer"].as_str().unwrap().parse().unwrap(),
                    r["origin"].as_u64().unwrap() as u32,
                )
            })
            .collect();
        let digest = firewall_ctl::peers::Digest::of(&set);
        assert_eq!(
            st["datapath"]["peer_count"].as_u64().unwrap(),
            digest.count,
            "after kill {kills}"
        );
        assert_eq!(
            st["datapath"]["checksum"].as_str().unwrap(),
            format!("{:016x}", digest.sum),
            "after kill {kills}"
        );
        for l in &live {
            assert!(
                set.contains_key(&(*l).into()),
                "live peer {l} missing after kill {kills}"
            );
        }
        d = Daemon::start_env(&p.a, &cfg, &dir.0.join("state"), &fp);
    }
    assert!(
        mid_stage > 0,
        "none of {kills} kills landed between stage and flip"
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    let report = traffic.stop();
    assert_no_loss(&report, &live);
    let audit = d.audit();
    let starts = audit.iter().filter(|e| e["event"] == "started").count();
    let commits = audit.iter().filter(|e| e["event"] == "commit").count();
    assert!(
        starts > kills && commits >= 5,
        "starts {starts}, commits {commits}"
    );
    let cleaned: u64 = audit
        .iter()
        .filter_map(|e| e["cleaned_half_staged"].as_u64())
        .sum();
    assert!(
        cleaned > 0,
        "restarts after mid-stage kills must clean half-staged entries"
    );
    eprintln!(
        "{kills} SIGKILLs ({mid_stage} between stage and flip), {commits} commits, {cleaned} half-staged entries cleaned up on restart"
    );
}

#[test]
fn sighup_reloads_guards_keeps_state_and_refuses_a_bad_config() {
    firewall_tests::require_kernel!();
    let p = Pair::new(34);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let live = [p.b4(2), p.b4(3), p.b4(4)];
    let gone = p.b4(5);
    // A grace of an hour: nothing is evicted under the first config.
    let (peers, cfg, mut d) = start(
        &p,
        &pins,
        &dir,
        &[live[0], live[1], live[2], gone],
        "grace_ms = 3600000\ngraceful_grace_ms = 3600000",
        &[],
    );
    let traffic = Traffic::start(&p.b, &live, &p.a, p.a4(), PORT, 10);
    write_peers(&peers, 2, &live);
    assert!(wait_for(Duration::from_secs(10), || {
        d.status()
            .is_some_and(|s| !s["core"]["absent"].as_array().unwrap().is_empty())
    }));
    let generation = d.status().unwrap()["core"]["generation"].as_u64().unwrap();
    // An invalid config: refused, the old one stays, the daemon runs on.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        good.replace("grace_ms = 3600000\n", "grace_ms = \"soon\"\n"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || d
            .audit()
            .iter()
            .any(|e| e["event"] == "reload_refused")),
        "{}",
        d.log()
    );
    assert!(
        d.wait_exit(Duration::from_millis(500)).is_none(),
        "still running"
    );
    // A good one with a 1 s grace: the absence that began under the old
    // config keeps its clock, and the peer goes.
    std::fs::write(
        &cfg,
        good.replace(
            "grace_ms = 3600000\ngraceful_grace_ms = 3600000",
            "grace_ms = 1000\ngraceful_grace_ms = 1000\nliveness_window_ms = 500",
        ),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(20), || !peer_list(&p, &pins)
            .contains(&format!("{gone}/32"))),
        "not evicted after the reload: {}",
        d.log()
    );
    let audit = d.audit();
    let reloaded = audit
        .iter()
        .find(|e| e["event"] == "reloaded")
        .expect("the reload is in the audit log");
    assert_eq!(reloaded["changed"], serde_json::json!(["guards"]));
    // The datapath was never reloaded: no commit lost, no generation skipped
    // back, and the live peers never dropped a packet.
    // The eviction is in the kernel before status.json is republished:
    // wait for the status to show it rather than read it once.
    assert!(
        wait_for(Duration::from_secs(10), || d.status().is_some_and(|s| {
            s["core"]["generation"]
                .as_u64()
                .is_some_and(|now| now > generation)
        })),
        "{:?}",
        d.status()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_no_loss(&traffic.stop(), &live);
    // pin_dir cannot move on a reload.
    std::fs::write(
        &cfg,
        good.replace(&pins.path.display().to_string(), "/sys/fs/bpf/elsewhere"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(10), || d.audit().iter().any(
        |e| e["event"] == "reload_refused" && e["error"].as_str().unwrap().contains("pin_dir")
    )));
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}

#[test]
fn logs_are_json_lines_with_fields_and_a_reload_changes_the_level() {
    firewall_tests::require_kernel!();
    let p = Pair::new(35);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let peers_now = [p.b4(2), p.b4(3)];
    let (peers, cfg, mut d) = start(
        &p,
        &pins,
        &dir,
        &peers_now,
        "grace_ms = 60000\ngraceful_grace_ms = 60000\n[log]\nformat = \"json\"\nlevel = \"info\"",
        &[],
    );
    let lines = |d: &Daemon| -> Vec<serde_json::Value> {
        d.log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let adopted = lines(&d)
        .into_iter()
        .find(|l| l["fields"]["message"] == "adopted the pinned datapath")
        .expect("the start is logged");
    assert_eq!(adopted["level"], "INFO");
    assert!(adopted["fields"]["generation"].is_u64(), "{adopted}");
    assert!(
        !lines(&d).iter().any(|l| l["level"] == "DEBUG"),
        "no debug lines at info"
    );
    // Debug on reload: the next discovery result is logged with its fields.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("level = \"info\"", "level = \"debug\"")).unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(10), || d.audit().iter().any(
        |e| e["event"] == "reloaded" && e["changed"] == serde_json::json!(["log.level"])
    )));
    write_peers(&peers, 2, &peers_now);
    assert!(
        wait_for(Duration::from_secs(10), || lines(&d).iter().any(
            |l| l["level"] == "DEBUG"
                && l["fields"]["message"] == "discovery result"
                && l["fields"]["members"] == 2
        )),
        "{}",
        d.log()
    );
    // The format cannot change under a running daemon.
    std::fs::write(&cfg, good.replace("format = \"json\"", "format = \"text\"")).unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(10), || d
        .audit()
        .iter()
        .any(|e| e["event"] == "reload_refused"
            && e["error"].as_str().unwrap().contains("log.format"))));
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}

#[test]
fn metrics_health_and_readiness_over_http() {
    firewall_tests::require_kernel!();
    let p = Pair::new(36);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let live = [p.b4(2), p.b4(3)];
    let addr: std::net::SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let (peers, cfg, mut d) = start(
        &p,
        &pins,
        &dir,
        &live,
        "grace_ms = 60000\ngraceful_grace_ms = 60000\n[metrics]\nlisten = \"127.0.0.1:9464\"",
        &[("FIREWALL_CTL_FAILPOINTS", "flow-filter-rebuild-ms=200")],
    );
    let get = |path: &str| firewall_tests::http_get(&p.a, addr, path);
    // The daemon rebuilds the flow filter (every 200 ms here, 10 s in
    // production) and says so.
    assert!(
        wait_for(Duration::from_secs(10), || get("/metrics").is_some_and(
            |(_, m)| m.lines().any(|l| l
                .strip_prefix("firewall_flow_filter_rebuilds_total{outcome=\"ok\"} ")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n >= 2))
                && m.lines()
                    .any(|l| l.starts_with("firewall_flow_filter_set_ratio "))
        )),
        "{}",
        d.log()
    );
    assert!(wait_for(Duration::from_secs(10), || get("/readyz")
        .is_some_and(|(s, _)| s == 200)));
    assert_eq!(get("/healthz").unwrap(), (200, "ok\n".to_string()));
    // Traffic from a peer and from a stranger, then the counters.
    assert!(p.b.ping(p.b4(2), p.a4()));
    assert!(!p.b.ping(p.b4(9), p.a4()));
    let (status, m) = get("/metrics").unwrap();
    assert_eq!(status, 200);
    let has = |line: &str| m.lines().any(|l| l.starts_with(line));
    for want in [
        "# TYPE firewall_commits counter",
        "firewall_commits_total{outcome=\"ok\"} ",
        "firewall_evictions_total ",
        "# TYPE firewall_commit_duration_seconds histogram",
        "firewall_peers{origin=\"discovery\",family=\"ipv4\"} 2",
        "firewall_deletions_frozen 0",
        "firewall_synced 1",
        "firewall_source_last_result{source=\"file\",kind=\"complete\"} 1",
        &format!("firewall_interface_attached{{iface=\"{}\"}} 1", p.a_if),
    ] {
        assert!(has(want), "{want} in\n{m}");
    }
    let packets = |verdict: &str, reason: &str| -> u64 {
        let prefix = format!(
            "firewall_packets_total{{iface=\"{}\",verdict=\"{verdict}\",reason=\"{reason}\"}} ",
            p.a_if
        );
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} in\n{m}"))
    };
    assert!(packets("pass", "peer") >= 1);
    assert!(packets("drop", "default_drop") >= 1);
    // Clients that connect and never send a request (more of them than the
    // endpoint serves at once) are cut off by the header-read timeout, and
    // the endpoint answers again afterwards.
    let idle = p.a.run(move || {
        (0..20)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect::<Vec<_>>()
    });
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 256];
        let r = std::io::Read::read(&mut c, &mut buf);
        assert!(
            matches!(r, Ok(0))
                || r.is_err()
                    && !matches!(
                        r.as_ref().unwrap_err().kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
            "an idle connection was not closed by the server: {r:?}"
        );
    }
    assert_eq!(get("/healthz").map(|(s, _)| s), Some(200));
    // An empty discovery file: the guard is in force and named.
    firewall_tests::write_raw(&peers, "{\"revision\": 9, \"peers\": []}");
    assert!(wait_for(Duration::from_secs(10), || get("/metrics")
        .is_some_and(|(_, m)| m
            .contains("firewall_guard{guard=\"empty\"} 1")
            && m.contains("firewall_deletions_frozen 1"))));
    // Readiness needs the attachment: detach, and it says why.
    fwctl_ok(&p.a, &pins, &format!("detach --iface {}", p.a_if));
    let (s, body) = get("/readyz").unwrap();
    assert_eq!(s, 503);
    assert!(body.contains("is not attached"), "{body}");
    // Off after a reload without [metrics].
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[metrics]\nlisten = \"127.0.0.1:9464\"", ""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(10), || get("/healthz").is_none()));
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());
}

/// Traffic is evidence of life: discovery drops three peers; the silent one
/// goes when its grace ends, the two that keep sending stay (an alarm, an
/// audit line, `status` and `plan` say so), one goes a window after it falls
/// quiet, and the one that never stops goes at the cap.
#[test]
fn traffic_keeps_a_dropped_peer_until_it_falls_quiet_or_reaches_the_cap() {
    firewall_tests::require_kernel!();
    let p = Pair::new(76);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let all: Vec<IpAddr> = (2..=9).map(|h| p.b4(h)).collect();
    let (peers, cfg, mut d) = start(
        &p,
        &pins,
        &dir,
        &all,
        "grace_ms = 1000\ngraceful_grace_ms = 1000\nliveness_window_ms = 2000\nliveness_max_extend_ms = 12000",
        &[],
    );
    let every = Duration::from_millis(100);
    let talk4 = Traffic::start_every(&p.b, &[p.b4(4)], &p.a, p.a4(), PORT + 40, every);
    let talk5 = Traffic::start_every(&p.b, &[p.b4(5)], &p.a, p.a4(), PORT + 41, every);
    let has = |h: u8| peer_list(&p, &pins).contains(&format!("{}/32", p.b4(h)));
    // .3, .4 and .5 leave discovery (3 of 8: within the shrink guard).
    let stay: Vec<IpAddr> = all
        .iter()
        .copied()
        .filter(|a| ![p.b4(3), p.b4(4), p.b4(5)].contains(a))
        .collect();
    write_peers(&peers, 2, &stay);
    assert!(
        wait_for(Duration::from_secs(20), || !has(3)),
        "the silent peer was not evicted:\n{}",
        d.log()
    );
    let kept = |d: &Daemon| -> Vec<(String, String, u64)> {
        d.status()
            .map(|s| {
                s["core"]["liveness"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|l| {
                        (
                            l["peer"].as_str().unwrap_or("").to_string(),
                            l["state"].as_str().unwrap_or("").to_string(),
                            l["traffic_ticks"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        wait_for(Duration::from_secs(10), || {
            let k = kept(&d);
            k.len() == 2 && k.iter().all(|(_, s, n)| s == "traffic" && *n > 0)
        }),
        "the talking peers are not shown as kept by traffic: {:?}",
        kept(&d)
    );
    assert!(has(4) && has(5));
    let status = d.status().unwrap();
    assert!(
        status["core"]["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("traffic says alive")),
        "{status}"
    );
    let vetoed: Vec<String> = d
        .audit()
        .iter()
        .filter(|l| l["event"] == "liveness_veto")
        .flat_map(|l| l["peers"].as_array().cloned().unwrap_or_default())
        .map(|v| v.as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        vetoed.contains(&format!("{}/32", p.b4(4))) && vetoed.contains(&format!("{}/32", p.b4(5))),
        "audit: {vetoed:?}"
    );
    let plan = fwctl_ok(&p.a, &pins, &format!("plan --config {}", cfg.display()));
    assert!(
        plan.contains("discovery says gone, traffic says alive")
            && plan.contains(&p.b4(4).to_string()),
        "{plan}"
    );
    // .5 falls quiet: evicted a window later, while .4 still talks and stays.
    talk5.stop();
    assert!(wait_for(Duration::from_secs(20), || !has(5)));
    assert!(has(4), "the peer that still talks went with the quiet one");
    // .4 never stops: evicted at the cap (absent + grace + 12 s).
    assert!(
        wait_for(Duration::from_secs(40), || !has(4)),
        "the cap did not evict a peer that keeps sending:\n{}",
        d.log()
    );
    talk4.stop();
    assert!(has(2) && has(9), "live peers stay");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());
}

/// Two sources must agree before a deletion: a peer one source drops stays
/// while the other lists it; one source failing freezes deletions and is
/// named; when both drop it, it goes after the grace. Live traffic loses
/// nothing throughout.
#[test]
fn two_sources_must_agree_before_a_deletion() {
    firewall_tests::require_kernel!();
    let p = Pair::new(77);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let (a, b) = (dir.0.join("a.json"), dir.0.join("b.json"));
    let all: Vec<IpAddr> = (2..=7).map(|h| p.b4(h)).collect();
    write_peers(&a, 1, &all);
    write_peers(&b, 1, &all);
    let cfg = dir.0.join("firewall.toml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces = [\"{}\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\ntick_ms = 100\n[[discovery]]\nkind = \"file\"\npath = \"{}\"\npoll_ms = 200\n[[discovery]]\nkind = \"file\"\npath = \"{}\"\npoll_ms = 200\n[guards]\ngrace_ms = 1000\ngraceful_grace_ms = 1000\nliveness_window_ms = 500\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
            p.a_if,
            pins.path.display(),
            dir.0.join("state").display(),
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.0.join("state")).unwrap();
    let mut d = Daemon::start(&p.a, &cfg, &dir.0.join("state"));
    let has = |h: u8| peer_list(&p, &pins).contains(&format!("{}/32", p.b4(h)));
    assert!(
        wait_for(Duration::from_secs(20), || peer_list(&p, &pins).len() == 6),
        "{}",
        d.log()
    );
    // Additions flow from either source: .8 is only in b.
    let mut b_list = all.clone();
    b_list.push(p.b4(8));
    write_peers(&b, 2, &b_list);
    assert!(wait_for(Duration::from_secs(10), || has(8)));
    let live: Vec<IpAddr> = [2, 3, 4, 5, 8].iter().map(|h| p.b4(*h)).collect();
    let traffic = Traffic::start(&p.b, &live, &p.a, p.a4(), PORT + 50, 5);
    // a drops .6 and .7; b still lists them: they stay, well past the grace.
    let a_list: Vec<IpAddr> = [2, 3, 4, 5, 8].iter().map(|h| p.b4(*h)).collect();
    write_peers(&a, 2, &a_list);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        has(6) && has(7),
        "a peer one source still lists was deleted"
    );
    // b fails (an empty file): deletions freeze, and the status names b.
    write_raw(&b, "{\"revision\": 3, \"peers\": []}");
    assert!(
        wait_for(Duration::from_secs(10), || d.status().is_some_and(|s| {
            s["core"]["freeze_source"] == "file-2" && s["core"]["freeze"]["guard"] == "empty"
        })),
        "{:?}",
        d.status().map(|s| s["core"].clone())
    );
    let get = |path: &str| firewall_tests::http_get(&p.a, "127.0.0.1:9464".parse().unwrap(), path);
    let m = get("/metrics").map(|(_, m)| m).unwrap_or_default();
    assert!(
        m.contains("firewall_source_last_result{source=\"file\",kind=\"complete\"} 1")
            && m.contains("firewall_source_last_result{source=\"file-2\",kind=\"complete\"} 1"),
        "{m}"
    );
    // b recovers without .6 and .7: both sources agree, they go after the grace.
    let b_list: Vec<IpAddr> = [2, 3, 4, 5, 8].iter().map(|h| p.b4(*h)).collect();
    write_peers(&b, 4, &b_list);
    assert!(
        wait_for(Duration::from_secs(20), || !has(6) && !has(7)),
        "not evicted once both sources agreed:\n{}",
        d.log()
    );
    let report = traffic.stop();
    assert_no_loss(&report, &live);
    let st = d.status().unwrap();
    let names: Vec<&str> = st["core"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["file", "file-2"]);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).is_some());
}
