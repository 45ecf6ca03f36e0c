//! Simulcast for one subscriber of one track: which encoding it gets (the selector)
//! and how its numbering stays one continuous stream across switches (the munger).
//!
//! A publisher sends up to three encodings of a track, each its own RTP stream (SSRC,
//! sequence and timestamp space, VP8 picture numbering). A subscriber gets one of them
//! under its own single SSRC. It moves to another only where that encoding starts a
//! keyframe; at the switch the sequence continues at the last one sent + 1, the
//! timestamp advances by the wall time since the last packet sent, and VP8's picture
//! id and TL0PICIDX continue at the last ones + 1. The rewrite itself stays the one
//! [`forwarder_common::rtp::rewrite`]: a switch only changes the down-track's deltas.

use forwarder_common::routes::RouteValue;

use super::{
    codec::{LayerIds, Vp8Descriptor},
    seq::seq_after,
    svc::{Filter, Gaps},
};

/// Layer indices, lowest quality first.
pub type Layer = u8;

/// "No cap" for [`Layering::max_layer`].
pub const UNCAPPED: Layer = Layer::MAX;

/// The last packet sent to the subscriber, in its own numbering.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u16,
    ts: u32,
    /// When, in the track's clock units.
    at: u64,
    pic: Option<u16>,
    tl0: Option<u8>,
}

/// Where a subscriber's numbering stood when its track ended (its publisher left),
/// for the track that refills the same SSRC: its first packet continues from here as
/// at a simulcast switch. A fresh start would land behind the old numbering about
/// half the time, and the viewer's SRTP drops every packet behind as a replay.
#[derive(Debug, Clone, Copy)]
pub struct Continuation {
    last: Sent,
    /// The old track's clock rate: `last.at` is in its units.
    clock_rate: u32,
}

/// The last packet a subscriber got, in its numbering, without the clock it was
/// taken on: what a restarted process continues from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Numbered {
    pub seq: u16,
    pub ts: u32,
    pub pic: Option<u16>,
    pub tl0: Option<u8>,
}

/// One packet as the layer choice sees it.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    /// Its encoding.
    pub layer: Layer,
    pub seq: u16,
    pub ts: u32,
    /// It starts a keyframe.
    pub keyframe: bool,
    pub vp8: Option<&'a Vp8Descriptor>,
    /// Its spatial/temporal layer, for codecs whose layers we read.
    pub ids: Option<LayerIds>,
}

/// How a forwarded packet is numbered for its subscriber: the sequence delta (the
/// route's, or an older one for a late packet), the VP8 picture id delta, and whether
/// its marker bit must be set (it ends the picture now that the layers above it are
/// dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    pub seq_delta: u16,
    pub pic_delta: u16,
    pub marker: bool,
}

#[derive(Debug, Clone)]
pub struct Layering {
    /// The highest layer the subscriber may get (the API's cap): the simulcast
    /// encoding, or the spatial layer of a one-encoding scalable stream (VP9 SVC).
    pub max_layer: Layer,
    /// The highest temporal layer it may get (the API's cap).
    pub max_temporal: Layer,
    /// The highest layer its bandwidth carries (the estimator's limit).
    pub bw_limit: Layer,
    /// Nothing forwarded while paused; resuming waits for a keyframe.
    pub paused: bool,
    /// The layer being forwarded, once a keyframe of it started the subscriber there.
    pub current: Option<Layer>,
    /// What the selector chose last (shown in the API); the switch waits for its keyframe.
    pub target: Option<Layer>,
    /// First source sequence number forwarded on `current`, extended (it is kept for
    /// as long as the viewer stays on the layer: minutes, many 16-bit wraps): a packet
    /// of that layer older than the switch (reordered) would collide with the old
    /// layer's numbers.
    since: u64,
    last: Option<Sent>,
    /// Added to VP8 picture ids and TL0PICIDX of the current layer.
    pub pic_delta: u16,
    pub tl0_delta: u8,
    pub switches: u64,
    /// The spatial and temporal layers it gets of the current encoding.
    pub filter: Filter,
    /// The renumbering across what the filter drops.
    gaps: Gaps,
}

impl Default for Layering {
    fn default() -> Self {
        Layering {
            max_layer: UNCAPPED,
            max_temporal: UNCAPPED,
            bw_limit: UNCAPPED,
            paused: false,
            current: None,
            target: None,
            since: 0,
            last: None,
            pic_delta: 0,
            tl0_delta: 0,
            switches: 0,
            filter: Filter::default(),
            gaps: Gaps::default(),
        }
    }
}

impl Layering {
    /// The highest layer it may get: the API's cap or its bandwidth's, the lower.
    pub fn cap(&self) -> Layer {
        self.max_layer.min(self.bw_limit)
    }

