//! Draining a node before maintenance or an upgrade (`edgefwd drain`, `POST
//! /api/drain`, SIGUSR1): the node stops taking new rooms and viewers (its lease says
//! `draining`, so placement, `/v1/edges` and the trees pass it over, and its own WHIP
//! and WHEP send new offers elsewhere with a 307); the nodes that take rooms from it
//! move to other parents while it still sends (they see the lease); after
//! [`HANDOFF`] it ends its viewers' sessions (the page, `edges.js` and `load-test
//! --edges` join another node at once) and its publishers' (WHIP clients publish
//! again, the room goes to another node), and the daemon exits once nothing is left
//! or at the deadline.

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
        // Viewers with an event stream move now, while this node still sends
        // (make-before-break); the others notice their session's end.
        if let Some(data) = self.move_notice() {
            let rooms: Vec<String> = {
                let st = self.state.lock().unwrap();
                st.rooms
                    .iter()
                    .filter(|(_, r)| !r.subscribers.is_empty())
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
        let sfu = self.clone();
        tokio::spawn(async move { sfu.drain(deadline).await });
        true
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
