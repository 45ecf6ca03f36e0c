//! RTCP from publishers and viewers: reports, NACKs answered from the cache (on RTX
//! where negotiated) or asked of the publisher, keyframe requests throttled and
//! passed on, transport feedback and REMB into the bandwidth estimates.

use super::*;

impl Engine {
    pub(super) fn on_rtcp(
        &mut self,
        id: SessionId,
        pkt: &mut [u8],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        let c = self.counters.clone();
        // The demux and the sessions agree unless a command raced a packet: counted.
        let Some(s) = self.sessions.get_mut(&id) else {
            return c.count(Drop::UnknownPeer);
        };
        let Some(srtp) = s.srtp.as_mut() else {
            return c.count(Drop::NotConnected);
        };
        // A publisher's reports go down the cascade as they are (its sender reports
        // carry lip sync to every node): the relays of any of its tracks.
        let mut relays: Vec<SessionId> = Vec::new();
        if s.role == Role::Publisher {
            for t in s.tracks.iter().filter_map(|t| self.tracks.get(t)) {
                for r in &t.trunks {
                    if !relays.contains(r) {
                        relays.push(*r);
                    }
                }
            }
        }
        if !relays.is_empty() {
            self.scratch.clear();
            self.scratch.extend_from_slice(pkt);
        }
        let n = match srtp.rx.unprotect_rtcp(pkt) {
            Ok(n) => n,
            Err(e) => return c.count(Drop::from_srtp(e)),
        };
        let requests = match rtcp::parse(&pkt[..n]) {
            Ok(r) => r,
            Err(_) => return c.count(Drop::RtcpMalformed),
        };
        bump(&c.rtcp_in);
        let role = s.role;
        for r in &relays {
            if let Some(to) = self.sessions.get(r).and_then(|s| s.media_addr()) {
                send_raw(to, &self.scratch, &c, tx);
            }
        }
        for r in requests {
            match (role, r) {
                (Role::Publisher, Request::SenderReport { ssrc, ntp, rtp }) => {
                    if let Some(st) = self
                        .stream_of(id, ssrc)
                        .and_then(|(t, l)| self.tracks.get_mut(&t)?.streams.get_mut(l as usize))
                    {
                        st.last_sr = Some((ntp, rtp, now));
                        st.reception.last_sr = Some(((ntp >> 16) as u32, now));
                    }
                }
                (Role::Subscriber, Request::KeyFrame { media_ssrc }) => {
                    // The encoding it is on, or the one it waits to start on.
                    let found = self.downtrack_by_ssrc(id, media_ssrc).and_then(|(tid, i)| {
                        let l = &self.tracks.get(&tid)?.downs.get(i)?.layering;
                        Some((tid, l.current.or(l.target).unwrap_or(0)))
                    });
                    if let Some((tid, layer)) = found {
                        self.request_keyframe(tid, Some(layer), now, tx);
                    }
                }
                (Role::Subscriber, Request::Nack { media_ssrc, seqs }) => {
                    self.on_nack(id, media_ssrc, &seqs, now, tx)
                }
                (Role::Subscriber, Request::TransportFeedback { received }) => {
                    self.on_transport_feedback(id, &received, now)
                }
                (Role::Subscriber, Request::Remb { bitrate, ssrcs }) => {
                    for ssrc in ssrcs {
                        if let Some(d) = self
                            .downtrack_by_ssrc(id, ssrc)
                            .and_then(|(tid, i)| self.tracks.get_mut(&tid)?.downs.get_mut(i))
                        {
                            d.bwe.on_remb(bitrate);
                        }
                    }
                }
                (Role::Subscriber, Request::Reception(b)) => self.on_reception(id, &b, now),
                // A relay names the publisher's own SSRCs (trunks keep them).
                (Role::Relay, Request::KeyFrame { media_ssrc }) => {
                    if let Some((tid, l)) = self.stream_of(id, media_ssrc) {
                        self.request_keyframe(tid, Some(l), now, tx);
                    }
                }
                (Role::Relay, Request::Nack { media_ssrc, seqs }) => {
                    // What the relay lost on the trunk: the publisher resends it and the
                    // resend goes down the trunk like any packet.
                    if let Some((tid, l)) = self.stream_of(id, media_ssrc) {
                        self.nack_publisher(tid, l, &seqs, tx);
                    }
                }
                _ => {}
            }
        }
    }

