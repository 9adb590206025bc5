//! The shipped alert rules, checked by promtool, and a real Prometheus
//! (Debian's) scraping a running controller: it sees the metrics, and the
//! "deletions frozen" alert goes pending, fires while the discovery file is
//! empty, and clears when it recovers.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use firewall_tests::{
    Daemon, Ns, Pair, PinDir, TempDir, http_get, tool_available, wait_for, write_peers, write_raw,
};

fn rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/prometheus")
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_their_unit_tests() {
    if !tool_available(
        "the_shipped_alert_rules_pass_promtool_and_their_unit_tests",
        "/usr/bin/promtool",
    ) {
        return;
    }
    for args in [
        vec!["check", "rules", "firewall-rules.yml"],
        vec!["test", "rules", "firewall-rules.test.yml"],
    ] {
        let o = Command::new("promtool")
            .args(&args)
            .current_dir(rules())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Prometheus inside a namespace, killed (by its PID, ours) on Drop.
struct Prometheus(Child);

impl Prometheus {
    fn start(ns: &Ns, dir: &Path, web: SocketAddr) -> Prometheus {
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        Prometheus(
            Command::new("nsenter")
                .arg(format!("--net={}", ns.path().display()))
                .arg("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("tsdb").display()
                ))
                .arg(format!("--web.listen-address={web}"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start prometheus"),
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_controller_and_the_frozen_alert_fires_and_clears() {
    firewall_tests::require_kernel!();
    if !tool_available(
        "a_real_prometheus_scrapes_the_controller_and_the_frozen_alert_fires_and_clears",
        "/usr/bin/prometheus",
    ) {
        return;
    }
    let p = Pair::new(37);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let (metrics, web): (SocketAddr, SocketAddr) = (
        "127.0.0.1:9464".parse().unwrap(),
        "127.0.0.1:9090".parse().unwrap(),
    );
    let peers = dir.0.join("peers.json");
    write_peers(&peers, 1, &[p.b4(2), p.b4(3)]);
    let cfg = dir.0.join("firewall.toml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces = [\"{}\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\ntick_ms = 100\n[discovery]\nkind = \"file\"\npath = \"{}\"\npoll_ms = 200\n[metrics]\nlisten = \"{metrics}\"\n",
            p.a_if,
            pins.path.display(),
            dir.0.join("state").display(),
            peers.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.0.join("state")).unwrap();
    let d = Daemon::start(&p.a, &cfg, &dir.0.join("state"));
    // The shipped rules, with the frozen alert's `for` cut to 5 s.
    let shipped = std::fs::read_to_string(rules().join("firewall-rules.yml")).unwrap();
    let test_rules = shipped.replacen(
        "expr: firewall_deletions_frozen == 1\n        for: 30m",
        "expr: firewall_deletions_frozen == 1\n        for: 5s",
        1,
    );
    assert_ne!(
        test_rules, shipped,
        "the frozen rule is where the test expects it"
    );
    std::fs::write(dir.0.join("rules.yml"), test_rules).unwrap();
    std::fs::write(
        dir.0.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yml]\nscrape_configs:\n  - job_name: firewall\n    static_configs: [{{targets: ['{metrics}']}}]\n"
        ),
    )
    .unwrap();
    let _prom = Prometheus::start(&p.a, &dir.0, web);
    let api = |q: &str| -> serde_json::Value {
        http_get(&p.a, web, q)
            .and_then(|(s, b)| (s == 200).then_some(b))
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let prom_log = || std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(60), || {
            api("/api/v1/targets")["data"]["activeTargets"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["health"] == "up"))
        }),
        "the target never came up: {}\n{}",
        prom_log(),
        d.log()
    );
    assert!(wait_for(Duration::from_secs(30), || {
        api("/api/v1/query?query=firewall_synced")["data"]["result"][0]["value"][1] == "1"
    }));
    let state = || -> Option<String> {
        api("/api/v1/alerts")["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == "FirewallDeletionsFrozen")
            .map(|a| a["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state(), None, "no alert while discovery is clean");
    // The file goes empty: deletions freeze, the alert goes pending, then fires.
    write_raw(&peers, "{\"revision\": 2, \"peers\": []}");
    let mut seen_pending = false;
    assert!(
        wait_for(Duration::from_secs(60), || {
            let s = state();
            seen_pending |= s.as_deref() == Some("pending");
            s.as_deref() == Some("firing")
        }),
        "never fired: {:?}\n{}",
        state(),
        prom_log()
    );
    assert!(seen_pending, "pending before firing");
    // Discovery recovers: the alert clears.
    write_peers(&peers, 3, &[p.b4(2), p.b4(3)]);
    assert!(
        wait_for(Duration::from_secs(60), || state().is_none()),
        "never cleared: {:?}",
        state()
    );
}
