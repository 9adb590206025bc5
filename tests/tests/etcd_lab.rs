//! The controller with etcd discovery against a real single-node etcd: etcd
//! stopped deletes nothing; keys deleted in bulk are held until approved.

use std::{net::IpAddr, os::unix::fs::PermissionsExt as _, time::Duration};

use firewall_tests::{
    Daemon, Ns, Pair, PinDir, TempDir, fwctl, fwctl_ok,
    lab::{Etcd, EtcdTls},
    wait_for,
};

fn etcdctl(ns: &Ns, ip: IpAddr, args: &str) -> bool {
    ns.sh(&format!(
        "ETCDCTL_API=3 etcdctl --endpoints http://{ip}:2379 {args}"
    ))
    .status
    .success()
}

fn allowed(p: &Pair, pins: &PinDir) -> Vec<String> {
    let o = fwctl(&p.a, pins, "peers list --json");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["peer"].as_str().map(String::from))
        .collect()
}

fn setup(net: u8, guards: &str) -> (Pair, PinDir, TempDir, Etcd, Daemon, Vec<IpAddr>) {
    let p = Pair::new(net);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let server = p.b4(9);
    let etcd = Etcd::start(&p.b, server, &dir.0);
    assert!(
        wait_for(Duration::from_secs(20), || etcdctl(
            &p.b,
            server,
            "endpoint health"
        )),
        "etcd did not start"
    );
    let peers: Vec<IpAddr> = (2..=8).map(|h| p.b4(h)).collect();
    for (i, ip) in peers.iter().enumerate() {
        assert!(etcdctl(
            &p.b,
            server,
            &format!("put /firewall/peers/p{i} '{{\"addr\": \"{ip}\"}}'")
        ));
    }
    let cfg = firewall_tests::lab::etcd_config(&dir.0, &pins, &p.a_if, server, guards);
    let d = Daemon::start(&p.a, &cfg, &dir.0.join("state"));
    assert!(
        wait_for(Duration::from_secs(30), || allowed(&p, &pins).len()
            == peers.len()),
        "peers never committed: {}",
        d.log()
    );
    (p, pins, dir, etcd, d, peers)
}

#[test]
fn etcd_stopped_deletes_nothing() {
    firewall_tests::require_kernel!();
    let (p, pins, dir, mut etcd, d, peers) = setup(
        36,
        "grace_ms = 1000\ngraceful_grace_ms = 1000\nliveness_window_ms = 500",
    );
    etcd.kill();
    // Several grace periods with etcd gone: the source reports failures.
    assert!(
        wait_for(Duration::from_secs(20), || {
            std::fs::read_to_string(dir.0.join("state/status.json"))
                .is_ok_and(|s| s.contains("discovery failed"))
        }),
        "no alarm: {}",
        d.log()
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        allowed(&p, &pins).len(),
        peers.len(),
        "nothing deleted while etcd is down"
    );
    assert!(
        p.b.ping(p.b4(2), p.a4()),
        "traffic from a peer still passes"
    );
    // etcd back with the same data: clean again, still nothing deleted.
    let _etcd = Etcd::start(&p.b, p.b4(9), &dir.0);
    assert!(
        wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(dir.0.join("state/status.json")).is_ok_and(|s| {
                serde_json::from_str::<serde_json::Value>(&s)
                    .is_ok_and(|v| v["core"]["alarms"].as_array().is_some_and(|a| a.is_empty()))
            })
        }),
        "never recovered: {}",
        d.log()
    );
    assert_eq!(allowed(&p, &pins).len(), peers.len());
    assert!(
        d.audit()
            .iter()
            .all(|e| e["evicted"].as_array().is_none_or(|a| a.is_empty()))
    );
}

