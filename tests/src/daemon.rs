//! Running firewall-ctl from a test: one-shot commands, `firewall-ctl run`
//! as a child killed by its PID on Drop, and the discovery files it reads.

use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::*;

/// The firewall-ctl binary next to this test binary (target/<profile>/).
pub fn fwctl_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FIREWALL_CTL") {
        return p.into();
    }
    // Tests run from target/<profile>/deps, firewall-lab from target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    for d in [dir, dir.parent().unwrap()] {
        if d.join("firewall-ctl").exists() {
            return d.join("firewall-ctl");
        }
    }
    panic!(
        "firewall-ctl is not built next to {}: run through `cargo xtask test`",
        exe.display()
    )
}

/// Run firewall-ctl inside `ns` with `--pin-dir`.
pub fn fwctl(ns: &Ns, pins: &PinDir, args: &str) -> Output {
    ns.sh(&format!(
        "{} --pin-dir {} {args}",
        fwctl_bin().display(),
        pins.path.display()
    ))
}

#[track_caller]
pub fn fwctl_ok(ns: &Ns, pins: &PinDir, args: &str) -> String {
    let o = fwctl(ns, pins, args);
    assert!(
        o.status.success(),
        "firewall-ctl {args}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `firewall-ctl run` inside a namespace, as a child of this test; killed (by
/// its PID, which is ours) on Drop.
pub struct Daemon {
    pub child: Option<std::process::Child>,
    pub config: PathBuf,
    pub state_dir: PathBuf,
}

impl Daemon {
    pub fn start(ns: &Ns, config: &Path, state_dir: &Path) -> Daemon {
        Daemon::start_env(ns, config, state_dir, &[])
    }
    pub fn start_env(ns: &Ns, config: &Path, state_dir: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_as(ns, config, state_dir, env, &[])
    }
    /// With `wrapper` (e.g. a `setpriv` command line) between nsenter and
    /// firewall-ctl; it must exec, so the child's PID stays the daemon's.
    pub fn start_as(
        ns: &Ns,
        config: &Path,
        state_dir: &Path,
        env: &[(&str, &str)],
        wrapper: &[String],
    ) -> Daemon {
        let log = File::options()
            .create(true)
            .append(true)
            .open(state_dir.join("daemon.log"))
            .unwrap();
        // nsenter execs firewall-ctl in place (no fork for a net namespace), so
        // the child's PID is the daemon's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(wrapper)
            .arg(fwctl_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn firewall-ctl run");
        Daemon {
            child: Some(child),
            config: config.into(),
            state_dir: state_dir.into(),
        }
    }
    pub fn kill(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(c.id() as i32, signal) };
            let _ = c.wait();
        }
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }
    /// Wait for the daemon to exit on its own, polling up to `limit`; `None`
    /// if it is still running then (the caller decides what that means).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
    /// Send `signal` without waiting (the caller then uses `wait_exit`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.pid(), signal) };
    }
    /// The daemon's published status.json, if any.
    pub fn status(&self) -> Option<serde_json::Value> {
        let b = std::fs::read(self.state_dir.join("status.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state_dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill(libc::SIGKILL);
    }
}

/// Write a peers file for the file source, atomically (rename).
pub fn write_peers(path: &Path, revision: u64, peers: &[IpAddr]) {
    let list: Vec<serde_json::Value> = peers
        .iter()
        .map(|p| serde_json::json!({"addr": p.to_string()}))
        .collect();
    write_raw(
        path,
        &serde_json::json!({"revision": revision, "peers": list}).to_string(),
    );
}

pub fn write_raw(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The capabilities the shipped unit grants, as `setpriv` spells them.
pub const UNIT_CAPS: &str = "+bpf,+net_admin,+perfmon";

/// A `setpriv` command line that runs what follows as `uid` (and gid `uid`)
/// with only the unit's capabilities: what the service's user has.
pub fn as_unprivileged(uid: u32) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        format!("--inh-caps=-all,{UNIT_CAPS}"),
        format!("--ambient-caps=-all,{UNIT_CAPS}"),
        format!("--bounding-set=-all,{UNIT_CAPS}"),
        "--no-new-privs".into(),
    ]
}

/// `Uid:` and `CapEff:` of a process, from /proc.
pub fn uid_and_caps(pid: i32) -> (u32, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    let uid = field("Uid:")
        .split_whitespace()
        .nth(1)
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX);
    let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0);
    (uid, caps)
}

/// CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39): the unit's set.
pub const UNIT_CAPS_MASK: u64 = (1 << 12) | (1 << 38) | (1 << 39);
