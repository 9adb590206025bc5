//! What `status`, `stats` and `peers list` print, gathered from the kernel:
//! the pins, the loaded program and its maps, never from files on disk.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, MapInfo, PerCpuArray},
    programs::ProgramInfo,
};
use firewall_common::{Counters, OVERLAY_MAGIC, OverlayRule, OverlayTable, names};
use serde::Serialize;

use super::{attach::iface_dir, ctrl::Settings, store::KernelStore};
use crate::sys;

#[derive(Debug, Serialize)]
pub struct MapRef {
    pub name: String,
    pub id: u32,
    pub path: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct SharedStatus {
    /// Policy, replies, event rate and flow timeouts: what every interface of
    /// the pin directory does with what it would drop.
    pub settings: Settings,
    /// Flows in the table now (live or idle past their timeout), and its size.
    pub flows: Option<u64>,
    pub max_flows: u32,
    /// Slots set in the flow filter's half in force, and its size: a packet
    /// whose slot is clear skips the flow table. The controller rebuilds it
    /// every 10 s; without one it only fills.
    pub flow_filter_set: Option<u64>,
    pub flow_filter_slots: u64,
    pub committed_generation: u64,
    pub staged_generation: u64,
    pub peer_count: u64,
    pub checksum: String,
    pub cidr4_live: u32,
    pub cidr6_live: u32,
    pub capacity_per_family: u64,
    pub maps: Vec<MapRef>,
}

#[derive(Debug, Serialize)]
pub struct OverlayView {
    pub cidr: String,
    pub proto: String,
    pub dport: Option<u16>,
    pub sport: Option<u16>,
}

#[derive(Debug, Serialize)]
pub struct IfaceStatus {
    pub iface: String,
    pub ifindex: Option<u32>,
    pub mode: Option<String>,
    pub attached: bool,
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    pub prog_tag: Option<String>,
    pub counters_map: Option<MapRef>,
    pub counters: Counters,
    /// The TC egress program that records the node's flows.
    pub egress_attached: bool,
    pub egress_prog_id: Option<u32>,
    pub overlay: Vec<OverlayView>,
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub datapath: SharedStatus,
    pub interfaces: Vec<IfaceStatus>,
}

fn proto_name(p: u8) -> String {
    match p {
        0 => "any".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

pub fn overlay_view(r: &OverlayRule) -> OverlayView {
    let addr: IpAddr = if r.family == 4 {
        IpAddr::from(<[u8; 4]>::try_from(&r.addr[..4]).unwrap())
    } else {
        IpAddr::from(r.addr)
    };
    OverlayView {
        cidr: format!("{addr}/{}", r.prefix_len),
        proto: proto_name(r.proto),
        dport: (r.dport != 0).then_some(r.dport),
        sport: (r.sport != 0).then_some(r.sport),
    }
}

/// The overlay table of a loaded program, found through its map ids: the
/// `.rodata` map holding [`OVERLAY_MAGIC`].
pub fn overlay_of(prog: &ProgramInfo) -> std::io::Result<Vec<OverlayRule>> {
    let ids = prog
        .map_ids()
        .map_err(std::io::Error::other)?
        .unwrap_or_default();
    for id in ids {
        let Ok(info) = MapInfo::from_id(id) else {
            continue;
        };
        if !info.name_as_str().is_some_and(|n| n.starts_with(".rodata")) {
            continue;
        }
        let data = MapData::from_id(id).map_err(std::io::Error::other)?;
        let Some(bytes) = sys::lookup_raw(
            data.fd().as_fd(),
            &0u32.to_ne_bytes(),
            info.value_size() as usize,
        )?
        else {
            continue;
        };
        if let Some(off) = bytes.windows(8).position(|w| w == OVERLAY_MAGIC)
            && off + std::mem::size_of::<OverlayTable>() <= bytes.len()
        {
            // SAFETY: bounds checked; OverlayTable is plain integers.
            let t: OverlayTable = unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast()) };
            return Ok(t.rules[..(t.count as usize).min(t.rules.len())].to_vec());
        }
    }
    Err(std::io::Error::other(
        "the loaded program carries no overlay table",
    ))
}

pub fn read_counters(path: &Path) -> std::io::Result<Counters> {
    let map = Map::from_map_data(MapData::from_pin(path).map_err(std::io::Error::other)?)
        .map_err(std::io::Error::other)?;
    let arr: PerCpuArray<_, Counters> = map.try_into().map_err(std::io::Error::other)?;
    let per_cpu = arr.get(&0, 0).map_err(std::io::Error::other)?;
    let mut total = Counters::default();
    for c in per_cpu.iter() {
        total.add(c);
    }
    Ok(total)
}

pub fn interfaces(pin_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pin_dir.join("ifaces"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn iface_status(pin_dir: &Path, iface: &str) -> IfaceStatus {
    let dir = iface_dir(pin_dir, iface);
    let mut st = IfaceStatus {
        iface: iface.into(),
        ifindex: sys::ifindex(iface).ok(),
        mode: None,
        attached: false,
        link_id: None,
        prog_id: None,
        prog_tag: None,
        counters_map: None,
        counters: Counters::default(),
        egress_attached: false,
        egress_prog_id: None,
        overlay: Vec::new(),
        problem: None,
    };
    match aya::programs::links::PinnedLink::from_pin(dir.join("link")) {
        Ok(l) => {
            let fd: aya::programs::links::FdLink = l.into();
            if let Ok(info) = fd.info()
                && let Ok((_, id, prog_id, ifindex)) = sys::link_info_by_id(info.id())
            {
                st.link_id = Some(id);
                st.attached = ifindex != 0 && Some(ifindex) == st.ifindex;
                if !st.attached {
                    st.problem = Some("the link is pinned but no longer attached (interface gone?): run `firewall-ctl attach` again".into());
                }
                let _ = prog_id;
            }
        }
        Err(e) => st.problem = Some(format!("no link pin: {e}")),
    }
    if let Some((mode, _)) = sys::xdp_state(iface) {
        st.mode = Some(mode);
    }
    match ProgramInfo::from_pin(dir.join("prog")) {
        Ok(p) => {
            st.prog_id = Some(p.id());
            st.prog_tag = Some(format!("{:016x}", p.tag()));
            match overlay_of(&p) {
                Ok(rules) => st.overlay = rules.iter().map(overlay_view).collect(),
                Err(e) => st.problem = Some(e.to_string()),
            }
        }
        Err(e) => st.problem = Some(format!("no program pin: {e}")),
    }
    if let Ok(l) = aya::programs::links::PinnedLink::from_pin(dir.join("egress_link")) {
        let fd: aya::programs::links::FdLink = l.into();
        if let Ok(info) = fd.info()
            && let Ok((kind, _, prog_id, ifindex)) = sys::link_info_by_id(info.id())
        {
            st.egress_attached =
                kind == sys::BPF_LINK_TYPE_TCX && ifindex != 0 && Some(ifindex) == st.ifindex;
            st.egress_prog_id = Some(prog_id);
        }
    }
    if !st.egress_attached && st.problem.is_none() {
        st.problem = Some(
            "the TC egress program is not attached, so replies to this node's own connections drop: run `firewall-ctl attach` again".into(),
        );
    }
    let cpath = dir.join(names::COUNTERS);
    if let Ok(info) = MapInfo::from_pin(&cpath) {
        st.counters_map = Some(MapRef {
            name: names::COUNTERS.into(),
            id: info.id(),
            path: cpath.clone(),
        });
    }
    if let Ok(c) = read_counters(&cpath) {
        st.counters = c;
    }
    st
}

pub fn status(pin_dir: &Path) -> Result<Status, crate::datapath::layout::LayoutError> {
    let store = KernelStore::open(pin_dir)?;
    let c = store.control();
    let live = (c.committed_gen & 1) as usize;
    let maps = names::SHARED
        .iter()
        .map(|n| MapRef {
            name: n.to_string(),
            id: MapInfo::from_pin(pin_dir.join(n))
                .map(|i| i.id())
                .unwrap_or(0),
            path: pin_dir.join(n),
        })
        .collect();
    let (flows, max_flows) = super::flows::count(pin_dir);
    let (flow_filter_set, flow_filter_slots) = match super::flows::FlowFilter::open(pin_dir) {
        Ok(f) => {
            let (set, slots) = f.fill();
            (Some(set), slots)
        }
        Err(_) => (None, 0),
    };
    Ok(Status {
        pin_dir: pin_dir.into(),
        datapath: SharedStatus {
            settings: store.settings(),
            flows,
            max_flows,
            flow_filter_set,
            flow_filter_slots,
            committed_generation: c.committed_gen,
            staged_generation: c.staged_gen,
            peer_count: c.peer_count[live],
            checksum: format!("{:016x}", c.checksum[live]),
            cidr4_live: c.cidr4_count[live],
            cidr6_live: c.cidr6_count[live],
            capacity_per_family: store.capacity()[0],
            maps,
        },
        interfaces: interfaces(pin_dir)
            .iter()
            .map(|i| iface_status(pin_dir, i))
            .collect(),
    })
}
