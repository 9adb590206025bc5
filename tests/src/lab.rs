//! The multi-node lab: N nodes in network namespaces on a bridge. Node k is
//! 198.18.0.(10+k) on its `eth0`, runs a Serf agent (RPC 127.0.0.1:7373 inside
//! its namespace), the firewall attached to `eth0`, and the controller with
//! Serf discovery. The compiled-in overlay covers the gossip port, so Serf
//! keeps working whatever the peer maps hold.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Daemon, Ns, PinDir, TempDir, fwctl, sh_ok, unique};

pub const MESH_PORT: u16 = 6000;

pub struct Node {
    pub k: u8,
    pub ns: Ns,
    pub ip: IpAddr,
    pub port: String,
    pub pins: PinDir,
    pub dir: PathBuf,
    pub serf: Option<Child>,
    pub ctl: Option<Daemon>,
}

impl Node {
    pub fn name(&self) -> String {
        format!("n{}", self.k)
    }
}

pub struct Lab {
    pub br: Ns,
    pub nodes: Vec<Node>,
    pub root: TempDir,
    pub guards: String,
    /// The gateway joining the two segments (`Lab::segments`), if any.
    pub gw: Option<Ns>,
}

pub fn node_ip(k: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + k))
}

impl Lab {
    /// Build `n` nodes (no agents started yet). `guards` is the `[guards]`
    /// table body of every node's controller config.
    pub fn new(n: u8, guards: &str) -> Lab {
        let br = Ns::new("fwlbr");
        br.sh_ok("ip link add br0 type bridge && ip link set br0 up");
        let mut lab = Lab {
            br,
            nodes: Vec::new(),
            root: TempDir::new(),
            guards: guards.to_string(),
            gw: None,
        };
        for k in 1..=n {
            lab.add_node(k);
        }
        lab
    }

    /// Two segments of `per_segment` nodes each, on their own bridges
    /// (198.18.0.0/24 and 198.18.1.0/24), joined through a gateway namespace
    /// that routes between them: the seed's redundant network gateway. Nodes
    /// of segment 0 carry the Serf tag `topo=a`, those of segment 1 `topo=b`,
    /// and every controller follows both topologies as two Serf sources.
    pub fn segments(per_segment: u8, guards: &str) -> Lab {
        let br = Ns::new("fwlbr");
        br.sh_ok("ip link add br0 type bridge && ip link set br0 up && ip link add br1 type bridge && ip link set br1 up");
        let gw = Ns::new("fwlgw");
        for (seg, side) in [(0u8, "gwa"), (1, "gwb")] {
            let port = unique("lg");
            sh_ok(&format!(
                "ip link add {side} netns {} type veth peer name {port} netns {}",
                gw.name, br.name
            ));
            br.sh_ok(&format!(
                "ip link set {port} master br{seg} && ip link set {port} up"
            ));
            gw.sh_ok(&format!(
                "ip addr add 198.18.{seg}.1/24 dev {side} && ip link set {side} up"
            ));
        }
        // /proc/sys/net is the entered namespace's own.
        gw.sh_ok("echo 1 > /proc/sys/net/ipv4/ip_forward");
        let mut lab = Lab {
            br,
            nodes: Vec::new(),
            root: TempDir::new(),
            guards: guards.to_string(),
            gw: Some(gw),
        };
        for k in 1..=2 * per_segment {
            lab.add_node_in(k, u8::from(k > per_segment));
        }
        lab
    }

    /// The gateway's links go down (a reload), or come back.
    pub fn gateway(&self, up: bool) {
        let gw = self.gw.as_ref().expect("a lab with segments");
        let st = if up { "up" } else { "down" };
        gw.sh_ok(&format!("ip link set gwa {st} && ip link set gwb {st}"));
    }

    /// Node k on the one bridge of a `new` lab (198.18.0.(10+k)).
    pub fn add_node(&mut self, k: u8) {
        self.plug_node(k, 0, None);
    }

    /// Node k on segment `seg` (0 or 1) of a `segments` lab, routed through
    /// the gateway, tagged with its segment's topology.
    fn add_node_in(&mut self, k: u8, seg: u8) {
        self.plug_node(k, seg, Some(if seg == 0 { "a" } else { "b" }));
    }

