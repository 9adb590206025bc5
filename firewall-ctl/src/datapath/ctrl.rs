//! The mmapped control word (`CTRL`): the committed generation the datapath
//! reads on every packet, and the bookkeeping beside it.

use std::{os::fd::BorrowedFd, path::Path, sync::atomic::AtomicU64};

use firewall_common::Control;

use super::layout::LayoutError;

/// The mmapped `CTRL` value.
pub(crate) struct CtrlMap {
    map: crate::sys::Mmap,
}

impl CtrlMap {
    pub(crate) fn new(fd: BorrowedFd<'_>, path: &Path) -> Result<Self, LayoutError> {
        // One `Control` (layout checked by the caller).
        let map = crate::sys::Mmap::shared(Some(fd), size_of::<Control>()).map_err(|source| {
            LayoutError::Mmap {
                path: path.into(),
                source,
            }
        })?;
        Ok(CtrlMap { map })
    }

    pub(crate) fn read(&self) -> Control {
        // SAFETY: the mapping is live for self's lifetime and holds a Control.
        unsafe { std::ptr::read_volatile(self.map.ptr::<Control>().as_ptr()) }
    }
    pub(crate) fn gen_word(&self) -> &AtomicU64 {
        // SAFETY: committed_gen is the first, 8-byte aligned field of a page-aligned mapping.
        unsafe {
            AtomicU64::from_ptr(std::ptr::addr_of_mut!(
                (*self.map.ptr::<Control>().as_ptr()).committed_gen
            ))
        }
    }
    pub(crate) fn update(&self, f: impl FnOnce(&mut Control)) {
        // Only the fields other than committed_gen are written this way; the
        // datapath reads none of them except the CIDR counts of the live slot,
        // which are only ever written for the standby slot. The flip's Release
        // store of committed_gen comes after these volatile writes in program
        // order, so it publishes them (see the compile_error in lib.rs for the
        // datapath's side of that).
        let mut c = self.read();
        f(&mut c);
        // SAFETY: as in read(); a single writer holds the commit lock.
        unsafe {
            let p = self.map.ptr::<Control>().as_ptr();
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).staged_gen), c.staged_gen);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).magic), c.magic);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).abi_version), c.abi_version);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).cidr4_count), c.cidr4_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).cidr6_count), c.cidr6_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).peer_count), c.peer_count);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).checksum), c.checksum);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).hash_seed), c.hash_seed);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).bucket_mask), c.bucket_mask);
        }
    }
}
