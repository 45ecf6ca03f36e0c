//! WebRTC rooms across nodes: a subscriber on node B (or C, further down) watches a
//! room whose publisher is on node A.
//!
//! The downstream node asks its upstream for the room over the node API
//! (`POST /node/v1/rooms/{room}/relay`, cluster secret as Bearer) and refreshes that
//! about once a second while it has demand (its own subscribers, or relays of its
//! own further down). The upstream answers with, per publisher: its tracks, its SRTP
//! receive master key and each stream's highest authenticated index (the handover:
//! the downstream decrypts and authenticates every packet itself), and a trunk key
//! for the RTCP the downstream sends back. It then copies the publisher's SRTP and
//! SRTCP, as they arrived and once they authenticated, to the downstream's media
//! address: no crypto per trunk copy. A request that is not refreshed lapses and the
//! trunk copies stop; a publisher gone upstream disappears downstream at the next
//! refresh.
//!
//! At the downstream, each upstream publisher is a publisher session of the room
//! (role publisher, `upstream` set), so WHEP subscribers get its tracks like any
//! other's; keyframe requests and NACKs its engine sends that publisher go up the
//! trunk with the trunk key and reach the real publisher (the engine at each hop
//! answers NACKs from its own cache first). Receiver reports end at each hop.
//!
//! Loop-free: each request carries the chain of nodes below (`via`); a node that
//! finds itself there refuses (409, naming the cycle). Which upstream serves a room
//! is a [`Directory`] (from config today; a cluster directory later).
//!
//! The keys travel in the body of an HTTP request authenticated with the cluster
//! secret: never in a URL, a log line or a metric label. Plain HTTP does not hide
//! them from the wire: run the node API on a private network (or TLS in front).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::sdp::Codec;
use super::sfu::{ApiError, Role, Sfu};
use crate::cluster::directory::{Directory, StaticDirectory, UpstreamConfig};
use crate::http::client::{Outcome, call};
use crate::media::{
    Kind,
    engine::{Command, SessionId, TrackId},
    simulcast::{Layer, UNCAPPED},
    srtp::{MasterKey, Profile},
};

/// `[webrtc.cascade]`: this node in a WebRTC cascade.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    /// This node's name (what its upstream sees in `via` and in its relays).
    pub node: String,
    /// The cluster secret, the same on every node. Prefer `secret_file`.
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    /// Seconds a downstream's request lasts without a refresh (default 5).
    #[serde(default = "default_lapse")]
    pub lapse: u64,
    /// Which upstream node serves which room.
    #[serde(default)]
    pub upstream: Vec<UpstreamConfig>,
    /// Rooms new to this node asked of upstreams per second, at most (default 20):
    /// each anonymous WHEP for an unknown room would otherwise cost an upstream call.
    #[serde(default = "default_new_rooms")]
    pub new_rooms_per_second: u32,
}

fn default_lapse() -> u64 {
    5
}

fn default_new_rooms() -> u32 {
    20
}

impl CascadeConfig {
    pub fn check(&self) -> Result<()> {
        if self.node.is_empty() {
            bail!("[webrtc.cascade] node = \"\": give this node a name (e.g. \"edge-1\")");
        }
        crate::cluster::read_secret(&self.secret, &self.secret_file, "[webrtc.cascade]")?;
        for u in &self.upstream {
            if u.node == self.node {
                bail!(
                    "[[webrtc.cascade.upstream]] room {:?}: the upstream is this node ({}) itself",
                    u.room,
                    u.node
                );
            }
        }
        if self.lapse == 0 {
            bail!("[webrtc.cascade] lapse = 0 would end every relay at once; give seconds ≥ 1");
        }
        if self.new_rooms_per_second == 0 {
            bail!(
                "[webrtc.cascade] new_rooms_per_second = 0 would never ask an upstream for a \
                 room; give at least 1 (default 20)"
            );
        }
        Ok(())
    }
}

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
    pub key: Vec<u8>,
    pub salt: Vec<u8>,
    pub trunk_key: Vec<u8>,
    pub trunk_salt: Vec<u8>,
    /// Per SSRC, the highest packet index the upstream authenticated.
    pub streams: Vec<(u32, u64)>,
    pub tracks: Vec<RelayTrack>,
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
    pub http: SocketAddr,
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
    pub http: SocketAddr,
    pub up: bool,
    pub message: String,
    #[serde(skip)]
    pub last_ok: Option<Instant>,
    pub publishers: usize,
}

