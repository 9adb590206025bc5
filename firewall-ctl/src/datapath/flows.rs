//! The node's own flows (`FLOWS`), as `firewall-ctl flows` lists them.

use std::{
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicU8, AtomicU64, Ordering},
};

use aya::maps::{HashMap, Map, MapData};
use firewall_common::{
    flow::{FAMILY_V4, FilterLine, FlowVal, filter_slot, timeout_index},
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
/// Counted with the batch walk the filter rebuild uses: a key at a time
/// took a second at 1M flows (`cargo xtask bench controller`).
pub fn count(pin_dir: &Path) -> (Option<u64>, u32) {
    let Ok(Some(data)) = check_pin(pin_dir, &pin_dir.join(names::FLOWS), names::FLOWS) else {
        return (None, 0);
    };
    let max = data.info().map(|i| i.max_entries()).unwrap_or(0);
    let n = crate::sys::batch::for_each(
        std::os::fd::AsFd::as_fd(data.fd()),
        2 * max.max(1) as usize,
        |_: &u64, _: &FlowVal| {},
    );
    (n.ok().map(|n| n as u64), max)
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

/// How many of `v`'s eight bytes are not zero: each byte's low seven bits
/// plus 0x7f carry into its high bit (never past it) if any is set, and the
/// byte's own high bit is or-ed in.
fn nonzero_bytes(v: u64) -> u32 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    ((((v & LOW7) + LOW7) | v) & !LOW7).count_ones()
}

/// The pinned `FLOW_FILTER`, mapped, with the control word that says its
/// size and which half the datapath reads (the protocol is in
/// `firewall_common::flow::FilterLine`).
pub struct FlowFilter {
    map: crate::sys::Mmap,
    ctrl: super::ctrl::CtrlMap,
    lines: u32,
    /// The pinned `FLOWS` of the same directory, which a rebuild reads.
    flows: MapData,
}

/// What one rebuild found.
#[derive(Copy, Clone, Debug)]
pub struct FilterReport {
    /// Keys read from `FLOWS`.
    pub flows: u64,
    /// Bytes set in the half now in force, and the half's size.
    pub set: u64,
    pub slots: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("reading the flow table failed; the filter was left as it was")]
    Walk {
        #[source]
        source: std::io::Error,
    },
}

impl FlowFilter {
    pub fn open(pin_dir: &Path) -> Result<FlowFilter, FilterError> {
        check_dir(pin_dir)?;
        let path = pin_dir.join(names::FLOW_FILTER);
        let data = check_pin(pin_dir, &path, names::FLOW_FILTER)?
            .ok_or_else(|| LayoutError::NotAttached(pin_dir.into()))?;
        let ctrl_data = check_pin(pin_dir, &pin_dir.join(names::CTRL), names::CTRL)?
            .ok_or_else(|| LayoutError::NotAttached(pin_dir.into()))?;
        let ctrl = super::ctrl::CtrlMap::new(
            std::os::fd::AsFd::as_fd(ctrl_data.fd()),
            &pin_dir.join(names::CTRL),
        )?;
        let entries = data.info().map(|i| i.max_entries()).unwrap_or(0);
        let lines = ctrl.read().flow_filter_lines;
        super::layout::check_filter(pin_dir, lines, entries)?;
        let flows = check_pin(pin_dir, &pin_dir.join(names::FLOWS), names::FLOWS)?
            .ok_or_else(|| LayoutError::NotAttached(pin_dir.into()))?;
        let map = crate::sys::Mmap::shared(
            Some(std::os::fd::AsFd::as_fd(data.fd())),
            entries as usize * size_of::<FilterLine>(),
        )
        .map_err(|source| LayoutError::Mmap { path, source })?;
        Ok(FlowFilter {
            map,
            ctrl,
            lines,
            flows,
        })
    }

    fn byte(&self, line: u32, byte: usize) -> &AtomicU8 {
        let i = line as usize * size_of::<FilterLine>() + byte;
        assert!(line < 2 * self.lines && byte < 64);
        // SAFETY: `i` is within the mapping (2 * lines lines, checked at
        // open and above), which lives as long as self; the kernel writes
        // these bytes too, with single-byte stores.
        unsafe { AtomicU8::from_ptr(self.map.ptr::<u8>().as_ptr().add(i)) }
    }

    /// The half the datapath reads.
    pub fn active_half(&self) -> u32 {
        self.ctrl.read().flow_filter_half & 1
    }

