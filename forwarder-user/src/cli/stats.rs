//! Counter snapshots and their rendering for `edgefwd stats` and `routes list`.

use std::time::Duration;

use anyhow::Result;
use forwarder_common::{fanout::CopyVerdict, route_stats::RouteStats};
use serde::Serialize;

use crate::{
    cluster::status::LinkRow,
    daemon::config::fmt_mac,
    dataplane::maps::{Maps, Route, Stream},
    dataplane::preflight::ifname,
};

#[derive(Debug, Serialize)]
pub struct VerdictRow {
    /// `xdp`: every packet the XDP program saw, once; `copy`: every copy the TC
    /// replicator made or failed to make.
    pub stage: &'static str,
    pub verdict: &'static str,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
    pub pps: f64,
    pub help: &'static str,
}

/// (stage, verdict, action, help, packets, bytes) of one counter.
type Sample = (&'static str, &'static str, String, &'static str, u64, u64);

/// Two samples `interval` apart; rates are per second over that interval.
pub fn verdict_rows(maps: &Maps, interval: Duration) -> Result<Vec<VerdictRow>> {
    let sample = || -> Result<Vec<Sample>> {
        let mut v: Vec<_> = maps
            .verdict_totals()?
            .into_iter()
            .map(|(v, s)| {
                let action = format!("{:?}", v.action()).to_lowercase();
                ("xdp", v.name(), action, v.help(), s.packets, s.bytes)
            })
            .collect();
        for (c, s) in maps.copy_verdict_totals()? {
            let action = if c == CopyVerdict::ForwardCopy {
                "forward"
            } else {
                "drop"
            };
            v.push((
                "copy",
                c.name(),
                action.into(),
                c.help(),
                s.packets,
                s.bytes,
            ));
        }
        Ok(v)
    };
    let a = sample()?;
    let secs = interval.as_secs_f64();
    let b = if secs > 0.0 {
        std::thread::sleep(interval);
        sample()?
    } else {
        a.clone()
    };
    Ok(a.iter()
        .zip(b)
        .map(
            |(s0, (stage, verdict, action, help, packets, bytes))| VerdictRow {
                stage,
                verdict,
                action,
                packets,
                bytes,
                pps: if secs > 0.0 {
                    (packets - s0.4) as f64 / secs
                } else {
                    0.0
                },
                help,
            },
        )
        .collect())
}

pub fn print_verdicts(rows: &[VerdictRow], all: bool) {
    println!(
        "{:<26} {:>8} {:>14} {:>16} {:>12}",
        "VERDICT", "ACTION", "PACKETS", "BYTES", "PPS"
    );
    for r in rows.iter().filter(|r| all || r.packets > 0) {
        println!(
            "{:<26} {:>8} {:>14} {:>16} {:>12.0}",
            r.verdict, r.action, r.packets, r.bytes, r.pps
        );
    }
    let sum = |stage: &str, drop: bool| -> u64 {
        rows.iter()
            .filter(|r| r.stage == stage && (!drop || r.action == "drop"))
            .map(|r| r.packets)
            .sum()
    };
    println!(
        "total {} packets, {} dropped; fan-out copies: {} made, {} failed",
        sum("xdp", false),
        sum("xdp", true),
        sum("copy", false) - sum("copy", true),
        sum("copy", true)
    );
}

#[derive(Debug, Serialize)]
pub struct RouteRow {
    #[serde(flatten)]
    pub route: Route,
    pub egress: String,
    pub packets: u64,
    pub bytes: u64,
    /// Copies the replicator could not send.
    pub drops: u64,
}

pub fn route_rows(routes: Vec<(Route, RouteStats)>) -> Vec<RouteRow> {
    routes
        .into_iter()
        .map(|(route, s)| RouteRow {
            egress: match route.egress_ifindex {
                0 => "(ingress)".into(),
                i => ifname(i).unwrap_or_else(|| format!("ifindex {i}")),
            },
            route,
            packets: s.packets,
            bytes: s.bytes,
            drops: s.drops,
        })
        .collect()
}

pub fn print_routes(rows: &[RouteRow]) {
    println!(
        "{:<24} {:<24} {:>10}  ->  {:<24} {:<24} {:>10} {:<10} {:<17} {:>7} {:>10} {:>7} {:>12} {:>14}",
        "LISTEN",
        "SOURCE",
        "SSRC",
        "OUT_SRC",
        "OUT_DST",
        "SSRC_OUT",
        "EGRESS",
        "DST_MAC",
        "SEQ+",
        "TS+",
        "PT",
        "PACKETS",
        "BYTES"
    );
    for r in rows {
        let x = &r.route;
        println!(
            "{:<24} {:<24} {:#010x}  ->  {:<24} {:<24} {:#010x} {:<10} {:<17} {:>7} {:>10} {:>7} {:>12} {:>14}",
            x.listen.to_string(),
            x.source.to_string(),
            x.ssrc,
            x.out_src.to_string(),
            x.out_dst.to_string(),
            x.ssrc_out,
            r.egress,
            fmt_mac(&x.dst_mac),
            x.seq_delta,
            x.ts_delta,
            x.pt_remap
                .map(|(f, t)| format!("{f}>{t}"))
                .unwrap_or_else(|| "-".into()),
            r.packets,
            r.bytes
        );
    }
    println!("{} route(s)", rows.len());
}

#[derive(Debug, Serialize)]
pub struct StreamRow {
    pub listen: std::net::SocketAddr,
    pub source: std::net::SocketAddr,
    pub ssrc: u32,
    /// `tc` (replicated by the TC program) or `xdp` (one copy, forwarded by XDP).
    pub replicated_by: &'static str,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub copies: Vec<RouteRow>,
}

pub fn stream_rows(streams: Vec<Stream>) -> Vec<StreamRow> {
    streams
        .into_iter()
        .map(|s| StreamRow {
            listen: s.listen,
            source: s.source,
            ssrc: s.ssrc,
            replicated_by: if s.fanout { "tc" } else { "xdp" },
            packets_in: s.received.packets,
            bytes_in: s.received.bytes,
            copies: route_rows(s.copies),
        })
        .collect()
}

pub fn print_streams(rows: &[StreamRow]) {
    for s in rows {
        println!(
            "stream {:#010x} from {} on {}: {} cop{} ({}), {} packets in",
            s.ssrc,
            s.source,
            s.listen,
            s.copies.len(),
            if s.copies.len() == 1 { "y" } else { "ies" },
            s.replicated_by,
            s.packets_in
        );
        println!(
            "  {:<24} {:<24} {:>10} {:<10} {:>7} {:>10} {:>7} {:>12}",
            "OUT_SRC", "OUT_DST", "SSRC_OUT", "EGRESS", "SEQ+", "TS+", "PT", "PACKETS"
        );
        for r in &s.copies {
            let x = &r.route;
            println!(
                "  {:<24} {:<24} {:#010x} {:<10} {:>7} {:>10} {:>7} {:>12}",
                x.out_src.to_string(),
                x.out_dst.to_string(),
                x.ssrc_out,
                r.egress,
                x.seq_delta,
                x.ts_delta,
                x.pt_remap
                    .map(|(f, t)| format!("{f}>{t}"))
                    .unwrap_or_else(|| "-".into()),
                r.packets
            );
        }
    }
    if rows.is_empty() {
        println!("no streams (add copies with `edgefwd subs add`, or [[route]] in the config)");
    }
}

pub fn print_links(rows: &[LinkRow]) {
    if rows.is_empty() {
        println!("no links (add [[link]] to the config, or `edgefwd links add`)");
        return;
    }
    println!(
        "{:<16} {:<4} {:<22} {:<22} {:<8} {:>6} {:>6} {:>10} {:>12} {:>6}  LAST OK",
        "PEER", "DIR", "LOCAL", "REMOTE", "STATE", "DEMAND", "COPIES", "PACKETS", "BYTES", "DROPS"
    );
    for r in rows {
        println!(
            "{:<16} {:<4} {:<22} {:<22} {:<8} {:>6} {:>6} {:>10} {:>12} {:>6}  {}",
            r.peer,
            format!("{:?}", r.direction).to_lowercase(),
            r.local.to_string(),
            r.remote.to_string(),
            r.state,
            r.demand,
            r.copies,
            r.packets,
            r.bytes,
            r.drops,
            r.last_ok_secs_ago
                .map(|s| format!("{s:.1} s ago"))
                .unwrap_or_else(|| "never".into())
        );
        if !r.message.is_empty() {
            println!("  {}", r.message);
        }
    }
}
