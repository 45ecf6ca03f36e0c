//! A viewer's stream through its engine's end: a crash (the engine gone, a new one
//! built from what was persisted, stale by up to one save) and a sealed hand-over (a
//! planned restart: exact marks). The viewer keeps its SRTP context throughout, as a
//! browser does: it authenticates every copy of both lives, across a rollover, never
//! sees an index twice, and sees at most one reservation's jump (exactly none after
//! a seal).

use std::collections::HashSet;

use super::*;
use crate::media::{
    engine::{Persisted, Reserve, Resume},
    srtp::Marks,
};

/// Indices reserved ahead per grant (the daemon's writer uses 2048).
const AHEAD: u64 = 256;
const VIEWER_SSRC: u32 = 0x102;

/// The daemon's writer, as a test: raises the viewer's reservation where half is used.
struct Store {
    marks: Marks,
    /// The engine's view at the last save (what a crash leaves).
    view: Persisted,
}

impl Store {
    fn save(&mut self, f: &mut Fixture) {
        let view = f.engine.persisted(2, f.now).expect("keyed");
        let mut up = self.marks.clone();
        for &(ssrc, used) in &view.tx.rtp {
            let m = up.rtp.iter_mut().find(|(s, _)| *s == ssrc).unwrap();
            if used + AHEAD / 2 >= m.1 {
                m.1 = used + AHEAD;
            }
        }
        self.marks = up.clone();
        self.view = view;
        f.cmd(Command::Reserve { id: 2, up_to: up });
    }
}

fn plain(k: u32) -> Vec<u8> {
    // H.264: an IDR every 50 packets.
    let nal = if k.is_multiple_of(50) { 0x65 } else { 0x41 };
    rtp_packet(102, (1000 + k) as u16, 90 * k, 0xaaaa, &[nal, 0xaa, 0xbb])
}

/// Engine, publisher 1 (track 10) and viewer 2 whose down-track starts at `resume`
/// and whose sends are reserved up to `store`, `after` them if given.
fn build(
    resume: Resume,
    after: Option<Marks>,
    up_to: Marks,
    rx: &[(u32, u64)],
) -> (Fixture, Peer, Peer) {
    let mut f = Fixture::new();
    let publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Video, 102, Some(0xaaaa));
    if !rx.is_empty() {
        f.cmd(Command::ResumeRx {
            id: 1,
            streams: rx.to_vec(),
            rtcp: vec![],
        });
    }
    f.add(2, Role::Subscriber);
    f.cmd(Command::AddDownTrack {
        track: 10,
        sub: 2,
        ssrc_out: VIEWER_SSRC,
        pt_out: 102,
        rtx: None,
        remb: false,
        dd_ext: None,
        twcc_ext: None,
        seq_delta: 0,
        ts_delta: 0,
        resume: Some(resume),
    });
    let (up, down) = (
        key(Profile::AeadAes128Gcm, 2),
        key(Profile::AeadAes128Gcm, 2 ^ 0xff),
    );
    f.cmd(Command::Bind {
        id: 2,
        addr: addr(2),
        nominated: true,
    });
    f.cmd(Command::SetKeys {
        id: 2,
        rx: up.clone(),
        tx: down.clone(),
        reserve: Some(Reserve { after, up_to }),
    });
    let viewer = Peer {
        id: 2,
        addr: addr(2),
        tx: Context::new(&up),
        rx: Context::new(&down),
    };
    // Format::Other in the fixture's publisher: any packet may start the viewer.
    (f, publisher, viewer)
}

