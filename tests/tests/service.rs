//! Running the controller as a service: the shipped unit checked by
//! systemd-analyze, the notify and watchdog protocol against a real
//! NOTIFY_SOCKET listener, the unit under a real systemd (PID 1 in
//! systemd-nspawn), and the daemon and CLI as a non-root user with only the
//! unit's capabilities, with live traffic.

use std::{
    os::unix::{fs::MetadataExt, io::AsRawFd, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use firewall_tests::{
    Daemon, Pair, PinDir, TempDir, UNIT_CAPS_MASK, as_unprivileged, fwctl_bin, sh, tool_available,
    uid_and_caps, wait_for, write_peers,
};

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd")
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// A uid no account uses, for "a non-root user" without creating one.
const UID: u32 = 64_123;

/// The exclusive flock `CommitLock` takes on the pin directory, held by the
/// test: the daemon's next commit blocks on it, as it would behind a stuck
/// `firewall-ctl peers add`.
struct HeldCommitLock(
    #[expect(dead_code, reason = "held for its Drop: closing unlocks")] std::fs::File,
);

impl HeldCommitLock {
    fn take(pin_dir: &Path) -> HeldCommitLock {
        let f = std::fs::File::open(pin_dir).expect("open the pin dir");
        // SAFETY: flock on an fd we own; released when the File drops.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        HeldCommitLock(f)
    }
}

// ---------------------------------------------------------------------------
// systemd-analyze

#[test]
fn the_shipped_unit_passes_verify_and_scores_what_the_readme_says() {
    let test = "the_shipped_unit_passes_verify_and_scores_what_the_readme_says";
    if !tool_available(test, "/usr/bin/systemd-analyze") {
        return;
    }
    let dir = TempDir::new();
    // verify checks that ExecStart's binary exists: point it at the built one.
    let unit = std::fs::read_to_string(dist().join("firewall-ctl.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/firewall-ctl run"));
    let local = unit.replace(
        "ExecStart=/usr/bin/firewall-ctl",
        &format!("ExecStart={}", fwctl_bin().display()),
    );
    let path = dir.0.join("firewall-ctl.service");
    std::fs::write(&path, local).unwrap();
    // verify exits 0 on unknown keys and bad values: its stderr must be empty.
    // --man=no: the man pages are installed by the package, not here.
    let v = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        v.status.success() && v.stderr.is_empty() && v.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let s = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&s.stdout).into_owned() + &String::from_utf8_lossy(&s.stderr);
    let score = out
        .split("Overall exposure level for firewall-ctl.service: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no score in:\n{out}"))
        .to_string();
    let stated = format!("`systemd-analyze security` scores it {score}");
    assert!(
        readme().contains(&stated),
        "the unit scores {score}; the README must say so (\"{stated}\"):\n{out}"
    );
}

// ---------------------------------------------------------------------------
// sd_notify against a real listener

/// A NOTIFY_SOCKET listener: every datagram, with when it came.
struct Listener {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Listener {
    fn bind(path: PathBuf) -> Listener {
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends with the test process; the socket file goes with the TempDir.
            loop {
                if let Ok(n) = sock.recv(&mut buf) {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    g.lock().unwrap().push((Instant::now(), m));
                }
            }
        });
        Listener { path, got }
    }
    fn all(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap().clone()
    }
    fn has(&self, field: &str) -> bool {
        self.all()
            .iter()
            .any(|(_, m)| m.lines().any(|l| l == field))
    }
    fn pings(&self) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(t, _)| t)
            .collect()
    }
    fn last_status(&self) -> String {
        self.all()
            .iter()
            .rev()
            .find_map(|(_, m)| m.lines().find_map(|l| l.strip_prefix("STATUS=")))
            .unwrap_or_default()
            .to_string()
    }
}

