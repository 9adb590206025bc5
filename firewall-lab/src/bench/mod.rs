//! The benchmarks. Each prints ratios against baselines measured in the same
//! run, never absolute times alone.

pub mod allow;
pub mod controller;
pub mod datapath;
