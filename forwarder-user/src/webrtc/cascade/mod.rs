//! WebRTC rooms across nodes: a subscriber on node B (or C, further down) watches a
//! room whose publisher is on node A.
//!
//! The downstream node asks its upstream for the room over the cluster's node API
//! (`POST /node/v1/rooms/{room}/relay` on the upstream's `[cluster] api`, signed by
//! the downstream's identity) and refreshes that about once a second while it has
//! demand (its own subscribers, or relays of its own further down). The upstream
//! answers with, per publisher: its tracks, its SRTP receive master key and each
//! stream's highest authenticated index (the handover: the downstream decrypts and
//! authenticates every packet itself), and a trunk key for the RTCP the downstream
//! sends back; the keys sealed for the requesting node. It then copies the
//! publisher's SRTP and SRTCP, as they arrived and once they authenticated, to the
//! downstream's media address: no crypto per trunk copy. A request that is not
//! refreshed lapses and the trunk copies stop; a publisher gone upstream disappears
//! downstream at the next refresh; a relay the upstream re-made (after a lapse) is
//! re-made downstream with its new keys.
//!
//! At the downstream, each upstream publisher is a publisher session of the room
//! (role publisher, `upstream` set), so WHEP subscribers get its tracks like any
//! other's; keyframe requests and NACKs its engine sends that publisher go up the
//! trunk with the trunk key and reach the real publisher (the engine at each hop
//! answers NACKs from its own cache first). Receiver reports end at each hop.
//!
//! Loop-free: each request carries the chain of nodes below (`via`); a node that
//! finds itself there refuses (409, naming the cycle). Which upstream serves a room
//! is the cluster's [`Directory`]: the config's entries, and with `[cluster]
//! redis_url` the cluster's Redis, where a WHIP publisher claims the room for its node
//! ([`Sfu::claim_room`]) and other nodes find its origin.
//!
//! * [`claims`] — WHIP's claim of a room in the directory, epochs checked.
//! * [`edges`] — which nodes a viewer should try, and a full node's redirect.
//! * [`probe`] — RTT to the other nodes over the media path, for the trees.
//! * [`give`] — the upstream's side: relay requests in, trunk copies out.
//! * [`take`] — the downstream's side: asking, refreshing, relayed publishers.

mod claims;
pub mod edges;
mod give;
pub mod probe;
mod take;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::sdp::Codec;
use super::sfu::{ApiError, Sfu};
use crate::cluster::{
    Membership,
    directory::{Directory, Layered, StaticDirectory},
    identity::Identity,
    links::Refusal,
    relay::{Answer, RoomRelay},
};
use crate::media::{
    Kind,
    engine::SessionId,
    simulcast::Layer,
    srtp::{MasterKey, Profile},
};