/// Runs packets `from..to` through `f`; the viewer checks each copy: authenticated,
/// its index above every one before (`seen`), and returns the last sequence number.
fn run(
    f: &mut Fixture,
    p: &mut Peer,
    v: &mut Peer,
    store: &mut Store,
    range: std::ops::Range<u32>,
    seen: &mut Vec<u64>,
) {
    for k in range {
        f.send(p, &plain(k));
        if k % 16 == 0 {
            store.save(f);
        }
        for _copy in f.take_for(v) {
            let (_, index) =
                v.rx.rtp_highest()
                    .into_iter()
                    .find(|(s, _)| *s == VIEWER_SSRC)
                    .unwrap();
            if let Some(last) = seen.last() {
                assert!(
                    index > *last,
                    "index {index} after {last}: reused or behind"
                );
            }
            seen.push(index);
        }
    }
}

fn restarted(store: &Store, sealed: Option<Persisted>, away_us: u64) -> (Fixture, Peer, Peer) {
    let (marks, view) = match &sealed {
        Some(v) => (v.tx.clone(), v),
        None => (store.marks.clone(), &store.view),
    };
    let mark = marks.rtp.iter().find(|(s, _)| *s == VIEWER_SSRC).unwrap().1;
    let last = view
        .downs
        .iter()
        .find(|d| d.ssrc_out == VIEWER_SSRC)
        .unwrap();
    let resume = Resume {
        index: mark,
        rtx_index: None,
        ts: last.last.ts,
        pic: None,
        tl0: None,
        away_us: last.age_us + away_us,
    };
    let up_to = Marks {
        rtp: vec![(VIEWER_SSRC, mark + AHEAD)],
        rtcp: Some(marks.rtcp.map_or(0, |r| r + 1) + AHEAD as u32),
    };
    build(resume, Some(marks), up_to, &[])
}

#[test]
fn a_viewer_s_stream_survives_a_crash_and_a_sealed_restart_across_a_rollover() {
    for crash_at in [300u32, 700, 1234] {
        for sealed in [false, true] {
            let start = Resume {
                index: 65_100,
                rtx_index: None,
                ts: 5,
                pic: None,
                tl0: None,
                away_us: 0,
            };
            let first = Marks {
                rtp: vec![(VIEWER_SSRC, start.index + AHEAD)],
                rtcp: Some(AHEAD as u32),
            };
            let (mut f, mut p, mut v) = build(start, None, first.clone(), &[]);
            let mut store = Store {
                marks: first,
                view: Persisted::default(),
            };
            let mut seen = Vec::new();
            run(&mut f, &mut p, &mut v, &mut store, 0..crash_at, &mut seen);
            let before = *seen.last().unwrap();
            let seal = sealed.then(|| f.engine.seal(2, f.now).unwrap());
            // The publisher's packets during the restart are lost; its own context
            // goes on (it never restarted), and so does the viewer's.
            for k in crash_at..crash_at + 5 {
                Fixture::protect(&mut p, &plain(k));
            }
            let (mut g, _, _) = restarted(&store, seal, 30_000);
            let rx = if sealed {
                vec![]
            } else {
                store.view.rx.clone()
            };
            if !rx.is_empty() {
                g.cmd(Command::ResumeRx {
                    id: 1,
                    streams: rx,
                    rtcp: vec![],
                });
            }
            // The new engine's publisher session takes the same publisher's packets.
            let mut p2 = Peer {
                id: 1,
                addr: p.addr,
                tx: p.tx,
                rx: p.rx,
            };
            run(
                &mut g,
                &mut p2,
                &mut v,
                &mut store,
                crash_at + 5..crash_at + 1500,
                &mut seen,
            );
            let after = seen[seen.iter().position(|i| *i == before).unwrap() + 1];
            let jump = after - before;
            if sealed {
                assert_eq!(jump, 1, "crash at {crash_at}, sealed: no jump");
            } else {
                assert!(jump <= AHEAD + 1, "crash at {crash_at}: jump {jump}");
            }
            assert!(seen.last().unwrap() >> 16 >= 1, "past a rollover");
            let unique: HashSet<u64> = seen.iter().copied().collect();
            assert_eq!(unique.len(), seen.len());
            assert!(seen.len() > 1400, "{} copies", seen.len());
            assert_eq!(g.drops(Drop::SrtpUnreserved), 0);
        }
    }
}
