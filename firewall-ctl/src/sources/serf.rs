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
    io::{BufReader, Read, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream, ToSocketAddrs},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

use super::file::status_of;
use crate::discovery::{Discovery, Member, SourceMeta};

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
pub struct MembersResponse {
    pub members: Vec<SerfMember>,
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

/// Read one reply from the agent: the header (an agent error or a reply to
/// another request is an error), then the body if the command has one.
/// Public for the fuzz target `serf_reply`, which feeds it arbitrary bytes.
pub fn read_reply<R: DeserializeOwned>(
    r: &mut impl Read,
    command: &str,
    seq: u64,
    has_reply: bool,
) -> Result<Option<R>, SerfError> {
    let h: ResponseHeader = rmp_serde::from_read(&mut *r)?;
    if !h.error.is_empty() {
        return Err(SerfError::Agent {
            command: command.into(),
            error: h.error,
        });
    }
    if h.seq != seq {
        return Err(SerfError::Agent {
            command: command.into(),
            error: format!("reply for seq {} to request {seq}", h.seq),
        });
    }
    if has_reply {
        Ok(Some(rmp_serde::from_read(r)?))
    } else {
        Ok(None)
    }
}

/// The bound on one reply (header, body or stream record) when the config
/// sets none: a member entry is 150-300 bytes with a few tags, so 64 MiB is
/// some 250,000 members, far past any Serf cluster. A reply that declares
/// or sends more is a failed result, never a 4 GiB allocation.
pub const DEFAULT_MAX_REPLY_BYTES: u64 = 64 << 20;

/// The socket under the reader: each read honours the request's deadline
/// (a whole reply, not one `read`, must arrive within the timeout, so an
/// agent that trickles a byte every few seconds still times out) and the
/// reply's byte budget (rmp-serde grows buffers as bytes arrive, so the
/// budget also bounds every allocation a hostile reply can cause).
struct Guarded {
    s: TcpStream,
    deadline: Option<Instant>,
    budget: u64,
}

impl Guarded {
    fn arm(&mut self, timeout: Option<Duration>, budget: u64) {
        self.deadline = timeout.map(|t| Instant::now() + t);
        self.budget = budget;
    }
}

impl Read for Guarded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.budget == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the reply is larger than the bound (discovery.max_reply_bytes)",
            ));
        }
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no complete reply within the request timeout",
                ));
            }
            self.s.set_read_timeout(Some(left))?;
        }
        let n = buf
            .len()
            .min(usize::try_from(self.budget).unwrap_or(usize::MAX));
        let r = self.s.read(&mut buf[..n])?;
        self.budget -= r as u64;
        Ok(r)
    }
}

