//! `cargo xtask bench forward`: packets per second per core through the forwarder, on a
//! generator ⇄ forwarder ⇄ sink veth topology in network namespaces.
//!
//! * Generator: `edgefwd_gen` run with BPF_PROG_TEST_RUN live frames on the generator's
//!   veth (XDP_TX into the forwarder), pinned to its own core. Its rate is proven first
//!   against an XDP_DROP sink (the ceiling case). The userspace path is driven by a
//!   paced sendmmsg generator instead, because its best lossless rate has to be searched.
//! * Forwarder core: the ingress veth's NAPI runs threaded, its kthread pinned to one
//!   core together with the sink's NAPI kthread (so the cost of receiving the copy is
//!   counted, as a real NIC's TX completion would be) and, for the userspace path, the
//!   relay process itself. ns/packet = on-CPU time of those threads / packets delivered.
//! * Same-run baseline: a hand-written C XDP forwarder doing the same job
//!   (tests/bench-ref/ref_forward.c, built by xtask with clang) runs in the same
//!   topology, in rounds alternating with ours, so the comparison is a ratio measured
//!   minutes apart rather than against a figure from another day.
//! * Program alone: one more trial with the kernel's BPF run-time statistics on gives
//!   the mean ns per run of the program on the ingress veth, live (the clock reads
//!   that statistics add are in it, the same for every program).
//!
//! Prints a table, writes `bench/results/forward-<stamp>.{csv,json}`, `forward.{csv,json}`
//! (latest) and `forward.png`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap as AyaHashMap},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use edgefwd::{
    daemon::config::Config,
    dataplane::loader::{self, Counters},
    dataplane::resolve::{self, iface_mac},
};
use edgefwd_tests::{
    PinDir,
    bench::{
        Bar, GEN_CPU, attach_tool, bar_chart, cpu_time, machine, napi_threads, paced_send,
        pin_self, process_threads, search_rate, sink_count, start_daemon, thread_napi, utc_stamp,
    },
    netns::{FWD_A_V4, NetNs, PUB_V4, RCV_V4, Topology},
    pkt::{Frame, Rtp},
};
use forwarder_common::{PROG_DROP, PROG_FORWARD, PROG_PASS, PROG_UDP_VERIFY};
use serde::Serialize;

const SSRC: u32 = 0x0bea_c0de;
/// Frames per BPF_PROG_TEST_RUN call: each call pays ~20 ms of page_pool teardown, so
/// calls must be long.
const GEN_REPEAT: u32 = 4_000_000;
const GEN_BATCH: u32 = 64;
/// Rounds of the kernel cases (one trial of each per round).
const ROUNDS: usize = 3;
const GEN_TEMPLATE_LEN: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
enum Case {
    /// edgefwd_drop on the forwarder's ingress: what the generator and veth can carry.
    XdpDropCeiling,
    /// The forwarder, full rewrite, REDIRECT through the devmap to the second veth.
    XdpForwardRedirect,
    /// The forwarder, full rewrite, XDP_TX back out of the ingress veth.
    XdpForwardTx,
    /// The hand-written C reference forwarder (tests/bench-ref), same job, REDIRECT.
    CRefForwardRedirect,
    /// The C reference, XDP_TX.
    CRefForwardTx,
    /// `edgefwd run --datapath user`: recvmmsg/sendmmsg relay, best rate with ≤1% loss.
    UserRelay,
}

impl Case {
    fn short(self) -> &'static str {
        match self {
            Case::XdpDropCeiling => "drop",
            Case::XdpForwardRedirect => "redirect",
            Case::XdpForwardTx => "tx",
            Case::CRefForwardRedirect => "c-redirect",
            Case::CRefForwardTx => "c-tx",
            Case::UserRelay => "user",
        }
    }

    fn is_c_ref(self) -> bool {
        matches!(self, Case::CRefForwardRedirect | Case::CRefForwardTx)
    }

    fn redirects(self) -> bool {
        matches!(self, Case::XdpForwardRedirect | Case::CRefForwardRedirect)
    }

    fn label(self) -> &'static str {
        match self {
            Case::XdpDropCeiling => "XDP_DROP ceiling",
            Case::XdpForwardRedirect => "XDP forward, rewrite + REDIRECT",
            Case::XdpForwardTx => "XDP forward, rewrite + XDP_TX",
            Case::CRefForwardRedirect => "C reference, rewrite + REDIRECT",
            Case::CRefForwardTx => "C reference, rewrite + XDP_TX",
            Case::UserRelay => "userspace relay (recvmmsg/sendmmsg)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    case: Case,
    label: &'static str,
    /// RTP packet size (header + payload), and the Ethernet frame carrying it.
    rtp_bytes: usize,
    frame_bytes: usize,
    offered_mpps: f64,
    delivered_mpps: f64,
    loss_pct: f64,
    /// On-CPU time on the forwarder core per delivered packet.
    fwd_core_ns_per_pkt: f64,
    /// Share of the forwarder core those threads used during the run.
    fwd_core_busy_pct: f64,
    /// The XDP program on the ingress veth alone, mean ns per run, live (kernel BPF
    /// run-time statistics, in a separate trial).
    prog_ns_per_run: Option<f64>,
    seconds: f64,
}

