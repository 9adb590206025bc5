//! `firewall-ctl run`: the daemon loop, a thin adapter around the core.
//!
//! It is the only reader of the real clock. It feeds discovery results and
//! time to the core, runs the commits the core asks for against the pinned
//! maps (under the commit lock), reports their results back, and writes the
//! state directory: `state.json` (persisted core state), `audit.jsonl`,
//! `status.json`, and `metrics.prom` (Prometheus text format, for a textfile
//! collector). SIGTERM or SIGINT stops it; the datapath keeps enforcing.
//! SIGHUP re-reads the config (`reload`): guards, source, interfaces and
//! tick take effect with all state kept; a config it cannot use is refused
//! and the old one stays.

use std::collections::BTreeSet;
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

pub mod config;
pub mod contract;
pub mod metrics;
pub mod sdnotify;
pub mod state;

use config::{Config, SourceConfig};
use contract::{AuditEvent, AuditLine, ControllerStatus, Eviction, Plan, PlanSource};

use crate::{
    commit::{Committed, commit},
    core::{Action, CommitResult, Core, CoreStatus},
    datapath::{attach, store::KernelStore},
    discovery::Discovery,
    sources,
    store::StoreError,
    sys::lock::CommitLock,
};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a watch event can mean the file's content changed. inotify also
/// reports opens, reads and closes without writing; reacting to those made
/// the daemon re-read its file in a loop, since each read is an open
/// (~12,000 a second, half a core, for ever).
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

/// The file source: re-read when the file changes (written, replaced by
/// rename, created or removed), and every `poll_ms` as a backstop (notify
/// can miss events, e.g. on network filesystems). Reads and parses run on a
/// blocking thread, never on the runtime: a 32 MB file takes a second to
/// parse, and the runtime must keep answering SIGTERM and its timers.
/// The channel holds one result: a slow core sees the latest data, not a backlog.
fn spawn_file_source(
    path: PathBuf,
    poll_ms: u64,
    max_bytes: u64,
) -> anyhow::Result<(mpsc::Receiver<Discovery>, notify::RecommendedWatcher)> {
    use notify::Watcher as _;
    let (tx, rx) = mpsc::channel::<Discovery>(1);
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match res {
            Ok(ev) => {
                is_change(&ev.kind)
                    && (ev.paths.is_empty()
                        || ev.paths.iter().any(|p| p.file_name() == name.as_deref()))
            }
            Err(_) => true, // a watch error: re-read to be sure
        };
        if relevant {
            let _ = wake_tx.try_send(());
        }
    })
    .context("starting the file watcher")?;
    // Watch the directory: editors and atomic writers replace the file by rename.
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into());
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}: does the directory exist?", dir.display()))?;
    tokio::spawn(async move {
        loop {
            let p = path.clone();
            let d = match tokio::task::spawn_blocking(move || {
                // Test-only: a read that never returns (a hung network
                // filesystem), to show the stall deadline catching it.
                if let Some(ms) = crate::failpoint("file-source-hang-ms") {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                sources::file::read(&p, max_bytes)
            })
            .await
            {
                Ok(d) => d,
                Err(e) => Discovery::Failed {
                    reason: format!("reading {} panicked: {e}", path.display()),
                    meta: Default::default(),
                },
            };
            if tx.send(d).await.is_err() {
                return;
            }
            tokio::select! {
                _ = wake_rx.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(poll_ms)) => {}
            }
        }
    });
    Ok((rx, watcher))
}

/// A condition that can last (a failing source): logged when it starts, when
/// its description changes, and when it ends, with a reminder every
/// `REMIND_MS` while it lasts; never once per retry, which flooded the log
/// with thousands of identical lines a second exactly when it was needed.
#[derive(Default)]
struct Condition {
    current: Option<(String, u64)>,
}

const REMIND_MS: u64 = 60_000;

impl Condition {
    /// `Some(description)` while the condition holds.
    fn observe(&mut self, now: u64, what: &str, state: Option<&str>) {
        match (&mut self.current, state) {
            (None, Some(s)) => {
                tracing::warn!(condition = what, "{what}: {s}");
                self.current = Some((s.to_string(), now));
            }
            (Some((old, _)), Some(s)) if old != s => {
                tracing::warn!(condition = what, "{what} (changed): {s}");
                self.current = Some((s.to_string(), now));
            }
            (Some((s, since)), Some(_)) if now.saturating_sub(*since) >= REMIND_MS => {
                tracing::warn!(condition = what, "{what} (still): {s}");
                *since = now;
            }
            (Some((s, _)), None) => {
                tracing::info!(condition = what, "{what} ended (was: {s})");
                self.current = None;
            }
            _ => {}
        }
    }
}

