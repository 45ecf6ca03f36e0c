//! RTCP between the two legs: what subscribers ask for (keyframes, retransmissions),
//! translated into the publisher's SSRC and sequence space, and the reports we
//! originate (SR to subscribers, RR to publishers) so both ends have statistics.

use bytes::Bytes;
use rtcp::{
    packet::Packet,
    payload_feedbacks::picture_loss_indication::PictureLossIndication,
    receiver_report::ReceiverReport,
    reception_report::ReceptionReport,
    sender_report::SenderReport,
    source_description::{
        SdesType, SourceDescription, SourceDescriptionChunk, SourceDescriptionItem,
    },
    transport_feedbacks::transport_layer_nack::{
        TransportLayerNack, nack_pairs_from_sequence_numbers,
    },
};

/// Something a receiver asked of the SSRC it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// PLI or FIR: send a keyframe.
    KeyFrame { media_ssrc: u32 },
    /// Generic NACK: resend these sequence numbers.
    Nack { media_ssrc: u32, seqs: Vec<u16> },
    /// A sender report from a publisher: (NTP time, RTP time) for lip sync and LSR.
    SenderReport { ssrc: u32, ntp: u64, rtp: u32 },
    /// A report block (RFC 3550 §6.4.1, in an SR or RR): how the sender of the
    /// report receives `media_ssrc`.
    Reception(ReportBlock),
    /// REMB (draft-alvestrand-rmcat-remb): the receiver's estimate of what it can
    /// take, bits/s, for these SSRCs together.
    Remb { bitrate: u64, ssrcs: Vec<u32> },
    /// Transport-wide feedback (draft-holmer-rmcat-transport-wide-cc-extensions §3.1):
    /// the transport-wide sequence numbers received and when (µs, the receiver's
    /// clock), in sequence order; those reported lost are left out.
    TransportFeedback { received: Vec<(u16, i64)> },
}

/// One reception report block as received, fields as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlock {
    pub media_ssrc: u32,
    /// Lost since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// Cumulative loss (24-bit signed on the wire: duplicates can make it negative).
    pub total_lost: i32,
    pub highest_seq: u32,
    /// Interarrival jitter in RTP timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the NTP time of the last SR it got from us, 0 if none.
    pub lsr: u32,
    /// Delay since that SR, in 1/65536 s.
    pub dlsr: u32,
}

impl ReportBlock {
    fn read(b: &[u8]) -> ReportBlock {
        // 24-bit two's complement: shift into the top of an i32 and back.
        let lost = (i32::from_be_bytes([b[5], b[6], b[7], 0])) >> 8;
        ReportBlock {
            media_ssrc: be32(b, 0),
            fraction_lost: b[4],
            total_lost: lost,
            highest_seq: be32(b, 8),
            jitter: be32(b, 12),
            lsr: be32(b, 16),
            dlsr: be32(b, 20),
        }
    }
}

/// Reads a decrypted RTCP compound packet. The compound is framed here (RFC 3550
/// §6.1: version 2, lengths that add up exactly, padding inside its packet) and the
/// kinds we act on (SR, generic NACK, PLI, FIR) are read here too, each checked
/// against its fixed layout before a field is touched. The rtcp crate only builds
/// our packets: fuzzing found its parsers panic on lying lengths (a REMB whose SSRC
/// count overruns the packet, a FIR shorter than its header), and a peer holding
/// valid SRTP keys must not be able to crash the daemon that way. Other kinds are
/// skipped; a bad frame or a malformed packet of a kind we read is an error the
/// caller counts.
pub fn parse(plain: &[u8]) -> Result<Vec<Request>, rtcp::Error> {
    let mut out = Vec::new();
    let mut rest = plain;
    if rest.is_empty() {
        return Err(rtcp::Error::PacketTooShort);
    }
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(rtcp::Error::PacketTooShort);
        }
        if rest[0] >> 6 != 2 {
            return Err(rtcp::Error::BadVersion);
        }
        let len = (u16::from_be_bytes([rest[2], rest[3]]) as usize + 1) * 4;
        if len > rest.len() {
            return Err(rtcp::Error::PacketTooShort);
        }
        let (pkt, tail) = rest.split_at(len);
        rest = tail;
        // P bit: the last octet counts padding octets, itself included (§6.4.1).
        let body_end = if pkt[0] & 0x20 != 0 {
            let pad = pkt[len - 1] as usize;
            if pad == 0 || pad > len - 4 {
                return Err(rtcp::Error::WrongPadding);
            }
            len - pad
        } else {
            len
        };
        // Transport feedback is read by the rtcp crate, which takes the packet whole
        // (it reads the length, padding included, from the header itself).
        let body = if (pkt[1], pkt[0] & 0x1f) == (205, 15) {
            pkt
        } else {
            &pkt[..body_end]
        };
        read_one(pkt[1], pkt[0] & 0x1f, body, &mut out)?;
    }
    Ok(out)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One packet of a kind we act on, `pkt` being header + body without padding.
