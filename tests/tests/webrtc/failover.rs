//! Node loss inside a room's tree: the nodes below a dead relay take the room from
//! another parent, and their viewers keep their sessions.

use super::*;
use edgefwd_tests::RedisServer;

/// A room's tree a -> b -> c (origin a; written into the directory before the room is
/// published, as `tree_degree = 1` would grow it). Load-test viewers watch at c; b is
/// killed with SIGKILL mid-call. c's probes to b go unanswered, it suspects b within
/// 300 ms and takes the room from a at once: the viewers never rejoin and their
/// longest gap stays under a second (the load test's gate), the tree now has c under
/// a, and c's /metrics counts the suspicion.
#[test]
fn a_killed_relay_s_subtree_gets_media_back_within_a_second_without_rejoining() {
    let redis = RedisServer::start();
    let node = |n: &str| {
        start_sfu(
            None,
            &format!(
                "{}redis_url = \"{}\"\ntree_degree = 1\n",
                cluster_section(n, "127.0.0.1", &[]),
                redis.url()
            ),
        )
    };
    let a = node("a");
    let mut b = node("b");
    let c = node("c");
    wait_until(10, "three leases in Redis", || {
        ["a", "b", "c"]
            .iter()
            .all(|n| redis.cli(&["EXISTS", &format!("edgefwd:node:{n}")]).trim() == "1")
    });
    let prefix = unique("failover");
    let room = format!("{prefix}-0");
    let room_key = format!("edgefwd:room:{{{room}}}");
    let tree_key = format!("edgefwd:tree:{{{room}}}");
    redis.cli(&["HSET", &room_key, "node", "a", "epoch", "1"]);
    redis.cli(&["HSET", &tree_key, "@epoch", "1", "b", "a", "c", "b"]);

    let load = Command::new(edgefwd_bin())
        .args(["load-test", "--url", &a.base, "--subscribe-url", &c.base])
        .args(["--rooms", "1", "--publishers", "1", "--subscribers", "2"])
        .args(["--video-bitrate", "500", "--duration", "12"])
        .args(["--room-prefix", &prefix, "--json", "--quiet"])
        .args(["--max-loss", "20", "--max-gap", "1"])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The viewers at c, their room from b.
    wait_until(20, "c's viewers connected, the room from b", || {
        let s = get_json(&c.base, "/api/sessions");
        let conn = s["rooms"][&room].as_array().map_or(0, |a| {
            a.iter()
                .filter(|x| x["role"] == "subscriber" && x["connected"] == true)
                .count()
        });
        conn == 2 && s["cascade"]["upstreams"][&room]["node"] == "b"
    });
    std::thread::sleep(Duration::from_secs(3));
    b.child.kill9();
    // c hangs under a now (while the call goes on: it leaves the tree after it).
    wait_until(5, "c re-attached under a", || {
        redis.cli(&["HGET", &tree_key, "c"]).trim() == "a"
    });

    let out = load.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        out.status.success(),
        "the viewers' media came back within a second: {:#}\n{:#}",
        r["over_limits"],
        r["tracks"]
    );
    assert_eq!(r["joined_subscribers"], 2, "{r:#}");
    eprintln!(
        "longest gap at c's viewers after b was killed: {} ms",
        r["total"]["longest_gap_ms"]
    );
    // c suspected b.
    let m = ureq::get(&format!("{}/metrics", c.base))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("edgefwd_cluster_suspicions ") && !l.ends_with(" 0")),
        "{}",
        m.lines()
            .filter(|l| l.contains("suspic"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
