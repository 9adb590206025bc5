//! Helpers for the kernel tests: privilege gating, uniquely named network
//! namespaces and pin directories that clean up on Drop (even when a test
//! panics), traffic generators that run inside a namespace, and a
//! BPF_PROG_TEST_RUN harness over a fresh, unpinned copy of the program.

pub mod lab;
pub mod packet;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader, TestRunOptions,
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{TestRun as _, Xdp},
};
use firewall_common::{CidrVal, Control, Counters, PeerVal, Reason};
use firewall_ctl::datapath::table::{Table, V4, V6};

/// True if kernel tests can run here. Otherwise: under CI (`CI=true`) the
/// test fails, elsewhere it prints why it is skipped and returns false.
pub fn kernel_available(test: &str) -> bool {
    let why = if firewall_ctl::EBPF_OBJ.is_empty() {
        Some("firewall-ctl was built without the XDP object (AYA_BUILD_SKIP=1)".to_string())
    } else if firewall_ctl::sys::check_privileges().is_err() {
        Some("not root (needs CAP_BPF and CAP_NET_ADMIN)".to_string())
    } else if firewall_ctl::sys::check_bpffs(Path::new("/sys/fs/bpf")).is_err() {
        Some("/sys/fs/bpf is not a bpffs mount (run `cargo xtask setup`)".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(w) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: cannot run under CI: {w}")
        }
        Some(w) => {
            eprintln!("SKIPPED {test}: {w}");
            // libtest counts a test that returns early as passed. `cargo xtask
            // test` sets FIREWALL_SKIPPED_DIR and moves every test named there
            // from "passed" to "skipped", so a run that could not reach the
            // kernel never reads as a green one.
            if let Some(dir) = std::env::var_os("FIREWALL_SKIPPED_DIR") {
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(Path::new(&dir).join(test), w.as_bytes());
            }
            false
        }
    }
}

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

/// Send `n` UDP datagrams from `src` (in `from`) to `dst:port` (in `to`) and
/// count how many arrive.
pub fn udp_delivered(from: &Ns, src: IpAddr, to: &Ns, dst: IpAddr, port: u16, n: u32) -> u32 {
    let rx = to.run(move || UdpSocket::bind(SocketAddr::new(dst, port)).expect("bind receiver"));
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    from.run(move || {
        let tx = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind sender");
        for i in 0..n {
            let _ = tx.send_to(&i.to_be_bytes(), SocketAddr::new(dst, port));
        }
    });
    let mut got = 0;
    let mut buf = [0u8; 64];
    while rx.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    got
}

/// Does a TCP connection from `src` to `dst:port` complete?
pub fn tcp_connects(from: &Ns, src: IpAddr, to: &Ns, dst: IpAddr, port: u16) -> bool {
    let l = to.run(move || TcpListener::bind(SocketAddr::new(dst, port)).expect("bind listener"));
    from.run(move || {
        let sock = socket2_connect(src, SocketAddr::new(dst, port));
        drop(l);
        sock
    })
}

fn socket2_connect(src: IpAddr, dst: SocketAddr) -> bool {
    // std cannot bind a TCP client to a source address; a blocking connect with
    // a short timeout from a bound raw fd does it in a few lines of libc.
    let domain = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on an fd we own and close.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM, 0);
        let (sa, len) = sockaddr(SocketAddr::new(src, 0));
        if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) != 0 {
            libc::close(fd);
            return false;
        }
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let (da, dlen) = sockaddr(dst);
        let ok = libc::connect(fd, &da as *const _ as *const libc::sockaddr, dlen) == 0;
        libc::close(fd);
        ok
    }
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family's fields.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v) => {
            // SAFETY: sockaddr_storage is larger and more aligned than sockaddr_in.
            let s = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            s.sin_family = libc::AF_INET as u16;
            s.sin_port = v.port().to_be();
            s.sin_addr.s_addr = u32::from_ne_bytes(v.ip().octets());
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v) => {
            // SAFETY: sockaddr_storage is larger and more aligned than sockaddr_in6.
            let s = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            s.sin6_family = libc::AF_INET6 as u16;
            s.sin6_port = v.port().to_be();
            s.sin6_addr.s6_addr = v.ip().octets();
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// A fresh, unpinned copy of the program with its own maps, for TEST_RUN.
pub struct Harness {
    pub ebpf: Ebpf,
    pub v4: Table<V4>,
    pub v6: Table<V6>,
}

/// Hash seeds for unpinned test copies (a pin directory draws its own).
pub const TEST_SEED: [u64; 4] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
];

