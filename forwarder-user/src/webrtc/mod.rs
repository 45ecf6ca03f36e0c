//! WebRTC control plane: WHIP/WHEP signalling, ICE-lite, DTLS-SRTP keying, sessions
//! and rooms, rooms across nodes. It programs the media engines (`datapath::engines`)
//! with commands; the per-packet work (decrypt once, re-encrypt per subscriber) is
//! theirs.

pub mod cascade;
mod config;
pub mod drain;
pub mod dtls;
pub mod edges;
pub mod handover;
pub mod http;
pub mod ice;
pub mod sdp;
pub mod sfu;
pub mod tcp;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
pub use config::{Limits, MediaPath, WebrtcConfig};

/// What the XDP daemon offers the WebRTC media port: the interface its program runs
/// on and its maps (the listener, peer and XSK maps are written from here).
pub struct XdpOffer {
    pub iface: String,
    pub maps: crate::dataplane::maps::Maps,
}

/// Opens an AF_XDP socket per receive queue of the interface, registers them in the
/// XSK map and makes the media address a WebRTC listener. Any failure leaves the
/// listener out, so SRTP keeps reaching the socket.
fn open_fast(media: SocketAddr, offer: XdpOffer) -> Result<sfu::FastPathSetup> {
    let XdpOffer { iface, mut maps } = offer;
    if media.ip().is_unspecified() {
        bail!(
            "the media address {media} is a wildcard, and AF_XDP sends from one address: set \
             [webrtc] media to the address of {iface}"
        );
    }
    let ifindex = crate::dataplane::preflight::ifindex(&iface)?;
    let mac = crate::dataplane::resolve::iface_mac(&iface)?;
    let n = crate::dataplane::resolve::rx_queues(&iface)?;
    let mut queues = Vec::new();
    for q in 0..n {
        queues.push(open_queue(ifindex, q, media, mac)?);
    }
    let xsks = maps
        .xsks
        .as_mut()
        .context("the XSK map is only in the daemon's own load")?;
    for q in &queues {
        xsks.set(q.queue, q.fd(), 0)
            .with_context(|| format!("registering the AF_XDP socket of queue {}", q.queue))?;
    }
    let stale = maps.peers.clear()?;
    if stale > 0 {
        log::info!("{stale} WebRTC peer binding(s) of an earlier run removed");
    }
    maps.set_listener(&crate::dataplane::maps::Listener {
        addr: media,
        drop_unknown_source: false,
        drop_no_route: false,
        webrtc: true,
    })?;
    Ok(sfu::FastPathSetup {
        queues,
        peers: maps.peers,
        listen: media,
    })
}

