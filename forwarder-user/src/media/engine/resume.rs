//! What a session needs to outlive its process, and continuing from it: where each
//! down-track's numbering starts ([`Resume`]), the SRTP indices reserved ahead of
//! use ([`Reserve`]), and what the engine knows that the signalling does not
//! ([`Persisted`]: learned SSRCs, replay state, the numbering last sent).
//!
//! A subscriber's down-tracks start at numbers the control plane chose and persisted
//! (not at whatever the first packet gives), so every index its send context will use
//! is covered by a mark on disk before it is used ([`crate::media::srtp::Marks`]).

use rand::Rng as _;
use serde::{Deserialize, Serialize};

use super::*;
use crate::media::{simulcast::Numbered, srtp::Marks};

/// VP8 pictures assumed per second at most, to step picture ids past any a crashed
/// process may have sent after its last persisted numbering.
const MAX_FPS: u64 = 120;

/// Where a down-track's numbering starts: its SSRC's index just before its first
/// packet (and its RTX SSRC's), the timestamp and picture numbering last sent, and
/// how long ago (the timestamp continues by that much, at least one tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub index: u64,
    pub rtx_index: Option<u64>,
    pub ts: u32,
    pub pic: Option<u16>,
    pub tl0: Option<u8>,
    pub away_us: u64,
}

impl Resume {
    /// A new down-track's start: random numbers as a fresh sender picks them (RFC
    /// 3550 §5.1), below 2^15 so its first rollover is far off.
    pub fn fresh(rtx: bool) -> Resume {
        let mut rng = rand::thread_rng();
        Resume {
            index: rng.gen_range(0..0x8000),
            rtx_index: rtx.then(|| rng.gen_range(0..0x8000)),
            ts: rng.r#gen(),
            pic: None,
            tl0: None,
            away_us: 0,
        }
    }
}

/// The SRTP indices a session's send context may use, set with its keys: where each
/// stream resumes (a restored session: just past what was persisted) and how far it
/// may go now (persisted before this command was sent).
#[derive(Debug, Clone, Default)]
pub struct Reserve {
    pub after: Option<Marks>,
    pub up_to: Marks,
}

/// One down-track as a restarted process continues it: its SSRC, the numbering last
/// sent and how long before the snapshot (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownMark {
    pub ssrc_out: u32,
    pub last: Numbered,
    pub age_us: u64,
}

/// What the engine knows of a session that a restarted process needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Send side: the highest index sent per SSRC, the next SRTCP index.
    pub tx: Marks,
    /// Receive side: per SSRC the highest index authenticated.
    pub rx: Vec<(u32, u64)>,
    /// Receive side: per sender the highest SRTCP index authenticated (records
    /// written before it was kept have none).
    #[serde(default)]
    pub rx_rtcp: Vec<(u32, u64)>,
    /// Publisher: each track's SSRC per encoding as learned (a browser stops sending
    /// the rid once it has seen reports).
    pub streams: Vec<(TrackId, Vec<Option<u32>>)>,
    pub downs: Vec<DownMark>,
}

impl Engine {
    /// Session `id` as a restarted process needs it (None: unknown or not keyed).
    pub fn persisted(&self, id: SessionId, now: Instant) -> Option<Persisted> {
        let s = self.sessions.get(&id)?;
        let srtp = s.srtp.as_ref()?;
        let mut rx = srtp.rx.rtp_highest();
        rx.sort_unstable();
        let mut rx_rtcp = srtp.rx.rtcp_highest();
        rx_rtcp.sort_unstable();
        let mut p = Persisted {
            tx: srtp.tx.tx_marks(),
            rx,
            rx_rtcp,
            ..Default::default()
        };
        for tid in &s.tracks {
            let Some(t) = self.tracks.get(tid) else {
                continue;
            };
            match s.role {
                Role::Publisher => p
                    .streams
                    .push((*tid, t.streams.iter().map(|st| st.ssrc).collect())),
                Role::Subscriber => {
                    let Some(d) = t.downs.iter().find(|d| d.sub == id) else {
                        continue;
                    };
                    let units = self.units(now, t.clock_rate);
                    if let Some((last, at)) = d.layering.numbered() {
                        let age = units.saturating_sub(at) * 1_000_000 / t.clock_rate.max(1) as u64;
                        p.downs.push(DownMark {
                            ssrc_out: d.ssrc_out(),
                            last,
                            age_us: age,
                        });
                    }
                }
                Role::Relay => {}
            }
        }
        Some(p)
    }

    /// Session `id` as [`Engine::persisted`] says, sealed: it sends nothing more, so
    /// its marks are exact (a planned restart's hand-over).
    pub fn seal(&mut self, id: SessionId, now: Instant) -> Option<Persisted> {
        let p = self.persisted(id, now)?;
        let srtp = self.sessions.get_mut(&id)?.srtp.as_mut()?;
        srtp.tx.seal();
        Some(p)
    }

    /// `now` in a clock of `rate` Hz since the engine started.
    pub(super) fn units(&self, now: Instant, rate: u32) -> u64 {
        (now.duration_since(self.epoch).as_micros() as u64).wrapping_mul(rate as u64) / 1_000_000
    }

    /// Raises what session `id` may send (its marks persisted first).
    pub(super) fn reserve(&mut self, id: SessionId, up_to: &Marks) {
        if let Some(srtp) = self.sessions.get_mut(&id).and_then(|s| s.srtp.as_mut()) {
            srtp.tx.reserve(&up_to.rtp, up_to.rtcp);
        }
    }
}

impl DownTrack {
    /// Starts the numbering at `r` (this track's clock `rate`, now `units` in it):
    /// the first packet, a keyframe, is one past `r.index` on the media SSRC and its
    /// timestamp `r.away_us` later than `r.ts`. Picture ids step past any a crashed
    /// process may have sent since.
    pub(super) fn resume(
        &mut self,
        r: &Resume,
        rate: u32,
        units: u64,
        tx: Option<&mut srtp::Context>,
    ) {
        let away = r.away_us.saturating_mul(rate as u64) / 1_000_000;
        let frames = (r.away_us * MAX_FPS / 1_000_000).min(0x2000) as u16;
        self.layering.resume(
            Numbered {
                seq: r.index as u16,
                ts: r.ts,
                pic: r.pic.map(|p| p.wrapping_add(frames) & 0x7fff),
                tl0: r.tl0.map(|t| t.wrapping_add(frames as u8)),
            },
            units.saturating_sub(away),
        );
        if let (Some((_, _, seq)), Some(i)) = (self.rtx.as_mut(), r.rtx_index) {
            *seq = (i as u16).wrapping_add(1);
        }
        if let Some(tx) = tx {
            tx.start_tx(self.ssrc_out(), r.index);
            if let (Some((_, ssrc, _)), Some(i)) = (self.rtx, r.rtx_index) {
                tx.start_tx(ssrc, i);
            }
        }
    }
}
