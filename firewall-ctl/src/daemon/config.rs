//! Controller configuration: the TOML file of `firewall-ctl run`/`plan`, and
//! the guard settings the core runs on. Unknown keys are errors that name the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The guard settings live with the core that runs on them.
pub use firewall_controller::guards::Guards;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Where discovery data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A JSON file: `{"revision": N, "complete": true, "peers": [{"addr": "...", "status": "alive"}]}`
    /// or the output of `serf members -format=json` as it is.
    File {
        path: PathBuf,
        #[serde(default = "default_poll_ms")]
        poll_ms: u64,
        #[serde(default = "default_max_bytes")]
        max_bytes: u64,
    },
    /// The local Serf agent's RPC: `rpc_addr`, `tags` (a topology scope),
    /// `poll_ms`, `auth_key`.
    Serf(crate::sources::serf::SerfConfig),
    /// Keys under `prefix` in etcd (`endpoints`), listed then watched.
    Etcd(crate::sources::etcd::EtcdConfig),
}

/// The most discovery sources one controller follows.
pub const MAX_SOURCES: usize = 4;

/// `[discovery]` is one source, `[[discovery]]` a list; both keep serde's
/// own errors, which name the offending key (an untagged enum would not).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SourceConfig>, D::Error> {
    use serde::de::Error as _;
    match toml::Value::deserialize(d)? {
        toml::Value::Array(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.try_into()
                    .map_err(|e| D::Error::custom(format!("discovery[{i}]: {e}")))
            })
            .collect(),
        v => Ok(vec![v.try_into().map_err(D::Error::custom)?]),
    }
}

/// Each source's name, for logs, metrics and status: its kind, numbered
/// when two share one (`file`, `file-2`).
pub fn source_names(sources: &[SourceConfig]) -> Vec<String> {
    let kind = |s: &SourceConfig| match s {
        SourceConfig::File { .. } => "file",
        SourceConfig::Serf(_) => "serf",
        SourceConfig::Etcd(_) => "etcd",
    };
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let k = kind(s);
            let n = sources[..i].iter().filter(|o| kind(o) == k).count();
            if n == 0 {
                k.to_string()
            } else {
                format!("{k}-{}", n + 1)
            }
        })
        .collect()
}

fn default_poll_ms() -> u64 {
    1000
}
fn default_max_bytes() -> u64 {
    64 << 20
}

/// The daemon's configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces to protect; `run` attaches the firewall to any that is not yet.
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `[discovery]` (one source) or `[[discovery]]` (several, up to
    /// `MAX_SOURCES`): additions flow from any, a peer is absent only when
    /// every one omits it.
    #[serde(deserialize_with = "one_or_many")]
    pub discovery: Vec<SourceConfig>,
    #[serde(default)]
    pub guards: Guards,
    /// Timer granularity of the daemon loop.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    #[serde(default)]
    pub log: LogConfig,
    /// `[metrics] listen = "127.0.0.1:9464"`: serve /metrics, /healthz and
    /// /readyz there. Off when absent.
    pub metrics: Option<MetricsConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: std::net::SocketAddr,
}

/// `[log]`: where the daemon's events go and how much of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `debug`, `firewall_ctl=debug,warn`). Unset:
    /// `RUST_LOG`, else `info`. A reload (SIGHUP) applies a new level at once.
    pub level: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// The journal when systemd connected stderr to it (`JOURNAL_STREAM`),
    /// text on stderr otherwise.
    #[default]
    Auto,
    Text,
    /// One JSON object per line, with the event's fields.
    Json,
    Journald,
}

/// A config file is a few KiB; this bound only stops a wrong path (a device,
/// a huge log) from being read whole.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn default_pin_dir() -> PathBuf {
    "/sys/fs/bpf/firewall".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/firewall-ctl".into()
}
fn default_tick_ms() -> u64 {
    250
}

