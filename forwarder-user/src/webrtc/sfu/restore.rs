//! Sessions of an earlier process taken up again ([`super::keep`] saved them): the
//! same session ids, ICE credentials, bound addresses, SRTP keys and m-lines, so the
//! clients notice nothing but a gap. Publishers first (their tracks get new engine
//! handles), then subscribers, whose down-tracks continue one number past what was
//! persisted and ask for a keyframe.

use super::keep::{AHEAD, Saved, key_from_hex};
use super::*;
use crate::media::{
    engine::{Persisted, Reserve},
    srtp::Marks,
};

/// What taking up saved sessions came to.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Restored {
    pub publishers: usize,
    pub subscribers: usize,
    /// The oldest save taken up, in ms (how stale the newest numbering is).
    pub oldest_ms: u64,
    /// Files that could not be taken up (each logged).
    pub refused: usize,
}

/// The reservation past `after`: each stream `AHEAD` further.
fn ahead_of(after: &Marks) -> Marks {
    Marks {
        rtp: after.rtp.iter().map(|&(s, m)| (s, m + AHEAD)).collect(),
        rtcp: Some(after.rtcp.map_or(0, |r| r.saturating_add(1)) + AHEAD as u32),
    }
}

fn mark_of(m: &Marks, ssrc: u32) -> Option<u64> {
    m.rtp.iter().find(|(s, _)| *s == ssrc).map(|x| x.1)
}

impl Sfu {
    /// Takes up the sessions saved under this media port (those younger than the
    /// consent timeout: older ones' clients have given up).
    pub fn restore(self: &Arc<Self>) -> Restored {
        let Some(keeper) = &self.keep else {
            return Restored::default();
        };
        let mut saved = keeper.load(self.consent_timeout);
        // Publishers first: subscribers' down-tracks name their tracks.
        saved.sort_by_key(|s| s.role != Role::Publisher);
        let mut tracks: HashMap<TrackId, TrackId> = HashMap::new();
        let mut out = Restored::default();
        for s in saved {
            let (id, role, age) = (s.id.clone(), s.role, s.age());
            match self.restore_one(s, &mut tracks) {
                Ok(()) => {
                    out.oldest_ms = out.oldest_ms.max(age.as_millis() as u64);
                    match role {
                        Role::Publisher => out.publishers += 1,
                        _ => out.subscribers += 1,
                    }
                }
                Err(e) => {
                    out.refused += 1;
                    keeper.forget(&id);
                    log::warn!("session {id} of the earlier process: {e:#}; not taken up");
                }
            }
        }
        out
    }

