//! The daemon's side of the cascade: twice a second it reads the links and streams
//! from the maps, lets the link manager plan, writes the planned trunk copies through
//! the one map writer, records every link's state in the maps, and sends our demand
//! upstream. The node API feeds the same manager with downstream demand.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use forwarder_common::links::{LinkState, MESSAGE_LEN, STATE_DOWN, STATE_REFUSED, STATE_UP};
use forwarder_common::route_stats::RouteStats;

use super::{
    ClusterConfig, Direction, Link,
    api::{self, Outcome},
    identity::Identity,
    links::{LinkManager, Plan, State, Trunk},
};
use crate::{
    dataplane::config::RouteConfig,
    dataplane::{
        maps::{Maps, Route},
        resolve,
    },
};

/// How often demand is refreshed and the plan applied: a few times per lapse.
pub const TICK: Duration = Duration::from_millis(500);

/// Starts the tick loop; returns the link manager the node API feeds.
pub fn start(
    pin_dir: &std::path::Path,
    cfg: &ClusterConfig,
    identity: Arc<Identity>,
    offered: Vec<(SocketAddr, SocketAddr, u32)>,
) -> Result<Arc<Mutex<LinkManager>>> {
    let manager = Arc::new(Mutex::new(LinkManager::new(
        &cfg.node,
        Duration::from_secs(cfg.lapse),
        offered,
    )));
    let maps = Maps::open_pinned(pin_dir)?;
    tokio::spawn(run(maps, manager.clone(), identity));
    Ok(manager)
}

/// Where a trunk copy leaves: egress ifindex, source MAC, next-hop MAC.
type Hop = (u32, [u8; 6], [u8; 6]);

/// What the tick loop keeps between ticks.
struct Tick {
    maps: Maps,
    /// Next hop per link (local, remote): resolved once, again after a failure.
    hops: HashMap<(SocketAddr, SocketAddr), Hop>,
    /// Last logged state per link, to log transitions only.
    logged: BTreeMap<String, (u8, String)>,
    /// Last error applying the plan, to log it once.
    apply_error: Option<String>,
    /// Per down link: counters of its removed trunk copies (seeded from the maps, so
    /// a restart keeps them).
    retired: HashMap<String, RouteStats>,
}

async fn run(maps: Maps, manager: Arc<Mutex<LinkManager>>, identity: Arc<Identity>) {
    let retired = match maps.link_states() {
        Ok(s) => s
            .into_iter()
            .map(|(peer, st)| {
                let r = RouteStats {
                    packets: st.packets_retired,
                    bytes: st.bytes_retired,
                    drops: st.drops_retired,
                    ..Default::default()
                };
                (peer, r)
            })
            .collect(),
        Err(e) => {
            log::warn!("reading the link states an earlier daemon left: {e:#}");
            HashMap::new()
        }
    };
    let mut t = Some(Tick {
        maps,
        hops: HashMap::new(),
        logged: BTreeMap::new(),
        apply_error: None,
        retired,
    });
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let m = manager.clone();
        let tick = t.take().expect("put back every round");
        // Map writes wait out the replicator's grace period: off the async threads.
        let Ok((tick, upstream)) = tokio::task::spawn_blocking(move || step(tick, &m)).await else {
            log::error!("the cascade link task panicked; links are no longer maintained");
            return;
        };
        t = Some(tick);
        if let Some((link, req)) = upstream {
            let api = link.api.expect("up links have an api (checked)");
            let out = api::put_demand(api, &identity, &req).await;
            let mut m = manager.lock().unwrap();
            match out {
                Outcome::Ok(reply) => m.upstream_ok(reply, Instant::now()),
                Outcome::Refused(why) => {
                    m.upstream_refused(format!("upstream {} at {api} refused: {why}", link.peer))
                }
                Outcome::Unreachable(why) => m.upstream_unreachable(format!(
                    "upstream {} at {api} unreachable: {why}",
                    link.peer
                )),
            }
        }
    }
}

