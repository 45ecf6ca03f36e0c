//! Nodes that share a real Redis (`redis-server`, started here): node leases and the
//! room directory. No node is configured with an upstream: a room is claimed by the
//! node it is published on, and any other node finds it there.

use super::*;
use edgefwd::cluster::redis::{Directory, Lease};
use edgefwd_tests::RedisServer;
use serde_json::json;

/// A node of the cluster on loopback: `[cluster]` with the Redis at `redis`.
fn cluster_node(node: &str, redis: &RedisServer) -> Sfu {
    cluster_node_with(node, redis, "")
}

/// [`cluster_node`] with more `[cluster]` keys.
fn cluster_node_with(node: &str, redis: &RedisServer, extra: &str) -> Sfu {
    start_sfu(
        None,
        &format!(
            "{}redis_url = \"{}\"\n{extra}",
            cluster_section(node, "127.0.0.1", &[]),
            redis.url()
        ),
    )
}

/// A load-test room prefix whose room (`PREFIX-0`) the placement puts on `node` among
/// `nodes` (equal loads): so a publisher at `node` is not redirected.
pub(super) fn prefix_placed_on(node: &str, nodes: &[&str], tag: &str) -> (String, String) {
    loop {
        let prefix = unique(tag);
        let room = format!("{prefix}-0");
        if edgefwd::cluster::placement::rank(&room, nodes.iter().copied())[0] == node {
            return (prefix, room);
        }
    }
}

/// A WHIP POST of `offer` at `base` for `room`, redirects not followed: (status, body,
/// Location).
fn whip_at(base: &str, room: &str, offer: &str) -> (u16, String, Option<String>) {
    post_sdp(&format!("{base}/whip/{room}"), offer)
}

/// An SDP offer POSTed to `url`, redirects not followed: (status, body, Location).
pub(super) fn post_sdp(url: &str, offer: &str) -> (u16, String, Option<String>) {
    let mut r = ureq::post(url)
        .header("Content-Type", "application/sdp")
        .config()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .send(offer)
        .unwrap();
    let location = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap(),
        location,
    )
}

/// Waits until every node in `nodes` has its lease in `redis`.
fn wait_for_leases(redis: &RedisServer, nodes: &[&str]) {
    wait_until(10, "the nodes' leases in Redis", || {
        nodes
            .iter()
            .all(|n| redis.cli(&["EXISTS", &format!("edgefwd:node:{n}")]).trim() == "1")
    });
}