/// The request a downstream node sends. Fields a newer node adds are ignored, not
/// refused: nodes are upgraded one at a time, and a relay must keep its room while
/// its upstream is older (operator-written config stays strict).
#[derive(Debug, Serialize, Deserialize)]
pub struct RelayRequest {
    pub node: String,
    /// Where trunk copies go: the downstream's media address.
    pub media: SocketAddr,
    /// The nodes below the requester, nearest first (loop detection).
    #[serde(default)]
    pub via: Vec<String>,
    /// Simulcast: per track id, the highest encoding the requester's viewers (and
    /// nodes below it) may get; a track not named gets every encoding.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub layers: std::collections::BTreeMap<String, Layer>,
    /// The origin's epoch in the cluster's directory, as the requester found it: an
    /// origin whose own claim has another refuses (409), so a node acting on stale
    /// directory state never gets a relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The publishers (origin session ids) the requester holds relay sessions of now:
    /// only theirs keep their trunk keys; any other gets a fresh one. A relay session
    /// made anew (its node restarted, or it ended and was asked for again) starts its
    /// SRTCP at index 0 and must never do so under a key an earlier one used. None
    /// (an older node): keys are kept while the relay lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
pub struct RelayReply {
    pub node: String,
    /// Where trunk copies come from: the upstream's media address.
    pub media: SocketAddr,
    pub publishers: Vec<RelayPublisher>,
}

/// One publisher as the downstream needs it. No Debug: it holds keys.
#[derive(Serialize, Deserialize)]
pub struct RelayPublisher {
    /// The origin's session id: the same at every hop.
    pub id: String,
    /// The sender SSRC the downstream's RTCP for this publisher must carry.
    pub rtcp_ssrc: u32,
    /// The SRTP profile (its DTLS-SRTP id).
    pub profile: u16,
    /// [`Keys`] sealed for the requesting node ([`Identity::seal`], bound to room,
    /// node and publisher): no key crosses the network in the clear.
    pub keys: String,
    /// Per SSRC, the highest packet index the upstream authenticated.
    pub streams: Vec<(u32, u64)>,
    pub tracks: Vec<RelayTrack>,
}

/// A relayed publisher's keys, as sealed in [`RelayPublisher::keys`].
#[derive(Serialize, Deserialize)]
pub struct Keys {
    /// The publisher's SRTP master key and salt: the downstream decrypts and
    /// authenticates every packet itself.
    pub key: Vec<u8>,
    pub salt: Vec<u8>,
    /// The key of the RTCP the downstream sends back over the trunk.
    pub trunk_key: Vec<u8>,
    pub trunk_salt: Vec<u8>,
}

/// What a publisher's sealed keys are bound to: a blob meant for one room, node and
/// publisher opens for no other.
pub fn seal_context(room: &str, node: &str, publisher: &str) -> String {
    format!("edgefwd relay keys\n{room}\n{node}\n{publisher}")
}

#[derive(Serialize, Deserialize)]
pub struct RelayTrack {
    pub kind: Kind,
    pub mid: String,
    pub track_id: String,
    pub ssrc: u32,
    /// Every encoding's SSRC, lowest quality first, for a simulcast track (empty for
    /// a plain one, and from nodes that predate simulcast).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<u32>,
    pub codec: Codec,
    /// AV1: the dependency descriptor's id in the publisher's packets (the trunk
    /// carries them as sent), so the relay node reads the SVC layers too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dd_ext: Option<u8>,
}

/// A publisher session that is an upstream's publisher, relayed here.
pub struct RelayIn {
    pub node: String,
    /// The upstream's node API.
    pub api: SocketAddr,
    /// The origin's epoch the directory gave (refreshes name it).
    pub epoch: Option<u64>,
    /// The origin's session id.
    pub upstream_id: String,
    /// The chain below us when the relay was asked for.
    pub via: Vec<String>,
    /// The RTCP SSRC and trunk key (key, salt) the upstream gave: when a refresh
    /// brings others, the upstream re-made its relay (ours had lapsed there) and this
    /// session is re-made with them, or our RTCP would no longer authenticate there.
    pub trunk: (u32, Vec<u8>, Vec<u8>),
}

/// Trunk copies of one publisher to one downstream node.
pub struct RelayOut {
    pub room: String,
    pub node: String,
    pub publisher: String,
    pub media: SessionId,
    pub addr: SocketAddr,
    pub peer_rtcp_ssrc: u32,
    pub trunk_key: MasterKey,
    pub expires: Instant,
}

/// How a room's upstream answered last.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    pub node: String,
    pub api: SocketAddr,
    pub up: bool,
    pub message: String,
    #[serde(skip)]
    pub last_ok: Option<Instant>,
    pub publishers: usize,
}

pub struct Cascade {
    /// This node: its name, and the keys that sign its requests and seal its keys.
    pub identity: Arc<Identity>,
    pub(super) directory: Box<dyn Directory>,
    /// The cluster's Redis, once connected.
    redis: Arc<OnceLock<crate::cluster::redis::Directory>>,
    /// Rooms this node claimed in the cluster's directory, with the epoch: relay
    /// requests naming another are stale.
    claims: Mutex<HashMap<String, u64>>,
    /// Rooms whose draining origin this node succeeds: published here already, taken
    /// over in the directory once the publisher's keys are up (make-before-break).
    takeovers: Mutex<HashMap<String, crate::cluster::redis::Origin>>,
    /// The lease task's view of the cluster (Redis up, live nodes), for /metrics.
    pub health: Arc<crate::cluster::Health>,
    /// `[cluster] placements_per_second`.
    placements_per_second: u32,
    /// Whether `[cluster] redis_url` is set (the directory may connect later).
    pub redis_configured: bool,
    /// `[cluster] capacity`: WHEP viewers this node takes.
    pub capacity: Option<u64>,
    /// Nodes whose leases say they are draining (read with the RTT probes' leases):
    /// passed over like suspects, their children move away while they still send.
    pub draining_nodes: Mutex<std::collections::BTreeSet<String>>,
    /// Nodes whose RTT probes went unanswered for [`probe::SUSPECT`] while this node
    /// takes rooms from them, since when: passed over when a room's parent is chosen.
    pub suspects: Mutex<HashMap<String, Instant>>,
    /// Suspicions raised, for /metrics.
    pub suspicions: AtomicU64,
    /// Rooms this node took from its parent in the room's tree (the directory's).
    in_trees: Mutex<std::collections::HashSet<String>>,
    /// Rooms whose tree this node is leaving, with the rounds tried.
    leaving: Mutex<HashMap<String, u8>>,
    /// The RTT to each other node measured last (microseconds), by [`probe`].
    pub rtt: Mutex<BTreeMap<String, u64>>,
    /// Viewers' reports of their edge probes, per node.
    pub edge_stats: Mutex<BTreeMap<String, edges::EdgeStat>>,
    /// Edge reports logged, at most 10 a second (the counters take them all).
    report_log: Mutex<Bucket>,
    pub lapse: Duration,
    pub status: Mutex<BTreeMap<String, UpstreamStatus>>,
    /// Per room, held while its upstream is asked: one call per room at a time
    /// (viewers arriving together share it; a slow upstream's refreshes do not pile
    /// up), and rooms asked concurrently, so one slow upstream starves no other.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Calls for rooms new to this node (a WHEP, a relay request from below).
    new_rooms: Mutex<Bucket>,
    /// Upstream calls made, for the snapshot: all, and those for rooms new here.
    pub calls: AtomicU64,
    pub new_room_calls: AtomicU64,
}

