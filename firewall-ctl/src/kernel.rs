//! The pinned kernel maps: layout checks, the mmapped control word, and the
//! [`PeerStore`] protocol over real maps.

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, MapType};
use firewall_common::{
    ABI_VERSION, CTRL_MAGIC, CidrVal, Control, GEN_NEVER, LpmKeyV4, LpmKeyV6, MAX_CIDRS, PeerV4Key,
    PeerV6Key, PeerVal, names,
};
use ipnet::IpNet;

use crate::{
    batch,
    peers::{Changes, Digest, PeerSet, is_exact},
    store::{Loaded, PeerStore, StoreError},
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
    #[error("cannot map the control word of {path} into memory")]
    Mmap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a map of ours must look like. `max_entries` of the peer maps is set at
/// attach time, so it is not part of the expected shape.
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

fn shapes() -> [Shape; 8] {
    use std::mem::size_of as sz;
    let lpm4 = sz::<LpmKeyV4>() as u32;
    let lpm6 = sz::<LpmKeyV6>() as u32;
    let cv = sz::<CidrVal>() as u32;
    [
        Shape {
            name: names::PEERS_V4,
            kind: MapType::Hash,
            key: 4,
            value: sz::<PeerVal>() as u32,
            flags: NO_PREALLOC,
            max_entries: None,
        },
        Shape {
            name: names::PEERS_V6,
            kind: MapType::Hash,
            key: 16,
            value: sz::<PeerVal>() as u32,
            flags: NO_PREALLOC,
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
            name: names::COUNTERS,
            kind: MapType::PerCpuArray,
            key: 4,
            value: sz::<firewall_common::Counters>() as u32,
            flags: 0,
            max_entries: Some(1),
        },
    ]
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

/// The mmapped `CTRL` value.
struct CtrlMap {
    ptr: NonNull<Control>,
    len: usize,
}

impl CtrlMap {
    fn new(fd: BorrowedFd<'_>, path: &Path) -> Result<Self, LayoutError> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: mapping a BPF_F_MMAPABLE array of one `Control` (layout checked
        // above); the kernel backs at least one page.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(LayoutError::Mmap {
                path: path.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(CtrlMap {
            ptr: NonNull::new(p.cast()).expect("mmap returned NULL"),
            len: page,
        })
    }
    fn read(&self) -> Control {
        // SAFETY: the mapping is live for self's lifetime and holds a Control.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr()) }
    }
    fn gen_word(&self) -> &AtomicU64 {
        // SAFETY: committed_gen is the first, 8-byte aligned field of a page-aligned mapping.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.ptr.as_ptr()).committed_gen)) }
    }
    fn update(&self, f: impl FnOnce(&mut Control)) {
        // Only the fields other than committed_gen are written this way; the
        // datapath reads none of them except the CIDR counts of the live slot,
        // which are only ever written for the standby slot.
        let mut c = self.read();
        f(&mut c);
        // SAFETY: as in read(); a single writer holds the commit lock.
        unsafe {
            let p = self.ptr.as_ptr();
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).staged_gen), c.staged_gen);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).magic), c.magic);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).abi_version), c.abi_version);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).cidr4_count), c.cidr4_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).cidr6_count), c.cidr6_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).peer_count), c.peer_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).checksum), c.checksum);
        }
    }
}

impl Drop for CtrlMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[derive(Debug, serde::Serialize)]
pub struct PeerRow {
    pub peer: IpNet,
    pub origin: u32,
    pub hits: Option<u64>,
    pub added_generation: Option<u64>,
}

/// Every entry of PEERS_V4 and PEERS_V6, visible or not.
type ExactDump = (Vec<(PeerV4Key, PeerVal)>, Vec<(PeerV6Key, PeerVal)>);

/// The shared maps of one pin directory, opened for committing.
pub struct KernelStore {
    pub dir: PathBuf,
    v4: MapData,
    v6: MapData,
    cidr4: [MapData; 2],
    cidr6: [MapData; 2],
    ctrl: CtrlMap,
    /// Entries in PEERS_V4/V6 (visible or not), kept to refuse a full map
    /// before writing; refreshed by every load().
    entries: [u64; 2],
    capacity: [u64; 2],
}

fn io(op: &'static str, map: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { op, map, source }
}

