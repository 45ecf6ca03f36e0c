//! The engine's tests, without I/O: a fixture that plays publishers and viewers
//! (their own SRTP contexts) against one engine and a sink that keeps what it sent.

use super::*;
use crate::media::srtp::{Context, Profile};
use std::sync::atomic::Ordering;

mod long_stream;
mod restart;
mod reused_ssrc;

/// The sink of a test: every datagram queued, in order; refuses when `full`.
#[derive(Default)]
struct Sink {
    out: Vec<(SocketAddr, Vec<u8>)>,
    full: bool,
}

impl Transmit for Sink {
    fn transmit(
        &mut self,
        to: SocketAddr,
        fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
    ) -> bool {
        if self.full {
            return false;
        }
        let mut buf = vec![0u8; 1500];
        match fill(&mut buf) {
            Some(n) => {
                buf.truncate(n);
                self.out.push((to, buf));
                true
            }
            None => false,
        }
    }
}

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 10_000 + n))
}

fn key(profile: Profile, b: u8) -> MasterKey {
    MasterKey::new(
        profile,
        &[b; 16],
        &vec![b ^ 0x5a; profile.master_salt_len()],
    )
    .unwrap()
}

/// A peer's side of a session: its address and SRTP contexts (peer→SFU, SFU→peer).
struct Peer {
    id: SessionId,
    addr: SocketAddr,
    tx: Context,
    rx: Context,
}

struct Fixture {
    engine: Engine,
    sink: Sink,
    now: Instant,
}

impl Fixture {
    fn new() -> Fixture {
        let now = Instant::now();
        Fixture {
            engine: Engine::new("test".into(), Arc::new(Counters::default()), now),
            sink: Sink::default(),
            now,
        }
    }

    fn cmd(&mut self, c: Command) {
        self.engine.apply(c, self.now, &mut self.sink);
    }

    fn add(&mut self, id: SessionId, role: Role) {
        self.cmd(Command::AddSession {
            id,
            role,
            rtcp_ssrc: 0x5000 + id,
        });
    }

    /// ICE and DTLS done: the session is bound and keyed.
    fn connect(&mut self, id: SessionId, profile: Profile) -> Peer {
        let (up, down) = (key(profile, id as u8), key(profile, id as u8 ^ 0xff));
        self.cmd(Command::Bind {
            id,
            addr: addr(id as u16),
            nominated: true,
        });
        self.cmd(Command::SetKeys {
            id,
            rx: up.clone(),
            tx: down.clone(),
            reserve: None,
        });
        Peer {
            id,
            addr: addr(id as u16),
            tx: Context::new(&up),
            rx: Context::new(&down),
        }
    }

    /// Publisher 1, connected, sending track 10 (90 kHz video or 48 kHz audio).
    fn publisher(&mut self, profile: Profile, kind: Kind, pt: u8, ssrc: Option<u32>) -> Peer {
        let p = self.peer(1, Role::Publisher, profile);
        let clock_rate = if kind == Kind::Video { 90_000 } else { 48_000 };
        self.cmd(Command::AddTrack {
            id: 10,
            session: 1,
            kind,
            pt,
            clock_rate,
            format: Format::Other,
            streams: vec![(None, ssrc)],
            rid_ext: None,
            twcc_ext: None,
            level_ext: None,
            dd_ext: None,
        });
        p
    }

    /// Publisher 1, connected, sending track 10: VP8 simulcast, one encoding per rid
    /// (lowest first), bound by the rid extension (id 10) as their packets arrive.
    fn simulcast_publisher(&mut self, rids: &[&str]) -> Peer {
        let p = self.peer(1, Role::Publisher, Profile::AeadAes128Gcm);
        self.cmd(Command::AddTrack {
            id: 10,
            session: 1,
            kind: Kind::Video,
            pt: 96,
            clock_rate: 90_000,
            format: Format::Vp8,
            streams: rids.iter().map(|r| (Some(r.to_string()), None)).collect(),
            rid_ext: Some(10),
            twcc_ext: None,
            level_ext: None,
            dd_ext: None,
        });
        p
    }

    fn peer(&mut self, id: SessionId, role: Role, profile: Profile) -> Peer {
        self.add(id, role);
        self.connect(id, profile)
    }

    /// A subscriber with one down-track of `track`, keyed after it (as WHEP does).
    fn viewer(&mut self, id: SessionId, track: TrackId, profile: Profile, down: Command) -> Peer {
        self.add(id, Role::Subscriber);
        assert!(
            matches!(down, Command::AddDownTrack { sub, track: t, .. } if sub == id && t == track)
        );
        self.cmd(down);
        self.connect(id, profile)
    }

    /// Publisher 1, connected, sending track 10: one video encoding (SSRC
    /// 0xaaaa) of `format` with these header extension ids.
    fn video_publisher(
        &mut self,
        format: Format,
        pt: u8,
        twcc_ext: Option<u8>,
        dd_ext: Option<u8>,
    ) -> Peer {
        let p = self.peer(1, Role::Publisher, Profile::AeadAes128Gcm);
        self.cmd(Command::AddTrack {
            id: 10,
            session: 1,
            kind: Kind::Video,
            pt,
            clock_rate: 90_000,
            format,
            streams: vec![(None, Some(0xaaaa))],
            rid_ext: None,
            twcc_ext,
            level_ext: None,
            dd_ext,
        });
        p
    }

    /// Viewer `id` of track 10: SSRC 0x100 + id, payload type `pt`, sequence +
    /// `seq_delta`, these header extension ids as it negotiated them.
    fn track_viewer(
        &mut self,
        id: SessionId,
        pt: u8,
        seq_delta: u16,
        dd_ext: Option<u8>,
        twcc_ext: Option<u8>,
    ) -> Peer {
        let down = Command::AddDownTrack {
            track: 10,
            sub: id,
            ssrc_out: 0x100 + id,
            pt_out: pt,
            rtx: None,
            remb: false,
            dd_ext,
            twcc_ext,
            seq_delta,
            ts_delta: 0,
            resume: None,
        };
        self.viewer(id, 10, Profile::AeadAes128Gcm, down)
    }

    /// What was sent to `v` since the last look, decrypted with its keys (and
    /// taken out of the sink).
    fn take_for(&mut self, v: &mut Peer) -> Vec<Vec<u8>> {
        let (mine, rest) = std::mem::take(&mut self.sink.out)
            .into_iter()
            .partition(|(to, _)| *to == v.addr);
        self.sink.out = rest;
        mine.into_iter().map(|(_, w)| unprotect(v, &w)).collect()
    }

    fn protect(from: &mut Peer, plain: &[u8]) -> Vec<u8> {
        let mut buf = plain.to_vec();
        buf.resize(plain.len() + 20, 0);
        let n = if rtp::classify(plain[0], plain[1]) == rtp::Class::Rtcp {
            from.tx.protect_rtcp(&mut buf, plain.len()).unwrap()
        } else {
            from.tx.protect_rtp(&mut buf, plain.len()).unwrap()
        };
        buf.truncate(n);
        buf
    }

    fn send(&mut self, from: &mut Peer, plain: &[u8]) -> Vec<u8> {
        let wire = Self::protect(from, plain);
        self.deliver(from.addr, &wire);
        wire
    }

    fn deliver(&mut self, from: SocketAddr, wire: &[u8]) {
        let mut b = wire.to_vec();
        self.engine
            .handle_srtp(from, &mut b, self.now, &mut self.sink);
    }

    fn drops(&self, d: Drop) -> u64 {
        self.engine.counters.dropped(d)
    }
}

fn rtp_packet(pt: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, pt];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn unprotect(p: &mut Peer, wire: &[u8]) -> Vec<u8> {
    let mut b = wire.to_vec();
    let n = if rtp::classify(b[0], b[1]) == rtp::Class::Rtcp {
        p.rx.unprotect_rtcp(&mut b)
            .expect("the SFU's SRTCP authenticates")
    } else {
        p.rx.unprotect_rtp(&mut b)
            .expect("the SFU's SRTP authenticates")
    };
    b.truncate(n);
    b
}

