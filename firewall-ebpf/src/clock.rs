//! CLOCK_MONOTONIC_COARSE, read at most once per tick per CPU.
//!
//! The coarse clock (one tick of resolution) is a memory read where
//! `bpf_ktime_get_ns` reads the TSC (25 ns per packet on the benchmark VM),
//! but it is still a helper call: 14 ns a packet on the benchmark VM, with
//! its return thunk. It only moves when the tick does, and `bpf_jiffies64`
//! is one load (the verifier inlines it), so a reading is reused until
//! jiffies moves on. Flow timeouts and refreshes are in seconds; a reading
//! is at most one tick old.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

/// One CPU's last reading, kept in a per-CPU map value.
#[repr(C)]
pub(super) struct Clock {
    jiffies: u64,
    ns: u64,
}

impl Clock {
    #[inline(always)]
    pub(super) fn now_ns(&mut self) -> u64 {
        // SAFETY: bpf_jiffies64 has no preconditions.
        let j = unsafe { bpf_jiffies64() };
        if j != self.jiffies || self.ns == 0 {
            self.jiffies = j;
            // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
            self.ns = unsafe { bpf_ktime_get_coarse_ns() };
        }
        self.ns
    }
}
