//! ICE over TCP for clients whose networks block UDP: Chromium in a namespace whose
//! nftables drop every UDP datagram joins over the SFU's passive TCP candidate
//! (RFC 6544), publishes and watches, and decodes; the SFU's view says which
//! sessions came over TCP and from where.

use super::*;

/// nftables in `ns` dropping every UDP datagram in and out (a hotel or corporate
/// network that lets only TCP through).
fn block_udp(ns: &NetNs) {
    let nft = |args: &[&str]| {
        let out = ns.command("nft").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    nft(&["add", "table", "inet", "noudp"]);
    for (chain, hook) in [("in", "input"), ("out", "output")] {
        nft(&[
            "add", "chain", "inet", "noudp", chain, "{", "type", "filter", "hook", hook,
            "priority", "0", ";", "}",
        ]);
        nft(&[
            "add", "rule", "inet", "noudp", chain, "meta", "l4proto", "udp", "drop",
        ]);
    }
}

/// Chromium publishes and watches from a namespace without UDP, on the socket path
/// and on the AF_XDP path (the legs' copies take the media socket there): both
/// sessions are nominated on TCP legs (the client's address behind each), the viewer
/// decodes VP8 and audio, and `/metrics` counts the connections. A run without the
/// TCP listener fails to connect at all (the namespace really blocks UDP).
#[test]
fn chromium_without_udp_joins_over_ice_tcp() {
    edgefwd_tests::require_root();
    let _k = kernel_lock();
    let t = Topology::new();
    block_udp(&t.publisher);
    let tcp = format!("ice_tcp = \"{FWD_A_V4}:0\"\n");
    // On a fixed media port, so sessions would be kept across restarts: TCP ones are
    // not (their connections end with the process).
    let runtime = std::env::temp_dir().join(unique("edgefwd-run-"));
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-tcp-")));
    std::fs::write(
        &cfg,
        format!(
            "[webrtc]\nhttp = \"{FWD_A_V4}:0\"\nmedia = \"{FWD_A_V4}:47311\"\n\
             runtime_dir = \"{}\"\n{tcp}",
            runtime.display()
        ),
    )
    .unwrap();
    let mut cmd = t.forwarder.command(edgefwd_bin().to_str().unwrap());
    cmd.args(["run", "--datapath", "user", "--config"])
        .arg(&cfg);
    let child = spawn_edgefwd(cmd);
    let sfu = Sfu {
        base: format!("http://{}", child.ready_addr("webrtc-http")),
        child,
    };
    let room = over_tcp(&t, sfu, "socket path", Some(&runtime));
    let _ = std::fs::remove_dir_all(&runtime);
    let _ = std::fs::remove_file(&cfg);
    let pin = PinDir::new();
    let sfu = start_xdp_sfu_with(&t, &pin, "auto", &tcp);
    let s = ns_json(&t.forwarder, &sfu.base, "/api/sessions");
    assert_eq!(s["media_path"]["path"], "af_xdp", "{s}");
    over_tcp(&t, sfu, "AF_XDP path", None);

    // Without the TCP listener: nothing gets through.
    let udp_only = start_sfu_at(Some(&t.forwarder), FWD_A_V4, "");
    let out = node(
        Some(&t.publisher),
        &[
            "--base",
            &udp_only.base,
            "--room",
            &room,
            "--codec",
            "VP8",
            "--timeout",
            "10",
        ],
    )
    .output()
    .unwrap();
    assert!(
        !out.status.success(),
        "joined without UDP and without ICE-TCP: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s = ns_json(&t.forwarder, &udp_only.base, "/api/sessions");
    assert_eq!(s["counters"]["rtp_in"], 0, "{s}");
}

/// Chromium (publisher and viewer) from `t.publisher` at `sfu`, over TCP; the room.
/// With `runtime` (the daemon's runtime directory), no session record is written.
fn over_tcp(t: &Topology, sfu: Sfu, what: &str, runtime: Option<&std::path::Path>) -> String {
    let room = unique("tcp");
    let both = node(
        Some(&t.publisher),
        &[
            "--base", &sfu.base, "--room", &room, "--codec", "VP8", "--hold", "4",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let sessions = || ns_json(&t.forwarder, &sfu.base, "/api/sessions");
    let connected_over_tcp = |s: &Value| -> Vec<Value> {
        s["rooms"][&room]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["connected"] == true && x["transport"] == "tcp")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until(40, "publisher and viewer connected over TCP", || {
        connected_over_tcp(&sessions()).len() == 2
    });
    for x in connected_over_tcp(&sessions()) {
        let client = x["tcp_client"].as_str().unwrap();
        assert!(client.starts_with(PUB_V4), "the client's own address: {x}");
    }
    if let Some(dir) = runtime {
        std::thread::sleep(Duration::from_millis(300)); // past a writer round
        let records: Vec<_> = walk(dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        assert!(records.is_empty(), "TCP sessions are not kept: {records:?}");
        assert!(
            !walk(dir).is_empty(),
            "the daemon keeps sessions on this port at all (its hand-over socket)"
        );
    }
    let out = both.wait_with_output().unwrap();
    let r = parse_result(&format!("Chromium over ICE-TCP, {what}"), &out);
    println!("over TCP, {what}: {}", r["subscriber"]["inbound"]);
    assert_subscriber_ok(&r, Some("VP8"));
    let m = t.forwarder.run({
        let base = sfu.base.clone();
        move || metrics_text(&base)
    });
    assert!(
        m.lines()
            .any(|l| l.starts_with("edgefwd_webrtc_ice_tcp_accepted_total ") && !l.ends_with(" 0")),
        "{m}"
    );
    room
}

/// A daemon whose media socket is on the wildcard address (as the packaged config
/// has it): its legs reach the media port over loopback. A raw client posts a WHEP
/// offer, reads the passive TCP candidate from the answer, connects, and its framed
/// ICE check (signed with the answer's password) is answered, framed, over TCP.
#[test]
fn a_check_over_tcp_is_answered_with_a_wildcard_media_socket() {
    use std::io::{Read as _, Write as _};
    let _k = kernel_lock();
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-tcp-")));
    std::fs::write(
        &cfg,
        "[webrtc]\nhttp = \"127.0.0.1:0\"\nmedia = \"0.0.0.0:0\"\ncandidates = [\"127.0.0.1\"]\n\
         ice_tcp = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut cmd = Command::new(edgefwd_bin());
    cmd.args(["run", "--datapath", "user", "--config"])
        .arg(&cfg);
    let child = spawn_edgefwd(cmd);
    let base = format!("http://{}", child.ready_addr("webrtc-http"));
    let (status, answer, _) = super::cluster::post_sdp(
        &format!("{base}/whep/{}", unique("tcp")),
        &super::cascade_faults::whep_offer(),
    );
    assert_eq!(status, 201, "{answer}");
    let attr = |name: &str| {
        answer
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {answer}"))
            .to_string()
    };
    let (ufrag, pwd) = (attr("a=ice-ufrag:"), attr("a=ice-pwd:"));
    let tcp = answer
        .lines()
        .find(|l| l.contains(" tcp ") && l.contains("tcptype passive"))
        .unwrap_or_else(|| panic!("no passive TCP candidate: {answer}"));
    let f: Vec<&str> = tcp.split_whitespace().collect();
    let at: std::net::SocketAddr = format!("{}:{}", f[4], f[5]).parse().unwrap();
    let mut c = std::net::TcpStream::connect(at).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let check = edgefwd::webrtc::ice::binding_request(&format!("{ufrag}:abcd"), &pwd, true);
    c.write_all(&(check.len() as u16).to_be_bytes()).unwrap();
    c.write_all(&check).unwrap();
    let mut len = [0u8; 2];
    c.read_exact(&mut len).unwrap();
    let mut got = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut got).unwrap();
    assert!(
        edgefwd::webrtc::ice::is_binding_success(&got),
        "a binding success, framed: {got:02x?}"
    );
    let s = get_json(&base, "/api/sessions");
    let x = &s["rooms"].as_object().unwrap().values().next().unwrap()[0];
    assert_eq!(x["transport"], "tcp", "{s}");
    assert_eq!(x["tcp_client"], c.local_addr().unwrap().to_string(), "{s}");
    let _ = std::fs::remove_file(&cfg);
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
