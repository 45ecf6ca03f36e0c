//! Joining and leaving: a WHIP publisher's or WHEP subscriber's session from its
//! offer (admission caps, tracks, the answer), an upstream's publisher relayed here,
//! a publisher's tracks filling the subscribers' m-lines, layer requests, and leaving.

use super::*;

impl Sfu {
    /// A publisher session for a publisher of an upstream node: no ICE, no DTLS (its
    /// keys come over the node API), connected from the start.
    pub(in crate::webrtc) fn relay_session(
        &self,
        room: &str,
        rtcp_ssrc: u32,
        profile: Profile,
    ) -> Session {
        Session {
            profile: Some(profile),
            rtcp_ssrc,
            ..self.blank_session(room, Role::Publisher, std::net::IpAddr::from([0, 0, 0, 0]))
        }
    }

    /// A session of `room` with nothing negotiated yet: fresh ids, our ICE credentials
    /// (the password derived from the ufrag), no keys, no tracks.
    pub(super) fn blank_session(
        &self,
        room: &str,
        role: Role,
        source: std::net::IpAddr,
    ) -> Session {
        let ufrag = random_string(8);
        Session {
            id: random_string(16),
            media: self.media_id(room),
            room: room.to_string(),
            role,
            http_source: source,
            ice_pwd: self.passwords.for_ufrag(&ufrag),
            ice_ufrag: ufrag,
            remote_ufrag: String::new(),
            remote_fingerprint: (String::new(), vec![]),
            created: Instant::now(),
            last_consent: None,
            addrs: vec![],
            nominated: None,
            dtls_peer: Arc::new(Mutex::new(SocketAddr::from(([0, 0, 0, 0], 0)))),
            dtls_in: None,
            profile: None,
            hello: None,
            rtcp_ssrc: nonzero_u32(),
            tracks: vec![],
            downtracks: vec![],
            relay: None,
            reserved: vec![],
            layer_prefs: HashMap::new(),
            kept: None,
            restored: false,
        }
    }

    /// Gives the engine a relayed publisher: its tracks, bound by their SSRCs at the
    /// upstream's address, decrypted with the publisher's key from where the upstream
    /// left off, RTCP back with the trunk key.
    pub(in crate::webrtc) fn register_relay_in(
        self: &Arc<Self>,
        s: &Session,
        upstream: SocketAddr,
        rx: MasterKey,
        trunk: MasterKey,
        streams: Vec<(u32, u64)>,
    ) {
        self.register(s);
        self.command(Command::BindRelay {
            id: s.media,
            addr: upstream,
            ssrcs: s
                .tracks
                .iter()
                .flat_map(|t| t.streams.iter().filter_map(|(_, ssrc)| *ssrc))
                .collect(),
        });
        self.command(Command::SetKeys {
            id: s.media,
            rx,
            tx: trunk,
            reserve: None,
        });
        self.command(Command::ResumeRx {
            id: s.media,
            streams,
            rtcp: vec![],
        });
        self.bind_fast(s.media, upstream);
    }

    fn new_session(
        &self,
        room: &str,
        role: Role,
        source: std::net::IpAddr,
        offer: &Offer,
    ) -> Session {
        Session {
            remote_ufrag: offer.ice_ufrag.clone(),
            remote_fingerprint: offer.fingerprint.clone(),
            ..self.blank_session(room, role, source)
        }
    }

    fn answer(&self, offer: &Offer, s: &Session, media: &[AnswerMedia]) -> String {
        build_answer(&AnswerParams {
            offer,
            ice_ufrag: &s.ice_ufrag,
            ice_pwd: &s.ice_pwd,
            fingerprint: &self.identity.fingerprint,
            candidates: &self.candidates,
            tcp_candidates: self.ice_tcp.get().map_or(&[], |t| &t.candidates),
            media,
            cname: &self.cname,
        })
    }