/// A VP8 publisher (SSRC 0xaaaa) and one viewer (SSRC 0x42, sequence + 100,
/// timestamp + `ts_delta`, `rtx` if given) after source packets 0..10 (timestamp
/// 3000 × seq, marker on 5, payload 30 × seq), its copies taken from the sink.
fn cached_video(rtx: Option<(u8, u32, u16)>, ts_delta: u32) -> (Fixture, Peer, Peer) {
    let mut f = Fixture::new();
    let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
    let down = Command::AddDownTrack {
        track: 10,
        sub: 2,
        ssrc_out: 0x42,
        pt_out: 96,
        rtx,
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta: 100,
        ts_delta,
        resume: None,
    };
    let sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
    for seq in 0..10u16 {
        let mut p = rtp_packet(96, seq, 3000 * seq as u32, 0xaaaa, &[seq as u8; 30]);
        p[1] |= 0x80 * (seq == 5) as u8;
        f.send(&mut publisher, &p);
    }
    f.sink.out.clear();
    (f, publisher, sub)
}

/// One publisher, N subscribers on either profile with their own keys, SSRCs,
/// offsets and payload types: each gets every packet once, rewritten its way and
/// decryptable only with its own keys.
#[test]
fn fan_out_to_n_subscribers_with_their_own_keys_and_rewrite() {
    let mut f = Fixture::new();
    let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
    let n = 25u32;
    let mut subs: Vec<Peer> = (0..n)
        .map(|i| {
            let down = Command::AddDownTrack {
                track: 10,
                sub: 100 + i,
                ssrc_out: 0x1000 + i,
                pt_out: 100 + (i % 20) as u8,
                rtx: None,
                remb: false,
                dd_ext: None,
                twcc_ext: None,
                seq_delta: (i * 1000) as u16,
                ts_delta: i * 7,
                resume: None,
            };
            f.viewer(100 + i, 10, Profile::ALL[i as usize % 2], down)
        })
        .collect();
    // Each viewer's keys ask for a keyframe; the throttle lets the first through.
    assert_eq!(
        f.sink.out.len(),
        1,
        "one keyframe request for {n} new viewers"
    );
    assert_eq!(f.sink.out[0].0, publisher.addr);
    f.sink.out.clear();
    for seq in [65_534u16, 65_535, 0, 1] {
        f.send(
            &mut publisher,
            &rtp_packet(96, seq, 3000 * seq as u32, 0xaaaa, b"frame"),
        );
    }
    assert_eq!(f.sink.out.len(), 4 * n as usize);
    for (k, (to, wire)) in std::mem::take(&mut f.sink.out).into_iter().enumerate() {
        let i = k % n as usize;
        let sub = &mut subs[i];
        assert_eq!(to, sub.addr);
        let other = (i + 1) % n as usize;
        let mut b = wire.clone();
        assert!(
            Context::new(&key(Profile::ALL[other % 2], (100 + other as u8) ^ 0xff))
                .unprotect_rtp(&mut b)
                .is_err(),
            "another subscriber's keys do not open it"
        );
        let p = unprotect(sub, &wire);
        let seq_in = [65_534u16, 65_535, 0, 1][k / n as usize];
        assert_eq!(p[1] & 0x7f, 100 + (i % 20) as u8);
        assert_eq!(
            u16::from_be_bytes([p[2], p[3]]),
            seq_in.wrapping_add((i * 1000) as u16)
        );
        assert_eq!(
            u32::from_be_bytes(p[4..8].try_into().unwrap()),
            (3000 * seq_in as u32).wrapping_add(i as u32 * 7)
        );
        assert_eq!(
            u32::from_be_bytes(p[8..12].try_into().unwrap()),
            0x1000 + i as u32
        );
        assert_eq!(&p[12..], b"frame");
    }
    let c = f.engine.counters();
    assert_eq!(c.rtp_in.load(Ordering::Relaxed), 4);
    assert_eq!(c.rtp_out.load(Ordering::Relaxed), 4 * n as u64);
    assert_eq!(f.engine.downtracks(105)[0].1.packets, 4);
}

/// Forged, replayed, truncated SRTP, SRTP from nobody, before keys, RTP from a
/// subscriber and an unknown SSRC: each dropped under its own reason, nothing sent.
#[test]
fn bad_srtp_is_dropped_and_counted_by_reason() {
    let mut f = Fixture::new();
    let mut publisher = f.publisher(Profile::AesCm128HmacSha1_80, Kind::Audio, 111, None);
    let down = Command::AddDownTrack {
        track: 10,
        sub: 2,
        ssrc_out: 7,
        pt_out: 111,
        rtx: None,
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta: 0,
        ts_delta: 0,
        resume: None,
    };
    let mut sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
    let good = f.send(&mut publisher, &rtp_packet(111, 5, 0, 0x77, b"opus"));
    assert_eq!(
        f.sink.out.len(),
        1,
        "an unsignalled SSRC binds by payload type"
    );
    assert_eq!(f.engine.track(10).unwrap().ssrc(), Some(0x77));
    f.deliver(publisher.addr, &good);
    assert_eq!(f.drops(Drop::SrtpReplay), 1);
    let next = Fixture::protect(&mut publisher, &rtp_packet(111, 6, 0, 0x77, b"opus"));
    let mut forged = next.clone();
    forged[13] ^= 1;
    f.deliver(publisher.addr, &forged);
    assert_eq!(f.drops(Drop::SrtpAuth), 1);
    f.deliver(publisher.addr, &next[..15]);
    assert_eq!(f.drops(Drop::SrtpTruncated), 1);
    f.deliver(publisher.addr, &next);
    assert_eq!(
        f.sink.out.len(),
        2,
        "the forgery and the truncation changed nothing"
    );
    f.deliver(addr(999), &good);
    assert_eq!(f.drops(Drop::UnknownPeer), 1);
    // A router's session this engine does not hold is an unknown peer too.
    let mut routed = good.clone();
    f.engine
        .handle_srtp_of(4242, &mut routed, Instant::now(), &mut f.sink);
    assert_eq!(f.drops(Drop::UnknownPeer), 2);
    f.send(&mut publisher, &rtp_packet(8, 7, 0, 0x99, b"?"));
    assert_eq!(f.drops(Drop::UnknownSsrc), 1);
    f.send(&mut sub, &rtp_packet(111, 1, 0, 0x88, b"?"));
    assert_eq!(f.drops(Drop::UnexpectedRtp), 1);
    f.cmd(Command::AddSession {
        id: 3,
        role: Role::Publisher,
        rtcp_ssrc: 1,
    });
    f.cmd(Command::Bind {
        id: 3,
        addr: addr(3),
        nominated: false,
    });
    f.deliver(addr(3), &good);
    assert_eq!(f.drops(Drop::NotConnected), 1);
    assert_eq!(f.sink.out.len(), 2, "only the good packets were forwarded");
}

/// A NACK is answered from the cache with the subscriber's own rewrite and keys;
/// what the cache lacks is asked of the publisher in its own sequence space.
#[test]
fn nack_from_cache_and_the_rest_from_the_publisher() {
    let (mut f, mut publisher, mut sub) = cached_video(None, 0);
    // The subscriber lost its 103 and 105 (source 3 and 5), and asks for 1000 too.
    let nack = rtcp::translated_nack(9, 0x42, &[103, 105, 1000], 0);
    f.send(&mut sub, &nack);
    let out = std::mem::take(&mut f.sink.out);
    assert_eq!(
        out.len(),
        3,
        "two resent, one NACK to the publisher: {out:?}"
    );
    for (k, want) in [(0usize, 3u8), (1, 5)] {
        assert_eq!(out[k].0, sub.addr);
        let p = unprotect(&mut sub, &out[k].1);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 100 + want as u16);
        assert_eq!(&p[12..], &[want; 30]);
    }
    assert_eq!(out[2].0, publisher.addr);
    let asked = rtcp::parse(&unprotect(&mut publisher, &out[2].1)).unwrap();
    assert_eq!(
        asked,
        vec![Request::Nack {
            media_ssrc: 0xaaaa,
            seqs: vec![900]
        }]
    );
    assert_eq!(f.engine.counters.nack_resent.load(Ordering::Relaxed), 2);
}