    /// A namespace with `eth0` on bridge `br{seg}` at 198.18.{seg}.(10+k);
    /// a segment lab's nodes also get the gateway as their default route.
    fn plug_node(&mut self, k: u8, seg: u8, topo: Option<&str>) {
        let ns = Ns::new("fwln");
        let port = unique("lp");
        sh_ok(&format!(
            "ip link add eth0 netns {} type veth peer name {port} netns {}",
            ns.name, self.br.name
        ));
        self.br.sh_ok(&format!(
            "ip link set {port} master br{seg} && ip link set {port} up"
        ));
        let ip = IpAddr::V4(Ipv4Addr::new(198, 18, seg, 10 + k));
        let route = if self.gw.is_some() {
            format!(" && ip route add default via 198.18.{seg}.1")
        } else {
            String::new()
        };
        ns.sh_ok(&format!(
            "ip addr add {ip}/24 dev eth0 && ip link set eth0 up{route}"
        ));
        self.finish_node(k, ns, port, ip, topo);
    }

    fn finish_node(&mut self, k: u8, ns: Ns, port: String, ip: IpAddr, topo: Option<&str>) {
        let dir = self.root.0.join(format!("n{k}"));
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let pins = PinDir::new();
        let mut agent = serde_json::json!({"node_name": format!("n{k}"), "bind": format!("{ip}:7946"), "rpc_addr": "127.0.0.1:7373",
            "reconnect_interval": "2s", "profile": "lan"});
        if let Some(t) = topo {
            agent["tags"] = serde_json::json!({ "topo": t });
        }
        std::fs::write(dir.join("serf.json"), agent.to_string()).unwrap();
        let discovery = match topo {
            None => "[discovery]\nkind = \"serf\"\nrpc_addr = \"127.0.0.1:7373\"\npoll_ms = 100\n".to_string(),
            // Both topologies, as two sources of the same agent.
            Some(_) => ["a", "b"]
                .iter()
                .map(|t| {
                    format!("[[discovery]]\nkind = \"serf\"\nrpc_addr = \"127.0.0.1:7373\"\npoll_ms = 100\ntags = {{ topo = \"{t}\" }}\n")
                })
                .collect(),
        };
        std::fs::write(
            dir.join("firewall.toml"),
            format!(
                "interfaces = [\"eth0\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\ntick_ms = 100\n{discovery}[guards]\n{}\n",
                pins.path.display(),
                dir.join("state").display(),
                self.guards
            ),
        )
        .unwrap();
        self.nodes.push(Node {
            k,
            ns,
            ip,
            port,
            pins,
            dir,
            serf: None,
            ctl: None,
        });
    }