struct Daemon {
    cfg: Config,
    core: Core,
    store: KernelStore,
    committed: Committed,
    /// Metrics and health, shared with the HTTP endpoint.
    shared: metrics::SharedState,
    /// `Core::persisted_fingerprint` of what state.json holds.
    persisted_fp: Option<u64>,
    /// The core status last published, and when.
    published: (Vec<u8>, u64),
    /// The peers the liveness veto kept after the last turn, and when the
    /// hit counters were last read.
    vetoed: BTreeSet<ipnet::IpNet>,
    traffic_read_ms: u64,
}

/// How often the daemon reads the hit counters the core asks for.
const TRAFFIC_READ_MS: u64 = 1_000;

const REPUBLISH_MS: u64 = 5_000;

/// The most additions one audit line lists by address.
const AUDIT_LIST_MAX: usize = 1_000;
/// How often the flow filter is rebuilt from the flow table, so the bytes
/// of flows that left it (idle, evicted) clear. Between rebuilds the filter
/// only gains bytes; one rebuild walks the table once (19 ms at 65,536
/// flows, 340 ms at 1M: `cargo xtask bench controller`).
const FLOW_FILTER_REBUILD_MS: u64 = 10_000;

/// Rebuild the flow filter every `FLOW_FILTER_REBUILD_MS`, on a blocking
/// thread (the walk is syscalls and a pass over the filter). A failure is
/// logged when it starts and when it ends, and counted; the filter it left
/// is still sound (see `firewall_common::flow::FilterLine`).
fn spawn_filter_rebuilds(pin_dir: std::path::PathBuf, shared: metrics::SharedState) {
    let period_ms = crate::failpoint("flow-filter-rebuild-ms").unwrap_or(FLOW_FILTER_REBUILD_MS);
    tokio::spawn(async move {
        let mut failing = false;
        let mut wait_ms = period_ms;
        loop {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            let dir = pin_dir.clone();
            let t0 = std::time::Instant::now();
            let r = tokio::task::spawn_blocking(move || {
                crate::datapath::flows::FlowFilter::open(&dir).and_then(|f| f.rebuild())
            })
            .await;
            // At most a tenth of a core, however large the table.
            wait_ms = period_ms.max(10 * t0.elapsed().as_millis() as u64);
            let report = match r {
                Ok(Ok(report)) => {
                    if failing {
                        tracing::info!("flow filter rebuilt again");
                    }
                    failing = false;
                    tracing::debug!(
                        flows = report.flows,
                        set = report.set,
                        slots = report.slots,
                        "flow filter rebuilt"
                    );
                    Some(report)
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!(error = %e, "flow filter not rebuilt; dropped packets may look up the flow table more often");
                    }
                    failing = true;
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "flow filter rebuild panicked");
                    None
                }
            };
            shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .metrics
                .observe_filter(report.as_ref());
        }
    });
}

impl Daemon {
    fn shared_lock(&self) -> std::sync::MutexGuard<'_, metrics::Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the HTTP endpoint serves: the core's metrics and the health the
    /// loop vouches for, after every turn of the loop.
    fn refresh_shared(&self, tracked: &[Tracked]) {
        let s = self.core.status();
        let now = now_ms();
        let mut g = self.shared_lock();
        g.metrics.update_core(&s, &self.committed.set, now);
        g.metrics.interfaces.clone_from(&self.cfg.interfaces);
        g.health = metrics::Health {
            loop_at_ms: now,
            loop_limit_ms: 3 * self.cfg.tick_ms + 5_000,
            synced: s.synced,
            sources: tracked
                .iter()
                .map(|t| (t.name.clone(), t.last_result_ms, t.stall_ms))
                .collect(),
            interfaces: self.cfg.interfaces.clone(),
        };
    }

