//! `cargo xtask dist`: man pages, shell completions and the .deb (in
//! target/dist).
//!
//! The man pages and completions come from the CLI's own clap definitions
//! (clap_mangen, clap_complete, through `firewall-ctl manpages` and
//! `firewall-ctl completions`), so they cannot drift from the binary. The
//! package is built by cargo-deb from `[package.metadata.deb]` in
//! firewall-ctl's Cargo.toml.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{cargo, root, run};

/// Where `dist` writes: man/, completions/ and the .deb.
pub fn out_dir() -> PathBuf {
    root().join("target/dist")
}

pub fn dist() -> anyhow::Result<PathBuf> {
    run(
        "building firewall-ctl",
        cargo().args(["build", "--release", "-p", "firewall-ctl"]),
    )?;
    let bin = root().join("target/release/firewall-ctl");
    let out = out_dir();
    // Under target/release: cargo-deb takes only paths there for built files.
    let assets = root().join("target/release/dist-assets");
    let man = assets.join("man");
    let comp = assets.join("completions");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&assets);
    std::fs::create_dir_all(&comp)?;
    std::fs::create_dir_all(&out)?;
    run(
        "writing the man pages",
        Command::new(&bin).arg("manpages").arg(&man),
    )?;
    // -n: no name or time stamp in the header, so the pages are reproducible.
    let pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    run(
        "compressing the man pages",
        Command::new("gzip").arg("-9nf").args(&pages),
    )?;
    for (shell, file) in [
        ("bash", "firewall-ctl.bash"),
        ("zsh", "_firewall-ctl"),
        ("fish", "firewall-ctl.fish"),
    ] {
        let o = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .context("running firewall-ctl completions")?;
        if !o.status.success() || o.stdout.is_empty() {
            bail!(
                "firewall-ctl completions {shell} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::fs::write(comp.join(file), o.stdout)?;
    }
    run(
        "cargo deb (installed by `cargo xtask setup`)",
        cargo()
            .args([
                "deb",
                "-p",
                "firewall-ctl",
                "--no-build",
                "--no-strip",
                "-o",
            ])
            .arg(&out),
    )?;
    let deb = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo deb wrote no .deb")?;
    eprintln!("package: {}", deb.display());
    Ok(deb)
}
