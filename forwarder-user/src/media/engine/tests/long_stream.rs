//! Streams as long as calls. Every viewer gets every packet past three 16-bit
//! sequence wraps (about 15 minutes of 1 Mbit/s video), numbered without a hole,
//! its SRTP rollover counter advancing, and NACKs at the end are still answered. The
//! engine once stopped every viewer 32,768 packets after it started: where its layer
//! started was compared with each packet in 16 bits.

use super::*;
use crate::media::codec::tests::{vp8, vp9};
use crate::media::simulcast::UNCAPPED;

/// Packets per stream: three wraps and then some.
const PACKETS: u32 = 3 * 65_536 + 3_000;
/// Packets from one keyframe to the next.
const GOP: u32 = 3_000;
/// Where the capped viewer's temporal cap is lifted; it takes effect at the next
/// keyframe, after which nothing is dropped for it any more (the gaps it had stay
/// the oldest thing it remembers).
const LIFT: u32 = 2_000;
/// The publisher's first sequence number: just before a wrap.
const FIRST_SEQ: u16 = 65_000;
/// How often the copies are taken out of the sink and checked.
const BATCH: u32 = 4_096;

/// One packet `k` of a stream of `format`: a keyframe every [`GOP`], temporal layer
/// `k % 2` where the codec has layers.
fn payload(format: Format, k: u32) -> Vec<u8> {
    let key = k.is_multiple_of(GOP);
    let (pic, tid) = ((k & 0x7fff) as u16, (k % 2) as u8);
    match format {
        Format::Vp8 => vp8(pic, (k / 2) as u8, tid, true, key),
        Format::Vp9 => vp9(pic, 0, tid, true, true, key, false),
        Format::H264 => vec![if key { 0x65 } else { 0x41 }, 0xaa, 0xbb],
        _ => vec![0xab; 40],
    }
}

/// What one viewer got, checked as it arrives: every copy numbered one after the
/// last, with the payload of the source packet it stands for.
#[derive(Default)]
struct Got {
    count: u64,
    last: Option<u16>,
}

impl Got {
    fn check(&mut self, who: &str, copies: Vec<Vec<u8>>) {
        for p in copies {
            let seq = u16::from_be_bytes([p[2], p[3]]);
            if let Some(l) = self.last {
                assert_eq!(
                    seq,
                    l.wrapping_add(1),
                    "{who}: a hole after {} copies (last {l}, then {seq})",
                    self.count
                );
            }
            self.last = Some(seq);
            self.count += 1;
        }
    }
}

/// The viewer's highest SRTP index of its SSRC: its rollover counter is `>> 16`.
fn rollovers(v: &Peer, ssrc: u32) -> u64 {
    let (_, highest) =
        v.rx.rtp_highest()
            .into_iter()
            .find(|(s, _)| *s == ssrc)
            .expect("the viewer authenticated packets of its SSRC");
    highest >> 16
}

fn assert_no_drops(f: &Fixture, what: &str) {
    for d in Drop::ALL {
        assert_eq!(f.drops(d), 0, "{what}: {} drops", d.name());
    }
}

/// One track of `format`; viewers 40,000 ahead of the publisher's numbers, just
/// behind a wrap, and one capped to temporal layer 0 until [`LIFT`].
fn one_track(format: Format) {
    let (kind, pt, clock) = match format {
        Format::Vp8 => (Kind::Video, 96, 3_000),
        Format::Vp9 => (Kind::Video, 98, 3_000),
        Format::H264 => (Kind::Video, 102, 3_000),
        _ => (Kind::Audio, 111, 960),
    };
    let mut f = Fixture::new();
    let mut publisher = f.peer(1, Role::Publisher, Profile::AeadAes128Gcm);
    f.cmd(Command::AddTrack {
        id: 10,
        session: 1,
        kind,
        pt,
        clock_rate: if kind == Kind::Video { 90_000 } else { 48_000 },
        format,
        streams: vec![(None, Some(0xaaaa))],
        rid_ext: None,
        twcc_ext: None,
        level_ext: None,
        dd_ext: None,
    });
    // Viewer 2 negotiated RTX: its NACKs at the end are answered there.
    let down = Command::AddDownTrack {
        track: 10,
        sub: 2,
        ssrc_out: 0x102,
        pt_out: pt,
        rtx: Some((97, 0x4242, 65_530)),
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta: 40_000,
        ts_delta: 0,
        resume: None,
    };
    let mut viewers = vec![f.viewer(2, 10, Profile::AeadAes128Gcm, down)];
    for (id, delta) in [(3, 600u16), (4, 7)] {
        viewers.push(f.track_viewer(id, pt, delta, None, None));
    }
    let caps = |f: &mut Fixture, max_temporal| {
        f.cmd(Command::SetLayers {
            sub: 4,
            track: 10,
            max_layer: UNCAPPED,
            max_temporal,
            paused: false,
        })
    };
    caps(&mut f, 0);
    let mut got: Vec<Got> = (0..3).map(|_| Got::default()).collect();
    for k in 0..PACKETS {
        if k == LIFT {
            caps(&mut f, UNCAPPED);
        }
        let seq = FIRST_SEQ.wrapping_add(k as u16);
        let p = rtp_packet(pt, seq, clock * k, 0xaaaa, &payload(format, k));
        f.send(&mut publisher, &p);
        if (k + 1) % BATCH == 0 || k + 1 == PACKETS {
            // Keyframe requests to the publisher as viewers start are expected.
            f.sink.out.retain(|(to, _)| *to != publisher.addr);
            for (v, g) in viewers.iter_mut().zip(&mut got) {
                let copies = f.take_for(v);
                g.check(&format!("{format:?} viewer {}", v.id), copies);
            }
            assert!(f.sink.out.is_empty(), "nothing to anyone else");
        }
    }
    // Temporal layer 1 of the frames before the first keyframe after the lift is
    // all the capped viewer misses (only codecs whose layers are read have any).
    let layered = matches!(format, Format::Vp8 | Format::Vp9);
    let capped_out = if layered { (GOP / 2) as u64 } else { 0 };
    let want = [PACKETS as u64, PACKETS as u64, PACKETS as u64 - capped_out];
    for ((v, g), want) in viewers.iter().zip(&got).zip(want) {
        assert_eq!(g.count, want, "{format:?} viewer {}: copies", v.id);
        assert!(
            rollovers(v, 0x100 + v.id) >= 3,
            "{format:?} viewer {}: its rollover counter advanced with each wrap",
            v.id
        );
    }
    assert_no_drops(&f, &format!("{format:?}"));
    if kind == Kind::Audio {
        return;
    }
    // The last five packets, asked again after three wraps: all answered from the
    // cache on the RTX stream, each with the number the viewer knows (RFC 4588 OSN)
    // and the payload of its source packet.
    let last = got[0].last.unwrap();
    let asked: Vec<u16> = (0..5u16).rev().map(|i| last.wrapping_sub(i)).collect();
    f.send(&mut viewers[0], &rtcp::translated_nack(9, 0x102, &asked, 0));
    let resent = f.take_for(&mut viewers[0]);
    let osns: Vec<u16> = resent
        .iter()
        .map(|p| u16::from_be_bytes([p[12], p[13]]))
        .collect();
    assert_eq!(osns, asked, "{format:?}: NACKs answered after three wraps");
    for (p, i) in resent.iter().zip((PACKETS - 5)..PACKETS) {
        assert_eq!(u32::from_be_bytes([p[8], p[9], p[10], p[11]]), 0x4242);
        assert_eq!(
            &p[14..],
            &payload(format, i)[..],
            "{format:?}: resent payload"
        );
    }
}

