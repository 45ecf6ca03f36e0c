//! Node loss and drain in a cluster: three nodes a, b, c sharing a real Redis, a
//! load-test call, one node killed with SIGKILL (or drained) mid-call. The viewers keep
//! their sessions where the server can move the room (a relay, the origin), and move
//! by themselves where it cannot (their edge); the load test's gate bounds the gap.

use super::*;
use edgefwd_tests::RedisServer;

/// Nodes a, b, c on loopback sharing `redis`, their `[cluster]` plus `extra`.
fn three_nodes(redis: &RedisServer, extra: &str) -> [Sfu; 3] {
    let node = |n: &str| {
        start_sfu(
            None,
            &format!(
                "{}redis_url = \"{}\"\n{extra}",
                cluster_section(n, "127.0.0.1", &[]),
                redis.url()
            ),
        )
    };
    let nodes = [node("a"), node("b"), node("c")];
    wait_until(10, "three leases in Redis", || {
        ["a", "b", "c"]
            .iter()
            .all(|n| redis.cli(&["EXISTS", &format!("edgefwd:node:{n}")]).trim() == "1")
    });
    nodes
}

/// A load-test prefix whose room (returned too) is claimed for node a, as if a had
/// placed it: the publisher's offer goes there wherever it is made.
fn room_on_a(redis: &RedisServer, tag: &str) -> (String, String) {
    claimed_for_a(redis, (unique(tag), String::new()))
}

/// `prefix` (and its room) with the room claimed for node a.
fn claimed_for_a(redis: &RedisServer, (prefix, _): (String, String)) -> (String, String) {
    let room = format!("{prefix}-0");
    redis.cli(&[
        "HSET",
        &format!("edgefwd:room:{{{room}}}"),
        "node",
        "a",
        "epoch",
        "1",
    ]);
    (prefix, room)
}

/// Connected viewers of `room` at `n`.
fn viewers(n: &Sfu, room: &str) -> usize {
    get_json(&n.base, "/api/sessions")["rooms"][room]
        .as_array()
        .map_or(0, |a| {
            a.iter()
                .filter(|x| x["role"] == "subscriber" && x["connected"] == true)
                .count()
        })
}

/// One publisher at `url`, `subs` viewers at `sub` (with `args`), 500 kbit/s for
/// `secs`, one join at a time, gated at `max_gap` seconds without media.
fn load(
    url: &str,
    sub: &str,
    prefix: &str,
    subs: usize,
    secs: u64,
    max_gap: u64,
    args: &[&str],
) -> std::process::Child {
    Command::new(edgefwd_bin())
        .args(["load-test", "--url", url, "--subscribe-url", sub])
        .args(args)
        .args([
            "--rooms",
            "1",
            "--publishers",
            "1",
            "--subscribers",
            &subs.to_string(),
        ])
        .args([
            "--concurrency",
            "1",
            "--video-bitrate",
            "500",
            "--duration",
            &secs.to_string(),
        ])
        .args(["--room-prefix", prefix, "--json", "--quiet"])
        .args(["--max-loss", "60", "--max-gap", &max_gap.to_string()])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The load test's report, its gate passed (else the test fails saying `what`).
pub(super) fn passed(load: std::process::Child, what: &str) -> Value {
    let out = load.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        out.status.success(),
        "{what}: {:#}\n{:#}\n{}",
        r["over_limits"],
        r["tracks"],
        String::from_utf8_lossy(&out.stderr)
    );
    r
}

/// Four viewers through `/v1/edges` (capacity 2 each), all connected: the edge (b or c)
/// with most of them, and how many it has.
fn busiest_edge<'a>(nodes: &'a mut [Sfu; 3], room: &str) -> (&'a mut Sfu, usize) {
    wait_until(20, "four viewers connected", || {
        nodes.iter().map(|n| viewers(n, room)).sum::<usize>() == 4
    });
    std::thread::sleep(Duration::from_secs(1));
    let (on_b, on_c) = (viewers(&nodes[1], room), viewers(&nodes[2], room));
    assert!(
        on_b.max(on_c) > 0,
        "a takes two at most: one edge has viewers"
    );
    let i = if on_b >= on_c { 1 } else { 2 };
    (&mut nodes[i], on_b.max(on_c))
}

