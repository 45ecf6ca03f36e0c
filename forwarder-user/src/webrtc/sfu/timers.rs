//! The control plane's timers: the engines' (feedback, reports), the rooms' dominant
//! speakers, and sessions whose ICE never came or whose consent lapsed.

use super::*;

impl Sfu {
    /// The engine's timers when due (transport feedback every 100 ms, SR/RR every
    /// second); the caller runs this at [`Engine::poll_timeout`]'s pace.
    pub fn engine_tick(&self) -> Instant {
        let next = self
            .engines
            .run_timers()
            // Every engine has a worker: the speakers' pace.
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
        self.decide_speakers(Instant::now());
        next
    }

    /// Each room's dominant speaker from its publishers' audio levels; a change is
    /// logged and sent to the room's event stream.
    fn decide_speakers(&self, now: Instant) {
        // Who publishes audio with levels, per room (then the locks are let go).
        // Per room: (publisher session, its audio tracks with levels).
        type Publishers = Vec<(String, Vec<TrackId>)>;
        let rooms: Vec<(String, Publishers)> = {
            let st = self.state.lock().unwrap();
            st.rooms
                .iter()
                .map(|(name, r)| {
                    let pubs = r
                        .publishers
                        .iter()
                        .filter_map(|p| st.sessions.get(p))
                        .map(|s| {
                            let audio = s.tracks.iter().filter(|t| t.level_ext.is_some());
                            (s.id.clone(), audio.map(|t| t.media).collect())
                        })
                        .collect();
                    (name.clone(), pubs)
                })
                .collect()
        };
        let scored: Vec<(String, Vec<(String, u32)>)> = rooms
            .into_iter()
            .map(|(room, pubs)| {
                let scores = self.with_shard(self.shard_of_room(&room), |e, _| {
                    pubs.into_iter()
                        .map(|(id, tracks)| {
                            let score = tracks
                                .iter()
                                .filter_map(|t| e.track(*t))
                                .map(|t| t.levels.score(now))
                                .max()
                                .unwrap_or(0);
                            (id, score)
                        })
                        .collect()
                });
                (room, scores)
            })
            .collect();
        let mut speakers = self.speakers.lock().unwrap();
        // A room that ended had its speaker leave: said once, then forgotten.
        speakers.retain(|room, d| {
            let open = scored.iter().any(|(r, _)| r == room);
            if !open && d.current.is_some() {
                let _ = self.events.send(RoomEvent {
                    room: room.clone(),
                    kind: "active_speaker",
                    data: serde_json::json!({ "speaker": null, "changes": d.changes + 1 }),
                });
            }
            open
        });
        for (room, scores) in scored {
            let d = speakers.entry(room.clone()).or_default();
            if let Some(speaker) = d.update(&scores, now) {
                bump(&self.counters.speaker_changes);
                tracing::info!(event = "active_speaker", room, speaker = ?speaker, "room {room}: active speaker now {}", speaker.as_deref().unwrap_or("nobody"));
                let _ = self.events.send(RoomEvent {
                    room,
                    kind: "active_speaker",
                    data: serde_json::json!({ "speaker": speaker, "changes": d.changes }),
                });
            }
        }
    }

    /// A room's active speaker now (its publisher session id).
    pub fn active_speaker(&self, room: &str) -> Option<String> {
        self.speakers
            .lock()
            .unwrap()
            .get(room)
            .and_then(|d| d.current.clone())
    }

    /// Once a second: consent freshness here, the engine's reports (SR to
    /// subscribers, RR to publishers) when they are due.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        let ice_timeout = Duration::from_secs(self.limits.ice_timeout);
        let expired: Vec<(String, &str, &str)> = st
            .sessions
            .values()
            // Relayed publishers have no ICE: the cascade round keeps or ends them.
            .filter(|s| s.relay.is_none())
            .filter_map(|s| match s.last_consent {
                // Never connected: a short window, not the whole consent timeout.
                None if now - s.created > ice_timeout => Some((
                    s.id.clone(),
                    "ice_timeout",
                    "no valid ICE check since it was created",
                )),
                Some(at) if now - at > self.consent_timeout => {
                    Some((s.id.clone(), "consent_lost", "no ICE consent check"))
                }
                _ => None,
            })
            .collect();
        for (id, event, why) in expired {
            tracing::info!(event, session = %id, "session {id}: {why} within the timeout; removing it");
            self.remove(&mut st, &id);
        }
        drop(st);
        self.engines.run_timers();
    }
}
