//! Prometheus `/metrics`, built at scrape time from the per-CPU counters in the maps.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus::{Encoder as _, IntCounterVec, Opts, Registry, TextEncoder};

use crate::{datapath::userpath::UserCounters, dataplane::maps::Maps};

/// Where the counters come from.
#[derive(Clone)]
pub enum Source {
    /// The pinned maps of the XDP data plane.
    Pinned(PathBuf),
    /// The in-process counters of the userspace data path.
    User(Arc<UserCounters>),
}

/// Renders the exposition text. A fresh registry per scrape: the kernel already keeps
/// the totals, so each scrape just reports them.
pub fn render(source: &Source) -> Result<String> {
    let registry = Registry::new();
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
        let maps = Maps::open_pinned(dir)?;
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
        }
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

async fn metrics(State(source): State<Source>) -> (StatusCode, String) {
    match tokio::task::spawn_blocking(move || render(&source)).await {
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

pub async fn serve(listener: tokio::net::TcpListener, source: Source) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(source);
    log::info!(
        "serving Prometheus metrics on http://{}/metrics",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}
