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

/// The node's load now, for its lease.
#[derive(Debug, Clone, Default)]
pub struct LoadNow {
    pub sessions: u64,
    /// WHEP viewers.
    pub viewers: u64,
    /// RTP copies sent since the start (viewers and trunks): a counter.
    pub copies: u64,
    /// Draining (`edgefwd drain`).
    pub draining: bool,
    /// Nodes this one suspects dead now (their probes unanswered).
    pub suspects: Vec<String>,
}

pub type Load = Arc<dyn Fn() -> LoadNow + Send + Sync>;

/// This process's CPU time (user + system), from /proc/self/stat.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

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
    let mut last = (std::time::Instant::now(), load().copies, cpu_time());
    loop {
        every.tick().await;
        let now = load();
        let (when, cpu) = (std::time::Instant::now(), cpu_time());
        let secs = when.duration_since(last.0).as_secs_f64().max(1e-3);
        let copies_per_s = (now.copies.saturating_sub(last.1) as f64 / secs) as u64;
        let cpu_pct = match (cpu, last.2) {
            (Some(c), Some(l)) => c.saturating_sub(l).as_secs_f64() / secs * 100.0,
            _ => 0.0,
        };
        last = (when, now.copies, cpu);
        let lease = Lease {
            node: me.clone(),
            api: at.api,
            http: at.http.clone(),
            region: m.cfg.region.clone(),
            sessions: now.sessions,
            media: at.media,
            viewers: now.viewers,
            capacity: m.cfg.capacity,
            copies_per_s,
            cpu_pct: (cpu_pct * 10.0).round() / 10.0,
            draining: now.draining,
            suspects: now.suspects,
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
