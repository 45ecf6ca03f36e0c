//! Draining a node before maintenance or an upgrade (`edgefwd drain`, `POST
//! /api/drain`, SIGUSR1): the node stops taking new rooms and viewers (its lease says
//! `draining`, so placement, `/v1/edges` and the trees pass it over, and its own WHIP
//! and WHEP send new offers elsewhere with a 307); the nodes that take rooms from it
//! move to other parents while it still sends (they see the lease). Its clients are
//! told to move on their sessions' event streams: viewers join another node, and
//! publishers publish again (at the room's next node, which takes the room over in the
//! directory once their new keys are up, one epoch on) while still sending here, so
//! the nodes below switch to a parent that has the media already. After [`HANDOFF`] it
//! ends the sessions left (clients without an event stream notice the end), and the
//! daemon exits once nothing is left or at the deadline.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use super::sfu::{Role, Sfu};

/// From the start of a drain to the end of its sessions: the lease saying `draining`
/// reaches the other nodes (renewed each second, read by their probe rounds every
/// 3 s), which move their rooms away meanwhile.
pub const HANDOFF: Duration = Duration::from_secs(4);

/// A drain's deadline when none is given.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

impl Sfu {
    /// Whether this node is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts draining (false if it was already): the daemon exits when the node is
    /// empty, or `deadline` from now.
    pub fn start_drain(self: &Arc<Self>, deadline: Duration) -> bool {
        if self.draining.swap(true, Ordering::Relaxed) {
            return false;
        }
        tracing::warn!(
            event = "drain",
            deadline_s = deadline.as_secs(),
            "draining: no new rooms or viewers here; sessions end in {} s, the daemon exits when empty or in {} s",
            HANDOFF.as_secs(),
            deadline.as_secs()
        );
        // Clients with an event stream move now, while this node still sends and
        // receives (make-before-break): viewers watch at another node, publishers
        // publish at the room's next node too (which takes the room over once their
        // keys are up). The others notice their session's end.
        let sfu = self.clone();
        tokio::spawn(async move {
            sfu.mark_draining().await;
            sfu.tell_clients_to_move();
            sfu.drain(deadline).await
        });
        true
    }

    /// The lease says `draining` before any client is told to move (the node it asks
    /// next reads the lease); at most half a second, then the renewal says it.
    async fn mark_draining(&self) {
        let Some(d) = self.cascade.get().and_then(|c| c.redis()) else {
            return;
        };
        match tokio::time::timeout(Duration::from_millis(500), d.mark_draining()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("{e:#}; the lease says so at its next renewal"),
            Err(_) => {
                log::warn!("Redis is slow; the lease says this node drains at its next renewal")
            }
        }
    }

    fn tell_clients_to_move(&self) {
        if let Some(data) = self.move_notice() {
            let rooms: Vec<String> = {
                let st = self.state.lock().unwrap();
                st.rooms
                    .iter()
                    .filter(|(_, r)| {
                        !r.subscribers.is_empty()
                            || r.publishers
                                .iter()
                                .any(|p| st.sessions.get(p).is_some_and(|s| s.relay.is_none()))
                    })
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            for room in rooms {
                let _ = self.events.send(super::sfu::RoomEvent {
                    room,
                    kind: "move",
                    data: data.clone(),
                });
            }
        }
    }

    /// What a viewer's `move` event says while this node drains (None otherwise).
    pub fn move_notice(&self) -> Option<serde_json::Value> {
        self.draining().then(|| {
            serde_json::json!({ "reason": "draining", "ends_in_ms": HANDOFF.as_millis() as u64 })
        })
    }

    /// Whether session `id` is one of `room`'s.
    pub fn has_session(&self, room: &str, id: &str) -> bool {
        let st = self.state.lock().unwrap();
        st.sessions.get(id).is_some_and(|s| s.room == room)
    }

    async fn drain(self: Arc<Self>, deadline: Duration) {
        let until = Instant::now() + deadline;
        tokio::time::sleep(HANDOFF.min(deadline)).await;
        // Viewers first (they move at once), then publishers (they publish again at
        // another node; viewers elsewhere follow the room there).
        for role in [Role::Subscriber, Role::Publisher] {
            let ids: Vec<(String, String)> = {
                let st = self.state.lock().unwrap();
                st.sessions
                    .iter()
                    .filter(|(_, s)| s.role == role && s.relay.is_none())
                    .map(|(id, s)| (id.clone(), s.room.clone()))
                    .collect()
            };
            for (id, room) in ids {
                let _ = self.leave(&room, &id, role);
            }
        }
        loop {
            let left = {
                let st = self.state.lock().unwrap();
                st.sessions.len() + st.relays_out.len()
            };
            if left == 0 {
                tracing::warn!(event = "drained", "drained: no session left; exiting");
                break;
            }
            if Instant::now() >= until {
                tracing::warn!(
                    event = "drained",
                    left,
                    "drain deadline: {left} session(s) and relays left; exiting"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.drained.notify_one();
    }
}
