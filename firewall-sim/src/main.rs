//! `cargo xtask sim --seeds N [--seed S]`: run the deterministic simulator.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (first, count) = match (get("--seed"), get("--seeds")) {
        (Some(s), _) => (s, 1),
        (None, Some(n)) => (get("--from").unwrap_or(0), n),
        _ => {
            eprintln!("usage: firewall-sim --seeds N [--from S] | --seed S");
            return ExitCode::from(2);
        }
    };
    let (mut evictions, mut crashes, mut faults, mut results, mut commits, mut vetoes) =
        (0, 0, 0, 0, 0, 0);
    for seed in first..first + count {
        match firewall_sim::run(seed) {
            Ok(r) => {
                evictions += r.evictions;
                crashes += r.crashes;
                faults += r.write_faults;
                results += r.results;
                commits += r.commits;
                vetoes += r.vetoes;
                if count == 1 {
                    println!("{r:?}");
                }
            }
            Err(e) => {
                eprintln!("{e}");
                println!("0 passed, 1 failed");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "simulated {count} seeds from {first}: {results} discovery results, {commits} commits, {evictions} evictions, {crashes} controller crashes, {faults} failed map writes, {vetoes} liveness vetoes; every invariant held"
    );
    println!("{count} passed, 0 failed");
    ExitCode::SUCCESS
}