/// With RTX negotiated, a NACKed packet comes back on the RTX stream (RFC 4588):
/// its payload type and SSRC, its own consecutive sequence numbers, the original
/// sequence number the subscriber knows in front of the original payload, the
/// timestamp and marker as they were.
#[test]
fn retransmissions_go_on_the_rtx_stream_where_negotiated() {
    let (mut f, _publisher, mut sub) = cached_video(Some((97, 0x4242, 65_534)), 7);
    f.send(&mut sub, &rtcp::translated_nack(9, 0x42, &[103, 105], 0));
    f.send(&mut sub, &rtcp::translated_nack(9, 0x42, &[103], 0));
    let out = std::mem::take(&mut f.sink.out);
    assert_eq!(out.len(), 3, "{out:?}");
    let got: Vec<Vec<u8>> = out.iter().map(|(_, w)| unprotect(&mut sub, w)).collect();
    let rtx_seq = |p: &[u8]| u16::from_be_bytes([p[2], p[3]]);
    for (p, osn) in got.iter().zip([103u16, 105, 103]) {
        assert_eq!(p[1] & 0x7f, 97, "RTX payload type");
        assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 0x4242);
        assert_eq!(u16::from_be_bytes([p[12], p[13]]), osn, "OSN first");
        let src = (osn - 100) as u8;
        assert_eq!(&p[14..], &[src; 30], "then the original payload");
        assert_eq!(
            u32::from_be_bytes(p[4..8].try_into().unwrap()),
            3000 * src as u32 + 7
        );
        assert_eq!(p[1] & 0x80 != 0, src == 5, "marker as it was");
    }
    assert_eq!(
        rtx_seq(&got[0]),
        65_534,
        "the first RTX sequence number given"
    );
    assert_eq!(rtx_seq(&got[1]), rtx_seq(&got[0]).wrapping_add(1));
    assert_eq!(rtx_seq(&got[2]), rtx_seq(&got[0]).wrapping_add(2));
    assert_eq!(f.engine.downtracks(2)[0].1.nack_resent, 3);
}

/// Keyframe requests from many subscribers cost the publisher one PLI per interval.
#[test]
fn keyframe_requests_are_throttled_per_track() {
    let mut f = Fixture::new();
    let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
    let mut subs: Vec<Peer> = (2..6)
        .map(|i| {
            let down = Command::AddDownTrack {
                track: 10,
                sub: i,
                ssrc_out: 0x40 + i,
                pt_out: 96,
                rtx: None,
                remb: false,
                dd_ext: None,
                twcc_ext: None,
                seq_delta: 0,
                ts_delta: 0,
                resume: None,
            };
            f.viewer(i, 10, Profile::AeadAes128Gcm, down)
        })
        .collect();
    assert_eq!(f.sink.out.len(), 1, "four viewers joined at once: one PLI");
    f.sink.out.clear();
    f.now += KEYFRAME_INTERVAL;
    for s in &mut subs {
        let pli = rtcp::pli(s.id, 0x40 + s.id);
        f.send(s, &pli);
    }
    assert_eq!(f.sink.out.len(), 1);
    let got = rtcp::parse(&unprotect(&mut publisher, &f.sink.out[0].1)).unwrap();
    assert_eq!(got, vec![Request::KeyFrame { media_ssrc: 0xaaaa }]);
    assert_eq!(
        f.engine.counters.keyframe_requests.load(Ordering::Relaxed),
        2
    );
}

/// New keys replace the old at once: packets under the old keys are refused.
#[test]
fn rekey_replaces_the_contexts() {
    let mut f = Fixture::new();
    let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Audio, 111, Some(5));
    let down = Command::AddDownTrack {
        track: 10,
        sub: 2,
        ssrc_out: 6,
        pt_out: 111,
        rtx: None,
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta: 0,
        ts_delta: 0,
        resume: None,
    };
    let mut sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
    f.send(&mut publisher, &rtp_packet(111, 1, 0, 5, b"a"));
    let (up, down) = (
        key(Profile::AesCm128HmacSha1_80, 0x31),
        key(Profile::AesCm128HmacSha1_80, 0x32),
    );
    f.cmd(Command::SetKeys {
        id: 1,
        rx: up.clone(),
        tx: down,
        reserve: None,
    });
    f.send(&mut publisher, &rtp_packet(111, 2, 0, 5, b"b"));
    assert_eq!(
        f.drops(Drop::SrtpAuth),
        1,
        "old keys refused after the rekey"
    );
    publisher.tx = Context::new(&up);
    f.send(&mut publisher, &rtp_packet(111, 3, 0, 5, b"c"));
    let got: Vec<Vec<u8>> = std::mem::take(&mut f.sink.out)
        .iter()
        .map(|(_, w)| unprotect(&mut sub, w))
        .collect();
    assert_eq!(got.iter().map(|p| p[12]).collect::<Vec<_>>(), b"ac");
}

/// Reports once per interval: an SR per down-track to its subscriber in the
/// subscriber's SSRC, an RR to the publisher; a full sink counts a send failure.
#[test]
fn reports_and_a_full_sink() {
    let mut f = Fixture::new();
    let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Audio, 111, Some(5));
    let down = Command::AddDownTrack {
        track: 10,
        sub: 2,
        ssrc_out: 6,
        pt_out: 111,
        rtx: None,
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta: 0,
        ts_delta: 0,
        resume: None,
    };
    let mut sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
    f.send(&mut publisher, &rtp_packet(111, 1, 0, 5, b"a"));
    f.sink.out.clear();
    f.engine
        .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
    assert!(f.sink.out.is_empty(), "not due yet");
    // A timer that fires late keeps the schedule: the next report is due one
    // interval after the last one was due, not after the late firing.
    // (The transport feedback timer, earlier, sends nothing: no twcc here.)
    assert!(f.engine.poll_timeout() <= f.engine.next_report);
    let due = f.engine.next_report;
    f.now = due + Duration::from_millis(10);
    f.engine
        .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
    assert_eq!(f.engine.next_report, due + REPORT_INTERVAL);
    let out = std::mem::take(&mut f.sink.out);
    assert_eq!(out.len(), 2);
    let (sub_addr, pub_addr) = (sub.addr, publisher.addr);
    let sr = unprotect(&mut sub, &out.iter().find(|o| o.0 == sub_addr).unwrap().1);
    assert_eq!(
        (sr[1], u32::from_be_bytes(sr[4..8].try_into().unwrap())),
        (200, 6)
    );
    let rr = unprotect(
        &mut publisher,
        &out.iter().find(|o| o.0 == pub_addr).unwrap().1,
    );
    assert_eq!(rr[1], 201);
    // The subscriber's RR about our SR: loss and jitter as reported, the RTT from
    // its echo of the SR's NTP time minus the time it held it.
    let lsr = u32::from_be_bytes(sr[10..14].try_into().unwrap());
    f.now += Duration::from_millis(80);
    let block = rtcp::ReportBlock {
        media_ssrc: 6,
        fraction_lost: 32,
        total_lost: 3,
        highest_seq: 1,
        jitter: 480, // 10 ms at 48 kHz
        lsr,
        dlsr: 65536 / 20, // held 50 ms
    };
    let report = |b: rtcp::ReportBlock| {
        rtcp::receiver_report(
            99,
            vec![::rtcp::reception_report::ReceptionReport {
                ssrc: b.media_ssrc,
                fraction_lost: b.fraction_lost,
                total_lost: b.total_lost as u32,
                last_sequence_number: b.highest_seq,
                jitter: b.jitter,
                last_sender_report: b.lsr,
                delay: b.dlsr,
            }],
        )
    };
    f.send(&mut sub, &report(block));
    let q = &f.engine.downtracks(2)[0].1.quality;
    assert_eq!((q.reports, q.fraction_lost, q.total_lost), (1, 32, 3));
    assert_eq!(q.loss_percent(), 12.5);
    assert_eq!(q.jitter, Duration::from_millis(10));
    let rtt = q.rtt.expect("an RTT from an echoed SR").as_millis();
    assert!((29..=31).contains(&rtt), "{rtt} ms");
    // An LSR that is not our last SR's gives no RTT; a block about an SSRC the
    // subscriber does not get changes nothing.
    let mut f2 = f.engine.downtracks(2)[0].1.quality.clone();
    f2.rtt = None;
    f2.update(
        &rtcp::ReportBlock {
            lsr: lsr ^ 1,
            ..block
        },
        48_000,
        f.now,
    );
    assert_eq!(f2.rtt, None);
    f.send(
        &mut sub,
        &report(rtcp::ReportBlock {
            media_ssrc: 77,
            fraction_lost: 255,
            ..block
        }),
    );
    assert_eq!(f.engine.downtracks(2)[0].1.quality.fraction_lost, 32);
    f.sink.full = true;
    f.send(&mut publisher, &rtp_packet(111, 2, 0, 5, b"b"));
    assert_eq!(f.drops(Drop::SendFailed), 1);
}

