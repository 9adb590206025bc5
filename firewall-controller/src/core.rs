//! The commit logic as a pure, deterministic state machine.
//!
//! Inputs: discovery results (`handle_discovery`), time (`handle_tick`), the
//! results of the commits it asked for (`handle_commit_result`) and operator
//! approvals (`approve`). Outputs: commit plans (`poll_action`) and the next
//! time it wants to be woken (`poll_timeout`). It has no tokio, no aya, no
//! clock and no randomness: the daemon, the tests and the simulator all drive
//! this same code, and one seed replays one run exactly. Iteration is over
//! BTreeMaps, so output order never depends on hashing.
//!
//! The rules, in short:
//! - A present member (alive, leaving) that is not in the datapath is added at once.
//! - A member missing from a *clean* result (complete, non-empty, healthy, not
//!   stale) becomes "absent since T". It stays allowed. It is evicted once it
//!   has been absent continuously for the grace TTL, if no guard holds at that
//!   moment and the deletion budget allows. If it reappears, nothing changes.
//! - Any of these freezes every deletion until a later clean result: a failed
//!   or partial result, an empty one, an unhealthy source, a stale revision,
//!   one that reports more absent than the shrink threshold (held until an
//!   operator approves), and a controller that has not seen a clean result
//!   since it started (the first-sync gate).
//! - Entries the operator added are never touched.
//! - Traffic is evidence of life: an absent exact peer whose datapath hit
//!   count grew in the last `liveness_window_ms` is not evicted when its grace
//!   ends (the liveness veto), for at most `liveness_max_extend_ms` past it;
//!   and no exact peer is evicted before its counter has been watched for a
//!   whole window. The daemon reads the counters of the peers
//!   [`Core::liveness_candidates`] names and hands them to
//!   [`Core::handle_traffic`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::peers::{Changes, DISCOVERY, Origin, PeerSet};
use crate::{
    discovery::{Discovery, Member, MemberStatus, SourceMeta},
    guards::Guards,
};

/// Why deletions are frozen right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "guard", rename_all = "snake_case")]
pub enum Freeze {
    /// No clean result since the controller started: the first-sync gate.
    NotSynced,
    Failed {
        reason: String,
    },
    Partial {
        reason: String,
    },
    Empty,
    Unhealthy {
        reason: String,
    },
    Stale {
        revision: u64,
        seen: u64,
    },
    /// More absent at once than the shrink threshold allows: held for approval.
    Shrink {
        absent: u64,
        of: u64,
    },
    /// A result failed validation (too large).
    Invalid {
        reason: String,
    },
}

impl Freeze {
    /// The guard's name, as in `status.json` and the metrics' `guard` label.
    pub fn name(&self) -> &'static str {
        match self {
            Freeze::NotSynced => "not_synced",
            Freeze::Failed { .. } => "failed",
            Freeze::Partial { .. } => "partial",
            Freeze::Empty => "empty",
            Freeze::Unhealthy { .. } => "unhealthy",
            Freeze::Stale { .. } => "stale",
            Freeze::Shrink { .. } => "shrink",
            Freeze::Invalid { .. } => "invalid",
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Freeze::NotSynced => "no clean discovery result since start (first-sync gate)".into(),
            Freeze::Failed { reason } => format!("discovery failed: {reason}"),
            Freeze::Partial { reason } => format!("discovery result is partial: {reason}"),
            Freeze::Empty => "discovery returned an empty member list".into(),
            Freeze::Unhealthy { reason } => {
                format!("discovery source reports itself unhealthy: {reason}")
            }
            Freeze::Stale { revision, seen } => {
                format!("stale discovery revision {revision} (already saw {seen})")
            }
            Freeze::Shrink { absent, of } => format!(
                "{absent} of {of} peers absent at once exceeds the shrink guard; held until `firewall-ctl approve`"
            ),
            Freeze::Invalid { reason } => format!("discovery result rejected: {reason}"),
        }
    }
}

/// A discovery-owned peer that is currently absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Absence {
    pub since_ms: u64,
    pub graceful: bool,
}

/// What the core asks the daemon to commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPlan {
    pub changes: Changes,
    pub evictions: Vec<(IpNet, Absence)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Commit(CommitPlan),
}

/// How a commit ended, as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitResult {
    /// Committed: what the commit actually changed (its report's lists,
    /// moved back; the core keeps no copy of a plan in flight, which at a
    /// first sync of 1M peers was 24 MB).
    Committed {
        generation: u64,
        added: Vec<(IpNet, Origin)>,
        removed: Vec<IpNet>,
    },
    /// Nothing was committed (map full, write error, verification failure).
    Failed { reason: String },
}

/// State that survives a restart (written by the daemon after each step).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    pub generation: u64,
    pub absent: BTreeMap<IpNet, Absence>,
    /// The present members of the last clean result, as files before
    /// `last_good_members` listed them: read (for their count), never
    /// written. Nothing decides by the list, and writing it made every clean
    /// result rewrite and fsync the whole fleet (1M peers: tens of MB in
    /// pretty JSON, several times a second with Serf).
    #[serde(default, skip_serializing)]
    pub last_good: Vec<IpNet>,
    /// How many members the sources' last clean results listed.
    #[serde(default)]
    pub last_good_members: Option<u64>,
    /// When the last clean result came: the file is not rewritten for this
    /// alone more than once a minute, so it may be up to a minute old.
    pub last_good_ms: Option<u64>,
    pub held: BTreeSet<IpNet>,
    pub approved: BTreeSet<IpNet>,
    /// The first source's highest revision (the only one before sources
    /// had names; still written for it).
    pub max_revision: Option<u64>,
    /// Every source's highest revision, by name.
    #[serde(default)]
    pub source_revisions: BTreeMap<String, u64>,
}

/// The controller's view, for `status` and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CoreStatus {
    pub now_ms: u64,
    pub generation: u64,
    pub synced: bool,
    pub freeze: Option<Freeze>,
    pub alarms: Vec<String>,
    pub absent: Vec<AbsentView>,
    pub held: Vec<IpNet>,
    /// Everything the shrink guard holds or will hold when its grace ends:
    /// absent, not approved, with the time its grace ends. `approve` shows
    /// these at once after a mass removal, and an approval given early
    /// applies when the grace ends.
    #[serde(default)]
    pub awaiting_approval: Vec<AbsentView>,
    pub approved: Vec<IpNet>,
    pub budget_limited: u64,
    pub last_result: Option<String>,
    pub peers: u64,
    pub evictions_total: u64,
    pub commits_total: u64,
    pub commit_failures_total: u64,
    /// Absent peers kept past their grace by the liveness rule.
    #[serde(default)]
    pub liveness: Vec<LivenessView>,
    /// Peers the veto has kept, counted when each began to be kept.
    #[serde(default)]
    pub vetoes_total: u64,
    /// The source whose last result froze deletions, when there are several.
    #[serde(default)]
    pub freeze_source: Option<String>,
    #[serde(default)]
    pub sources: Vec<SourceView>,
}

/// An absent peer the liveness rule is keeping, and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessView {
    pub peer: IpNet,
    pub absent_since_ms: u64,
    /// When its grace ended.
    pub grace_end_ms: u64,
    /// `traffic`: its counter grew within the window (the veto);
    /// `watching`: not yet watched for a whole window.
    pub state: String,
    pub last_traffic_ms: Option<u64>,
    /// How much its hit counter grew while it was watched: ticks of the
    /// kernel's clock with traffic (see `firewall_common::PeerVal::hits`).
    /// Earlier releases called it `packets_seen`.
    #[serde(alias = "packets_seen")]
    pub traffic_ticks: u64,
    /// When it is evicted unless traffic continues (never past the cap).
    pub deadline_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AbsentView {
    pub peer: IpNet,
    pub since_ms: u64,
    pub graceful: bool,
    pub evict_at_ms: u64,
}

/// Token bucket plus a sliding-window cap. Integer milli-tokens keep it exact.
#[derive(Clone, Debug)]
struct Budget {
    milli: u64,
    last_ms: u64,
    window: VecDeque<u64>,
}

