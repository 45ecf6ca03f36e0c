//! End to end through network namespaces: publisher ns → forwarder ns (the real
//! `edgefwd run` daemon, XDP native on veth, or the userspace datapath) → receiver
//! ns. Real UDP sockets send RTP; the receiver checks every rewritten field. The
//! kernel's own IP and UDP checksum validation on the receiving sockets, plus its
//! InCsumErrors counters, prove the checksums.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use edgefwd::dataplane::loader;
use edgefwd_tests::{
    Edgefwd, PinDir, edgefwd_bin, kernel_lock,
    netns::Topology,
    pkt::{Frame, Rtp},
    spawn_edgefwd, unique,
};
use forwarder_common::PROG_PASS;

const N: u16 = 200;
const SSRC_V4: u32 = 0x1111_0001;
const SSRC_V6: u32 = 0x1111_0006;
const SSRC_HAIRPIN: u32 = 0x1111_00aa;
const METRICS: &str = "127.0.0.1:9464";

fn config(user: bool) -> String {
    // The hairpin route leaves through the interface it came in on (XDP_TX); in the
    // userspace path it is sent from the listening socket itself.
    let hairpin_src = if user {
        "198.51.100.2:5004"
    } else {
        "198.51.100.2:5010"
    };
    format!(
        r#"
[[listener]]
addr = "198.51.100.2:5004"
drop_unknown_source = true

[[listener]]
addr = "[2001:db8:a::2]:5004"

[[route]]
listen = "198.51.100.2:5004"
source = "198.51.100.1:40000"
ssrc = {SSRC_V4}
out_src = "203.0.113.2:5006"
out_dst = "203.0.113.1:6000"
ssrc_out = 0x22220001
seq_delta = 30000
ts_delta = 4294967000
pt_from = 96
pt_to = 100

[[route]]
listen = "[2001:db8:a::2]:5004"
source = "[2001:db8:a::1]:40000"
ssrc = {SSRC_V6}
out_src = "[2001:db8:b::2]:5006"
out_dst = "[2001:db8:b::1]:6000"
ssrc_out = 0x22220006
seq_delta = 1
ts_delta = 1

[[route]]
listen = "198.51.100.2:5004"
source = "198.51.100.1:40000"
ssrc = {SSRC_HAIRPIN}
out_src = "{hairpin_src}"
out_dst = "198.51.100.1:7000"
ssrc_out = 0x222200aa
"#
    )
}

/// What a receiver expects of the copies of one stream.
#[derive(Clone, Copy)]
struct Expect {
    from: &'static str,
    ssrc_out: u32,
    seq_delta: u16,
    ts_delta: u32,
    pt: u8,
}

fn sent(i: u16, ssrc: u32) -> Rtp {
    let mut r = Rtp::new(
        ssrc,
        65000u16.wrapping_add(i),
        0xffff_ff00u32.wrapping_add(i as u32 * 960),
        160 + (i as usize % 5) * 200,
    );
    r.marker = i.is_multiple_of(10);
    r
}

/// Receives until `n` packets or a quiet second; checks each against what was sent.
fn receive(sock: &UdpSocket, n: u16, ssrc_in: u32, e: Expect) -> u16 {
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let size: libc::c_int = 4 << 20;
    // SAFETY: a socket we own, a c_int option value and its exact size.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            4,
        )
    };
    let mut got = 0u16;
    let mut seen = vec![false; n as usize];
    let mut buf = [0u8; 2048];
    while got < n {
        let Ok((len, from)) = sock.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(
            from,
            e.from.parse::<SocketAddr>().unwrap(),
            "copy sent from the route's out_src"
        );
        let p = &buf[..len];
        let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        assert_eq!(ssrc, e.ssrc_out, "SSRC rewritten");
        let seq = u16::from_be_bytes([p[2], p[3]]).wrapping_sub(e.seq_delta);
        let i = seq.wrapping_sub(65000);
        assert!(i < n, "sequence {seq} was never sent");
        assert!(!seen[i as usize], "packet {i} arrived twice");
        seen[i as usize] = true;
        let want = sent(i, ssrc_in);
        let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]).wrapping_sub(e.ts_delta);
        assert_eq!(ts, want.ts, "timestamp of packet {i}");
        assert_eq!(p[1] & 0x7f, e.pt, "payload type of packet {i}");
        assert_eq!(p[1] & 0x80 != 0, want.marker, "marker of packet {i}");
        assert_eq!(
            &p[12..],
            &want.bytes()[12..],
            "payload of packet {i} untouched"
        );
        got += 1;
    }
    got
}

