//! Daemons that did not stop cleanly, and the daemon that comes after them.

use super::*;

/// `kill -9` of an AF_XDP daemon leaves its XDP program attached (the link is pinned)
/// with the media address still steered to AF_XDP sockets that are gone. A daemon
/// started after it on the socket path, same media address and pin directory,
/// removes that steering at start: a new call gets its media.
#[test]
fn a_socket_path_daemon_after_a_killed_af_xdp_one_gets_media() {
    edgefwd_tests::require_root();
    let _k = kernel_lock();
    let t = Topology::new();
    let pin = PinDir::new();
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-restart-")));
    std::fs::write(
        &cfg,
        format!("[webrtc]\nhttp = \"{FWD_A_V4}:0\"\nmedia = \"{FWD_A_V4}:47123\"\n"),
    )
    .unwrap();
    let bin = edgefwd_bin();
    let run = |args: &[&str]| {
        let mut cmd = t.forwarder.command(bin.to_str().unwrap());
        cmd.args(["--pin-dir", pin.path().to_str().unwrap(), "run"])
            .args(args)
            .args(["--config", cfg.to_str().unwrap()]);
        spawn_edgefwd(cmd)
    };
    let mut xdp = run(&["--iface", "f0", "--webrtc-datapath", "auto"]);
    let base = format!("http://{}", xdp.ready_addr("webrtc-http"));
    let s = ns_json(&t.forwarder, &base, "/api/sessions");
    assert_eq!(s["media_path"]["path"], "af_xdp", "{s}");
    xdp.kill9();

    let user = run(&["--datapath", "user"]);
    let sfu = Sfu {
        base: format!("http://{}", user.ready_addr("webrtc-http")),
        child: user,
    };
    let out = t
        .publisher
        .command(bin.to_str().unwrap())
        .args(["load-test", "--url", &sfu.base, "--subscribers", "1"])
        .args([
            "--video-bitrate",
            "300",
            "--duration",
            "3",
            "--json",
            "--quiet",
        ])
        .env_remove("EDGEFWD_TOKEN")
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "load-test printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "the call through the socket-path daemon: {r:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["total"]["worst_loss_pct"], 0.0, "{r:#}");
    let _ = std::fs::remove_file(&cfg);
}
