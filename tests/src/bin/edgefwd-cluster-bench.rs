//! `cargo xtask bench cluster`: what the cluster's directory and trunks cost, against
//! baselines measured in the same run (these VMs vary up to 2x between runs).
//!
//! 1. Directory latency against a real redis-server: a claim (Lua), an origin lookup,
//!    and the whole join-time lookup of a non-origin node (origin, leases, tree attach),
//!    each p50/p99, against one plain GET round trip.
//! 2. WHEP joins through a non-origin node (each room new there: directory lookup and
//!    trunk set-up included) against joins at the origin: joins/s and join time.
//! 3. A cold node: WHEP POST to first media for a room the node does not carry yet,
//!    against the same at the origin.
//! 4. Extra latency per tree hop: viewers at the origin, one hop and two hops down
//!    (a chain a -> b -> c in the room's tree), measured at once.
//!
//! Three `edgefwd run --datapath user` nodes on loopback share the Redis; rooms are
//! claimed for node a beforehand so the placement does not move them. Results: table
//! on stdout, bench/results/cluster.{csv,json}.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use edgefwd::cluster::redis::{Directory, Lease};
use edgefwd_tests::{Edgefwd, RedisServer, edgefwd_bin, spawn_edgefwd, unique};
use serde_json::{Value, json};

const SECRET: &str = "the cluster bench's shared secret";

