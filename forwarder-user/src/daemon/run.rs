//! The daemon (`edgefwd run`): loads and attaches the data plane or starts the socket
//! relay, starts the WebRTC control plane and the cluster agent, serves /metrics, and
//! runs until a signal, `--duration`, or a part failing. Startup order: the data
//! plane first (its maps are what the others program), then the listeners, and the
//! ready line once every address is bound.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use forwarder_common::PROG_FORWARD;

use crate::{
    cluster::{
        Membership,
        api::{Links, NodeApi},
        relay::RoomRelay,
    },
    daemon::config::Config,
    daemon::metrics,
    datapath::userpath,
    dataplane::loader::{self, Counters},
    dataplane::maps::{Listener, Maps, Route},
    dataplane::resolve,
    webrtc::WebrtcConfig,
};

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

/// This node in the cluster, when `[cluster]` is set: its membership (identity made
/// once, for every part; the cluster's Redis once connected) and its links.
struct ClusterPart {
    m: Membership,
    /// The plain-RTP links' manager, on an XDP node that has links or streams.
    links: Option<Links>,
}

fn cluster_part(cfg: &Config) -> Result<Option<ClusterPart>> {
    let Some(c) = &cfg.cluster else {
        return Ok(None);
    };
    Ok(Some(ClusterPart {
        m: Membership {
            identity: Arc::new(c.identity()?),
            cfg: c.clone(),
            redis: Default::default(),
            health: Default::default(),
        },
        links: None,
    }))
}

/// Serves the node API (`[cluster] api`) once every part it serves has started:
/// links' demand, rooms' relays. Returns the bound address for the ready line.
async fn start_node_api(
    cluster: Option<ClusterPart>,
    scrape: &metrics::Scrape,
    webrtc: Option<crate::webrtc::Bound>,
) -> Result<Option<SocketAddr>> {
    let Some(c) = cluster else { return Ok(None) };
    let Some(addr) = c.m.cfg.api else {
        if c.links.is_some() {
            log::info!("[cluster] has no api: no downstream node can ask this one for anything");
        }
        return Ok(None);
    };
    let rooms = scrape
        .sfu
        .get()
        .map(|s| Arc::new(crate::webrtc::cascade::Rooms(s.clone())) as Arc<dyn RoomRelay>);
    let api = NodeApi {
        identity: c.m.identity.clone(),
        links: c.links,
        rooms,
    };
    let bound = crate::cluster::api::serve(addr, api).await?;
    if let Some(url) = &c.m.cfg.redis_url {
        let sfu = scrape.sfu.get().cloned();
        // Where clients reach our WHIP/WHEP: the bound port at the first candidate's
        // address when the listener is a wildcard.
        let http = webrtc.zip(sfu.as_ref()).map(|(w, s)| {
            let ip = match w.http.ip() {
                ip if ip.is_unspecified() => s.candidates[0].ip(),
                ip => ip,
            };
            format!("http://{}", SocketAddr::new(ip, w.http.port()))
        });
        let at = crate::cluster::lease::Addresses {
            api: bound,
            http,
            media: sfu.as_ref().map(|s| s.candidates[0]),
        };
        let load: crate::cluster::lease::Load = Arc::new(move || {
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            sfu.as_ref()
                .map_or(Default::default(), |s| crate::cluster::lease::LoadNow {
                    sessions: s.session_count() as u64,
                    viewers: s.viewer_count() as u64,
                    copies: s.counters.rtp_out.load(relaxed) + s.counters.relay_out.load(relaxed),
                    draining: s.draining(),
                    suspects: s.cascade.get().map_or(vec![], |c| c.suspected()),
                })
        });
        tokio::spawn(crate::cluster::lease::run(
            c.m.clone(),
            url.clone(),
            at,
            load,
        ));
    }
    Ok(Some(bound))
}

/// The config's plain-RTP listeners (the WebRTC one is added by the control plane).
fn plain_listeners(cfg: &Config) -> Vec<Listener> {
    cfg.listeners
        .iter()
        .map(|l| Listener {
            addr: l.addr,
            drop_unknown_source: l.drop_unknown_source,
            drop_no_route: l.drop_no_route,
            webrtc: false,
        })
        .collect()
}

