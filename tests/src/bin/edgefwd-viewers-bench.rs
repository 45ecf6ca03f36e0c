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
//! (XDP steering into the workers) in network namespaces over veth, copy mode; and the
//! socket path's clients over ICE-TCP (`tcp` rows: `load-test --tcp`, whose bridge
//! hop is the load tool's cost; the daemon's ns/copy includes its TCP legs).
//!
//! Results: table on stdout, bench/results/viewers.{csv,json,png}.
//!
//! `--churn` (`cargo xtask bench churn`): does churn stall media? AF_XDP path, one
//! queue (so one engine holds every room), 100 steady subscribers measured by the load
//! tool, once quiet and once while other clients keep joining and leaving another room
//! (load-test runs of 20 subscribers, back to back) and `/api/sessions` is read over
//! and over (10 ms between reads). The daemon's signalling runs on core 1 with the load
//! tools, its worker alone on core 0 (it pins itself there), so what the worker waits
//! for is locks, not CPU. With `--baseline-bin PATH` the same cases run against another
//! build of edgefwd in the same run (e.g. the commit before the per-core engines).
//! Results: bench/results/churn.json.

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
                      http_max_connections_per_source = 1024\nice_tcp_max_per_source = 1024\n";

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
    /// Its clients over ICE-TCP (`load-test --tcp`) instead of UDP.
    tcp: bool,
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
    load_test_in(t, "steady", subs, seconds)
}

/// `edgefwd load-test` on core 1: one room PREFIX-0, one publisher, `subs` subscribers.
fn load_test_in(t: &Target, prefix: &str, subs: usize, seconds: u64) -> Child {
    let mut cmd = match t.ns {
        Some(ns) => ns.command("taskset"),
        None => Command::new("taskset"),
    };
    cmd.args(["-c", "1"])
        .arg(edgefwd_bin())
        .args(["load-test", "--url", &t.base, "--rooms", "1"])
        .args(["--room-prefix", prefix])
        .args(["--publishers", "1", "--subscribers", &subs.to_string()])
        .args(["--video-bitrate", &VIDEO_KBPS.to_string()])
        .args(["--duration", &seconds.to_string(), "--concurrency", "32"])
        .args(["--json", "--quiet"])
        .args(if t.tcp { &["--tcp"][..] } else { &[] })
        .env_remove("EDGEFWD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("edgefwd load-test")
}

fn run_case(t: &Target, subs: usize, window: u64) -> serde_json::Value {
    run_case_with(t, subs, window, None)
}

/// Clients joining and leaving, and API reads, until told to stop (the churn case).
struct Churn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Churn {
    fn start(t: &Target) -> Churn {
        use std::sync::{Arc, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // Back-to-back load-test runs of 20 subscribers in a room of their own: each
        // one 21 joins (ICE, DTLS, keys, down-tracks) and 21 leaves.
        {
            let (stop, base, ns) = (stop.clone(), t.base.clone(), t.ns.map(|n| n.name.clone()));
            threads.push(std::thread::spawn(move || {
                let mut joins = 0u64;
                let mut k = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut cmd = match &ns {
                        Some(ns) => {
                            let mut c = Command::new("ip");
                            c.args(["netns", "exec", ns, "taskset"]);
                            c
                        }
                        None => Command::new("taskset"),
                    };
                    let o = cmd
                        .args(["-c", "1"])
                        .arg(edgefwd_bin())
                        .args(["load-test", "--url", &base, "--rooms", "1"])
                        .args(["--room-prefix", &format!("churn{k}")])
                        .args(["--publishers", "1", "--subscribers", "20"])
                        .args(["--video-bitrate", "100", "--duration", "1"])
                        .args(["--concurrency", "21", "--json", "--quiet"])
                        // Churners are load, not what is measured: no limits.
                        .args(["--max-loss", "100", "--max-gap", "3600"])
                        .env_remove("EDGEFWD_TOKEN")
                        .output()
                        .expect("edgefwd load-test (churn)");
                    assert!(o.status.success(), "churn load-test: {o:?}");
                    joins += 21;
                    k += 1;
                }
                joins
            }));
        }
        // A dashboard polling the session list (every session of every room).
        {
            let (stop, url) = (stop.clone(), format!("{}/api/sessions", t.base));
            let ns = t.ns.map(|n| n.name.clone());
            threads.push(std::thread::spawn(move || {
                let mut reads = 0u64;
                let get = || {
                    ureq::get(&url)
                        .call()
                        .expect("/api/sessions")
                        .body_mut()
                        .read_to_string()
                        .expect("body");
                };
                if let Some(ns) = ns {
                    edgefwd_tests::netns::enter(&format!("/run/netns/{ns}"));
                }
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    get();
                    reads += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                reads
            }));
        }
        Churn { stop, threads }
    }

    /// (joins, API reads) done.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut done = self.threads.into_iter().map(|h| h.join().unwrap());
        (done.next().unwrap(), done.next().unwrap())
    }
}