/// A token bucket: `rate` per second, at most `rate * 2` at once.
struct Bucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            tokens: 2.0 * rate as f64,
            rate: rate as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(2.0 * self.rate);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl Cascade {
    pub fn new(m: &Membership) -> Cascade {
        let cfg = &m.cfg;
        let config = StaticDirectory(cfg.upstream.clone());
        let directory: Box<dyn Directory> = if cfg.redis_url.is_some() {
            Box::new(Layered {
                config,
                redis: m.redis.clone(),
                degree: cfg.tree_degree,
            })
        } else {
            Box::new(config)
        };
        Cascade {
            identity: m.identity.clone(),
            directory,
            redis: m.redis.clone(),
            claims: Mutex::new(HashMap::new()),
            takeovers: Mutex::new(HashMap::new()),
            health: m.health.clone(),
            placements_per_second: cfg.placements_per_second,
            capacity: cfg.capacity,
            redis_configured: cfg.redis_url.is_some(),
            edge_stats: Mutex::new(BTreeMap::new()),
            report_log: Mutex::new(Bucket::new(5)),
            rtt: Mutex::new(BTreeMap::new()),
            leaving: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            draining_nodes: Mutex::new(Default::default()),
            suspicions: AtomicU64::new(0),
            in_trees: Mutex::new(Default::default()),
            lapse: Duration::from_secs(cfg.lapse),
            status: Mutex::new(BTreeMap::new()),
            fetching: Mutex::new(HashMap::new()),
            new_rooms: Mutex::new(Bucket::new(cfg.new_rooms_per_second)),
            calls: AtomicU64::new(0),
            new_room_calls: AtomicU64::new(0),
        }
    }

    pub fn node(&self) -> &str {
        &self.identity.node
    }

    /// The nodes suspected dead now (they answer again, or their suspicion is
    /// [`probe::FORGET`] old: no longer).
    pub fn avoid(&self) -> Vec<String> {
        let mut out = self.suspected();
        out.extend(self.draining_nodes.lock().unwrap().iter().cloned());
        out
    }

    /// The nodes suspected dead now, sorted (this node's lease says so).
    pub fn suspected(&self) -> Vec<String> {
        let now = Instant::now();
        let mut s = self.suspects.lock().unwrap();
        s.retain(|_, since| now.saturating_duration_since(*since) < probe::FORGET);
        let mut out: Vec<String> = s.keys().cloned().collect();
        out.sort();
        out
    }

    /// The cluster's Redis, once connected.
    pub fn redis(&self) -> Option<&crate::cluster::redis::Directory> {
        self.redis.get()
    }

    /// Rooms with publishers of this node's own (not relayed), when the cluster's
    /// directory is connected: claimed again every round, so a room published before
    /// Redis answered, or kept through a Redis that lost its data, is announced (one
    /// Lua call per room and second; a claim this node holds is a no-op).
    fn published_here(&self, st: &super::sfu::State) -> Vec<String> {
        if self.redis.get().is_none() {
            return vec![];
        }
        st.rooms
            .iter()
            .filter(|(_, r)| {
                r.publishers
                    .iter()
                    .any(|p| st.sessions.get(p).is_some_and(|s| s.relay.is_none()))
            })
            .map(|(room, _)| room.clone())
            .collect()
    }

    /// The room's fetch lock (made on first use; dropped by the round once unused).
    fn fetch_lock(&self, room: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.fetching
            .lock()
            .unwrap()
            .entry(room.to_string())
            .or_default()
            .clone()
    }

    /// Whether the room's upstream answered within the last second: a viewer that
    /// waited for another's call takes its answer instead of asking again.
    fn answered_just_now(&self, room: &str, now: Instant) -> bool {
        self.status.lock().unwrap().get(room).is_some_and(|s| {
            s.up && s
                .last_ok
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        })
    }

    /// Forgets what no room here needs any more: the state of rooms this node has no
    /// session of (an anonymous WHEP for a room that does not exist leaves nothing).
    fn expire(&self, live: impl Fn(&str) -> bool) {
        self.status.lock().unwrap().retain(|room, _| live(room));
        self.claims.lock().unwrap().retain(|room, _| live(room));
        self.takeovers.lock().unwrap().retain(|room, _| live(room));
        // A lock someone holds or waits on has other references.
        self.fetching
            .lock()
            .unwrap()
            .retain(|room, l| live(room) || Arc::strong_count(l) > 1);
    }
}

