//! The Serf discovery source: a native client of the Serf agent's RPC protocol
//! (msgpack over TCP, IPC version 1).
//!
//! Written by hand: the only crate for it (serf-rpc 0.2) is unmaintained, does
//! not build today, and panics on 4-byte member addresses. The protocol is
//! small: a handshake, `members-filtered`, `stats`, and `stream`.
//!
//! Level-triggered: `stream` events only wake the poller early; membership is
//! always re-read with `members-filtered`, because the agent batches events
//! (1-3 s), drops them past a 512-event buffer, and re-emits stale
//! `member-update`s (discovery-lab.md, T4). Health: the agent must answer and
//! see at least one other alive member; a restarted agent whose seeds are down
//! sees only itself for ~30 s, and that is a failed result, never an empty one.

use std::{
    collections::BTreeMap,
    io::{BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream, ToSocketAddrs},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

use super::{
    discovery::{Discovery, Member, SourceMeta},
    file_source::status_of,
};

#[derive(Debug, thiserror::Error)]
pub enum SerfError {
    #[error("cannot reach the Serf agent at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("Serf RPC I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("Serf RPC decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("Serf RPC encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("Serf agent error on `{command}`: {error}")]
    Agent { command: String, error: String },
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RequestHeader<'a> {
    command: &'a str,
    seq: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ResponseHeader {
    seq: u64,
    error: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Handshake {
    version: i32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Auth<'a> {
    auth_key: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct MembersFiltered<'a> {
    tags: &'a BTreeMap<String, String>,
    status: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Stream<'a> {
    r#type: &'a str,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "PascalCase")]
pub struct SerfMember {
    pub name: String,
    /// Go's net.IP: 4 bytes for IPv4, 16 for IPv6 or IPv4-mapped.
    #[serde(with = "serde_bytes")]
    pub addr: Vec<u8>,
    pub port: u16,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MembersResponse {
    members: Vec<SerfMember>,
}

/// A stream record; only `Event` matters (events are hints).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StreamRecord {
    #[serde(default)]
    event: String,
}

pub fn member_ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?);
            Some(
                v6.to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
            )
        }
        _ => None,
    }
}

/// One RPC connection. Requests and replies are msgpack objects back to back
/// with no framing; which commands return a body is fixed per command.
pub struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
    seq: u64,
}