pub fn v4_key(n: &IpNet) -> PeerV4Key {
    match n {
        IpNet::V4(n) => PeerV4Key {
            addr: n.addr().octets(),
        },
        IpNet::V6(_) => unreachable!("v6 address in v4 map"),
    }
}
pub fn v6_key(n: &IpNet) -> PeerV6Key {
    match n {
        IpNet::V6(n) => PeerV6Key {
            addr: n.addr().octets(),
        },
        IpNet::V4(_) => unreachable!("v4 address in v6 map"),
    }
}

impl KernelStore {
    /// Open the shared maps of `dir`, checking their layout.
    pub fn open(dir: &Path) -> Result<Self, LayoutError> {
        let get = |name: &'static str| -> Result<MapData, LayoutError> {
            check_pin(dir, &dir.join(name), name)?
                .ok_or_else(|| LayoutError::NotAttached(dir.into()))
        };
        let ctrl_map = get(names::CTRL)?;
        // The mapping holds its own reference to the map: the fd may close.
        let ctrl = CtrlMap::new(ctrl_map.fd().as_fd(), &dir.join(names::CTRL))?;
        let c = ctrl.read();
        if c.magic != 0 && (c.magic != CTRL_MAGIC || c.abi_version != ABI_VERSION) {
            return Err(LayoutError::Mismatch {
                path: dir.join(names::CTRL),
                dir: dir.into(),
                found: format!(
                    "control word with magic {:#x} and ABI {}",
                    c.magic, c.abi_version
                ),
                expected: format!("magic {CTRL_MAGIC:#x} and ABI {ABI_VERSION}"),
                version: env!("CARGO_PKG_VERSION"),
            });
        }
        if c.magic == 0 {
            ctrl.update(|c| {
                c.magic = CTRL_MAGIC;
                c.abi_version = ABI_VERSION;
            });
        }
        let v4 = get(names::PEERS_V4)?;
        let v6 = get(names::PEERS_V6)?;
        let capacity = [
            v4.info().map(|i| i.max_entries() as u64).unwrap_or(0),
            v6.info().map(|i| i.max_entries() as u64).unwrap_or(0),
        ];
        Ok(KernelStore {
            dir: dir.into(),
            v4,
            v6,
            cidr4: [get(names::CIDR4_0)?, get(names::CIDR4_1)?],
            cidr6: [get(names::CIDR6_0)?, get(names::CIDR6_1)?],
            ctrl,
            entries: [0, 0],
            capacity,
        })
    }

    pub fn control(&self) -> Control {
        self.ctrl.read()
    }
    pub fn capacity(&self) -> [u64; 2] {
        self.capacity
    }

    fn dump_exact(&self) -> Result<ExactDump, StoreError> {
        let a = batch::dump(self.v4.fd().as_fd(), self.capacity[0] as usize)
            .map_err(io("read", names::PEERS_V4))?;
        let b = batch::dump(self.v6.fd().as_fd(), self.capacity[1] as usize)
            .map_err(io("read", names::PEERS_V6))?;
        Ok((a, b))
    }

    fn dump_cidrs(&self, slot: usize) -> Result<PeerSet, StoreError> {
        let mut out = PeerSet::new();
        let a: Vec<(LpmKeyV4, CidrVal)> =
            batch::dump(self.cidr4[slot].fd().as_fd(), MAX_CIDRS as usize)
                .map_err(io("read", names::CIDR4_0))?;
        for (k, v) in a {
            if let Ok(n) = ipnet::Ipv4Net::new(k.addr.into(), k.prefix_len as u8) {
                out.insert(IpNet::V4(n), v.origin);
            }
        }
        let b: Vec<(LpmKeyV6, CidrVal)> =
            batch::dump(self.cidr6[slot].fd().as_fd(), MAX_CIDRS as usize)
                .map_err(io("read", names::CIDR6_0))?;
        for (k, v) in b {
            if let Ok(n) = ipnet::Ipv6Net::new(k.addr.into(), k.prefix_len as u8) {
                out.insert(IpNet::V6(n), v.origin);
            }
        }
        Ok(out)
    }

    /// Everything visible at `generation`, from a full read-back.
    pub fn set_at(&self, generation: u64) -> Result<PeerSet, StoreError> {
        let (a, b) = self.dump_exact()?;
        let mut set = PeerSet::new();
        for (k, v) in a.iter().filter(|(_, v)| v.visible_at(generation)) {
            set.insert(IpNet::V4(std::net::Ipv4Addr::from(k.addr).into()), v.origin);
        }
        for (k, v) in b.iter().filter(|(_, v)| v.visible_at(generation)) {
            set.insert(IpNet::V6(std::net::Ipv6Addr::from(k.addr).into()), v.origin);
        }
        set.extend(self.dump_cidrs((generation & 1) as usize)?);
        Ok(set)
    }

    /// Count and checksum of everything visible at `generation`, from a full
    /// read-back, without building the set.
    pub fn digest_at(&self, generation: u64) -> Result<Digest, StoreError> {
        let (a, b) = self.dump_exact()?;
        let mut d = Digest::default();
        for (k, v) in a.iter().filter(|(_, v)| v.visible_at(generation)) {
            d.add(
                &IpNet::V4(std::net::Ipv4Addr::from(k.addr).into()),
                v.origin,
            );
        }
        for (k, v) in b.iter().filter(|(_, v)| v.visible_at(generation)) {
            d.add(
                &IpNet::V6(std::net::Ipv6Addr::from(k.addr).into()),
                v.origin,
            );
        }
        for (n, o) in self.dump_cidrs((generation & 1) as usize)? {
            d.add(&n, o);
        }
        Ok(d)
    }

    /// One exact entry, by a single lookup on the map fd we already hold.
    fn lookup_exact(&self, n: &IpNet) -> Result<Option<PeerVal>, StoreError> {
        let (map, name, key) = match n {
            IpNet::V4(_) => (&self.v4, names::PEERS_V4, v4_key(n).addr.to_vec()),
            IpNet::V6(_) => (&self.v6, names::PEERS_V6, v6_key(n).addr.to_vec()),
        };
        let bytes = crate::sys::lookup_raw(map.fd().as_fd(), &key, std::mem::size_of::<PeerVal>())
            .map_err(io("read", name))?;
        // SAFETY: the buffer is exactly one PeerVal (the map's value size,
        // checked when the pin was opened); PeerVal is plain integers.
        Ok(bytes.map(|b| unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<PeerVal>()) }))
    }

    /// Every entry visible at the committed generation, with hit counts for
    /// exact peers (CIDR entries have none), sorted.
    pub fn list(&self) -> Result<Vec<PeerRow>, StoreError> {
        let generation = self.ctrl.read().committed_gen;
        let (a, b) = self.dump_exact()?;
        let mut rows: Vec<PeerRow> = Vec::new();
        for (k, v) in a.iter().filter(|(_, v)| v.visible_at(generation)) {
            rows.push(PeerRow {
                peer: IpNet::V4(std::net::Ipv4Addr::from(k.addr).into()),
                origin: v.origin,
                hits: Some(v.hits),
                added_generation: Some(v.added_gen),
            });
        }
        for (k, v) in b.iter().filter(|(_, v)| v.visible_at(generation)) {
            rows.push(PeerRow {
                peer: IpNet::V6(std::net::Ipv6Addr::from(k.addr).into()),
                origin: v.origin,
                hits: Some(v.hits),
                added_generation: Some(v.added_gen),
            });
        }
        for (n, o) in self.dump_cidrs((generation & 1) as usize)? {
            rows.push(PeerRow {
                peer: n,
                origin: o,
                hits: None,
                added_generation: None,
            });
        }
        rows.sort_by_key(|r| r.peer);
        Ok(rows)
    }

    fn write_cidr_slot(&mut self, slot: usize, cidrs: &PeerSet) -> Result<(), StoreError> {
        let old = self.dump_cidrs(slot)?;
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
        batch::delete(self.cidr4[slot].fd().as_fd(), &k4).map_err(io("clear", names::CIDR4_0))?;
        batch::delete(self.cidr6[slot].fd().as_fd(), &k6).map_err(io("clear", names::CIDR6_0))?;
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
        batch::update(self.cidr4[slot].fd().as_fd(), &k4, &v4)
            .map_err(|(_, e)| io("stage", names::CIDR4_0)(e))?;
        batch::update(self.cidr6[slot].fd().as_fd(), &k6, &v6)
            .map_err(|(_, e)| io("stage", names::CIDR6_0)(e))?;
        self.ctrl.update(|c| {
            c.cidr4_count[slot] = k4.len() as u32;
            c.cidr6_count[slot] = k6.len() as u32;
        });
        Ok(())
    }
}