    /// The layer to be on: the highest active one within the cap and the bandwidth
    /// limit; with none active within them, the lowest active one (a picture rather
    /// than none).
    pub fn choose(&self, active: &[bool]) -> Option<Layer> {
        if self.paused {
            return None;
        }
        let within = active
            .iter()
            .enumerate()
            .take((self.cap() as usize).saturating_add(1))
            .rev()
            .find(|(_, a)| **a)
            .map(|(i, _)| i as Layer);
        within.or_else(|| active.iter().position(|a| *a).map(|i| i as Layer))
    }

    /// The highest spatial and temporal layers it should get of a scalable stream of
    /// `encodings`: the caps (for a one-encoding stream the layer cap and the
    /// bandwidth limit are its spatial cap; simulcast encodings have one each).
    pub fn want(&self, encodings: usize) -> (Layer, Layer) {
        let spatial = if encodings > 1 { 0 } else { self.cap() };
        (spatial, self.max_temporal)
    }

    /// The highest spatial and temporal layer it gets of the current encoding, whose
    /// packets show layers up to `top` (None before it started).
    pub fn got(&self, top: (Layer, Layer)) -> Option<(Layer, Layer)> {
        self.current.map(|_| {
            (
                self.filter.spatial.min(top.0),
                self.filter.temporal.min(top.1),
            )
        })
    }

    /// The encoding whose keyframe the subscriber waits for: to switch there, or to
    /// get more layers of the one it is on (`want` as [`Layering::want`] says, of
    /// the layers up to `top` the stream has: none it does not send).
    pub fn waiting(&self, want: (Layer, Layer), top: (Layer, Layer)) -> Option<Layer> {
        let want = (want.0.min(top.0), want.1.min(top.1));
        self.target
            .filter(|t| Some(*t) != self.current)
            .or(self.current.filter(|_| self.filter.waiting(want)))
    }

    /// Decides one packet arriving at `now` (clock units); `target` is what
    /// [`Layering::choose`] says now, `want` what [`Layering::want`] says. On a switch
    /// it moves `route`'s deltas so the subscriber's numbering continues; a packet of
    /// a layer it does not get takes its number out. Returns how to number the packet,
    /// or None to drop it.
    pub fn accept(
        &mut self,
        p: &Packet,
        target: Option<Layer>,
        want: (Layer, Layer),
        now: u64,
        route: &mut RouteValue,
    ) -> Option<Out> {
        self.target = target;
        if self.paused {
            self.current = None;
            return None;
        }
        if self.current == Some(p.layer) {
            if self.gaps.extend(p.seq) < self.since {
                return None;
            }
        } else if target == Some(p.layer) && p.keyframe {
            self.gaps.reset();
            self.switch(p.layer, p.seq, p.ts, p.vp8, now, route);
            self.filter.start(want);
        } else {
            return None;
        }
        // VP8 picture ids are renumbered across dropped frames (VP9's are kept).
        let pic = p.vp8.and_then(|d| d.picture_id).map(|(_, v, _)| v);
        let marker = match &p.ids {
            Some(ids) => match self.filter.decide(ids, p.keyframe, want) {
                Some(m) => m,
                None => {
                    self.gaps.drop(p.seq, pic, route, &mut self.pic_delta);
                    return None;
                }
            },
            None => false,
        };
        let (seq_delta, pic_delta) = self.gaps.keep(p.seq, pic, route, self.pic_delta)?;
        self.sent(
            p.seq.wrapping_add(seq_delta),
            p.ts.wrapping_add(route.ts_delta),
            pic.map(|v| v.wrapping_add(pic_delta) & 0x7fff),
            p.vp8,
            now,
        );
        Some(Out {
            seq_delta,
            pic_delta,
            marker,
        })
    }

    fn switch(
        &mut self,
        layer: Layer,
        seq: u16,
        ts: u32,
        vp8: Option<&Vp8Descriptor>,
        now: u64,
        route: &mut RouteValue,
    ) {
        if let Some(last) = self.last {
            route.seq_delta = last.seq.wrapping_add(1).wrapping_sub(seq);
            // At least one tick: two frames must not share a timestamp.
            let gap = now.saturating_sub(last.at).clamp(1, u32::MAX as u64) as u32;
            route.ts_delta = last.ts.wrapping_add(gap).wrapping_sub(ts);
            if let (Some(p), Some((_, pic, _))) = (last.pic, vp8.and_then(|d| d.picture_id)) {
                self.pic_delta = p.wrapping_add(1).wrapping_sub(pic);
            }
            if let (Some(t), Some((_, tl0))) = (last.tl0, vp8.and_then(|d| d.tl0)) {
                self.tl0_delta = t.wrapping_add(1).wrapping_sub(tl0);
            }
        }
        self.current = Some(layer);
        self.since = self.gaps.extend(seq);
        self.switches += 1;
    }

