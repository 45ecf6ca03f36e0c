//! The load test's report: per track and in total, packets sent and received, loss
//! against what the publishers sent, the longest gap, bitrate, latency and time to
//! first media; join times, failures by reason, and each subscriber track over the
//! run's limits.

use super::*;

impl Options {
    /// What of `r` (subscriber `who`'s track `track`) is over the limits.
    fn over_limits(&self, who: &str, track: &(String, &str), r: &Received) -> Vec<String> {
        let mut over = Vec::new();
        if r.loss_pct() > self.max_loss_pct {
            over.push(format!(
                "{who}: {}/{} lost {:.2} % ({} of {} sent), over --max-loss {} %",
                track.0,
                track.1,
                r.loss_pct(),
                r.expected - r.packets.min(r.expected),
                r.expected,
                self.max_loss_pct
            ));
        }
        if r.longest_gap_ns as u128 > self.max_gap.as_nanos() {
            over.push(format!(
                "{who}: {}/{} went {:.2} s without a packet, over --max-gap {} s",
                track.0,
                track.1,
                r.longest_gap_ns as f64 / 1e9,
                self.max_gap.as_secs_f64()
            ));
        }
        over
    }
}

#[derive(Debug, Serialize)]
pub struct Quantiles {
    pub median: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Quantiles {
    fn of(v: &mut [u32], scale: f64) -> Quantiles {
        let mut f = |q| quantile(v, q).map(|x| x as f64 * scale);
        Quantiles {
            median: f(0.5),
            p99: f(0.99),
            max: f(1.0),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TrackRow {
    pub track: String,
    pub kind: &'static str,
    pub subscribers: usize,
    pub sent: u64,
    pub received: u64,
    pub expected: u64,
    /// Over all its subscribers: packets lost of what the publisher sent from each
    /// one's first packet on (a tail that never came counts).
    pub loss_pct: f64,
    /// The subscriber that lost most.
    pub worst_loss_pct: f64,
    /// The longest any subscriber went without a packet (join to first, between two,
    /// last to the publisher's last).
    pub longest_gap_ms: f64,
    /// The longest any subscriber went without a packet between two (a stream
    /// interrupted once flowing: restarts, failovers).
    pub longest_stall_ms: f64,
    /// Payload kbit/s one subscriber received, averaged over subscribers.
    pub kbps_per_subscriber: f64,
    pub latency_ms: Quantiles,
    /// From a subscriber's join (SRTP keys) to its first packet of the track.
    pub first_media_ms: Quantiles,
}

#[derive(Debug, Serialize)]
pub struct FailureRow {
    pub count: usize,
    /// The first one's detail.
    pub example: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub url: String,
    pub rooms: usize,
    pub publishers_per_room: usize,
    pub subscribers_per_room: usize,
    pub video_kbps: u32,
    pub duration_s: f64,
    pub interrupted: bool,
    pub clients: usize,
    pub joined_publishers: usize,
    pub joined_subscribers: usize,
    /// Failed joins plus subscribers that received nothing of a track they were given.
    pub failed: usize,
    pub failures: BTreeMap<String, FailureRow>,
    /// POST to SRTP keys.
    pub join_ms_publishers: Quantiles,
    pub join_ms_subscribers: Quantiles,
    /// Clients joined over the time from the first POST to the last join.
    pub joins_per_s: f64,
    pub srtp_profiles: BTreeMap<String, usize>,
    pub keyframes_sent: u64,
    pub plis_received: u64,
    pub tracks: Vec<TrackRow>,
    pub total: TrackRow,
    /// DELETEs that failed (sessions left for the SFU's consent timeout).
    pub leave_failures: usize,
    /// Subscribers' new sessions at another node after theirs stopped sending.
    pub reconnects: u64,
    pub leave_failure_example: Option<String>,
    /// The limits every subscriber's every track was held to.
    pub max_loss_pct: f64,
    pub max_gap_ms: f64,
    /// Each subscriber's track over a limit: the run fails.
    pub over_limits: Vec<String>,
}

impl Report {
    pub(super) fn build(opts: &Options, outcomes: Vec<Outcome>, join_phase: Duration) -> Report {
        let mut failures: BTreeMap<String, FailureRow> = BTreeMap::new();
        let mut fail = |stage: &str, detail: String| {
            let e = failures.entry(stage.to_string()).or_insert(FailureRow {
                count: 0,
                example: detail,
            });
            e.count += 1;
        };
        let (mut jp, mut js) = (vec![], vec![]);
        let mut profiles: BTreeMap<String, usize> = BTreeMap::new();
        // What the publishers sent comes first: subscribers are counted against it.
        let sent: HashMap<u32, (u64, u64)> = outcomes
            .iter()
            .filter(|o| o.role == Role::Publisher)
            .flat_map(|o| o.sent.iter().map(|(t, n, last)| (*t, (*n, *last))))
            .collect();
        let mut by_track: BTreeMap<u32, Vec<Received>> = BTreeMap::new();
        let (mut keyframes, mut plis, mut leave_failures, mut reconnects) = (0, 0, 0, 0);
        let mut leave_example = None;
        let mut over_limits = Vec::new();
        let mut subscriber_no = vec![0usize; opts.rooms];
        for o in outcomes {
            let us = match o.join {
                Err(f) => {
                    fail(f.stage, f.detail);
                    continue;
                }
                Ok(d) => d.as_micros() as u32,
            };
            if let Some(p) = o.profile {
                *profiles.entry(p.to_string()).or_default() += 1;
            }
            if let Err(e) = o.left {
                leave_failures += 1;
                leave_example.get_or_insert(e);
            }
            reconnects += u64::from(o.reconnects);
            match o.role {
                Role::Publisher => {
                    jp.push(us);
                    keyframes += o.keyframes;
                    plis += o.plis;
                }
                Role::Subscriber => {
                    js.push(us);
                    let who = format!(
                        "subscriber {} of room {}-{}",
                        subscriber_no[o.room], opts.room_prefix, o.room
                    );
                    subscriber_no[o.room] += 1;
                    if o.received.len() < o.given {
                        fail(
                            "no_media",
                            format!(
                                "{who} received {} of the {} tracks it was given",
                                o.received.len(),
                                o.given
                            ),
                        );
                    }
                    let mut tracks: Vec<_> = o.received.into_iter().collect();
                    tracks.sort_unstable_by_key(|(t, _)| *t);
                    for (t, mut r) in tracks {
                        if let Some(&(n, last)) = sent.get(&t) {
                            r.settle(o.joined_ns, n, last);
                        }
                        over_limits.extend(opts.over_limits(&who, &track_name(opts, t), &r));
                        by_track.entry(t).or_default().push(r);
                    }
                }
            }
        }
        let row = |track: String, kind: &'static str, rs: &[Received], sent: u64| {
            let received: u64 = rs.iter().map(|r| r.packets).sum();
            let expected: u64 = rs.iter().map(|r| r.expected).sum();
            let mut lat: Vec<u32> = rs
                .iter()
                .flat_map(|r| r.latency_us.iter().copied())
                .collect();
            let mut first: Vec<u32> = rs
                .iter()
                .map(|r| (r.first_media_ns / 1000).min(u32::MAX as u64) as u32)
                .collect();
            let kbps: f64 = rs
                .iter()
                .map(|r| {
                    let secs = (r.last_ns.saturating_sub(r.first_ns)) as f64 / 1e9;
                    if secs > 0.0 {
                        r.bytes as f64 * 8.0 / 1000.0 / secs
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
                / rs.len().max(1) as f64;
            TrackRow {
                track,
                kind,
                subscribers: rs.len(),
                sent,
                received,
                expected,
                loss_pct: if expected > 0 {
                    100.0 * expected.saturating_sub(received) as f64 / expected as f64
                } else {
                    0.0
                },
                worst_loss_pct: rs.iter().map(Received::loss_pct).fold(0.0, f64::max),
                longest_gap_ms: rs.iter().map(|r| r.longest_gap_ns).max().unwrap_or(0) as f64 / 1e6,
                longest_stall_ms: rs.iter().map(|r| r.longest_stall_ns).max().unwrap_or(0) as f64
                    / 1e6,
                kbps_per_subscriber: kbps,
                latency_ms: Quantiles::of(&mut lat, 1e-3),
                first_media_ms: Quantiles::of(&mut first, 1e-3),
            }
        };
        let mut tracks = Vec::new();
        let mut all = Vec::new();
        let mut tracks_sent: Vec<u32> = sent.keys().copied().collect();
        tracks_sent.sort_unstable();
        for t in tracks_sent {
            let rs = by_track.get(&t).map(Vec::as_slice).unwrap_or_default();
            let (name, kind) = track_name(opts, t);
            tracks.push(row(format!("{name}/{kind}"), kind, rs, sent[&t].0));
            all.extend(rs.iter().cloned());
        }
        let mut total = row(
            "total".into(),
            "all",
            &all,
            sent.values().map(|(n, _)| n).sum(),
        );
        total.subscribers = js.len();
        total.kbps_per_subscriber = tracks
            .iter()
            .filter(|t| t.subscribers > 0)
            .map(|t| t.kbps_per_subscriber * t.subscribers as f64)
            .sum::<f64>()
            / js.len().max(1) as f64;
        let joined = jp.len() + js.len();
        Report {
            url: opts.url.clone(),
            rooms: opts.rooms,
            publishers_per_room: opts.publishers,
            subscribers_per_room: opts.subscribers,
            video_kbps: opts.video_kbps,
            duration_s: opts.duration.as_secs_f64(),
            interrupted: false,
            clients: opts.rooms * (opts.publishers + opts.subscribers),
            joined_publishers: jp.len(),
            joined_subscribers: js.len(),
            failed: failures.values().map(|f| f.count).sum(),
            failures,
            join_ms_publishers: Quantiles::of(&mut jp, 1e-3),
            join_ms_subscribers: Quantiles::of(&mut js, 1e-3),
            joins_per_s: joined as f64 / join_phase.as_secs_f64().max(1e-9),
            srtp_profiles: profiles,
            keyframes_sent: keyframes,
            plis_received: plis,
            tracks,
            total,
            leave_failures,
            reconnects,
            leave_failure_example: leave_example,
            max_loss_pct: opts.max_loss_pct,
            max_gap_ms: opts.max_gap.as_secs_f64() * 1e3,
            over_limits,
        }
    }

    pub fn print(&self) {
        let ms = |q: &Option<f64>| q.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "load test of {}: {} room(s) x ({} publisher(s) + {} subscriber(s)), video {} kbit/s, {} s{}",
            self.url,
            self.rooms,
            self.publishers_per_room,
            self.subscribers_per_room,
            self.video_kbps,
            self.duration_s,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        println!(
            "joined {} publisher(s), {} subscriber(s) of {} clients; failed {}; {:.0} joins/s",
            self.joined_publishers,
            self.joined_subscribers,
            self.clients,
            self.failed,
            self.joins_per_s
        );
        println!(
            "join time (POST to SRTP keys) ms: publishers median {} p99 {}, subscribers median {} p99 {}",
            ms(&self.join_ms_publishers.median),
            ms(&self.join_ms_publishers.p99),
            ms(&self.join_ms_subscribers.median),
            ms(&self.join_ms_subscribers.p99)
        );
        let profiles: Vec<String> = self
            .srtp_profiles
            .iter()
            .map(|(p, n)| format!("{p} x{n}"))
            .collect();
        println!(
            "SRTP: {}; keyframes sent {} ({} asked for by PLI)",
            profiles.join(", "),
            self.keyframes_sent,
            self.plis_received
        );
        println!();
        println!(
            "{:<28} {:>5} {:>9} {:>10} {:>7} {:>7} {:>8} {:>10} {:>10} {:>10} {:>9}",
            "TRACK",
            "SUBS",
            "SENT",
            "RECEIVED",
            "LOSS%",
            "WORST%",
            "GAP ms",
            "KBIT/S/SUB",
            "LAT p50 ms",
            "LAT p99 ms",
            "FIRST ms"
        );
        for t in self.tracks.iter().chain(std::iter::once(&self.total)) {
            println!(
                "{:<28} {:>5} {:>9} {:>10} {:>7.2} {:>7.2} {:>8.0} {:>10.0} {:>10} {:>10} {:>9}",
                t.track,
                t.subscribers,
                t.sent,
                t.received,
                t.loss_pct,
                t.worst_loss_pct,
                t.longest_gap_ms,
                t.kbps_per_subscriber,
                ms(&t.latency_ms.median),
                ms(&t.latency_ms.p99),
                ms(&t.first_media_ms.max)
            );
        }
        if !self.over_limits.is_empty() {
            println!();
            println!(
                "over the limits (--max-loss {} %, --max-gap {} s):",
                self.max_loss_pct,
                self.max_gap_ms / 1e3
            );
            for o in &self.over_limits {
                println!("  {o}");
            }
        }
        if !self.failures.is_empty() {
            println!();
            println!("failures by reason:");
            for (why, f) in &self.failures {
                println!("  {why:<14} {:>5}  e.g. {}", f.count, f.example);
            }
        }
        if self.reconnects > 0 {
            println!(
                "{} reconnect(s): subscribers whose node stopped sending joined another",
                self.reconnects
            );
        }
        if self.leave_failures > 0 {
            println!(
                "{} DELETE(s) failed (e.g. {}): those sessions end at the SFU's consent timeout",
                self.leave_failures,
                self.leave_failure_example.as_deref().unwrap_or("-")
            );
        }
    }
}
