//! Benchmark support shared by the bench binaries: core pinning, threaded NAPI, CPU
//! accounting from schedstat, the sink and pass programs, a paced UDP generator, and
//! the daemon started on the forwarder core.

use std::{
    collections::{HashMap, HashSet},
    net::UdpSocket,
    os::fd::AsRawFd as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::PerCpuArray};
use edgefwd::dataplane::loader;
use forwarder_common::verdicts::VerdictStats;

use crate::{
    Edgefwd,
    netns::{FWD_A_V4, NetNs, PUB_V4},
};

/// The generator (and, where said, the receivers) run here.
pub const GEN_CPU: usize = 0;
/// The forwarder under test runs here.
pub const FWD_CPU: usize = 1;

/// Attaches one of the test/benchmark programs (their own object) to `dev`.
pub fn attach_tool(ns: &NetNs, prog: &'static str, dev: &'static str) -> Ebpf {
    ns.run(move || {
        let mut e = loader::load_tools().expect("load the test/benchmark XDP object");
        loader::attach(&mut e, prog, dev).expect("attach");
        e
    })
}

/// A counting sink for skb traffic on `dev` (TC ingress, `edgefwd_tc_drop`) whose
/// receive work RPS moves to the generator core, off the forwarder's. The backlog
/// must hold a whole fan-out burst: `net.core.netdev_max_backlog` is raised (global).
pub fn attach_tc_sink(ns: &NetNs, dev: &'static str) -> Ebpf {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(format!(
            "echo {:x} > /sys/class/net/{dev}/queues/rx-0/rps_cpus",
            1u32 << GEN_CPU
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "RPS on {dev}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("sysctl")
        .args(["-qw", "net.core.netdev_max_backlog=65536"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "netdev_max_backlog: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.run(move || {
        let mut e = loader::load_tools().expect("load the test/benchmark object");
        loader::attach_tc(&mut e, "edgefwd_tc_drop", dev).expect("attach the TC sink");
        e
    })
}

pub fn sink_count(e: &Ebpf) -> u64 {
    let m: PerCpuArray<_, VerdictStats> =
        PerCpuArray::try_from(e.map("EFWD_SINK_V1").expect("EFWD_SINK_V1 map")).unwrap();
    m.get(&0, 0).unwrap().iter().map(|s| s.packets).sum()
}