    /// Remembers what the subscriber got, unless it is older than what it had.
    fn sent(
        &mut self,
        seq_out: u16,
        ts_out: u32,
        pic_out: Option<u16>,
        vp8: Option<&Vp8Descriptor>,
        now: u64,
    ) {
        if self.last.is_some_and(|l| !seq_after(seq_out, l.seq)) {
            return;
        }
        self.last = Some(Sent {
            seq: seq_out,
            ts: ts_out,
            at: now,
            pic: pic_out,
            tl0: vp8
                .and_then(|d| d.tl0)
                .map(|(_, t)| t.wrapping_add(self.tl0_delta)),
        });
    }

    /// The source sequence number of `seq_out` on the current layer and how it was
    /// numbered, if a forwarded packet of it had that number after the last switch (a
    /// NACK for an older one, or for a dropped one's, cannot be answered right).
    pub fn resend(
        &self,
        seq_out: u16,
        r: &RouteValue,
        ids: Option<&LayerIds>,
    ) -> Option<(u16, Out)> {
        let (seq, seq_delta, pic_delta) = self.gaps.source(seq_out, r, self.pic_delta)?;
        let marker = ids.is_some_and(|i| i.layer_end && i.spatial == self.filter.spatial);
        (self.gaps.extend(seq) >= self.since).then_some((
            seq,
            Out {
                seq_delta,
                pic_delta,
                marker,
            },
        ))
    }

    /// What the next track on this subscriber's SSRC continues from, if anything was
    /// sent (`clock_rate`: this track's).
    pub fn continuation(&self, clock_rate: u32) -> Option<Continuation> {
        self.last.map(|last| Continuation { last, clock_rate })
    }

    /// Continues the numbering of an ended track on the same SSRC at the first packet
    /// (a track of `clock_rate`).
    pub fn continue_from(&mut self, c: Continuation, clock_rate: u32) {
        let mut last = c.last;
        if c.clock_rate != clock_rate && c.clock_rate > 0 {
            last.at = (last.at as u128 * clock_rate as u128 / c.clock_rate as u128) as u64;
        }
        self.last = Some(last);
    }

    /// The last packet sent in portable form (for a restart), with when (clock units).
    pub fn numbered(&self) -> Option<(Numbered, u64)> {
        self.last.map(|l| {
            (
                Numbered {
                    seq: l.seq,
                    ts: l.ts,
                    pic: l.pic,
                    tl0: l.tl0,
                },
                l.at,
            )
        })
    }

    /// Continues from `n`, sent at `at` (this track's clock units), at the first
    /// packet: as after a switch, so a restored or freshly numbered viewer starts at
    /// a keyframe one number past `n`.
    pub fn resume(&mut self, n: Numbered, at: u64) {
        self.last = Some(Sent {
            seq: n.seq,
            ts: n.ts,
            at,
            pic: n.pic,
            tl0: n.tl0,
        });
    }

    /// Pauses or resumes; a resumed subscriber starts again at a keyframe.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if paused {
            self.current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::codec::tests::vp8;

    /// One source packet of a layer: (seq, ts, keyframe start, pic, tl0).
    struct Src {
        layer: Layer,
        seq: u16,
        ts: u32,
        key: bool,
        pic: u16,
        tl0: u8,
    }

    /// Feeds packets through `l` as the engine does; returns what the subscriber got:
    /// (seq, ts, pic, tl0) after the rewrite and the VP8 shift.
    fn run(
        l: &mut Layering,
        r: &mut RouteValue,
        target: Layer,
        pkts: &[(Src, u64)],
    ) -> Vec<(u16, u32, u16, u8)> {
        let mut out = vec![];
        for (p, now) in pkts {
            let mut payload = vp8(p.pic, p.tl0, 0, true, p.key);
            let d = Vp8Descriptor::parse(&payload).unwrap();
            let pkt = Packet {
                layer: p.layer,
                seq: p.seq,
                ts: p.ts,
                keyframe: p.key,
                vp8: Some(&d),
                ids: None,
            };
            let Some(o) = l.accept(&pkt, Some(target), (0, 0), *now, r) else {
                continue;
            };
            d.shift(&mut payload, o.pic_delta, l.tl0_delta);
            let e = Vp8Descriptor::parse(&payload).unwrap();
            out.push((
                p.seq.wrapping_add(o.seq_delta),
                p.ts.wrapping_add(r.ts_delta),
                e.picture_id.unwrap().1,
                e.tl0.unwrap().1,
            ));
        }
        out
    }

    fn src(layer: Layer, seq: u16, ts: u32, key: bool, pic: u16, tl0: u8) -> Src {
        Src {
            layer,
            seq,
            ts,
            key,
            pic,
            tl0,
        }
    }