/// Every read is behind a length check on the packet's fixed layout.
fn read_one(pt: u8, fmt: u8, pkt: &[u8], out: &mut Vec<Request>) -> Result<(), rtcp::Error> {
    match (pt, fmt) {
        // SR: header, SSRC, NTP (8), RTP ts, packet and octet counts, then RC
        // report blocks of 24 octets (and maybe profile extensions after them).
        (200, rc) => {
            if pkt.len() < 28 + 24 * rc as usize {
                return Err(rtcp::Error::PacketTooShort);
            }
            out.push(Request::SenderReport {
                ssrc: be32(pkt, 4),
                ntp: (be32(pkt, 8) as u64) << 32 | be32(pkt, 12) as u64,
                rtp: be32(pkt, 16),
            });
            blocks(&pkt[28..], rc, out);
        }
        // RR: header, SSRC, then RC report blocks.
        (201, rc) => {
            if pkt.len() < 8 + 24 * rc as usize {
                return Err(rtcp::Error::PacketTooShort);
            }
            blocks(&pkt[8..], rc, out);
        }
        // Generic NACK (RFC 4585 §6.2.1): sender and media SSRC, then PID/BLP words.
        (205, 1) => {
            if pkt.len() < 12 || !(pkt.len() - 12).is_multiple_of(4) {
                return Err(rtcp::Error::PacketTooShort);
            }
            let mut seqs = Vec::new();
            for fci in pkt[12..].chunks_exact(4) {
                let pid = u16::from_be_bytes([fci[0], fci[1]]);
                let blp = u16::from_be_bytes([fci[2], fci[3]]);
                seqs.push(pid);
                seqs.extend(
                    (0..16u16)
                        .filter(|i| blp & (1 << i) != 0)
                        .map(|i| pid.wrapping_add(i + 1)),
                );
            }
            out.push(Request::Nack {
                media_ssrc: be32(pkt, 8),
                seqs,
            });
        }
        (205, 15) => out.push(Request::TransportFeedback {
            received: transport_feedback(pkt)?,
        }),
        // PLI (RFC 4585 §6.3.1): no FCI.
        (206, 1) => {
            if pkt.len() != 12 {
                return Err(rtcp::Error::PacketTooShort);
            }
            out.push(Request::KeyFrame {
                media_ssrc: be32(pkt, 8),
            });
        }
        // FIR (RFC 5104 §4.3.1): one 8-octet entry (SSRC, seq, reserved) per target.
        (206, 4) => {
            if pkt.len() < 20 || !(pkt.len() - 12).is_multiple_of(8) {
                return Err(rtcp::Error::PacketTooShort);
            }
            for e in pkt[12..].chunks_exact(8) {
                out.push(Request::KeyFrame {
                    media_ssrc: be32(e, 0),
                });
            }
        }
        // REMB: PSFB fmt 15, media SSRC 0, "REMB", SSRC count, 6-bit exponent and
        // 18-bit mantissa, then the SSRCs. One whose count runs past the packet is
        // skipped (it claims SSRCs it does not carry).
        (206, 15) if pkt.len() >= 20 && &pkt[12..16] == b"REMB" => {
            let n = pkt[16] as usize;
            if pkt.len() >= 20 + 4 * n {
                let exp = pkt[17] >> 2;
                let mantissa = u32::from_be_bytes([0, pkt[17] & 3, pkt[18], pkt[19]]) as u64;
                out.push(Request::Remb {
                    bitrate: mantissa.checked_shl(exp as u32).unwrap_or(u64::MAX),
                    ssrcs: pkt[20..20 + 4 * n]
                        .chunks_exact(4)
                        .map(|c| be32(c, 0))
                        .collect(),
                });
            }
        }
        _ => {}
    }
    Ok(())
}