struct Args {
    seconds: f64,
    out: PathBuf,
    sizes: Vec<usize>,
    cases: Vec<Case>,
    /// The C reference object (clang -target bpf output of tests/bench-ref).
    c_ref: Option<PathBuf>,
}

const ALL_CASES: [Case; 6] = [
    Case::XdpDropCeiling,
    Case::XdpForwardRedirect,
    Case::CRefForwardRedirect,
    Case::XdpForwardTx,
    Case::CRefForwardTx,
    Case::UserRelay,
];

fn parse_args() -> Args {
    let mut a = Args {
        seconds: 3.0,
        out: PathBuf::from("bench/results"),
        sizes: vec![22, 1200],
        cases: ALL_CASES.to_vec(),
        c_ref: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value (see --help)"))
        };
        match arg.as_str() {
            "--seconds" => {
                a.seconds = val("--seconds")
                    .parse()
                    .expect("--seconds takes a number, e.g. 3")
            }
            "--out" => a.out = PathBuf::from(val("--out")),
            "--sizes" => {
                a.sizes = val("--sizes")
                    .split(',')
                    .map(|s| {
                        s.parse()
                            .expect("--sizes takes RTP sizes in bytes, e.g. 22,1200")
                    })
                    .collect()
            }
            "--cases" => {
                a.cases = val("--cases")
                    .split(',')
                    .map(|s| {
                        *ALL_CASES
                            .iter()
                            .find(|c| c.short() == s)
                            .unwrap_or_else(|| {
                                panic!(
                                    "unknown case {s:?} in --cases; known: {}",
                                    ALL_CASES.map(Case::short).join(",")
                                )
                            })
                    })
                    .collect()
            }
            "--c-ref" => a.c_ref = Some(PathBuf::from(val("--c-ref"))),
            "--prog-only" => a.cases.clear(),
            "--help" | "-h" => {
                println!(
                    "edgefwd-bench [--seconds S] [--out DIR] [--sizes 22,1200] [--cases {}]\n\
                     \x20             [--c-ref OBJECT] [--prog-only]\n\
                     Run as root; `cargo xtask bench forward` does the setup and builds the C\n\
                     reference object.",
                    ALL_CASES.map(Case::short).join(",")
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other} (see --help)"),
        }
    }
    if a.c_ref.is_none() && a.cases.iter().any(|c| c.is_c_ref()) {
        panic!(
            "the C reference cases need --c-ref OBJECT (`cargo xtask bench forward` builds \
             tests/bench-ref/ref_forward.c and passes it), or leave them out with --cases"
        );
    }
    for s in &a.sizes {
        assert!(
            (12 + 4..=1400).contains(s),
            "RTP size {s} out of range: 16..=1400 bytes"
        );
    }
    a
}

fn main() {
    let args = parse_args();
    edgefwd_tests::require_root();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "the benchmark pins the generator and the forwarder to different cores: it needs 2"
    );
    pin_self(GEN_CPU);
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    for &size in &args.sizes {
        // Kernel cases in rounds, one trial of each per round, so drift on the host hits
        // ours and the C reference alike; the best trial of each is kept, because on a
        // shared VM noise only ever adds time.
        let cost = prog_costs(size, args.c_ref.as_deref());
        print_cost(&cost);
        costs.push(cost);
        let mut best: Vec<Row> = Vec::new();
        for round in 1..=ROUNDS {
            for &case in args.cases.iter().filter(|c| **c != Case::UserRelay) {
                let r = kernel_case(case, size, args.seconds, args.c_ref.as_deref());
                print!("round {round}/{ROUNDS}: ");
                print_row(&r);
                match best.iter_mut().find(|b| b.case == case) {
                    Some(b) if b.fwd_core_ns_per_pkt <= r.fwd_core_ns_per_pkt => {}
                    Some(b) => *b = r,
                    None => best.push(r),
                }
            }
        }
        rows.extend(best);
        if args.cases.contains(&Case::UserRelay) {
            let row = user_case(size, args.seconds.min(2.0));
            print_row(&row);
            rows.push(row);
        }
    }
    println!();
    if rows.is_empty() {
        // --prog-only: a quick comparison, nothing saved.
        for line in summarise(&rows, &costs) {
            println!("{line}");
        }
        return;
    }
    print_table(&rows);
    let summary = summarise(&rows, &costs);
    for line in &summary {
        println!("{line}");
    }
    save(&args.out, &rows, &costs, &summary);
}

// ---------------------------------------------------------------------------------------
// Kernel cases

