//! A WebRTC cascade when things go wrong between its nodes: a relay whose request
//! lapsed upstream, an upstream that stops answering while others are healthy, and
//! anonymous viewers asking a relay for rooms that do not exist.

use super::*;
use std::process::Child;

/// `edgefwd load-test` publishing on `publish`, its subscribers watching on
/// `subscribe` (another node: the room reaches it over the trunk); limits off, the
/// tests judge what they need. Returns the running child.
fn cascade_load(publish: &str, subscribe: &str, prefix: &str, rooms: usize, secs: u64) -> Child {
    Command::new(edgefwd_bin())
        .args(["load-test", "--url", publish, "--subscribe-url", subscribe])
        .args(["--rooms", &rooms.to_string()])
        .args(["--publishers", "1", "--subscribers", "1"])
        .args(["--video-bitrate", "300", "--duration", &secs.to_string()])
        .args(["--room-prefix", prefix, "--json", "--quiet"])
        .args(["--max-loss", "100", "--max-gap", "1000"])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(child: Child, what: &str) -> Value {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: load-test printed no JSON ({e}): {stderr}"))
}

fn signal(sfu: &Sfu, sig: &str) {
    let pid = sfu.child.id().to_string();
    assert!(
        Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    );
}

fn relays_out(base: &str) -> usize {
    get_json(base, "/api/sessions")["cascade"]["relays_out"]
        .as_array()
        .map_or(0, |a| a.len())
}

/// Node B stopped (SIGSTOP) for longer than the lapse: A ends B's relay, and B's next
/// refresh makes a new one, with a new trunk key and RTCP SSRC. B takes them: a viewer
/// joining B afterwards has its keyframe request reach A (and the publisher), and A
/// drops none of B's RTCP. Before, B kept the old key and A refused all of it.
#[test]
fn a_relay_takes_the_new_trunk_key_after_its_relay_lapsed() {
    let a = start_cascade_node("a", None);
    let b = start_cascade_node("b", Some(("a", node_api(&a))));
    let prefix = unique("rekey");
    let room = format!("{prefix}-0");
    let load = cascade_load(&a.base, &b.base, &prefix, 1, 25);
    wait_for_publisher(&b.base, &room);
    wait_until(20, "A relays the room to B", || relays_out(&a.base) == 1);

    // Longer than the lapse (3 s): A's round ends the relay while B sleeps.
    signal(&b, "-STOP");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(relays_out(&a.base), 0, "A ended the lapsed relay");
    signal(&b, "-CONT");
    wait_until(10, "B's refresh made a new relay at A", || {
        relays_out(&a.base) == 1
    });
    // B applies the reply it got; then what B sends A must authenticate there.
    std::thread::sleep(Duration::from_secs(2));
    let before = get_json(&a.base, "/api/sessions")["counters"].clone();
    let viewer = Command::new(aiortc_python())
        .arg(repo().join("tests/clients/aiortc_counter.py"))
        .args(["--base", &b.base, "--room", &room, "--seconds", "5"])
        .output()
        .unwrap();
    let v = parse_result("aiortc viewer at B", &viewer);
    let after = get_json(&a.base, "/api/sessions")["counters"].clone();
    let r = report(load, "load-test");
    println!("viewer {v:#}\nA before {before:#}\nA after {after:#}");

    let n = |c: &Value, k: &str| c[k].as_u64().unwrap();
    let d = |c: &Value, k: &str| c["drops"][k].as_u64().unwrap();
    assert!(
        n(&after, "keyframe_requests") > n(&before, "keyframe_requests"),
        "the new viewer's keyframe request reached A over the re-made trunk"
    );
    assert!(
        n(&after, "rtcp_in") > n(&before, "rtcp_in"),
        "A takes B's RTCP"
    );
    for reason in ["srtp_auth", "unknown_peer", "unknown_ssrc", "srtp_replay"] {
        assert_eq!(
            d(&after, reason),
            d(&before, reason),
            "A dropped B's RTCP as {reason}"
        );
    }
    let video = v["streams"]
        .as_object()
        .unwrap()
        .values()
        .find(|s| s["track"].as_u64().is_some_and(|t| t % 2 == 1))
        .unwrap_or_else(|| panic!("the viewer at B got video: {v:#}"));
    assert!(video["packets"].as_u64().unwrap() > 20, "{video}");
    assert_eq!(v["srtp_errors"]["rtp"], 0, "{v:#}");
    // The load-test's own viewer at B got media again after B woke.
    for t in r["tracks"].as_array().unwrap() {
        assert!(t["worst_loss_pct"].as_f64().unwrap() < 50.0, "{t:#}");
    }
}

/// A relay whose rooms come from two upstreams: A1 carries four rooms, A2 one. A1
/// stops answering (SIGSTOP: its connections open and hang until the call times out)
/// while A2's room is watched at B. B asks each room's upstream on its own task: A2's
/// relay never lapses and its viewer never goes 2 s without media. Before, B asked
/// the rooms one after another with a 2 s timeout each, and A2's trunk lapsed every
/// round.
#[test]
fn one_unreachable_upstream_starves_no_other_room() {
    let a1 = start_cascade_node("a1", None);
    let a2 = start_cascade_node("a2", None);
    let (p1, p2) = (unique("slow"), unique("healthy"));
    let b = start_sfu(
        None,
        &cluster_section(
            "b",
            "127.0.0.1",
            &[
                (&format!("{p2}-0"), "a2", node_api(&a2)),
                ("*", "a1", node_api(&a1)),
            ],
        ),
    );
    let slow = cascade_load(&a1.base, &b.base, &p1, 4, 40);
    for i in 0..4 {
        wait_for_publisher(&b.base, &format!("{p1}-{i}"));
    }
    // The healthy room's run, with the gate on: no gap over 2 s, little loss.
    let healthy = Command::new(edgefwd_bin())
        .args(["load-test", "--url", &a2.base, "--subscribe-url", &b.base])
        .args(["--rooms", "1", "--publishers", "1", "--subscribers", "1"])
        .args(["--video-bitrate", "300", "--duration", "16"])
        .args(["--room-prefix", &p2, "--json", "--quiet"])
        .args(["--max-loss", "5", "--max-gap", "2"])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_publisher(&b.base, &format!("{p2}-0"));
    std::thread::sleep(Duration::from_secs(2));
    signal(&a1, "-STOP");
    let out = healthy.wait_with_output().unwrap();
    let s = get_json(&b.base, "/api/sessions");
    signal(&a1, "-CONT");
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let up = &s["cascade"]["upstreams"];
    println!("healthy {:#}\nB's upstreams {up:#}", r["tracks"]);
    assert_eq!(
        up[format!("{p1}-0")]["up"],
        false,
        "A1 is seen down at B: {up:#}"
    );
    assert_eq!(up[format!("{p2}-0")]["up"], true, "A2 stays up: {up:#}");
    assert!(
        out.status.success(),
        "the healthy room's viewer at B kept its media: {:#}",
        r["over_limits"]
    );
    drop(report(slow, "the slow upstream's load"));
}

/// A minimal offer a WHEP endpoint takes (one recvonly video m-line).
pub(super) fn whep_offer() -> String {
    [
        "v=0",
        "o=- 1 1 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=recvonly",
        "a=rtcp-mux",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        "a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF",
        "a=setup:actpass",
        "a=rtpmap:96 VP8/90000",
        "",
    ]
    .join("\r\n")
}

fn post_whep(base: &str, room: &str, body: &str) -> (u16, String) {
    let r = ureq::post(&format!("{base}/whep/{room}"))
        .config()
        .http_status_as_error(false)
        .build()
        .header("Content-Type", "application/sdp")
        .send(body);
    let mut r = r.unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

/// Anonymous WHEP requests at a relay whose upstream serves every room (`"*"`): a bad
/// offer is refused before any upstream call; good offers for rooms new to the node
/// are asked upstream at most `new_rooms_per_second` (twice that at once), the rest
/// refused with 503 and the reason; and what the node kept of rooms nobody watches
/// goes once their sessions do. Before, every request cost an upstream call before
/// its offer was read and left an upstream entry for good (3,000 requests, 3,001).
#[test]
fn anonymous_whep_for_unknown_rooms_is_bounded() {
    let a = start_cascade_node("a", None);
    let b = start_sfu(
        None,
        &cluster_section("b", "127.0.0.1", &[("*", "a", node_api(&a))])
            .replace("lapse = 3\n", "lapse = 3\nnew_rooms_per_second = 5\n"),
    );
    let calls = |what: &str| {
        get_json(&b.base, "/api/sessions")["cascade"][what]
            .as_u64()
            .unwrap()
    };
    let prefix = unique("anon");
    for i in 0..100 {
        let (status, _) = post_whep(
            &b.base,
            &format!("{prefix}-bad-{i}"),
            "v=0\r\nnot an offer\r\n",
        );
        assert_eq!(status, 400);
    }
    assert_eq!(
        calls("upstream_calls"),
        0,
        "bad offers cost no upstream call"
    );

    let (mut created, mut refused) = (Vec::new(), 0);
    for i in 0..60 {
        let room = format!("{prefix}-{i}");
        match post_whep(&b.base, &room, &whep_offer()) {
            (201, _) => created.push(room),
            (503, m) => {
                assert!(m.contains("new_rooms_per_second"), "{m}");
                refused += 1;
            }
            (s, m) => panic!("room {room}: {s} {m}"),
        }
    }
    let made = calls("new_room_calls");
    println!(
        "{} created, {refused} refused, {made} upstream calls",
        created.len()
    );
    assert!(refused > 0, "a burst of 60 new rooms is limited");
    assert!(
        (10..=30).contains(&made),
        "about 10 at once and 5 a second: {made}"
    );
    // The viewers never connect; their sessions end at the ICE timeout, and with them
    // what B kept of their rooms.
    wait_until(60, "B forgets the rooms nobody watches", || {
        let s = get_json(&b.base, "/api/sessions");
        s["cascade"]["upstreams"]
            .as_object()
            .is_some_and(|u| u.is_empty())
            && s["rooms"].as_object().is_some_and(|r| r.is_empty())
    });
}
