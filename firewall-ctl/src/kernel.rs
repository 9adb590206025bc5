//! The pinned kernel maps: layout checks, the mmapped control word, and the
//! [`PeerStore`] protocol over real maps (the exact-peer tables through
//! [`crate::table`]).

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, MapType};
use firewall_common::{
    ABI_VERSION, Bucket4, Bucket6, CTRL_MAGIC, CidrVal, Control, GEN_NEVER, LpmKeyV4, LpmKeyV6,
    MAX_CIDRS, PeerVal, names,
};
use ipnet::IpNet;

use crate::{
    batch,
    peers::{Changes, Digest, PeerSet, is_exact},
    store::{Loaded, PeerStore, StoreError, Version},
    table::{Family, Slot, Table, V4, V6},
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
    Unsafe(#[from] crate::fsafe::UnsafePath),
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

fn shapes() -> [Shape; 8] {
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
    match crate::fsafe::check_private_dir(dir) {
        Err(crate::fsafe::UnsafePath::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Err(LayoutError::NotAttached(dir.into()))
        }
        r => Ok(r?),
    }
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
    map: crate::sys::Mmap,
}

impl CtrlMap {
    fn new(fd: BorrowedFd<'_>, path: &Path) -> Result<Self, LayoutError> {
        // One `Control` (layout checked by the caller).
        let map = crate::sys::Mmap::shared(Some(fd), size_of::<Control>()).map_err(|source| {
            LayoutError::Mmap {
                path: path.into(),
                source,
            }
        })?;
        Ok(CtrlMap { map })
    }

    fn read(&self) -> Control {
        // SAFETY: the mapping is live for self's lifetime and holds a Control.
        unsafe { std::ptr::read_volatile(self.map.ptr::<Control>().as_ptr()) }
    }
    fn gen_word(&self) -> &AtomicU64 {
        // SAFETY: committed_gen is the first, 8-byte aligned field of a page-aligned mapping.
        unsafe {
            AtomicU64::from_ptr(std::ptr::addr_of_mut!(
                (*self.map.ptr::<Control>().as_ptr()).committed_gen
            ))
        }
    }
    fn update(&self, f: impl FnOnce(&mut Control)) {
        // Only the fields other than committed_gen are written this way; the
        // datapath reads none of them except the CIDR counts of the live slot,
        // which are only ever written for the standby slot. The flip's Release
        // store of committed_gen comes after these volatile writes in program
        // order, so it publishes them (see the compile_error in lib.rs for the
        // datapath's side of that).
        let mut c = self.read();
        f(&mut c);
        // SAFETY: as in read(); a single writer holds the commit lock.
        unsafe {
            let p = self.map.ptr::<Control>().as_ptr();
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).staged_gen), c.staged_gen);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).magic), c.magic);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).abi_version), c.abi_version);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).cidr4_count), c.cidr4_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).cidr6_count), c.cidr6_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).peer_count), c.peer_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).checksum), c.checksum);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).hash_seed), c.hash_seed);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).bucket_mask), c.bucket_mask);
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct PeerRow {
    pub peer: IpNet,
    pub origin: u32,
    pub hits: Option<u64>,
    pub added_generation: Option<u64>,
    /// The `PEERS_V4`/`PEERS_V6` array index holding an exact peer, for
    /// `bpftool map lookup pinned .../PEERS_V4 key <bucket as 4 LE bytes>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<u32>,
}

/// The shared maps of one pin directory, opened for committing.
pub struct KernelStore {
    pub dir: PathBuf,
    v4: Table<V4>,
    v6: Table<V6>,
    cidr4: [MapData; 2],
    cidr6: [MapData; 2],
    ctrl: CtrlMap,
    /// Slots in use in PEERS_V4/V6 (visible or not), kept to refuse a full
    /// table before writing; refreshed by every load().
    entries: [u64; 2],
    capacity: [u64; 2],
}

fn io(op: &'static str, map: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { op, map, source }
}

