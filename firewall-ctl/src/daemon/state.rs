//! Persisted controller state and the other files of the state directory,
//! written atomically: temp file, fsync, rename, fsync of the directory. A
//! crash at any point leaves the old file or the new one, never a torn one.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::core::Persisted;
use crate::sys::fsafe;

pub const STATE_FILE: &str = "state.json";
pub const STATUS_FILE: &str = "status.json";
pub const APPROVE_FILE: &str = "approve.json";
pub const AUDIT_FILE: &str = "audit.jsonl";
pub const METRICS_FILE: &str = "metrics.prom";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {path}: check that the state directory exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({message}); move it away to start from the pinned datapath alone")]
    Corrupt { path: PathBuf, message: String },
}

/// Durable: fsync'd file and directory (state.json, the record of decisions).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    fsafe::replace(path, bytes, true, 0o600).map_err(|source| StateError::Write {
        path: path.into(),
        source,
    })
}

/// Replace a file that others read while we run (status.json, metrics.prom):
/// a reader (an operator's `status`, a Prometheus textfile collector) sees
/// the old file or the new one, never a truncated one. No fsync: these are
/// republished as the controller runs and are not recovered from after a
/// crash. Mode 0644: readable by a textfile collector when the directory is.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fsafe::replace(path, bytes, false, 0o644)
}

/// The state directory: created 0700, and refused when another user owns it
/// or could write it (they could plant links or swap our files).
pub fn prepare_dir(state_dir: &Path) -> Result<(), fsafe::UnsafePath> {
    fsafe::ensure_private_dir(state_dir)
}

/// The largest state file we read back: state.json holds a timer per absent
/// peer (~100 B each), so this covers well over a million.
pub const MAX_STATE_BYTES: u64 = 256 << 20;

pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    write_atomic(path, &serde_json::to_vec_pretty(v).expect("serialisable"))
}

/// `Ok(None)` if the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match fsafe::read_bounded(path, MAX_STATE_BYTES) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path: path.into(),
                message: e.to_string(),
            }),
        Err(e) if e.not_found() => Ok(None),
        Err(e) => Err(StateError::Corrupt {
            path: path.into(),
            message: e.to_string(),
        }),
    }
}

/// `approve.json`, written by `firewall-ctl approve --yes` and taken by the
/// daemon: the held deletions to let through, or all of them (`null`).
/// Anything else is refused whole: a malformed approval must never read as
/// "approve everything".
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Required, `null` included: `deserialize_with` switches off serde's
    /// reading of a missing Option as None, so `{}` is not "approve all".
    #[serde(deserialize_with = "Option::deserialize")]
    pub peers: Option<Vec<ipnet::IpNet>>,
}

/// The largest approval file read: a list of addresses, far below this.
pub const MAX_APPROVAL_BYTES: u64 = 16 << 20;

pub fn parse_approval(bytes: &[u8]) -> Result<Approval, serde_json::Error> {
    serde_json::from_slice(bytes)
}

pub fn load(state_dir: &Path) -> Result<Option<Persisted>, StateError> {
    read_json(&state_dir.join(STATE_FILE))
}

pub fn save(state_dir: &Path, p: &Persisted) -> Result<(), StateError> {
    write_json(&state_dir.join(STATE_FILE), p)
}

/// Append one line to the audit log (fsync'd: it is the record of evictions).
pub fn audit(state_dir: &Path, line: &super::contract::AuditLine) -> Result<(), StateError> {
    let path = state_dir.join(AUDIT_FILE);
    let err = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let mut f = fsafe::open_append(&path).map_err(err)?;
    let mut s = serde_json::to_string(line).expect("audit lines serialise");
    s.push('\n');
    f.write_all(s.as_bytes()).map_err(err)?;
    f.sync_data().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_approval_is_refused_never_read_as_approve_all() {
        assert_eq!(
            parse_approval(br#"{"peers": null}"#).unwrap(),
            Approval { peers: None }
        );
        assert_eq!(
            parse_approval(br#"{"peers": ["198.18.0.7/32"]}"#).unwrap(),
            Approval {
                peers: Some(vec!["198.18.0.7/32".parse().unwrap()])
            }
        );
        for bad in [
            &br#"{"peers": "198.18.0.7"}"#[..],
            br#"{"peers": ["nope"]}"#,
            br#"{"peers": [], "all": true}"#,
            br#"{}"#,
            b"",
            b"[1,2",
        ] {
            assert!(
                parse_approval(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
