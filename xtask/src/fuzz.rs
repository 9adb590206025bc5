//! `cargo xtask fuzz [--secs N] [TARGET ...]`: the cargo-fuzz targets in
//! `fuzz/`, one after the other, each for N seconds (default 60).
//!
//! Each target starts from its committed seeds (`fuzz/seeds/T`) and replays
//! every input in `fuzz/regressions/T`: a crash once found is kept there and
//! replayed by every later run, `cargo xtask test`'s smoke included. The
//! corpus the fuzzer grows lives in `target/fuzz-corpus/T`, out of the tree.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::root;

/// Every parser that takes input from outside, and the packet classifier.
pub const TARGETS: &[&str] = &[
    "file_source",
    "serf_reply",
    "etcd_value",
    "config",
    "state_files",
    "packet",
];

pub struct Outcome {
    pub target: &'static str,
    pub ok: bool,
    pub runs: Option<u64>,
}

/// cargo-fuzz needs nightly (sanitizers); xtask runs under stable cargo's
/// own path, where `+nightly` means nothing, so go through rustup.
fn fuzz_cmd() -> Command {
    let mut r = Command::new("rustup");
    r.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(root());
    r
}

pub fn build() -> anyhow::Result<()> {
    crate::run(
        "building the fuzz targets (cargo +nightly fuzz build)",
        fuzz_cmd().args(["build"]),
    )
}

/// Run one target for `secs` seconds; false if it found a crash.
pub fn run_one(target: &'static str, secs: u64) -> anyhow::Result<Outcome> {
    let corpus = root().join("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut cmd = fuzz_cmd();
    cmd.args(["run", target]).arg(&corpus);
    for extra in ["fuzz/seeds", "fuzz/regressions"] {
        let d = root().join(extra).join(target);
        if d.is_dir() {
            cmd.arg(d);
        }
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg("-print_final_stats=1");
    eprintln!("+ fuzz {target} for {secs} s");
    let out = cmd
        .output()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let runs = stderr
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok());
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        eprintln!(
            "fuzz {target}: FAILED. The input is in fuzz/artifacts/{target}/; replay it with `rustup run nightly cargo fuzz run {target} FILE`, fix the bug, and move the file to fuzz/regressions/{target}/ so every run replays it"
        );
    }
    Ok(Outcome {
        target,
        ok: out.status.success(),
        runs,
    })
}

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut secs = 60u64;
    let mut targets: Vec<&'static str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s| *s > 0)
                    .context("--secs takes a whole number of seconds, at least 1")?;
            }
            t => match TARGETS.iter().find(|x| **x == t) {
                Some(x) => targets.push(x),
                None => bail!(
                    "unknown fuzz target `{t}`: the targets are {}",
                    TARGETS.join(", ")
                ),
            },
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    build()?;
    let mut failed = Vec::new();
    for t in targets {
        let o = run_one(t, secs)?;
        println!(
            "fuzz {:<12} {} ({} runs)",
            o.target,
            if o.ok { "ok" } else { "CRASHED" },
            o.runs.map_or("?".into(), |r| r.to_string())
        );
        if !o.ok {
            failed.push(t);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets found crashes: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The `[[bin]]` names of the fuzz crate.
    fn manifest_targets(manifest: &Path) -> Vec<String> {
        std::fs::read_to_string(manifest)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "firewall-fuzz")
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_fuzz_target_is_run_by_xtask() {
        let in_crate = manifest_targets(&root().join("fuzz/Cargo.toml"));
        let mut listed: Vec<String> = TARGETS.iter().map(|s| s.to_string()).collect();
        let mut in_crate_sorted = in_crate.clone();
        listed.sort();
        in_crate_sorted.sort();
        assert_eq!(
            listed, in_crate_sorted,
            "fuzz/Cargo.toml and xtask's TARGETS differ"
        );
    }
}
