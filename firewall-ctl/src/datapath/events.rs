//! The drop events (`EVENTS`), read and decoded for `firewall-ctl monitor`.
//!
//! The kernel writes the time, interface, reason, length and the first bytes
//! of each dropped (or would-drop) packet; the addresses, protocol, ports and
//! VLAN tags are decoded here from those bytes with the reference parser
//! (`firewall_common::classify::headers`), so the drop path only copies.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Map, MapData, RingBuf};
use firewall_common::{
    Reason,
    classify::headers,
    flow::{DropEvent, FAMILY_V4},
    names,
};
use serde::Serialize;

use super::{
    flows::{monotonic_ns, proto_name},
    layout::{LayoutError, check_dir, check_pin},
};

/// One decoded event.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub time: String,
    #[serde(skip)]
    pub time_since_epoch: Duration,
    pub iface: String,
    pub ifindex: u32,
    pub reason: &'static str,
    /// The policy was observe: the packet passed.
    pub observed: bool,
    pub vlans: Vec<u16>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: Option<String>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    /// Bytes on the wire, and how many of them were captured.
    pub len: u32,
    pub captured: u32,
    #[serde(skip)]
    pub data: Vec<u8>,
}

fn reason_name(r: u32) -> &'static str {
    Reason::ALL
        .iter()
        .find(|x| **x as u32 == r)
        .map_or("unknown", |x| x.name())
}

fn ifname(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into `buf`.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let n = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Reads `EVENTS` of one pin directory. One reader per directory: the caller
/// holds `sys::lock::MonitorLock`.
pub struct EventReader {
    ring: RingBuf<MapData>,
    names: HashMap<u32, String>,
    /// Wall-clock time minus CLOCK_MONOTONIC, to date the kernel's times.
    epoch_offset_ns: i128,
}

impl EventReader {
    pub fn open(pin_dir: &Path) -> Result<Self, LayoutError> {
        check_dir(pin_dir)?;
        let path = pin_dir.join(names::EVENTS);
        let data = check_pin(pin_dir, &path, names::EVENTS)?
            .ok_or_else(|| LayoutError::NotAttached(pin_dir.into()))?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .map_err(|source| LayoutError::Open { path, source })?;
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        Ok(EventReader {
            ring,
            names: HashMap::new(),
            epoch_offset_ns: wall - monotonic_ns() as i128,
        })
    }

    /// The next event, waiting at most `wait` for one. Events are taken one
    /// at a time from the kernel's ring, so memory stays flat under a flood.
    pub fn next(&mut self, wait: Duration) -> std::io::Result<Option<Event>> {
        if let Some(e) = self.take() {
            return Ok(Some(e));
        }
        let mut pfd = libc::pollfd {
            fd: self.ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(self.take())
    }

    fn take(&mut self) -> Option<Event> {
        let item = self.ring.next()?;
        if item.len() < size_of::<DropEvent>() {
            return None;
        }
        // SAFETY: the record holds at least one DropEvent (checked), which is
        // plain integers; read_unaligned copies it out of the ring.
        let raw: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        Some(self.decode(&raw))
    }

    fn decode(&mut self, raw: &DropEvent) -> Event {
        let cap = (raw.cap_len as usize).min(raw.data.len());
        let data = raw.data[..cap].to_vec();
        let h = headers(&data);
        let ip = |a: &[u8; 16]| -> Option<IpAddr> {
            match h.family {
                0 => None,
                f if f == FAMILY_V4 => Some(IpAddr::from([a[0], a[1], a[2], a[3]])),
                _ => Some(IpAddr::from(*a)),
            }
        };
        let since_epoch_ns = (raw.time_ns as i128 + self.epoch_offset_ns).max(0) as u128;
        let time_since_epoch = Duration::from_nanos(since_epoch_ns as u64);
        let iface = self
            .names
            .entry(raw.ifindex)
            .or_insert_with(|| ifname(raw.ifindex).unwrap_or_else(|| format!("if{}", raw.ifindex)))
            .clone();
        Event {
            time: humantime::format_rfc3339_micros(UNIX_EPOCH + time_since_epoch).to_string(),
            time_since_epoch,
            iface,
            ifindex: raw.ifindex,
            reason: reason_name(raw.reason),
            observed: raw.observed != 0,
            vlans: h.vlans.iter().flatten().copied().collect(),
            src: ip(&h.src),
            dst: ip(&h.dst),
            proto: h.proto.map(|p| match proto_name(p) {
                "?" => p.to_string(),
                n => n.to_string(),
            }),
            sport: h.sport,
            dport: h.dport,
            icmp_type: h.icmp.map(|(t, _)| t),
            icmp_code: h.icmp.map(|(_, c)| c),
            len: raw.len,
            captured: cap as u32,
            data,
        }
    }
}

impl Event {
    /// One readable line.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} {} {}{}",
            self.time,
            self.iface,
            self.reason,
            if self.observed {
                " (would drop; observe)"
            } else {
                ""
            }
        );
        for v in &self.vlans {
            s.push_str(&format!(" vlan {v}"));
        }
        let end = |a: Option<IpAddr>, p: Option<u16>| match (a, p) {
            (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.to_string(),
            (None, _) => "?".into(),
        };
        if let Some(p) = &self.proto {
            s.push_str(&format!(
                " {p} {} -> {}",
                end(self.src, self.sport),
                end(self.dst, self.dport)
            ));
        } else if self.src.is_some() {
            s.push_str(&format!(
                " {} -> {}",
                end(self.src, None),
                end(self.dst, None)
            ));
        }
        if let (Some(t), Some(c)) = (self.icmp_type, self.icmp_code) {
            s.push_str(&format!(" type {t} code {c}"));
        }
        s.push_str(&format!(" len {}", self.len));
        s
    }
}
