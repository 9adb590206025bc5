//! The controller: a pure, deterministic state machine (`core`), and the thin
//! adapters around it (config, persisted state, discovery sources, daemon).

pub mod config;
pub mod core;
pub mod daemon;
pub mod discovery;
pub mod etcd;
pub mod file_source;
pub mod serf;
pub mod state;
