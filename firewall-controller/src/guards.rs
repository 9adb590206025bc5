//! The guard and timing settings the core runs on: the `[guards]` table of
//! the controller's config file. Every field has a documented default.

use serde::{Deserialize, Serialize};

/// Guard and timing settings of the core. Every field has a documented default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Guards {
    /// How long a peer must be continuously absent before it is evicted.
    pub grace_ms: u64,
    /// Grace for a peer whose source says it left gracefully (Serf `left`).
    pub graceful_grace_ms: u64,
    /// A result that reports more than this fraction of the discovery-owned
    /// allowlist entries absent freezes deletions (held until `firewall-ctl
    /// approve`). The unit is the entry (an address or CIDR), in the count
    /// and the total alike: a member with an IPv4 and an IPv6 address is two
    /// entries, as it is two lines in the datapath, and the core never learns
    /// which addresses share a member.
    pub max_shrink_fraction: f64,
    /// ... or more than this many entries.
    pub max_shrink_count: u64,
    /// Deletion budget: a token bucket of `evict_burst` tokens refilled at
    /// `evict_rate_per_min`...
    pub evict_rate_per_min: u64,
    pub evict_burst: u64,
    /// ... and at most `evict_max_per_window` evictions in any `evict_window_ms`.
    pub evict_max_per_window: u64,
    pub evict_window_ms: u64,
    /// A result listing more members than this is rejected (Failed).
    pub max_members: usize,
    /// First retry delay after a failed commit; doubles up to 30 s.
    pub retry_ms: u64,
    /// Liveness veto: an absent exact peer whose datapath hit count grew in
    /// the last `liveness_window_ms` is not evicted when its grace ends
    /// (discovery says gone, traffic says alive). It is also the silence an
    /// eviction needs: a peer is evicted only after the controller has watched
    /// its counter for a whole window.
    pub liveness_window_ms: u64,
    /// ... but at most this long past its grace: a spoofed or lingering
    /// source must not keep a stale allow for ever. 0 turns the veto off.
    pub liveness_max_extend_ms: u64,
    /// A source whose results have been failures this long raises its own
    /// alarm (deletions are frozen from its first failure regardless).
    pub source_failed_alarm_ms: u64,
    /// FOR COMPARISON ONLY (the incident replay): behave like the orchestrator
    /// in the post-mortem. Every result is taken at face value, an absent peer
    /// is deleted at once, no guard, no budget, no first-sync gate. Never set
    /// this in production.
    pub naive: bool,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            grace_ms: 300_000,
            graceful_grace_ms: 300_000,
            max_shrink_fraction: 0.5,
            max_shrink_count: 64,
            evict_rate_per_min: 60,
            evict_burst: 16,
            evict_max_per_window: 256,
            evict_window_ms: 600_000,
            max_members: 1_000_000,
            retry_ms: 500,
            // A minute of silence: well above the gaps of any live peer that
            // talks to this node (keepalives, health checks), well below the
            // grace, so a gone peer is not kept noticeably longer.
            liveness_window_ms: 60_000,
            // Half an hour past the grace: time for the page that the veto
            // raises to be answered, while a spoofed source (a stateless
            // allowlist passes packets with a forged source address too) can
            // keep a departed peer's entry for at most this long.
            liveness_max_extend_ms: 1_800_000,
            // As the FirewallSourceFailing alert: ten minutes.
            source_failed_alarm_ms: 600_000,
            naive: false,
        }
    }
}

impl Guards {
    pub fn validate(&self) -> Result<(), String> {
        if self.graceful_grace_ms > self.grace_ms {
            return Err("guards.graceful_grace_ms must not exceed guards.grace_ms".into());
        }
        if !(0.0..=1.0).contains(&self.max_shrink_fraction) {
            return Err("guards.max_shrink_fraction must be between 0 and 1".into());
        }
        if self.evict_burst == 0 || self.evict_rate_per_min == 0 || self.evict_max_per_window == 0 {
            return Err("guards.evict_burst, evict_rate_per_min and evict_max_per_window must be at least 1 (use a large grace_ms to slow evictions down)".into());
        }
        if self.liveness_max_extend_ms > 0 && self.liveness_window_ms == 0 {
            return Err("guards.liveness_window_ms must be at least 1 while the liveness veto is on (set liveness_max_extend_ms = 0 to turn it off)".into());
        }
        if self.max_members == 0 || self.max_members > 16_777_216 {
            return Err("guards.max_members must be 1..=16777216".into());
        }
        Ok(())
    }

    /// The stated eviction bound: a silent peer absent with clean evidence is
    /// evicted at most this long after the first clean result that omits it,
    /// when at most `evict_burst` peers leave together (each further peer adds
    /// one token interval), plus `tick_ms` of timer granularity in the caller.
    /// The liveness veto needs a whole window of observed silence, which the
    /// grace covers unless the grace is shorter (or the controller restarted).
    pub fn eviction_bound_ms(&self, graceful: bool) -> u64 {
        let grace = if graceful {
            self.graceful_grace_ms
        } else {
            self.grace_ms
        };
        let watch = if self.liveness_max_extend_ms > 0 {
            self.liveness_window_ms
        } else {
            0
        };
        grace.max(watch) + self.token_interval_ms()
    }

    /// A peer that keeps sending after discovery dropped it (lingering, or a
    /// spoofed source address) is evicted at most this long after the first
    /// clean result that omits it.
    pub fn lingering_bound_ms(&self, graceful: bool) -> u64 {
        self.eviction_bound_ms(graceful) + self.liveness_max_extend_ms
    }

    pub fn token_interval_ms(&self) -> u64 {
        60_000 / self.evict_rate_per_min
    }
}
