//! Who is speaking: each audio track's recent loudness from the RFC 6464 audio level
//! its publisher puts in every packet, and per room the dominant speaker decided over
//! a short window, so a cough or a word does not move the spotlight. Sans-I/O: levels
//! and times in, a decision out.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// How far back a track's loudness looks, and how long a challenger must lead before
/// it becomes the dominant speaker (large platforms use about half a second).
pub const WINDOW: Duration = Duration::from_millis(500);
/// Packets a 20 ms audio stream sends in [`WINDOW`]: missing ones (DTX) count as
/// silence.
const NOMINAL: u32 = 25;
/// Below this score nobody is speaking (an average about −107 dBov).
pub const SPEECH_MIN: u32 = 20;
/// A challenger must be this much louder than the current speaker.
const MARGIN: u32 = 10;

/// One audio track's levels over the last [`WINDOW`].
#[derive(Debug, Default, Clone)]
pub struct Levels {
    recent: VecDeque<(Instant, u8)>,
}

impl Levels {
    /// Takes the extension's byte: V (voice activity) and the level in −dBov (0 the
    /// loudest, 127 silence). A packet without voice activity counts as silence.
    pub fn record(&mut self, byte: u8, now: Instant) {
        let (voice, level) = (byte & 0x80 != 0, byte & 0x7f);
        let loudness = if voice { 127 - level } else { 0 };
        self.recent.push_back((now, loudness));
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// Mean loudness over the window (127 − dBov per packet, 0 for silence or a
    /// missing packet).
    pub fn score(&self, now: Instant) -> u32 {
        let sum: u32 = self
            .recent
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < WINDOW)
            .map(|(_, l)| *l as u32)
            .sum();
        sum / NOMINAL
    }
}

/// One room's dominant speaker.
#[derive(Debug, Clone)]
pub struct Dominant<K> {
    pub current: Option<K>,
    /// Who leads the current speaker now, since when.
    challenger: Option<(K, Instant)>,
    pub changes: u64,
}

impl<K> Default for Dominant<K> {
    fn default() -> Self {
        Dominant {
            current: None,
            challenger: None,
            changes: 0,
        }
    }
}

impl<K: Clone + PartialEq> Dominant<K> {
    /// Takes every speaker's score now; returns the new dominant speaker when it
    /// changed. The loudest speaker above [`SPEECH_MIN`] takes over once it has led the
    /// current one by [`MARGIN`] for [`WINDOW`]; with nobody speaking the last speaker
    /// stays. A current speaker that is no longer among `scores` (left) is dropped at
    /// once (`Some(None)`).
    pub fn update(&mut self, scores: &[(K, u32)], now: Instant) -> Option<Option<K>> {
        if let Some(c) = &self.current
            && !scores.iter().any(|(k, _)| k == c)
        {
            self.current = None;
            self.challenger = None;
            self.changes += 1;
            return Some(None);
        }
        let current_score = self
            .current
            .as_ref()
            .and_then(|c| scores.iter().find(|(k, _)| k == c))
            .map_or(0, |(_, s)| *s);
        let leader = scores
            .iter()
            .filter(|(k, s)| *s >= SPEECH_MIN && Some(k) != self.current.as_ref())
            .max_by_key(|(_, s)| *s)
            .filter(|(_, s)| *s >= current_score + MARGIN || self.current.is_none());
        let Some((k, _)) = leader else {
            self.challenger = None;
            return None;
        };
        match &self.challenger {
            Some((c, since)) if c == k => {
                // The first speaker of a room takes over at once: nobody to keep.
                if self.current.is_none() || now.saturating_duration_since(*since) >= WINDOW {
                    self.current = Some(k.clone());
                    self.challenger = None;
                    self.changes += 1;
                    return Some(self.current.clone());
                }
            }
            _ => {
                self.challenger = Some((k.clone(), now));
                if self.current.is_none() {
                    self.current = Some(k.clone());
                    self.challenger = None;
                    self.changes += 1;
                    return Some(self.current.clone());
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20 ms packets at `level` dBov (voice) for `ms`.
    fn talk(l: &mut Levels, t: &mut Instant, level: u8, ms: u64) {
        for _ in 0..ms / 20 {
            *t += Duration::from_millis(20);
            l.record(0x80 | level, *t);
        }
    }

    #[test]
    fn loudness_over_the_window() {
        let (mut l, mut t) = (Levels::default(), Instant::now());
        assert_eq!(l.score(t), 0);
        talk(&mut l, &mut t, 30, 1000);
        assert_eq!(l.score(t), 97, "−30 dBov throughout");
        // Silence (V = 0) and no packets (DTX) both bring it down.
        for _ in 0..25 {
            t += Duration::from_millis(20);
            l.record(30, t);
        }
        assert_eq!(l.score(t), 0);
        talk(&mut l, &mut t, 30, 200);
        assert_eq!(
            l.score(t + Duration::from_millis(600)),
            0,
            "DTX: nothing recent"
        );
        assert!((35..=40).contains(&l.score(t)), "{}", l.score(t));
    }

    /// Two speakers taking turns: the first takes the room at once; the second only
    /// after leading for the window; a short burst does not switch; nobody speaking
    /// keeps the last speaker; one who left is dropped.
    #[test]
    fn the_dominant_speaker_switches_after_leading_for_the_window() {
        let mut d: Dominant<&str> = Dominant::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(
            d.update(&[("a", 5), ("b", 0)], at(0)),
            None,
            "nobody speaks"
        );
        assert_eq!(d.update(&[("a", 90), ("b", 0)], at(100)), Some(Some("a")));
        // b leads for 300 ms only: no switch.
        assert_eq!(d.update(&[("a", 10), ("b", 90)], at(200)), None);
        assert_eq!(d.update(&[("a", 10), ("b", 90)], at(500)), None);
        assert_eq!(d.update(&[("a", 90), ("b", 10)], at(600)), None);
        // b leads for the whole window: b.
        for ms in (700..1200).step_by(100) {
            assert_eq!(d.update(&[("a", 10), ("b", 90)], at(ms)), None, "{ms}");
        }
        assert_eq!(d.update(&[("a", 10), ("b", 90)], at(1200)), Some(Some("b")));
        // Louder by less than the margin: stays.
        for ms in (1300..2500).step_by(100) {
            assert_eq!(d.update(&[("a", 95), ("b", 90)], at(ms)), None);
        }
        // Everyone silent: b stays.
        assert_eq!(d.update(&[("a", 0), ("b", 0)], at(3000)), None);
        assert_eq!(d.current, Some("b"));
        // b left.
        assert_eq!(d.update(&[("a", 0)], at(3100)), Some(None));
        assert_eq!(d.changes, 3);
    }
}
