//! The drop path: the observe policy, the would-drop and drop counters, and
//! a rate-limited event per dropped packet for `firewall-ctl monitor`. Only
//! packets that would be dropped come here.

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use firewall_common::{
    COUNTER_EVENTS, COUNTER_EVENTS_SUPPRESSED, Control, Reason, WOULD_DROP_OFFSET,
    flow::{EVENT_CAPTURE, POLICY_OBSERVE},
};

use super::{CTRL, EVENT_BUCKET, EVENTS, count};

const NS_PER_S: u64 = 1_000_000_000;

#[inline(always)]
pub(super) fn drop_path(ctx: &XdpContext, reason: Reason) -> u32 {
    let Some(ctrl) = CTRL.get(0) else {
        count(reason as usize);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: `ctrl` is a valid reference into the CTRL array value;
    // `firewall-ctl policy` stores this word alone, with one aligned store.
    let observe = unsafe { core::ptr::read_volatile(&ctrl.policy) } == POLICY_OBSERVE;
    count(reason as usize + if observe { WOULD_DROP_OFFSET } else { 0 });
    emit(ctx, ctrl, reason, observe);
    if observe {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// One event into `EVENTS`, if this CPU's token bucket allows: `event_rate`
/// tokens a second, at most one second's worth banked. Suppressed events
/// (no token, or the ring full because nobody reads it) are counted.
#[inline(always)]
fn emit(ctx: &XdpContext, ctrl: &Control, reason: Reason, observed: bool) {
    // Userspace caps the rate at 1,000,000, so no product below overflows.
    let rate = ctrl.event_rate as u64;
    if rate == 0 {
        return;
    }
    let Some(b) = EVENT_BUCKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's EventBucket, valid for the program run; per-CPU, so
    // no other program run touches it meanwhile.
    let b = unsafe { &mut *b };
    if b.tokens < NS_PER_S {
        // Empty, a flood most likely: nothing can have refilled within the
        // same tick, so only a new tick is worth a clock read.
        // SAFETY: bpf_jiffies64 has no preconditions.
        let j = unsafe { bpf_jiffies64() };
        if j == b.last_jiffies {
            count(COUNTER_EVENTS_SUPPRESSED);
            return;
        }
        b.last_jiffies = j;
    }
    // The bucket refills by the coarse clock (a memory read; the precise one
    // cost 25 ns per dropped packet on the benchmark VM, and a flood is
    // exactly when the drop path must stay cheap). Only an event that is
    // written pays for a precise timestamp.
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut elapsed = now.wrapping_sub(b.last_ns);
    if elapsed > NS_PER_S {
        elapsed = NS_PER_S;
    }
    b.last_ns = now;
    let mut tokens = b.tokens + elapsed * rate;
    if tokens > rate * NS_PER_S {
        tokens = rate * NS_PER_S;
    }
    if tokens < NS_PER_S {
        b.tokens = tokens;
        count(COUNTER_EVENTS_SUPPRESSED);
        return;
    }
    b.tokens = tokens - NS_PER_S;
    let Some(mut e) = EVENTS.reserve(0) else {
        count(COUNTER_EVENTS_SUPPRESSED);
        return;
    };
    let p = e.as_mut_ptr();
    let len = ctx.data_end() - ctx.data();
    let mut cap = if len > EVENT_CAPTURE {
        EVENT_CAPTURE
    } else {
        len
    };
    // SAFETY: `p` points to the reserved record, sized for a DropEvent;
    // `ctx.ctx` is the program's valid xdp_md.
    unsafe {
        (*p).time_ns = bpf_ktime_get_ns();
        (*p).ifindex = (*ctx.ctx).ingress_ifindex;
        (*p).len = len as u32;
        (*p).reason = reason as u32;
        (*p).observed = observed as u32;
        (*p)._pad = 0;
        if cap == 0
            || bpf_xdp_load_bytes(
                ctx.ctx,
                0,
                (*p).data.as_mut_ptr() as *mut c_void,
                cap as u32,
            ) != 0
        {
            cap = 0;
        }
        (*p).cap_len = cap as u32;
    }
    e.submit(0);
    count(COUNTER_EVENTS);
}
