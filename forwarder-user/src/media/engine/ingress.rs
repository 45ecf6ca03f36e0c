//! SRTP in: authenticate and decrypt each publisher packet once, read what the layer
//! choice needs, and fan it out to every down-track (and trunk) that takes it.

use super::*;

impl Engine {
    /// One SRTP or SRTCP datagram from `from`, decrypted in place in `pkt`.
    pub fn handle_srtp(
        &mut self,
        from: SocketAddr,
        pkt: &mut [u8],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        match self.demux.lookup(from, pkt) {
            Some(id) => self.handle_srtp_of(id, pkt, now, tx),
            None => self.counters.count(Drop::UnknownPeer),
        }
    }

    /// [`Engine::handle_srtp`] for a datagram whose session a router already looked
    /// up (the AF_XDP workers, by the same [`Demux`] fed by the same commands): one
    /// lookup per packet. A session this engine does not hold (yet, or any longer) is
    /// an unknown peer, as an unbound address is.
    pub fn handle_srtp_of(
        &mut self,
        id: SessionId,
        pkt: &mut [u8],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        if !self.sessions.contains_key(&id) {
            return self.counters.count(Drop::UnknownPeer);
        }
        let is_rtcp = pkt.len() >= 2 && rtp::classify(pkt[0], pkt[1]) == rtp::Class::Rtcp;
        if is_rtcp {
            self.on_rtcp(id, pkt, now, tx)
        } else {
            self.on_rtp(id, pkt, now, tx)
        }
    }

    pub(super) fn on_rtp(
        &mut self,
        id: SessionId,
        pkt: &mut [u8],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        let c = &*self.counters;
        // The demux and the sessions agree unless a command raced a packet: counted.
        let Some(s) = self.sessions.get_mut(&id) else {
            return c.count(Drop::UnknownPeer);
        };
        if s.role != Role::Publisher {
            return c.count(Drop::UnexpectedRtp);
        }
        let Some(srtp) = s.srtp.as_mut() else {
            return c.count(Drop::NotConnected);
        };
        // Trunk copies are the ciphertext: kept before the in-place decryption.
        let relayed = s
            .tracks
            .iter()
            .any(|t| self.tracks.get(t).is_some_and(|t| !t.trunks.is_empty()));
        if relayed {
            self.scratch.clear();
            self.scratch.extend_from_slice(pkt);
        }
        let n = match srtp.rx.unprotect_rtp(pkt) {
            Ok(n) => n,
            Err(e) => return c.count(Drop::from_srtp(e)),
        };
        let plain = &pkt[..n];
        let Ok(hlen) = rtp::validate(plain) else {
            return c.count(Drop::RtpMalformed);
        };
        // Every authenticated packet arrived at the transport, whichever stream it is.
        let at_us = now.duration_since(self.epoch).as_micros() as i64;
        let ssrc = u32::from_be_bytes([plain[8], plain[9], plain[10], plain[11]]);
        if let Some((ext, rec)) = s.twcc.as_mut()
            && let Some(&[a, b]) = rtp::extension(plain, *ext)
        {
            rec.record(ssrc, u16::from_be_bytes([a, b]), at_us);
        }
        let arrival = Arrival {
            now,
            at_us,
            // The publisher's transport-wide number is in its copies: each viewer's
            // replaces it (under the viewer's id).
            pub_twcc: s.twcc.as_ref().map(|(id, _)| *id),
            hlen,
        };
        let Some((tid, layer)) = stream_of_packet(&mut self.tracks, &s.tracks, plain, ssrc) else {
            return c.count(Drop::UnknownSsrc);
        };
        bump(&c.rtp_in);
        self.forward(tid, layer, plain, &arrival, tx);
    }

    /// One authenticated packet of track `tid`, encoding `layer`: its stream's
    /// reception and cache, what the layer choice needs (read once, not per copy),
    /// then a copy to each down-track that takes it, each trunk, and keyframe
    /// requests for encodings some viewer waits to switch to.
    fn forward(
        &mut self,
        tid: TrackId,
        layer: Layer,
        plain: &[u8],
        arrival: &Arrival,
        tx: &mut dyn Transmit,
    ) {
        let c = &*self.counters;
        let (now, hlen, n) = (arrival.now, arrival.hlen, plain.len());
        let (seq, ts) = (
            u16::from_be_bytes([plain[2], plain[3]]),
            u32::from_be_bytes([plain[4], plain[5], plain[6], plain[7]]),
        );
        let Some(t) = self.tracks.get_mut(&tid) else {
            return c.count(Drop::UnknownSsrc);
        };
        if let Some(&[level, ..]) = t.level_ext.and_then(|id| rtp::extension(plain, id)) {
            t.levels.record(level, now);
        }
        let units = (now.duration_since(self.epoch).as_micros() as u64)
            .wrapping_mul(t.clock_rate as u64)
            / 1_000_000;
        let st = &mut t.streams[layer as usize];
        st.packets += 1;
        st.bytes += n as u64;
        st.last_packet = Some(now);
        st.reception.update(seq, ts, units);
        if !st.cache.is_empty() {
            // Reuse the slot's buffer rather than allocating one per packet.
            let slot = &mut st.cache[seq as usize % CACHE];
            let mut buf = slot.take().map(|(_, b)| b).unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(plain);
            *slot = Some((seq, buf));
        }
        let payload = &plain[hlen..];
        let start = may_start(t.format, payload);
        let vp8 = (t.format == Format::Vp8)
            .then(|| Vp8Descriptor::parse(payload))
            .flatten();
        let (ids, structure) = layer_ids_of(
            t.format,
            t.dd_ext,
            st.dd.as_ref(),
            plain,
            hlen,
            vp8.as_ref(),
        );
        if structure.is_some() {
            st.dd = structure;
        }
        if let Some(ids) = &ids {
            st.seen.record(ids, n - hlen, now);
        }
        let top = st.seen.top(now, LAYER_IDLE);
        let pkt = Packet {
            layer,
            seq,
            ts,
            keyframe: start,
            vp8: vp8.as_ref(),
            ids,
        };
        let wanted = fan_out(
            t,
            &mut self.sessions,
            &pkt,
            plain,
            arrival,
            units,
            top,
            c,
            tx,
        );
        for r in &t.trunks {
            if t.trunk_caps.get(r).is_some_and(|cap| layer > *cap) {
                continue;
            }
            if let Some(to) = self.sessions.get(r).and_then(|s| s.media_addr()) {
                send_raw(to, &self.scratch, c, tx);
            }
        }
        if wanted != 0 && t.kind == Kind::Video {
            for l in 0..MAX_LAYERS as Layer {
                if wanted & (1 << l) != 0 {
                    self.request_keyframe(tid, Some(l), now, tx);
                }
            }
        }
    }
}