#[test]
fn the_daemon_speaks_sd_notify_and_its_loop_not_a_timer_pings_the_watchdog() {
    firewall_tests::require_kernel!();
    let p = Pair::new(72);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let peers = dir.0.join("peers.json");
    write_peers(&peers, 1, &[p.b4(2)]);
    let cfg = dir.0.join("firewall.toml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces = [\"{}\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\ntick_ms = 100\n[discovery]\nkind = \"file\"\npath = \"{}\"\npoll_ms = 200\n",
            p.a_if,
            pins.path.display(),
            state.display(),
            peers.display()
        ),
    )
    .unwrap();
    let l = Listener::bind(dir.0.join("notify.sock"));
    let sock = l.path.display().to_string();
    // 1 s: the loop pings every 250 ms (a quarter), and turns every 100 ms.
    let mut d = Daemon::start_env(
        &p.a,
        &cfg,
        &state,
        &[("NOTIFY_SOCKET", &sock), ("WATCHDOG_USEC", "1000000")],
    );
    assert!(
        wait_for(Duration::from_secs(20), || l.has("READY=1")),
        "no READY=1: {:?}\n{}",
        l.all(),
        d.log()
    );
    assert!(
        wait_for(Duration::from_secs(10), || l
            .last_status()
            .contains("generation 1, 1 peers; deletions allowed")),
        "STATUS= does not carry the guard: {:?}",
        l.last_status()
    );
    assert!(
        wait_for(Duration::from_secs(10), || l.pings().len() >= 4),
        "the watchdog is not pinged: {:?}",
        l.all()
    );
    assert!(p.b.ping(p.b4(2), p.a4()));

    // The loop hangs in a commit: a held commit lock and a new peer to commit.
    let lock = HeldCommitLock::take(&pins.path);
    write_peers(&peers, 2, &[p.b4(2), p.b4(3)]);
    let quiet = |l: &Listener| {
        l.pings()
            .last()
            .is_some_and(|t| t.elapsed() > Duration::from_millis(2500))
    };
    assert!(
        wait_for(Duration::from_secs(20), || quiet(&l)),
        "the watchdog is still pinged while the loop is stuck: a timer is pinging, not the loop"
    );
    assert!(
        d.wait_exit(Duration::from_millis(10)).is_none(),
        "the daemon is alive, only stuck"
    );
    assert!(
        !p.b.ping(p.b4(3), p.a4()),
        "the stuck commit did not happen"
    );
    drop(lock);
    let before = l.pings().len();
    assert!(
        wait_for(Duration::from_secs(20), || l.pings().len() > before + 2),
        "pings did not resume once the loop was free"
    );
    assert!(wait_for(Duration::from_secs(10), || p
        .b
        .ping(p.b4(3), p.a4())));

    // Reload: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
    let n = l.all().len();
    d.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || {
            let after: Vec<String> = l.all().into_iter().skip(n).map(|(_, m)| m).collect();
            let r = after
                .iter()
                .position(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC="));
            r.is_some_and(|r| after[r..].iter().any(|m| m.lines().any(|x| x == "READY=1")))
        }),
        "no RELOADING=1 then READY=1 on SIGHUP: {:?}",
        l.all().into_iter().skip(n).collect::<Vec<_>>()
    );
    d.signal(libc::SIGTERM);
    let st = d
        .wait_exit(Duration::from_secs(20))
        .expect("stops on SIGTERM");
    assert!(st.success());
    assert!(l.has("STOPPING=1"));
}

// ---------------------------------------------------------------------------
// Least privilege without systemd