/// A paced sendmmsg generator on the generator core: every 200 µs it sends what is due.
pub fn paced_send(ns: &NetNs, payload: &[u8], pps: f64, seconds: f64) -> (u64, f64) {
    let payload = payload.to_vec();
    ns.run(move || {
        pin_self(GEN_CPU);
        let s = UdpSocket::bind(format!("{PUB_V4}:40000")).expect("bind generator socket");
        s.connect(format!("{FWD_A_V4}:5004")).unwrap();
        const B: usize = 64;
        let mut iov: Vec<libc::iovec> = (0..B)
            .map(|_| libc::iovec {
                iov_base: payload.as_ptr() as *mut _,
                iov_len: payload.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..B)
            .map(|i| {
                // SAFETY: mmsghdr is plain C data; all-zero is a valid empty header, filled in below.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &mut iov[i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let start = Instant::now();
        let mut sent = 0u64;
        loop {
            let el = start.elapsed().as_secs_f64();
            if el >= seconds {
                break;
            }
            let due = (el * pps) as u64;
            while sent < due {
                let n = ((due - sent) as usize).min(B);
                // SAFETY: msgs holds n ≤ B initialised headers whose iovecs point into buffers alive for the call.
                let r = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
                if r <= 0 {
                    // ENOBUFS and friends: the generator is saturated; try again later.
                    break;
                }
                sent += r as u64;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        (sent, start.elapsed().as_secs_f64())
    })
}

pub fn start_daemon(ns: &NetNs, pin: &Path, config: &str, extra: &[&str]) -> Edgefwd {
    crate::start_node(ns, pin, "f0", config, extra, Some(FWD_CPU))
}

pub fn set_affinity(pid: i32, cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data, zeroed is its empty set; sched_setaffinity reads it for its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

pub fn pin_self(cpu: usize) {
    assert!(set_affinity(0, cpu), "pinning to CPU {cpu} failed");
}

/// NAPI kthreads by pid → name ("napi/<dev>-<id>").
pub fn napi_threads() -> HashMap<i32, String> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm"))
            && comm.starts_with("napi/")
        {
            out.insert(pid, comm.trim().to_string());
        }
    }
    out
}

/// Turns on threaded NAPI for each device (after XDP is attached: attaching recreates the
/// veth's NAPI) and pins the new kthreads to the forwarder core.
pub fn thread_napi(devs: &[(&NetNs, &str)], before: &HashMap<i32, String>) -> Vec<i32> {
    thread_napi_on(devs, before, FWD_CPU)
}

/// [`thread_napi`] with the kthreads pinned to `cpu`.
pub fn thread_napi_on(
    devs: &[(&NetNs, &str)],
    before: &HashMap<i32, String>,
    cpu: usize,
) -> Vec<i32> {
    let old: HashSet<i32> = before.keys().copied().collect();
    for (ns, dev) in devs {
        // `ip netns exec` mounts a sysfs of the namespace, where its devices live.
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sh", "-c"])
            .arg(format!("echo 1 > /sys/class/net/{dev}/threaded"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "threaded NAPI on {dev}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let new: Vec<(i32, String)> = napi_threads()
            .into_iter()
            .filter(|(p, n)| {
                !old.contains(p)
                    && devs
                        .iter()
                        .any(|(_, d)| n.starts_with(&format!("napi/{d}-")))
            })
            .collect();
        if new.len() >= devs.len() {
            for (pid, name) in &new {
                assert!(set_affinity(*pid, cpu), "pinning {name} failed");
            }
            return new.into_iter().map(|(p, _)| p).collect();
        }
        assert!(
            Instant::now() < deadline,
            "threaded NAPI kthreads for {devs:?} did not appear (found {new:?})",
            devs = devs.iter().map(|(_, d)| *d).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every thread of a process.
pub fn process_threads(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// Summed on-CPU nanoseconds (first field of /proc/PID/schedstat).
pub fn cpu_time(threads: &[i32]) -> u64 {
    threads
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{t}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

pub fn utc_stamp() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H%M%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let uts = Command::new("uname").arg("-r").output().unwrap();
    // Counted from cpuinfo: this process is pinned to one core, so
    // available_parallelism would say 1.
    let n = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    format!(
        "{n} vCPU {cpu}, kernel {}",
        String::from_utf8_lossy(&uts.stdout).trim()
    )
}

/// One bar of a benchmark chart.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub rgb: (u8, u8, u8),
}

/// The bar chart every benchmark saves beside its CSV and JSON: one bar per row,
/// labelled under the axis, with its value printed above it.
pub fn bar_chart(
    path: &Path,
    width: u32,
    caption: &str,
    y_desc: &str,
    bars: &[Bar],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    crate::register_chart_font()?;
    let max = bars.iter().map(|b| b.value).fold(0.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0.0..max)?;
    c.configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .x_labels(bars.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.label.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 11))
        .draw()?;
    c.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let (r, g, bl) = b.rgb;
        Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), b.value),
            ],
            RGBColor(r, g, bl).filled(),
        )
    }))?;
    c.draw_series(bars.iter().enumerate().map(|(i, b)| {
        Text::new(
            format!("{:.2}", b.value),
            (SegmentValue::CenterOf(i), b.value + max * 0.02),
            ("sans-serif", 12),
        )
    }))?;
    root.present()?;
    Ok(())
}

/// The best rate with ≤ 1 % loss: from `start`, grow ×1.6 until a trial loses more (or
/// `trial` says the generator, not the system under test, fell short: going higher
/// proves nothing more), then bisect `steps` times. `trial(rate)` returns its result,
/// its loss (0..1) and whether the generator was the limit. Returns the best lossless
/// trial, if any, and the first trial (what a path that never gets below 1 % reports).
pub fn search_rate<T: Copy>(
    start: f64,
    steps: usize,
    mut trial: impl FnMut(f64) -> (T, f64, bool),
) -> (Option<T>, T) {
    let mut best = None;
    let mut first = None;
    let (mut lo, mut hi) = (0.0, None);
    let mut rate = start;
    while hi.is_none() && rate < 1e9 {
        let (tr, loss, gen_limited) = trial(rate);
        first.get_or_insert(tr);
        if loss <= 0.01 {
            lo = rate;
            best = Some(tr);
            if gen_limited {
                break;
            }
            rate *= 1.6;
        } else {
            hi = Some(rate);
        }
    }
    if let Some(mut h) = hi {
        for _ in 0..steps {
            let mid = (lo + h) / 2.0;
            let (tr, loss, _) = trial(mid);
            if loss <= 0.01 {
                lo = mid;
                best = Some(tr);
            } else {
                h = mid;
            }
        }
    }
    (best, first.expect("at least one trial runs"))
}