/// Binds the WebRTC sockets now, before the daemon says it is ready.
async fn start_webrtc(
    cfg: Option<WebrtcConfig>,
    xdp: Option<crate::webrtc::XdpOffer>,
    scrape: metrics::Scrape,
    cluster: Option<&ClusterPart>,
) -> Result<(Option<crate::webrtc::Bound>, Option<WebrtcServer>)> {
    match cfg {
        Some(w) => {
            // The WebRTC listener's /metrics serves the daemon's one scrape, which
            // reads the SFU once it has started.
            let served = scrape.clone();
            let render: crate::webrtc::http::Metrics =
                std::sync::Arc::new(move || Box::pin(metrics::scrape(served.clone())));
            let cluster = cluster.map(|c| c.m.clone());
            let (bound, sfu, serve) = crate::webrtc::start(w, xdp, render, cluster).await?;
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
fn ready_addresses(
    metrics: Option<SocketAddr>,
    webrtc: Option<crate::webrtc::Bound>,
    node_api: Option<SocketAddr>,
) -> String {
    let mut s = String::new();
    if let Some(m) = metrics {
        s.push_str(&format!(" metrics={m}"));
    }
    if let Some(w) = webrtc {
        s.push_str(&format!(" {w}"));
    }
    if let Some(a) = node_api {
        s.push_str(&format!(" node-api={a}"));
    }
    s
}

/// A stop that is not a drain's end may be a restart: the WebRTC sessions are sealed
/// and saved for the next process, which takes them up if it starts within the
/// clients' consent timeout.
fn keep_sessions(scrape: &metrics::Scrape) {
    if let Some(sfu) = scrape.sfu.get() {
        let n = sfu.keep_on_stop();
        if n > 0 {
            log::info!(
                "{n} WebRTC session(s) saved for the next process (it takes them up if it starts \
                 within {} s)",
                sfu.consent_timeout.as_secs()
            );
        }
    }
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

pub async fn run_xdp(
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
    let listeners = plain_listeners(&cfg);
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
        .filter(|l| l.direction == crate::cluster::Direction::Down)
        .map(|l| (l.local, l.remote))
        .collect();
    let r = maps.reconcile_keeping(&listeners, &routes, |r| {
        down.contains(&(r.out_src, r.out_dst))
    })?;
    let node = cfg.cluster.as_ref().map(|c| c.node.as_str()).unwrap_or("");
    crate::cluster::check_links(node, &cfg.links)?;
    maps.reconcile_links(&cfg.links)?;
    maps.set_interface_mac(
        crate::dataplane::preflight::ifindex(&iface)?,
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
    let mut cluster = cluster_part(&cfg)?;
    if let Some(c) = cluster.as_mut() {
        let offered = cfg
            .streams
            .iter()
            .map(|s| (s.listen, s.source, s.ssrc))
            .collect();
        let manager =
            crate::cluster::agent::start(&pin_dir, &c.m.cfg, c.m.identity.clone(), offered)?;
        c.links = Some(Links {
            manager,
            pin_dir: pin_dir.clone(),
        });
    }
    let offer = crate::webrtc::XdpOffer {
        iface: iface.clone(),
        maps,
    };
    let (webrtc_bound, cfg_webrtc) =
        start_webrtc(cfg_webrtc, Some(offer), scrape.clone(), cluster.as_ref()).await?;
    // After WebRTC: a daemon it took over from held these ports until it exited.
    let metrics_bound = spawn_metrics(metrics_addr, scrape.clone()).await?;
    let node_api = start_node_api(cluster, &scrape, webrtc_bound).await?;
    println!(
        "edgefwd: forwarding on {iface} ({attached}){}",
        ready_addresses(metrics_bound, webrtc_bound, node_api),
    );
    shutdown_signal(duration, cfg_webrtc).await?;
    keep_sessions(&scrape);
    // The pinned link keeps XDP attached with the routes in the pinned maps: the next
    // daemon takes over without a gap (`edgefwd down` detaches).
    drop(ebpf);
    Ok(())
}

pub async fn run_user(
    cfg: Config,
    pin_dir: &std::path::Path,
    metrics_addr: Option<SocketAddr>,
    duration: Option<u64>,
) -> Result<()> {
    if !cfg.links.is_empty() || !cfg.streams.is_empty() {
        bail!(
            "[[link]] and [[stream]] need --datapath xdp: plain-RTP trunk copies are written \
             into the kernel's maps, which the socket path does not read (WebRTC rooms across \
             nodes, [[cluster.upstream]], work on either path)"
        );
    }
    let cluster = cluster_part(&cfg)?;
    let cfg_webrtc = cfg.webrtc.clone();
    // No resolution: L2 and the egress interface are the kernel's job on this path.
    let routes: Vec<Route> = cfg.routes.iter().map(resolve::unresolved).collect();
    let listeners = plain_listeners(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(userpath::UserCounters::default());
    if listeners.is_empty() && cfg_webrtc.is_none() {
        bail!(
            "nothing to serve: add a [[listener]] or a [webrtc] section to the config (or pass --webrtc-http and --webrtc-media)"
        );
    }
    let handles = userpath::run_all(&listeners, &routes, stop.clone(), counters.clone())?;
    let scrape = metrics::Scrape::new(metrics::Source::User(counters.clone()));
    let (webrtc_bound, cfg_webrtc) =
        start_webrtc(cfg_webrtc, None, scrape.clone(), cluster.as_ref()).await?;
    // After WebRTC: a daemon it took over from held these ports until it exited.
    let metrics_bound = spawn_metrics(metrics_addr, scrape.clone()).await?;
    let node_api = start_node_api(cluster, &scrape, webrtc_bound).await?;
    if let Some(w) = &webrtc_bound {
        forget_stale_steering(pin_dir, w.media)?;
    }
    println!(
        "edgefwd: forwarding on {} listener(s) (userspace datapath){}",
        listeners.len(),
        ready_addresses(metrics_bound, webrtc_bound, node_api)
    );
    shutdown_signal(duration, cfg_webrtc).await?;
    keep_sessions(&scrape);
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
