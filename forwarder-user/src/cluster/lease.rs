//! This node's lease in the cluster's Redis: the task connects (retrying each second
//! while Redis is away, so a node starts without it), makes the connection the
//! cluster's directory for every part ([`Membership::redis`]), and renews the lease
//! once a second with the node's addresses and load. Redis going away is logged once,
//! its return once; meanwhile the node keeps serving what it knows.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{
    Membership,
    redis::{Directory, Lease},
};

/// The node's load now, for its lease: its sessions, and its WHEP viewers.
pub type Load = Arc<dyn Fn() -> (u64, u64) + Send + Sync>;

/// Where clients and other nodes reach this node.
pub struct Addresses {
    /// The bound node API.
    pub api: SocketAddr,
    /// The WHIP/WHEP URL clients reach this node at (if it serves WebRTC).
    pub http: Option<String>,
    /// Its media address as peers reach it (if it serves WebRTC).
    pub media: Option<SocketAddr>,
}

/// Runs for the daemon's life.
pub async fn run(m: Membership, url: String, at: Addresses, load: Load) {
    let me = m.identity.node.clone();
    let mut warned = false;
    let dir = loop {
        match Directory::connect(&url, &me).await {
            Ok(d) => break d,
            Err(e) => {
                if !warned {
                    log::warn!(
                        "{e:#}; node {me} serves what it is configured for and tries again every second"
                    );
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    log::info!(
        "node {me}: the cluster's Redis at {url} answers; this node's lease is renewed every second"
    );
    let _ = m.redis.set(dir.clone());
    let mut up = true;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let (sessions, viewers) = load();
        let lease = Lease {
            node: me.clone(),
            api: at.api,
            http: at.http.clone(),
            region: m.cfg.region.clone(),
            sessions,
            media: at.media,
            viewers,
            capacity: m.cfg.capacity,
        };
        let renewed = dir.renew(&lease).await;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        m.health.redis_up.store(renewed.is_ok(), relaxed);
        if renewed.is_ok()
            && let Ok(n) = dir.live_nodes().await
        {
            m.health.live_nodes.store(n.len() as u64, relaxed);
        }
        match renewed {
            Ok(()) if !up => {
                log::info!("node {me}: the cluster's Redis answers again; lease renewed");
                up = true;
            }
            Ok(()) => {}
            Err(e) if up => {
                log::warn!(
                    "{e:#}: established rooms keep flowing; new rooms are placed on this node until Redis answers"
                );
                up = false;
            }
            Err(_) => {}
        }
    }
}
