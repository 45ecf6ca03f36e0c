//! Layers inside one encoding: which spatial and temporal layers of a scalable stream
//! (VP9 SVC, VP8 temporal layers) a subscriber gets (the filter), and the renumbering
//! that hides what it does not get (the gaps).
//!
//! Dropping packets from one RTP stream leaves holes a receiver reads as loss: it
//! would ask for them and wait. So every dropped packet takes its sequence number out
//! of the subscriber's numbering, and for VP8 every dropped frame its picture id
//! (libwebrtc's VP8 reference finder waits for a missing picture id forever). VP9's
//! picture ids are kept: its references name pictures by id, and its reference finder
//! places a missing picture in its temporal layer from the group-of-frames structure.
//!
//! A layer goes down at the next picture; it goes up only where the codec allows a
//! decoder to start it: a keyframe for a spatial layer (Chromium's `L3T3_KEY` predicts
//! upper spatial layers from lower ones only there), a keyframe or a switching point
//! (VP8's Y, VP9's U) for a temporal layer.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use forwarder_common::routes::RouteValue;

use super::{
    codec::{LayerIds, UpSwitch},
    seq::Unwrap,
    simulcast::Layer,
};

/// What a subscriber is getting of a scalable stream now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter {
    /// The highest spatial and temporal layer forwarded.
    pub spatial: Layer,
    pub temporal: Layer,
}

impl Filter {
    /// Started on a keyframe: every layer it wants is decodable from here.
    pub fn start(&mut self, want: (Layer, Layer)) {
        (self.spatial, self.temporal) = want;
    }

    /// Whether it waits for a keyframe or a switching point to get more.
    pub fn waiting(&self, want: (Layer, Layer)) -> bool {
        want.0 > self.spatial || want.1 > self.temporal
    }

    /// Decides one packet: None to drop it, else whether it now ends the picture for
    /// the subscriber (the last packet of the highest spatial layer it gets).
    pub fn decide(&mut self, ids: &LayerIds, keyframe: bool, want: (Layer, Layer)) -> Option<bool> {
        let (want_s, want_t) = want;
        if ids.picture_start {
            if keyframe {
                self.start(want);
            } else {
                // Down at once; up only where a decoder can follow.
                self.spatial = self.spatial.min(want_s);
                self.temporal = self.temporal.min(want_t);
                match ids.up {
                    UpSwitch::ThisLayer
                        if ids.temporal > self.temporal && ids.temporal <= want_t =>
                    {
                        self.temporal = ids.temporal
                    }
                    UpSwitch::Above if ids.temporal <= self.temporal => self.temporal = want_t,
                    _ => {}
                }
            }
        }
        (ids.spatial <= self.spatial && ids.temporal <= self.temporal)
            .then_some(ids.layer_end && ids.spatial == self.spatial)
    }
}

/// Layer ids tracked per stream: the first four spatial and temporal layers.
const IDS: usize = 4;

/// What a stream's packets show of its layers: which are present (a subscriber
/// waits only for layers that exist) and each spatial layer's bit rate (what the
/// bandwidth choice weighs).
#[derive(Debug, Clone, Default)]
pub struct Seen {
    spatial_at: [Option<Instant>; IDS],
    temporal_at: [Option<Instant>; IDS],
    bytes: [u64; IDS],
    mark: [u64; IDS],
    /// Bits/s of each spatial layer alone over the last interval.
    pub rates: [u64; IDS],
}

impl Seen {
    pub fn record(&mut self, ids: &LayerIds, len: usize, now: Instant) {
        let (s, t) = (
            (ids.spatial as usize).min(IDS - 1),
            (ids.temporal as usize).min(IDS - 1),
        );
        self.spatial_at[s] = Some(now);
        self.temporal_at[t] = Some(now);
        self.bytes[s] += len as u64;
    }

    /// The highest spatial and temporal layer received within `idle`.
    pub fn top(&self, now: Instant, idle: Duration) -> (Layer, Layer) {
        let top = |at: &[Option<Instant>; IDS]| {
            at.iter()
                .rposition(|a| a.is_some_and(|a| now - a < idle))
                .unwrap_or(0) as Layer
        };
        (top(&self.spatial_at), top(&self.temporal_at))
    }

