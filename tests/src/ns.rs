//! Namespaces, veth pairs, pin directories and scratch directories, each
//! uniquely named and removed on Drop (even when a test panics); shell
//! helpers; and `spawn_in`, the one place anything enters a namespace.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<tag>-<pid>-<n>`.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}{}-{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh")
}

#[track_caller]
pub fn sh_ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run `f` on a new thread inside the network namespace at `ns` (a path under
/// /run/netns). The one place the tests and the lab enter a namespace: setns
/// changes only the calling thread, so a fresh thread is the whole scope.
pub fn spawn_in<T: Send + 'static>(
    ns: PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let file = File::open(&ns).expect("open netns");
        // SAFETY: setns on a descriptor we own; it affects this new thread only.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {}", ns.display());
        f()
    })
}

/// A network namespace, deleted on Drop (which also deletes its veths).
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let name = unique(tag);
        sh_ok(&format!("ip netns add {name}"));
        let ns = Ns { name };
        ns.sh_ok("ip link set lo up");
        ns
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    /// Run a shell command inside. `nsenter --net` changes only the network
    /// namespace: `ip netns exec` would remount /sys and hide our pins.
    pub fn sh(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .args(["sh", "-c", cmd])
            .output()
            .expect("spawn nsenter")
    }
    #[track_caller]
    pub fn sh_ok(&self, cmd: &str) -> String {
        let o = self.sh(cmd);
        assert!(
            o.status.success(),
            "in {}: `{cmd}` failed: {}{}",
            self.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// Run `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        spawn_in(self.path(), f)
            .join()
            .expect("namespace thread panicked")
    }
    pub fn ping(&self, src: IpAddr, dst: IpAddr) -> bool {
        self.sh(&format!("ping -q -c1 -W1 -I {src} {dst}"))
            .status
            .success()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// A pin directory on bpffs, unique per test; on Drop every link in it is
/// unpinned (detaching the program) and the directory removed.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        PinDir {
            path: PathBuf::from(format!("/sys/fs/bpf/{}", unique("fwt"))),
        }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = sh(&format!("rm -rf {}", self.path.display()));
    }
}

/// Two namespaces joined by a veth pair. `a` is the protected host (addresses
/// 198.18.N.1 and 2001:2:0:N::1), `b` the peers (198.18.N.2..=.9, 2001:2:0:N::2..=9).
pub struct Pair {
    pub a: Ns,
    pub b: Ns,
    pub a_if: String,
    pub b_if: String,
    pub net: u8,
}

impl Pair {
    pub fn new(net: u8) -> Pair {
        let (a, b) = (Ns::new("fwa"), Ns::new("fwb"));
        let a_if = unique("va");
        let b_if = unique("vb");
        sh_ok(&format!(
            "ip link add {a_if} netns {} type veth peer name {b_if} netns {}",
            a.name, b.name
        ));
        a.sh_ok(&format!("ip addr add 198.18.{net}.1/24 dev {a_if} && ip -6 addr add 2001:2:0:{net}::1/64 dev {a_if} nodad && ip link set {a_if} up"));
        let mut cmds = vec![];
        for h in 2..=9 {
            cmds.push(format!("ip addr add 198.18.{net}.{h}/24 dev {b_if} && ip -6 addr add 2001:2:0:{net}::{h}/64 dev {b_if} nodad"));
        }
        b.sh_ok(&format!("{} && ip link set {b_if} up", cmds.join(" && ")));
        Pair {
            a,
            b,
            a_if,
            b_if,
            net,
        }
    }
    pub fn a4(&self) -> IpAddr {
        format!("198.18.{}.1", self.net).parse().unwrap()
    }
    pub fn a6(&self) -> IpAddr {
        format!("2001:2:0:{}::1", self.net).parse().unwrap()
    }
    pub fn b4(&self, h: u8) -> IpAddr {
        format!("198.18.{}.{h}", self.net).parse().unwrap()
    }
    pub fn b6(&self, h: u8) -> IpAddr {
        format!("2001:2:0:{}::{h}", self.net).parse().unwrap()
    }
}

/// A scratch directory for a test, removed on Drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("fwtd"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
