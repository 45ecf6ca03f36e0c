//! What the load test's publishers send and its subscribers measure. Synthetic video
//! (frames split into packets, a keyframe every few seconds and whenever the SFU asks
//! with a PLI) and Opus-sized audio; every payload carries a stamp (track, sequence,
//! send time) so a receiver measures loss and latency without decoding anything.

use std::time::Duration;

use forwarder_common::rtp::RTP_FIXED_HEADER_LEN;

const MAGIC: [u8; 4] = *b"EFLT";
/// Magic, track, sequence, send time.
pub const STAMP_LEN: usize = 20;
/// Largest payload per packet: a 1,200-byte-ish packet like a browser's.
pub const MAX_PAYLOAD: usize = 1100;
/// Video payloads open with a VP8 payload descriptor and the first byte of the VP8
/// header (RFC 7741): the stamp follows them.
const VP8_PREFIX: usize = 2;

pub const FPS: u32 = 30;
pub const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// An Opus frame of 20 ms at ~32 kbit/s.
pub const AUDIO_PAYLOAD: usize = 80;
/// A keyframe every this many frames, three times a delta frame's size.
pub const KEYFRAME_EVERY: u32 = 2 * FPS;
const KEYFRAME_SCALE: usize = 3;

/// One packet's stamp. `sent_ns` counts from the run's start (one clock for senders
/// and receivers: they run in one process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub track: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

impl Stamp {
    fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&self.track.to_be_bytes());
        out[8..12].copy_from_slice(&self.seq.to_be_bytes());
        out[12..20].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// The stamp in an RTP payload: at its start (audio) or after the VP8 prefix.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        [0, VP8_PREFIX].into_iter().find_map(|at| {
            let p = payload.get(at..at + STAMP_LEN)?;
            (p[..4] == MAGIC).then(|| Stamp {
                track: u32::from_be_bytes(p[4..8].try_into().unwrap()),
                seq: u32::from_be_bytes(p[8..12].try_into().unwrap()),
                sent_ns: u64::from_be_bytes(p[12..20].try_into().unwrap()),
            })
        })
    }
}

/// One RTP stream we send.
pub struct Stream {
    pub ssrc: u32,
    pt: u8,
    seq: u16,
    ts: u32,
    /// The stamp's track number and its next sequence.
    pub track: u32,
    stamp_seq: u32,
    pub packets: u64,
    pub bytes: u64,
    /// When the last packet was stamped (run clock): where a subscriber's tail ends.
    pub last_ns: u64,
}

impl Stream {
    pub fn new(ssrc: u32, pt: u8, track: u32) -> Stream {
        Stream {
            ssrc,
            pt,
            seq: rand::random(),
            ts: rand::random(),
            track,
            stamp_seq: 0,
            packets: 0,
            bytes: 0,
            last_ns: 0,
        }
    }

