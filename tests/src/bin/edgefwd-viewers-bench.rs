//! `cargo xtask bench viewers`: WHEP subscribers one daemon core serves at a target
//! video bitrate, driven by `edgefwd load-test` (real ICE, DTLS, SRTP per client).
//!
//! One room, one publisher (Opus-sized audio + video at the target bitrate), S
//! subscribers. The daemon is pinned to core 0, the load tool to core 1. Once every
//! subscriber is connected, the daemon's CPU time and its SRTP copies out are sampled
//! over a window: CPU ns per copy, and from it how many subscribers at this bitrate
//! one fully busy daemon core would serve. The load tool's own report gives loss and
//! latency, so a case where the daemon fell behind shows as loss, not as a good rate.
//!
//! Two data paths in the same run: the socket path on loopback, and the AF_XDP path
//! (XDP steering into the workers) in network namespaces over veth, copy mode.
//!
//! Results: table on stdout, bench/results/viewers.{csv,json,png}.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use edgefwd_tests::{
    Edgefwd,
    bench::{Bar, bar_chart, cpu_time, machine, process_threads, utc_stamp},
    edgefwd_bin,
    netns::{NetNs, Topology},
    spawn_edgefwd, unique,
};
use forwarder_common::PROG_PASS;

const VIDEO_KBPS: u32 = 1000;
const LIMITS: &str = "[webrtc.limits]\nmax_sessions_per_source = 5000\n\
                      http_max_connections_per_source = 1024\n";

/// Where a daemon under test is, and how to reach it.
struct Target<'a> {
    path: &'static str,
    base: String,
    /// The namespace the clients run in and call its API from (the AF_XDP case: not
    /// the daemon's own, or their packets would never cross the veth and its XDP).
    ns: Option<&'a NetNs>,
    daemon: Edgefwd,
    /// Links whose drops are counted per case: (namespace, device).
    links: Vec<(&'a NetNs, &'static str)>,
}

/// Packets a link dropped so far (rx + tx, from the kernel's stats64): a veth's
/// receive ring overflows under bursts, which is the harness's loss, not the SFU's.
fn link_drops(ns: &NetNs, dev: &str) -> u64 {
    let o = ns
        .command("ip")
        .args(["-s", "-j", "link", "show", "dev", dev])
        .output()
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("ip -s -j link show dev {dev}: {e}"));
    let s = &v[0]["stats64"];
    s["rx"]["dropped"].as_u64().unwrap_or(0) + s["tx"]["dropped"].as_u64().unwrap_or(0)
}

fn drops(t: &Target) -> u64 {
    t.links.iter().map(|(ns, dev)| link_drops(ns, dev)).sum()
}

/// (SRTP copies sent, connected subscribers, the port's counters with drops by reason
/// and the AF_XDP sockets' stats) from the daemon's `/api/sessions`.
fn sample(t: &Target) -> (u64, usize, serde_json::Value) {
    let url = format!("{}/api/sessions", t.base);
    let get = move || -> serde_json::Value {
        ureq::get(&url)
            .call()
            .expect("the SFU's /api/sessions")
            .body_mut()
            .read_json()
            .expect("JSON")
    };
    let v = match t.ns {
        Some(ns) => ns.run(get),
        None => get(),
    };
    let connected = v["rooms"].as_object().map_or(0, |r| {
        r.values()
            .flat_map(|s| s.as_array().cloned().unwrap_or_default())
            .filter(|s| s["connected"] == true && s["role"] == "subscriber")
            .count()
    });
    let counters = serde_json::json!({"counters": v["counters"], "xsk": v["xsk"]});
    (
        v["counters"]["rtp_out"].as_u64().unwrap_or(0),
        connected,
        counters,
    )
}

fn load_test(t: &Target, subs: usize, seconds: u64) -> Child {
    let mut cmd = match t.ns {
        Some(ns) => ns.command("taskset"),
        None => Command::new("taskset"),
    };
    cmd.args(["-c", "1"])
        .arg(edgefwd_bin())
        .args(["load-test", "--url", &t.base, "--rooms", "1"])
        .args(["--publishers", "1", "--subscribers", &subs.to_string()])
        .args(["--video-bitrate", &VIDEO_KBPS.to_string()])
        .args(["--duration", &seconds.to_string(), "--concurrency", "32"])
        .args(["--json", "--quiet"])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("edgefwd load-test")
}