    /// A viewer's transport feedback: its delay-based estimate, which bounds the layers
    /// of each of its down-tracks.
    fn on_transport_feedback(&mut self, id: SessionId, received: &[(u16, i64)], now: Instant) {
        let c = self.counters.clone();
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some(tw) = s.twcc_out.as_mut() else {
            return;
        };
        let before = tw.delay.overuses;
        let arrivals = tw.arrivals(received);
        tw.delay.on_feedback(&arrivals, now);
        c.bwe_delay_overuses.fetch_add(
            tw.delay.overuses - before,
            std::sync::atomic::Ordering::Relaxed,
        );
        // The transport's estimate bounds each of its down-tracks' layers.
        let (estimate, overuses) = (tw.delay.estimate, tw.delay.overuses);
        for tid in &s.tracks {
            if let Some(t) = self.tracks.get_mut(tid) {
                for d in t.downs.iter_mut().filter(|d| d.sub == id) {
                    d.bwe.delay = estimate;
                    d.bwe.delay_overuses = overuses;
                }
            }
        }
    }

    /// A viewer's reception report on one of its down-tracks: its quality figures and,
    /// for a track with layers, the loss-based estimate that bounds its layer.
    fn on_reception(&mut self, id: SessionId, b: &rtcp::ReportBlock, now: Instant) {
        let c = self.counters.clone();
        if let Some((tid, i)) = self.downtrack_by_ssrc(id, b.media_ssrc)
            && let Some(t) = self.tracks.get_mut(&tid)
        {
            let rate = t.clock_rate;
            // Rates of the encodings being received (0: not), for the
            // layer the viewer's bandwidth carries.
            let active = t.active(now);
            let mut rates = [0u64; MAX_LAYERS];
            let top = t.streams[0].seen.top(now, LAYER_IDLE);
            let (n, svc) = if t.streams.len() == 1 {
                // One scalable encoding: its spatial layers are the choice.
                (t.streams[0].seen.cumulative(top.0, &mut rates), true)
            } else {
                for ((r, st), a) in rates.iter_mut().zip(&t.streams).zip(active) {
                    *r = if a { st.rate_bps.max(1) } else { 0 };
                }
                (t.streams.len().min(MAX_LAYERS), false)
            };
            let rates = &rates[..n];
            let Some(d) = t.downs.get_mut(i) else {
                return;
            };
            d.quality.update(b, rate, now);
            if rates.len() > 1 {
                let on = if svc {
                    d.layering.got(top).map(|g| g.0)
                } else {
                    d.layering.current
                };
                let before = (d.bwe.probes, d.bwe.failed_probes);
                d.layering.bw_limit =
                    d.bwe
                        .on_report(b.total_lost, b.highest_seq, d.octets, on, now, rates);
                let relaxed = std::sync::atomic::Ordering::Relaxed;
                c.bwe_probes.fetch_add(d.bwe.probes - before.0, relaxed);
                c.bwe_failed_probes
                    .fetch_add(d.bwe.failed_probes - before.1, relaxed);
            }
        }
    }

    /// The track and encoding of session `id`'s tracks (a publisher's own, or those a
    /// relay gets) whose source SSRC is `ssrc`.
    pub(super) fn stream_of(&self, id: SessionId, ssrc: u32) -> Option<(TrackId, Layer)> {
        let s = self.sessions.get(&id)?;
        s.tracks
            .iter()
            .find_map(|t| Some((*t, self.tracks.get(t)?.layer_of(ssrc)?)))
    }

    /// Asks the publisher of `track` for `seqs` of encoding `layer` (its own numbers).
    pub(super) fn nack_publisher(
        &mut self,
        track: TrackId,
        layer: Layer,
        seqs: &[u16],
        tx: &mut dyn Transmit,
    ) {
        let Some((_, to, ssrc, rtcp_ssrc, ctx)) =
            upstream_of(&mut self.tracks, &mut self.sessions, track, layer)
        else {
            return;
        };
        let nack = rtcp::translated_nack(rtcp_ssrc, ssrc, seqs, 0);
        send_rtcp(ctx, to, &nack, &self.counters, tx);
    }

    /// The subscriber's down-track that sends `ssrc_out`: (track, index in its downs).
    pub(super) fn downtrack_by_ssrc(
        &self,
        sub: SessionId,
        ssrc_out: u32,
    ) -> Option<(TrackId, usize)> {
        self.sessions.get(&sub)?.tracks.iter().find_map(|tid| {
            let t = self.tracks.get(tid)?;
            let i = t
                .downs
                .iter()
                .position(|d| d.sub == sub && d.ssrc_out() == ssrc_out)?;
            Some((*tid, i))
        })
    }

