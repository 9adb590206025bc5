//! The controller's metrics (prometheus-client) and its HTTP endpoint:
//! `/metrics` (OpenMetrics text), `/healthz` (the loop is turning) and
//! `/readyz` (attached, synced, the source answering). The same text goes to
//! `metrics.prom` for a textfile collector.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{core::CoreStatus, datapath::status, peers::PeerSet};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    origin: &'static str,
    family: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardLabels {
    guard: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceKindLabels {
    source: String,
    kind: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    iface: String,
    verdict: &'static str,
    reason: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IfaceLabels {
    iface: String,
}

const GUARDS: [&str; 8] = [
    "not_synced",
    "failed",
    "partial",
    "empty",
    "unhealthy",
    "stale",
    "shrink",
    "invalid",
];
const KINDS: [&str; 3] = ["complete", "partial", "failed"];

pub struct Metrics {
    registry: Registry,
    generation: Gauge,
    peers: Family<PeerLabels, Gauge>,
    absent: Gauge,
    held: Gauge,
    awaiting: Gauge,
    frozen: Gauge,
    guard: Family<GuardLabels, Gauge>,
    guard_since: Gauge,
    synced: Gauge,
    evictions: Counter,
    commits: Family<OutcomeLabels, Counter>,
    commit_seconds: Histogram,
    source_age: Family<SourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    source_last: Family<SourceKindLabels, Gauge>,
    packets: Family<PacketLabels, Counter>,
    events: Family<IfaceLabels, Counter>,
    suppressed: Family<IfaceLabels, Counter>,
    attached: Family<IfaceLabels, Gauge>,
    liveness_kept: Family<StateLabels, Gauge>,
    liveness_vetoes: Counter,
    filter_set: Gauge<f64, std::sync::atomic::AtomicU64>,
    filter_rebuilds: Family<OutcomeLabels, Counter>,
    /// The interfaces the config names (for `interface_attached`).
    pub interfaces: Vec<String>,
    /// Running totals already counted, so counters advance by differences.
    seen: HashMap<String, u64>,
    /// The guard in force and since when (ms).
    guard_state: Option<(&'static str, u64)>,
    /// Each source's last result: when, and its kind.
    last_result: std::collections::BTreeMap<String, (u64, &'static str)>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("firewall");
        macro_rules! reg {
            ($name:expr, $help:expr, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        Metrics {
            generation: reg!(
                "committed_generation",
                "Committed peer generation",
                Gauge::default()
            ),
            peers: reg!(
                "peers",
                "Entries in the committed allowlist, by origin and family",
                Family::default()
            ),
            absent: reg!(
                "absent_peers",
                "Discovery peers absent and not yet evicted",
                Gauge::default()
            ),
            held: reg!(
                "held_deletions",
                "Evictions due but blocked by a guard",
                Gauge::default()
            ),
            awaiting: reg!(
                "awaiting_approval",
                "Absent peers the shrink guard holds or will hold when their grace ends",
                Gauge::default()
            ),
            frozen: reg!(
                "deletions_frozen",
                "1 while a guard freezes every deletion",
                Gauge::default()
            ),
            guard: reg!(
                "guard",
                "1 for the guard in force (deletions frozen), by name",
                Family::default()
            ),
            guard_since: reg!(
                "guard_since_seconds",
                "Unix time the guard in force took effect (0 when none)",
                Gauge::default()
            ),
            synced: reg!(
                "synced",
                "1 once a clean discovery result was seen since start",
                Gauge::default()
            ),
            evictions: reg!("evictions", "Peers evicted", Counter::default()),
            commits: reg!("commits", "Commits, by outcome", Family::default()),
            commit_seconds: reg!(
                "commit_duration_seconds",
                "Time to stage, verify, flip and collect one commit",
                Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
            ),
            source_age: reg!(
                "source_last_result_age_seconds",
                "Seconds since each discovery source's last result",
                Family::default()
            ),
            source_last: reg!(
                "source_last_result",
                "1 for the kind of each source's last result",
                Family::default()
            ),
            packets: reg!(
                "packets",
                "Packets seen by the datapath, by interface, verdict (pass, drop, would_drop) and reason",
                Family::default()
            ),
            events: reg!(
                "drop_events",
                "Drop events written for `monitor`",
                Family::default()
            ),
            suppressed: reg!(
                "drop_events_suppressed",
                "Drop events the rate limit (or a full ring) suppressed",
                Family::default()
            ),
            attached: reg!(
                "interface_attached",
                "1 while the firewall is attached to a configured interface",
                Family::default()
            ),
            liveness_kept: reg!(
                "liveness_kept",
                "Absent peers kept past their grace by the liveness rule: traffic (their counter grew: discovery says gone, traffic says alive) or watching (silence not yet watched for a whole window)",
                Family::default()
            ),
            liveness_vetoes: reg!(
                "liveness_vetoes",
                "Peers the liveness veto began to keep past their grace",
                Counter::default()
            ),
            filter_set: reg!(
                "flow_filter_set_ratio",
                "Share of the flow filter's slots set after its last rebuild (near 1, most dropped packets look up the flow table)",
                Gauge::default()
            ),
            filter_rebuilds: reg!(
                "flow_filter_rebuilds",
                "Rebuilds of the flow filter from the flow table, by outcome",
                Family::default()
            ),
            interfaces: Vec::new(),
            registry: r,
            seen: HashMap::new(),
            guard_state: None,
            last_result: Default::default(),
        }
    }

    /// Advance `c` to the running total `total` (kept under `key`); a total
    /// that went down (a map recreated) starts a new baseline.
    fn advance(seen: &mut HashMap<String, u64>, key: String, c: &Counter, total: u64) {
        let prev = seen.insert(key, total).unwrap_or(0);
        if total >= prev {
            c.inc_by(total - prev);
        } else {
            c.inc_by(total);
        }
    }

    pub fn update_core(&mut self, s: &CoreStatus, committed: &PeerSet, now_ms: u64) {
        self.generation.set(s.generation as i64);
        let mut counts: HashMap<PeerLabels, i64> = HashMap::new();
        for o in ["operator", "discovery"] {
            for f in ["ipv4", "ipv6"] {
                counts.insert(
                    PeerLabels {
                        origin: o,
                        family: f,
                    },
                    0,
                );
            }
        }
        for (n, o) in committed {
            let origin = if *o == crate::peers::OPERATOR {
                "operator"
            } else {
                "discovery"
            };
            let family = if n.addr().is_ipv4() { "ipv4" } else { "ipv6" };
            *counts.entry(PeerLabels { origin, family }).or_default() += 1;
        }
        for (l, n) in counts {
            self.peers.get_or_create(&l).set(n);
        }
        self.absent.set(s.absent.len() as i64);
        self.held.set(s.held.len() as i64);
        self.awaiting.set(s.awaiting_approval.len() as i64);
        self.frozen.set(i64::from(s.freeze.is_some()));
        let now_guard = s.freeze.as_ref().map(|f| f.name());
        if self.guard_state.map(|(g, _)| g) != now_guard {
            self.guard_state = now_guard.map(|g| (g, now_ms));
        }
        for g in GUARDS {
            self.guard
                .get_or_create(&GuardLabels { guard: g })
                .set(i64::from(now_guard == Some(g)));
        }
        self.guard_since
            .set(self.guard_state.map_or(0, |(_, t)| (t / 1000) as i64));
        self.synced.set(i64::from(s.synced));
        for state in ["traffic", "watching"] {
            let n = s.liveness.iter().filter(|l| l.state == state).count();
            self.liveness_kept
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        Self::advance(
            &mut self.seen,
            "liveness_vetoes".into(),
            &self.liveness_vetoes,
            s.vetoes_total,
        );
        Self::advance(
            &mut self.seen,
            "evictions".into(),
            &self.evictions,
            s.evictions_total,
        );
        let ok = self
            .commits
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .clone();
        Self::advance(&mut self.seen, "commits_ok".into(), &ok, s.commits_total);
        let failed = self
            .commits
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .clone();
        Self::advance(
            &mut self.seen,
            "commits_failed".into(),
            &failed,
            s.commit_failures_total,
        );
    }

    /// One rebuild of the flow filter: its report, or its failure.
    pub fn observe_filter(&self, report: Option<&crate::datapath::flows::FilterReport>) {
        let outcome = if report.is_some() { "ok" } else { "failed" };
        self.filter_rebuilds
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(r) = report {
            self.filter_set.set(r.set as f64 / r.slots.max(1) as f64);
        }
    }

    pub fn observe_commit(&self, seconds: f64) {
        self.commit_seconds.observe(seconds);
    }

    pub fn source_result(&mut self, source: &str, at_ms: u64, kind: &'static str) {
        self.last_result.insert(source.to_string(), (at_ms, kind));
    }

    fn update_source(&self, now_ms: u64) {
        for (source, (at, kind)) in &self.last_result {
            self.source_age
                .get_or_create(&SourceLabels {
                    source: source.clone(),
                })
                .set(now_ms.saturating_sub(*at) as f64 / 1000.0);
            for k in KINDS {
                self.source_last
                    .get_or_create(&SourceKindLabels {
                        source: source.clone(),
                        kind: k,
                    })
                    .set(i64::from(k == *kind));
            }
        }
    }

    /// The datapath's per-interface counters, read now.
    fn update_datapath(&mut self, pin_dir: &std::path::Path) {
        for i in &self.interfaces {
            let linked = crate::datapath::attach::iface_dir(pin_dir, i)
                .join("link")
                .exists();
            self.attached
                .get_or_create(&IfaceLabels { iface: i.clone() })
                .set(i64::from(linked));
        }
        for iface in status::interfaces(pin_dir) {
            let path = crate::datapath::attach::iface_dir(pin_dir, &iface)
                .join(firewall_common::names::COUNTERS);
            let Ok(c) = status::read_counters(&path) else {
                continue;
            };
            let rows: [(&'static str, &'static str, u64); 9] = [
                ("pass", "overlay", c.overlay),
                ("pass", "peer", c.peer),
                ("pass", "nonip", c.nonip),
                ("pass", "neighbour", c.neighbour),
                ("pass", "reply", c.reply),
                ("drop", "default_drop", c.default_drop),
                ("drop", "malformed", c.malformed),
                ("would_drop", "default_drop", c.would_drop_default),
                ("would_drop", "malformed", c.would_drop_malformed),
            ];
            for (verdict, reason, total) in rows {
                let ctr = self
                    .packets
                    .get_or_create(&PacketLabels {
                        iface: iface.clone(),
                        verdict,
                        reason,
                    })
                    .clone();
                Self::advance(
                    &mut self.seen,
                    format!("p/{iface}/{verdict}/{reason}"),
                    &ctr,
                    total,
                );
            }
            let l = IfaceLabels {
                iface: iface.clone(),
            };
            let e = self.events.get_or_create(&l).clone();
            Self::advance(&mut self.seen, format!("e/{iface}"), &e, c.events);
            let s = self.suppressed.get_or_create(&l).clone();
            Self::advance(
                &mut self.seen,
                format!("s/{iface}"),
                &s,
                c.events_suppressed,
            );
        }
    }

    /// Everything, fresh: the datapath counters are read at this moment.
    pub fn render(&mut self, pin_dir: &std::path::Path, now_ms: u64) -> String {
        self.update_source(now_ms);
        self.update_datapath(pin_dir);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What `/healthz` and `/readyz` answer from, kept by the daemon loop.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The loop's last turn (ms); the loop turns at least every tick.
    pub loop_at_ms: u64,
    pub loop_limit_ms: u64,
    pub synced: bool,
    /// Each source: name, its last result (ms), its stall limit (ms).
    pub sources: Vec<(String, u64, u64)>,
    pub interfaces: Vec<String>,
}

pub struct Shared {
    pub metrics: Metrics,
    pub health: Health,
    pub pin_dir: PathBuf,
}

pub type SharedState = Arc<Mutex<Shared>>;

fn lock(s: &SharedState) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves the data as consistent as any
    // scrape: serve it.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `addr` until the task is
/// aborted. Bind errors come back at once, so a config with a port in use is
/// refused before the daemon runs.
pub async fn serve(
    addr: SocketAddr,
    state: SharedState,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?;
    async fn metrics(State(s): State<SharedState>) -> impl IntoResponse {
        let now = super::now_ms();
        let body = {
            let mut g = lock(&s);
            let pin = g.pin_dir.clone();
            g.metrics.render(&pin, now)
        };
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
    }
    async fn healthz(State(s): State<SharedState>) -> impl IntoResponse {
        let h = lock(&s).health.clone();
        let age = super::now_ms().saturating_sub(h.loop_at_ms);
        if age <= h.loop_limit_ms {
            (StatusCode::OK, "ok\n".to_string())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the controller loop has not turned for {age} ms (limit {} ms)\n",
                    h.loop_limit_ms
                ),
            )
        }
    }
    async fn readyz(State(s): State<SharedState>) -> impl IntoResponse {
        let (h, pin) = {
            let g = lock(&s);
            (g.health.clone(), g.pin_dir.clone())
        };
        let now = super::now_ms();
        let mut why = Vec::new();
        for i in &h.interfaces {
            if !crate::datapath::attach::iface_dir(&pin, i)
                .join("link")
                .exists()
            {
                why.push(format!("{i} is not attached"));
            }
        }
        if !h.synced {
            why.push("no clean discovery result since start".into());
        }
        for (name, at, limit) in &h.sources {
            let age = now.saturating_sub(*at);
            if age > *limit {
                why.push(format!(
                    "source {name}'s last result is {age} ms old (limit {limit} ms)"
                ));
            }
        }
        if why.is_empty() {
            (StatusCode::OK, "ready\n".to_string())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", why.join("; ")),
            )
        }
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    Ok(tokio::spawn(accept_loop(listener, app)))
}

/// At most this many scrapes at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request head within this (slowloris).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// And is cut off after this, whatever it is doing.
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serve `app` one request per connection, bounded in count and time.
/// axum::serve sets no header-read timeout and no connection limit, so a
/// client that opens connections and never finishes a request would hold
/// tasks and memory for ever; hyper's own builder has both knobs.
async fn accept_loop(listener: tokio::net::TcpListener, app: axum::Router) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}