#[test]
fn etcd_bulk_deletion_is_held_until_approved() {
    firewall_tests::require_kernel!();
    let (p, pins, dir, _etcd, d, peers) = setup(
        37,
        "grace_ms = 1000\ngraceful_grace_ms = 1000\nliveness_window_ms = 500",
    );
    let server = p.b4(9);
    // 5 of 7 keys deleted at once: more than half, so the shrink guard holds.
    for i in 0..5 {
        assert!(etcdctl(&p.b, server, &format!("del /firewall/peers/p{i}")));
    }
    let status = || {
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.0.join("state/status.json")).unwrap_or_default(),
        )
        .unwrap_or_default()
    };
    assert!(
        wait_for(Duration::from_secs(20), || status()["core"]["held"]
            .as_array()
            .is_some_and(|h| h.len() == 5)),
        "not held: {}",
        status()
    );
    assert_eq!(
        allowed(&p, &pins).len(),
        peers.len(),
        "held deletions stay allowed"
    );
    // `plan` shows the same, through the typed contract the CLI reads.
    let cfg = dir.0.join("firewall.toml");
    let plan: firewall_ctl::daemon::contract::Plan = serde_json::from_str(&fwctl_ok(
        &p.a,
        &pins,
        &format!("plan --config {} --json", cfg.display()),
    ))
    .expect("plan --json is a Plan");
    assert_eq!(plan.source.kind, "complete");
    assert_eq!(plan.source.members, 2);
    assert!(plan.would_evict.is_empty(), "{plan:?}");
    assert!(plan.freeze.is_some(), "{plan:?}");
    let text = fwctl_ok(&p.a, &pins, &format!("plan --config {}", cfg.display()));
    assert!(
        text.contains("deletions frozen") && text.contains("source: complete with 2 members"),
        "{text}"
    );
    // The operator looks, then lets them through.
    let show = fwctl_ok(
        &p.a,
        &pins,
        &format!("approve --state-dir {}", dir.0.join("state").display()),
    );
    assert!(
        show.contains("held deletions, grace over (5)") && show.contains("--yes"),
        "{show}"
    );
    assert_eq!(
        allowed(&p, &pins).len(),
        peers.len(),
        "showing approves nothing"
    );
    fwctl_ok(
        &p.a,
        &pins,
        &format!(
            "approve --state-dir {} --yes",
            dir.0.join("state").display()
        ),
    );
    assert!(
        wait_for(Duration::from_secs(20), || allowed(&p, &pins).len() == 2),
        "approved deletions never went through: {}",
        d.log()
    );
    assert!(d.audit().iter().any(|e| e["event"] == "approved"));
}

/// etcdctl against the TLS etcd, as `root` once auth is on.
fn etcdctl_tls(ns: &Ns, ip: IpAddr, t: &EtcdTls, user: Option<&str>, args: &str) -> bool {
    ns.sh(&format!(
        "ETCDCTL_API=3 etcdctl --endpoints https://{ip}:2379 --cacert {} --cert {} --key {} {} {args}",
        t.ca.display(),
        t.client_cert.display(),
        t.client_key.display(),
        user.map_or(String::new(), |u| format!("--user {u}"))
    ))
    .status
    .success()
}

#[test]
fn etcd_over_tls_with_a_client_certificate_and_a_password() {
    firewall_tests::require_kernel!();
    let p = Pair::new(57);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let server = p.b4(9);
    let tls = EtcdTls::make(&dir.0, server);
    let _etcd = Etcd::start_with(&p.b, server, &dir.0, Some(&tls));
    assert!(
        wait_for(Duration::from_secs(20), || etcdctl_tls(
            &p.b,
            server,
            &tls,
            None,
            "endpoint health"
        )),
        "etcd over TLS did not start"
    );
    for args in [
        "user add root --new-user-password=rootpw",
        "user add fwctl --new-user-password=s3cret",
        "role add fwread",
        "role grant-permission fwread read /firewall/peers/ --prefix=true",
        "user grant-role fwctl fwread",
        "auth enable",
    ] {
        assert!(
            etcdctl_tls(&p.b, server, &tls, None, args),
            "etcdctl {args}"
        );
    }
    let peer = p.b4(2);
    assert!(etcdctl_tls(
        &p.b,
        server,
        &tls,
        Some("root:rootpw"),
        &format!("put /firewall/peers/p0 '{{\"addr\": \"{peer}\"}}'")
    ));

    let write_config = |password: &str, mode: u32| {
        let cfg = firewall_tests::lab::etcd_config(&dir.0, &pins, &p.a_if, server, "");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("endpoints = [\"http://{server}:2379\"]"),
            &format!(
                "endpoints = [\"https://{server}:2379\"]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nuser = \"fwctl\"\npassword = \"{password}\"",
                tls.ca.display(),
                tls.client_cert.display(),
                tls.client_key.display()
            ),
        );
        std::fs::write(&cfg, text).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(mode)).unwrap();
        cfg
    };

    // A password in a config others can read is refused, as ssh refuses a key.
    let cfg = write_config("s3cret", 0o644);
    let mut d = Daemon::start(&p.a, &cfg, &dir.0.join("state"));
    assert_eq!(
        d.wait_exit(Duration::from_secs(20)).and_then(|s| s.code()),
        Some(2),
        "{}",
        d.log()
    );
    assert!(d.log().contains("chmod 600"), "{}", d.log());

    // A wrong password: a failed source, nothing allowed from it.
    let cfg = write_config("wrong", 0o600);
    let d = Daemon::start(&p.a, &cfg, &dir.0.join("state"));
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log()
            .contains("authentication failed")),
        "{}",
        d.log()
    );
    assert!(allowed(&p, &pins).is_empty());
    drop(d);

    // TLS, the client certificate and the right password: the peer commits.
    let cfg = write_config("s3cret", 0o600);
    let d = Daemon::start(&p.a, &cfg, &dir.0.join("state"));
    assert!(
        wait_for(Duration::from_secs(30), || allowed(&p, &pins)
            == vec![format!("{peer}/32")]),
        "{}",
        d.log()
    );
    assert!(p.b.ping(peer, p.a4()));
}
