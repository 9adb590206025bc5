//! One writer at a time per pin directory: the daemon and an operator's
//! `peers add` serialise on an flock, like xdp-filter's lock. The kernel check
//! in `stage`/`flip` (committed generation unchanged) catches a writer that
//! ignores the lock.

use std::{fs::File, os::fd::AsRawFd, path::Path};

pub struct CommitLock(#[allow(dead_code)] File);

impl CommitLock {
    pub fn acquire(pin_dir: &Path) -> std::io::Result<CommitLock> {
        let dir = Path::new("/run/firewall-ctl");
        std::fs::create_dir_all(dir)?;
        let name: String = pin_dir
            .to_string_lossy()
            .chars()
            .map(|c| if c == '/' { '_' } else { c })
            .collect();
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{name}.lock")))?;
        // SAFETY: flock on an fd we own; blocks until the other writer is done.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CommitLock(f))
    }
}
