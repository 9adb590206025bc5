//! The discovery file, both formats: any bytes give a result (never a panic),
//! and the core takes that result without panicking either.
#![no_main]

use firewall_ctl::{core::Core, daemon::config::Guards, sources::file as file_source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let d = file_source::parse(data, std::path::Path::new("fuzz.json"));
    let mut core = Core::new(Guards::default(), Default::default(), 0, None, 0);
    core.handle_discovery(1, d);
    while core.poll_action().is_some() {}
});
