//! edgefwd: daemon (`run`) and CLI (`routes`, `stats`, `simulate`) in one binary.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use edgefwd::{
    cli::{rooms, stats},
    daemon::config::{Config, RouteConfig},
    daemon::metrics,
    datapath::userpath,
    dataplane::loader::{self, Counters},
    dataplane::maps::{Listener, Maps, Route},
    dataplane::resolve,
    dataplane::simulate::{Simulator, pcap_frames},
    webrtc::WebrtcConfig,
};
use forwarder_common::{DEFAULT_PIN_DIR, PROG_FORWARD};

#[derive(Parser)]
#[command(
    name = "edgefwd",
    version,
    about = "eBPF/XDP-accelerated WebRTC SFU edge forwarder"
)]
struct Cli {
    /// bpffs directory where the daemon pins its maps and the CLI finds them.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "EDGEFWD_PIN_DIR")]
    pin_dir: PathBuf,
    /// Log lines on stderr: human, or one JSON object per line (for log shippers).
    /// Verbosity from RUST_LOG (default info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "EDGEFWD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// tracing for our events; `log` records of dependencies (aya-log, webrtc-rs) go
/// through the same subscriber.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(LOG_DEFAULT));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, not in the journal or a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => b.try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Datapath {
    /// XDP in the kernel (native mode, generic as fallback).
    Xdp,
    /// recvmmsg/sendmmsg on UDP sockets.
    User,
}

