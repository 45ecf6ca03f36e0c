//! Applying the control plane's commands: sessions, their keys and bindings,
//! tracks, down-tracks and trunks, layer caps; what a session leaves behind.

use super::*;

impl Engine {
    /// Applies one control-plane command. Commands about unknown handles are ignored:
    /// the session may have ended in between.
    pub fn apply(&mut self, cmd: Command, now: Instant, tx: &mut dyn Transmit) {
        match cmd {
            Command::AddSession {
                id,
                role,
                rtcp_ssrc,
            } => {
                self.sessions.insert(
                    id,
                    Session {
                        role,
                        rtcp_ssrc,
                        addrs: vec![],
                        nominated: None,
                        srtp: None,
                        tracks: vec![],
                        twcc: None,
                        twcc_out: None,
                        ended: HashMap::new(),
                    },
                );
            }
            Command::Bind {
                id,
                addr,
                nominated,
            } => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                if !s.addrs.contains(&addr) {
                    s.addrs.push(addr);
                }
                if nominated {
                    s.nominated = Some(addr);
                }
                self.demux.bind(addr, id);
            }
            cmd @ Command::SetKeys { .. } => self.set_keys(cmd, now, tx),
            cmd @ Command::AddTrack { .. } => self.add_track(cmd, now),
            cmd @ Command::AddDownTrack { .. } => self.add_downtrack(cmd, now, tx),
            Command::SetLayers {
                sub,
                track,
                max_layer,
                max_temporal,
                paused,
            } => {
                let Some(d) = self
                    .tracks
                    .get_mut(&track)
                    .and_then(|t| t.downs.iter_mut().find(|d| d.sub == sub))
                else {
                    return;
                };
                d.layering.max_layer = max_layer;
                d.layering.max_temporal = max_temporal;
                d.layering.set_paused(paused);
            }
            cmd @ Command::RemoveSession { .. } => self.remove_session(cmd),
            Command::BindRelay { id, addr, ssrcs } => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                if !s.addrs.contains(&addr) {
                    s.addrs.push(addr);
                }
                s.nominated = Some(addr);
                self.demux.bind_relay(addr, &ssrcs, id);
            }
            Command::AddTrunk { track, relay } => {
                let (Some(t), Some(s)) =
                    (self.tracks.get_mut(&track), self.sessions.get_mut(&relay))
                else {
                    return;
                };
                if !t.trunks.contains(&relay) {
                    t.trunks.push(relay);
                    s.tracks.push(track);
                }
                // The new branch's viewers need a keyframe to start decoding.
                if t.kind == Kind::Video {
                    self.request_keyframe(track, None, now, tx);
                }
            }
            Command::SetTrunkLayers {
                track,
                relay,
                max_layer,
            } => {
                let Some(t) = self.tracks.get_mut(&track) else {
                    return;
                };
                let before = t.trunk_caps.get(&relay).copied().unwrap_or(UNCAPPED);
                if max_layer == UNCAPPED {
                    t.trunk_caps.remove(&relay);
                } else {
                    t.trunk_caps.insert(relay, max_layer);
                }
                // A layer newly wanted below starts at a keyframe there.
                if max_layer > before || (before != UNCAPPED && max_layer == UNCAPPED) {
                    let first = before.saturating_add(1);
                    let last = max_layer.min(t.streams.len().saturating_sub(1) as Layer);
                    for l in first..=last {
                        self.request_keyframe(track, Some(l), now, tx);
                    }
                }
            }
            Command::Reserve { id, up_to } => self.reserve(id, &up_to),
            Command::Unkeep { id } => {
                if let Some(srtp) = self.sessions.get_mut(&id).and_then(|s| s.srtp.as_mut()) {
                    srtp.tx.release();
                }
            }
            Command::ResumeRx { id, streams, rtcp } => {
                if let Some(srtp) = self.sessions.get_mut(&id).and_then(|s| s.srtp.as_mut()) {
                    for (ssrc, highest) in streams {
                        srtp.rx.resume_rtp(ssrc, highest);
                    }
                    for (ssrc, highest) in rtcp {
                        srtp.rx.resume_rtcp(ssrc, highest);
                    }
                }
            }
        }
    }

    /// DTLS finished: the session's SRTP contexts, and a keyframe for the video it
    /// watches or that is waited for.
    fn set_keys(&mut self, cmd: Command, now: Instant, tx: &mut dyn Transmit) {
        let Command::SetKeys {
            id,
            rx,
            tx: tx_key,
            reserve,
        } = cmd
        else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let mut tx_ctx = srtp::Context::new(&tx_key);
        if let Some(r) = reserve {
            tx_ctx.require_reservations();
            if let Some(after) = &r.after {
                after.resume_into(&mut tx_ctx);
            }
            tx_ctx.reserve(&r.up_to.rtp, r.up_to.rtcp);
        }
        s.srtp = Some(Srtp {
            rx: srtp::Context::new(&rx),
            tx: tx_ctx,
            rx_key: rx,
        });
        // A keyframe now, not at the next periodic one: for a new viewer's
        // tracks, or for viewers already waiting on a publisher's (they joined
        // first). A relay asks through its trunk's own RTCP.
        let role = s.role;
        let video: Vec<TrackId> = s
            .tracks
            .iter()
            .copied()
            .filter(|t| {
                self.tracks.get(t).is_some_and(|t| {
                    t.kind == Kind::Video
                        && match role {
                            Role::Subscriber => true,
                            Role::Publisher => !t.downs.is_empty() || !t.trunks.is_empty(),
                            Role::Relay => false,
                        }
                })
            })
            .collect();
        for t in video {
            self.request_keyframe(t, None, now, tx);
        }
    }

    /// A publisher's track: its encodings, their caches and reception statistics.
    fn add_track(&mut self, cmd: Command, now: Instant) {
        let Command::AddTrack {
            id,
            session,
            kind,
            pt,
            clock_rate,
            format,
            streams,
            rid_ext,
            twcc_ext,
            level_ext,
            dd_ext,
        } = cmd
        else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.tracks.push(id);
        if let (None, Some(ext)) = (&s.twcc, twcc_ext) {
            s.twcc = Some((ext, twcc::Recorder::new(s.rtcp_ssrc)));
        }
        let streams = streams
            .into_iter()
            .take(MAX_LAYERS)
            .map(|(rid, ssrc)| Stream {
                rid,
                ssrc,
                packets: 0,
                bytes: 0,
                last_packet: None,
                rate_bps: 0,
                rate_mark: (0, now),
                reception: Reception::default(),
                last_sr: None,
                last_keyframe_request: None,
                seen: Seen::default(),
                dd: None,
                cache: if kind == Kind::Video {
                    vec![None; CACHE]
                } else {
                    vec![]
                },
            })
            .collect();
        self.tracks.insert(
            id,
            UpTrack {
                session,
                kind,
                pt,
                clock_rate,
                format,
                streams,
                rid_ext,
                level_ext: level_ext.filter(|_| kind == Kind::Audio),
                levels: Levels::default(),
                dd_ext: dd_ext.filter(|_| format == Format::Av1),
                downs: vec![],
                trunks: vec![],
                trunk_caps: HashMap::new(),
            },
        );
    }

    /// A subscriber's down-track of a track (continuing the numbering its SSRC had, if
    /// an ended one left it), and a keyframe for it if the subscriber is connected.
    fn add_downtrack(&mut self, cmd: Command, now: Instant, tx: &mut dyn Transmit) {
        let Command::AddDownTrack {
            track,
            sub,
            ssrc_out,
            pt_out,
            rtx,
            remb,
            dd_ext,
            twcc_ext,
            seq_delta,
            ts_delta,
            resume,
        } = cmd
        else {
            return;
        };
        let units = self.units(now, self.tracks.get(&track).map_or(0, |t| t.clock_rate));
        let (Some(t), Some(s)) = (self.tracks.get_mut(&track), self.sessions.get_mut(&sub)) else {
            return;
        };
        s.tracks.push(track);
        if let (None, Some(ext)) = (&s.twcc_out, twcc_ext) {
            s.twcc_out = Some(TwccOut::new(ext));
        }
        let ended = s.ended.remove(&ssrc_out);
        t.downs.push(DownTrack {
            sub,
            route: RouteValue {
                ssrc_out_be: ssrc_out.to_be_bytes(),
                seq_delta,
                ts_delta,
                pt_from: t.pt,
                pt_to: pt_out,
                flags: FLAG_REWRITE_PT,
                ..Default::default()
            },
            layering: Layering::default(),
            packets: 0,
            octets: 0,
            nack_resent: 0,
            rtx,
            quality: rtcp::Quality::default(),
            bwe: bwe::LossBased::new(remb, rtx.is_some() && s.twcc_out.is_some()),
            // AV1: the publisher's descriptor goes out under the subscriber's
            // id; a subscriber without it cannot assemble a picture of several
            // spatial layers (measured with Chromium: nothing decodes), so it
            // gets one.
            dd_rename: match (t.dd_ext, dd_ext) {
                (Some(a), Some(b)) if a != b => Some((a, b)),
                _ => None,
            },
            one_spatial: t.format == Format::Av1 && dd_ext.is_none(),
            last_ts_out: 0,
            last_out_at: None,
        });
        if let (Some(e), Some(d)) = (ended, t.downs.last_mut()) {
            d.continue_from(e, t.clock_rate);
        } else if let (Some(r), Some(d)) = (resume, t.downs.last_mut()) {
            d.resume(&r, t.clock_rate, units, s.srtp.as_mut().map(|x| &mut x.tx));
        }
        // A track added to a viewer already connected (it joined first): a
        // keyframe, or it waits for the next periodic one.
        if s.srtp.is_some() && t.kind == Kind::Video {
            self.request_keyframe(track, None, now, tx);
        }
    }

    /// A session ends: its bindings, and by role its trunks, down-tracks or tracks (a
    /// gone publisher's viewers remember where their SSRCs' numbering stood).
    fn remove_session(&mut self, cmd: Command) {
        let Command::RemoveSession { id } = cmd else {
            return;
        };
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.demux.remove(id);
        match s.role {
            Role::Relay => {
                for t in &s.tracks {
                    if let Some(t) = self.tracks.get_mut(t) {
                        t.trunks.retain(|r| *r != id);
                        t.trunk_caps.remove(&id);
                    }
                }
            }
            Role::Subscriber => {
                for t in &s.tracks {
                    if let Some(t) = self.tracks.get_mut(t) {
                        t.downs.retain(|d| d.sub != id);
                    }
                }
            }
            Role::Publisher => {
                // Subscribers stay, without the down-tracks of a gone publisher;
                // each remembers where its SSRCs' numbering stood.
                for tid in &s.tracks {
                    let Some(t) = self.tracks.remove(tid) else {
                        continue;
                    };
                    for d in &t.downs {
                        if let Some(sub) = self.sessions.get_mut(&d.sub) {
                            sub.ended.insert(d.ssrc_out(), d.ended(t.clock_rate));
                        }
                    }
                    for sub in t.downs.iter().map(|d| d.sub).chain(t.trunks) {
                        if let Some(sub) = self.sessions.get_mut(&sub) {
                            sub.tracks.retain(|x| x != tid);
                        }
                    }
                }
            }
        }
    }
}
