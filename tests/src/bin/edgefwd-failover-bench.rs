//! `cargo xtask bench failover`: the media gap viewers see when a node of a cluster
//! fails or is drained, against the same run with no failure (these VMs vary up to 2x
//! between runs: the no-failure row is the baseline).
//!
//! Per kind, `--runs` times (default 3) on a fresh cluster (a real redis-server, three
//! `edgefwd run --datapath user` nodes on loopback, a load-test with one publisher):
//! * none: the same call, nothing fails;
//! * relay: a tree a -> b -> c, viewers at c, b killed with SIGKILL;
//! * edge: viewers through `/v1/edges` (capacity 2), the edge with most killed;
//! * origin: the origin killed, the publisher publishes again, viewers at b;
//! * drain: as edge, the edge drained (`edgefwd drain`) instead of killed;
//! * origin-drain: as origin, the origin drained instead of killed (the publisher is
//!   told to move, publishes again and the room's next node takes the room over);
//! * restart: one node on fixed ports (publisher and viewers there) stopped with
//!   SIGTERM and started again: the new process takes the sessions up;
//! * kill9: the same with SIGKILL and an immediate start.
//!
//! The figures are the longest gap any viewer saw in the run (load-test's own count,
//! packets stamped at the publisher; a failure's gap spans from the failure to the
//! viewer's next packet; it includes the wait from a join to the first packet, which
//! is the no-failure row's) and the longest stall (between two packets only: what a
//! restart costs a viewer already watching), p50 and p99 over the runs. Results:
//! table on stdout and bench/results/failover.{csv,json}.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use edgefwd_tests::{Edgefwd, RedisServer, edgefwd_bin, free_port, spawn_edgefwd, unique};
use serde_json::{Value, json};

struct Node {
    child: Edgefwd,
    base: String,
}

