//! The lab: `cargo xtask demo` and `cargo xtask bench` run this binary.
//! Its modules: [`replay`] (the seed incident, naive against guarded) and
//! [`svg`] (its timeline), [`bench`] (datapath, controller, allow), [`veth`].
//!
//!   firewall-lab demo               the seed incident, naive then guarded, and the report
//!   firewall-lab demo --scenario gateway   the gateway reload at fleet scale (12 nodes)
//!   firewall-lab replay [naive|guarded]   one replay
//!   firewall-lab veth               a veth lab with real traffic from allowed and disallowed peers
//!   firewall-lab bench-datapath     BPF_PROG_TEST_RUN cost per packet against same-run baselines
//!   firewall-lab bench-controller   commit cost against a write-only floor
//!   firewall-lab bench-allow        discovery-to-passing latency per source

mod bench;
mod gateway;
mod replay;
mod svg;
mod veth;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("demo") => match (
            args.get(1).map(String::as_str),
            args.get(2).map(String::as_str),
        ) {
            (None, _) | (Some("--scenario"), Some("seed")) => replay::demo(),
            (Some("--scenario"), Some("gateway")) => gateway::demo(args.get(3).map(String::as_str)),
            _ => {
                eprintln!("usage: firewall-lab demo [--scenario seed|gateway [naive|guarded]]");
                std::process::exit(2);
            }
        },
        Some("veth") => veth::veth_demo(),
        Some("replay") => replay::replay_main(args.get(1).map(String::as_str)),
        Some("bench-datapath") => bench::datapath::bench_datapath(bench::datapath::Method::FULL),
        Some("bench-controller") => bench::controller::bench_controller(),
        Some("bench-allow") => bench::allow::bench_allow(),
        _ => {
            eprintln!(
                "usage: firewall-lab <demo [--scenario seed|gateway] | veth | replay [naive|guarded] | bench-datapath | bench-controller | bench-allow>"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("firewall-lab: {e:#}");
        std::process::exit(1);
    }
}
