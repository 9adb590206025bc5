//! The exact-peer tables, `PEERS_V4` and `PEERS_V6`, as userspace writes them:
//! bucketed hash tables in `BPF_F_MMAPABLE` arrays, written in place through
//! a shared mapping while the datapath reads them.
//!
//! Hand-written because no crate does this: it is a layout shared with the
//! XDP program (see `firewall_common::Bucket4`), not a general-purpose table.
//!
//! # The slot protocol
//!
//! One writer (the commit lock holder) and any number of packets reading. A
//! slot is visible to a packet iff `added_gen <= committed < removed_gen`, and
//! a packet reads `committed` before any bucket. Every write below keeps each
//! intermediate state of a slot invisible to every packet, or leaves its
//! visibility unchanged:
//!
//! - **insert** at staged generation S = committed + 1, into an empty slot
//!   (`removed_gen == 0`, so invisible): `added_gen = S`, origin, hits, the
//!   address, and last `removed_gen = GEN_NEVER`. Until the flip, S is above
//!   every committed value a packet can hold, so the slot stays invisible
//!   however the stores interleave with a packet's loads.
//! - **mark removed**: one aligned 8-byte store of `removed_gen = S`, which
//!   takes effect at the flip like everything else staged.
//! - **free** a slot that no packet can see any more (removed at or before the
//!   committed generation, or staged and abandoned): `removed_gen = 0` first,
//!   then the rest.
//!
//! Stores are `Release` and x86-64 keeps stores in order and loads in order,
//! which is what the datapath's word-at-a-time reads rely on.
//!
//! Entries whose home bucket is full go to one of the next `MAX_PROBE - 1`
//! buckets; every bucket passed over counts it in `spill`, which is raised
//! before the entry is written and lowered after it is freed, so a packet's
//! lookup never stops short of a visible entry. A crash between the two can
//! only leave a count too high (a longer scan, never a missed peer), and
//! [`Table::repair_spill`] recomputes them all on every adoption.

use std::{
    io,
    marker::PhantomData,
    os::fd::BorrowedFd,
    sync::atomic::{
        AtomicU32, AtomicU64,
        Ordering::{Acquire, Release},
    },
};

use firewall_common::{
    Bucket4, Bucket6, GEN_NEVER, MAX_PROBE, PEERS_PER_BUCKET, PeerVal, SLOTS, hash4, hash6, names,
    words6,
};

/// What differs between the IPv4 and IPv6 tables.
pub trait Family {
    type Bucket: Copy;
    type Addr: Copy + Eq + Default + std::fmt::Debug;
    const MAP: &'static str;
    fn hash(a: &Self::Addr, seed: &[u64; 4]) -> u32;
    /// # Safety
    /// `b` points to a live bucket.
    unsafe fn addr(b: *mut Self::Bucket, i: usize) -> *mut Self::Addr;
    /// # Safety
    /// `b` points to a live bucket.
    unsafe fn spill(b: *mut Self::Bucket) -> *mut u32;
    /// # Safety
    /// `b` points to a live bucket.
    unsafe fn peer(b: *mut Self::Bucket, i: usize) -> *mut PeerVal;
    /// Store an address word by word.
    /// # Safety
    /// `p` points to a slot's address in a live bucket.
    unsafe fn store_addr(p: *mut Self::Addr, a: Self::Addr);
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Bucket = Bucket4;
    type Addr = [u8; 4];
    const MAP: &'static str = names::PEERS_V4;
    fn hash(a: &[u8; 4], seed: &[u64; 4]) -> u32 {
        hash4(u32::from_ne_bytes(*a), seed)
    }
    unsafe fn addr(b: *mut Bucket4, i: usize) -> *mut [u8; 4] {
        // SAFETY: the caller passes a live bucket and i < SLOTS; this only
        // computes a field address, no reference is made.
        unsafe { std::ptr::addr_of_mut!((*b).addr[i]) }
    }
    unsafe fn spill(b: *mut Bucket4) -> *mut u32 {
        // SAFETY: as in addr().
        unsafe { std::ptr::addr_of_mut!((*b).spill) }
    }
    unsafe fn peer(b: *mut Bucket4, i: usize) -> *mut PeerVal {
        // SAFETY: as in addr().
        unsafe { std::ptr::addr_of_mut!((*b).peer[i]) }
    }
    unsafe fn store_addr(p: *mut [u8; 4], a: [u8; 4]) {
        // SAFETY: addr[i] sits at a 4-aligned offset of an 8-aligned bucket.
        unsafe { AtomicU32::from_ptr(p.cast()) }.store(u32::from_ne_bytes(a), Release);
    }
}