/// Opens queue `q`'s AF_XDP socket. Busy is retried for a second: a daemon this one
/// took over from has just exited, and the kernel frees its sockets' queues a moment
/// after its process is gone.
fn open_queue(
    ifindex: u32,
    q: u32,
    media: SocketAddr,
    mac: [u8; 6],
) -> Result<crate::datapath::xsk::XskQueue> {
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        match crate::datapath::xsk::XskQueue::open(ifindex, q, media, mac) {
            Err(e)
                if format!("{e:#}").contains("Device or resource busy")
                    && Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// Where this daemon keeps its sessions for the next process, if it can.
fn keeper(cfg: &WebrtcConfig) -> Option<sfu::keep::Keeper> {
    if cfg.media.port() == 0 {
        log::info!(
            "[webrtc] media port 0 (any free port): sessions end with this process (a fixed \
             port lets the next process take them up)"
        );
        return None;
    }
    match sfu::keep::Keeper::open(&cfg.runtime_dir, cfg.media) {
        Ok(k) => Some(k),
        Err(e) => {
            log::warn!(
                "{e:#}: sessions end with this process (give [webrtc] runtime_dir a writable \
                 directory, a tmpfs such as /run/edgefwd)"
            );
            None
        }
    }
}

/// The public listener's caps within the open-file limit, beside the other listeners'
/// own (admin, `--metrics`, node API); event streams at most half the connections of
/// the listener that serves them (the admin one when there is one).
fn fit_http_caps(
    l: &mut Limits,
    admin: bool,
    cluster: &Option<crate::cluster::Membership>,
) -> Result<()> {
    use crate::http::server::{ADMIN_CONNECTIONS, NODE_API_CONNECTIONS, public_cap};
    let node_api = cluster.as_ref().is_some_and(|m| m.cfg.api.is_some());
    // `--metrics` may be on too: always counted.
    let others = ADMIN_CONNECTIONS.0 * (1 + admin as usize)
        + if node_api { NODE_API_CONNECTIONS.0 } else { 0 };
    let (cap, note) = public_cap(l.http_max_connections, others)?;
    if let Some(n) = note {
        log::warn!("{n}");
    }
    l.http_max_connections = cap;
    let serving = if admin { ADMIN_CONNECTIONS.0 } else { cap };
    l.http_max_streams = l.http_max_streams.min(serving / 2).max(1);
    Ok(())
}

/// Where the WebRTC sockets ended up (port 0 in the config picks a free port).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub media: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub ice_tcp: Option<SocketAddr>,
}

impl std::fmt::Display for Bound {
    /// `webrtc-http=... webrtc-media=... [webrtc-admin=...]`, as the ready line shows it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "webrtc-http={} webrtc-media={}", self.http, self.media)?;
        if let Some(a) = self.admin {
            write!(f, " webrtc-admin={a}")?;
        }
        if let Some(t) = self.ice_tcp {
            write!(f, " webrtc-ice-tcp={t}")?;
        }
        Ok(())
    }
}

