//! Loading, pinning, attaching, replacing and detaching the XDP program.
//!
//! Pin directory layout (default /sys/fs/bpf/firewall, every directory 0700):
//!
//! ```text
//! PEERS_V4 PEERS_V6 CIDR4_0 CIDR4_1 CIDR6_0 CIDR6_1 CTRL   shared by all interfaces
//! ifaces/<IF>/{link,prog,COUNTERS}                         one per attached interface
//! controller/                                              locked by a running controller
//! ```
//!
//! The link pin keeps the program attached after firewall-ctl exits.

use std::path::{Path, PathBuf};

use aya::{
    EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use firewall_common::names;

use crate::{
    datapath::layout::{LayoutError, check_pin},
    ebpf_obj,
    sys::{self, SysError},
};

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mode {
    /// native if the driver supports XDP, else generic (the kernel decides)
    Auto,
    /// driver (native) mode only
    Native,
    /// generic (skb) mode: works on every interface, slower
    Skb,
}

impl Mode {
    fn flags(self) -> XdpMode {
        match self {
            Mode::Auto => XdpMode::Default,
            Mode::Native => XdpMode::Driver,
            Mode::Skb => XdpMode::Skb,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    NoEbpf(#[from] crate::NoEbpf),
    #[error(
        "interface `{iface}` already runs another XDP program (id {prog_id}, mode {mode}): remove it with its own tool, or pass --force to replace it"
    )]
    Foreign {
        iface: String,
        prog_id: u32,
        mode: String,
    },
    #[error(
        "the pinned peer maps in {dir} hold up to {existing} entries per family; --max-peers {requested} needs new maps: detach every interface with --purge first, or drop --max-peers"
    )]
    Capacity {
        dir: PathBuf,
        existing: u32,
        requested: u32,
    },
    #[error("no firewall is attached to `{iface}` through {dir}: see `firewall-ctl status`")]
    NotAttached { iface: String, dir: PathBuf },
    #[error(
        "loading the XDP program failed (the kernel verifier's log follows); this is a bug, please report it\n{0}"
    )]
    Verifier(String),
    #[error("{what}")]
    Kernel {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn kernel<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> AttachError {
    let what = what.into();
    move |e| AttachError::Kernel {
        what,
        source: Box::new(e),
    }
}

pub fn iface_dir(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join("ifaces").join(iface)
}

#[derive(Debug, serde::Serialize)]
pub struct AttachReport {
    pub iface: String,
    pub replaced: bool,
    pub prog_id: u32,
    pub link_id: u32,
}

/// Load, pin and attach; or, if our program is already attached to `iface`
/// through this pin directory, atomically replace it keeping every map.
pub fn attach(
    iface: &str,
    mode: Mode,
    pin_dir: &Path,
    force: bool,
    max_peers: Option<u32>,
) -> Result<AttachReport, AttachError> {
    sys::check_privileges()?;
    let ifindex = sys::ifindex(iface)?;
    sys::check_bpffs(pin_dir)?;
    sys::bump_memlock();
    let obj = ebpf_obj()?;
    if iface == "lo" {
        tracing::warn!(
            "attaching to `lo`: local traffic between this host's own addresses will be filtered too; the firewall is meant for the interfaces peers reach you on"
        );
    }
    let dir = iface_dir(pin_dir, iface);
    // 0700 and ours, every level: bpffs is 1777, and a directory another
    // user made first would let them unlink our link (fail open).
    for d in [pin_dir.to_path_buf(), pin_dir.join("ifaces"), dir.clone()] {
        crate::sys::fsafe::ensure_private_dir(&d).map_err(LayoutError::from)?;
    }

    // Check every existing pin before aya reuses it: aya does not compare a
    // pinned map's definition with the object's.
    let mut loader = EbpfLoader::new();
    for name in names::SHARED {
        let p = pin_dir.join(name);
        if let Some(m) = check_pin(pin_dir, &p, name)?
            && let (Some(req), true) = (
                max_peers,
                name == names::PEERS_V4 || name == names::PEERS_V6,
            )
        {
            let existing = m.info().map(|i| i.max_entries()).unwrap_or(0);
            if existing != crate::datapath::table::buckets_for(req) {
                return Err(AttachError::Capacity {
                    dir: pin_dir.into(),
                    existing: existing.saturating_mul(firewall_common::PEERS_PER_BUCKET),
                    requested: req,
                });
            }
        }
        loader.map_pin_path(name, p);
    }
    let counters = dir.join(names::COUNTERS);
    check_pin(pin_dir, &counters, names::COUNTERS)?;
    loader.map_pin_path(names::COUNTERS, &counters);
    if let Some(n) = max_peers {
        let buckets = crate::datapath::table::buckets_for(n);
        loader
            .map_max_entries(names::PEERS_V4, buckets)
            .map_max_entries(names::PEERS_V6, buckets);
    }
    let mut ebpf = loader
        .load(obj)
        .map_err(kernel("loading the firewall object failed"))?;
    // Initialise the control word of a fresh pin directory (and re-check it).
    crate::datapath::store::KernelStore::open(pin_dir)?;

    let prog: &mut Xdp = ebpf
        .program_mut(names::PROGRAM)
        .expect("object has the firewall program")
        .try_into()
        .expect("firewall is an XDP program");
    match prog.load() {
        Ok(()) => {}
        Err(aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            return Err(AttachError::Verifier(format!("{io_error}\n{verifier_log}")));
        }
        Err(e) => return Err(kernel("loading the XDP program failed")(e)),
    }
    let prog_id = prog.info().map_err(kernel("reading program info"))?.id();
    let link_pin = dir.join("link");
    let prog_pin = dir.join("prog");

    // Our own link on this interface: swap the program under it atomically
    // (BPF_LINK_UPDATE); packets see the old program or the new one.
    if link_pin.exists() {
        let pinned = PinnedLink::from_pin(&link_pin)
            .map_err(kernel(format!("cannot open {}", link_pin.display())))?;
        let fd_link: FdLink = pinned.into();
        let id = fd_link
            .info()
            .map_err(kernel("reading the pinned link's info"))?
            .id();
        let (kind, link_id, _, link_if) =
            sys::link_info_by_id(id).map_err(kernel(format!("reading info of link {id}")))?;
        if kind == sys::BPF_LINK_TYPE_XDP && link_if == ifindex {
            let xdp_link =
                XdpLink::try_from(fd_link).map_err(kernel("pinned link is not an XDP link"))?;
            prog.attach_to_link(xdp_link)
                .map_err(kernel("atomic replace (BPF_LINK_UPDATE) failed"))?;
            let _ = std::fs::remove_file(&prog_pin);
            prog.pin(&prog_pin).map_err(kernel("pinning the program"))?;
            return Ok(AttachReport {
                iface: iface.into(),
                replaced: true,
                prog_id,
                link_id,
            });
        }
        // A stale pin (interface deleted and re-created, link defunct): drop it.
        let _ = std::fs::remove_file(&link_pin);
    }

    if let Some((mode_now, other)) = sys::xdp_state(iface) {
        if !force {
            return Err(AttachError::Foreign {
                iface: iface.into(),
                prog_id: other,
                mode: mode_now,
            });
        }
        remove_foreign(iface, other)?;
    }
    let id = prog.attach(iface, mode.flags()).map_err(kernel(format!("attaching to `{iface}` in {mode:?} mode failed (for a NIC without native XDP support use --mode skb)")))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(kernel("taking the link"))?
        .try_into()
        .map_err(kernel(
            "the kernel attached through netlink, not a bpf_link; firewall-ctl needs Linux >= 5.9",
        ))?;
    let link_id = link.info().map_err(kernel("reading link info"))?.id();
    let _ = std::fs::remove_file(&prog_pin);
    prog.pin(&prog_pin).map_err(kernel("pinning the program"))?;
    link.pin(&link_pin).map_err(kernel("pinning the link"))?;
    Ok(AttachReport {
        iface: iface.into(),
        replaced: false,
        prog_id,
        link_id,
    })
}

/// The `--force` path: detach another tool's program, whether it is attached
/// through a bpf_link or through netlink.
fn remove_foreign(iface: &str, prog_id: u32) -> Result<(), AttachError> {
    for l in aya::programs::loaded_links().flatten() {
        if l.program_id() == prog_id {
            return sys::detach_link_id(l.id())
                .map_err(kernel(format!("detaching link {} from `{iface}`", l.id())));
        }
    }
    for mode in ["xdp", "xdpgeneric", "xdpdrv"] {
        let _ = std::process::Command::new("ip")
            .args(["link", "set", "dev", iface, mode, "off"])
            .status();
    }
    match sys::xdp_state(iface) {
        None => Ok(()),
        Some((_, id)) => Err(AttachError::Foreign {
            iface: iface.into(),
            prog_id: id,
            mode: "still attached after --force".into(),
        }),
    }
}

/// Detach from `iface`: the only way the compiled-in overlay allowlist stops
/// applying. The shared peer maps stay pinned unless `purge` is set and no
/// interface is left.
pub fn detach(iface: &str, pin_dir: &Path, purge: bool) -> Result<bool, AttachError> {
    sys::check_privileges()?;
    let dir = iface_dir(pin_dir, iface);
    let link_pin = dir.join("link");
    if !link_pin.exists() {
        return Err(AttachError::NotAttached {
            iface: iface.into(),
            dir: pin_dir.into(),
        });
    }
    let link = PinnedLink::from_pin(&link_pin)
        .map_err(kernel(format!("cannot open {}", link_pin.display())))?;
    let fd = link.unpin().map_err(kernel("unpinning the link"))?;
    drop(fd); // the last reference: the kernel detaches the program now
    for f in ["prog", names::COUNTERS] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir(&dir);
    let others = std::fs::read_dir(pin_dir.join("ifaces"))
        .map(|d| d.count())
        .unwrap_or(0);
    let mut purged = false;
    if purge && others == 0 {
        for name in names::SHARED {
            let _ = std::fs::remove_file(pin_dir.join(name));
        }
        let _ = std::fs::remove_dir(pin_dir.join("ifaces"));
        // A running controller holds a lock on this directory; removing the
        // empty directory does not unlock it, and it is made again on start.
        let _ = std::fs::remove_dir(pin_dir.join(crate::sys::lock::CONTROLLER_DIR));
        let _ = std::fs::remove_dir(pin_dir);
        purged = true;
    }
    Ok(purged)
}