impl Budget {
    fn new(g: &Guards, now: u64) -> Budget {
        Budget {
            milli: g.evict_burst * 1000,
            last_ms: now,
            window: VecDeque::new(),
        }
    }
    fn refill(&mut self, g: &Guards, now: u64) {
        if now > self.last_ms {
            let add = (now - self.last_ms).saturating_mul(g.evict_rate_per_min) / 60;
            self.milli = (self.milli + add).min(g.evict_burst * 1000);
            self.last_ms = now;
        }
        while self
            .window
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= g.evict_window_ms)
        {
            self.window.pop_front();
        }
    }
    fn take(&mut self, g: &Guards, now: u64) -> bool {
        self.refill(g, now);
        if self.milli >= 1000 && (self.window.len() as u64) < g.evict_max_per_window {
            self.milli -= 1000;
            self.window.push_back(now);
            true
        } else {
            false
        }
    }
    fn refund(&mut self, g: &Guards) {
        self.milli = (self.milli + 1000).min(g.evict_burst * 1000);
        self.window.pop_back();
    }
    /// When the next token will be there.
    fn next_ms(&self, g: &Guards) -> u64 {
        let need = 1000u64.saturating_sub(self.milli);
        let by_rate = self.last_ms + (need * 60).div_ceil(g.evict_rate_per_min);
        let by_window = if (self.window.len() as u64) < g.evict_max_per_window {
            0
        } else {
            self.window.front().map_or(0, |t| t + g.evict_window_ms)
        };
        by_rate.max(by_window)
    }
}

/// One discovery source's last word, as the core judged it.
#[derive(Clone, Debug)]
enum Verdict {
    /// Complete, non-empty, healthy and fresh: evidence of absence. The
    /// members it lists present, and those it lists as left, sorted.
    Clean {
        present: Vec<IpNet>,
        left: Vec<IpNet>,
    },
    /// Anything else: deletions freeze while it is a source's last word.
    Frozen(Freeze),
}

#[derive(Clone, Debug)]
struct Source {
    name: String,
    max_revision: Option<u64>,
    last: Option<Verdict>,
    /// A clean result came from it since the controller started.
    clean_seen: bool,
    /// Since when its results have been failures (failed, stalled, invalid).
    failing_since: Option<u64>,
}

impl Source {
    fn new(name: String, max_revision: Option<u64>) -> Source {
        Source {
            name,
            max_revision,
            last: None,
            clean_seen: false,
            failing_since: None,
        }
    }
    fn lists_present(&self, n: &IpNet) -> bool {
        matches!(&self.last, Some(Verdict::Clean { present, .. }) if present.binary_search(n).is_ok())
    }
    fn lists_left(&self, n: &IpNet) -> bool {
        matches!(&self.last, Some(Verdict::Clean { left, .. }) if left.binary_search(n).is_ok())
    }
}

/// A source as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceView {
    pub name: String,
    /// `clean`, the guard its last result triggered, or `none` yet.
    pub last: String,
    pub max_revision: Option<u64>,
    pub failing_since_ms: Option<u64>,
}

/// What the controller has seen of an absent exact peer's hit counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watch {
    /// The first reading during this absence.
    first_ms: u64,
    hits: u64,
    /// When the counter last grew, and by how much in all.
    grew_ms: Option<u64>,
    grown: u64,
}

/// Why the liveness rule keeps a peer past its grace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kept {
    /// Its counter grew within the window.
    Traffic { deadline_ms: u64 },
    /// It has not been watched for a whole window yet.
    Watching { deadline_ms: u64 },
}

pub struct Core {
    g: Guards,
    watch: BTreeMap<IpNet, Watch>,
    kept: BTreeMap<IpNet, Kept>,
    vetoes_total: u64,
    /// The committed set as the core knows it (operator and discovery entries).
    committed: PeerSet,
    generation: u64,
    absent: BTreeMap<IpNet, Absence>,
    synced: bool,
    freeze: Option<Freeze>,
    /// The source whose last result froze deletions (when several).
    freeze_source: Option<String>,
    sources: Vec<Source>,
    held: BTreeSet<IpNet>,
    approved: BTreeSet<IpNet>,
    budget: Budget,
    budget_limited: u64,
    /// The evictions of the commit in flight (the budget refunds them if it
    /// fails); `Some` while one is.
    in_flight: Option<Vec<(IpNet, Absence)>>,
    retry_at: Option<u64>,
    retry_delay_ms: u64,
    last_fail: Option<String>,
    actions: VecDeque<Action>,
    /// How many members the sources' last clean results list, and when the
    /// last combined clean evaluation happened (the lists are the sources').
    last_good_len: usize,
    last_good_ms: Option<u64>,
    last_result: Option<String>,
    /// Present discovery members not yet committed, sorted and unique. A
    /// Vec, not a map: a first sync of 1M members put 1M map nodes on the
    /// heap, where they stayed (fragmented) after the commit.
    pending_adds: Vec<IpNet>,
    now: u64,
    evictions_total: u64,
    commits_total: u64,
    commit_failures_total: u64,
}

impl Core {
    /// Start on top of what the datapath holds (`committed`, adopted from the
    /// pinned maps) and what was persisted before a restart. Deletes nothing
    /// until a clean result arrives.
    pub fn new(
        g: Guards,
        committed: PeerSet,
        generation: u64,
        persisted: Option<Persisted>,
        now: u64,
    ) -> Core {
        Core::with_sources(
            g,
            committed,
            generation,
            persisted,
            now,
            &["discovery".into()],
        )
    }

    /// As [`Core::new`], with several discovery sources (`names`, at least
    /// one). A peer becomes absent only when every source's last result is
    /// clean and none lists it present; any source's unclean last result
    /// freezes deletions; additions flow from all of them.
    pub fn with_sources(
        g: Guards,
        committed: PeerSet,
        generation: u64,
        persisted: Option<Persisted>,
        now: u64,
        names: &[String],
    ) -> Core {
        let p = persisted.unwrap_or_default();
        let sources = Self::make_sources(names, &p.source_revisions, p.max_revision);
        let discovery_owned = |n: &IpNet| committed.get(n) == Some(&DISCOVERY);
        let absent = p
            .absent
            .into_iter()
            .filter(|(n, _)| discovery_owned(n))
            .collect();
        Core {
            budget: Budget::new(&g, now),
            g,
            watch: BTreeMap::new(),
            kept: BTreeMap::new(),
            vetoes_total: 0,
            generation,
            absent,
            synced: false,
            freeze: Some(Freeze::NotSynced),
            freeze_source: None,
            sources,
            held: BTreeSet::new(),
            approved: p
                .approved
                .into_iter()
                .filter(|n| committed.get(n) == Some(&DISCOVERY))
                .collect(),
            committed,
            budget_limited: 0,
            in_flight: None,
            retry_at: None,
            retry_delay_ms: 0,
            last_fail: None,
            actions: VecDeque::new(),
            last_good_len: p
                .last_good_members
                .map_or(p.last_good.len(), |n| n as usize),
            last_good_ms: p.last_good_ms,
            last_result: None,
            pending_adds: Vec::new(),
            now,
            evictions_total: 0,
            commits_total: 0,
            commit_failures_total: 0,
        }
    }