fn run_case_with(
    t: &Target,
    subs: usize,
    window: u64,
    churn: Option<&dyn Fn() -> Churn>,
) -> serde_json::Value {
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
    let churning = churn.map(|c| (c(), Instant::now()));
    // Past the joins' keyframe burst.
    std::thread::sleep(Duration::from_secs(1));
    let threads = process_threads(t.daemon.id());
    let d0 = drops(t);
    let (c0, cpu0, at0) = (sample(t).0, cpu_time(&threads), Instant::now());
    std::thread::sleep(Duration::from_secs(window));
    let (c1, _, daemon_counters) = sample(t);
    let (cpu1, at1) = (cpu_time(&process_threads(t.daemon.id())), Instant::now());
    let o = tool.wait_with_output().unwrap();
    let churned = churning.map(|(c, at)| {
        let secs = at.elapsed().as_secs_f64();
        let (joins, reads) = c.stop();
        serde_json::json!({"joins_per_s": joins as f64 / secs, "api_reads_per_s": reads as f64 / secs})
    });
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
        "worst_loss_pct": r["total"]["worst_loss_pct"],
        "longest_gap_ms": r["total"]["longest_gap_ms"],
        "latency_ms_p50": r["total"]["latency_ms"]["median"],
        "latency_ms_p99": r["total"]["latency_ms"]["p99"],
        "kbps_per_subscriber": r["total"]["kbps_per_subscriber"],
        "link_drops": link_drops,
        "churn": churned,
        "daemon": daemon_counters,
        "load_test_total": r["total"],
    })
}

fn config(ip: &str) -> PathBuf {
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-viewers-")));
    std::fs::write(
        &cfg,
        format!(
            "[webrtc]\nhttp = \"{ip}:8080\"\nmedia = \"{ip}:50000\"\nice_tcp = \"{ip}:8443\"\n{LIMITS}"
        ),
    )
    .unwrap();
    cfg
}

/// The AF_XDP case's namespaces (the load tool runs in the publisher's, whose veth
/// end needs an XDP program of its own for the workers' frames to arrive: attached
/// while the returned object lives), a pin directory and the daemon's config.
fn af_xdp_setup() -> (Topology, aya::Ebpf, edgefwd_tests::PinDir, PathBuf) {
    let topo = Topology::new();
    let pass = topo.publisher.run(|| {
        let mut e = edgefwd::dataplane::loader::load_tools().expect("load");
        edgefwd::dataplane::loader::attach(&mut e, PROG_PASS, "p0").expect("attach");
        e
    });
    topo.settle();
    (
        topo,
        pass,
        edgefwd_tests::PinDir::new(),
        config("198.51.100.2"),
    )
}

