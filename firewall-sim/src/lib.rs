//! A deterministic simulator for the controller core (`cargo xtask sim`).
//!
//! One seed fixes everything: a fleet whose members join, leave (gracefully or
//! by crashing) and flap; one or several discovery sources (each with its own
//! view of reaped members, its own revisions and its own faults), each of which
//! during a fault phase goes
//! empty, partial, failed, unhealthy or self-only (and lies about it) for any
//! duration, and delivers results late, twice or out of order; a controller
//! that crashes at any step (including half-way through staging a generation,
//! when no cleanup can run) and restarts from its persisted state and the
//! "pinned" [`MemStore`]; and map writes that fail. Then the faults stop, and
//! the fleet must converge within the stated bound (liveness).
//!
//! After every step an oracle checks, from what the simulator itself delivered
//! (not from the core's flags):
//! 1. the datapath equals a fully committed generation;
//! 2. nothing was deleted unless the last result this controller incarnation
//!    handled from *every* source was clean (complete, non-empty, healthy, not
//!    stale) and, together, within the shrink threshold, or the operator
//!    approved that peer;
//! 3. no peer was deleted less than its grace after a result from any source
//!    last listed it present (so a peer one source keeps listing is never
//!    deleted);
//! 4. at most `evict_max_per_window` deletions in any window;
//! 5. no peer is deleted while its traffic (as the datapath would have counted
//!    it, up to the last time the simulator read its counter) grew within the
//!    liveness window, unless its cap (last listed present + grace +
//!    `liveness_max_extend_ms`) has passed. Live members talk; some departed
//!    ones keep talking for a while (a lingering process, a spoofed source),
//!    some for longer than the cap;
//!    and at the end: every departed peer is evicted, and every live peer is
//!    allowed, within the grace plus the stated bound after faults stop.
//!
//! The overlay allowlist needs no check here: it is compiled into the XDP
//! program and the store API has no operation that could reach it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ipnet::IpNet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use firewall_controller::{
    commit::{Committed, commit},
    core::{Action, CommitResult, Core, Persisted},
    discovery::{Discovery, Member, MemberStatus, SourceMeta},
    guards::Guards,
    peers::{DISCOVERY, PeerSet},
    store::{FaultPoint, MemStore},
};

pub const TICK_MS: u64 = 250;
pub const RESULT_EVERY_MS: u64 = 1_000;
const FAULT_PHASE_MS: u64 = 600_000;
const QUIET_PHASE_MS: u64 = 300_000;

pub fn guards() -> Guards {
    Guards {
        grace_ms: 60_000,
        graceful_grace_ms: 20_000,
        max_shrink_fraction: 0.5,
        max_shrink_count: 64,
        evict_rate_per_min: 30,
        evict_burst: 4,
        evict_max_per_window: 64,
        evict_window_ms: 600_000,
        max_members: 10_000,
        retry_ms: 500,
        source_failed_alarm_ms: 60_000,
        liveness_window_ms: 10_000,
        liveness_max_extend_ms: 60_000,
        naive: false,
    }
}

/// How often the simulated daemon reads the candidates' hit counters.
pub const SAMPLE_EVERY_MS: u64 = 1_000;

#[derive(Debug)]
pub struct SimReport {
    pub seed: u64,
    pub results: u64,
    pub commits: u64,
    pub evictions: u64,
    pub crashes: u64,
    pub write_faults: u64,
    pub approvals: u64,
    /// Peers the liveness veto kept past their grace (summed over restarts).
    pub vetoes: u64,
}

#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub at_ms: u64,
    pub message: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed at t={} ms: {}",
            self.seed, self.at_ms, self.message
        )?;
        writeln!(f, "replay: cargo xtask sim --seed {}", self.seed)?;
        writeln!(f, "last events:")?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        Ok(())
    }
}