    /// Refuses a new session in `room` from `source` beyond the configured caps.
    fn admit(&self, st: &State, room: &str, source: std::net::IpAddr) -> Result<(), ApiError> {
        let l = &self.limits;
        if st.sessions.len() >= l.max_sessions {
            return Err(ApiError::ServerFull(l.max_sessions));
        }
        let in_room = st
            .rooms
            .get(room)
            .map_or(0, |r| r.publishers.len() + r.subscribers.len());
        if in_room >= l.max_sessions_per_room {
            return Err(ApiError::RoomFull(
                room.to_string(),
                l.max_sessions_per_room,
            ));
        }
        // A per-source count kept beside the sessions would be a second copy to keep
        // in sync; a scan is fine at signaling rates (thousands of sessions).
        let from = st
            .sessions
            .values()
            .filter(|s| s.http_source == source)
            .count();
        if from >= l.max_sessions_per_source {
            return Err(ApiError::TooManyFromSource(l.max_sessions_per_source));
        }
        Ok(())
    }

    /// WHIP: a publisher joins `room`. Returns (session id, SDP answer).
    pub fn publish(
        &self,
        room: &str,
        source: std::net::IpAddr,
        offer: &Offer,
    ) -> Result<(String, String), ApiError> {
        self.admit(&self.state.lock().unwrap(), room, source)?;
        let mut s = self.new_session(room, Role::Publisher, source, offer);
        let mut media = Vec::new();
        for m in &offer.media {
            match (m.kind, m.publish_codec()) {
                (Some(kind), Some(codec)) => {
                    let simulcast = m.simulcast().filter(|_| kind == Kind::Video);
                    let (streams, rid_ext) = match &simulcast {
                        Some((rids, ext)) => (
                            rids.iter().map(|r| (Some(r.clone()), None)).collect(),
                            Some(*ext),
                        ),
                        None => (vec![(None, m.ssrcs.first().copied())], None),
                    };
                    s.tracks.push(Track {
                        kind,
                        mid: m.mid.clone(),
                        codec: codec.clone(),
                        streams,
                        rid_ext,
                        twcc_ext: m.twcc(codec),
                        level_ext: m.audio_level(),
                        dd_ext: m.dependency_descriptor(codec),
                        track_id: format!("{}-{}", kind.as_str(), random_string(6)),
                        media: self.media_id(&s.room),
                    });
                    media.push(AnswerMedia::Receive {
                        codec: codec.clone(),
                        simulcast: simulcast.is_some(),
                    });
                }
                _ => media.push(AnswerMedia::Reject),
            }
        }
        if s.tracks.is_empty() {
            return Err(ApiError::BadOffer(OfferError::NoUsableMedia));
        }
        let answer = self.answer(offer, &s, &media);
        let mut st = self.state.lock().unwrap();
        // Checked again under the lock that inserts: the first check ran before the
        // answer was built.
        self.admit(&st, room, source)?;
        self.register(&s);
        let id = st.insert(s);
        self.fill_slots(&mut st, &id);
        Ok((id, answer))
    }