    /// Writes one RTP packet of `payload_len` bytes (prefix, stamp, filler) into `buf`,
    /// with a one-byte header extension `ext` (RFC 8285: id, one byte of data) if
    /// given; returns its length. `buf` must hold the header, the payload and the
    /// SRTP tag.
    fn packet(
        &mut self,
        buf: &mut [u8],
        marker: bool,
        prefix: &[u8],
        payload_len: usize,
        now_ns: u64,
        ext: Option<(u8, u8)>,
    ) -> usize {
        let payload_len = payload_len.max(prefix.len() + STAMP_LEN);
        buf[0] = 0x80 | if ext.is_some() { 0x10 } else { 0 };
        buf[1] = self.pt | if marker { 0x80 } else { 0 };
        buf[2..4].copy_from_slice(&self.seq.to_be_bytes());
        buf[4..8].copy_from_slice(&self.ts.to_be_bytes());
        buf[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        let mut h = RTP_FIXED_HEADER_LEN;
        if let Some((id, value)) = ext {
            // 0xBEDE, one word: the element (id, length 1 − 1) and its byte, padding.
            buf[h..h + 8].copy_from_slice(&[0xbe, 0xde, 0, 1, id << 4, value, 0, 0]);
            h += 8;
        }
        let p = &mut buf[h..h + payload_len];
        p[..prefix.len()].copy_from_slice(prefix);
        Stamp {
            track: self.track,
            seq: self.stamp_seq,
            sent_ns: now_ns,
        }
        .write(&mut p[prefix.len()..]);
        p[prefix.len() + STAMP_LEN..].fill(0x5a);
        self.seq = self.seq.wrapping_add(1);
        self.stamp_seq += 1;
        self.packets += 1;
        self.bytes += payload_len as u64;
        self.last_ns = now_ns;
        h + payload_len
    }
}

/// The RFC 6464 audio level extension's id in our offers (Chromium's).
pub const AUDIO_LEVEL_ID: u8 = 1;

/// Publishers of a room taking turns to talk: publisher `index` of `of` talks
/// (−30 dBov, voice) in its `turn`-long slot, and is silent otherwise.
#[derive(Clone, Copy, Debug)]
pub struct Talk {
    pub turn: Duration,
    pub index: usize,
    pub of: usize,
}

impl Talk {
    /// The audio level byte (V bit, −dBov) at `now_ns` into the run.
    pub fn level(&self, now_ns: u64) -> u8 {
        let slot = (now_ns / self.turn.as_nanos().max(1) as u64) as usize % self.of.max(1);
        if slot == self.index { 0x80 | 30 } else { 127 }
    }
}

/// Opus-sized audio: one packet every 20 ms, each with its audio level (silence,
/// unless its publisher takes turns to talk).
pub struct Audio {
    pub stream: Stream,
    pub talk: Option<Talk>,
}

impl Audio {
    /// The next 20 ms packet into `buf`; returns its RTP length.
    pub fn next(&mut self, buf: &mut [u8], now_ns: u64) -> usize {
        let level = self.talk.map_or(127, |t| t.level(now_ns));
        let ext = Some((AUDIO_LEVEL_ID, level));
        let n = self
            .stream
            .packet(buf, false, &[], AUDIO_PAYLOAD, now_ns, ext);
        self.stream.ts = self.stream.ts.wrapping_add(960);
        n
    }
}

/// Synthetic VP8-shaped video at a target bitrate.
pub struct Video {
    pub stream: Stream,
    delta_bytes: usize,
    frame: u32,
    /// The SFU asked for a keyframe (PLI): the next frame is one.
    pub key_requested: bool,
    pub keyframes: u64,
}

impl Video {
    pub fn new(stream: Stream, kbps: u32) -> Video {
        let per_frame = kbps as usize * 1000 / 8 / FPS as usize;
        // Keep the average at the target: a GOP is (KEYFRAME_EVERY-1) deltas and a key.
        let g = KEYFRAME_EVERY as usize;
        let delta_bytes = (per_frame * g / (g - 1 + KEYFRAME_SCALE)).max(STAMP_LEN + VP8_PREFIX);
        Video {
            stream,
            delta_bytes,
            frame: 0,
            key_requested: true,
            keyframes: 0,
        }
    }

    pub fn frame_interval() -> Duration {
        Duration::from_secs(1) / FPS
    }

