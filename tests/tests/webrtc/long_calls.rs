//! Calls as long as users hold them, made short by a high packet rate: more than
//! 65,536 packets per viewer, so every 16-bit sequence number and the SRTP rollover
//! counter wrap at least once, checked by an independent SRTP implementation (aiortc
//! with libsrtp) beside the load-test's own subscriber, and counted against what the
//! publisher sent. And the load test's gate itself: a subscriber whose media stops
//! before the publisher's fails the run.

use super::*;

/// Video of the long call: 24 Mbit/s of load-test video is about 2,700 packets/s,
/// so 30 s is about 80,000 packets.
const LONG_KBPS: &str = "24000";
const LONG_SECS: u64 = 30;

fn in_ns(ns: Option<&NetNs>, program: &std::path::Path) -> Command {
    match ns {
        Some(ns) => ns.command(program.to_str().unwrap()),
        None => Command::new(program),
    }
}

/// How much of a long call may go missing: nothing, or what the restarts in the
/// middle of it may cost.
#[derive(Clone, Copy)]
pub(super) struct Allowed {
    /// Packets of a track lost at a viewer (counted by the publisher's stamps).
    pub(super) lost: u64,
    /// Sequence numbers skipped beyond the packets lost: a down-track resumed after
    /// kill -9 continues one past its persisted mark, at most 2,048 ahead.
    pub(super) skipped: u64,
}

const NOTHING: Allowed = Allowed {
    lost: 0,
    skipped: 0,
};