impl Family for V6 {
    type Bucket = Bucket6;
    type Addr = [u8; 16];
    const MAP: &'static str = names::PEERS_V6;
    fn hash(a: &[u8; 16], seed: &[u64; 4]) -> u32 {
        hash6(words6(a), seed)
    }
    unsafe fn addr(b: *mut Bucket6, i: usize) -> *mut [u8; 16] {
        // SAFETY: the caller passes a live bucket and i < SLOTS; this only
        // computes a field address, no reference is made.
        unsafe { std::ptr::addr_of_mut!((*b).addr[i]) }
    }
    unsafe fn spill(b: *mut Bucket6) -> *mut u32 {
        // SAFETY: as in addr().
        unsafe { std::ptr::addr_of_mut!((*b).spill) }
    }
    unsafe fn peer(b: *mut Bucket6, i: usize) -> *mut PeerVal {
        // SAFETY: as in addr().
        unsafe { std::ptr::addr_of_mut!((*b).peer[i]) }
    }
    unsafe fn store_addr(p: *mut [u8; 16], a: [u8; 16]) {
        let w: *mut u64 = p.cast();
        let hi = u64::from_ne_bytes(a[..8].try_into().expect("8 bytes"));
        let lo = u64::from_ne_bytes(a[8..].try_into().expect("8 bytes"));
        // SAFETY: addr[i] sits at a 16-byte offset of an 8-aligned bucket.
        unsafe {
            AtomicU64::from_ptr(w).store(hi, Release);
            AtomicU64::from_ptr(w.add(1)).store(lo, Release);
        }
    }
}

/// Where an entry lives.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub bucket: u32,
    pub index: usize,
}

/// No empty slot within `MAX_PROBE` buckets of the address's home.
pub use firewall_controller::store::NoSlot;

/// One mmapped table.
pub struct Table<F: Family> {
    map: crate::sys::Mmap,
    buckets: u32,
    seed: [u64; 4],
    _f: PhantomData<F>,
}

// SAFETY: the mapping is plain shared memory; all writes go through atomics.
unsafe impl<F: Family> Send for Table<F> {}

impl<F: Family> Table<F> {
    /// Map the table behind `fd`, an MMAPABLE array of `buckets` buckets
    /// (a power of two; the caller checked the map's shape), hashed with `seed`.
    pub fn mmap(fd: BorrowedFd<'_>, buckets: u32, seed: [u64; 4]) -> io::Result<Self> {
        assert!(buckets.is_power_of_two(), "bucket count is a power of two");
        let map = crate::sys::Mmap::shared(Some(fd), buckets as usize * size_of::<F::Bucket>())?;
        Ok(Table {
            map,
            buckets,
            seed,
            _f: PhantomData,
        })
    }

    /// A table in anonymous memory, laid out like the kernel's: for tests
    /// without the kernel, and for the benchmark floor's bucket placement.
    pub fn in_memory(buckets: u32, seed: [u64; 4]) -> io::Result<Self> {
        assert!(buckets.is_power_of_two(), "bucket count is a power of two");
        // Anonymous memory comes zeroed, like a new BPF array.
        let map = crate::sys::Mmap::shared(None, buckets as usize * size_of::<F::Bucket>())?;
        Ok(Table {
            map,
            buckets,
            seed,
            _f: PhantomData,
        })
    }

