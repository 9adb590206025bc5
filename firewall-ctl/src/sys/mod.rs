//! Preflight checks that turn kernel errnos into instructions, and the few raw
//! bpf(2) calls aya 0.14 does not wrap (link info, link detach, raw lookup).
//!
//! Beside it: [`batch`] (batch map writes), [`fsafe`] (directories and files
//! another user could squat), [`lock`] (the commit lock and the
//! one-controller locks).

pub mod batch;
pub mod fsafe;
pub mod lock;
pub mod owner;

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error(
        "firewall-ctl needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (missing: {0}): run it with sudo, or as the service's user with those capabilities (see the README's \"Least privilege\")"
    )]
    NotPrivileged(String),
    #[error("interface `{0}` not found in this network namespace: list interfaces with `ip link`")]
    NoInterface(String),
    #[error(
        "{0} is not on a bpffs mount: mount it with `mount -t bpf bpf /sys/fs/bpf`, or pass a --pin-dir under a bpffs mount"
    )]
    NoBpffs(PathBuf),
}

/// Effective capabilities from /proc/self/status.
fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("CapEff:"))
                .map(|l| l[7..].trim().to_string())
        })
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or(0)
}

/// The capabilities firewall-ctl needs, and why (the README lists them too):
/// CAP_BPF to create maps and load programs; CAP_PERFMON because the verifier
/// refuses packet-pointer arithmetic without it ("pointer arithmetic with it
/// prohibited for !root"); CAP_NET_ADMIN to attach XDP and tcx to an
/// interface. CAP_SYS_ADMIN stands in for the first two, as the kernel has it.
pub fn check_privileges() -> Result<(), SysError> {
    const CAP_NET_ADMIN: u64 = 12;
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    let c = cap_eff();
    let has = |b: u64| c & (1 << b) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SysError::NotPrivileged(missing.join(", ")))
    }
}

pub fn ifindex(name: &str) -> Result<u32, SysError> {
    let c = CString::new(name).map_err(|_| SysError::NoInterface(name.into()))?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(SysError::NoInterface(name.into()))
    } else {
        Ok(i)
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The pin directory (or its nearest existing ancestor) must be on bpffs.
pub fn check_bpffs(dir: &Path) -> Result<(), SysError> {
    let mut p = dir.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return Err(SysError::NoBpffs(dir.into()));
        }
    }
    let c = CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| SysError::NoBpffs(dir.into()))?;
    // SAFETY: statfs is plain integers, for which all-zero is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct we own for the kernel to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(SysError::NoBpffs(dir.into()));
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless after.
pub fn bump_memlock() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
}

/// The one bpf(2) entry point for the calls aya 0.14 does not wrap (link
/// info and detach here, batch updates in `batch`). `attr` must be a
/// correctly shaped prefix of `union bpf_attr` for `cmd`, with any pointers
/// it carries valid for the call.
pub(crate) fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: callers pass a correctly shaped prefix of union bpf_attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `struct bpf_link_info` up to the XDP member of its union.
#[repr(C, align(8))]
struct LinkInfoRaw {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    xdp_ifindex: u32,
    _rest: [u8; 60],
}

/// (link type, link id, program id, ifindex for XDP links) of a link fd.
/// aya's `LinkInfo` does not expose the XDP ifindex, which we need to tell
/// our own link on this interface from a stale one.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<(u32, u32, u32, u32)> {
    let mut info = LinkInfoRaw {
        kind: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        xdp_ifindex: 0,
        _rest: [0; 60],
    };
    #[repr(C, align(8))]
    struct Attr {
        fd: u32,
        len: u32,
        info: u64,
    }
    let mut a = Attr {
        fd: fd.as_raw_fd() as u32,
        len: size_of::<LinkInfoRaw>() as u32,
        info: &mut info as *mut _ as u64,
    };
    sys_bpf(15 /* BPF_OBJ_GET_INFO_BY_FD */, &mut a)?;
    Ok((info.kind, info.id, info.prog_id, info.xdp_ifindex))
}

pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