impl Config {
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        let c: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        c.guards.validate().map_err(invalid)?;
        if c.discovery.is_empty() || c.discovery.len() > MAX_SOURCES {
            return Err(invalid(format!(
                "discovery: give 1 to {MAX_SOURCES} sources, as [discovery] or [[discovery]] tables"
            )));
        }
        for src in &c.discovery {
            if let SourceConfig::Etcd(e) = src {
                e.validate().map_err(invalid)?;
            }
        }
        if c.tick_ms == 0 || c.tick_ms > 60_000 {
            return Err(invalid("tick_ms must be 1..=60000".into()));
        }
        if let Some(l) = &c.log.level {
            tracing_subscriber::EnvFilter::try_new(l).map_err(|e| {
                invalid(format!(
                    "log.level `{l}` is not a filter ({e}): use e.g. \"info\" or \"firewall_ctl=debug,warn\""
                ))
            })?;
        }
        Ok(c)
    }
    /// Read, parse and check the config file; the pin and state directories
    /// come back in their one canonical spelling (see `fsafe::canonical`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.into(),
            source,
        };
        let bytes = crate::sys::fsafe::read_bounded(path, MAX_CONFIG_BYTES)
            .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Invalid {
            path: path.into(),
            message: "not UTF-8 text".into(),
        })?;
        let mut c = Config::parse(path, &text)?;
        if c.has_secret() {
            use std::os::unix::fs::MetadataExt as _;
            let mode = std::fs::metadata(path).map_err(read_err)?.mode();
            if mode & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    path: path.into(),
                    message: format!(
                        "it holds a secret (discovery.auth_key or password) but is readable by group or others (mode {:o}): run `chmod 600 {}`",
                        mode & 0o777,
                        path.display()
                    ),
                });
            }
        }
        for k in c.discovery.iter().filter_map(|s| match s {
            SourceConfig::Etcd(e) => e.key_file.as_ref(),
            _ => None,
        }) {
            use std::os::unix::fs::MetadataExt as _;
            let mode = std::fs::metadata(k)
                .map_err(|e| ConfigError::Invalid {
                    path: path.into(),
                    message: format!("discovery.key_file {}: {e}", k.display()),
                })?
                .mode();
            if mode & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    path: path.into(),
                    message: format!(
                        "discovery.key_file {} is readable by group or others (mode {:o}): run `chmod 600 {}`",
                        k.display(),
                        mode & 0o777,
                        k.display()
                    ),
                });
            }
        }
        c.pin_dir = crate::sys::fsafe::canonical(&c.pin_dir);
        c.state_dir = crate::sys::fsafe::canonical(&c.state_dir);
        Ok(c)
    }

    /// Whether the file carries a credential (a Serf auth key, an etcd
    /// password), and so must be private like an ssh key.
    pub fn has_secret(&self) -> bool {
        self.discovery.iter().any(|s| match s {
            SourceConfig::Serf(s) => s.auth_key.is_some(),
            SourceConfig::Etcd(e) => e.password.is_some(),
            SourceConfig::File { .. } => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_sources_as_an_array_of_tables_named_by_kind() {
        let c = Config::parse(
            Path::new("c.toml"),
            "[[discovery]]\nkind=\"serf\"\n[[discovery]]\nkind=\"file\"\npath=\"/a\"\n[[discovery]]\nkind=\"file\"\npath=\"/b\"\n",
        )
        .unwrap();
        assert_eq!(source_names(&c.discovery), ["serf", "file", "file-2"]);
        let one = Config::parse(
            Path::new("c.toml"),
            "[discovery]\nkind=\"file\"\npath=\"/a\"\n",
        )
        .unwrap();
        assert_eq!(source_names(&one.discovery), ["file"]);
        // The offending source and key are named.
        let e = Config::parse(
            Path::new("c.toml"),
            "[[discovery]]\nkind=\"serf\"\n[[discovery]]\nkind=\"file\"\npath=\"/a\"\npoll_msec=1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("discovery[1]") && e.contains("poll_msec"), "{e}");
        let five = "[[discovery]]\nkind=\"serf\"\n".repeat(5);
        let e = Config::parse(Path::new("c.toml"), &five)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 to 4 sources"), "{e}");
    }

    /// The config the package installs parses, protects nothing, and keeps
    /// every guard at its default.
    #[test]
    fn the_shipped_default_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/config/firewall.toml");
        let c = Config::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(c.interfaces.is_empty());
        assert_eq!(c.guards, Guards::default());
        assert_eq!(c.pin_dir, default_pin_dir());
        assert_eq!(c.state_dir, default_state_dir());
        assert_eq!(
            c.metrics.map(|m| m.listen.to_string()).as_deref(),
            Some("127.0.0.1:9464")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse(
            Path::new("c.toml"),
            "[discovery]\nkind=\"file\"\npath=\"/x\"\n[guards]\ngrace_msec=1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("grace_msec"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "bogus=1\n[discovery]\nkind=\"file\"\npath=\"/x\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "[discovery]\nkind=\"file\"\npath=\"/x\"\n[guards]\ngrace_ms=1\ngraceful_grace_ms=2\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("graceful_grace_ms"), "{e}");
        let c = Config::parse(
            Path::new("c.toml"),
            "interfaces=[\"eth0\"]\n[discovery]\nkind=\"file\"\npath=\"/x\"\n",
        )
        .unwrap();
        assert_eq!(c.guards, Guards::default());
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/firewall"));
    }
}