/// A subscriber leaving removes its copies; a publisher leaving removes its tracks
/// from its subscribers, who stay.
#[test]
fn sessions_leaving() {
    let mut f = Fixture::new();
    let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Audio, 111, Some(5));
    for id in [2, 3] {
        let down = Command::AddDownTrack {
            track: 10,
            sub: id,
            ssrc_out: id,
            pt_out: 111,
            rtx: None,
            remb: false,
            dd_ext: None,
            twcc_ext: None,
            seq_delta: 0,
            ts_delta: 0,
            resume: None,
        };
        f.viewer(id, 10, Profile::AeadAes128Gcm, down);
    }
    f.cmd(Command::RemoveSession { id: 2 });
    f.send(&mut publisher, &rtp_packet(111, 1, 0, 5, b"a"));
    assert_eq!(
        f.sink.out.iter().map(|o| o.0).collect::<Vec<_>>(),
        vec![addr(3)]
    );
    f.cmd(Command::RemoveSession { id: 1 });
    assert!(f.engine.track(10).is_none());
    assert!(f.engine.downtracks(3).is_empty());
    f.deliver(
        addr(1),
        &[
            0x80, 111, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    assert_eq!(
        f.drops(Drop::UnknownPeer),
        1,
        "the gone publisher's address is unbound"
    );
}

/// Node A copies the publisher's SRTP down a trunk unchanged (no crypto per copy);
/// node B, given the handover (key and highest index, past a rollover), decrypts
/// and fans it out; a forged or replayed trunk packet is dropped and counted at B;
/// B's keyframe request goes up the trunk with the trunk key and reaches the
/// publisher at A.
#[test]
fn a_trunk_carries_ciphertext_and_the_relay_node_authenticates_and_fans_out() {
    let (b_addr, a_addr) = (addr(500), addr(900));
    let trunk = key(Profile::AeadAes128Gcm, 0x77);
    let mut a = Fixture::new();
    let mut publisher = a.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
    // Past a rollover before the relay starts: the handover must carry ROC 1.
    for seq in [65_535u16, 0] {
        a.send(&mut publisher, &rtp_packet(96, seq, 1, 0xaaaa, b"before"));
    }
    let (pub_key, streams) = a.engine.relay_handover(1).expect("keyed");
    assert_eq!(streams, vec![(0xaaaa, 1 << 16)]);
    a.add(50, Role::Relay);
    a.cmd(Command::BindRelay {
        id: 50,
        addr: b_addr,
        ssrcs: vec![0x7777],
    });
    a.cmd(Command::SetKeys {
        id: 50,
        rx: trunk.clone(),
        tx: trunk.clone(),
        reserve: None,
    });
    a.sink.out.clear();
    a.cmd(Command::AddTrunk {
        track: 10,
        relay: 50,
    });
    assert_eq!(a.sink.out.len(), 1, "a new branch asks for a keyframe");
    assert_eq!(a.sink.out[0].0, publisher.addr);
    a.sink.out.clear();
    let sent: Vec<Vec<u8>> = [1u16, 2, 3]
        .iter()
        .map(|&seq| a.send(&mut publisher, &rtp_packet(96, seq, 2, 0xaaaa, b"media")))
        .collect();
    let copies: Vec<_> = a.sink.out.drain(..).collect();
    assert_eq!(copies.len(), 3);
    for (c, w) in copies.iter().zip(&sent) {
        assert_eq!(c.0, b_addr);
        assert_eq!(
            &c.1, w,
            "the trunk copy is the publisher's packet, byte for byte"
        );
    }
    assert_eq!(a.engine.counters.relay_out.load(Ordering::Relaxed), 3);

    let mut b = Fixture::new();
    b.cmd(Command::AddSession {
        id: 1,
        role: Role::Publisher,
        rtcp_ssrc: 0x7777,
    });
    b.cmd(Command::AddTrack {
        id: 10,
        session: 1,
        kind: Kind::Video,
        pt: 96,
        clock_rate: 90_000,
        format: Format::Other,
        streams: vec![(None, Some(0xaaaa))],
        rid_ext: None,
        twcc_ext: None,
        level_ext: None,
        dd_ext: None,
    });
    b.cmd(Command::BindRelay {
        id: 1,
        addr: a_addr,
        ssrcs: vec![0xaaaa],
    });
    b.cmd(Command::SetKeys {
        id: 1,
        rx: pub_key,
        tx: trunk.clone(),
        reserve: None,
    });
    b.cmd(Command::ResumeRx {
        id: 1,
        streams,
        rtcp: vec![],
    });
    let down = Command::AddDownTrack {
        track: 10,
        sub: 100,
        ssrc_out: 0xbbbb,
        pt_out: 100,
        rtx: None,
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta: 10,
        ts_delta: 0,
        resume: None,
    };
    let mut viewer = b.viewer(100, 10, Profile::AesCm128HmacSha1_80, down);
    // The viewer's keyframe request goes up the trunk, to A's media address.
    let pli: Vec<_> = b.sink.out.drain(..).collect();
    assert_eq!(pli.len(), 1);
    assert_eq!(pli[0].0, a_addr);
    for (_, w) in &copies {
        b.deliver(a_addr, w);
    }
    let got: Vec<u16> = b
        .sink
        .out
        .drain(..)
        .map(|(to, w)| {
            assert_eq!(to, viewer.addr);
            let plain = unprotect(&mut viewer, &w);
            assert_eq!(&plain[12..], b"media");
            u16::from_be_bytes([plain[2], plain[3]])
        })
        .collect();
    assert_eq!(
        got,
        vec![11, 12, 13],
        "decrypted at B with ROC 1, rewritten for the viewer"
    );
    // A packet not seen yet, one payload bit flipped on the trunk.
    let mut forged = Fixture::protect(&mut publisher, &rtp_packet(96, 4, 2, 0xaaaa, b"media"));
    forged[14] ^= 1;
    b.deliver(a_addr, &forged);
    b.deliver(a_addr, &copies[1].1);
    assert!(
        b.sink.out.is_empty(),
        "forged and replayed trunk packets are not forwarded"
    );
    assert_eq!(b.drops(Drop::SrtpAuth), 1);
    assert_eq!(b.drops(Drop::SrtpReplay), 1);
    // At A, past the throttle: B's PLI (trunk key, sender 0x7777) reaches the publisher.
    a.now += KEYFRAME_INTERVAL;
    a.deliver(b_addr, &pli[0].1);
    let out: Vec<_> = a.sink.out.drain(..).collect();
    assert_eq!(out.len(), 1, "one keyframe request to the publisher");
    assert_eq!(out[0].0, publisher.addr);
    let plain = unprotect(&mut publisher, &out[0].1);
    assert!(
        rtcp::parse(&plain)
            .unwrap()
            .iter()
            .any(|r| matches!(r, Request::KeyFrame { media_ssrc: 0xaaaa })),
        "a PLI for the publisher's own SSRC"
    );
}

/// An RTP packet with the rid in a one-byte header extension (id 10), as Chromium
/// sends the first packets of each simulcast encoding.
/// A publisher whose packets carry the transport-wide sequence extension gets,
/// every feedback interval, transport feedback (RTCP RTPFB fmt 15) that lists
/// them from the first one, across its SSRCs, with nothing before it is due and
/// nothing when no packet arrived since.
#[test]
fn publishers_get_transport_feedback() {
    let mut f = Fixture::new();
    let mut publisher = f.peer(1, Role::Publisher, Profile::AeadAes128Gcm);
    for (id, kind, pt, ssrc) in [(10, Kind::Audio, 111, 5), (11, Kind::Video, 96, 6)] {
        f.cmd(Command::AddTrack {
            id,
            session: 1,
            kind,
            pt,
            clock_rate: if kind == Kind::Video { 90_000 } else { 48_000 },
            format: Format::Other,
            streams: vec![(None, Some(ssrc))],
            rid_ext: None,
            twcc_ext: Some(3),
            level_ext: None,
            dd_ext: None,
        });
    }
    // One-byte header extension, id 3, two bytes: the transport-wide sequence.
    let twcc_packet = |pt: u8, ssrc: u32, seq: u16, tseq: u16| {
        let mut p = vec![0x90, pt];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x31]);
        p.extend_from_slice(&tseq.to_be_bytes());
        p.push(0);
        p.extend_from_slice(b"media");
        p
    };
    for (i, tseq) in (65_534u16..=65_535).chain(0..4).enumerate() {
        let (pt, ssrc) = if i % 2 == 0 { (111, 5) } else { (96, 6) };
        f.now += Duration::from_millis(5);
        f.send(&mut publisher, &twcc_packet(pt, ssrc, i as u16, tseq));
    }
    f.sink.out.clear();
    let due = f.engine.poll_timeout();
    assert!(
        due <= f.now + FEEDBACK_INTERVAL,
        "feedback is the next timer"
    );
    f.engine.handle_timeout(
        due - Duration::from_millis(1),
        SystemTime::now(),
        &mut f.sink,
    );
    assert!(f.sink.out.is_empty(), "not due yet");
    f.now = due;
    f.engine
        .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
    let out = std::mem::take(&mut f.sink.out);
    assert_eq!(out.len(), 1, "one feedback packet");
    assert_eq!(out[0].0, publisher.addr);
    let plain = unprotect(&mut publisher, &out[0].1);
    assert_eq!((plain[0] & 0x1f, plain[1]), (15, 205), "RTPFB transport-cc");
    let fb = <::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc as
        webrtc_util::Unmarshal>::unmarshal(&mut &plain[..])
    .expect("well-formed transport feedback");
    assert_eq!(
        (fb.base_sequence_number, fb.packet_status_count),
        (65_534, 6),
        "every packet from the first, across the wrap"
    );
    assert_eq!(fb.recv_deltas.len(), 6, "all six received");
    assert_eq!(
        f.engine.counters.transport_feedback.load(Ordering::Relaxed),
        1
    );
    // Nothing new arrived: the next interval sends nothing.
    f.now += FEEDBACK_INTERVAL;
    f.engine
        .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
    assert!(f.sink.out.is_empty(), "no feedback without packets");
}