    /// The next frame's packets, each written by `emit(packet bytes)`.
    pub fn next_frame(
        &mut self,
        buf: &mut [u8],
        now_ns: u64,
        mut emit: impl FnMut(&mut [u8], usize),
    ) {
        let key = self.key_requested || self.frame.is_multiple_of(KEYFRAME_EVERY);
        if key {
            self.key_requested = false;
            self.frame = 0;
            self.keyframes += 1;
        }
        let size = self.delta_bytes * if key { KEYFRAME_SCALE } else { 1 };
        let n = size.div_ceil(MAX_PAYLOAD).max(1);
        for i in 0..n {
            let first = i == 0;
            // VP8 descriptor: S (start of partition) on the first packet; the VP8
            // header's P bit is 0 for a keyframe.
            let prefix = [
                if first { 0x10 } else { 0 },
                if first && !key { 1 } else { 0 },
            ];
            let len = self
                .stream
                .packet(buf, i + 1 == n, &prefix, size / n, now_ns, None);
            emit(buf, len);
        }
        self.stream.ts = self.stream.ts.wrapping_add(90_000 / FPS);
        self.frame += 1;
    }
}

/// Most latency samples one track keeps per subscriber (then reservoir sampling).
const MAX_SAMPLES: usize = 100_000;

/// What a subscriber received of one published track. Replayed packets never get
/// here (SRTP refuses them), so `packets` counts distinct ones.
#[derive(Default, Clone, Debug)]
pub struct Received {
    pub packets: u64,
    /// While running: packets the stamps say were sent from the first received to the
    /// newest received (the live progress line). In the report: packets the publisher
    /// sent from the first received on, to its last ([`Received::settle`]), so a lost
    /// tail counts.
    pub expected: u64,
    pub bytes: u64,
    /// The stamp sequence of the first packet received.
    first_seq: Option<u32>,
    max_seq: Option<u32>,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The longest time without a packet: between two, or (once settled) from the
    /// join to the first, or from the last to the publisher's last.
    pub longest_gap_ns: u64,
    /// The longest time between two packets only: an interruption of a flowing
    /// stream (a server restart, a failover), without the wait for the first.
    pub longest_stall_ns: u64,
    /// From the join to the first packet (once settled).
    pub first_media_ns: u64,
    /// One-way latency in µs (sampled).
    pub latency_us: Vec<u32>,
    seen: u64,
}

impl Received {
    /// Accounts one packet; returns how much `expected` grew.
    pub fn on_packet(&mut self, s: Stamp, payload_bytes: usize, now_ns: u64) -> u64 {
        let grew = match self.max_seq {
            None => {
                self.first_ns = now_ns;
                self.first_seq = Some(s.seq);
                self.max_seq = Some(s.seq);
                1
            }
            Some(m) if s.seq > m => {
                self.max_seq = Some(s.seq);
                (s.seq - m) as u64
            }
            // Late (reordered) or repeated: already expected.
            Some(_) => 0,
        };
        self.expected += grew;
        if self.packets > 0 {
            let gap = now_ns.saturating_sub(self.last_ns);
            self.longest_gap_ns = self.longest_gap_ns.max(gap);
            self.longest_stall_ns = self.longest_stall_ns.max(gap);
        }
        self.packets += 1;
        self.bytes += payload_bytes as u64;
        self.last_ns = now_ns;
        let us = (now_ns.saturating_sub(s.sent_ns) / 1000).min(u32::MAX as u64) as u32;
        self.seen += 1;
        if self.latency_us.len() < MAX_SAMPLES {
            self.latency_us.push(us);
        } else {
            let j = rand::random::<u64>() % self.seen;
            if (j as usize) < MAX_SAMPLES {
                self.latency_us[j as usize] = us;
            }
        }
        grew
    }

    /// At the end: counts against what the publisher sent (`sent` packets, the last
    /// at `sent_last_ns`) rather than what arrived, and takes the wait from the join
    /// (`joined_ns`) to the first packet and from the last to the publisher's last
    /// into the longest gap. A tail that never came is loss and a gap.
    pub fn settle(&mut self, joined_ns: u64, sent: u64, sent_last_ns: u64) {
        let Some(first) = self.first_seq else { return };
        self.expected = sent.saturating_sub(first as u64).max(self.packets);
        self.first_media_ns = self.first_ns.saturating_sub(joined_ns);
        self.longest_gap_ns = self
            .longest_gap_ns
            .max(self.first_media_ns)
            .max(sent_last_ns.saturating_sub(self.last_ns));
    }

    /// Loss in per cent of what was expected.
    pub fn loss_pct(&self) -> f64 {
        if self.expected == 0 {
            return 0.0;
        }
        100.0 * self.expected.saturating_sub(self.packets) as f64 / self.expected as f64
    }
}

/// The `q` quantile (0..=1) of `v` (sorted here).
pub fn quantile(v: &mut [u32], q: f64) -> Option<u32> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two publishers taking 2 s turns: each talks in its own slot only.
    #[test]
    fn talking_in_turns() {
        let talk = |index| Talk {
            turn: Duration::from_secs(2),
            index,
            of: 2,
        };
        let s = 1_000_000_000u64;
        assert_eq!((talk(0).level(s), talk(1).level(s)), (0x80 | 30, 127));
        assert_eq!(
            (talk(0).level(3 * s), talk(1).level(3 * s)),
            (127, 0x80 | 30)
        );
        assert_eq!(talk(0).level(5 * s), 0x80 | 30);
    }

