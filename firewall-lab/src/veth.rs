//! `firewall-lab veth`: a small veth lab with real traffic from allowed and
//! disallowed peers.

use anyhow::bail;
use firewall_tests::{Pair, PinDir, fwctl_ok, kernel_available, sh, udp_delivered};

pub(crate) fn veth_demo() -> anyhow::Result<()> {
    if !kernel_available("demo") {
        bail!("the demo needs root and the XDP object: run `cargo xtask demo` as root");
    }
    println!("== veth lab: host A (protected) <-> host B (peers .2 allowed, .3 not)");
    let p = Pair::new(40);
    let pins = PinDir::new();
    println!(
        "{}",
        fwctl_ok(&p.a, &pins, &format!("attach --iface {}", p.a_if)).trim()
    );
    println!(
        "{}",
        fwctl_ok(&p.a, &pins, &format!("peers add {} {}", p.b4(2), p.b6(2))).trim()
    );
    println!(
        "\n{:<26} {:>6} {:>10} {:>10}",
        "source", "ping", "udp sent", "udp recv"
    );
    for (src, dst) in [
        (p.b4(2), p.a4()),
        (p.b4(3), p.a4()),
        (p.b6(2), p.a6()),
        (p.b6(3), p.a6()),
    ] {
        let ping = p.b.ping(src, dst);
        let got = udp_delivered(&p.b, src, &p.a, dst, 5555, 100);
        println!(
            "{:<26} {:>6} {:>10} {:>10}",
            src.to_string(),
            if ping { "ok" } else { "lost" },
            100,
            got
        );
    }
    println!("\n== firewall-ctl status");
    println!("{}", fwctl_ok(&p.a, &pins, "status"));
    println!("== firewall-ctl peers list --json (exact peers name their bucket)");
    let list = fwctl_ok(&p.a, &pins, "peers list --json");
    println!("{list}");
    let rows: serde_json::Value = serde_json::from_str(&list)?;
    if let Some(b) = rows
        .as_array()
        .and_then(|r| r.iter().find_map(|r| r["bucket"].as_u64()))
    {
        let key: String = (b as u32)
            .to_le_bytes()
            .iter()
            .map(|x| format!(" {x}"))
            .collect();
        let cmd = format!(
            "bpftool map lookup pinned {}/PEERS_V4 key{key}",
            pins.path.display()
        );
        println!("== {cmd}");
        println!("{}", String::from_utf8_lossy(&sh(&cmd).stdout));
    }
    println!("== cleaning up (namespaces and pins are removed)");
    Ok(())
}
