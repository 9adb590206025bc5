//! Logging: text or JSON lines on stderr, or the systemd journal, with a
//! level that a reload can change while the daemon runs.

use std::sync::OnceLock;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
};

use crate::daemon::config::LogFormat;

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Install the subscriber once, for the whole process. `level` unset:
/// `RUST_LOG`, else `info`.
pub fn init(format: LogFormat, level: Option<&str>) {
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let _ = LEVEL.set(handle);
    let journal = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
        LogFormat::Text | LogFormat::Json => false,
    };
    let journal = if journal {
        match tracing_journald::layer() {
            Ok(l) => Some(l),
            // No journal socket (not under systemd after all): say so, and
            // log to stderr.
            Err(e) => {
                eprintln!("firewall-ctl: the journal is not reachable ({e}); logging to stderr");
                None
            }
        }
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match (journal, format) {
        (Some(j), _) => registry.with(j).try_init(),
        (None, LogFormat::Json) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        (None, _) => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
}

/// A new level for the running process (a reload's `log.level`).
pub fn set_level(level: &str) -> Result<(), String> {
    let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    LEVEL
        .get()
        .ok_or("logging is not initialised")?
        .reload(f)
        .map_err(|e| e.to_string())
}