    pub fn node(&self, k: u8) -> &Node {
        self.nodes.iter().find(|n| n.k == k).expect("node")
    }
    fn node_mut(&mut self, k: u8) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.k == k).expect("node")
    }

    /// Start node k's Serf agent, joining `seeds` (retrying for ever).
    pub fn start_serf(&mut self, k: u8, seeds: &[u8]) {
        let seeds: Vec<IpAddr> = seeds.iter().map(|s| self.node(*s).ip).collect();
        let n = self.node_mut(k);
        let log = File::options()
            .create(true)
            .append(true)
            .open(n.dir.join("serf.log"))
            .unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", n.ns.path().display()))
            .args(["serf", "agent", "-config-file"])
            .arg(n.dir.join("serf.json"))
            .args(["-retry-interval", "1s", "-retry-max", "0"]);
        for s in seeds {
            cmd.arg("-retry-join").arg(format!("{s}:7946"));
        }
        n.serf = Some(
            cmd.stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn serf (run `cargo xtask setup`)"),
        );
    }

    /// SIGKILL node k's agent (our child, by PID).
    pub fn kill_serf(&mut self, k: u8) {
        if let Some(mut c) = self.node_mut(k).serf.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// SIGINT node k's agent: a graceful leave (`left` on the others in < 1 s).
    pub fn leave_serf(&mut self, k: u8) {
        if let Some(mut c) = self.node_mut(k).serf.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    pub fn start_ctl(&mut self, k: u8) {
        let n = self.node_mut(k);
        n.ctl = Some(Daemon::start(
            &n.ns,
            &n.dir.join("firewall.toml"),
            &n.dir.join("state"),
        ));
    }

    pub fn kill_ctl(&mut self, k: u8) {
        if let Some(mut d) = self.node_mut(k).ctl.take() {
            d.kill(libc::SIGKILL);
        }
    }

    /// (name, status) of every member node k's agent knows.
    pub fn serf_members(&self, k: u8) -> Vec<(String, String)> {
        let o = self
            .node(k)
            .ns
            .sh("serf members -rpc-addr 127.0.0.1:7373 -format json");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or("").to_string(),
                    m["status"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// The peers node k's datapath allows (empty until its controller attached).
    pub fn allowed(&self, k: u8) -> Vec<IpAddr> {
        let n = self.node(k);
        let o = fwctl(&n.ns, &n.pins, "peers list --json");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["peer"].as_str()?.split('/').next()?.parse().ok())
            .collect()
    }

    /// Every agent's and controller's PID (our children).
    pub fn pids(&self) -> Vec<i32> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.serf.as_ref().map(|c| c.id() as i32).into_iter().chain(
                    n.ctl
                        .as_ref()
                        .and_then(|d| d.child.as_ref())
                        .map(|c| c.id() as i32),
                )
            })
            .collect()
    }

    pub fn audit(&self, k: u8) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.node(k).dir.join("state/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Evictions node k's controller recorded.
    pub fn evictions(&self, k: u8) -> Vec<(String, u64, u64)> {
        self.audit(k)
            .iter()
            .filter(|e| e["event"] == "commit")
            .flat_map(|e| {
                let ts = e["ts_ms"].as_u64().unwrap_or(0);
                e["evicted"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |v| {
                        (
                            v["peer"].as_str().unwrap_or("").to_string(),
                            v["absent_since_ms"].as_u64().unwrap_or(0),
                            ts,
                        )
                    })
            })
            .collect()
    }

    /// A silent partition of node k: the bridge drops its frames (nftables).
    pub fn partition(&self, k: u8) {
        let port = &self.node(k).port;
        self.br.sh_ok(&format!(
            "nft add table bridge fwpart{k} && nft add chain bridge fwpart{k} cut '{{ type filter hook forward priority 0; }}' && \
             nft add rule bridge fwpart{k} cut iifname {port} drop && nft add rule bridge fwpart{k} cut oifname {port} drop"
        ));
    }

    pub fn heal(&self, k: u8) {
        self.br.sh_ok(&format!("nft delete table bridge fwpart{k}"));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let ks: Vec<u8> = self.nodes.iter().map(|n| n.k).collect();
        for k in ks {
            self.kill_ctl(k);
            self.kill_serf(k);
        }
    }
}

/// (ms since start, src node, dst node, true for a receive / false for a send).
pub type MeshLog = Vec<(u64, u8, u8, bool)>;

/// Continuous UDP between every pair of nodes, recording every send and
/// receive with its time, for loss accounting and the timeline.
pub struct Mesh {
    pub t0: Instant,
    stop: Arc<AtomicBool>,
    sending: BTreeMap<u8, Arc<AtomicBool>>,
    threads: Vec<JoinHandle<()>>,
    /// (ms since t0, src k, dst k, received?)
    pub log: Arc<Mutex<MeshLog>>,
}

