//! firewall-ctl: loads the XDP firewall, inspects it, and commits peer
//! generations to it through a guarded two-phase commit.

pub mod attach;
pub mod batch;
pub mod commit;
pub mod controller;
pub mod kernel;
pub mod lock;
pub mod packet;
pub mod peers;
pub mod sim;
pub mod status;
pub mod store;
pub mod sys;

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
