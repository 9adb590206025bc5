//! One etcd key's value: a peer document or nothing, never a panic, and never
//! a prefix broader than the documented minimum once the core has it.
#![no_main]

use firewall_ctl::sources::etcd;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(m) = etcd::parse(data) {
        // IPv4-mapped addresses never survive parsing as IPv6.
        if let ipnet::IpNet::V6(n) = m.net {
            assert!(n.addr().to_ipv4_mapped().is_none() || n.prefix_len() < 96);
        }
    }
});