#[derive(Subcommand)]
enum Cmd {
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
        webrtc_datapath: Option<edgefwd::webrtc::MediaPath>,
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
enum RoutesCmd {
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
struct CopyArgs {
    #[command(flatten)]
    stream: StreamArgs,
    /// Address:port the copy is sent from.
    #[arg(long)]
    out_src: SocketAddr,
    /// Address:port the copy is sent to.
    #[arg(long)]
    out_dst: SocketAddr,
    /// SSRC written into the copy (default: unchanged).
    #[arg(long, value_parser = parse_u32)]
    ssrc_out: Option<u32>,
    /// Added to the sequence number (mod 2^16).
    #[arg(long, default_value_t = 0)]
    seq_delta: u16,
    /// Added to the timestamp (mod 2^32).
    #[arg(long, default_value_t = 0)]
    ts_delta: u32,
    /// Payload type remap FROM:TO.
    #[arg(long)]
    pt: Option<String>,
    /// Egress interface (default: from the kernel's route to --out-dst).
    #[arg(long)]
    egress: Option<String>,
    /// Next-hop MAC (default: from the neighbour table, resolved if needed).
    #[arg(long)]
    dst_mac: Option<String>,
    /// 802.1Q VLAN id the copy leaves with (default: untagged; one-copy streams only).
    #[arg(long)]
    vlan: Option<u16>,
}

/// Names a stream: what arrives where from whom.
#[derive(clap::Args)]
struct StreamArgs {
    /// Our address:port the publisher sends to.
    #[arg(long)]
    listen: SocketAddr,
    /// The publisher's address:port.
    #[arg(long)]
    source: SocketAddr,
    /// The publisher's SSRC (decimal or 0x-hex).
    #[arg(long, value_parser = parse_u32)]
    ssrc: u32,
}

impl StreamArgs {
    fn key(&self) -> forwarder_common::routes::RouteKey {
        Route::key_of(self.listen, self.source, self.ssrc)
    }
}

impl CopyArgs {
    /// The copy as a route, resolved (egress, MACs); the stream's listener is created
    /// if missing.
    fn route(self, maps: &mut Maps) -> Result<Route> {
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
enum SubsCmd {
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

/// Where the running daemon's WebRTC API is.
#[derive(clap::Args)]
struct ApiArgs {
    /// The daemon's webrtc-http (or webrtc-admin) address from its ready line.
    #[arg(long, env = "EDGEFWD_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// The [webrtc] token, if the daemon has one.
    #[arg(long, env = "EDGEFWD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum LinksCmd {
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
enum LinkDirection {
    /// The peer feeds us.
    Up,
    /// We feed the peer.
    Down,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a 32-bit number (decimal or 0x-hex)"))
}

/// webrtc-dtls warns about every ClientHello extension it does not know (DTLS 1.3 key
/// shares and versions from current browsers); that is expected, not news.
const LOG_DEFAULT: &str = "info,webrtc_dtls::handshake=error";

/// Serves the data plane's /metrics in the background, if asked to.
/// Binds the metrics listener now (a bad address fails the start) and serves it in
/// the background; returns the bound address for the ready line.
async fn spawn_metrics(
    addr: Option<SocketAddr>,
    source: metrics::Scrape,
) -> Result<Option<SocketAddr>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = metrics::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, source).await {
            log::error!("metrics server: {e:#}");
        }
    });
    Ok(Some(bound))
}

type WebrtcServer = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// Binds the WebRTC sockets now, before the daemon says it is ready.
async fn start_webrtc(
    cfg: Option<WebrtcConfig>,
    xdp: Option<edgefwd::webrtc::XdpOffer>,
    scrape: metrics::Scrape,
) -> Result<(Option<edgefwd::webrtc::Bound>, Option<WebrtcServer>)> {
    match cfg {
        Some(w) => {
            // The WebRTC listener's /metrics serves the daemon's one scrape, which
            // reads the SFU once it has started.
            let served = scrape.clone();
            let render: edgefwd::webrtc::http::Metrics =
                std::sync::Arc::new(move || Box::pin(metrics::scrape(served.clone())));
            let (bound, sfu, serve) = edgefwd::webrtc::start(w, xdp, render).await?;
            let _ = scrape.sfu.set(sfu);
            Ok((Some(bound), Some(Box::pin(serve))))
        }
        None => Ok((None, None)),
    }
}

/// An XDP daemon killed without `edgefwd down` leaves its program attached (the link
/// is pinned) and its WebRTC listener in the maps: XDP would go on steering this
/// socket-path daemon's media to AF_XDP sockets that are gone, and a new call would
/// get nothing. Our socket bound `media`, so no live daemon serves it: the listener
/// entry is removed and the kernel passes the media to us.
fn forget_stale_steering(pin_dir: &std::path::Path, media: SocketAddr) -> Result<()> {
    let attached = loader::pinned_links(pin_dir);
    if attached.is_empty() {
        return Ok(());
    }
    let ifaces: Vec<&str> = attached.iter().map(|(i, _)| i.as_str()).collect();
    let mut maps = Maps::open_pinned(pin_dir).with_context(|| {
        format!(
            "an XDP program pinned in {} is still attached to {ifaces:?} and may steer what              this daemon serves, but its maps cannot be read: run `edgefwd --pin-dir {} down`              first",
            pin_dir.display(),
            pin_dir.display()
        )
    })?;
    for l in maps.forget_webrtc_listener(media)? {
        log::warn!(
            "removed the XDP steering of {} left attached to {ifaces:?} by a daemon that did              not stop cleanly (its link is pinned in {}); `edgefwd --pin-dir {} down`              detaches the program",
            l.addr,
            pin_dir.display(),
            pin_dir.display()
        );
    }
    Ok(())
}

/// What the ready line adds after "forwarding on ...": every address the daemon
/// listens on, as bound (so a config with port 0 tells its callers where to go).
fn ready_addresses(metrics: Option<SocketAddr>, webrtc: Option<edgefwd::webrtc::Bound>) -> String {
    let mut s = String::new();
    if let Some(m) = metrics {
        s.push_str(&format!(" metrics={m}"));
    }
    if let Some(w) = webrtc {
        s.push_str(&format!(" {w}"));
    }
    s
}

fn main() {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    if let Err(e) = real_main(cli) {
        eprintln!("edgefwd: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            iface,
            config,
            datapath,
            metrics,
            duration,
            webrtc_http,
            webrtc_media,
            webrtc_datapath,
        } => {
            let mut cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            if let (Some(http), Some(media)) = (webrtc_http, webrtc_media) {
                let w = cfg
                    .webrtc
                    .get_or_insert_with(|| WebrtcConfig::on(http, media));
                (w.http, w.media) = (http, media);
            }
            if let (Some(w), Some(p)) = (cfg.webrtc.as_mut(), webrtc_datapath) {
                w.datapath = p;
            }
            if let Some(w) = &cfg.webrtc {
                // Fail before loading anything on settings that cannot work.
                w.check()?;
            }
            match edgefwd::dataplane::preflight::raise_fd_limit() {
                Ok((a, b)) if a != b => log::info!("open-file limit raised from {a} to {b}"),
                Ok(_) => {}
                Err(e) => log::warn!("{e:#}"),
            }
            let rt = tokio::runtime::Runtime::new()?;
            match datapath {
                Datapath::Xdp => {
                    let iface = iface.context("--iface is required with --datapath xdp")?;
                    rt.block_on(run_xdp(cli.pin_dir, iface, cfg, metrics, duration))
                }
                Datapath::User => rt.block_on(run_user(cfg, &cli.pin_dir, metrics, duration)),
            }
        }
        Cmd::Routes { cmd } => routes_cmd(&cli.pin_dir, cmd),
        Cmd::Subs { cmd } => subs_cmd(&cli.pin_dir, cmd),
        Cmd::CheckConfig { files } => check_config(&files),
        Cmd::Links { cmd } => links_cmd(&cli.pin_dir, cmd),
        Cmd::Rooms { api, json } => {
            let v = rooms::fetch(&api.api, api.token.as_deref())?;
            let rows = rooms::room_rows(&v)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                rooms::print_rooms(&rows);
            }
            Ok(())
        }
        Cmd::Sessions { room, api, json } => {
            let v = rooms::fetch(&api.api, api.token.as_deref())?;
            let rows = rooms::session_rows(&v, room.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                rooms::print_sessions(&rows);
            }
            Ok(())
        }
        Cmd::LoadTest {
            url,
            token,
            rooms,
            publishers,
            subscribers,
            video_bitrate,
            duration,
            concurrency,
            join_timeout,
            room_prefix,
            talk,
            max_loss,
            max_gap,
            json,
            quiet,
        } => {
            let secs = |name: &str, v: f64| {
                Duration::try_from_secs_f64(v)
                    .map_err(|_| anyhow::anyhow!("--{name} {v}: give a number of seconds ≥ 0"))
            };
            let opts = edgefwd::loadtest::Options {
                url,
                token,
                rooms,
                publishers,
                subscribers,
                video_kbps: video_bitrate,
                duration: secs("duration", duration)?,
                concurrency,
                join_timeout: secs("join-timeout", join_timeout)?,
                room_prefix: room_prefix
                    .unwrap_or_else(|| format!("load-{:04x}", rand::random::<u16>())),
                progress: !quiet,
                talk: talk.map(|t| secs("talk", t)).transpose()?,
                max_loss_pct: max_loss,
                max_gap: secs("max-gap", max_gap)?,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(edgefwd::loadtest::run(opts))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            if report.failed > 0 {
                bail!(
                    "{} of {} client(s) failed (reasons above)",
                    report.failed,
                    report.clients
                );
            }
            if !report.over_limits.is_empty() {
                bail!(
                    "{} subscriber track(s) over --max-loss {} % or --max-gap {} s (listed above); \
                     raise the limits if that is expected",
                    report.over_limits.len(),
                    max_loss,
                    max_gap
                );
            }
            Ok(())
        }
        Cmd::Down { iface, keep_maps } => down(&cli.pin_dir, iface.as_deref(), keep_maps),
        Cmd::Stats {
            json,
            interval,
            all,
        } => {
            let maps = Maps::open_pinned(&cli.pin_dir)?;
            let rows = stats::verdict_rows(&maps, Duration::from_secs_f64(interval.max(0.0)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                stats::print_verdicts(&rows, all);
            }
            Ok(())
        }
        Cmd::Simulate { packet, pcap, json } => {
            let frames = match (packet, pcap) {
                (Some(h), _) => {
                    let clean: String = h
                        .chars()
                        .filter(|c| !c.is_whitespace() && *c != ':')
                        .collect();
                    vec![hex::decode(&clean).context("--packet is not hex")?]
                }
                (None, Some(p)) => pcap_frames(&p)?,
                (None, None) => bail!("give --packet HEX or --pcap FILE"),
            };
            let mut sim = Simulator::new(&cli.pin_dir)?;
            let mut all = Vec::new();
            for (i, f) in frames.iter().enumerate() {
                let o = sim.run(f)?;
                if !json {
                    println!("#{} {} ({})", i + 1, o.action, o.verdict.unwrap_or("?"));
                    if o.action == "XDP_TX" || o.action == "XDP_REDIRECT" {
                        println!("{}", o.decoded);
                        println!("out {}", hex::encode(&o.output));
                    }
                }
                all.push(o);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            }
            Ok(())
        }
    }
}

fn down(pin_dir: &std::path::Path, iface: Option<&str>, keep_maps: bool) -> Result<()> {
    edgefwd::dataplane::preflight::require_root()?;
    let links: Vec<_> = loader::pinned_links(pin_dir)
        .into_iter()
        .filter(|(i, _)| iface.is_none_or(|want| want == i))
        .collect();
    if links.is_empty() && iface.is_some() {
        bail!(
            "no pinned XDP link for {} in {} (see `ls {}`)",
            iface.unwrap_or_default(),
            pin_dir.display(),
            pin_dir.display()
        );
    }
    for (i, _) in &links {
        loader::unpin_link(pin_dir, i)?;
        println!("XDP detached from {i} (and the TC replicator)");
    }
    if !keep_maps && loader::pinned_links(pin_dir).is_empty() {
        let mut n = 0;
        for e in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("EFWD_") {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
                n += 1;
            }
        }
        let _ = std::fs::remove_dir(pin_dir);
        println!("{n} pinned map(s) removed from {}", pin_dir.display());
    }
    Ok(())
}

fn routes_cmd(pin_dir: &std::path::Path, cmd: RoutesCmd) -> Result<()> {
    let mut maps = Maps::open_pinned(pin_dir)?;
    match cmd {
        RoutesCmd::List { json } => {
            let rows = stats::route_rows(maps.routes()?);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                stats::print_routes(&rows);
            }
        }
        RoutesCmd::Add { copy, replace } => {
            let route = copy.route(&mut maps)?;
            if replace {
                maps.put_route(&route)?;
            } else {
                maps.add_route(&route)?;
            }
            println!(
                "route {:#010x} from {} on {} -> {} {}",
                route.ssrc,
                route.source,
                route.listen,
                route.out_dst,
                if replace { "set" } else { "added" }
            );
        }
        RoutesCmd::Del { stream: s } => {
            if !maps.del_route(&s.key())? {
                bail!(
                    "no route for SSRC {:#010x} from {} on {} (see `edgefwd routes list`)",
                    s.ssrc,
                    s.source,
                    s.listen
                );
            }
            println!(
                "route {:#010x} from {} on {} deleted",
                s.ssrc, s.source, s.listen
            );
        }
    }
    Ok(())
}

/// What `run` would refuse, found without loading anything: the same parser and the
/// same route and stream checks as the map writer. Interfaces and next hops are
/// resolved only by `run`, on the host that runs it.
fn check_config(files: &[PathBuf]) -> Result<()> {
    let mut nodes = Vec::new();
    for file in files {
        let cfg = Config::load(file)?;
        let ctx = || format!("in config {}", file.display());
        if let Some(w) = &cfg.webrtc {
            w.check().with_context(ctx)?;
        }
        if let Some(c) = &cfg.cluster {
            edgefwd::cluster::agent::secret(c).with_context(ctx)?;
            nodes.push((c.node.clone(), cfg.links.clone()));
        }
        let routes: Vec<Route> = cfg.routes.iter().map(resolve::unresolved).collect();
        let streams = edgefwd::dataplane::maps::group_streams(&routes);
        for (_, s) in &streams {
            edgefwd::dataplane::maps::check_stream(s).with_context(ctx)?;
        }
        let fanout = streams.iter().filter(|(_, s)| s.len() > 1).count();
        println!(
            "{}: OK: {} listener(s), {} stream(s) with {} cop{} ({fanout} fanned out in the kernel), {} link(s), webrtc {}",
            file.display(),
            cfg.listeners.len(),
            streams.len(),
            cfg.routes.len(),
            if cfg.routes.len() == 1 { "y" } else { "ies" },
            cfg.links.len(),
            if cfg.webrtc.is_some() { "on" } else { "off" }
        );
    }
    if files.len() > 1 {
        edgefwd::cluster::check_topology(&nodes).context("the configs together")?;
        println!(
            "cascade OK: {} node(s), {} link(s) between them, a tree",
            nodes.len(),
            nodes.iter().map(|(_, l)| l.len()).sum::<usize>() / 2
        );
    }
    Ok(())
}

fn links_cmd(pin_dir: &std::path::Path, cmd: LinksCmd) -> Result<()> {
    let mut maps = Maps::open_pinned(pin_dir)?;
    match cmd {
        LinksCmd::List { json } => {
            let rows = edgefwd::cluster::status::link_rows(&maps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                stats::print_links(&rows);
            }
        }
        LinksCmd::Add {
            peer,
            direction,
            local,
            remote,
            api,
        } => {
            let l = edgefwd::cluster::Link {
                peer,
                direction: match direction {
                    LinkDirection::Up => edgefwd::cluster::Direction::Up,
                    LinkDirection::Down => edgefwd::cluster::Direction::Down,
                },
                local,
                remote,
                api,
            };
            // The node's own name is the daemon's; the CLI checks everything else:
            // with this one in place of any to the same peer, still a tree.
            let mut all: Vec<_> = maps
                .links()?
                .into_iter()
                .filter(|o| o.peer != l.peer)
                .collect();
            all.push(l.clone());
            edgefwd::cluster::check_links("", &all)?;
            maps.put_link(&l)?;
            println!("link to {} ({:?}) set", l.peer, l.direction);
        }
        LinksCmd::Del { peer } => {
            if !maps.del_link(&peer)? {
                bail!("there is no link to {peer} (see `edgefwd links list`)");
            }
            println!("link to {peer} deleted");
        }
    }
    Ok(())
}

fn subs_cmd(pin_dir: &std::path::Path, cmd: SubsCmd) -> Result<()> {
    let mut maps = Maps::open_pinned(pin_dir)?;
    match cmd {
        SubsCmd::List { json } => {
            let rows = stats::stream_rows(maps.streams()?);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                stats::print_streams(&rows);
            }
        }
        SubsCmd::Add { copy } => {
            let route = copy.route(&mut maps)?;
            maps.add_copy(&route)?;
            let n = maps.copies_of(&route.key())?.len();
            println!(
                "copy of {:#010x} from {} on {} -> {} added ({n} cop{})",
                route.ssrc,
                route.source,
                route.listen,
                route.out_dst,
                if n == 1 { "y" } else { "ies" }
            );
        }
        SubsCmd::Del { stream: s, out_dst } => {
            if !maps.del_copy(&s.key(), out_dst)? {
                bail!(
                    "the stream of SSRC {:#010x} from {} on {} has no copy to {out_dst} (see \
                     `edgefwd subs list`)",
                    s.ssrc,
                    s.source,
                    s.listen
                );
            }
            println!(
                "copy of {:#010x} from {} on {} -> {out_dst} removed",
                s.ssrc, s.source, s.listen
            );
        }
        SubsCmd::Move {
            stream: s,
            out_dst,
            to_source,
            to_ssrc,
            to_listen,
        } => {
            let to = Route::key_of(to_listen.unwrap_or(s.listen), to_source, to_ssrc);
            let m = maps.move_copy(&s.key(), out_dst, &to)?;
            let r = &m.route;
            match m.continued_from {
                Some((seq, ts)) => println!(
                    "copy -> {out_dst} moved to {:#010x} from {} on {}: continues after seq {seq}, \
                     ts {ts} (seq delta {}, ts delta {})",
                    r.ssrc, r.source, r.listen, r.seq_delta, r.ts_delta
                ),
                None => println!(
                    "copy -> {out_dst} moved to {:#010x} from {} on {}, offsets kept (no packet \
                     on one of the streams yet to continue from)",
                    r.ssrc, r.source, r.listen
                ),
            }
        }
    }
    Ok(())
}