/// The packets a transport feedback (header included, padding cut) reports received,
/// with their arrival times (µs, the receiver's clock), in sequence order.
///
/// Read here rather than with the rtcp crate, whose reader overflows (a panic in
/// debug builds) on a status count near 2^16: the fuzzer found it.
fn transport_feedback(pkt: &[u8]) -> Result<Vec<(u16, i64)>, rtcp::Error> {
    // Header, sender and media SSRC, base sequence number, status count, 24-bit
    // reference time (signed, 64 ms units), feedback packet count.
    if pkt.len() < 20 {
        return Err(rtcp::Error::PacketTooShort);
    }
    let base = u16::from_be_bytes([pkt[12], pkt[13]]);
    let count = u16::from_be_bytes([pkt[14], pkt[15]]) as usize;
    let reference = i32::from_be_bytes([pkt[16], pkt[17], pkt[18], 0]) >> 8;
    // Status chunks until `count` statuses: a run length (T=0: a 2-bit symbol, a
    // 13-bit run) or a vector (T=1: fourteen 1-bit or seven 2-bit symbols).
    let mut statuses: Vec<u8> = Vec::with_capacity(count.min(pkt.len() * 8));
    let mut at = 20;
    while statuses.len() < count {
        let chunk = u16::from_be_bytes([
            *pkt.get(at).ok_or(rtcp::Error::PacketTooShort)?,
            *pkt.get(at + 1).ok_or(rtcp::Error::PacketTooShort)?,
        ]);
        at += 2;
        let left = count - statuses.len();
        if chunk & 0x8000 == 0 {
            let run = (chunk & 0x1fff) as usize;
            statuses.extend(std::iter::repeat_n((chunk >> 13) as u8 & 3, run.min(left)));
        } else if chunk & 0x4000 == 0 {
            statuses.extend((0..14).rev().map(|i| ((chunk >> i) & 1) as u8).take(left));
        } else {
            statuses.extend(
                (0..7)
                    .rev()
                    .map(|i| ((chunk >> (2 * i)) & 3) as u8)
                    .take(left),
            );
        }
    }
    // A receive delta per received packet: one octet (1: small, unsigned) or two
    // (2: large, signed), in 250 µs units.
    let mut time = reference as i64 * 64_000;
    let mut out = Vec::new();
    for (i, st) in statuses.into_iter().enumerate() {
        let delta = match st {
            1 => *pkt.get(at).ok_or(rtcp::Error::PacketTooShort)? as i64,
            2 => i16::from_be_bytes([
                *pkt.get(at).ok_or(rtcp::Error::PacketTooShort)?,
                *pkt.get(at + 1).ok_or(rtcp::Error::PacketTooShort)?,
            ]) as i64,
            _ => continue,
        };
        at += st as usize;
        time += delta * 250;
        out.push((base.wrapping_add(i as u16), time));
    }
    Ok(out)
}

/// The first `rc` report blocks of `b` (the caller checked there are that many).
fn blocks(b: &[u8], rc: u8, out: &mut Vec<Request>) {
    out.extend(
        b.chunks_exact(24)
            .take(rc as usize)
            .map(|b| Request::Reception(ReportBlock::read(b))),
    );
}

