//! `cargo xtask bench joins`: WHIP+WHEP joins per second (POST, ICE, DTLS, SRTP keys)
//! the daemon sustains, driven by `edgefwd load-test` on the same 2-core machine. Per
//! case: clients, failures, joins/s, join time median/p99, and the daemon's own CPU
//! time per join (from /proc), which gives the rate one daemon core would sustain
//! with the load tool off its core.
//!
//! Results: table on stdout, bench/results/joins.{csv,json}.

use std::{path::PathBuf, process::Command};

use edgefwd_tests::{
    bench::{cpu_time, machine, process_threads},
    edgefwd_bin, spawn_edgefwd, unique,
};

fn main() {
    let mut out = PathBuf::from("bench/results");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            // Accepted for a uniform `cargo xtask bench`: a join run is bounded by count.
            "--seconds" => {
                args.next();
            }
            other => panic!("unknown argument {other}; use --out DIR"),
        }
    }
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-joins-")));
    // Every client comes from 127.0.0.1: the per-source caps are raised accordingly.
    std::fs::write(
        &cfg,
        "[webrtc]\nhttp = \"127.0.0.1:0\"\nmedia = \"127.0.0.1:0\"\n[webrtc.limits]\n\
         max_sessions_per_source = 5000\nhttp_max_connections_per_source = 1024\n",
    )
    .unwrap();
    let mut cmd = Command::new(edgefwd_bin());
    cmd.args(["run", "--datapath", "user", "--config"])
        .env("RUST_LOG", "warn")
        .arg(&cfg);
    let daemon = spawn_edgefwd(cmd);
    let base = format!("http://{}", daemon.ready_addr("webrtc-http"));
    // (rooms, subscribers per room, joins in flight)
    let cases = [(20, 9, 16), (50, 9, 64), (50, 9, 128)];
    let mut rows = Vec::new();
    println!(
        "{:>7} {:>8} {:>7} {:>7} {:>8} {:>9} {:>9} {:>13} {:>15}",
        "CLIENTS",
        "IN FLIGHT",
        "JOINED",
        "FAILED",
        "JOINS/S",
        "p50 ms",
        "p99 ms",
        "DAEMON ms/JOIN",
        "JOINS/S/DAEMON-CORE"
    );
    for (rooms, subs, conc) in cases {
        let before = cpu_time(&process_threads(daemon.id()));
        let o = Command::new(edgefwd_bin())
            .args([
                "load-test",
                "--url",
                &base,
                "--publishers",
                "1",
                "--video-bitrate",
                "100",
            ])
            .args([
                "--rooms",
                &rooms.to_string(),
                "--subscribers",
                &subs.to_string(),
            ])
            .args([
                "--concurrency",
                &conc.to_string(),
                "--duration",
                "1",
                "--join-timeout",
                "20",
            ])
            .args(["--json", "--quiet"])
            .env_remove("EDGEFWD_TOKEN")
            .output()
            .unwrap();
        let used_ns = cpu_time(&process_threads(daemon.id())) - before;
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "load-test gave no JSON ({e}): {}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
        let joined =
            r["joined_publishers"].as_u64().unwrap() + r["joined_subscribers"].as_u64().unwrap();
        let jps = r["joins_per_s"].as_f64().unwrap();
        // The daemon's CPU over the whole run (joins, a second of media, DELETEs): an
        // upper bound of its cost per join.
        let ms_per_join = used_ns as f64 / 1e6 / joined.max(1) as f64;
        let row = serde_json::json!({
            "clients": r["clients"], "in_flight": conc, "joined": joined, "failed": r["failed"],
            "failures": r["failures"], "joins_per_s": jps,
            "join_ms_p50": r["join_ms_subscribers"]["median"], "join_ms_p99": r["join_ms_subscribers"]["p99"],
            "daemon_cpu_ms_per_join": ms_per_join,
            "joins_per_s_per_daemon_core": 1e3 / ms_per_join,
        });
        println!(
            "{:>7} {:>8} {:>7} {:>7} {:>8.0} {:>9.1} {:>9.1} {:>13.2} {:>15.0}",
            r["clients"],
            conc,
            joined,
            r["failed"],
            jps,
            row["join_ms_p50"].as_f64().unwrap_or(0.0),
            row["join_ms_p99"].as_f64().unwrap_or(0.0),
            ms_per_join,
            1e3 / ms_per_join
        );
        rows.push(row);
    }
    let _ = std::fs::remove_file(&cfg);
    std::fs::create_dir_all(&out).unwrap();
    let mut csv = String::from(
        "clients,in_flight,joined,failed,joins_per_s,join_ms_p50,join_ms_p99,daemon_cpu_ms_per_join,joins_per_s_per_daemon_core\n",
    );
    for r in &rows {
        csv += &format!(
            "{},{},{},{},{:.1},{},{},{:.3},{:.1}\n",
            r["clients"],
            r["in_flight"],
            r["joined"],
            r["failed"],
            r["joins_per_s"].as_f64().unwrap(),
            r["join_ms_p50"],
            r["join_ms_p99"],
            r["daemon_cpu_ms_per_join"].as_f64().unwrap(),
            r["joins_per_s_per_daemon_core"].as_f64().unwrap()
        );
    }
    let cpu = machine();
    std::fs::write(out.join("joins.csv"), csv).unwrap();
    std::fs::write(
        out.join("joins.json"),
        serde_json::to_string_pretty(&serde_json::json!({"machine": cpu, "rows": rows})).unwrap(),
    )
    .unwrap();
    println!("saved {0}/joins.{{csv,json}}", out.display());
}
