//! `edgefwd cluster nodes|rooms`: the cluster as its Redis has it, read directly (no
//! daemon needed): the live nodes' leases and the rooms' origins with their epochs.

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

async fn nodes(url: &str, as_json: bool) -> Result<()> {
    let d = Directory::connect(url, "edgefwd-cli").await?;
    let mut rows = Vec::new();
    for l in d.live_nodes().await? {
        let ttl = d.lease_ttl_ms(&l.node).await?;
        rows.push(json!({
            "node": l.node, "api": l.api.to_string(), "http": l.http, "region": l.region,
            "sessions": l.sessions, "lease_ms_left": ttl,
        }));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<22} {:<28} {:<10} {:>8} {:>9}",
        "NODE", "NODE API", "WHIP/WHEP", "REGION", "SESSIONS", "LEASE ms"
    );
    for r in &rows {
        println!(
            "{:<16} {:<22} {:<28} {:<10} {:>8} {:>9}",
            r["node"].as_str().unwrap_or(""),
            r["api"].as_str().unwrap_or(""),
            r["http"].as_str().unwrap_or("-"),
            r["region"].as_str().unwrap_or(""),
            r["sessions"],
            r["lease_ms_left"]
        );
    }
    Ok(())
}

async fn rooms(url: &str, only: Option<String>, as_json: bool) -> Result<()> {
    let d = Directory::connect(url, "edgefwd-cli").await?;
    let mut rows = Vec::new();
    for (room, o) in d.rooms().await? {
        if only.as_ref().is_some_and(|r| *r != room) {
            continue;
        }
        let alive = d.lease(&o.node).await?.is_some();
        rows.push(json!({"room": room, "origin": o.node, "epoch": o.epoch, "origin_alive": alive}));
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
        "{:<32} {:<16} {:>6} {:>6}",
        "ROOM", "ORIGIN", "EPOCH", "ALIVE"
    );
    for r in &rows {
        println!(
            "{:<32} {:<16} {:>6} {:>6}",
            r["room"].as_str().unwrap_or(""),
            r["origin"].as_str().unwrap_or(""),
            r["epoch"],
            if r["origin_alive"] == true {
                "yes"
            } else {
                "no"
            }
        );
    }
    Ok(())
}