fn marshal(pkts: Vec<Box<dyn Packet + Send + Sync>>) -> Vec<u8> {
    // Only fails for packets we built wrong (e.g. over 31 report blocks).
    rtcp::packet::marshal(&pkts)
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

/// PLI from `sender` (our RTCP SSRC towards the publisher) about the publisher's SSRC.
pub fn pli(sender: u32, media_ssrc: u32) -> Vec<u8> {
    marshal(vec![Box::new(PictureLossIndication {
        sender_ssrc: sender,
        media_ssrc,
    })])
}

/// A subscriber's NACK, moved into the publisher's sequence space.
pub fn translated_nack(sender: u32, media_ssrc: u32, view_seqs: &[u16], seq_delta: u16) -> Vec<u8> {
    let seqs: Vec<u16> = view_seqs
        .iter()
        .map(|s| s.wrapping_sub(seq_delta))
        .collect();
    marshal(vec![Box::new(TransportLayerNack {
        sender_ssrc: sender,
        media_ssrc,
        nacks: nack_pairs_from_sequence_numbers(&seqs),
    })])
}

/// SR + SDES for one stream we send a subscriber.
pub fn sender_report(
    ssrc: u32,
    ntp: u64,
    rtp: u32,
    packets: u32,
    octets: u32,
    cname: &str,
) -> Vec<u8> {
    marshal(vec![
        Box::new(SenderReport {
            ssrc,
            ntp_time: ntp,
            rtp_time: rtp,
            packet_count: packets,
            octet_count: octets,
            reports: vec![],
            profile_extensions: Bytes::new(),
        }),
        Box::new(SourceDescription {
            chunks: vec![SourceDescriptionChunk {
                source: ssrc,
                items: vec![SourceDescriptionItem {
                    sdes_type: SdesType::SdesCname,
                    text: Bytes::copy_from_slice(cname.as_bytes()),
                }],
            }],
        }),
    ])
}

/// Per-source reception statistics (RFC 3550 §6.4.1, appendix A.3 and A.8).
#[derive(Debug, Default, Clone)]
pub struct Reception {
    started: bool,
    base_seq: u16,
    max_seq: u16,
    cycles: u32,
    received: u32,
    expected_prior: u32,
    received_prior: u32,
    /// Interarrival jitter in timestamp units, scaled by 16 as in A.8.
    jitter_q4: u32,
    last_transit: Option<i64>,
    /// Middle 32 bits of the last SR's NTP time and when it arrived (for LSR/DLSR).
    pub last_sr: Option<(u32, std::time::Instant)>,
}

impl Reception {
    /// Records a packet: its sequence number, RTP timestamp, and arrival time in the
    /// same clock units.
    pub fn update(&mut self, seq: u16, ts: u32, arrival_units: u64) {
        if !self.started {
            self.started = true;
            self.base_seq = seq;
            self.max_seq = seq;
        } else {
            let delta = seq.wrapping_sub(self.max_seq);
            if delta != 0 && delta < 0x8000 {
                if seq < self.max_seq {
                    self.cycles = self.cycles.wrapping_add(1 << 16);
                }
                self.max_seq = seq;
            }
        }
        self.received = self.received.wrapping_add(1);
        let transit = arrival_units as i64 - ts as i64;
        if let Some(last) = self.last_transit {
            let d = (transit - last).unsigned_abs() as u32;
            // J += (|D| - J) / 16, kept scaled by 16.
            self.jitter_q4 = self
                .jitter_q4
                .wrapping_add(d)
                .wrapping_sub((self.jitter_q4 + 8) >> 4);
        }
        self.last_transit = Some(transit);
    }

    /// Packets lost so far (expected but never received; duplicates count against
    /// it, so never below 0).
    pub fn lost(&self) -> u32 {
        if !self.started {
            return 0;
        }
        self.extended_max()
            .wrapping_sub(self.base_seq as u32)
            .wrapping_add(1)
            .saturating_sub(self.received)
    }

    pub fn extended_max(&self) -> u32 {
        self.cycles.wrapping_add(self.max_seq as u32)
    }

    /// The report block for this source; advances the interval counters.
    pub fn report(&mut self, ssrc: u32, now: std::time::Instant) -> Option<ReceptionReport> {
        if !self.started {
            return None;
        }
        let expected = self
            .extended_max()
            .wrapping_sub(self.base_seq as u32)
            .wrapping_add(1);
        let lost_total = expected.saturating_sub(self.received).min(0x7fffff);
        let expected_interval = expected.wrapping_sub(self.expected_prior);
        let received_interval = self.received.wrapping_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval.saturating_sub(received_interval);
        let fraction_lost = if expected_interval == 0 || lost_interval == 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval).min(255) as u8
        };
        let (lsr, dlsr) = match self.last_sr {
            Some((mid, at)) => (mid, (now.duration_since(at).as_secs_f64() * 65536.0) as u32),
            None => (0, 0),
        };
        Some(ReceptionReport {
            ssrc,
            fraction_lost,
            total_lost: lost_total,
            last_sequence_number: self.extended_max(),
            jitter: self.jitter_q4 >> 4,
            last_sender_report: lsr,
            delay: dlsr,
        })
    }
}

