//! Real traffic through the veth pairs: UDP and TCP probes, raw frames
//! through a packet socket, and continuous per-source UDP streams with
//! sequence numbers.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    sync::atomic::Ordering,
    time::Duration,
};

use crate::*;

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
        Self::start_every(
            from,
            sources,
            to,
            dst,
            port,
            Duration::from_millis(every_ms),
        )
    }

    /// As `start`, one datagram per source every `every` (e.g. 500 us: 2 kHz).
    pub fn start_every(
        from: &Ns,
        sources: &[IpAddr],
        to: &Ns,
        dst: IpAddr,
        port: u16,
        every: Duration,
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
                std::thread::sleep(every);
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

/// A UDP request from `src` (in `from`) to `dst:port` (in `to`), where a
/// server answers every datagram: how many of `n` answers come back.
pub fn udp_answers(from: &Ns, src: IpAddr, to: &Ns, dst: IpAddr, port: u16, n: u32) -> u32 {
    let server = to.run(move || UdpSocket::bind(SocketAddr::new(dst, port)).expect("bind server"));
    server
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let answering = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut idle = 0;
        while idle < 5 {
            match server.recv_from(&mut buf) {
                Ok((len, peer)) => {
                    let _ = server.send_to(&buf[..len], peer);
                    idle = 0;
                }
                Err(_) => idle += 1,
            }
        }
    });
    let got = from.run(move || {
        let c = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind client");
        c.connect(SocketAddr::new(dst, port)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = 0;
        let mut buf = [0u8; 64];
        for i in 0..n {
            let _ = c.send(&i.to_be_bytes());
            if c.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        got
    });
    let _ = answering.join();
    got
}

/// Send `msg` from `src` to `dst` through a raw IP socket of protocol
/// `proto` (the kernel builds the IP header; for ICMPv6 it also fills in the
/// checksum). Call it on a thread inside the sender's namespace.
pub fn raw_send(src: IpAddr, dst: IpAddr, proto: i32, msg: &[u8]) -> std::io::Result<()> {
    let domain = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on an fd we own and close; `msg` and the
    // sockaddrs outlive the calls that read them.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_RAW, proto);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (sa, len) = sockaddr(SocketAddr::new(src, 0));
        let (da, dlen) = sockaddr(SocketAddr::new(dst, 0));
        let r = if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) != 0 {
            -1
        } else {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                &da as *const _ as *const libc::sockaddr,
                dlen,
            )
        };
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 { Err(e) } else { Ok(()) }
    }
}

/// `GET path` over HTTP/1.1 from inside `ns`: (status, body), or None if the
/// connection failed. Bounded: 5 s, 4 MiB.
pub fn http_get(ns: &Ns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    ns.run(move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = Vec::new();
        s.take(4 << 20).read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    })
}
