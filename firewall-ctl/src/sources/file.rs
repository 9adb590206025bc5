//! The file discovery source. A file that is missing, empty, half-written,
//! malformed or oversized is `Failed`, never an empty member list.
//!
//! Two formats, told apart by their top-level key:
//! - ours: `{"revision": 12, "complete": true, "healthy": true,
//!   "peers": [{"addr": "198.18.0.7", "status": "alive"}, {"addr": "198.18.4.0/24"}]}`
//!   (`status` defaults to alive; `complete: false` makes the result partial);
//! - `serf members -format=json` output as it is:
//!   `{"members": [{"name": "n1", "addr": "198.18.0.11:7946", "status": "alive", ...}]}`.

use std::{borrow::Cow, net::SocketAddr, path::Path};

use serde::Deserialize;

use crate::discovery::{Discovery, Member, MemberStatus, SourceMeta};
use crate::peers::parse_peer;

/// Both formats in one typed pass, straight from the bytes: going through
/// `serde_json::Value` first cost ~1 GB and most of a minute for a 1M-peer
/// file. Ours has `peers` and optional metadata; Serf's has `members` alone.
/// Strings borrow from the file's bytes (`Cow`: owned only when escaped), so
/// a million entries cost no million small allocations.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnyFormat<'a> {
    #[serde(default, borrow)]
    members: Option<Vec<SerfMember<'a>>>,
    #[serde(default, borrow)]
    peers: Option<Vec<OurPeer<'a>>>,
    #[serde(default)]
    revision: Option<u64>,
    #[serde(default)]
    complete: Option<bool>,
    #[serde(default)]
    healthy: Option<bool>,
    #[serde(default)]
    health_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OurPeer<'a> {
    #[serde(borrow)]
    addr: Cow<'a, str>,
    #[serde(default, borrow)]
    status: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SerfMember<'a> {
    #[serde(borrow)]
    addr: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
}

pub fn status_of(s: &str) -> MemberStatus {
    match s {
        "alive" => MemberStatus::Alive,
        "leaving" => MemberStatus::Leaving,
        "left" => MemberStatus::Left,
        "failed" => MemberStatus::Failed,
        _ => MemberStatus::Unknown,
    }
}

fn failed(reason: String) -> Discovery {
    Discovery::Failed {
        reason,
        meta: SourceMeta::default(),
    }
}

/// Read and interpret the file once.
pub fn read(path: &Path, max_bytes: u64) -> Discovery {
    // Only a regular file, opened without blocking, read through a bound:
    // a FIFO, a device or a file that lies about its size is a failure.
    let bytes = match crate::sys::fsafe::read_bounded(path, max_bytes) {
        Ok(b) => b,
        Err(crate::sys::fsafe::ReadError::TooLarge { .. }) => {
            return failed(format!(
                "{} is more than discovery.max_bytes = {max_bytes} bytes",
                path.display()
            ));
        }
        Err(e) => return failed(e.to_string()),
    };
    parse(&bytes, path)
}

/// Interpret a file's bytes (`path` only names it in messages). Never
/// panics, whatever the bytes: the fuzz target `file_source` holds it to that.
pub fn parse(bytes: &[u8], path: &Path) -> Discovery {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return failed(format!("{} is empty (being written?)", path.display()));
    }
    let f: AnyFormat = match serde_json::from_slice(bytes) {
        Ok(f) => f,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return failed(format!(
                "{} is not valid JSON (half-written?): {e}",
                path.display()
            ));
        }
        Err(e) => {
            return failed(format!(
                "{}: unrecognised format ({e}): expected {{\"peers\": [...]}} or `serf members -format=json` output",
                path.display()
            ));
        }
    };
    let mut bad = Bad::default();
    match (f.members, f.peers) {
        (Some(members), None)
            if f.revision.is_none()
                && f.complete.is_none()
                && f.healthy.is_none()
                && f.health_reason.is_none() =>
        {
            let mut out = Vec::with_capacity(members.len());
            for sm in members {
                match sm
                    .addr
                    .parse::<SocketAddr>()
                    .map(|a| a.ip())
                    .or_else(|_| sm.addr.parse())
                {
                    Ok(ip) => out.push(Member {
                        net: crate::peers::normalize(ip.into()),
                        status: status_of(&sm.status),
                    }),
                    Err(_) => bad.note(&sm.addr),
                }
            }
            // The Serf RPC source's health rule, for the same data written to
            // a file: an agent that sees no alive member but itself (restarted
            // with its seeds down, or cut off) reports a fleet of one. The
            // list includes the agent itself, so that is at most one alive.
            let alive = out
                .iter()
                .filter(|m| m.status == MemberStatus::Alive)
                .count();
            let meta = if alive <= 1 && !out.is_empty() {
                SourceMeta {
                    revision: None,
                    healthy: false,
                    health_reason: Some(format!(
                        "{}: the Serf member list has {alive} alive member (the agent itself, restarted with its seeds down or partitioned); deletions freeze",
                        path.display()
                    )),
                }
            } else {
                SourceMeta {
                    revision: None,
                    healthy: true,
                    health_reason: None,
                }
            };
            finish(out, bad, true, meta)
        }
        (None, Some(peers)) => {
            let mut out = Vec::with_capacity(peers.len());
            for p in peers {
                match parse_peer(&p.addr) {
                    Ok(net) => out.push(Member {
                        net,
                        status: status_of(p.status.as_deref().unwrap_or("alive")),
                    }),
                    Err(_) => bad.note(&p.addr),
                }
            }
            let meta = SourceMeta {
                revision: f.revision,
                healthy: f.healthy.unwrap_or(true),
                health_reason: f.health_reason,
            };
            finish(out, bad, f.complete.unwrap_or(true), meta)
        }
        _ => failed(format!(
            "{}: unrecognised format: expected {{\"peers\": [...]}} or `serf members -format=json` output",
            path.display()
        )),
    }
}