/// One publisher and one load-test subscriber for [`LONG_SECS`] at [`LONG_KBPS`], and
/// aiortc watching the same room from when the publisher is up to when media stops;
/// every client in `ns`, the SFU at `base` (the viewers at `--subscribe-url` when
/// `tool_args` name one; the room `--room-prefix`-0 when they name that); `during` runs
/// while the call is on. Asserts both viewers got every packet sent from their first
/// on (but what `allowed` allows), past a 16-bit wrap, with no SRTP failure.
pub(super) fn long_call(
    ns: Option<&NetNs>,
    base: &str,
    what: &str,
    allowed: Allowed,
    tool_args: &[&str],
    during: impl FnOnce(),
) {
    let given = |name: &str| tool_args.windows(2).find(|w| w[0] == name).map(|w| w[1]);
    let prefix = given("--room-prefix").map_or_else(|| unique("long"), str::to_string);
    let own_prefix = match given("--room-prefix") {
        Some(_) => vec![],
        None => vec!["--room-prefix", prefix.as_str()],
    };
    let watch = given("--subscribe-url").unwrap_or(base);
    let room = format!("{prefix}-0");
    let tool = in_ns(ns, &edgefwd_bin())
        .args(["load-test", "--url", base, "--rooms", "1"])
        .args(["--publishers", "1", "--subscribers", "1"])
        .args(["--video-bitrate", LONG_KBPS])
        .args(["--duration", &LONG_SECS.to_string()])
        .args(&own_prefix)
        // Not one packet lost (but what a restart may cost), never a second without one.
        // (The load test's own gate is coarse; aiortc's count is held to `allowed`.)
        .args(["--max-loss", if allowed.lost == 0 { "0" } else { "5" }])
        .args(["--max-gap", "1", "--json", "--quiet"])
        .args(tool_args)
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let (base, room) = (base.to_string(), room.clone());
        match ns {
            Some(ns) => ns.run(move || wait_for_publisher(&base, &room)),
            None => wait_for_publisher(&base, &room),
        }
    }
    let viewer = in_ns(ns, &aiortc_python())
        .arg(repo().join("tests/clients/aiortc_counter.py"))
        .args(["--base", watch, "--room", &room])
        .args(["--seconds", &(LONG_SECS + 30).to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    during();
    let viewer = viewer.wait_with_output().unwrap();
    let out = tool.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: load-test printed no JSON ({e}): {stderr}"));
    assert!(
        out.status.success(),
        "{what}: load-test over its limits: {:#}\n{stderr}",
        r["over_limits"]
    );
    let tracks = r["tracks"].as_array().unwrap();
    let sent = |kind: &str| {
        tracks
            .iter()
            .find(|t| t["kind"] == kind)
            .and_then(|t| t["sent"].as_u64())
            .unwrap()
    };
    let video_sent = sent("video");
    assert!(
        video_sent > 65_536 + 10_000,
        "{what}: {video_sent} video packets is too few to wrap a viewer's numbering"
    );
    for t in tracks {
        assert_eq!(t["subscribers"], 1, "{what}: {t:#}");
        if allowed.lost == 0 {
            assert_eq!(t["worst_loss_pct"], 0.0, "{what}: {t:#}");
        }
    }
    assert_eq!(r["reconnects"], 0, "{what}: {r:#}");

    let a = parse_result(&format!("{what}: aiortc counter"), &viewer);
    println!("{what}: load-test {:#}\naiortc {a:#}", r["total"]);
    assert_eq!(
        a["srtp_errors"]["rtp"], 0,
        "{what}: libsrtp refused RTP: {a:#}"
    );
    assert_eq!(
        a["srtp_errors"]["rtcp"], 0,
        "{what}: libsrtp refused RTCP: {a:#}"
    );
    let streams: Vec<&Value> = a["streams"].as_object().unwrap().values().collect();
    for (kind, sent) in [("audio", sent("audio")), ("video", video_sent)] {
        // Track numbers: the publisher's audio is even, its video odd.
        let odd = kind == "video";
        let s = streams
            .iter()
            .find(|s| s["track"].as_u64().is_some_and(|t| (t % 2 == 1) == odd))
            .unwrap_or_else(|| panic!("{what}: aiortc got no {kind}: {a:#}"));
        let (first, last) = (
            s["first_stamp"].as_u64().unwrap(),
            s["last_stamp"].as_u64().unwrap(),
        );
        assert_eq!(last + 1, sent, "{what}: aiortc's {kind} ended early: {s}");
        let packets = s["packets"].as_u64().unwrap();
        let lost = (last - first + 1)
            .checked_sub(packets)
            .unwrap_or_else(|| panic!("{what}: aiortc's {kind}: a packet twice: {s}"));
        let holes = s["holes"].as_u64().unwrap();
        println!(
            "{what}: aiortc's {kind}: {lost} of {sent} lost, {holes} sequence numbers not seen"
        );
        assert!(
            lost <= allowed.lost,
            "{what}: aiortc's {kind}: every packet from its first on (but {} a restart \
             may cost), once: {s}",
            allowed.lost
        );
        assert!(
            holes <= lost + allowed.skipped,
            "{what}: aiortc's {kind}: {holes} sequence numbers skipped for {lost} lost: {s}"
        );
        if odd {
            assert!(
                s["span"].as_u64().unwrap() > 65_536 && s["wraps"].as_u64().unwrap() >= 1,
                "{what}: aiortc's video wrapped its sequence numbers: {s}"
            );
        }
    }
}

/// The socket path and the AF_XDP workers (veth, XDP steering), each with a long
/// call; the SFU counts no SRTP failure either.
#[test]
fn a_long_call_past_sequence_and_rollover_wraps_loses_nothing() {
    edgefwd_tests::require_root();
    let _k = kernel_lock();
    let sfu = start_sfu(None, "");
    long_call(None, &sfu.base, "socket path", NOTHING, &[], || {});
    let c = get_json(&sfu.base, "/api/sessions")["counters"].clone();
    assert_eq!(c["drops"]["srtp_auth"], 0, "{c}");
    assert_eq!(c["drops"]["srtp_replay"], 0, "{c}");
    drop(sfu);

    let t = Topology::new();
    let pin = PinDir::new();
    let sfu = start_xdp_sfu(&t, &pin, "auto");
    long_call(Some(&t.publisher), &sfu.base, "AF_XDP", NOTHING, &[], || {});
    let s = ns_json(&t.forwarder, &sfu.base, "/api/sessions");
    assert_eq!(s["media_path"]["path"], "af_xdp", "{s}");
    let c = &s["counters"];
    assert_eq!(c["drops"]["srtp_auth"], 0, "{s}");
    assert_eq!(c["drops"]["srtp_replay"], 0, "{s}");
    let q = &s["xsk"][0]["stats"];
    assert!(
        q["tx"].as_u64().unwrap() > 2 * 65_536,
        "the copies left through AF_XDP: {s}"
    );
}

/// The daemon stopped (SIGSTOP) over the last seconds of a load test: its
/// subscribers' media ends before the publisher's. That tail is loss and a gap, and
/// the run fails saying so; a count between the first and last packet received
/// would have seen no loss at all.
#[test]
fn a_load_test_whose_media_stops_early_fails() {
    let _k = kernel_lock();
    let sfu = start_sfu(None, "");
    let tool = Command::new(edgefwd_bin())
        .args(["load-test", "--url", &sfu.base, "--rooms", "1"])
        .args(["--publishers", "1", "--subscribers", "2"])
        .args(["--video-bitrate", "300", "--duration", "6"])
        .args(["--max-gap", "2", "--json", "--quiet"])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Joined and flowing; then nothing from the SFU until after the run's media.
    wait_until(20, "two subscribers connected", || {
        counter(&sfu.base, "rtp_out") > 200
    });
    std::thread::sleep(Duration::from_secs(1));
    let pid = sfu.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tool.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("load-test printed no JSON ({e}): {stderr}"));
    assert!(!out.status.success(), "the run must fail: {r:#}");
    assert!(stderr.contains("over --max-loss"), "{stderr}");
    let over = r["over_limits"].as_array().unwrap();
    for kind in ["audio", "video"] {
        for sub in 0..2 {
            let who = format!("subscriber {sub} of room");
            assert!(
                over.iter().any(|o| {
                    let o = o.as_str().unwrap();
                    o.starts_with(&who) && o.contains(&format!("/{kind} went"))
                }),
                "{who}'s {kind} gap: {over:#?}"
            );
        }
    }
    for t in r["tracks"].as_array().unwrap() {
        assert!(t["worst_loss_pct"].as_f64().unwrap() > 20.0, "{t:#}");
        assert!(t["longest_gap_ms"].as_f64().unwrap() > 2_000.0, "{t:#}");
    }
}