    /// WHEP: a subscriber joins `room` and gets every published track its offer has an
    /// m-line of the same kind for, in publication order.
    pub fn subscribe(
        &self,
        room: &str,
        source: std::net::IpAddr,
        offer: &Offer,
    ) -> Result<(String, String), ApiError> {
        let mut st = self.state.lock().unwrap();
        self.admit(&st, room, source)?;
        // No publisher yet is fine: the m-lines wait for one (late tracks).
        let publishers = st
            .rooms
            .get(room)
            .map(|r| r.publishers.clone())
            .unwrap_or_default();
        let mut s = self.new_session(room, Role::Subscriber, source, offer);
        // (publisher, track index) not yet given to an m-line.
        let mut available: Vec<(String, usize)> = publishers
            .iter()
            .flat_map(|p| (0..st.sessions[p].tracks.len()).map(move |i| (p.clone(), i)))
            .collect();
        let mut media = Vec::new();
        let mut refusals = Vec::new();
        for m in &offer.media {
            let Some(kind) = m.kind else {
                media.push(AnswerMedia::Reject);
                continue;
            };
            let mut chosen = None;
            for (n, (p, i)) in available.iter().enumerate() {
                let t = &st.sessions[p].tracks[*i];
                if t.kind != kind {
                    continue;
                }
                match m.subscribe_codec(&t.codec) {
                    Some(c) => {
                        chosen = Some((n, c.clone()));
                        break;
                    }
                    None => refusals.push(format!(
                        "the {} track is {} ({}), which the offer's m-line {} does not accept",
                        kind.as_str(),
                        t.codec.name,
                        t.codec.fmtp,
                        m.mid
                    )),
                }
            }
            let offered_kind = available
                .iter()
                .any(|(p, i)| st.sessions[p].tracks[*i].kind == kind);
            let Some((n, codec)) = chosen else {
                // Nothing of this kind published yet: keep the m-line for a later track,
                // under an SSRC announced now. (A track of the kind with a codec the
                // m-line cannot take is a refusal, above, not a wait.)
                match m.reserve_codec().filter(|_| !offered_kind) {
                    Some(codec) => {
                        let ssrc_out = nonzero_u32();
                        let rtx = m.rtx_for(codec.pt).map(|pt| (pt, nonzero_u32()));
                        s.reserved.push(Slot {
                            mid: m.mid.clone(),
                            kind,
                            codec: codec.clone(),
                            ssrc_out,
                            rtx,
                            dd_ext: m.dependency_descriptor(codec),
                            twcc_ext: m.twcc(codec),
                            start: Resume::fresh(rtx.is_some()),
                        });
                        media.push(AnswerMedia::Send {
                            codec: codec.clone(),
                            ssrc: ssrc_out,
                            rtx,
                            stream_id: format!("room-{room}"),
                            track_id: format!("{}-pending-{}", kind.as_str(), random_string(6)),
                        });
                    }
                    None => media.push(AnswerMedia::Reject),
                }
                continue;
            };
            let (p, i) = available.remove(n);
            let t = &st.sessions[&p].tracks[i];
            let ssrc_out = nonzero_u32();
            let rtx = m.rtx_for(codec.pt).map(|pt| (pt, nonzero_u32()));
            s.downtracks.push(Subscription {
                mid: m.mid.clone(),
                src_session: p.clone(),
                track: t.media,
                kind,
                ssrc_out,
                pt_out: codec.pt,
                codec: codec.clone(),
                rtx,
                dd_ext: m.dependency_descriptor(&codec),
                twcc_ext: m.twcc(&codec),
                start: Resume::fresh(rtx.is_some()),
            });
            media.push(AnswerMedia::Send {
                codec,
                ssrc: ssrc_out,
                rtx,
                stream_id: p.clone(),
                track_id: t.track_id.clone(),
            });
        }
        if s.downtracks.is_empty() && s.reserved.is_empty() {
            return Err(if refusals.is_empty() {
                ApiError::BadOffer(OfferError::NoUsableMedia)
            } else {
                ApiError::UnsupportedCodec(refusals.join("; "))
            });
        }
        let answer = self.answer(offer, &s, &media);
        self.register(&s);
        Ok((st.insert(s), answer))
    }

    /// A new publisher's tracks go to the room's subscribers' waiting m-lines (those
    /// of the same kind with a compatible codec), as down-tracks under the SSRCs their
    /// answers announced; the engine asks for a keyframe for a connected viewer.
    pub(in crate::webrtc) fn fill_slots(&self, st: &mut State, publisher: &str) {
        let Some(p) = st.sessions.get(publisher) else {
            return;
        };
        let tracks: Vec<(TrackId, Kind, Codec)> = p
            .tracks
            .iter()
            .map(|t| (t.media, t.kind, t.codec.clone()))
            .collect();
        let subs = st
            .rooms
            .get(&p.room)
            .map(|r| r.subscribers.clone())
            .unwrap_or_default();
        for sid in subs {
            let Some(s) = st.sessions.get_mut(&sid) else {
                continue;
            };
            for (tid, kind, codec) in &tracks {
                let Some(i) = s
                    .reserved
                    .iter()
                    .position(|r| r.kind == *kind && codec.compatible(&r.codec))
                else {
                    continue;
                };
                let slot = s.reserved.remove(i);
                if let Some(k) = s.kept.as_mut() {
                    k.dirty = true;
                }
                s.downtracks.push(Subscription {
                    mid: slot.mid.clone(),
                    src_session: publisher.to_string(),
                    track: *tid,
                    kind: *kind,
                    ssrc_out: slot.ssrc_out,
                    pt_out: slot.codec.pt,
                    codec: slot.codec.clone(),
                    rtx: slot.rtx,
                    dd_ext: slot.dd_ext,
                    twcc_ext: slot.twcc_ext,
                    start: slot.start,
                });
                self.add_downtrack(s.media, s.downtracks.last().expect("pushed"));
                // A cap asked while the m-line waited holds for its track.
                if let Some(&(max_layer, max_temporal, paused)) = s.layer_prefs.get(&slot.mid) {
                    self.command(Command::SetLayers {
                        sub: s.media,
                        track: *tid,
                        max_layer,
                        max_temporal,
                        paused,
                    });
                }
                tracing::info!(event = "late_track", session = %sid, publisher, "session {sid}: {} track of {publisher} fills a waiting m-line", kind.as_str());
            }
        }
    }

