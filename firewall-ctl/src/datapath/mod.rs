//! The datapath as userspace sees it.
//!
//! - [`attach`]: load, pin, attach, replace and detach the XDP program.
//! - [`layout`]: what our pinned maps must look like, checked before use.
//! - [`ctrl`]: the mmapped control word and its generation flip.
//! - [`table`]: the slot protocol over the mmapped exact-peer bucket tables.
//! - [`cidr`]: the CIDR tries, one pair per generation parity.
//! - [`store`]: the kernel `PeerStore` that the commit protocol drives.
//! - [`status`]: what `status`, `stats` and `peers list` read.

pub mod attach;
mod cidr;
mod ctrl;
pub mod layout;
pub mod status;
pub mod store;
pub mod table;