impl Mesh {
    pub fn start(lab: &Lab, every_ms: u64) -> Mesh {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let ips: Vec<(u8, IpAddr)> = lab.nodes.iter().map(|n| (n.k, n.ip)).collect();
        let by_ip: BTreeMap<IpAddr, u8> = ips.iter().map(|(k, ip)| (*ip, *k)).collect();
        let mut threads = Vec::new();
        let mut sending = BTreeMap::new();
        // Every receiver is bound before any sender starts: a datagram sent
        // to a port nobody listens on yet would count as lost.
        for n in &lab.nodes {
            let k = n.k;
            let rx = n.ns.run(move || {
                UdpSocket::bind(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    MESH_PORT,
                ))
                .unwrap()
            });
            rx.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (stop2, log2, by_ip2) = (stop.clone(), log.clone(), by_ip.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match rx.recv_from(&mut buf) {
                        Ok((_, from)) => {
                            if let Some(src) = by_ip2.get(&from.ip()) {
                                log2.lock().unwrap().push((
                                    t0.elapsed().as_millis() as u64,
                                    *src,
                                    k,
                                    true,
                                ));
                            }
                        }
                        Err(_) if stop2.load(Ordering::Relaxed) => return,
                        Err(_) => {}
                    }
                }
            }));
        }
        for n in &lab.nodes {
            let (k, ip, path) = (n.k, n.ip, n.ns.path());
            let on = Arc::new(AtomicBool::new(true));
            sending.insert(k, on.clone());
            let (stop3, log3, peers) = (stop.clone(), log.clone(), ips.clone());
            threads.push(std::thread::spawn(move || {
                let f = File::open(&path).unwrap();
                // SAFETY: setns on this thread only.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let tx = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
                while !stop3.load(Ordering::Relaxed) {
                    if on.load(Ordering::Relaxed) {
                        for (dk, dip) in &peers {
                            if *dk != k
                                && tx
                                    .send_to(b"mesh", SocketAddr::new(*dip, MESH_PORT))
                                    .is_ok()
                            {
                                log3.lock().unwrap().push((
                                    t0.elapsed().as_millis() as u64,
                                    k,
                                    *dk,
                                    false,
                                ));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(every_ms));
                }
            }));
        }
        Mesh {
            t0,
            stop,
            sending,
            threads,
            log,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// A dead node sends nothing.
    pub fn silence(&self, k: u8) {
        self.sending[&k].store(false, Ordering::Relaxed);
    }

    pub fn stop(mut self) -> Vec<(u64, u8, u8, bool)> {
        // Senders first, then let the last packets land, then the receivers:
        // a packet sent is a packet counted.
        for on in self.sending.values() {
            on.store(false, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// (sent, received) per (src, dst), counting only packets sent by a node to
/// a destination that were both in `live` at the time.
pub fn pair_totals(log: &[(u64, u8, u8, bool)], live: &[u8]) -> BTreeMap<(u8, u8), (u64, u64)> {
    let mut m: BTreeMap<(u8, u8), (u64, u64)> = BTreeMap::new();
    for (_, s, d, recv) in log {
        if live.contains(s) && live.contains(d) {
            let e = m.entry((*s, *d)).or_default();
            if *recv { e.1 += 1 } else { e.0 += 1 }
        }
    }
    m
}

/// A single-node etcd inside a namespace, our child; killed on Drop.
pub struct Etcd {
    child: Option<Child>,
}

/// Certificates for an etcd served over TLS with client-certificate auth,
/// made with openssl in `dir`: a CA, the server's (with the server's IP as
/// its subject alternative name) and a client's (CN `client`, not a user).
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    pub fn make(dir: &std::path::Path, server_ip: std::net::IpAddr) -> EtcdTls {
        let d = dir.display();
        crate::sh_ok(&format!(
            "cd {d} && printf 'subjectAltName=IP:{server_ip}\n' > server.ext && \
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
               -subj /CN=fw-test-ca -keyout ca.key -out ca.pem 2>/dev/null && \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=etcd \
               -keyout server.key -out server.csr 2>/dev/null && \
             openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
               -extfile server.ext -out server.pem 2>/dev/null && \
             printf 'extendedKeyUsage=clientAuth\n' > client.ext && \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=client \
               -keyout client.key -out client.csr 2>/dev/null && \
             openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
               -extfile client.ext -out client.pem 2>/dev/null && chmod 600 client.key"
        ));
        EtcdTls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

impl Etcd {
    pub fn start(ns: &Ns, ip: std::net::IpAddr, dir: &std::path::Path) -> Etcd {
        Etcd::start_with(ns, ip, dir, None)
    }
    /// With `tls`, clients must speak TLS and present a certificate the CA signed.
    pub fn start_with(
        ns: &Ns,
        ip: std::net::IpAddr,
        dir: &std::path::Path,
        tls: Option<&EtcdTls>,
    ) -> Etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .args(["etcd", "--name", "e1", "--data-dir"])
            .arg(dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &format!("{scheme}://{ip}:2379"),
                "--advertise-client-urls",
                &format!("{scheme}://{ip}:2379"),
            ]);
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .args([
                "--initial-cluster",
                "e1=http://127.0.0.1:2380",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (run `cargo xtask setup`)");
        Etcd { child: Some(child) }
    }
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Write the controller config for etcd discovery of `server` into
/// `dir/firewall.toml` (state in `dir/state`), and return its path.
pub fn etcd_config(
    dir: &std::path::Path,
    pins: &PinDir,
    iface: &str,
    server: std::net::IpAddr,
    guards: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let cfg = dir.join("firewall.toml");
    std::fs::write(
        &cfg,
        format!(
            "interfaces = [\"{iface}\"]\npin_dir = \"{}\"\nstate_dir = \"{}\"\ntick_ms = 100\n[discovery]\nkind = \"etcd\"\nendpoints = [\"http://{server}:2379\"]\nprefix = \"/firewall/peers/\"\n[guards]\n{guards}\n",
            pins.path.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    cfg
}

/// One run of the seed's trigger at fleet scale (`Lab::segments`).
pub struct GatewayRun {
    pub mode: &'static str,
    pub nodes: Vec<u8>,
    /// Nodes 1..=per_segment are segment 0 (topology a), the rest segment 1.
    pub per_segment: u8,
    pub log: MeshLog,
    pub events: Vec<(u64, String)>,
    /// When the gateway's links went down and came back (mesh ms).
    pub down_ms: u64,
    pub up_ms: u64,
    /// How long after the gateway came back every ordered pair had
    /// delivered again (None: not within the wait).
    pub all_talk_ms: Option<u64>,
    /// Peers each node's controller evicted.
    pub evictions: BTreeMap<u8, usize>,
    /// Resident memory of every agent and controller, summed (MB), and the
    /// CPU time they used (s), with the wall time of the run (s).
    pub rss_mb: f64,
    pub cpu_s: f64,
    pub wall_s: f64,
}

/// VmRSS (MB) and utime+stime (s) of one process.
fn proc_usage(pid: i32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): utime is the 14th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (rss, (ticks(11) + ticks(12)) / hz)
}

/// The two controllers the demos compare: the `[guards]` body, and its name.
/// Naive behaves like the post-mortem's orchestrator; guarded is the
/// defaults, with the 5-minute grace written out so a replay does not
/// depend on the default.
pub fn comparison(naive: bool) -> (&'static str, &'static str) {
    if naive {
        ("naive = true", "naive (grace 0, no guards)")
    } else {
        ("grace_ms = 300000", "guarded (defaults)")
    }
}

/// The post-mortem's chain at fleet scale: `2 * per_segment` nodes in two
/// segments joined by a gateway, Serf across all of them, two topologies
/// by tag, the firewall and a controller (following both topologies) on
/// every node, and UDP between every pair every 50 ms. The gateway reloads:
/// its links go down for 8 s and come back (the partitioned halves then
/// gossip at once to merge). During the reload n1's agent restarts, and
/// its only seed is beyond the gateway, so n1's list for topology b comes
/// back empty (and its own topology self-only) until the gateway is back.
pub fn gateway_run(naive: bool, per_segment: u8) -> Result<GatewayRun, String> {
    let (guards, mode) = comparison(naive);
    let n = 2 * per_segment;
    let nodes: Vec<u8> = (1..=n).collect();
    let mut lab = Lab::segments(per_segment, guards);
    let (a0, b0) = (1u8, per_segment + 1);
    for &k in &nodes {
        let seeds: Vec<u8> = [a0, b0].into_iter().filter(|s| *s != k).collect();
        lab.start_serf(k, &seeds);
    }
    for &k in &nodes {
        lab.start_ctl(k);
    }
    let t = Instant::now();
    while !nodes.iter().all(|k| lab.allowed(*k).len() == n as usize) {
        if t.elapsed() > Duration::from_secs(120) {
            let counts: Vec<usize> = nodes.iter().map(|k| lab.allowed(*k).len()).collect();
            return Err(format!(
                "the fleet did not converge in 120 s: allowed counts {counts:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let cpu0: f64 = lab.pids().iter().map(|p| proc_usage(*p).1).sum();
    let wall0 = Instant::now();
    let mesh = Mesh::start(&lab, 50);
    let mut events = Vec::new();
    std::thread::sleep(Duration::from_secs(3));
    lab.gateway(false);
    let down_ms = mesh.now_ms();
    events.push((
        down_ms,
        "the gateway reloads: its links go down".to_string(),
    ));
    std::thread::sleep(Duration::from_secs(2));
    lab.kill_serf(1);
    lab.start_serf(1, &[b0]);
    events.push((
        mesh.now_ms(),
        "n1's agent restarts; its seed is beyond the gateway: topology b empty, a self-only".into(),
    ));
    std::thread::sleep(Duration::from_secs(6));
    lab.gateway(true);
    let up_ms = mesh.now_ms();
    events.push((
        up_ms,
        "the gateway is back: the halves gossip and merge".to_string(),
    ));
    // Until every ordered pair has delivered again, or two minutes.
    let pairs: Vec<(u8, u8)> = nodes
        .iter()
        .flat_map(|s| nodes.iter().map(move |d| (*s, *d)))
        .filter(|(s, d)| s != d)
        .collect();
    let mut all_talk_ms = None;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
        let log = mesh.log.lock().unwrap();
        let mut last_first = 0;
        let mut done = true;
        for (s, d) in &pairs {
            match log
                .iter()
                .find(|(t, ls, ld, r)| *r && *t >= up_ms && ls == s && ld == d)
            {
                Some((t, ..)) => last_first = last_first.max(*t),
                None => {
                    done = false;
                    break;
                }
            }
        }
        if done {
            all_talk_ms = Some(last_first - up_ms);
            break;
        }
    }
    if let Some(ms) = all_talk_ms {
        events.push((up_ms + ms, "every pair talks again".to_string()));
    }
    std::thread::sleep(Duration::from_secs(5));
    let usage: Vec<(f64, f64)> = lab.pids().iter().map(|p| proc_usage(*p)).collect();
    let rss_mb = usage.iter().map(|u| u.0).sum();
    let cpu_s = usage.iter().map(|u| u.1).sum::<f64>() - cpu0;
    let wall_s = wall0.elapsed().as_secs_f64();
    let log = mesh.stop();
    let evictions = nodes
        .iter()
        .map(|k| (*k, lab.evictions(*k).len()))
        .collect();
    Ok(GatewayRun {
        mode,
        nodes,
        per_segment,
        log,
        events,
        down_ms,
        up_ms,
        all_talk_ms,
        evictions,
        rss_mb,
        cpu_s,
        wall_s,
    })
}

/// Losses per receiving node.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatewayLoss {
    pub sent: u64,
    /// Across the gateway while it was down (or within a second of its
    /// return): what the outage itself drops, unavoidable.
    pub across_outage: u64,
    /// Any other loss before the gateway was back: pairs on one segment,
    /// which the outage does not touch, dropped by a firewall.
    pub other_outage: u64,
    /// After the gateway was back (a second of slack for the first packets).
    pub after: u64,
}

/// A 100 ms slot of one pair whose sends did not arrive (in that slot or
/// the next) counts as lost.
pub fn gateway_losses(r: &GatewayRun) -> BTreeMap<u8, GatewayLoss> {
    let mut sent: BTreeMap<(u8, u8, u64), u64> = BTreeMap::new();
    let mut got: BTreeMap<(u8, u8, u64), u64> = BTreeMap::new();
    for (t, s, d, recv) in &r.log {
        let key = (*s, *d, t / 100);
        *(if *recv {
            got.entry(key)
        } else {
            sent.entry(key)
        })
        .or_default() += 1;
    }
    let seg = |k: u8| k > r.per_segment;
    let (down, after) = (r.down_ms / 100, (r.up_ms + 1000) / 100);
    let mut out: BTreeMap<u8, GatewayLoss> = BTreeMap::new();
    for ((s, d, b), n) in &sent {
        let e = out.entry(*d).or_default();
        e.sent += n;
        let arrived = got.get(&(*s, *d, *b)).copied().unwrap_or(0)
            + got.get(&(*s, *d, b + 1)).copied().unwrap_or(0);
        if arrived > 0 {
            continue;
        }
        if *b >= after {
            e.after += n;
        } else if *b >= down && seg(*s) != seg(*d) {
            e.across_outage += n;
        } else {
            e.other_outage += n;
        }
    }
    out
}