/// Map both exact-peer tables of an object whose programs are already loaded
/// (this takes the maps out of `ebpf`, closing its fds: a program loaded later
/// could not reference them).
pub fn peer_tables(ebpf: &mut Ebpf) -> (Table<V4>, Table<V6>) {
    let mut take = |name: &str| -> (aya::maps::MapData, u32) {
        match ebpf.take_map(name).expect("peer table") {
            aya::maps::Map::Array(d) => {
                let n = d.info().expect("map info").max_entries();
                (d, n)
            }
            _ => panic!("{name} is not an array"),
        }
    };
    let (d4, n4) = take("PEERS_V4");
    let (d6, n6) = take("PEERS_V6");
    (
        Table::mmap(std::os::fd::AsFd::as_fd(d4.fd()), n4, TEST_SEED).expect("mmap PEERS_V4"),
        Table::mmap(std::os::fd::AsFd::as_fd(d6.fd()), n6, TEST_SEED).expect("mmap PEERS_V6"),
    )
}

/// The control word a test copy runs with: its seeds and table sizes.
pub fn test_control(v4: &Table<V4>, v6: &Table<V6>) -> Control {
    Control {
        hash_seed: TEST_SEED,
        bucket_mask: [v4.buckets() - 1, v6.buckets() - 1],
        ..Default::default()
    }
}

impl Harness {
    pub fn new() -> Harness {
        let mut ebpf = EbpfLoader::new()
            .load(firewall_ctl::EBPF_OBJ)
            .expect("load object");
        let p: &mut Xdp = ebpf.program_mut("firewall").unwrap().try_into().unwrap();
        p.load().expect("verifier accepts the program");
        let (v4, v6) = peer_tables(&mut ebpf);
        Harness { ebpf, v4, v6 }
    }
    pub fn prog(&self) -> &Xdp {
        self.ebpf.program("firewall").unwrap().try_into().unwrap()
    }
    pub fn set_generation(&mut self, generation: u64, cidr4: [u32; 2], cidr6: [u32; 2]) {
        let mut m: Array<_, Control> = self.ebpf.map_mut("CTRL").unwrap().try_into().unwrap();
        m.set(
            0,
            Control {
                committed_gen: generation,
                cidr4_count: cidr4,
                cidr6_count: cidr6,
                ..test_control(&self.v4, &self.v6)
            },
            0,
        )
        .unwrap();
    }
    pub fn add_exact(&mut self, addr: IpAddr, added: u64, removed: u64) {
        let v = PeerVal {
            added_gen: added,
            removed_gen: removed,
            hits: 0,
            origin: 1,
            _pad: 0,
        };
        match addr {
            IpAddr::V4(a) => self.v4.insert(a.octets(), v).map(drop),
            IpAddr::V6(a) => self.v6.insert(a.octets(), v).map(drop),
        }
        .expect("a free slot");
    }
    pub fn add_cidr(&mut self, slot: usize, net: ipnet::IpNet) {
        let v = CidrVal { origin: 1, _pad: 0 };
        match net {
            ipnet::IpNet::V4(n) => {
                let mut m: LpmTrie<_, [u8; 4], CidrVal> = self
                    .ebpf
                    .map_mut(["CIDR4_0", "CIDR4_1"][slot])
                    .unwrap()
                    .try_into()
                    .unwrap();
                m.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), v, 0)
                    .unwrap();
            }
            ipnet::IpNet::V6(n) => {
                let mut m: LpmTrie<_, [u8; 16], CidrVal> = self
                    .ebpf
                    .map_mut(["CIDR6_0", "CIDR6_1"][slot])
                    .unwrap()
                    .try_into()
                    .unwrap();
                m.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), v, 0)
                    .unwrap();
            }
        }
    }
    pub fn counters(&self) -> Counters {
        let m: PerCpuArray<_, Counters> = self.ebpf.map("COUNTERS").unwrap().try_into().unwrap();
        let mut t = Counters::default();
        for c in m.get(&0, 0).unwrap().iter() {
            t.add(c);
        }
        t
    }
    /// Run one frame: (XDP action, the reason whose counter moved).
    pub fn run(&self, pkt: &[u8]) -> (u32, Reason) {
        let before = self.counters();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = self
            .prog()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("test_run");
        let after = self.counters();
        let moved: Vec<Reason> = Reason::ALL
            .into_iter()
            .filter(|r| after.get(*r) != before.get(*r))
            .collect();
        assert_eq!(
            moved.len(),
            1,
            "exactly one counter moves per packet, got {moved:?}"
        );
        (r.return_value, moved[0])
    }
    /// The overlay table, read back from the loaded program.
    pub fn overlay(&self) -> Vec<firewall_common::OverlayRule> {
        firewall_ctl::datapath::status::overlay_of(&self.prog().info().unwrap())
            .expect("overlay table")
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The MAC address of `iface` inside `ns`.
pub fn mac_of(ns: &Ns, iface: &str) -> [u8; 6] {
    // Not /sys/class/net: nsenter keeps the root namespace's /sys on purpose.
    let out = ns.sh_ok(&format!("ip -j link show dev {iface}"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let addr = v[0]["address"].as_str().unwrap().to_string();
    let mut mac = [0u8; 6];
    for (i, p) in addr.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(p, 16).unwrap();
    }
    mac
}

fn packet_socket(iface: &str) -> i32 {
    let name = std::ffi::CString::new(iface).unwrap();
    // SAFETY: plain AF_PACKET socket setup on fds we own.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert_eq!(
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32
            ),
            0
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 300_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        fd
    }
}

