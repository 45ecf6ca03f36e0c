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
//! The delay-based half ([`DelayBased`], draft-ietf-rmcat-gcc §5) reads the viewer's
//! transport-wide feedback: a queue building on its path shows as packets arriving
//! later and later relative to when they were sent, before any is lost. Where it
//! sees the path over-used, its estimate (0.85 × what the viewer received) counts
//! like a REMB below what was sent: congestion, even in a window without loss.
//!
//! A viewer that negotiated RTX and transport-cc is probed with padding instead of
//! being moved up: for one window the engine sends padding on its RTX stream at
//! what the next layer would add (and a fifth more); if that window has no loss and
//! no over-use, the viewer is moved up, otherwise nothing changed for it but a
//! longer wait before the next probe (no switch up and back, no keyframes).

use std::collections::VecDeque;
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
    /// The delay-based estimate of the viewer's transport, bits/s (transport-cc),
    /// once its feedback showed the path over-used, and how many over-uses it saw.
    pub delay: Option<u64>,
    pub delay_overuses: u64,
    /// Whether a probe can be padding rather than the layer itself (the viewer
    /// negotiated RTX, whose stream carries padding, and transport-cc, whose feedback
    /// shows whether the padding built a queue).
    pub pad_capable: bool,
    pad_probe: Option<PadProbe>,
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
            delay: None,
            delay_overuses: 0,
            pad_capable: false,
            pad_probe: None,
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

/// A probe made of padding: the layer it would allow, its rate, the padding rate
/// that proves it (sent on the RTX stream), and the over-uses seen before it.
#[derive(Debug, Clone, Copy)]
struct PadProbe {
    to: Layer,
    to_rate: u64,
    rate: u64,
    overuses: u64,
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
    /// With `use_remb`, the viewer's REMB counts as well as its loss; with
    /// `pad_capable`, it is probed with padding.
    pub fn new(use_remb: bool, pad_capable: bool) -> LossBased {
        LossBased {
            use_remb,
            pad_capable,
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
        // A padding probe is judged after its window: the path carried the padding
        // without loss or a queue building, so the layer it stood for fits; otherwise
        // nothing changes for the viewer but a longer wait before the next.
        if let Some(p) = self.pad_probe.take() {
            if loss > CONGESTED || self.delay_overuses > p.overuses {
                self.failed_probes += 1;
                self.hold = (self.hold * 2).min(MAX_HOLD);
                self.clean = 0;
            } else {
                self.limit = p.to;
                self.estimate = self.estimate.map(|e| e.max(p.to_rate));
                self.delay = self.delay.map(|d| d.max(p.to_rate));
                self.hold = BASE_HOLD;
                self.clean = 0;
                return self.limit;
            }
        }
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
        // A queue building (delay) is congestion before loss is.
        let delay_cut = self.delay.filter(|d| *d < self.send_rate * 9 / 10);
        let remb_cut = [remb_cut, delay_cut].into_iter().flatten().min();
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
            self.probes += 1;
            self.clean = 0;
            if self.pad_capable {
                // Probe with padding: what the next layer adds, and a fifth more.
                let rate_now = rates.get(fits as usize).copied().unwrap_or(0);
                self.probe_with_padding(
                    next as Layer,
                    *rate,
                    rate.saturating_sub(rate_now) * 6 / 5,
                );
            } else {
                // Probe: one layer up, the estimate raised to carry it.
                self.probe_from = Some((fits, now));
                self.limit = next as Layer;
                self.estimate = Some(estimate.max(*rate));
            }
        }
        self.limit
    }

    /// Starts a padding probe for layer `to` (of `to_rate` bits/s): `rate` bits/s of
    /// padding (at least 50 kbit/s) until the next window decides it.
    pub fn probe_with_padding(&mut self, to: Layer, to_rate: u64, rate: u64) {
        self.pad_probe = Some(PadProbe {
            to,
            to_rate,
            rate: rate.max(50_000),
            overuses: self.delay_overuses,
        });
    }

    /// The padding rate (bits/s) to send the viewer while a padding probe runs.
    pub fn padding(&self) -> Option<u64> {
        self.pad_probe.map(|p| p.rate)
    }