#[test]
fn viewers_of_vp8_get_every_packet_past_three_sequence_wraps() {
    one_track(Format::Vp8);
}

#[test]
fn viewers_of_vp9_get_every_packet_past_three_sequence_wraps() {
    one_track(Format::Vp9);
}

#[test]
fn viewers_of_h264_get_every_packet_past_three_sequence_wraps() {
    one_track(Format::H264);
}

#[test]
fn listeners_of_audio_get_every_packet_past_three_sequence_wraps() {
    one_track(Format::Other);
}

/// Two simulcast encodings, each past three wraps of its own numbering: a viewer
/// on each gets every packet of its encoding, numbered without a hole.
#[test]
fn simulcast_viewers_get_every_packet_past_three_sequence_wraps() {
    let mut f = Fixture::new();
    let mut publisher = f.simulcast_publisher(&["q", "f"]);
    let mut low = f.track_viewer(2, 96, 1_234, None, None);
    let mut high = f.track_viewer(3, 96, 50_000, None, None);
    f.cmd(Command::SetLayers {
        sub: 2,
        track: 10,
        max_layer: 0,
        max_temporal: UNCAPPED,
        paused: false,
    });
    let (ssrcs, rids): ([u32; 2], [&[u8]; 2]) = ([0xa0, 0xa2], [b"q", b"f"]);
    let mut got = [Got::default(), Got::default()];
    for k in 0..PACKETS {
        // Each encoding its own sequence space, far apart.
        for l in 0..2 {
            let seq = FIRST_SEQ
                .wrapping_add(k as u16)
                .wrapping_add(30_000 * l as u16);
            let vp8 = vp8((k & 0x7fff) as u16, 0, 0, true, k.is_multiple_of(GOP));
            let p = rid_packet(seq, 3_000 * k, ssrcs[l], rids[l], &vp8);
            f.send(&mut publisher, &p);
        }
        if (k + 1) % BATCH == 0 || k + 1 == PACKETS {
            // Keyframe requests to the publisher at the start are expected.
            f.sink.out.retain(|(to, _)| *to != publisher.addr);
            got[0].check("low viewer", f.take_for(&mut low));
            got[1].check("high viewer", f.take_for(&mut high));
            assert!(f.sink.out.is_empty(), "nothing to anyone else");
        }
    }
    // The high viewer started on the low encoding's first keyframe, before the top
    // encoding was seen, and moved up at the top one's: one packet more.
    for ((v, g), want) in [&low, &high].into_iter().zip(&got).zip([0, 1]) {
        assert_eq!(g.count, PACKETS as u64 + want, "viewer {}: copies", v.id);
        assert!(
            rollovers(v, 0x100 + v.id) >= 3,
            "viewer {}: rollovers",
            v.id
        );
    }
    let layers: Vec<Layer> = f
        .engine
        .downtracks(2)
        .into_iter()
        .chain(f.engine.downtracks(3))
        .map(|(_, d)| d.layer())
        .collect();
    assert_eq!(layers, [0, 1], "each on its encoding throughout");
    assert_no_drops(&f, "simulcast");
}
