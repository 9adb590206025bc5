//! The etcd discovery source (etcd-client). Peers are keys under a prefix,
//! each value a JSON document `{"addr": "198.18.0.7", "status": "alive"}`
//! (`status` defaults to alive). The source lists the prefix, then watches it
//! from the listed revision + 1, so nothing between list and watch is lost.
//! Every result carries the etcd revision, which feeds the stale guard. A lost
//! connection, a failed list or a broken watch is a failed result; the source
//! reconnects with backoff and lists again.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    discovery::{Discovery, Member, SourceMeta},
    file_source::status_of,
};
use crate::peers::parse_peer;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Re-list this often even when the watch is quiet (a backstop).
    #[serde(default = "default_resync")]
    pub resync_ms: u64,
}

fn default_prefix() -> String {
    "/firewall/peers/".into()
}
fn default_resync() -> u64 {
    30_000
}

#[derive(Deserialize)]
struct Value {
    addr: String,
    #[serde(default)]
    status: Option<String>,
}

/// Parse one key's value; `None` for a value that is not a peer document.
/// Public for the fuzz target `etcd_value`.
pub fn parse(v: &[u8]) -> Option<Member> {
    let v: Value = serde_json::from_slice(v).ok()?;
    Some(Member {
        net: parse_peer(&v.addr).ok()?,
        status: status_of(v.status.as_deref().unwrap_or("alive")),
    })
}

fn snapshot(
    kvs: &BTreeMap<Vec<u8>, Option<Member>>,
    revision: i64,
    max_members: usize,
) -> Discovery {
    let meta = SourceMeta {
        revision: Some(revision.max(0) as u64),
        healthy: true,
        health_reason: None,
    };
    if kvs.len() > max_members {
        return Discovery::Failed {
            reason: format!("{} keys exceed guards.max_members", kvs.len()),
            meta,
        };
    }
    let members: Vec<Member> = kvs.values().flatten().cloned().collect();
    let bad = kvs.values().filter(|m| m.is_none()).count();
    if bad > 0 {
        return Discovery::Partial {
            members,
            meta,
            reason: format!("{bad} keys hold no valid peer document"),
        };
    }
    Discovery::Complete { members, meta }
}

pub fn spawn(cfg: EtcdConfig, max_members: usize) -> mpsc::Receiver<Discovery> {
    let (tx, rx) = mpsc::channel::<Discovery>(1);
    tokio::spawn(async move {
        let mut backoff_ms = 100u64;
        loop {
            let e = session(&cfg, max_members, &tx).await;
            if tx.is_closed() {
                return;
            }
            let reason = format!("etcd at {}: {e}", cfg.endpoints.join(","));
            tracing::warn!("{reason}");
            // Never drop a failure in favour of older good data: wait for room.
            if tx
                .send(Discovery::Failed {
                    reason,
                    meta: SourceMeta::default(),
                })
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(5_000);
        }
    });
    rx
}

async fn session(cfg: &EtcdConfig, max_members: usize, tx: &mpsc::Sender<Discovery>) -> String {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    let mut client = match Client::connect(cfg.endpoints.clone(), Some(opts)).await {
        Ok(c) => c,
        Err(e) => return format!("connect failed: {e}"),
    };
    loop {
        let resp = match client
            .get(cfg.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => return format!("list failed: {e}"),
        };
        let mut revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut kvs: BTreeMap<Vec<u8>, Option<Member>> = resp
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), parse(kv.value())))
            .collect();
        if tx
            .send(snapshot(&kvs, revision, max_members))
            .await
            .is_err()
        {
            return "the daemon stopped".into();
        }
        let mut stream = match client
            .watch(
                cfg.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return format!("watch failed: {e}"),
        };
        let resync = tokio::time::sleep(Duration::from_millis(cfg.resync_ms));
        tokio::pin!(resync);
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(w)) => {
                        if w.canceled() {
                            return format!("watch canceled (compacted revision {})", w.compact_revision());
                        }
                        for ev in w.events() {
                            let Some(kv) = ev.kv() else { continue };
                            match ev.event_type() {
                                EventType::Put => { kvs.insert(kv.key().to_vec(), parse(kv.value())); }
                                EventType::Delete => { kvs.remove(kv.key()); }
                            }
                        }
                        revision = w.header().map(|h| h.revision()).unwrap_or(revision);
                        // Keep only the newest snapshot if the daemon is busy.
                        let _ = tx.try_send(snapshot(&kvs, revision, max_members));
                    }
                    Ok(None) => return "watch stream ended".into(),
                    Err(e) => return format!("watch broke: {e}"),
                },
                _ = &mut resync => break,
            }
        }
    }
}