/// A long call through a planned restart (SIGTERM, a new process) and then kill -9
/// and a new process, with the numbering wrapping across them: libsrtp (aiortc) never
/// sees an RTP or SRTCP index again (a replay or an authentication failure), both
/// viewers keep their sessions (no rejoin), lose no more than the restarts' stalls
/// (counted against what was sent), and the sequence numbers skip at most the 2,048
/// a killed process had reserved past its last send.
#[test]
fn a_long_call_wraps_through_a_restart_and_a_kill_9() {
    let _k = kernel_lock();
    let f = super::restarts::Fixed::new("");
    let d = std::cell::RefCell::new(Some(f.start()));
    // At ~2,900 packets/s of audio and video, a second of stall each time at most.
    let allowed = Allowed {
        lost: 3_000,
        skipped: 2_048 + 16,
    };
    long_call(None, &f.base, "restarted", allowed, &[], || {
        wait_until(20, "the publisher and two viewers connected", || {
            f.connected() == 3
        });
        let before = f.sessions();
        for kind in ["planned restart (SIGTERM)", "kill -9 and restart"] {
            std::thread::sleep(Duration::from_secs(9));
            let old = d.borrow_mut().take().unwrap();
            *d.borrow_mut() = Some(super::restarts::restart(kind, old, || f.start()));
            assert_eq!(f.sessions(), before, "{kind}: the same sessions, taken up");
        }
    });
    let c = get_json(&f.base, "/api/sessions")["counters"].clone();
    assert_eq!(c["drops"]["srtp_unreserved"], 0, "{c}");
    assert_eq!(c["drops"]["srtp_auth"], 0, "{c}");
    assert_eq!(c["drops"]["srtp_replay"], 0, "{c}");
}

/// The long call with its load-test publisher and subscriber over ICE-TCP (aiortc, over
/// UDP, watches the same room): every packet past the wraps, none lost, no SRTP failure
/// at either viewer; the SFU counts the TCP connections and no queue drop.
#[test]
fn a_long_call_over_ice_tcp_loses_nothing() {
    let _k = kernel_lock();
    let sfu = start_sfu(None, "ice_tcp = \"127.0.0.1:0\"\n");
    long_call(None, &sfu.base, "over ICE-TCP", NOTHING, &["--tcp"], || {});
    let c = get_json(&sfu.base, "/api/sessions")["counters"].clone();
    assert_eq!(c["drops"]["srtp_auth"], 0, "{c}");
    assert_eq!(c["drops"]["srtp_replay"], 0, "{c}");
    let m = metrics_text(&sfu.base);
    assert!(
        m.lines()
            .any(|l| l == "edgefwd_webrtc_ice_tcp_accepted_total 2"),
        "the publisher and the load-test subscriber came over TCP: {m}"
    );
    assert!(
        m.lines()
            .any(|l| l == "edgefwd_webrtc_ice_tcp_queue_drops_total 0"),
        "{m}"
    );
}