fn kernel_case(case: Case, rtp_bytes: usize, seconds: f64, c_ref: Option<&Path>) -> Row {
    let t = Topology::new();
    let pin = PinDir::new();
    // The sink, and the generator's own peer program.
    let (sink_ns, sink_dev) = match case {
        Case::XdpDropCeiling => (&t.forwarder, "f0"),
        Case::XdpForwardRedirect | Case::CRefForwardRedirect => (&t.receiver, "r0"),
        Case::XdpForwardTx | Case::CRefForwardTx => (&t.publisher, "p0"),
        Case::UserRelay => unreachable!(),
    };
    // Neighbours first: once a sink drops everything, ARP through it fails too.
    t.settle();
    // A veth peer needs an XDP program of its own for XDP_TX/REDIRECT frames to land:
    // the sink is one such peer, the other gets XDP_PASS.
    let mut keep = Vec::new();
    for (ns, dev) in [(&t.publisher, "p0"), (&t.receiver, "r0")] {
        if dev != sink_dev {
            keep.push(attach_tool(ns, PROG_PASS, dev));
        }
    }
    let sink = attach_tool(sink_ns, PROG_DROP, sink_dev);

    let mut daemon = None;
    let mut c_prog = None;
    let before_napi = napi_threads();
    if case != Case::XdpDropCeiling {
        let (out_src, out_dst) = if case.redirects() {
            ("203.0.113.2:5006", "203.0.113.1:6000")
        } else {
            ("198.51.100.2:5006", "198.51.100.1:6000")
        };
        let config = route_config(out_src, out_dst);
        if case.is_c_ref() {
            c_prog = Some(load_c_ref(&t.forwarder, c_ref.unwrap(), &config, true));
        } else {
            daemon = Some(start_daemon(&t.forwarder, pin.path(), &config, &[]));
        }
    }
    // Threaded NAPI on the forwarder's ingress veth, pinned to the forwarder core. The
    // sink's NAPI is scheduled from that thread and runs as its softirq on the way out,
    // so the sink's cost is counted there too (as a NIC's TX completion would be).
    let napi = thread_napi(&[(&t.forwarder, "f0")], &before_napi);

    let frame = gen_frame(&t, rtp_bytes, 64);
    let sink_before = sink_count(&sink);
    let cpu_before = cpu_time(&napi);
    let (frames, elapsed) = generate(&t.publisher, &frame, seconds);
    std::thread::sleep(Duration::from_millis(100));
    let delivered = sink_count(&sink) - sink_before;
    let cpu = cpu_time(&napi) - cpu_before;
    let mut r = row(
        case,
        rtp_bytes,
        frame.len(),
        frames,
        delivered,
        cpu,
        elapsed,
    );
    // The program on f0 alone, live: the kernel's own run-time statistics, on for one
    // extra trial only (timing every run costs two clock reads per packet).
    let prog = match case {
        Case::XdpDropCeiling => PROG_DROP,
        Case::XdpForwardRedirect | Case::XdpForwardTx => PROG_FORWARD,
        _ => C_REF_PROG,
    };
    let stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (kernel >= 5.8)");
    let before = prog_runtime(prog);
    generate(&t.publisher, &frame, seconds.min(1.0));
    let after = prog_runtime(prog);
    drop(stats);
    if let Some(mut d) = daemon {
        d.stop();
    }
    drop(c_prog);
    drop(keep);
    let runs = after.1 - before.1;
    assert!(runs > 0, "{prog} did not run during the statistics trial");
    r.prog_ns_per_run = Some((after.0 - before.0) as f64 / runs as f64);
    r
}

/// (ns, runs) summed over every loaded program of that name: only the attached one
/// runs, the others (the same object loaded for peers and sinks) add nothing.
fn prog_runtime(name: &str) -> (u64, u64) {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| p.name_as_str() == Some(name))
        .fold((0, 0), |(t, n), p| {
            (t + p.run_time().as_nanos() as u64, n + p.run_count())
        })
}

// ---------------------------------------------------------------------------------------
// The C reference forwarder (tests/bench-ref/ref_forward.c)

const C_REF_PROG: &str = "ref_forward";

/// Its `struct ref_key`, all network order.
#[repr(C)]
#[derive(Clone, Copy)]
struct CRefKey {
    listen_addr: [u8; 4],
    src_addr: [u8; 4],
    listen_port: [u8; 2],
    src_port: [u8; 2],
    ssrc: [u8; 4],
}
// SAFETY: #[repr(C)], byte arrays only, no padding (size asserted below): any bits
// are a valid value.
unsafe impl aya::Pod for CRefKey {}

/// Its `struct ref_route`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CRefRoute {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    out_src_addr: [u8; 4],
    out_dst_addr: [u8; 4],
    out_src_port: [u8; 2],
    out_dst_port: [u8; 2],
    ssrc_out: [u8; 4],
    ts_delta: u32,
    seq_delta: u16,
    pt_from: u8,
    pt_to: u8,
    egress_ifindex: u32,
    stats_slot: u32,
}
// SAFETY: #[repr(C)], integers and byte arrays laid out without padding (size
// asserted below): any bits are a valid value.
unsafe impl aya::Pod for CRefRoute {}
const _: () = assert!(std::mem::size_of::<CRefKey>() == 16);
const _: () = assert!(std::mem::size_of::<CRefRoute>() == 44);

fn v4(a: std::net::SocketAddr) -> [u8; 4] {
    match a.ip() {
        std::net::IpAddr::V4(v) => v.octets(),
        std::net::IpAddr::V6(_) => panic!("the C reference forwards IPv4 only"),
    }
}