    /// A subscriber's layer choice for its down-track on m-line `mid` (every one
    /// without): at most `max_layer` (0 = lowest encoding, or spatial layer of a
    /// scalable stream; None = no cap) and `max_temporal`, or paused.
    /// Returns the down-tracks changed, as `/api/sessions` shows them.
    pub fn set_layers(
        &self,
        room: &str,
        id: &str,
        mid: Option<&str>,
        max_layer: Option<u8>,
        max_temporal: Option<u8>,
        paused: bool,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        let mut st = self.state.lock().unwrap();
        let s = match st.sessions.get_mut(id) {
            Some(s) if s.room == room && s.role == Role::Subscriber => s,
            _ => return Err(ApiError::UnknownSession),
        };
        let wanted = |m: &str| mid.is_none_or(|x| x == m);
        let chosen: Vec<(String, Kind, Option<TrackId>)> = s
            .downtracks
            .iter()
            .filter(|d| wanted(&d.mid))
            .map(|d| (d.mid.clone(), d.kind, Some(d.track)))
            .chain(
                s.reserved
                    .iter()
                    .filter(|r| wanted(&r.mid))
                    .map(|r| (r.mid.clone(), r.kind, None)),
            )
            .collect();
        if let (Some(m), true) = (mid, chosen.is_empty()) {
            return Err(ApiError::NoSuchTrack(m.to_string()));
        }
        let cap = max_layer.unwrap_or(UNCAPPED);
        let temporal = max_temporal.unwrap_or(UNCAPPED);
        for (m, _, track) in &chosen {
            s.layer_prefs.insert(m.clone(), (cap, temporal, paused));
            if let Some(k) = s.kept.as_mut() {
                k.dirty = true;
            }
            if let Some(track) = track {
                self.command(Command::SetLayers {
                    sub: s.media,
                    track: *track,
                    max_layer: cap,
                    max_temporal: temporal,
                    paused,
                });
            }
        }
        tracing::debug!(event = "layers", session = %id, room, ?mid, ?max_layer, ?max_temporal, paused, "session {id}: layer cap {max_layer:?}, temporal cap {max_temporal:?}, paused {paused}");
        // A waiting m-line takes them when a track fills it.
        Ok(chosen
            .iter()
            .map(|(m, kind, track)| serde_json::json!({"mid": m, "kind": kind, "max_layer": max_layer, "max_temporal": max_temporal, "paused": paused, "waiting": track.is_none()}))
            .collect())
    }

    /// DELETE of a WHIP/WHEP resource.
    pub fn leave(&self, room: &str, id: &str, role: Role) -> Result<(), ApiError> {
        let mut st = self.state.lock().unwrap();
        match st.sessions.get(id) {
            Some(s) if s.room == room && s.role == role => {
                self.remove(&mut st, id);
                tracing::info!(event = "left", session = %id, room, ?role, "session {id} ({role:?}) left room {room}");
                Ok(())
            }
            _ => Err(ApiError::UnknownSession),
        }
    }
}
