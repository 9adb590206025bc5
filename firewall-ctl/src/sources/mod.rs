//! Discovery sources: each turns what it reads into a
//! [`crate::discovery::Discovery`] (complete, partial, failed or too large)
//! for the core to judge. None of them decides anything.
//!
//! - [`file`]: a watched file (our TOML/JSON list, or `serf members -format=json`).
//! - [`serf`]: the Serf agent's RPC (msgpack over TCP), with a bounded reader.
//! - [`etcd`]: a key prefix in etcd, watched, over TLS when configured.

pub mod etcd;
pub mod file;
pub mod serf;
