//! The .deb that `cargo xtask dist` builds (cargo xtask test builds it first
//! and names it in FIREWALL_DEB): what it holds, and an install into a scratch
//! root whose binary runs `--version` and `status` against a real datapath.

use std::{path::Path, process::Command};

use firewall_tests::{Pair, PinDir, TempDir, not_run, tool_available};

fn deb() -> Option<String> {
    std::env::var("FIREWALL_DEB")
        .ok()
        .filter(|p| Path::new(p).exists())
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_package_holds_the_service_and_installs_into_a_scratch_root() {
    firewall_tests::require_kernel!();
    let test = "the_package_holds_the_service_and_installs_into_a_scratch_root";
    let Some(deb) = deb() else {
        not_run(
            test,
            "FIREWALL_DEB is unset or missing: run through `cargo xtask test`, which builds the package with `cargo xtask dist`",
        );
        return;
    };
    if !tool_available(test, "/usr/bin/dpkg-deb") {
        return;
    }
    let info = run(Command::new("dpkg-deb").args(["--info", &deb]));
    assert!(info.contains("Package: firewall-ctl"), "{info}");
    assert!(
        info.contains("Depends:") && info.contains("systemd"),
        "{info}"
    );
    let contents = run(Command::new("dpkg-deb").args(["--contents", &deb]));
    for path in [
        "./usr/bin/firewall-ctl",
        "./usr/lib/systemd/system/firewall-ctl.service",
        "./usr/lib/sysusers.d/firewall-ctl.conf",
        "./etc/firewall-ctl/firewall.toml",
        "./usr/share/firewall-ctl/prometheus/firewall-rules.yml",
        "./usr/share/man/man1/firewall-ctl.1.gz",
        "./usr/share/man/man1/firewall-ctl-run.1.gz",
        "./usr/share/man/man1/firewall-ctl-peers-add.1.gz",
        "./usr/share/bash-completion/completions/firewall-ctl",
        "./usr/share/zsh/vendor-completions/_firewall-ctl",
        "./usr/share/fish/vendor_completions.d/firewall-ctl.fish",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} is not in the package:\n{contents}"
        );
    }
    let ctl = TempDir::new();
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(ctl.0.join("DEBIAN")));
    let listed = std::fs::read_to_string(ctl.0.join("DEBIAN/conffiles")).unwrap_or_default();
    assert!(
        listed.contains("/etc/firewall-ctl/firewall.toml"),
        "the config is a conffile: {listed}"
    );

    // Install into an empty root. The maintainer scripts run on the host with
    // DPKG_ROOT set (dpkg has no shell inside the scratch root), and write only
    // into it: the user from sysusers.d, the unit's state.
    let root = TempDir::new();
    let r = root.0.display().to_string();
    run(Command::new("dpkg").args([
        &format!("--root={r}"),
        "--force-script-chrootless",
        "--force-depends",
        "-i",
        &deb,
    ]));
    let passwd = std::fs::read_to_string(root.0.join("etc/passwd")).unwrap_or_default();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("firewall-ctl:") && l.contains(":/usr/sbin/nologin")),
        "the service's user was not created: {passwd}"
    );
    assert!(
        !root
            .0
            .join("etc/systemd/system/multi-user.target.wants/firewall-ctl.service")
            .exists(),
        "installing must not enable the unit: the shipped config protects nothing yet"
    );
    let bin = root.0.join("usr/bin/firewall-ctl");
    let v = run(Command::new(&bin).arg("--version"));
    assert_eq!(
        v.trim(),
        format!("firewall-ctl {}", env!("CARGO_PKG_VERSION"))
    );
    let page = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {r}/usr/share/man/man1/firewall-ctl-run.1.gz"
    )));
    assert!(page.contains(".TH firewall-ctl-run 1"), "{page}");
    let bash = std::fs::read_to_string(
        root.0
            .join("usr/share/bash-completion/completions/firewall-ctl"),
    )
    .unwrap();
    assert!(
        bash.contains("complete -F") && bash.contains("approve"),
        "{bash}"
    );

    // The installed binary on a real datapath: attach in a lab, then status.
    let p = Pair::new(75);
    let pins = PinDir::new();
    let cli = |args: &str| {
        p.a.sh(&format!(
            "{} --pin-dir {} {args}",
            bin.display(),
            pins.path.display()
        ))
    };
    let a = cli(&format!("attach --iface {}", p.a_if));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let s = cli("status");
    let out = String::from_utf8_lossy(&s.stdout);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert!(out.contains(&p.a_if) && out.contains("generation"), "{out}");

    // Remove keeps the edited config; purge removes it.
    let cfg = root.0.join("etc/firewall-ctl/firewall.toml");
    std::fs::write(&cfg, "# edited\n").unwrap();
    run(Command::new("dpkg").args([
        &format!("--root={r}"),
        "--force-script-chrootless",
        "-r",
        "firewall-ctl",
    ]));
    assert!(!bin.exists());
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# edited\n");
    run(Command::new("dpkg").args([
        &format!("--root={r}"),
        "--force-script-chrootless",
        "-P",
        "firewall-ctl",
    ]));
    assert!(!cfg.exists(), "purge removes the conffile");
}