    /// Takes the viewer's REMB: applied at the next window.
    pub fn on_remb(&mut self, bitrate: u64) {
        self.remb = Some(bitrate);
    }

    /// Whether a probe up is being tried.
    pub fn probing(&self) -> bool {
        self.probe_from.is_some() || self.pad_probe.is_some()
    }
}

/// Packets sent within this span of a group's first are one group (a burst).
const GROUP_US: i64 = 5_000;
/// Inter-group delay samples the trend is fitted over.
const TREND_WINDOW: usize = 20;
const SMOOTHING: f64 = 0.9;
const TREND_GAIN: f64 = 4.0;
/// How the over-use threshold follows the trend (up slowly, down fast), per ms.
const K_UP: f64 = 0.0087;
const K_DOWN: f64 = 0.039;
/// Over-use must last this long (ms) before it counts.
const OVERUSE_MS: f64 = 10.0;
/// Packets remembered for the received rate.
const ACKED_SPAN_US: i64 = 1_000_000;

/// What the delay trend says of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Usage {
    #[default]
    Normal,
    Over,
    Under,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    first_send: i64,
    last_send: i64,
    last_arrival: i64,
}

/// The delay-based estimate of one viewer's transport (every m-line of its BUNDLE):
/// packet groups' one-way delay variation, its trend (a least-squares slope over the
/// last [`TREND_WINDOW`] groups of the smoothed accumulated variation), an adaptive
/// over-use threshold, and a rate that drops to 0.85 × what was received on over-use
/// and grows 8 % a second otherwise (never past 1.5 × what is received, never below
/// what was received without over-use). Times in µs:
/// ours when sent, the viewer's when it received (its clock; only differences count).
#[derive(Debug, Clone)]
pub struct DelayBased {
    group: Option<Group>,
    prev: Option<Group>,
    first_arrival: Option<i64>,
    accumulated: f64,
    smoothed: f64,
    samples: VecDeque<(f64, f64)>,
    deltas: u32,
    threshold: f64,
    last_threshold: Option<i64>,
    over_ms: f64,
    over_count: u32,
    prev_trend: f64,
    pub trend: f64,
    pub usage: Usage,
    acked: VecDeque<(i64, u32)>,
    acked_bytes: u64,
    /// What the viewer received over the last second, bits/s.
    pub received_bps: u64,
    /// None until the path was first seen over-used: no limit.
    pub estimate: Option<u64>,
    last_rate_update: Option<Instant>,
    pub overuses: u64,
}

impl Default for DelayBased {
    fn default() -> Self {
        DelayBased {
            group: None,
            prev: None,
            first_arrival: None,
            accumulated: 0.0,
            smoothed: 0.0,
            samples: VecDeque::with_capacity(TREND_WINDOW + 1),
            deltas: 0,
            threshold: 12.5,
            last_threshold: None,
            over_ms: 0.0,
            over_count: 0,
            prev_trend: 0.0,
            trend: 0.0,
            usage: Usage::Normal,
            acked: VecDeque::new(),
            acked_bytes: 0,
            received_bps: 0,
            estimate: None,
            last_rate_update: None,
            overuses: 0,
        }
    }
}

impl DelayBased {
    /// Takes one feedback's received packets, in sequence order: (sent, arrived, size).
    pub fn on_feedback(&mut self, packets: &[(i64, i64, u32)], now: Instant) {
        for &(sent, arrived, size) in packets {
            self.acked.push_back((arrived, size));
            self.acked_bytes += size as u64;
            self.group_packet(sent, arrived);
        }
        if let Some(&(newest, _)) = self.acked.back() {
            while let Some(&(at, size)) = self.acked.front() {
                if newest - at <= ACKED_SPAN_US {
                    break;
                }
                self.acked.pop_front();
                self.acked_bytes -= size as u64;
            }
            // Over the span the packets cover (up to a second): the first packet's
            // bytes arrived before it began.
            let (oldest, first) = self.acked[0];
            if newest > oldest {
                self.received_bps =
                    (self.acked_bytes - first as u64) * 8 * 1_000_000 / (newest - oldest) as u64;
            }
        }
        self.update_rate(now);
    }

