//! The downstream's side of a room relay: asking the room's upstream when a viewer (or
//! a node below) wants a room this node has no publisher of, refreshing while there is
//! demand, and the relayed publishers the answers describe.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow};

use super::{
    Keys, RelayIn, RelayPublisher, RelayReply, RelayRequest, UpstreamStatus, refused, seal_context,
};
use crate::cluster::{directory::UpstreamConfig, identity::Identity, relay};
use crate::http::client::Outcome;
use crate::media::{
    engine::TrackId,
    simulcast::Layer,
    srtp::{MasterKey, Profile},
};
use crate::webrtc::sfu::{ApiError, Session, Sfu, Track};

/// Rounds a node tries to leave a room's tree (nodes below leave first).
const LEAVE_TRIES: u8 = 30;

/// The cascade of an SFU that has one (the callers checked).
fn cascade_of(sfu: &Sfu) -> &super::Cascade {
    sfu.cascade
        .get()
        .expect("cascade set at start, before any round")
}

/// A relayed publisher's keys, opened and checked against its profile.
struct Opened {
    profile: Profile,
    rx: MasterKey,
    trunk: MasterKey,
    /// Trunk key and salt as sent, to see a re-made relay.
    trunk_bytes: (Vec<u8>, Vec<u8>),
}

impl Opened {
    fn trunk_id(&self, rtcp_ssrc: u32) -> (u32, Vec<u8>, Vec<u8>) {
        (
            rtcp_ssrc,
            self.trunk_bytes.0.clone(),
            self.trunk_bytes.1.clone(),
        )
    }
}

/// Opens the keys the upstream sealed for this node.
fn open_keys(me: &Identity, room: &str, node: &str, p: &RelayPublisher) -> Result<Opened> {
    let plain = me.open(&seal_context(room, node, &p.id), &p.keys)?;
    let k: Keys = serde_json::from_slice(&plain).context("sealed keys are not the keys JSON")?;
    let profile = Profile::from_dtls(p.profile)
        .ok_or_else(|| anyhow!("unknown SRTP profile {:#06x}", p.profile))?;
    let rx = MasterKey::new(profile, &k.key, &k.salt).context("publisher key")?;
    let trunk = MasterKey::new(profile, &k.trunk_key, &k.trunk_salt).context("trunk key")?;
    Ok(Opened {
        profile,
        rx,
        trunk,
        trunk_bytes: (k.trunk_key, k.trunk_salt),
    })
}