/// Loads the C reference on f0 and programs its route from the same config the daemon
/// gets, resolved by the daemon's own code (egress, MACs).
fn load_c_ref(ns: &NetNs, object: &Path, config: &str, attach: bool) -> Ebpf {
    let (object, config) = (object.to_path_buf(), config.to_string());
    ns.run(move || {
        let mut e = Ebpf::load_file(&object).unwrap_or_else(|err| {
            panic!(
                "loading the C reference {}: {err} (built by `cargo xtask bench forward`)",
                object.display()
            )
        });
        let p: &mut Xdp = e.program_mut(C_REF_PROG).unwrap().try_into().unwrap();
        p.load().expect("the verifier rejected the C reference");
        if attach {
            p.attach("f0", XdpMode::Driver)
                .expect("attaching the C reference to f0 in native mode");
        }
        // The MAC filter's registration, as the daemon makes it for its own program.
        let f0 = edgefwd::dataplane::preflight::ifindex("f0").expect("f0");
        let mut ifmac: Array<_, forwarder_common::ifmac::IfMac> =
            Array::try_from(e.map_mut("REF_IFMAC").expect("REF_IFMAC")).unwrap();
        ifmac
            .set(
                f0,
                forwarder_common::ifmac::IfMac {
                    mac: iface_mac("f0").expect("f0 MAC"),
                    flags: forwarder_common::ifmac::IFMAC_SET,
                    _pad: 0,
                },
                0,
            )
            .unwrap();
        for (slot, rc) in Config::parse(&config)
            .expect("bench route config")
            .routes
            .iter()
            .enumerate()
        {
            let route = resolve::resolve(rc).expect("resolving the bench route");
            let mut egress =
                DevMapHash::try_from(e.map_mut("REF_EGRESS").expect("REF_EGRESS")).unwrap();
            egress
                .insert(route.egress_ifindex, route.egress_ifindex, None, 0)
                .unwrap();
            let mut routes: AyaHashMap<_, CRefKey, CRefRoute> =
                AyaHashMap::try_from(e.map_mut("REF_ROUTES").expect("REF_ROUTES")).unwrap();
            let (pt_from, pt_to) = route.pt_remap.unwrap_or((0xff, 0));
            routes
                .insert(
                    CRefKey {
                        listen_addr: v4(route.listen),
                        src_addr: v4(route.source),
                        listen_port: route.listen.port().to_be_bytes(),
                        src_port: route.source.port().to_be_bytes(),
                        ssrc: route.ssrc.to_be_bytes(),
                    },
                    CRefRoute {
                        dst_mac: route.dst_mac,
                        src_mac: route.src_mac,
                        out_src_addr: v4(route.out_src),
                        out_dst_addr: v4(route.out_dst),
                        out_src_port: route.out_src.port().to_be_bytes(),
                        out_dst_port: route.out_dst.port().to_be_bytes(),
                        ssrc_out: route.ssrc_out.to_be_bytes(),
                        ts_delta: route.ts_delta,
                        seq_delta: route.seq_delta,
                        pt_from,
                        pt_to,
                        egress_ifindex: route.egress_ifindex,
                        stats_slot: slot as u32,
                    },
                    0,
                )
                .unwrap();
        }
        e
    })
}

// ---------------------------------------------------------------------------------------
// The program alone

/// Program cost alone, BPF_PROG_TEST_RUN (not live): the kernel runs the program
/// `PROG_REPEAT` times over one frame and reports the mean. Each run rewrites the frame
/// it is given, so the routes come in a pair that maps the frame to its mirror image and
/// back (A → B → A …, every field rewritten each time); the frame starts with TTL 255,
/// which covers the repeat count. Calls alternate between the programs and the least
/// mean of each is kept: noise only ever adds time.
#[derive(Clone, Copy, Debug, Serialize)]
struct ProgCost {
    rtp_bytes: usize,
    drop_ns: f64,
    ours_ns: f64,
    c_ref_ns: Option<f64>,
    /// edgefwd_udp_verify: the UDP checksum verified over every byte (the cost of the
    /// policy the forwarder does not take).
    udp_verify_ns: f64,
}

const PROG_ROUNDS: usize = 200;
const PROG_REPEAT: u32 = 250;

fn ping_pong_config(f0_mac: &str) -> String {
    let (s1, s2) = (SSRC, 0x5eed_0001u32);
    format!(
        r#"
[[listener]]
addr = "{FWD_A_V4}:5004"
[[listener]]
addr = "{FWD_A_V4}:6002"

[[route]]
listen = "{FWD_A_V4}:5004"
source = "{PUB_V4}:40000"
ssrc = {s1}
out_src = "{PUB_V4}:6000"
out_dst = "{FWD_A_V4}:6002"
ssrc_out = {s2}
seq_delta = 40000
ts_delta = 4294960000
pt_from = 96
pt_to = 100
egress = "f0"
dst_mac = "{f0_mac}"

[[route]]
listen = "{FWD_A_V4}:6002"
source = "{PUB_V4}:6000"
ssrc = {s2}
out_src = "{PUB_V4}:40000"
out_dst = "{FWD_A_V4}:5004"
ssrc_out = {s1}
seq_delta = 25536
ts_delta = 7296
pt_from = 100
pt_to = 96
egress = "f0"
dst_mac = "{f0_mac}"
"#
    )
}