/// Binds the media socket and the HTTP listeners (so errors surface at start-up and
/// clients can connect once this returns), then returns where they are bound and the
/// future that serves.
/// `metrics` is what the WebRTC listener's `/metrics` serves (the daemon's one
/// scrape); the SFU returned is for the daemon to read into that scrape.
pub async fn start(
    mut cfg: WebrtcConfig,
    xdp: Option<XdpOffer>,
    metrics: http::Metrics,
    cluster: Option<crate::cluster::Membership>,
) -> Result<(
    Bound,
    Arc<sfu::Sfu>,
    impl std::future::Future<Output = Result<()>>,
)> {
    cfg.check()?;
    // Before the port is bound: 0 there means any port, and nothing is kept.
    let keep = keeper(&cfg);
    // A daemon on this port hands its media socket and sessions over, then exits.
    let taken = match keep.as_ref().map(|k| k.dir().to_path_buf()) {
        Some(dir) => tokio::task::spawn_blocking(move || handover::take(&dir)).await??,
        None => None,
    };
    let socket = match taken {
        Some(s) => {
            let at = s.local_addr()?;
            if at != cfg.media {
                bail!(
                    "the daemon this one took over from served media on {at}, not on [webrtc] \
                     media = {}: its sessions' clients send to {at}; set media to it",
                    cfg.media
                );
            }
            s
        }
        None => std::net::UdpSocket::bind(cfg.media).with_context(|| {
            format!(
                "binding the WebRTC media port {} (in use? pick another with [webrtc] media)",
                cfg.media
            )
        })?,
    };
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "binding {what} on {addr} (in use? pick another with [webrtc] {})",
                if what == "the admin API" {
                    "admin"
                } else {
                    "http"
                }
            )
        })
    };
    let listener = bind(cfg.http, "WHIP/WHEP HTTP").await?;
    let admin_listener = match cfg.admin {
        Some(a) => Some(bind(a, "the admin API").await?),
        None => None,
    };
    let tcp_listener = match cfg.ice_tcp {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| {
            format!("binding ICE-TCP on {a} (in use? pick another with [webrtc] ice_tcp)")
        })?),
        None => None,
    };
    // The bound ports, not the configured ones: candidates announce the real port.
    cfg.media = socket.local_addr()?;
    cfg.http = listener.local_addr()?;
    if let Some(l) = &admin_listener {
        cfg.admin = Some(l.local_addr()?);
    }
    let candidates = cfg.candidates()?;
    let bound = Bound {
        http: cfg.http,
        media: cfg.media,
        admin: cfg.admin,
        ice_tcp: match &tcp_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        },
    };
    let fast = match (cfg.datapath, xdp) {
        (MediaPath::Socket, _) => Err("[webrtc] datapath = \"socket\"".to_string()),
        (MediaPath::Auto, None) => {
            Err("no XDP program on the media interface (run with --datapath xdp)".to_string())
        }
        (MediaPath::Auto, Some(x)) => open_fast(cfg.media, x).map_err(|e| format!("{e:#}")),
    };
    fit_http_caps(&mut cfg.limits, admin_listener.is_some(), &cluster)?;
    let key = cfg.state_dir.join("ice.key");
    let passwords = ice::Passwords::load_or_create(&key).unwrap_or_else(|e| {
        log::warn!(
            "{e:#}: ICE passwords are this process's own, so after a restart the old one's \
             clients wait out their consent timeout instead of rejoining at once (give \
             [webrtc] state_dir a writable directory)"
        );
        ice::Passwords::ephemeral()
    });
    let sfu = sfu::Sfu::new(
        socket,
        candidates.clone(),
        Duration::from_secs(cfg.consent_timeout),
        cfg.limits.clone(),
        fast,
        passwords,
        keep,
    )?;
    if let Some(m) = cluster {
        log::info!(
            "WebRTC rooms across nodes: node {}, {} upstream entr(y/ies){}",
            m.identity.node,
            m.cfg.upstream.len(),
            if m.cfg.redis_url.is_some() {
                ", rooms placed through the cluster's Redis"
            } else {
                ""
            }
        );
        let _ = sfu.cascade.set(cascade::Cascade::new(&m));
    }
    if let Some(l) = tcp_listener {
        let port = l.local_addr()?.port();
        let state = Arc::new(tcp::IceTcp::new(
            candidates
                .iter()
                .map(|c| SocketAddr::new(c.ip(), port))
                .collect(),
        ));
        let _ = sfu.ice_tcp.set(state.clone());
        let limits = tcp::TcpLimits::new(
            cfg.limits.ice_tcp_max_connections,
            cfg.limits.ice_tcp_max_per_source,
            Duration::from_secs(cfg.consent_timeout),
        );
        // The legs send to the media socket as bound (on a wildcard: over loopback;
        // the announced address may be a NAT's, not this host's).
        let to = match cfg.media.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), cfg.media.port())
            }
            ip if ip.is_unspecified() => {
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), cfg.media.port())
            }
            _ => cfg.media,
        };
        tokio::spawn(tcp::serve(l, to, state, limits));
    }
    let restored = sfu.restore();
    if restored.publishers + restored.subscribers + restored.refused > 0 {
        log::info!(
            "sessions of the earlier process taken up: {} publisher(s), {} subscriber(s) (saved \
             up to {} ms ago), {} refused",
            restored.publishers,
            restored.subscribers,
            restored.oldest_ms,
            restored.refused
        );
    }
    if let Some(k) = &sfu.keep {
        handover::serve(sfu.clone(), k.dir().to_path_buf())?;
        let sfu = sfu.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(sfu::keep::TICK).await;
                let s = sfu.clone();
                let _ = tokio::task::spawn_blocking(move || s.keep_tick()).await;
            }
        });
    }
    let workers = sfu.engines.start_workers()?;
    log::info!("WebRTC media path: {} ({})", sfu.path.path, sfu.path.detail);
    log::info!(
        "WebRTC: WHIP/WHEP on http://{}/ , media on udp {} (candidates {:?}){}",
        cfg.http,
        cfg.media,
        candidates,
        cfg.admin
            .map(|a| format!(", admin API on http://{a}/"))
            .unwrap_or_default()
    );
    if sfu.cascade.get().is_some_and(|c| c.redis_configured) {
        tokio::spawn(cascade::probe::run(sfu.clone()));
    }
    // Viewers taken up in rooms whose publishers came over a cascade trunk (not kept):
    // the room is asked of its upstream again, and its tracks fill their m-lines.
    if sfu.cascade.get().is_some() && restored.subscribers > 0 {
        for room in sfu.rooms_without_publishers() {
            let sfu = sfu.clone();
            // Until it has one: right after the start the cluster's Redis may not
            // answer yet (the second's tick asks again after that).
            tokio::spawn(async move {
                for _ in 0..40 {
                    if let Err(e) = sfu.ensure_upstream(&room, vec![]).await {
                        log::warn!("room {room} of taken-up viewers: {e}; asking again");
                    }
                    if !sfu.rooms_without_publishers().contains(&room) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            });
        }
    }
    if sfu.cascade.get().is_some() {
        tokio::spawn(cascade::probe::watch_parents(sfu.clone()));
    }
    // SIGUSR1 drains, as `edgefwd drain` (POST /api/drain) does.
    {
        let sfu = sfu.clone();
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .context("listening for SIGUSR1 (drain)")?;
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                sfu.start_drain(drain::DEFAULT_DEADLINE);
            }
        });
    }
    Ok((bound, sfu.clone(), async move {
        let ticker = {
            let sfu = sfu.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    sfu.tick();
                    sfu.cascade_tick();
                }
            })
        };
        // The socket path's engine timers (transport feedback is due every 100 ms;
        // AF_XDP workers run their engines' own) and the active speakers, on a task of
        // their own: due every few ms, they never wait on the second's tick above.
        let engine_timer = {
            let sfu = sfu.clone();
            tokio::spawn(async move {
                loop {
                    let next = sfu.engine_tick();
                    // At most a second apart: a new session's timers may be earlier.
                    let wait = next
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(5), Duration::from_secs(1));
                    tokio::time::sleep(wait).await;
                }
            })
        };
        let media = tokio::spawn(sfu.clone().run_socket());
        let l = &cfg.limits;
        let api = Arc::new(http::Api {
            sfu,
            token: cfg.token.clone(),
            metrics,
            streams: Arc::new(tokio::sync::Semaphore::new(l.http_max_streams)),
            stream_lifetime: Duration::from_secs(l.http_stream_lifetime),
        });
        let header_timeout = Duration::from_secs(l.http_header_timeout);
        let body_timeout = Duration::from_secs(l.http_body_timeout);
        let limits = Arc::new(
            crate::http::server::ConnLimits::with(
                l.http_max_connections,
                l.http_max_connections_per_source,
                header_timeout,
            )
            .request_timeout(body_timeout),
        );
        // The admin listener's own budget: it answers whatever the public one suffers.
        let (admin_max, admin_per_source) = crate::http::server::ADMIN_CONNECTIONS;
        let admin_limits = Arc::new(
            crate::http::server::ConnLimits::with(admin_max, admin_per_source, header_timeout)
                .request_timeout(body_timeout),
        );
        let public = http::router(api.clone(), admin_listener.is_none());
        let admin = async {
            match admin_listener {
                Some(l) => {
                    crate::http::server::serve(l, http::admin_router(api.clone()), admin_limits)
                        .await
                }
                None => std::future::pending().await,
            }
        };
        let drained = api.sfu.clone();
        let res = tokio::select! {
            _ = drained.drained.notified() => Ok(()),
            r = crate::http::server::serve(listener, public, limits.clone()) => r.context("WHIP/WHEP HTTP server"),
            r = admin => r.context("admin HTTP server"),
            r = media => r.context("media task")?.context("media socket"),
        };
        ticker.abort();
        engine_timer.abort();
        api.sfu.engines.stop_workers();
        for w in workers {
            let _ = w.join();
        }
        res
    }))
}
