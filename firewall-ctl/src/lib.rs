//! firewall-ctl: loads the XDP firewall, inspects it, and runs the
//! controller. Everything here is an adapter around the pure core in
//! `firewall-controller` (where a deletion is decided: [`core`], re-exported
//! from `firewall_controller::core`).
//!
//! - [`datapath`]: the XDP program and its pinned maps as userspace sees them
//!   (attach, layout checks, the control word, the slot protocol, the CIDR
//!   tries, the kernel `PeerStore`, what `status` reads).
//! - [`sys`]: the system underneath: privileges, bpffs, the one bpf() wrapper,
//!   the owning `Mmap`, batch map writes, safe files and directories, locks.
//! - [`daemon`]: the controller's loop, its config, persisted state and
//!   audit log, and the typed contract (`Plan`, `ControllerStatus`,
//!   `AuditLine`) it shares with the CLI.
//! - [`sources`]: discovery (file, Serf, etcd), each a producer of typed
//!   `Discovery` results.
//! - [`cli`]: the command line (arguments, exit codes, rendering); `main.rs`
//!   only calls it.

// The slot protocol (table.rs) stores with Release and the XDP program reads
// the generation with a plain load, which is an acquire only where every load
// is: x86-64. On a weakly ordered CPU the datapath could see a bucket older
// than the generation it read, so refuse to build rather than run unsafely.
#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "firewall-ctl's slot protocol relies on x86-64 load ordering in the XDP program; other architectures need load-acquire in firewall-ebpf first"
);

pub mod cli;
pub mod daemon;
pub mod datapath;
pub mod sources;
pub mod sys;

// The pure core and its types, re-exported so the adapters name them in one place.
pub use firewall_controller::{commit, core, discovery, peers, store};

/// The XDP object built by build.rs. Empty when built with AYA_BUILD_SKIP=1 or
/// without the `ebpf` feature; [`ebpf_obj`] turns that into a clear error.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/firewall"));

#[derive(Debug, thiserror::Error)]
#[error(
    "this firewall-ctl was built without the XDP program (AYA_BUILD_SKIP=1 or --no-default-features): rebuild it normally after `cargo xtask setup`"
)]
pub struct NoEbpf;

pub fn ebpf_obj() -> Result<&'static [u8], NoEbpf> {
    if EBPF_OBJ.is_empty() {
        Err(NoEbpf)
    } else {
        Ok(EBPF_OBJ)
    }
}

/// Fault injection for the kill tests, read once from the environment:
/// `FIREWALL_CTL_FAILPOINTS="stage-to-flip-delay-ms=200"`. Two names exist:
/// `stage-to-flip-delay-ms` widens the window between stage and flip so a
/// SIGKILL can be made to land inside it; `file-source-hang-ms` makes every
/// read of the discovery file hang, as on a dead network filesystem. Unset
/// (production), it costs one `OnceLock` read.
pub fn failpoint(name: &str) -> Option<u64> {
    static POINTS: std::sync::OnceLock<Vec<(String, u64)>> = std::sync::OnceLock::new();
    POINTS
        .get_or_init(|| {
            std::env::var("FIREWALL_CTL_FAILPOINTS")
                .unwrap_or_default()
                .split(',')
                .filter_map(|kv| {
                    kv.split_once('=')
                        .and_then(|(k, v)| Some((k.trim().to_string(), v.trim().parse().ok()?)))
                })
                .collect()
        })
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
}