    #[test]
    fn stamps_survive_both_payload_shapes() {
        let mut buf = [0u8; 1500];
        let mut a = Audio {
            stream: Stream::new(7, 111, 3),
            talk: None,
        };
        let n = a.next(&mut buf, 42);
        // The audio level extension (silence) before the payload.
        let h = forwarder_common::rtp::header_len(&buf[..n]).unwrap();
        assert_eq!((h, n), (RTP_FIXED_HEADER_LEN + 8, h + AUDIO_PAYLOAD));
        assert_eq!(
            forwarder_common::rtp::extension(&buf[..n], AUDIO_LEVEL_ID),
            Some(&[127u8][..])
        );
        assert_eq!(
            Stamp::read(&buf[h..n]),
            Some(Stamp {
                track: 3,
                seq: 0,
                sent_ns: 42
            })
        );
        let mut v = Video::new(Stream::new(8, 96, 4), 1000);
        let mut stamps = vec![];
        let mut markers = vec![];
        v.next_frame(&mut buf, 7, |b, len| {
            stamps.push(Stamp::read(&b[RTP_FIXED_HEADER_LEN..len]).unwrap().seq);
            markers.push(b[1] & 0x80 != 0);
            assert!(len <= RTP_FIXED_HEADER_LEN + MAX_PAYLOAD);
        });
        // A keyframe first, in several packets, the marker on the last.
        assert!(stamps.len() > 1, "{stamps:?}");
        assert_eq!(stamps, (0..stamps.len() as u32).collect::<Vec<_>>());
        assert_eq!(markers.iter().filter(|m| **m).count(), 1);
        assert!(*markers.last().unwrap());
        assert_eq!(v.keyframes, 1);
    }

    #[test]
    fn video_averages_its_target_bitrate() {
        let mut buf = [0u8; 1500];
        let mut v = Video::new(Stream::new(8, 96, 4), 800);
        for _ in 0..KEYFRAME_EVERY * 5 {
            v.next_frame(&mut buf, 0, |_, _| {});
        }
        let kbps = v.stream.bytes * 8 / 1000 / 10;
        assert!(
            (760..=840).contains(&kbps),
            "{kbps} kbit/s for a target of 800"
        );
        assert_eq!(v.keyframes, 5);
    }

    #[test]
    fn loss_counts_gaps_not_reordering() {
        let mut r = Received::default();
        let s = |seq| Stamp {
            track: 1,
            seq,
            sent_ns: 0,
        };
        for seq in [10, 11, 13, 12, 16] {
            r.on_packet(s(seq), 100, 1_000);
        }
        // 10..=16 expected, 14 and 15 lost.
        assert_eq!((r.expected, r.packets), (7, 5));
        assert_eq!(quantile(&mut r.latency_us, 0.5), Some(1));
    }

    /// A subscriber that stops receiving while the publisher goes on: the tail it
    /// never got is loss, and the time from its last packet to the publisher's last
    /// is its longest gap (a count between the first and last received saw none).
    #[test]
    fn a_lost_tail_is_loss_and_a_gap() {
        let mut r = Received::default();
        let ms = 1_000_000;
        for seq in 100..200u32 {
            let s = Stamp {
                track: 1,
                seq,
                sent_ns: 0,
            };
            r.on_packet(s, 100, 1_000 * ms + (seq as u64 - 100) * 20 * ms);
        }
        assert_eq!((r.packets, r.expected, r.loss_pct()), (100, 100, 0.0));
        assert_eq!(r.longest_gap_ns, 20 * ms);
        // Joined at 900 ms; the publisher sent 1,000 packets, its last at 28 s.
        r.settle(900 * ms, 1_000, 28_000 * ms);
        assert_eq!(r.expected, 900, "from the first received (stamp 100) on");
        assert!((r.loss_pct() - 800.0 / 9.0).abs() < 1e-9);
        assert_eq!(r.longest_gap_ns, 28_000 * ms - (1_000 + 99 * 20) * ms);
        // A subscriber that got all of it: no loss, its longest gap the wait for
        // the first packet.
        let mut all = Received::default();
        for seq in 0..10u32 {
            let s = Stamp {
                track: 1,
                seq,
                sent_ns: 0,
            };
            all.on_packet(s, 100, 500 * ms + seq as u64 * 20 * ms);
        }
        all.settle(100 * ms, 10, 680 * ms);
        assert_eq!((all.expected, all.loss_pct()), (10, 0.0));
        assert_eq!(all.longest_gap_ns, 400 * ms);
    }
}
