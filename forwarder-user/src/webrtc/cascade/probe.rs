//! Inter-node RTT over the media path: every [`EVERY`] this node sends each live node a
//! STUN binding request to its media address (USERNAME `edgefwd-probe:ME`, signed with
//! the cluster's probe password; every node answers those on its media port, as it
//! answers ICE checks) and times the answer. The row it measured goes to the cluster's
//! Redis (`edgefwd:rtt:ME`), where every node's rows make the matrix that orders
//! parents in a room's tree ([`crate::cluster::tree::parent_order`]).

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
