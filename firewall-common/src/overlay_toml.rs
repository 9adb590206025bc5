//! `overlay.toml`: the allowlist compiled into the XDP program.
//!
//! Parsed at build time by the eBPF crate's build script. Every error names the
//! rule and says how to fix it, because it surfaces as a build failure.

use std::{format, net::IpAddr, string::String, vec::Vec};

use serde::Deserialize;

use crate::{OVERLAY_MAX, OverlayRule};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    cidr: String,
    #[serde(default)]
    proto: Option<String>,
    #[serde(default)]
    dport: Option<u16>,
    #[serde(default)]
    sport: Option<u16>,
    #[serde(default)]
    comment: Option<String>,
}

/// A parsed rule and its comment (kept for the generated source).
#[derive(Clone, Debug)]
pub struct NamedRule {
    pub rule: OverlayRule,
    pub comment: String,
}

fn parse_proto(s: &str) -> Result<u8, String> {
    Ok(match s {
        "any" => 0,
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        n => n.parse::<u8>().map_err(|_| {
            format!("unknown proto `{n}`: use any, tcp, udp, icmp, icmpv6 or a protocol number")
        })?,
    })
}

/// Parse and validate the file's text.
pub fn parse(text: &str) -> Result<Vec<NamedRule>, String> {
    let file: File = toml::from_str(text).map_err(|e| format!("overlay file is not valid: {e}"))?;
    if file.rule.len() > OVERLAY_MAX {
        return Err(format!(
            "overlay file has {} rules, at most {OVERLAY_MAX} are allowed: merge rules into wider CIDRs",
            file.rule.len()
        ));
    }
    let mut out = Vec::with_capacity(file.rule.len());
    for (i, raw) in file.rule.iter().enumerate() {
        let at = format!("overlay rule {} (`{}`)", i + 1, raw.cidr);
        let (addr_s, len_s) = raw.cidr.split_once('/').unwrap_or((&raw.cidr, ""));
        let addr: IpAddr = addr_s
            .parse()
            .map_err(|_| format!("{at}: `{addr_s}` is not an IP address"))?;
        let max_len = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = if len_s.is_empty() {
            max_len
        } else {
            len_s
                .parse()
                .ok()
                .filter(|l| *l <= max_len)
                .ok_or_else(|| format!("{at}: prefix length must be 0..={max_len}"))?
        };
        let mut bytes = [0u8; 16];
        let family = match addr {
            IpAddr::V4(a) => {
                bytes[..4].copy_from_slice(&a.octets());
                4
            }
            IpAddr::V6(a) => {
                bytes.copy_from_slice(&a.octets());
                6
            }
        };
        let n = if family == 4 { 4 } else { 16 };
        let mut masked = bytes;
        for (b, byte) in masked[..n].iter_mut().enumerate() {
            let bits = (prefix_len as usize).saturating_sub(b * 8).min(8);
            *byte &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
        }
        if masked != bytes {
            return Err(format!(
                "{at}: host bits are set; write the network address of the prefix"
            ));
        }
        let proto =
            parse_proto(raw.proto.as_deref().unwrap_or("any")).map_err(|e| format!("{at}: {e}"))?;
        let (dport, sport) = (raw.dport.unwrap_or(0), raw.sport.unwrap_or(0));
        if (dport != 0 || sport != 0) && proto != 6 && proto != 17 {
            return Err(format!("{at}: a port needs proto = \"tcp\" or \"udp\""));
        }
        out.push(NamedRule {
            rule: OverlayRule {
                family,
                prefix_len,
                proto,
                _pad: 0,
                dport,
                sport,
                addr: bytes,
            },
            comment: raw.comment.clone().unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let r = parse("[[rule]]\ncidr=\"198.18.0.0/15\"\nproto=\"udp\"\ndport=4789\n").unwrap();
        assert_eq!(r[0].rule.family, 4);
        assert_eq!(r[0].rule.prefix_len, 15);
        assert_eq!(r[0].rule.dport, 4789);
        assert!(
            parse("[[rule]]\ncidr=\"198.18.0.1/15\"\n")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(
            parse("[[rule]]\ncidr=\"2001:2::/48\"\ndport=1\n")
                .unwrap_err()
                .contains("needs proto")
        );
        assert!(
            parse("[[rule]]\ncidr=\"2001:2::/48\"\nbogus=1\n")
                .unwrap_err()
                .contains("bogus")
        );
        assert!(
            parse("[[rule]]\ncidr=\"1.2.3.4/33\"\n")
                .unwrap_err()
                .contains("0..=32")
        );
        let many: String = (0..33)
            .map(|i| format!("[[rule]]\ncidr=\"198.18.{i}.0/24\"\n"))
            .collect();
        assert!(parse(&many).unwrap_err().contains("at most 32"));
        assert!(parse("").unwrap().is_empty());
    }
}