    /// Tell systemd how the turn went (a no-op outside systemd). Ready once
    /// the controller enforces a datapath it vouches for: an adopted
    /// committed generation, or the first clean sync on a new node.
    fn notify_turn(&self, n: &mut sdnotify::Notifier) {
        let s = self.core.status();
        n.turn(
            self.committed.generation > 0 || s.synced,
            &sdnotify::status_line(&s),
        );
    }

    /// Hand the core the hit counters it asked for, and audit the peers the
    /// veto newly keeps. At most once a second, and never more than a tenth
    /// of the loop's time: after a mass removal of 1M peers one read takes
    /// ~150 ms (`cargo xtask bench controller`), so reads then space out to
    /// every ~1.5 s, well inside the liveness window.
    fn read_traffic(&mut self) {
        let now = now_ms();
        if now >= self.traffic_read_ms {
            let want = self.core.liveness_candidates();
            let mut took_ms = 0;
            if !want.is_empty() {
                let t0 = std::time::Instant::now();
                let samples = self.store.hits_of(&want);
                took_ms = t0.elapsed().as_millis() as u64;
                self.core.handle_traffic(now, &samples);
            }
            self.traffic_read_ms = now + TRAFFIC_READ_MS.max(10 * took_ms);
        }
        let vetoed: BTreeSet<ipnet::IpNet> = self.core.vetoed().into_iter().collect();
        let new: Vec<ipnet::IpNet> = vetoed.difference(&self.vetoed).copied().collect();
        if !new.is_empty() {
            tracing::warn!(
                peers = new.len(),
                first = %new[0],
                "discovery says gone, traffic says alive: eviction postponed"
            );
            self.audit(AuditEvent::LivenessVeto { peers: new });
        }
        self.vetoed = vetoed;
    }

    fn audit(&self, event: AuditEvent) {
        let line = AuditLine {
            ts_ms: now_ms(),
            event,
        };
        if let Err(e) = state::audit(&self.cfg.state_dir, &line) {
            tracing::error!("audit log: {e:#}");
        }
    }

    /// Persist the core's state when it changed (fsync'd, atomic).
    fn persist(&mut self) -> anyhow::Result<()> {
        let fp = self.core.persisted_fingerprint();
        if self.persisted_fp != Some(fp) {
            let bytes = serde_json::to_vec_pretty(&self.core.persisted())?;
            state::write_atomic(&self.cfg.state_dir.join(state::STATE_FILE), &bytes)?;
            self.persisted_fp = Some(fp);
        }
        Ok(())
    }

    /// Publish status.json and metrics.prom when the core's status changed,
    /// and at least every `REPUBLISH_MS` (so `updated_ms` shows the daemon is
    /// alive); not on every wake-up, which rewrote both files for nothing.
    fn publish(&mut self, running: bool) {
        let s = self.core.status();
        // The core's clock moves on every tick; compare the status without
        // it, or every tick would count as a change.
        let core = serde_json::to_vec(&CoreStatus {
            now_ms: 0,
            ..s.clone()
        })
        .unwrap_or_default();
        let now = now_ms();
        if running
            && core == self.published.0
            && now.saturating_sub(self.published.1) < REPUBLISH_MS
        {
            return;
        }
        let v = ControllerStatus {
            pid: std::process::id(),
            running,
            updated_ms: now,
            core: s.clone(),
        };
        let _ = state::replace(
            &self.cfg.state_dir.join(state::STATUS_FILE),
            &serde_json::to_vec_pretty(&v).unwrap_or_default(),
        );
        let text = {
            let mut g = self.shared_lock();
            g.metrics.update_core(&s, &self.committed.set, now);
            g.metrics.render(&self.cfg.pin_dir, now)
        };
        let _ = state::replace(&self.cfg.state_dir.join(state::METRICS_FILE), text.as_ref());
        self.published = (core, now);
    }

    fn readopt(&mut self, why: &str) -> anyhow::Result<()> {
        let _lock = CommitLock::acquire(&self.cfg.pin_dir)?;
        let (c, cleaned) = Committed::adopt(&mut self.store)?;
        self.audit(AuditEvent::Resync {
            why: why.to_string(),
            generation: c.generation,
            peers: c.set.len() as u64,
            cleaned,
        });
        self.core.resync(c.set.clone(), c.generation);
        self.committed = c;
        Ok(())
    }