fn rid_packet(seq: u16, ts: u32, ssrc: u32, rid: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x90, 96];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0xa0 | (rid.len() as u8 - 1)]);
    p.extend_from_slice(rid);
    p.resize(p.len() + 3 - rid.len(), 0);
    p.extend_from_slice(payload);
    p
}

/// Three encodings bound by their rid extension; a capped viewer gets the lowest,
/// an uncapped one the highest, each starting at a keyframe of its layer (asked
/// for); lifting the cap switches at the next keyframe of the top layer with one
/// continuous sequence, timestamp and VP8 picture numbering; pausing stops it.
#[test]
fn simulcast_viewers_get_their_layer_and_switch_at_keyframes() {
    use crate::media::codec::tests::vp8;
    use crate::media::simulcast::UNCAPPED;
    let mut f = Fixture::new();
    let mut publisher = f.simulcast_publisher(&["q", "h", "f"]);
    let viewer = |f: &mut Fixture, id: SessionId| {
        let down = Command::AddDownTrack {
            track: 10,
            sub: id,
            ssrc_out: 0x100 + id,
            pt_out: 96,
            rtx: None,
            remb: false,
            dd_ext: None,
            twcc_ext: None,
            seq_delta: 0,
            ts_delta: 0,
            resume: None,
        };
        f.viewer(id, 10, Profile::AeadAes128Gcm, down)
    };
    let mut low = viewer(&mut f, 2);
    let mut high = viewer(&mut f, 3);
    f.cmd(Command::SetLayers {
        sub: 2,
        track: 10,
        max_layer: 0,
        max_temporal: UNCAPPED,
        paused: false,
    });
    f.sink.out.clear();
    // Each layer's SSRC is learned from the rid of its first packet; a rid we did
    // not answer is an unknown SSRC.
    let ssrcs = [0xa0u32, 0xa1, 0xa2];
    let rids: [&[u8]; 3] = [b"q", b"h", b"f"];
    for l in 0..3 {
        f.send(
            &mut publisher,
            &rid_packet(
                100,
                0,
                ssrcs[l],
                rids[l],
                &vp8(10 * l as u16, 1, 0, true, false),
            ),
        );
    }
    f.send(
        &mut publisher,
        &rid_packet(1, 0, 0xbad, b"x", &vp8(0, 0, 0, true, true)),
    );
    assert_eq!(f.drops(Drop::UnknownSsrc), 1);
    let t = f.engine.track(10).unwrap();
    assert_eq!(
        t.streams.iter().map(|s| s.ssrc).collect::<Vec<_>>(),
        ssrcs.map(Some)
    );
    // No keyframe yet: nothing forwarded; a keyframe asked of each layer as it
    // became the best one received for a viewer.
    let plis: Vec<u32> = f
        .sink
        .out
        .drain(..)
        .map(|(to, w)| {
            assert_eq!(to, publisher.addr);
            match rtcp::parse(&unprotect(&mut publisher, &w)).unwrap()[0] {
                Request::KeyFrame { media_ssrc } => media_ssrc,
                ref r => panic!("{r:?}"),
            }
        })
        .collect();
    assert_eq!(plis, vec![0xa0, 0xa1, 0xa2]);
    // Keyframes on every layer (SSRCs now known: no extension needed).
    for l in 0..3u32 {
        f.send(
            &mut publisher,
            &rtp_packet(
                96,
                101,
                3000,
                ssrcs[l as usize],
                &vp8(10 * l as u16 + 1, 2, 0, true, true),
            ),
        );
    }
    f.send(
        &mut publisher,
        &rtp_packet(96, 102, 6000, 0xa0, &vp8(2, 3, 0, true, false)),
    );
    f.send(
        &mut publisher,
        &rtp_packet(96, 102, 6000, 0xa2, &vp8(22, 3, 0, true, false)),
    );
    let got = |f: &mut Fixture, p: &mut Peer| -> Vec<(u16, u32, u16)> {
        let addr = p.addr;
        let mine: Vec<_> = f
            .sink
            .out
            .iter()
            .filter(|o| o.0 == addr)
            .map(|o| o.1.clone())
            .collect();
        f.sink.out.retain(|o| o.0 != addr);
        mine.iter()
            .map(|w| {
                let plain = unprotect(p, w);
                let hlen = rtp::header_len(&plain).unwrap();
                let d = Vp8Descriptor::parse(&plain[hlen..]).unwrap();
                (
                    u16::from_be_bytes([plain[2], plain[3]]),
                    u32::from_be_bytes(plain[4..8].try_into().unwrap()),
                    d.picture_id.unwrap().1,
                )
            })
            .collect()
    };
    assert_eq!(
        got(&mut f, &mut low),
        vec![(101, 3000, 1), (102, 6000, 2)],
        "layer 0 from its keyframe"
    );
    assert_eq!(
        got(&mut f, &mut high),
        vec![(101, 3000, 21), (102, 6000, 22)],
        "layer 2 from its keyframe"
    );
    // The cap lifted: a delta frame of layer 2 waits, its keyframe switches; 30 ms
    // (2,700 ticks) after the last packet sent.
    f.cmd(Command::SetLayers {
        sub: 2,
        track: 10,
        max_layer: UNCAPPED,
        max_temporal: UNCAPPED,
        paused: false,
    });
    f.send(
        &mut publisher,
        &rtp_packet(96, 103, 9000, 0xa2, &vp8(23, 3, 0, true, false)),
    );
    f.send(
        &mut publisher,
        &rtp_packet(96, 103, 9000, 0xa0, &vp8(3, 3, 0, true, false)),
    );
    f.now += Duration::from_millis(30);
    f.send(
        &mut publisher,
        &rtp_packet(96, 104, 12000, 0xa2, &vp8(24, 4, 0, true, true)),
    );
    f.send(
        &mut publisher,
        &rtp_packet(96, 104, 12000, 0xa0, &vp8(4, 4, 0, true, false)),
    );
    assert_eq!(
        got(&mut f, &mut low),
        vec![(103, 9000, 3), (104, 11_700, 4)],
        "continuous across the switch"
    );
    assert_eq!(got(&mut f, &mut high).len(), 2);
    let low_dt = &f.engine.downtracks(2)[0].1.layering;
    assert_eq!((low_dt.current, low_dt.switches), (Some(2), 2));
    // Paused: nothing, even at a keyframe.
    f.cmd(Command::SetLayers {
        sub: 2,
        track: 10,
        max_layer: UNCAPPED,
        max_temporal: UNCAPPED,
        paused: true,
    });
    f.send(
        &mut publisher,
        &rtp_packet(96, 105, 15000, 0xa2, &vp8(25, 5, 0, true, true)),
    );
    assert!(got(&mut f, &mut low).is_empty());
    assert_eq!(got(&mut f, &mut high).len(), 1);
    // Bandwidth: over a second, the encodings' rates measured, the uncapped
    // viewer's reports say 70 % of its packets were lost, and its bandwidth limit
    // takes it down to the lowest layer, switching at that layer's keyframe
    // (asked for).
    let rr = |lost: u32, highest: u32| {
        rtcp::receiver_report(
            0x333,
            vec![::rtcp::reception_report::ReceptionReport {
                ssrc: 0x103,
                total_lost: lost,
                last_sequence_number: highest,
                ..Default::default()
            }],
        )
    };
    f.send(&mut high, &rr(0, 100));
    for k in 0..4u16 {
        f.now += Duration::from_millis(250);
        for (l, ssrc) in ssrcs.iter().enumerate() {
            let pic = 10 * l as u16 + 6 + k;
            let (seq, ts) = (106 + k, 18000 + 3000 * k as u32);
            f.send(
                &mut publisher,
                &rtp_packet(96, seq, ts, *ssrc, &vp8(pic, 6, 0, true, false)),
            );
        }
    }
    f.engine
        .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
    assert!(
        f.engine
            .track(10)
            .unwrap()
            .streams
            .iter()
            .all(|st| st.rate_bps > 0)
    );
    f.sink.out.clear();
    f.send(&mut high, &rr(70, 200));
    let d = &f.engine.downtracks(3)[0].1;
    assert_eq!(d.layering.bw_limit, 0, "{:?}", d.bwe);
    assert!(d.bwe.estimate.is_some());
    f.send(
        &mut publisher,
        &rtp_packet(96, 110, 30000, 0xa2, &vp8(30, 7, 0, true, false)),
    );
    let d = &f.engine.downtracks(3)[0].1;
    assert_eq!(
        d.layering.target,
        Some(0),
        "the limit moves its target down"
    );
    let pub_addr = publisher.addr;
    let plis: Vec<Request> = f
        .sink
        .out
        .drain(..)
        .filter(|o| o.0 == pub_addr)
        .flat_map(|(_, w)| rtcp::parse(&unprotect(&mut publisher, &w)).unwrap())
        .collect();
    assert!(
        plis.contains(&Request::KeyFrame { media_ssrc: 0xa0 }),
        "{plis:?}"
    );
    f.send(
        &mut publisher,
        &rtp_packet(96, 110, 30000, 0xa0, &vp8(10, 8, 0, true, true)),
    );
    assert_eq!(got(&mut f, &mut high).len(), 1, "layer 0's keyframe");
    assert_eq!(f.engine.downtracks(3)[0].1.layering.current, Some(0));
}

