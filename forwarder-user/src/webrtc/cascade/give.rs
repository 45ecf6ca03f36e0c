//! The upstream's side of a room relay: a downstream node's request makes (or
//! refreshes) trunk copies of the room's publishers to its media address, and the
//! answer gives it what it needs to receive them, keys sealed for it.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use rand::Rng;

use super::{
    Cascade, Keys, RelayOut, RelayPublisher, RelayReply, RelayRequest, RelayTrack, random_key,
    refused, seal_context,
};
use crate::media::{
    engine::{Command, TrackId},
    simulcast::{Layer, UNCAPPED},
    srtp::MasterKey,
};
use crate::webrtc::sfu::{ApiError, Role, Sfu, State};

/// The publisher's receive key and our trunk key, sealed for `node`.
fn seal_keys(
    cascade: &Cascade,
    room: &str,
    node: &str,
    publisher: &str,
    rx: &MasterKey,
    trunk: &MasterKey,
) -> String {
    let keys = Keys {
        key: rx.key().to_vec(),
        salt: rx.salt().to_vec(),
        trunk_key: trunk.key().to_vec(),
        trunk_salt: trunk.salt().to_vec(),
    };
    let plain = serde_json::to_vec(&keys).expect("keys serialize");
    cascade
        .identity
        .seal(&seal_context(room, node, publisher), &plain)
}

/// Nodes per IP address that may take relays from this one: a few nodes behind one
/// address happen, hundreds of names from one host are someone multiplying copies.
const NODES_PER_IP: usize = 8;

/// One media address is one node (trunks to one address under many names would
/// multiply the copies it receives), and one IP holds at most [`NODES_PER_IP`].
fn check_peer_addresses(st: &State, req: &RelayRequest) -> Result<(), ApiError> {
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
    let known = st.relays_out.values().any(|r| r.node == req.node);
    let at_ip: std::collections::BTreeSet<&str> = st
        .relays_out
        .values()
        .filter(|r| r.addr.ip() == req.media.ip())
        .map(|r| r.node.as_str())
        .collect();
    if !known && at_ip.len() >= NODES_PER_IP {
        return Err(refused(
            409,
            format!(
                "{} nodes at {} take relays from this node already; at most {NODES_PER_IP} per address",
                at_ip.len(),
                req.media.ip()
            ),
        ));
    }
    Ok(())
}

/// What holds for any relay request before anything is done for it: node names as
/// the cluster has them, a chain no deeper than [`crate::cluster::MAX_DEPTH`], and no
/// cycle through this node (`me`).
fn check_request(me: &str, room: &str, req: &RelayRequest) -> Result<(), ApiError> {
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
    if req.node == me || req.via.iter().any(|n| n == me) {
        let mut chain = vec![me.to_string()];
        chain.extend(req.via.iter().rev().cloned());
        chain.push(req.node.clone());
        chain.push(me.to_string());
        return Err(refused(
            409,
            format!(
                "relaying room {room:?} would close a cycle: {}; fix the [[cluster.upstream]] entries",
                chain.join(" -> ")
            ),
        ));
    }
    Ok(())
}

impl Sfu {
    fn cascade_or_404(&self) -> Result<&Cascade, ApiError> {
        self.cascade.get().ok_or_else(|| {
            refused(
                404,
                "this node has no [cluster] section: it neither relays rooms nor takes relay requests",
            )
        })
    }

    /// Our media address as peers reach it.
    pub fn media_addr(&self) -> SocketAddr {
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
        check_request(cascade.node(), room, &req)?;
        self.check_epoch(cascade, room, &req)?;
        let mut via = req.via.clone();
        via.push(req.node.clone());
        self.ensure_upstream(room, via).await?;
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        check_peer_addresses(&st, &req)?;
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
            if let Some(p) = self.relay_publisher(&mut st, cascade, room, &req, pid, now)? {
                out.push(p);
            }
        }
        Ok(RelayReply {
            node: cascade.node().to_string(),
            media: self.media_addr(),
            publishers: out,
        })
    }

    /// Trunk copies of publisher `pid` to the requester (made, re-made after a lapse,
    /// or refreshed) and what it needs to receive them; None while the publisher is
    /// not connected or has sent nothing yet (the next refresh asks again).
    fn relay_publisher(
        self: &Arc<Self>,
        st: &mut State,
        cascade: &Cascade,
        room: &str,
        req: &RelayRequest,
        pid: String,
        now: Instant,
    ) -> Result<Option<RelayPublisher>, ApiError> {
        let s = &st.sessions[&pid];
        let Some(profile) = s.profile else {
            return Ok(None); // not connected yet: next refresh
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
            return Ok(None); // no media yet: its SSRCs are not known
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
            Some(r)
                if r.addr == req.media
                    && r.expires > now
                    && req.holding.as_ref().is_none_or(|h| h.contains(&origin_id)) =>
            {
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
                self.end_relay_out(st, old);
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
                reserve: None,
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
        Ok(Some(RelayPublisher {
            keys: seal_keys(cascade, room, &req.node, &origin_id, &key, &r.trunk_key),
            id: origin_id,
            rtcp_ssrc: r.peer_rtcp_ssrc,
            profile: profile.dtls_id(),
            streams,
            tracks,
        }))
    }

    /// Stops one relay's trunk copies (engine and fast-path binding).
    pub(super) fn end_relay_out(&self, st: &State, r: RelayOut) {
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
}
