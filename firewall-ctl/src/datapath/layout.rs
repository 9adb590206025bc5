//! What our pinned maps must look like: a map someone else pinned under our
//! names, or one from an incompatible version, is refused with a message that
//! says how to recover, before anything reads or writes it.

use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapType};
use firewall_common::{
    Bucket4, Bucket6, CidrVal, Control, LpmKeyV4, LpmKeyV6, MAX_CIDRS,
    flow::{EventBucket, FilterLine, FlowVal},
    names,
};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("pinned map {path} cannot be opened")]
    Open {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {path} is a {found}, but firewall-ctl {version} expects {expected}: it belongs to another tool or an incompatible version. Run `firewall-ctl detach` for every interface using {dir} (or remove the directory) and attach again"
    )]
    Mismatch {
        path: PathBuf,
        dir: PathBuf,
        found: String,
        expected: String,
        version: &'static str,
    },
    #[error(
        "no firewall is pinned in {0}: run `firewall-ctl attach --iface IF` first (or pass the right `--pin-dir`)"
    )]
    NotAttached(PathBuf),
    #[error(transparent)]
    Unsafe(#[from] crate::sys::fsafe::UnsafePath),
    #[error("cannot map the control word of {path} into memory")]
    Mmap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a map of ours must look like. `max_entries` of the peer tables is set
/// at attach time, so it is not part of the expected shape (CTRL's bucket
/// masks are checked against it instead).
struct Shape {
    name: &'static str,
    kind: MapType,
    key: u32,
    value: u32,
    flags: u32,
    max_entries: Option<u32>,
}

const NO_PREALLOC: u32 = 1;
const MMAPABLE: u32 = 1 << 10;

/// Bytes of the `EVENTS` ring buffer (the eBPF crate's size).
pub const EVENTS_BYTES: u32 = 1 << 20;

fn shapes() -> [Shape; 12] {
    use std::mem::size_of as sz;
    let lpm4 = sz::<LpmKeyV4>() as u32;
    let lpm6 = sz::<LpmKeyV6>() as u32;
    let cv = sz::<CidrVal>() as u32;
    [
        Shape {
            name: names::PEERS_V4,
            kind: MapType::Array,
            key: 4,
            value: sz::<Bucket4>() as u32,
            flags: MMAPABLE,
            max_entries: None,
        },
        Shape {
            name: names::PEERS_V6,
            kind: MapType::Array,
            key: 4,
            value: sz::<Bucket6>() as u32,
            flags: MMAPABLE,
            max_entries: None,
        },
        Shape {
            name: names::CIDR4_0,
            kind: MapType::LpmTrie,
            key: lpm4,
            value: cv,
            flags: NO_PREALLOC,
            max_entries: Some(MAX_CIDRS),
        },
        Shape {
            name: names::CIDR4_1,
            kind: MapType::LpmTrie,
            key: lpm4,
            value: cv,
            flags: NO_PREALLOC,
            max_entries: Some(MAX_CIDRS),
        },
        Shape {
            name: names::CIDR6_0,
            kind: MapType::LpmTrie,
            key: lpm6,
            value: cv,
            flags: NO_PREALLOC,
            max_entries: Some(MAX_CIDRS),
        },
        Shape {
            name: names::CIDR6_1,
            kind: MapType::LpmTrie,
            key: lpm6,
            value: cv,
            flags: NO_PREALLOC,
            max_entries: Some(MAX_CIDRS),
        },
        Shape {
            name: names::CTRL,
            kind: MapType::Array,
            key: 4,
            value: sz::<Control>() as u32,
            flags: MMAPABLE,
            max_entries: Some(1),
        },
        Shape {
            name: names::FLOWS,
            kind: MapType::LruHash,
            key: sz::<u64>() as u32,
            value: sz::<FlowVal>() as u32,
            flags: 0,
            max_entries: None,
        },
        Shape {
            name: names::FLOW_FILTER,
            kind: MapType::Array,
            key: 4,
            value: sz::<FilterLine>() as u32,
            flags: MMAPABLE,
            max_entries: None,
        },
        Shape {
            name: names::EVENTS,
            kind: MapType::RingBuf,
            key: 0,
            value: 0,
            flags: 0,
            max_entries: Some(EVENTS_BYTES),
        },
        Shape {
            name: names::EVENT_BUCKET,
            kind: MapType::PerCpuArray,
            key: 4,
            value: sz::<EventBucket>() as u32,
            flags: 0,
            max_entries: Some(1),
        },
        Shape {
            name: names::COUNTERS,
            kind: MapType::PerCpuArray,
            key: 4,
            value: sz::<firewall_common::Counters>() as u32,
            flags: 0,
            max_entries: Some(1),
        },
    ]
}

/// The pin directory must exist, be ours and be writable by nobody else: whoever
/// can write it can unlink the pinned link and detach the firewall.
pub fn check_dir(dir: &Path) -> Result<(), LayoutError> {
    match crate::sys::fsafe::check_private_dir(dir) {
        Err(crate::sys::fsafe::UnsafePath::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Err(LayoutError::NotAttached(dir.into()))
        }
        r => Ok(r?),
    }
}

/// `FLOW_FILTER` must have the two halves of the size the control word
/// recorded when the directory was created (a power of two of lines each).
pub fn check_filter(dir: &Path, recorded_lines: u32, entries: u32) -> Result<(), LayoutError> {
    if recorded_lines.is_power_of_two() && u64::from(entries) == 2 * u64::from(recorded_lines) {
        return Ok(());
    }
    Err(LayoutError::Mismatch {
        path: dir.join(names::FLOW_FILTER),
        dir: dir.into(),
        found: format!(
            "a flow filter of {entries} lines where the control word says 2 x {recorded_lines}"
        ),
        expected: "the size recorded when the directory was created".into(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Check the pinned map at `path` against our layout. `Ok(None)` if absent.
pub fn check_pin(dir: &Path, path: &Path, name: &str) -> Result<Option<MapData>, LayoutError> {
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(path).map_err(|source| LayoutError::Open {
        path: path.into(),
        source,
    })?;
    let shape = shapes()
        .into_iter()
        .find(|s| s.name == name)
        .expect("known map");
    let info = data.info().map_err(|source| LayoutError::Open {
        path: path.into(),
        source,
    })?;
    let kind = info.map_type().ok();
    let ok = kind == Some(shape.kind)
        && info.key_size() == shape.key
        && info.value_size() == shape.value
        && info.map_flags() == shape.flags
        && shape.max_entries.is_none_or(|m| m == info.max_entries());
    if !ok {
        return Err(LayoutError::Mismatch {
            path: path.into(),
            dir: dir.into(),
            found: format!(
                "{:?} map with key {}B, value {}B, flags {:#x}, max_entries {}",
                kind,
                info.key_size(),
                info.value_size(),
                info.map_flags(),
                info.max_entries()
            ),
            expected: format!(
                "{:?} map with key {}B, value {}B, flags {:#x}",
                shape.kind, shape.key, shape.value, shape.flags
            ),
            version: env!("CARGO_PKG_VERSION"),
        });
    }
    Ok(Some(data))
}