/// Waits for a stop signal, the --duration, or the WebRTC control plane failing.
async fn shutdown_signal(duration: Option<u64>, webrtc: Option<WebrtcServer>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let web = async {
        match webrtc {
            Some(w) => w.await,
            None => std::future::pending().await,
        }
    };
    let mut term = signal(SignalKind::terminate())?;
    let sleep = async {
        match duration {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT: shutting down"),
        _ = term.recv() => log::info!("SIGTERM: shutting down"),
        _ = sleep => log::info!("--duration elapsed: shutting down"),
        r = web => return r,
    }
    Ok(())
}

async fn run_xdp(
    pin_dir: PathBuf,
    iface: String,
    cfg: Config,
    metrics_addr: Option<SocketAddr>,
    duration: Option<u64>,
) -> Result<()> {
    let cfg_webrtc = cfg.webrtc.clone();
    let mut ebpf = loader::load(&pin_dir, Counters::Pinned)?;
    match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring-buffer fd for as long as it lives, and the
            // AsyncFd owns the logger, so the fd stays open and the same throughout.
            let mut fd = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| anyhow::anyhow!("watching the eBPF log ring buffer: {e}"))?;
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        break;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => log::warn!("eBPF logs unavailable: {e}"),
    }
    // The maps first: an adopted link keeps forwarding with the old program until the
    // new one replaces it, and both read the same pinned maps.
    let mut maps = Maps::from_ebpf(&mut ebpf)?;
    let listeners: Vec<Listener> = cfg
        .listeners
        .iter()
        .map(|l| Listener {
            addr: l.addr,
            drop_unknown_source: l.drop_unknown_source,
            drop_no_route: l.drop_no_route,
            webrtc: false,
        })
        .collect();
    let mut routes = Vec::new();
    for rc in &cfg.routes {
        let route =
            resolve::resolve(rc).with_context(|| format!("route for SSRC {:#010x}", rc.ssrc))?;
        log::info!(
            "route {:#010x} {} on {} -> {} via ifindex {}",
            rc.ssrc,
            rc.source,
            rc.listen,
            rc.out_dst,
            route.egress_ifindex
        );
        routes.push(route);
    }
    // Trunk copies of configured down links are the link manager's, not the config's.
    let down: Vec<(SocketAddr, SocketAddr)> = cfg
        .links
        .iter()
        .filter(|l| l.direction == edgefwd::cluster::Direction::Down)
        .map(|l| (l.local, l.remote))
        .collect();
    let r = maps.reconcile_keeping(&listeners, &routes, |r| {
        down.contains(&(r.out_src, r.out_dst))
    })?;
    let node = cfg.cluster.as_ref().map(|c| c.node.as_str()).unwrap_or("");
    edgefwd::cluster::check_links(node, &cfg.links)?;
    maps.reconcile_links(&cfg.links)?;
    maps.set_interface_mac(
        edgefwd::dataplane::preflight::ifindex(&iface)?,
        resolve::iface_mac(&iface)?,
    )?;
    log::info!(
        "maps reconciled with the config: {} route(s) added, {} kept or updated (counters kept), {} removed; {} listener(s) removed",
        r.added,
        r.kept,
        r.removed,
        r.listeners_removed
    );
    let attached = loader::attach_pinned(&mut ebpf, PROG_FORWARD, &iface, &pin_dir)?;
    // Only now: until the link runs this program, the old one may still read them.
    for p in loader::remove_stale_pins(&pin_dir, &[iface.as_str()])? {
        log::info!(
            "removed {}: a map of an older layout, no longer used",
            p.display()
        );
    }
    log::info!(
        "{attached} on {iface}; link and maps pinned in {} (forwarding goes on if this process ends; `edgefwd down` removes it)",
        pin_dir.display()
    );
    let scrape = metrics::Scrape::new(metrics::Source::Pinned(pin_dir.clone()));
    let metrics_bound = spawn_metrics(metrics_addr, scrape.clone()).await?;
    let node_api = match &cfg.cluster {
        Some(c) => {
            let offered = cfg
                .streams
                .iter()
                .map(|s| (s.listen, s.source, s.ssrc))
                .collect();
            edgefwd::cluster::agent::start(pin_dir.clone(), c, offered)
                .await?
                .api
        }
        None => None,
    };
    let offer = edgefwd::webrtc::XdpOffer {
        iface: iface.clone(),
        maps,
    };
    let (webrtc_bound, cfg_webrtc) = start_webrtc(cfg_webrtc, Some(offer), scrape).await?;
    println!(
        "edgefwd: forwarding on {iface} ({attached}){}{}",
        ready_addresses(metrics_bound, webrtc_bound),
        node_api
            .map(|a| format!(" node-api={a}"))
            .unwrap_or_default()
    );
    shutdown_signal(duration, cfg_webrtc).await?;
    // The pinned link keeps XDP attached with the routes in the pinned maps: the next
    // daemon takes over without a gap (`edgefwd down` detaches).
    drop(ebpf);
    Ok(())
}

