//! `edgefwd load-test`: many WHIP publishers and WHEP subscribers against a running
//! SFU, every one doing real ICE, DTLS and SRTP (the project's own crates on the client
//! side) and decoding nothing, so one core drives hundreds. Publishers send synthetic
//! video and Opus-sized audio stamped with a sequence and the send time; subscribers
//! measure loss and latency from the stamps. Bounded by `--duration`; every session is
//! DELETEd at the end or on Ctrl-C.

pub mod peer;
pub mod traffic;

use std::{
    collections::{BTreeMap, HashMap},
    io::IsTerminal as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use forwarder_common::rtp::{Class, classify, header_len};
use peer::{Failure, Joined, Role, Target};
use traffic::{Audio, Received, Stamp, Stream, Talk, Video, quantile};

use crate::{media::rtcp, webrtc::dtls::Identity};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub url: String,
    pub token: Option<String>,
    pub rooms: usize,
    /// Per room.
    pub publishers: usize,
    /// Per room.
    pub subscribers: usize,
    pub video_kbps: u32,
    /// Media time once everyone has joined.
    pub duration: Duration,
    /// Joins in flight at once.
    pub concurrency: usize,
    /// How long one join (POST, ICE, DTLS) may take.
    pub join_timeout: Duration,
    /// Rooms are PREFIX-0, PREFIX-1, ...
    pub room_prefix: String,
    /// Print a progress line every second (to stderr).
    pub progress: bool,
    /// Publishers of a room take turns to talk, this long each (their audio level
    /// extension says voice in their turn, silence otherwise); None: all silent.
    pub talk: Option<Duration>,
    /// A subscriber that lost more than this of a track (per cent of what its
    /// publisher sent from the subscriber's first packet on) fails the run.
    pub max_loss_pct: f64,
    /// A subscriber that went longer than this without a packet of a track (join to
    /// first packet, between two, last to the publisher's last) fails the run.
    pub max_gap: Duration,
}

impl Options {
    pub fn check(&self) -> Result<()> {
        if self.rooms == 0 || self.publishers == 0 {
            bail!(
                "--rooms and --publishers must be at least 1: subscribers need something to watch"
            );
        }
        if self.video_kbps < 10 {
            bail!(
                "--video-bitrate {} kbit/s is below what one frame's stamp takes; give at least 10",
                self.video_kbps
            );
        }
        if self.concurrency == 0 {
            bail!("--concurrency 0 would never join anyone; give at least 1");
        }
        if self.duration.is_zero() {
            bail!("--duration 0 measures nothing; give seconds, e.g. --duration 10");
        }
        if !(0.0..=100.0).contains(&self.max_loss_pct) {
            bail!(
                "--max-loss {} is not a percentage; give 0 to 100 (e.g. --max-loss 0.5)",
                self.max_loss_pct
            );
        }
        if self.max_gap.is_zero() {
            bail!("--max-gap 0 fails every run; give seconds, e.g. --max-gap 1");
        }
        if self.talk.is_some_and(|t| t < Duration::from_millis(100)) {
            bail!(
                "--talk turns under 0.1 s are shorter than a speaker decision; give e.g. --talk 2"
            );
        }
        Ok(())
    }
}

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

/// Counters every client adds to, for the live progress line.
#[derive(Default)]
struct Live {
    joined_publishers: AtomicU64,
    joined_subscribers: AtomicU64,
    failed: AtomicU64,
    sent_bytes: AtomicU64,
    received_bytes: AtomicU64,
    received: AtomicU64,
    expected: AtomicU64,
    dtls_conns: Arc<AtomicU64>,
}

/// What one client came to.
struct Outcome {
    role: Role,
    room: usize,
    join: Result<Duration, Failure>,
    profile: Option<&'static str>,
    /// Publisher: its two streams' (track number, packets sent, when the last was).
    sent: Vec<(u32, u64, u64)>,
    /// Subscriber: when its join completed (run clock).
    joined_ns: u64,
    keyframes: u64,
    plis: u64,
    /// Subscriber: by track number.
    received: HashMap<u32, Received>,
    /// Subscriber: tracks its answer gave it.
    given: usize,
    left: Result<(), String>,
}

