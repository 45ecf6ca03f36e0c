//! `cargo xtask demo`: a live RTP relay through the XDP forwarder in network
//! namespaces, then a WebRTC room through the same daemon (a headless Chromium
//! publishes over WHIP, a second one watches over WHEP, media through the AF_XDP
//! workers), then two nodes sharing a room through the cluster's Redis (published on
//! one, watched on the other, no upstream configured), printing per-second rates of
//! each, ending by itself.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use edgefwd::{dataplane::loader, dataplane::maps::Maps};
use edgefwd_tests::{
    PinDir, RedisServer, edgefwd_bin,
    netns::{Fabric, Topology},
    pkt::Rtp,
    spawn_edgefwd,
};
use forwarder_common::{PROG_PASS, verdicts::Action};

const PPS: u64 = 20_000;

/// The embedded default: one publisher stream relayed to one receiver, with the SSRC,
/// sequence number, timestamp and payload type rewritten on the way.
const DEMO_CONFIG: &str = r#"
[[listener]]
addr = "198.51.100.2:5004"
drop_unknown_source = true

[[route]]
listen = "198.51.100.2:5004"
source = "198.51.100.1:40000"
ssrc = 0x0000cafe
out_src = "203.0.113.2:5006"
out_dst = "203.0.113.1:6000"
ssrc_out = 0x00c0ffee
seq_delta = 1000
ts_delta = 48000
pt_from = 111
pt_to = 100

[webrtc]
http = "198.51.100.2:8080"
media = "198.51.100.2:50000"
"#;

/// What the SFU has counted so far: (RTP in, RTP copies out, AF_XDP frames received,
/// connected sessions).
fn sfu_totals(t: &Topology) -> (u64, u64, u64, usize) {
    let v: serde_json::Value = t.forwarder.run(|| {
        ureq::get("http://198.51.100.2:8080/api/sessions")
            .call()
            .expect("the SFU's /api/sessions")
            .body_mut()
            .read_json()
            .expect("JSON")
    });
    let c = &v["counters"];
    let xsk_rx: u64 = v["xsk"].as_array().map_or(0, |a| {
        a.iter().filter_map(|q| q["stats"]["rx"].as_u64()).sum()
    });
    let connected = v["rooms"].as_object().map_or(0, |r| {
        r.values()
            .flat_map(|s| s.as_array().cloned().unwrap_or_default())
            .filter(|s| s["connected"] == true)
            .count()
    });
    (
        c["rtp_in"].as_u64().unwrap_or(0),
        c["rtp_out"].as_u64().unwrap_or(0),
        xsk_rx,
        connected,
    )
}

