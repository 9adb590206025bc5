//! Where committed generations live: the pinned kernel maps in production
//! (`firewall_ctl::kernel::KernelStore`), or `MemStore` (feature `testing`),
//! an in-memory model of the same maps with fault injection for the
//! simulator and unit tests.
//!
//! Both follow the same protocol, and [`crate::commit`] is the only code that
//! drives it: `stage` (entries for generation G+1, invisible at G), `verify`
//! (read back), `flip` (one write makes G+1 visible), `gc` (drop what G+1
//! removed). A crash anywhere before the flip leaves generation G in force;
//! `cleanup` removes the half-staged leftovers.

use ipnet::IpNet;

use crate::peers::{Changes, Digest, Origin, PeerSet, is_exact};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "map `{map}` is full: the commit needs {needed} entries but it holds {capacity}; nothing was committed. Re-attach with a larger `--max-peers`, or shrink the peer set"
    )]
    MapFull {
        map: &'static str,
        capacity: u64,
        needed: u64,
    },
    #[error("{op} on map `{map}` failed")]
    Io {
        op: &'static str,
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("verification of generation {generation} failed: {what}; nothing was committed")]
    Verify { generation: u64, what: String },
    #[error(
        "the datapath state is not what this commit started from (committed generation is {found}, expected {expected}); another writer is active, retry"
    )]
    Conflict { expected: u64, found: u64 },
    #[error(transparent)]
    NoSlot(#[from] NoSlot),
    #[error("injected fault: {0}")]
    Injected(&'static str),
}

/// An exact entry found no free slot near its home bucket.
#[derive(Debug, thiserror::Error)]
#[error(
    "no free slot for {addr} within {probe} buckets of its home bucket in `{map}`; nothing was committed. Re-attach with a larger `--max-peers` (after `detach --purge`)"
)]
pub struct NoSlot {
    pub map: &'static str,
    pub addr: String,
    pub probe: u32,
}

/// What a store holds right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub generation: u64,
    /// Entries visible at `generation`.
    pub set: PeerSet,
    /// Entries that a crashed commit left behind: staged but never flipped, or
    /// removed but not yet collected. `cleanup` deals with them.
    pub leftovers: u64,
}

pub trait PeerStore {
    /// Read the committed generation and its set.
    fn load(&mut self) -> Result<Loaded, StoreError>;
    /// Remove half-staged entries and collect removed ones, keeping exactly what
    /// the committed generation shows. Returns the number of entries touched.
    fn cleanup(&mut self) -> Result<u64, StoreError>;
    /// Write generation `generation`: `changes` to the exact entries, and the
    /// whole CIDR set `cidrs` into the standby CIDR slot. Nothing becomes visible.
    fn stage(
        &mut self,
        generation: u64,
        changes: &Changes,
        cidrs: &PeerSet,
    ) -> Result<(), StoreError>;
    /// Read back what `stage` wrote and check it against `changes`/`cidrs` and
    /// the expected digest of the whole generation.
    fn verify(
        &mut self,
        generation: u64,
        changes: &Changes,
        cidrs: &PeerSet,
        expected: Digest,
    ) -> Result<(), StoreError>;
    /// Make `generation` the committed one with a single write.
    fn flip(&mut self, generation: u64, digest: Digest) -> Result<(), StoreError>;
    /// Delete the entries `generation` removed.
    fn gc(&mut self, generation: u64, removed: &[IpNet]) -> Result<(), StoreError>;
}

/// "Not removed": the datapath's `removed_gen` of a live entry.
const NEVER: u64 = firewall_common::GEN_NEVER;

/// One stored version of an exact entry: `(added_gen, removed_gen, origin)`.
pub type Version = (u64, u64, Origin);

/// The per-entry half of `verify`, shared by both stores so the simulator
/// exercises exactly the rule the kernel store applies: at `generation`, an
/// added exact entry shows exactly one version, the one staged for it with its
/// origin; a removed one shows none. `get` returns every stored version of an
/// address (an origin change keeps the old version until it is collected).
pub fn check_staged(
    generation: u64,
    changes: &Changes,
    mut get: impl FnMut(&IpNet) -> Result<Vec<Version>, StoreError>,
) -> Result<(), StoreError> {
    let fail = |what: String| Err(StoreError::Verify { generation, what });
    let visible = |v: &&Version| v.0 <= generation && generation < v.1;
    for (n, o) in changes.add.iter().filter(|(n, _)| is_exact(n)) {
        let versions = get(n)?;
        let seen: Vec<&Version> = versions.iter().filter(visible).collect();
        if seen != [&(generation, NEVER, *o)] {
            return fail(format!(
                "{n} reads back as {versions:?} (added, removed, origin)"
            ));
        }
    }
    for n in changes.remove.iter().filter(|n| is_exact(n)) {
        if get(n)?.iter().any(|v| visible(&v)) {
            return fail(format!(
                "{n} is not marked removed at generation {generation}"
            ));
        }
    }
    Ok(())
}

