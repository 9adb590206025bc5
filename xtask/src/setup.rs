//! `cargo xtask setup`: everything a new machine of this project's kind lacks.
//!
//! A package counts as present only when dpkg says it is installed *and* every
//! file the project uses from it exists. Checking for a binary's name instead
//! once hid a missing `libprotobuf-dev`: `protoc` was there, its well-known
//! `.proto` files were not, and the etcd-client build failed on every machine
//! but the developers'. The test at the bottom of this file keeps [`PACKAGES`]
//! honest: every program the project's sources run must come from a package
//! listed here (or an Essential one), and every path listed here must belong
//! to the package it is listed under.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{ok, output, root, run};

/// A Debian package the build, the tests, the demo or the benchmarks need.
pub struct Package {
    pub name: &'static str,
    /// Absolute paths the project uses from this package: programs it runs
    /// and files the build reads. Set-up checks that each one exists.
    pub uses: &'static [&'static str],
    pub why: &'static str,
}

/// The one list set-up installs from. Installed with `--no-install-recommends`,
/// so anything a package only recommends must be listed itself.
pub const PACKAGES: &[Package] = &[
    Package {
        name: "bpftool",
        uses: &["/usr/sbin/bpftool"],
        why: "inspecting pins in tests and the README",
    },
    Package {
        name: "xdp-tools",
        uses: &["/usr/sbin/xdp-filter"],
        why: "the xdp-filter baseline in `bench datapath`",
    },
    Package {
        name: "iproute2",
        uses: &["/usr/sbin/ip"],
        why: "namespaces, veths and bridges in every kernel test",
    },
    Package {
        name: "iputils-ping",
        uses: &["/usr/bin/ping"],
        why: "ICMP traffic through the firewall",
    },
    Package {
        name: "nftables",
        uses: &["/usr/sbin/nft"],
        why: "the nftables baseline",
    },
    Package {
        name: "prometheus",
        uses: &["/usr/bin/prometheus", "/usr/bin/promtool"],
        why: "checking the shipped alert rules, and a real Prometheus scraping the controller",
    },
    Package {
        name: "tcpdump",
        uses: &["/usr/bin/tcpdump"],
        why: "reading back `monitor --pcap` files in the node tests",
    },
    Package {
        name: "iperf3",
        uses: &["/usr/bin/iperf3"],
        why: "TCP traffic in the veth tests",
    },
    Package {
        name: "serf",
        uses: &["/usr/bin/serf"],
        why: "the Serf discovery labs and the demo",
    },
    Package {
        name: "etcd-server",
        uses: &["/usr/bin/etcd"],
        why: "the etcd discovery lab",
    },
    Package {
        name: "etcd-client",
        uses: &["/usr/bin/etcdctl"],
        why: "writing members into etcd in the etcd lab",
    },
    Package {
        name: "protobuf-compiler",
        uses: &["/usr/bin/protoc"],
        why: "the etcd-client crate compiles etcd's .proto files at build time",
    },
    Package {
        name: "libprotobuf-dev",
        uses: &[
            "/usr/include/google/protobuf/descriptor.proto",
            "/usr/include/google/protobuf/empty.proto",
        ],
        why: "protobuf's well-known .proto files, imported by etcd's (only recommended by protobuf-compiler)",
    },
    Package {
        name: "openssl",
        uses: &["/usr/bin/openssl"],
        why: "certificates for the etcd TLS test",
    },
    Package {
        name: "g++",
        uses: &["/usr/bin/g++"],
        why: "libFuzzer, which cargo-fuzz compiles for the fuzz targets",
    },
    Package {
        name: "mount",
        uses: &["/usr/bin/mount"],
        why: "mounting bpffs",
    },
    Package {
        name: "util-linux",
        uses: &[
            "/usr/bin/nsenter",
            "/usr/bin/mountpoint",
            "/usr/bin/setpriv",
        ],
        why: "entering test namespaces without remounting /sys; running the daemon as a non-root user",
    },
    Package {
        name: "systemd",
        uses: &[
            "/usr/bin/systemd-analyze",
            "/usr/bin/systemctl",
            "/usr/bin/journalctl",
        ],
        why: "checking the shipped unit, and the systemd that boots in the nspawn test",
    },
    Package {
        name: "systemd-container",
        uses: &["/usr/bin/systemd-nspawn"],
        why: "booting systemd as PID 1 to run the unit for real (it also updates systemd to its own version)",
    },
];