/// A room's tree a -> b -> c (origin a; written into the directory before the room is
/// published, as `tree_degree = 1` would grow it). Load-test viewers watch at c; b is
/// killed with SIGKILL mid-call. c's probes to b go unanswered, it suspects b within
/// 300 ms and takes the room from a at once: the viewers never rejoin and their
/// longest gap stays under a second (the load test's gate), the tree has c under a,
/// c's /metrics counts the suspicion, and `edgefwd cluster nodes` shows b suspected by
/// c and then its lease lapsed.
#[test]
fn a_killed_relay_s_subtree_gets_media_back_within_a_second_without_rejoining() {
    let redis = RedisServer::start();
    let [a, mut b, c] = three_nodes(&redis, "tree_degree = 1\n");
    let (prefix, room) = room_on_a(&redis, "failover");
    let tree_key = format!("edgefwd:tree:{{{room}}}");
    redis.cli(&["HSET", &tree_key, "@epoch", "1", "b", "a", "c", "b"]);
    let run = load(&a.base, &c.base, &prefix, 2, 12, 1, &[]);
    wait_until(20, "c's viewers connected, the room from b", || {
        viewers(&c, &room) == 2
            && get_json(&c.base, "/api/sessions")["cascade"]["upstreams"][&room]["node"] == "b"
    });
    std::thread::sleep(Duration::from_secs(3));
    b.child.kill9();
    // c hangs under a now (while the call goes on: it leaves the tree after it).
    wait_until(5, "c re-attached under a", || {
        redis.cli(&["HGET", &tree_key, "c"]).trim() == "a"
    });
    // The operator's view: c's lease says it suspects b, then b's lease lapses.
    let b_row = || {
        let rows = edgefwd_cli_json(&["cluster", "nodes", "--redis", &redis.url()]);
        rows.as_array()
            .and_then(|r| r.iter().find(|n| n["node"] == "b").cloned())
            .unwrap_or_default()
    };
    wait_until(5, "`edgefwd cluster nodes`: b suspected by c", || {
        b_row()["suspected_by"] == serde_json::json!(["c"])
    });
    wait_until(5, "`edgefwd cluster nodes`: b's lease lapsed", || {
        b_row()["lease"] == "lapsed"
    });
    let r = passed(run, "the viewers' media came back within a second");
    assert_eq!(r["joined_subscribers"], 2, "{r:#}");
    eprintln!(
        "longest gap at c's viewers after b was killed: {} ms",
        r["total"]["longest_gap_ms"]
    );
    let m = metrics_text(&c.base);
    assert!(
        m.lines()
            .any(|l| l.starts_with("edgefwd_cluster_suspicions ") && !l.ends_with(" 0")),
        "c counted its suspicion of b"
    );
}

/// Viewers at an edge that dies join another node, as the page does: four load-test
/// viewers choose their nodes through `/v1/edges` (probes raced; capacity 2 each), and
/// the edge (b or c) with most of them is killed with SIGKILL mid-call. Its viewers get
/// nothing for a second, ask `/v1/edges` again (the dead node fails its probe) and join
/// a node with room: each reconnects once, and no viewer goes 3 s without media (the
/// load test's gate).
#[test]
fn an_edge_s_viewers_reconnect_elsewhere_within_three_seconds() {
    let redis = RedisServer::start();
    let mut nodes = three_nodes(&redis, "capacity = 2\n");
    let (prefix, room) = room_on_a(&redis, "edge-loss");
    let a = nodes[0].base.clone();
    let run = load(&a, &a, &prefix, 4, 12, 3, &["--edges"]);
    let (edge, moved) = busiest_edge(&mut nodes, &room);
    edge.child.kill9();
    let r = passed(run, "the dead edge's viewers back within 3 s");
    assert_eq!(r["reconnects"], moved, "{r:#}");
    eprintln!(
        "longest gap at any viewer after the edge was killed: {} ms",
        r["total"]["longest_gap_ms"]
    );
}

/// The room's origin dies: origin a (the publisher's WHIP at c was redirected there),
/// viewers at b. a is killed with SIGKILL; the load-test publisher hears nothing for a
/// second and publishes again at c, which places the room anew once a's lease has
/// lapsed (epoch 2, on b or c). b's viewers keep their sessions: b suspects a, and
/// takes the room from its new origin (or, if that is b, from its own new publisher);
/// their longest gap is printed and gated at 6 s (target 5 s), no viewer rejoins.
#[test]
fn the_origin_dies_the_room_is_re_homed_and_viewers_elsewhere_continue() {
    let redis = RedisServer::start();
    let [mut a, b, c] = three_nodes(&redis, "");
    let (prefix, room) = room_on_a(&redis, "origin-loss");
    let room_key = format!("edgefwd:room:{{{room}}}");
    let run = load(&c.base, &b.base, &prefix, 2, 16, 6, &["--failover"]);
    wait_until(20, "b's viewers connected, the room from a", || {
        viewers(&b, &room) == 2
            && get_json(&b.base, "/api/sessions")["cascade"]["upstreams"][&room]["node"] == "a"
    });
    std::thread::sleep(Duration::from_secs(2));
    a.child.kill9();
    wait_until(10, "the room re-homed at epoch 2", || {
        redis.cli(&["HGET", &room_key, "epoch"]).trim() == "2"
    });
    let origin = redis.cli(&["HGET", &room_key, "node"]).trim().to_string();
    assert!(origin == "b" || origin == "c", "{origin}");
    let r = passed(run, "b's viewers got the republished stream");
    assert_eq!(r["joined_subscribers"], 2, "{r:#}");
    assert_eq!(
        r["reconnects"], 1,
        "the publisher published once more: {r:#}"
    );
    eprintln!(
        "origin a killed; re-homed on {origin}; longest gap at b's viewers {} ms",
        r["total"]["longest_gap_ms"]
    );
}