/// The last octet of a simulated address.
fn addr_low(n: IpNet) -> u64 {
    match n.addr() {
        std::net::IpAddr::V4(a) => u64::from(a.octets()[3]),
        std::net::IpAddr::V6(a) => u64::from(a.octets()[15]),
    }
}

fn addr(i: u32) -> IpNet {
    IpNet::V4(std::net::Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8).into())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    Empty,
    Partial,
    Failed,
    Unhealthy,
    /// A restarted agent that sees only itself but claims to be healthy.
    SelfOnlyLiar,
    /// A complete, healthy result that silently misses some live members
    /// (a topology filter that lost them): only another source, the grace,
    /// or their traffic keeps them.
    Forgets,
}

/// One simulated discovery source.
struct Src {
    fault: Fault,
    fault_until: u64,
    revision: u64,
    sent: VecDeque<Discovery>,
    /// The last result this controller incarnation handled from it (a stale
    /// one recorded as failed), and the highest revision it can know.
    last_handled: Option<Discovery>,
    incarnation_max_rev: u64,
}

impl Src {
    fn new() -> Src {
        Src {
            fault: Fault::None,
            fault_until: 0,
            revision: 0,
            sent: VecDeque::new(),
            last_handled: None,
            incarnation_max_rev: 0,
        }
    }
}

fn source_name(k: usize) -> String {
    format!("src{k}")
}

struct Sim {
    rng: ChaCha8Rng,
    seed: u64,
    g: Guards,
    now: u64,
    /// Truth: members and their current status.
    truth: BTreeMap<u32, MemberStatus>,
    next_id: u32,
    srcs: Vec<Src>,
    queue: Vec<(u64, u64, usize, Discovery)>,
    store: MemStore,
    disk: Option<Persisted>,
    daemon: Option<(Core, Committed)>,
    down_until: u64,
    committed_sets: BTreeMap<u64, PeerSet>,
    // Oracle state.
    /// Whether the sources' last results, together, were within the shrink
    /// threshold when the last of them came (meaningful when all are clean).
    shrink_ok: bool,
    last_present: BTreeMap<IpNet, u64>,
    left_since_present: BTreeSet<IpNet>,
    approved: BTreeSet<IpNet>,
    evictions: VecDeque<u64>,
    /// Traffic: each address's datapath hit counter, departed members that
    /// keep sending (until when), when each counter last grew, and when the
    /// daemon last read each counter.
    hits: BTreeMap<IpNet, u64>,
    lingering: BTreeMap<u32, u64>,
    grew_at: BTreeMap<IpNet, u64>,
    read_at: BTreeMap<IpNet, u64>,
    trace: VecDeque<String>,
    report: SimReport,
}