/// One RPC connection. Requests and replies are msgpack objects back to back
/// with no framing; which commands return a body is fixed per command.
pub struct Conn {
    w: TcpStream,
    r: BufReader<Guarded>,
    seq: u64,
    timeout: Option<Duration>,
    max_reply_bytes: u64,
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
        s.set_write_timeout(Some(timeout.unwrap_or(Duration::from_secs(5))))?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            r: BufReader::new(Guarded {
                s: s.try_clone()?,
                deadline: None,
                budget: 0,
            }),
            w: s,
            seq: 0,
            timeout,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
        };
        c.call::<_, ()>("handshake", Some(&Handshake { version: 1 }), false)?;
        if let Some(k) = auth_key {
            c.call::<_, ()>("auth", Some(&Auth { auth_key: k }), false)?;
        }
        Ok(c)
    }

    pub fn set_max_reply_bytes(&mut self, n: u64) {
        self.max_reply_bytes = n;
    }

    /// Arm the reader for one more object from the stream connection (no
    /// deadline: events come when they come; the byte bound still holds).
    fn arm_record(&mut self) {
        self.r.get_mut().arm(None, self.max_reply_bytes);
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

    pub fn call<B: Serialize, R: DeserializeOwned>(
        &mut self,
        command: &str,
        body: Option<&B>,
        has_reply: bool,
    ) -> Result<Option<R>, SerfError> {
        let seq = self.send(command, body)?;
        // One deadline and one byte budget for the whole reply.
        self.r.get_mut().arm(self.timeout, self.max_reply_bytes);
        read_reply(&mut self.r, command, seq, has_reply)
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
    /// The largest reply accepted from the agent (see DEFAULT_MAX_REPLY_BYTES).
    #[serde(default = "default_max_reply_bytes")]
    pub max_reply_bytes: u64,
}

fn default_max_reply_bytes() -> u64 {
    DEFAULT_MAX_REPLY_BYTES
}

fn default_rpc() -> String {
    "127.0.0.1:7373".into()
}
fn default_poll() -> u64 {
    200
}

/// Turn a member list into a discovery result, applying the health rule: an
/// agent that sees no other alive member says so in the result (unhealthy),
/// and the core decides what that means: deletions freeze, or, in the naive
/// comparison mode only, the list is taken at face value.
pub fn to_discovery(members: Vec<SerfMember>, self_name: &str, max_members: usize) -> Discovery {
    if members.len() > max_members {
        return Discovery::TooLarge {
            members: members.len() as u64,
            limit: max_members as u64,
            meta: SourceMeta::default(),
        };
    }
    let others_alive = members
        .iter()
        .filter(|m| m.name != self_name && m.status == "alive")
        .count();
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
    let meta = if others_alive == 0 {
        SourceMeta {
            revision: None,
            healthy: false,
            health_reason: Some(format!(
                "the Serf agent `{self_name}` sees no other alive member (restarted with its seeds down, or partitioned)"
            )),
        }
    } else {
        SourceMeta {
            revision: None,
            healthy: true,
            health_reason: None,
        }
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
pub fn spawn(cfg: SerfConfig, max_members: usize) -> mpsc::Receiver<Discovery> {
    let (tx, rx) = mpsc::channel::<Discovery>(1);
    std::thread::Builder::new()
        .name("serf-source".into())
        .spawn(move || {
            let mut backoff_ms = 100u64;
            loop {
                let err = match session(&cfg, max_members, &tx) {
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
    tx: &mpsc::Sender<Discovery>,
) -> Result<(), SerfError> {
    let mut conn = Conn::connect(
        &cfg.rpc_addr,
        cfg.auth_key.as_deref(),
        Some(Duration::from_secs(5)),
    )?;
    conn.set_max_reply_bytes(cfg.max_reply_bytes);
    let me = conn.self_name()?;
    // Events on a dedicated connection: replies and records would interleave.
    let (wake_tx, wake_rx) = std_mpsc::sync_channel::<()>(1);
    let mut sconn = Conn::connect(&cfg.rpc_addr, cfg.auth_key.as_deref(), None)?;
    sconn.set_max_reply_bytes(cfg.max_reply_bytes);
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
                sconn.arm_record();
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
        let d = to_discovery(members, &me, max_members);
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
    use std::net::TcpListener;

    use super::*;

    /// What a hostile or broken agent sends back, on loopback.
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Header {
        seq: u64,
        error: String,
    }

    fn header(seq: u64) -> Vec<u8> {
        rmp_serde::to_vec_named(&Header {
            seq,
            error: String::new(),
        })
        .unwrap()
    }

    /// A fake agent that runs `serve` on its first connection.
    fn fake_agent(serve: impl FnOnce(TcpStream) + Send + 'static) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                serve(s);
            }
        });
        addr
    }

    /// Run `f` on a thread and wait for it, so a regression that hangs fails
    /// the test instead of hanging the run.
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the Serf client hung on a misbehaving agent")
    }

    #[test]
    fn an_agent_that_trickles_a_byte_at_a_time_times_out() {
        // One byte a second never trips a per-read timeout of 2 s; only a
        // deadline for the whole reply does.
        let addr = fake_agent(|mut s| {
            for b in header(0) {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1_000));
            }
        });
        let r =
            within(move || Conn::connect(&addr, None, Some(Duration::from_secs(2))).map(|_| ()));
        let e = r.expect_err("a trickled reply must fail");
        assert!(e.to_string().contains("no complete reply"), "{e}");
    }

    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap()
    }

    #[test]
    fn a_reply_declaring_4_gib_is_cut_at_the_bound() {
        // The `stats` body claims a 4 GiB string and streams up to 256 MB.
        let addr = fake_agent(|mut s| {
            let mut first = header(0);
            first.extend(header(1));
            first.extend([0xdb, 0xff, 0xff, 0xff, 0xff]); // str32 of 4 GiB - 1
            if s.write_all(&first).is_err() {
                return;
            }
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..256 {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let before = peak_rss_kib();
        let r = within(move || {
            let mut c = Conn::connect(&addr, None, Some(Duration::from_secs(20)))?;
            c.set_max_reply_bytes(4 << 20);
            c.self_name()
        });
        let e = r.expect_err("a reply over the bound must fail");
        assert!(e.to_string().contains("larger than the bound"), "{e}");
        let grew_mib = peak_rss_kib().saturating_sub(before) / 1024;
        assert!(
            grew_mib < 64,
            "peak RSS grew by {grew_mib} MiB for a 4 MiB bound"
        );
    }

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
        // An agent that sees no other alive member reports itself unhealthy:
        // the core freezes deletions on that (or, naive, takes it as is).
        let unhealthy = |d: &Discovery| {
            matches!(d, Discovery::Complete { meta, .. } if !meta.healthy
                && meta.health_reason.as_deref().is_some_and(|r| r.contains("sees no other alive member")))
        };
        assert!(unhealthy(&to_discovery(
            vec![m("n1", [198, 18, 0, 11], "alive")],
            "n1",
            10
        )));
        assert!(unhealthy(&to_discovery(
            vec![
                m("n1", [198, 18, 0, 11], "alive"),
                m("n2", [198, 18, 0, 12], "failed")
            ],
            "n1",
            10
        )));
        let d = to_discovery(
            vec![
                m("n1", [198, 18, 0, 11], "alive"),
                m("n2", [198, 18, 0, 12], "alive"),
                m("n3", [198, 18, 0, 13], "left"),
            ],
            "n1",
            10,
        );
        let Discovery::Complete { members, meta } = d else {
            panic!()
        };
        assert!(meta.healthy);
        assert_eq!(members.len(), 3);
        assert_eq!(members[2].status, crate::discovery::MemberStatus::Left);
        let mapped = member_ip(&Ipv4Addr::new(198, 18, 0, 9).to_ipv6_mapped().octets()).unwrap();
        assert_eq!(mapped, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)));
        assert!(matches!(
            to_discovery(vec![m("a", [1, 1, 1, 1], "alive"); 11], "x", 10),
            Discovery::TooLarge {
                members: 11,
                limit: 10,
                ..
            }
        ));
    }
}
