//! firewall-controller: the controller's commit logic, as a pure and
//! deterministic state machine. Discovery results and time go in
//! ([`core::Core::handle_discovery`], [`core::Core::handle_tick`]); commit
//! plans come out ([`core::Core::poll_action`]). Nothing here reads a clock,
//! opens a file or socket, or touches the kernel: this crate does not depend
//! on tokio, aya or libc, so the compiler keeps it that way, and the daemon
//! (`firewall-ctl run`), the tests and the simulator (`firewall-sim`) all
//! drive the same code.
//!
//! Where things are decided:
//! - whether a peer is deleted, and when: [`core`] (guards, grace, budget);
//! - what a discovery result is: [`discovery`];
//! - the settings: [`guards`];
//! - the two-phase commit (stage, verify, flip, collect) over any datapath:
//!   [`commit`], against the [`store::PeerStore`] trait;
//! - peer sets, their digests and operator input: [`peers`].

pub mod commit;
pub mod core;
pub mod discovery;
pub mod guards;
pub mod peers;
pub mod store;