    /// Run every action the core has queued.
    fn act(&mut self) -> anyhow::Result<()> {
        while let Some(Action::Commit(plan)) = self.core.poll_action() {
            // Persist before committing: whatever the commit does, the state a
            // restart sees is at least as new as the decision behind it.
            self.persist()?;
            let lock = CommitLock::acquire(&self.cfg.pin_dir)?;
            // Moved, not cloned: at a first sync of 1M peers a copy is 24 MB.
            let crate::core::CommitPlan { changes, evictions } = plan;
            let t0 = std::time::Instant::now();
            let r = commit(&mut self.store, &mut self.committed, changes);
            drop(lock);
            self.shared_lock()
                .metrics
                .observe_commit(t0.elapsed().as_secs_f64());
            let now = now_ms();
            match r {
                Ok(None) => {
                    let generation = self.committed.generation;
                    self.core.handle_commit_result(
                        now,
                        CommitResult::Committed {
                            generation,
                            added: Vec::new(),
                            removed: Vec::new(),
                        },
                    );
                }
                Ok(Some(rep)) => {
                    let generation = rep.generation;
                    // Evictions are listed whole (the budget keeps them few);
                    // additions beyond AUDIT_LIST_MAX are counted, not listed,
                    // so a first sync of 1M peers is one short line, not 30 MB.
                    let evicted = to_evictions(&evictions);
                    let listed: Vec<ipnet::IpNet> = rep.added
                        [..rep.added.len().min(AUDIT_LIST_MAX)]
                        .iter()
                        .map(|(n, _)| *n)
                        .collect();
                    let (n_added, n_evicted) = (rep.added.len(), evicted.len());
                    let gc_error = rep.gc_error.clone();
                    // The change lists go back to the core, moved.
                    self.core.handle_commit_result(
                        now,
                        CommitResult::Committed {
                            generation,
                            added: rep.added,
                            removed: rep.removed,
                        },
                    );
                    let st = self.core.status();
                    self.audit(AuditEvent::Commit {
                        generation,
                        added_count: n_added as u64,
                        added: listed,
                        evicted,
                        held: st.held,
                        freeze: st.freeze,
                        gc_error,
                    });
                    tracing::info!(
                        generation,
                        added = n_added,
                        evicted = n_evicted,
                        "committed"
                    );
                }
                Err(StoreError::Conflict { .. }) => {
                    self.readopt("the datapath changed under us (an operator edit?)")?
                }
                Err(e) => {
                    tracing::warn!("commit failed: {e:#}");
                    self.audit(AuditEvent::CommitFailed {
                        error: e.to_string(),
                    });
                    self.core.handle_commit_result(
                        now,
                        CommitResult::Failed {
                            reason: e.to_string(),
                        },
                    );
                }
            }
            self.persist()?;
        }
        Ok(())
    }

    fn check_approval(&mut self) -> anyhow::Result<()> {
        let path = self.cfg.state_dir.join(state::APPROVE_FILE);
        let bytes = match crate::sys::fsafe::read_bounded(&path, state::MAX_APPROVAL_BYTES) {
            Ok(b) => b,
            Err(e) if e.not_found() => return Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::error!("approval refused: {e}");
                self.audit(AuditEvent::ApprovalRefused {
                    error: e.to_string(),
                });
                return Ok(());
            }
        };
        let _ = std::fs::remove_file(&path);
        let req = match state::parse_approval(&bytes) {
            Ok(r) => r,
            Err(e) => {
                // Never "approve all" because a list could not be read.
                tracing::error!(
                    "approval refused: {} is not an approval ({e}); nothing approved",
                    path.display()
                );
                self.audit(AuditEvent::ApprovalRefused {
                    error: e.to_string(),
                });
                return Ok(());
            }
        };
        let approved = self.core.approve(now_ms(), req.peers.as_deref());
        tracing::warn!(count = approved.len(), "operator approved held deletions");
        self.audit(AuditEvent::Approved { peers: approved });
        Ok(())
    }
}

fn to_evictions(e: &[(ipnet::IpNet, crate::core::Absence)]) -> Vec<Eviction> {
    e.iter()
        .map(|(n, a)| Eviction {
            peer: *n,
            absent_since_ms: a.since_ms,
            graceful: a.graceful,
        })
        .collect()
}