impl PeerStore for KernelStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let c = self.ctrl.read();
        let generation = c.committed_gen;
        let (a, b) = self.dump_exact()?;
        self.entries = [a.len() as u64, b.len() as u64];
        let leftovers = a
            .iter()
            .map(|(_, v)| v)
            .chain(b.iter().map(|(_, v)| v))
            .filter(|v| !v.visible_at(generation) || v.removed_gen != GEN_NEVER)
            .count() as u64;
        let set = self.set_at(generation)?;
        Ok(Loaded {
            generation,
            set,
            leftovers: leftovers + u64::from(c.staged_gen > generation),
        })
    }

    fn cleanup(&mut self) -> Result<u64, StoreError> {
        let generation = self.ctrl.read().committed_gen;
        let (a, b) = self.dump_exact()?;
        let (t4, n4) = cleanup_map(&self.v4, names::PEERS_V4, a, generation)?;
        let (t6, n6) = cleanup_map(&self.v6, names::PEERS_V6, b, generation)?;
        self.entries = [n4, n6];
        self.ctrl.update(|c| c.staged_gen = generation);
        Ok(t4 + t6)
    }

    fn stage(
        &mut self,
        generation: u64,
        changes: &Changes,
        cidrs: &PeerSet,
    ) -> Result<(), StoreError> {
        let c = self.ctrl.read();
        if c.committed_gen + 1 != generation {
            return Err(StoreError::Conflict {
                expected: generation - 1,
                found: c.committed_gen,
            });
        }
        let adds_v4 = changes
            .add
            .iter()
            .filter(|(n, _)| is_exact(n) && n.addr().is_ipv4())
            .count() as u64;
        let adds_v6 = changes
            .add
            .iter()
            .filter(|(n, _)| is_exact(n) && n.addr().is_ipv6())
            .count() as u64;
        // Upper bound (an origin change rewrites an existing key): a full map is
        // refused before the first write, so nothing is ever partly staged by it.
        for (i, (adds, name)) in [(adds_v4, names::PEERS_V4), (adds_v6, names::PEERS_V6)]
            .into_iter()
            .enumerate()
        {
            if self.entries[i] + adds > self.capacity[i] {
                return Err(StoreError::MapFull {
                    map: name,
                    capacity: self.capacity[i],
                    needed: self.entries[i] + adds,
                });
            }
        }
        self.ctrl.update(|c| c.staged_gen = generation);
        let fresh = PeerVal {
            added_gen: generation,
            removed_gen: GEN_NEVER,
            hits: 0,
            origin: 0,
            _pad: 0,
        };
        let mut writes: Vec<(IpNet, PeerVal)> = changes
            .add
            .iter()
            .filter(|(n, _)| is_exact(n))
            .map(|(n, o)| {
                (
                    *n,
                    PeerVal {
                        origin: *o,
                        ..fresh
                    },
                )
            })
            .collect();
        // Removals keep their entry (and hit count) visible until the flip.
        for n in changes.remove.iter().filter(|n| is_exact(n)) {
            if let Some(old) = self.lookup_exact(n)? {
                writes.push((
                    *n,
                    PeerVal {
                        removed_gen: generation,
                        ..old
                    },
                ));
            }
        }
        let (mut k4, mut v4, mut k6, mut v6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (n, v) in writes {
            if n.addr().is_ipv4() {
                k4.push(v4_key(&n));
                v4.push(v)
            } else {
                k6.push(v6_key(&n));
                v6.push(v)
            }
        }
        batch::update(self.v4.fd().as_fd(), &k4, &v4)
            .map_err(|(_, e)| io("stage", names::PEERS_V4)(e))?;
        batch::update(self.v6.fd().as_fd(), &k6, &v6)
            .map_err(|(_, e)| io("stage", names::PEERS_V6)(e))?;
        self.entries[0] += adds_v4;
        self.entries[1] += adds_v6;
        self.write_cidr_slot((generation & 1) as usize, cidrs)
    }

    fn verify(
        &mut self,
        generation: u64,
        changes: &Changes,
        cidrs: &PeerSet,
        expected: Digest,
    ) -> Result<(), StoreError> {
        if let Some(ms) = crate::failpoint("stage-to-flip-delay-ms") {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let fail = |what: String| Err(StoreError::Verify { generation, what });
        // A large change is verified against a full read-back (count and
        // checksum of the whole generation); a small one entry by entry, so a
        // one-peer change into a million-peer set stays O(1).
        if changes.add.len() + changes.remove.len() > 1024 {
            let d = self.digest_at(generation)?;
            if d != expected {
                return fail(format!(
                    "read back {} entries with checksum {:#x}, expected {} with {:#x}",
                    d.count, d.sum, expected.count, expected.sum
                ));
            }
            return Ok(());
        }
        crate::store::check_staged(generation, changes, |n| {
            Ok(self
                .lookup_exact(n)?
                .map(|v| (v.added_gen, v.removed_gen, v.origin)))
        })?;
        let back = self.dump_cidrs((generation & 1) as usize)?;
        if &back != cidrs {
            return fail(format!(
                "CIDR slot holds {} entries, expected {}",
                back.len(),
                cidrs.len()
            ));
        }
        Ok(())
    }

    fn flip(&mut self, generation: u64, digest: Digest) -> Result<(), StoreError> {
        let slot = (generation & 1) as usize;
        self.ctrl.update(|c| {
            c.peer_count[slot] = digest.count;
            c.checksum[slot] = digest.sum;
        });
        let c = self.ctrl.read();
        if c.committed_gen + 1 != generation {
            return Err(StoreError::Conflict {
                expected: generation - 1,
                found: c.committed_gen,
            });
        }
        // The flip: one aligned 8-byte atomic store. Everything staged was written
        // by completed syscalls before it, so a packet that sees the new
        // generation sees all of it.
        self.ctrl.gen_word().store(generation, Ordering::Release);
        self.ctrl.update(|c| c.staged_gen = generation);
        Ok(())
    }

    fn gc(&mut self, generation: u64, removed: &[IpNet]) -> Result<(), StoreError> {
        let _ = generation;
        let k4: Vec<PeerV4Key> = removed
            .iter()
            .filter(|n| n.addr().is_ipv4())
            .map(v4_key)
            .collect();
        let k6: Vec<PeerV6Key> = removed
            .iter()
            .filter(|n| n.addr().is_ipv6())
            .map(v6_key)
            .collect();
        batch::delete(self.v4.fd().as_fd(), &k4).map_err(io("collect", names::PEERS_V4))?;
        batch::delete(self.v6.fd().as_fd(), &k6).map_err(io("collect", names::PEERS_V6))?;
        self.entries[0] -= (k4.len() as u64).min(self.entries[0]);
        self.entries[1] -= (k6.len() as u64).min(self.entries[1]);
        Ok(())
    }
}

/// Bring one exact-peer map back to exactly what `generation` shows: delete
/// the entries it does not show (half-staged additions, uncollected removals)
/// and clear half-staged removal marks. Returns (entries touched, entries left).
fn cleanup_map<K: aya::Pod + Default>(
    map: &MapData,
    name: &'static str,
    entries: Vec<(K, PeerVal)>,
    generation: u64,
) -> Result<(u64, u64), StoreError> {
    let (visible, gone): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|(_, v)| v.visible_at(generation));
    let delete: Vec<K> = gone.into_iter().map(|(k, _)| k).collect();
    let (keys, values): (Vec<K>, Vec<PeerVal>) = visible
        .iter()
        .filter(|(_, v)| v.removed_gen != GEN_NEVER)
        .map(|(k, v)| {
            (
                *k,
                PeerVal {
                    removed_gen: GEN_NEVER,
                    ..*v
                },
            )
        })
        .unzip();
    batch::delete(map.fd().as_fd(), &delete).map_err(io("cleanup", name))?;
    batch::update(map.fd().as_fd(), &keys, &values).map_err(|(_, e)| io("cleanup", name)(e))?;
    Ok(((delete.len() + keys.len()) as u64, visible.len() as u64))
}