    /// Sends a PLI for encoding `layer` of a publisher's track (every encoding with
    /// None), at most every [`KEYFRAME_INTERVAL`] per encoding, so a room of viewers
    /// asking at once costs the publisher one keyframe.
    pub fn request_keyframe(
        &mut self,
        track: TrackId,
        layer: Option<Layer>,
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        let layers = match (layer, self.tracks.get(&track)) {
            (Some(l), _) => l..l + 1,
            (None, Some(t)) => 0..t.streams.len() as Layer,
            (None, None) => return,
        };
        for l in layers {
            let Some((st, to, ssrc, rtcp_ssrc, ctx)) =
                upstream_of(&mut self.tracks, &mut self.sessions, track, l)
            else {
                continue;
            };
            if st
                .last_keyframe_request
                .is_some_and(|at| now - at < KEYFRAME_INTERVAL)
            {
                continue;
            }
            // Only a request that went out holds the next one back: one that could
            // not be sent (the publisher's next hop not resolved yet, as right after a
            // restart on the AF_XDP path) is tried again at the next packet.
            if send_rtcp(ctx, to, &rtcp::pli(rtcp_ssrc, ssrc), &self.counters, tx) {
                st.last_keyframe_request = Some(now);
                bump(&self.counters.keyframe_requests);
            }
        }
    }

    /// Resends what the cache has; asks the publisher for the rest.
    pub(super) fn on_nack(
        &mut self,
        sub: SessionId,
        ssrc_out: u32,
        seqs: &[u16],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        let Some((tid, i)) = self.downtrack_by_ssrc(sub, ssrc_out) else {
            return;
        };
        let c = &*self.counters;
        let Some(t) = self.tracks.get_mut(&tid) else {
            return;
        };
        let pub_twcc = self
            .sessions
            .get(&t.session)
            .and_then(|p| p.twcc.as_ref().map(|(id, _)| *id));
        let at_us = now.duration_since(self.epoch).as_micros() as i64;
        let Some(s) = self.sessions.get_mut(&sub) else {
            return;
        };
        let to = s.media_addr();
        let Session { srtp, twcc_out, .. } = s;
        let (Some(to), Some(srtp)) = (to, srtp.as_mut()) else {
            return;
        };
        let d = &mut t.downs[i];
        let layer = d.layer();
        let cache = &t.streams[layer as usize].cache;
        let mut missing = Vec::new();
        // Only packets since the last switch are this encoding's (older ones are
        // lost), and only those it was sent (not the numbers of dropped layers).
        for &seq_out in seqs {
            // The source number is known once the cached packet's layers are read;
            // without a cached packet there is nothing to read them from.
            let Some((src_seq, _)) = d.layering.resend(seq_out, &d.route, None) else {
                continue;
            };
            match cache.get(src_seq as usize % CACHE) {
                Some(Some((cached, plain))) if *cached == src_seq => {
                    let Ok(hlen) = rtp::header_len(plain) else {
                        continue;
                    };
                    let vp8 = (t.format == Format::Vp8)
                        .then(|| Vp8Descriptor::parse(&plain[hlen..]))
                        .flatten();
                    let dd = t.streams[layer as usize].dd.as_ref();
                    let (ids, _) = layer_ids_of(t.format, t.dd_ext, dd, plain, hlen, vp8.as_ref());
                    let Some((_, out)) = d.layering.resend(seq_out, &d.route, ids.as_ref()) else {
                        continue;
                    };
                    let sent = send_copy(
                        d,
                        &mut srtp.tx,
                        to,
                        plain,
                        hlen,
                        vp8.as_ref(),
                        out,
                        d.rtx,
                        twcc_out.as_mut().map(|out| Numbering {
                            out,
                            from: pub_twcc,
                            at_us,
                        }),
                        tx,
                    );
                    if sent.is_ok() {
                        d.nack_resent += 1;
                        bump(&c.nack_resent);
                        if let Some((_, _, seq)) = d.rtx.as_mut() {
                            *seq = seq.wrapping_add(1);
                        }
                    } else if let Err(why) = sent {
                        c.count(why);
                    }
                }
                _ => missing.push(src_seq),
            }
        }
        if missing.is_empty() {
            return;
        }
        self.nack_publisher(tid, layer, &missing, tx);
    }
}
