//! The CIDR peers: two LPM tries per family, one per generation parity. The
//! standby slot is rewritten whole for each commit (at most MAX_CIDRS entries,
//! so a rewrite is cheap) and becomes live with the generation flip.

use std::os::fd::AsFd;

use aya::maps::MapData;
use firewall_common::{CidrVal, LpmKeyV4, LpmKeyV6, MAX_CIDRS, names};
use ipnet::IpNet;

use super::{ctrl::CtrlMap, store::io};
use crate::{peers::PeerSet, store::StoreError, sys::batch};

/// `CIDR4_0/1` and `CIDR6_0/1`, indexed by generation parity.
pub(crate) struct Cidrs {
    pub(crate) v4: [MapData; 2],
    pub(crate) v6: [MapData; 2],
}

impl Cidrs {
    pub(crate) fn dump(&self, slot: usize) -> Result<PeerSet, StoreError> {
        let mut out = PeerSet::new();
        let a: Vec<(LpmKeyV4, CidrVal)> =
            batch::dump(self.v4[slot].fd().as_fd(), MAX_CIDRS as usize)
                .map_err(io("read", names::CIDR4_0))?;
        for (k, v) in a {
            if let Ok(n) = ipnet::Ipv4Net::new(k.addr.into(), k.prefix_len as u8) {
                out.insert(IpNet::V4(n), v.origin);
            }
        }
        let b: Vec<(LpmKeyV6, CidrVal)> =
            batch::dump(self.v6[slot].fd().as_fd(), MAX_CIDRS as usize)
                .map_err(io("read", names::CIDR6_0))?;
        for (k, v) in b {
            if let Ok(n) = ipnet::Ipv6Net::new(k.addr.into(), k.prefix_len as u8) {
                out.insert(IpNet::V6(n), v.origin);
            }
        }
        Ok(out)
    }

    pub(crate) fn write(
        &self,
        slot: usize,
        cidrs: &PeerSet,
        ctrl: &CtrlMap,
    ) -> Result<(), StoreError> {
        let old = self.dump(slot)?;
        let (mut k4, mut k6) = (Vec::new(), Vec::new());
        for n in old.keys() {
            match n {
                IpNet::V4(n) => k4.push(LpmKeyV4 {
                    prefix_len: n.prefix_len() as u32,
                    addr: n.addr().octets(),
                }),
                IpNet::V6(n) => k6.push(LpmKeyV6 {
                    prefix_len: n.prefix_len() as u32,
                    addr: n.addr().octets(),
                }),
            }
        }
        batch::delete(self.v4[slot].fd().as_fd(), &k4).map_err(io("clear", names::CIDR4_0))?;
        batch::delete(self.v6[slot].fd().as_fd(), &k6).map_err(io("clear", names::CIDR6_0))?;
        let (mut k4, mut v4, mut k6, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (n, o) in cidrs {
            let v = CidrVal {
                origin: *o,
                _pad: 0,
            };
            match n {
                IpNet::V4(n) => {
                    k4.push(LpmKeyV4 {
                        prefix_len: n.prefix_len() as u32,
                        addr: n.addr().octets(),
                    });
                    v4.push(v);
                }
                IpNet::V6(n) => {
                    k6.push(LpmKeyV6 {
                        prefix_len: n.prefix_len() as u32,
                        addr: n.addr().octets(),
                    });
                    v6.push(v);
                }
            }
        }
        if k4.len() > MAX_CIDRS as usize || k6.len() > MAX_CIDRS as usize {
            return Err(StoreError::MapFull {
                map: names::CIDR4_0,
                capacity: MAX_CIDRS as u64,
                needed: k4.len().max(k6.len()) as u64,
            });
        }
        batch::update(self.v4[slot].fd().as_fd(), &k4, &v4)
            .map_err(|(_, e)| io("stage", names::CIDR4_0)(e))?;
        batch::update(self.v6[slot].fd().as_fd(), &k6, &v6)
            .map_err(|(_, e)| io("stage", names::CIDR6_0)(e))?;
        ctrl.update(|c| {
            c.cidr4_count[slot] = k4.len() as u32;
            c.cidr6_count[slot] = k6.len() as u32;
        });
        Ok(())
    }
}