    /// Rates over the `secs` since the last call.
    pub fn tick(&mut self, secs: f64) {
        for i in 0..IDS {
            if secs > 0.0 {
                self.rates[i] = ((self.bytes[i] - self.mark[i]) as f64 * 8.0 / secs) as u64;
            }
            self.mark[i] = self.bytes[i];
        }
    }

    /// What a subscriber gets on spatial layer `i` (with the layers below it), for
    /// `i` up to `top`: the rates the bandwidth choice compares, like simulcast's.
    pub fn cumulative(&self, top: Layer, out: &mut [u64]) -> usize {
        let n = (top as usize + 1).min(out.len()).min(IDS);
        let mut sum = 0;
        for (i, o) in out.iter_mut().take(n).enumerate() {
            sum += self.rates[i];
            *o = sum.max(1);
        }
        n
    }
}

/// A run of dropped packets: source sequence numbers `from..=to` (extended: a gap is
/// kept for as long as it is among the last [`GAPS`], however many packets that is),
/// and the sequence and picture deltas in force before it (what packets older than
/// it still use).
#[derive(Debug, Clone, Copy)]
struct Gap {
    from: u64,
    to: u64,
    seq_before: u16,
    pic_before: u16,
}

/// Runs of dropped packets remembered for packets that arrive late (reordered, or
/// resent for a NACK): about a second of temporal-layer drops.
const GAPS: usize = 32;

/// The renumbering of one layer of one subscriber across the packets it does not
/// get. The route's `seq_delta` is the delta of the newest packets; each in-order
/// drop lowers it by one (and the picture delta by one per dropped VP8 frame).
#[derive(Debug, Clone, Default)]
pub struct Gaps {
    gaps: VecDeque<Gap>,
    /// The layer's source sequence numbers, extended against the newest seen
    /// (forwarded or dropped).
    seqs: Unwrap,
    /// The picture id of the newest packet seen (VP8).
    picture: Option<u16>,
    /// Packets at or before this are too old to number: their gaps were forgotten.
    floor: Option<u64>,
}

impl Gaps {
    /// A new layer (a simulcast switch): its own sequence space.
    pub fn reset(&mut self) {
        self.gaps.clear();
        self.seqs.reset();
        (self.picture, self.floor) = (None, None);
    }

    /// The extended number of `seq` of this layer (not remembered).
    pub fn extend(&self, seq: u16) -> u64 {
        self.seqs.extend(seq)
    }

    fn in_order(&self, e: u64) -> bool {
        self.seqs.highest().is_none_or(|h| e > h)
    }

    /// Takes a dropped packet's number out of the subscriber's numbering (and its
    /// frame's picture id, for VP8 `picture`). A late one cannot be taken out any more
    /// (later packets have their numbers): it stays a hole.
    pub fn drop(
        &mut self,
        seq: u16,
        picture: Option<u16>,
        route: &mut RouteValue,
        pic_delta: &mut u16,
    ) {
        let e = self.seqs.extend(seq);
        if !self.in_order(e) {
            return;
        }
        match self.gaps.back_mut() {
            Some(g) if Some(g.to) == self.seqs.highest() && g.to + 1 == e => g.to = e,
            _ => {
                self.gaps.push_back(Gap {
                    from: e,
                    to: e,
                    seq_before: route.seq_delta,
                    pic_before: *pic_delta,
                });
                if self.gaps.len() > GAPS {
                    self.floor = self.gaps.pop_front().map(|g| g.to);
                }
            }
        }
        route.seq_delta = route.seq_delta.wrapping_sub(1);
        if let Some(p) = picture
            && self.picture != Some(p)
        {
            *pic_delta = pic_delta.wrapping_sub(1);
        }
        self.seqs.update(seq);
        self.picture = picture.or(self.picture);
    }

