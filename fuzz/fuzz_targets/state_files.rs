//! The state directory's inputs: state.json (the persisted core, which a
//! restarted controller trusts) and approve.json. The first byte picks one.
#![no_main]

use firewall_ctl::{
    core::Core,
    daemon::{config::Guards, state},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mut core = Core::new(Guards::default(), Default::default(), 0, None, 0);
    if which & 1 == 0 {
        if let Ok(p) = serde_json::from_slice(rest) {
            core = Core::new(Guards::default(), Default::default(), 0, Some(p), 1_000);
            core.handle_tick(2_000_000);
            let _ = core.status();
            while core.poll_action().is_some() {}
        }
    } else if let Ok(a) = state::parse_approval(rest) {
        let _ = core.approve(1_000, a.peers.as_deref());
    }
});