    fn group_packet(&mut self, sent: i64, arrived: i64) {
        let Some(g) = self.group.as_mut() else {
            self.group = Some(Group {
                first_send: sent,
                last_send: sent,
                last_arrival: arrived,
            });
            return;
        };
        if sent < g.first_send {
            return; // reordered from an older group: no new information
        }
        if sent - g.first_send <= GROUP_US {
            g.last_send = g.last_send.max(sent);
            g.last_arrival = g.last_arrival.max(arrived);
            return;
        }
        let done = *g;
        if let Some(prev) = self.prev {
            let send_delta = done.last_send - prev.last_send;
            let arrival_delta = done.last_arrival - prev.last_arrival;
            self.on_delta(
                (arrival_delta - send_delta) as f64 / 1000.0,
                send_delta as f64 / 1000.0,
                done.last_arrival,
            );
        }
        self.prev = Some(done);
        self.group = Some(Group {
            first_send: sent,
            last_send: sent,
            last_arrival: arrived,
        });
    }

    /// One group's delay variation `d` (ms) after `send_delta` (ms), arrived at `at`.
    fn on_delta(&mut self, d: f64, send_delta: f64, at: i64) {
        self.deltas = (self.deltas + 1).min(1000);
        self.accumulated += d;
        self.smoothed = SMOOTHING * self.smoothed + (1.0 - SMOOTHING) * self.accumulated;
        let first = *self.first_arrival.get_or_insert(at);
        self.samples
            .push_back(((at - first) as f64 / 1000.0, self.smoothed));
        if self.samples.len() > TREND_WINDOW {
            self.samples.pop_front();
        }
        if self.samples.len() == TREND_WINDOW
            && let Some(slope) = slope(&self.samples)
        {
            self.trend = self.deltas.min(60) as f64 * slope * TREND_GAIN;
        }
        self.detect(send_delta, at);
    }

    fn detect(&mut self, send_delta: f64, at: i64) {
        let t = self.trend;
        if t > self.threshold {
            self.over_ms += send_delta;
            self.over_count += 1;
            if self.over_ms > OVERUSE_MS && self.over_count > 1 && t >= self.prev_trend {
                if self.usage != Usage::Over {
                    self.overuses += 1;
                }
                self.usage = Usage::Over;
                self.over_ms = 0.0;
                self.over_count = 0;
            }
        } else {
            self.over_ms = 0.0;
            self.over_count = 0;
            self.usage = if t < -self.threshold {
                Usage::Under
            } else {
                Usage::Normal
            };
        }
        self.prev_trend = t;
        // The threshold follows the trend, so a path whose delay wanders (or a
        // competing flow) does not read as over-use forever; a spike does not move it.
        let dt = self
            .last_threshold
            .map_or(0.0, |l| ((at - l) as f64 / 1000.0).min(100.0));
        self.last_threshold = Some(at);
        if t.abs() <= self.threshold + 15.0 {
            let k = if t.abs() < self.threshold {
                K_DOWN
            } else {
                K_UP
            };
            self.threshold =
                (self.threshold + k * (t.abs() - self.threshold) * dt).clamp(6.0, 600.0);
        }
    }

    fn update_rate(&mut self, now: Instant) {
        let dt = self.last_rate_update.map_or(0.0, |l| {
            now.saturating_duration_since(l).as_secs_f64().min(1.0)
        });
        self.last_rate_update = Some(now);
        match self.usage {
            Usage::Over if self.received_bps > 0 => {
                let cut = self.received_bps * 85 / 100;
                self.estimate = Some(self.estimate.map_or(cut, |e| e.min(cut)));
            }
            Usage::Normal => {
                if let Some(e) = self.estimate {
                    let grown = (e as f64 * 1.08f64.powf(dt)) as u64 + 1;
                    // What arrived without a queue building is what the path carries
                    // (a probe's layer shows it at once; growth alone takes seconds).
                    self.estimate = Some(
                        grown
                            .min(self.received_bps * 3 / 2 + 10_000)
                            .max(e)
                            .max(self.received_bps),
                    );
                }
            }
            _ => {}
        }
    }
}

/// The least-squares slope of `(x, y)` samples; None if the x do not vary.
fn slope(samples: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = samples.len() as f64;
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = samples.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den > 0.0).then(|| num / den)
}

#[cfg(test)]
mod tests;