/// One round: plan from the maps, apply, record states.
fn step(
    mut t: Tick,
    manager: &Mutex<LinkManager>,
) -> (Tick, Option<(Link, super::links::DemandRequest)>) {
    let now = Instant::now();
    let read = (|| -> Result<Plan> {
        let links = t.maps.links()?;
        let streams = t.maps.streams()?;
        let mut m = manager.lock().unwrap();
        m.set_links(links);
        Ok(m.plan(now, &streams))
    })();
    let plan = match read {
        Ok(p) => p,
        Err(e) => {
            log::warn!("cascade links: reading the maps: {e:#}");
            return (t, None);
        }
    };
    let links: Vec<Link> = manager.lock().unwrap().links().to_vec();
    match apply(&mut t, &links, &plan.trunks) {
        Ok(()) => t.apply_error = None,
        Err(e) => {
            let e = format!("{e:#}");
            if t.apply_error.as_ref() != Some(&e) {
                log::warn!("cascade links: writing trunk copies: {e}");
            }
            t.apply_error = Some(e);
        }
    }
    for (peer, st) in &plan.states {
        let mut v = to_map_state(st, now);
        if let Some(r) = t.retired.get(peer) {
            (v.packets_retired, v.bytes_retired, v.drops_retired) = (r.packets, r.bytes, r.drops);
        }
        if let Err(e) = t.maps.set_link_state(peer, &v) {
            log::warn!("{e:#}");
        }
        let now_logged = (st.state, st.message.clone());
        if t.logged.get(peer) != Some(&now_logged) {
            match st.state {
                STATE_UP => log::info!(
                    "link {peer} up: {} SSRC(s) demanded, {} trunk cop(ies)",
                    st.demand,
                    st.copies
                ),
                STATE_DOWN | STATE_REFUSED => log::warn!("link {peer}: {}", st.message),
                _ => log::info!("link {peer}: {}", st.message),
            }
            t.logged.insert(peer.clone(), now_logged);
        }
    }
    (t, plan.upstream)
}

fn to_map_state(st: &State, now: Instant) -> LinkState {
    let mut v = LinkState {
        demand: st.demand,
        copies: st.copies,
        state: st.state,
        ..Default::default()
    };
    if let Some(at) = st.last_ok {
        let wall = SystemTime::now() - now.saturating_duration_since(at);
        v.last_ok_ms = wall
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
    }
    // Cut at a character boundary.
    let mut end = st.message.len().min(MESSAGE_LEN);
    while !st.message.is_char_boundary(end) {
        end -= 1;
    }
    v.message[..end].copy_from_slice(&st.message.as_bytes()[..end]);
    v
}

/// Makes the maps' trunk copies those of the plan: removes the others first (a lapsed
/// branch stops at once), then adds what is missing.
fn apply(t: &mut Tick, links: &[Link], want: &BTreeSet<Trunk>) -> Result<()> {
    for l in links.iter().filter(|l| l.direction == Direction::Down) {
        for (key, dst) in t.maps.trunks_of(l)? {
            let keep = want.iter().any(|w| {
                (w.out_src, w.out_dst) == (l.local, l.remote)
                    && Route::key_of(w.listen, w.source, w.ssrc) == key
            });
            if !keep && let Some(last) = t.maps.del_copy_counted(&key, dst)? {
                let r = t.retired.entry(l.peer.clone()).or_default();
                r.packets += last.packets;
                r.bytes += last.bytes;
                r.drops += last.drops;
            }
        }
    }
    let have: std::collections::HashSet<(forwarder_common::routes::RouteKey, SocketAddr)> = links
        .iter()
        .map(|l| t.maps.trunks_of(l))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let mut first_error = None;
    for w in want {
        let key = Route::key_of(w.listen, w.source, w.ssrc);
        if have.contains(&(key, w.out_dst)) {
            continue;
        }
        let r = match trunk_route(t, w) {
            Ok(r) => r,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        if let Err(e) = t.maps.add_copy(&r) {
            t.hops.remove(&(w.out_src, w.out_dst));
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A trunk copy: the packet as it arrived (SSRC, sequence, timestamp, payload type),
/// only Ethernet/IP/UDP new.
fn trunk_route(t: &mut Tick, w: &Trunk) -> Result<Route> {
    let rc = RouteConfig {
        listen: w.listen,
        source: w.source,
        ssrc: w.ssrc,
        out_src: w.out_src,
        out_dst: w.out_dst,
        ssrc_out: None,
        seq_delta: 0,
        ts_delta: 0,
        pt_from: None,
        pt_to: None,
        egress: None,
        dst_mac: None,
        vlan: None,
    };
    let hop = (w.out_src, w.out_dst);
    let (ifindex, src_mac, dst_mac) = match t.hops.get(&hop) {
        Some(h) => *h,
        None => {
            let r = resolve::resolve(&rc).with_context(|| format!("the trunk to {}", w.out_dst))?;
            let h = (r.egress_ifindex, r.src_mac, r.dst_mac);
            t.hops.insert(hop, h);
            h
        }
    };
    Ok(Route {
        egress_ifindex: ifindex,
        src_mac,
        dst_mac,
        ..resolve::unresolved(&rc)
    })
}