#[test]
fn a_non_root_user_with_the_units_capabilities_runs_the_daemon_and_the_cli() {
    firewall_tests::require_kernel!();
    let test = "a_non_root_user_with_the_units_capabilities_runs_the_daemon_and_the_cli";
    if !tool_available(test, "/usr/bin/setpriv") {
        return;
    }
    let p = Pair::new(73);
    let pins = PinDir::new();
    let dir = TempDir::new();
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).unwrap();
    // The user owns its state (as StateDirectory= arranges); everything else
    // here is root's and only readable.
    sh(&format!(
        "chown {UID}:{UID} {} && chmod 700 {0}",
        state.display()
    ));
    sh(&format!("chmod 755 {}", dir.0.display()));
    let peers = dir.0.join("peers.json");
    write_peers(&peers, 1, &[p.b4(2), p.b4(3), p.b4(4)]);
    let cfg = dir.0.join("firewall.toml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces = [\"{}\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\ntick_ms = 100\n[discovery]\nkind = \"file\"\npath = \"{}\"\npoll_ms = 200\n[guards]\ngrace_ms = 1000\ngraceful_grace_ms = 1000\nliveness_window_ms = 500\n",
            p.a_if,
            pins.path.display(),
            state.display(),
            peers.display()
        ),
    )
    .unwrap();
    sh(&format!("chmod 644 {} {}", cfg.display(), peers.display()));
    let who = as_unprivileged(UID);
    let mut d = Daemon::start_as(&p.a, &cfg, &state, &[], &who);
    assert!(
        wait_for(Duration::from_secs(20), || d
            .status()
            .is_some_and(|s| s["core"]["peers"] == 3)),
        "the unprivileged daemon did not attach and commit:\n{}",
        d.log()
    );
    let (uid, caps) = uid_and_caps(d.pid());
    assert_eq!(uid, UID, "the daemon runs as the user");
    assert_eq!(caps, UNIT_CAPS_MASK, "with exactly the unit's capabilities");
    // It attached, and enforces: peers pass, others do not.
    let md = std::fs::metadata(&pins.path).unwrap();
    assert_eq!(
        (md.uid(), md.mode() & 0o777),
        (UID, 0o700),
        "its pins are its own, 0700"
    );
    assert!(p.b.ping(p.b4(2), p.a4()));
    assert!(p.b.ping(p.b4(4), p.a4()));
    assert!(!p.b.ping(p.b4(7), p.a4()));
    // Evict: .4 leaves discovery and goes after its 1 s grace.
    write_peers(&peers, 2, &[p.b4(2), p.b4(3)]);
    assert!(
        wait_for(Duration::from_secs(20), || d
            .status()
            .is_some_and(|s| s["core"]["peers"] == 2)),
        "no eviction:\n{}",
        d.log()
    );
    assert!(!p.b.ping(p.b4(4), p.a4()));
    assert!(p.b.ping(p.b4(2), p.a4()));
    // The CLI as the same user: status, and an operator's peer.
    let cli = |args: &str| {
        p.a.sh(&format!(
            "{} {} --pin-dir {} {args}",
            who.join(" "),
            fwctl_bin().display(),
            pins.path.display()
        ))
    };
    let st = cli(&format!("status --state-dir {}", state.display()));
    let out = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "status: {out}{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(out.contains("generation"), "{out}");
    let add = cli(&format!("peers add {}", p.b4(7)));
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    assert!(p.b.ping(p.b4(7), p.a4()));
    // Without CAP_PERFMON the verifier refuses the program: the CLI says which
    // capability is missing instead of calling it a bug.
    let short = p.a.sh(&format!(
        "setpriv --reuid={UID} --regid={UID} --clear-groups --inh-caps=-all,+bpf,+net_admin --ambient-caps=-all,+bpf,+net_admin {} --pin-dir {}-x attach --iface {}",
        fwctl_bin().display(),
        pins.path.display(),
        p.a_if
    ));
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(!short.status.success());
    assert!(err.contains("missing: CAP_PERFMON"), "{err}");
    sh(&format!("rm -rf {}-x", pins.path.display()));
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    // Fail-static as the user too: the datapath keeps enforcing.
    assert!(p.b.ping(p.b4(2), p.a4()));
    assert!(!p.b.ping(p.b4(4), p.a4()));
}

// ---------------------------------------------------------------------------
// Under a real systemd: PID 1 in systemd-nspawn

/// A container booting the host's systemd (read-only /usr, volatile root) in
/// the lab's protected namespace, with the shipped unit and sysusers file.
/// Stopped (SIGTERM to nspawn, which halts the container) on Drop.
struct Container {
    child: Option<Child>,
}

