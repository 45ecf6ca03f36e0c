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
mod tests {
    use super::*;
    use rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;

    #[test]
    fn keyframe_requests_and_nacks_are_read() {
        let mut compound = pli(1, 0xaabbccdd);
        compound.extend(
            rtcp::packet::marshal(&[Box::new(FullIntraRequest {
                sender_ssrc: 1,
                media_ssrc: 0,
                fir: vec![rtcp::payload_feedbacks::full_intra_request::FirEntry {
                    ssrc: 0x1234,
                    sequence_number: 3,
                }],
            }) as Box<dyn Packet + Send + Sync>])
            .unwrap(),
        );
        compound.extend(translated_nack(1, 0x55, &[10, 11, 13], 0));
        let got = parse(&compound).unwrap();
        assert_eq!(
            got,
            vec![
                Request::KeyFrame {
                    media_ssrc: 0xaabbccdd
                },
                Request::KeyFrame { media_ssrc: 0x1234 },
                Request::Nack {
                    media_ssrc: 0x55,
                    seqs: vec![10, 11, 13]
                },
            ]
        );
    }

    #[test]
    fn lying_feedback_is_an_error_or_skipped_never_a_panic() {
        // The fuzzer's find: a REMB (PSFB fmt 15) claiming 0x31 SSRCs in 24 bytes,
        // which the rtcp crate's REMB parser reads past the end of.
        let remb = [
            0x8f, 0xce, 0x00, 0x05, 0, 0, 0, 1, 0, 0, 0, 0, b'R', b'E', b'M', b'B', 0x31, 0x12,
            0x34, 0x56, 0x11, 0x22, 0x33, 0x44,
        ];
        assert_eq!(parse(&remb).unwrap(), vec![]);
        // Kinds we read still come through when they follow one we skip.
        let mut compound = remb.to_vec();
        compound.extend(pli(1, 0xabc));
        assert_eq!(
            parse(&compound).unwrap(),
            vec![Request::KeyFrame { media_ssrc: 0xabc }]
        );
        // A length that overruns the datagram, a wrong version, a truncated header.
        let mut long = pli(1, 2);
        long[3] = 9;
        assert!(parse(&long).is_err());
        let mut v1 = pli(1, 2);
        v1[0] = 0x41;
        assert!(parse(&v1).is_err());
        assert!(parse(&pli(1, 2)[..3]).is_err());
        assert!(parse(&[]).is_err());
        // The fuzzer's second find: a FIR of 8 octets (no media SSRC, no entry),
        // then an SR and a packet of another kind; the crate's FIR parser reads on.
        let fir_short = [
            0x84, 0xce, 0x00, 0x01, 0x11, 0x22, 0x33, 0x44, 0x01, 0x00, 0x00, 0x02, 0x00, 0x00,
            0x03, 0xe8, 0x00, 0x00, 0x00, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0x81, 0, 0, 0, 0, 0, 0, 0,
            0x00, 0x11, 0x22, 0x33, 0x44, 0x07, 0, 0, 0, 0, 0,
        ];
        assert!(parse(&fir_short).is_err());
        // Each kind we read, one octet short of its layout or with lying padding.
        let mut short_pli = pli(1, 2);
        short_pli[3] = 1;
        assert!(parse(&short_pli[..8]).is_err());
        let mut sr = sender_report(1, 2, 3, 4, 5, "c");
        sr[0] |= 1; // RC = 1 with no report block
        assert!(parse(&sr).is_err());
        let mut nack = translated_nack(1, 2, &[5], 0);
        nack[0] |= 0x20; // padding bit, last octet 0x00
        assert!(parse(&nack).is_err());
    }

    #[test]
    fn nack_moves_into_the_publisher_sequence_space_across_wraparound() {
        // The subscriber sees seq = publisher seq + 100 (mod 2^16).
        let raw = translated_nack(9, 0x77, &[50, 51, 99], 100);
        assert_eq!(
            parse(&raw).unwrap(),
            vec![Request::Nack {
                media_ssrc: 0x77,
                seqs: vec![65486, 65487, 65535]
            }]
        );
    }

    #[test]
    fn sender_report_roundtrip() {
        let raw = sender_report(0x42, 0x1122334455667788, 9000, 10, 1000, "edgefwd");
        assert_eq!(
            parse(&raw).unwrap(),
            vec![Request::SenderReport {
                ssrc: 0x42,
                ntp: 0x1122334455667788,
                rtp: 9000
            }]
        );
    }

