//! `cargo xtask bench srtp`: what one core of the WebRTC worker does per subscriber
//! copy, in the same run:
//!
//! 1. SRTP protect alone, 1,200 B: ours (aws-lc-rs, in place) against webrtc-srtp, both
//!    profiles.
//! 2. The media engine fanning one publisher's stream out to N = 1, 10, 100, 1,000
//!    subscribers (each its own keys, SSRC, offsets), unprotect once + rewrite +
//!    protect per copy, written to the AF_XDP TX ring or sent with one `sendto` per
//!    copy (the socket path), GCM and AES-CM, onto a veth whose other end counts and
//!    drops them. The worker is pinned to one core.
//!
//! 3. Layer selection: the same VP8 stream as one plain encoding and as three
//!    simulcast encodings (subscriber i capped to layer i % 3, so each packet goes to a
//!    third of them and the selector runs for all), AF_XDP, GCM, N = 100 and 1,000.
//!
//! 4. The hand-off between workers: the same fan-out (AF_XDP, GCM) with every incoming
//!    packet received by a worker on the other core and handed to this one through
//!    its inbox (`datapath::handoff`, as when the NIC put the room's flow on another
//!    worker's queue), against direct. Timed on the owner: taking the packet and the
//!    fan-out; on the giver: the copy into the inbox.
//!
//! Timed is the engine call and the flush of its copies, per incoming packet; making
//! the publisher's packets (encryption at the sender) is outside the timed region.
//! Copies are the engine's own count of copies sent.
//! Results: table on stdout, bench/results/srtp.{csv,json,png} and srtp-layers.json.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use edgefwd::{
    datapath::{
        handoff::Inbox,
        socket::SocketTx,
        xsk::{XskQueue, pin_to_cpu},
    },
    media::{
        Counters, Kind, Transmit,
        codec::Format,
        engine::{Command, Engine, Role},
        srtp::{Context, MasterKey, Profile},
    },
};
use edgefwd_tests::{netns::NetNs, pkt::Rtp};

const WORKER_CPU: usize = 1;
const PAYLOAD: usize = 1200;
const FANOUTS: [usize; 4] = [1, 10, 100, 1000];
/// Incoming packets per worker batch (one flush per batch), as `datapath::xsk::BATCH`.
const RX_BATCH: u16 = 64;
const W_ADDR: &str = "192.0.2.1";
const S_ADDR: &str = "192.0.2.2";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
enum Path {
    AfXdp,
    Socket,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    path: Path,
    profile: &'static str,
    subscribers: usize,
    copies: u64,
    delivered: u64,
    ns_per_copy: f64,
    copies_per_sec: f64,
    seconds: f64,
}

#[derive(Debug, serde::Serialize)]
struct CryptoRow {
    implementation: &'static str,
    profile: &'static str,
    ns_per_packet: f64,
}

fn key(profile: Profile, b: u8) -> MasterKey {
    MasterKey::new(
        profile,
        &[b; 16],
        &vec![b ^ 0x3c; profile.master_salt_len()],
    )
    .unwrap()
}

/// A 1,200-byte RTP packet (the tests' own packet builder).
fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    Rtp::new(ssrc, seq, seq as u32 * 3000, PAYLOAD - 12).bytes()
}

/// What the publisher's video track is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
enum Shape {
    /// Payloads the engine cannot see into: any packet starts a viewer.
    Opaque,
    /// VP8 in this many encodings (1: a plain track), each packet with a VP8
    /// descriptor, each encoding's first packet a keyframe.
    Vp8(u8),
}

const SSRC: u32 = 0xaaaa;

