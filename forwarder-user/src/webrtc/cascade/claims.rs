//! The cluster directory's claims from this node's side: WHIP asks whether this node
//! may be a room's origin (claimed in Redis, or a redirect to the origin), relay
//! requests are checked against the origin's epoch this node knows, and the load the
//! node's lease announces.

use std::sync::Arc;

use super::{ApiError, Cascade, RelayRequest};
use crate::webrtc::sfu::Sfu;

impl Sfu {
    /// WHIP's question to the cluster's directory: may this node be the room's origin?
    /// Ok(None): yes (claimed, or no Redis: rooms are placed where they are published);
    /// Ok(Some(url)): the room is another live node's, publish at its WHIP `url`.
    pub async fn claim_room(&self, room: &str) -> Result<Option<String>, ApiError> {
        let Some(c) = self.cascade.get() else {
            return Ok(None);
        };
        let Some(d) = c.redis.get() else {
            return if self.draining() {
                Err(ApiError::Cascade(
                    503,
                    "this node is draining: publish at another node".into(),
                ))
            } else {
                Ok(None)
            };
        };
        // A room published here already stays (claimed again); a room no live node
        // holds goes where the placement puts it.
        let has_publisher = {
            let st = self.state.lock().unwrap();
            st.rooms.get(room).is_some_and(|r| !r.publishers.is_empty())
        };
        let origin = if has_publisher {
            d.claim(room).await
        } else {
            d.place(room, c.placements_per_second).await
        };
        let origin = match origin {
            Ok(o) => o,
            Err(e) => {
                // Redis away: serve it here; the epochs sort it out once Redis is back.
                log::warn!("{e:#}; room {room:?} is published on this node meanwhile");
                return Ok(None);
            }
        };
        if origin.node == d.me() && self.draining() {
            // Its publisher publishes again as told: at the node that succeeds this one.
            return self.successor_url(d, room).await;
        }
        if origin.node == d.me() {
            c.claims
                .lock()
                .unwrap()
                .insert(room.to_string(), origin.epoch);
            return Ok(None);
        }
        match d.lease(&origin.node).await {
            Ok(Some(l)) if l.draining => {
                // The origin drains: the room goes to its successor, which takes it
                // over once the new publisher's media can flow (both publish meanwhile).
                let url = self.successor_url(d, room).await?;
                if url.is_none() {
                    c.takeovers.lock().unwrap().insert(room.to_string(), origin);
                }
                Ok(url)
            }
            Ok(Some(l)) => match l.http {
                Some(http) => Ok(Some(format!("{http}/whip/{room}"))),
                None => Err(ApiError::Cascade(
                    503,
                    format!(
                        "room {room:?} is node {}'s, which serves no WHIP; publish there",
                        origin.node
                    ),
                )),
            },
            // It lapsed between the claim and now: the next claim takes it over.
            _ => Err(ApiError::Cascade(
                503,
                format!("room {room:?} is changing nodes; retry in a second"),
            )),
        }
    }

    /// Where a room of a draining origin is published now: here (None), or the WHIP
    /// URL of the node that succeeds it.
    async fn successor_url(
        &self,
        d: &crate::cluster::redis::Directory,
        room: &str,
    ) -> Result<Option<String>, ApiError> {
        let busy = |m: String| Err(ApiError::Cascade(503, m));
        match d.successor(room, self.draining()).await {
            Ok(Some(l)) if l.node == d.me() => Ok(None),
            Ok(Some(l)) => match l.http {
                Some(http) => Ok(Some(format!("{http}/whip/{room}"))),
                None => busy(format!(
                    "room {room:?}: its next node {} serves no WHIP",
                    l.node
                )),
            },
            Ok(None) => busy(format!(
                "room {room:?}: its origin drains and no other node is live to take it; retry later"
            )),
            Err(e) => busy(format!("room {room:?}: {e:#}; retry in a second")),
        }
    }

