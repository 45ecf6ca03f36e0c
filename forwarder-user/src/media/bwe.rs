//! A viewer's bandwidth, estimated from the loss its receiver reports say (the
//! loss-based half of Google congestion control, draft-ietf-rmcat-gcc §6), and the
//! simulcast layer that fits in it. Sans-I/O: reports and rates in, a layer limit out.
//!
//! Receivers report at their own pace (Chromium several times a second when it has
//! feedback to send, about once a second otherwise), so reports are taken as they
//! come but judged over windows of at least [`WINDOW`]: the loss of a window is the
//! growth of the cumulative loss over the growth of the highest sequence number
//! received, both from the report blocks.
//!
//! Per window: loss above 10 % means the path is congested, and the estimate becomes
//! what was being sent times (1 − loss/2); below 2 % it grows by 5 %; in between it
//! holds; it never grows past 1.5 × what is actually being sent. The layer limit is
//! the highest encoding whose measured rate fits the estimate (a quarter more to move
//! up to it), so a viewer behind a narrow link moves down within a window or two.
//!
//! Going up needs evidence the path has room, which loss alone never gives while the
//! viewer is below its limit: after `hold` clean windows in a row the viewer is moved
//! one layer up as a probe. The probe is judged only once the viewer is on that layer
//! (the switch waits for its keyframe). If it causes loss the estimate drops it back
//! and the next probe waits twice as long (up to [`MAX_HOLD`] windows); if two windows
//! on it are clean the new layer is kept. Without loss on the top layer the estimate grows past 1.4 × its
//! rate, and then it is dropped (no limit) rather than kept stale.
//!
//! Not done: the delay-based half (transport-wide feedback from viewers would show a
//! queue building before loss does), and probing with padding before a switch.

use std::time::{Duration, Instant};

use super::simulcast::{Layer, UNCAPPED};

/// The shortest span of reports judged together.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Clean windows before the first probe up.
pub const BASE_HOLD: u32 = 3;
/// The longest wait between probes (in windows), after repeated failures.
pub const MAX_HOLD: u32 = 24;
/// A probe whose layer has not started by then (no keyframe came) is dropped.
const PROBE_START: Duration = Duration::from_secs(4);

const CONGESTED: f64 = 0.10;
const CLEAN: f64 = 0.02;

#[derive(Debug, Clone)]
pub struct LossBased {
    /// Bits/s the path carries, as far as loss says; None: no limit seen.
    pub estimate: Option<u64>,
    /// The viewer's own estimate (REMB), bits/s, if it sends one.
    pub remb: Option<u64>,
    /// Whether that estimate counts (a viewer that negotiated only REMB).
    pub use_remb: bool,
    /// What was sent to the viewer over the last report interval, bits/s.
    pub send_rate: u64,
    /// The layer limit it gives ([`UNCAPPED`]: none).
    pub limit: Layer,
    /// Clean reports in a row.
    clean: u32,
    /// Clean reports needed before the next probe up.
    hold: u32,
    /// Probing: the limit before the probe, to go back to if it causes loss, and
    /// when it began.
    probe_from: Option<(Layer, Instant)>,
    /// At the start of the current window: the report's cumulative loss and highest
    /// sequence number, payload octets sent (the SR's wrapping count), and when.
    window: Option<Mark>,
    pub probes: u64,
    pub failed_probes: u64,
}