fn v4_addr(n: &IpNet) -> [u8; 4] {
    match n {
        IpNet::V4(n) => n.addr().octets(),
        IpNet::V6(_) => unreachable!("v6 address in v4 table"),
    }
}
fn v6_addr(n: &IpNet) -> [u8; 16] {
    match n {
        IpNet::V6(n) => n.addr().octets(),
        IpNet::V4(_) => unreachable!("v4 address in v6 table"),
    }
}

fn exact_net(a: impl Into<std::net::IpAddr>) -> IpNet {
    a.into().into()
}

impl KernelStore {
    /// Open the shared maps of `dir`, checking their layout.
    pub fn open(dir: &Path) -> Result<Self, LayoutError> {
        check_dir(dir)?;
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
        let v4 = get(names::PEERS_V4)?;
        let v6 = get(names::PEERS_V6)?;
        let buckets = [&v4, &v6].map(|m| m.info().map(|i| i.max_entries()).unwrap_or(0));
        if c.magic == 0 {
            // A fresh pin directory: draw the hash seeds and record the table
            // sizes. The magic goes last, so a crash here just repeats this.
            let mut seed = [0u64; 4];
            for s in &mut seed {
                *s = rand::random::<u64>() | 1;
            }
            ctrl.update(|c| {
                c.hash_seed = seed;
                c.bucket_mask = buckets.map(|b| b.wrapping_sub(1));
            });
            ctrl.update(|c| {
                c.magic = CTRL_MAGIC;
                c.abi_version = ABI_VERSION;
            });
        }
        let c = ctrl.read();
        for (i, name) in [names::PEERS_V4, names::PEERS_V6].into_iter().enumerate() {
            if !buckets[i].is_power_of_two() || c.bucket_mask[i] != buckets[i] - 1 {
                return Err(LayoutError::Mismatch {
                    path: dir.join(name),
                    dir: dir.into(),
                    found: format!(
                        "a table of {} buckets where the control word says {}",
                        buckets[i],
                        c.bucket_mask[i] as u64 + 1
                    ),
                    expected: "the sizes recorded when the directory was created".into(),
                    version: env!("CARGO_PKG_VERSION"),
                });
            }
        }
        let mmap_err = |name: &'static str| {
            let path = dir.join(name);
            move |source| LayoutError::Mmap { path, source }
        };
        let v4 = Table::mmap(v4.fd().as_fd(), buckets[0], c.hash_seed)
            .map_err(mmap_err(names::PEERS_V4))?;
        let v6 = Table::mmap(v6.fd().as_fd(), buckets[1], c.hash_seed)
            .map_err(mmap_err(names::PEERS_V6))?;
        let capacity = [v4.capacity(), v6.capacity()];
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
    pub fn buckets(&self) -> [u32; 2] {
        [self.v4.buckets(), self.v6.buckets()]
    }

    /// Every exact entry (visible or not) with the bucket it lives in.
    fn exact_entries(&self) -> impl Iterator<Item = (IpNet, u32, PeerVal)> + '_ {
        let a = self
            .v4
            .entries()
            .map(|(s, a, v)| (exact_net(std::net::Ipv4Addr::from(a)), s.bucket, v));
        let b = self
            .v6
            .entries()
            .map(|(s, a, v)| (exact_net(std::net::Ipv6Addr::from(a)), s.bucket, v));
        a.chain(b)
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

    /// Count and checksum of everything visible at `generation`, from a full
    /// read-back, without building the set.
    pub fn digest_at(&self, generation: u64) -> Result<Digest, StoreError> {
        let mut d = Digest::default();
        for (n, _, v) in self.exact_entries() {
            if v.visible_at(generation) {
                d.add(&n, v.origin);
            }
        }
        for (n, o) in self.dump_cidrs((generation & 1) as usize)? {
            d.add(&n, o);
        }
        Ok(d)
    }

    /// Every stored version of one exact entry, from its probe window.
    fn versions(&self, n: &IpNet) -> Vec<(Slot, PeerVal)> {
        match n {
            IpNet::V4(_) => self.v4.find(&v4_addr(n)),
            IpNet::V6(_) => self.v6.find(&v6_addr(n)),
        }
    }

