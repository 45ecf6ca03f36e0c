//! `edgefwd load-test`: many WHIP publishers and WHEP subscribers against a running
//! SFU, every one doing real ICE, DTLS and SRTP (the project's own crates on the client
//! side) and decoding nothing, so one core drives hundreds. Publishers send synthetic
//! video and Opus-sized audio stamped with a sequence and the send time; subscribers
//! measure latency and gaps from the stamps, and loss against what their publishers
//! sent (the same process), so a lost tail counts; `--max-loss` and `--max-gap` fail
//! the run. Bounded by `--duration`; every session is DELETEd at the end or on Ctrl-C.

mod client;
pub mod peer;
mod report;
mod tcp;
pub mod traffic;

use client::Client;
pub use report::{FailureRow, Quantiles, Report, TrackRow};

use std::{
    collections::{BTreeMap, HashMap},
    io::IsTerminal as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
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
    /// Where subscribers join, when not at `url` (another node of a cascade).
    pub subscribe_url: Option<String>,
    /// Subscribers choose their node through `/v1/edges` (at `subscribe_url`, else
    /// `url`): candidates probed, the fastest joined.
    pub edges: bool,
    /// Publishers live through their node's loss: after a second of silence they
    /// publish again at `url` (where the cluster re-homes the room).
    pub failover: bool,
    /// Clients connect over ICE-TCP instead of UDP.
    pub tcp: bool,
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
    /// Subscriber: new sessions it made after its node stopped sending (`--edges`).
    reconnects: u32,
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
            reconnects: 0,
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
        edges: false,
        failover: opts.failover,
        tcp: opts.tcp,
    });
    let sub_target = Arc::new(Target {
        http: match &opts.subscribe_url {
            Some(u) => crate::cli::rooms::parse_api(u).context("--subscribe-url")?,
            None => http,
        },
        token: opts.token.clone(),
        edges: opts.edges,
        failover: opts.failover,
        tcp: opts.tcp,
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
                quiet: !opts.progress,
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
                quiet: !opts.progress,
                target: sub_target.clone(),
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

/// A copy of plain RTP packet `plain` to publisher session `old` (one told to move,
/// still sending until its node lets go), as its stream `which` (0 audio, 1 video):
/// its SSRC, its keys; the numbering is the stream's own, so it continues on both.
async fn send_copy(old: &mut peer::Joined, which: usize, plain: &[u8], overhead: usize) {
    let mut b = plain.to_vec();
    b[8..12].copy_from_slice(&old.ssrcs[which].to_be_bytes());
    b.resize(plain.len() + overhead, 0);
    if let Ok(n) = old.tx.protect_rtp(&mut b, plain.len()) {
        let _ = old.sock.send(&b[..n]).await;
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