fn refused(status: u16, msg: impl Into<String>) -> ApiError {
    ApiError::Cascade(status, msg.into())
}

fn random_key(profile: Profile) -> MasterKey {
    let mut key = vec![0u8; profile.master_key_len()];
    let mut salt = vec![0u8; profile.master_salt_len()];
    rand::thread_rng().fill(&mut key[..]);
    rand::thread_rng().fill(&mut salt[..]);
    MasterKey::new(profile, &key, &salt).expect("lengths of the profile")
}

/// The WebRTC rooms as the node API serves them.
pub struct Rooms(pub Arc<Sfu>);

impl RoomRelay for Rooms {
    fn relay(&self, room: String, from: String, body: Vec<u8>) -> Answer {
        let sfu = self.0.clone();
        Box::pin(async move {
            let refusal = |status, message| Refusal { status, message };
            let req: RelayRequest = serde_json::from_slice(&body).map_err(|e| {
                refusal(
                    400,
                    format!(
                        "the relay request is not JSON {{\"node\": NAME, \"media\": \"IP:PORT\", \"via\": [..]}}: {e}"
                    ),
                )
            })?;
            if req.node != from {
                // Quoted short: the name is anyone's input, maybe a megabyte of it.
                let named: String = req.node.chars().take(40).collect();
                return Err(refusal(
                    403,
                    format!(
                        "node {from:?} signed a relay request for node {named:?}: a node asks only for itself"
                    ),
                ));
            }
            let reply = sfu
                .relay_request(&room, req)
                .await
                .map_err(|e| refusal(e.status(), e.to_string()))?;
            Ok(serde_json::to_vec(&reply).expect("a relay reply serializes"))
        })
    }
}

impl Sfu {
    /// For `/api/sessions`: the relays this node gives, and its upstreams by room.
    pub fn cascade_snapshot(&self) -> serde_json::Value {
        let Some(c) = self.cascade.get() else {
            return serde_json::Value::Null;
        };
        let st = self.state.lock().unwrap();
        let now = Instant::now();
        let relays: Vec<_> = st
            .relays_out
            .values()
            .map(|r| {
                serde_json::json!({
                    "room": r.room, "node": r.node, "publisher": r.publisher,
                    "to": r.addr.to_string(),
                    "expires_in_ms": r.expires.saturating_duration_since(now).as_millis() as u64,
                })
            })
            .collect();
        let upstreams: serde_json::Map<String, serde_json::Value> = c
            .status
            .lock()
            .unwrap()
            .iter()
            .map(|(room, s)| {
                let mut v = serde_json::to_value(s).expect("serializes");
                v["last_ok_ms_ago"] = s
                    .last_ok
                    .map(|t| serde_json::json!(now.duration_since(t).as_millis() as u64))
                    .unwrap_or(serde_json::Value::Null);
                (room.clone(), v)
            })
            .collect();
        serde_json::json!({
            "node": c.node(), "directory": c.redis.get().is_some(),
            "suspects": c.avoid(), "suspicions": c.suspicions.load(Ordering::Relaxed),
            "relays_out": relays, "upstreams": upstreams,
            "upstream_calls": c.calls.load(Ordering::Relaxed),
            "new_room_calls": c.new_room_calls.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request from a newer node, with a field this one does not know, is taken:
    /// the known fields as sent.
    #[test]
    fn a_newer_nodes_request_is_taken() {
        let r: RelayRequest = serde_json::from_str(
            r#"{"node": "b", "media": "192.0.2.2:5000", "via": ["c"], "layers": {"t1": 0}, "added_later": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!((r.node.as_str(), r.via.len(), r.layers["t1"]), ("b", 1, 0));
        // Without the optional fields (an older node's request).
        let r: RelayRequest =
            serde_json::from_str(r#"{"node": "b", "media": "192.0.2.2:5000"}"#).unwrap();
        assert!(r.via.is_empty() && r.layers.is_empty());
    }
}