fn prog_costs(rtp_bytes: usize, c_ref: Option<&Path>) -> ProgCost {
    let t = Topology::new();
    let pin = PinDir::new();
    let mac = t.forwarder.run(|| iface_mac("f0").expect("f0 MAC"));
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    let config = ping_pong_config(&mac);
    let mut daemon = start_daemon(&t.forwarder, pin.path(), &config, &[]);
    let mut c = c_ref.map(|o| load_c_ref(&t.forwarder, o, &config, false));
    let frame = gen_frame(&t, rtp_bytes, 255);
    let pin_dir = pin.path().to_path_buf();
    let mut ours = t
        .forwarder
        .run(move || loader::load(&pin_dir, Counters::Private).expect("load"));
    let mut tools = t
        .forwarder
        .run(|| loader::load_tools().expect("load tools"));
    let (mut drop_ns, mut ours_ns, mut c_ns) = (f64::MAX, f64::MAX, f64::MAX);
    let mut verify_ns = f64::MAX;
    for _ in 0..PROG_ROUNDS {
        let p = loader::program(&mut tools, PROG_DROP).unwrap();
        drop_ns = drop_ns.min(test_run_ns(p, &frame, XDP_DROP));
        let p = loader::program(&mut ours, PROG_FORWARD).unwrap();
        ours_ns = ours_ns.min(test_run_ns(p, &frame, XDP_REDIRECT));
        // The ping-pong frame is valid in both of its states; it verifies (XDP_DROP).
        let p = loader::program(&mut tools, PROG_UDP_VERIFY).unwrap();
        verify_ns = verify_ns.min(test_run_ns(p, &frame, XDP_DROP));
        if let Some(e) = &mut c {
            let p: &mut Xdp = e.program_mut(C_REF_PROG).unwrap().try_into().unwrap();
            c_ns = c_ns.min(test_run_ns(p, &frame, XDP_REDIRECT));
        }
    }
    daemon.stop();
    ProgCost {
        rtp_bytes,
        drop_ns,
        ours_ns,
        c_ref_ns: c.map(|_| c_ns),
        udp_verify_ns: verify_ns,
    }
}

const XDP_DROP: u32 = 1;
const XDP_REDIRECT: u32 = 4;

fn test_run_ns(p: &Xdp, frame: &[u8], want: u32) -> f64 {
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: PROG_REPEAT,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    // The last run's verdict: if the ping-pong broke, the program would have fallen
    // off the timed path (pass or drop) long before.
    assert_eq!(
        r.return_value, want,
        "the program left the timed path (XDP action {} instead of {want})",
        r.return_value
    );
    if want == XDP_REDIRECT {
        // An even number of runs brings the frame back to itself, TTL aside.
        assert_eq!(out[26..34], frame[26..34], "addresses after the ping-pong");
        assert_eq!(
            out[14 + 8],
            255 - PROG_REPEAT as u8,
            "TTL after the ping-pong"
        );
    }
    r.duration.as_nanos() as f64
}

fn row(
    case: Case,
    rtp_bytes: usize,
    frame_bytes: usize,
    offered: u64,
    delivered: u64,
    cpu_ns: u64,
    elapsed: f64,
) -> Row {
    assert!(
        delivered > 0,
        "{}: nothing reached the sink; the topology or the route is broken",
        case.label()
    );
    Row {
        case,
        label: case.label(),
        rtp_bytes,
        frame_bytes,
        offered_mpps: offered as f64 / elapsed / 1e6,
        delivered_mpps: delivered as f64 / elapsed / 1e6,
        loss_pct: 100.0 * (1.0 - delivered as f64 / offered.max(1) as f64).max(0.0),
        fwd_core_ns_per_pkt: cpu_ns as f64 / delivered as f64,
        fwd_core_busy_pct: 100.0 * cpu_ns as f64 / (elapsed * 1e9),
        prog_ns_per_run: None,
        seconds: elapsed,
    }
}

fn route_config(out_src: &str, out_dst: &str) -> String {
    format!(
        r#"
[[listener]]
addr = "{FWD_A_V4}:5004"
drop_unknown_source = true

[[route]]
listen = "{FWD_A_V4}:5004"
source = "{PUB_V4}:40000"
ssrc = {SSRC}
out_src = "{out_src}"
out_dst = "{out_dst}"
ssrc_out = 0x5eed0001
seq_delta = 40000
ts_delta = 4294960000
pt_from = 96
pt_to = 100
"#
    )
}

/// The generator's frame: publisher → forwarder listener, matching the route.
fn gen_frame(t: &Topology, rtp_bytes: usize, ttl: u8) -> Vec<u8> {
    let eth_src = t.publisher.run(|| iface_mac("p0").expect("p0 MAC"));
    let eth_dst = t.forwarder.run(|| iface_mac("f0").expect("f0 MAC"));
    let mut rtp = Rtp::new(SSRC, 65_000, 4_000_000_000, rtp_bytes - 12);
    rtp.pt = 96;
    Frame {
        eth_src,
        eth_dst,
        vlan: None,
        src: PUB_V4.parse().unwrap(),
        dst: FWD_A_V4.parse().unwrap(),
        ttl,
        sport: 40000,
        dport: 5004,
    }
    .build(&rtp.bytes())
}

