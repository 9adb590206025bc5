//! Compiles `overlay.toml` (or the file `FIREWALL_OVERLAY` names) into Rust
//! constants that the XDP program matches with immediate compares, plus a
//! magic-tagged copy in `.rodata` that `firewall-ctl status` reads back.

use std::{env, fmt::Write as _, fs, path::PathBuf};

use firewall_common::overlay_toml;

fn main() {
    // As a host build-dependency of firewall-ctl (for rebuild tracking) there is
    // nothing to generate: only the BPF build of the binary uses the overlay.
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    println!("cargo:rerun-if-env-changed=FIREWALL_OVERLAY");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let path = env::var_os("FIREWALL_OVERLAY")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../overlay.toml"));
    println!("cargo:rerun-if-changed={}", path.display());
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read the overlay allowlist {}: {e}; create it or point FIREWALL_OVERLAY at one", path.display())
    });
    let rules = overlay_toml::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    let mut src = String::new();
    let (mut v4, mut v6) = (String::new(), String::new());
    let (mut n4, mut n6) = (0, 0);
    let mut table = String::new();
    for nr in &rules {
        let r = &nr.rule;
        let comment = nr.comment.replace(['\n', '\r'], " ");
        if r.family == 4 {
            let net = u32::from_be_bytes(r.addr[..4].try_into().unwrap());
            let mask = if r.prefix_len == 0 { 0 } else { u32::MAX << (32 - r.prefix_len as u32) };
            writeln!(v4, "    // {comment}\n    V4Rule {{ net: {net:#010x}, mask: {mask:#010x}, proto: {}, dport: {}, sport: {} }},", r.proto, r.dport, r.sport).unwrap();
            n4 += 1;
        } else {
            let net = u128::from_be_bytes(r.addr);
            let mask = if r.prefix_len == 0 { 0 } else { u128::MAX << (128 - r.prefix_len as u32) };
            writeln!(v6, "    // {comment}\n    V6Rule {{ net_hi: {:#018x}, net_lo: {:#018x}, mask_hi: {:#018x}, mask_lo: {:#018x}, proto: {}, dport: {}, sport: {} }},",
                (net >> 64) as u64, net as u64, (mask >> 64) as u64, mask as u64, r.proto, r.dport, r.sport).unwrap();
            n6 += 1;
        }
        writeln!(table, "        OverlayRule {{ family: {}, prefix_len: {}, proto: {}, _pad: 0, dport: {}, sport: {}, addr: {:?} }},",
            r.family, r.prefix_len, r.proto, r.dport, r.sport, r.addr).unwrap();
    }
    for _ in rules.len()..firewall_common::OVERLAY_MAX {
        table.push_str("        OverlayRule { family: 0, prefix_len: 0, proto: 0, _pad: 0, dport: 0, sport: 0, addr: [0; 16] },\n");
    }
    writeln!(src, "// Generated from {} by firewall-ebpf/build.rs. Do not edit.", path.display()).unwrap();
    writeln!(src, "const OVERLAY_V4: [V4Rule; {n4}] = [\n{v4}];").unwrap();
    writeln!(src, "const OVERLAY_V6: [V6Rule; {n6}] = [\n{v6}];").unwrap();
    writeln!(src, "#[unsafe(no_mangle)]\nstatic OVERLAY_TABLE: OverlayTable = OverlayTable {{\n    magic: OVERLAY_MAGIC,\n    count: {},\n    _pad: 0,\n    rules: [\n{table}    ],\n}};", rules.len()).unwrap();
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("overlay.rs");
    fs::write(out, src).unwrap();
}