/// The in-memory datapath model: only for tests and the simulator (feature
/// `testing`), so production builds cannot reach its fault knobs.
#[cfg(any(test, feature = "testing"))]
mod mem {
    use std::collections::BTreeMap;

    use super::*;

    /// One version of an exact entry in the in-memory model, as a kernel slot holds it.
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    pub struct MemEntry {
        pub added: u64,
        pub removed: u64,
        pub origin: Origin,
    }

    impl MemEntry {
        /// The datapath's visibility rule, as `PeerVal::visible_at` states it.
        pub fn visible_at(&self, committed: u64) -> bool {
            self.added <= committed && committed < self.removed
        }
    }

    /// Operations a [`MemStore`] can be told to fail.
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    pub enum FaultPoint {
        /// Fail after this many entry writes within `stage` (a partial stage).
        StageAfter(usize),
        Verify,
        Flip,
        Gc,
    }

    /// An in-memory model of the pinned maps. Writes happen one entry at a time,
    /// so an injected fault in the middle of `stage` leaves a partial stage behind,
    /// as a real crash would.
    #[derive(Clone, Debug, Default)]
    pub struct MemStore {
        pub committed: u64,
        /// Every stored version per address, like the kernel tables' slots: an
        /// origin change adds a version and marks the old one removed.
        pub exact: BTreeMap<IpNet, Vec<MemEntry>>,
        /// CIDR slots; `committed & 1` is live.
        pub cidr_slots: [PeerSet; 2],
        pub capacity: usize,
        pub fault: Option<FaultPoint>,
        /// When set, the injected fault is a crash: the process "dies" at that
        /// point, so no cleanup runs and every later call fails until `revive`.
        pub crash: bool,
        pub dead: bool,
        /// Counts every write, for tests that want to see that nothing was touched.
        pub writes: u64,
    }

    impl MemStore {
        pub fn new(capacity: usize) -> Self {
            MemStore {
                capacity,
                ..Default::default()
            }
        }

        /// What a packet sees right now: the datapath's view.
        pub fn visible(&self) -> PeerSet {
            let c = self.committed;
            let mut out: PeerSet = self
                .exact
                .iter()
                .flat_map(|(n, vs)| vs.iter().map(move |e| (n, e)))
                .filter(|(_, e)| e.visible_at(c))
                .map(|(n, e)| (*n, e.origin))
                .collect();
            out.extend(
                self.cidr_slots[(self.committed & 1) as usize]
                    .iter()
                    .map(|(n, o)| (*n, *o)),
            );
            out
        }

        pub fn revive(&mut self) {
            self.dead = false;
            self.crash = false;
            self.fault = None;
        }

        fn alive(&self) -> Result<(), StoreError> {
            if self.dead {
                Err(StoreError::Injected("the process is dead"))
            } else {
                Ok(())
            }
        }

        fn take_fault(&mut self, p: FaultPoint) -> Result<(), StoreError> {
            self.alive()?;
            if self.fault == Some(p) {
                self.fault = None;
                self.dead = self.crash;
                return Err(StoreError::Injected(match p {
                    FaultPoint::StageAfter(_) => "stage",
                    FaultPoint::Verify => "verify",
                    FaultPoint::Flip => "flip",
                    FaultPoint::Gc => "gc",
                }));
            }
            Ok(())
        }
    }

    impl PeerStore for MemStore {
        fn load(&mut self) -> Result<Loaded, StoreError> {
            self.alive()?;
            let c = self.committed;
            let leftovers = self
                .exact
                .values()
                .flatten()
                // Anything but a plain visible entry: staged, marked, or removed.
                .filter(|e| !(e.added <= c && e.removed == NEVER))
                .count() as u64;
            Ok(Loaded {
                generation: c,
                set: self.visible(),
                leftovers,
            })
        }

        fn cleanup(&mut self) -> Result<u64, StoreError> {
            self.alive()?;
            let c = self.committed;
            let mut touched = 0;
            for vs in self.exact.values_mut() {
                let before = vs.len();
                vs.retain(|e| e.visible_at(c));
                touched += (before - vs.len()) as u64;
                for e in vs.iter_mut() {
                    if e.removed != NEVER {
                        e.removed = NEVER;
                        touched += 1;
                    }
                }
            }
            self.exact.retain(|_, vs| !vs.is_empty());
            self.writes += touched;
            Ok(touched)
        }

