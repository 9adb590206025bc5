//! A reply from the Serf agent to `members-filtered`: any bytes decode to an
//! error or to members, which the health rule and the core then take.
#![no_main]

use firewall_ctl::{
    core::Core,
    daemon::config::Guards,
    sources::serf::{self, MembersResponse},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let Ok(Some(reply)) = serf::read_reply::<MembersResponse>(&mut r, "members-filtered", 0, true)
    else {
        return;
    };
    let d = serf::to_discovery(reply.members, "n1", 1_000);
    let mut core = Core::new(Guards::default(), Default::default(), 0, None, 0);
    core.handle_discovery(1, d);
    while core.poll_action().is_some() {}
});
