//! The controller's adapters around the pure core (`firewall-controller`,
//! re-exported here as `core` and `discovery`): the config file, persisted
//! state, the discovery sources and the daemon loop.

pub use firewall_controller::{core, discovery};

pub mod config;
pub mod contract;
pub mod daemon;
pub mod etcd;
pub mod file_source;
pub mod serf;
pub mod state;