/// One load-test publisher on `publish`, two subscribers on `watch`, for `secs`, with
/// the gate on: at most 1 % lost, never 2 s without media.
fn directory_load(publish: &Sfu, watch: &Sfu, prefix: &str, secs: u64) -> std::process::Child {
    Command::new(edgefwd_bin())
        .args([
            "load-test",
            "--url",
            &publish.base,
            "--subscribe-url",
            &watch.base,
        ])
        .args(["--rooms", "1", "--publishers", "1", "--subscribers", "2"])
        .args(["--video-bitrate", "500", "--duration", &secs.to_string()])
        .args(["--room-prefix", prefix, "--json", "--quiet"])
        .args(["--max-loss", "1", "--max-gap", "2"])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The load test's report; fails the test if its gate failed.
fn passed(load: std::process::Child, what: &str) -> Value {
    let out = load.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{what}: {:#}", r["over_limits"]);
    r
}

/// Three nodes, none configured with an upstream. A load-test publisher on A claims
/// the room for A (the placement's choice; epoch 1 in Redis); its subscribers join on
/// B, which finds A in the directory and gets the room over A's node API: every packet
/// counted against what was sent. A WHIP offer for the room at C is redirected (307)
/// to A's WHIP; new rooms offered at C go to the first node of their rendezvous order,
/// spread over the three. A relay request naming a stale epoch is refused by A.
#[test]
fn any_node_takes_any_join_through_the_redis_directory() {
    let redis = RedisServer::start();
    let a = cluster_node("a", &redis);
    let b = cluster_node("b", &redis);
    let c = cluster_node("c", &redis);
    wait_for_leases(&redis, &["a", "b", "c"]);
    let (prefix, room) = prefix_placed_on("a", &["a", "b", "c"], "dir");
    // Published at C, which redirects the load test's WHIP to A (followed).
    let load = directory_load(&c, &b, &prefix, 8);
    wait_for_publisher(&a.base, &room);
    let origin = redis.cli(&["HGETALL", &format!("edgefwd:room:{{{room}}}")]);
    let origin: Vec<&str> = origin.lines().collect();
    assert_eq!(origin, ["node", "a", "epoch", "1"], "one origin, epoch 1");

    // WHIP at C: the room is A's.
    let offer = include_str!("../../../forwarder-user/src/webrtc/testdata/chromium-offer.sdp");
    let (status, msg, location) = whip_at(&c.base, &room, offer);
    assert_eq!(status, 307, "{msg}");
    assert_eq!(location.unwrap(), format!("{}/whip/{room}", a.base));

    // New rooms offered at C go where the placement puts them: each to the first node
    // of its rendezvous order (C itself answers 201), spread over the three.
    let bases = [("a", &a.base), ("b", &b.base), ("c", &c.base)];
    let mut placed = std::collections::BTreeSet::new();
    for i in 0..9 {
        let r = unique(&format!("spread{i}"));
        let first = edgefwd::cluster::placement::rank(&r, ["a", "b", "c"])[0];
        let want = bases.iter().find(|(n, _)| *n == first).unwrap().1;
        let (status, msg, location) = whip_at(&c.base, &r, offer);
        if first == "c" {
            assert_eq!(status, 201, "{msg}");
        } else {
            assert_eq!(status, 307, "{msg}");
            let url = location.unwrap();
            assert_eq!(url, format!("{want}/whip/{r}"));
            let (status, msg, _) = whip_at(want, &r, offer);
            assert_eq!(status, 201, "the placed node takes it: {msg}");
        }
        placed.insert(first);
    }
    assert!(placed.len() >= 2, "rooms spread over the nodes: {placed:?}");

    // A stale epoch is refused on A's node API.
    let path = format!("/node/v1/rooms/{room}/relay");
    let body = serde_json::json!({"node": "d", "media": "127.0.0.1:9", "epoch": 7}).to_string();
    let (code, msg) = signed_post(node_api(&a), "d", &path, &body);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("stale epoch") && msg.contains("at 1"), "{msg}");

    let r = passed(load, "B's subscribers got A's room");
    for t in r["tracks"].as_array().unwrap() {
        assert_eq!(t["subscribers"], 2, "{t:#}");
    }
    // The operator's view: `edgefwd cluster` from Redis, and /metrics.
    let url = redis.url();
    let cli = |args: &[&str]| -> Value {
        let mut all = vec!["cluster"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--redis", &url]);
        edgefwd_cli_json(&all)
    };
    let nodes = cli(&["nodes"]);
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"], "{nodes:#}");
    assert!(nodes[0]["lease_ms_left"].as_i64().unwrap() > 0, "{nodes:#}");
    assert_eq!(nodes[0]["http"], a.base.as_str(), "{nodes:#}");
    let rooms = cli(&["rooms", &room]);
    assert_eq!(
        (
            &rooms[0]["origin"],
            &rooms[0]["epoch"],
            &rooms[0]["origin_alive"]
        ),
        (&json!("a"), &json!(1), &json!(true)),
        "{rooms:#}"
    );
    let m = metrics_text(&a.base);
    for line in ["edgefwd_cluster_redis_up 1", "edgefwd_cluster_nodes_live 3"] {
        assert!(m.lines().any(|l| l == line), "{line} in A's /metrics");
    }
    let held = m
        .lines()
        .find_map(|l| l.strip_prefix("edgefwd_cluster_rooms_origin "))
        .unwrap();
    assert!(held.parse::<u64>().unwrap() >= 1, "{held}");

    let sb = get_json(&b.base, "/api/sessions");
    assert_eq!(sb["cascade"]["upstreams"][&room]["node"], "a", "{sb}");
}

/// 50 nodes claim one room at once against real Redis: exactly one origin, the same
/// answer for all, epoch 1. Once the origin's lease is gone, the next claim moves the
/// room, one epoch on, and the old origin learns it is no longer the origin.
#[test]
fn fifty_concurrent_claims_make_one_origin() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut dirs = Vec::new();
        for i in 0..50 {
            let name = format!("n{i}");
            let d = Directory::connect(&redis.url(), &name).await.unwrap();
            d.renew(&Lease::bare(&name, "127.0.0.1:9".parse().unwrap()))
                .await
                .unwrap();
            dirs.push(d);
        }
        let claims = dirs.iter().map(|d| d.claim("big-event"));
        let origins = futures_util::future::join_all(claims).await;
        let origins: Vec<_> = origins.into_iter().map(Result::unwrap).collect();
        let first = origins[0].clone();
        assert!(origins.iter().all(|o| *o == first), "{origins:?}");
        assert_eq!(first.epoch, 1);
        assert_eq!(dirs.iter().filter(|d| d.me() == first.node).count(), 1);
        assert_eq!(dirs[0].live_nodes().await.unwrap().len(), 50);

        // The origin dies (its lease goes): another claim takes the room over.
        redis.cli(&["DEL", &format!("edgefwd:node:{}", first.node)]);
        let other = dirs.iter().find(|d| d.me() != first.node).unwrap();
        let moved = other.claim("big-event").await.unwrap();
        assert_eq!((moved.node.as_str(), moved.epoch), (other.me(), 2));
        let old = dirs.iter().find(|d| d.me() == first.node).unwrap();
        assert_eq!(
            old.claim("big-event").await.unwrap(),
            moved,
            "no second origin"
        );
    });
}

