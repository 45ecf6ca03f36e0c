//! A viewer's m-line refilled by the next publisher keeps its SSRC (the viewer's
//! receiver, and its SRTP context, stay): the new track's numbering continues the old
//! one, as a simulcast switch does. A fresh random start landed behind the old
//! numbering about half the time, and the viewer's SRTP dropped every packet as a
//! replay, for good.

use super::*;

/// Publisher `id` sending track `track` (SSRC `ssrc`, 90 kHz, any packet may start).
fn publisher(f: &mut Fixture, id: SessionId, track: TrackId, ssrc: u32) -> Peer {
    let p = f.peer(id, Role::Publisher, Profile::AeadAes128Gcm);
    f.cmd(Command::AddTrack {
        id: track,
        session: id,
        kind: Kind::Video,
        pt: 96,
        clock_rate: 90_000,
        format: Format::Other,
        streams: vec![(None, Some(ssrc))],
        rid_ext: None,
        twcc_ext: None,
        level_ext: None,
        dd_ext: None,
    });
    p
}

fn down(track: TrackId, seq_delta: u16, rtx_seq: u16) -> Command {
    Command::AddDownTrack {
        track,
        sub: 2,
        ssrc_out: 0x42,
        pt_out: 96,
        rtx: Some((97, 0x4242, rtx_seq)),
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta,
        ts_delta: 0,
        resume: None,
    }
}

/// What went to the viewer since the last look, decrypted by its own SRTP context
/// (as its browser would: a packet it refuses is lost to it).
fn received(f: &mut Fixture, v: &mut Peer) -> Vec<(u32, u16, u32)> {
    let out: Vec<_> = std::mem::take(&mut f.sink.out);
    out.into_iter()
        .filter(|(to, _)| *to == v.addr)
        .map(|(_, w)| {
            let mut b = w.clone();
            let n = v.rx.unprotect_rtp(&mut b).unwrap_or_else(|e| {
                panic!("the viewer's SRTP refuses the copy ({e:?}): numbering went back")
            });
            let p = &b[..n];
            (
                u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
                u16::from_be_bytes([p[2], p[3]]),
                u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            )
        })
        .collect()
}

#[test]
fn the_next_publisher_on_a_viewers_ssrc_continues_its_numbering() {
    let mut f = Fixture::new();
    let mut first = publisher(&mut f, 1, 10, 0xaaaa);
    let mut v = f.viewer(2, 10, Profile::AeadAes128Gcm, down(10, 30_000, 100));
    for seq in 0..100u16 {
        f.send(
            &mut first,
            &rtp_packet(96, seq, 3_000 * seq as u32, 0xaaaa, b"one"),
        );
    }
    let got = received(&mut f, &mut v);
    assert_eq!(got.len(), 100);
    let (_, last_seq, last_ts) = *got.last().unwrap();
    assert_eq!(last_seq, 30_099);
    // A NACK answered over RTX: its numbering moved on to 101.
    f.send(&mut v, &rtcp::translated_nack(9, 0x42, &[30_099], 0));
    let rtx = std::mem::take(&mut f.sink.out);
    assert_eq!(rtx.len(), 1);
    let p = unprotect(&mut v, &rtx[0].1);
    assert_eq!(u16::from_be_bytes([p[2], p[3]]), 100);

    // The publisher leaves; the next one fills the viewer's m-line, its random start
    // (delta 5,000: source 5,000 would go out as 10,000) well behind 30,099.
    f.cmd(Command::RemoveSession { id: 1 });
    let mut next = publisher(&mut f, 3, 11, 0xbbbb);
    f.cmd(down(11, 5_000, 7));
    f.sink.out.clear();
    f.now += Duration::from_secs(1);
    for seq in 5_000..5_100u16 {
        let ts = 777_000 + 3_000 * (seq as u32 - 5_000);
        f.send(&mut next, &rtp_packet(96, seq, ts, 0xbbbb, b"two"));
    }
    let got = received(&mut f, &mut v);
    assert_eq!(
        got.len(),
        100,
        "every packet of the next publisher reaches the viewer"
    );
    for (i, (ssrc, seq, ts)) in got.iter().enumerate() {
        assert_eq!(*ssrc, 0x42);
        assert_eq!(
            *seq,
            30_100 + i as u16,
            "one numbering across the publishers"
        );
        // A second later at 90 kHz, then the new stream's own spacing.
        assert_eq!(*ts, last_ts + 90_000 + 3_000 * i as u32);
    }
    // RTX continues too: the next resend is 101, not the new down-track's 7.
    f.send(&mut v, &rtcp::translated_nack(9, 0x42, &[30_150], 0));
    let rtx = std::mem::take(&mut f.sink.out);
    assert_eq!(rtx.len(), 1);
    let p = unprotect(&mut v, &rtx[0].1);
    assert_eq!(u16::from_be_bytes([p[2], p[3]]), 101);
    assert_eq!(
        u16::from_be_bytes([p[12], p[13]]),
        30_150,
        "the resent packet's number"
    );
    assert_eq!(&p[14..], b"two");
}
