//! The datapath as userspace sees it.
//!
//! - [`attach`]: load, pin, attach, replace and detach the XDP program.
//! - [`layout`]: what our pinned maps must look like, checked before use.
//! - [`ctrl`]: the mmapped control word and its generation flip.
//! - [`table`]: the slot protocol over the mmapped exact-peer bucket tables.
//! - [`cidr`]: the CIDR tries, one pair per generation parity.
//! - [`store`]: the kernel `PeerStore` that the commit protocol drives.
//! - [`status`]: what `status`, `stats` and `peers list` read.
//! - [`flows`]: the node's own flows, for `flows`.
//! - [`events`]: the drop events, decoded for `monitor`.

pub mod attach;
mod cidr;
pub mod ctrl;
pub mod events;
pub mod flows;
pub mod layout;
pub mod status;
pub mod store;
pub mod table;
