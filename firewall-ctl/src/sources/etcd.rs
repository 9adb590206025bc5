//! The etcd discovery source (etcd-client). Peers are keys under a prefix,
//! each value a JSON document `{"addr": "198.18.0.7", "status": "alive"}`
//! (`status` defaults to alive). The source lists the prefix, then watches it
//! from the listed revision + 1, so nothing between list and watch is lost.
//! Every result carries the etcd revision, which feeds the stale guard. A lost
//! connection, a failed list or a broken watch is a failed result; the source
//! reconnects with backoff and lists again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::file::status_of;
use crate::discovery::{Discovery, Member, SourceMeta};
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
    /// PEM bundle of the CA that signs the etcd servers' certificates.
    /// Required for `https://` endpoints (no system roots are trusted).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for etcd's `--client-cert-auth`.
    /// The key file must not be readable by group or others.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// etcd user and password (`etcdctl auth enable`). A config holding a
    /// password must not be readable by group or others.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

impl EtcdConfig {
    /// Settings that only make sense together, checked at load.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("discovery.endpoints is empty: list at least one etcd endpoint".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("discovery.cert_file and discovery.key_file go together".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return Err("discovery.user and discovery.password go together".into());
        }
        let https = self.endpoints.iter().any(|e| e.starts_with("https://"));
        if https && self.ca_file.is_none() {
            return Err(
                "https endpoints need discovery.ca_file (the CA that signs the etcd servers' certificates)"
                    .into(),
            );
        }
        if !https && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err(
                "discovery.ca_file or cert_file is set but no endpoint is https://: write the endpoints as https://HOST:2379"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A certificate or key file: PEM, a few KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn pem(path: &Path) -> Result<Vec<u8>, String> {
    crate::sys::fsafe::read_bounded(path, MAX_PEM_BYTES).map_err(|e| e.to_string())
}

/// The connection options: timeouts, TLS and credentials. Files are read at
/// every (re)connect, so a rotated certificate is picked up by the next one.
fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, String> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(ca) = &cfg.ca_file {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(pem(ca)?));
        if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
            tls = tls.identity(Identity::from_pem(pem(c)?, pem(k)?));
        }
        opts = opts.with_tls(tls);
    }
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.with_user(u.clone(), p.clone());
    }
    Ok(opts)
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
        return Discovery::TooLarge {
            members: kvs.len() as u64,
            limit: max_members as u64,
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
    let opts = match connect_options(cfg) {
        Ok(o) => o,
        Err(e) => return format!("TLS or credential files: {e}"),
    };
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