fn start_daemon(t: &Topology, pin: &PinDir, cfg_path: &str, user: bool) -> Edgefwd {
    let bin = edgefwd_bin();
    let mut cmd = t.forwarder.command(bin.to_str().unwrap());
    cmd.args([
        "--pin-dir",
        pin.path().to_str().unwrap(),
        "run",
        "--config",
        cfg_path,
        "--metrics",
        METRICS,
        "--duration",
        "120",
    ]);
    if user {
        cmd.args(["--datapath", "user"]);
    } else {
        cmd.args(["--iface", "f0"]);
    }
    spawn_edgefwd(cmd)
}

fn scrape(t: &Topology) -> String {
    t.forwarder.run(|| {
        let mut s = TcpStream::connect(METRICS).expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    })
}

fn metric(body: &str, name: &str, verdict: &str) -> u64 {
    body.lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("verdict=\"{verdict}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

/// veth only delivers XDP_TX/REDIRECT frames to a peer that runs XDP itself.
fn peer_programs(t: &Topology) -> Vec<aya::Ebpf> {
    let mut progs = Vec::new();
    for (ns, dev) in [(&t.publisher, "p0"), (&t.receiver, "r0")] {
        progs.push(ns.run(move || {
            let mut e = loader::load_tools().unwrap();
            loader::attach(&mut e, PROG_PASS, dev).unwrap();
            e
        }));
    }
    progs
}

fn xdp_attached(t: &Topology) -> bool {
    let out = t.forwarder.exec(&["ip", "link", "show", "f0"]);
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

/// kill -9 of the daemon while RTP flows: the pinned link and maps keep forwarding,
/// so the receiver gets every packet; a restarted daemon takes the link over and
/// reconciles the maps with its config (no duplicate routes, counters kept). A clean
/// stop leaves forwarding in place too; `edgefwd down` removes it.
#[test]
fn forwarding_survives_kill_9_and_a_restart_adopts_without_a_gap() {
    let _k = kernel_lock();
    let t = Topology::new();
    let pin = PinDir::new();
    let _peers = peer_programs(&t);
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-restart-")));
    std::fs::write(&cfg, config(false)).unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let mut first = start_daemon(&t, &pin, &cfg, false);
    assert!(
        !first.ready_line().contains("adopted"),
        "{}",
        first.ready_line()
    );
    const TOTAL: u16 = 3000;
    let rx = t.receiver.spawn(|| {
        let s = UdpSocket::bind("203.0.113.1:6000").unwrap();
        receive(
            &s,
            TOTAL,
            SSRC_V4,
            Expect {
                from: "203.0.113.2:5006",
                ssrc_out: 0x2222_0001,
                seq_delta: 30000,
                ts_delta: 4_294_967_000,
                pt: 100,
            },
        )
    });
    t.settle();
    // 1 packet per ms for 3 s, on a thread of its own in the publisher namespace.
    let tx = t.publisher.spawn(|| {
        let s = UdpSocket::bind("198.51.100.1:40000").unwrap();
        let start = std::time::Instant::now();
        for i in 0..TOTAL {
            let due = Duration::from_millis(i as u64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            s.send_to(&sent(i, SSRC_V4).bytes(), "198.51.100.2:5004")
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    first.kill9();
    assert!(xdp_attached(&t), "XDP went with the killed daemon");
    // A map an older build left under its older name (the routes4 layout before V2):
    // the new daemon drops it once it has taken the link over.
    let stale = pin.path().join("EFWD_ROUTES4_V1");
    aya::maps::MapData::from_pin(pin.path().join(forwarder_common::listeners::MAP_NAME))
        .unwrap()
        .pin(&stale)
        .unwrap();
    // The daemon is gone for a second; then a new one takes over.
    std::thread::sleep(Duration::from_millis(1000));
    let mut second = start_daemon(&t, &pin, &cfg, false);
    assert!(
        second.ready_line().contains("(XDP Driver, adopted)"),
        "the restarted daemon did not take the pinned link over: {}",
        second.ready_line()
    );
    assert!(!stale.exists(), "the older-layout pin was left behind");
    tx.join().unwrap();
    let got = rx.join().unwrap();
    assert_eq!(got, TOTAL, "packets lost across kill -9 and restart");
    let cli = |args: &[&str]| -> serde_json::Value {
        let bin = edgefwd_bin();
        let mut a = vec![
            bin.to_str().unwrap(),
            "--pin-dir",
            pin.path().to_str().unwrap(),
        ];
        a.extend(args);
        serde_json::from_slice(&t.forwarder.exec(&a).stdout).unwrap()
    };
    let routes = cli(&["routes", "list", "--json"]);
    assert_eq!(
        routes.as_array().unwrap().len(),
        3,
        "duplicate or lost routes: {routes}"
    );
    let v4 = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ssrc"] == SSRC_V4)
        .unwrap_or_else(|| panic!("no v4 route in {routes}"))
        .clone();
    let packets = v4["packets"].as_u64().unwrap_or_else(|| panic!("{v4}"));
    assert!(
        packets >= TOTAL as u64,
        "the route's counter was reset by the restart: {packets} < {TOTAL}"
    );
    // A clean stop leaves forwarding in place as well ...
    assert!(second.stop().success());
    assert!(xdp_attached(&t), "SIGTERM detached XDP");
    // ... and `edgefwd down` removes it all.
    let bin = edgefwd_bin();
    let out = t.forwarder.exec(&[
        bin.to_str().unwrap(),
        "--pin-dir",
        pin.path().to_str().unwrap(),
        "down",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("XDP detached from f0"),
        "{out:?}"
    );
    assert!(!xdp_attached(&t), "XDP still attached after `edgefwd down`");
    assert!(
        !pin.path().join("EFWD_ROUTES4_V3").exists(),
        "maps left after `down`"
    );
    let _ = std::fs::remove_file(&cfg);
}

fn e2e(user: bool) {
    let _k = kernel_lock();
    let t = Topology::new();
    let pin = PinDir::new();
    let peer_progs = peer_programs(&t);
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-e2e-")));
    std::fs::write(&cfg, config(user)).unwrap();
    let mut daemon = start_daemon(&t, &pin, cfg.to_str().unwrap(), user);
    if !user {
        // Native (driver) mode on veth, as the test means: the loader would fall back
        // to generic mode with only a warning.
        assert!(
            daemon.ready_line().contains("(XDP Driver)"),
            "not attached in native mode: {}",
            daemon.ready_line()
        );
    }

    let rx4 = t.receiver.spawn(|| {
        let s = UdpSocket::bind("203.0.113.1:6000").unwrap();
        receive(
            &s,
            N,
            SSRC_V4,
            Expect {
                from: "203.0.113.2:5006",
                ssrc_out: 0x2222_0001,
                seq_delta: 30000,
                ts_delta: 4_294_967_000,
                pt: 100,
            },
        )
    });
    let rx6 = t.receiver.spawn(|| {
        let s = UdpSocket::bind("[2001:db8:b::1]:6000").unwrap();
        receive(
            &s,
            N,
            SSRC_V6,
            Expect {
                from: "[2001:db8:b::2]:5006",
                ssrc_out: 0x2222_0006,
                seq_delta: 1,
                ts_delta: 1,
                pt: 96,
            },
        )
    });
    let hairpin_from = if user {
        "198.51.100.2:5004"
    } else {
        "198.51.100.2:5010"
    };
    let rxh = t.publisher.spawn(move || {
        let s = UdpSocket::bind("198.51.100.1:7000").unwrap();
        receive(
            &s,
            N,
            SSRC_HAIRPIN,
            Expect {
                from: hairpin_from,
                ssrc_out: 0x2222_00aa,
                seq_delta: 0,
                ts_delta: 0,
                pt: 96,
            },
        )
    });
    t.settle();
    let strangers = t.publisher.run(|| {
        let s4 = UdpSocket::bind("198.51.100.1:40000").unwrap();
        let s6 = UdpSocket::bind("[2001:db8:a::1]:40000").unwrap();
        for i in 0..N {
            s4.send_to(&sent(i, SSRC_V4).bytes(), "198.51.100.2:5004")
                .unwrap();
            s6.send_to(&sent(i, SSRC_V6).bytes(), "[2001:db8:a::2]:5004")
                .unwrap();
            s4.send_to(&sent(i, SSRC_HAIRPIN).bytes(), "198.51.100.2:5004")
                .unwrap();
            if i % 10 == 9 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // RTP from a port with no route: dropped early, never forwarded.
        let stranger = UdpSocket::bind("198.51.100.1:40001").unwrap();
        for i in 0..10 {
            stranger
                .send_to(&sent(i, SSRC_V4).bytes(), "198.51.100.2:5004")
                .unwrap();
        }
        10u64
    });
    let (got4, got6, goth) = (
        rx4.join().unwrap(),
        rx6.join().unwrap(),
        rxh.join().unwrap(),
    );
    let body = scrape(&t);
    if std::env::var_os("EDGEFWD_DEBUG").is_some() {
        // Where copies went missing: interface, IP/UDP and softnet counters.
        for (ns, args) in [
            (&t.receiver, &["ip", "-s", "link", "show", "r0"][..]),
            (&t.receiver, &["cat", "/proc/net/snmp"]),
            (&t.publisher, &["ip", "-s", "link", "show", "p0"]),
            (&t.publisher, &["cat", "/proc/net/snmp"]),
            (&t.publisher, &["cat", "/proc/net/snmp6"]),
            (&t.forwarder, &["ip", "-s", "link"]),
            (&t.forwarder, &["cat", "/proc/net/snmp6"]),
            (&t.forwarder, &["cat", "/proc/net/softnet_stat"]),
            (&t.receiver, &["ip", "link"]),
        ] {
            eprintln!(
                "{} $ {}\n{}",
                ns.name,
                args.join(" "),
                String::from_utf8_lossy(&ns.exec(args).stdout)
            );
        }
    }
    assert_eq!(
        (got4, got6, goth),
        (N, N, N),
        "IPv4, IPv6, hairpin copies received; counters:\n{body}"
    );
    assert_eq!(
        t.receiver.udp_csum_errors(),
        (0, 0),
        "receiver saw UDP checksum errors"
    );
    assert_eq!(
        t.publisher.udp_csum_errors(),
        (0, 0),
        "publisher saw UDP checksum errors"
    );

    let unknown = metric(&body, "edgefwd_packets_total", "drop_unknown_source");
    assert_eq!(unknown, strangers, "strangers dropped and counted:\n{body}");
    // Both paths count alike, verdict for verdict: the hairpin leaves by the interface
    // it came in on (forward_tx), the other two are redirected.
    assert_eq!(
        metric(&body, "edgefwd_packets_total", "forward_redirect"),
        2 * N as u64,
        "{body}"
    );
    assert_eq!(
        metric(&body, "edgefwd_packets_total", "forward_tx"),
        N as u64,
        "{body}"
    );
    if !user {
        // The CLI reads the same pinned maps.
        let out = t.forwarder.exec(&[
            edgefwd_bin().to_str().unwrap(),
            "--pin-dir",
            pin.path().to_str().unwrap(),
            "routes",
            "list",
            "--json",
        ]);
        let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let routes = routes.as_array().unwrap();
        assert_eq!(routes.len(), 3);
        for r in routes {
            assert_eq!(r["packets"], N as u64, "per-route packets: {r}");
        }
        let out = t.forwarder.exec(&[
            edgefwd_bin().to_str().unwrap(),
            "--pin-dir",
            pin.path().to_str().unwrap(),
            "stats",
            "--json",
            "--interval",
            "0",
        ]);
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let fwd = stats
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["verdict"] == "forward_tx")
            .unwrap();
        assert_eq!(fwd["packets"], N as u64);
    }
    if !user {
        cli_against_live_daemon(&t, &pin);
    }

    // Panics if the daemon ignores SIGTERM for 10 s.
    let (status, took) = daemon.stop_timed();
    assert!(
        status.success(),
        "edgefwd exit status after SIGTERM: {status}"
    );
    println!("exit {took:?} after SIGTERM");
    // Prompt: 200 ms is the target, measured well below it; the bound leaves room
    // for a busy 2-core machine.
    assert!(
        took < Duration::from_millis(500),
        "{took:?} to exit after SIGTERM"
    );
    if !user {
        // Routes, counters and the XDP link outlive the daemon for the CLI and the
        // next start (the restart test checks forwarding goes on).
        assert!(pin.path().join("EFWD_ROUTES4_V3").exists());
        assert!(pin.path().join("EFWD_ROUTES6_V3").exists());
        assert!(xdp_attached(&t), "XDP detached at exit");
    }
    let _ = std::fs::remove_file(&cfg);
    drop(peer_progs);
}

#[test]
fn xdp_datapath_relays_rtp_between_namespaces() {
    e2e(false);
}

#[test]
fn user_datapath_relays_rtp_between_namespaces() {
    e2e(true);
}

/// `edgefwd simulate` and `routes add/del` against the running daemon's pinned maps.
fn cli_against_live_daemon(t: &Topology, pin: &PinDir) {
    let cli = |args: &[&str]| -> serde_json::Value {
        let mut a = vec![edgefwd_bin().to_str().unwrap().to_string()];
        a.extend(["--pin-dir", pin.path().to_str().unwrap()].map(String::from));
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = t.forwarder.exec(&a);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    // The live counts of the verdicts the simulated packets get. Only those: real
    // background traffic (IPv6 neighbour discovery, MLD) moves other counters meanwhile.
    let verdicts = || {
        let all = cli(&["stats", "--json", "--interval", "0", "--all"]);
        ["forward_redirect", "pass_no_route"].map(|name| {
            all.as_array()
                .unwrap()
                .iter()
                .find(|v| v["verdict"] == name)
                .unwrap_or_else(|| panic!("{name} missing from stats: {all}"))["packets"]
                .clone()
        })
    };
    let before = verdicts();

    // A publisher packet of the IPv4 route, as it would arrive on f0.
    let frame = Frame {
        eth_src: [2, 0, 0, 0, 0, 1],
        eth_dst: [2, 0, 0, 0, 0, 2],
        vlan: None,
        src: "198.51.100.1".parse().unwrap(),
        dst: "198.51.100.2".parse().unwrap(),
        ttl: 64,
        sport: 40000,
        dport: 5004,
    }
    .build(&Rtp::new(SSRC_V4, 7, 1000, 100).bytes());
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let sim = cli(&["simulate", "--packet", &hex, "--json"]);
    let sim = if sim.is_array() { sim[0].clone() } else { sim };
    assert_eq!(sim["action"], "XDP_REDIRECT", "{sim}");
    assert_eq!(sim["verdict"], "forward_redirect", "{sim}");
    assert_eq!(sim["decoded"]["rtp_ssrc"], 0x2222_0001u32, "{sim}");
    assert_eq!(sim["decoded"]["ip_dst"], "203.0.113.1", "{sim}");
    assert_eq!(sim["decoded"]["udp_checksum_ok"], true, "{sim}");
    assert_eq!(sim["decoded"]["ipv4_checksum_ok"], true, "{sim}");
    // An unknown SSRC from the known publisher: no route, passed to the stack.
    let mut other = frame.clone();
    let rtp_ssrc = 14 + 20 + 8 + 8;
    other[rtp_ssrc..rtp_ssrc + 4].copy_from_slice(&0x0bad_0badu32.to_be_bytes());
    let hex: String = other.iter().map(|b| format!("{b:02x}")).collect();
    let sim = cli(&["simulate", "--packet", &hex, "--json"]);
    let sim = if sim.is_array() { sim[0].clone() } else { sim };
    assert_eq!(sim["action"], "XDP_PASS", "{sim}");
    assert_eq!(sim["verdict"], "pass_no_route", "{sim}");
    // Simulation does not count as traffic.
    assert_eq!(verdicts(), before, "simulate touched the live counters");

    // Routes added by the CLI land in the live maps, and simulate sees them at once.
    let add = |ssrc_out: &str, extra: &[&str]| {
        let bin = edgefwd_bin();
        let mut a = vec![
            bin.to_str().unwrap(),
            "--pin-dir",
            pin.path().to_str().unwrap(),
            "routes",
            "add",
            "--listen",
            "198.51.100.2:5004",
            "--source",
            "198.51.100.1:40000",
            "--ssrc",
            "0x0bad0bad",
            "--out-src",
            "203.0.113.2:5006",
            "--out-dst",
            "203.0.113.1:6002",
            "--ssrc-out",
            ssrc_out,
        ];
        a.extend(extra);
        t.forwarder.exec_status(&a)
    };
    let out = add("0x33330001", &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        cli(&["routes", "list", "--json"]).as_array().unwrap().len(),
        4
    );
    let ssrc_now = || {
        let sim = cli(&["simulate", "--packet", &hex, "--json"]);
        let sim = if sim.is_array() { sim[0].clone() } else { sim };
        assert_eq!(sim["action"], "XDP_REDIRECT", "{sim}");
        assert_eq!(sim["decoded"]["udp_dst"], 6002, "{sim}");
        sim["decoded"]["rtp_ssrc"].as_u64().unwrap()
    };
    assert_eq!(ssrc_now(), 0x3333_0001);
    // The same key again: refused, and the route is untouched ...
    let out = add("0x44440001", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("exists already") && err.contains("--replace"),
        "a second add with the same key must be refused: {out:?}"
    );
    assert_eq!(ssrc_now(), 0x3333_0001);
    // ... unless --replace says so.
    let out = add("0x44440001", &["--replace"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ssrc_now(), 0x4444_0001);
    assert_eq!(
        cli(&["routes", "list", "--json"]).as_array().unwrap().len(),
        4
    );
    cli(&[
        "routes",
        "del",
        "--listen",
        "198.51.100.2:5004",
        "--source",
        "198.51.100.1:40000",
        "--ssrc",
        "0x0bad0bad",
    ]);
    assert_eq!(
        cli(&["routes", "list", "--json"]).as_array().unwrap().len(),
        3
    );
}

/// `edgefwd check-config` (no root, nothing started) accepts the packaged example and
/// refuses a bad file with the line to fix and a failing exit status.
#[test]
fn check_config_accepts_the_example_and_says_what_to_fix() {
    let bin = edgefwd_bin();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../forwarder-user/packaging/edgefwd.toml"
    );
    let out = std::process::Command::new(&bin)
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 stream(s) with 3 copies (1 fanned out"),
        "{text}"
    );
    let bad = std::env::temp_dir().join(format!("{}.toml", unique("badcfg")));
    let copy = |dst: &str, extra: &str| {
        format!(
            "[[route]]\nlisten = \"198.51.100.2:5004\"\nsource = \"198.51.100.1:1\"\nssrc = 7\n\
             out_src = \"203.0.113.2:5006\"\nout_dst = \"{dst}\"\n{extra}"
        )
    };
    for (body, want) in [
        (
            format!(
                "[[listener]]\naddr = \"198.51.100.2:5004\"\n{}{}",
                copy("203.0.113.1:1", "vlan = 9\n"),
                copy("203.0.113.1:2", "")
            ),
            "leave untagged",
        ),
        (
            format!(
                "[[listener]]\naddr = \"198.51.100.2:5004\"\n{}",
                copy("[2001:db8::1]:1", "")
            ),
            "different IP families",
        ),
        (
            "[[listener]]\naddr = \"nowhere\"\n".to_string(),
            "invalid socket address",
        ),
        (
            "[webrtc]\nhttp = \"127.0.0.1:8080\"\nmedia = \"127.0.0.1:50000\"\n\
             [cluster]\nnode = \"b\"\nsecret = \"short\"\n"
                .to_string(),
            "use at least 16",
        ),
        (
            "[webrtc]\nhttp = \"127.0.0.1:8080\"\nmedia = \"127.0.0.1:50000\"\n\
             [cluster]\nnode = \"b\"\nsecret = \"0123456789abcdef\"\n\
             [[cluster.upstream]]\nroom = \"*\"\nnode = \"b\"\napi = \"127.0.0.1:1\"\n"
                .to_string(),
            "the upstream is this node",
        ),
        (
            "[cluster]\nnode = \"b\"\nsecret = \"0123456789abcdef\"\n\
             [[cluster.upstream]]\nroom = \"*\"\nnode = \"a\"\napi = \"127.0.0.1:1\"\n"
                .to_string(),
            "no [webrtc] section",
        ),
        // The old section, refused with the lines to write instead.
        (
            "[webrtc]\nhttp = \"127.0.0.1:8080\"\nmedia = \"127.0.0.1:50000\"\n\
             [webrtc.cascade]\nnode = \"b\"\nsecret_file = \"/etc/s\"\n\
             [[webrtc.cascade.upstream]]\nroom = \"*\"\nnode = \"a\"\nhttp = \"127.0.0.1:1\"\n"
                .to_string(),
            "[[cluster.upstream]]\nroom = \"*\"\nnode = \"a\"\napi = \"<a's [cluster] api>\"",
        ),
    ] {
        std::fs::write(&bad, body).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["check-config", bad.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{want}: {out:?}"
        );
        assert!(err.contains(bad.to_str().unwrap()), "names the file: {err}");
    }
    let _ = std::fs::remove_file(&bad);
}

const SSRC_A: u32 = 0x3333_000a;
const SSRC_B: u32 = 0x3333_000b;
/// Packets per stream between moves.
const LEG: u16 = 100;

/// Two fan-out streams; the viewer at :6001 is on stream A.
fn move_config() -> String {
    let copy = |ssrc: u32, port: u16, ssrc_out: u32, seq_delta: u16, ts_delta: u32| {
        format!(
            r#"
[[route]]
listen = "198.51.100.2:5004"
source = "198.51.100.1:40000"
ssrc = {ssrc}
out_src = "203.0.113.2:5006"
out_dst = "203.0.113.1:{port}"
ssrc_out = {ssrc_out}
seq_delta = {seq_delta}
ts_delta = {ts_delta}
"#
        )
    };
    format!(
        "[[listener]]\naddr = \"198.51.100.2:5004\"\n{}{}{}{}",
        copy(SSRC_A, 6001, 0x5151_0001, 1000, 7),
        copy(SSRC_A, 6002, 0x5151_0002, 0, 0),
        copy(SSRC_B, 6003, 0x5151_0003, 0, 0),
        copy(SSRC_B, 6004, 0x5151_0004, 0, 0),
    )
}

/// Stream A's and B's packet `i`: their own sequence and timestamp spaces (B's
/// timestamps far from A's, so a move that kept the offsets would jump), and payloads
/// that say which stream and packet they are.
fn ab(i: u16, ssrc: u32) -> Rtp {
    let (seq0, ts0) = if ssrc == SSRC_A {
        (65_000u16, 1_000u32)
    } else {
        (30_000, 3_000_000_000)
    };
    let mut r = Rtp::new(ssrc, seq0.wrapping_add(i), ts0 + i as u32 * 3000, 200);
    r.payload[..4].copy_from_slice(&ssrc.to_be_bytes());
    r.payload[4..6].copy_from_slice(&i.to_be_bytes());
    r
}

/// Every packet until `n` or a quiet second: (sequence, timestamp, SSRC out, the
/// stream and packet its payload names).
fn collect(sock: &UdpSocket, n: usize) -> Vec<(u16, u32, u32, u32, u16)> {
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while out.len() < n {
        let Ok(len) = sock.recv(&mut buf) else { break };
        let p = &buf[..len];
        let be32 = |at: usize| u32::from_be_bytes(p[at..at + 4].try_into().unwrap());
        out.push((
            u16::from_be_bytes([p[2], p[3]]),
            be32(4),
            be32(8),
            be32(12),
            u16::from_be_bytes([p[16], p[17]]),
        ));
    }
    out
}

/// `edgefwd subs move` on the live maps, twice: a viewer moved from stream A (a copy
/// the TC replicator sends) to stream B and back (A then has one copy, which XDP
/// forwards itself) sees one sequence, numbered on from where it was, with its own
/// SSRC and timestamps that never step back; the viewers that stay on A and on B get
/// every packet of theirs, undisturbed.
#[test]
fn a_viewer_moved_between_streams_keeps_one_sequence() {
    let _k = kernel_lock();
    let t = Topology::new();
    let pin = PinDir::new();
    let _peer_progs = peer_programs(&t);
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-move-")));
    std::fs::write(&cfg, move_config()).unwrap();
    let _daemon = start_daemon(&t, &pin, cfg.to_str().unwrap(), false);
    let socks: Vec<UdpSocket> = t.receiver.run(|| {
        (6001..=6004)
            .map(|p| UdpSocket::bind(("203.0.113.1", p)).unwrap())
            .collect()
    });
    let mut socks = socks.into_iter();
    let mover = socks.next().unwrap();
    let rx: Vec<_> = socks
        .map(|s| std::thread::spawn(move || collect(&s, 3 * LEG as usize)))
        .collect();
    let rx_mover = std::thread::spawn(move || collect(&mover, 3 * LEG as usize));
    t.settle();
    let tx = t
        .publisher
        .run(|| UdpSocket::bind("198.51.100.1:40000").unwrap());
    let send = |legs: std::ops::Range<u16>| {
        for i in legs {
            for ssrc in [SSRC_A, SSRC_B] {
                tx.send_to(&ab(i, ssrc).bytes(), "198.51.100.2:5004")
                    .unwrap();
            }
            std::thread::sleep(Duration::from_micros(300));
        }
        // Everything sent is through before the next move.
        std::thread::sleep(Duration::from_millis(200));
    };
    // `edgefwd subs move` of the viewer at :6001 from stream `from` to stream `to`:
    // (succeeded, stdout and stderr).
    let subs_move = |from: u32, to: u32| -> (bool, String) {
        let out = t.forwarder.exec_status(&[
            edgefwd_bin().to_str().unwrap(),
            "--pin-dir",
            pin.path().to_str().unwrap(),
            "subs",
            "move",
            "--listen",
            "198.51.100.2:5004",
            "--source",
            "198.51.100.1:40000",
            "--ssrc",
            &from.to_string(),
            "--out-dst",
            "203.0.113.1:6001",
            "--to-source",
            "198.51.100.1:40000",
            "--to-ssrc",
            &to.to_string(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let move_to = |from: u32, to: u32| -> String {
        let (ok, text) = subs_move(from, to);
        assert!(ok, "subs move: {text}");
        text
    };
    send(0..LEG);
    let said = move_to(SSRC_A, SSRC_B);
    assert!(said.contains("continues after seq"), "{said}");
    send(LEG..2 * LEG);
    move_to(SSRC_B, SSRC_A);
    send(2 * LEG..3 * LEG);

    let got = rx_mover.join().unwrap();
    assert_eq!(
        got.len(),
        3 * LEG as usize,
        "the moved viewer got every packet"
    );
    for (k, w) in got.windows(2).enumerate() {
        assert_eq!(
            w[1].0,
            w[0].0.wrapping_add(1),
            "sequence continuous at {k}: {w:?}"
        );
        assert!(
            w[1].1.wrapping_sub(w[0].1) < 1 << 31,
            "timestamp stepped back at {k}: {w:?}"
        );
    }
    // Its numbering starts in its own space (A + 1000) and runs on from there.
    assert_eq!(got[0].0, 65_000u16.wrapping_add(1000));
    assert!(
        got.iter().all(|p| p.2 == 0x5151_0001),
        "its own SSRC throughout"
    );
    let streams: Vec<(u32, u16)> = got.iter().map(|p| (p.3, p.4)).collect();
    let want: Vec<(u32, u16)> = (0..LEG)
        .map(|i| (SSRC_A, i))
        .chain((LEG..2 * LEG).map(|i| (SSRC_B, i)))
        .chain((2 * LEG..3 * LEG).map(|i| (SSRC_A, i)))
        .collect();
    assert_eq!(streams, want, "A, then B, then A again");

    // The others: every packet of their own stream, their numbering untouched.
    for (h, (ssrc, ssrc_out)) in rx.into_iter().zip([
        (SSRC_A, 0x5151_0002),
        (SSRC_B, 0x5151_0003),
        (SSRC_B, 0x5151_0004),
    ]) {
        let got = h.join().unwrap();
        assert_eq!(
            got.len(),
            3 * LEG as usize,
            "{ssrc_out:#x} got every packet"
        );
        for (i, p) in got.iter().enumerate() {
            let want = ab(i as u16, ssrc);
            assert_eq!((p.0, p.1, p.2), (want.seq, want.ts, ssrc_out), "packet {i}");
        }
    }

    // A move the maps cannot make says why and changes nothing.
    let (ok, err) = subs_move(SSRC_A, 0x1234_5678);
    assert!(!ok && err.contains("no stream of SSRC 0x12345678"), "{err}");
}
