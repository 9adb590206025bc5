//! The deterministic simulator over 1,000 seeds (at least what the issue asks
//! for on every `cargo xtask test`). SIM_SEEDS raises it.

#[test]
fn thousand_seeds_hold_every_invariant() {
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut crashes = 0;
    let mut evictions = 0;
    for seed in 0..n {
        match firewall_sim::run(seed) {
            Ok(r) => {
                crashes += r.crashes;
                evictions += r.evictions;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The schedules must actually exercise crashes and evictions.
    assert!(
        crashes > n && evictions > n,
        "crashes {crashes}, evictions {evictions}"
    );
}