fn node(name: &str, redis: &RedisServer, extra: &str) -> Node {
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-failover-")));
    std::fs::write(
        &cfg,
        format!(
            "[webrtc]\nhttp = \"127.0.0.1:0\"\nmedia = \"127.0.0.1:0\"\n\
             [cluster]\nnode = \"{name}\"\nsecret = \"the failover bench's secret\"\n\
             lapse = 3\napi = \"127.0.0.1:0\"\nredis_url = \"{}\"\n{extra}",
            redis.url()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(edgefwd_bin());
    cmd.args(["run", "--datapath", "user", "--config"])
        .env("RUST_LOG", "warn")
        .arg(&cfg);
    let child = spawn_edgefwd(cmd);
    let base = format!("http://{}", child.ready_addr("webrtc-http"));
    Node { child, base }
}

fn viewers(n: &Node, room: &str) -> usize {
    viewers_at(&n.base, room)
}

fn viewers_at(base: &str, room: &str) -> usize {
    let Ok(mut r) = ureq::get(&format!("{base}/api/sessions")).call() else {
        return 0;
    };
    let v: Value = r.body_mut().read_json().unwrap_or_default();
    v["rooms"][room].as_array().map_or(0, |a| {
        a.iter()
            .filter(|x| x["role"] == "subscriber" && x["connected"] == true)
            .count()
    })
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One node on fixed ports, a call there, the node restarted (SIGTERM, or SIGKILL
/// for `kill9`) two seconds in: (gap, stall, loss) as [`run`] gives them.
fn restart_run(kind: &str) -> (f64, f64, f64) {
    let port = free_port();
    let runtime = std::env::temp_dir().join(unique("edgefwd-bench-run-"));
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-failover-")));
    std::fs::write(
        &cfg,
        format!(
            "[webrtc]\nhttp = \"127.0.0.1:{port}\"\nmedia = \"127.0.0.1:{port}\"\n\
             runtime_dir = \"{}\"\n",
            runtime.display()
        ),
    )
    .unwrap();
    let start = || {
        let mut cmd = Command::new(edgefwd_bin());
        cmd.args(["run", "--datapath", "user", "--config"])
            .env("RUST_LOG", "warn")
            .arg(&cfg);
        spawn_edgefwd(cmd)
    };
    let mut child = start();
    let base = format!("http://127.0.0.1:{port}");
    let prefix = unique(&format!("bench-{kind}"));
    let load = load_test(&base, &base, "4", &[], &prefix);
    wait("the viewers connected", 30, || {
        viewers_at(&base, &format!("{prefix}-0")) == 4
    });
    std::thread::sleep(Duration::from_secs(2));
    if kind == "restart" {
        child.stop();
    } else {
        child.kill9();
    }
    let _child = start();
    let r = report(kind, load);
    let _ = std::fs::remove_dir_all(&runtime);
    let _ = std::fs::remove_file(&cfg);
    r
}

/// One run of `kind`: the longest gap and stall any viewer saw (ms), and the load
/// test's loss.
/// The call: one publisher at `url`, `subs` viewers at `sub`, 12 s, ungated.
fn load_test(
    url: &str,
    sub: &str,
    subs: &str,
    extra: &[&str],
    prefix: &str,
) -> std::process::Child {
    Command::new(edgefwd_bin())
        .args(["load-test", "--url", url, "--subscribe-url", sub])
        .args(extra)
        .args(["--rooms", "1", "--publishers", "1", "--subscribers", subs])
        .args([
            "--concurrency",
            "1",
            "--video-bitrate",
            "500",
            "--duration",
            "12",
        ])
        .args(["--room-prefix", prefix, "--json", "--quiet"])
        .args(["--max-loss", "100", "--max-gap", "3600"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The load test's (longest gap, longest stall, loss).
fn report(kind: &str, load: std::process::Child) -> (f64, f64, f64) {
    let out = load.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{kind}: load-test gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let f = |k: &str| r["total"][k].as_f64().unwrap_or(f64::NAN);
    (f("longest_gap_ms"), f("longest_stall_ms"), f("loss_pct"))
}

fn run(kind: &str) -> (f64, f64, f64) {
    if kind == "restart" || kind == "kill9" {
        return restart_run(kind);
    }
    let redis = RedisServer::start();
    let extra = match kind {
        "relay" => "tree_degree = 1\n",
        "edge" | "drain" => "capacity = 2\n",
        _ => "",
    };
    let mut nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| node(n, &redis, extra))
        .collect();
    wait("three leases", 10, || {
        ["a", "b", "c"]
            .iter()
            .all(|n| redis.cli(&["EXISTS", &format!("edgefwd:node:{n}")]).trim() == "1")
    });
    let prefix = unique(&format!("bench-{kind}"));
    let room = format!("{prefix}-0");
    redis.cli(&[
        "HSET",
        &format!("edgefwd:room:{{{room}}}"),
        "node",
        "a",
        "epoch",
        "1",
    ]);
    if kind == "relay" {
        redis.cli(&[
            "HSET",
            &format!("edgefwd:tree:{{{room}}}"),
            "@epoch",
            "1",
            "b",
            "a",
            "c",
            "b",
        ]);
    }
    let (url, sub, subs, extra_args): (&str, &str, &str, &[&str]) = match kind {
        "relay" => (&nodes[0].base, &nodes[2].base, "2", &[]),
        "edge" | "drain" => (&nodes[0].base, &nodes[0].base, "4", &["--edges"]),
        "origin" | "origin-drain" => (&nodes[2].base, &nodes[1].base, "2", &["--failover"]),
        _ => (&nodes[0].base, &nodes[1].base, "2", &[]),
    };
    let load = load_test(url, sub, subs, extra_args, &prefix);
    let want: usize = subs.parse().unwrap();
    wait("the viewers connected", 30, || {
        nodes.iter().map(|n| viewers(n, &room)).sum::<usize>() == want
    });
    std::thread::sleep(Duration::from_secs(2));
    match kind {
        "relay" => nodes[1].child.kill9(),
        "origin" => nodes[0].child.kill9(),
        "origin-drain" => drain(&nodes[0].base),
        "edge" | "drain" => {
            let i = if viewers(&nodes[1], &room) >= viewers(&nodes[2], &room) {
                1
            } else {
                2
            };
            if kind == "edge" {
                nodes[i].child.kill9();
            } else {
                drain(&nodes[i].base);
            }
        }
        _ => {}
    }
    report(kind, load)
}

/// `edgefwd drain` of the node at `base`, not waiting for its exit.
fn drain(base: &str) {
    let out = Command::new(edgefwd_bin())
        .args(["drain", "--no-wait", "--api", base, "--deadline", "30"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let mut out = PathBuf::from("bench/results");
    let mut runs = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            "--runs" => runs = args.next().and_then(|s| s.parse().ok()).expect("--runs N"),
            // Accepted for a uniform `cargo xtask bench`: each run's length is fixed.
            "--seconds" => {
                args.next();
            }
            other => panic!("unknown argument {other}; use --out DIR --runs N"),
        }
    }
    let kinds = [
        "none",
        "relay",
        "edge",
        "origin",
        "drain",
        "origin-drain",
        "restart",
        "kill9",
    ];
    let mut rows = Vec::new();
    for kind in kinds {
        let (mut gaps, mut stalls, mut losses) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let (g, st, l) = run(kind);
            gaps.push(g);
            stalls.push(st);
            losses.push(l);
        }
        let (p50, p99) = (quantile(&mut gaps, 0.5), quantile(&mut gaps, 0.99));
        let stall = (quantile(&mut stalls, 0.5), quantile(&mut stalls, 0.99));
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        rows.push((kind, p50, p99, loss, gaps, stall));
    }
    let (base, base_stall) = (rows[0].1, rows[0].5.0);
    println!(
        "{:<12} {:>11} {:>11} {:>11} {:>13} {:>13} {:>13} {:>7}",
        "FAILURE",
        "GAP p50 ms",
        "GAP p99 ms",
        "p50 / none",
        "STALL p50 ms",
        "STALL p99 ms",
        "p50 / none",
        "LOSS %"
    );
    for (kind, p50, p99, loss, _, (s50, s99)) in &rows {
        println!(
            "{kind:<12} {p50:>11.1} {p99:>11.1} {:>11.1} {s50:>13.1} {s99:>13.1} {:>13.1} {loss:>7.2}",
            p50 / base,
            s50 / base_stall
        );
    }
    let result = json!({
        "machine": edgefwd_tests::bench::machine(),
        "at": edgefwd_tests::bench::utc_stamp(),
        "runs": runs,
        "kinds": rows.iter().map(|(k, p50, p99, loss, gaps, (s50, s99))| json!({
            "kind": k, "gap_p50_ms": p50, "gap_p99_ms": p99, "loss_pct": loss, "gaps_ms": gaps,
            "stall_p50_ms": s50, "stall_p99_ms": s99,
        })).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("failover.json"),
        serde_json::to_string_pretty(&result).unwrap(),
    )
    .unwrap();
    let mut csv = String::from("kind,gap_p50_ms,gap_p99_ms,stall_p50_ms,stall_p99_ms,loss_pct\n");
    for (kind, p50, p99, loss, _, (s50, s99)) in &rows {
        csv += &format!("{kind},{p50:.1},{p99:.1},{s50:.1},{s99:.1},{loss:.2}\n");
    }
    std::fs::write(out.join("failover.csv"), csv).unwrap();
    println!("\nresults: {}/failover.{{csv,json}}", out.display());
}
