//! Builds the XDP program with aya-build and embeds it. With AYA_BUILD_SKIP=1 or
//! without the `ebpf` feature an empty stub is embedded instead (aya-build itself
//! writes no file then, which would break `include_bytes_aligned!`).

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let stub = out_dir.join("firewall"); // the eBPF [[bin]] name
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // The overlay is compiled into the object: a new overlay file means a new object.
    println!("cargo:rerun-if-env-changed=FIREWALL_OVERLAY");
    let overlay = env::var_os("FIREWALL_OVERLAY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../overlay.toml"));
    println!("cargo:rerun-if-changed={}", overlay.display());

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip || env::var_os("CARGO_FEATURE_EBPF").is_none() {
        fs::write(&stub, []).context("write stub")?;
        println!("cargo:warning=firewall-ctl: eBPF build skipped, kernel features are unavailable");
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
        [aya_build::Package { name: pkg.name.as_str(), root_dir: &root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the XDP program failed: run `cargo xtask setup` (installs bpf-linker and nightly rust-src)")
}
