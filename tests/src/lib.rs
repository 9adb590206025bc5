//! Helpers for the kernel tests: privilege gating ([`kernel_available`],
//! [`require_kernel!`]), uniquely named namespaces and pin directories that
//! clean up on Drop ([`ns`]), firewall-ctl and its daemon as children
//! ([`daemon`]), real traffic ([`traffic`]), a BPF_PROG_TEST_RUN harness
//! ([`harness`]), the frame builder ([`packet`]) and the Serf/etcd labs
//! ([`lab`]).

pub mod daemon;
pub mod harness;
pub mod lab;
pub mod ns;
pub mod packet;
pub mod traffic;

pub use daemon::*;
pub use harness::*;
pub use ns::*;
pub use traffic::*;

use std::{path::Path, time::Duration};

/// The lab's XDP object: the firewall plus the benchmark baselines
/// (`pass_floor`, `lookup_floor`), built by this crate's build.rs with
/// firewall-ebpf's `bench` feature. Empty with AYA_BUILD_SKIP=1.
pub static BENCH_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/firewall"));

/// True if kernel tests can run here. Otherwise: under CI (`CI=true`) the
/// test fails, elsewhere it prints why it is skipped and returns false.
pub fn kernel_available(test: &str) -> bool {
    let why = if firewall_ctl::EBPF_OBJ.is_empty() {
        Some("firewall-ctl was built without the XDP object (AYA_BUILD_SKIP=1)".to_string())
    } else if firewall_ctl::sys::check_privileges().is_err() {
        Some("not root (needs CAP_BPF and CAP_NET_ADMIN)".to_string())
    } else if firewall_ctl::sys::check_bpffs(Path::new("/sys/fs/bpf")).is_err() {
        Some("/sys/fs/bpf is not a bpffs mount (run `cargo xtask setup`)".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(w) => not_run(test, &w),
    }
}

/// A test that cannot run here: under CI (`CI=true`) it fails; elsewhere
/// it says why and is recorded as not run. Returns false, for the caller to
/// return early.
pub fn not_run(test: &str, why: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run under CI: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    // libtest counts a test that returns early as passed. `cargo xtask test`
    // sets FIREWALL_SKIPPED_DIR and moves every test named there from
    // "passed" to "skipped", so a run that could not reach what it needs
    // never reads as a green one.
    if let Some(dir) = std::env::var_os("FIREWALL_SKIPPED_DIR") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(Path::new(&dir).join(test), why.as_bytes());
    }
    false
}

/// True if `path` (a program set-up installs) is there. Otherwise, as for
/// the kernel: under CI the test fails, elsewhere it is reported as not run.
pub fn tool_available(test: &str, path: &str) -> bool {
    Path::new(path).exists()
        || not_run(
            test,
            &format!("{path} is missing (run `cargo xtask setup`)"),
        )
}

/// The first line of every kernel test: returns from the test (reported as
/// skipped by `cargo xtask test`, failed under `CI=true`) when the kernel
/// cannot be reached. The test's own name is the marker, so it cannot drift.
#[macro_export]
macro_rules! require_kernel {
    () => {
        if !$crate::kernel_available($crate::test_name({
            fn here() {}
            ::std::any::type_name_of_val(&here)
        })) {
            return;
        }
    };
}

/// `crate::module::test_name::here` -> `test_name`.
pub fn test_name(path: &'static str) -> &'static str {
    let path = path.strip_suffix("::here").unwrap_or(path);
    path.rsplit("::").next().unwrap_or(path)
}

/// Poll `f` every 100 ms until it returns true, for at most `limit`. Waits
/// for an outcome; it does not assert how long the outcome took.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_skip_marker_is_the_test_name() {
        let name = crate::test_name({
            fn here() {}
            std::any::type_name_of_val(&here)
        });
        assert_eq!(name, "the_skip_marker_is_the_test_name");
    }

    /// What `monitor` shows of a captured frame: tags, addresses, ports,
    /// past IPv6 extension headers, and as much as a cut frame still holds.
    #[test]
    fn captured_frames_decode_to_tags_addresses_and_ports() {
        use crate::packet::{Ext, Frame, L4};
        use firewall_common::classify::headers;
        let f = Frame::new(
            "2001:2::9".parse().unwrap(),
            "2001:2::1".parse().unwrap(),
            L4::Tcp {
                sport: 443,
                dport: 40000,
            },
        )
        .vlan(0x88a8, 100)
        .vlan(0x8100, 7)
        .ext(Ext::HopByHop(0))
        .build();
        let h = headers(&f);
        assert_eq!(h.vlans, [Some(100), Some(7)]);
        assert_eq!(h.family, 6);
        assert_eq!(h.src[15], 9);
        assert_eq!(
            (h.proto, h.sport, h.dport),
            (Some(6), Some(443), Some(40000))
        );
        // Cut inside the TCP header: addresses, no ports.
        let h = headers(&f[..f.len() - 18]);
        assert_eq!((h.family, h.proto, h.sport), (6, Some(6), None));
        // An ICMP message: type and code.
        let f = Frame::new(
            "198.18.0.9".parse().unwrap(),
            "198.18.0.1".parse().unwrap(),
            L4::IcmpMsg {
                typ: 3,
                code: 4,
                rest: [0; 4],
                body: vec![],
            },
        )
        .build();
        let h = headers(&f);
        assert_eq!((h.family, h.icmp), (4, Some((3, 4))));
        assert_eq!(&h.src[..4], &[198, 18, 0, 9]);
        // Not IP, or too short for anything.
        assert_eq!(headers(&crate::packet::arp()).family, 0);
        assert_eq!(headers(&[0u8; 10]), Default::default());
    }

    /// The benchmark baselines live in the lab's object only.
    #[test]
    fn the_shipped_object_holds_the_firewall_alone_and_the_lab_object_the_baselines() {
        crate::require_kernel!();
        let names = |obj: &[u8]| -> Vec<String> {
            let o = aya_obj::Object::parse(obj).expect("parse the object");
            let mut v: Vec<String> = o
                .programs
                .keys()
                .cloned()
                .chain(o.maps.keys().cloned())
                .collect();
            v.sort();
            v
        };
        let shipped = names(firewall_ctl::EBPF_OBJ);
        assert!(shipped.contains(&"firewall".to_string()), "{shipped:?}");
        for bench in ["pass_floor", "lookup_floor", "HASH_FLOOR"] {
            assert!(
                !shipped.contains(&bench.to_string()),
                "{bench} in the shipped object: {shipped:?}"
            );
            assert!(
                names(crate::BENCH_OBJ).contains(&bench.to_string()),
                "{bench} missing from the lab object"
            );
        }
    }
}
