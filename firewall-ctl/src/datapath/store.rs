//! The kernel [`PeerStore`]: the commit protocol over the pinned maps of one
//! pin directory (exact peers through [`super::table`], CIDR peers through
//! [`super::cidr`], the flip through [`super::ctrl`]).

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use aya::maps::MapData;
use firewall_common::{ABI_VERSION, CTRL_MAGIC, Control, GEN_NEVER, PeerVal, names};
use ipnet::IpNet;

use super::{
    cidr::Cidrs,
    ctrl::{CtrlMap, Settings},
    layout::{LayoutError, check_dir, check_pin},
    table::{Family, Slot, Table, V4, V6},
};
use crate::{
    peers::{Changes, Digest, PeerSet, is_exact},
    store::{Loaded, PeerStore, StoreError, Version},
};

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
    cidrs: Cidrs,
    ctrl: CtrlMap,
    /// Slots in use in PEERS_V4/V6 (visible or not), kept to refuse a full
    /// table before writing; refreshed by every load().
    entries: [u64; 2],
    capacity: [u64; 2],
}

pub(crate) fn io(op: &'static str, map: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
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
        let filter_entries = get(names::FLOW_FILTER)?
            .info()
            .map(|i| i.max_entries())
            .unwrap_or(0);
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
                // Before the egress program is attached (attach opens the
                // store first), so no flow is recorded without its byte.
                c.flow_filter_lines = filter_entries / 2;
            });
            ctrl.set_settings(&Settings::default());
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
        super::layout::check_filter(dir, c.flow_filter_lines, filter_entries)?;
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
            cidrs: Cidrs {
                v4: [get(names::CIDR4_0)?, get(names::CIDR4_1)?],
                v6: [get(names::CIDR6_0)?, get(names::CIDR6_1)?],
            },
            ctrl,
            entries: [0, 0],
            capacity,
        })
    }

    pub fn control(&self) -> Control {
        self.ctrl.read()
    }
    /// The datapath settings of this pin directory (policy, replies, events,
    /// flow timeouts).
    pub fn settings(&self) -> Settings {
        self.ctrl.settings()
    }
    /// Change them: each word with one atomic store, live at once on every
    /// interface of the directory.
    pub fn set_settings(&self, s: &Settings) {
        self.ctrl.set_settings(s)
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

    /// Count and checksum of everything visible at `generation`, from a full
    /// read-back, without building the set.
    pub fn digest_at(&self, generation: u64) -> Result<Digest, StoreError> {
        let mut d = Digest::default();
        for (_, a, v) in self.v4.entries() {
            if v.visible_at(generation) {
                d.add_hash(crate::peers::exact_hash_v4(a, v.origin));
            }
        }
        for (_, a, v) in self.v6.entries() {
            if v.visible_at(generation) {
                d.add_hash(crate::peers::exact_hash_v6(a, v.origin));
            }
        }
        for (n, o) in self.cidrs.dump((generation & 1) as usize)? {
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

    /// The datapath's hit counters of these exact peers, read in place
    /// (one probe each; CIDR entries and absent peers are left out), for the
    /// controller's liveness rule: the version visible now (there is one).
    pub fn hits_of(&self, peers: &[IpNet]) -> Vec<(IpNet, u64)> {
        let generation = self.ctrl.read().committed_gen;
        peers
            .iter()
            .filter_map(|n| {
                let hits = match n {
                    IpNet::V4(p) if p.prefix_len() == 32 => {
                        self.v4.hits_visible(&v4_addr(n), generation)
                    }
                    IpNet::V6(p) if p.prefix_len() == 128 => {
                        self.v6.hits_visible(&v6_addr(n), generation)
                    }
                    // CIDR entries have no counter.
                    _ => None,
                }?;
                Some((*n, hits))
            })
            .collect()
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
        for (n, o) in self.cidrs.dump((generation & 1) as usize)? {
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
        set.extend(self.cidrs.dump((generation & 1) as usize)?);
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
        // Each table's additions, counted by region of the table: the count
        // refuses a full table before any write, and the regions size the
        // buffers that order a large staging (see `Adds::stage`).
        let v4 = Adds::new(&self.v4, changes, |n| match n {
            IpNet::V4(a) if a.prefix_len() == 32 => Some(a.addr().octets()),
            _ => None,
        });
        let v6 = Adds::new(&self.v6, changes, |n| match n {
            IpNet::V6(a) if a.prefix_len() == 128 => Some(a.addr().octets()),
            _ => None,
        });
        let adds = [v4.total as u64, v6.total as u64];
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
        self.entries[0] += v4.stage(&self.v4, changes, generation)?;
        self.entries[1] += v6.stage(&self.v6, changes, generation)?;
        self.cidrs
            .write((generation & 1) as usize, cidrs, &self.ctrl)
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
        let back = self.cidrs.dump((generation & 1) as usize)?;
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

/// One table's share of a commit's additions, counted per region of the
/// table: 64 regions by the top bits of the home bucket.
struct Adds<F: Family, P> {
    pick: P,
    total: usize,
    /// Additions per region.
    per_region: [usize; REGIONS],
    _f: std::marker::PhantomData<F>,
}

/// Regions a large staging is ordered by: 64 sequential write streams, each
/// region of a 1M-peer table (1.6 MB) within this machine's 2 MB L2.
const REGIONS: usize = 64;

impl<F: Family, P: Fn(&IpNet) -> Option<F::Addr>> Adds<F, P> {
    fn region(t: &Table<F>, home: u32) -> usize {
        let bits = t.buckets().trailing_zeros();
        (home >> bits.saturating_sub(REGIONS.trailing_zeros())) as usize
    }

    fn new(t: &Table<F>, changes: &Changes, pick: P) -> Self {
        let mut per_region = [0usize; REGIONS];
        let mut total = 0;
        for a in changes.add.iter().filter_map(|(n, _)| pick(n)) {
            per_region[Self::region(t, t.home(&a))] += 1;
            total += 1;
        }
        Adds {
            pick,
            total,
            per_region,
            _f: std::marker::PhantomData,
        }
    }

    /// Stage them. Returns how many slots they took.
    fn stage(&self, t: &Table<F>, changes: &Changes, generation: u64) -> Result<u64, StoreError> {
        let mine = changes
            .add
            .iter()
            .filter_map(|(n, o)| Some(((self.pick)(n)?, *o)));
        let stage = |home: u32, a: F::Addr, o: crate::peers::Origin| {
            t.stage_add_at(home, a, super::table::staged(generation, o), generation - 1)
        };
        if self.total <= 4096 {
            for (a, o) in mine {
                stage(t.home(&a), a, o)?;
            }
            return Ok(self.total as u64);
        }
        // Many additions go in table order, roughly: a full sync then works
        // through the table one region at a time, and the region stays in
        // cache, where scattered over the whole table every entry missed it
        // (1M peers: 190 ms). One vector per region, each sized exactly and
        // filled straight from the change list: no intermediate copy of the
        // additions (at 1M, 20 MB of fresh pages under the daemon's
        // allocator setting). Each address is hashed here a second time
        // (after the count); its home then travels with it to `place`, which
        // used to hash it twice more. Keeping the homes from the count would
        // need a 4 MB buffer at 1M to save four multiplies per address.
        let mut regions: Vec<Vec<(u32, F::Addr, crate::peers::Origin)>> = self
            .per_region
            .iter()
            .map(|&n| Vec::with_capacity(n))
            .collect();
        for (a, o) in mine {
            let home = t.home(&a);
            regions[Self::region(t, home)].push((home, a, o));
        }
        for region in regions {
            for (home, a, o) in region {
                stage(home, a, o)?;
            }
        }
        Ok(self.total as u64)
    }
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