impl Outcome {
    fn failed(role: Role, room: usize, f: Failure) -> Outcome {
        Outcome {
            role,
            room,
            join: Err(f),
            profile: None,
            sent: vec![],
            joined_ns: 0,
            keyframes: 0,
            plis: 0,
            received: HashMap::new(),
            given: 0,
            left: Ok(()),
        }
    }
}

/// Track numbers: publisher `p` (global) has audio 2p and video 2p+1.
fn track_name(opts: &Options, track: u32) -> (String, &'static str) {
    let p = track as usize / 2;
    let (room, i) = (p / opts.publishers, p % opts.publishers);
    (
        format!("{}-{room}/pub-{i}", opts.room_prefix),
        if track.is_multiple_of(2) {
            "audio"
        } else {
            "video"
        },
    )
}

/// Runs a whole load test; returns its report (also when clients failed).
pub async fn run(opts: Options) -> Result<Report> {
    opts.check()?;
    let http = crate::cli::rooms::parse_api(&opts.url)?;
    let target = Arc::new(Target {
        http,
        token: opts.token.clone(),
    });
    let identity = Arc::new(Identity::generate()?);
    let live = Arc::new(Live::default());
    let epoch = Instant::now();
    let gate = Arc::new(Semaphore::new(opts.concurrency));
    let (stop_pub, stop_pub_rx) = watch::channel(false);
    let (stop_sub, stop_sub_rx) = watch::channel(false);
    let total = opts.rooms * (opts.publishers + opts.subscribers);

    let progress = opts.progress.then(|| {
        let (live, opts) = (live.clone(), opts.clone());
        tokio::spawn(progress_lines(live, opts, total))
    });
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ctrl_c = {
        let (stop_pub, interrupted) = (stop_pub.clone(), interrupted.clone());
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("edgefwd load-test: interrupted; ending the sessions");
                interrupted.store(true, Ordering::Relaxed);
                stop_pub.send_replace(true);
            }
        })
    };

    // Publishers first: a WHEP subscriber gets the tracks published when it joins.
    let started = Instant::now();
    let mut clients = Vec::new();
    let mut joined_rx = Vec::new();
    for room in 0..opts.rooms {
        for i in 0..opts.publishers {
            let (tx, rx) = tokio::sync::oneshot::channel();
            joined_rx.push((room, rx));
            let track = ((room * opts.publishers + i) * 2) as u32;
            let c = Client {
                target: target.clone(),
                identity: identity.clone(),
                live: live.clone(),
                epoch,
                room,
                room_name: format!("{}-{room}", opts.room_prefix),
                timeout: opts.join_timeout,
            };
            let (gate, stop, kbps) = (gate.clone(), stop_pub_rx.clone(), opts.video_kbps);
            let talk = opts.talk.map(|turn| Talk {
                turn,
                index: i,
                of: opts.publishers,
            });
            clients.push(tokio::spawn(async move {
                c.publisher(gate, track, kbps, talk, stop, tx).await
            }));
        }
    }
    let mut sources = vec![0usize; opts.rooms];
    for (room, rx) in joined_rx {
        if let Ok(true) = rx.await {
            sources[room] += 1;
        }
    }
    for (room, &sources) in sources.iter().enumerate() {
        for _ in 0..opts.subscribers {
            let c = Client {
                target: target.clone(),
                identity: identity.clone(),
                live: live.clone(),
                epoch,
                room,
                room_name: format!("{}-{room}", opts.room_prefix),
                timeout: opts.join_timeout,
            };
            let (gate, stop) = (gate.clone(), stop_sub_rx.clone());
            clients.push(tokio::spawn(async move {
                c.subscriber(gate, sources, stop).await
            }));
        }
    }
    // Every client has joined or failed.
    while (live.joined_publishers.load(Ordering::Relaxed)
        + live.joined_subscribers.load(Ordering::Relaxed)
        + live.failed.load(Ordering::Relaxed))
        < total as u64
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let join_phase = started.elapsed();

    let mut stopped = stop_pub.subscribe();
    tokio::select! {
        _ = tokio::time::sleep(opts.duration) => {}
        _ = stopped.wait_for(|s| *s) => {}
    }
    stop_pub.send_replace(true);
    // What is in flight still arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_sub.send_replace(true);
    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.push(c.await?);
    }
    ctrl_c.abort();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let mut r = Report::build(&opts, outcomes, join_phase);
    r.interrupted = interrupted.load(Ordering::Relaxed);
    Ok(r)
}

