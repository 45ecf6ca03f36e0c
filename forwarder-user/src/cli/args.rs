//! The command line: every subcommand and option of `edgefwd`, as clap reads them.
//! `main.rs` parses these and dispatches to the daemon (`daemon::run`) or to the
//! CLI's commands (`cli::commands`).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use forwarder_common::DEFAULT_PIN_DIR;

use crate::dataplane::{
    config::RouteConfig,
    maps::{Listener, Maps, Route},
    resolve,
};

#[derive(Parser)]
#[command(
    name = "edgefwd",
    version,
    about = "eBPF/XDP-accelerated WebRTC SFU edge forwarder"
)]
pub struct Cli {
    /// bpffs directory where the daemon pins its maps and the CLI finds them.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "EDGEFWD_PIN_DIR")]
    pub pin_dir: PathBuf,
    /// Log lines on stderr: human, or one JSON object per line (for log shippers).
    /// Verbosity from RUST_LOG (default info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "EDGEFWD_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// tracing for our events; `log` records of dependencies (aya-log, webrtc-rs) go
/// through the same subscriber.

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Datapath {
    /// XDP in the kernel (native mode, generic as fallback).
    Xdp,
    /// recvmmsg/sendmmsg on UDP sockets.
    User,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Load the data plane, program routes from the config, serve metrics.
    ///
    /// With --datapath xdp the XDP link and the maps are pinned: when the daemon
    /// stops (SIGTERM, a crash, kill -9) forwarding of the programmed routes goes on,
    /// and the next `run` takes the link over and reconciles the maps with its config
    /// (adds, updates, removes; counters kept). `edgefwd down` detaches and removes.
    Run {
        /// Interface the media arrives on (XDP attaches here).
        #[arg(long)]
        iface: Option<String>,
        /// TOML file of listeners and routes (docs/operations.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Which data path forwards the media.
        #[arg(long, value_enum, default_value = "xdp")]
        datapath: Datapath,
        /// Prometheus /metrics listen address.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Stop by itself after this many seconds (demos, tests).
        #[arg(long)]
        duration: Option<u64>,
        /// Serve WHIP/WHEP and the built-in page here (sets [webrtc] http).
        #[arg(long, requires = "webrtc_media")]
        webrtc_http: Option<SocketAddr>,
        /// The UDP port for all WebRTC media (sets [webrtc] media).
        #[arg(long, requires = "webrtc_http")]
        webrtc_media: Option<SocketAddr>,
        /// How WebRTC media moves (sets [webrtc] datapath): auto (AF_XDP workers when
        /// XDP runs on the media interface) or socket.
        #[arg(long, value_enum)]
        webrtc_datapath: Option<crate::webrtc::MediaPath>,
    },
    /// Detach XDP and remove the pinned maps: what `run` leaves in place when it
    /// stops (so forwarding survives restarts and upgrades). Stop the daemon first.
    Down {
        /// Only this interface's XDP link (default: every one in the pin directory).
        #[arg(long)]
        iface: Option<String>,
        /// Keep the pinned maps (routes, counters); only detach.
        #[arg(long)]
        keep_maps: bool,
    },
    /// List, add or delete routes in the live maps.
    Routes {
        #[command(subcommand)]
        cmd: RoutesCmd,
    },
    /// Validate config files without starting anything (no root needed): syntax,
    /// addresses, routes and their fan-out streams, links, the [webrtc] section.
    /// Several files (the nodes of one cascade) are also checked together: both ends
    /// of every link agree and the links form a tree (a cycle is named).
    CheckConfig {
        /// The TOML files `run --config` would read.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The cluster as its Redis has it: the live nodes (leases, load) and the rooms'
    /// origins with their epochs.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Cascade links to other edgefwd nodes: list (with state and traffic), add, delete.
    Links {
        #[command(subcommand)]
        cmd: LinksCmd,
    },
    /// WebRTC rooms of a running daemon with their sessions and traffic (from its API).
    Rooms {
        #[command(flatten)]
        api: ApiArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Drains a running daemon before maintenance: no new rooms or viewers there, its
    /// viewers and publishers move to other nodes, then it exits (POST /api/drain;
    /// SIGUSR1 does the same). Run it before `systemctl stop` to take a node out; a
    /// plain stop or restart keeps the sessions for the next process instead.
    Drain {
        #[command(flatten)]
        api: ApiArgs,
        /// Seconds until the daemon exits even with sessions left.
        #[arg(long, default_value_t = 300)]
        deadline: u64,
        /// Return at once instead of waiting until the daemon has exited.
        #[arg(long)]
        no_wait: bool,
    },
    /// WebRTC sessions of a running daemon, of one room or of all (from its API).
    Sessions {
        /// Only this room's sessions.
        room: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Loads a running SFU with WHIP publishers and WHEP subscribers (real ICE, DTLS,
    /// SRTP; synthetic media) and reports bitrate, loss, latency and join times.
    LoadTest {
        /// The SFU's WHIP/WHEP address (its ready line's webrtc-http).
        #[arg(long, env = "EDGEFWD_API", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Subscribers join here instead (WHEP on another node of a cascade: the room
        /// reaches them through its trunks).
        #[arg(long, value_name = "URL")]
        subscribe_url: Option<String>,
        /// Subscribers choose their node as the page does: candidates from
        /// /v1/edges (at --subscribe-url, else --url), each probed, the fastest joined.
        #[arg(long)]
        edges: bool,
        /// Publishers live through their node's loss: after a second without anything
        /// from its node a publisher publishes again at --url (the room goes where the
        /// cluster re-homes it). Viewers that choose through --edges move by themselves.
        #[arg(long)]
        failover: bool,
        /// Clients connect over ICE-TCP (the answer's passive TCP candidate, RFC 4571
        /// framing) instead of UDP, as browsers behind UDP-blocking networks do.
        #[arg(long)]
        tcp: bool,
        /// The [webrtc] token, if the SFU has one.
        #[arg(long, env = "EDGEFWD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Rooms, each with its own publishers and subscribers.
        #[arg(long, default_value_t = 1)]
        rooms: usize,
        /// Publishers per room (each one audio and one video track).
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Subscribers per room (each watches every publisher of its room).
        #[arg(long, default_value_t = 5)]
        subscribers: usize,
        /// Video bitrate of each publisher, kbit/s.
        #[arg(long, default_value_t = 1000)]
        video_bitrate: u32,
        /// Seconds of media once everyone has joined.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Joins in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds one join (POST, ICE, DTLS) may take before it counts as failed.
        #[arg(long, default_value_t = 10.0)]
        join_timeout: f64,
        /// Room names are PREFIX-0, PREFIX-1, ... (default: load-<random>).
        #[arg(long)]
        room_prefix: Option<String>,
        /// Publishers of a room take turns to talk, SECS each (their RFC 6464 audio
        /// level says voice in their turn): exercises the SFU's active speaker.
        #[arg(long, value_name = "SECS")]
        talk: Option<f64>,
        /// Fail (exit 1) if any subscriber lost more than PCT per cent of a track,
        /// counted against what its publisher sent from the subscriber's first packet
        /// to the publisher's last.
        #[arg(long, value_name = "PCT", default_value_t = 2.0)]
        max_loss: f64,
        /// Fail (exit 1) if any subscriber went more than SECS without a packet of a
        /// track: from its join to the first, between two, or from its last to the
        /// publisher's last.
        #[arg(long, value_name = "SECS", default_value_t = 2.0)]
        max_gap: f64,
        /// Machine-readable report on stdout (progress stays on stderr).
        #[arg(long)]
        json: bool,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Fan-out: list, add or remove the copies (subscribers) of a stream.
    Subs {
        #[command(subcommand)]
        cmd: SubsCmd,
    },
    /// Counters by verdict (forwarded, passed, dropped by reason) with rates.
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Seconds between the two samples rates are computed from (0: no rates).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Show verdicts with zero packets too.
        #[arg(long)]
        all: bool,
    },
    /// Ask the XDP program what it would do with a packet (BPF_PROG_TEST_RUN against
    /// the live routes; nothing is sent and the live counters are not touched).
    Simulate {
        /// Ethernet frame as hex.
        #[arg(long, conflicts_with = "pcap", required_unless_present = "pcap")]
        packet: Option<String>,
        /// pcap file of Ethernet frames.
        #[arg(long)]
        pcap: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum RoutesCmd {
    /// Routes with their per-route packet and byte counters.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add a route (the listener is created if missing). A route with the same
    /// listen, source and SSRC is refused unless --replace is given.
    Add {
        #[command(flatten)]
        copy: CopyArgs,
        /// Overwrite the copy to the same --out-dst (or the only copy) of the stream
        /// with this key (its counters are kept).
        #[arg(long)]
        replace: bool,
    },
    /// Delete the route matching (listen, source, SSRC).
    Del {
        #[command(flatten)]
        stream: StreamArgs,
    },
}

/// A stream (what arrives) and one copy of it (where it goes, rewritten how).
#[derive(clap::Args)]
pub struct CopyArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Address:port the copy is sent from.
    #[arg(long)]
    pub out_src: SocketAddr,
    /// Address:port the copy is sent to.
    #[arg(long)]
    pub out_dst: SocketAddr,
    /// SSRC written into the copy (default: unchanged).
    #[arg(long, value_parser = parse_u32)]
    pub ssrc_out: Option<u32>,
    /// Added to the sequence number (mod 2^16).
    #[arg(long, default_value_t = 0)]
    pub seq_delta: u16,
    /// Added to the timestamp (mod 2^32).
    #[arg(long, default_value_t = 0)]
    pub ts_delta: u32,
    /// Payload type remap FROM:TO.
    #[arg(long)]
    pub pt: Option<String>,
    /// Egress interface (default: from the kernel's route to --out-dst).
    #[arg(long)]
    pub egress: Option<String>,
    /// Next-hop MAC (default: from the neighbour table, resolved if needed).
    #[arg(long)]
    pub dst_mac: Option<String>,
    /// 802.1Q VLAN id the copy leaves with (default: untagged; one-copy streams only).
    #[arg(long)]
    pub vlan: Option<u16>,
}

/// Names a stream: what arrives where from whom.
#[derive(clap::Args)]
pub struct StreamArgs {
    /// Our address:port the publisher sends to.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The publisher's address:port.
    #[arg(long)]
    pub source: SocketAddr,
    /// The publisher's SSRC (decimal or 0x-hex).
    #[arg(long, value_parser = parse_u32)]
    pub ssrc: u32,
}

impl StreamArgs {
    pub fn key(&self) -> forwarder_common::routes::RouteKey {
        Route::key_of(self.listen, self.source, self.ssrc)
    }
}

impl CopyArgs {
    /// The copy as a route, resolved (egress, MACs); the stream's listener is created
    /// if missing.
    pub fn route(self, maps: &mut Maps) -> Result<Route> {
        let (pt_from, pt_to) = match self.pt {
            Some(p) => {
                let (f, t) = p
                    .split_once(':')
                    .context("--pt wants FROM:TO, e.g. 96:100")?;
                (
                    Some(f.parse().context("--pt FROM")?),
                    Some(t.parse().context("--pt TO")?),
                )
            }
            None => (None, None),
        };
        let listen = self.stream.listen;
        let rc = RouteConfig {
            listen,
            source: self.stream.source,
            ssrc: self.stream.ssrc,
            out_src: self.out_src,
            out_dst: self.out_dst,
            ssrc_out: self.ssrc_out,
            seq_delta: self.seq_delta,
            ts_delta: self.ts_delta,
            pt_from,
            pt_to,
            egress: self.egress,
            dst_mac: self.dst_mac,
            vlan: self.vlan,
        };
        if !maps.listeners()?.iter().any(|l| l.addr == listen) {
            maps.set_listener(&Listener {
                addr: listen,
                drop_unknown_source: true,
                drop_no_route: false,
                webrtc: false,
            })?;
        }
        resolve::resolve(&rc)
    }
}

#[derive(Subcommand)]
pub enum SubsCmd {
    /// Streams with their copies (subscribers, trunks) and counters.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add a copy to a stream (fan-out); creates the stream if it has none. Copies
    /// of a stream with several are replicated by the TC program, untagged.
    Add {
        #[command(flatten)]
        copy: CopyArgs,
    },
    /// Remove the copy to --out-dst from a stream; the other copies go on undisturbed.
    Del {
        #[command(flatten)]
        stream: StreamArgs,
        /// Address:port of the copy to remove.
        #[arg(long)]
        out_dst: SocketAddr,
    },
    /// Move the copy to --out-dst to another stream: its receiver's sequence numbers
    /// and timestamps continue across the move (a channel switch, a re-parented relay).
    Move {
        #[command(flatten)]
        stream: StreamArgs,
        /// Address:port of the copy to move.
        #[arg(long)]
        out_dst: SocketAddr,
        /// The target stream's publisher address:port.
        #[arg(long)]
        to_source: SocketAddr,
        /// The target stream's SSRC (decimal or 0x-hex).
        #[arg(long, value_parser = parse_u32)]
        to_ssrc: u32,
        /// The target stream's listener (default: the same as --listen).
        #[arg(long)]
        to_listen: Option<SocketAddr>,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Live nodes (node API, WHIP/WHEP URL, region, sessions, lease time left, which
    /// nodes suspect them dead), then nodes whose lease lapsed.
    Nodes {
        /// The cluster's Redis ([cluster] redis_url).
        #[arg(long, env = "EDGEFWD_REDIS", default_value = "redis://127.0.0.1:6379/")]
        redis: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rooms (or one) with their origin node, epoch, and whether the origin is alive.
    Rooms {
        room: Option<String>,
        /// The cluster's Redis ([cluster] redis_url).
        #[arg(long, env = "EDGEFWD_REDIS", default_value = "redis://127.0.0.1:6379/")]
        redis: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Where the running daemon's WebRTC API is.
#[derive(clap::Args)]
pub struct ApiArgs {
    /// The daemon's webrtc-http (or webrtc-admin) address from its ready line.
    #[arg(long, env = "EDGEFWD_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// The [webrtc] token, if the daemon has one.
    #[arg(long, env = "EDGEFWD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand)]
pub enum LinksCmd {
    /// Links with their state, demand, trunk copies and counters.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add a link (or replace the one to the same peer); the running daemon picks it
    /// up within a second.
    Add {
        /// The peer node's name ([cluster] node in its config).
        #[arg(long)]
        peer: String,
        #[arg(long, value_enum)]
        direction: LinkDirection,
        /// Up: our listener the trunk arrives at. Down: where trunk copies leave from.
        #[arg(long)]
        local: SocketAddr,
        /// Up: where the upstream's copies leave from. Down: the peer's listener.
        #[arg(long)]
        remote: SocketAddr,
        /// Up links: the upstream's node API ([cluster] api in its config).
        #[arg(long)]
        api: Option<SocketAddr>,
    },
    /// Delete the link to a peer; a down link's trunk copies stop at once.
    Del {
        #[arg(long)]
        peer: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LinkDirection {
    /// The peer feeds us.
    Up,
    /// We feed the peer.
    Down,
}

pub fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 32-bit number (decimal or 0x-hex)"))
}