/// What set-up works with but cannot install: without them there is no
/// installing anything, so set-up only checks them and says so.
pub const BOOTSTRAP: &[&str] = &["apt", "dpkg"];

/// What set-up found missing: packages not installed, and packages whose
/// files are gone although dpkg calls them installed (those get reinstalled).
#[derive(Debug, Default, PartialEq)]
pub struct Missing {
    pub not_installed: Vec<&'static str>,
    pub files_gone: Vec<(&'static str, &'static str)>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.not_installed.is_empty() && self.files_gone.is_empty()
    }
    fn packages(&self) -> Vec<&'static str> {
        let mut p = self.not_installed.clone();
        for (pkg, _) in &self.files_gone {
            if !p.contains(pkg) {
                p.push(pkg);
            }
        }
        p
    }
}

/// dpkg's own answer, not a guess from PATH: `ii` means installed and
/// configured.
pub fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", pkg]))
        .trim_end()
        .starts_with("ii")
}

pub fn missing() -> Missing {
    let mut m = Missing::default();
    for p in PACKAGES {
        if !installed(p.name) {
            m.not_installed.push(p.name);
            continue;
        }
        for f in p.uses {
            if !Path::new(f).exists() {
                m.files_gone.push((p.name, f));
            }
        }
    }
    m
}

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const CARGO_DEB_VERSION: &str = "3.8.0";

fn step(n: usize, name: &str) {
    eprintln!("[setup {n}/6] {name}");
}

