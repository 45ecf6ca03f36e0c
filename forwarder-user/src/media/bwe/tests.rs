//! Bandwidth estimation: loss windows, the delay trendline on simulated links.

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
            // Padding shares the link: a tail-drop queue loses media and padding
            // alike.
            let total = rate + self.b.padding().unwrap_or(0);
            let loss = if total > capacity {
                (total - capacity) as f64 / total as f64
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
    v.b = LossBased::new(true, false);
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

/// `secs` of 1,200-byte packets sent at `rate` bits/s through a link of `capacity`
/// bits/s with a queue (no loss), fed back every 100 ms as Chromium does.
fn through_link(
    d: &mut DelayBased,
    rate: u64,
    capacity: u64,
    secs: u64,
    t: &mut Instant,
    clock: &mut (i64, i64),
) {
    let gap = (1_200 * 8 * 1_000_000 / rate) as i64;
    let serialize = (1_200 * 8 * 1_000_000 / capacity) as i64;
    let mut batch = vec![];
    let end = clock.0 + secs as i64 * 1_000_000;
    while clock.0 < end {
        let (sent, free) = clock;
        let arrived = (*sent + 20_000).max(*free) + serialize;
        batch.push((*sent, arrived, 1_200));
        *free = arrived;
        *sent += gap;
        if batch.len() as i64 * gap >= 100_000 {
            *t += Duration::from_millis(100);
            d.on_feedback(&batch, *t);
            batch.clear();
        }
    }
}

/// A queue building shows as over-use within about a second, the estimate
/// settling near 0.85 × what gets through; a path with room never sets a limit.
#[test]
fn delay_growth_is_overuse_before_any_loss() {
    let (mut t, mut clock) = (Instant::now(), (0i64, 0i64));
    let mut d = DelayBased::default();
    through_link(&mut d, 400_000, 1_000_000, 5, &mut t, &mut clock);
    assert_eq!(
        (d.usage, d.estimate, d.overuses),
        (Usage::Normal, None, 0),
        "{d:?}"
    );
    assert!(
        d.received_bps.abs_diff(400_000) < 40_000,
        "{}",
        d.received_bps
    );
    // Now 500 kbit/s into 250: the queue grows by 250 kbit each second.
    through_link(&mut d, 500_000, 250_000, 2, &mut t, &mut clock);
    assert_eq!(d.overuses, 1, "{d:?}");
    let e = d.estimate.unwrap();
    assert!((180_000..=240_000).contains(&e), "{e}");
    // Back under the capacity: the queue drains (under-use), then it holds still
    // and the estimate grows again, by at most 8 % a second, never past 1.5 x what
    // is received.
    through_link(&mut d, 150_000, 250_000, 3, &mut t, &mut clock);
    assert_ne!(d.usage, Usage::Over);
    let drained = d.estimate.unwrap();
    through_link(&mut d, 150_000, 250_000, 4, &mut t, &mut clock);
    let later = d.estimate.unwrap();
    assert!(
        later > drained && later <= d.received_bps * 3 / 2 + 10_000,
        "{e} -> {drained} -> {later}"
    );
    // A viewer's layer: the delay estimate below what is sent is congestion.
    let mut l = LossBased {
        delay: Some(e),
        ..Default::default()
    };
    let now = Instant::now();
    l.on_report(0, 0, 0, Some(2), now, &RATES);
    let layer = l.on_report(
        0,
        500,
        500_000 / 8,
        Some(2),
        now + Duration::from_secs(1),
        &RATES,
    );
    assert_eq!(layer, 0, "no loss, yet the queue says move down: {l:?}");
}

/// With padding probes the viewer behind a narrow link never leaves the layer that
/// fits while probing (the padding, not the layer, meets the link), failed probes
/// back off as before; once the link widens a padding probe passes and moves it up.
#[test]
fn padding_probes_test_the_link_without_moving_the_viewer() {
    let mut v = Viewer::new();
    v.b.pad_capable = true;
    let sent = v.run(400_000, 120, &RATES);
    assert_eq!(sent[3], 0, "down within two reports: {sent:?}");
    assert!(
        sent[3..].iter().all(|l| *l == 0),
        "probing never moved it: {sent:?}"
    );
    assert!(v.b.probes >= 4 && v.b.failed_probes >= 4, "{:?}", v.b);
    let sent = v.run(10_000_000, MAX_HOLD as usize + 10, &RATES);
    assert_eq!(*sent.last().unwrap(), 2, "{sent:?}");
    assert_eq!(v.b.padding(), None);
    // A probe is refused by over-use too (a queue, before loss).
    let mut v = Viewer::new();
    v.b.pad_capable = true;
    v.run(400_000, 10, &RATES);
    let failed = v.b.failed_probes;
    while v.b.padding().is_none() {
        v.run(10_000_000, 1, &RATES);
    }
    v.b.delay_overuses += 1;
    assert_eq!(v.run(10_000_000, 2, &RATES), [0, 0]);
    assert_eq!(v.b.failed_probes, failed + 1);
}
