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
struct AnyFormat {
    #[serde(default)]
    members: Option<Converted<SerfMember<'static>>>,
    #[serde(default)]
    peers: Option<Converted<OurPeer<'static>>>,
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

/// An entry of either format, turned into a [`Member`] as it is parsed.
trait Entry<'de>: Deserialize<'de> {
    /// The member, or the text to name as invalid.
    fn member(&self) -> Result<Member, &str>;
}

impl<'de> Entry<'de> for OurPeer<'de> {
    fn member(&self) -> Result<Member, &str> {
        match parse_peer(&self.addr) {
            Ok(net) => Ok(Member {
                net,
                status: status_of(self.status.as_deref().unwrap_or("alive")),
            }),
            Err(_) => Err(&self.addr),
        }
    }
}

impl<'de> Entry<'de> for SerfMember<'de> {
    fn member(&self) -> Result<Member, &str> {
        match self
            .addr
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| self.addr.parse())
        {
            Ok(ip) => Ok(Member {
                net: crate::peers::normalize(ip.into()),
                status: status_of(&self.status),
            }),
            Err(_) => Err(&self.addr),
        }
    }
}

/// A list of entries, each converted as the parser reaches it: the parsed
/// entries are never held as a list (at 1M peers, 48 MB beside the file's
/// bytes and the members; the controller's own memory peaked over its
/// 200 MB goal with two such sources). serde's derive has no way to map
/// elements of a sequence as they come, hence this visitor. `E` names the
/// entry type (its lifetime is the parse's, not `'static`).
struct Converted<E> {
    members: Vec<Member>,
    bad: Bad,
    _e: std::marker::PhantomData<E>,
}

impl<'de, E> Deserialize<'de> for Converted<E>
where
    E: ForParse,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<E>(std::marker::PhantomData<E>);
        impl<'de, E: ForParse> serde::de::Visitor<'de> for V<E> {
            type Value = Converted<E>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of entries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                let mut bad = Bad::default();
                while let Some(e) = seq.next_element::<E::At<'de>>()? {
                    match e.member() {
                        Ok(m) => members.push(m),
                        Err(text) => bad.note(text),
                    }
                }
                Ok(Converted {
                    members,
                    bad,
                    _e: std::marker::PhantomData,
                })
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// Names an entry type for every lifetime of the parse.
trait ForParse {
    type At<'de>: Entry<'de>;
}
impl ForParse for OurPeer<'static> {
    type At<'de> = OurPeer<'de>;
}
impl ForParse for SerfMember<'static> {
    type At<'de> = SerfMember<'de>;
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
    match (f.members, f.peers) {
        (Some(members), None)
            if f.revision.is_none()
                && f.complete.is_none()
                && f.healthy.is_none()
                && f.health_reason.is_none() =>
        {
            let Converted {
                members: out, bad, ..
            } = members;
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
            let Converted {
                members: out, bad, ..
            } = peers;
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
        // An escaped string cannot borrow from the file: it is parsed all the same.
        let Discovery::Complete { members, .. } =
            with(r#"{"peers": [{"addr": "198.18.0.\u0037", "status": "\u006ceft"}]}"#)
        else {
            panic!()
        };
        assert_eq!(members[0].net.to_string(), "198.18.0.7/32");
        assert_eq!(members[0].status, MemberStatus::Left);
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