/// The generator that ran: live frames, or AF_XDP where the kernel refuses those.
static GENERATOR: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Sends `frame` from the publisher's veth for `seconds`, on the generator core:
/// `edgefwd_gen` over BPF_PROG_TEST_RUN live frames (XDP_TX into the forwarder), or,
/// where the kernel refuses live test runs, the frame's UDP payload written to an
/// AF_XDP socket's TX ring on p0 (copy mode: one skb per frame, through the veth like
/// a socket's packet). Returns (frames sent, seconds).
fn generate(ns: &NetNs, frame: &[u8], seconds: f64) -> (u64, f64) {
    let frame = frame.to_vec();
    ns.run(move || {
        pin_self(GEN_CPU);
        let mut e = loader::load_tools().expect("load generator");
        let mut tpl: Array<_, [u8; GEN_TEMPLATE_LEN]> =
            Array::try_from(e.map_mut("EFWD_GENTPL_V1").expect("EFWD_GENTPL_V1")).unwrap();
        let mut head = [0u8; GEN_TEMPLATE_LEN];
        head.copy_from_slice(&frame[..GEN_TEMPLATE_LEN]);
        tpl.set(0, head, 0).unwrap();
        let ifindex = edgefwd::dataplane::preflight::ifindex("p0").expect("p0");
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. Live frames want data = 0 and data_end = the frame length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let prog = loader::program(&mut e, "edgefwd_gen").unwrap();
        let live = |repeat| {
            prog.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
                ..Default::default()
            })
        };
        if let Err(err) = live(1) {
            if GENERATOR.set("af_xdp").is_ok() {
                println!(
                    "  generator: BPF_PROG_TEST_RUN with live frames refused ({err:?}); AF_XDP copy-mode TX instead"
                );
            }
            return generate_xsk(ifindex, &frame, seconds);
        }
        let _ = GENERATOR.set("live_frames");
        let start = Instant::now();
        let mut frames = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            // Live mode reports no per-frame action (return_value stays 0): whether
            // the frames went out is what the sink counts.
            live(GEN_REPEAT).expect("BPF_PROG_TEST_RUN with live frames (kernel >= 5.18)");
            frames += GEN_REPEAT as u64;
        }
        (frames, start.elapsed().as_secs_f64())
    })
}

/// The AF_XDP generator: `frame`'s addresses and UDP payload, written by the same
/// header code as the WebRTC workers, batches of 64 and a kick per batch.
fn generate_xsk(ifindex: u32, frame: &[u8], seconds: f64) -> (u64, f64) {
    use edgefwd::{datapath::xsk::XskQueue, media::Transmit as _};
    let g = edgefwd::datapath::xsk::parse(frame).expect("the generator frame is UDP");
    let mut q = XskQueue::open(ifindex, 0, g.from, g.src_mac).expect("AF_XDP on p0");
    q.set_neighbour(g.to.ip(), frame[..6].try_into().unwrap());
    let payload = &frame[g.payload];
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..GEN_BATCH {
            q.transmit(g.to, &mut |buf: &mut [u8]| {
                buf[..payload.len()].copy_from_slice(payload);
                Some(payload.len())
            });
        }
        q.flush();
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last frames complete before the socket goes.
    std::thread::sleep(Duration::from_millis(50));
    q.flush();
    (q.stats.tx, elapsed)
}

// ---------------------------------------------------------------------------------------
// Userspace relay

fn user_case(rtp_bytes: usize, seconds: f64) -> Row {
    let t = Topology::new();
    let pin = PinDir::new();
    // f0 runs XDP_PASS so the veth receives in NAPI (which we thread and pin like the
    // kernel cases); r0 is the counting sink.
    t.settle();
    // The sink drops ARP too: pin the receiver's MAC so the stack's neighbour entry cannot
    // go stale and fail in the middle of the rate search.
    let r0_mac = t.receiver.run(|| iface_mac("r0").expect("r0 MAC"));
    let mac = r0_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    t.forwarder.exec(&[
        "ip",
        "neigh",
        "replace",
        RCV_V4,
        "lladdr",
        &mac,
        "dev",
        "f1",
        "nud",
        "permanent",
    ]);
    let mut keep = vec![
        attach_tool(&t.forwarder, PROG_PASS, "f0"),
        attach_tool(&t.publisher, PROG_PASS, "p0"),
    ];
    let sink = attach_tool(&t.receiver, PROG_DROP, "r0");
    let before_napi = napi_threads();
    let mut daemon = start_daemon(
        &t.forwarder,
        pin.path(),
        &route_config("203.0.113.2:5006", &format!("{RCV_V4}:6000")),
        &["--datapath", "user"],
    );
    let napi = thread_napi(&[(&t.forwarder, "f0"), (&t.receiver, "r0")], &before_napi);
    let mut rtp = Rtp::new(SSRC, 1, 1, rtp_bytes - 12);
    rtp.pt = 96;
    let payload = rtp.bytes();
    let mut threads = napi.clone();
    threads.extend(process_threads(daemon.id()));

    // Search the best rate with ≤1% loss: grow until loss, then bisect.
    let trial = |pps: f64| -> (Trial, f64) {
        let sink_before = sink_count(&sink);
        let cpu_before = cpu_time(&threads);
        let (sent, elapsed) = paced_send(&t.publisher, &payload, pps, seconds);
        std::thread::sleep(Duration::from_millis(200));
        let delivered = sink_count(&sink) - sink_before;
        let cpu = cpu_time(&threads) - cpu_before;
        let tr = Trial {
            sent,
            delivered,
            cpu,
            elapsed,
        };
        let loss = tr.loss();
        println!(
            "  user relay {rtp_bytes} B: offered {:>7.0} pps (asked {pps:>7.0}), delivered {:>7.0} pps, loss {:.2}%",
            sent as f64 / elapsed,
            delivered as f64 / elapsed,
            100.0 * loss
        );
        (tr, loss)
    };
    // The generator tops out near 0.46 Mpps; if it fell short of the asked rate the
    // relay was not the limit yet.
    let (best, _) = search_rate(25_000.0, 5, |pps| {
        let (tr, loss) = trial(pps);
        let gen_limited = (tr.sent as f64 / tr.elapsed) < 0.9 * pps;
        (tr, loss, gen_limited)
    });
    daemon.stop();
    drop(keep.drain(..));
    let tr = best.expect("the userspace relay lost more than 1% even at 25 kpps: broken");
    row(
        Case::UserRelay,
        rtp_bytes,
        payload.len() + 42,
        tr.sent,
        tr.delivered,
        tr.cpu,
        tr.elapsed,
    )
}

