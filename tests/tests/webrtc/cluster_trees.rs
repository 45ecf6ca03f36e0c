//! A big room over a tree of nodes: five nodes sharing a real Redis, each taking at
//! most two viewers (`[cluster] capacity`) and relaying to at most two others
//! (`tree_degree`). Viewers choose their node through `/v1/edges` (probes raced, as
//! the page does); past a node's capacity they go elsewhere, and the nodes carrying
//! the room form a tree whose edges the directory holds.

use super::*;
use super::{cascade_faults::whep_offer, cluster::post_sdp};
use edgefwd_tests::RedisServer;

const NODES: [&str; 5] = ["t1", "t2", "t3", "t4", "t5"];

/// Nine viewers over five nodes of two places each: the room's origin, two children,
/// and grandchildren (depth 2) whose media comes through two trunks. Every viewer gets
/// the stream with < 1 % loss (counted against what was sent); the directory's tree
/// is loop-free with at most two children per node; the probes' RTTs are in Redis
/// and the viewers' reports in /metrics; when the viewers leave, demand lapses and
/// the branches are pruned from the tree.
#[test]
fn viewers_placed_through_edges_form_a_tree_of_depth_two() {
    let redis = RedisServer::start();
    let extra = "capacity = 2\ntree_degree = 2\n";
    let nodes: Vec<Sfu> = NODES
        .iter()
        .map(|n| {
            start_sfu(
                None,
                &format!(
                    "{}redis_url = \"{}\"\n{extra}",
                    cluster_section(n, "127.0.0.1", &[]),
                    redis.url()
                ),
            )
        })
        .collect();
    wait_until(10, "the nodes' leases in Redis", || {
        NODES
            .iter()
            .all(|n| redis.cli(&["EXISTS", &format!("edgefwd:node:{n}")]).trim() == "1")
    });
    // Each node has measured the others over the media path (probes every 3 s).
    wait_until(15, "every node's RTT row in Redis", || {
        NODES
            .iter()
            .all(|n| redis.cli(&["HLEN", &format!("edgefwd:rtt:{n}")]).trim() == "4")
    });
    let prefix = unique("tree");
    let room = format!("{prefix}-0");
    let load = Command::new(edgefwd_bin())
        .args(["load-test", "--url", &nodes[2].base, "--edges"])
        .args(["--rooms", "1", "--publishers", "1", "--subscribers", "9"])
        // One join at a time: each viewer's edges reflect the ones before it.
        .args([
            "--concurrency",
            "1",
            "--video-bitrate",
            "400",
            "--duration",
            "8",
        ])
        .args(["--room-prefix", &prefix, "--json", "--quiet"])
        .args(["--max-loss", "1", "--max-gap", "2"])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the media flows: the tree as the operator sees it, its fullest snapshot.
    let mut load = load;
    let mut tree = Value::Null;
    while load.try_wait().unwrap().is_none() {
        // Before the publisher's claim the CLI says the room has no origin.
        let (ok, out, _) =
            edgefwd_cli(&["cluster", "rooms", &room, "--redis", &redis.url(), "--json"]);
        if ok {
            let now: Value = serde_json::from_str(&out).unwrap();
            let size = |t: &Value| t["tree"].as_array().map_or(0, |t| t.len());
            if size(&now[0]) > size(&tree) {
                tree = now[0].clone();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = load.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        out.status.success(),
        "{:#}\n{:#}",
        r["over_limits"],
        r["failures"]
    );
    assert_eq!(r["joined_subscribers"], 9, "{r:#}");
    assert!(r["total"]["loss_pct"].as_f64().unwrap() < 1.0, "{r:#}");
    // Nine viewers, two per node: all five nodes carry the room, four in the tree.
    assert_eq!(
        tree["tree"].as_array().map(|t| t.len()),
        Some(4),
        "{tree:#}"
    );
    assert!(tree["depth"].as_u64() >= Some(2), "{tree:#}");

    // Loop-free, bounded degree: every member's chain reaches the origin, no node has
    // more than two children.
    let origin = tree["origin"].as_str().unwrap().to_string();
    let members = tree["tree"].as_array().unwrap();
    let mut children: std::collections::BTreeMap<&str, usize> = Default::default();
    for m in members {
        assert!(
            m["depth"].as_u64().is_some(),
            "not reaching the origin: {tree:#}"
        );
        *children.entry(m["parent"].as_str().unwrap()).or_default() += 1;
    }
    assert!(children.values().all(|c| *c <= 2), "{tree:#}");
    assert!(children.contains_key(origin.as_str()), "{tree:#}");

    // Each viewer's node: at most two viewers each at any time (capacity), so the
    // nine spread over all five; the viewers' choices reached /metrics.
    let chosen: u64 = nodes
        .iter()
        .map(|n| {
            let m = metrics_text(&n.base);
            m.lines()
                .filter(|l| l.starts_with("edgefwd_edge_chosen_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    assert!(chosen >= 9, "viewers' edge reports counted: {chosen}");

    // The viewers left: each relay's demand lapses (lapse 3 s) and it leaves the tree.
    wait_until(20, "the room's branches pruned", || {
        let rooms = edgefwd_cli_json(&["cluster", "rooms", &room, "--redis", &redis.url()]);
        rooms[0]["tree"].as_array().is_some_and(|t| t.is_empty())
    });
}

/// `/v1/edges` answers with at most three candidates with probe URLs, all allowing
/// any origin (a page from one node races probes to others); a bad query says what
/// to fix; a full node redirects a WHEP offer (307) to a node with room.
#[test]
fn edges_answer_candidates_and_a_full_node_redirects() {
    let redis = RedisServer::start();
    let nodes: Vec<Sfu> = NODES[..4]
        .iter()
        .map(|n| {
            start_sfu(
                None,
                &format!(
                    "{}redis_url = \"{}\"\ncapacity = 1\n",
                    cluster_section(n, "127.0.0.1", &[]),
                    redis.url()
                ),
            )
        })
        .collect();
    wait_until(10, "the nodes' leases in Redis", || {
        NODES[..4]
            .iter()
            .all(|n| redis.cli(&["EXISTS", &format!("edgefwd:node:{n}")]).trim() == "1")
    });
    let mut r = ureq::get(&format!("{}/v1/edges?room=some-room", nodes[0].base))
        .call()
        .unwrap();
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("*")
    );
    let v: Value = r.body_mut().read_json().unwrap();
    let edges = v["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 3, "{v:#}");
    for e in edges {
        let probe = e["probe"].as_str().unwrap();
        let r = ureq::get(probe).call().unwrap();
        assert_eq!(r.status().as_u16(), 204);
        assert!(e["whep"].as_str().unwrap().ends_with("/whep/some-room"));
    }
    let bad = ureq::get(&format!("{}/v1/edges", nodes[0].base))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let js = ureq::get(&format!("{}/edges.js", nodes[0].base))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(js.contains("export async function chooseEdge"));

    // t1 takes one viewer (capacity 1); the next offer there is sent to another node.
    let room = unique("full");
    let post = |base: &str| {
        let (status, body, location) = post_sdp(&format!("{base}/whep/{room}"), &whep_offer());
        (status, location, body)
    };
    let (status, _, body) = post(&nodes[0].base);
    assert_eq!(status, 201, "{body}");
    let (status, location, body) = post(&nodes[0].base);
    assert_eq!(status, 307, "{body}");
    let location = location.unwrap();
    assert!(
        nodes[1..]
            .iter()
            .any(|n| location.starts_with(&format!("{}/whep/{room}?tried=t1", n.base))),
        "{location}"
    );
}
