//! The typed contract between the daemon and everything that reads it: the
//! CLI (`status`, `plan`, `approve`), the tests, and operators' tools.
//! The daemon writes these types and the CLI deserializes the same types, so
//! renaming a field is a compile error on both sides instead of a `null`
//! printed at run time.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::core::{AbsentView, CoreStatus, Freeze};

/// `status.json`, republished by the daemon as it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControllerStatus {
    pub pid: u32,
    /// False once the daemon has stopped (the datapath keeps enforcing).
    pub running: bool,
    pub updated_ms: u64,
    pub core: CoreStatus,
}

/// A deletion, as the audit log and `plan` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    pub peer: IpNet,
    pub absent_since_ms: u64,
    pub graceful: bool,
}

/// What `firewall-ctl plan` computes: the controller's next step on the
/// source's data right now, changing nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub generation: u64,
    pub source: PlanSource,
    pub would_add: Vec<IpNet>,
    pub would_evict: Vec<Eviction>,
    pub held: Vec<IpNet>,
    /// The guard in force, described.
    pub freeze: Option<String>,
    pub absent_not_yet_due: Vec<AbsentView>,
    pub budget_limited: u64,
    /// Past their grace, kept by the liveness rule (as the running
    /// controller observed their traffic).
    #[serde(default)]
    pub kept_alive: Vec<firewall_controller::core::LivenessView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanSource {
    /// `complete`, `partial` or `failed`.
    pub kind: String,
    pub members: u64,
}

/// One line of `audit.jsonl`: when, and what happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditLine {
    pub ts_ms: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Everything the audit log records, tagged by `event`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    Started {
        pid: u32,
        generation: u64,
        peers: u64,
        cleaned_half_staged: u64,
    },
    Commit {
        generation: u64,
        /// Every addition is counted; the first `AUDIT_LIST_MAX` are listed.
        added_count: u64,
        added: Vec<IpNet>,
        evicted: Vec<Eviction>,
        held: Vec<IpNet>,
        freeze: Option<Freeze>,
        gc_error: Option<String>,
    },
    CommitFailed {
        error: String,
    },
    /// The datapath changed under the controller; it adopted it again.
    Resync {
        why: String,
        generation: u64,
        peers: u64,
        cleaned: u64,
    },
    Approved {
        peers: Vec<IpNet>,
    },
    ApprovalRefused {
        error: String,
    },
    SourceStalled {
        no_result_ms: u64,
    },
    Stopped {
        generation: u64,
    },
    /// SIGHUP: the config was read again and these parts of it changed.
    Reloaded {
        changed: Vec<String>,
    },
    /// SIGHUP with a config that cannot be used: the old one stays.
    ReloadRefused {
        error: String,
    },
    /// Discovery says gone, traffic says alive: these peers' grace has ended
    /// but their datapath counters grew within the liveness window, so they
    /// stay (at most until the cap).
    LivenessVeto {
        peers: Vec<IpNet>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_lines_keep_their_flat_shape() {
        let line = AuditLine {
            ts_ms: 5,
            event: AuditEvent::SourceStalled { no_result_ms: 9 },
        };
        let v = serde_json::to_value(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ts_ms": 5, "event": "source_stalled", "no_result_ms": 9})
        );
        let back: AuditLine = serde_json::from_value(v).unwrap();
        assert!(matches!(
            back.event,
            AuditEvent::SourceStalled { no_result_ms: 9 }
        ));
    }
}