/// Part two: Chromium publishes and Chromium watches through the daemon; prints the
/// SFU's per-second rates while they run and what the watcher decoded. Returns whether
/// the watcher decoded video.
fn webrtc_room(t: &Topology, seconds: u64) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/whip_whep.mjs");
    println!(
        "\nWebRTC: a headless Chromium in the publisher namespace publishes camera + microphone \
         over WHIP to http://198.51.100.2:8080/whip/demo, a second one watches over WHEP; \
         SRTP goes through XDP into the AF_XDP workers, which re-encrypt per subscriber."
    );
    let mut browsers = t
        .publisher
        .command("node")
        .arg(script)
        .args([
            "--base",
            "http://198.51.100.2:8080",
            "--room",
            "demo",
            "--codec",
            "VP8",
        ])
        .args(["--role", "both", "--hold", &seconds.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node (installed by cargo xtask setup)");
    println!(
        "{:>4} {:>10} {:>12} {:>14} {:>10}",
        "SEC", "RTP IN/s", "COPIES OUT/s", "AF_XDP RX/s", "SESSIONS"
    );
    let mut last = sfu_totals(t);
    let mut sec = 0;
    while browsers.try_wait().expect("wait").is_none() && sec < seconds + 60 {
        std::thread::sleep(Duration::from_secs(1));
        sec += 1;
        let now = sfu_totals(t);
        println!(
            "{sec:>4} {:>10} {:>12} {:>14} {:>10}",
            now.0 - last.0,
            now.1 - last.1,
            now.2 - last.2,
            now.3
        );
        last = now;
    }
    let out = browsers.wait_with_output().expect("node");
    let line = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value =
        serde_json::from_str(line.lines().last().unwrap_or("")).unwrap_or_default();
    let v = &r["subscriber"]["inbound"]["video"];
    let a = &r["subscriber"]["inbound"]["audio"];
    println!(
        "watcher: {} video frames decoded ({}), {} audio packets, SRTP {}",
        v["framesDecoded"],
        v["codec"].as_str().unwrap_or("?"),
        a["packetsReceived"],
        r["subscriber"]["transport"]["srtpCipher"]
            .as_str()
            .unwrap_or("?")
    );
    out.status.success() && v["framesDecoded"].as_u64().unwrap_or(0) > 0
}

/// A node's counters from its /api/sessions, read from the hub: (RTP in, RTP out,
/// trunk copies out, connected sessions).
fn node_totals(f: &Fabric, i: usize) -> (u64, u64, u64, usize) {
    let v: serde_json::Value =
        serde_json::from_str(&f.get(&format!("http://{}:8080/api/sessions", Fabric::ip_of(i))))
            .unwrap_or_default();
    let c = &v["counters"];
    let connected = v["rooms"].as_object().map_or(0, |r| {
        r.values()
            .flat_map(|s| s.as_array().cloned().unwrap_or_default())
            .filter(|s| s["connected"] == true)
            .count()
    });
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    (n("rtp_in"), n("rtp_out"), n("relay_out"), connected)
}

/// Part three: two nodes, each its own `edgefwd run` in its own namespace, sharing
/// Redis and no config about each other. Chromium publishes at node-1 (placed there,
/// or redirected to where the room's name puts it) and watches at the other node,
/// which finds the room's origin in the directory and takes it over a trunk. Returns
/// whether the watcher decoded video.
fn cluster_room(seconds: u64) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/whip_whep.mjs");
    println!(
        "\nCluster: node-1 at {} and node-2 at {}, each its own daemon in its own namespace, \
         share the cluster's Redis at {}:6379; Chromium publishes room cluster-demo at node-1 \
         and watches it at the node that is not its origin.",
        Fabric::ip_of(0),
        Fabric::ip_of(1),
        Fabric::HUB
    );
    let f = Fabric::new(2);
    let redis = RedisServer::start_in(&f.hub, Fabric::HUB);
    let mut daemons = Vec::new();
    let mut cfgs = Vec::new();
    for i in 0..2 {
        let ip = Fabric::ip_of(i);
        let cfg =
            std::env::temp_dir().join(format!("edgefwd-demo-n{i}-{}.toml", std::process::id()));
        std::fs::write(
            &cfg,
            format!(
                "[webrtc]\nhttp = \"{ip}:8080\"\nmedia = \"{ip}:50000\"\n\n[cluster]\n\
                 node = \"node-{}\"\nsecret = \"the demo's cluster secret\"\n\
                 api = \"{ip}:7000\"\nredis_url = \"{}\"\n",
                i + 1,
                redis.url()
            ),
        )
        .unwrap();
        let mut cmd = f.nodes[i].command(edgefwd_bin().to_str().unwrap());
        cmd.args(["run", "--datapath", "user", "--config"])
            .arg(&cfg);
        daemons.push(spawn_edgefwd(cmd));
        cfgs.push(cfg);
    }
    let cli = |args: &[&str]| {
        let out = f
            .hub
            .command(edgefwd_bin().to_str().unwrap())
            .args(["cluster"])
            .args(args)
            .args(["--redis", &redis.url()])
            .output()
            .expect("edgefwd cluster");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for _ in 0..50 {
        if cli(&["nodes", "--json"]).matches("\"node\"").count() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\n$ edgefwd cluster nodes\n{}", cli(&["nodes"]));
    let browser = |base: String, role: &str, hold: u64| {
        f.hub
            .command("node")
            .arg(script)
            .args(["--base", &base, "--room", "cluster-demo", "--codec", "VP8"])
            .args(["--role", role, "--hold", &hold.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("node (installed by cargo xtask setup)")
    };
    let mut publisher = browser(
        format!("http://{}:8080", Fabric::ip_of(0)),
        "publish",
        seconds + 40,
    );
    let mut origin = String::new();
    for _ in 0..150 {
        origin = redis
            .cli(&["HGET", "edgefwd:room:{cluster-demo}", "node"])
            .trim()
            .to_string();
        if !origin.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = usize::from(origin == "node-2");
    let w = 1 - o;
    println!(
        "room cluster-demo: origin {origin} (from the directory); watching at node-{}",
        w + 1
    );
    let mut watcher = browser(
        format!("http://{}:8080", Fabric::ip_of(w)),
        "watch",
        seconds,
    );
    println!(
        "{:>4} {:>14} {:>14} {:>16} {:>16}",
        "SEC", "ORIGIN RTP IN/s", "TRUNK OUT/s", "RELAY RTP IN/s", "RELAY COPIES/s"
    );
    let (mut lo, mut lw) = (node_totals(&f, o), node_totals(&f, w));
    let mut sec = 0;
    while watcher.try_wait().expect("wait").is_none() && sec < seconds + 60 {
        std::thread::sleep(Duration::from_secs(1));
        sec += 1;
        let (no, nw) = (node_totals(&f, o), node_totals(&f, w));
        println!(
            "{sec:>4} {:>14} {:>14} {:>16} {:>16}",
            no.0 - lo.0,
            no.2 - lo.2,
            nw.0 - lw.0,
            nw.1 - lw.1
        );
        (lo, lw) = (no, nw);
        if sec == 3 {
            println!(
                "\n$ edgefwd cluster rooms cluster-demo\n{}",
                cli(&["rooms", "cluster-demo"])
            );
        }
    }
    let out = watcher.wait_with_output().expect("node");
    let r: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )
    .unwrap_or_default();
    let v = &r["subscriber"]["inbound"]["video"];
    println!(
        "watcher at node-{}: {} video frames decoded, relayed from {origin}",
        w + 1,
        v["framesDecoded"]
    );
    let _ = publisher.kill();
    let _ = publisher.wait();
    for mut d in daemons {
        d.stop();
    }
    for c in cfgs {
        let _ = std::fs::remove_file(c);
    }
    out.status.success() && v["framesDecoded"].as_u64().unwrap_or(0) > 0
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!(
        "edgefwd demo: publisher 198.51.100.1 -> forwarder (XDP on f0) -> receiver 203.0.113.1"
    );
    let t = Topology::new();
    let pin = PinDir::new();
    let mut keep = Vec::new();
    for (ns, dev) in [(&t.publisher, "p0"), (&t.receiver, "r0")] {
        keep.push(ns.run(move || {
            let mut e = loader::load_tools().expect("load");
            loader::attach(&mut e, PROG_PASS, dev).expect("attach");
            e
        }));
    }
    t.settle();
    let cfg = std::env::temp_dir().join(format!("edgefwd-demo-{}.toml", std::process::id()));
    std::fs::write(&cfg, DEMO_CONFIG).unwrap();
    println!("config ({}):{DEMO_CONFIG}", cfg.display());
    let mut cmd = t.forwarder.command(edgefwd_bin().to_str().unwrap());
    cmd.args([
        "--pin-dir",
        pin.path().to_str().unwrap(),
        "run",
        "--iface",
        "f0",
        "--config",
    ])
    .arg(&cfg)
    // The RTP part, then the WebRTC room (browsers start, decode, hold `seconds`).
    .args(["--duration", &(2 * seconds + 90).to_string()]);
    let mut daemon = spawn_edgefwd(cmd);

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let rx = {
        let (stop, received) = (stop.clone(), received.clone());
        t.receiver.spawn(move || {
            let s = UdpSocket::bind("203.0.113.1:6000").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    assert_eq!(&buf[8..12], &0x00c0_ffeeu32.to_be_bytes(), "SSRC rewritten");
                    assert!(n > 12);
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let tx = {
        let (stop, sent) = (stop.clone(), sent.clone());
        t.publisher.spawn(move || {
            let s = UdpSocket::bind("198.51.100.1:40000").unwrap();
            let start = Instant::now();
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                // Paced: catch up to PPS * elapsed, 1 ms at a time.
                let due = (start.elapsed().as_secs_f64() * PPS as f64) as u64;
                while i < due {
                    let mut r = Rtp::new(0xcafe, i as u16, (i * 960) as u32, 200);
                    r.pt = 111;
                    let _ = s.send_to(&r.bytes(), "198.51.100.2:5004");
                    i += 1;
                }
                sent.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let maps = Maps::open_pinned(pin.path()).expect("pinned maps");
    let totals = |m: &Maps| {
        let t = m.verdict_totals().unwrap();
        let f: u64 = t
            .iter()
            .filter(|(v, _)| v.action() == Action::Forward)
            .map(|(_, s)| s.packets)
            .sum();
        let d: u64 = t
            .iter()
            .filter(|(v, _)| v.action() == Action::Drop)
            .map(|(_, s)| s.packets)
            .sum();
        (f, d)
    };
    println!(
        "{:>4} {:>12} {:>14} {:>16} {:>12}",
        "SEC", "SENT/s", "XDP FWD/s", "RECEIVED/s", "XDP DROP/s"
    );
    let (mut ls, mut lr, (mut lf, mut ld)) = (0, 0, totals(&maps));
    for sec in 1..=seconds {
        std::thread::sleep(Duration::from_secs(1));
        let (s, r, (f, d)) = (
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
            totals(&maps),
        );
        println!(
            "{sec:>4} {:>12} {:>14} {:>16} {:>12}",
            s - ls,
            f - lf,
            r - lr,
            d - ld
        );
        (ls, lr, lf, ld) = (s, r, f, d);
    }
    stop.store(true, Ordering::Relaxed);
    tx.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    rx.join().unwrap();
    let out = t
        .forwarder
        .command(edgefwd_bin().to_str().unwrap())
        .args(["--pin-dir", pin.path().to_str().unwrap(), "routes", "list"])
        .output()
        .unwrap();
    println!(
        "\n$ edgefwd routes list\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (s, r) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    println!(
        "sent {s}, received {r} ({:.2}% delivered)",
        100.0 * r as f64 / s.max(1) as f64
    );
    let watched = webrtc_room(&t, seconds);
    daemon.stop();
    let _ = std::fs::remove_file(&cfg);
    drop(keep);
    let shared = cluster_room(seconds);
    if r == 0 {
        eprintln!("demo failed: nothing was relayed");
        std::process::exit(1);
    }
    if !watched {
        eprintln!("demo failed: the WebRTC watcher decoded no video");
        std::process::exit(1);
    }
    if !shared {
        eprintln!("demo failed: the watcher on the second node decoded no video");
        std::process::exit(1);
    }
}
