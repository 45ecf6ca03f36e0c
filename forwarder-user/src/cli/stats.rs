//! Counter snapshots and their rendering for `edgefwd stats` and `routes list`.

use std::time::Duration;

use anyhow::Result;
use forwarder_common::{route_stats::RouteStats, verdicts::Verdict};
use serde::Serialize;

use crate::{
    daemon::config::fmt_mac,
    dataplane::maps::{Maps, Route},
    dataplane::preflight::ifname,
};

#[derive(Debug, Serialize)]
pub struct VerdictRow {
    pub verdict: &'static str,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
    pub pps: f64,
    pub help: &'static str,
}

/// Two samples `interval` apart; rates are per second over that interval.
pub fn verdict_rows(maps: &Maps, interval: Duration) -> Result<Vec<VerdictRow>> {
    let a = maps.verdict_totals()?;
    let secs = interval.as_secs_f64();
    let b = if secs > 0.0 {
        std::thread::sleep(interval);
        maps.verdict_totals()?
    } else {
        a.clone()
    };
    Ok(a.iter()
        .zip(b)
        .map(|((v, s0), (_, s1)): (&(Verdict, _), _)| VerdictRow {
            verdict: v.name(),
            action: format!("{:?}", v.action()).to_lowercase(),
            packets: s1.packets,
            bytes: s1.bytes,
            pps: if secs > 0.0 {
                (s1.packets - s0.packets) as f64 / secs
            } else {
                0.0
            },
            help: v.help(),
        })
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
    let total: u64 = rows.iter().map(|r| r.packets).sum();
    let drops: u64 = rows
        .iter()
        .filter(|r| r.action == "drop")
        .map(|r| r.packets)
        .sum();
    println!("total {total} packets, {drops} dropped");
}

#[derive(Debug, Serialize)]
pub struct RouteRow {
    #[serde(flatten)]
    pub route: Route,
    pub egress: String,
    pub packets: u64,
    pub bytes: u64,
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
