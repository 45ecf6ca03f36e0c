//! Which nodes a viewer of a room should try: `GET /v1/edges?room=R` answers with two
//! or three candidates, the client races a probe to each and takes the fastest for
//! WHEP (the page's `edges.js` does), then reports what it measured. A node at its
//! `[cluster] capacity` sends new viewers to the first candidate with room (307).
//!
//! Order: nodes already carrying the room (its origin and its tree) with room to spare
//! first, then nodes of this node's region (the viewer reached this one), then by
//! load; nodes at capacity never.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::refused;
use crate::cluster::redis::Lease;
use crate::webrtc::sfu::{ApiError, Sfu};

/// Candidates given at most.
pub const EDGES: usize = 3;

/// One candidate node for a viewer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Edge {
    pub node: String,
    pub region: String,
    /// Where to POST the WHEP offer.
    pub whep: String,
    /// Where to measure the round trip (`GET`, answered at once).
    pub probe: String,
    /// Whether the node carries the room already (origin or in its tree).
    pub carrying: bool,
    pub viewers: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
}

/// What a client measured and chose, reported back.
#[derive(Debug, Deserialize)]
pub struct Report {
    pub room: String,
    pub chosen: String,
    /// Milliseconds per node probed (a probe that failed is left out).
    #[serde(default)]
    pub rtt_ms: BTreeMap<String, f64>,
}

/// Reports received, per node: chosen how often, and the probe RTTs measured to it.
#[derive(Debug, Default, Clone)]
pub struct EdgeStat {
    pub chosen: u64,
    pub probes: u64,
    pub rtt_ms_sum: f64,
}

/// The candidates among `live` for a viewer of a room carried by `carrying`, asked at a
/// node of `region`: best first, at most `limit`.
pub fn rank_edges(
    room: &str,
    live: &[Lease],
    carrying: &[&str],
    region: &str,
    limit: usize,
) -> Vec<Edge> {
    let mut v: Vec<&Lease> = live
        .iter()
        .filter(|l| l.http.is_some() && l.has_room())
        .collect();
    let load = |l: &Lease| match l.capacity {
        Some(c) => l.viewers as f64 / c as f64,
        None => l.sessions as f64 / 1e6,
    };
    v.sort_by(|a, b| {
        let key = |l: &Lease| (!carrying.contains(&l.node.as_str()), l.region != region);
        key(a)
            .cmp(&key(b))
            .then(load(a).total_cmp(&load(b)))
            .then(a.node.cmp(&b.node))
    });
    v.into_iter()
        .take(limit)
        .map(|l| {
            let http = l.http.as_deref().expect("filtered above");
            Edge {
                node: l.node.clone(),
                region: l.region.clone(),
                whep: format!("{http}/whep/{room}"),
                probe: format!("{http}/v1/probe"),
                carrying: carrying.contains(&l.node.as_str()),
                viewers: l.viewers,
                capacity: l.capacity,
            }
        })
        .collect()
}

impl Sfu {
    /// Whether this node has its `[cluster] capacity` of viewers.
    pub fn at_capacity(&self) -> bool {
        let cap = self.cascade.get().and_then(|c| c.capacity);
        cap.is_some_and(|c| self.viewer_count() as u64 >= c)
    }

    /// The candidate nodes for a viewer of `room`, at most `limit`. Without the
    /// cluster's Redis: this node alone (if it has room).
    pub async fn edges(
        &self,
        room: &str,
        my_http: &str,
        limit: usize,
    ) -> Result<Vec<Edge>, ApiError> {
        let me_only = || {
            let mut v = Vec::new();
            if !self.at_capacity() {
                v.push(Edge {
                    node: self.cascade.get().map_or("", |c| c.node()).to_string(),
                    region: String::new(),
                    whep: format!("{my_http}/whep/{room}"),
                    probe: format!("{my_http}/v1/probe"),
                    carrying: true,
                    viewers: self.viewer_count() as u64,
                    capacity: self.cascade.get().and_then(|c| c.capacity),
                });
            }
            v
        };
        let Some(c) = self.cascade.get() else {
            return Ok(me_only());
        };
        let Some(d) = c.redis.get() else {
            return Ok(me_only());
        };
        let failed = |e: anyhow::Error| {
            refused(
                503,
                format!("{e:#}; the cluster's directory does not answer: WHEP at this node"),
            )
        };
        let live = d.live_nodes().await.map_err(failed)?;
        let mut carrying: Vec<String> = Vec::new();
        if let Some(o) = d.origin(room).await.map_err(failed)? {
            let (tree, epoch) = d.tree(room).await.map_err(failed)?;
            if epoch == o.epoch {
                carrying.extend(tree.into_keys());
            }
            carrying.push(o.node);
        }
        let carrying: Vec<&str> = carrying.iter().map(String::as_str).collect();
        let region = live
            .iter()
            .find(|l| l.node == d.me())
            .map(|l| l.region.clone())
            .unwrap_or_default();
        Ok(rank_edges(room, &live, &carrying, &region, limit))
    }

    /// A client's report of its probes and choice: logged, and counted for /metrics.
    pub fn edge_report(&self, r: Report, from: std::net::IpAddr) {
        let Some(c) = self.cascade.get() else {
            return;
        };
        let mut stats = c.edge_stats.lock().unwrap();
        // Only nodes of the cluster become labels (a client names anything).
        let known = |n: &str| crate::cluster::check_name(n).is_ok() && n.len() <= 64;
        if !known(&r.chosen) || stats.len() > 256 && !stats.contains_key(&r.chosen) {
            return;
        }
        stats.entry(r.chosen.clone()).or_default().chosen += 1;
        for (n, ms) in &r.rtt_ms {
            if known(n)
                && ms.is_finite()
                && *ms >= 0.0
                && (stats.len() <= 256 || stats.contains_key(n))
            {
                let s = stats.entry(n.clone()).or_default();
                s.probes += 1;
                s.rtt_ms_sum += ms.min(60_000.0);
            }
        }
        drop(stats);
        // Counted always; logged at most 10 a second (anyone may send reports).
        if !c.report_log.lock().unwrap().take(std::time::Instant::now()) {
            return;
        }
        let room: String = r.room.chars().take(64).collect();
        tracing::info!(event = "edge_chosen", room = %room, node = %r.chosen, client = %from, rtt_ms = ?r.rtt_ms, "a viewer of room {room:?} at {from} chose node {} (probe RTTs ms: {:?})", r.chosen, r.rtt_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, region: &str, viewers: u64, cap: Option<u64>) -> Lease {
        Lease {
            http: Some(format!("http://{node}")),
            region: region.into(),
            sessions: viewers,
            viewers,
            capacity: cap,
            ..Lease::bare(node, "127.0.0.1:1".parse().unwrap())
        }
    }

    #[test]
    fn carrying_nodes_with_room_come_first_then_region_then_load() {
        let live = [
            lease("full", "eu", 4, Some(4)),
            lease("tree", "us", 3, Some(4)),
            lease("near-busy", "eu", 3, Some(4)),
            lease("near-idle", "eu", 0, Some(4)),
            lease("far", "us", 0, Some(4)),
        ];
        let e = rank_edges("r", &live, &["full", "tree"], "eu", EDGES);
        let names: Vec<_> = e.iter().map(|e| e.node.as_str()).collect();
        // "full" is at capacity: never; the tree member first; then eu by load.
        assert_eq!(names, ["tree", "near-idle", "near-busy"]);
        assert_eq!(e[0].whep, "http://tree/whep/r");
        assert!(e[0].carrying && !e[1].carrying);
    }
}