/// Packet `k` of the publisher's stream: (its encoding's SSRC, the packet).
fn source_packet(shape: Shape, k: u32) -> (u32, Vec<u8>) {
    let layers = match shape {
        Shape::Opaque => return (SSRC, rtp(k as u16, SSRC)),
        Shape::Vp8(l) => l as u32,
    };
    let (layer, seq) = (k % layers, (k / layers) as u16);
    let ssrc = SSRC + layer;
    let mut p = rtp(seq, ssrc);
    // X, S, partition 0; I with a 15-bit picture id; the payload header's P bit.
    let pic = seq & 0x7fff;
    let key = if seq == 0 { 0x10 } else { 0x11 };
    p[12..17].copy_from_slice(&[0x90, 0x80, 0x80 | (pic >> 8) as u8, pic as u8, key]);
    (ssrc, p)
}

/// ns per protect of a 1,200-byte RTP packet, over `seconds`.
fn crypto(seconds: f64) -> Vec<CryptoRow> {
    use webrtc_srtp::{context::Context as Reference, protection_profile::ProtectionProfile};
    let mut out = Vec::new();
    for profile in Profile::ALL {
        let m = key(profile, 7);
        let mut ours = Context::new(&m);
        let mut buf = vec![0u8; PAYLOAD + 16];
        let plain = rtp(0, 5);
        let (mut n, start) = (0u64, Instant::now());
        while start.elapsed().as_secs_f64() < seconds {
            for _ in 0..1000 {
                // A copy as the fan-out makes it: plaintext into the frame, then protect.
                buf[..PAYLOAD].copy_from_slice(&plain);
                buf[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                std::hint::black_box(ours.protect_rtp(&mut buf, PAYLOAD).unwrap());
                n += 1;
            }
        }
        let ours_ns = start.elapsed().as_nanos() as f64 / n as f64;
        let p = match profile {
            Profile::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
            Profile::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        };
        let mut theirs = Reference::new(m.key(), m.salt(), p, None, None).unwrap();
        let (mut k, start) = (0u64, Instant::now());
        let mut pkt = rtp(0, 5);
        while start.elapsed().as_secs_f64() < seconds {
            for _ in 0..1000 {
                pkt[2..4].copy_from_slice(&(k as u16).to_be_bytes());
                std::hint::black_box(theirs.encrypt_rtp(&pkt).unwrap());
                k += 1;
            }
        }
        let theirs_ns = start.elapsed().as_nanos() as f64 / k as f64;
        out.push(CryptoRow {
            implementation: "edgefwd media::srtp (aws-lc-rs)",
            profile: profile.name(),
            ns_per_packet: ours_ns,
        });
        out.push(CryptoRow {
            implementation: "webrtc-srtp 0.15",
            profile: profile.name(),
            ns_per_packet: theirs_ns,
        });
    }
    out
}

/// The worker's namespace, its veth `d0` (192.0.2.1/24) and the subscribers' end `s0`
/// (192.0.2.2, one port each) in the same namespace, where an nftables ingress rule
/// drops every frame. What s0 received is what the worker put on the wire. The drop
/// runs in the softirq of the sending core, so it is in the worker's time, alike for
/// both paths: a receiver on the other core (threaded NAPI, XDP) caps near 0.3 M
/// packets/s on this 2-core machine, below the worker.
struct Rig {
    ns: NetNs,
}

fn rig() -> Rig {
    let ns = NetNs::new("srtpw");
    ip(
        &ns,
        &[
            "ip", "link", "add", "d0", "type", "veth", "peer", "name", "s0",
        ],
    );
    ip(
        &ns,
        &["ip", "addr", "add", &format!("{W_ADDR}/24"), "dev", "d0"],
    );
    ip(&ns, &["ip", "link", "set", "d0", "up"]);
    ip(&ns, &["ip", "link", "set", "s0", "up"]);
    ip(
        &ns,
        &[
            "nft",
            "add table netdev sink; add chain netdev sink in { type filter hook ingress device s0 priority 0; policy drop; }",
        ],
    );
    // s0 answers no ARP behind the drop: the neighbour is set by hand.
    ip(
        &ns,
        &[
            "ip",
            "neigh",
            "replace",
            S_ADDR,
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "d0",
            "nud",
            "permanent",
        ],
    );
    Rig { ns }
}

fn ip(ns: &NetNs, args: &[&str]) {
    let o = ns.exec(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Frames s0 has received from the worker.
fn sink_count(r: &Rig) -> u64 {
    let o = r.ns.exec(&["ip", "-s", "-j", "link", "show", "s0"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ip -s -j link");
    j[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

/// An engine with one publisher (1 video track) and `n` subscribers on `profile`.
/// Returns it and the publisher's sending context.
fn engine(n: usize, profile: Profile, shape: Shape) -> (Engine, Context, SocketAddr) {
    let now = Instant::now();
    let mut e = Engine::new("bench".into(), Arc::new(Counters::default()), now);
    struct Null;
    impl Transmit for Null {
        fn transmit(
            &mut self,
            _: SocketAddr,
            _: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
        ) -> bool {
            true
        }
    }
    let publisher: SocketAddr = format!("{S_ADDR}:5000").parse().unwrap();
    let cmds = |e: &mut Engine, c: Command| e.apply(c, now, &mut Null);
    cmds(
        &mut e,
        Command::AddSession {
            id: 1,
            role: Role::Publisher,
            rtcp_ssrc: 1,
        },
    );
    cmds(
        &mut e,
        Command::Bind {
            id: 1,
            addr: publisher,
            nominated: true,
        },
    );
    cmds(
        &mut e,
        Command::SetKeys {
            id: 1,
            rx: key(profile, 1),
            tx: key(profile, 2),
            reserve: None,
        },
    );
    cmds(
        &mut e,
        Command::AddTrack {
            id: 1,
            session: 1,
            kind: Kind::Video,
            pt: 96,
            clock_rate: 90_000,
            format: match shape {
                Shape::Opaque => Format::Other,
                Shape::Vp8(_) => Format::Vp8,
            },
            streams: match shape {
                Shape::Opaque => vec![(None, Some(SSRC))],
                Shape::Vp8(l) => (0..l as u32).map(|i| (None, Some(SSRC + i))).collect(),
            },
            rid_ext: None,
            twcc_ext: None,
            level_ext: None,
            dd_ext: None,
        },
    );
    for i in 0..n as u32 {
        let id = 100 + i;
        cmds(
            &mut e,
            Command::AddSession {
                id,
                role: Role::Subscriber,
                rtcp_ssrc: id,
            },
        );
        cmds(
            &mut e,
            Command::AddDownTrack {
                track: 1,
                sub: id,
                ssrc_out: 0x1000 + i,
                pt_out: 100,
                rtx: None,
                remb: false,
                dd_ext: None,
                twcc_ext: None,
                seq_delta: i as u16,
                ts_delta: i,
                resume: None,
            },
        );
        let addr: SocketAddr = format!("{S_ADDR}:{}", 10_000 + i).parse().unwrap();
        cmds(
            &mut e,
            Command::Bind {
                id,
                addr,
                nominated: true,
            },
        );
        cmds(
            &mut e,
            Command::SetKeys {
                id,
                rx: key(profile, 3),
                tx: key(profile, 4 + (i % 200) as u8),
                reserve: None,
            },
        );
        if let Shape::Vp8(l) = shape {
            cmds(
                &mut e,
                Command::SetLayers {
                    sub: id,
                    track: 1,
                    max_layer: (i % l as u32) as u8,
                    max_temporal: edgefwd::media::simulcast::UNCAPPED,
                    paused: false,
                },
            );
        }
    }
    (e, Context::new(&key(profile, 1)), publisher)
}

/// Fans `seconds` worth of the publisher's stream out through `tx`, timing only the
/// engine and the flush. Returns (copies sent, timed ns).
#[allow(clippy::too_many_arguments)]
fn drive<T: Transmit>(
    e: &mut Engine,
    src: &mut Context,
    from: SocketAddr,
    shape: Shape,
    seconds: f64,
    tx: &mut T,
    flush: impl Fn(&mut T),
) -> (u64, u64) {
    let mut timed = 0u64;
    let mut k = 0u32;
    let sent = |e: &Engine| {
        e.counters()
            .rtp_out
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = sent(e);
    let wall = Instant::now();
    let mut pkt = vec![0u8; PAYLOAD + 16];
    while wall.elapsed().as_secs_f64() < seconds {
        pkt.resize(PAYLOAD + 16, 0);
        pkt[..PAYLOAD].copy_from_slice(&source_packet(shape, k).1);
        let len = src.protect_rtp(&mut pkt, PAYLOAD).unwrap();
        pkt.truncate(len);
        k += 1;
        let t = Instant::now();
        e.handle_srtp(from, &mut pkt, t, tx);
        // A worker flushes once per receive batch; at saturation batches are full.
        if k.is_multiple_of(RX_BATCH as u32) {
            flush(tx);
        }
        timed += t.elapsed().as_nanos() as u64;
    }
    (sent(e) - before, timed)
}

fn fanout(v: &Rig, path: Path, profile: Profile, n: usize, seconds: f64) -> Row {
    fanout_of(v, path, profile, n, Shape::Opaque, seconds)
}

fn fanout_of(v: &Rig, path: Path, profile: Profile, n: usize, shape: Shape, seconds: f64) -> Row {
    let before = sink_count(v);
    let (copies, ns) = v.ns.run(move || {
        pin_to_cpu(WORKER_CPU);
        let (mut e, mut src, from) = engine(n, profile, shape);
        let local: SocketAddr = format!("{W_ADDR}:4000").parse().unwrap();
        match path {
            Path::AfXdp => {
                let ifindex = edgefwd::dataplane::preflight::ifindex("d0").unwrap();
                let mut q =
                    XskQueue::open(ifindex, 0, local, [2, 0, 0, 0, 0, 1]).expect("AF_XDP on d0");
                q.set_neighbour(S_ADDR.parse().unwrap(), [2, 0, 0, 0, 0, 2]);
                let r = drive(&mut e, &mut src, from, shape, seconds, &mut q, |q| {
                    q.flush()
                });
                // Let the last frames complete before the queue goes.
                std::thread::sleep(Duration::from_millis(50));
                q.flush();
                r
            }
            Path::Socket => {
                let sock = std::net::UdpSocket::bind(local).unwrap();
                // Large enough that the socket path is limited by its syscalls, not a full buffer.
                let mut buf = vec![0u8; 2048];
                let mut tx = SocketTx {
                    sock: &sock,
                    buf: &mut buf,
                };
                drive(&mut e, &mut src, from, shape, seconds, &mut tx, |_| {})
            }
        }
    });
    Row::measured(v, before, (path, profile, n), copies, ns, seconds)
}

impl Row {
    /// A case's row: `copies` the engine sent in `ns` timed, and what the sink got
    /// since it counted `before` (once the last frames are through).
    fn measured(
        v: &Rig,
        before: u64,
        (path, profile, n): (Path, Profile, usize),
        copies: u64,
        ns: u64,
        seconds: f64,
    ) -> Row {
        std::thread::sleep(Duration::from_millis(100));
        let delivered = sink_count(v) - before;
        let ns_per_copy = ns as f64 / copies as f64;
        Row {
            path,
            profile: profile.name(),
            subscribers: n,
            copies,
            delivered,
            ns_per_copy,
            copies_per_sec: 1e9 / ns_per_copy,
            seconds,
        }
    }
}

fn main() {
    let mut seconds: f64 = 2.0;
    let mut out = PathBuf::from("bench/results");
    let mut one: Option<String> = None;
    let mut only_layers = false;
    let mut only_handoff = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds takes a number")
            }
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            // One case only, nothing saved (for profiling): --one xsk|socket,gcm|cm,N
            "--one" => one = Some(args.next().expect("--one PATH,PROFILE,N")),
            // The layer-selection comparison alone (saved as srtp-layers.json).
            "--layers" => only_layers = true,
            // The hand-off comparison alone (saved as srtp-handoff.json).
            "--handoff" => only_handoff = true,
            other => panic!("unknown argument {other}; use --seconds S --out DIR"),
        }
    }
    edgefwd_tests::require_root();
    pin_to_cpu(WORKER_CPU);
    if let Some(spec) = one {
        let parts: Vec<&str> = spec.split(',').collect();
        let path = if parts[0] == "xsk" {
            Path::AfXdp
        } else {
            Path::Socket
        };
        let profile = if parts[1] == "gcm" {
            Profile::AeadAes128Gcm
        } else {
            Profile::AesCm128HmacSha1_80
        };
        let r = fanout(&rig(), path, profile, parts[2].parse().expect("N"), seconds);
        println!("{r:?}");
        return;
    }
    if only_layers {
        layers(&rig(), &out, seconds);
        return;
    }
    if only_handoff {
        handoffs(&rig(), &out, seconds);
        return;
    }
    println!("SRTP protect alone, {PAYLOAD} B RTP, one core:");
    let crypto = crypto(seconds.min(1.0));
    for c in &crypto {
        println!(
            "  {:<34} {:<24} {:>7.0} ns/packet",
            c.implementation, c.profile, c.ns_per_packet
        );
    }
    let v = rig();
    let mut rows = Vec::new();
    for profile in Profile::ALL {
        for n in FANOUTS {
            for path in [Path::AfXdp, Path::Socket] {
                let r = fanout(&v, path, profile, n, seconds);
                println!(
                    "  {:?} {} N={}: {:.0} ns/copy, {:.0} copies/s, delivered {}/{}",
                    r.path,
                    r.profile,
                    r.subscribers,
                    r.ns_per_copy,
                    r.copies_per_sec,
                    r.delivered,
                    r.copies
                );
                rows.push(r);
            }
        }
    }
    println!();
    println!(
        "{:<24} {:>6} {:>14} {:>14} {:>8} {:>10} {:>10}",
        "profile", "N", "AF_XDP c/s", "socket c/s", "ratio", "xsk ns", "sock ns"
    );
    let mut summary = Vec::new();
    for profile in Profile::ALL {
        for n in FANOUTS {
            let f = |p: Path| {
                rows.iter()
                    .find(|r| r.path == p && r.subscribers == n && r.profile == profile.name())
                    .unwrap()
            };
            let (x, s) = (f(Path::AfXdp), f(Path::Socket));
            let ratio = x.copies_per_sec / s.copies_per_sec;
            println!(
                "{:<24} {:>6} {:>14.0} {:>14.0} {:>7.2}x {:>10.0} {:>10.0}",
                profile.name(),
                n,
                x.copies_per_sec,
                s.copies_per_sec,
                ratio,
                x.ns_per_copy,
                s.ns_per_copy
            );
            summary.push(serde_json::json!({
                "profile": profile.name(), "subscribers": n,
                "af_xdp_copies_per_sec": x.copies_per_sec, "socket_copies_per_sec": s.copies_per_sec,
                "ratio": ratio,
                // A 1.5 Mbit/s, 30 fps video subscriber at 1,200-byte packets: ~156 packets/s.
                "video_subscribers_per_core_af_xdp": x.copies_per_sec / 156.25,
            }));
        }
    }
    save(&out, &crypto, &rows, &summary);
    layers(&v, &out, seconds);
    handoffs(&v, &out, seconds);
}

/// The core that receives for another worker in the hand-off case.
const GIVER_CPU: usize = 0;

/// The fan-out of `n` copies per packet with each packet handed over from a worker on
/// the other core: (row on the owner, ns per packet on the giver).
fn handed_off(v: &Rig, n: usize, seconds: f64) -> (Row, f64) {
    let profile = Profile::AeadAes128Gcm;
    let before = sink_count(v);
    let (copies, ns, give_ns) = v.ns.run(move || {
        pin_to_cpu(WORKER_CPU);
        let (mut e, mut src, from) = engine(n, profile, Shape::Opaque);
        let local: SocketAddr = format!("{W_ADDR}:4000").parse().unwrap();
        let ifindex = edgefwd::dataplane::preflight::ifindex("d0").unwrap();
        let mut q = XskQueue::open(ifindex, 0, local, [2, 0, 0, 0, 0, 1]).expect("AF_XDP on d0");
        q.set_neighbour(S_ADDR.parse().unwrap(), [2, 0, 0, 0, 0, 2]);
        let inbox = Arc::new(Inbox::new().unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let giver = {
            let (inbox, stop) = (inbox.clone(), stop.clone());
            std::thread::spawn(move || {
                pin_to_cpu(GIVER_CPU);
                let (mut given, mut timed, mut k) = (0u64, 0u64, 0u32);
                let mut pkt = vec![0u8; PAYLOAD + 16];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    pkt.resize(PAYLOAD + 16, 0);
                    pkt[..PAYLOAD].copy_from_slice(&source_packet(Shape::Opaque, k).1);
                    let len = src.protect_rtp(&mut pkt, PAYLOAD).unwrap();
                    pkt.truncate(len);
                    // A full inbox: the owner is behind; the packet waits (not lost:
                    // the owner's rate is what is measured).
                    loop {
                        let t = Instant::now();
                        let ok = inbox.give(from, 1, [2, 0, 0, 0, 0, 2], &pkt);
                        if ok {
                            timed += t.elapsed().as_nanos() as u64;
                            break;
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        std::thread::yield_now();
                    }
                    inbox.wake();
                    given += 1;
                    k += 1;
                }
                timed as f64 / given.max(1) as f64
            })
        };
        let sent = |e: &Engine| {
            e.counters()
                .rtp_out
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let start = sent(&e);
        let (wall, mut timed, mut since_flush) = (Instant::now(), 0u64, 0u64);
        while wall.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            let got = inbox.take(RX_BATCH as usize, |_, session, _, p| {
                e.handle_srtp_of(session, p, t, &mut q)
            });
            since_flush += got;
            if since_flush >= RX_BATCH as u64 {
                q.flush();
                since_flush = 0;
            }
            if got > 0 {
                timed += t.elapsed().as_nanos() as u64;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let give_ns = giver.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        q.flush();
        (sent(&e) - start, timed, give_ns)
    });
    let row = Row::measured(v, before, (Path::AfXdp, profile, n), copies, ns, seconds);
    (row, give_ns)
}

/// Direct against handed over, same run: AF_XDP, GCM.
fn handoffs(v: &Rig, out: &std::path::Path, seconds: f64) {
    println!();
    println!("Hand-off between workers (AF_XDP, AEAD_AES_128_GCM):");
    println!(
        "{:>6} {:>16} {:>18} {:>14} {:>18}",
        "N", "direct ns/copy", "handed ns/copy", "owner extra", "giver ns/packet"
    );
    let mut saved = Vec::new();
    for n in [1, 10, 100] {
        let direct = fanout(v, Path::AfXdp, Profile::AeadAes128Gcm, n, seconds);
        let (handed, give_ns) = handed_off(v, n, seconds);
        let extra = handed.ns_per_copy / direct.ns_per_copy - 1.0;
        println!(
            "{:>6} {:>16.0} {:>18.0} {:>13.1}% {:>18.0}",
            n,
            direct.ns_per_copy,
            handed.ns_per_copy,
            extra * 100.0,
            give_ns
        );
        saved.push(serde_json::json!({
            "subscribers": n, "direct": direct, "handed_off": handed,
            "owner_extra": extra, "giver_ns_per_packet": give_ns,
        }));
    }
    std::fs::write(
        out.join("srtp-handoff.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "date": edgefwd_tests::bench::utc_stamp(), "machine": edgefwd_tests::bench::machine(),
            "seconds": seconds, "rows": saved,
        }))
        .unwrap(),
    )
    .unwrap();
}

/// Layer selection against the single-layer case, same run: AF_XDP, GCM.
fn layers(v: &Rig, out: &std::path::Path, seconds: f64) {
    println!();
    println!("Layer selection (AF_XDP, AEAD_AES_128_GCM, VP8):");
    println!(
        "{:>6} {:>18} {:>18} {:>10}",
        "N", "1 layer ns/copy", "3 layers ns/copy", "overhead"
    );
    let mut saved = Vec::new();
    for n in [100, 1000] {
        let run = |shape| fanout_of(v, Path::AfXdp, Profile::AeadAes128Gcm, n, shape, seconds);
        let (one, three) = (run(Shape::Vp8(1)), run(Shape::Vp8(3)));
        let overhead = three.ns_per_copy / one.ns_per_copy - 1.0;
        println!(
            "{:>6} {:>18.0} {:>18.0} {:>9.1}%",
            n,
            one.ns_per_copy,
            three.ns_per_copy,
            overhead * 100.0
        );
        saved.push(serde_json::json!({
            "subscribers": n, "single_layer": one, "simulcast_3_layers": three,
            "overhead": overhead,
            "video_subscribers_per_core_single_layer": one.copies_per_sec / 156.25,
            "video_subscribers_per_core_simulcast": three.copies_per_sec / 156.25,
        }));
    }
    std::fs::write(
        out.join("srtp-layers.json"),
        serde_json::to_string_pretty(&saved).unwrap(),
    )
    .unwrap();
}

fn save(dir: &std::path::Path, crypto: &[CryptoRow], rows: &[Row], summary: &[serde_json::Value]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut csv = String::from(
        "path,profile,subscribers,copies,delivered,ns_per_copy,copies_per_sec,seconds\n",
    );
    for r in rows {
        csv += &format!(
            "{:?},{},{},{},{},{:.1},{:.0},{:.2}\n",
            r.path,
            r.profile,
            r.subscribers,
            r.copies,
            r.delivered,
            r.ns_per_copy,
            r.copies_per_sec,
            r.seconds
        );
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "machine": cpu,
        "payload_bytes": PAYLOAD,
        "crypto": crypto,
        "rows": rows,
        "summary": summary,
    }))
    .unwrap();
    std::fs::write(dir.join("srtp.csv"), csv).unwrap();
    std::fs::write(dir.join("srtp.json"), json).unwrap();
    chart(&dir.join("srtp.png"), rows).unwrap_or_else(|e| panic!("chart: {e}"));
    println!("saved {0}/srtp.{{csv,json,png}}", dir.display());
}

fn chart(path: &std::path::Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    let bars: Vec<edgefwd_tests::bench::Bar> = rows
        .iter()
        .map(|r| edgefwd_tests::bench::Bar {
            label: format!(
                "{} {} N={}",
                if r.path == Path::AfXdp { "xsk" } else { "sock" },
                if r.profile.starts_with("AEAD") {
                    "GCM"
                } else {
                    "CM"
                },
                r.subscribers
            ),
            value: r.copies_per_sec / 1e6,
            rgb: if r.path == Path::AfXdp {
                (31, 119, 180)
            } else {
                (214, 39, 40)
            },
        })
        .collect();
    edgefwd_tests::bench::bar_chart(
        path,
        1200,
        "edgefwd WebRTC worker: million SRTP copies/s on one core (1,200 B)",
        "M copies/s",
        &bars,
    )
}