#[derive(Clone, Copy)]
struct Trial {
    sent: u64,
    delivered: u64,
    cpu: u64,
    elapsed: f64,
}

impl Trial {
    fn loss(&self) -> f64 {
        (1.0 - self.delivered as f64 / self.sent.max(1) as f64).max(0.0)
    }
}

// ---------------------------------------------------------------------------------------
// Daemon, threads, CPU accounting

// ---------------------------------------------------------------------------------------
// Output

fn print_row(r: &Row) {
    println!(
        "{:<38} {:>5} B  offered {:>6.3} Mpps  delivered {:>6.3} Mpps  loss {:>5.1}%  {:>7.0} ns/pkt on the forwarder core ({:.0}% busy), program {}",
        r.label,
        r.rtp_bytes,
        r.offered_mpps,
        r.delivered_mpps,
        r.loss_pct,
        r.fwd_core_ns_per_pkt,
        r.fwd_core_busy_pct,
        r.prog_ns_per_run
            .map_or("-".into(), |n| format!("{n:.0} ns/run"))
    );
}

fn print_cost(c: &ProgCost) {
    println!(
        "program alone, {} B RTP (BPF_PROG_TEST_RUN, mean of {PROG_REPEAT} runs, least of {PROG_ROUNDS}): \
         edgefwd_drop {:.1} ns, edgefwd_xdp {:.1} ns, C reference {}, UDP checksum verify {:.1} ns",
        c.rtp_bytes,
        c.drop_ns,
        c.ours_ns,
        c.c_ref_ns.map_or("-".into(), |n| format!("{n:.1} ns")),
        c.udp_verify_ns
    );
}

fn print_table(rows: &[Row]) {
    println!(
        "| {:<38} | {:>8} | {:>9} | {:>12} | {:>14} | {:>6} | {:>10} | {:>9} | {:>12} |",
        "case",
        "RTP B",
        "frame B",
        "offered Mpps",
        "delivered Mpps",
        "loss %",
        "ns/packet",
        "core busy",
        "prog ns/run"
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|{}|{}|{}|",
        "-".repeat(40),
        "-".repeat(10),
        "-".repeat(11),
        "-".repeat(14),
        "-".repeat(16),
        "-".repeat(8),
        "-".repeat(12),
        "-".repeat(11),
        "-".repeat(14)
    );
    for r in rows {
        println!(
            "| {:<38} | {:>8} | {:>9} | {:>12.3} | {:>14.3} | {:>6.1} | {:>10.0} | {:>8.0}% | {:>12} |",
            r.label,
            r.rtp_bytes,
            r.frame_bytes,
            r.offered_mpps,
            r.delivered_mpps,
            r.loss_pct,
            r.fwd_core_ns_per_pkt,
            r.fwd_core_busy_pct,
            r.prog_ns_per_run.map_or("-".into(), |n| format!("{n:.0}"))
        );
    }
}

fn find(rows: &[Row], case: Case, size: usize) -> Option<&Row> {
    rows.iter().find(|r| r.case == case && r.rtp_bytes == size)
}

