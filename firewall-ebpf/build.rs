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
        panic!(
            "cannot read the overlay allowlist {}: {e}; create it or point FIREWALL_OVERLAY at one",
            path.display()
        )
    });
    let rules = overlay_toml::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    let mut src = String::new();
    writeln!(
        src,
        "// Generated from {} by firewall-ebpf/build.rs. Do not edit.",
        path.display()
    )
    .unwrap();
    src.push_str(&matcher(4, &rules));
    src.push_str(&matcher(6, &rules));
    let mut table = String::new();
    for nr in &rules {
        let r = &nr.rule;
        writeln!(table, "        OverlayRule {{ family: {}, prefix_len: {}, proto: {}, _pad: 0, dport: {}, sport: {}, addr: {:?} }},",
            r.family, r.prefix_len, r.proto, r.dport, r.sport, r.addr).unwrap();
    }
    for _ in rules.len()..firewall_common::OVERLAY_MAX {
        table.push_str("        OverlayRule { family: 0, prefix_len: 0, proto: 0, _pad: 0, dport: 0, sport: 0, addr: [0; 16] },\n");
    }
    writeln!(src, "#[unsafe(no_mangle)]\nstatic OVERLAY_TABLE: OverlayTable = OverlayTable {{\n    magic: OVERLAY_MAGIC,\n    count: {},\n    _pad: 0,\n    rules: [\n{table}    ],\n}};", rules.len()).unwrap();
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("overlay.rs");
    fs::write(out, src).unwrap();
}

/// Emits `overlay_v4(src, proto, l4)` / `overlay_v6(hi, lo, proto, l4)`: rules
/// grouped by prefix, then port-less rules, then port rules behind one lazy read
/// of the ports. Grouping lets LLVM turn the list into a short compare chain; a
/// packet outside every overlay prefix costs one mask-and-compare per prefix.
fn matcher(family: u8, rules: &[overlay_toml::NamedRule]) -> String {
    let mut groups: Vec<(u8, [u8; 16], Vec<&overlay_toml::NamedRule>)> = Vec::new();
    for nr in rules.iter().filter(|r| r.rule.family == family) {
        match groups
            .iter_mut()
            .find(|g| g.0 == nr.rule.prefix_len && g.1 == nr.rule.addr)
        {
            Some(g) => g.2.push(nr),
            None => groups.push((nr.rule.prefix_len, nr.rule.addr, vec![nr])),
        }
    }
    let mut f = String::new();
    if family == 4 {
        f.push_str("#[inline(always)]\n#[allow(unused_variables, clippy::all, reason = \"generated per overlay: a rule set may use no ports, and clippy has no say in generated code\")]\nfn overlay_v4(src: u32, proto: u8, l4: Option<*const [u8; 4]>) -> bool {\n");
    } else {
        f.push_str("#[inline(always)]\n#[allow(unused_variables, clippy::all, reason = \"generated per overlay: a rule set may use no ports, and clippy has no say in generated code\")]\nfn overlay_v6(hi: u64, lo: u64, proto: u8, l4: Option<*const [u8; 4]>) -> bool {\n");
    }
    for (len, addr, members) in &groups {
        let cond = if family == 4 {
            let net = u32::from_be_bytes(addr[..4].try_into().unwrap());
            let mask = if *len == 0 {
                0
            } else {
                u32::MAX << (32 - *len as u32)
            };
            format!("src & {mask:#010x} == {net:#010x}")
        } else {
            let net = u128::from_be_bytes(*addr);
            let mask = if *len == 0 {
                0
            } else {
                u128::MAX << (128 - *len as u32)
            };
            let (mh, ml) = ((mask >> 64) as u64, mask as u64);
            let mut c = format!("hi & {mh:#018x} == {:#018x}", (net >> 64) as u64);
            if ml != 0 {
                write!(c, " && lo & {ml:#018x} == {:#018x}", net as u64).unwrap();
            }
            c
        };
        writeln!(f, "    if {cond} {{").unwrap();
        for nr in members
            .iter()
            .filter(|r| r.rule.dport == 0 && r.rule.sport == 0)
        {
            let p = if nr.rule.proto == 0 {
                "true".to_string()
            } else {
                format!("proto == {}", nr.rule.proto)
            };
            writeln!(
                f,
                "        if {p} {{ return true; }} // {}",
                nr.comment.replace(['\n', '\r'], " ")
            )
            .unwrap();
        }
        let ported: Vec<_> = members
            .iter()
            .filter(|r| r.rule.dport != 0 || r.rule.sport != 0)
            .collect();
        if !ported.is_empty() {
            f.push_str("        if let Some(p) = l4 {\n            // SAFETY: `l4` came from ptr_at: 4 bytes of L4 header within the packet.\n            let p = unsafe { *p };\n            let sport = u16::from_be_bytes([p[0], p[1]]);\n            let dport = u16::from_be_bytes([p[2], p[3]]);\n");
            for nr in ported {
                let r = &nr.rule;
                let mut c = format!("proto == {}", r.proto);
                if r.dport != 0 {
                    write!(c, " && dport == {}", r.dport).unwrap();
                }
                if r.sport != 0 {
                    write!(c, " && sport == {}", r.sport).unwrap();
                }
                writeln!(
                    f,
                    "            if {c} {{ return true; }} // {}",
                    nr.comment.replace(['\n', '\r'], " ")
                )
                .unwrap();
            }
            f.push_str("        }\n");
        }
        f.push_str("    }\n");
    }
    f.push_str("    false\n}\n");
    f
}
