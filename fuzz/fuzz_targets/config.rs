//! The controller's TOML config: parsed or refused with a message, and a
//! parsed one passes its own validation.
#![no_main]

use firewall_ctl::daemon::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::parse(std::path::Path::new("fuzz.toml"), text) {
        assert!(c.guards.validate().is_ok());
        assert!(c.tick_ms >= 1);
    }
});
