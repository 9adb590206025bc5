//! The controller: a pure, deterministic state machine (`core`), and the thin
//! adapters around it (config, persisted state, discovery sources, daemon).

pub mod config;
pub mod core;
pub mod discovery;
pub mod state;