impl Container {
    fn pid1(&self) -> Option<i32> {
        // nspawn -> its own child -> systemd: walk down to the systemd.
        let mut pid = self.child.as_ref()?.id() as i32;
        for _ in 0..4 {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "systemd" {
                return Some(pid);
            }
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            pid = kids.split_whitespace().next()?.parse().ok()?;
        }
        None
    }
    /// Run a command inside the container (all its namespaces).
    /// Before systemd is up this runs `false` on the host: a failed output.
    fn sh(&self, cmd: &str) -> std::process::Output {
        match self.pid1() {
            Some(pid) => Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-a", "sh", "-c", cmd])
                .output()
                .unwrap(),
            None => Command::new("false").output().unwrap(),
        }
    }
    fn out(&self, cmd: &str) -> String {
        String::from_utf8_lossy(&self.sh(cmd).stdout)
            .trim()
            .to_string()
    }
    fn show(&self, prop: &str) -> String {
        self.out(&format!("systemctl show firewall-ctl -p {prop} --value"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn under_systemd_the_unit_is_ready_on_notify_restarts_a_hung_loop_and_enforces_as_its_user() {
    firewall_tests::require_kernel!();
    let test =
        "under_systemd_the_unit_is_ready_on_notify_restarts_a_hung_loop_and_enforces_as_its_user";
    if !tool_available(test, "/usr/bin/systemd-nspawn") {
        return;
    }
    let p = Pair::new(74);
    let pins = PinDir::new();
    let dir = TempDir::new();
    sh(&format!("chmod 755 {}", dir.0.display()));
    let etc = dir.0.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let peers = etc.join("peers.json");
    write_peers(&peers, 1, &[p.b4(2)]);
    // The operator's config; the state directory is the unit's default.
    std::fs::write(
        etc.join("firewall.toml"),
        format!(
            "interfaces = [\"{}\"]\npin_dir = \"{}\"\n[discovery]\nkind = \"file\"\npath = \"/etc/firewall-ctl/peers.json\"\npoll_ms = 200\n",
            p.a_if,
            pins.path.display()
        ),
    )
    .unwrap();
    sh(&format!("chmod 755 {0} && chmod 644 {0}/*", etc.display()));
    // The shipped unit, unchanged; a drop-in (as an operator would write)
    // moves ExecStart to the built binary and shortens the watchdog.
    let dropin = dir.0.join("dropin");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(
        dropin.join("test.conf"),
        "[Service]\nExecStart=\nExecStart=/opt/fw/firewall-ctl run --config /etc/firewall-ctl/firewall.toml\nWatchdogSec=3s\nRestartSec=1s\n",
    )
    .unwrap();
    // Boot only basic.target and the unit: the host's own units (and the
    // presets a first boot applies) stay out of the lab's namespace.
    let target = dir.0.join("fwtest.target");
    std::fs::write(
        &target,
        "[Unit]\nDescription=firewall-ctl and nothing else\nRequires=basic.target firewall-ctl.service\nAfter=basic.target\nAllowIsolate=yes\n",
    )
    .unwrap();
    let log = std::fs::File::create(dir.0.join("console.log")).unwrap();
    let bind = |from: &Path, to: &str| format!("--bind-ro={}:{to}", from.display());
    let child = Command::new("systemd-nspawn")
        .args([
            "-D",
            "/",
            "--volatile=yes",
            "--register=no",
            "--keep-unit",
            "--quiet",
        ])
        .arg(format!("--network-namespace-path={}", p.a.path().display()))
        // nspawn's own seccomp filter refuses bpf(2) unless asked.
        .args([
            "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
            "--system-call-filter=bpf",
        ])
        .arg("--bind=/sys/fs/bpf")
        .arg(bind(&fwctl_bin(), "/opt/fw/firewall-ctl"))
        .arg(bind(
            &dist().join("firewall-ctl.service"),
            "/etc/systemd/system/firewall-ctl.service",
        ))
        .arg(bind(&dropin, "/etc/systemd/system/firewall-ctl.service.d"))
        .arg(bind(&target, "/etc/systemd/system/fwtest.target"))
        .arg(bind(
            &dist().join("firewall-ctl.sysusers"),
            "/etc/sysusers.d/firewall-ctl.conf",
        ))
        .arg(format!("--bind={}:/etc/firewall-ctl", etc.display()))
        .args(["-b", "systemd.firstboot=off", "systemd.unit=fwtest.target"])
        .args([
            "systemd.mask=systemd-networkd.service",
            "systemd.mask=systemd-networkd.socket",
            "systemd.mask=systemd-networkd-wait-online.service",
            "systemd.mask=systemd-resolved.service",
            "systemd.mask=nftables.service",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn systemd-nspawn");
    let c = Container { child: Some(child) };
    let journal = || c.out("journalctl -u firewall-ctl --no-pager -o cat");
    let console = || std::fs::read_to_string(dir.0.join("console.log")).unwrap_or_default();

    // Active only after READY=1, with the guard in STATUS=.
    assert!(
        wait_for(Duration::from_secs(60), || c.show("ActiveState")
            == "active"),
        "the unit never went active: {}\n{}\n{}",
        c.out("systemctl status firewall-ctl --no-pager"),
        journal(),
        console()
    );
    assert_eq!(c.show("Type"), "notify");
    assert!(
        c.show("StatusText").contains("deletions allowed"),
        "{}",
        c.show("StatusText")
    );
    // The service's user, with only the unit's capabilities.
    let main_pid = c.show("MainPID");
    let st = c.out(&format!("cat /proc/{main_pid}/status"));
    let field = |k: &str| {
        st.lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    let uid: u32 = field("Uid:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(uid, 0, "runs as its own user");
    assert_eq!(c.out(&format!("id -un {uid}")), "firewall-ctl");
    assert_eq!(
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        UNIT_CAPS_MASK
    );
    assert_eq!(
        std::fs::metadata(&pins.path).unwrap().uid(),
        uid,
        "its pins are its own"
    );
    // Enforcing.
    assert!(p.b.ping(p.b4(2), p.a4()));
    assert!(!p.b.ping(p.b4(5), p.a4()));
    // Root's CLI acts as the service's user on its pins: status works, and a
    // peer root adds stays usable by the service.
    let s = c.sh(&format!(
        "/opt/fw/firewall-ctl --pin-dir {} status",
        pins.path.display()
    ));
    assert!(
        s.status.success(),
        "root's status on the service's pins: {}",
        String::from_utf8_lossy(&s.stderr)
    );

    // Logs reach the journal with their fields (format = "auto").
    assert!(
        wait_for(Duration::from_secs(20), || c
            .out("journalctl -u firewall-ctl -o verbose --no-pager")
            .contains("GENERATION=")),
        "no GENERATION= field in the journal"
    );

    // Hang the loop: the commit lock is held and a new peer must be committed.
    let restarts: u32 = c.show("NRestarts").parse().unwrap_or(0);
    let lock = HeldCommitLock::take(&pins.path);
    write_peers(&peers, 2, &[p.b4(2), p.b4(3)]);
    assert!(
        wait_for(Duration::from_secs(30), || journal()
            .contains("Watchdog timeout")),
        "the watchdog did not fire on a hung loop: {}",
        journal()
    );
    // systemd logs the kill's outcome a moment after the timeout line.
    assert!(
        wait_for(Duration::from_secs(30), || journal()
            .contains("Failed with result 'watchdog'")),
        "{}",
        journal()
    );
    // The datapath kept enforcing through the kill (fail-static).
    assert!(p.b.ping(p.b4(2), p.a4()));
    drop(lock);
    assert!(
        wait_for(Duration::from_secs(60), || c.show("ActiveState")
            == "active"
            && c.show("NRestarts").parse().unwrap_or(0) > restarts),
        "not restarted: {}",
        journal()
    );
    assert!(
        wait_for(Duration::from_secs(20), || p.b.ping(p.b4(3), p.a4())),
        "the restarted controller did not commit the new peer: {}",
        journal()
    );
    assert!(!p.b.ping(p.b4(5), p.a4()));
}
