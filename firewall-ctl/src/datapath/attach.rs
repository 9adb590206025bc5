//! Loading, pinning, attaching, replacing and detaching the XDP program and
//! its TC egress companion.
//!
//! Pin directory layout (default /sys/fs/bpf/firewall, every directory 0700):
//!
//! ```text
//! PEERS_V4 PEERS_V6 CIDR4_0 CIDR4_1 CIDR6_0 CIDR6_1 CTRL     shared by all interfaces
//! FLOWS EVENTS EVENT_BUCKET                                  shared by all interfaces
//! ifaces/<IF>/{link,prog,COUNTERS}                           XDP, one per attached interface
//! ifaces/<IF>/{egress_link,egress_prog}                      TC egress (tcx), beside it
//! controller/                                                locked by a running controller
//! monitor/                                                   locked by a running monitor
//! ```
//!
//! The link pins keep both programs attached after firewall-ctl exits.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use firewall_common::names;

use super::ctrl::Policy;

use crate::{
    datapath::layout::{LayoutError, check_pin},
    ebpf_obj,
    sys::{self, SysError},
};

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mode {
    /// native if the driver supports XDP, else generic (the kernel decides)
    #[default]
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
    #[error(
        "the pinned flow table in {dir} holds {existing} flows; --max-flows {requested} needs a new one: detach every interface with --purge first, or drop --max-flows"
    )]
    FlowCapacity {
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

/// How to attach. Everything but `mode` and `force` is a setting of the pin
/// directory: `None` keeps what the directory has (its defaults when new).
#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    pub mode: Mode,
    pub force: bool,
    pub max_peers: Option<u32>,
    pub max_flows: Option<u32>,
    pub policy: Option<Policy>,
    pub replies: Option<bool>,
    /// Idle timeouts in seconds: TCP, UDP, ICMP echo.
    pub flow_timeout_s: [Option<u32>; 3],
    pub event_rate: Option<u32>,
}

/// Load, pin and attach; or, if our program is already attached to `iface`
/// through this pin directory, atomically replace it keeping every map. The
/// TC egress program that records the node's flows is attached (or replaced)
/// first, so the XDP program never runs without it.
pub fn attach(
    iface: &str,
    pin_dir: &Path,
    opts: &AttachOptions,
) -> Result<AttachReport, AttachError> {
    let (mode, force, max_peers) = (opts.mode, opts.force, opts.max_peers);
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
    if let (Some(req), Some(m)) = (
        opts.max_flows,
        check_pin(pin_dir, &pin_dir.join(names::FLOWS), names::FLOWS)?,
    ) {
        let existing = m.info().map(|i| i.max_entries()).unwrap_or(0);
        if existing != req {
            return Err(AttachError::FlowCapacity {
                dir: pin_dir.into(),
                existing,
                requested: req,
            });
        }
    }
    if let Some(n) = opts.max_flows {
        // A new directory's filter is sized with its table (an existing one
        // keeps its pinned maps, whose capacity was checked above).
        loader.map_max_entries(names::FLOWS, n).map_max_entries(
            names::FLOW_FILTER,
            2 * firewall_common::flow::filter_lines_for(n),
        );
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
    // Initialise the control word of a fresh pin directory (and re-check it),
    // then apply the settings given. Each is one atomic store, so a running
    // datapath on another interface of the directory switches cleanly.
    let store = crate::datapath::store::KernelStore::open(pin_dir)?;
    let mut settings = store.settings();
    if let Some(p) = opts.policy {
        settings.policy = p;
    }
    if let Some(r) = opts.replies {
        settings.replies = r;
    }
    if let Some(r) = opts.event_rate {
        settings.event_rate = r;
    }
    for (i, t) in opts.flow_timeout_s.iter().enumerate() {
        if let Some(t) = t {
            settings.flow_timeout_s[i] = *t;
        }
    }
    store.set_settings(&settings);
    drop(store);
    attach_egress(&mut ebpf, iface, ifindex, &dir)?;

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

/// Attach the TC egress program to `iface` through tcx, pinned in `dir`; or
/// swap it atomically under our existing link (BPF_LINK_UPDATE).
fn attach_egress(
    ebpf: &mut Ebpf,
    iface: &str,
    ifindex: u32,
    dir: &Path,
) -> Result<(), AttachError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(names::EGRESS_PROGRAM)
        .expect("object has the egress program")
        .try_into()
        .expect("egress is a TC program");
    match prog.load() {
        Ok(()) => {}
        Err(aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            return Err(AttachError::Verifier(format!("{io_error}\n{verifier_log}")));
        }
        Err(e) => return Err(kernel("loading the TC egress program failed")(e)),
    }
    let link_pin = dir.join("egress_link");
    let prog_pin = dir.join("egress_prog");
    if link_pin.exists() {
        let pinned = PinnedLink::from_pin(&link_pin)
            .map_err(kernel(format!("cannot open {}", link_pin.display())))?;
        let fd_link: FdLink = pinned.into();
        let id = fd_link
            .info()
            .map_err(kernel("reading the pinned egress link's info"))?
            .id();
        let (kind, _, _, link_if) =
            sys::link_info_by_id(id).map_err(kernel(format!("reading info of link {id}")))?;
        if kind == sys::BPF_LINK_TYPE_TCX && link_if == ifindex {
            let link = SchedClassifierLink::try_from(fd_link)
                .map_err(kernel("pinned egress link is not a tcx link"))?;
            prog.attach_to_link(link)
                .map_err(kernel("atomic replace of the egress program failed"))?;
            let _ = std::fs::remove_file(&prog_pin);
            prog.pin(&prog_pin)
                .map_err(kernel("pinning the egress program"))?;
            return Ok(());
        }
        let _ = std::fs::remove_file(&link_pin);
    }
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(kernel(format!(
            "attaching the TC egress program to `{iface}` through tcx failed (needs Linux >= 6.6)"
        )))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(kernel("taking the egress link"))?
        .try_into()
        .map_err(kernel("the egress program was attached without a tcx link"))?;
    let _ = std::fs::remove_file(&prog_pin);
    prog.pin(&prog_pin)
        .map_err(kernel("pinning the egress program"))?;
    link.pin(&link_pin)
        .map_err(kernel("pinning the egress link"))?;
    Ok(())
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
    // Then the egress program, which only feeds the XDP program's reply rule.
    let egress = dir.join("egress_link");
    if egress.exists() {
        let link = PinnedLink::from_pin(&egress)
            .map_err(kernel(format!("cannot open {}", egress.display())))?;
        drop(link.unpin().map_err(kernel("unpinning the egress link"))?);
    }
    for f in ["prog", "egress_prog", names::COUNTERS] {
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
        let _ = std::fs::remove_dir(pin_dir.join(crate::sys::lock::MONITOR_DIR));
        // A running controller holds a lock on this directory; removing the
        // empty directory does not unlock it, and it is made again on start.
        let _ = std::fs::remove_dir(pin_dir.join(crate::sys::lock::CONTROLLER_DIR));
        let _ = std::fs::remove_dir(pin_dir);
        purged = true;
    }
    Ok(purged)
}