    /// Copies of the buckets holding at least one entry, with their indices.
    pub fn used_buckets(&self) -> (Vec<u32>, Vec<F::Bucket>) {
        (0..self.buckets)
            .filter(|&bucket| (0..SLOTS).any(|index| self.removed_gen(Slot { bucket, index }) != 0))
            // SAFETY: a live bucket of plain integers; no writer runs meanwhile
            // in the callers (a torn copy would only misreport a benchmark).
            .map(|b| (b, unsafe { std::ptr::read_volatile(self.bucket(b)) }))
            .unzip()
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Entries the table takes at most: half its slots, which keeps the
    /// chance of a full probe window negligible.
    pub fn capacity(&self) -> u64 {
        self.buckets as u64 * PEERS_PER_BUCKET as u64
    }

    fn probe_len(&self) -> u32 {
        MAX_PROBE.min(self.buckets)
    }

    fn bucket(&self, b: u32) -> *mut F::Bucket {
        debug_assert!(b < self.buckets);
        // SAFETY: b < buckets, inside the mapping.
        unsafe { self.map.ptr::<F::Bucket>().as_ptr().add(b as usize) }
    }

    fn read_slot(&self, s: Slot) -> (F::Addr, PeerVal) {
        let b = self.bucket(s.bucket);
        // SAFETY: a live bucket of the mapping; plain integers, read while
        // the datapath may bump `hits` (a torn count is harmless).
        unsafe {
            (
                std::ptr::read_volatile(F::addr(b, s.index)),
                std::ptr::read_volatile(F::peer(b, s.index)),
            )
        }
    }

    fn spill_of(&self, b: u32) -> &AtomicU32 {
        // SAFETY: spill is an aligned u32 of a live bucket.
        unsafe { AtomicU32::from_ptr(F::spill(self.bucket(b))) }
    }

    /// One u64 field of a slot's `PeerVal`, as an atomic.
    fn word(&self, s: Slot, field: impl FnOnce(*mut PeerVal) -> *mut u64) -> &AtomicU64 {
        // SAFETY: the fields of PeerVal are aligned u64s of a live slot.
        unsafe { AtomicU64::from_ptr(field(F::peer(self.bucket(s.bucket), s.index))) }
    }

    fn removed_word(&self, s: Slot) -> &AtomicU64 {
        // SAFETY: `word` passes a pointer to a live PeerVal; a field address only.
        self.word(s, |p| unsafe { std::ptr::addr_of_mut!((*p).removed_gen) })
    }
    fn added_word(&self, s: Slot) -> &AtomicU64 {
        // SAFETY: as in removed_word().
        self.word(s, |p| unsafe { std::ptr::addr_of_mut!((*p).added_gen) })
    }
    fn hits_word(&self, s: Slot) -> &AtomicU64 {
        // SAFETY: as in removed_word().
        self.word(s, |p| unsafe { std::ptr::addr_of_mut!((*p).hits) })
    }
    fn origin_word(&self, s: Slot) -> &AtomicU32 {
        // SAFETY: origin is an aligned u32 of a live slot's PeerVal.
        unsafe {
            AtomicU32::from_ptr(std::ptr::addr_of_mut!(
                (*F::peer(self.bucket(s.bucket), s.index)).origin
            ))
        }
    }
    fn store_addr(&self, s: Slot, a: F::Addr) {
        // SAFETY: a slot's address in a live bucket.
        unsafe { F::store_addr(F::addr(self.bucket(s.bucket), s.index), a) }
    }

    /// The bucket an address hashes to.
    pub fn home(&self, a: &F::Addr) -> u32 {
        F::hash(a, &self.seed) & (self.buckets - 1)
    }

    /// Every non-empty slot holding `a` (at most a few: an entry and the
    /// version that replaces it, or one waiting to be freed).
    pub fn find(&self, a: &F::Addr) -> Vec<(Slot, PeerVal)> {
        let mut out = Vec::new();
        let mut b = self.home(a);
        for _ in 0..self.probe_len() {
            for index in 0..SLOTS {
                let s = Slot { bucket: b, index };
                if self.removed_gen(s) != 0 && self.addr_at(s) == *a {
                    out.push((s, self.read_slot(s).1));
                }
            }
            if self.spill_of(b).load(Acquire) == 0 {
                break;
            }
            b = (b + 1) & (self.buckets - 1);
        }
        out
    }

    /// The hit counter of `a`'s version visible at `generation`, if any:
    /// the liveness read. One probe, four word loads per candidate slot, no
    /// allocation (`find` copies every version out, which at 1M lookups was
    /// most of a 300 ms read).
    pub fn hits_visible(&self, a: &F::Addr, generation: u64) -> Option<u64> {
        let mut b = self.home(a);
        for _ in 0..self.probe_len() {
            for index in 0..SLOTS {
                let s = Slot { bucket: b, index };
                let removed = self.removed_gen(s);
                if removed == 0 || generation >= removed {
                    continue;
                }
                if self.added_word(s).load(Acquire) <= generation && self.addr_at(s) == *a {
                    return Some(self.hits_word(s).load(Acquire));
                }
            }
            if self.spill_of(b).load(Acquire) == 0 {
                break;
            }
            b = (b + 1) & (self.buckets - 1);
        }
        None
    }

    /// A slot's removal generation alone (0: empty), without reading the rest.
    fn removed_gen(&self, s: Slot) -> u64 {
        self.removed_word(s).load(Acquire)
    }

    fn addr_at(&self, s: Slot) -> F::Addr {
        // SAFETY: a slot's address in a live bucket.
        unsafe { std::ptr::read_volatile(F::addr(self.bucket(s.bucket), s.index)) }
    }

    /// Stage `a` for generation `v.added_gen`: every version of it that is
    /// live at `committed` (an origin change) is marked removed at that
    /// generation, and `v` goes into the first empty slot, all in one pass
    /// over the probe window. Without a free slot nothing is written.
    pub fn stage_add(&self, a: F::Addr, v: PeerVal, committed: u64) -> Result<Slot, NoSlot> {
        self.place(self.home(&a), a, v, Some(committed))
    }

    /// [`Table::stage_add`] with the home bucket already computed (a full
    /// sync hashes each address once, to order the additions).
    pub fn stage_add_at(
        &self,
        home: u32,
        a: F::Addr,
        v: PeerVal,
        committed: u64,
    ) -> Result<Slot, NoSlot> {
        debug_assert_eq!(home, self.home(&a));
        self.place(home, a, v, Some(committed))
    }

    /// Write `v` for `a` into the first empty slot of its probe window,
    /// leaving any other version alone (test and benchmark set-up).
    pub fn insert(&self, a: F::Addr, v: PeerVal) -> Result<Slot, NoSlot> {
        self.place(self.home(&a), a, v, None)
    }

    /// `v.removed_gen` must not be 0, and `v` must be invisible at the
    /// committed generation (staged): see the module's protocol.
    fn place(
        &self,
        home: u32,
        a: F::Addr,
        v: PeerVal,
        replace_live_at: Option<u64>,
    ) -> Result<Slot, NoSlot> {
        let mut first_empty = None;
        let mut old = Vec::new();
        let mut b = home;
        for dist in 0..self.probe_len() {
            for index in 0..SLOTS {
                let s = Slot { bucket: b, index };
                let removed = self.removed_gen(s);
                if removed == 0 {
                    first_empty.get_or_insert((dist, s));
                } else if let Some(c) = replace_live_at
                    && removed == GEN_NEVER
                    && self.addr_at(s) == a
                    && self.read_slot(s).1.visible_at(c)
                {
                    old.push(s);
                }
            }
            // No version lives past a bucket with no spill; stop once a
            // free slot is known too.
            if first_empty.is_some() && self.spill_of(b).load(Acquire) == 0 {
                break;
            }
            b = (b + 1) & (self.buckets - 1);
        }
        let Some((dist, s)) = first_empty else {
            return Err(NoSlot {
                map: F::MAP,
                addr: format!("{a:?}"),
                probe: self.probe_len(),
            });
        };
        for d in 0..dist {
            self.spill_of((home + d) & (self.buckets - 1))
                .fetch_add(1, Release);
        }
        self.added_word(s).store(v.added_gen, Release);
        self.hits_word(s).store(v.hits, Release);
        self.origin_word(s).store(v.origin, Release);
        self.store_addr(s, a);
        // Last: until now the slot was empty, so invisible.
        self.removed_word(s).store(v.removed_gen, Release);
        for o in old {
            self.set_removed(o, v.added_gen);
        }
        Ok(s)
    }

    /// Set a slot's `removed_gen` with one store: the staging of a removal,
    /// or (with `GEN_NEVER`) undoing a half-staged one.
    pub fn set_removed(&self, s: Slot, generation: u64) {
        self.removed_word(s).store(generation, Release);
    }

    /// Empty a slot that no packet can see (the caller checked), and lower
    /// the spill counts its entry had raised.
    pub fn free(&self, s: Slot) {
        let addr = self.addr_at(s);
        // removed_gen = 0 marks it empty first.
        self.removed_word(s).store(0, Release);
        self.added_word(s).store(0, Release);
        self.hits_word(s).store(0, Release);
        self.origin_word(s).store(0, Release);
        self.store_addr(s, F::Addr::default());
        let home = self.home(&addr);
        let dist = s.bucket.wrapping_sub(home) & (self.buckets - 1);
        for d in 0..dist {
            let sp = self.spill_of((home + d) & (self.buckets - 1));
            // Saturating: a count a crash left too low would be a bug, but
            // wrapping it would make a lookup scan to its bound forever.
            let _ = sp.fetch_update(Release, Acquire, |x| Some(x.saturating_sub(1)));
        }
    }

    /// Every non-empty slot, in table order.
    pub fn entries(&self) -> impl Iterator<Item = (Slot, F::Addr, PeerVal)> + '_ {
        (0..self.buckets).flat_map(move |bucket| {
            (0..SLOTS).filter_map(move |index| {
                let s = Slot { bucket, index };
                // Empty slots (half of a full table) cost one load.
                if self.removed_gen(s) == 0 {
                    return None;
                }
                let (a, v) = self.read_slot(s);
                Some((s, a, v))
            })
        })
    }