    /// The sequence and picture deltas of a forwarded packet: the newest ones, or for
    /// a late packet those in force before the first gap after it. None when it is
    /// too old to number.
    pub fn keep(
        &mut self,
        seq: u16,
        picture: Option<u16>,
        route: &RouteValue,
        pic_delta: u16,
    ) -> Option<(u16, u16)> {
        let e = self.seqs.extend(seq);
        if self.floor.is_some_and(|f| e <= f) {
            return None;
        }
        if self.in_order(e) {
            self.seqs.update(seq);
            self.picture = picture.or(self.picture);
            return Some((route.seq_delta, pic_delta));
        }
        Some(
            self.gaps
                .iter()
                .find(|g| g.from > e)
                .map_or((route.seq_delta, pic_delta), |g| {
                    (g.seq_before, g.pic_before)
                }),
        )
    }

    /// The source sequence number behind `out` and its deltas, if it is one a
    /// forwarded packet had or a packet after the newest will have (not a dropped
    /// one's, not one older than what is kept).
    pub fn source(&self, out: u16, route: &RouteValue, pic_delta: u16) -> Option<(u16, u16, u16)> {
        // Newest first: after the last gap the current deltas, before each gap the
        // deltas it recorded; a candidate must fall between its neighbouring gaps.
        let mut delta = (route.seq_delta, pic_delta);
        let mut upper: Option<u64> = None;
        for i in (0..=self.gaps.len()).rev() {
            let lower = match i {
                0 => self.floor,
                _ => Some(self.gaps[i - 1].to),
            };
            let seq = out.wrapping_sub(delta.0);
            let e = self.seqs.extend(seq);
            // (After the newest: not received yet; the publisher may have it.)
            if lower.is_none_or(|l| e > l) && upper.is_none_or(|u| u > e) {
                return Some((seq, delta.0, delta.1));
            }
            if i > 0 {
                let g = self.gaps[i - 1];
                upper = Some(g.from);
                delta = (g.seq_before, g.pic_before);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(spatial: u8, temporal: u8, start: bool, end: bool, up: UpSwitch) -> LayerIds {
        LayerIds {
            spatial,
            temporal,
            picture_start: start,
            layer_end: end,
            up,
            picture: None,
        }
    }

    /// One VP9 L3T1 picture: three spatial layer frames of one packet each.
    fn picture(f: &mut Filter, key: bool, want: (Layer, Layer)) -> Vec<Option<bool>> {
        (0..3)
            .map(|s| f.decide(&ids(s, 0, s == 0, true, UpSwitch::No), key && s == 0, want))
            .collect()
    }

    #[test]
    fn spatial_layers_go_down_at_a_picture_and_up_at_a_keyframe() {
        let mut f = Filter::default();
        f.start((2, 0));
        assert_eq!(
            picture(&mut f, false, (2, 0)),
            [Some(false), Some(false), Some(true)]
        );
        // Capped to 1: from the next picture, layer 2 dropped and layer 1 ends it.
        assert_eq!(
            picture(&mut f, false, (1, 0)),
            [Some(false), Some(true), None]
        );
        // Lifted: a delta picture cannot start layer 2; the keyframe does.
        assert_eq!(
            picture(&mut f, false, (2, 0)),
            [Some(false), Some(true), None]
        );
        assert!(f.waiting((2, 0)));
        assert_eq!(
            picture(&mut f, true, (2, 0)),
            [Some(false), Some(false), Some(true)]
        );
        assert!(!f.waiting((2, 0)));
        // A cap asked mid-picture waits for the next picture (no half picture).
        f.decide(&ids(0, 0, true, true, UpSwitch::No), false, (2, 0));
        assert_eq!(
            f.decide(&ids(1, 0, false, true, UpSwitch::No), false, (0, 0)),
            Some(false)
        );
    }

    #[test]
    fn temporal_layers_go_up_at_switching_points() {
        let mut f = Filter::default();
        f.start((0, 0));
        let want = (0, 2);
        // VP8 (Y on the frame's own layer): a TL2 frame without Y stays dropped.
        assert_eq!(
            f.decide(&ids(0, 2, true, false, UpSwitch::No), false, want),
            None
        );
        assert_eq!(
            f.decide(&ids(0, 1, true, false, UpSwitch::ThisLayer), false, want),
            Some(false)
        );
        assert_eq!(f.temporal, 1);
        assert_eq!(
            f.decide(&ids(0, 2, true, false, UpSwitch::ThisLayer), false, want),
            Some(false)
        );
        assert_eq!(f.temporal, 2);
        // Down at once; VP9's U on a forwarded picture opens every layer after it.
        assert_eq!(
            f.decide(&ids(0, 1, true, false, UpSwitch::No), false, (0, 0)),
            None
        );
        assert_eq!(
            f.decide(&ids(0, 2, true, false, UpSwitch::Above), false, want),
            None
        );
        assert_eq!(f.temporal, 0, "U on a picture it does not get");
        f.decide(&ids(0, 0, true, false, UpSwitch::Above), false, want);
        assert_eq!(f.temporal, 2);
    }

    fn route(seq_delta: u16) -> RouteValue {
        RouteValue {
            seq_delta,
            ..Default::default()
        }
    }

    /// Drops take their numbers out, across the 16-bit wrap; late packets get the
    /// numbers of their place; a NACK maps back only to forwarded packets.
    #[test]
    fn dropped_packets_leave_no_hole_across_wrap_and_reordering() {
        let mut g = Gaps::default();
        let mut r = route(10);
        let mut pic = 0u16;
        let mut out = vec![];
        // Source 65_533..=3; drop 65_535 and 0 (one frame, picture 7), and 2 (picture 8).
        for (seq, p, keep) in [
            (65_533u16, 6u16, true),
            (65_534, 6, true),
            (65_535, 7, false),
            (0, 7, false),
            (1, 8, true),
            (2, 9, false),
            (3, 10, true),
        ] {
            if keep {
                let (d, pd) = g.keep(seq, Some(p), &r, pic).unwrap();
                out.push((seq.wrapping_add(d), p.wrapping_add(pd)));
            } else {
                g.drop(seq, Some(p), &mut r, &mut pic);
            }
        }
        assert_eq!(
            out,
            [(7, 6), (8, 6), (9, 7), (10, 8)],
            "one continuous numbering"
        );
        // A late packet between the gaps gets the numbering of its place.
        assert_eq!(g.keep(1, Some(8), &r, pic), Some((8, 65_535)));
        // A late packet of a dropped frame cannot be taken out any more.
        g.drop(65_535, Some(7), &mut r, &mut pic);
        assert_eq!(r.seq_delta, 7);
        // NACKs: back to the source numbers of forwarded packets only.
        assert_eq!(g.source(10, &r, pic), Some((3, 7, 65_534)));
        assert_eq!(g.source(9, &r, pic), Some((1, 8, 65_535)));
        assert_eq!(g.source(8, &r, pic), Some((65_534, 10, 0)));
        assert_eq!(
            g.source(11, &r, pic),
            Some((4, 7, 65_534)),
            "not received yet"
        );
        assert_eq!(g.source(7, &r, pic).map(|x| x.0), Some(65_533));
        // After a switch, nothing of the old layer maps.
        g.reset();
        assert_eq!(g.keep(500, None, &r, pic), Some((7, 65_534)));
    }

    #[test]
    fn gaps_forgotten_make_older_packets_unnumberable() {
        let mut g = Gaps::default();
        let mut r = route(0);
        let mut pic = 0;
        // GAPS + 1 separate gaps: every other packet dropped.
        for seq in 0..(2 * GAPS as u16 + 2) {
            if seq % 2 == 1 {
                g.drop(seq, None, &mut r, &mut pic);
            } else {
                g.keep(seq, None, &r, pic).unwrap();
            }
        }
        assert_eq!(g.gaps.len(), GAPS);
        assert_eq!(
            g.keep(0, None, &r, pic),
            None,
            "older than the remembered gaps"
        );
        assert_eq!(g.source(0, &r, pic), None);
        assert!(g.keep(4, None, &r, pic).is_some());
    }
}
