//! `edgefwd cluster nodes|rooms`: the cluster as its Redis has it, read directly (no
//! daemon needed): the live nodes' leases with the RTTs they measured, and the rooms'
//! origins with their epochs and trees.

use anyhow::Result;
use serde_json::json;

use super::args::ClusterCmd;
use crate::cluster::redis::Directory;

pub fn run(cmd: ClusterCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            ClusterCmd::Nodes { redis, json } => nodes(&redis, json).await,
            ClusterCmd::Rooms { room, redis, json } => rooms(&redis, room, json).await,
        }
    })
}

/// The live nodes' leases, then the nodes whose lease lapsed (dead, or gone for good):
/// each with the live nodes that suspect it now (its probes unanswered for 300 ms: the
/// media path's first word on a death, seconds before the lease lapses).
async fn nodes(url: &str, as_json: bool) -> Result<()> {
    let d = Directory::connect(url, "edgefwd-cli").await?;
    let live = d.live_nodes().await?;
    let suspected_by = |node: &str| -> Vec<&str> {
        live.iter()
            .filter(|l| l.suspects.iter().any(|s| s == node))
            .map(|l| l.node.as_str())
            .collect()
    };
    let mut rows = Vec::new();
    for l in &live {
        let ttl = d.lease_ttl_ms(&l.node).await?;
        let rtt = d.rtt_row(&l.node).await?;
        rows.push(json!({
            "node": l.node, "api": l.api.to_string(), "http": l.http, "region": l.region,
            "media": l.media.map(|m| m.to_string()),
            "sessions": l.sessions, "viewers": l.viewers, "capacity": l.capacity,
            "copies_per_s": l.copies_per_s, "cpu_pct": l.cpu_pct, "draining": l.draining,
            "lease_ms_left": ttl, "rtt_us": rtt, "suspected_by": suspected_by(&l.node),
        }));
    }
    let lapsed: Vec<serde_json::Value> = d
        .known_nodes()
        .await?
        .into_iter()
        .filter(|n| !live.iter().any(|l| &l.node == n))
        .map(|n| json!({ "node": n, "lease": "lapsed", "suspected_by": suspected_by(&n) }))
        .collect();
    if as_json {
        rows.extend(lapsed);
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    // VIEWERS: now/capacity, "D" when the node drains.
    println!(
        "{:<16} {:<22} {:<28} {:<10} {:>8} {:>9} {:>9} {:>6} {:>9}  RTT ms",
        "NODE",
        "NODE API",
        "WHIP/WHEP",
        "REGION",
        "SESSIONS",
        "VIEWERS",
        "COPIES/s",
        "CPU %",
        "LEASE ms"
    );
    for r in &rows {
        let mut viewers = match r["capacity"].as_u64() {
            Some(c) => format!("{}/{c}", r["viewers"]),
            None => r["viewers"].to_string(),
        };
        if r["draining"] == true {
            viewers += " D";
        }
        let rtt: Vec<String> = r["rtt_us"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(n, us)| format!("{n} {:.2}", us.as_f64().unwrap_or(0.0) / 1000.0))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:<22} {:<28} {:<10} {:>8} {:>9} {:>9} {:>6} {:>9}  {}",
            r["node"].as_str().unwrap_or(""),
            r["api"].as_str().unwrap_or(""),
            r["http"].as_str().unwrap_or("-"),
            r["region"].as_str().unwrap_or(""),
            r["sessions"].to_string(),
            viewers,
            r["copies_per_s"].to_string(),
            r["cpu_pct"].to_string(),
            r["lease_ms_left"].to_string(),
            rtt.join(", ")
        );
        if let Some(by) = names(&r["suspected_by"]) {
            println!(
                "{:<16} ^ suspected dead by {by}: its probes go unanswered",
                ""
            );
        }
    }
    for r in &lapsed {
        let by = names(&r["suspected_by"]).map_or(String::new(), |b| format!(", suspected by {b}"));
        println!(
            "{:<16} lease lapsed (dead, or gone for good){by}",
            r["node"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// A JSON list of names as "a, b" (None when empty).
fn names(v: &serde_json::Value) -> Option<String> {
    let list: Vec<&str> = v.as_array()?.iter().filter_map(|n| n.as_str()).collect();
    (!list.is_empty()).then(|| list.join(", "))
}

async fn rooms(url: &str, only: Option<String>, as_json: bool) -> Result<()> {
    let d = Directory::connect(url, "edgefwd-cli").await?;
    let mut rows = Vec::new();
    for (room, _) in d.rooms().await? {
        if only.as_ref().is_some_and(|r| *r != room) {
            continue;
        }
        if let Some(v) = crate::cluster::tree::room_view(&d, &room).await? {
            rows.push(v);
        }
    }
    if let Some(r) = &only
        && rows.is_empty()
    {
        anyhow::bail!("room {r:?} has no origin in the cluster's Redis: no one has published it");
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<16} {:>6} {:>6} {:>6}",
        "ROOM", "ORIGIN", "EPOCH", "ALIVE", "DEPTH"
    );
    for r in &rows {
        println!(
            "{:<32} {:<16} {:>6} {:>6} {:>6}",
            r["room"].as_str().unwrap_or(""),
            r["origin"].as_str().unwrap_or(""),
            r["epoch"].to_string(),
            if r["origin_alive"] == true {
                "yes"
            } else {
                "no"
            },
            r["depth"].to_string()
        );
        // With one room asked for: its tree, each node under its parent.
        if only.is_some() {
            print_tree(r["origin"].as_str().unwrap_or(""), &r["tree"], 1);
        }
    }
    Ok(())
}

/// `node`'s children in `tree` (a list of {node, parent}), indented by depth.
fn print_tree(node: &str, tree: &serde_json::Value, depth: usize) {
    if depth == 1 {
        println!("  {node} (origin)");
    }
    let Some(members) = tree.as_array() else {
        return;
    };
    for m in members.iter().filter(|m| m["parent"] == node) {
        let child = m["node"].as_str().unwrap_or("");
        println!("  {}└─ {child}", "   ".repeat(depth - 1));
        if depth < crate::cluster::MAX_DEPTH {
            print_tree(child, tree, depth + 1);
        }
    }
}