async fn run_user(
    cfg: Config,
    pin_dir: &std::path::Path,
    metrics_addr: Option<SocketAddr>,
    duration: Option<u64>,
) -> Result<()> {
    if !cfg.links.is_empty() || cfg.cluster.is_some() {
        bail!(
            "[cluster] and [[link]] need --datapath xdp: trunk copies are written into the \
             kernel's maps, which the socket path does not read"
        );
    }
    let cfg_webrtc = cfg.webrtc.clone();
    // No resolution: L2 and the egress interface are the kernel's job on this path.
    let routes: Vec<Route> = cfg.routes.iter().map(resolve::unresolved).collect();
    let listeners: Vec<Listener> = cfg
        .listeners
        .iter()
        .map(|l| Listener {
            addr: l.addr,
            drop_unknown_source: l.drop_unknown_source,
            drop_no_route: l.drop_no_route,
            webrtc: false,
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(userpath::UserCounters::default());
    if listeners.is_empty() && cfg_webrtc.is_none() {
        bail!(
            "nothing to serve: add a [[listener]] or a [webrtc] section to the config (or pass --webrtc-http and --webrtc-media)"
        );
    }
    let handles = userpath::run_all(&listeners, &routes, stop.clone(), counters.clone())?;
    let scrape = metrics::Scrape::new(metrics::Source::User(counters.clone()));
    let metrics_bound = spawn_metrics(metrics_addr, scrape.clone()).await?;
    let (webrtc_bound, cfg_webrtc) = start_webrtc(cfg_webrtc, None, scrape).await?;
    if let Some(w) = &webrtc_bound {
        forget_stale_steering(pin_dir, w.media)?;
    }
    println!(
        "edgefwd: forwarding on {} listener(s) (userspace datapath){}",
        listeners.len(),
        ready_addresses(metrics_bound, webrtc_bound)
    );
    shutdown_signal(duration, cfg_webrtc).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("forwarding thread panicked"))??;
    }
    let fwd: u64 = counters
        .totals()
        .iter()
        .filter(|(v, _)| v.action() == forwarder_common::verdicts::Action::Forward)
        .map(|(_, s)| s.packets)
        .sum();
    log::info!(
        "userspace datapath forwarded {fwd} packets; {} dropped by full socket queues",
        counters
            .socket_overflow
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