fn run_case(t: &Target, subs: usize, window: u64) -> serde_json::Value {
    // Joins first, then `window` seconds of steady media inside the tool's duration.
    let mut tool = load_test(t, subs, window + 3);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sample(t).1 < subs {
        assert!(
            Instant::now() < deadline,
            "{}: {subs} subscribers did not all connect within 60 s",
            t.path
        );
        assert!(tool.try_wait().unwrap().is_none(), "load-test ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past the joins' keyframe burst.
    std::thread::sleep(Duration::from_secs(1));
    let threads = process_threads(t.daemon.id());
    let d0 = drops(t);
    let (c0, cpu0, at0) = (sample(t).0, cpu_time(&threads), Instant::now());
    std::thread::sleep(Duration::from_secs(window));
    let (c1, _, daemon_counters) = sample(t);
    let (cpu1, at1) = (cpu_time(&process_threads(t.daemon.id())), Instant::now());
    let o = tool.wait_with_output().unwrap();
    let link_drops = drops(t) - d0;
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "load-test gave no JSON ({e}): {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let secs = (at1 - at0).as_secs_f64();
    let copies = (c1 - c0) as f64;
    let ns_per_copy = (cpu1 - cpu0) as f64 / copies.max(1.0);
    let copies_per_sub_s = copies / secs / subs as f64;
    serde_json::json!({
        "path": t.path,
        "subscribers": subs,
        "video_kbps": VIDEO_KBPS,
        "failed": r["failed"],
        "copies_per_s": copies / secs,
        "daemon_core_pct": 100.0 * (cpu1 - cpu0) as f64 / 1e9 / secs,
        "ns_per_copy": ns_per_copy,
        "subscribers_per_core": 1e9 / ns_per_copy / copies_per_sub_s.max(1e-9),
        "loss_pct": r["total"]["loss_pct"],
        "latency_ms_p50": r["total"]["latency_ms"]["median"],
        "latency_ms_p99": r["total"]["latency_ms"]["p99"],
        "kbps_per_subscriber": r["total"]["kbps_per_subscriber"],
        "link_drops": link_drops,
        "daemon": daemon_counters,
        "load_test_total": r["total"],
    })
}

fn config(ip: &str) -> PathBuf {
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-viewers-")));
    std::fs::write(
        &cfg,
        format!("[webrtc]\nhttp = \"{ip}:8080\"\nmedia = \"{ip}:50000\"\n{LIMITS}"),
    )
    .unwrap();
    cfg
}

fn main() {
    let mut out = PathBuf::from("bench/results");
    let mut window = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            "--seconds" => {
                window = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            other => panic!("unknown argument {other}; use --out DIR, --seconds N"),
        }
    }
    let cases = [25, 100, 200];
    let mut rows = Vec::new();
    println!(
        "{:>7} {:>5} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}",
        "PATH",
        "SUBS",
        "FAILED",
        "COPIES/S",
        "CORE %",
        "ns/COPY",
        "LOSS %",
        "p99 ms",
        "SUBS/CORE",
        "LINK DROPS"
    );
    let mut print = |r: &serde_json::Value| {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>7} {:>5} {:>7} {:>10.0} {:>8.1} {:>8.0} {:>8.2} {:>8.1} {:>9.0} {:>10}",
            r["path"].as_str().unwrap(),
            r["subscribers"].as_u64().unwrap_or(0),
            r["failed"].as_u64().unwrap_or(0),
            f("copies_per_s"),
            f("daemon_core_pct"),
            f("ns_per_copy"),
            f("loss_pct"),
            f("latency_ms_p99"),
            f("subscribers_per_core"),
            r["link_drops"].as_u64().unwrap_or(0)
        );
        rows.push(r.clone());
    };

    // Socket path on loopback.
    {
        let cfg = config("127.0.0.1");
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(edgefwd_bin())
            .args(["run", "--datapath", "user", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn");
        let t = Target {
            path: "socket",
            base: "http://127.0.0.1:8080".into(),
            ns: None,
            daemon: spawn_edgefwd(cmd),
            links: Vec::new(),
        };
        for subs in cases {
            print(&run_case(&t, subs, window));
        }
        let _ = std::fs::remove_file(&cfg);
    }

    // AF_XDP path: the daemon's XDP program on its veth steers SRTP to the workers;
    // the load tool runs in the publisher namespace, whose veth end needs an XDP
    // program of its own for the workers' frames to arrive.
    {
        let topo = Topology::new();
        let _pass = topo.publisher.run(|| {
            let mut e = edgefwd::dataplane::loader::load_tools().expect("load");
            edgefwd::dataplane::loader::attach(&mut e, PROG_PASS, "p0").expect("attach");
            e
        });
        topo.settle();
        let pin = edgefwd_tests::PinDir::new();
        let cfg = config("198.51.100.2");
        let mut cmd = topo.forwarder.command("taskset");
        cmd.args(["-c", "0"])
            .arg(edgefwd_bin())
            .args(["--pin-dir", pin.path().to_str().unwrap()])
            .args(["run", "--iface", "f0", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn");
        let t = Target {
            path: "af_xdp",
            base: "http://198.51.100.2:8080".into(),
            ns: Some(&topo.publisher),
            daemon: spawn_edgefwd(cmd),
            links: vec![(&topo.publisher, "p0"), (&topo.forwarder, "f0")],
        };
        let url = format!("{}/api/sessions", t.base);
        let mp: serde_json::Value = topo.forwarder.run(move || {
            ureq::get(&url)
                .call()
                .unwrap()
                .body_mut()
                .read_json()
                .unwrap()
        });
        assert_eq!(
            mp["media_path"]["path"], "af_xdp",
            "the daemon fell back to the socket path: {}",
            mp["media_path"]
        );
        for subs in cases {
            print(&run_case(&t, subs, window));
        }
        let _ = std::fs::remove_file(&cfg);
    }

    std::fs::create_dir_all(&out).unwrap();
    let mut csv = String::from(
        "path,subscribers,video_kbps,failed,copies_per_s,daemon_core_pct,ns_per_copy,loss_pct,latency_ms_p50,latency_ms_p99,subscribers_per_core,link_drops\n",
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        csv += &format!(
            "{},{},{},{},{:.0},{:.1},{:.0},{:.3},{:.2},{:.2},{:.0},{}\n",
            r["path"].as_str().unwrap(),
            r["subscribers"],
            VIDEO_KBPS,
            r["failed"],
            f("copies_per_s"),
            f("daemon_core_pct"),
            f("ns_per_copy"),
            f("loss_pct"),
            f("latency_ms_p50"),
            f("latency_ms_p99"),
            f("subscribers_per_core"),
            r["link_drops"]
        );
    }
    // Same run, same subscriber count: the ratio of the two paths.
    let at = |p: &str, s: u64| {
        rows.iter()
            .find(|r| r["path"] == p && r["subscribers"] == s)
            .and_then(|r| r["ns_per_copy"].as_f64())
    };
    let ratio = match (at("socket", 200), at("af_xdp", 200)) {
        (Some(s), Some(x)) => s / x,
        _ => f64::NAN,
    };
    println!("AF_XDP path vs socket path at 200 subscribers: {ratio:.2}x fewer CPU ns per copy");
    std::fs::write(out.join("viewers.csv"), csv).unwrap();
    std::fs::write(
        out.join("viewers.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "date": utc_stamp(), "machine": machine(), "video_kbps": VIDEO_KBPS,
            "window_s": window, "socket_over_af_xdp_ns_per_copy_at_200": ratio, "rows": rows,
        }))
        .unwrap(),
    )
    .unwrap();
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| Bar {
            label: format!("{} {}", r["path"].as_str().unwrap(), r["subscribers"]),
            value: r["subscribers_per_core"].as_f64().unwrap_or(0.0),
            rgb: if r["path"] == "af_xdp" {
                (40, 120, 200)
            } else {
                (200, 120, 40)
            },
        })
        .collect();
    bar_chart(
        &out.join("viewers.png"),
        900,
        &format!("WHEP subscribers per daemon core at {VIDEO_KBPS} kbit/s video + audio"),
        "subscribers per core",
        &bars,
    )
    .expect("the chart");
    println!("saved {0}/viewers.{{csv,json,png}}", out.display());
}