/// When and how a publisher packet arrived: what each copy needs besides the packet.
struct Arrival {
    now: Instant,
    /// Microseconds since the engine's epoch (transport-wide feedback's clock).
    at_us: i64,
    /// The publisher's transport-wide sequence extension id, replaced in each copy.
    pub_twcc: Option<u8>,
    /// The RTP header's length.
    hlen: usize,
}

/// The track and encoding of a publisher's packet (`plain`, SSRC `ssrc`) among its
/// `own` tracks: the encoding with that SSRC, else (an SSRC not signalled) the
/// simulcast encoding its rid names, or the plain track whose payload type it
/// carries if still unbound, which binds it.
fn stream_of_packet(
    tracks: &mut HashMap<TrackId, UpTrack>,
    own: &[TrackId],
    plain: &[u8],
    ssrc: u32,
) -> Option<(TrackId, Layer)> {
    if let Some(found) = own
        .iter()
        .find_map(|t| Some((*t, tracks.get(t)?.layer_of(ssrc)?)))
    {
        return Some(found);
    }
    let pt = plain[1] & 0x7f;
    let (t, i) = own.iter().find_map(|t| {
        let up = tracks.get(t)?;
        let i = match up.rid_ext {
            Some(id) => {
                let rid = rtp::extension(plain, id)?;
                up.streams.iter().position(|st| {
                    st.ssrc.is_none() && st.rid.as_deref().map(str::as_bytes) == Some(rid)
                })?
            }
            None if up.pt == pt && up.streams[0].ssrc.is_none() => 0,
            None => return None,
        };
        Some((*t, i as Layer))
    })?;
    if let Some(st) = tracks
        .get_mut(&t)
        .and_then(|t| t.streams.get_mut(i as usize))
    {
        st.ssrc = Some(ssrc);
    }
    Some((t, i))
}

/// A copy of `pkt` to each of the track's down-tracks whose layer choice takes it;
/// returns the encodings some of them wait for a keyframe of (a bit per layer).
#[allow(clippy::too_many_arguments)]
fn fan_out(
    t: &mut UpTrack,
    sessions: &mut HashMap<SessionId, Session>,
    pkt: &Packet,
    plain: &[u8],
    arrival: &Arrival,
    units: u64,
    top: (Layer, Layer),
    c: &Counters,
    tx: &mut dyn Transmit,
) -> u8 {
    let (layer, hlen, n) = (pkt.layer, arrival.hlen, plain.len());
    let active = t.active(arrival.now);
    let encodings = t.streams.len();
    let mut wanted = 0u8;
    for d in &mut t.downs {
        // A viewer on another encoding that still flows has nothing to decide at
        // this one's packets but its keyframes (where it may switch here): its
        // choice is made at its own encoding's packets.
        if !pkt.keyframe
            && d.layering
                .current
                .is_some_and(|c| c != layer && active.get(c as usize) == Some(&true))
        {
            continue;
        }
        let target = d.layering.choose(&active[..encodings]);
        let mut want = d.layering.want(encodings);
        if d.one_spatial {
            want.0 = 0;
        }
        let out = d.layering.accept(pkt, target, want, units, &mut d.route);
        // Waiting to switch (a cap, a bandwidth limit, a layer that stopped) or for
        // more layers of its encoding: a keyframe is asked for, whether the old
        // layer still flows or not.
        if let Some(w) = d.layering.waiting(want, top) {
            wanted |= 1 << w;
        }
        let Some(out) = out else {
            continue;
        };
        let Some(sub) = sessions.get_mut(&d.sub) else {
            continue;
        };
        let to = sub.media_addr();
        let Session { srtp, twcc_out, .. } = sub;
        let (Some(to), Some(srtp)) = (to, srtp.as_mut()) else {
            continue;
        };
        let twcc = twcc_out.as_mut().map(|out| Numbering {
            out,
            from: arrival.pub_twcc,
            at_us: arrival.at_us,
        });
        let sent = send_copy(
            d,
            &mut srtp.tx,
            to,
            plain,
            hlen,
            pkt.vp8,
            out,
            None,
            twcc,
            tx,
        );
        if sent.is_ok() {
            bump(&c.rtp_out);
            d.packets = d.packets.wrapping_add(1);
            d.octets = d.octets.wrapping_add((n - hlen) as u32);
            d.last_ts_out = pkt.ts.wrapping_add(d.route.ts_delta);
            d.last_out_at = Some(arrival.now);
        } else if let Err(why) = sent {
            c.count(why);
        }
    }
    wanted
}
