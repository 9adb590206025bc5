//! Crafting Ethernet frames for BPF_PROG_TEST_RUN and raw sockets: the tests
//! and the lab's benchmark use it; the production crate does not ship it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Debug)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
    },
    Tcp {
        sport: u16,
        dport: u16,
    },
    Icmp,
    Icmpv6 {
        typ: u8,
    },
    /// Any ICMP (IPv4) or ICMPv6 (IPv6) message: type, code, the 4 bytes
    /// after the checksum (echo id and sequence, or the MTU of "fragmentation
    /// needed" / "packet too big"), and a body (an error's embedded packet).
    IcmpMsg {
        typ: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    Other(u8),
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Udp { .. } => 17,
            L4::Tcp { .. } => 6,
            L4::Icmp => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            L4::Icmpv6 { .. } => 58,
            L4::IcmpMsg { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            L4::Other(p) => *p,
        }
    }
    fn bytes(&self) -> Vec<u8> {
        match self {
            L4::Udp { sport, dport } => [
                &sport.to_be_bytes()[..],
                &dport.to_be_bytes(),
                &[0, 8, 0, 0],
            ]
            .concat(),
            L4::Tcp { sport, dport } => {
                let mut t = [&sport.to_be_bytes()[..], &dport.to_be_bytes()].concat();
                t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
                t
            }
            L4::Icmp => vec![8, 0, 0, 0, 0, 1, 0, 1],
            L4::Icmpv6 { typ } => vec![*typ, 0, 0, 0, 0, 0, 0, 0],
            L4::IcmpMsg {
                typ,
                code,
                rest,
                body,
            } => {
                let mut b = vec![*typ, *code, 0, 0];
                b.extend_from_slice(rest);
                b.extend_from_slice(body);
                b
            }
            L4::Other(_) => vec![0; 8],
        }
    }
}

/// An IPv6 extension header to insert: (kind, 8-byte units beyond the first 8).
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop(u8),
    Routing(u8),
    DestOpts(u8),
    Fragment { offset: u16, more: bool },
    Auth(u8),
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub v4_options: Vec<u8>,
    pub v4_frag_offset: u16,
    pub v6_ext: Vec<Ext>,
    pub payload: usize,
    /// IPv4 TTL or IPv6 hop limit (64 unless set; neighbour discovery is 255).
    pub hop_limit: u8,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Frame {
        Frame {
            vlans: vec![],
            src,
            dst,
            l4,
            v4_options: vec![],
            v4_frag_offset: 0,
            v6_ext: vec![],
            payload: 0,
            hop_limit: 64,
        }
    }
    pub fn udp4(src: Ipv4Addr, dport: u16) -> Frame {
        Frame::new(
            src.into(),
            Ipv4Addr::new(198, 18, 255, 1).into(),
            L4::Udp {
                sport: 40000,
                dport,
            },
        )
    }
    pub fn udp6(src: Ipv6Addr, dport: u16) -> Frame {
        Frame::new(
            src.into(),
            "2001:2:ff::1".parse::<Ipv6Addr>().unwrap().into(),
            L4::Udp {
                sport: 40000,
                dport,
            },
        )
    }
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Frame {
        self.vlans.push((tpid, vid));
        self
    }
    pub fn ext(mut self, e: Ext) -> Frame {
        self.v6_ext.push(e);
        self
    }
    pub fn hop_limit(mut self, h: u8) -> Frame {
        self.hop_limit = h;
        self
    }
    pub fn payload(mut self, n: usize) -> Frame {
        self.payload = n;
        self
    }

    /// The packet from its IP header on, as an ICMP error embeds it.
    pub fn ip_bytes(&self) -> Vec<u8> {
        self.build()[14 + 4 * self.vlans.len()..].to_vec()
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        let v6 = self.src.is_ipv6();
        let mut types: Vec<u16> = self.vlans.iter().map(|(t, _)| *t).collect();
        types.push(if v6 { 0x86dd } else { 0x0800 });
        f.extend_from_slice(&types[0].to_be_bytes());
        for (i, (_, vid)) in self.vlans.iter().enumerate() {
            f.extend_from_slice(&vid.to_be_bytes());
            f.extend_from_slice(&types[i + 1].to_be_bytes());
        }
        let mut l4 = self.l4.bytes();
        l4.resize(l4.len() + self.payload, 0);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let ihl = 20 + self.v4_options.len();
                assert!(
                    ihl.is_multiple_of(4) && ihl <= 60,
                    "options must pad to 4 bytes, 40 at most"
                );
                f.push(0x40 | (ihl / 4) as u8);
                f.push(0);
                f.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
                f.extend_from_slice(&[0, 1]);
                f.extend_from_slice(&(self.v4_frag_offset & 0x1fff).to_be_bytes());
                f.extend_from_slice(&[self.hop_limit, self.l4.proto(false), 0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&self.v4_options);
                f.extend_from_slice(&l4);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut body = Vec::new();
                let kinds: Vec<u8> = self
                    .v6_ext
                    .iter()
                    .map(|e| match e {
                        Ext::HopByHop(_) => 0,
                        Ext::Routing(_) => 43,
                        Ext::Fragment { .. } => 44,
                        Ext::Auth(_) => 51,
                        Ext::DestOpts(_) => 60,
                    })
                    .chain([self.l4.proto(true)])
                    .collect();
                for (i, e) in self.v6_ext.iter().enumerate() {
                    let next = kinds[i + 1];
                    match e {
                        Ext::Fragment { offset, more } => {
                            body.extend_from_slice(&[next, 0]);
                            body.extend_from_slice(&((offset << 3) | *more as u16).to_be_bytes());
                            body.extend_from_slice(&[0, 0, 0, 7]);
                        }
                        Ext::Auth(units) => {
                            // AH length is in 4-byte units minus 2.
                            let len = (*units as usize + 2) * 4;
                            body.extend_from_slice(&[next, *units]);
                            body.resize(body.len() + len - 2, 0);
                        }
                        Ext::HopByHop(units) | Ext::Routing(units) | Ext::DestOpts(units) => {
                            let len = (*units as usize + 1) * 8;
                            body.extend_from_slice(&[next, *units]);
                            body.resize(body.len() + len - 2, 0);
                        }
                    }
                }
                body.extend_from_slice(&l4);
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(body.len() as u16).to_be_bytes());
                f.extend_from_slice(&[kinds[0], self.hop_limit]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&body);
            }
            _ => panic!("source and destination must be the same family"),
        }
        f
    }
}

/// An ARP request frame (non-IP).
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    f.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 0, 2,
    ]);
    f
}
