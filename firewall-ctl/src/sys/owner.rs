//! Root acting on a datapath the service owns acts as the service's user.
//!
//! Under the shipped unit the controller runs as `firewall-ctl`, and its pins
//! and state belong to that user. An operator's `sudo firewall-ctl status`
//! (or `peers add`, `approve`) would otherwise be refused by the ownership
//! checks, or, worse, create root-owned pins and files the service can no
//! longer open. So root switches to that user, keeping only the capabilities
//! the datapath needs, before touching anything. Only that one named user is
//! trusted this way: a directory any other user owns is refused as before
//! (someone may have squatted it).

use std::{ffi::CString, os::unix::fs::MetadataExt, path::Path};

use caps::{CapSet, Capability, CapsHashSet};

/// The service's user, as the unit and the package create it.
pub const SERVICE_USER: &str = "firewall-ctl";

/// The capabilities the controller and the CLI keep (see `check_privileges`).
pub fn needed() -> CapsHashSet {
    [
        Capability::CAP_BPF,
        Capability::CAP_NET_ADMIN,
        Capability::CAP_PERFMON,
    ]
    .into_iter()
    .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("switching to the service user {user} (uid {uid}) failed: {source}")]
    Switch {
        user: &'static str,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("keeping CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON as {user} failed: {source}")]
    Caps {
        user: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// The uid and gid of `name`, if the user exists.
fn lookup(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null. This
    // runs in the CLI's main thread before any other thread exists, so
    // nothing else calls getpw* concurrently, and the fields are copied out
    // before returning.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null, pointing at a valid passwd record (see above).
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

fn check(r: libc::c_int, user_uid: u32) -> Result<(), OwnerError> {
    if r == 0 {
        Ok(())
    } else {
        Err(OwnerError::Switch {
            user: SERVICE_USER,
            uid: user_uid,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// If we are root and `dir` exists and belongs to [`SERVICE_USER`], become
/// that user with only [`needed`] capabilities. `Ok(Some(uid))` if we did.
pub fn act_as_service_user(dir: &Path) -> Result<Option<u32>, OwnerError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return Ok(None);
    };
    if md.uid() == 0 || !md.is_dir() {
        return Ok(None);
    }
    let Some((uid, gid)) = lookup(SERVICE_USER) else {
        return Ok(None);
    };
    if md.uid() != uid {
        return Ok(None);
    }
    // SAFETY: plain syscalls on our own process's credentials, with valid
    // arguments. KEEPCAPS keeps the permitted set across the uid change; the
    // effective set is restored from it below.
    unsafe {
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), uid)?;
        check(libc::setgroups(0, std::ptr::null()), uid)?;
        check(libc::setresgid(gid, gid, gid), uid)?;
        check(libc::setresuid(uid, uid, uid), uid)?;
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), uid)?;
    }
    let keep = needed();
    for set in [CapSet::Permitted, CapSet::Effective] {
        caps::set(None, set, &keep).map_err(|source| OwnerError::Caps {
            user: SERVICE_USER,
            source,
        })?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(|source| OwnerError::Caps {
        user: SERVICE_USER,
        source,
    })?;
    Ok(Some(uid))
}
