//! `firewall-ctl monitor`: stream the drop events of a pin directory.

use std::{fs::File, os::unix::fs::OpenOptionsExt as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use firewall_common::flow::EVENT_CAPTURE;
use pcap_file::{
    DataLink, Endianness, TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
};

use crate::{
    datapath::events::EventReader,
    sys::{self, lock::MonitorLock},
};

/// The reasons a packet can be dropped for, as `--reason` takes them.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DropReason {
    /// no rule passed it: not overlay, not a peer, not a reply
    DefaultDrop,
    /// a frame the parser refused (truncated, bad header, too many tags)
    Malformed,
}

impl DropReason {
    fn name(self) -> &'static str {
        match self {
            DropReason::DefaultDrop => "default_drop",
            DropReason::Malformed => "malformed",
        }
    }
}

#[derive(clap::Args)]
pub struct MonitorArgs {
    /// Only this interface's events.
    #[arg(long)]
    iface: Option<String>,
    /// Only events of this reason.
    #[arg(long, value_enum)]
    reason: Option<DropReason>,
    /// One JSON object per line.
    #[arg(long, conflicts_with = "pcap")]
    json: bool,
    /// Write the captured bytes (the first 128 of each packet) to a new pcap file, for
    /// `tcpdump -r` and Wireshark, instead of printing lines. Refuses an existing file.
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// Stop after this many events (after filtering).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    duration: Option<u64>,
}

pub fn run(pin_dir: &std::path::Path, a: &MonitorArgs) -> anyhow::Result<()> {
    sys::check_privileges()?;
    let ifindex = match &a.iface {
        Some(i) => Some(sys::ifindex(i)?),
        None => None,
    };
    let _lock = MonitorLock::acquire(pin_dir)?;
    let mut reader = EventReader::open(pin_dir)?;
    let mut pcap = match &a.pcap {
        Some(path) => {
            // 0600 and never over an existing file: captured packets are
            // other people's traffic.
            let f = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!("cannot create {} (it must not exist yet)", path.display())
                })?;
            let header = PcapHeader {
                snaplen: EVENT_CAPTURE as u32,
                datalink: DataLink::ETHERNET,
                ts_resolution: TsResolution::MicroSecond,
                endianness: Endianness::native(),
                ..Default::default()
            };
            Some(PcapWriter::with_header(f, header).context("writing the pcap header")?)
        }
        None => None,
    };
    let deadline = a
        .duration
        .map(|s| std::time::Instant::now() + Duration::from_secs(s));
    let mut seen = 0u64;
    loop {
        if a.count.is_some_and(|n| seen >= n)
            || deadline.is_some_and(|d| std::time::Instant::now() >= d)
        {
            break;
        }
        let Some(e) = reader.next(Duration::from_millis(200))? else {
            continue;
        };
        if ifindex.is_some_and(|i| i != e.ifindex) || a.reason.is_some_and(|r| r.name() != e.reason)
        {
            continue;
        }
        seen += 1;
        match &mut pcap {
            // An unbuffered File: every packet is on disk when written, so a
            // monitor stopped by a signal leaves a whole file behind.
            Some(w) => {
                w.write_packet(&PcapPacket::new(e.time_since_epoch, e.len, &e.data))
                    .context("writing to the pcap file")?;
            }
            None if a.json => println!("{}", serde_json::to_string(&e)?),
            None => println!("{}", e.line()),
        }
    }
    if let Some(p) = &a.pcap {
        eprintln!("{seen} events written to {}", p.display());
    }
    Ok(())
}
