//! Prometheus `/metrics`: one registry per scrape holding every series the daemon
//! has — the data plane's verdicts, routes, copies and links (from the per-CPU counters
//! in the maps, or the socket path's), and the WebRTC sessions, drops and AF_XDP
//! queues. `--metrics` and the WebRTC listener's `/metrics` serve the same scrape.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus::{Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{datapath::userpath::UserCounters, dataplane::maps::Maps};

/// Where the counters come from.
#[derive(Clone)]
pub enum Source {
    /// The pinned maps of the XDP data plane.
    Pinned(PathBuf),
    /// The in-process counters of the userspace data path.
    User(Arc<UserCounters>),
}

/// What a scrape reads: the data plane, and the SFU once `[webrtc]` has started.
#[derive(Clone)]
pub struct Scrape {
    pub source: Source,
    pub sfu: Arc<OnceLock<Arc<crate::webrtc::sfu::Sfu>>>,
}

impl Scrape {
    pub fn new(source: Source) -> Scrape {
        Scrape {
            source,
            sfu: Arc::default(),
        }
    }
}

/// Renders the exposition text. A fresh registry per scrape: the kernel and the
/// engine already keep the totals, so each scrape just reports them.
pub fn render(scrape: &Scrape) -> Result<String> {
    let registry = Registry::new();
    let source = &scrape.source;
    if let Some(sfu) = scrape.sfu.get() {
        sfu.register_metrics(&registry)?;
    }
    let packets = IntCounterVec::new(
        Opts::new(
            "edgefwd_packets_total",
            "Packets seen by the data plane, by verdict",
        ),
        &["verdict", "action"],
    )?;
    let bytes = IntCounterVec::new(
        Opts::new(
            "edgefwd_bytes_total",
            "Bytes seen by the data plane, by verdict",
        ),
        &["verdict", "action"],
    )?;
    registry.register(Box::new(packets.clone()))?;
    registry.register(Box::new(bytes.clone()))?;
    let totals = match source {
        Source::Pinned(dir) => Maps::open_pinned(dir)?.verdict_totals()?,
        Source::User(c) => c.totals(),
    };
    for (v, s) in &totals {
        let action = format!("{:?}", v.action()).to_lowercase();
        packets
            .with_label_values(&[v.name(), &action])
            .inc_by(s.packets);
        bytes
            .with_label_values(&[v.name(), &action])
            .inc_by(s.bytes);
    }
    if let Source::User(c) = source {
        // Dropped by the kernel before the path saw them (no byte count: never read).
        packets
            .with_label_values(&["drop_socket_overflow", "drop"])
            .inc_by(c.socket_overflow.load(std::sync::atomic::Ordering::Relaxed));
    }
    if let Source::Pinned(dir) = source {
        let rp = IntCounterVec::new(
            Opts::new(
                "edgefwd_route_packets_total",
                "Packets forwarded per route (per copy of a fan-out stream)",
            ),
            &["listen", "source", "ssrc", "out_dst"],
        )?;
        let rb = IntCounterVec::new(
            Opts::new(
                "edgefwd_route_bytes_total",
                "Bytes forwarded per route (per copy of a fan-out stream)",
            ),
            &["listen", "source", "ssrc", "out_dst"],
        )?;
        let cp = IntCounterVec::new(
            Opts::new(
                "edgefwd_copies_total",
                "Copies the TC replicator made or failed to make, by verdict",
            ),
            &["verdict"],
        )?;
        registry.register(Box::new(cp.clone()))?;
        registry.register(Box::new(rp.clone()))?;
        registry.register(Box::new(rb.clone()))?;
        let rd = IntCounterVec::new(
            Opts::new(
                "edgefwd_route_drops_total",
                "Copies of a route the replicator could not send",
            ),
            &["listen", "source", "ssrc", "out_dst"],
        )?;
        registry.register(Box::new(rd.clone()))?;
        let maps = Maps::open_pinned(dir)?;
        link_metrics(&registry, &maps)?;
        for (v, s) in maps.copy_verdict_totals()? {
            cp.with_label_values(&[v.name()]).inc_by(s.packets);
        }
        for (r, s) in maps.routes()? {
            let labels = [
                r.listen.to_string(),
                r.source.to_string(),
                r.ssrc.to_string(),
                r.out_dst.to_string(),
            ];
            let labels = labels.each_ref().map(|l| l.as_str());
            rp.with_label_values(&labels).inc_by(s.packets);
            rb.with_label_values(&labels).inc_by(s.bytes);
            rd.with_label_values(&labels).inc_by(s.drops);
        }
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// The cascade links: state, demand and traffic per link.
fn link_metrics(registry: &Registry, maps: &Maps) -> Result<()> {
    let labels = &["peer", "direction"];
    let gauge = |name: &str, help: &str| -> Result<IntGaugeVec> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let counter = |name: &str, help: &str| -> Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let up = gauge(
        "edgefwd_link_up",
        "1 if the link's peer is in contact (up: took our demand; down: its demand is fresh)",
    )?;
    let demand = gauge("edgefwd_link_demand_ssrcs", "SSRCs demanded on the link")?;
    let copies = gauge(
        "edgefwd_link_trunk_copies",
        "Trunk copies the link has in the maps",
    )?;
    let packets = counter(
        "edgefwd_link_packets_total",
        "Packets on the link (down: sent, up: received)",
    )?;
    let bytes = counter(
        "edgefwd_link_bytes_total",
        "Bytes on the link (down: sent, up: received)",
    )?;
    let drops = counter(
        "edgefwd_link_drops_total",
        "Trunk copies the replicator could not send",
    )?;
    for r in crate::cluster::status::link_rows(maps)? {
        let dir = format!("{:?}", r.direction).to_lowercase();
        let l = [r.peer.as_str(), dir.as_str()];
        up.with_label_values(&l).set((r.state == "up") as i64);
        demand.with_label_values(&l).set(r.demand as i64);
        copies.with_label_values(&l).set(r.copies as i64);
        packets.with_label_values(&l).inc_by(r.packets);
        bytes.with_label_values(&l).inc_by(r.bytes);
        drops.with_label_values(&l).inc_by(r.drops);
    }
    Ok(())
}

/// The `/metrics` answer (blocking work off the runtime: map reads, the media lock).
pub async fn scrape(scrape: Scrape) -> (StatusCode, String) {
    match tokio::task::spawn_blocking(move || render(&scrape)).await {
        Ok(Ok(body)) => (StatusCode::OK, body),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Binds the metrics listener (port 0 picks a free one; the ready line reports it), so
/// a bad address fails the start instead of a background task.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding metrics address {addr}: is it in use? pick another with --metrics")
    })
}

pub async fn serve(listener: tokio::net::TcpListener, source: Scrape) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(|State(s): State<Scrape>| scrape(s)))
        .with_state(source);
    log::info!(
        "serving Prometheus metrics on http://{}/metrics",
        listener.local_addr()?
    );
    // Its own small budget, like the admin listener's: a scrape gets through whatever
    // the public listener suffers.
    let (max, per_source) = crate::http::server::ADMIN_CONNECTIONS;
    let limits = std::sync::Arc::new(crate::http::server::ConnLimits::with(
        max,
        per_source,
        std::time::Duration::from_secs(10),
    ));
    crate::http::server::serve(listener, app, limits).await
}