fn apt_install(m: &Missing) -> anyhow::Result<()> {
    let pkgs = m.packages();
    let by_hand = format!(
        "apt-get update && apt-get install -y --no-install-recommends{} {}",
        if m.files_gone.is_empty() {
            ""
        } else {
            " --reinstall"
        },
        pkgs.join(" ")
    );
    for name in &m.not_installed {
        let why = PACKAGES
            .iter()
            .find(|p| p.name == *name)
            .map_or("", |p| p.why);
        eprintln!("  not installed: {name} ({why})");
    }
    for (name, f) in &m.files_gone {
        eprintln!("  {name} is installed but {f} is missing: reinstalling it");
    }
    run(
        &format!(
            "setup step 1 (apt-get update): check that the Debian mirror is reachable, then run `{by_hand}` as root"
        ),
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if !m.files_gone.is_empty() {
        install.arg("--reinstall");
    }
    run(
        &format!("setup step 1 (apt-get install): run `{by_hand}` as root to see the error"),
        install.args(&pkgs),
    )?;
    let still = missing();
    if !still.is_empty() {
        bail!(
            "setup step 1: after apt-get install, still missing: {still:?}; run `{by_hand}` as root and check its output"
        );
    }
    Ok(())
}

pub fn setup() -> anyhow::Result<()> {
    let t0 = Instant::now();
    step(
        1,
        "Debian packages (by dpkg status and the files used from them)",
    );
    if let Some(b) = BOOTSTRAP.iter().find(|b| !installed(b)) {
        bail!(
            "setup step 1: `{b}` is not installed, so set-up cannot install packages: this is not a Debian machine of the project's kind (see the README)"
        );
    }
    let m = missing();
    if m.is_empty() {
        eprintln!("  all {} installed, every file present", PACKAGES.len());
    } else {
        apt_install(&m)?;
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
        install_bpf_linker()?;
    }

    step(
        4,
        "cargo-fuzz (the fuzz targets and their smoke in `cargo xtask test`)",
    );
    let have =
        output(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]));
    if have.contains(CARGO_FUZZ_VERSION) {
        eprintln!("  {}", have.trim());
    } else {
        run(
            "setup step 4 (cargo install cargo-fuzz): it needs crates.io",
            Command::new("rustup").args([
                "run",
                "nightly",
                "cargo",
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]),
        )?;
    }

    step(5, "cargo-deb (the package `cargo xtask dist` builds)");
    let have = output(Command::new("cargo").args(["deb", "--version"]));
    if have.contains(CARGO_DEB_VERSION) {
        eprintln!("  {}", have.trim());
    } else {
        run(
            "setup step 5 (cargo install cargo-deb): it needs crates.io",
            Command::new("cargo").args([
                "install",
                "cargo-deb",
                "--version",
                CARGO_DEB_VERSION,
                "--locked",
            ]),
        )?;
    }

    step(6, "bpffs at /sys/fs/bpf");
    if ok(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        eprintln!("  mounted");
    } else {
        run(
            "setup step 6: mount bpffs by hand with `mount -t bpf bpf /sys/fs/bpf`",
            Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
        )?;
    }

    step(7, "root and kernel features");
    if output(Command::new("id").arg("-u")).trim() != "0" {
        bail!(
            "setup step 7: the kernel tests, the demo and the benchmarks need root: run as root (CI does)"
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

fn install_bpf_linker() -> anyhow::Result<()> {
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
    let prefix: PathBuf = root().join("target/llvm-prefix");
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
    )
}

#[cfg(test)]
mod tests {
    //! The self-check that cannot drift: it reads the project's sources for
    //! the programs they run, asks dpkg who owns each, and fails when that
    //! package is neither Essential nor in [`PACKAGES`]. It runs in
    //! `cargo xtask test`, after set-up, so every listed package is installed.

    use std::collections::BTreeSet;

    use super::*;

    /// The Debian package that owns `path`, if any. Debian 12 is merged-/usr
    /// but dpkg records many programs under `/bin` or `/sbin`, so both
    /// spellings are asked.
    fn owner(path: &Path) -> Option<String> {
        let s = path.to_string_lossy();
        let mut tries = vec![s.to_string()];
        if let Some(rest) = s.strip_prefix("/usr") {
            tries.push(rest.to_string());
        }
        tries.iter().find_map(|p| {
            let o = output(Command::new("dpkg").args(["-S", p]));
            // `pkg: /path`, or `pkg1, pkg2: /path` for a shared directory.
            // `diversion by dash from: /bin/sh` names no package; skip those lines.
            let line = o
                .lines()
                .filter(|l| !l.starts_with("diversion by "))
                .find(|l| l.ends_with(&format!(": {p}")))?;
            Some(
                line.split(':')
                    .next()?
                    .split(',')
                    .next()?
                    .trim()
                    .to_string(),
            )
        })
    }

    fn essential(pkg: &str) -> bool {
        output(Command::new("dpkg-query").args(["-W", "-f=${Essential}", pkg])).trim() == "yes"
    }

    /// Program names the sources run, from three shapes of call:
    /// `Command::new("X")`; the first word of each command in a string given
    /// to a `sh`/`sh_ok` helper (a literal or `format!`); and the first
    /// element of an `.args(["X", ...])` array (how `nsenter` is told what to
    /// run). Words that are not programs (`-c`, `build`) are dropped later by
    /// not resolving on PATH.
    fn programs_in(src: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut add = |w: &str| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
            {
                out.insert(w.to_string());
            }
        };
        let literal_after = |s: &str, i: usize| -> Option<String> {
            let rest = s[i..].trim_start();
            let rest = rest.strip_prefix('&').unwrap_or(rest).trim_start();
            let rest = rest.strip_prefix("format!(").unwrap_or(rest).trim_start();
            let body = rest.strip_prefix('"')?;
            let mut end = 0;
            let bytes = body.as_bytes();
            while end < bytes.len() && bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            Some(body[..end.min(body.len())].to_string())
        };
        for (pat, whole_command) in [
            ("Command::new(", false),
            ("sh(", true),
            ("sh_ok(", true),
            (".args([", false),
        ] {
            for (i, _) in src.match_indices(pat) {
                // `sh(` must be the helper itself, not `push(` or `flush(`.
                if whole_command {
                    let prev = src[..i].chars().next_back();
                    if prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                        continue;
                    }
                }
                let Some(lit) = literal_after(src, i + pat.len()) else {
                    continue;
                };
                if whole_command {
                    for seg in lit.split(['|', ';', '&', '(', '`']) {
                        // The command word: past line continuations (`\`)
                        // and environment assignments (`ETCDCTL_API=3 etcdctl`).
                        let word = seg
                            .split_whitespace()
                            .find(|w| *w != "\\\\" && *w != "\\" && !w.contains('='));
                        add(word.unwrap_or(""));
                    }
                } else {
                    add(&lit);
                }
            }
        }
        out
    }

    fn sources() -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let name = e.file_name();
                if name == "target" || name.to_string_lossy().starts_with('.') {
                    continue;
                }
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let mut v = Vec::new();
        walk(&root(), &mut v);
        v
    }

    fn resolve(prog: &str) -> Option<PathBuf> {
        let path = std::env::var("PATH").unwrap_or_default();
        path.split(':')
            .chain(["/usr/sbin", "/sbin"])
            .map(|d| Path::new(d).join(prog))
            .find(|p| p.is_file())
    }

    #[test]
    fn the_scanner_finds_each_shape_of_call() {
        let src = r#"
            Command::new("serf").arg("x");
            sh_ok(&format!("ip netns add {name} && ping -c1 x | grep y"));
            ns.sh(&format!("ETCDCTL_API=3 etcdctl get && \\
               openssl req"));
            ns.sh("xdp-filter load");
            buf.push("not-a-program");
            cmd.args(["etcd", "--name"]);
        "#;
        let got: Vec<String> = programs_in(src).into_iter().collect();
        assert_eq!(
            got,
            [
                "etcd",
                "etcdctl",
                "grep",
                "ip",
                "openssl",
                "ping",
                "serf",
                "xdp-filter"
            ]
        );
    }

    #[test]
    fn every_program_the_sources_run_comes_from_a_listed_package() {
        let listed: BTreeSet<&str> = PACKAGES
            .iter()
            .map(|p| p.name)
            .chain(BOOTSTRAP.iter().copied())
            .collect();
        let home = std::env::var("HOME").unwrap_or_default();
        let mut programs = BTreeSet::new();
        for f in sources() {
            programs.extend(programs_in(&std::fs::read_to_string(&f).unwrap()));
        }
        assert!(
            programs.contains("serf") && programs.contains("ip"),
            "the scan found too little to be trusted: {programs:?}"
        );
        let mut problems = Vec::new();
        for prog in &programs {
            let Some(path) = resolve(prog) else { continue };
            let real = std::fs::canonicalize(&path).unwrap_or(path.clone());
            // The Rust toolchain comes from rustup, not from Debian.
            if !home.is_empty() && real.starts_with(&home) {
                continue;
            }
            match owner(&path).or_else(|| owner(&real)) {
                None => problems.push(format!(
                    "`{prog}` ({}) is run by the sources but no Debian package owns it, so set-up cannot install it",
                    path.display()
                )),
                Some(pkg) if !listed.contains(pkg.as_str()) && !essential(&pkg) => problems.push(
                    format!("`{prog}` comes from `{pkg}`: add `{pkg}` to PACKAGES in xtask/src/setup.rs"),
                ),
                Some(_) => {}
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn every_listed_path_exists_and_belongs_to_its_package() {
        let mut problems = Vec::new();
        for p in PACKAGES {
            assert!(
                installed(p.name),
                "{} is not installed: run `cargo xtask setup`",
                p.name
            );
            for f in p.uses {
                if !Path::new(f).exists() {
                    problems.push(format!("{f} (listed under {}) does not exist", p.name));
                    continue;
                }
                match owner(Path::new(f)) {
                    Some(o) if o == p.name => {}
                    other => problems.push(format!(
                        "{f} is listed under {} but dpkg says it belongs to {other:?}",
                        p.name
                    )),
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn nothing_is_missing_after_setup() {
        assert_eq!(missing(), Missing::default());
    }
}