/// One line per second: joined, failed, bitrate, loss (a bar while joining/running).
async fn progress_lines(live: Arc<Live>, opts: Options, total: usize) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = (0u64, 0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let l = &live;
        let now = (
            l.sent_bytes.load(Ordering::Relaxed),
            l.received_bytes.load(Ordering::Relaxed),
            l.received.load(Ordering::Relaxed),
            l.expected.load(Ordering::Relaxed),
        );
        let (sent, rcvd, got, exp) = (
            now.0 - last.0,
            now.1 - last.1,
            now.2 - last.2,
            now.3 - last.3,
        );
        last = now;
        let loss = if exp > 0 {
            100.0 * exp.saturating_sub(got) as f64 / exp as f64
        } else {
            0.0
        };
        let joined = l.joined_publishers.load(Ordering::Relaxed)
            + l.joined_subscribers.load(Ordering::Relaxed);
        let failed = l.failed.load(Ordering::Relaxed);
        let done = (joined + failed) as usize;
        let width = 20;
        let filled = (done * width / total.max(1)).min(width);
        let line = format!(
            "[{}{}] {:>4.0} s  joined {joined}/{total}  failed {failed}  sent {:.1} Mbit/s  received {:.1} Mbit/s  loss {loss:.2} %  (target {} s of media)",
            "#".repeat(filled),
            "-".repeat(width - filled),
            start.elapsed().as_secs_f64(),
            sent as f64 * 8.0 / 1e6,
            rcvd as f64 * 8.0 / 1e6,
            opts.duration.as_secs(),
        );
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

struct Client {
    target: Arc<Target>,
    identity: Arc<Identity>,
    live: Arc<Live>,
    epoch: Instant,
    room: usize,
    room_name: String,
    timeout: Duration,
}

/// Consent freshness (RFC 7675): a check every couple of seconds.
const CONSENT_INTERVAL: Duration = Duration::from_secs(2);

impl Client {
    async fn join(&self, gate: &Semaphore, role: Role, sources: usize) -> Result<Joined, Failure> {
        let _permit = gate.acquire().await.expect("the gate is never closed");
        let r = peer::join(
            &self.target,
            role,
            &self.room_name,
            sources,
            &self.identity,
            self.timeout,
            self.live.dtls_conns.clone(),
        )
        .await;
        let counter = match (&r, role) {
            (Err(_), _) => &self.live.failed,
            (Ok(_), Role::Publisher) => &self.live.joined_publishers,
            (Ok(_), Role::Subscriber) => &self.live.joined_subscribers,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// DELETE through the same gate as the joins: the SFU caps HTTP connections per
    /// source, and a whole run leaving at once would exceed it.
    /// The server frees a connection's slot only once it sees the close, so a burst of
    /// DELETEs on fresh connections can still meet the per-source cap (a 503, or the
    /// connection closed before the answer is read): retried, as a well-behaved client
    /// would, until the server's idle timeout has freed the slots; a 4xx is final.
    async fn leave(&self, gate: &Semaphore, resource: &str) -> Result<(), String> {
        let _permit = gate.acquire().await.expect("the gate is never closed");
        // Up to the server's own idle-connection timeout (10 s by default), by when
        // any connection still counted against us has been closed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
        loop {
            match peer::leave(&self.target, resource).await {
                // A 4xx is an answer (e.g. already gone); a 503 or a connection the
                // server closed at its cap before answering ("canceled") is not.
                Err(e) if !is_4xx(&e) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                r => return r,
            }
        }
    }

    /// Leaves (DELETE) and closes DTLS; what the outcome keeps of the session.
    async fn finish(
        &self,
        gate: &Semaphore,
        j: Joined,
    ) -> (
        Result<Duration, Failure>,
        Option<&'static str>,
        Result<(), String>,
    ) {
        let left = self.leave(gate, &j.resource).await;
        let _ = j.dtls.close().await;
        (Ok(j.join_time), Some(j.profile.name()), left)
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    async fn publisher(
        self,
        gate: Arc<Semaphore>,
        track: u32,
        kbps: u32,
        talk: Option<Talk>,
        mut stop: watch::Receiver<bool>,
        joined: tokio::sync::oneshot::Sender<bool>,
    ) -> Outcome {
        let mut j = match self.join(&gate, Role::Publisher, 1).await {
            Ok(j) => j,
            Err(f) => {
                let _ = joined.send(false);
                return Outcome::failed(Role::Publisher, self.room, f);
            }
        };
        let _ = joined.send(true);
        let mut audio = Audio {
            stream: Stream::new(j.ssrcs[0], peer::OPUS_PT, track),
            talk,
        };
        let mut video = Video::new(Stream::new(j.ssrcs[1], peer::VP8_PT, track + 1), kbps);
        let overhead = j.profile.rtp_overhead();
        let mut out = vec![0u8; traffic::MAX_PAYLOAD * 2 + 64];
        let mut buf = vec![0u8; 2048];
        let (mut next_audio, mut next_video) =
            (tokio::time::Instant::now(), tokio::time::Instant::now());
        let mut next_consent = tokio::time::Instant::now() + CONSENT_INTERVAL;
        let mut plis = 0;
        let live = self.live.clone();
        loop {
            let due = next_audio.min(next_video).min(next_consent);
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(due) => {
                    let now = tokio::time::Instant::now();
                    let now_ns = self.now_ns();
                    if now >= next_audio {
                        let n = audio.next(&mut out, now_ns);
                        send_srtp(&j.sock, &mut j.tx, &mut out, n, overhead, &live).await;
                        next_audio += traffic::AUDIO_INTERVAL;
                    }
                    if now >= next_video {
                        let mut frame = Vec::new();
                        video.next_frame(&mut out, now_ns, |b, len| frame.push(b[..len].to_vec()));
                        for mut p in frame {
                            let n = p.len();
                            p.resize(n + overhead, 0);
                            send_srtp(&j.sock, &mut j.tx, &mut p, n, overhead, &live).await;
                        }
                        next_video += Video::frame_interval();
                    }
                    if now >= next_consent {
                        let _ = j.sock.send(&crate::webrtc::ice::binding_request(&j.ice_user, &j.ice_pwd, false)).await;
                        next_consent += CONSENT_INTERVAL;
                    }
                    // Behind by more than a frame (an overloaded machine): skip, don't burst.
                    let late = now.checked_duration_since(next_video).unwrap_or_default();
                    if late > Video::frame_interval() {
                        next_video = now + Video::frame_interval();
                        next_audio = now + traffic::AUDIO_INTERVAL;
                    }
                }
                r = j.sock.recv(&mut buf) => if let Ok(n) = r {
                    match classify_datagram(&buf[..n]) {
                        Class::Rtcp => if let Ok(len) = j.rx.unprotect_rtcp(&mut buf[..n]) {
                            for req in rtcp::parse(&buf[..len]).unwrap_or_default() {
                                if matches!(req, rtcp::Request::KeyFrame { .. }) {
                                    video.key_requested = true;
                                    plis += 1;
                                }
                            }
                        },
                        Class::Dtls => { let _ = j.dtls_in.try_send(buf[..n].to_vec()); }
                        _ => {}
                    }
                },
            }
        }
        let (join, profile, left) = self.finish(&gate, j).await;
        Outcome {
            role: Role::Publisher,
            room: self.room,
            join,
            profile,
            sent: [&audio.stream, &video.stream]
                .map(|s| (s.track, s.packets, s.last_ns))
                .to_vec(),
            joined_ns: 0,
            keyframes: video.keyframes,
            plis,
            received: HashMap::new(),
            given: 0,
            left,
        }
    }

    async fn subscriber(
        self,
        gate: Arc<Semaphore>,
        sources: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Outcome {
        if sources == 0 {
            self.live.failed.fetch_add(1, Ordering::Relaxed);
            return Outcome::failed(
                Role::Subscriber,
                self.room,
                Failure {
                    stage: "no_publisher",
                    detail: format!("no publisher of room {} joined", self.room_name),
                },
            );
        }
        let mut j = match self.join(&gate, Role::Subscriber, sources).await {
            Ok(j) => j,
            Err(f) => return Outcome::failed(Role::Subscriber, self.room, f),
        };
        let joined_ns = self.now_ns();
        let mut received: HashMap<u32, Received> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        let mut consent = tokio::time::interval(CONSENT_INTERVAL);
        let live = self.live.clone();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = consent.tick() => {
                    let _ = j.sock.send(&crate::webrtc::ice::binding_request(&j.ice_user, &j.ice_pwd, false)).await;
                }
                r = j.sock.recv(&mut buf) => if let Ok(n) = r {
                    match classify_datagram(&buf[..n]) {
                        Class::Rtp => if let Ok(len) = j.rx.unprotect_rtp(&mut buf[..n]) {
                            let rtp = &buf[..len];
                            let Ok(h) = header_len(rtp) else { continue };
                            if let Some(s) = Stamp::read(&rtp[h..]) {
                                let payload = len - h;
                                let grew = received.entry(s.track).or_default().on_packet(s, payload, self.now_ns());
                                live.received.fetch_add(1, Ordering::Relaxed);
                                live.expected.fetch_add(grew, Ordering::Relaxed);
                                live.received_bytes.fetch_add(payload as u64, Ordering::Relaxed);
                            }
                        },
                        Class::Dtls => { let _ = j.dtls_in.try_send(buf[..n].to_vec()); }
                        _ => {}
                    }
                },
            }
        }
        let (join, profile, left) = self.finish(&gate, j).await;
        Outcome {
            role: Role::Subscriber,
            room: self.room,
            join,
            profile,
            sent: vec![],
            joined_ns,
            keyframes: 0,
            plis: 0,
            received,
            given: 2 * sources,
            left,
        }
    }
}

fn classify_datagram(d: &[u8]) -> Class {
    match d {
        [b0, b1, ..] => classify(*b0, *b1),
        _ => Class::Unknown,
    }
}

async fn send_srtp(
    sock: &tokio::net::UdpSocket,
    ctx: &mut crate::media::srtp::Context,
    buf: &mut [u8],
    len: usize,
    overhead: usize,
    live: &Live,
) {
    if let Ok(n) = ctx.protect_rtp(&mut buf[..len + overhead], len) {
        // A refused send (ENOBUFS) is loss on the wire, which the receivers measure.
        if sock.send(&buf[..n]).await.is_ok() {
            live.sent_bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
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
    pub leave_failure_example: Option<String>,
    /// The limits every subscriber's every track was held to.
    pub max_loss_pct: f64,
    pub max_gap_ms: f64,
    /// Each subscriber's track over a limit: the run fails.
    pub over_limits: Vec<String>,
}

impl Report {
    fn build(opts: &Options, outcomes: Vec<Outcome>, join_phase: Duration) -> Report {
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
        let (mut keyframes, mut plis, mut leave_failures) = (0, 0, 0);
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
        if self.leave_failures > 0 {
            println!(
                "{} DELETE(s) failed (e.g. {}): those sessions end at the SFU's consent timeout",
                self.leave_failures,
                self.leave_failure_example.as_deref().unwrap_or("-")
            );
        }
    }
}

/// Whether a `peer::leave` error is the server's 4xx answer ("DELETE /x: 404: ...").
fn is_4xx(e: &str) -> bool {
    e.split(": ").nth(1).is_some_and(|c| {
        c.len() == 3 && c.starts_with('4') && c.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_4xx_answer_ends_the_delete_retries() {
        assert!(super::is_4xx("DELETE /whep/r/x: 404: no such session"));
        assert!(!super::is_4xx(
            "DELETE /whep/r/x: 503: your address has as many"
        ));
        assert!(!super::is_4xx(
            "DELETE /whep/r/x: request: operation was canceled"
        ));
        assert!(!super::is_4xx("DELETE /whep/r/x: 4xx"));
    }
}