/// Invalid entries: counted, and the first few kept to name in the reason
/// (a file of a million bad lines must not become a million strings).
#[derive(Default)]
struct Bad {
    count: usize,
    shown: Vec<String>,
}

impl Bad {
    const SHOWN: usize = 5;
    fn note(&mut self, s: &str) {
        self.count += 1;
        if self.shown.len() < Self::SHOWN {
            self.shown.push(s.chars().take(80).collect());
        }
    }
}

fn finish(members: Vec<Member>, bad: Bad, complete: bool, meta: SourceMeta) -> Discovery {
    if bad.count == 0 && complete {
        return Discovery::Complete { members, meta };
    }
    let mut reason = if complete {
        String::new()
    } else {
        "the file says complete: false".to_string()
    };
    if bad.count > 0 {
        reason = format!(
            "{reason}{}{} invalid addresses skipped ({}{})",
            if reason.is_empty() { "" } else { "; " },
            bad.count,
            bad.shown.join(", "),
            if bad.count > Bad::SHOWN { ", ..." } else { "" }
        );
    }
    Discovery::Partial {
        members,
        meta,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(text: &str) -> Discovery {
        let dir =
            std::env::temp_dir().join(format!("fw-src-{}-{}", std::process::id(), text.len()));
        std::fs::write(&dir, text).unwrap();
        let d = read(&dir, 1 << 20);
        std::fs::remove_file(&dir).unwrap();
        d
    }

    #[test]
    fn formats_and_failures() {
        let d = with(
            r#"{"revision": 3, "peers": [{"addr": "198.18.0.7"}, {"addr": "198.18.4.0/24", "status": "left"}]}"#,
        );
        let Discovery::Complete { members, meta } = d else {
            panic!("{d:?}")
        };
        assert_eq!(members.len(), 2);
        assert_eq!(members[1].status, MemberStatus::Left);
        assert_eq!(meta.revision, Some(3));
        let serf = r#"{"members":[{"name":"n1","addr":"198.18.0.11:7946","port":7946,"tags":{},"status":"alive","protocol":{"max":5,"min":2,"version":5}},
                                {"name":"n2","addr":"[2001:2::12]:7946","port":7946,"tags":{},"status":"failed","protocol":{"max":5,"min":2,"version":5}}]}"#;
        let Discovery::Complete { members, .. } = with(serf) else {
            panic!()
        };
        assert_eq!(members[0].net.to_string(), "198.18.0.11/32");
        assert_eq!(members[1].status, MemberStatus::Failed);
        // One alive member, the agent itself: a clean-looking list that is
        // not evidence of absence (the Serf RPC source's rule).
        let Discovery::Complete { meta, .. } = with(serf) else {
            panic!()
        };
        assert!(!meta.healthy);
        assert!(meta.health_reason.unwrap().contains("1 alive member"));
        let two = r#"{"members":[{"name":"n1","addr":"198.18.0.11:7946","status":"alive"},
                                {"name":"n2","addr":"198.18.0.12:7946","status":"alive"}]}"#;
        let Discovery::Complete { meta, .. } = with(two) else {
            panic!()
        };
        assert!(meta.healthy);
        for bad in [
            "",
            "   \n",
            "{\"peers\": [{\"addr\": \"198.18.0.7\"",
            "[]",
            "{\"peers\": [], \"extra\": 1}",
        ] {
            assert!(
                matches!(with(bad), Discovery::Failed { .. }),
                "{bad:?} must fail"
            );
        }
        assert!(
            matches!(with(r#"{"peers": []}"#), Discovery::Complete { ref members, .. } if members.is_empty())
        );
        // IPv4-mapped IPv6 is IPv4, in both formats: packets from that host
        // arrive as IPv4.
        let Discovery::Complete { members, .. } = with(
            r#"{"peers": [{"addr": "::ffff:198.18.0.7"}, {"addr": "::ffff:198.18.4.0/120"}]}"#,
        ) else {
            panic!()
        };
        assert_eq!(members[0].net.to_string(), "198.18.0.7/32");
        assert_eq!(members[1].net.to_string(), "198.18.4.0/24");
        let Discovery::Complete { members, .. } =
            with(r#"{"members": [{"addr": "[::ffff:198.18.0.9]:7946", "status": "alive"}]}"#)
        else {
            panic!()
        };
        assert_eq!(members[0].net.to_string(), "198.18.0.9/32");
        for both in [
            r#"{"members": [], "peers": []}"#,
            r#"{"members": [], "revision": 1}"#,
        ] {
            assert!(matches!(with(both), Discovery::Failed { .. }), "{both}");
        }
        let d = with(r#"{"peers": [{"addr": "198.18.0.7"}, {"addr": "nope"}]}"#);
        assert!(
            matches!(d, Discovery::Partial { ref reason, .. } if reason.contains("nope")),
            "{d:?}"
        );
        assert!(matches!(
            read(Path::new("/nonexistent/x.json"), 10),
            Discovery::Failed { .. }
        ));
        let big = format!(
            "{{\"peers\": [{}]}}",
            vec!["{\"addr\": \"198.18.0.7\"}"; 100].join(",")
        );
        let p = std::env::temp_dir().join(format!("fw-big-{}", std::process::id()));
        std::fs::write(&p, &big).unwrap();
        assert!(
            matches!(read(&p, 100), Discovery::Failed { ref reason, .. } if reason.contains("max_bytes"))
        );
        std::fs::remove_file(p).unwrap();
    }
}