        fn stage(
            &mut self,
            generation: u64,
            changes: &Changes,
            cidrs: &PeerSet,
        ) -> Result<(), StoreError> {
            self.alive()?;
            // Every exact add takes a new slot (an origin change too, until the
            // old version is collected), as in the kernel tables.
            let adds = changes.add.iter().filter(|(n, _)| is_exact(n)).count();
            let used: usize = self.exact.values().map(Vec::len).sum();
            if used + adds > self.capacity {
                return Err(StoreError::MapFull {
                    map: "PEERS",
                    capacity: self.capacity as u64,
                    needed: (used + adds) as u64,
                });
            }
            let c = self.committed;
            let budget = match self.fault {
                Some(FaultPoint::StageAfter(n)) => Some(n),
                _ => None,
            };
            let mut written = 0usize;
            let mut tick = |s: &mut Self| -> Result<(), StoreError> {
                if budget == Some(written) {
                    s.fault = None;
                    s.dead = s.crash;
                    return Err(StoreError::Injected("stage"));
                }
                written += 1;
                s.writes += 1;
                Ok(())
            };
            let live = |e: &MemEntry| e.added <= c && e.removed == NEVER;
            for (n, o) in changes.add.iter().filter(|(n, _)| is_exact(n)) {
                if self.exact.get(n).is_some_and(|vs| vs.iter().any(live)) {
                    tick(self)?;
                    for e in self.exact.get_mut(n).into_iter().flatten() {
                        if live(e) {
                            e.removed = generation;
                        }
                    }
                }
                tick(self)?;
                self.exact.entry(*n).or_default().push(MemEntry {
                    added: generation,
                    removed: NEVER,
                    origin: *o,
                });
            }
            for n in changes.remove.iter().filter(|n| is_exact(n)) {
                tick(self)?;
                for e in self.exact.get_mut(n).into_iter().flatten() {
                    if live(e) {
                        e.removed = generation;
                    }
                }
            }
            let slot = (generation & 1) as usize;
            tick(self)?;
            self.cidr_slots[slot] = cidrs.clone();
            Ok(())
        }

        fn verify(
            &mut self,
            generation: u64,
            changes: &Changes,
            cidrs: &PeerSet,
            expected: Digest,
        ) -> Result<(), StoreError> {
            self.take_fault(FaultPoint::Verify)?;
            let fail = |what: String| Err(StoreError::Verify { generation, what });
            check_staged(generation, changes, |n| {
                Ok(self
                    .exact
                    .get(n)
                    .into_iter()
                    .flatten()
                    .map(|e| (e.added, e.removed, e.origin))
                    .collect())
            })?;
            if &self.cidr_slots[(generation & 1) as usize] != cidrs {
                return fail("CIDR slot differs".into());
            }
            let mut d = Digest::default();
            for (n, vs) in &self.exact {
                for e in vs {
                    if e.visible_at(generation) {
                        d.add(n, e.origin);
                    }
                }
            }
            for (n, o) in cidrs {
                d.add(n, *o);
            }
            if d != expected {
                return fail(format!("digest {d:?}, expected {expected:?}"));
            }
            Ok(())
        }

        fn flip(&mut self, generation: u64, _digest: Digest) -> Result<(), StoreError> {
            self.take_fault(FaultPoint::Flip)?;
            if generation != self.committed + 1 {
                return Err(StoreError::Conflict {
                    expected: generation - 1,
                    found: self.committed,
                });
            }
            self.committed = generation;
            self.writes += 1;
            Ok(())
        }

        fn gc(&mut self, generation: u64, removed: &[IpNet]) -> Result<(), StoreError> {
            self.take_fault(FaultPoint::Gc)?;
            for n in removed {
                if let Some(vs) = self.exact.get_mut(n) {
                    let before = vs.len();
                    vs.retain(|e| e.removed > generation);
                    self.writes += (before - vs.len()) as u64;
                    if vs.is_empty() {
                        self.exact.remove(n);
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(any(test, feature = "testing"))]
pub use mem::{FaultPoint, MemEntry, MemStore};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_staged_rejects_what_did_not_read_back() {
        let n: IpNet = "198.18.0.7/32".parse().unwrap();
        let add = Changes {
            add: vec![(n, 2)],
            remove: vec![],
        };
        let rm = Changes {
            add: vec![],
            remove: vec![n],
        };
        assert!(check_staged(5, &add, |_| Ok(vec![(5, NEVER, 2)])).is_ok());
        assert!(
            check_staged(5, &add, |_| Ok(vec![(1, 5, 1), (5, NEVER, 2)])).is_ok(),
            "an origin change: the old version is marked removed"
        );
        for wrong in [
            vec![],
            vec![(4, NEVER, 2)],
            vec![(5, 9, 2)],
            vec![(5, NEVER, 1)],
            vec![(1, NEVER, 1), (5, NEVER, 2)],
        ] {
            assert!(
                matches!(
                    check_staged(5, &add, |_| Ok(wrong.clone())),
                    Err(StoreError::Verify { .. })
                ),
                "{wrong:?}"
            );
        }
        assert!(check_staged(5, &rm, |_| Ok(vec![(1, 5, 2)])).is_ok());
        assert!(
            check_staged(5, &rm, |_| Ok(vec![])).is_ok(),
            "already gone is fine"
        );
        assert!(matches!(
            check_staged(5, &rm, |_| Ok(vec![(1, NEVER, 2)])),
            Err(StoreError::Verify { .. })
        ));
    }
}