    /// Mark `hash` present in both halves, as the egress program does: for
    /// userspace that writes `FLOWS` itself (tests, the benchmark).
    pub fn mark(&self, hash: u64) {
        for half in 0..2 {
            let (line, byte) = filter_slot(hash, self.lines, half);
            self.byte(line, byte).store(1, Ordering::Relaxed);
        }
    }

    /// Bytes set in the half in force, and its size.
    pub fn fill(&self) -> (u64, u64) {
        let half = self.active_half();
        let slots = u64::from(self.lines) * 64;
        let base = (half * self.lines) as usize * size_of::<FilterLine>();
        // Eight slots at a time: a word's nonzero bytes, counted with the
        // usual bit trick (each byte folds to its high bit).
        let words = slots as usize / 8;
        let mut set = 0u64;
        for w in 0..words {
            // SAFETY: aligned words of one half of the live mapping (lines
            // of 64 bytes from a page-aligned start); concurrent kernel byte
            // stores make a count approximate, never unsafe to read.
            let v = unsafe {
                AtomicU64::from_ptr(self.map.ptr::<u8>().as_ptr().add(base).cast::<u64>().add(w))
                    .load(Ordering::Relaxed)
            };
            set += u64::from(nonzero_bytes(v));
        }
        (set, slots)
    }

    /// Rebuild the half not in force from the keys `FLOWS` holds now, then
    /// put it in force: bytes of flows that left the table (idle, evicted)
    /// clear. Safe beside a running datapath; see FilterLine for why no
    /// flow's byte can be lost.
    ///
    /// The half being rebuilt must not be the one a packet in flight is
    /// reading: the previous flip must be at least one packet's time ago.
    /// The daemon rebuilds every few seconds; XDP runs take microseconds.
    pub fn rebuild(&self) -> Result<FilterReport, FilterError> {
        let capacity = self.flows.info().map(|i| i.max_entries()).unwrap_or(0);
        let inactive = 1 - self.active_half();
        let base = (inactive * self.lines) as usize * size_of::<FilterLine>();
        let words = self.lines as usize * size_of::<FilterLine>() / 8;
        for w in 0..words {
            // SAFETY: 8-byte aligned words of the inactive half of the live
            // mapping (page-aligned, lines of 64 bytes); the kernel writes
            // single bytes there, which is why the stores are atomic.
            unsafe {
                AtomicU64::from_ptr(self.map.ptr::<u8>().as_ptr().add(base).cast::<u64>().add(w))
                    .store(0, Ordering::Relaxed)
            };
        }
        // Every clear above is done before the walk's first syscall (a full
        // barrier): a flow whose egress store the clear overwrote was in
        // FLOWS before the walk began.
        // One batch syscall per 4,096 flows (a key at a time was 1 µs a
        // flow: a second of CPU per rebuild at 1M flows). The walk goes
        // bucket by bucket, so every flow in the table for the whole walk is
        // seen; one added meanwhile was added after the clear, and its byte
        // is egress's. Bounded: a table that reads back larger than its
        // capacity gives up rather than run on.
        let limit = 2 * capacity.max(1) as usize;
        let walked = crate::sys::batch::for_each(
            std::os::fd::AsFd::as_fd(self.flows.fd()),
            limit,
            |h: &u64, _: &FlowVal| {
                let (line, byte) = filter_slot(*h, self.lines, inactive);
                self.byte(line, byte).store(1, Ordering::Relaxed);
            },
        )
        .map_err(|source| FilterError::Walk { source })? as u64;
        // Publish: the byte stores above happen before this store (Release),
        // and the datapath's read of the half word comes before its byte
        // load.
        self.ctrl.set_filter_half(inactive);
        let (set, slots) = self.fill();
        Ok(FilterReport {
            flows: walked,
            set,
            slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn nonzero_bytes_counts_like_the_bytes(v: u64, zero_mask: u8) {
            // Zero some bytes outright, so sparse words are common.
            let b: Vec<u8> = v
                .to_le_bytes()
                .iter()
                .enumerate()
                .map(|(i, &x)| if zero_mask >> i & 1 == 1 { 0 } else { x })
                .collect();
            let w = u64::from_le_bytes(b.clone().try_into().unwrap());
            prop_assert_eq!(super::nonzero_bytes(w), b.iter().filter(|&&x| x != 0).count() as u32);
        }
    }
}