/// How long a source may go without producing any result before it counts
/// as failed ("source stalled"), whatever the cause: a hung agent, a
/// slow-loris reply, a stuck watch. Three polls plus the 5 s request timeout.
pub fn stall_ms(src: &SourceConfig) -> u64 {
    let poll_ms = match src {
        SourceConfig::File { poll_ms, .. } => *poll_ms,
        SourceConfig::Serf(s) => s.poll_ms,
        SourceConfig::Etcd(_) => 10_000,
    };
    3 * poll_ms + 5_000
}

/// Attach to the configured interfaces that are not attached yet.
fn ensure_attached(cfg: &Config) -> anyhow::Result<()> {
    for iface in &cfg.interfaces {
        if !attach::iface_dir(&cfg.pin_dir, iface).join("link").exists() {
            let r = attach::attach(iface, &cfg.pin_dir, &attach::AttachOptions::default())?;
            tracing::info!(iface, prog = r.prog_id, "attached");
        }
    }
    Ok(())
}

/// Read the config again (SIGHUP) and say what would change, or why the new
/// one cannot be taken. The pin and state directories are where the
/// controller's locks and the adopted datapath live: moving them needs a
/// restart.
fn reload(old: &Config, path: &std::path::Path) -> Result<(Config, Vec<String>), String> {
    let new = Config::load(path).map_err(|e| format!("{e:#}"))?;
    if new.pin_dir != old.pin_dir || new.state_dir != old.state_dir {
        return Err(
            "pin_dir and state_dir cannot change on reload (they hold the locks and the adopted datapath): restart the controller to move them; the old config stays in force"
                .to_string(),
        );
    }
    let mut changed = Vec::new();
    if new.guards != old.guards {
        changed.push("guards".to_string());
    }
    if new.discovery != old.discovery {
        changed.push("discovery".to_string());
    }
    if new.interfaces != old.interfaces {
        changed.push("interfaces".to_string());
    }
    if new.tick_ms != old.tick_ms {
        changed.push("tick_ms".to_string());
    }
    if new.log.level != old.log.level {
        changed.push("log.level".to_string());
    }
    if new.metrics != old.metrics {
        changed.push("metrics".to_string());
    }
    if new.log.format != old.log.format {
        // The subscriber is installed once; swapping its format under the
        // running tasks is not worth the risk of losing lines.
        return Err(
            "log.format cannot change on reload: restart the controller for a new format; the old config stays in force"
                .to_string(),
        );
    }
    Ok((new, changed))
}

/// One receiver for every source's results, tagged with the source's index.
/// Each source runs as before (a task, or a file watcher); a forwarding task
/// per source tags its results. Dropping the receiver ends the forwarders,
/// which drops each source's own receiver, which ends the source.
type Watchers = Vec<notify::RecommendedWatcher>;