    #[test]
    fn remb_is_read() {
        // 1.5 Mbit/s = 187,500 × 2^3 for SSRCs 0x11 and 0x22.
        let (exp, mantissa) = (3u32, 187_500u32);
        let mut p = vec![0x8f, 206, 0, 6, 0, 0, 0, 9, 0, 0, 0, 0];
        p.extend_from_slice(b"REMB");
        p.extend_from_slice(&((2 << 24) | (exp << 18) | mantissa).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0x11, 0, 0, 0, 0x22]);
        assert_eq!(
            parse(&p).unwrap(),
            vec![Request::Remb {
                bitrate: 1_500_000,
                ssrcs: vec![0x11, 0x22]
            }]
        );
    }

    #[test]
    fn report_blocks_from_receiver_and_sender_reports() {
        let block = |ssrc| ReceptionReport {
            ssrc,
            fraction_lost: 64,
            total_lost: 12,
            last_sequence_number: 0x1_0005,
            jitter: 90,
            last_sender_report: 0xdead_beef,
            delay: 65536 / 2,
        };
        let rr = receiver_report(7, vec![block(0x11), block(0x22)]);
        let got = parse(&rr).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Request::Reception(ReportBlock {
                media_ssrc: 0x22,
                fraction_lost: 64,
                total_lost: 12,
                highest_seq: 0x1_0005,
                jitter: 90,
                lsr: 0xdead_beef,
                dlsr: 32768,
            })
        );
        // In an SR after the sender info; cumulative loss is signed (duplicates).
        let mut sr = marshal(vec![Box::new(SenderReport {
            ssrc: 1,
            reports: vec![block(0x33)],
            ..Default::default()
        })]);
        sr[28 + 5..28 + 8].copy_from_slice(&[0xff, 0xff, 0xfe]);
        let got = parse(&sr).unwrap();
        assert!(
            matches!(got[1], Request::Reception(b) if b.media_ssrc == 0x33 && b.total_lost == -2)
        );
        // RC larger than what follows.
        let mut short = rr.clone();
        short[0] = (short[0] & 0xe0) | 3;
        assert!(parse(&short).is_err());
    }

    #[test]
    fn reception_counts_loss_wraparound_and_jitter() {
        let mut r = Reception::default();
        let t0 = std::time::Instant::now();
        // 65530..=65535, then 0..=9 with 3 and 4 lost: 16 expected, 14 received.
        for (n, s) in (65530u32..65536).chain(0..10).map(|s| s as u16).enumerate() {
            let n = n as u64;
            if s != 3 && s != 4 {
                r.update(s, (n * 3000) as u32, n * 3000 + (n % 2) * 90);
            }
        }
        let rep = r.report(7, t0).unwrap();
        assert_eq!(rep.last_sequence_number, (1 << 16) + 9);
        assert_eq!(rep.total_lost, 2);
        assert_eq!(rep.fraction_lost, (2 * 256 / 16) as u8);
        assert!(
            rep.jitter > 0,
            "alternating 90-unit transit changes show as jitter"
        );
        // Next interval without loss reports 0 lost in the interval, 2 in total.
        r.update(10, 0, 0);
        let rep = r.report(7, t0).unwrap();
        assert_eq!((rep.fraction_lost, rep.total_lost), (0, 2));
    }

    /// Transport feedback as a real recorder builds it (the interceptor crate's, which
    /// the engine also sends publishers): the received sequence numbers, in order,
    /// with their arrival times as sent; the lost ones left out.
    #[test]
    fn transport_feedback_lists_what_arrived_and_when() {
        let mut rec = interceptor::twcc::Recorder::new(5);
        let arrivals: Vec<(u16, i64)> = (0..10u16)
            .map(|i| 65_530u16.wrapping_add(i))
            .filter(|s| *s != 65_533 && *s != 65_534)
            .enumerate()
            .map(|(i, s)| {
                (
                    s,
                    1_000_000 + 1_250 * i as i64 + if i > 4 { 70_000 } else { 0 },
                )
            })
            .collect();
        for (seq, at) in &arrivals {
            rec.record(0xaa, *seq, *at);
        }
        let bytes = rtcp::packet::marshal(&rec.build_feedback_packet()).unwrap();
        let got = parse(&bytes).unwrap();
        let [Request::TransportFeedback { received }] = &got[..] else {
            panic!("{got:?}")
        };
        assert_eq!(
            received.iter().map(|r| r.0).collect::<Vec<_>>(),
            arrivals.iter().map(|a| a.0).collect::<Vec<_>>()
        );
        // Times relative to the first (the reference time is in 64 ms units).
        let rel = |v: &[(u16, i64)]| v.iter().map(|r| r.1 - v[0].1).collect::<Vec<_>>();
        assert_eq!(rel(received), rel(&arrivals));
        assert!(parse(&bytes[..bytes.len() - 4]).is_err(), "truncated");
    }

    /// Transport feedback that lies: a status count of 65,535 with a few chunks (the
    /// fuzzer's find, which panics the rtcp crate's reader), deltas past the end; and
    /// a vector of two-bit symbols read right. An error or what is there, never a
    /// panic.
    #[test]
    fn lying_transport_feedback_is_an_error() {
        let mut p = vec![
            0x8f, 205, 0, 5, 0, 0, 0, 1, 0, 0, 0, 2, 0, 10, 0xff, 0xff, 0, 0, 1, 0,
        ];
        p.extend_from_slice(&[0xc0, 0x00, 0xd5, 0x55]);
        assert!(parse(&p).is_err());
        // Two statuses (a run of small deltas): 4 × 250 µs, then 0.
        let mut q = vec![
            0x8f, 205, 0, 5, 0, 0, 0, 1, 0, 0, 0, 2, 0, 10, 0, 2, 0, 0, 1, 0,
        ];
        q.extend_from_slice(&[0x20, 0x02, 4, 0]);
        assert_eq!(
            parse(&q).unwrap(),
            vec![Request::TransportFeedback {
                received: vec![(10, 64_000 + 1_000), (11, 64_000 + 1_000)]
            }]
        );
        // Two packets reported, one delta there.
        let mut r = q.clone();
        r[15] = 3;
        r[21] = 0x03;
        assert!(parse(&r).is_err(), "a delta past the end");
        // A vector of seven two-bit symbols: small (2 ms), large (-1 ms), then none.
        let mut v = vec![
            0x8f, 205, 0, 6, 0, 0, 0, 1, 0, 0, 0, 2, 0, 10, 0, 7, 0, 0, 0, 0,
        ];
        v.extend_from_slice(&[0b1101_1000, 0, 8, 0xff, 0xfc, 0, 0, 0]);
        assert_eq!(
            parse(&v).unwrap(),
            vec![Request::TransportFeedback {
                received: vec![(10, 2_000), (11, 1_000)]
            }]
        );
    }
}
