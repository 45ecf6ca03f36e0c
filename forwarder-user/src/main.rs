//! edgefwd: the daemon (`run`) and the CLI in one binary. This file parses the
//! command line (`cli::args`) and dispatches: to the daemon (`daemon::run`), or to
//! the CLI's commands (`cli::commands`, `cli::rooms`, `cli::stats`).

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use edgefwd::{
    cli::{
        args::{Cli, Cmd, Datapath, LogFormat},
        commands::{check_config, down, links_cmd, routes_cmd, subs_cmd},
        rooms, stats,
    },
    daemon::config::Config,
    daemon::run::{run_user, run_xdp},
    dataplane::maps::Maps,
    dataplane::simulate::{Simulator, pcap_frames},
    webrtc::WebrtcConfig,
};
use std::time::Duration;

/// webrtc-dtls warns about every ClientHello extension it does not know (DTLS 1.3 key
/// shares and versions from current browsers); that is expected, not news.
const LOG_DEFAULT: &str = "info,webrtc_dtls::handshake=error";

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
        Cmd::Cluster { cmd } => edgefwd::cli::cluster::run(cmd),
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
        Cmd::Drain {
            api,
            deadline,
            no_wait,
        } => rooms::drain(&api.api, api.token.as_deref(), deadline, !no_wait),
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
            subscribe_url,
            edges,
            failover,
            tcp,
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
                subscribe_url,
                edges,
                failover,
                tcp,
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