impl Conn {
    pub fn connect(
        addr: &str,
        auth_key: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Conn, SerfError> {
        let err = |source| SerfError::Connect {
            addr: addr.to_string(),
            source,
        };
        let sa = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(std::io::Error::other("no address")))?;
        let s = TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(err)?;
        // A timeout mid-object leaves the stream unusable; the caller then
        // drops this connection and opens a new one.
        s.set_read_timeout(timeout)?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            r: BufReader::new(s.try_clone()?),
            w: s,
            seq: 0,
        };
        c.call::<_, ()>("handshake", Some(&Handshake { version: 1 }), false)?;
        if let Some(k) = auth_key {
            c.call::<_, ()>("auth", Some(&Auth { auth_key: k }), false)?;
        }
        Ok(c)
    }

    fn send<B: Serialize>(&mut self, command: &str, body: Option<&B>) -> Result<u64, SerfError> {
        let seq = self.seq;
        self.seq += 1;
        // Named (map) encoding: the agent decodes structs by field name.
        let mut buf = rmp_serde::to_vec_named(&RequestHeader { command, seq })?;
        if let Some(b) = body {
            buf.extend(rmp_serde::to_vec_named(b)?);
        }
        self.w.write_all(&buf)?;
        Ok(seq)
    }

    fn header(&mut self, command: &str) -> Result<ResponseHeader, SerfError> {
        let h: ResponseHeader = rmp_serde::from_read(&mut self.r)?;
        if !h.error.is_empty() {
            return Err(SerfError::Agent {
                command: command.into(),
                error: h.error,
            });
        }
        Ok(h)
    }

    pub fn call<B: Serialize, R: DeserializeOwned>(
        &mut self,
        command: &str,
        body: Option<&B>,
        has_reply: bool,
    ) -> Result<Option<R>, SerfError> {
        let seq = self.send(command, body)?;
        let h = self.header(command)?;
        if h.seq != seq {
            return Err(SerfError::Agent {
                command: command.into(),
                error: format!("reply for seq {} to request {seq}", h.seq),
            });
        }
        if has_reply {
            Ok(Some(rmp_serde::from_read(&mut self.r)?))
        } else {
            Ok(None)
        }
    }

    pub fn members_filtered(
        &mut self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<SerfMember>, SerfError> {
        let r: Option<MembersResponse> = self.call(
            "members-filtered",
            Some(&MembersFiltered {
                tags,
                status: "",
                name: "",
            }),
            true,
        )?;
        Ok(r.map(|m| m.members).unwrap_or_default())
    }

    /// The local agent's node name (from `stats`).
    pub fn self_name(&mut self) -> Result<String, SerfError> {
        let r: Option<BTreeMap<String, BTreeMap<String, String>>> =
            self.call::<(), _>("stats", None, true)?;
        Ok(
            r.and_then(|m| m.get("agent").and_then(|a| a.get("name").cloned()))
                .unwrap_or_default(),
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SerfConfig {
    #[serde(default = "default_rpc")]
    pub rpc_addr: String,
    /// Scope a topology: members-filtered by these tags (values are anchored regexes).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Re-read members at least this often (stream events wake it sooner).
    #[serde(default = "default_poll")]
    pub poll_ms: u64,
    #[serde(default)]
    pub auth_key: Option<String>,
}

fn default_rpc() -> String {
    "127.0.0.1:7373".into()
}
fn default_poll() -> u64 {
    200
}

/// Turn a member list into a discovery result, applying the health rule.
pub fn to_discovery(
    members: Vec<SerfMember>,
    self_name: &str,
    max_members: usize,
    naive: bool,
) -> Discovery {
    if members.len() > max_members {
        return Discovery::Failed {
            reason: format!("{} members exceed guards.max_members", members.len()),
            meta: SourceMeta::default(),
        };
    }
    let others_alive = members
        .iter()
        .filter(|m| m.name != self_name && m.status == "alive")
        .count();
    // The naive comparison mode takes a self-only view at face value, as the
    // post-mortem's orchestrator did.
    if others_alive == 0 && !naive {
        return Discovery::Failed {
            reason: format!(
                "the Serf agent `{self_name}` sees no other alive member (restarted with its seeds down, or partitioned)"
            ),
            meta: SourceMeta {
                healthy: false,
                health_reason: Some("agent sees only itself".into()),
                revision: None,
            },
        };
    }
    let mut out = Vec::with_capacity(members.len());
    let mut bad = 0;
    for m in members {
        match member_ip(&m.addr) {
            Some(ip) => out.push(Member {
                net: ip.into(),
                status: status_of(&m.status),
            }),
            None => bad += 1,
        }
    }
    let meta = SourceMeta {
        revision: None,
        healthy: true,
        health_reason: None,
    };
    if bad > 0 {
        return Discovery::Partial {
            members: out,
            meta,
            reason: format!("{bad} members with unusable addresses"),
        };
    }
    Discovery::Complete { members: out, meta }
}

/// Run the source on its own threads (blocking sockets: see Conn::connect),
/// handing results to the daemon. Reconnects with exponential backoff; every
/// failure is sent as a failed result.
pub fn spawn(cfg: SerfConfig, max_members: usize, naive: bool) -> mpsc::Receiver<Discovery> {
    let (tx, rx) = mpsc::channel::<Discovery>(1);
    std::thread::Builder::new()
        .name("serf-source".into())
        .spawn(move || {
            let mut backoff_ms = 100u64;
            loop {
                let err = match session(&cfg, max_members, naive, &tx) {
                    Ok(()) => return, // the daemon went away
                    Err(e) => e,
                };
                // Latest wins: if the daemon has not taken the last result, a
                // newer failure replaces nothing important.
                let _ = tx.try_send(Discovery::Failed {
                    reason: err.to_string(),
                    meta: SourceMeta::default(),
                });
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(backoff_ms));
                backoff_ms = (backoff_ms * 2).min(5_000);
            }
        })
        .expect("spawn serf thread");
    rx
}

fn session(
    cfg: &SerfConfig,
    max_members: usize,
    naive: bool,
    tx: &mpsc::Sender<Discovery>,
) -> Result<(), SerfError> {
    let mut conn = Conn::connect(
        &cfg.rpc_addr,
        cfg.auth_key.as_deref(),
        Some(Duration::from_secs(5)),
    )?;
    let me = conn.self_name()?;
    // Events on a dedicated connection: replies and records would interleave.
    let (wake_tx, wake_rx) = std_mpsc::sync_channel::<()>(1);
    let mut sconn = Conn::connect(&cfg.rpc_addr, cfg.auth_key.as_deref(), None)?;
    sconn.call::<_, ()>(
        "stream",
        Some(&Stream {
            r#type: "member-join,member-leave,member-failed,member-update,member-reap",
        }),
        false,
    )?;
    std::thread::Builder::new()
        .name("serf-stream".into())
        .spawn(move || {
            loop {
                let h: Result<ResponseHeader, _> = rmp_serde::from_read(&mut sconn.r);
                let rec: Result<StreamRecord, _> = rmp_serde::from_read(&mut sconn.r);
                match (h, rec) {
                    (Ok(_), Ok(r)) => {
                        tracing::debug!(event = %r.event, "serf event: re-reading members");
                        let _ = wake_tx.try_send(());
                    }
                    _ => return, // the session notices on its next poll
                }
            }
        })
        .expect("spawn stream thread");
    loop {
        let members = conn.members_filtered(&cfg.tags)?;
        let d = to_discovery(members, &me, max_members, naive);
        match tx.try_send(d) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        }
        match wake_rx.recv_timeout(Duration::from_millis(cfg.poll_ms)) {
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            // The stream connection died: reconnect everything.
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                return Err(SerfError::Io(std::io::Error::other(
                    "the Serf event stream closed",
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, ip: [u8; 4], status: &str) -> SerfMember {
        SerfMember {
            name: name.into(),
            addr: ip.to_vec(),
            port: 7946,
            tags: BTreeMap::new(),
            status: status.into(),
        }
    }

    #[test]
    fn health_and_mapping() {
        assert!(matches!(
            to_discovery(vec![m("n1", [198, 18, 0, 11], "alive")], "n1", 10, false),
            Discovery::Failed { .. }
        ));
        assert!(matches!(
            to_discovery(
                vec![
                    m("n1", [198, 18, 0, 11], "alive"),
                    m("n2", [198, 18, 0, 12], "failed")
                ],
                "n1",
                10,
                false
            ),
            Discovery::Failed { .. }
        ));
        let d = to_discovery(
            vec![
                m("n1", [198, 18, 0, 11], "alive"),
                m("n2", [198, 18, 0, 12], "alive"),
                m("n3", [198, 18, 0, 13], "left"),
            ],
            "n1",
            10,
            false,
        );
        let Discovery::Complete { members, .. } = d else {
            panic!()
        };
        assert_eq!(members.len(), 3);
        assert_eq!(
            members[2].status,
            super::super::discovery::MemberStatus::Left
        );
        let mapped = member_ip(&Ipv4Addr::new(198, 18, 0, 9).to_ipv6_mapped().octets()).unwrap();
        assert_eq!(mapped, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)));
        assert!(matches!(
            to_discovery(vec![m("a", [1, 1, 1, 1], "alive"); 11], "x", 10, false),
            Discovery::Failed { .. }
        ));
    }
}