/// Write raw Ethernet frames onto `p.b_if` and count how many of them a packet
/// socket on `p.a_if` sees, i.e. how many the XDP program on `a_if` passed.
/// A frame is recognised by its UDP source port, which must be unique per
/// frame; the receiving kernel may move a VLAN tag into metadata, so the
/// match is on bytes after the tags.
pub fn raw_frames_passed(p: &Pair, frames: Vec<(u16, Vec<u8>)>) -> usize {
    let a_if = p.a_if.clone();
    let b_if = p.b_if.clone();
    let rx = p.a.run(move || packet_socket(&a_if));
    let sports: Vec<u16> = frames.iter().map(|(s, _)| *s).collect();
    p.b.run(move || {
        let tx = packet_socket(&b_if);
        for (_, f) in &frames {
            // SAFETY: sending a buffer we own on a bound packet socket.
            let n = unsafe { libc::send(tx, f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(
                n as usize,
                f.len(),
                "send: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: closing the socket we opened above, once.
        unsafe { libc::close(tx) };
    });
    let mut seen = std::collections::BTreeSet::new();
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(rx, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            break;
        }
        let f = &buf[..n as usize];
        for s in &sports {
            let b = s.to_be_bytes();
            if f.windows(4)
                .any(|w| w[..2] == b && w[2..] == 5555u16.to_be_bytes())
            {
                seen.insert(*s);
            }
        }
    }
    // SAFETY: closing our fd.
    unsafe { libc::close(rx) };
    seen.len()
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
        let log = File::options()
            .create(true)
            .append(true)
            .open(state_dir.join("daemon.log"))
            .unwrap();
        // nsenter execs firewall-ctl in place (no fork for a net namespace), so
        // the child's PID is the daemon's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
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

/// Continuous UDP traffic from several sources in `from` to `dst:port` in
/// `to`, one datagram per source every `every_ms`, each carrying a sequence
/// number; `stop` returns (sent, received) per source.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: Option<std::thread::JoinHandle<Vec<u32>>>,
    receiver: Option<std::thread::JoinHandle<std::collections::HashMap<IpAddr, u32>>>,
    sources: Vec<IpAddr>,
}

impl Traffic {
    pub fn start(
        from: &Ns,
        sources: &[IpAddr],
        to: &Ns,
        dst: IpAddr,
        port: u16,
        every_ms: u64,
    ) -> Traffic {
        use std::sync::{Arc, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let rx =
            to.run(move || UdpSocket::bind(SocketAddr::new(dst, port)).expect("bind receiver"));
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let s2 = stop.clone();
        let receiver = std::thread::spawn(move || {
            let mut got = std::collections::HashMap::new();
            let mut buf = [0u8; 64];
            let mut idle_after_stop = 0;
            loop {
                match rx.recv_from(&mut buf) {
                    Ok((_, from)) => *got.entry(from.ip()).or_insert(0u32) += 1,
                    Err(_) if s2.load(Ordering::Relaxed) => {
                        idle_after_stop += 1;
                        if idle_after_stop > 2 {
                            return got;
                        }
                    }
                    Err(_) => {}
                }
            }
        });
        let s3 = stop.clone();
        let srcs = sources.to_vec();
        let path = from.path();
        let sender = spawn_in(path, move || {
            let socks: Vec<UdpSocket> = srcs
                .iter()
                .map(|s| UdpSocket::bind(SocketAddr::new(*s, 0)).unwrap())
                .collect();
            let mut sent = vec![0u32; socks.len()];
            while !s3.load(Ordering::Relaxed) {
                for (i, s) in socks.iter().enumerate() {
                    if s.send_to(&sent[i].to_be_bytes(), SocketAddr::new(dst, port))
                        .is_ok()
                    {
                        sent[i] += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(every_ms));
            }
            sent
        });
        Traffic {
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
            sources: sources.to_vec(),
        }
    }

    pub fn stop(mut self) -> Vec<(IpAddr, u32, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.take().unwrap().join().unwrap();
        let got = self.receiver.take().unwrap().join().unwrap();
        self.sources
            .iter()
            .zip(sent)
            .map(|(s, n)| (*s, n, got.get(s).copied().unwrap_or(0)))
            .collect()
    }
}

/// Poll `f` every 100 ms until it returns true, for at most `limit`. Waits
/// for an outcome; it does not assert how long the outcome took.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}
