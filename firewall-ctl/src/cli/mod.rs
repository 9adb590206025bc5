//! The command line: the arguments (here), the exit codes ([`exit`]) and the
//! rendering of the daemon's typed status and plan ([`render`]). See
//! README.md for the exit codes.

pub mod exit;
pub mod log;
mod monitor;
mod render;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use render::{print_controller, print_plan, print_status};

use crate::{
    commit::{Committed, commit},
    daemon::{self, config::Config, contract::ControllerStatus},
    datapath::{
        attach::{self, Mode},
        ctrl::Policy,
        status,
        store::KernelStore,
    },
    peers::{Changes, OPERATOR, PeerParseError, parse_peer},
    sys::{self, lock::CommitLock},
};

#[derive(Parser)]
#[command(
    name = "firewall-ctl",
    version,
    about = "XDP source-address firewall with a guarded allowlist controller"
)]
pub struct Cli {
    /// Pin directory on bpffs holding the maps, programs and links.
    #[arg(
        long,
        global = true,
        env = "FIREWALL_PIN_DIR",
        default_value = "/sys/fs/bpf/firewall"
    )]
    pin_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a shell completion script: `firewall-ctl completions bash > /etc/bash_completion.d/firewall-ctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (firewall-ctl.1, and firewall-ctl-CMD.1 for each command) into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Load, pin and attach the firewall to an interface (atomically replaces our own older program).
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        mode: Mode,
        /// Replace another tool's XDP program on the interface.
        #[arg(long)]
        force: bool,
        /// Capacity of each exact-peer table (IPv4 and IPv6), fixed when the pin directory is
        /// created; rounded up to a power of two (at least 4). Costs 74 B (IPv4) + 98 B (IPv6)
        /// of locked kernel memory per unit, allocated up front.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
        max_peers: Option<u32>,
        /// Capacity of the table of this node's own flows (an LRU: when full, the least
        /// recently used flow goes, and a late reply to it drops); fixed when the pin
        /// directory is created. Default 65536, about 90 B of kernel memory each, and 32 B
        /// for the filter that lets other packets skip the table.
        #[arg(long, value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
        max_flows: Option<u32>,
        /// What to do with a packet the allowlist would drop: `enforce` drops it, `observe`
        /// passes it and counts it as would-drop. Kept by the pin directory; default enforce.
        #[arg(long, value_enum)]
        policy: Option<Policy>,
        /// Pass replies to this node's own connections (TCP, UDP, ping) and ICMP errors about
        /// them. `off` is the pure allowlist. Kept by the pin directory; default on.
        #[arg(long, value_name = "on|off", value_parser = on_off)]
        replies: Option<bool>,
        /// Idle timeouts of a flow in seconds, e.g. `tcp=3600,udp=120,icmp=30` (the defaults);
        /// any subset. Kept by the pin directory.
        #[arg(long, value_name = "PROTO=SECS,...", value_parser = flow_timeouts)]
        flow_timeouts: Option<FlowTimeouts>,
        /// Drop events per second per CPU for `monitor` (a token bucket in the kernel; what
        /// it suppresses is counted); 0 turns events off. Default 1000, at most 1000000.
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        event_rate: Option<u32>,
    },
    /// Switch every interface of the pin directory between enforce and observe, with one
    /// atomic store: no reload, no packet lost. Survives re-attach and restarts.
    Policy {
        #[arg(value_enum)]
        policy: Policy,
    },
    /// The node's own flows whose replies pass: protocol, ends, age, idle time.
    Flows {
        #[arg(long)]
        json: bool,
    },
    /// Stream the dropped (or, in observe mode, would-drop) packets: one line each, JSON
    /// lines, or a pcap file for tcpdump and Wireshark.
    Monitor(monitor::MonitorArgs),
    /// Detach from an interface: the only way the compiled-in overlay allowlist stops applying.
    Detach {
        #[arg(long)]
        iface: String,
        /// Also remove the peer maps once no interface is left.
        #[arg(long)]
        purge: bool,
    },
    /// Interfaces, program, maps, committed generation, counters and the compiled-in overlay.
    Status {
        #[arg(long)]
        json: bool,
        /// The controller's state directory, for its view (absent peers, held deletions, alarms).
        #[arg(long, default_value = "/var/lib/firewall-ctl")]
        state_dir: PathBuf,
    },
    /// Operator edits of the allowlist, committed through stage, verify and flip.
    Peers {
        #[command(subcommand)]
        cmd: PeersCmd,
    },
    /// Run the controller: keep the allowlist in step with discovery (see README: controller).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Dry run: what the controller would add, hold and evict right now, and why.
    Plan {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show the deletions a guard holds, and with --yes let them through.
    Approve {
        #[arg(long, default_value = "/var/lib/firewall-ctl")]
        state_dir: PathBuf,
        /// Approve (all held, or the PEERs listed).
        #[arg(long)]
        yes: bool,
        peers: Vec<String>,
    },
    /// Per-interface verdict counters, and rates with --watch.
    Stats {
        #[arg(long)]
        json: bool,
        /// Print every SECS seconds with per-second rates.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
        watch: Option<u64>,
    },
}

#[derive(Subcommand)]
enum PeersCmd {
    /// The committed peers. HITS, for an exact peer: the ticks of the kernel's
    /// clock (1-10 ms) in which it passed a packet, not a packet count.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Allow sources: addresses or CIDRs (owned by the operator; the controller never removes them).
    Add {
        #[arg(required = true, num_args = 1..=4096)]
        peers: Vec<String>,
        /// Accept prefixes shorter than /8 (IPv4) or /32 (IPv6), `0.0.0.0/0` included.
        #[arg(long)]
        allow_broad: bool,
    },
    /// Remove sources the operator added (or any entry, by exact address or CIDR).
    Remove {
        #[arg(required = true, num_args = 1..=4096)]
        peers: Vec<String>,
    },
}

/// The whole CLI: parse, run, map the error to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` logs as its config says (and installs logging itself, once its
    // config is read); every other command logs text to stderr.
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        log::init(crate::daemon::config::LogFormat::Text, None);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stdout (`| head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::from(exit::exit_code(&e))
        }
    }
}

/// `--flow-timeouts`: seconds per protocol, any subset.
#[derive(Clone, Copy, Debug, Default)]
struct FlowTimeouts([Option<u32>; 3]);

fn flow_timeouts(s: &str) -> Result<FlowTimeouts, String> {
    let mut t = FlowTimeouts::default();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not PROTO=SECS (e.g. udp=120)"))?;
        let i = match k.trim() {
            "tcp" => 0,
            "udp" => 1,
            "icmp" => 2,
            other => return Err(format!("unknown protocol `{other}`: use tcp, udp or icmp")),
        };
        let secs: u32 = v
            .trim()
            .parse()
            .ok()
            .filter(|s| (1..=864_000).contains(s))
            .ok_or_else(|| format!("`{v}` is not a number of seconds from 1 to 864000"))?;
        t.0[i] = Some(secs);
    }
    Ok(t)
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: use on or off")),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// firewall-ctl.1 and one page per command, named as git names its own
/// (`firewall-ctl-peers-add.1`), so `man firewall-ctl-run` works.
fn manpages(dir: &std::path::Path) -> anyhow::Result<usize> {
    fn write(
        dir: &std::path::Path,
        cmd: clap::Command,
        name: String,
        bin: String,
    ) -> anyhow::Result<usize> {
        let cmd = cmd.name(name.clone()).bin_name(bin.clone());
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
        std::fs::write(dir.join(format!("{name}.1")), buf)
            .with_context(|| format!("writing {name}.1 in {}", dir.display()))?;
        let mut n = 1;
        let subs = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help");
        for sub in subs {
            let (sn, sb) = (
                format!("{name}-{}", sub.get_name()),
                format!("{bin} {}", sub.get_name()),
            );
            n += write(dir, sub.clone(), sn, sb)?;
        }
        Ok(n)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    write(dir, cmd, "firewall-ctl".into(), "firewall-ctl".into())
}

/// Become the service's user if root and the first of `dirs` that exists
/// belongs to it.
fn as_owner(dirs: &[&std::path::Path]) -> anyhow::Result<()> {
    for d in dirs {
        if d.exists() {
            if let Some(uid) = sys::owner::act_as_service_user(d)? {
                tracing::debug!(uid, dir = %d.display(), "acting as the service user");
            }
            return Ok(());
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // One spelling of the directory for the lock, the daemon and the CLI.
    let pin_dir = crate::sys::fsafe::canonical(&cli.pin_dir);
    // Root on a datapath the service's user owns acts as that user (see
    // sys::owner), before anything is opened or created.
    match &cli.cmd {
        Cmd::Run { .. } | Cmd::Plan { .. } => {} // their config names the directories
        Cmd::Completions { .. } | Cmd::Manpages { .. } => {}
        Cmd::Approve { state_dir, .. } => as_owner(&[state_dir])?,
        Cmd::Status { state_dir, .. } => as_owner(&[&pin_dir, state_dir])?,
        _ => as_owner(&[&pin_dir])?,
    }
    match cli.cmd {
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer: clap_complete panics on a closed stdout.
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "firewall-ctl", &mut buf);
            std::io::Write::write_all(&mut std::io::stdout(), &buf)?;
        }
        Cmd::Manpages { dir } => {
            let n = manpages(&dir)?;
            println!("wrote {n} man pages to {}", dir.display());
        }
        Cmd::Attach {
            iface,
            mode,
            force,
            max_peers,
            max_flows,
            policy,
            replies,
            flow_timeouts,
            event_rate,
        } => {
            let opts = attach::AttachOptions {
                mode,
                force,
                max_peers,
                max_flows,
                policy,
                replies,
                flow_timeout_s: flow_timeouts.unwrap_or_default().0,
                event_rate,
            };
            let r = attach::attach(&iface, &pin_dir, &opts)?;
            if r.replaced {
                println!(
                    "replaced the firewall on {iface} atomically (program {}, link {}); peers kept",
                    r.prog_id, r.link_id
                );
            } else {
                println!(
                    "attached the firewall to {iface} (program {}, link {}); pinned in {}",
                    r.prog_id,
                    r.link_id,
                    pin_dir.display()
                );
            }
        }
        Cmd::Policy { policy } => {
            sys::check_privileges()?;
            let store = KernelStore::open(&pin_dir)?;
            let mut s = store.settings();
            let was = s.policy;
            s.policy = policy;
            store.set_settings(&s);
            let n = status::interfaces(&pin_dir).len();
            println!(
                "policy {} (was {}) on every interface of {} ({n} attached)",
                policy_name(policy),
                policy_name(was),
                pin_dir.display()
            );
        }
        Cmd::Flows { json } => {
            sys::check_privileges()?;
            let rows = crate::datapath::flows::list(&pin_dir)?;
            if json {
                return print_json(&rows);
            }
            println!(
                "{:<7} {:<40} {:<40} {:>9} {:>9} state",
                "proto", "local", "remote", "age s", "idle s"
            );
            for r in &rows {
                let end = |a: std::net::IpAddr, p: u16| match a {
                    std::net::IpAddr::V6(a) => format!("[{a}]:{p}"),
                    a => format!("{a}:{p}"),
                };
                println!(
                    "{:<7} {:<40} {:<40} {:>9.1} {:>9.1} {}",
                    r.proto,
                    end(r.local, r.local_port),
                    end(r.remote, r.remote_port),
                    r.age_s,
                    r.idle_s,
                    if r.live { "live" } else { "expired" }
                );
            }
            println!("{} flows", rows.len());
        }
        Cmd::Monitor(args) => return monitor::run(&pin_dir, &args),
        Cmd::Detach { iface, purge } => {
            let purged = attach::detach(&iface, &pin_dir, purge)?;
            println!(
                "detached the firewall from {iface}{}",
                if purged { "; peer maps removed" } else { "" }
            );
        }
        Cmd::Status { json, state_dir } => {
            sys::check_privileges()?;
            let st = status::status(&pin_dir)?;
            let ctl: Option<ControllerStatus> =
                crate::daemon::state::read_json(&state_dir.join(crate::daemon::state::STATUS_FILE))
                    .unwrap_or(None);
            if json {
                let mut v = serde_json::to_value(&st)?;
                v["controller"] = serde_json::to_value(&ctl)?;
                return print_json(&v);
            }
            print_status(&st);
            print_controller(ctl.as_ref());
        }
        Cmd::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    log::init(crate::daemon::config::LogFormat::Text, None);
                    return Err(e.into());
                }
            };
            log::init(cfg.log.format, cfg.log.level.as_deref());
            as_owner(&[&cfg.pin_dir, &cfg.state_dir])?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(daemon::run(cfg, config));
            // A discovery read still running on a blocking thread must not hold
            // up the exit after SIGTERM: it only reads a file.
            rt.shutdown_timeout(Duration::from_secs(1));
            r?;
        }
        Cmd::Plan { config, json } => {
            sys::check_privileges()?;
            let cfg = Config::load(&config)?;
            as_owner(&[&cfg.pin_dir, &cfg.state_dir])?;
            let plan = daemon::plan(&cfg)?;
            if json {
                return print_json(&plan);
            }
            print_plan(&plan);
        }
        Cmd::Approve {
            state_dir,
            yes,
            peers,
        } => approve(&state_dir, yes, &peers)?,
        Cmd::Peers { cmd } => peers(&pin_dir, cmd)?,
        Cmd::Stats { json, watch } => stats(&pin_dir, json, watch)?,
    }
    Ok(())
}

fn approve(state_dir: &std::path::Path, yes: bool, peers: &[String]) -> anyhow::Result<()> {
    use crate::daemon::state;
    let st: ControllerStatus = state::read_json(&state_dir.join(state::STATUS_FILE))?
        .with_context(|| format!("no controller status in {}: is `firewall-ctl run` running with this state directory?", state_dir.display()))?;
    let held = st.core.held;
    let waiting: Vec<_> = st
        .core
        .awaiting_approval
        .iter()
        .filter(|a| !held.contains(&a.peer))
        .collect();
    if let Some(f) = &st.core.freeze {
        println!("guard: {}", f.describe());
    }
    if held.is_empty() && waiting.is_empty() && peers.is_empty() {
        println!("no deletions are held or awaiting approval");
        return Ok(());
    }
    if !held.is_empty() {
        println!("held deletions, grace over ({}):", held.len());
        for h in &held {
            println!("  {h}");
        }
    }
    if !waiting.is_empty() {
        println!(
            "held when their grace ends ({}; an approval now applies then):",
            waiting.len()
        );
        for a in &waiting {
            println!(
                "  {}  grace ends in {} s",
                a.peer,
                a.evict_at_ms.saturating_sub(st.core.now_ms).div_ceil(1000)
            );
        }
    }
    let chosen = peers
        .iter()
        .map(|p| parse_peer(p))
        .collect::<Result<Vec<_>, _>>()?;
    if !yes {
        println!(
            "nothing approved: run again with --yes to let {} through (only the shrink guard can be approved; the grace TTL still applies)",
            if chosen.is_empty() {
                "all of them".to_string()
            } else {
                format!("{} listed peers", chosen.len())
            }
        );
        return Ok(());
    }
    let req = state::Approval {
        peers: (!chosen.is_empty()).then_some(chosen),
    };
    state::write_json(&state_dir.join(state::APPROVE_FILE), &req)?;
    println!("approval written; the controller applies it within one tick (see its audit log)");
    Ok(())
}

fn peers(pin_dir: &std::path::Path, cmd: PeersCmd) -> anyhow::Result<()> {
    sys::check_privileges()?;
    match cmd {
        PeersCmd::List { json } => {
            let store = KernelStore::open(pin_dir)?;
            let rows = store.list()?;
            if json {
                return print_json(&rows);
            }
            println!("{:<44} {:<9} {:>12}", "PEER", "ORIGIN", "HITS");
            for r in rows {
                let origin = match r.origin {
                    crate::peers::OPERATOR => "operator",
                    crate::peers::DISCOVERY => "discovery",
                    _ => "?",
                };
                println!(
                    "{:<44} {:<9} {:>12}",
                    r.peer.to_string(),
                    origin,
                    r.hits.map_or("-".into(), |h| h.to_string())
                );
            }
        }
        PeersCmd::Add { peers, allow_broad } => edit(pin_dir, &peers, Some(allow_broad))?,
        PeersCmd::Remove { peers } => edit(pin_dir, &peers, None)?,
    }
    Ok(())
}

/// `allow_broad` is `Some` for an addition, `None` for a removal.
fn edit(
    pin_dir: &std::path::Path,
    input: &[String],
    allow_broad: Option<bool>,
) -> anyhow::Result<()> {
    let add = allow_broad.is_some();
    // Validate everything before touching the kernel: one bad argument changes nothing.
    let nets = input
        .iter()
        .map(|s| parse_peer(s))
        .collect::<Result<Vec<_>, _>>()?;
    if allow_broad == Some(false)
        && let Some(n) = nets.iter().find(|n| crate::peers::is_broad(n))
    {
        return Err(PeerParseError::Broad(*n).into());
    }
    if allow_broad == Some(true) {
        for n in nets.iter().filter(|n| crate::peers::is_broad(n)) {
            eprintln!("warning: {n} allows a large part of the internet (--allow-broad given)");
        }
    }
    let _lock = CommitLock::acquire(pin_dir).context("taking the commit lock")?;
    let mut store = KernelStore::open(pin_dir)?;
    let (mut current, cleaned) = Committed::adopt(&mut store)?;
    if cleaned > 0 {
        eprintln!("cleaned {cleaned} entries a crashed commit had left staged");
    }
    let changes = if add {
        Changes {
            add: nets.iter().map(|n| (*n, OPERATOR)).collect(),
            remove: vec![],
        }
    } else {
        let missing: Vec<String> = nets
            .iter()
            .filter(|n| !current.set.contains_key(n))
            .map(|n| n.to_string())
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "not in the allowlist, nothing to remove: {}",
                missing.join(", ")
            );
        }
        Changes {
            add: vec![],
            remove: nets,
        }
    };
    match commit(&mut store, &mut current, changes)? {
        None => println!(
            "no change (generation {} stays committed)",
            current.generation
        ),
        Some(r) => {
            println!(
                "committed generation {}: {} added, {} removed; {} peers",
                r.generation,
                r.added.len(),
                r.removed.len(),
                current.set.len()
            );
            if let Some(e) = r.gc_error {
                eprintln!(
                    "warning: collecting removed entries failed ({e}); they are invisible and the next commit removes them"
                );
            }
        }
    }
    Ok(())
}

fn stats(pin_dir: &std::path::Path, json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    sys::check_privileges()?;
    crate::datapath::layout::check_dir(pin_dir)?;
    let read = || -> Vec<(String, firewall_common::Counters)> {
        status::interfaces(pin_dir)
            .into_iter()
            .map(|i| {
                let c = status::read_counters(
                    &attach::iface_dir(pin_dir, &i).join(firewall_common::names::COUNTERS),
                )
                .unwrap_or_default();
                (i, c)
            })
            .collect()
    };
    let mut prev = read();
    if prev.is_empty() {
        return Err(crate::datapath::layout::LayoutError::NotAttached(pin_dir.into()).into());
    }
    let Some(secs) = watch else {
        if json {
            let m: serde_json::Map<String, serde_json::Value> = prev
                .iter()
                .map(|(i, c)| (i.clone(), serde_json::to_value(c).unwrap()))
                .collect();
            return print_json(&m);
        }
        for (i, c) in &prev {
            println!("{i}: {}", render::counters_line(c));
        }
        return Ok(());
    };
    loop {
        std::thread::sleep(Duration::from_secs(secs));
        let now = read();
        for ((i, c), (_, p)) in now.iter().zip(prev.iter()) {
            let r = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs as f64;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"iface": i, "counters": c, "pps": {
                    "overlay": r(c.overlay, p.overlay), "peer": r(c.peer, p.peer), "nonip": r(c.nonip, p.nonip),
                    "neighbour": r(c.neighbour, p.neighbour), "reply": r(c.reply, p.reply),
                    "default_drop": r(c.default_drop, p.default_drop), "malformed": r(c.malformed, p.malformed),
                    "would_drop_default": r(c.would_drop_default, p.would_drop_default),
                    "would_drop_malformed": r(c.would_drop_malformed, p.would_drop_malformed)}})
                );
            } else {
                println!(
                    "{i}: pass/s overlay {:.0} peer {:.0} nonip {:.0} neighbour {:.0} reply {:.0} | drop/s default {:.0} malformed {:.0} | would drop/s default {:.0} malformed {:.0}",
                    r(c.overlay, p.overlay),
                    r(c.peer, p.peer),
                    r(c.nonip, p.nonip),
                    r(c.neighbour, p.neighbour),
                    r(c.reply, p.reply),
                    r(c.default_drop, p.default_drop),
                    r(c.malformed, p.malformed),
                    r(c.would_drop_default, p.would_drop_default),
                    r(c.would_drop_malformed, p.would_drop_malformed)
                );
            }
        }
        prev = now;
    }
}

fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::Enforce => "enforce",
        Policy::Observe => "observe",
    }
}
