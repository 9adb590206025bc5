//! Builds the lab's XDP object: the firewall program plus the benchmark
//! baselines (`firewall-ebpf`'s `bench` feature), which the shipped object in
//! firewall-ctl does not carry. With AYA_BUILD_SKIP=1 an empty stub is
//! embedded, as in firewall-ctl, and the benchmarks say they cannot run.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let stub = out_dir.join("firewall"); // the eBPF [[bin]] name
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=FIREWALL_OVERLAY");
    let overlay = env::var_os("FIREWALL_OVERLAY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../overlay.toml"));
    println!("cargo:rerun-if-changed={}", overlay.display());
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(&stub, []).context("write stub")?;
        println!("cargo:warning=firewall-tests: eBPF build skipped, the benchmarks cannot run");
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = packages
        .into_iter()
        .find(|p| p.name.as_str() == "firewall-ebpf")
        .ok_or_else(|| anyhow!("firewall-ebpf package not found"))?;
    let root_dir = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("manifest has no parent"))?
        .to_string();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: pkg.name.as_str(),
            root_dir: &root_dir,
            features: &["bench"],
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the lab's XDP object failed: run `cargo xtask setup` (installs bpf-linker and nightly rust-src)")
}