/// `bin` as the daemon in the forwarder namespace, XDP on f0; `pinned`: the whole
/// process on core 0, else its signalling on core 1 (with the load tools) and its
/// worker alone on core 0 (the worker pins itself there).
fn af_xdp_target<'a>(
    topo: &'a Topology,
    pin: &edgefwd_tests::PinDir,
    cfg: &std::path::Path,
    bin: &std::path::Path,
    pinned: bool,
) -> Target<'a> {
    let mut cmd = topo.forwarder.command("taskset");
    cmd.args(["-c", if pinned { "0" } else { "1" }])
        .arg(bin)
        .args(["--pin-dir", pin.path().to_str().unwrap()])
        .args(["run", "--iface", "f0", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn");
    let t = Target {
        path: "af_xdp",
        base: "http://198.51.100.2:8080".into(),
        ns: Some(&topo.publisher),
        daemon: spawn_edgefwd(cmd),
        links: vec![(&topo.publisher, "p0"), (&topo.forwarder, "f0")],
        tcp: false,
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
    t
}

/// 100 steady subscribers, quiet and under churn, per build (this one, and the
/// baseline if given), all in one run.
fn churn_cases(out: &std::path::Path, window: u64, baseline: Option<PathBuf>) {
    const SUBS: usize = 100;
    let mut builds = vec![("this build", edgefwd_bin())];
    if let Some(b) = baseline {
        builds.push(("baseline", b));
    }
    println!(
        "{:>10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "BUILD",
        "CHURN",
        "FAILED",
        "LOSS %",
        "p50 ms",
        "p99 ms",
        "JOINS/S",
        "READS/S",
        "LINK DROPS"
    );
    let mut rows = Vec::new();
    for (name, bin) in &builds {
        // A namespace set per build: a killed daemon leaves its XDP link pinned.
        let (topo, _pass, pin, cfg) = af_xdp_setup();
        let t = af_xdp_target(&topo, &pin, &cfg, bin, false);
        for churn in [false, true] {
            let start = || Churn::start(&t);
            let mut r = run_case_with(
                &t,
                SUBS,
                window,
                churn.then_some(&start as &dyn Fn() -> Churn),
            );
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            let c = |k: &str| r["churn"][k].as_f64().unwrap_or(0.0);
            println!(
                "{:>10} {:>6} {:>8} {:>8.3} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>10}",
                name,
                churn,
                r["failed"].as_u64().unwrap_or(0),
                f("loss_pct"),
                f("latency_ms_p50"),
                f("latency_ms_p99"),
                c("joins_per_s"),
                c("api_reads_per_s"),
                r["link_drops"].as_u64().unwrap_or(0)
            );
            r["build"] = (*name).into();
            r["binary"] = bin.display().to_string().into();
            rows.push(r);
        }
        let _ = std::fs::remove_file(&cfg);
    }
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(
        out.join("churn.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "date": utc_stamp(), "machine": machine(), "video_kbps": VIDEO_KBPS,
            "window_s": window, "subscribers": SUBS, "rows": rows,
        }))
        .unwrap(),
    )
    .unwrap();
    println!("saved {}/churn.json", out.display());
}

fn main() {
    let mut out = PathBuf::from("bench/results");
    let mut window = 5;
    let (mut churn, mut baseline) = (false, None);
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
            "--churn" => churn = true,
            "--baseline-bin" => {
                baseline = Some(PathBuf::from(args.next().expect("--baseline-bin PATH")))
            }
            other => panic!(
                "unknown argument {other}; use --out DIR, --seconds N, --churn [--baseline-bin PATH]"
            ),
        }
    }
    if churn {
        return churn_cases(&out, window, baseline);
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

    // Socket path on loopback, its clients over UDP and then over ICE-TCP (the same
    // daemon: its TCP listener on 8443).
    {
        let cfg = config("127.0.0.1");
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(edgefwd_bin())
            .args(["run", "--datapath", "user", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn");
        let mut t = Target {
            path: "socket",
            base: "http://127.0.0.1:8080".into(),
            ns: None,
            daemon: spawn_edgefwd(cmd),
            links: Vec::new(),
            tcp: false,
        };
        for subs in cases {
            print(&run_case(&t, subs, window));
        }
        (t.path, t.tcp) = ("tcp", true);
        for subs in cases {
            print(&run_case(&t, subs, window));
        }
        let _ = std::fs::remove_file(&cfg);
    }

    // AF_XDP path: the daemon's XDP program on its veth steers SRTP to the workers.
    {
        let (topo, _pass, pin, cfg) = af_xdp_setup();
        let t = af_xdp_target(&topo, &pin, &cfg, &edgefwd_bin(), true);
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