/// Ratios measured in this run: kernel forward vs the C reference, the userspace relay
/// and the ceiling.
fn summarise(rows: &[Row], costs: &[ProgCost]) -> Vec<String> {
    let mut out = Vec::new();
    for c in costs {
        out.push(format!(
            "{} B RTP: verifying the UDP checksum in XDP costs {:.1} ns per packet above the \
             empty program, {:.0}% of what the whole forward costs above it ({:.1} ns)",
            c.rtp_bytes,
            c.udp_verify_ns - c.drop_ns,
            100.0 * (c.udp_verify_ns - c.drop_ns) / (c.ours_ns - c.drop_ns),
            c.ours_ns - c.drop_ns
        ));
        if let Some(cn) = c.c_ref_ns {
            out.push(format!(
                "{} B RTP, program alone: edgefwd_xdp {:.1} ns vs C reference {:.1} ns per run \
                 ({:.0}% of C's speed); above the empty program ({:.1} ns): {:.1} vs {:.1} ns",
                c.rtp_bytes,
                c.ours_ns,
                cn,
                100.0 * cn / c.ours_ns,
                c.drop_ns,
                c.ours_ns - c.drop_ns,
                cn - c.drop_ns
            ));
        }
    }
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.rtp_bytes).collect();
    sizes.dedup();
    for s in sizes {
        for (ours, c, how) in [
            (
                Case::XdpForwardRedirect,
                Case::CRefForwardRedirect,
                "REDIRECT",
            ),
            (Case::XdpForwardTx, Case::CRefForwardTx, "XDP_TX"),
        ] {
            if let (Some(o), Some(c)) = (find(rows, ours, s), find(rows, c, s)) {
                out.push(format!(
                    "{s} B RTP, {how}: edgefwd {:.2} Mpps vs C reference {:.2} Mpps = {:.0}% of C \
                     by rate; {:.0} vs {:.0} ns/pkt on the forwarder core = {:.0}% of C by CPU; \
                     program alone {} vs {} ns",
                    o.delivered_mpps,
                    c.delivered_mpps,
                    100.0 * o.delivered_mpps / c.delivered_mpps,
                    o.fwd_core_ns_per_pkt,
                    c.fwd_core_ns_per_pkt,
                    100.0 * c.fwd_core_ns_per_pkt / o.fwd_core_ns_per_pkt,
                    o.prog_ns_per_run.map_or("-".into(), |n| format!("{n:.0}")),
                    c.prog_ns_per_run.map_or("-".into(), |n| format!("{n:.0}")),
                ));
            }
        }
        let (Some(fwd), Some(ceil)) = (
            find(rows, Case::XdpForwardRedirect, s),
            find(rows, Case::XdpDropCeiling, s),
        ) else {
            continue;
        };
        let mut line = format!(
            "{s} B RTP: XDP forward {:.2} Mpps delivered ({:.0} ns/pkt); {:.0}% of the XDP_DROP ceiling",
            fwd.delivered_mpps,
            fwd.fwd_core_ns_per_pkt,
            100.0 * fwd.delivered_mpps / ceil.delivered_mpps
        );
        if let Some(u) = find(rows, Case::UserRelay, s) {
            line += &format!(
                "; {:.1}x the userspace relay's best lossless rate ({:.3} Mpps), {:.1}x per packet CPU ({:.0} vs {:.0} ns)",
                fwd.delivered_mpps / u.delivered_mpps,
                u.delivered_mpps,
                u.fwd_core_ns_per_pkt / fwd.fwd_core_ns_per_pkt,
                u.fwd_core_ns_per_pkt,
                fwd.fwd_core_ns_per_pkt
            );
        }
        out.push(line);
    }
    out
}

fn save(dir: &Path, rows: &[Row], costs: &[ProgCost], summary: &[String]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let stamp = utc_stamp();
    let mut csv = String::from(
        "case,rtp_bytes,frame_bytes,offered_mpps,delivered_mpps,loss_pct,fwd_core_ns_per_pkt,fwd_core_busy_pct,prog_ns_per_run,seconds\n",
    );
    for r in rows {
        csv += &format!(
            "{:?},{},{},{:.4},{:.4},{:.2},{:.1},{:.1},{},{:.2}\n",
            r.case,
            r.rtp_bytes,
            r.frame_bytes,
            r.offered_mpps,
            r.delivered_mpps,
            r.loss_pct,
            r.fwd_core_ns_per_pkt,
            r.fwd_core_busy_pct,
            r.prog_ns_per_run
                .map_or(String::new(), |n| format!("{n:.1}")),
            r.seconds
        );
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "date_utc": stamp,
        "machine": machine(),
        // How frames were made: BPF_PROG_TEST_RUN live frames, or AF_XDP TX.
        "generator": GENERATOR.get(),
        "rows": rows,
        "program_alone": costs,
        "summary": summary,
    }))
    .unwrap();
    for name in [format!("forward-{stamp}"), "forward".to_string()] {
        std::fs::write(dir.join(format!("{name}.csv")), &csv).unwrap();
        std::fs::write(dir.join(format!("{name}.json")), &json).unwrap();
    }
    let png = dir.join("forward.png");
    match chart(&png, rows) {
        Ok(()) => println!(
            "saved {0}/forward.{{csv,json,png}} and {0}/forward-{stamp}.*",
            dir.display()
        ),
        Err(e) => panic!("rendering {}: {e}", png.display()),
    }
}

fn chart(path: &Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| {
            let (short, rgb) = match r.case {
                Case::XdpDropCeiling => ("DROP ceiling", (150, 150, 150)),
                Case::XdpForwardRedirect => ("fwd REDIRECT", (31, 119, 180)),
                Case::XdpForwardTx => ("fwd XDP_TX", (44, 160, 44)),
                Case::CRefForwardRedirect => ("C ref REDIRECT", (158, 202, 225)),
                Case::CRefForwardTx => ("C ref XDP_TX", (161, 217, 155)),
                Case::UserRelay => ("user relay", (214, 39, 40)),
            };
            Bar {
                label: format!("{short} {}B", r.rtp_bytes),
                value: r.delivered_mpps,
                rgb,
            }
        })
        .collect();
    bar_chart(
        path,
        1100,
        &format!(
            "edgefwd: delivered Mpps, forwarder on one core ({})",
            machine()
        ),
        "Mpps delivered",
        &bars,
    )
}
