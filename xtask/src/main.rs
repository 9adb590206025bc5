//! cargo xtask setup | test | demo | bench [datapath|controller|all] | sim
//!
//! Every command that needs the kernel toolchain runs `setup` first; setup is
//! idempotent and takes about a second once everything is installed.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
    time::Instant,
};

use anyhow::{Context as _, bail};

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

/// Debian packages the project needs, and the command each one provides.
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("xdp-tools", "xdp-filter"),
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("nftables", "nft"),
    ("iperf3", "iperf3"),
    ("serf", "serf"),
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    ("protobuf-compiler", "protoc"),
    ("util-linux", "nsenter"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn step(n: usize, name: &str) {
    eprintln!("[setup {n}/5] {name}");
}

fn setup() -> anyhow::Result<()> {
    let t0 = Instant::now();
    step(1, "Debian packages");
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| {
            !ok(Command::new("sh").args([
                "-c",
                &format!("command -v {bin} || test -x /usr/sbin/{bin}"),
            ]))
        })
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        eprintln!("  all present");
    } else {
        eprintln!("  installing {}", missing.join(" "));
        run(
            "setup step 1 (apt-get update): check that the Debian mirror is reachable",
            Command::new("apt-get").args(["update", "-q"]),
        )?;
        run(
            "setup step 1 (apt-get install): run it by hand as root to see the error",
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    step(2, "nightly toolchain with rust-src (builds the BPF target)");
    if !output(Command::new("rustup").args(["toolchain", "list"])).contains("nightly") {
        run(
            "setup step 2: install a nightly toolchain with `rustup toolchain install nightly`",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    if !output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .contains("rust-src")
    {
        run(
            "setup step 2: `rustup component add rust-src --toolchain nightly`",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    } else {
        eprintln!("  present");
    }

    step(3, "bpf-linker (against the nightly toolchain's own LLVM)");
    let have = output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]));
    if have.contains(BPF_LINKER_VERSION) {
        eprintln!("  {}", have.trim());
    } else {
        let sysroot =
            output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]));
        let lib = Path::new(sysroot.trim()).join("lib");
        let llvm = std::fs::read_dir(&lib)
            .with_context(|| format!("setup step 3: cannot read {}", lib.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
            })
            .with_context(|| {
                format!(
                    "setup step 3: no libLLVM.so.* in {}: reinstall the nightly toolchain",
                    lib.display()
                )
            })?;
        // bpf-linker's build looks for LLVM_PREFIX/lib/libLLVM.so; point it at
        // the nightly's LLVM so the linker and rustc agree on the bitcode.
        let prefix = root().join("target/llvm-prefix");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
        run(
            "setup step 3 (cargo install bpf-linker): it needs crates.io and a few minutes",
            Command::new("rustup")
                .args([
                    "run",
                    "nightly",
                    "cargo",
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", &prefix),
        )?;
    }

    step(4, "bpffs at /sys/fs/bpf");
    if ok(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        eprintln!("  mounted");
    } else {
        run(
            "setup step 4: mount bpffs by hand with `mount -t bpf bpf /sys/fs/bpf`",
            Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
        )?;
    }

    step(5, "root and kernel features");
    if output(Command::new("id").arg("-u")).trim() != "0" {
        bail!(
            "setup step 5: the kernel tests, the demo and the benchmarks need root: run as root (CI does)"
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!(
            "  warning: no /sys/kernel/btf/vmlinux; this kernel lacks BTF, pinned maps will not pretty-print in bpftool"
        );
    }
    eprintln!("setup done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
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
            "firewall-tests",
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

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup()?;
    run(
        "cargo fmt --check (run `cargo fmt --all`)",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    build_release()?;
    // One test thread: kernel tests share bpffs, interfaces and the CPU.
    // Output is passed through and tallied, so the run ends on one line with
    // the totals of every test binary.
    let mut child = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "firewall-common",
            "-p",
            "firewall-ctl",
            "-p",
            "firewall-tests",
            "-p",
            "xtask",
        ])
        .args(extra)
        .args(["--", "--test-threads=1"])
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
        Some("demo") => setup()
            .and_then(|()| build_release())
            .and_then(|()| lab(&["demo"])),
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
        Some("sim") => setup().and_then(|()| {
            run(
                "building the simulator",
                cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "firewall-ctl",
                    "--bin",
                    "firewall-sim",
                ]),
            )?;
            run(
                "simulation",
                Command::new(root().join("target/release/firewall-sim")).args(&args[1..]),
            )
        }),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup | test [cargo test args] | demo | bench [datapath|controller|all] | sim --seeds N [--seed S]>"
            );
            exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("xtask: {e:#}");
        exit(1);
    }
}