fn spawn_sources(cfg: &Config) -> anyhow::Result<(mpsc::Receiver<(usize, Discovery)>, Watchers)> {
    // Bounded: a source is paused while the loop catches up, never queued
    // without limit.
    let (tx, rx) = mpsc::channel(4 * cfg.discovery.len());
    let mut watchers = Vec::new();
    for (i, src) in cfg.discovery.iter().cloned().enumerate() {
        let mut one = match src {
            SourceConfig::File {
                path,
                poll_ms,
                max_bytes,
            } => {
                let (rx, w) = spawn_file_source(path, poll_ms, max_bytes)?;
                watchers.push(w);
                rx
            }
            SourceConfig::Serf(sc) => sources::serf::spawn(sc, cfg.guards.max_members),
            SourceConfig::Etcd(ec) => sources::etcd::spawn(ec, cfg.guards.max_members),
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(d) = one.recv().await {
                if tx.send((i, d)).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok((rx, watchers))
}

/// What the loop tracks of each source: when its last result came, whether
/// it counts as stalled, and its failure condition (logged once, reminded).
struct Tracked {
    name: String,
    /// How its failures read in the log: `discovery failed` with one
    /// source (as before there were several), else naming the source.
    what: String,
    stall_ms: u64,
    last_result_ms: u64,
    stalled: bool,
    failing: Condition,
}

fn track(cfg: &Config, now: u64) -> Vec<Tracked> {
    let several = cfg.discovery.len() > 1;
    config::source_names(&cfg.discovery)
        .into_iter()
        .zip(&cfg.discovery)
        .map(|(name, src)| Tracked {
            what: if several {
                format!("discovery source {name} failed")
            } else {
                "discovery failed".to_string()
            },
            name,
            stall_ms: stall_ms(src),
            last_result_ms: now,
            stalled: false,
            failing: Condition::default(),
        })
        .collect()
}

/// The allocator setting the daemon runs with (the controller benchmark
/// uses it too, so its memory figures are the daemon's).
pub fn tune_allocator() {
    // Large buffers (a discovery file, its parse, a commit's change list) are
    // allocated and freed once per change. glibc raises its mmap threshold
    // each time such a buffer is freed, after which the next ones come from
    // the heap and stay resident; a fixed threshold returns them to the
    // kernel when freed, so the controller's memory falls back between
    // commits instead of ratcheting up (measured: 1M-peer sync 219 -> see
    // the README).
    // SAFETY: mallopt only tunes the allocator; called before other threads
    // allocate much, and any value is valid for M_MMAP_THRESHOLD.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
}

pub async fn run(cfg: Config, config_path: std::path::PathBuf) -> anyhow::Result<()> {
    crate::sys::check_privileges()?;
    // Before the locks create anything under it: a clear word when bpffs is
    // missing (a container without it, a host that never mounted it).
    crate::sys::check_bpffs(&cfg.pin_dir)?;
    tune_allocator();
    state::prepare_dir(&cfg.state_dir).context("the state directory")?;
    // First the locks: a second controller must be refused before it touches
    // anything, attaching included.
    let _controller = crate::sys::lock::ControllerLock::acquire(&cfg.pin_dir, &cfg.state_dir)?;
    ensure_attached(&cfg)?;
    crate::datapath::layout::check_dir(&cfg.pin_dir)?;
    let mut store = KernelStore::open(&cfg.pin_dir)?;
    let (committed, cleaned) = {
        let _lock = CommitLock::acquire(&cfg.pin_dir)?;
        Committed::adopt(&mut store)?
    };
    let persisted = state::load(&cfg.state_dir)?;
    let now = now_ms();
    // Adopt the pinned datapath as the truth; timers come from the persisted state.
    let core = Core::with_sources(
        cfg.guards.clone(),
        committed.set.clone(),
        committed.generation,
        persisted,
        now,
        &config::source_names(&cfg.discovery),
    );
    let pin_dir = cfg.pin_dir.clone();
    let mut d = Daemon {
        core,
        store,
        committed,
        shared: std::sync::Arc::new(std::sync::Mutex::new(metrics::Shared {
            metrics: metrics::Metrics::new(),
            health: metrics::Health::default(),
            pin_dir,
        })),
        persisted_fp: None,
        published: (Vec::new(), 0),
        vetoed: BTreeSet::new(),
        traffic_read_ms: 0,
        cfg,
    };
    d.audit(AuditEvent::Started {
        pid: std::process::id(),
        generation: d.committed.generation,
        peers: d.committed.set.len() as u64,
        cleaned_half_staged: cleaned,
    });
    tracing::info!(
        generation = d.committed.generation,
        peers = d.committed.set.len(),
        cleaned,
        "adopted the pinned datapath"
    );

    spawn_filter_rebuilds(d.cfg.pin_dir.clone(), d.shared.clone());
    let (mut rx, mut _watchers) = spawn_sources(&d.cfg)?;
    let mut server = match &d.cfg.metrics {
        Some(m) => Some(metrics::serve(m.listen, d.shared.clone()).await?),
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut tick = Duration::from_millis(d.cfg.tick_ms);
    let mut tracked = track(&d.cfg, now_ms());
    let mut notifier = sdnotify::Notifier::from_env();
    if let Some(wd) = notifier.watchdog() {
        // The loop pings once per turn and turns at least every tick.
        if wd < 4 * tick {
            tracing::warn!(
                watchdog_ms = wd.as_millis() as u64,
                tick_ms = d.cfg.tick_ms,
                "WatchdogSec is under four ticks: a slow commit may be taken for a hang"
            );
        }
    }
    d.notify_turn(&mut notifier);
    loop {
        let wait = d.core.poll_timeout().map_or(tick, |t| {
            Duration::from_millis(t.saturating_sub(now_ms())).min(tick)
        });
        tokio::select! {
            r = rx.recv() => match r {
                Some((i, disc)) => {
                    let now = now_ms();
                    let t = &mut tracked[i];
                    tracing::debug!(
                        source = %t.name,
                        kind = disc.kind(),
                        members = disc.members().len(),
                        revision = ?disc.meta().revision,
                        "discovery result"
                    );
                    t.last_result_ms = now;
                    t.stalled = false;
                    let failure = match &disc {
                        Discovery::Failed { reason, .. } => Some(reason.as_str()),
                        _ => None,
                    };
                    t.failing.observe(now, &t.what, failure);
                    d.shared_lock().metrics.source_result(&t.name, now, disc.kind());
                    d.core.handle_discovery_from(now, i, disc);
                }
                None => anyhow::bail!("every discovery source stopped"),
            },
            _ = tokio::time::sleep(wait) => {
                let now = now_ms();
                for (i, t) in tracked.iter_mut().enumerate() {
                    if t.stalled || now.saturating_sub(t.last_result_ms) <= t.stall_ms {
                        continue;
                    }
                    // No result at all is a failure too: deletions freeze and
                    // the alarm says so, instead of the last result ageing silently.
                    t.stalled = true;
                    let reason = format!(
                        "source stalled: no result for {} ms (limit {} ms)",
                        now - t.last_result_ms,
                        t.stall_ms
                    );
                    t.failing.observe(now, &t.what, Some(&reason));
                    d.audit(AuditEvent::SourceStalled { no_result_ms: now - t.last_result_ms });
                    d.core.handle_discovery_from(now, i, Discovery::Failed { reason, meta: Default::default() });
                }
                d.core.handle_tick(now);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => { notifier.reloading(); match reload(&d.cfg, &config_path) {
                Err(error) => {
                    tracing::error!(%error, "reload refused; the old config stays in force");
                    d.audit(AuditEvent::ReloadRefused { error });
                    notifier.reloaded();
                }
                Ok((new, changed)) => {
                    let now = now_ms();
                    if changed.iter().any(|c| c == "metrics") {
                        // Bind the new endpoint first: a port in use refuses
                        // the whole reload, and the old endpoint stays.
                        let next = match &new.metrics {
                            Some(m) => match metrics::serve(m.listen, d.shared.clone()).await {
                                Ok(h) => Some(h),
                                Err(e) => {
                                    let error = format!("{e:#}");
                                    tracing::error!(%error, "reload refused; the old config stays in force");
                                    d.audit(AuditEvent::ReloadRefused { error });
                                    notifier.reloaded();
                                    continue;
                                }
                            },
                            None => None,
                        };
                        if let Some(old) = server.take() {
                            old.abort();
                        }
                        server = next;
                    }
                    if changed.iter().any(|c| c == "interfaces") {
                        // Interfaces are only ever added by the controller:
                        // one dropped from the config stays protected until
                        // an operator detaches it.
                        if let Err(e) = ensure_attached(&new) {
                            let error = format!("attaching the new interfaces: {e:#}");
                            tracing::error!(%error, "reload refused; the old config stays in force");
                            d.audit(AuditEvent::ReloadRefused { error });
                            notifier.reloaded();
                            continue;
                        }
                    }
                    if changed.iter().any(|c| c == "discovery") {
                        // The old sources' tasks end when their receiver goes.
                        let (r, w) = spawn_sources(&new)?;
                        rx = r;
                        _watchers = w;
                        tracked = track(&new, now);
                        d.core.set_sources(now, &config::source_names(&new.discovery));
                    }
                    if changed.iter().any(|c| c == "guards") {
                        d.core.set_guards(now, new.guards.clone());
                    }
                    if changed.iter().any(|c| c == "log.level") {
                        let level = new.log.level.as_deref().unwrap_or("info");
                        if let Err(e) = crate::cli::log::set_level(level) {
                            tracing::error!(error = %e, "log.level not applied");
                        }
                    }
                    tick = Duration::from_millis(new.tick_ms);
                    tracing::info!(?changed, "config reloaded");
                    d.cfg = new;
                    d.audit(AuditEvent::Reloaded { changed });
                    notifier.reloaded();
                }
            }},
        }
        d.check_approval()?;
        d.read_traffic();
        d.persist()?;
        d.act()?;
        d.publish(true);
        d.refresh_shared(&tracked);
        d.notify_turn(&mut notifier);
    }
    notifier.stopping();
    if let Some(s) = server {
        s.abort();
    }
    d.persist()?;
    d.publish(false);
    d.audit(AuditEvent::Stopped {
        generation: d.committed.generation,
    });
    tracing::info!(
        "stopped; the datapath keeps enforcing generation {}",
        d.committed.generation
    );
    Ok(())
}

/// One result from a source, for `plan`.
fn fetch_once(cfg: &Config, src: &SourceConfig) -> anyhow::Result<Discovery> {
    Ok(match src {
        SourceConfig::File {
            path, max_bytes, ..
        } => sources::file::read(path, *max_bytes),
        SourceConfig::Serf(sc) => {
            let mut c = sources::serf::Conn::connect(
                &sc.rpc_addr,
                sc.auth_key.as_deref(),
                Some(Duration::from_secs(5)),
            )?;
            let me = c.self_name()?;
            sources::serf::to_discovery(c.members_filtered(&sc.tags)?, &me, cfg.guards.max_members)
        }
        SourceConfig::Etcd(ec) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut rx = sources::etcd::spawn(ec.clone(), cfg.guards.max_members);
                tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .ok()
                    .flatten()
            })
            .unwrap_or(Discovery::Failed {
                reason: "etcd gave no answer in 10 s".into(),
                meta: Default::default(),
            })
        }
    })
}

/// `firewall-ctl plan`: what the controller would do with the source's data
/// right now, without changing anything.
pub fn plan(cfg: &Config) -> anyhow::Result<Plan> {
    let mut store = KernelStore::open(&cfg.pin_dir)?;
    let loaded = crate::store::PeerStore::load(&mut store)?;
    let persisted = state::load(&cfg.state_dir)?;
    let now = now_ms();
    let names = config::source_names(&cfg.discovery);
    let mut core = Core::with_sources(
        cfg.guards.clone(),
        loaded.set.clone(),
        loaded.generation,
        persisted,
        now,
        &names,
    );
    let mut kinds = Vec::new();
    let mut members = 0;
    for (i, src) in cfg.discovery.iter().enumerate() {
        let disc = fetch_once(cfg, src)?;
        kinds.push(if names.len() > 1 {
            format!("{}: {}", names[i], disc.kind())
        } else {
            disc.kind().to_string()
        });
        members = members.max(disc.members().len());
        core.handle_discovery_from(now, i, disc);
    }
    let kind = kinds.join(", ");
    // The running controller's traffic observations (a one-shot plan has
    // none of its own); without one, absent peers count as silent.
    let running: Option<ControllerStatus> =
        state::read_json(&cfg.state_dir.join(state::STATUS_FILE)).unwrap_or(None);
    let view = running
        .filter(|c| c.running)
        .map(|c| c.core.liveness)
        .unwrap_or_default();
    core.import_liveness(&view);
    // The core plans one commit at a time, and planned the first before the
    // other sources had spoken: pretend each planned commit succeeded (this
    // core is thrown away) and collect them all.
    let (mut adds, mut evictions) = (Vec::new(), Vec::new());
    for generation in loaded.generation + 1..loaded.generation + 64 {
        let Some(Action::Commit(p)) = core.poll_action() else {
            break;
        };
        adds.extend(p.changes.add.iter().map(|(n, _)| *n));
        evictions.extend(p.evictions);
        core.handle_commit_result(
            now,
            CommitResult::Committed {
                generation,
                added: p.changes.add,
                removed: p.changes.remove,
            },
        );
    }
    let st = core.status();
    Ok(Plan {
        generation: loaded.generation,
        source: PlanSource {
            kind: kind.to_string(),
            members: members as u64,
        },
        would_add: adds,
        would_evict: to_evictions(&evictions),
        held: st.held,
        freeze: st.freeze.as_ref().map(|f| f.describe()),
        absent_not_yet_due: st
            .absent
            .into_iter()
            .filter(|a| a.evict_at_ms > now)
            .collect(),
        budget_limited: st.budget_limited,
        kept_alive: st.liveness,
    })
}
