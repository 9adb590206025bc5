//! Locks on the pin directory and the state directory.
//!
//! - [`CommitLock`]: one writer at a time per pin directory. The daemon and
//!   an operator's `peers add` serialise on it, like xdp-filter's lock. It is
//!   an flock on the pin directory itself, so it needs no other directory
//!   (a non-root controller owns its pins and nothing under /run), and every
//!   spelling of the path (`/sys/fs/bpf//p`, a symlink) locks the same inode.
//!   The kernel check in `stage`/`flip` (committed generation unchanged)
//!   still catches a writer that ignores the lock.
//! - [`ControllerLock`]: one controller per pin directory and per state
//!   directory, held for the daemon's life, refused at once to a second one.
//! - [`MonitorLock`]: one `monitor` per pin directory. The events ring buffer
//!   has one consumer position, so two readers would each see part of the
//!   stream.

use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd,
        unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Unsafe(#[from] crate::sys::fsafe::UnsafePath),
    #[error(
        "another controller{holder} already runs on {path}: stop it first (one controller per pin directory and per state directory)"
    )]
    Busy { path: PathBuf, holder: String },
    #[error(
        "another `firewall-ctl monitor` already reads the events of {0}: the ring buffer has one reader, so stop that one first"
    )]
    MonitorBusy(PathBuf),
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on an fd we own for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_dir(path: &Path) -> Result<File, LockError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| LockError::Io {
            path: path.into(),
            source,
        })
}

pub struct CommitLock(
    #[expect(dead_code, reason = "held for its Drop: closing the fd unlocks")] File,
);

impl CommitLock {
    /// Blocks until the other writer is done (commits take milliseconds).
    pub fn acquire(pin_dir: &Path) -> Result<CommitLock, LockError> {
        // Whose directory it is comes first: a lock on a directory someone
        // else controls would serialise nothing.
        crate::sys::fsafe::check_private_dir(pin_dir)?;
        let f = open_dir(pin_dir)?;
        flock(&f, libc::LOCK_EX).map_err(|source| LockError::Io {
            path: pin_dir.into(),
            source,
        })?;
        Ok(CommitLock(f))
    }
}

/// Held for the daemon's whole life.
pub struct ControllerLock {
    _pins: File,
    _state: File,
}

/// The name of the subdirectory of the pin directory whose flock marks a
/// running controller (bpffs holds no regular files, and the pin directory's
/// own flock is the commit lock).
pub const CONTROLLER_DIR: &str = "controller";
/// The lock file in the state directory; it holds the holder's pid.
pub const STATE_LOCK: &str = "controller.lock";

impl ControllerLock {
    pub fn acquire(pin_dir: &Path, state_dir: &Path) -> Result<ControllerLock, LockError> {
        let cdir = pin_dir.join(CONTROLLER_DIR);
        crate::sys::fsafe::ensure_private_dir(&cdir)?;
        let path = state_dir.join(STATE_LOCK);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut state = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        let holder = |f: &mut File| {
            let mut s = String::new();
            let _ = f.take(32).read_to_string(&mut s);
            match s.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            }
        };
        if flock(&state, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return Err(LockError::Busy {
                holder: holder(&mut state),
                path: state_dir.into(),
            });
        }
        let pins = open_dir(&cdir)?;
        if flock(&pins, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return Err(LockError::Busy {
                holder: String::new(),
                path: pin_dir.into(),
            });
        }
        state.set_len(0).map_err(io)?;
        state.rewind().map_err(io)?;
        writeln!(state, "{}", std::process::id()).map_err(io)?;
        let _ = state.set_permissions(std::fs::Permissions::from_mode(0o600));
        Ok(ControllerLock {
            _pins: pins,
            _state: state,
        })
    }
}

/// The subdirectory of the pin directory whose flock marks a running monitor.
pub const MONITOR_DIR: &str = "monitor";

/// Held for a `monitor`'s life.
pub struct MonitorLock(
    #[expect(dead_code, reason = "held for its Drop: closing the fd unlocks")] File,
);

impl MonitorLock {
    pub fn acquire(pin_dir: &Path) -> Result<MonitorLock, LockError> {
        crate::sys::fsafe::check_private_dir(pin_dir)?;
        let mdir = pin_dir.join(MONITOR_DIR);
        crate::sys::fsafe::ensure_private_dir(&mdir)?;
        let f = open_dir(&mdir)?;
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return Err(LockError::MonitorBusy(pin_dir.into()));
        }
        Ok(MonitorLock(f))
    }
}
