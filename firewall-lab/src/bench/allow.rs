//! `cargo xtask bench allow`: how long a new peer takes from discovery
//! (file, Serf, etcd) until its packets pass.

use std::path::PathBuf;

use anyhow::bail;
use firewall_tests::{Pair, PinDir, kernel_available};

/// Probe from `src` (namespace `from`) to every destination every 5 ms while
/// `start()` runs, and return (the instant `since_rx` reports, the instant
/// the last destination first received a probe at or after it).
pub(crate) fn time_until_passing(
    from: PathBuf,
    src: std::net::IpAddr,
    dsts: Vec<(PathBuf, std::net::IpAddr)>,
    start: impl FnOnce(),
    since_rx: std::sync::mpsc::Receiver<std::time::Instant>,
    limit: std::time::Duration,
) -> anyhow::Result<std::time::Duration> {
    use std::{
        net::{SocketAddr, UdpSocket},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
            mpsc,
        },
        time::{Duration, Instant},
    };
    const PORT: u16 = 6100;
    let stop = Arc::new(AtomicBool::new(false));
    let (arr_tx, arr_rx) = mpsc::channel::<(usize, Instant)>();
    let mut threads = Vec::new();
    for (i, (ns, ip)) in dsts.iter().cloned().enumerate() {
        let (stop, arr_tx) = (stop.clone(), arr_tx.clone());
        threads.push(firewall_tests::spawn_in(ns, move || {
            let sock = UdpSocket::bind(SocketAddr::new(ip, PORT)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, f)) = sock.recv_from(&mut buf)
                    && f.ip() == src
                {
                    let _ = arr_tx.send((i, Instant::now()));
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(100)); // receivers bound
    let targets: Vec<std::net::IpAddr> = dsts.iter().map(|d| d.1).collect();
    let stop2 = stop.clone();
    threads.push(firewall_tests::spawn_in(from, move || {
        let s = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
        while !stop2.load(Ordering::Relaxed) {
            for t in &targets {
                let _ = s.send_to(b"probe", SocketAddr::new(*t, PORT));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }));
    start();
    let result = (|| {
        let since = since_rx
            .recv_timeout(limit)
            .map_err(|_| anyhow::anyhow!("the new member never showed alive"))?;
        let mut first: Vec<Option<Instant>> = vec![None; dsts.len()];
        let t0 = Instant::now();
        while first.iter().any(Option::is_none) {
            anyhow::ensure!(
                t0.elapsed() < limit,
                "traffic from the new member never passed everywhere"
            );
            if let Ok((i, t)) = arr_rx.recv_timeout(Duration::from_millis(100))
                && t >= since
                && first[i].is_none()
            {
                first[i] = Some(t);
            }
        }
        Ok(first
            .into_iter()
            .flatten()
            .max()
            .unwrap()
            .saturating_duration_since(since))
    })();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    result
}

pub(crate) fn bench_allow() -> anyhow::Result<()> {
    use firewall_tests::lab::{Lab, node_ip};
    use std::time::{Duration, Instant};
    if !kernel_available("bench-allow") {
        bail!("the benchmark needs root, serf and etcd (run `cargo xtask setup`)");
    }
    let reps = 7;
    // Serf: n1..n3 run; n4 joins, then leaves gracefully, `reps` times.
    let mut lab = Lab::new(4, "grace_ms = 300000\ngraceful_grace_ms = 1000");
    for (k, s) in [(1u8, &[2u8, 3][..]), (2, &[1, 3]), (3, &[1, 2])] {
        lab.start_serf(k, s);
        lab.start_ctl(k);
    }
    let t = Instant::now();
    while !(1..=3).all(|k| lab.allowed(k).len() == 3) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "lab did not converge"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut serf_ms = Vec::new();
    for _ in 0..reps {
        let (since_tx, since_rx) = std::sync::mpsc::channel();
        let n1 = lab.node(1).ns.path();
        // Watch n1's agent over RPC (in-process, inside n1's namespace) for n4 alive.
        let watcher = firewall_tests::spawn_in(n1, move || {
            let mut c = firewall_ctl::sources::serf::Conn::connect(
                "127.0.0.1:7373",
                None,
                Some(Duration::from_secs(5)),
            )
            .unwrap();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                let m = c.members_filtered(&Default::default()).unwrap_or_default();
                if m.iter().any(|m| m.name == "n4" && m.status == "alive") {
                    let _ = since_tx.send(Instant::now());
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let dsts: Vec<(PathBuf, std::net::IpAddr)> = (1..=3)
            .map(|k| (lab.node(k).ns.path(), node_ip(k)))
            .collect();
        let from = lab.node(4).ns.path();
        let took = time_until_passing(
            from,
            node_ip(4),
            dsts,
            || lab.start_serf(4, &[1, 2, 3]),
            since_rx,
            Duration::from_secs(30),
        )?;
        let _ = watcher.join();
        serf_ms.push(took.as_secs_f64() * 1000.0);
        lab.leave_serf(4);
        let t = Instant::now();
        while (1..=3).any(|k| lab.allowed(k).contains(&node_ip(4))) {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "n4 was never evicted after leaving"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(lab);
    serf_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "time to allow a new node, from Serf `members` showing it alive to its traffic passing on every other node ({reps} joins):"
    );
    println!(
        "  median {:.0} ms, max {:.0} ms (goal <= 500 ms); controller polls members every 100 ms",
        serf_ms[reps / 2],
        serf_ms[reps - 1]
    );

    // etcd: from the put's acknowledgement to the peer's traffic passing.
    let p = Pair::new(45);
    let pins = PinDir::new();
    let dir = firewall_tests::TempDir::new();
    let server = p.b4(9);
    let _etcd = firewall_tests::lab::Etcd::start(&p.b, server, &dir.0);
    let ctl = |args: &str| {
        p.b.sh(&format!(
            "ETCDCTL_API=3 etcdctl --endpoints http://{server}:2379 {args}"
        ))
        .status
        .success()
    };
    let t = Instant::now();
    while !ctl("endpoint health") {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(20), "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cfg = firewall_tests::lab::etcd_config(&dir.0, &pins, &p.a_if, server, "");
    let _d = firewall_tests::Daemon::start(&p.a, &cfg, &dir.0.join("state"));
    let t = Instant::now();
    while !pins.path.join("ifaces").exists() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(20),
            "the controller did not attach"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut etcd_ms = Vec::new();
    for h in 2..=8u8 {
        let (tx, rx) = std::sync::mpsc::channel();
        let src = p.b4(h);
        let took = time_until_passing(
            p.b.path(),
            src,
            vec![(p.a.path(), p.a4())],
            || {
                assert!(ctl(&format!(
                    "put /firewall/peers/h{h} '{{\"addr\": \"{src}\"}}'"
                )));
                let _ = tx.send(Instant::now());
            },
            rx,
            Duration::from_secs(30),
        )?;
        etcd_ms.push(took.as_secs_f64() * 1000.0);
    }
    etcd_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "time to allow a new peer, from etcd acknowledging its put to its traffic passing ({} puts):",
        etcd_ms.len()
    );
    println!(
        "  median {:.0} ms, max {:.0} ms",
        etcd_ms[etcd_ms.len() / 2],
        etcd_ms[etcd_ms.len() - 1]
    );
    Ok(())
}
