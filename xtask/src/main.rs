//! cargo xtask setup | test | demo | bench [datapath|controller|all] | sim | fuzz
//!
//! Every command that needs the kernel toolchain runs `setup` first; setup is
//! idempotent and takes about a second once everything is installed.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
};

use anyhow::{Context as _, bail};

mod dist;
mod fuzz;
mod setup;
use setup::setup;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn build_release() -> anyhow::Result<()> {
    run(
        "building firewall-ctl and firewall-lab",
        cargo().args([
            "build",
            "--release",
            "-p",
            "firewall-ctl",
            "-p",
            "firewall-lab",
            "--bins",
        ]),
    )
}

fn lab(args: &[&str]) -> anyhow::Result<()> {
    run(
        "firewall-lab",
        Command::new(root().join("target/release/firewall-lab"))
            .args(args)
            .current_dir(root()),
    )
}

/// The packages `cargo xtask test` lints and tests (the eBPF crate is built
/// for its own target by firewall-ctl's build script; fuzz by cargo-fuzz).
const TESTED: &[&str] = &[
    "firewall-common",
    "firewall-controller",
    "firewall-sim",
    "firewall-ctl",
    "firewall-tests",
    "firewall-lab",
    "xtask",
];

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup()?;
    run(
        "cargo fmt --check (run `cargo fmt --all`)",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "clippy (warnings are errors; see [workspace.lints] in Cargo.toml)",
        cargo()
            .args(["clippy", "--release", "--all-targets"])
            .args(TESTED.iter().flat_map(|p| ["-p", p]))
            .args(["--", "-D", "warnings"]),
    )?;
    build_release()?;
    // The package test installs what `dist` builds.
    let deb = dist::dist()?;
    // Kernel tests that cannot run here name themselves in this directory
    // (see firewall_tests::kernel_available); they are counted as skipped.
    let skipped_dir = root().join("target/skipped-tests");
    let _ = std::fs::remove_dir_all(&skipped_dir);
    // One test thread: kernel tests share bpffs, interfaces and the CPU.
    // Output is passed through and tallied, so the run ends on one line with
    // the totals of every test binary.
    let mut child = cargo()
        .args(["test", "--release"])
        .args(TESTED.iter().flat_map(|p| ["-p", p]))
        .args(extra)
        .args(["--", "--test-threads=1"])
        .env("FIREWALL_SKIPPED_DIR", &skipped_dir)
        .env("FIREWALL_DEB", &deb)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .strip_suffix(key)
                            .and_then(|n| n.split(' ').next_back()?.parse::<u64>().ok())
                    })
                    .unwrap_or(0)
            };
            passed += num(" passed");
            failed += num(" failed");
            ignored += num(" ignored");
        }
    }
    let st = child.wait()?;
    let not_run: Vec<String> = std::fs::read_dir(&skipped_dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let why = std::fs::read_to_string(e.path()).unwrap_or_default();
                    format!("{}: {why}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    for t in &not_run {
        println!("not run: {t}");
    }
    passed = passed.saturating_sub(not_run.len() as u64);
    ignored += not_run.len() as u64;
    // A short smoke of every fuzz target: the seeds, every kept regression,
    // then FUZZ_SMOKE_SECS of new inputs (`cargo xtask fuzz` runs long ones).
    fuzz::build()?;
    let secs = env::var("FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for t in fuzz::TARGETS {
        let o = fuzz::run_one(t, secs)?;
        println!(
            "fuzz smoke {t} ... {} ({} runs in {secs} s)",
            if o.ok { "ok" } else { "FAILED" },
            o.runs.map_or("?".into(), |r| r.to_string())
        );
        if o.ok {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("total: {passed} passed, {failed} failed, {ignored} skipped");
    if !st.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("test") => test(&args[1..]),
        Some("demo") => setup().and_then(|()| build_release()).and_then(|()| {
            let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            match rest.as_slice() {
                [] | ["--scenario", "seed"] => lab(&["demo"]),
                ["--scenario", "gateway", more @ ..] => {
                    lab(&[&["demo", "--scenario", "gateway"][..], more].concat())
                }
                _ => bail!("usage: cargo xtask demo [--scenario seed|gateway]"),
            }
        }),
        Some("bench") => {
            let what = args.get(1).map(String::as_str).unwrap_or("all");
            setup()
                .and_then(|()| build_release())
                .and_then(|()| match what {
                    "datapath" => lab(&["bench-datapath"]),
                    "controller" => lab(&["bench-controller"]),
                    "allow" => lab(&["bench-allow"]),
                    "all" => lab(&["bench-datapath"])
                        .and_then(|()| lab(&["bench-controller"]))
                        .and_then(|()| lab(&["bench-allow"])),
                    other => bail!("unknown benchmark `{other}`: use datapath, controller or all"),
                })
        }
        Some("fuzz") => setup().and_then(|()| fuzz::main(&args[1..])),
        Some("dist") => setup()
            .and_then(|()| dist::dist())
            .map(|deb| println!("{}", deb.display())),
        // A pure state-machine run: no root, no BPF toolchain, no set-up.
        Some("sim") => run(
            "building the simulator",
            cargo().args(["build", "--release", "-p", "firewall-sim"]),
        )
        .and_then(|()| {
            run(
                "simulation",
                Command::new(root().join("target/release/firewall-sim")).args(&args[1..]),
            )
        }),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup | test [cargo test args] | demo [--scenario seed|gateway] | dist | bench [datapath|controller|all] | sim --seeds N [--seed S] | fuzz [--secs N] [TARGET...]>"
            );
            exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("xtask: {e:#}");
        exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller core stays pure because its crate cannot name tokio,
    /// aya or libc; this keeps a dependency from sneaking them in through
    /// the back door (a transitive dependency would compile just as well).
    #[test]
    fn the_controller_core_depends_on_no_runtime_kernel_or_libc() {
        let out = cargo()
            .args([
                "tree",
                "-p",
                "firewall-controller",
                "-e",
                "normal",
                "--prefix",
                "none",
                "--offline",
            ])
            .output()
            .expect("cargo tree");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = String::from_utf8_lossy(&out.stdout);
        for banned in ["tokio", "aya", "libc", "notify", "etcd-client", "rand"] {
            assert!(
                !tree.lines().any(|l| l.split(' ').next() == Some(banned)),
                "firewall-controller depends on {banned}:\n{tree}"
            );
        }
        assert!(tree.contains("firewall-controller"), "{tree}");
    }
}