impl Sim {
    fn log(&mut self, s: String) {
        if self.trace.len() == 40 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("t={} {s}", self.now));
    }

    fn fail(&self, message: String) -> SimFailure {
        SimFailure {
            seed: self.seed,
            at_ms: self.now,
            message,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn faults_on(&self) -> bool {
        self.now < FAULT_PHASE_MS
    }

    fn evolve_truth(&mut self) {
        let quiet_soon = self.now + self.g.grace_ms > FAULT_PHASE_MS + QUIET_PHASE_MS / 4;
        if quiet_soon {
            return;
        }
        let r: f64 = self.rng.random();
        let alive: Vec<u32> = self
            .truth
            .iter()
            .filter(|(_, s)| s.present())
            .map(|(i, _)| *i)
            .collect();
        if r < 0.002 && alive.len() > 8 {
            // A departure: graceful or a crash.
            let id = alive[self.rng.random_range(0..alive.len())];
            let st = if self.rng.random_bool(0.5) {
                MemberStatus::Left
            } else {
                MemberStatus::Failed
            };
            self.truth.insert(id, st);
            self.log(format!("truth: {} {st:?}", addr(id)));
            if self.rng.random_bool(0.3) {
                // It keeps sending: a lingering process or a spoofed source,
                // sometimes for longer than the cap.
                let until = self.now + self.rng.random_range(1..=3 * self.g.liveness_max_extend_ms);
                self.lingering.insert(id, until);
                self.log(format!("traffic: {} keeps sending until {until}", addr(id)));
            }
        } else if r < 0.004 {
            self.next_id += 1;
            self.truth.insert(self.next_id, MemberStatus::Alive);
            self.log(format!("truth: {} joins", addr(self.next_id)));
        } else if r < 0.006 && !alive.is_empty() {
            // A flap: briefly failed, then back (the next evolution may revive it).
            let id = alive[self.rng.random_range(0..alive.len())];
            self.truth.insert(id, MemberStatus::Failed);
            self.log(format!("truth: {} flaps down", addr(id)));
        } else if r < 0.05 {
            // Flapped members come back after a while; departed ones (Left) stay gone.
            let flapped: Vec<u32> = self
                .truth
                .iter()
                .filter(|(_, s)| **s == MemberStatus::Failed)
                .map(|(i, _)| *i)
                .collect();
            if !flapped.is_empty() && self.rng.random_bool(0.15) {
                let id = flapped[self.rng.random_range(0..flapped.len())];
                self.truth.insert(id, MemberStatus::Alive);
                self.log(format!("truth: {} back", addr(id)));
            }
        }
    }

    fn truth_result(&self, k: usize) -> Vec<Member> {
        // Serf keeps failed and left members listed for a long time, but a
        // reaped member simply vanishes; model both, differently per source.
        self.truth
            .iter()
            .filter(|(i, s)| s.present() || (**i % (3 + k as u32) != 0))
            .map(|(i, s)| Member {
                net: addr(*i),
                status: *s,
            })
            .collect()
    }

    fn make_result(&mut self, k: usize) -> Discovery {
        if self.faults_on() && self.now >= self.srcs[k].fault_until {
            self.srcs[k].fault = match self.rng.random_range(0..12) {
                0 => Fault::Empty,
                1 => Fault::Partial,
                2 => Fault::Failed,
                3 => Fault::Unhealthy,
                4 => Fault::SelfOnlyLiar,
                5 => Fault::Forgets,
                _ => Fault::None,
            };
            // Any duration, up to three grace periods.
            self.srcs[k].fault_until = self.now
                + self
                    .rng
                    .random_range(1..=(3 * self.g.grace_ms / RESULT_EVERY_MS))
                    * RESULT_EVERY_MS;
            if self.srcs[k].fault != Fault::None {
                self.log(format!(
                    "source {k} fault {:?} until {}",
                    self.srcs[k].fault, self.srcs[k].fault_until
                ));
            }
        }
        if !self.faults_on() {
            self.srcs[k].fault = Fault::None;
        }
        self.srcs[k].revision += 1;
        let meta = SourceMeta {
            revision: Some(self.srcs[k].revision),
            healthy: true,
            health_reason: None,
        };
        let members = self.truth_result(k);
        match self.srcs[k].fault {
            Fault::None => Discovery::Complete { members, meta },
            Fault::Empty => Discovery::Complete {
                members: vec![],
                meta,
            },
            Fault::Partial => {
                let keep: Vec<Member> = members
                    .into_iter()
                    .filter(|_| self.rng.random_bool(0.5))
                    .collect();
                Discovery::Partial {
                    members: keep,
                    meta,
                    reason: "page timed out".into(),
                }
            }
            Fault::Failed => Discovery::Failed {
                reason: "connection refused".into(),
                meta,
            },
            Fault::Unhealthy => Discovery::Complete {
                members: members.into_iter().take(1).collect(),
                meta: SourceMeta {
                    healthy: false,
                    health_reason: Some("agent sees only itself".into()),
                    ..meta
                },
            },
            Fault::Forgets => {
                // The same members each time, for the fault's duration.
                let until = self.srcs[k].fault_until;
                let keep: Vec<Member> = members
                    .into_iter()
                    .filter(|m| {
                        !(m.status.present() && (until / 1000 + addr_low(m.net)).is_multiple_of(5))
                    })
                    .collect();
                Discovery::Complete {
                    members: keep,
                    meta,
                }
            }
            Fault::SelfOnlyLiar => Discovery::Complete {
                members: members.into_iter().take(1).collect(),
                meta,
            },
        }
    }

    fn schedule(&mut self, k: usize) {
        let d = self.make_result(k);
        let src = &mut self.srcs[k];
        src.sent.push_back(d.clone());
        if src.sent.len() > 50 {
            src.sent.pop_front();
        }
        let delay = if self.faults_on() {
            self.rng.random_range(0..3) * RESULT_EVERY_MS
        } else {
            0
        };
        let seq = self.report.results;
        self.report.results += 1;
        self.queue.push((self.now + delay, seq, k, d.clone()));
        if self.faults_on() && self.rng.random_bool(0.05) {
            self.queue
                .push((self.now + delay + RESULT_EVERY_MS, seq, k, d)); // duplicate
        }
        let sent = self.srcs[k].sent.len();
        if self.faults_on() && self.rng.random_bool(0.03) && sent > 5 {
            let old = self.srcs[k].sent[self.rng.random_range(0..sent - 1)].clone(); // stale replay
            self.queue.push((self.now, seq, k, old));
        }
    }

    fn start_daemon(&mut self) -> Result<(), SimFailure> {
        self.store.revive();
        let (committed, _) = Committed::adopt(&mut self.store)
            .map_err(|e| self.fail(format!("adopt failed: {e}")))?;
        let names: Vec<String> = (0..self.srcs.len()).map(source_name).collect();
        let core = Core::with_sources(
            self.g.clone(),
            committed.set.clone(),
            committed.generation,
            self.disk.clone(),
            self.now,
            &names,
        );
        self.daemon = Some((core, committed));
        for (k, src) in self.srcs.iter_mut().enumerate() {
            src.last_handled = None;
            src.incarnation_max_rev = self
                .disk
                .as_ref()
                .and_then(|d| d.source_revisions.get(&source_name(k)).copied())
                .unwrap_or(0);
        }
        self.log("controller started (adopted the pinned set)".into());
        Ok(())
    }

    fn crash(&mut self, why: &str) {
        if let Some((core, _)) = &self.daemon {
            self.report.vetoes += core.status().vetoes_total;
        }
        self.daemon = None;
        self.report.crashes += 1;
        self.down_until = self.now + self.rng.random_range(0..20) * TICK_MS;
        self.log(format!("controller crashed ({why})"));
    }

    fn persist(&mut self) {
        if let Some((core, _)) = &self.daemon {
            self.disk = Some(core.persisted());
        }
    }

    /// Run the core's actions against the store, as the daemon does.
    fn run_actions(&mut self) -> Result<(), SimFailure> {
        loop {
            let Some((core, _)) = self.daemon.as_mut() else {
                return Ok(());
            };
            let Some(Action::Commit(plan)) = core.poll_action() else {
                return Ok(());
            };
            if self.faults_on() && self.rng.random_bool(0.05) {
                self.report.write_faults += 1;
                self.store.fault = Some(match self.rng.random_range(0..4) {
                    0 => FaultPoint::StageAfter(self.rng.random_range(0..4)),
                    1 => FaultPoint::Verify,
                    2 => FaultPoint::Flip,
                    _ => FaultPoint::Gc,
                });
                self.store.crash = self.rng.random_bool(0.4);
                self.log(format!(
                    "inject {:?}{}",
                    self.store.fault,
                    if self.store.crash { " as a crash" } else { "" }
                ));
            }
            let before = self.store.visible();
            let (core, committed) = self.daemon.as_mut().unwrap();
            let r = commit(&mut self.store, committed, plan.changes.clone());
            let outcome = match r {
                Ok(Some(rep)) => {
                    self.committed_sets
                        .insert(rep.generation, committed.set.clone());
                    CommitResult::Committed {
                        generation: rep.generation,
                        added: rep.added,
                        removed: rep.removed,
                    }
                }
                Ok(None) => CommitResult::Committed {
                    generation: committed.generation,
                    added: Vec::new(),
                    removed: Vec::new(),
                },
                Err(e) => CommitResult::Failed {
                    reason: e.to_string(),
                },
            };
            let now = self.now;
            let what = match &outcome {
                CommitResult::Committed { generation, .. } => format!("committed {generation}"),
                CommitResult::Failed { reason } => format!("failed: {reason}"),
            };
            core.handle_commit_result(now, outcome);
            self.store.fault = None;
            self.log(format!(
                "commit +{} -{} -> {what}",
                plan.changes.add.len(),
                plan.changes.remove.len()
            ));
            self.check_deletions(&before)?;
            if self.store.dead {
                self.crash("in the middle of a commit");
                return Ok(());
            }
            if self.faults_on() && self.rng.random_bool(0.02) {
                self.crash("after a commit, before persisting");
                return Ok(());
            }
            self.persist();
        }
    }

    fn check_deletions(&mut self, before: &PeerSet) -> Result<(), SimFailure> {
        let after = self.store.visible();
        let deleted: Vec<IpNet> = before
            .iter()
            .filter(|(n, o)| **o == DISCOVERY && !after.contains_key(n))
            .map(|(n, _)| *n)
            .collect();
        for n in deleted {
            self.report.evictions += 1;
            let all_clean = self.srcs.iter().all(|src| {
                matches!(&src.last_handled, Some(Discovery::Complete { members, meta })
                    if !members.is_empty() && meta.healthy)
            });
            let listed = self.srcs.iter().any(|src| {
                src.last_handled
                    .as_ref()
                    .is_some_and(|d| d.present().contains(&n))
            });
            if !all_clean || listed || !(self.shrink_ok || self.approved.contains(&n)) {
                return Err(self.fail(format!(
                    "{n} deleted while a guard held (last handled results: {:?}, listed present: {listed}, shrink ok: {})",
                    self.srcs
                        .iter()
                        .map(|src| src.last_handled.as_ref().map(|d| (
                            d.kind(),
                            d.members().len(),
                            d.meta().healthy
                        )))
                        .collect::<Vec<_>>(),
                    self.shrink_ok
                )));
            }
            let seen = self.last_present.get(&n).copied().unwrap_or(0);
            let grace = if self.left_since_present.contains(&n) {
                self.g.graceful_grace_ms
            } else {
                self.g.grace_ms
            };
            if self.now < seen + grace {
                return Err(self.fail(format!(
                    "{n} deleted {} ms after it was last listed present, grace is {grace} ms",
                    self.now - seen
                )));
            }
            // 5: traffic the core could have seen, within the window, before the cap.
            if let (Some(t), Some(r)) = (self.grew_at.get(&n), self.read_at.get(&n))
                && *t <= *r
                && self.now < t + self.g.liveness_window_ms
                && self.now < seen + grace + self.g.liveness_max_extend_ms
            {
                return Err(self.fail(format!(
                    "{n} deleted {} ms after traffic the daemon read at {r}, window {} ms, before its cap",
                    self.now - t,
                    self.g.liveness_window_ms
                )));
            }
            self.evictions.push_back(self.now);
            self.approved.remove(&n);
        }
        while self
            .evictions
            .front()
            .is_some_and(|t| self.now - t >= self.g.evict_window_ms)
        {
            self.evictions.pop_front();
        }
        if self.evictions.len() as u64 > self.g.evict_max_per_window {
            return Err(self.fail("deletion budget exceeded".into()));
        }
        Ok(())
    }

    fn deliver(&mut self, k: usize, d: Discovery) -> Result<(), SimFailure> {
        let Some((core, _)) = self.daemon.as_mut() else {
            return Ok(());
        };
        let rev = d.meta().revision.unwrap_or(0);
        let src = &mut self.srcs[k];
        let stale = rev < src.incarnation_max_rev;
        if !stale {
            src.incarnation_max_rev = rev;
        }
        // Only fresh results are evidence; a stale one is old news.
        for m in d.members().iter().filter(|_| !stale) {
            if m.status.present() {
                self.last_present.insert(m.net, self.now);
                self.left_since_present.remove(&m.net);
            } else if m.status == MemberStatus::Left {
                self.left_since_present.insert(m.net);
            } else {
                self.left_since_present.remove(&m.net);
            }
        }
        let now = self.now;
        core.handle_discovery_from(now, k, d.clone());
        // A stale result freezes deletions until the next fresh one.
        self.srcs[k].last_handled = Some(if stale {
            Discovery::Failed {
                reason: "stale".into(),
                meta: SourceMeta::default(),
            }
        } else {
            d
        });
        // The oracle's own view of the shrink guard, against the datapath now:
        // what no source's last result lists present, when a clean one came.
        if !stale && matches!(self.srcs[k].last_handled, Some(Discovery::Complete { .. })) {
            let present: BTreeSet<IpNet> = self
                .srcs
                .iter()
                .filter_map(|s| s.last_handled.as_ref())
                .flat_map(|d| d.present())
                .collect();
            let owned: Vec<IpNet> = self
                .store
                .visible()
                .iter()
                .filter(|(_, o)| **o == DISCOVERY)
                .map(|(n, _)| *n)
                .collect();
            let absent = owned.iter().filter(|n| !present.contains(n)).count() as u64;
            self.shrink_ok = absent <= self.g.max_shrink_count
                && (owned.is_empty()
                    || absent as f64 / owned.len() as f64 <= self.g.max_shrink_fraction);
        }
        if self.faults_on() && self.rng.random_bool(0.01) {
            self.crash("after handling a result, before persisting");
            return Ok(());
        }
        self.persist();
        self.run_actions()
    }

    /// Packets this tick: live members talk, lingering departed ones too.
    fn traffic(&mut self) {
        let now = self.now;
        self.lingering.retain(|_, until| *until > now);
        let talkers: Vec<u32> = self
            .truth
            .iter()
            .filter(|(i, s)| s.present() || self.lingering.contains_key(i))
            .map(|(i, _)| *i)
            .collect();
        for i in talkers {
            if self.rng.random_bool(0.5) {
                *self.hits.entry(addr(i)).or_insert(0) += self.rng.random_range(1..4);
                self.grew_at.insert(addr(i), now);
            }
        }
    }

    /// The daemon reads the counters the core asks for.
    fn sample(&mut self) {
        let Some((core, _)) = self.daemon.as_mut() else {
            return;
        };
        let want = core.liveness_candidates();
        let samples: Vec<(IpNet, u64)> = want
            .iter()
            .map(|n| (*n, self.hits.get(n).copied().unwrap_or(0)))
            .collect();
        for n in &want {
            self.read_at.insert(*n, self.now);
        }
        core.handle_traffic(self.now, &samples);
    }

    fn check_datapath(&self) -> Result<(), SimFailure> {
        let vis = self.store.visible();
        match self.committed_sets.get(&self.store.committed) {
            Some(set) if *set == vis => Ok(()),
            other => Err(self.fail(format!(
                "datapath at generation {} holds {} entries, not the committed generation ({:?} entries)",
                self.store.committed,
                vis.len(),
                other.map(|s| s.len())
            ))),
        }
    }

    fn step(&mut self) -> Result<(), SimFailure> {
        self.now += TICK_MS;
        if self.faults_on() {
            self.evolve_truth();
        } else {
            // Flapped members settle: the fault phase is over.
            for s in self.truth.values_mut() {
                if *s == MemberStatus::Failed {
                    *s = MemberStatus::Left;
                }
            }
        }
        if self.daemon.is_none() && self.now >= self.down_until {
            self.start_daemon()?;
        }
        if self.now.is_multiple_of(RESULT_EVERY_MS) {
            for k in 0..self.srcs.len() {
                self.schedule(k);
            }
        }
        self.queue.sort_by_key(|(t, s, k, _)| (*t, *s, *k));
        while self
            .queue
            .first()
            .is_some_and(|(t, _, _, _)| *t <= self.now)
        {
            let (_, _, k, d) = self.queue.remove(0);
            self.deliver(k, d)?;
        }
        self.traffic();
        if self.now.is_multiple_of(SAMPLE_EVERY_MS) {
            self.sample();
        }
        if let Some((core, _)) = self.daemon.as_mut() {
            let now = self.now;
            core.handle_tick(now);
            // An operator sometimes approves what is held.
            if self.rng.random_bool(0.002) && !core.status().held.is_empty() {
                let ok = core.approve(now, None);
                self.report.approvals += 1;
                self.approved.extend(ok);
            }
            self.run_actions()?;
        }
        if self.faults_on() && self.daemon.is_some() && self.rng.random_bool(0.003) {
            self.crash("between steps");
        }
        self.check_datapath()
    }
}

/// Run one seed to the end; `Err` describes the first violated invariant.
pub fn run(seed: u64) -> Result<SimReport, SimFailure> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = rng.random_range(10..30);
    // One source in half the seeds, two or three in the rest.
    let sources = [1, 1, 2, 3][rng.random_range(0..4)];
    let mut sim = Sim {
        seed,
        g: guards(),
        now: 0,
        truth: (1..=n).map(|i| (i, MemberStatus::Alive)).collect(),
        next_id: n,
        srcs: (0..sources).map(|_| Src::new()).collect(),
        queue: Vec::new(),
        store: MemStore::new(4096),
        disk: None,
        daemon: None,
        down_until: 0,
        committed_sets: [(0, PeerSet::new())].into(),
        shrink_ok: false,
        last_present: BTreeMap::new(),
        left_since_present: BTreeSet::new(),
        approved: BTreeSet::new(),
        evictions: VecDeque::new(),
        hits: BTreeMap::new(),
        lingering: BTreeMap::new(),
        grew_at: BTreeMap::new(),
        read_at: BTreeMap::new(),
        trace: VecDeque::new(),
        report: SimReport {
            seed,
            results: 0,
            commits: 0,
            evictions: 0,
            crashes: 0,
            write_faults: 0,
            approvals: 0,
            vetoes: 0,
        },
        rng,
    };
    sim.start_daemon()?;
    while sim.now < FAULT_PHASE_MS + QUIET_PHASE_MS {
        sim.step()?;
    }
    // Liveness: faults stopped at FAULT_PHASE_MS; by now (a whole quiet phase
    // later, which exceeds grace + the eviction bound + result delays for the
    // departures the simulator allows) the datapath must equal the truth.
    let live: BTreeSet<IpNet> = sim
        .truth
        .iter()
        .filter(|(_, s)| s.present())
        .map(|(i, _)| addr(*i))
        .collect();
    let vis: BTreeSet<IpNet> = sim.store.visible().keys().copied().collect();
    if vis != live {
        let stuck: Vec<_> = vis.difference(&live).collect();
        let missing: Vec<_> = live.difference(&vis).collect();
        let held = sim
            .daemon
            .as_ref()
            .map(|(c, _)| c.status())
            .map(|s| (s.freeze, s.held.len(), s.budget_limited));
        return Err(sim.fail(format!(
            "did not converge: still allowed {stuck:?}, missing {missing:?}, core {held:?}"
        )));
    }
    sim.report.commits = sim.committed_sets.len() as u64 - 1;
    if let Some((core, _)) = &sim.daemon {
        sim.report.vetoes += core.status().vetoes_total;
    }
    Ok(sim.report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_few_seeds() {
        for seed in 0..20 {
            if let Err(e) = super::run(seed) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn replays_exactly() {
        let a = super::run(7).unwrap();
        let b = super::run(7).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