    #[test]
    fn choose_highest_active_within_the_cap() {
        let mut l = Layering::default();
        assert_eq!(l.choose(&[true, true, true]), Some(2));
        assert_eq!(
            l.choose(&[true, true, false]),
            Some(1),
            "the top layer stopped"
        );
        l.max_layer = 0;
        assert_eq!(l.choose(&[true, true, true]), Some(0));
        assert_eq!(
            l.choose(&[false, true, true]),
            Some(1),
            "none within the cap: lowest active"
        );
        assert_eq!(l.choose(&[false, false, false]), None);
        // The bandwidth limit caps like the API's cap; the lower of the two counts.
        l.max_layer = UNCAPPED;
        l.bw_limit = 1;
        assert_eq!(l.choose(&[true, true, true]), Some(1));
        l.max_layer = 0;
        assert_eq!(l.choose(&[true, true, true]), Some(0));
        l.set_paused(true);
        assert_eq!(l.choose(&[true, true, true]), None);
    }

    /// Starts on a keyframe only; switches up and down at keyframes with sequence,
    /// timestamp, picture id and TL0PICIDX continuing across the switch, through a
    /// 16-bit sequence wrap and a 15-bit picture id wrap; the old layer stops at once.
    #[test]
    fn switches_keep_one_continuous_numbering_across_wraps() {
        let mut l = Layering::default();
        let mut r = RouteValue {
            seq_delta: 100,
            ts_delta: 5,
            ..Default::default()
        };
        // Layer 0 (seq near the wrap), layer 1 (other numbering, picture ids near 2^15).
        let got = run(
            &mut l,
            &mut r,
            0,
            &[
                (src(0, 65_533, 1000, false, 10, 3), 0), // no keyframe yet: dropped
                (src(0, 65_534, 4000, true, 11, 4), 100),
                (src(0, 65_535, 4000, false, 11, 4), 100),
                (src(1, 700, 9_000_000, false, 32_766, 200), 110), // not the target
            ],
        );
        assert_eq!(
            got,
            vec![(98, 4005, 11, 4), (99, 4005, 11, 4)],
            "the random start deltas kept"
        );
        // Up to layer 1: a delta frame waits, its keyframe switches; layer 0 then stops.
        let got = run(
            &mut l,
            &mut r,
            1,
            &[
                (src(0, 0, 7000, false, 12, 4), 3100),
                (src(1, 701, 9_000_000, false, 32_766, 200), 3200),
                (src(1, 702, 9_003_000, true, 32_767, 201), 6100),
                (src(0, 1, 10_000, false, 13, 4), 6100),
                (src(1, 703, 9_006_000, false, 0, 201), 9100),
            ],
        );
        assert_eq!(l.current, Some(1));
        assert_eq!(l.switches, 2);
        assert_eq!(
            got,
            vec![
                (100, 7005, 12, 4),
                // 3,000 ticks after the last packet sent; numbering continues.
                (101, 10_005, 13, 5),
                (102, 13_005, 14, 5),
            ]
        );
        // A packet of layer 1 from before the switch, reordered: dropped (it would
        // reuse a number the subscriber already has).
        assert!(
            run(
                &mut l,
                &mut r,
                1,
                &[(src(1, 701, 9_000_000, false, 32_766, 200), 9200)]
            )
            .is_empty()
        );
        // A NACK maps back to the layer's own numbers only after the switch.
        assert_eq!(l.resend(102, &r, None).map(|x| x.0), Some(703));
        assert_eq!(l.resend(99, &r, None), None);
        // Back down, with loss on the way: the next keyframe of layer 0 switches.
        let got = run(
            &mut l,
            &mut r,
            0,
            &[
                (src(0, 9, 40_000, true, 20, 6), 12_100),
                (src(1, 705, 9_012_000, false, 2, 202), 12_100),
            ],
        );
        assert_eq!(got, vec![(103, 16_005, 15, 6)]);
    }

    #[test]
    fn pause_drops_everything_and_resume_waits_for_a_keyframe() {
        let mut l = Layering::default();
        let mut r = RouteValue::default();
        assert_eq!(
            run(&mut l, &mut r, 0, &[(src(0, 1, 0, true, 1, 1), 0)]).len(),
            1
        );
        l.set_paused(true);
        assert!(run(&mut l, &mut r, 0, &[(src(0, 2, 0, true, 2, 1), 10)]).is_empty());
        l.set_paused(false);
        assert!(run(&mut l, &mut r, 0, &[(src(0, 3, 0, false, 3, 1), 20)]).is_empty());
        assert_eq!(
            run(&mut l, &mut r, 0, &[(src(0, 4, 90, true, 4, 2), 30)]),
            vec![(2, 30, 2, 2)]
        );
    }
}