fn node(name: &str, redis: &RedisServer) -> Edgefwd {
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-cluster-bench-")));
    std::fs::write(
        &cfg,
        format!(
            "[webrtc]\nhttp = \"127.0.0.1:0\"\nmedia = \"127.0.0.1:0\"\n\
             [webrtc.limits]\nmax_sessions_per_source = 5000\n\
             http_max_connections_per_source = 1024\n\
             [cluster]\nnode = \"{name}\"\nsecret = \"{SECRET}\"\napi = \"127.0.0.1:0\"\n\
             redis_url = \"{}\"\nnew_rooms_per_second = 1000\ntree_degree = 1\n",
            redis.url()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(edgefwd_bin());
    cmd.args(["run", "--datapath", "user", "--config"])
        .env("RUST_LOG", "warn")
        .arg(&cfg);
    spawn_edgefwd(cmd)
}

/// p50 and p99 of `v` (microseconds).
fn p50_p99(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

async fn timed<F: std::future::Future>(f: F) -> f64 {
    let t = Instant::now();
    f.await;
    t.elapsed().as_secs_f64() * 1e6
}

/// Part 1: (what, p50 µs, p99 µs) per operation, n of each.
async fn directory_latency(url: &str, n: usize) -> Vec<(&'static str, f64, f64)> {
    let a = Directory::connect(url, "bench-a").await.unwrap();
    let b = Directory::connect(url, "bench-b").await.unwrap();
    for d in [&a, &b] {
        d.renew(&Lease::bare(d.me(), "127.0.0.1:9".parse().unwrap()))
            .await
            .unwrap();
    }
    let rooms: Vec<String> = (0..n).map(|i| format!("bench-dir-{i}")).collect();
    let (mut get, mut claim, mut origin, mut join) = (vec![], vec![], vec![], vec![]);
    for r in &rooms {
        get.push(timed(a.lease("bench-b")).await);
        claim.push(timed(a.claim(r)).await);
        origin.push(timed(b.origin(r)).await);
        join.push(timed(b.upstream(r, 8, &[])).await);
    }
    let mut out = Vec::new();
    for (what, v) in [
        ("GET (baseline)", &mut get),
        ("claim (Lua)", &mut claim),
        ("origin lookup", &mut origin),
        ("join-time lookup + attach", &mut join),
    ] {
        let (p50, p99) = p50_p99(v);
        out.push((what, p50, p99));
    }
    out
}

/// Claims `rooms` for node `a` and, with `chain`, puts b under a and c under b in
/// each room's tree.
async fn preclaim(url: &str, rooms: &[String], chain: bool) {
    let a = Directory::connect(url, "a").await.unwrap();
    for r in rooms {
        let o = a.claim(r).await.unwrap();
        assert_eq!(o.node, "a", "node a's lease is alive: the claim is a's");
        if chain {
            let out = Command::new("redis-cli")
                .args(["-u", url, "HSET", &format!("edgefwd:tree:{{{r}}}")])
                .args(["@epoch", &o.epoch.to_string(), "b", "a", "c", "b"])
                .output()
                .unwrap();
            assert!(out.status.success());
        }
    }
}

/// A load test: rooms `PREFIX-i` published at `publish`, viewers at `watch`.
fn load(
    publish: &str,
    watch: &str,
    prefix: &str,
    rooms: usize,
    subs: usize,
    conc: usize,
    secs: u64,
) -> Command {
    let mut c = Command::new(edgefwd_bin());
    c.args(["load-test", "--url", publish, "--subscribe-url", watch])
        .args(["--rooms", &rooms.to_string(), "--publishers", "1"])
        .args(["--subscribers", &subs.to_string()])
        .args(["--concurrency", &conc.to_string(), "--video-bitrate", "300"])
        .args(["--duration", &secs.to_string(), "--room-prefix", prefix])
        .args([
            "--json",
            "--quiet",
            "--max-loss",
            "100",
            "--max-gap",
            "3600",
        ])
        .env_remove("EDGEFWD_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

fn report(c: std::process::Child) -> Value {
    let out = c.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "load-test gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn rooms(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The video track's row of a report.
fn video(r: &Value) -> &Value {
    r["tracks"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["kind"] == "video"))
        .unwrap_or(&Value::Null)
}

fn main() {
    let mut out = PathBuf::from("bench/results");
    let mut secs = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            "--seconds" => {
                secs = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            other => panic!("unknown argument {other}; use --out DIR --seconds N"),
        }
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    println!("1. Directory latency against redis-server (2000 of each, sequential)");
    let dir = rt.block_on(directory_latency(&url, 2000));
    let base = dir[0].1;
    println!(
        "{:<28} {:>9} {:>9} {:>12}",
        "OPERATION", "p50 µs", "p99 µs", "p50 x GET"
    );
    for (what, p50, p99) in &dir {
        println!("{what:<28} {p50:>9.0} {p99:>9.0} {:>12.2}", p50 / base);
    }

    let nodes: Vec<Edgefwd> = ["a", "b", "c"].iter().map(|n| node(n, &redis)).collect();
    let http: Vec<String> = nodes
        .iter()
        .map(|n| format!("http://{}", n.ready_addr("webrtc-http")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.block_on(async {
        let d = Directory::connect(&url, "bench").await.unwrap();
        let live = d.live_nodes().await.unwrap();
        ["a", "b", "c"]
            .iter()
            .filter(|n| live.iter().any(|l| l.node == **n))
            .count()
    }) < 3
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }

    println!(
        "\n2. WHEP joins: 20 rooms x 9 viewers, 32 in flight; at the origin vs through node b"
    );
    let (pa, pb) = (unique("at-origin"), unique("via-b"));
    rt.block_on(preclaim(&url, &rooms(&pa, 20), false));
    rt.block_on(preclaim(&url, &rooms(&pb, 20), false));
    let at_origin = report(load(&http[0], &http[0], &pa, 20, 9, 32, 2).spawn().unwrap());
    let via_b = report(load(&http[0], &http[1], &pb, 20, 9, 32, 2).spawn().unwrap());
    let joins = |r: &Value| {
        (
            r["joins_per_s"].as_f64().unwrap_or(0.0),
            r["join_ms_subscribers"]["median"].as_f64().unwrap_or(0.0),
            r["join_ms_subscribers"]["p99"].as_f64().unwrap_or(0.0),
            r["failed"].as_u64().unwrap_or(0),
        )
    };
    let (ja, jb) = (joins(&at_origin), joins(&via_b));
    println!(
        "{:<22} {:>8} {:>12} {:>12} {:>7}",
        "WHERE", "JOINS/S", "JOIN p50 ms", "JOIN p99 ms", "FAILED"
    );
    for (what, j) in [("at the origin", ja), ("via node b (trunk)", jb)] {
        println!(
            "{what:<22} {:>8.1} {:>12.1} {:>12.1} {:>7}",
            j.0, j.1, j.2, j.3
        );
    }
    println!(
        "ratio via b / at origin: joins/s {:.2}, join p50 {:.2}",
        jb.0 / ja.0,
        jb.1 / ja.1
    );

    println!("\n3. Cold node: WHEP POST to first media, 20 rooms one at a time, 1 viewer each");
    let (ca, cb) = (unique("cold-origin"), unique("cold-b"));
    rt.block_on(preclaim(&url, &rooms(&ca, 20), false));
    rt.block_on(preclaim(&url, &rooms(&cb, 20), false));
    let cold_a = report(load(&http[0], &http[0], &ca, 20, 1, 1, 2).spawn().unwrap());
    let cold_b = report(load(&http[0], &http[2], &cb, 20, 1, 1, 2).spawn().unwrap());
    // (join p50, first packet after the join p50, their sum p50, sum of p99s)
    let first = |r: &Value| {
        let j = &r["join_ms_subscribers"];
        let f = &video(r)["first_media_ms"];
        let (j50, f50) = (
            j["median"].as_f64().unwrap_or(0.0),
            f["median"].as_f64().unwrap_or(0.0),
        );
        let p99 = j["p99"].as_f64().unwrap_or(0.0) + f["p99"].as_f64().unwrap_or(0.0);
        (j50, f50, j50 + f50, p99)
    };
    let (fa, fb) = (first(&cold_a), first(&cold_b));
    println!(
        "{:<18} {:>12} {:>18} {:>14} {:>14}",
        "WHERE", "JOIN p50 ms", "TO 1ST PKT p50 ms", "SUM p50 ms", "SUM p99 ms"
    );
    for (what, x) in [("at the origin", fa), ("cold node c", fb)] {
        println!(
            "{what:<18} {:>12.1} {:>18.1} {:>14.1} {:>14.1}",
            x.0, x.1, x.2, x.3
        );
    }
    println!(
        "ratio cold / origin: join p50 {:.2}, POST to first media p50 {:.2}",
        fb.0 / fa.0,
        fb.2 / fa.2
    );

    println!("\n4. Latency per tree hop: a -> b -> c, viewers at each at once, {secs} s");
    let prefixes = [unique("hop0"), unique("hop1"), unique("hop2")];
    for p in &prefixes {
        rt.block_on(preclaim(&url, &rooms(p, 2), true));
    }
    let runs: Vec<_> = prefixes
        .iter()
        .zip(&http)
        .map(|(p, h)| load(&http[0], h, p, 2, 3, 8, secs).spawn().unwrap())
        .collect();
    let hops: Vec<Value> = runs.into_iter().map(report).collect();
    let lat = |r: &Value| {
        let v = video(r);
        (
            v["latency_ms"]["median"].as_f64().unwrap_or(0.0),
            v["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            v["loss_pct"].as_f64().unwrap_or(0.0),
        )
    };
    println!(
        "{:<14} {:>12} {:>12} {:>8}",
        "VIEWERS AT", "p50 ms", "p99 ms", "LOSS %"
    );
    let l: Vec<_> = hops.iter().map(lat).collect();
    for (i, x) in l.iter().enumerate() {
        println!(
            "{:<14} {:>12.2} {:>12.2} {:>8.2}",
            format!("depth {i}"),
            x.0,
            x.1,
            x.2
        );
    }
    // Over both hops (each single difference is within the noise of a 0.1 ms clock).
    let per_hop_p50 = (l[2].0 - l[0].0) / 2.0;
    let per_hop_p99 = (l[2].1 - l[0].1) / 2.0;
    println!(
        "extra per hop (depth 2 - depth 0, halved): p50 {per_hop_p50:.3} ms, p99 {per_hop_p99:.3} ms"
    );

    let result = json!({
        "machine": edgefwd_tests::bench::machine(),
        "at": edgefwd_tests::bench::utc_stamp(),
        "directory_us": dir.iter().map(|(w, p50, p99)| json!({"op": w, "p50": p50, "p99": p99, "p50_x_get": p50 / base})).collect::<Vec<_>>(),
        "joins": {"at_origin": {"joins_per_s": ja.0, "p50_ms": ja.1, "p99_ms": ja.2, "failed": ja.3},
                  "via_b": {"joins_per_s": jb.0, "p50_ms": jb.1, "p99_ms": jb.2, "failed": jb.3},
                  "ratio_joins_per_s": jb.0 / ja.0},
        "cold_first_media_ms": {
            "origin": {"join_p50": fa.0, "first_packet_p50": fa.1, "p50": fa.2, "p99": fa.3},
            "cold": {"join_p50": fb.0, "first_packet_p50": fb.1, "p50": fb.2, "p99": fb.3},
            "ratio_join_p50": fb.0 / fa.0, "ratio_p50": fb.2 / fa.2},
        "hops": l.iter().enumerate().map(|(i, x)| json!({"depth": i, "p50_ms": x.0, "p99_ms": x.1, "loss_pct": x.2})).collect::<Vec<_>>(),
        "extra_per_hop_ms": {"p50": per_hop_p50, "p99": per_hop_p99},
    });
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("cluster.json"),
        serde_json::to_string_pretty(&result).unwrap(),
    )
    .unwrap();
    let mut csv = String::from("section,what,p50,p99,ratio\n");
    for (w, p50, p99) in &dir {
        csv += &format!("directory_us,{w},{p50:.1},{p99:.1},{:.3}\n", p50 / base);
    }
    csv += &format!("joins,at_origin_joins_per_s,{:.1},,\n", ja.0);
    csv += &format!("joins,via_b_joins_per_s,{:.1},,{:.3}\n", jb.0, jb.0 / ja.0);
    csv += &format!("cold_ms,origin,{:.1},{:.1},\n", fa.2, fa.3);
    csv += &format!(
        "cold_ms,cold_node,{:.1},{:.1},{:.3}\n",
        fb.2,
        fb.3,
        fb.2 / fa.2
    );
    for (i, x) in l.iter().enumerate() {
        csv += &format!("hop_latency_ms,depth_{i},{:.2},{:.2},\n", x.0, x.1);
    }
    std::fs::write(out.join("cluster.csv"), csv).unwrap();
    println!("\nresults: {}/cluster.{{csv,json}}", out.display());
    for mut n in nodes {
        n.stop();
    }
}