pub struct Cascade {
    pub node: String,
    secret: String,
    directory: Box<dyn Directory>,
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
    pub fn new(cfg: &CascadeConfig) -> Result<Cascade> {
        cfg.check()?;
        Ok(Cascade {
            node: cfg.node.clone(),
            secret: crate::cluster::read_secret(&cfg.secret, &cfg.secret_file, "[webrtc.cascade]")?,
            directory: Box::new(StaticDirectory(cfg.upstream.clone())),
            lapse: Duration::from_secs(cfg.lapse),
            status: Mutex::new(BTreeMap::new()),
            fetching: Mutex::new(HashMap::new()),
            new_rooms: Mutex::new(Bucket::new(cfg.new_rooms_per_second)),
            calls: AtomicU64::new(0),
            new_room_calls: AtomicU64::new(0),
        })
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
        // A lock someone holds or waits on has other references.
        self.fetching
            .lock()
            .unwrap()
            .retain(|room, l| live(room) || Arc::strong_count(l) > 1);
    }

    /// Whether `bearer` is the cluster secret (constant time).
    pub fn authorized(&self, bearer: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(bearer.as_bytes(), self.secret.as_bytes())
            .is_ok()
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

impl Sfu {
    fn cascade_or_404(&self) -> Result<&Cascade, ApiError> {
        self.cascade.get().ok_or_else(|| {
            refused(
                404,
                "this node has no [webrtc.cascade] section: it neither relays rooms nor takes relay requests",
            )
        })
    }

    /// Our media address as peers reach it.
    fn media_addr(&self) -> SocketAddr {
        self.candidates[0]
    }

    /// The node API's relay request: trunk copies of `room`'s publishers to the
    /// requesting node (made or refreshed), and what it needs to receive them.
    pub async fn relay_request(
        self: &Arc<Self>,
        room: &str,
        req: RelayRequest,
    ) -> Result<RelayReply, ApiError> {
        let cascade = self.cascade_or_404()?;
        // Names go into logs, maps and other nodes' chains: the cluster's rule for
        // node names, checked before anything else (a newline would forge log lines).
        for n in std::iter::once(&req.node).chain(&req.via) {
            crate::cluster::check_name(n).map_err(|e| {
                refused(
                    400,
                    format!("{e:#} (relay requests name nodes as [cluster] does)"),
                )
            })?;
        }
        if req.via.len() >= crate::cluster::MAX_DEPTH {
            return Err(refused(
                409,
                format!(
                    "the chain below is {} nodes long; a cascade is at most {} deep",
                    req.via.len(),
                    crate::cluster::MAX_DEPTH
                ),
            ));
        }
        if req.node == cascade.node || req.via.contains(&cascade.node) {
            let mut chain = vec![cascade.node.clone()];
            chain.extend(req.via.iter().rev().cloned());
            chain.push(req.node.clone());
            chain.push(cascade.node.clone());
            return Err(refused(
                409,
                format!(
                    "relaying room {room:?} would close a cycle: {}; fix the [[webrtc.cascade.upstream]] entries",
                    chain.join(" -> ")
                ),
            ));
        }
        let mut via = req.via.clone();
        via.push(req.node.clone());
        self.ensure_upstream(room, via).await?;
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        // One media address is one node: trunks to one address under many names
        // would multiply the copies it receives.
        if let Some(other) = st
            .relays_out
            .values()
            .find(|r| r.addr == req.media && r.node != req.node)
        {
            return Err(refused(
                409,
                format!(
                    "media address {} takes node {}'s relays already; one address is one node",
                    req.media, other.node
                ),
            ));
        }
        let publishers: Vec<String> = st
            .rooms
            .get(room)
            .map(|r| r.publishers.clone())
            .unwrap_or_default();
        if publishers.is_empty() {
            return Err(ApiError::UnknownRoom(room.to_string()));
        }
        let mut out = Vec::new();
        for pid in publishers {
            let s = &st.sessions[&pid];
            let Some(profile) = s.profile else {
                continue; // not connected yet: next refresh
            };
            let origin_id = s
                .relay
                .as_ref()
                .map_or(pid.clone(), |r| r.upstream_id.clone());
            // Per track every encoding's SSRC; all must be known (seen or signalled).
            let (handover, ssrcs) = self.with_shard(self.shard_of(s.media), |e, _| {
                let ssrcs: Option<Vec<Vec<u32>>> = s
                    .tracks
                    .iter()
                    .map(|t| match e.track(t.media) {
                        Some(m) => m.streams.iter().map(|st| st.ssrc).collect(),
                        None => t.streams.iter().map(|st| st.1).collect(),
                    })
                    .collect();
                (e.relay_handover(s.media), ssrcs)
            });
            let (Some((key, streams)), Some(ssrcs)) = (handover, ssrcs) else {
                continue; // no media yet: its SSRCs are not known
            };
            let tracks: Vec<RelayTrack> = s
                .tracks
                .iter()
                .zip(&ssrcs)
                .map(|(t, ssrcs)| RelayTrack {
                    kind: t.kind,
                    mid: t.mid.clone(),
                    track_id: t.track_id.clone(),
                    ssrc: ssrcs[0],
                    layers: if ssrcs.len() > 1 {
                        ssrcs.clone()
                    } else {
                        vec![]
                    },
                    codec: t.codec.clone(),
                    dd_ext: t.dd_ext,
                })
                .collect();
            let track_ids: Vec<_> = s.tracks.iter().map(|t| t.media).collect();
            let simulcast: Vec<(TrackId, Layer)> = s
                .tracks
                .iter()
                .filter(|t| t.streams.len() > 1)
                .map(|t| {
                    let cap = req.layers.get(&t.track_id).copied();
                    (t.media, cap.unwrap_or(UNCAPPED))
                })
                .collect();
            let k = (req.node.clone(), pid.clone());
            let fresh = match st.relays_out.get_mut(&k) {
                // A lapsed request is gone even if the round has not ended it yet:
                // the requester learns the new trunk key from this answer.
                Some(r) if r.addr == req.media && r.expires > now => {
                    r.expires = now + cascade.lapse;
                    None
                }
                _ => Some(()),
            };
            if fresh.is_some() && st.relays_out.len() >= self.limits.max_sessions {
                return Err(refused(
                    503,
                    format!(
                        "this node relays {} publishers to other nodes already, as many as \
                         [webrtc.limits] max_sessions allows",
                        st.relays_out.len()
                    ),
                ));
            }
            if fresh.is_some() {
                if let Some(old) = st.relays_out.remove(&k) {
                    self.end_relay_out(&st, old);
                }
                let r = RelayOut {
                    room: room.to_string(),
                    node: req.node.clone(),
                    publisher: pid.clone(),
                    media: self.media_id(room),
                    addr: req.media,
                    peer_rtcp_ssrc: rand::thread_rng().gen_range(1..=u32::MAX),
                    trunk_key: random_key(profile),
                    expires: now + cascade.lapse,
                };
                self.command(Command::AddSession {
                    id: r.media,
                    role: Role::Relay,
                    rtcp_ssrc: rand::thread_rng().gen_range(1..=u32::MAX),
                });
                self.command(Command::BindRelay {
                    id: r.media,
                    addr: r.addr,
                    ssrcs: vec![r.peer_rtcp_ssrc],
                });
                self.command(Command::SetKeys {
                    id: r.media,
                    rx: r.trunk_key.clone(),
                    tx: r.trunk_key.clone(),
                });
                for t in &track_ids {
                    self.command(Command::AddTrunk {
                        track: *t,
                        relay: r.media,
                    });
                }
                self.bind_fast(r.media, r.addr);
                tracing::info!(
                    event = "relay_started",
                    room,
                    node = %req.node,
                    publisher = %pid,
                    "room {room}: relaying publisher {pid} to node {} at {}",
                    req.node,
                    r.addr
                );
                st.relays_out.insert(k.clone(), r);
            }
            let r = &st.relays_out[&k];
            // Encodings nobody below watches stay here (asked again every refresh).
            for (track, max_layer) in &simulcast {
                self.command(Command::SetTrunkLayers {
                    track: *track,
                    relay: r.media,
                    max_layer: *max_layer,
                });
            }
            out.push(RelayPublisher {
                id: origin_id,
                rtcp_ssrc: r.peer_rtcp_ssrc,
                profile: profile.dtls_id(),
                key: key.key().to_vec(),
                salt: key.salt().to_vec(),
                trunk_key: r.trunk_key.key().to_vec(),
                trunk_salt: r.trunk_key.salt().to_vec(),
                streams,
                tracks,
            });
        }
        Ok(RelayReply {
            node: cascade.node.clone(),
            media: self.media_addr(),
            publishers: out,
        })
    }

    /// Per simulcast track relayed into `room` here, the highest encoding wanted: the
    /// highest any local viewer may get (its cap and its bandwidth limit; paused
    /// viewers none), every encoding when nodes below relay the room on, the lowest
    /// when nobody watches it.
    fn wanted_layers(&self, room: &str) -> std::collections::BTreeMap<String, Layer> {
        let st = self.state.lock().unwrap();
        let Some(r) = st.rooms.get(room) else {
            return Default::default();
        };
        let onward = st.relays_out.values().any(|o| o.room == room);
        let tracks: Vec<(String, TrackId)> = r
            .publishers
            .iter()
            .filter_map(|p| st.sessions.get(p))
            .filter(|s| s.relay.is_some())
            .flat_map(|s| s.tracks.iter())
            .filter(|t| t.streams.len() > 1)
            .map(|t| (t.track_id.clone(), t.media))
            .collect();
        if onward || tracks.is_empty() {
            return Default::default();
        }
        self.with_shard(self.shard_of_room(room), |e, _| {
            tracks
                .into_iter()
                .filter_map(|(id, media)| {
                    let t = e.track(media)?;
                    let top = t.streams.len().saturating_sub(1) as Layer;
                    let want = t
                        .downs
                        .iter()
                        .filter(|d| !d.layering.paused)
                        .map(|d| d.layering.cap().min(top))
                        .max()
                        .unwrap_or(0);
                    // All of them: no need to name it (older upstreams ignore none).
                    (want < top).then_some((id, want))
                })
                .collect()
        })
    }

    /// Stops one relay's trunk copies (engine and fast-path binding).
    fn end_relay_out(&self, st: &super::sfu::State, r: RelayOut) {
        self.command(Command::RemoveSession { id: r.media });
        self.unbind_fast_unless_used(st, r.addr);
        tracing::info!(
            event = "relay_ended",
            room = %r.room,
            node = %r.node,
            "room {}: relay of publisher {} to node {} ended",
            r.room,
            r.publisher,
            r.node
        );
    }

    /// When `room` has no publisher here and the directory names an upstream for
    /// it: asks the upstream now, so a WHEP subscriber (or a relay request from
    /// further down) finds the room's tracks.
    pub async fn ensure_upstream(
        self: &Arc<Self>,
        room: &str,
        via: Vec<String>,
    ) -> Result<(), ApiError> {
        let Some(cascade) = self.cascade.get() else {
            return Ok(());
        };
        let Some(up) = cascade.directory.upstream(room) else {
            return Ok(());
        };
        let has = || {
            let st = self.state.lock().unwrap();
            st.rooms.get(room).is_some_and(|r| !r.publishers.is_empty())
        };
        if has() {
            return Ok(());
        }
        let lock = cascade.fetch_lock(room);
        let _one_at_a_time = lock.lock().await;
        let now = Instant::now();
        if has() || cascade.answered_just_now(room, now) {
            return Ok(());
        }
        if !cascade.new_rooms.lock().unwrap().take(now) {
            return Err(refused(
                503,
                format!(
                    "this node asks its upstreams for rooms new to it at most {} times a second \
                     ([webrtc.cascade] new_rooms_per_second); retry in a second",
                    cascade.new_rooms.lock().unwrap().rate
                ),
            ));
        }
        cascade.new_room_calls.fetch_add(1, Ordering::Relaxed);
        self.fetch_upstream(room, &up, via).await
    }

    async fn fetch_upstream(
        self: &Arc<Self>,
        room: &str,
        up: &UpstreamConfig,
        via: Vec<String>,
    ) -> Result<(), ApiError> {
        let cascade = self.cascade.get().expect("checked by the callers");
        let req = RelayRequest {
            node: cascade.node.clone(),
            media: self.media_addr(),
            via: via.clone(),
            layers: self.wanted_layers(room),
        };
        let body = serde_json::to_vec(&req).expect("serializes");
        let path = format!("/node/v1/rooms/{room}/relay");
        cascade.calls.fetch_add(1, Ordering::Relaxed);
        let out = call(
            up.http,
            Some(&cascade.secret),
            hyper::Method::POST,
            &path,
            body,
        )
        .await;
        let result = match out {
            Outcome::Ok(b) => serde_json::from_slice::<RelayReply>(&b).map_err(|e| {
                format!("the answer is not a relay reply ({e}): is {} an edgefwd [webrtc] http address?", up.http)
            }),
            // The room has no publisher upstream (yet): not a failure. Subscribers here
            // wait on their m-lines; the next rounds ask again.
            Outcome::Refused(m) if m.starts_with("404") && m.contains("has no publisher") => {
                Ok(RelayReply {
                    node: up.node.clone(),
                    media: up.http,
                    publishers: vec![],
                })
            }
            Outcome::Refused(m) => Err(format!("refused: {}", m.trim())),
            Outcome::Unreachable(m) => Err(format!("unreachable: {m}")),
        };
        let mut status = cascade.status.lock().unwrap();
        let entry = status.entry(room.to_string()).or_insert(UpstreamStatus {
            node: up.node.clone(),
            http: up.http,
            up: false,
            message: String::new(),
            last_ok: None,
            publishers: 0,
        });
        match result {
            Ok(reply) => {
                entry.up = true;
                entry.message = "ok".into();
                entry.last_ok = Some(Instant::now());
                entry.publishers = reply.publishers.len();
                drop(status);
                self.apply_relay_reply(room, up, via, reply);
                Ok(())
            }
            Err(m) => {
                let msg = format!("upstream {} at {} for room {room}: {m}", up.node, up.http);
                if entry.up || entry.message != msg {
                    log::warn!("{msg}");
                }
                entry.up = false;
                entry.message = msg.clone();
                Err(refused(503, msg))
            }
        }
    }

    /// Makes the room's relayed publishers from `up` those of the reply.
    fn apply_relay_reply(
        self: &Arc<Self>,
        room: &str,
        up: &UpstreamConfig,
        via: Vec<String>,
        reply: RelayReply,
    ) {
        let mut st = self.state.lock().unwrap();
        let existing: Vec<(String, String)> = st
            .rooms
            .get(room)
            .map(|r| r.publishers.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| {
                let r = st.sessions[&id].relay.as_ref()?;
                (r.node == up.node).then(|| (id.clone(), r.upstream_id.clone()))
            })
            .collect();
        let mut kept = Vec::new();
        for (id, upstream_id) in &existing {
            let Some(p) = reply.publishers.iter().find(|p| &p.id == upstream_id) else {
                tracing::info!(event = "left", session = %id, room, "relayed publisher {upstream_id} left upstream {}", up.node);
                self.remove(&mut st, id);
                continue;
            };
            let trunk = &st.sessions[id].relay.as_ref().expect("relayed").trunk;
            if *trunk == (p.rtcp_ssrc, p.trunk_key.clone(), p.trunk_salt.clone()) {
                kept.push(upstream_id.clone());
                continue;
            }
            // The upstream re-made our relay (it had lapsed there): its RTCP SSRC and
            // trunk key are new, so is the session (viewers keep their numbering).
            tracing::info!(event = "left", session = %id, room, "relayed publisher {upstream_id}: upstream {} re-made the relay with a new trunk key; session re-made", up.node);
            self.remove(&mut st, id);
        }
        for p in reply.publishers {
            if kept.contains(&p.id) {
                continue;
            }
            let keys = Profile::from_dtls(p.profile).and_then(|profile| {
                Some((
                    profile,
                    MasterKey::new(profile, &p.key, &p.salt).ok()?,
                    MasterKey::new(profile, &p.trunk_key, &p.trunk_salt).ok()?,
                ))
            });
            let Some((profile, rx, trunk)) = keys else {
                log::warn!(
                    "upstream {} sent publisher {} of room {room} with an unknown SRTP profile or bad key lengths; skipped",
                    up.node,
                    p.id
                );
                continue;
            };
            let mut s = self.relay_session(room, p.rtcp_ssrc, profile);
            s.relay = Some(RelayIn {
                node: up.node.clone(),
                http: up.http,
                upstream_id: p.id.clone(),
                via: via.clone(),
                trunk: (p.rtcp_ssrc, p.trunk_key.clone(), p.trunk_salt.clone()),
            });
            s.addrs = vec![reply.media];
            s.nominated = Some(reply.media);
            for t in &p.tracks {
                s.tracks.push(super::sfu::Track {
                    kind: t.kind,
                    mid: t.mid.clone(),
                    codec: t.codec.clone(),
                    // A relayed simulcast track keeps its encodings (SSRCs known).
                    streams: if t.layers.len() > 1 {
                        t.layers.iter().map(|l| (None, Some(*l))).collect()
                    } else {
                        vec![(None, Some(t.ssrc))]
                    },
                    rid_ext: None,
                    // Congestion feedback is between the publisher and its own node.
                    twcc_ext: None,
                    // Speakers are decided at the publisher's own node.
                    level_ext: None,
                    dd_ext: t.dd_ext,
                    track_id: t.track_id.clone(),
                    media: self.media_id(&s.room),
                });
            }
            self.register_relay_in(&s, reply.media, rx, trunk, p.streams);
            tracing::info!(event = "joined", session = %s.id, room, upstream = %up.node, "relayed publisher {} from upstream {} joined room {room} as session {}", p.id, up.node, s.id);
            let id = st.insert(s);
            self.fill_slots(&mut st, &id);
        }
    }

    /// The cascade's once-a-second round: refreshes the relays this node takes while
    /// it has demand for them (ends them when it has none), ends the relays it gives
    /// whose requests lapsed.
    pub fn cascade_tick(self: &Arc<Self>) {
        let Some(_) = self.cascade.get() else {
            return;
        };
        let now = Instant::now();
        let mut refresh: Vec<(String, UpstreamConfig, Vec<String>)> = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            let lapsed: Vec<_> = st
                .relays_out
                .iter()
                .filter(|(_, r)| r.expires <= now || !st.sessions.contains_key(&r.publisher))
                .map(|(k, _)| k.clone())
                .collect();
            for k in lapsed {
                if let Some(r) = st.relays_out.remove(&k) {
                    self.end_relay_out(&st, r);
                }
            }
            let rooms: Vec<String> = st.rooms.keys().cloned().collect();
            for room in rooms {
                let r = &st.rooms[&room];
                let relayed: Vec<String> = r
                    .publishers
                    .iter()
                    .filter(|id| st.sessions[*id].relay.is_some())
                    .cloned()
                    .collect();
                if relayed.is_empty() {
                    // Viewers waiting for a room no one publishes to here: keep asking
                    // its upstream, so they get it once someone publishes there.
                    let waiting = r.publishers.is_empty() && !r.subscribers.is_empty();
                    if let Some(up) = waiting
                        .then(|| self.cascade.get().and_then(|c| c.directory.upstream(&room)))
                        .flatten()
                    {
                        refresh.push((room.clone(), up, vec![]));
                    }
                    continue;
                }
                let demand =
                    !r.subscribers.is_empty() || st.relays_out.values().any(|o| o.room == room);
                if !demand {
                    for id in relayed {
                        tracing::info!(event = "left", session = %id, room = %room, "room {room}: no subscriber here any more; relayed publisher session {id} ended");
                        self.remove(&mut st, &id);
                    }
                    continue;
                }
                let ri = st.sessions[&relayed[0]].relay.as_ref().expect("relayed");
                refresh.push((
                    room.clone(),
                    UpstreamConfig {
                        room: room.clone(),
                        node: ri.node.clone(),
                        http: ri.http,
                    },
                    ri.via.clone(),
                ));
            }
        }
        let cascade = self.cascade.get().expect("checked above");
        {
            let st = self.state.lock().unwrap();
            cascade.expire(|room| st.rooms.contains_key(room));
        }
        for (room, up, via) in refresh {
            // Each room on its own task: an unreachable upstream's calls wait out
            // their timeouts without delaying other rooms, or this round. A room whose
            // last call is still out is skipped (no pile of calls to a slow upstream).
            let Ok(guard) = cascade.fetch_lock(&room).try_lock_owned() else {
                continue;
            };
            let sfu = self.clone();
            tokio::spawn(async move {
                // A failure is recorded in the status and logged once per change.
                let _ = sfu.fetch_upstream(&room, &up, via).await;
                drop(guard);
            });
        }
    }

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
            "node": c.node, "relays_out": relays, "upstreams": upstreams,
            "upstream_calls": c.calls.load(Ordering::Relaxed),
            "new_room_calls": c.new_room_calls.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rooms_own_entry_wins_over_the_wildcard() {
        let u = |room: &str, node: &str| UpstreamConfig {
            room: room.into(),
            node: node.into(),
            http: "127.0.0.1:1".parse().unwrap(),
        };
        let d = StaticDirectory(vec![u("*", "any"), u("live", "origin")]);
        assert_eq!(d.upstream("live").unwrap().node, "origin");
        assert_eq!(d.upstream("other").unwrap().node, "any");
        assert!(
            StaticDirectory(vec![u("live", "o")])
                .upstream("x")
                .is_none()
        );
    }

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