    fn make_sources(
        names: &[String],
        revisions: &BTreeMap<String, u64>,
        first: Option<u64>,
    ) -> Vec<Source> {
        let mut v: Vec<Source> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let rev = revisions
                    .get(n)
                    .copied()
                    .or(if i == 0 { first } else { None });
                Source::new(n.clone(), rev)
            })
            .collect();
        if v.is_empty() {
            v.push(Source::new("discovery".into(), first));
        }
        v
    }

    /// The sources changed (a reload): those whose name stays keep their
    /// state; new ones start with no result, which freezes deletions until
    /// each has given a clean one.
    pub fn set_sources(&mut self, now: u64, names: &[String]) {
        self.set_now(now);
        let mut old: BTreeMap<String, Source> = std::mem::take(&mut self.sources)
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        self.sources = names
            .iter()
            .map(|n| {
                old.remove(n)
                    .unwrap_or_else(|| Source::new(n.clone(), None))
            })
            .collect();
        if self.sources.is_empty() {
            self.sources.push(Source::new("discovery".into(), None));
        }
        self.evaluate(false);
        self.plan();
    }

    pub fn source_names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name.clone()).collect()
    }

    pub fn guards(&self) -> &Guards {
        &self.g
    }
    pub fn committed(&self) -> &PeerSet {
        &self.committed
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn freeze(&self) -> Option<&Freeze> {
        self.freeze.as_ref()
    }
    pub fn absent(&self) -> &BTreeMap<IpNet, Absence> {
        &self.absent
    }
    fn set_now(&mut self, now: u64) {
        // Time never runs backwards for the core, whatever the wall clock does.
        self.now = self.now.max(now);
    }

    /// Check a result's shape. IPv4-mapped IPv6 entries become IPv4. Invalid
    /// entries (unspecified or multicast addresses, prefixes broader than
    /// `peers::MIN_PREFIX_*`, one address listed twice) are dropped and the result is
    /// downgraded to partial: the rest still adds, nothing is deleted.
    fn validate(&self, d: Discovery) -> Discovery {
        let meta = d.meta().clone();
        if d.members().len() > self.g.max_members {
            return Discovery::TooLarge {
                members: d.members().len() as u64,
                limit: self.g.max_members as u64,
                meta,
            };
        }
        let (members, complete, reason) = match d {
            Discovery::Failed { .. } | Discovery::TooLarge { .. } => return d,
            Discovery::Complete { members, .. } => (members, true, String::new()),
            Discovery::Partial {
                members, reason, ..
            } => (members, false, reason),
        };
        let mut members = members;
        for m in &mut members {
            m.net = crate::peers::normalize(m.net);
        }
        // Duplicates by sorting, not by a count map: the order of members
        // carries no meaning, and a 1M-entry map was 36 MB for a moment.
        members.sort_unstable_by_key(|m| m.net);
        let bad: Vec<bool> = (0..members.len())
            .map(|i| {
                let m = &members[i];
                let a = m.net.addr();
                a.is_unspecified()
                    || a.is_multicast()
                    || m.net.trunc() != m.net
                    || crate::peers::is_broad(&m.net)
                    || (i > 0 && members[i - 1].net == m.net)
                    || members.get(i + 1).is_some_and(|n| n.net == m.net)
            })
            .collect();
        let dropped = bad.iter().filter(|b| **b).count();
        if dropped == 0 {
            return if complete {
                Discovery::Complete { members, meta }
            } else {
                Discovery::Partial {
                    members,
                    meta,
                    reason,
                }
            };
        }
        let kept: Vec<Member> = members
            .into_iter()
            .zip(bad)
            .filter(|(_, b)| !b)
            .map(|(m, _)| m)
            .collect();
        let why = format!("{dropped} invalid or duplicate entries dropped");
        Discovery::Partial {
            members: kept,
            meta,
            reason: if reason.is_empty() {
                why
            } else {
                format!("{reason}; {why}")
            },
        }
    }

    /// A result from the first (or only) source.
    pub fn handle_discovery(&mut self, now: u64, d: Discovery) {
        self.handle_discovery_from(now, 0, d);
    }

    /// A result from source `src` (an index into the names given at start).
    pub fn handle_discovery_from(&mut self, now: u64, src: usize, d: Discovery) {
        self.set_now(now);
        let src = src.min(self.sources.len() - 1);
        if self.g.naive {
            return self.handle_naively(src, d);
        }
        let d = self.validate(d);
        let meta: SourceMeta = d.meta().clone();
        let prefix = if self.sources.len() > 1 {
            format!("{}: ", self.sources[src].name)
        } else {
            String::new()
        };
        self.last_result = Some(format!(
            "{prefix}{} with {} members at {}",
            d.kind(),
            d.members().len(),
            self.now
        ));
        if let (Some(r), Some(seen)) = (meta.revision, self.sources[src].max_revision)
            && r < seen
        {
            // Older than what we already acted on: ignored entirely.
            self.sources[src].last = Some(Verdict::Frozen(Freeze::Stale { revision: r, seen }));
            self.evaluate(false);
            self.plan();
            return;
        }
        if let Some(r) = meta.revision {
            let m = &mut self.sources[src].max_revision;
            *m = Some(m.map_or(r, |s| s.max(r)));
        }
        // Positive evidence from complete and partial results alike.
        let present = self.note_present(&d);
        let failing = matches!(d, Discovery::Failed { .. } | Discovery::TooLarge { .. });
        let now = self.now;
        let s = &mut self.sources[src];
        s.failing_since = if failing {
            Some(s.failing_since.unwrap_or(now))
        } else {
            None
        };
        let empty = d.members().is_empty();
        let verdict = match d {
            Discovery::TooLarge { members, limit, .. } => Verdict::Frozen(Freeze::Invalid {
                reason: format!("{members} members exceed guards.max_members = {limit}"),
            }),
            Discovery::Failed { reason, .. } => Verdict::Frozen(Freeze::Failed { reason }),
            Discovery::Partial { reason, .. } => Verdict::Frozen(Freeze::Partial { reason }),
            Discovery::Complete { .. } if empty => Verdict::Frozen(Freeze::Empty),
            Discovery::Complete { .. } if !meta.healthy => Verdict::Frozen(Freeze::Unhealthy {
                reason: meta
                    .health_reason
                    .clone()
                    .unwrap_or_else(|| "unhealthy".into()),
            }),
            Discovery::Complete { members, .. } => {
                // Sorted by validate(); present() is a BTreeSet, so sorted too.
                let left: Vec<IpNet> = members
                    .iter()
                    .filter(|m| m.status == MemberStatus::Left)
                    .map(|m| m.net)
                    .collect();
                drop(members);
                Verdict::Clean { present, left }
            }
        };
        let clean = matches!(verdict, Verdict::Clean { .. });
        let s = &mut self.sources[src];
        s.clean_seen |= clean;
        s.last = Some(verdict);
        self.evaluate(clean);
        self.plan();
    }

    /// Combine every source's last word: the first source whose last result
    /// is not clean freezes deletions (named); until every source has given a
    /// clean result the first-sync gate holds; otherwise, on a new clean
    /// result, a discovery peer no source lists present is absent.
    fn evaluate(&mut self, new_clean: bool) {
        if let Some((name, f)) = self.sources.iter().find_map(|s| match &s.last {
            Some(Verdict::Frozen(f)) => Some((s.name.clone(), f.clone())),
            _ => None,
        }) {
            self.freeze = Some(f);
            self.freeze_source = (self.sources.len() > 1).then_some(name);
            return;
        }
        if !self.sources.iter().all(|s| s.clean_seen) {
            self.freeze = Some(Freeze::NotSynced);
            self.freeze_source = self
                .sources
                .iter()
                .find(|s| !s.clean_seen)
                .filter(|_| self.sources.len() > 1)
                .map(|s| s.name.clone());
            return;
        }
        self.synced = true;
        if !new_clean {
            // Nothing new to judge absence by: the last evaluation stands.
            if matches!(self.freeze, Some(Freeze::NotSynced)) {
                self.freeze = None;
                self.freeze_source = None;
            }
            return;
        }
        let owned: Vec<IpNet> = self
            .committed
            .iter()
            .filter(|(_, o)| **o == DISCOVERY)
            .map(|(n, _)| *n)
            .collect();
        let mut absent_now = 0u64;
        for n in &owned {
            if self.sources.iter().any(|s| s.lists_present(n)) {
                continue;
            }
            absent_now += 1;
            // A graceful leave (every source that still lists it says left)
            // can shorten the grace, never a later failure.
            let graceful = self.sources.iter().all(|s| s.lists_left(n));
            let now = self.now;
            let a = self.absent.entry(*n).or_insert(Absence {
                since_ms: now,
                graceful,
            });
            a.graceful = a.graceful && graceful;
        }
        self.last_good_len = self
            .sources
            .iter()
            .map(|s| match &s.last {
                Some(Verdict::Clean { present, .. }) => present.len(),
                _ => 0,
            })
            .sum();
        self.last_good_ms = Some(self.now);
        let total = owned.len() as u64;
        let too_many = absent_now > self.g.max_shrink_count
            || (total > 0 && absent_now as f64 / total as f64 > self.g.max_shrink_fraction);
        self.freeze = too_many.then_some(Freeze::Shrink {
            absent: absent_now,
            of: total,
        });
        self.freeze_source = None;
    }

    /// Positive evidence: a present member is no longer absent (nothing is
    /// held or approved for it any more), and is added if it is new.
    /// Returns them sorted and without duplicates (a Vec, not a set: at 1M
    /// members a BTreeSet was 35 MB more for a moment).
    fn note_present(&mut self, d: &Discovery) -> Vec<IpNet> {
        let mut present: Vec<IpNet> = d
            .members()
            .iter()
            .filter(|m| m.status.present())
            .map(|m| m.net)
            .collect();
        // validate() sorted and deduplicated the members already; this is a
        // cheap check on sorted input, and keeps the result right regardless.
        present.sort_unstable();
        present.dedup();
        // New additions only: a second source listing the same members adds
        // nothing (pushing them all and deduplicating after doubled the
        // buffer, 19 MB at 1M members). Both lists are sorted: one merge.
        let mut fresh = Vec::new();
        let mut pending = self.pending_adds.iter().peekable();
        for n in &present {
            self.absent.remove(n);
            self.held.remove(n);
            self.approved.remove(n);
            while pending.next_if(|p| *p < n).is_some() {}
            if pending.peek() == Some(&n) {
                continue;
            }
            if !self.committed.contains_key(n) {
                fresh.push(*n);
            }
        }
        if self.pending_adds.is_empty() {
            self.pending_adds = fresh;
        } else if !fresh.is_empty() {
            self.pending_adds.extend(fresh);
            self.pending_adds.sort_unstable();
        }
        present
    }

    /// The post-mortem's orchestrator, for the side-by-side replay: whatever
    /// members a result lists are the fleet; everyone else goes, now.
    fn handle_naively(&mut self, src: usize, d: Discovery) {
        self.last_result = Some(format!(
            "{} with {} members at {} (naive)",
            d.kind(),
            d.members().len(),
            self.now
        ));
        if let Discovery::Failed { .. } = d {
            return;
        }
        let present = self.note_present(&d);
        // Each source's list is its part of the fleet, at face value: a peer
        // no source lists (once each has spoken) is gone, now.
        let s = &mut self.sources[src];
        s.clean_seen = true;
        s.last = Some(Verdict::Clean {
            present,
            left: Vec::new(),
        });
        if self.sources.iter().all(|s| s.clean_seen) {
            let now = self.now;
            let gone: Vec<IpNet> = self
                .committed
                .iter()
                .filter(|(n, o)| {
                    **o == DISCOVERY && !self.sources.iter().any(|s| s.lists_present(n))
                })
                .map(|(n, _)| *n)
                .collect();
            for n in gone {
                self.absent.entry(n).or_insert(Absence {
                    since_ms: now,
                    graceful: false,
                });
            }
        }
        self.freeze = None;
        self.synced = true;
        self.plan();
    }

    pub fn handle_tick(&mut self, now: u64) {
        self.set_now(now);
        self.plan();
    }

    fn liveness_on(&self) -> bool {
        !self.g.naive && self.g.liveness_max_extend_ms > 0
    }

    /// The peers whose hit counters the daemon should read now: absent exact
    /// discovery peers within two windows of their grace's end, or past it.
    /// Usually none; all of them only after a mass removal.
    pub fn liveness_candidates(&self) -> Vec<IpNet> {
        if !self.liveness_on() {
            return Vec::new();
        }
        let lead = 2 * self.g.liveness_window_ms;
        self.absent
            .iter()
            .filter(|(n, a)| {
                crate::peers::is_exact(n)
                    && self.committed.get(n) == Some(&DISCOVERY)
                    && self.now + lead >= a.since_ms + self.grace(a)
            })
            .map(|(n, _)| *n)
            .collect()
    }

    /// Hit counters read from the datapath for (some of) the candidates. A
    /// counter that went down was reset (the entry was re-added): it is a
    /// new baseline, not traffic.
    pub fn handle_traffic(&mut self, now: u64, samples: &[(IpNet, u64)]) {
        self.set_now(now);
        for (n, hits) in samples {
            if !self.absent.contains_key(n) {
                continue;
            }
            let now = self.now;
            let w = self.watch.entry(*n).or_insert(Watch {
                first_ms: now,
                hits: *hits,
                grew_ms: None,
                grown: 0,
            });
            if *hits > w.hits {
                w.grown += hits - w.hits;
                w.grew_ms = Some(now);
            }
            w.hits = *hits;
        }
        self.plan();
    }

    /// For `plan`, a one-shot core: take the running controller's
    /// observations (`view`, from its status) as its own, and treat every
    /// other absent exact peer as watched for a whole window and silent,
    /// which is what the running controller has seen unless it lists it.
    pub fn import_liveness(&mut self, view: &[LivenessView]) {
        let window = self.g.liveness_window_ms;
        let start = self.now.saturating_sub(window);
        for n in self.absent.keys().filter(|n| crate::peers::is_exact(n)) {
            self.watch.insert(
                *n,
                Watch {
                    first_ms: start,
                    hits: 0,
                    grew_ms: None,
                    grown: 0,
                },
            );
        }
        for v in view {
            if let Some(w) = self.watch.get_mut(&v.peer) {
                if v.state == "watching" {
                    w.first_ms = v.deadline_ms.saturating_sub(window);
                }
                w.grew_ms = v.last_traffic_ms;
                w.grown = v.traffic_ticks;
            }
        }
        self.plan();
    }

    /// The peers the veto keeps now (their traffic grew within the window).
    pub fn vetoed(&self) -> Vec<IpNet> {
        self.kept
            .iter()
            .filter(|(_, k)| matches!(k, Kept::Traffic { .. }))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Whether the liveness rule keeps `n` (due: its grace has ended) now.
    fn keep_alive(&self, n: &IpNet, a: &Absence) -> Option<Kept> {
        if !self.liveness_on() || !crate::peers::is_exact(n) {
            return None;
        }
        let window = self.g.liveness_window_ms;
        let cap = a.since_ms + self.grace(a) + self.g.liveness_max_extend_ms;
        if self.now >= cap {
            return None;
        }
        match self.watch.get(n) {
            Some(w) if w.grew_ms.is_some_and(|t| self.now < t + window) => Some(Kept::Traffic {
                deadline_ms: (w.grew_ms.unwrap_or(0) + window).min(cap),
            }),
            Some(w) if self.now >= w.first_ms + window => None,
            Some(w) => Some(Kept::Watching {
                deadline_ms: (w.first_ms + window).min(cap),
            }),
            // Never read: the daemon has not sampled it yet (just started).
            None => Some(Kept::Watching { deadline_ms: cap }),
        }
    }

    /// New guards from a reloaded config. Absences (and their clocks), holds
    /// and approvals stay; the deletion budget keeps its tokens, capped at
    /// the new burst, so a reload never grants a fresh burst of evictions.
    pub fn set_guards(&mut self, now: u64, g: Guards) {
        self.set_now(now);
        self.budget.milli = self.budget.milli.min(g.evict_burst * 1000);
        self.g = g;
        self.plan();
    }

    /// Operator approval of held deletions (all, or the listed ones). It lifts
    /// the shrink guard for exactly those peers; no other guard can be approved
    /// away, and the grace TTL still applies.
    pub fn approve(&mut self, now: u64, which: Option<&[IpNet]>) -> Vec<IpNet> {
        self.set_now(now);
        let chosen: Vec<IpNet> = match which {
            // Held now, or held when their grace ends: an operator who acts
            // as soon as the alarm fires need not come back.
            None => {
                let mut all: BTreeSet<IpNet> = self.held.clone();
                all.extend(self.awaiting().map(|(n, _)| n));
                all.into_iter().collect()
            }
            Some(list) => list
                .iter()
                .filter(|n| self.absent.contains_key(n))
                .copied()
                .collect(),
        };
        self.approved.extend(chosen.iter().copied());
        self.plan();
        chosen
    }

    pub fn handle_commit_result(&mut self, now: u64, r: CommitResult) {
        self.set_now(now);
        let Some(evictions) = self.in_flight.take() else {
            return;
        };
        match r {
            CommitResult::Committed {
                generation,
                added,
                removed,
            } => {
                for n in &removed {
                    self.absent.remove(n);
                    self.held.remove(n);
                    self.approved.remove(n);
                }
                crate::commit::apply_owned(
                    &mut self.committed,
                    Changes {
                        add: added,
                        remove: removed,
                    },
                );
                let committed = &self.committed;
                self.pending_adds.retain(|n| !committed.contains_key(n));
                if self.pending_adds.is_empty() {
                    // Give a first sync's buffer back.
                    self.pending_adds = Vec::new();
                }
                self.generation = generation;
                self.evictions_total += evictions.len() as u64;
                self.commits_total += 1;
                self.retry_at = None;
                self.retry_delay_ms = 0;
                self.last_fail = None;
            }
            CommitResult::Failed { reason } => {
                for _ in &evictions {
                    self.budget.refund(&self.g);
                }
                self.commit_failures_total += 1;
                self.retry_delay_ms = (self.retry_delay_ms * 2).clamp(self.g.retry_ms, 30_000);
                self.retry_at = Some(self.now + self.retry_delay_ms);
                self.last_fail = Some(reason);
            }
        }
        self.plan();
    }

    /// The datapath changed under us (an operator edit, a conflict): take it as
    /// the truth. Absences of peers no longer owned by discovery are dropped.
    pub fn resync(&mut self, committed: PeerSet, generation: u64) {
        self.in_flight = None;
        self.absent
            .retain(|n, _| committed.get(n) == Some(&DISCOVERY));
        self.pending_adds.retain(|n| !committed.contains_key(n));
        self.committed = committed;
        self.generation = generation;
        self.plan();
    }

    /// Absent discovery peers the shrink guard holds, or will hold once
    /// their grace ends, unless approved: (peer, its absence).
    fn awaiting(&self) -> impl Iterator<Item = (IpNet, Absence)> + '_ {
        let shrink = matches!(self.freeze, Some(Freeze::Shrink { .. }));
        self.absent
            .iter()
            .filter(move |(n, _)| {
                shrink && self.committed.get(n) == Some(&DISCOVERY) && !self.approved.contains(n)
            })
            .map(|(n, a)| (*n, *a))
    }

    fn grace(&self, a: &Absence) -> u64 {
        if self.g.naive {
            0
        } else if a.graceful {
            self.g.graceful_grace_ms
        } else {
            self.g.grace_ms
        }
    }

    /// Decide the next commit, if none is in flight.
    fn plan(&mut self) {
        if self.in_flight.is_some() || self.retry_at.is_some_and(|t| t > self.now) {
            return;
        }
        let adds: Vec<(IpNet, Origin)> = self
            .pending_adds
            .iter()
            .filter(|n| !self.committed.contains_key(n))
            .map(|n| (*n, DISCOVERY))
            .collect();
        let mut evictions = Vec::new();
        self.held.clear();
        self.budget_limited = 0;
        self.watch.retain(|n, _| self.absent.contains_key(n));
        let before = std::mem::take(&mut self.kept);
        let due: Vec<(IpNet, Absence)> = self
            .absent
            .iter()
            .filter(|(n, a)| {
                self.committed.get(n) == Some(&DISCOVERY)
                    && self.now.saturating_sub(a.since_ms) >= self.grace(a)
            })
            .map(|(n, a)| (*n, *a))
            .collect();
        for (n, a) in due {
            if let Some(k) = self.keep_alive(&n, &a) {
                if matches!(k, Kept::Traffic { .. })
                    && !matches!(before.get(&n), Some(Kept::Traffic { .. }))
                {
                    self.vetoes_total += 1;
                }
                self.kept.insert(n, k);
                continue;
            }
            let blocked = match &self.freeze {
                None => false,
                Some(Freeze::Shrink { .. }) => !self.approved.contains(&n),
                Some(_) => true,
            };
            if blocked && !self.g.naive {
                self.held.insert(n);
            } else if self.g.naive || self.budget.take(&self.g, self.now) {
                evictions.push((n, a));
            } else {
                self.budget_limited += 1;
            }
        }
        if adds.is_empty() && evictions.is_empty() {
            return;
        }
        let plan = CommitPlan {
            changes: Changes {
                add: adds,
                remove: evictions.iter().map(|(n, _)| *n).collect(),
            },
            evictions,
        };
        self.in_flight = Some(plan.evictions.clone());
        // At most one action is ever queued: the next is planned only after
        // this one's result comes back.
        self.actions.push_back(Action::Commit(plan));
    }

    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next time the core wants `handle_tick`, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t: Option<u64> = self.retry_at;
        let mut consider = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        for a in self.absent.values() {
            let at = a.since_ms + self.grace(a);
            if at > self.now {
                consider(at);
            }
        }
        if self.budget_limited > 0 {
            consider(self.budget.next_ms(&self.g).max(self.now + 1));
        }
        for k in self.kept.values() {
            let (Kept::Traffic { deadline_ms } | Kept::Watching { deadline_ms }) = *k;
            if deadline_ms > self.now {
                consider(deadline_ms);
            }
        }
        t
    }

    /// Changes whenever [`Core::persisted`] would: the caller writes the
    /// state file only then. `last_good` is summarised by its length and
    /// time, since it is only ever replaced whole, with `last_good_ms = now`;
    /// hashing (or serialising) a million addresses on every tick was most of
    /// an idle controller's CPU and a 35 MB copy at 1M peers.
    pub fn persisted_fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            self.generation,
            self.sources
                .iter()
                .map(|s| (&s.name, s.max_revision))
                .collect::<Vec<_>>(),
            // A minute's resolution: a clean result every 200 ms must not
            // rewrite (and fsync) the state file every 200 ms.
            self.last_good_ms.map(|t| t / 60_000),
            self.last_good_len,
        )
            .hash(&mut h);
        for (n, a) in &self.absent {
            (n, a.since_ms, a.graceful).hash(&mut h);
        }
        self.held.hash(&mut h);
        self.approved.hash(&mut h);
        h.finish()
    }

    pub fn persisted(&self) -> Persisted {
        Persisted {
            generation: self.generation,
            absent: self.absent.clone(),
            last_good: Vec::new(),
            last_good_members: Some(self.last_good_len as u64),
            last_good_ms: self.last_good_ms,
            held: self.held.clone(),
            approved: self.approved.clone(),
            max_revision: self.sources[0].max_revision,
            source_revisions: self
                .sources
                .iter()
                .filter_map(|s| Some((s.name.clone(), s.max_revision?)))
                .collect(),
        }
    }

    pub fn status(&self) -> CoreStatus {
        let mut alarms = Vec::new();
        if let Some(f) = &self.freeze {
            match &self.freeze_source {
                Some(src) => alarms.push(format!("deletions frozen: {src}: {}", f.describe())),
                None => alarms.push(format!("deletions frozen: {}", f.describe())),
            }
        }
        for src in &self.sources {
            if let Some(since) = src.failing_since
                && self.now.saturating_sub(since) >= self.g.source_failed_alarm_ms
            {
                alarms.push(format!(
                    "discovery source {} has failed for {} s",
                    src.name,
                    (self.now - since) / 1000
                ));
            }
        }
        if let Some(e) = &self.last_fail {
            alarms.push(format!("last commit failed: {e}"));
        }
        let vetoed = self
            .kept
            .values()
            .filter(|k| matches!(k, Kept::Traffic { .. }))
            .count();
        if vetoed > 0 {
            alarms.push(format!(
                "discovery says gone, traffic says alive: {vetoed} peers kept past their grace (for at most {} s more each)",
                self.g.liveness_max_extend_ms / 1000
            ));
        }
        CoreStatus {
            now_ms: self.now,
            generation: self.generation,
            synced: self.synced,
            freeze: self.freeze.clone(),
            alarms,
            absent: self
                .absent
                .iter()
                .map(|(n, a)| AbsentView {
                    peer: *n,
                    since_ms: a.since_ms,
                    graceful: a.graceful,
                    evict_at_ms: a.since_ms + self.grace(a),
                })
                .collect(),
            held: self.held.iter().copied().collect(),
            awaiting_approval: self
                .awaiting()
                .map(|(n, a)| AbsentView {
                    peer: n,
                    since_ms: a.since_ms,
                    graceful: a.graceful,
                    evict_at_ms: a.since_ms + self.grace(&a),
                })
                .collect(),
            approved: self.approved.iter().copied().collect(),
            budget_limited: self.budget_limited,
            last_result: self.last_result.clone(),
            peers: self.committed.len() as u64,
            evictions_total: self.evictions_total,
            commits_total: self.commits_total,
            commit_failures_total: self.commit_failures_total,
            liveness: self
                .kept
                .iter()
                .filter_map(|(n, k)| {
                    let a = self.absent.get(n)?;
                    let w = self.watch.get(n);
                    let (state, deadline_ms) = match *k {
                        Kept::Traffic { deadline_ms } => ("traffic", deadline_ms),
                        Kept::Watching { deadline_ms } => ("watching", deadline_ms),
                    };
                    Some(LivenessView {
                        peer: *n,
                        absent_since_ms: a.since_ms,
                        grace_end_ms: a.since_ms + self.grace(a),
                        state: state.into(),
                        last_traffic_ms: w.and_then(|w| w.grew_ms),
                        traffic_ticks: w.map_or(0, |w| w.grown),
                        deadline_ms,
                    })
                })
                .collect(),
            vetoes_total: self.vetoes_total,
            freeze_source: self.freeze_source.clone(),
            sources: self
                .sources
                .iter()
                .map(|s| SourceView {
                    name: s.name.clone(),
                    last: match &s.last {
                        None => "none".into(),
                        Some(Verdict::Clean { .. }) => "clean".into(),
                        Some(Verdict::Frozen(f)) => f.name().into(),
                    },
                    max_revision: s.max_revision,
                    failing_since_ms: s.failing_since,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::OPERATOR;

    fn p(i: u8) -> IpNet {
        format!("198.18.0.{i}/32").parse().unwrap()
    }
    fn alive(ids: &[u8]) -> Discovery {
        Discovery::Complete {
            members: ids
                .iter()
                .map(|i| Member {
                    net: p(*i),
                    status: MemberStatus::Alive,
                })
                .collect(),
            meta: SourceMeta {
                healthy: true,
                ..Default::default()
            },
        }
    }
    /// The other guards' tests run without the liveness veto; its own tests
    /// below turn it on.
    fn g() -> Guards {
        Guards {
            grace_ms: 10_000,
            graceful_grace_ms: 2_000,
            liveness_max_extend_ms: 0,
            ..Guards::default()
        }
    }
    fn live_g() -> Guards {
        Guards {
            liveness_window_ms: 3_000,
            liveness_max_extend_ms: 20_000,
            ..g()
        }
    }
    /// Read every candidate's counter from `hits` (absent: 0), as the daemon does.
    fn sample(c: &mut Core, now: u64, hits: &BTreeMap<IpNet, u64>) {
        let s: Vec<(IpNet, u64)> = c
            .liveness_candidates()
            .into_iter()
            .map(|n| (n, hits.get(&n).copied().unwrap_or(0)))
            .collect();
        c.handle_traffic(now, &s);
    }

    /// Drive a core with samples every second from `from` to `to`; `traffic`
    /// says whether peer 4 sends at a given second. Returns when 4 was evicted.
    fn run_liveness(
        traffic: impl Fn(u64) -> bool,
        from: u64,
        to: u64,
        c: &mut Core,
    ) -> Option<u64> {
        let mut hits = BTreeMap::new();
        let mut t = from;
        while t <= to {
            if traffic(t) {
                *hits.entry(p(4)).or_insert(0) += 1;
            }
            sample(c, t, &hits);
            c.handle_tick(t);
            if drain(c, t)
                .iter()
                .any(|pl| pl.changes.remove.contains(&p(4)))
            {
                return Some(t);
            }
            t += 1_000;
        }
        None
    }

    fn two(g: Guards) -> Core {
        Core::with_sources(
            g,
            PeerSet::new(),
            0,
            None,
            0,
            &["serf".into(), "etcd".into()],
        )
    }

    #[test]
    fn a_peer_is_absent_only_when_every_source_omits_it() {
        let mut c = two(g());
        c.handle_discovery_from(0, 0, alive(&[1, 2, 3, 4]));
        // Additions flow from one source, before the other has spoken.
        assert_eq!(drain(&mut c, 0)[0].changes.add.len(), 4);
        assert_eq!(c.freeze(), Some(&Freeze::NotSynced));
        assert_eq!(c.status().freeze_source.as_deref(), Some("etcd"));
        c.handle_discovery_from(500, 1, alive(&[1, 2, 3, 4, 5]));
        assert_eq!(drain(&mut c, 500)[0].changes.add, vec![(p(5), DISCOVERY)]);
        assert_eq!(c.freeze(), None);
        // serf loses 4: etcd still lists it, so it is not absent.
        c.handle_discovery_from(1_000, 0, alive(&[1, 2, 3, 5]));
        assert!(c.absent().is_empty());
        c.handle_tick(60_000);
        assert!(drain(&mut c, 60_000).is_empty());
        // Now etcd omits it too: absent from then, evicted a grace later.
        c.handle_discovery_from(61_000, 1, alive(&[1, 2, 3, 5]));
        assert_eq!(c.absent()[&p(4)].since_ms, 61_000);
        c.handle_tick(71_000);
        assert_eq!(drain(&mut c, 71_000)[0].changes.remove, vec![p(4)]);
    }

    #[test]
    fn any_unclean_source_freezes_deletions_and_a_long_failure_raises_its_alarm() {
        let g = Guards {
            source_failed_alarm_ms: 30_000,
            ..g()
        };
        let mut c = two(g);
        c.handle_discovery_from(0, 0, alive(&[1, 2, 3, 4]));
        c.handle_discovery_from(0, 1, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery_from(1_000, 0, alive(&[1, 2, 3]));
        c.handle_discovery_from(
            1_000,
            1,
            Discovery::Failed {
                reason: "connection refused".into(),
                meta: SourceMeta::default(),
            },
        );
        c.handle_discovery_from(1_500, 0, alive(&[1, 2, 3]));
        assert!(matches!(c.freeze(), Some(Freeze::Failed { .. })));
        let st = c.status();
        assert_eq!(st.freeze_source.as_deref(), Some("etcd"));
        assert!(
            st.alarms[0].starts_with("deletions frozen: etcd: discovery failed"),
            "{:?}",
            st.alarms
        );
        assert_eq!(st.sources[1].last, "failed");
        c.handle_tick(20_000);
        assert!(drain(&mut c, 20_000).is_empty(), "held while etcd fails");
        assert!(
            !c.status()
                .alarms
                .iter()
                .any(|a| a.contains("has failed for"))
        );
        c.handle_tick(31_000);
        assert!(
            c.status()
                .alarms
                .iter()
                .any(|a| a == "discovery source etcd has failed for 30 s"),
            "{:?}",
            c.status().alarms
        );
        // etcd recovers, also without 4: every source clean, 4 absent from now.
        c.handle_discovery_from(32_000, 1, alive(&[1, 2, 3]));
        assert_eq!(c.freeze(), None);
        // Absent from when the last source agreed, not from serf's word alone.
        assert_eq!(c.absent()[&p(4)].since_ms, 32_000);
        assert!(
            c.status()
                .sources
                .iter()
                .all(|s| s.last == "clean" && s.failing_since_ms.is_none())
        );
        c.handle_tick(42_000);
        assert_eq!(drain(&mut c, 42_000)[0].changes.remove, vec![p(4)]);
    }

    #[test]
    fn revisions_are_per_source_and_survive_a_restart() {
        let mut c = two(g());
        let at = |ids: &[u8], rev: u64| match alive(ids) {
            Discovery::Complete { members, .. } => Discovery::Complete {
                members,
                meta: SourceMeta {
                    revision: Some(rev),
                    healthy: true,
                    health_reason: None,
                },
            },
            _ => unreachable!(),
        };
        c.handle_discovery_from(0, 0, at(&[1, 2], 100));
        // etcd's revision 5 is not stale: revisions are per source.
        c.handle_discovery_from(0, 1, at(&[1, 2], 5));
        assert_eq!(c.freeze(), None);
        let p1 = c.persisted();
        assert_eq!(p1.max_revision, Some(100));
        assert_eq!(p1.source_revisions["etcd"], 5);
        let mut c = Core::with_sources(
            g(),
            c.committed().clone(),
            1,
            Some(p1),
            1_000,
            &["serf".into(), "etcd".into()],
        );
        c.handle_discovery_from(1_000, 0, at(&[1, 2], 100));
        c.handle_discovery_from(1_000, 1, at(&[1, 2], 4));
        assert!(matches!(
            c.freeze(),
            Some(Freeze::Stale {
                revision: 4,
                seen: 5
            })
        ));
    }

    #[test]
    fn a_silent_absent_peer_is_evicted_when_its_grace_ends() {
        let mut c = Core::new(live_g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        // Grace ends at 11 s; watched from 5 s (two windows before), silent.
        let at = run_liveness(|_| false, 1_000, 60_000, &mut c);
        assert_eq!(at, Some(11_000));
        assert!(c.status().liveness.is_empty());
    }

    #[test]
    fn traffic_vetoes_the_eviction_until_it_stops_or_the_cap() {
        // Traffic until 20 s: kept past the 11 s grace, evicted a window
        // after the last packet seen.
        let mut c = Core::new(live_g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        let mut t = 1_000;
        let mut hits = BTreeMap::new();
        while t <= 12_000 {
            *hits.entry(p(4)).or_insert(0) += 5;
            sample(&mut c, t, &hits);
            c.handle_tick(t);
            assert!(drain(&mut c, t).is_empty(), "evicted at {t} with traffic");
            t += 1_000;
        }
        let s = c.status();
        assert_eq!(s.liveness.len(), 1, "{s:?}");
        let v = &s.liveness[0];
        assert_eq!(
            (v.peer, v.state.as_str(), v.last_traffic_ms),
            (p(4), "traffic", Some(12_000))
        );
        assert_eq!(v.deadline_ms, 15_000);
        assert!(v.traffic_ticks > 0);
        assert!(
            s.alarms.iter().any(|a| a.contains("traffic says alive")),
            "{:?}",
            s.alarms
        );
        assert_eq!(s.vetoes_total, 1);
        let at = run_liveness(|t| t <= 20_000, 13_000, 60_000, &mut c);
        assert_eq!(at, Some(23_000), "a window after the last traffic");
        assert_eq!(c.status().vetoes_total, 1, "one veto, however long");

        // Traffic for ever (a spoofed source): evicted at the cap, grace
        // end + liveness_max_extend_ms.
        let mut c = Core::new(live_g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        let at = run_liveness(|_| true, 1_000, 100_000, &mut c);
        assert_eq!(at, Some(31_000));
    }

    #[test]
    fn no_eviction_before_a_whole_window_of_watched_silence() {
        // A restarted controller (no samples yet) finds a peer past its grace:
        // it watches a whole window before it evicts, and keeps it if it talks.
        let mut c = Core::new(live_g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        c.handle_tick(12_000);
        assert!(drain(&mut c, 12_000).is_empty(), "never read: kept");
        assert_eq!(c.status().liveness[0].state, "watching");
        let at = run_liveness(|_| false, 12_000, 60_000, &mut c);
        assert_eq!(
            at,
            Some(15_000),
            "first read at 12 s, a 3 s window of silence"
        );
        // CIDR entries have no counter: the rule does not apply to them.
        let net: IpNet = "198.18.4.0/24".parse().unwrap();
        let mut c = Core::new(live_g(), PeerSet::new(), 0, None, 0);
        let with_net = |nets: &[IpNet]| Discovery::Complete {
            members: nets
                .iter()
                .map(|n| Member {
                    net: *n,
                    status: MemberStatus::Alive,
                })
                .collect(),
            meta: SourceMeta {
                healthy: true,
                ..Default::default()
            },
        };
        c.handle_discovery(0, with_net(&[p(1), p(2), p(3), net]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, with_net(&[p(1), p(2), p(3)]));
        assert!(c.liveness_candidates().is_empty());
        c.handle_tick(11_000);
        assert_eq!(drain(&mut c, 11_000)[0].changes.remove, vec![net]);
    }

    #[test]
    fn a_reset_counter_is_a_new_baseline_and_the_veto_can_be_turned_off() {
        let mut c = Core::new(live_g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        c.handle_traffic(6_000, &[(p(4), 100)]);
        c.handle_traffic(7_000, &[(p(4), 3)]);
        c.handle_traffic(11_000, &[(p(4), 3)]);
        c.handle_tick(11_000);
        assert_eq!(drain(&mut c, 11_000)[0].changes.remove, vec![p(4)]);
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        assert!(c.liveness_candidates().is_empty(), "off: nothing to read");
        c.handle_tick(11_000);
        assert_eq!(drain(&mut c, 11_000)[0].changes.remove, vec![p(4)]);
    }
    /// Run the core against an always-succeeding datapath.
    fn drain(c: &mut Core, now: u64) -> Vec<CommitPlan> {
        let mut out = vec![];
        while let Some(Action::Commit(plan)) = c.poll_action() {
            let generation = c.generation() + 1;
            c.handle_commit_result(
                now,
                CommitResult::Committed {
                    generation,
                    added: plan.changes.add.clone(),
                    removed: plan.changes.remove.clone(),
                },
            );
            out.push(plan);
        }
        out
    }

    #[test]
    fn adds_flow_and_absence_waits_for_the_grace() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        assert_eq!(drain(&mut c, 0)[0].changes.add.len(), 4);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        c.handle_tick(10_999);
        assert!(drain(&mut c, 10_999).is_empty(), "not before the grace");
        assert_eq!(c.poll_timeout(), Some(11_000));
        c.handle_tick(11_000);
        let plans = drain(&mut c, 11_000);
        assert_eq!(plans[0].changes.remove, vec![p(4)]);
        assert_eq!(plans[0].evictions[0].1.since_ms, 1_000);
    }

    #[test]
    fn a_clean_result_alone_rewrites_the_state_file_at_most_once_a_minute() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        let first = c.persisted_fingerprint();
        // The same members again and again within the minute: no rewrite.
        for t in [1_200, 1_400, 30_000, 59_000] {
            c.handle_discovery(t, alive(&[1, 2, 3]));
            assert_eq!(c.persisted_fingerprint(), first, "at {t} ms");
        }
        // A minute on, the time of the last clean result is worth writing.
        c.handle_discovery(61_000, alive(&[1, 2, 3]));
        assert_ne!(c.persisted_fingerprint(), first);
        // The file carries the count, not the list.
        let json = serde_json::to_string(&c.persisted()).unwrap();
        assert!(json.contains("\"last_good_members\":3"), "{json}");
        assert!(!json.contains("\"last_good\""), "{json}");
        // A file written before keeps its meaning: the list is counted.
        let old = r#"{"generation":0,"absent":{},"last_good":["198.18.0.1/32","198.18.0.2/32"],
            "last_good_ms":5,"held":[],"approved":[],"max_revision":null}"#;
        let old: Persisted = serde_json::from_str(old).unwrap();
        let c = Core::new(g(), PeerSet::new(), 0, Some(old), 10);
        assert_eq!(c.persisted().last_good_members, Some(2));
    }

    #[test]
    fn discovery_never_adds_a_broad_prefix_and_maps_v4_in_v6_to_v4() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let d = Discovery::Complete {
            members: [
                "0.0.0.0/0",
                "128.0.0.0/1",
                "::/0",
                "2001::/16",
                "::ffff:198.18.0.7/128",
                "198.18.4.0/24",
            ]
            .iter()
            .map(|s| Member {
                net: net(s),
                status: MemberStatus::Alive,
            })
            .collect(),
            meta: SourceMeta {
                healthy: true,
                ..Default::default()
            },
        };
        c.handle_discovery(0, d);
        let plans = drain(&mut c, 0);
        let added: Vec<IpNet> = plans[0].changes.add.iter().map(|(n, _)| *n).collect();
        assert_eq!(added, vec![net("198.18.0.7/32"), net("198.18.4.0/24")]);
        assert!(c.status().last_result.unwrap().starts_with("partial"));
    }

    #[test]
    fn too_many_members_is_an_invalid_result_by_type_not_by_message() {
        let g = Guards {
            max_members: 3,
            ..g()
        };
        let mut c = Core::new(g, PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        assert!(
            drain(&mut c, 0).is_empty(),
            "a rejected result adds nothing"
        );
        assert!(
            matches!(c.freeze, Some(Freeze::Invalid { .. })),
            "{:?}",
            c.freeze
        );
        // A source's failure that merely mentions the setting is a failure.
        c.handle_discovery(
            1,
            Discovery::Failed {
                reason: "guards.max_members".into(),
                meta: SourceMeta::default(),
            },
        );
        assert!(
            matches!(c.freeze, Some(Freeze::Failed { .. })),
            "{:?}",
            c.freeze
        );
    }

    #[test]
    fn reappearing_cancels_the_absence() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2, 3]));
        c.handle_discovery(5_000, alive(&[1, 2, 3, 4]));
        c.handle_tick(60_000);
        assert!(drain(&mut c, 60_000).is_empty());
    }

    #[test]
    fn every_guard_freezes_deletions_but_not_additions() {
        let meta = SourceMeta {
            healthy: true,
            ..Default::default()
        };
        let bad = [
            Discovery::Failed {
                reason: "timeout".into(),
                meta: meta.clone(),
            },
            Discovery::Partial {
                members: vec![Member {
                    net: p(9),
                    status: MemberStatus::Alive,
                }],
                meta: meta.clone(),
                reason: "page 2 failed".into(),
            },
            Discovery::Complete {
                members: vec![],
                meta: meta.clone(),
            },
            Discovery::Complete {
                members: vec![Member {
                    net: p(9),
                    status: MemberStatus::Alive,
                }],
                meta: SourceMeta {
                    healthy: false,
                    health_reason: Some("agent sees only itself".into()),
                    ..Default::default()
                },
            },
        ];
        for d in bad {
            let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
            c.handle_discovery(0, alive(&[1, 2, 3, 4]));
            drain(&mut c, 0);
            c.handle_discovery(1_000, alive(&[1, 2, 3])); // 4 goes absent, cleanly
            c.handle_discovery(2_000, d.clone());
            c.handle_tick(100_000);
            let plans = drain(&mut c, 100_000);
            assert!(
                plans.iter().all(|p| p.changes.remove.is_empty()),
                "{d:?} must freeze deletions"
            );
            assert_eq!(c.status().held, vec![p(4)], "{d:?}");
            if !d.members().is_empty() {
                assert!(
                    c.committed().contains_key(&p(9)),
                    "{d:?}: additions still flow"
                );
            }
            // A clean result lifts the freeze and the due eviction goes through.
            c.handle_discovery(100_001, alive(&[1, 2, 3, 9]));
            assert_eq!(
                drain(&mut c, 100_001)
                    .iter()
                    .flat_map(|p| p.changes.remove.clone())
                    .collect::<Vec<_>>(),
                vec![p(4)]
            );
        }
    }

    #[test]
    fn stale_revisions_are_ignored_and_freeze() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        let rev = |ids: &[u8], r| match alive(ids) {
            Discovery::Complete { members, .. } => Discovery::Complete {
                members,
                meta: SourceMeta {
                    revision: Some(r),
                    healthy: true,
                    health_reason: None,
                },
            },
            _ => unreachable!(),
        };
        c.handle_discovery(0, rev(&[1, 2, 3, 4], 10));
        drain(&mut c, 0);
        c.handle_discovery(1_000, rev(&[1, 2, 3], 11));
        c.handle_discovery(2_000, rev(&[1, 2], 9)); // stale: must not start 3's absence
        assert!(!c.absent().contains_key(&p(3)));
        // Nor add what only a superseded revision lists, nor count 4 (gone
        // at revision 11) as present again.
        c.handle_discovery(3_000, rev(&[1, 2, 4, 7], 8));
        assert!(
            drain(&mut c, 3_000).is_empty(),
            "nothing added from a stale result"
        );
        assert!(c.absent().contains_key(&p(4)), "4's absence keeps running");
        c.handle_tick(50_000);
        assert!(
            drain(&mut c, 50_000).is_empty(),
            "frozen by the stale result"
        );
        assert!(matches!(
            c.freeze(),
            Some(Freeze::Stale {
                revision: 8,
                seen: 11
            })
        ));
    }

    #[test]
    fn a_mass_removal_shows_at_once_and_an_early_approval_applies_when_the_grace_ends() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4, 5, 6]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2])); // 4 of 6 absent: > 50 %
        let st = c.status();
        assert!(st.held.is_empty(), "nothing is due yet");
        let waiting: Vec<(IpNet, u64)> = st
            .awaiting_approval
            .iter()
            .map(|a| (a.peer, a.evict_at_ms))
            .collect();
        assert_eq!(
            waiting,
            [3, 4, 5, 6].map(|i| (p(i), 1_000 + g().grace_ms)).to_vec(),
            "listed at once, with the time the grace ends"
        );
        // Approved right away: nothing happens before the grace ends...
        assert_eq!(c.approve(1_001, None).len(), 4);
        assert!(c.status().awaiting_approval.is_empty());
        c.handle_tick(1_000 + g().grace_ms - 1);
        assert!(drain(&mut c, 1_000 + g().grace_ms - 1).is_empty());
        // ...and everything after, with no second approval.
        c.handle_tick(1_000 + g().grace_ms);
        let removed: usize = drain(&mut c, 1_000 + g().grace_ms)
            .iter()
            .map(|p| p.changes.remove.len())
            .sum();
        assert_eq!(removed, 4);
    }

    #[test]
    fn mass_removal_needs_approval() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1, 2, 3, 4, 5, 6]));
        drain(&mut c, 0);
        c.handle_discovery(1_000, alive(&[1, 2])); // 4 of 6 absent: > 50 %
        c.handle_tick(20_000);
        assert!(drain(&mut c, 20_000).is_empty());
        assert_eq!(c.status().held.len(), 4);
        let approved = c.approve(20_001, None);
        assert_eq!(approved.len(), 4);
        let removed: usize = drain(&mut c, 20_001)
            .iter()
            .map(|p| p.changes.remove.len())
            .sum();
        assert_eq!(removed, 4);
    }

    #[test]
    fn graceful_leave_uses_the_shorter_grace_and_budget_spreads_evictions() {
        let guards = Guards {
            evict_burst: 2,
            evict_rate_per_min: 60,
            ..g()
        };
        let mut c = Core::new(guards, PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&(1..=10).collect::<Vec<_>>()));
        drain(&mut c, 0);
        let mut members: Vec<Member> = (1..=6)
            .map(|i| Member {
                net: p(i),
                status: MemberStatus::Alive,
            })
            .collect();
        members.extend((7..=10).map(|i| Member {
            net: p(i),
            status: MemberStatus::Left,
        }));
        c.handle_discovery(
            1_000,
            Discovery::Complete {
                members,
                meta: SourceMeta {
                    healthy: true,
                    ..Default::default()
                },
            },
        );
        c.handle_tick(3_000);
        assert_eq!(
            drain(&mut c, 3_000)
                .iter()
                .map(|p| p.changes.remove.len())
                .sum::<usize>(),
            2,
            "burst of 2"
        );
        assert_eq!(c.status().budget_limited, 2);
        let next = c.poll_timeout().unwrap();
        assert!(next > 3_000 && next <= 4_000, "{next}");
        c.handle_tick(5_000);
        assert_eq!(
            drain(&mut c, 5_000)
                .iter()
                .map(|p| p.changes.remove.len())
                .sum::<usize>(),
            2
        );
    }

    #[test]
    fn a_restart_deletes_nothing_until_a_clean_result() {
        let committed: PeerSet = (1..=4)
            .map(|i| (p(i), DISCOVERY))
            .chain([(p(50), OPERATOR)])
            .collect();
        let persisted = Persisted {
            absent: [(
                p(4),
                Absence {
                    since_ms: 0,
                    graceful: false,
                },
            )]
            .into(),
            ..Default::default()
        };
        let mut c = Core::new(g(), committed, 7, Some(persisted), 100_000);
        c.handle_tick(100_000);
        assert!(drain(&mut c, 100_000).is_empty(), "first-sync gate");
        assert_eq!(c.status().held, vec![p(4)]);
        c.handle_discovery(100_001, alive(&[1, 2, 3]));
        let plans = drain(&mut c, 100_001);
        assert_eq!(
            plans[0].changes.remove,
            vec![p(4)],
            "restored timer, already due"
        );
        assert!(
            c.committed().contains_key(&p(50)),
            "operator entries are never touched"
        );
    }

    #[test]
    fn failed_commits_retry_with_backoff_and_refund_the_budget() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        c.handle_discovery(0, alive(&[1]));
        assert!(matches!(c.poll_action(), Some(Action::Commit(_))));
        c.handle_commit_result(
            0,
            CommitResult::Failed {
                reason: "map full".into(),
            },
        );
        assert_eq!(c.poll_action(), None);
        assert_eq!(c.poll_timeout(), Some(500));
        c.handle_tick(500);
        assert!(matches!(c.poll_action(), Some(Action::Commit(_))));
    }

    #[test]
    fn invalid_entries_downgrade_to_partial() {
        let mut c = Core::new(g(), PeerSet::new(), 0, None, 0);
        let members = vec![
            Member {
                net: p(1),
                status: MemberStatus::Alive,
            },
            Member {
                net: p(2),
                status: MemberStatus::Alive,
            },
            Member {
                net: p(2),
                status: MemberStatus::Failed,
            },
            Member {
                net: "0.0.0.0/32".parse().unwrap(),
                status: MemberStatus::Alive,
            },
        ];
        c.handle_discovery(
            0,
            Discovery::Complete {
                members,
                meta: SourceMeta {
                    healthy: true,
                    ..Default::default()
                },
            },
        );
        assert!(matches!(c.freeze(), Some(Freeze::Partial { .. })));
        let plans = drain(&mut c, 0);
        assert_eq!(plans[0].changes.add, vec![(p(1), DISCOVERY)]);
    }
}