/// VP9 SVC (three spatial layers, two temporal) to three viewers: capped to
/// spatial layer 0, to temporal layer 0, and uncapped. Each gets one continuous
/// numbering across the 16-bit wrap with the layers it does not get taken out, the
/// picture ends where its highest layer ends (marker), a NACK maps back to the
/// source packet, and a lifted cap takes effect at the next keyframe it asked for.
#[test]
fn svc_viewers_get_the_layers_their_caps_allow() {
    use crate::media::codec::tests::vp9;
    use crate::media::simulcast::UNCAPPED;
    let mut f = Fixture::new();
    let mut publisher = f.video_publisher(Format::Vp9, 98, None, None);
    let mut viewers: Vec<Peer> = (2..5)
        .map(|id| f.track_viewer(id, 98, 0, None, None))
        .collect();
    let caps = [(0, UNCAPPED), (UNCAPPED, 0), (UNCAPPED, UNCAPPED)];
    for (id, (max_layer, max_temporal)) in (2..5).zip(caps) {
        f.cmd(Command::SetLayers {
            sub: id,
            track: 10,
            max_layer,
            max_temporal,
            paused: false,
        });
    }
    // Picture k: three spatial layer frames of one packet each, temporal layer
    // k % 2, the marker on the last; picture 0 is a keyframe.
    let mut seq = 65_530u16;
    let send = |f: &mut Fixture, publisher: &mut Peer, seq: &mut u16, k: u16, key: bool| {
        for sid in 0..3u8 {
            let mut p = rtp_packet(
                98,
                *seq,
                3000 * k as u32,
                0xaaaa,
                &vp9(k, sid, (k % 2) as u8, true, true, key, true),
            );
            p[1] |= 0x80 * (sid == 2) as u8;
            f.send(publisher, &p);
            *seq = seq.wrapping_add(1);
        }
    };
    for k in 0..6 {
        send(&mut f, &mut publisher, &mut seq, k, k == 0);
    }
    // What each viewer got: (seq, marker, spatial, temporal, picture id).
    let got = |f: &mut Fixture, v: &mut Peer| -> Vec<(u16, bool, u8, u8, u16)> {
        f.take_for(v)
            .into_iter()
            .map(|p| {
                let d = crate::media::codec::Vp9Descriptor::parse(&p[12..]).unwrap();
                (
                    u16::from_be_bytes([p[2], p[3]]),
                    p[1] & 0x80 != 0,
                    d.sid,
                    d.tid,
                    d.picture_id.unwrap(),
                )
            })
            .collect()
    };
    let low = got(&mut f, &mut viewers[0]);
    assert_eq!(
        low,
        (0..6u16)
            .map(|k| (65_530u16.wrapping_add(k), true, 0, (k % 2) as u8, k))
            .collect::<Vec<_>>(),
        "spatial layer 0 of every picture, each ending its picture"
    );
    let slow = got(&mut f, &mut viewers[1]);
    let want: Vec<_> = [0u16, 2, 4]
        .iter()
        .flat_map(|k| (0..3u8).map(move |s| (*k, s)))
        .enumerate()
        .map(|(i, (k, s))| (65_530u16.wrapping_add(i as u16), s == 2, s, 0, k))
        .collect();
    assert_eq!(
        slow, want,
        "temporal layer 0, numbered without the holes; VP9 picture ids kept"
    );
    let all = got(&mut f, &mut viewers[2]);
    assert_eq!(all.len(), 18);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, p)| p.0 == 65_530u16.wrapping_add(i as u16))
    );
    // A NACK of the capped viewer's fourth packet: the source of picture 3's
    // spatial layer 0 (not the fourth source packet), marker set as sent.
    let nack = rtcp::translated_nack(9, 0x102, &[65_533], 0);
    f.send(&mut viewers[0], &nack);
    // (A fresh receive context: the one above has seen that index.)
    let seen = std::mem::replace(
        &mut viewers[0].rx,
        Context::new(&key(Profile::AeadAes128Gcm, 2 ^ 0xff)),
    );
    assert_eq!(got(&mut f, &mut viewers[0]), [(65_533, true, 0, 1, 3)]);
    viewers[0].rx = seen;
    // The cap lifted: a delta picture cannot start layers 1 and 2; a keyframe is
    // asked for, and it brings them.
    // (Past the throttle of the keyframe asked when the viewers joined.)
    f.now += KEYFRAME_INTERVAL;
    f.sink.out.clear();
    f.cmd(Command::SetLayers {
        sub: 2,
        track: 10,
        max_layer: UNCAPPED,
        max_temporal: UNCAPPED,
        paused: false,
    });
    send(&mut f, &mut publisher, &mut seq, 6, false);
    assert_eq!(got(&mut f, &mut viewers[0]), [(0, true, 0, 0, 6)]);
    let plis = f
        .sink
        .out
        .iter()
        .filter(|(to, w)| {
            *to == publisher.addr
                && matches!(
                    rtcp::parse(&unprotect(&mut publisher, w)).unwrap()[0],
                    Request::KeyFrame { media_ssrc: 0xaaaa }
                )
        })
        .count();
    assert_eq!(plis, 1, "one keyframe asked of the publisher");
    f.sink.out.clear();
    send(&mut f, &mut publisher, &mut seq, 7, true);
    assert_eq!(
        got(&mut f, &mut viewers[0]),
        [(1, false, 0, 1, 7), (2, false, 1, 1, 7), (3, true, 2, 1, 7)]
    );
}

