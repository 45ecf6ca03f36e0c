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

/// The node's load now (its sessions), for its lease.
pub type Load = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Runs for the daemon's life: `api` is the bound node API, `http` the WHIP/WHEP URL
/// clients reach this node at (if it serves WebRTC).
pub async fn run(m: Membership, url: String, api: SocketAddr, http: Option<String>, load: Load) {
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
        let lease = Lease {
            node: me.clone(),
            api,
            http: http.clone(),
            region: m.cfg.region.clone(),
            sessions: load(),
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
