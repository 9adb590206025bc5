//! The mmapped control word (`CTRL`): the committed generation the datapath
//! reads on every packet, and the bookkeeping beside it.

use std::{
    os::fd::BorrowedFd,
    path::Path,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use firewall_common::{
    Control,
    flow::{
        DEFAULT_EVENT_RATE, DEFAULT_ICMP_TIMEOUT_S, DEFAULT_TCP_TIMEOUT_S, DEFAULT_UDP_TIMEOUT_S,
        POLICY_ENFORCE, POLICY_OBSERVE,
    },
};

use super::layout::LayoutError;

/// What the datapath does with a packet it would drop.
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// drop it (the default)
    Enforce,
    /// pass it, and count it (and report it to `monitor`) as would-drop
    Observe,
}

impl Policy {
    pub fn word(self) -> u32 {
        match self {
            Policy::Enforce => POLICY_ENFORCE,
            Policy::Observe => POLICY_OBSERVE,
        }
    }
    /// Any word but observe's enforces: an unknown value fails closed.
    pub fn of_word(w: u32) -> Policy {
        if w == POLICY_OBSERVE {
            Policy::Observe
        } else {
            Policy::Enforce
        }
    }
}

/// The datapath settings of one pin directory, kept in `CTRL` beside the
/// generation so every interface of the directory shares them and they
/// survive re-attach and restarts.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    pub policy: Policy,
    pub replies: bool,
    /// Drop events per second per CPU; 0 is off.
    pub event_rate: u32,
    /// Idle timeouts of a flow: TCP, UDP, ICMP echo.
    pub flow_timeout_s: [u32; 3],
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            policy: Policy::Enforce,
            replies: true,
            event_rate: DEFAULT_EVENT_RATE,
            flow_timeout_s: [
                DEFAULT_TCP_TIMEOUT_S,
                DEFAULT_UDP_TIMEOUT_S,
                DEFAULT_ICMP_TIMEOUT_S,
            ],
        }
    }
}

/// The most events per second per CPU `--event-rate` accepts: keeps the
/// datapath's token arithmetic far from overflow.
pub const MAX_EVENT_RATE: u32 = 1_000_000;

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

    /// The settings words. Each is stored alone, with one aligned atomic
    /// store: the datapath never sees half a change, and `update` (which
    /// rewrites the commit bookkeeping) never writes them.
    pub(crate) fn settings(&self) -> Settings {
        let c = self.read();
        Settings {
            policy: Policy::of_word(c.policy),
            replies: c.replies != 0,
            event_rate: c.event_rate,
            flow_timeout_s: c.flow_timeout_ns.map(|ns| (ns / 1_000_000_000) as u32),
        }
    }

    pub(crate) fn set_settings(&self, s: &Settings) {
        let p = self.map.ptr::<Control>().as_ptr();
        // SAFETY: each field is an aligned word of the live Control mapping,
        // and the datapath only reads them.
        unsafe {
            let u32_at = |f: *mut u32| AtomicU32::from_ptr(f);
            u32_at(std::ptr::addr_of_mut!((*p).replies))
                .store(u32::from(s.replies), Ordering::Release);
            u32_at(std::ptr::addr_of_mut!((*p).event_rate))
                .store(s.event_rate.min(MAX_EVENT_RATE), Ordering::Release);
            for (i, t) in s.flow_timeout_s.iter().enumerate() {
                AtomicU64::from_ptr(std::ptr::addr_of_mut!((*p).flow_timeout_ns[i]))
                    .store(u64::from(*t) * 1_000_000_000, Ordering::Release);
            }
            // The policy last: switching to observe with the other settings
            // already in place.
            u32_at(std::ptr::addr_of_mut!((*p).policy)).store(s.policy.word(), Ordering::Release);
        }
    }

    /// Put filter half `half` in force: one aligned store, after the
    /// caller's writes to that half (Release).
    pub(crate) fn set_filter_half(&self, half: u32) {
        let p = self.map.ptr::<Control>().as_ptr();
        // SAFETY: an aligned word of the live Control mapping; the datapath
        // only reads it, and only the daemon's rebuild writes it.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*p).flow_filter_half)) }
            .store(half & 1, Ordering::Release);
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
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*p).flow_filter_lines),
                c.flow_filter_lines,
            );
        }
    }
}