/// Redis killed mid-call: the call between A (publisher) and B (viewers) goes on
/// without a gap, a WHIP offer for a new room at B is served at B, and once a new,
/// empty Redis answers on the same address the nodes announce their leases and rooms
/// again: each room has one origin, the node its publisher is on.
#[test]
fn redis_away_keeps_calls_and_new_rooms_and_its_return_rebuilds_the_directory() {
    let mut redis = RedisServer::start();
    let a = cluster_node("a", &redis);
    let b = cluster_node("b", &redis);
    wait_for_leases(&redis, &["a", "b"]);
    let (prefix, room) = prefix_placed_on("a", &["a", "b"], "away");
    let load = directory_load(&a, &b, &prefix, 12);
    wait_for_publisher(&b.base, &room);
    std::thread::sleep(Duration::from_secs(2));
    redis.kill();

    // A new room while Redis is away: served where it is published.
    let offer = include_str!("../../../forwarder-user/src/webrtc/testdata/chromium-offer.sdp");
    let lonely = unique("lonely");
    let (status, msg, _) = send(
        ureq::post(&format!("{}/whip/{lonely}", b.base)).header("Content-Type", "application/sdp"),
        offer,
    );
    assert_eq!(status, 201, "{msg}");

    std::thread::sleep(Duration::from_secs(3));
    redis.restart();
    let origin = |r: &str| {
        redis
            .cli(&["HGET", &format!("edgefwd:room:{{{r}}}"), "node"])
            .trim()
            .to_string()
    };
    wait_until(
        10,
        "the rooms claimed again by their publishers' nodes",
        || origin(&room) == "a" && origin(&lonely) == "b",
    );
    assert!(
        redis.cli(&["EXISTS", "edgefwd:node:a"]).trim() == "1",
        "A's lease is back"
    );

    passed(load, "the call went on through the outage");
}

/// A burst of new rooms that all prefer node A, offered at B with
/// `placements_per_second = 2`: A takes two in a second (a burst straddling a second
/// boundary, four at most), the rest go to the next node of each room's order; every
/// redirect names the node the directory holds the room for.
#[test]
fn a_burst_of_new_rooms_spills_past_a_nodes_placements_per_second() {
    let redis = RedisServer::start();
    let nodes: Vec<Sfu> = ["a", "b", "c"]
        .iter()
        .map(|n| cluster_node_with(n, &redis, "placements_per_second = 2\n"))
        .collect();
    wait_for_leases(&redis, &["a", "b", "c"]);
    let base_of = |n: &str| &nodes[(n.as_bytes()[0] - b'a') as usize].base;
    let offer = include_str!("../../../forwarder-user/src/webrtc/testdata/chromium-offer.sdp");
    let mut on_a = 0;
    for i in 0..8 {
        let (_, room) = prefix_placed_on("a", &["a", "b", "c"], &format!("burst{i}"));
        let (status, msg, location) = whip_at(base_of("b"), &room, offer);
        let origin = redis
            .cli(&["HGET", &format!("edgefwd:room:{{{room}}}"), "node"])
            .trim()
            .to_string();
        match (status, origin.as_str()) {
            (201, "b") => {}
            (307, o) => assert_eq!(
                location.unwrap(),
                format!("{}/whip/{room}", base_of(o)),
                "redirected to the node the directory holds it for"
            ),
            _ => panic!("room {room}: {status} {msg}, origin {origin:?}"),
        }
        on_a += (origin == "a") as usize;
    }
    assert!(
        (2..=4).contains(&on_a),
        "A took {on_a} of 8 rooms that all prefer it, at 2 a second"
    );
}