impl Default for LossBased {
    fn default() -> Self {
        LossBased {
            estimate: None,
            remb: None,
            use_remb: false,
            send_rate: 0,
            limit: UNCAPPED,
            clean: 0,
            hold: BASE_HOLD,
            probe_from: None,
            window: None,
            probes: 0,
            failed_probes: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    lost: i32,
    highest: u32,
    octets: u32,
    at: Instant,
}

/// The highest layer whose rate fits `estimate`; the lowest active one if none does.
/// `rates` holds bits/s per layer, 0 for a layer not being received.
fn fitting(rates: &[u64], estimate: u64) -> Layer {
    let active = || rates.iter().enumerate().filter(|(_, r)| **r > 0);
    active()
        .filter(|(_, r)| **r <= estimate)
        .map(|(i, _)| i as Layer)
        .next_back()
        .or_else(|| active().map(|(i, _)| i as Layer).next())
        .unwrap_or(0)
}

impl LossBased {
    /// With `use_remb`, the viewer's REMB counts as well as its loss.
    pub fn new(use_remb: bool) -> LossBased {
        LossBased {
            use_remb,
            ..Default::default()
        }
    }

    /// Takes one receiver report block of the viewer's stream (`total_lost` and
    /// `highest_seq` as reported), with `octets_sent` so far to it (wrapping) and the
    /// layer it is on, at `now`; `rates` are the track's layer rates (bits/s, 0 for
    /// not received). Returns the layer limit, which moves only when a window closes.
    #[allow(clippy::too_many_arguments)]
    pub fn on_report(
        &mut self,
        total_lost: i32,
        highest_seq: u32,
        octets_sent: u32,
        current: Option<Layer>,
        now: Instant,
        rates: &[u64],
    ) -> Layer {
        let mark = Mark {
            lost: total_lost,
            highest: highest_seq,
            octets: octets_sent,
            at: now,
        };
        let Some(start) = self.window else {
            self.window = Some(mark);
            return self.limit;
        };
        let secs = now.saturating_duration_since(start.at).as_secs_f64();
        if now.saturating_duration_since(start.at) < WINDOW {
            return self.limit;
        }
        self.window = Some(mark);
        self.send_rate = (octets_sent.wrapping_sub(start.octets) as f64 * 8.0 / secs) as u64;
        let expected = highest_seq.wrapping_sub(start.highest);
        if expected == 0 || expected > 1 << 20 {
            // Nothing sent (paused, between layers) or a restarted receiver: no verdict.
            return self.limit;
        }
        let lost = (total_lost.wrapping_sub(start.lost)).max(0) as u32;
        let loss = (lost as f64 / expected as f64).min(1.0);
        // A probe counts from when its layer flows; one that never starts is dropped.
        if let Some((from, since)) = self.probe_from {
            let started = current == Some(self.limit);
            if !started {
                if now.saturating_duration_since(since) > PROBE_START {
                    self.probe_from = None;
                    self.limit = from;
                    self.clean = 0;
                }
                return self.limit;
            }
        }
        // The viewer's own REMB, where well below what it was sent, is congestion too
        // (never a reason to go up: Chromium's receive-side estimate trails what it
        // gets, so it would hold a viewer where it is).
        let remb_cut = self
            .remb
            .filter(|r| self.use_remb && *r < self.send_rate * 85 / 100);
        if loss > CONGESTED || remb_cut.is_some() {
            let base = self.send_rate.max(1);
            let by_loss = (loss > CONGESTED).then(|| (base as f64 * (1.0 - loss / 2.0)) as u64);
            self.estimate = [by_loss, remb_cut].into_iter().flatten().min();
            self.clean = 0;
            if let Some((from, _)) = self.probe_from.take() {
                // The probe caused it: back down, and wait longer before the next.
                self.failed_probes += 1;
                self.hold = (self.hold * 2).min(MAX_HOLD);
                self.limit = from;
            }
        } else if loss < CLEAN {
            self.clean += 1;
            // Grow, but not past 1.5 × what is actually sent (as GCC bounds its rate
            // by the received rate): only a probe shows there is room for more.
            // And never below what was just carried without loss.
            self.estimate = self.estimate.map(|e| {
                (e + e / 20)
                    .min(e.max(self.send_rate * 3 / 2))
                    .max(self.send_rate)
            });
            if self.probe_from.is_some() && self.clean >= 2 {
                // The probe held: the layer is kept, and the next probe comes sooner.
                self.probe_from = None;
                self.hold = BASE_HOLD;
            }
        } else {
            self.clean = 0;
        }
        let top = rates.iter().copied().max().unwrap_or(0);
        if self.estimate.is_some_and(|e| top > 0 && e > top * 7 / 5) {
            // Room for everything, by a margin: no limit rather than a stale one.
            self.estimate = None;
        }
        let Some(estimate) = self.estimate else {
            self.limit = UNCAPPED;
            return self.limit;
        };
        if top > 0 && estimate > top * 7 / 5 {
            self.limit = UNCAPPED;
            return self.limit;
        }
        // Hysteresis: a layer stays while the estimate carries it; a higher one needs
        // a quarter more than its rate (layer rates wander with the picture).
        let keep = fitting(rates, estimate);
        let mut fits = if self.limit == UNCAPPED || keep <= self.limit {
            keep
        } else {
            fitting(rates, estimate * 4 / 5).max(self.limit)
        };
        // A clean window never moves the viewer down: its layer's rate rose, the path
        // carried it.
        if loss < CLEAN
            && remb_cut.is_none()
            && let Some(c) = current
            && c <= self.limit
        {
            fits = fits.max(c);
        }
        if self.probe_from.is_some() {
            // A probe in flight keeps its layer until a report decides it.
            return self.limit;
        }
        self.limit = fits;
        let above = rates
            .iter()
            .enumerate()
            .skip(fits as usize + 1)
            .find(|(_, r)| **r > 0);
        if let Some((next, rate)) = above
            && self.clean >= self.hold
        {
            // Probe: one layer up, the estimate raised to carry it.
            self.probes += 1;
            self.probe_from = Some((fits, now));
            self.limit = next as Layer;
            self.estimate = Some(estimate.max(*rate));
            self.clean = 0;
        }
        self.limit
    }

    /// Takes the viewer's REMB: applied at the next window.
    pub fn on_remb(&mut self, bitrate: u64) {
        self.remb = Some(bitrate);
    }

    /// Whether a probe up is being tried.
    pub fn probing(&self) -> bool {
        self.probe_from.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Three layers of 150 k, 500 k and 1.5 Mbit/s.
    const RATES: [u64; 3] = [150_000, 500_000, 1_500_000];

    /// A viewer behind a link of `capacity` bits/s for `secs` seconds, one report a
    /// second: it is sent its limit's layer, and what exceeds the link is lost.
    /// Returns the layer sent each second.
    struct Viewer {
        b: LossBased,
        t: Instant,
        octets: u32,
        lost: i32,
        highest: u32,
    }

    impl Viewer {
        fn new() -> Viewer {
            Viewer {
                b: LossBased::default(),
                t: Instant::now(),
                octets: 0,
                lost: 0,
                highest: 0,
            }
        }

        /// A second of `rate` bits/s in 1,000-byte packets, `loss` of them lost, then
        /// its report.
        fn second(&mut self, rate: u64, loss: f64, current: Layer, rates: &[u64]) -> Layer {
            let packets = (rate / 8_000).max(1) as u32;
            self.t += Duration::from_secs(1);
            self.octets = self.octets.wrapping_add((rate / 8) as u32);
            self.highest += packets;
            self.lost += (packets as f64 * loss).round() as i32;
            self.b.on_report(
                self.lost,
                self.highest,
                self.octets,
                Some(current),
                self.t,
                rates,
            )
        }

        fn run(&mut self, capacity: u64, secs: usize, rates: &[u64]) -> Vec<Layer> {
            let mut sent = Vec::new();
            for _ in 0..secs {
                let layer = (self.b.limit as usize).min(rates.len() - 1);
                let rate = rates[layer];
                sent.push(layer as Layer);
                let loss = if rate > capacity {
                    (rate - capacity) as f64 / rate as f64
                } else {
                    0.0
                };
                self.second(rate, loss, layer as Layer, rates);
            }
            sent
        }
    }

    #[test]
    fn a_wide_link_sets_no_limit() {
        let mut v = Viewer::new();
        assert!(v.run(10_000_000, 20, &RATES).iter().all(|l| *l == 2));
        assert_eq!((v.b.limit, v.b.estimate), (UNCAPPED, None));
        // Moderate loss (2-10 %: random loss, not congestion) sets none either.
        assert_eq!(v.second(1_500_000, 0.06, 2, &RATES), UNCAPPED);
        // Reports closer together than a window are judged together: 30 % loss
        // spread over four quarter-second reports moves nothing until the fourth.
        for q in 0..4 {
            v.t += Duration::from_millis(250);
            v.highest += 47;
            v.lost += 14;
            v.octets = v.octets.wrapping_add(46_875);
            let l =
                v.b.on_report(v.lost, v.highest, v.octets, Some(2), v.t, &RATES);
            assert_eq!(l == UNCAPPED, q < 3, "report {q}: {l}");
        }
        assert!(v.b.estimate.is_some());
    }

    /// A 400 kbit/s link: the viewer is down on the lowest layer within two reports;
    /// probes up fail and back off (each wait twice the last, up to the maximum), so
    /// it spends little time above; once the link widens it climbs to the top within
    /// one maximum wait and the limit goes away.
    #[test]
    fn a_narrow_link_moves_down_probes_back_off_and_a_wider_one_moves_up() {
        let mut v = Viewer::new();
        let sent = v.run(400_000, 120, &RATES);
        assert_eq!(&sent[..1], &[2]);
        assert_eq!(sent[3], 0, "down within two reports: {sent:?}");
        let above = sent[3..].iter().filter(|l| **l > 0).count();
        assert!(above <= 8, "{above} s above the lowest layer: {sent:?}");
        assert!(v.b.failed_probes >= 4, "{}", v.b.failed_probes);
        // Probes were spaced ever further apart.
        let probes: Vec<usize> = (4..sent.len())
            .filter(|i| sent[*i] > 0 && sent[*i - 1] == 0)
            .collect();
        let gaps: Vec<usize> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
        assert!(*gaps.last().unwrap() >= MAX_HOLD as usize, "{gaps:?}");
        // The link widens: up to the top within a maximum wait and a few reports.
        let sent = v.run(10_000_000, MAX_HOLD as usize + 10, &RATES);
        assert_eq!(*sent.last().unwrap(), 2, "{sent:?}");
        let sent = v.run(10_000_000, 20, &RATES);
        assert!(sent.iter().all(|l| *l == 2), "{sent:?}");
        assert_eq!(v.b.limit, UNCAPPED);
    }

    /// A 700 kbit/s link carries the middle layer, not the top: the viewer settles
    /// there, probing the top now and then.
    #[test]
    fn a_middle_link_settles_on_the_middle_layer() {
        let mut v = Viewer::new();
        let sent = v.run(700_000, 90, &RATES);
        let tail = &sent[30..];
        let middle = tail.iter().filter(|l| **l == 1).count();
        assert!(middle * 10 >= tail.len() * 8, "{sent:?}");
    }

    /// A viewer's REMB well below what it is sent moves it down like loss would, and
    /// a probe it cuts short counts as failed; a REMB at or above the rate sent (a
    /// receive-side estimate trailing what arrives) changes nothing.
    #[test]
    fn remb_below_the_send_rate_moves_down() {
        let mut v = Viewer::new();
        v.b = LossBased::new(true);
        v.b.on_remb(1_400_000);
        assert!(v.run(10_000_000, 4, &RATES).iter().all(|l| *l == 2));
        v.b.on_remb(600_000);
        let sent = v.run(10_000_000, 3, &RATES);
        assert_eq!(sent[2], 1, "{sent:?}");
        // Probes up come, are cut by the REMB, and back off.
        let sent = v.run(10_000_000, 40, &RATES);
        assert!(v.b.failed_probes >= 2, "{sent:?}");
        assert!(sent.iter().filter(|l| **l == 2).count() <= 8, "{sent:?}");
    }

    #[test]
    fn only_received_layers_count() {
        let rates = [150_000, 0, 1_500_000];
        assert_eq!(fitting(&rates, 1_000_000), 0);
        assert_eq!(fitting(&rates, 2_000_000), 2);
        assert_eq!(
            fitting(&[0, 0, 1_500_000], 100),
            2,
            "nothing fits: the lowest active"
        );
        // The middle layer is not being sent: the probe skips it.
        let mut v = Viewer::new();
        let sent = v.run(400_000, 12, &rates);
        assert!(sent.iter().all(|l| *l != 1), "{sent:?}");
        assert!(sent.contains(&0) && v.b.probes > 0, "{sent:?}");
    }
}