    /// Recompute every bucket's spill count from the entries present, fixing
    /// counts that a crash between a count and its entry left too high.
    /// Raises before it lowers, so no lookup can stop short meanwhile.
    /// Returns how many buckets it corrected.
    pub fn repair_spill(&self) -> u64 {
        let mut want = vec![0u32; self.buckets as usize];
        for (s, a, _) in self.entries() {
            let home = self.home(&a);
            let dist = s.bucket.wrapping_sub(home) & (self.buckets - 1);
            for d in 0..dist {
                want[((home + d) & (self.buckets - 1)) as usize] += 1;
            }
        }
        let mut fixed = 0;
        for raise in [true, false] {
            for (b, w) in want.iter().enumerate() {
                let sp = self.spill_of(b as u32);
                let cur = sp.load(Acquire);
                if (raise && cur < *w) || (!raise && cur > *w) {
                    sp.store(*w, Release);
                    fixed += 1;
                }
            }
        }
        fixed
    }
}

/// A fresh staged value: visible from `generation` on, once flipped.
pub fn staged(generation: u64, origin: u32) -> PeerVal {
    PeerVal {
        added_gen: generation,
        removed_gen: GEN_NEVER,
        hits: 0,
        origin,
        hit_tick: 0,
    }
}

/// Bucket count for a requested peer capacity: half-full at capacity,
/// a power of two, at least one.
pub fn buckets_for(max_peers: u32) -> u32 {
    max_peers
        .div_ceil(PEERS_PER_BUCKET)
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl<F: Family> Table<F> {
        /// The XDP program's lookup, step for step: scan the home bucket,
        /// follow `spill`, stop at the first visible match.
        fn datapath_lookup(&self, a: &F::Addr, committed: u64) -> bool {
            let mut b = self.home(a);
            for _ in 0..MAX_PROBE {
                for index in 0..SLOTS {
                    let (k, v) = self.read_slot(Slot { bucket: b, index });
                    if k == *a && v.visible_at(committed) {
                        return true;
                    }
                }
                if self.spill_of(b).load(Acquire) == 0 {
                    return false;
                }
                b = (b + 1) & (self.buckets - 1);
            }
            false
        }
    }

    const SEED: [u64; 4] = [0x9e37_79b9_7f4a_7c15, 3, 5, 7];

    #[derive(Clone, Debug)]
    enum Op {
        /// Stage an address at generation 1 (over committed 0) or 2 (over 1).
        Add(u8, bool),
        Remove(u8),
        Free(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        // A pool of 40 addresses into 4 buckets of 8: home buckets overflow
        // and probing, spill counts and wrap-around all get exercised.
        prop_oneof![
            3 => (0u8..40, any::<bool>()).prop_map(|(i, g)| Op::Add(i, g)),
            1 => (0u8..40).prop_map(Op::Remove),
            1 => (0u8..40).prop_map(Op::Free),
        ]
    }

    proptest! {
        #[test]
        fn table_matches_a_model_and_the_datapath_finds_every_entry(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            let t: Table<V4> = Table::in_memory(4, SEED).unwrap();
            let addr = |i: u8| [198, 18, 7, i];
            // Model: every version of every address, as (slot, value).
            let mut model: std::collections::BTreeMap<u8, Vec<(Slot, PeerVal)>> = Default::default();
            for op in ops {
                match op {
                    Op::Add(i, second) => {
                        let (generation, committed) = if second { (2, 1) } else { (1, 0) };
                        let used: usize = model.values().map(Vec::len).sum();
                        match t.stage_add(addr(i), staged(generation, 2), committed) {
                            Ok(s) => {
                                let vs = model.entry(i).or_default();
                                for (_, v) in vs.iter_mut() {
                                    if v.visible_at(committed) && v.removed_gen == GEN_NEVER {
                                        v.removed_gen = generation;
                                    }
                                }
                                vs.push((s, staged(generation, 2)));
                            }
                            Err(_) => prop_assert!(used >= 3 * SLOTS, "NoSlot with {used} slots used"),
                        }
                    }
                    Op::Remove(i) => for (s, v) in model.entry(i).or_default() {
                        if v.removed_gen == GEN_NEVER {
                            t.set_removed(*s, 2);
                            v.removed_gen = 2;
                        }
                    },
                    Op::Free(i) => for (s, _) in model.remove(&i).unwrap_or_default() {
                        t.free(s);
                    },
                }
                prop_assert_eq!(t.repair_spill(), 0, "spill counts drifted");
                for i in 0..40u8 {
                    let mut found: Vec<_> = t.find(&addr(i)).into_iter().map(|(s, v)| (s, v.removed_gen, v.added_gen)).collect();
                    let mut want: Vec<_> = model.get(&i).into_iter().flatten().map(|(s, v)| (*s, v.removed_gen, v.added_gen)).collect();
                    found.sort();
                    want.sort();
                    prop_assert_eq!(&found, &want, "find({})", i);
                    for c in [1, 2] {
                        let visible = model.get(&i).into_iter().flatten().any(|(_, v)| v.visible_at(c));
                        prop_assert_eq!(t.datapath_lookup(&addr(i), c), visible, "lookup({}) at {}", i, c);
                    }
                }
            }
        }
    }

    #[test]
    fn a_full_probe_window_is_refused_not_overwritten() {
        let t: Table<V6> = Table::in_memory(1, SEED).unwrap();
        for i in 0..SLOTS as u8 {
            let mut a = [0u8; 16];
            a[15] = i + 1;
            t.insert(a, staged(1, 2)).unwrap();
        }
        let err = t.insert([9; 16], staged(1, 2)).unwrap_err();
        assert!(err.to_string().contains("--max-peers"), "{err}");
        assert_eq!(t.entries().count(), SLOTS);
    }

    #[test]
    fn repair_lowers_counts_a_crash_left_too_high() {
        let t: Table<V4> = Table::in_memory(4, SEED).unwrap();
        t.spill_of(2).store(5, Release);
        assert_eq!(t.repair_spill(), 1);
        assert_eq!(t.repair_spill(), 0);
    }

    #[test]
    fn bucket_count_halves_the_load_and_rounds_up() {
        assert_eq!(buckets_for(1), 1);
        assert_eq!(buckets_for(4), 1);
        assert_eq!(buckets_for(5), 2);
        assert_eq!(buckets_for(65_536), 16_384);
        assert_eq!(buckets_for(4_194_304), 1 << 20);
    }
}