    /// Rooms with sessions here but no publisher (viewers waiting for one).
    pub fn rooms_without_publishers(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.rooms
            .iter()
            .filter(|(_, r)| r.publishers.is_empty() && !r.subscribers.is_empty())
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn restore_one(
        self: &Arc<Self>,
        saved: Saved,
        tracks: &mut HashMap<TrackId, TrackId>,
    ) -> anyhow::Result<()> {
        let profile = Profile::from_dtls(saved.profile)
            .ok_or_else(|| anyhow::anyhow!("unknown SRTP profile {:#06x}", saved.profile))?;
        let rx = key_from_hex(profile, &saved.rx_key)?;
        let tx = key_from_hex(profile, &saved.tx_key)?;
        let away_us = saved.age().as_micros() as u64;
        let Saved {
            id,
            room,
            role,
            http_source,
            ice_ufrag,
            remote_ufrag,
            addrs,
            nominated,
            rtcp_ssrc,
            tracks: saved_tracks,
            downtracks,
            slots,
            layer_prefs,
            reserved: after,
            engine,
            ..
        } = saved;
        let mut s = Session {
            id: id.clone(),
            ice_pwd: self.passwords.for_ufrag(&ice_ufrag),
            ice_ufrag,
            remote_ufrag,
            addrs: addrs.clone(),
            nominated,
            profile: Some(profile),
            rtcp_ssrc,
            last_consent: Some(Instant::now()),
            restored: true,
            layer_prefs: layer_prefs.into_iter().collect(),
            reserved: slots,
            ..self.blank_session(&room, role, http_source)
        };
        s.id = id.clone();
        for mut t in saved_tracks {
            let new = self.media_id(&room);
            if let Some((_, learned)) = engine.streams.iter().find(|(old, _)| *old == t.media) {
                for (st, l) in t.streams.iter_mut().zip(learned) {
                    st.1 = st.1.or(*l);
                }
            }
            tracks.insert(t.media, new);
            t.media = new;
            s.tracks.push(t);
        }
        let st_guard = self.state.lock().unwrap();
        for mut d in downtracks {
            d.start = resume_of(&d, &after, &engine, away_us);
            match tracks.get(&d.track) {
                Some(new) if st_guard.sessions.contains_key(&d.src_session) => {
                    d.track = *new;
                    s.downtracks.push(d);
                }
                // Its publisher did not come back (or came over a cascade trunk, which
                // is set up again): the m-line waits for the next track.
                _ => s.reserved.push(d.into_slot()),
            }
        }
        drop(st_guard);
        for slot in &mut s.reserved {
            slot.start.index = mark_of(&after, slot.ssrc_out).unwrap_or(slot.start.index);
            if let Some((_, r)) = slot.rtx {
                slot.start.rtx_index = mark_of(&after, r).or(slot.start.rtx_index);
            }
        }
        // Persisted before the engine may use it.
        let up_to = ahead_of(&after);
        let keeper = self.keep.as_ref().expect("restore runs with a keeper");
        let kept = keep::Kept::new(rx.clone(), tx.clone(), up_to.clone());
        keeper.save(&keep::Saved::of(
            &s,
            &kept,
            up_to.clone(),
            Persisted::default(),
        ))?;
        s.kept = Some(kept);
        self.register(&s);
        self.command(Command::SetKeys {
            id: s.media,
            rx,
            tx,
            reserve: Some(Reserve {
                after: Some(after),
                up_to,
            }),
        });
        if !engine.rx.is_empty() || !engine.rx_rtcp.is_empty() {
            self.command(Command::ResumeRx {
                id: s.media,
                streams: engine.rx,
                rtcp: engine.rx_rtcp,
            });
        }
        for a in &addrs {
            self.command(Command::Bind {
                id: s.media,
                addr: *a,
                nominated: nominated == Some(*a),
            });
        }
        for d in &s.downtracks {
            if let Some(&(max_layer, max_temporal, paused)) = s.layer_prefs.get(&d.mid) {
                self.command(Command::SetLayers {
                    sub: s.media,
                    track: d.track,
                    max_layer,
                    max_temporal,
                    paused,
                });
            }
        }
        let media = s.media;
        let mut st = self.state.lock().unwrap();
        let id: Arc<str> = st.insert(s).as_str().into();
        for a in &addrs {
            st.by_addr.insert(*a, id.clone());
        }
        drop(st);
        for a in addrs {
            self.bind_fast(media, a);
        }
        tracing::info!(event = "session_restored", session = %id, room = %room, "session {id}: taken up from the earlier process ({} ms after its last save)", away_us / 1000);
        Ok(())
    }
}

/// Where a restored down-track's numbering continues: one past the persisted mark of
/// its SSRC (and its RTX SSRC's), the timestamp and picture ids last persisted moved on
/// by the time since.
fn resume_of(d: &Subscription, after: &Marks, engine: &Persisted, away_us: u64) -> Resume {
    let mut r = d.start;
    r.index = mark_of(after, d.ssrc_out).unwrap_or(r.index);
    if let Some((_, rtx)) = d.rtx {
        r.rtx_index = mark_of(after, rtx).or(r.rtx_index);
    }
    match engine.downs.iter().find(|m| m.ssrc_out == d.ssrc_out) {
        Some(m) => {
            r.ts = m.last.ts;
            r.pic = m.last.pic;
            r.tl0 = m.last.tl0;
            r.away_us = m.age_us + away_us;
        }
        None => r.away_us = away_us,
    }
    r
}
