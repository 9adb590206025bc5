//! The systemd notify protocol (`Type=notify`, `WatchdogSec=`), through
//! sd-notify. Without `NOTIFY_SOCKET` every call is a no-op.
//!
//! The watchdog is pinged from the daemon loop itself, after the turn's
//! commit: a loop stuck in a commit (a held commit lock, a hung syscall)
//! stops pinging and systemd restarts it. A timer thread would keep pinging
//! while the controller was stuck, which is the failure a watchdog is for.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub struct Notifier {
    /// `NOTIFY_SOCKET` was set: systemd (or a test) listens.
    enabled: bool,
    /// `WATCHDOG_USEC` for this process, if systemd wants pings.
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    ready: bool,
    status: String,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            ready: false,
            status: String::new(),
        }
    }

    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// Called after every turn of the loop. `ready` is whether the controller
    /// now enforces a datapath it vouches for (adopted a committed generation,
    /// or finished its first sync); READY=1 goes once, STATUS= on change, and
    /// WATCHDOG=1 at a quarter of the watchdog interval.
    pub fn turn(&mut self, ready: bool, status: &str) {
        let mut states = Vec::new();
        if status != self.status {
            self.status = status.to_string();
            states.push(NotifyState::Status(status));
        }
        if ready && !self.ready {
            self.ready = true;
            states.push(NotifyState::Ready);
        }
        if let Some(wd) = self.watchdog {
            let due = self.last_ping.is_none_or(|t| t.elapsed() >= wd / 4);
            if due {
                self.last_ping = Some(Instant::now());
                states.push(NotifyState::Watchdog);
            }
        }
        if !states.is_empty() {
            self.send(&states);
        }
    }

    /// A SIGHUP reload begins; `reloaded` ends it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn reloaded(&self) {
        if self.ready {
            self.send(&[NotifyState::Ready]);
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }
}

/// The STATUS= line: generation, peers, and the guard in force.
pub fn status_line(s: &crate::core::CoreStatus) -> String {
    let guard = match &s.freeze {
        Some(f) => format!("deletions frozen ({}): {}", f.name(), f.describe()),
        None => "deletions allowed".to_string(),
    };
    let held = if s.held.is_empty() {
        String::new()
    } else {
        format!("; {} deletions held for approval", s.held.len())
    };
    // Bounded: a describe() carries a source's error text.
    let mut line = format!(
        "generation {}, {} peers; {guard}{held}",
        s.generation, s.peers
    );
    if line.len() > 400 {
        let mut cut = 400;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}
