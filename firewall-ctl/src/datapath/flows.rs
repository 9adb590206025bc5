//! The node's own flows (`FLOWS`), as `firewall-ctl flows` lists them.

use std::{net::IpAddr, path::Path};

use aya::maps::{HashMap, Map, MapData};
use firewall_common::{
    flow::{FAMILY_V4, FlowVal, timeout_index},
    names,
};
use serde::Serialize;

use super::{
    layout::{LayoutError, check_dir, check_pin},
    store::KernelStore,
};

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub proto: &'static str,
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    /// Seconds since the flow was first and last seen leaving the node.
    pub age_s: f64,
    pub idle_s: f64,
    /// Replies pass while it is live: idle no longer than its timeout.
    pub live: bool,
}

fn addr(a: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(*a)
    }
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        _ => "?",
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The pinned flow table, checked, and its capacity.
fn open(pin_dir: &Path) -> Result<(HashMap<MapData, u64, FlowVal>, u32), LayoutError> {
    let data = check_pin(pin_dir, &pin_dir.join(names::FLOWS), names::FLOWS)?
        .ok_or_else(|| LayoutError::NotAttached(pin_dir.into()))?;
    let max = data.info().map(|i| i.max_entries()).unwrap_or(0);
    let map = HashMap::try_from(Map::LruHashMap(data)).map_err(|source| LayoutError::Open {
        path: pin_dir.join(names::FLOWS),
        source,
    })?;
    Ok((map, max))
}

/// (flows in the table, its capacity), for `status`; `(None, 0)` if unreadable.
pub fn count(pin_dir: &Path) -> (Option<u64>, u32) {
    match open(pin_dir) {
        Ok((m, max)) => (Some(m.keys().flatten().count() as u64), max),
        Err(_) => (None, 0),
    }
}

/// Every flow in the table (at most its capacity, set at attach), newest
/// first.
pub fn list(pin_dir: &Path) -> Result<Vec<FlowRow>, LayoutError> {
    check_dir(pin_dir)?;
    let timeouts = KernelStore::open(pin_dir)?.control().flow_timeout_ns;
    let (map, _) = open(pin_dir)?;
    let now = monotonic_ns();
    let secs = |ns: u64| ns as f64 / 1e9;
    let mut rows: Vec<FlowRow> = map
        .iter()
        .flatten()
        .map(|(_, v)| {
            let k = v.key;
            let idle = now.saturating_sub(v.last_seen_ns);
            FlowRow {
                proto: proto_name(k.proto),
                local: addr(&k.local, k.family),
                local_port: k.local_port,
                remote: addr(&k.remote, k.family),
                remote_port: k.remote_port,
                age_s: secs(now.saturating_sub(v.first_seen_ns)),
                idle_s: secs(idle),
                live: idle <= timeouts[timeout_index(k.proto)],
            }
        })
        .collect();
    rows.sort_by(|a, b| a.idle_s.total_cmp(&b.idle_s));
    Ok(rows)
}
