//! What the engine does on its timers: sender and receiver reports, transport
//! feedback to publishers, bandwidth decisions and padding probes.

use super::*;

impl Engine {
    /// When [`Engine::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_report.min(self.next_feedback)
    }

    /// Transport feedback to publishers every [`FEEDBACK_INTERVAL`]; sender reports
    /// to subscribers (lip sync carried over from the publisher's SR) and receiver
    /// reports to publishers every [`REPORT_INTERVAL`]. `wall` is only for streams no
    /// SR has timed yet.
    pub fn handle_timeout(&mut self, now: Instant, wall: SystemTime, tx: &mut dyn Transmit) {
        if now >= self.next_feedback {
            advance(&mut self.next_feedback, FEEDBACK_INTERVAL, now);
            self.send_feedback(tx);
            self.send_padding(now, tx);
        }
        if now < self.next_report {
            return;
        }
        advance(&mut self.next_report, REPORT_INTERVAL, now);
        let c = &*self.counters;
        for t in self.tracks.values_mut() {
            for st in &mut t.streams {
                let (bytes, at) = st.rate_mark;
                let secs = now.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    st.rate_bps = ((st.bytes - bytes) as f64 * 8.0 / secs) as u64;
                }
                st.seen.tick(secs);
                st.rate_mark = (st.bytes, now);
            }
            for d in &mut t.downs {
                if d.packets == 0 {
                    continue;
                }
                let Some(sub) = self.sessions.get_mut(&d.sub) else {
                    continue;
                };
                let (Some(to), Some(srtp)) = (sub.media_addr(), sub.srtp.as_mut()) else {
                    continue;
                };
                let (ntp, rtp) = match t.streams[d.layer() as usize].last_sr {
                    Some((ntp, rtp, at)) => {
                        let el = now - at;
                        (
                            ntp.wrapping_add(((el.as_nanos() as u64) << 32) / 1_000_000_000),
                            rtp.wrapping_add(d.route.ts_delta)
                                .wrapping_add((el.as_secs_f64() * t.clock_rate as f64) as u32),
                        )
                    }
                    None => {
                        let el = d.last_out_at.map(|at| now - at).unwrap_or_default();
                        (
                            rtcp::ntp_time(wall),
                            d.last_ts_out
                                .wrapping_add((el.as_secs_f64() * t.clock_rate as f64) as u32),
                        )
                    }
                };
                let sr =
                    rtcp::sender_report(d.ssrc_out(), ntp, rtp, d.packets, d.octets, &self.cname);
                send_rtcp(&mut srtp.tx, to, &sr, c, tx);
                d.quality.sent_sr(ntp, now);
            }
        }
        for s in self.sessions.values_mut() {
            if s.role != Role::Publisher {
                continue;
            }
            let mut blocks = Vec::new();
            for tid in &s.tracks {
                let Some(t) = self.tracks.get_mut(tid) else {
                    continue;
                };
                for st in &mut t.streams {
                    if let Some(b) = st.ssrc.and_then(|ssrc| st.reception.report(ssrc, now)) {
                        blocks.push(b);
                    }
                }
            }
            let (Some(to), Some(srtp)) = (s.media_addr(), s.srtp.as_mut()) else {
                continue;
            };
            if !blocks.is_empty() {
                send_rtcp(
                    &mut srtp.tx,
                    to,
                    &rtcp::receiver_report(s.rtcp_ssrc, blocks),
                    c,
                    tx,
                );
            }
        }
    }

    /// What each publisher's packets did on the way (transport-wide sequence numbers
    /// and arrival times), for its congestion controller.
    pub(super) fn send_feedback(&mut self, tx: &mut dyn Transmit) {
        let c = &*self.counters;
        for s in self.sessions.values_mut() {
            let to = s.media_addr();
            let (Some((_, rec)), Some(to), Some(srtp)) = (s.twcc.as_mut(), to, s.srtp.as_mut())
            else {
                continue;
            };
            // One datagram each: a second's worth at a high rate outgrows one packet.
            for fb in rec.build_feedback_packet() {
                if let Ok(b) = ::rtcp::packet::marshal(std::slice::from_ref(&fb)) {
                    send_rtcp(&mut srtp.tx, to, &b, c, tx);
                    bump(&c.transport_feedback);
                }
            }
        }
    }

    /// Padding probes: a [`FEEDBACK_INTERVAL`]'s worth of each probing down-track's
    /// padding rate, as padding-only packets on its RTX stream (its own sequence
    /// numbers: the media numbering is untouched), each with a transport-wide number
    /// so the viewer's feedback shows whether the path carried them.
    pub(super) fn send_padding(&mut self, now: Instant, tx: &mut dyn Transmit) {
        let c = &*self.counters;
        let at_us = now.duration_since(self.epoch).as_micros() as i64;
        for t in self.tracks.values_mut() {
            for d in &mut t.downs {
                let (Some(rate), Some((pt, ssrc, seq))) = (d.bwe.padding(), d.rtx.as_mut()) else {
                    continue;
                };
                let Some(sub) = self.sessions.get_mut(&d.sub) else {
                    continue;
                };
                let to = sub.media_addr();
                let Session { srtp, twcc_out, .. } = sub;
                let (Some(to), Some(srtp), Some(tw)) = (to, srtp.as_mut(), twcc_out.as_mut())
                else {
                    continue;
                };
                let mut bytes = (rate * FEEDBACK_INTERVAL.as_millis() as u64 / 8_000) as usize;
                while bytes > 0 {
                    // RTP padding is counted in one octet; libwebrtc pads by 224.
                    let pad = bytes.min(PADDING);
                    let ts = d.last_ts_out;
                    let mut numbered = None;
                    let mut why = Drop::SendFailed;
                    let sent = tx.transmit(to, &mut |buf| {
                        let len = 20 + pad;
                        let p = buf.get_mut(..len)?;
                        // V=2, P, X; one one-byte extension: the transport-wide number.
                        p[..2].copy_from_slice(&[0xb0, *pt & 0x7f]);
                        p[2..4].copy_from_slice(&seq.to_be_bytes());
                        p[4..8].copy_from_slice(&ts.to_be_bytes());
                        p[8..12].copy_from_slice(&ssrc.to_be_bytes());
                        p[12..20].copy_from_slice(&[0xbe, 0xde, 0, 1, (tw.ext << 4) | 1, 0, 0, 0]);
                        p[20..].fill(0);
                        p[len - 1] = pad as u8;
                        numbered = tw.number(buf, len, None).map(|(n, _)| n);
                        srtp.tx
                            .protect_rtp(buf, len)
                            .map_err(|e| why = Drop::from_srtp(e))
                            .ok()
                    });
                    if !sent {
                        c.count(why);
                        break;
                    }
                    if let Some(n) = numbered {
                        tw.sent(n, at_us, 20 + pad);
                    }
                    *seq = seq.wrapping_add(1);
                    bump(&c.bwe_padding);
                    bytes -= pad;
                }
            }
        }
    }
}