/// VP8 with three temporal layers (0, 2, 1, 2, ...) to viewers capped at temporal
/// layers 0 and 1: each gets its frames with one continuous sequence and picture
/// id numbering (libwebrtc waits for a missing picture id), TL0PICIDX as sent; a
/// lifted cap takes effect at a layer sync frame (Y) of the layer.
#[test]
fn vp8_temporal_caps_renumber_sequence_and_picture_ids() {
    use crate::media::codec::tests::vp8;
    use crate::media::simulcast::UNCAPPED;
    let mut f = Fixture::new();
    let mut publisher = f.video_publisher(Format::Vp8, 96, None, None);
    let mut viewers: Vec<Peer> = (2..4)
        .map(|id| {
            let v = f.track_viewer(id, 96, 1000, None, None);
            f.cmd(Command::SetLayers {
                sub: id,
                track: 10,
                max_layer: UNCAPPED,
                max_temporal: id as u8 - 2,
                paused: false,
            });
            v
        })
        .collect();
    // Frame k (one packet, source seq 10 + k): picture id 32_760 + k (it wraps at
    // 2^15), temporal layer of the 0, 2, 1, 2 pattern, TL0PICIDX counting TL0s.
    let frame = |k: u16, sync: bool| {
        let tid = [0u8, 2, 1, 2][k as usize % 4];
        let mut payload = vp8((32_760 + k) & 0x7fff, (k / 4) as u8, tid, true, k == 0);
        if sync {
            payload[5] |= 0x20;
        }
        rtp_packet(96, 10 + k, 3000 * k as u32, 0xaaaa, &payload)
    };
    for k in 0..12 {
        f.send(&mut publisher, &frame(k, false));
    }
    let got = |f: &mut Fixture, v: &mut Peer| -> Vec<(u16, u16, u8, u8)> {
        f.take_for(v)
            .into_iter()
            .map(|p| {
                let d = Vp8Descriptor::parse(&p[12..]).unwrap();
                (
                    u16::from_be_bytes([p[2], p[3]]),
                    d.picture_id.unwrap().1,
                    d.tl0.unwrap().1,
                    d.tid.unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        got(&mut f, &mut viewers[0]),
        [
            (1010, 32_760, 0, 0),
            (1011, 32_761, 1, 0),
            (1012, 32_762, 2, 0)
        ]
    );
    assert_eq!(
        got(&mut f, &mut viewers[1]),
        [
            (1010, 32_760, 0, 0),
            (1011, 32_761, 0, 1),
            (1012, 32_762, 1, 0),
            (1013, 32_763, 1, 1),
            (1014, 32_764, 2, 0),
            (1015, 32_765, 2, 1),
        ]
    );
    // Lifted to every layer: the next TL2 frame without Y stays dropped, the TL1
    // sync frame starts layer 1, the TL2 sync frame layer 2; numbering continues
    // (source picture ids wrap to 0 meanwhile).
    f.cmd(Command::SetLayers {
        sub: 2,
        track: 10,
        max_layer: UNCAPPED,
        max_temporal: UNCAPPED,
        paused: false,
    });
    f.sink.out.clear();
    for (k, sync) in [(12, false), (13, false), (14, true), (15, true)] {
        f.send(&mut publisher, &frame(k, sync));
    }
    assert_eq!(
        got(&mut f, &mut viewers[0]),
        [
            (1013, 32_763, 3, 0),
            (1014, 32_764, 3, 1),
            (1015, 32_765, 3, 2)
        ]
    );
}

/// AV1 SVC (two spatial layers) read from the dependency descriptor: a viewer
/// that negotiated it under the publisher's id gets both layers as sent, one under
/// another id gets the descriptor renamed, and one without it gets spatial layer
/// 0 only, each of its frames ending its picture.
#[test]
fn av1_layers_come_from_the_dependency_descriptor() {
    use crate::media::codec::tests::dd;
    let mut f = Fixture::new();
    let mut publisher = f.video_publisher(Format::Av1, 45, None, Some(12));
    let mut viewers: Vec<Peer> = [(2, Some(12)), (3, Some(9)), (4, None)]
        .into_iter()
        .map(|(id, dd_ext)| f.track_viewer(id, 45, 0, dd_ext, None))
        .collect();
    // Two temporal units of two spatial layer frames (one packet each); the first
    // is a keyframe whose descriptor carries the L2T1 structure.
    for k in 0..2u16 {
        for sid in 0..2u8 {
            let ext = dd(
                true,
                true,
                sid,
                2 * k + sid as u16,
                (k == 0 && sid == 0).then_some(&[2, 3][..]),
            );
            let mut p = vec![0x90, 45 | if sid == 1 { 0x80 } else { 0 }];
            p.extend_from_slice(&(100 + 2 * k + sid as u16).to_be_bytes());
            p.extend_from_slice(&(3000 * k as u32).to_be_bytes());
            p.extend_from_slice(&0xaaaau32.to_be_bytes());
            let words = (1 + ext.len()).div_ceil(4);
            p.extend_from_slice(&[0xbe, 0xde, 0, words as u8]);
            p.push((12 << 4) | (ext.len() as u8 - 1));
            p.extend_from_slice(&ext);
            p.resize(16 + 4 * words, 0);
            // Aggregation header: N on the keyframe's first packet.
            p.extend_from_slice(&[if k == 0 && sid == 0 { 0x18 } else { 0x10 }, sid]);
            f.send(&mut publisher, &p);
        }
    }
    // (seq, marker, template id under 12, under 9, spatial layer in the payload)
    type Got = (u16, bool, Option<u8>, Option<u8>, u8);
    let got = |f: &mut Fixture, v: &mut Peer| -> Vec<Got> {
        f.take_for(v)
            .into_iter()
            .map(|p| {
                let len = rtp::header_len(&p).unwrap();
                let id_of = |id| rtp::extension(&p, id).map(|e| e[0] & 0x3f);
                (
                    u16::from_be_bytes([p[2], p[3]]),
                    p[1] & 0x80 != 0,
                    id_of(12),
                    id_of(9),
                    p[len + 1],
                )
            })
            .collect()
    };
    assert_eq!(
        got(&mut f, &mut viewers[0]),
        [
            (100, false, Some(0), None, 0),
            (101, true, Some(1), None, 1),
            (102, false, Some(0), None, 0),
            (103, true, Some(1), None, 1)
        ]
    );
    assert_eq!(
        got(&mut f, &mut viewers[1]),
        [
            (100, false, None, Some(0), 0),
            (101, true, None, Some(1), 1),
            (102, false, None, Some(0), 0),
            (103, true, None, Some(1), 1)
        ],
        "the descriptor under the subscriber's id"
    );
    assert_eq!(
        got(&mut f, &mut viewers[2]),
        [(100, true, Some(0), None, 0), (101, true, Some(0), None, 0)],
        "spatial layer 0, each frame ending its picture"
    );
    let t = f.engine.track(10).unwrap();
    assert_eq!(t.streams[0].seen.top(f.now, LAYER_IDLE), (1, 0));
}

/// Viewers that negotiated transport-cc get their own transport-wide numbering in
/// every copy (under their own extension id: renamed where it differs from the
/// publisher's), and their feedback drives the delay-based estimate: arrivals that
/// fall further and further behind the sends are over-use, which bounds the layer.
#[test]
fn viewers_transport_feedback_drives_the_delay_estimate() {
    let mut f = Fixture::new();
    let mut publisher = f.video_publisher(Format::Other, 96, Some(3), None);
    let mut viewers: Vec<Peer> = [(2, Some(3)), (3, Some(5)), (4, None)]
        .into_iter()
        .map(|(id, twcc_ext)| f.track_viewer(id, 96, 0, None, twcc_ext))
        .collect();
    // 2 s of 1,000-byte packets every 10 ms (800 kbit/s), the publisher's own
    // transport-wide numbers (from 40,000) in extension 3.
    // Per viewer: (seq, transport-wide number under id 3, under id 5).
    type Numbered = (u16, Option<u16>, Option<u16>);
    let mut got: Vec<Vec<Numbered>> = vec![vec![]; 3];
    let start = f.now;
    for i in 0..200u16 {
        let mut p = vec![0x90, 96];
        p.extend_from_slice(&i.to_be_bytes());
        p.extend_from_slice(&(900 * i as u32).to_be_bytes());
        p.extend_from_slice(&0xaaaau32.to_be_bytes());
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x31]);
        p.extend_from_slice(&(40_000 + i).to_be_bytes());
        p.push(0);
        p.resize(1_000, 0x5a);
        f.now = start + Duration::from_millis(10 * i as u64);
        f.send(&mut publisher, &p);
        for (k, v) in viewers.iter_mut().enumerate() {
            for p in f.take_for(v) {
                let ext = |id| rtp::extension(&p, id).map(|e| u16::from_be_bytes([e[0], e[1]]));
                got[k].push((u16::from_be_bytes([p[2], p[3]]), ext(3), ext(5)));
            }
        }
        f.sink.out.clear();
    }
    assert!(
        got[0]
            .iter()
            .enumerate()
            .all(|(i, g)| *g == (i as u16, Some(i as u16), None))
    );
    assert!(
        got[1]
            .iter()
            .enumerate()
            .all(|(i, g)| *g == (i as u16, None, Some(i as u16))),
        "renamed to the viewer's id"
    );
    assert!(
        got[2]
            .iter()
            .enumerate()
            .all(|(i, g)| *g == (i as u16, Some(40_000 + i as u16), None)),
        "no transport-cc: as the publisher sent it"
    );
    // Viewer 2's feedback every 100 ms: its link delivers 400 kbit/s, so each
    // packet arrives 20 ms after the one before (sent 10 ms apart): a queue.
    let mut rec = interceptor::twcc::Recorder::new(0x5002);
    let mut feedbacks = 0;
    for i in 0..200u16 {
        rec.record(0x102, i, 1_000_000 + 20_000 * i as i64);
        if i % 10 == 9 {
            let fb = ::rtcp::packet::marshal(&rec.build_feedback_packet()).unwrap();
            f.now = start + Duration::from_millis(20 * i as u64 + 30);
            f.send(&mut viewers[0], &fb);
            feedbacks += 1;
        }
    }
    assert_eq!(feedbacks, 20);
    let t = f.engine.transport_cc(2).unwrap();
    assert_eq!(t.usage, bwe::Usage::Over, "{t:?}");
    assert!(t.overuses >= 1);
    let e = t.estimate.unwrap();
    assert!((300_000..=360_000).contains(&e), "0.85 x 400 kbit/s: {e}");
    assert_eq!(f.engine.downtracks(2)[0].1.bwe.delay, Some(e));
    assert_eq!(
        f.engine.counters.bwe_delay_overuses.load(Ordering::Relaxed),
        t.overuses
    );
    assert!(f.engine.transport_cc(4).is_none());
}

/// A padding probe: every feedback interval, its rate's worth of padding-only
/// packets on the viewer's RTX stream (RTX payload type, SSRC and sequence, the P
/// bit and the padding count, no payload), each with the viewer's next
/// transport-wide number; the media numbering untouched.
#[test]
fn padding_probes_go_on_the_rtx_stream_with_transport_numbers() {
    let (mut f, mut publisher, _) = cached_video(None, 0);
    f.add(5, Role::Subscriber);
    f.cmd(Command::AddDownTrack {
        track: 10,
        sub: 5,
        ssrc_out: 0x55,
        pt_out: 96,
        rtx: Some((97, 0x4242, 1_000)),
        remb: false,
        dd_ext: None,
        twcc_ext: Some(3),
        seq_delta: 0,
        ts_delta: 0,
        resume: None,
    });
    let mut v = f.connect(5, Profile::AeadAes128Gcm);
    // The publisher's packet has no transport-wide extension: the copy gets one
    // (number 0), the payload moved up behind it.
    f.send(
        &mut publisher,
        &rtp_packet(96, 10, 30_000, 0xaaaa, &[1; 30]),
    );
    let media: Vec<Vec<u8>> = f.take_for(&mut v);
    let [copy] = &media[..] else {
        panic!("{media:?}")
    };
    assert_eq!(rtp::extension(copy, 3), Some(&[0, 0][..]));
    let hlen = rtp::header_len(copy).unwrap();
    assert_eq!((hlen, &copy[hlen..]), (20, &[1u8; 30][..]));
    f.sink.out.clear();
    let d = f
        .engine
        .tracks
        .get_mut(&10)
        .unwrap()
        .downs
        .iter_mut()
        .find(|d| d.sub == 5)
        .unwrap();
    assert!(d.bwe.pad_capable);
    d.bwe.probe_with_padding(1, 500_000, 400_000);
    f.now += FEEDBACK_INTERVAL;
    f.engine
        .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
    let pads: Vec<Vec<u8>> = f.take_for(&mut v);
    // 400 kbit/s for 100 ms: 5,000 octets in packets of 224.
    assert_eq!(pads.len(), 5_000usize.div_ceil(PADDING), "{}", pads.len());
    for (i, p) in pads.iter().enumerate() {
        assert_eq!(p[0] & 0x20, 0x20, "P bit");
        assert_eq!(p[1], 97);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 1_000 + i as u16);
        assert_eq!(u32::from_be_bytes([p[8], p[9], p[10], p[11]]), 0x4242);
        assert_eq!(
            u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            30_000,
            "the last media timestamp"
        );
        let twcc = rtp::extension(p, 3).unwrap();
        // After the media copy's 0.
        assert_eq!(u16::from_be_bytes([twcc[0], twcc[1]]), 1 + i as u16);
        let hlen = rtp::header_len(p).unwrap();
        assert_eq!(*p.last().unwrap() as usize, p.len() - hlen, "all padding");
    }
    assert_eq!(
        f.engine.counters.bwe_padding.load(Ordering::Relaxed),
        pads.len() as u64
    );
    // A NACK of the media copy: resent on RTX, its transport-wide extension added
    // in front of the original sequence number and payload.
    f.sink.out.clear();
    f.send(&mut v, &rtcp::translated_nack(9, 0x55, &[10], 0));
    let resent: Vec<Vec<u8>> = f.take_for(&mut v);
    let [r] = &resent[..] else {
        panic!("{resent:?}")
    };
    let hlen = rtp::header_len(r).unwrap();
    assert_eq!((r[1] & 0x7f, hlen), (97, 20));
    assert_eq!(&r[hlen..hlen + 2], &10u16.to_be_bytes(), "OSN");
    assert_eq!(&r[hlen + 2..], &[1u8; 30][..]);
    let twcc = rtp::extension(r, 3).unwrap();
    assert_eq!(
        u16::from_be_bytes([twcc[0], twcc[1]]),
        1 + pads.len() as u16
    );
}