    /// Mark `n`'s versions that pass `pick` removed at `generation`.
    fn mark(&self, n: &IpNet, generation: u64, pick: impl Fn(&PeerVal) -> bool) {
        for (slot, _) in self.versions(n).into_iter().filter(|(_, v)| pick(v)) {
            match n {
                IpNet::V4(_) => self.v4.set_removed(slot, generation),
                IpNet::V6(_) => self.v6.set_removed(slot, generation),
            }
        }
    }

    /// Free `n`'s versions that pass `pick`; returns how many.
    fn free(&self, n: &IpNet, pick: impl Fn(&PeerVal) -> bool) -> u64 {
        let mut freed = 0;
        for (slot, _) in self.versions(n).into_iter().filter(|(_, v)| pick(v)) {
            match n {
                IpNet::V4(_) => self.v4.free(slot),
                IpNet::V6(_) => self.v6.free(slot),
            }
            freed += 1;
        }
        freed
    }

    /// Every entry visible at the committed generation, with hit counts for
    /// exact peers (CIDR entries have none), sorted.
    pub fn list(&self) -> Result<Vec<PeerRow>, StoreError> {
        let generation = self.ctrl.read().committed_gen;
        let mut rows: Vec<PeerRow> = self
            .exact_entries()
            .filter(|(_, _, v)| v.visible_at(generation))
            .map(|(peer, bucket, v)| PeerRow {
                peer,
                origin: v.origin,
                hits: Some(v.hits),
                added_generation: Some(v.added_gen),
                bucket: Some(bucket),
            })
            .collect();
        for (n, o) in self.dump_cidrs((generation & 1) as usize)? {
            rows.push(PeerRow {
                peer: n,
                origin: o,
                hits: None,
                added_generation: None,
                bucket: None,
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
        // Spill counts a crash left too high only cost scan time, but fix
        // them here, where a full scan is paid anyway.
        self.v4.repair_spill();
        self.v6.repair_spill();
        // One scan: slots used, leftovers, and the visible set.
        let mut used = [0u64; 2];
        let mut leftovers = 0u64;
        let mut set = PeerSet::new();
        for (n, _, v) in self.exact_entries() {
            used[usize::from(n.addr().is_ipv6())] += 1;
            if !v.visible_at(generation) || v.removed_gen != GEN_NEVER {
                leftovers += 1;
            }
            if v.visible_at(generation) {
                set.insert(n, v.origin);
            }
        }
        self.entries = used;
        set.extend(self.dump_cidrs((generation & 1) as usize)?);
        Ok(Loaded {
            generation,
            set,
            leftovers: leftovers + u64::from(c.staged_gen > generation),
        })
    }

    fn cleanup(&mut self) -> Result<u64, StoreError> {
        let generation = self.ctrl.read().committed_gen;
        let (t4, n4) = cleanup_table(&self.v4, generation);
        let (t6, n6) = cleanup_table(&self.v6, generation);
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
        // One pass from the changes to each table's key type, into vectors
        // sized exactly (growing by doubling overshot by up to 2x, 20 MB at
        // 1M peers, and copied on every growth).
        let n_v4 = changes
            .add
            .iter()
            .filter(|(n, _)| matches!(n, IpNet::V4(a) if a.prefix_len() == 32))
            .count();
        let n_v6 = changes.add.iter().filter(|(n, _)| is_exact(n)).count() - n_v4;
        let (mut adds_v4, mut adds_v6) = (Vec::with_capacity(n_v4), Vec::with_capacity(n_v6));
        for (n, o) in &changes.add {
            match n {
                IpNet::V4(a) if a.prefix_len() == 32 => adds_v4.push((a.addr().octets(), *o)),
                IpNet::V6(a) if a.prefix_len() == 128 => adds_v6.push((a.addr().octets(), *o)),
                _ => {}
            }
        }
        let adds = [adds_v4.len() as u64, adds_v6.len() as u64];
        // Every add takes a slot (an origin change too, until its old version
        // is collected): a full table is refused before the first write, so
        // nothing is ever partly staged by it.
        for (i, name) in [names::PEERS_V4, names::PEERS_V6].into_iter().enumerate() {
            if self.entries[i] + adds[i] > self.capacity[i] {
                return Err(StoreError::MapFull {
                    map: name,
                    capacity: self.capacity[i],
                    needed: self.entries[i] + adds[i],
                });
            }
        }
        self.ctrl.update(|c| c.staged_gen = generation);
        let committed = generation - 1;
        // Removals stay visible (with their hit counts) until the flip.
        for n in changes.remove.iter().filter(|n| is_exact(n)) {
            self.mark(n, generation, |v| {
                v.visible_at(committed) && v.removed_gen == GEN_NEVER
            });
        }
        // Additions; an origin change also marks the old version removed.
        self.entries[0] += stage_adds(&self.v4, &adds_v4, generation)?;
        self.entries[1] += stage_adds(&self.v6, &adds_v6, generation)?;
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
                .versions(n)
                .into_iter()
                .map(|(_, v)| -> Version { (v.added_gen, v.removed_gen, v.origin) })
                .collect())
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
        for n in removed {
            // Removed at or before the committed generation: no packet can
            // see it any more.
            let freed = self.free(n, |v| v.removed_gen <= generation);
            let i = usize::from(n.addr().is_ipv6());
            self.entries[i] = self.entries[i].saturating_sub(freed);
        }
        Ok(())
    }
}

/// Stage additions into one table. Returns how many slots they took.
fn stage_adds<F: Family>(
    t: &Table<F>,
    adds: &[(F::Addr, crate::peers::Origin)],
    generation: u64,
) -> Result<u64, StoreError> {
    let stage = |(a, o): &(F::Addr, crate::peers::Origin)| {
        t.stage_add(*a, crate::table::staged(generation, *o), generation - 1)
    };
    if adds.len() <= 4096 {
        for add in adds {
            stage(add)?;
        }
        return Ok(adds.len() as u64);
    }
    // Many additions go in table order, roughly: a full sync then works
    // through the table one region at a time, and the region fits in cache,
    // where scattered over the whole table every entry missed it (1M peers:
    // 190 ms). One pass partitions the additions by the top 6 bits of their
    // bucket into 64 regions (64 sequential write streams); a full sort by
    // bucket, gathered, cost twice as much for no further gain.
    let bits = t.buckets().trailing_zeros();
    let region = |a: &F::Addr| (t.home(a) >> bits.saturating_sub(6)) as usize;
    let mut start = [0usize; 65];
    for (a, _) in adds {
        start[region(a) + 1] += 1;
    }
    for i in 1..start.len() {
        start[i] += start[i - 1];
    }
    let mut sorted = vec![adds[0]; adds.len()];
    for add in adds {
        let at = &mut start[region(&add.0)];
        sorted[*at] = *add;
        *at += 1;
    }
    for add in &sorted {
        stage(add)?;
    }
    Ok(adds.len() as u64)
}

/// Bring one exact-peer table back to exactly what `generation` shows: free
/// the slots it does not show (half-staged additions, uncollected removals)
/// and clear half-staged removal marks. Returns (slots touched, slots left).
fn cleanup_table<F: Family>(t: &Table<F>, generation: u64) -> (u64, u64) {
    let (mut touched, mut left) = (0, 0);
    let slots: Vec<_> = t.entries().collect();
    for (slot, _, v) in slots {
        if !v.visible_at(generation) {
            t.free(slot);
            touched += 1;
        } else {
            if v.removed_gen != GEN_NEVER {
                t.set_removed(slot, GEN_NEVER);
                touched += 1;
            }
            left += 1;
        }
    }
    // `free` lowered the spill counts as it went; load() repairs any a crash
    // left too high before this runs.
    (touched, left)
}
