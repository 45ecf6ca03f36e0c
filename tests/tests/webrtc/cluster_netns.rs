//! Five nodes, each its own `edgefwd run` in its own network namespace, joined by a
//! bridge in a hub namespace that also holds the cluster's Redis and the browsers
//! (198.51.100.0/24: [`Fabric`]). No node is configured with an upstream: the directory alone
//! makes them one SFU.

use super::*;
use edgefwd_tests::{RedisServer, netns::Fabric};

fn ip_of(i: usize) -> String {
    Fabric::ip_of(i)
}

fn name_of(i: usize) -> String {
    format!("n{}", i + 1)
}

/// A Chromium viewer of `room` at `base`, from the hub: its JSON result (it decoded,
/// or the script failed).
fn chromium_viewer(f: &Fabric, base: &str, room: &str, edges: bool) -> Value {
    let mut args = vec![
        "--base", base, "--room", room, "--codec", "VP8", "--role", "watch", "--hold", "2",
    ];
    if edges {
        args.push("--edges");
    }
    let out = node(Some(&f.hub), &args).output().unwrap();
    parse_result("the Chromium viewer", &out)
}

/// Chromium publishes via WHIP at node 1 (the room is placed by its name: maybe
/// redirected to its origin); Chromium watches via WHEP at a node that is not the
/// origin (the room reaches it through the directory), and another Chromium picks
/// its node as the page does (probes to `/v1/edges`' candidates). Both decode; the
/// directory holds one origin at epoch 1; the viewer's report of its probes is in
/// the chosen node's /metrics.
#[test]
fn five_nodes_in_five_namespaces_serve_one_room_through_the_directory() {
    edgefwd_tests::require_root();
    let f = Fabric::new(5);
    let redis = RedisServer::start_in(&f.hub, "198.51.100.1");
    let nodes: Vec<Sfu> = (0..5)
        .map(|i| {
            let cfg = format!(
                "{}redis_url = \"{}\"\n",
                cluster_section(&name_of(i), &ip_of(i), &[]),
                redis.url()
            );
            start_sfu_at(Some(&f.nodes[i]), &ip_of(i), &cfg)
        })
        .collect();
    wait_until(15, "five leases in Redis", || {
        (0..5).all(|i| {
            redis
                .cli(&["EXISTS", &format!("edgefwd:node:{}", name_of(i))])
                .trim()
                == "1"
        })
    });
    let room = unique("fleet");
    let mut publisher = chromium_publisher(Some(&f.hub), &nodes[0].base, &room, 90);
    let key = format!("edgefwd:room:{{{room}}}");
    let mut origin = String::new();
    wait_until(40, "the publisher connected at the room's origin", || {
        origin = redis.cli(&["HGET", &key, "node"]).trim().to_string();
        let Some(i) = (0..5).find(|i| name_of(*i) == origin) else {
            return false;
        };
        let s: Value =
            serde_json::from_str(&f.get(&format!("{}/api/sessions", nodes[i].base))).unwrap();
        s["rooms"][&room].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["role"] == "publisher" && x["connected"] == true)
        })
    });
    let o = (0..5).find(|i| name_of(*i) == origin).unwrap();

    // WHEP at a node that is not the origin: decoded (the script checks frames).
    let watch = (o + 2) % 5;
    let direct = chromium_viewer(&f, &nodes[watch].base, &room, false);
    assert!(
        direct["subscriber"]["inbound"]["video"]["framesDecoded"].as_u64() > Some(30),
        "{direct:#}"
    );
    // The page's own choice, asked at yet another node.
    let ask = (o + 3) % 5;
    let chosen = chromium_viewer(&f, &nodes[ask].base, &room, true);
    assert!(
        chosen["subscriber"]["inbound"]["video"]["framesDecoded"].as_u64() > Some(30),
        "{chosen:#}"
    );

    // One origin, epoch 1.
    let out = f
        .hub
        .command(edgefwd_bin().to_str().unwrap())
        .args(["cluster", "rooms", &room, "--json", "--redis", &redis.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rooms: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rooms[0]["origin"], origin.as_str(), "{rooms:#}");
    assert_eq!(rooms[0]["epoch"], 1, "{rooms:#}");
    // The origin's page draws the room's tree.
    let out = node(
        Some(&f.hub),
        &[
            "--base",
            &nodes[o].base,
            "--room",
            &room,
            "--role",
            "view",
            "--expect",
            "1",
        ],
    )
    .output()
    .unwrap();
    let view = parse_result("the origin's live page", &out);
    let tree = view["tree"].as_str().unwrap_or("");
    assert!(
        tree.contains(&format!("origin {origin} (epoch 1")),
        "the page's tree: {tree:?}"
    );
    let total: u64 = nodes
        .iter()
        .map(|n| {
            f.get(&format!("{}/metrics", n.base))
                .lines()
                .filter(|l| l.starts_with("edgefwd_edge_chosen_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    assert_eq!(total, 1, "the page's report of its probes reached /metrics");
    let _ = publisher.kill();
    let _ = publisher.wait();
}

/// A Chromium viewer whose edge dies moves to another node by itself: three nodes in
/// their namespaces, the room's origin n1 full (`capacity = 1`, taken by a session
/// that never connects), so the page's edge choice puts the viewer at n2 or n3. Once
/// it decodes, that node is killed with SIGKILL; the page sees its video stall, asks
/// `/v1/edges` again (the dead node fails its probe) and decodes at the other node,
/// without a reload.
#[test]
fn a_chromium_viewer_whose_edge_dies_moves_to_another_node() {
    let (r, edge) = chromium_viewer_moves(|_, n| n.child.kill9());
    assert!(r["moves"].as_u64() >= Some(1), "{r:#}");
    eprintln!(
        "Chromium viewer: node {edge} killed, decoding at another node {} ms later",
        r["movedMs"]
    );
}

/// As above, the edge drained instead (`edgefwd drain`): the page follows its WHEP
/// session's event stream (`followMoves` in edges.js), is told to move, and plays at
/// another node before the draining one ends its session (4 s): its one move says
/// why.
#[test]
fn a_chromium_viewer_whose_edge_drains_moves_when_told() {
    let (r, edge) = chromium_viewer_moves(|f, n| {
        let api = n.base.clone();
        let out = f
            .hub
            .command(edgefwd_bin().to_str().unwrap())
            .args(["drain", "--no-wait", "--api", &api, "--deadline", "30"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    assert_eq!(r["moveReasons"], serde_json::json!(["draining"]), "{r:#}");
    let ms = r["movedMs"].as_u64().unwrap();
    eprintln!("Chromium viewer: node {edge} drained, decoding at another node {ms} ms later");
    assert!(
        ms < 4000,
        "moved before the drained node ended the session: {ms} ms"
    );
}

/// A Chromium viewer (the page's edge choice) of a room on n1 (full: its one viewer
/// place taken), at n2 or n3; `end` ends that edge once it decodes. Returns the
/// viewer's result (it moved and decoded at another node) and the edge's name.
fn chromium_viewer_moves(end: impl FnOnce(&Fabric, &mut Sfu)) -> (Value, String) {
    edgefwd_tests::require_root();
    let f = Fabric::new(3);
    let redis = RedisServer::start_in(&f.hub, "198.51.100.1");
    let mut nodes: Vec<Sfu> = (0..3)
        .map(|i| {
            let cfg = format!(
                "{}redis_url = \"{}\"\ncapacity = 1\n[webrtc.limits]\nice_timeout = 120\n",
                cluster_section(&name_of(i), &ip_of(i), &[]),
                redis.url()
            );
            start_sfu_at(Some(&f.nodes[i]), &ip_of(i), &cfg)
        })
        .collect();
    wait_until(15, "three leases in Redis", || {
        (0..3).all(|i| {
            redis
                .cli(&["EXISTS", &format!("edgefwd:node:{}", name_of(i))])
                .trim()
                == "1"
        })
    });
    let room = unique("move");
    redis.cli(&[
        "HSET",
        &format!("edgefwd:room:{{{room}}}"),
        "node",
        "n1",
        "epoch",
        "1",
    ]);
    // n1's one viewer place taken by a session that never connects.
    let (base, offer) = (nodes[0].base.clone(), super::cascade_faults::whep_offer());
    let url = format!("{base}/whep/{room}");
    let (status, body, _) = f.hub.run(move || super::cluster::post_sdp(&url, &offer));
    assert_eq!(status, 201, "{body}");
    let mut publisher = chromium_publisher(Some(&f.hub), &nodes[0].base, &room, 120);
    let mut viewer = node(
        Some(&f.hub),
        &[
            "--base",
            &nodes[0].base,
            "--room",
            &room,
            "--codec",
            "VP8",
            "--role",
            "move",
            "--timeout",
            "60",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Its first line names the resource: the node to kill.
    let mut out = std::io::BufReader::new(viewer.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let first: Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("the viewer's first line ({e}): {line:?}"));
    let whep = first["whep"].as_str().unwrap().to_string();
    let edge = (1..3)
        .find(|i| whep.starts_with(&nodes[*i].base))
        .unwrap_or_else(|| panic!("the viewer is at n2 or n3 (n1 is full): {whep}"));
    end(&f, &mut nodes[edge]);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = viewer.wait().unwrap();
    let r: Value = serde_json::from_str(rest.lines().last().unwrap_or("")).unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = viewer.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(
        status.success(),
        "the viewer moved and decoded: {err}\n{r:#}"
    );
    let _ = publisher.kill();
    let _ = publisher.wait();
    (r, name_of(edge))
}
