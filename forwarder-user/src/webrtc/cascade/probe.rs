//! Inter-node RTT over the media path: every [`EVERY`] this node sends each live node a
//! STUN binding request to its media address (USERNAME `edgefwd-probe:ME`, signed with
//! the cluster's probe password; every node answers those on its media port, as it
//! answers ICE checks) and times the answer. The row it measured goes to the cluster's
//! Redis (`edgefwd:rtt:ME`), where every node's rows make the matrix that orders
//! parents in a room's tree ([`crate::cluster::tree::parent_order`]).
//!
//! The nodes this one takes rooms from (its parents) are probed every [`WATCH`]: one
//! that answers none for [`SUSPECT`] is suspected dead at once (a lapsed lease would
//! take seconds to confirm it), and each room from it is asked of another parent
//! straight away; its viewers keep their sessions.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;

use crate::cluster::identity::PROBE_UFRAG;
use crate::webrtc::{ice, sfu::Sfu};

/// How often the peers are measured.
pub const EVERY: Duration = Duration::from_secs(3);
/// How long an answer is waited for.
const WAIT: Duration = Duration::from_secs(1);
/// How often a parent is probed.
pub const WATCH: Duration = Duration::from_millis(100);
/// A parent silent this long is suspected dead.
pub const SUSPECT: Duration = Duration::from_millis(300);
/// A suspicion lasts this long unless the node answers again.
pub const FORGET: Duration = Duration::from_secs(10);

/// Runs for the daemon's life (does nothing until the cluster's Redis is connected).
pub async fn run(sfu: Arc<Sfu>) {
    let Some(c) = sfu.cascade.get() else {
        return;
    };
    // From our media address's IP, so the path is the one trunks take.
    let local = SocketAddr::new(sfu.media_addr().ip(), 0);
    let sock = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "RTT probes: cannot bind {local} ({e}); rooms' trees are built by load alone"
            );
            return;
        }
    };
    let mut every = tokio::time::interval(EVERY);
    loop {
        every.tick().await;
        let Some(d) = c.redis.get() else { continue };
        let Ok(live) = d.live_nodes().await else {
            continue;
        };
        *c.draining_nodes.lock().unwrap() = live
            .iter()
            .filter(|l| l.draining && l.node != c.node())
            .map(|l| l.node.clone())
            .collect();
        let peers: Vec<(String, SocketAddr)> = live
            .into_iter()
            .filter(|l| l.node != c.node())
            .filter_map(|l| Some((l.node, l.media?)))
            .collect();
        let row = measure(&sock, &c.identity.probe_pwd, c.node(), &peers).await;
        *c.rtt.lock().unwrap() = row.clone();
        if let Err(e) = d.set_rtt(&row).await {
            log::debug!("{e:#}");
        }
    }
}

