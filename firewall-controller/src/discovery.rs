//! What a discovery source hands the core. Sources (file, Serf, etcd) turn
//! their data into these types; everything the core decides rests on them.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A member's status as the source reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Alive, or leaving (still up while it says goodbye): present.
    Alive,
    Leaving,
    /// Declared dead by the source: absent, full grace.
    Failed,
    /// Left gracefully: absent, graceful grace.
    Left,
    /// Anything else the source reports (e.g. Serf `none`): absent, full grace.
    Unknown,
}

impl MemberStatus {
    pub fn present(self) -> bool {
        matches!(self, MemberStatus::Alive | MemberStatus::Leaving)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub net: IpNet,
    pub status: MemberStatus,
}

/// Source metadata that travels with every result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceMeta {
    /// A monotonic revision or index, when the source has one (etcd revision,
    /// a file's `revision`). A result older than one already seen is stale.
    pub revision: Option<u64>,
    /// The source's own view of its health: a Serf agent that sees only
    /// itself, or an etcd connection that is not synced, says unhealthy.
    pub healthy: bool,
    pub health_reason: Option<String>,
}

/// One discovery result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Discovery {
    /// The full member list.
    Complete {
        members: Vec<Member>,
        meta: SourceMeta,
    },
    /// Some members only (a page failed, a filter timed out): positive
    /// evidence, never evidence of absence.
    Partial {
        members: Vec<Member>,
        meta: SourceMeta,
        reason: String,
    },
    /// No data. Never treated as empty.
    Failed { reason: String, meta: SourceMeta },
    /// More members than `guards.max_members`: rejected whole, as a failure,
    /// but typed, so the core can tell it from a source that is down
    /// (it freezes deletions as an invalid result, not a failed source).
    TooLarge {
        members: u64,
        limit: u64,
        meta: SourceMeta,
    },
}

impl Discovery {
    pub fn meta(&self) -> &SourceMeta {
        match self {
            Discovery::Complete { meta, .. }
            | Discovery::Partial { meta, .. }
            | Discovery::Failed { meta, .. }
            | Discovery::TooLarge { meta, .. } => meta,
        }
    }
    pub fn members(&self) -> &[Member] {
        match self {
            Discovery::Complete { members, .. } | Discovery::Partial { members, .. } => members,
            Discovery::Failed { .. } | Discovery::TooLarge { .. } => &[],
        }
    }
    /// The members this result positively reports as present.
    pub fn present(&self) -> std::collections::BTreeSet<IpNet> {
        self.members()
            .iter()
            .filter(|m| m.status.present())
            .map(|m| m.net)
            .collect()
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Discovery::Complete { .. } => "complete",
            Discovery::Partial { .. } => "partial",
            Discovery::Failed { .. } | Discovery::TooLarge { .. } => "failed",
        }
    }
}