/// How a receiver says it gets one stream we send it, from its report blocks: loss,
/// jitter and the round-trip time (RFC 3550 §6.4.1: now − LSR − DLSR, against the
/// SR we sent). The input of a loss-based bandwidth estimate, and what an operator
/// looks at first when a viewer complains.
#[derive(Debug, Default, Clone)]
pub struct Quality {
    /// Loss over the receiver's last report interval, in 1/256.
    pub fraction_lost: u8,
    pub total_lost: i32,
    pub jitter: std::time::Duration,
    pub rtt: Option<std::time::Duration>,
    pub reports: u64,
    /// The NTP middle 32 bits of the last SR we sent and when (a receiver echoes
    /// them as LSR). One is enough: receivers report on the latest SR.
    sent_sr: Option<(u32, std::time::Instant)>,
}

impl Quality {
    /// Notes an SR we send, with its full NTP time.
    pub fn sent_sr(&mut self, ntp: u64, now: std::time::Instant) {
        self.sent_sr = Some(((ntp >> 16) as u32, now));
    }

    /// Takes a report block about this stream; `clock_rate` turns jitter into time.
    pub fn update(&mut self, b: &ReportBlock, clock_rate: u32, now: std::time::Instant) {
        self.fraction_lost = b.fraction_lost;
        self.total_lost = b.total_lost;
        self.jitter =
            std::time::Duration::from_secs_f64(b.jitter as f64 / clock_rate.max(1) as f64);
        self.reports += 1;
        // An LSR of 0 means no SR received yet; one that is not ours (an older SR)
        // gives no RTT rather than a wrong one.
        if let Some((mid, at)) = self.sent_sr
            && b.lsr != 0
            && b.lsr == mid
        {
            let held = std::time::Duration::from_secs_f64(b.dlsr as f64 / 65536.0);
            self.rtt = Some(now.saturating_duration_since(at).saturating_sub(held));
        }
    }

    /// Loss over the last interval, in percent.
    pub fn loss_percent(&self) -> f64 {
        self.fraction_lost as f64 * 100.0 / 256.0
    }
}

/// RR from `sender` with up to 31 report blocks.
pub fn receiver_report(sender: u32, mut reports: Vec<ReceptionReport>) -> Vec<u8> {
    reports.truncate(31);
    marshal(vec![Box::new(ReceiverReport {
        ssrc: sender,
        reports,
        profile_extensions: Bytes::new(),
    })])
}

/// NTP timestamp (RFC 3550 §4) for a wall-clock time.
pub fn ntp_time(t: std::time::SystemTime) -> u64 {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + 2_208_988_800;
    (secs << 32) | (((d.subsec_nanos() as u64) << 32) / 1_000_000_000)
}

#[cfg(test)]
mod tests;