impl Sfu {
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
        let has = || {
            let st = self.state.lock().unwrap();
            st.rooms.get(room).is_some_and(|r| !r.publishers.is_empty())
        };
        // A room this node carries already costs its viewers no directory call.
        if has() {
            return Ok(());
        }
        let avoid = cascade.avoid();
        let Some(up) = cascade.directory.upstream(room, &avoid).await else {
            return Ok(());
        };
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
                     ([cluster] new_rooms_per_second); retry in a second",
                    cascade.new_rooms.lock().unwrap().rate
                ),
            ));
        }
        cascade.new_room_calls.fetch_add(1, Ordering::Relaxed);
        self.fetch_upstream(room, &up, via).await
    }

    /// The origin ids of the publishers of `room` relayed here from `node` now.
    fn relayed_from(&self, room: &str, node: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        let Some(r) = st.rooms.get(room) else {
            return vec![];
        };
        r.publishers
            .iter()
            .filter_map(|p| st.sessions.get(p)?.relay.as_ref())
            .filter(|r| r.node == node)
            .map(|r| r.upstream_id.clone())
            .collect()
    }

    async fn fetch_upstream(
        self: &Arc<Self>,
        room: &str,
        up: &UpstreamConfig,
        via: Vec<String>,
    ) -> Result<(), ApiError> {
        let cascade = self.cascade.get().expect("checked by the callers");
        let req = RelayRequest {
            node: cascade.node().to_string(),
            media: self.media_addr(),
            via: via.clone(),
            layers: self.wanted_layers(room),
            epoch: up.epoch,
            holding: Some(self.relayed_from(room, &up.node)),
        };
        let body = serde_json::to_vec(&req).expect("serializes");
        cascade.calls.fetch_add(1, Ordering::Relaxed);
        let out = relay::ask(&cascade.identity, up.api, room, body).await;
        let result = match out {
            Outcome::Ok(b) => serde_json::from_slice::<RelayReply>(&b).map_err(|e| {
                format!(
                    "the answer is not a relay reply ({e}): is {} an edgefwd node's [cluster] api?",
                    up.api
                )
            }),
            // The room has no publisher upstream (yet): not a failure. Subscribers here
            // wait on their m-lines; the next rounds ask again.
            Outcome::Refused(m) if m.starts_with("404") && m.contains("has no publisher") => {
                Ok(RelayReply {
                    node: up.node.clone(),
                    media: up.api,
                    publishers: vec![],
                })
            }
            Outcome::Refused(m) => Err(format!("refused: {}", m.trim())),
            Outcome::Unreachable(m) => Err(format!("unreachable: {m}")),
        };
        let mut status = cascade.status.lock().unwrap();
        let entry = status.entry(room.to_string()).or_insert(UpstreamStatus {
            node: up.node.clone(),
            api: up.api,
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
                if up.epoch.is_some() {
                    // From the cluster's directory: this node is in the room's tree.
                    cascade.in_trees.lock().unwrap().insert(room.to_string());
                }
                self.apply_relay_reply(room, up, via, reply);
                Ok(())
            }
            Err(m) => {
                let msg = format!("upstream {} at {} for room {room}: {m}", up.node, up.api);
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
        let cascade = self.cascade.get().expect("checked by the callers");
        let mut st = self.state.lock().unwrap();
        let relayed: Vec<(String, String, String)> = st
            .rooms
            .get(room)
            .map(|r| r.publishers.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| {
                let r = st.sessions[&id].relay.as_ref()?;
                Some((id.clone(), r.upstream_id.clone(), r.node.clone()))
            })
            .collect();
        // A room comes from one upstream: the sessions from another are a parent this
        // node left (dead, suspected, re-homed). They go; the new parent's publishers
        // take their viewers' slots (numbering continues, a keyframe is asked).
        for (id, upstream_id, node) in relayed.iter().filter(|r| r.2 != up.node) {
            tracing::info!(event = "left", session = %id, room, "relayed publisher {upstream_id}: room {room} now comes from {} instead of {node}; session re-made", up.node);
            self.remove(&mut st, id);
        }
        let existing: Vec<(String, String)> = relayed
            .into_iter()
            .filter(|r| r.2 == up.node)
            .map(|r| (r.0, r.1))
            .collect();
        let me = cascade.node().to_string();
        let publishers: Vec<(RelayPublisher, Option<Opened>)> = reply
            .publishers
            .into_iter()
            .map(|p| {
                let keys = open_keys(&cascade.identity, room, &me, &p);
                if let Err(e) = &keys {
                    log::warn!(
                        "upstream {} sent publisher {} of room {room} with keys this node cannot use ({e:#}); skipped",
                        up.node,
                        p.id
                    );
                }
                (p, keys.ok())
            })
            .collect();
        let mut kept = Vec::new();
        for (id, upstream_id) in &existing {
            let Some((p, keys)) = publishers.iter().find(|(p, _)| &p.id == upstream_id) else {
                tracing::info!(event = "left", session = %id, room, "relayed publisher {upstream_id} left upstream {}", up.node);
                self.remove(&mut st, id);
                continue;
            };
            let trunk = &st.sessions[id].relay.as_ref().expect("relayed").trunk;
            if keys
                .as_ref()
                .is_none_or(|k| *trunk == k.trunk_id(p.rtcp_ssrc))
            {
                kept.push(upstream_id.clone());
                continue;
            }
            // The upstream re-made our relay (it had lapsed there): its RTCP SSRC and
            // trunk key are new, so is the session (viewers keep their numbering).
            tracing::info!(event = "left", session = %id, room, "relayed publisher {upstream_id}: upstream {} re-made the relay with a new trunk key; session re-made", up.node);
            self.remove(&mut st, id);
        }
        for (p, keys) in publishers {
            let Some(k) = keys.filter(|_| !kept.contains(&p.id)) else {
                continue;
            };
            let s = self.relayed_publisher(room, up, &via, reply.media, &p, &k);
            self.register_relay_in(&s, reply.media, k.rx, k.trunk, p.streams);
            tracing::info!(event = "joined", session = %s.id, room, upstream = %up.node, "relayed publisher {} from upstream {} joined room {room} as session {}", p.id, up.node, s.id);
            let id = st.insert(s);
            self.fill_slots(&mut st, &id);
        }
    }

    /// The session of an upstream's publisher `p`, relayed here.
    fn relayed_publisher(
        &self,
        room: &str,
        up: &UpstreamConfig,
        via: &[String],
        upstream_media: SocketAddr,
        p: &RelayPublisher,
        k: &Opened,
    ) -> Session {
        let mut s = self.relay_session(room, p.rtcp_ssrc, k.profile);
        s.relay = Some(RelayIn {
            node: up.node.clone(),
            api: up.api,
            epoch: up.epoch,
            upstream_id: p.id.clone(),
            via: via.to_vec(),
            trunk: k.trunk_id(p.rtcp_ssrc),
        });
        s.addrs = vec![upstream_media];
        s.nominated = Some(upstream_media);
        for t in &p.tracks {
            s.tracks.push(Track {
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
                media: self.media_id(room),
            });
        }
        s
    }

    /// Leaves the trees of the rooms this node stopped carrying (found now, and those
    /// still waiting): a node leaves only once no node below hangs on it, and the
    /// nodes below leave first, each in its own round, so it tries again each round
    /// (for up to [`LEAVE_TRIES`]) unless it relays the room again meanwhile.
    fn leave_trees(self: &Arc<Self>) {
        let cascade = cascade_of(self);
        let Some(d) = cascade.redis.get() else {
            return;
        };
        let rooms: Vec<String> = {
            let st = self.state.lock().unwrap();
            // A room this node took from its tree and no longer carries: no relayed
            // publisher (ended for lack of demand, or gone upstream), no viewer, no
            // node below.
            let carried = |room: &str| {
                st.rooms.get(room).is_some_and(|r| {
                    !r.subscribers.is_empty()
                        || r.publishers
                            .iter()
                            .any(|p| st.sessions.get(p).is_some_and(|s| s.relay.is_some()))
                }) || st.relays_out.values().any(|o| o.room == room)
            };
            let mut leaving = cascade.leaving.lock().unwrap();
            cascade.in_trees.lock().unwrap().retain(|room| {
                if carried(room) {
                    return true;
                }
                leaving.insert(room.clone(), 0);
                false
            });
            leaving.retain(|room, tries| {
                *tries += 1;
                *tries <= LEAVE_TRIES
                    && !st.rooms.get(room).is_some_and(|r| {
                        r.publishers
                            .iter()
                            .any(|p| st.sessions.get(p).is_some_and(|s| s.relay.is_some()))
                    })
            });
            leaving.keys().cloned().collect()
        };
        if rooms.is_empty() {
            return;
        }
        let (d, sfu) = (d.clone(), self.clone());
        tokio::spawn(async move {
            for room in rooms {
                match d.detach(&room).await {
                    Ok(true) => {
                        cascade_of(&sfu).leaving.lock().unwrap().remove(&room);
                    }
                    Ok(false) => {} // nodes below still: next round
                    Err(e) => log::debug!("{e:#}; tried again next round"),
                }
            }
        });
    }

    /// A room this node has a publisher of, and no upstream: its relayed publishers
    /// are an old origin's (the room was re-homed here). They end; the viewers' slots
    /// go to the room's own publishers.
    fn end_relays_of_own_room(&self, room: &str) {
        let mut st = self.state.lock().unwrap();
        let Some(r) = st.rooms.get(room) else {
            return;
        };
        let (relayed, own): (Vec<String>, Vec<String>) = r
            .publishers
            .iter()
            .cloned()
            .partition(|p| st.sessions.get(p).is_some_and(|s| s.relay.is_some()));
        if own.is_empty() {
            return;
        }
        for id in relayed {
            tracing::info!(event = "left", session = %id, room, "room {room} is this node's now: relayed publisher session {id} from its old origin ended");
            self.remove(&mut st, &id);
        }
        for id in own {
            self.fill_slots(&mut st, &id);
        }
    }

    /// Asks `room` of a parent none of the suspected nodes, now: a suspected parent's
    /// rooms (the call in flight for the room, if any, is waited for).
    pub async fn reparent(self: &Arc<Self>, room: &str) {
        let c = cascade_of(self);
        let lock = c.fetch_lock(room);
        let _one_at_a_time = lock.lock().await;
        let avoid = c.avoid();
        let via = {
            let st = self.state.lock().unwrap();
            st.sessions
                .values()
                .filter(|s| s.room == room)
                .find_map(|s| s.relay.as_ref().map(|r| r.via.clone()))
                .unwrap_or_default()
        };
        let Some(up) = c.directory.upstream(room, &avoid).await else {
            return;
        };
        if avoid.contains(&up.node) {
            // The config names it: there is no other to ask.
            return;
        }
        let _ = self.fetch_upstream(room, &up, via).await;
    }

    /// The cascade's once-a-second round: refreshes the relays this node takes while
    /// it has demand for them (ends them when it has none), ends the relays it gives
    /// whose requests lapsed.
    pub fn cascade_tick(self: &Arc<Self>) {
        let Some(_) = self.cascade.get() else {
            return;
        };
        let now = Instant::now();
        // (room, its upstream or None to look it up, the chain below).
        let mut refresh: Vec<(String, Option<UpstreamConfig>, Vec<String>)> = Vec::new();
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
                    if r.publishers.is_empty() && !r.subscribers.is_empty() {
                        refresh.push((room.clone(), None, vec![]));
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
                // An upstream suspected dead, or that has not answered for a lapse, is
                // looked up again (the directory may name another parent by now).
                let c = cascade_of(self);
                let suspect = c.suspects.lock().unwrap().contains_key(&ri.node);
                let lost = suspect
                    || c.status.lock().unwrap().get(&room).is_some_and(|s| {
                        !s.up
                            && s.last_ok
                                .is_none_or(|t| now.saturating_duration_since(t) > c.lapse)
                    });
                let up = (!lost).then(|| UpstreamConfig {
                    room: room.clone(),
                    node: ri.node.clone(),
                    api: ri.api,
                    epoch: ri.epoch,
                });
                refresh.push((room.clone(), up, ri.via.clone()));
            }
        }
        let cascade = self.cascade.get().expect("checked above");
        let published = {
            let st = self.state.lock().unwrap();
            cascade.expire(|room| st.rooms.contains_key(room));
            cascade.published_here(&st)
        };
        for room in published {
            let sfu = self.clone();
            tokio::spawn(async move {
                if let Ok(Some(url)) = sfu.claim_room(&room).await {
                    log::debug!(
                        "room {room:?} has publishers here, but the cluster's directory names \
                         another origin ({url}); its viewers elsewhere get that one's"
                    );
                }
            });
        }
        self.leave_trees();
        for (room, up, via) in refresh {
            // Each room on its own task: an unreachable upstream's calls wait out
            // their timeouts without delaying other rooms, or this round. A room whose
            // last call is still out is skipped (no pile of calls to a slow upstream).
            let Ok(guard) = cascade.fetch_lock(&room).try_lock_owned() else {
                continue;
            };
            let sfu = self.clone();
            tokio::spawn(async move {
                let up = match up {
                    Some(up) => Some(up),
                    None => {
                        let avoid = cascade_of(&sfu).avoid();
                        cascade_of(&sfu).directory.upstream(&room, &avoid).await
                    }
                };
                // A failure is recorded in the status and logged once per change.
                match up {
                    Some(up) => {
                        let _ = sfu.fetch_upstream(&room, &up, via).await;
                    }
                    None => sfu.end_relays_of_own_room(&room),
                }
                drop(guard);
            });
        }
    }
}
