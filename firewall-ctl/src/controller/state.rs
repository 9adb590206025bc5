//! Persisted controller state and the other files of the state directory,
//! written atomically: temp file, fsync, rename, fsync of the directory. A
//! crash at any point leaves the old file or the new one, never a torn one.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

use super::core::Persisted;

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

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut f = File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(())
}

/// Replace a file that others read while we run (status.json, metrics.prom):
/// write a temporary file and rename it over, so a reader (an operator's
/// `status`, a Prometheus textfile collector) sees the old file or the new
/// one, never a truncated one. No fsync: these are republished every tick and
/// are not recovered from after a crash.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    write_atomic(path, &serde_json::to_vec_pretty(v).expect("serialisable"))
}

/// `Ok(None)` if the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path: path.into(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Corrupt {
            path: path.into(),
            message: e.to_string(),
        }),
    }
}

pub fn load(state_dir: &Path) -> Result<Option<Persisted>, StateError> {
    read_json(&state_dir.join(STATE_FILE))
}

pub fn save(state_dir: &Path, p: &Persisted) -> Result<(), StateError> {
    write_json(&state_dir.join(STATE_FILE), p)
}

/// Append one line to the audit log (fsync'd: it is the record of evictions).
pub fn audit(state_dir: &Path, line: &serde_json::Value) -> Result<(), StateError> {
    let path = state_dir.join(AUDIT_FILE);
    let err = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(err)?;
    let mut s = line.to_string();
    s.push('\n');
    f.write_all(s.as_bytes()).map_err(err)?;
    f.sync_data().map_err(err)
}