/// Draining an edge: four load-test viewers over three nodes (as above); the edge with
/// most of them is drained (`edgefwd drain`). Its lease says so at once, new viewers
/// are sent elsewhere, its viewers are told to move on their sessions' event streams
/// and join another node while it still sends (each once; their longest stall under
/// 500 ms, where noticing the session's end took over a second), and the daemon exits
/// by itself well before the deadline.
#[test]
fn a_drained_edge_moves_its_viewers_and_exits() {
    let redis = RedisServer::start();
    let mut nodes = three_nodes(&redis, "capacity = 2\n");
    let (prefix, room) = room_on_a(&redis, "drain");
    let a = nodes[0].base.clone();
    let run = load(&a, &a, &prefix, 4, 16, 3, &["--edges"]);
    let (edge, moved) = busiest_edge(&mut nodes, &room);
    let (ok, out, err) = edgefwd_cli(&["drain", "--api", &edge.base, "--deadline", "30"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("drained and exited"), "{out}");
    assert!(
        ureq::get(&format!("{}/api/sessions", edge.base))
            .call()
            .is_err(),
        "the drained node still answers"
    );
    let r = passed(run, "the drained edge's viewers moved within 3 s");
    assert_eq!(r["reconnects"], moved, "{r:#}");
    let stall = r["total"]["longest_stall_ms"].as_f64().unwrap();
    eprintln!(
        "drained: {moved} viewer(s) moved; longest stall at any viewer {stall:.0} ms (gap {} ms)",
        r["total"]["longest_gap_ms"]
    );
    assert!(
        stall < 500.0,
        "told to move, the viewers moved before their sessions ended: {stall} ms"
    );
}

/// Draining a room's origin: origin a (the publisher's WHIP at c was redirected
/// there), viewers at b. a is drained: its publisher is told to move and publishes
/// again at c while still sending to a; the room's next node takes the room over in
/// the directory (epoch 2) once the new session's keys are up, and b, whose parent
/// drains, takes the room from it while a still sends (or, when b is the next node,
/// its own new publisher takes its viewers' m-lines). b's viewers never rejoin and
/// their longest stall stays under 500 ms (a re-publish after the session's end
/// stalled them for seconds); a exits by itself. Once with each of c and b next.
#[test]
fn a_drained_origin_hands_its_room_over_while_its_publisher_still_sends() {
    for next in ["c", "b"] {
        origin_drain(next);
    }
}

fn origin_drain(next: &str) {
    let redis = RedisServer::start();
    let [a, b, c] = three_nodes(&redis, "");
    let placed = super::cluster::prefix_placed_on(next, &["b", "c"], "origin-drain");
    let (prefix, room) = claimed_for_a(&redis, placed);
    let room_key = format!("edgefwd:room:{{{room}}}");
    let run = load(&c.base, &b.base, &prefix, 2, 14, 3, &["--failover"]);
    wait_until(20, "b's viewers connected, the room from a", || {
        viewers(&b, &room) == 2
            && get_json(&b.base, "/api/sessions")["cascade"]["upstreams"][&room]["node"] == "a"
    });
    std::thread::sleep(Duration::from_secs(2));
    let (ok, out, err) = edgefwd_cli(&["drain", "--api", &a.base, "--deadline", "30"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("drained and exited"), "{out}");
    assert_eq!(redis.cli(&["HGET", &room_key, "epoch"]).trim(), "2");
    assert_eq!(redis.cli(&["HGET", &room_key, "node"]).trim(), next);
    let r = passed(run, "b's viewers kept the room through its origin's drain");
    assert_eq!(r["joined_subscribers"], 2, "{r:#}");
    assert_eq!(
        r["reconnects"], 1,
        "the publisher published once more, the viewers never: {r:#}"
    );
    let stall = r["total"]["longest_stall_ms"].as_f64().unwrap();
    eprintln!(
        "origin a drained; room on {next} at epoch 2; longest stall at b's viewers {stall:.0} ms (loss {:.2} %)",
        r["total"]["loss_pct"].as_f64().unwrap()
    );
    assert!(
        stall < 500.0,
        "room to {next}: it moved before its old origin let go: {stall} ms"
    );
}

/// The page's publisher through its origin's drain: Chromium publishes (at c,
/// redirected to origin a), another Chromium watches at b; a is drained. The page is
/// told to move on its WHIP session's event stream, publishes again (c, the room's
/// next node, takes the room over) and keeps sending to a meanwhile: the viewer never leaves
/// "connected", keeps decoding, and freezes under 500 ms more across the drain; the
/// publisher moved once, because its node drained.
#[test]
fn chromium_keeps_decoding_through_its_origin_s_drain() {
    let redis = RedisServer::start();
    let [a, b, c] = three_nodes(&redis, "");
    // The next node is c: b's viewer gets the room over a new parent (the harder case).
    let placed = super::cluster::prefix_placed_on("c", &["b", "c"], "origin-drain-chromium");
    let (_, room) = claimed_for_a(&redis, placed);
    let room_key = format!("edgefwd:room:{{{room}}}");
    let publisher = chromium_publisher(None, &c.base, &room, 25);
    wait_until(30, "the publisher connected at a", || {
        get_json(&a.base, "/api/sessions")["rooms"][&room]
            .as_array()
            .is_some_and(|s| {
                s.iter()
                    .any(|x| x["role"] == "publisher" && x["connected"] == true)
            })
    });
    let mut viewer = Sampler::start(&b.base, &room, "20");
    let (frames, frozen) = (Sampler::frames, Sampler::frozen);
    let mut s = viewer.decoding(60);
    let (f0, z0) = (frames(&s), frozen(&s));
    let (ok, out, err) = edgefwd_cli(&["drain", "--api", &a.base, "--deadline", "30"]);
    assert!(ok, "{out}{err}");
    for _ in 0..6 {
        s = viewer.next();
        assert_eq!(s["state"], "connected", "{s}");
    }
    let (f1, z1) = (frames(&s), frozen(&s));
    let origin = redis.cli(&["HGET", &room_key, "node"]).trim().to_string();
    eprintln!(
        "origin a drained (room now on {origin}): {} frames decoded in the 6 s after, {:.0} ms more frozen",
        f1 - f0,
        (z1 - z0) * 1000.0
    );
    assert_eq!(origin, "c");
    assert!(f1 - f0 > 60, "frames keep decoding: {f0} -> {f1}");
    assert!(z1 - z0 < 0.5, "frozen {:.2} s more", z1 - z0);
    drop(viewer);
    let out = publisher.wait_with_output().unwrap();
    let p: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )
    .unwrap_or_default();
    assert_eq!(p["pubMoves"], 1, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(p["pubMoveReasons"], serde_json::json!(["draining"]), "{p}");
}

/// A long call through the tree a -> b -> c with b killed in its middle: the load-test
/// publisher at a, its subscriber and aiortc (libsrtp) at c, 30 s at ~2,900 packets/s
/// (past the 16-bit wraps). c re-parents under a and its viewers' down-tracks go on
/// under the same SSRCs: libsrtp sees no RTP or SRTCP index again, the loss is the
/// re-parenting's (counted against what was sent), the sequence numbers skip nothing
/// beyond it, and nobody rejoins.
#[test]
fn a_long_call_through_a_tree_keeps_going_when_its_relay_dies() {
    let redis = RedisServer::start();
    let [a, mut b, c] = three_nodes(&redis, "tree_degree = 1\n");
    let (prefix, room) = room_on_a(&redis, "long-tree");
    let tree_key = format!("edgefwd:tree:{{{room}}}");
    redis.cli(&["HSET", &tree_key, "@epoch", "1", "b", "a", "c", "b"]);
    let allowed = super::long_calls::Allowed {
        lost: 3_000,
        skipped: 64,
    };
    let args = [
        "--subscribe-url",
        c.base.as_str(),
        "--room-prefix",
        prefix.as_str(),
    ];
    super::long_calls::long_call(None, &a.base, "tree", allowed, &args, || {
        wait_until(20, "c's viewers connected, the room from b", || {
            viewers(&c, &room) == 2
                && get_json(&c.base, "/api/sessions")["cascade"]["upstreams"][&room]["node"] == "b"
        });
        std::thread::sleep(Duration::from_secs(10));
        b.child.kill9();
        wait_until(5, "c re-attached under a", || {
            redis.cli(&["HGET", &tree_key, "c"]).trim() == "a"
        });
    });
    let s = get_json(&c.base, "/api/sessions");
    assert_eq!(s["counters"]["drops"]["srtp_replay"], 0, "{s}");
}
