//! Exit codes, documented in README.md, and the mapping from an error chain
//! to one of them.

use crate::{
    datapath::{attach::AttachError, layout::LayoutError},
    peers::PeerParseError,
    store::StoreError,
    sys::{SysError, fsafe::UnsafePath, lock::LockError},
};

/// Exit codes, documented in README.md.
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const PRIVILEGE: u8 = 3;
pub const NOT_FOUND: u8 = 4;
pub const REFUSED: u8 = 5;
pub const COMMIT_FAILED: u8 = 6;

pub fn exit_code(e: &anyhow::Error) -> u8 {
    for c in e.chain() {
        if let Some(e) = c.downcast_ref::<SysError>() {
            return match e {
                SysError::NotPrivileged(_) => PRIVILEGE,
                SysError::NoInterface(_) | SysError::NoBpffs(_) => NOT_FOUND,
            };
        }
        if c.downcast_ref::<PeerParseError>().is_some() {
            return USAGE;
        }
        if let Some(e) = c.downcast_ref::<UnsafePath>() {
            return unsafe_path_code(e);
        }
        if let Some(e) = c.downcast_ref::<LayoutError>() {
            return layout_code(e);
        }
        if let Some(e) = c.downcast_ref::<LockError>() {
            return match e {
                LockError::Busy { .. } | LockError::MonitorBusy(_) => REFUSED,
                LockError::Unsafe(u) => unsafe_path_code(u),
                LockError::Io { source, .. } => io_code(source),
            };
        }
        if let Some(e) = c.downcast_ref::<AttachError>() {
            match e {
                AttachError::Sys(SysError::NotPrivileged(_)) => return PRIVILEGE,
                AttachError::Sys(_) | AttachError::Layout(LayoutError::NotAttached(_)) => {
                    return NOT_FOUND;
                }
                AttachError::Layout(e) => return layout_code(e),
                AttachError::Foreign { .. }
                | AttachError::Capacity { .. }
                | AttachError::FlowCapacity { .. } => return REFUSED,
                AttachError::NotAttached { .. } => return NOT_FOUND,
                _ => {}
            }
        }
        if c.downcast_ref::<StoreError>().is_some() {
            return COMMIT_FAILED;
        }
        if c.downcast_ref::<crate::daemon::config::ConfigError>()
            .is_some()
        {
            return USAGE;
        }
    }
    FAILURE
}

/// Permission problems are privilege problems (3), whatever layer saw them:
/// a non-root user with the right capabilities on pins someone else owns.
fn io_code(e: &std::io::Error) -> u8 {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => PRIVILEGE,
        std::io::ErrorKind::NotFound => NOT_FOUND,
        _ => FAILURE,
    }
}

fn unsafe_path_code(e: &UnsafePath) -> u8 {
    match e {
        UnsafePath::NotOwned { .. } => PRIVILEGE,
        UnsafePath::Writable { .. } | UnsafePath::NotDir { .. } => REFUSED,
        UnsafePath::Io { source, .. } => io_code(source),
    }
}

fn layout_code(e: &LayoutError) -> u8 {
    match e {
        LayoutError::NotAttached(_) => NOT_FOUND,
        LayoutError::Unsafe(u) => unsafe_path_code(u),
        LayoutError::Open { source, .. } if map_error_denied(source) => PRIVILEGE,
        _ => REFUSED,
    }
}

/// EACCES/EPERM opening a pin is a privilege problem, not a foreign layout.
fn map_error_denied(e: &aya::maps::MapError) -> bool {
    let mut s: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = s {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EACCES | libc::EPERM))
        {
            return true;
        }
        s = c.source();
    }
    false
}