fn link_fd_by_id(id: u32) -> io::Result<std::os::fd::OwnedFd> {
    #[repr(C, align(8))]
    // Explicit padding: the kernel rejects an attr with non-zero bytes past the
    // fields it knows (CHECK_ATTR), and implicit padding is uninitialised.
    struct GetFd {
        id: u32,
        next_id: u32,
        open_flags: u32,
        _pad: u32,
    }
    let mut g = GetFd {
        id,
        next_id: 0,
        open_flags: 0,
        _pad: 0,
    };
    let fd = sys_bpf(30 /* BPF_LINK_GET_FD_BY_ID */, &mut g)? as i32;
    // SAFETY: the kernel just handed us this fd.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `link_info` of the link with this id.
pub fn link_info_by_id(id: u32) -> io::Result<(u32, u32, u32, u32)> {
    use std::os::fd::AsFd;
    let fd = link_fd_by_id(id)?;
    link_info(fd.as_fd())
}

/// Detach a bpf_link by id (BPF_LINK_GET_FD_BY_ID + BPF_LINK_DETACH): the
/// `--force` path for another tool's link-attached XDP program.
pub fn detach_link_id(id: u32) -> io::Result<()> {
    let fd = link_fd_by_id(id)?;
    #[repr(C, align(8))]
    struct Detach {
        link_fd: u32,
        _pad: u32,
    }
    let mut d = Detach {
        link_fd: fd.as_raw_fd() as u32,
        _pad: 0,
    };
    sys_bpf(34 /* BPF_LINK_DETACH */, &mut d).map(|_| ())
}

/// Raw single-element lookup: `key` as bytes, the value into a buffer of
/// `value_size`; `None` if the key is absent. Used where aya's typed maps do
/// not fit: `.rodata`, whose size is only known at run time, and single keys
/// of the peer maps, whose fds the kernel store already holds.
pub fn lookup_raw(
    fd: BorrowedFd<'_>,
    key: &[u8],
    value_size: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut value = vec![0u8; value_size];
    #[repr(C, align(8))]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut a = Attr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match sys_bpf(1 /* BPF_MAP_LOOKUP_ELEM */, &mut a) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What `ip -j link show dev IF` says about XDP on it: (mode, program id).
/// Read through iproute2 because no crate on the design card speaks the
/// netlink XDP attributes and iproute2 is part of the set-up anyway.
pub fn xdp_state(iface: &str) -> Option<(String, u32)> {
    xdp_state_of(std::process::Command::new("ip").args(["-j", "-d", "link", "show", "dev", iface]))
}

/// `xdp_state` of an interface inside the network namespace at `netns`.
pub fn xdp_state_in(netns: &Path, iface: &str) -> Option<(String, u32)> {
    xdp_state_of(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["ip", "-j", "-d", "link", "show", "dev", iface]),
    )
}

fn xdp_state_of(cmd: &mut std::process::Command) -> Option<(String, u32)> {
    let out = cmd.output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let xdp = v.get(0)?.get("xdp")?;
    let mode = match xdp.get("mode")?.as_u64()? {
        1 => "native",
        2 => "skb",
        3 => "offload",
        4 => "multi",
        _ => "unknown",
    };
    let id = xdp
        .get("prog")
        .and_then(|p| p.get("id"))
        .and_then(|i| i.as_u64())
        .or_else(|| {
            xdp.get("attached")
                .and_then(|a| a.get(0))
                .and_then(|p| p.get("prog"))
                .and_then(|p| p.get("id"))
                .and_then(|i| i.as_u64())
        })?;
    Some((mode.to_string(), id as u32))
}

/// An owned shared mapping: a `BPF_F_MMAPABLE` map's values, or anonymous
/// memory laid out the same way; unmapped on drop. The one mmap in the crate
/// (the control word and both peer tables use it).
pub struct Mmap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: plain shared memory; what is written through it is the owner's
// business (the tables write only with atomics).
unsafe impl Send for Mmap {}

impl Mmap {
    /// Map `bytes` (rounded up to whole pages) of the map behind `fd`, shared
    /// and writable (the kernel refuses a length beyond the map), or of
    /// anonymous memory without `fd` (zeroed, like a new BPF array).
    pub fn shared(fd: Option<BorrowedFd<'_>>, bytes: usize) -> io::Result<Mmap> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = bytes.max(1).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of an fd we hold; nothing aliases it yet.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                if fd.is_some() {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS
                },
                fd.map_or(-1, |fd| fd.as_raw_fd()),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: std::ptr::NonNull::new(p.cast()).expect("mmap returned NULL"),
            len,
        })
    }

    /// The start of the mapping, as a `T` (page-aligned, so aligned for any T).
    pub fn ptr<T>(&self) -> std::ptr::NonNull<T> {
        self.ptr.cast()
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what shared() mapped, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