/// One round: a probe to every peer at once, answers collected for [`WAIT`].
/// Microseconds per peer that answered.
async fn measure(
    sock: &UdpSocket,
    pwd: &str,
    me: &str,
    peers: &[(String, SocketAddr)],
) -> BTreeMap<String, u64> {
    let user = format!("{PROBE_UFRAG}:{me}");
    // Per transaction id: the peer and when it was sent.
    let mut out: HashMap<[u8; 12], (&str, SocketAddr, Instant)> = HashMap::new();
    for (node, addr) in peers {
        let req = ice::binding_request(&user, pwd, false);
        let Some(tid) = transaction_id(&req) else {
            continue;
        };
        if sock.send_to(&req, addr).await.is_ok() {
            out.insert(tid, (node.as_str(), *addr, Instant::now()));
        }
    }
    let mut row = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = [0u8; 1500];
    while !out.is_empty() {
        let Ok(Ok((n, from))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
        else {
            break;
        };
        let b = &buf[..n];
        let Some(tid) = transaction_id(b) else {
            continue;
        };
        if !ice::is_binding_success(b) {
            continue;
        }
        if let Some((node, addr, sent)) = out.get(&tid).copied()
            && addr == from
        {
            row.insert(node.to_string(), sent.elapsed().as_micros().max(1) as u64);
            out.remove(&tid);
        }
    }
    row
}

/// A STUN message's transaction id (bytes 8..20).
fn transaction_id(b: &[u8]) -> Option<[u8; 12]> {
    b.get(8..20)?.try_into().ok()
}

/// The parents this node takes rooms from: node -> its media address (where the
/// relayed sessions' media comes from), and the rooms from each.
fn parents(sfu: &Sfu) -> HashMap<String, (SocketAddr, Vec<String>)> {
    let st = sfu.state.lock().unwrap();
    let mut out: HashMap<String, (SocketAddr, Vec<String>)> = HashMap::new();
    for s in st.sessions.values() {
        if let (Some(r), Some(addr)) = (&s.relay, s.addrs.first()) {
            let e = out.entry(r.node.clone()).or_insert((*addr, vec![]));
            if !e.1.contains(&s.room) {
                e.1.push(s.room.clone());
            }
        }
    }
    out
}

/// Runs for the daemon's life: probes this node's parents every [`WATCH`], suspects
/// one silent for [`SUSPECT`], and moves its rooms to other parents at once.
pub async fn watch_parents(sfu: Arc<Sfu>) {
    let Some(c) = sfu.cascade.get() else {
        return;
    };
    let local = SocketAddr::new(sfu.media_addr().ip(), 0);
    let Ok(sock) = UdpSocket::bind(local).await else {
        log::warn!("parent watch: cannot bind {local}; a dead parent is found by its lapse");
        return;
    };
    let user = format!("{PROBE_UFRAG}:{}", c.node());
    // Per parent: when it last answered (or since when it is watched).
    let mut heard: HashMap<String, Instant> = HashMap::new();
    let mut sent: HashMap<[u8; 12], String> = HashMap::new();
    // Per room, when it was last asked of another parent because its parent drains.
    let mut moved: HashMap<String, Instant> = HashMap::new();
    let mut every = tokio::time::interval(WATCH);
    let mut buf = [0u8; 1500];
    loop {
        tokio::select! {
            _ = every.tick() => {
                let now = Instant::now();
                let parents = parents(&sfu);
                heard.retain(|n, _| parents.contains_key(n));
                moved.retain(|r, _| parents.values().any(|p| p.1.contains(r)));
                sent.clear();
                for (node, (addr, rooms)) in &parents {
                    let last = *heard.entry(node.clone()).or_insert(now);
                    let suspected = c.suspects.lock().unwrap().contains_key(node);
                    if !suspected && now.saturating_duration_since(last) >= SUSPECT {
                        suspect(&sfu, node, rooms, now.saturating_duration_since(last));
                    } else if c.draining_nodes.lock().unwrap().contains(node) {
                        // Make-before-break: the rooms move while it still sends (at
                        // most once a second per room: a draining origin stays).
                        let due: Vec<String> = rooms
                            .iter()
                            .filter(|r| moved.get(*r).is_none_or(|t| now.saturating_duration_since(*t) >= Duration::from_secs(1)))
                            .cloned()
                            .collect();
                        for r in &due {
                            moved.insert(r.clone(), now);
                        }
                        move_away(&sfu, node, &due);
                    }
                    let req = ice::binding_request(&user, &c.identity.probe_pwd, false);
                    if let Some(tid) = transaction_id(&req)
                        && sock.send_to(&req, addr).await.is_ok()
                    {
                        sent.insert(tid, node.clone());
                    }
                }
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, _)) = r else { continue };
                let b = &buf[..n];
                if let Some(node) = transaction_id(b).and_then(|t| sent.remove(&t))
                    && ice::is_binding_success(b)
                {
                    heard.insert(node.clone(), Instant::now());
                    if c.suspects.lock().unwrap().remove(&node).is_some() {
                        log::info!("node {node} answers its probes again; no longer suspected");
                    }
                }
            }
        }
    }
}

/// `node` went silent: suspected dead, and each of `rooms` asked of another parent now.
fn suspect(sfu: &Arc<Sfu>, node: &str, rooms: &[String], silent: Duration) {
    let c = sfu.cascade.get().expect("watched with a cascade");
    c.suspects
        .lock()
        .unwrap()
        .insert(node.to_string(), Instant::now());
    c.suspicions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(
        event = "suspect",
        node,
        silent_ms = silent.as_millis() as u64,
        "node {node} answered no probe for {} ms: suspected dead; its {} room(s) here are asked of another parent",
        silent.as_millis(),
        rooms.len()
    );
    for room in rooms {
        let (sfu, room) = (sfu.clone(), room.clone());
        tokio::spawn(async move { sfu.reparent(&room).await });
    }
}

/// `node` drains: each of `rooms` is asked of another parent now (once per round while
/// the room still comes from it; the room's fetch lock keeps it to one call).
fn move_away(sfu: &Arc<Sfu>, node: &str, rooms: &[String]) {
    let c = sfu.cascade.get().expect("watched with a cascade");
    for room in rooms {
        let Ok(guard) = c.fetch_lock(room).try_lock_owned() else {
            continue; // a call for the room is out already
        };
        drop(guard);
        tracing::info!(event = "move_away", node, room = %room, "node {node} drains: room {room} asked of another parent");
        let (sfu, room) = (sfu.clone(), room.clone());
        tokio::spawn(async move { sfu.reparent(&room).await });
    }
}