    /// A publisher's keys are up: if its room's draining origin is handed to this node
    /// (its successor), the directory says so now, one epoch on. The room's relayed
    /// publishers (from the old origin) end and this node's publishers take their
    /// viewers' m-lines (numbering continues, a keyframe is asked); nodes below, which
    /// look for a new parent while theirs drains, find this node.
    pub fn take_over_if_due(self: &Arc<Self>, room: &str) {
        let Some(c) = self.cascade.get() else { return };
        let Some(from) = c.takeovers.lock().unwrap().get(room).cloned() else {
            return;
        };
        let Some(d) = c.redis.get().cloned() else {
            return;
        };
        let (sfu, room) = (self.clone(), room.to_string());
        tokio::spawn(async move {
            let c = sfu.cascade.get().expect("checked above");
            let now = match d.take_over(&room, &from).await {
                Ok(o) => o,
                Err(e) => {
                    log::warn!("{e:#}; the next publisher's keys try again");
                    return;
                }
            };
            c.takeovers.lock().unwrap().remove(&room);
            if now.node != d.me() {
                log::warn!(
                    "room {room:?} went to node {} (epoch {}) while this node took it over from {}; its publisher here stays until it is told",
                    now.node,
                    now.epoch,
                    from.node
                );
                return;
            }
            c.claims.lock().unwrap().insert(room.clone(), now.epoch);
            tracing::info!(
                event = "took_over",
                room = %room,
                from = %from.node,
                epoch = now.epoch,
                "room {room:?} taken over from draining node {} at epoch {}",
                from.node,
                now.epoch
            );
            let mut st = sfu.state.lock().unwrap();
            let (relayed, local): (Vec<String>, Vec<String>) = st
                .rooms
                .get(&room)
                .map(|r| r.publishers.clone())
                .unwrap_or_default()
                .into_iter()
                .partition(|id| st.sessions.get(id).is_some_and(|s| s.relay.is_some()));
            for id in relayed {
                tracing::info!(event = "left", session = %id, room = %room, "relayed publisher session {id} ended: room {room} is this node's now");
                sfu.remove(&mut st, &id);
            }
            for id in local {
                sfu.fill_slots(&mut st, &id);
            }
        });
    }

    /// Whether a relay request's epoch (if any) is the one of this node's claim.
    pub(super) fn check_epoch(
        &self,
        c: &Cascade,
        room: &str,
        req: &RelayRequest,
    ) -> Result<(), ApiError> {
        let Some(want) = req.epoch else {
            return Ok(());
        };
        // The origin's epoch as this node knows it: its own claim, else (a node
        // inside the room's tree) the epoch its relayed publishers came with. A node
        // that knows neither takes the room from its own parent first, as named in
        // the directory now.
        let claimed = c.claims.lock().unwrap().get(room).copied();
        let have = claimed.or_else(|| {
            let st = self.state.lock().unwrap();
            st.rooms.get(room).and_then(|r| {
                r.publishers
                    .iter()
                    .filter_map(|p| st.sessions.get(p)?.relay.as_ref()?.epoch)
                    .max()
            })
        });
        let Some(have) = have else {
            return if c.redis.get().is_some() {
                Ok(())
            } else {
                Err(stale(room, &req.node, want, None))
            };
        };
        if have == want {
            return Ok(());
        }
        Err(stale(room, &req.node, want, Some(have)))
    }
}

fn stale(room: &str, node: &str, want: u64, have: Option<u64>) -> ApiError {
    ApiError::Cascade(
        409,
        format!(
            "stale epoch: {node} asks for room {room:?} at epoch {want}, this node holds it at {}",
            have.map_or("none".to_string(), |h| h.to_string())
        ),
    )
}

impl Sfu {
    /// Rooms this node holds as origin in the cluster's directory.
    pub fn rooms_held(&self) -> usize {
        self.cascade
            .get()
            .map_or(0, |c| c.claims.lock().unwrap().len())
    }

    /// Sessions now, for this node's lease.
    pub fn session_count(&self) -> usize {
        self.state.lock().unwrap().sessions.len()
    }

    /// WHEP viewers now, for this node's lease (its `[cluster] capacity` bounds them).
    pub fn viewer_count(&self) -> usize {
        let st = self.state.lock().unwrap();
        st.sessions
            .values()
            .filter(|s| s.role == crate::webrtc::sfu::Role::Subscriber)
            .count()
    }
}
