//! The daemon's HTTP listeners under clients that hold connections: event streams
//! that never end, request bodies sent slowly, and an open-file limit lower than the
//! configured caps. Every listener keeps its own budget, so the admin listener answers
//! whatever the public one suffers.

use super::*;
use std::io::{Read, Write};

/// The daemon under an open-file limit of `nofile` (soft and hard), on loopback with
/// an admin listener and `limits` under `[webrtc.limits]`.
fn start_limited(nofile: u64, limits: &str) -> Sfu {
    use std::os::unix::process::CommandExt;
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("edgefwd-fds-")));
    std::fs::write(
        &cfg,
        format!(
            "[webrtc]\nhttp = \"127.0.0.1:0\"\nmedia = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [webrtc.limits]\n{limits}"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(edgefwd_bin());
    cmd.args(["run", "--datapath", "user", "--config"])
        .arg(&cfg);
    // SAFETY: the pre_exec closure only calls setrlimit (async-signal-safe) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = spawn_edgefwd(cmd);
    let base = format!("http://{}", child.ready_addr("webrtc-http"));
    Sfu { child, base }
}

/// Sends `head` from `src` and reads the answer's head (what arrived within `wait`):
/// the connection stays open.
fn open_with(src: &str, port: u16, head: &str, wait: Duration) -> (std::net::TcpStream, String) {
    let mut c = connect_from(src, port);
    c.write_all(head.as_bytes()).unwrap();
    c.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend(&buf[..n]);
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    (c, String::from_utf8_lossy(&got).into_owned())
}

/// Under `nofile` 500 with an admin listener, the public listener takes what the limit
/// leaves (500 - 256 reserved - 2 x 64 for admin and metrics = 116 connections); event
/// streams, on the admin listener, at most half of its 64. Streams beyond that get
/// 503; with the public listener full of slow bodies and the admin one holding its
/// streams, the admin listener still answers state and metrics; slow bodies get 408
/// after `http_body_timeout`, streams end after `http_stream_lifetime`, and both
/// listeners answer again. Before, streams had no budget or end, the admin listener
/// shared the public cap and bodies had no timeout.
#[test]
fn streams_and_slow_bodies_never_silence_the_admin_listener() {
    let _k = kernel_lock();
    let sfu = start_limited(
        500,
        "http_max_connections_per_source = 500\nhttp_body_timeout = 5\n\
         http_stream_lifetime = 8\nhttp_header_timeout = 20\n",
    );
    let port: u16 = sfu.base.rsplit(':').next().unwrap().parse().unwrap();
    let admin = sfu.url("webrtc-admin");
    let admin_port: u16 = admin.rsplit(':').next().unwrap().parse().unwrap();

    let events = "GET /api/rooms/r/events HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut streams = Vec::new();
    let mut refused = 0;
    let started = std::time::Instant::now();
    for i in 0..40 {
        // From two addresses: one alone would meet the per-source cap (32) first.
        let src = if i % 2 == 0 { "127.0.0.3" } else { "127.0.0.6" };
        let (c, head) = open_with(src, admin_port, events, Duration::from_millis(300));
        if head.starts_with("HTTP/1.1 200") {
            assert!(head.contains("text/event-stream"), "{head}");
            streams.push(c);
        } else {
            assert!(
                head.starts_with("HTTP/1.1 503") && head.contains("http_max_streams"),
                "{head:?}"
            );
            refused += 1;
        }
    }
    assert_eq!((streams.len(), refused), (32, 8), "the streams' budget");

    // Slow bodies fill the public listener.
    let slow_post = "POST /whip/r HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n\
                     Content-Length: 1000\r\n\r\nv=0\r\n";
    let mut slow = Vec::new();
    let mut full = 0;
    for _ in 0..130 {
        // The answer to a refused one is written at once; an admitted one waits.
        let (c, head) = open_with("127.0.0.4", port, slow_post, Duration::from_millis(20));
        if head.is_empty() {
            slow.push(c);
        } else {
            assert!(
                head.starts_with("HTTP/1.1 503") && head.contains("http_max_connections"),
                "{head:?}"
            );
            full += 1;
        }
    }
    println!("{} slow bodies admitted, {full} refused", slow.len());
    assert_eq!((slow.len(), full), (116, 14), "the public listener's cap");
    assert_eq!(
        get_status(&format!("{}/", sfu.base), None),
        503,
        "the public listener is full"
    );
    // The admin listener answers all the same.
    for path in ["/api/sessions", "/metrics"] {
        let t = std::time::Instant::now();
        assert_eq!(get_status(&format!("{admin}{path}"), None), 200, "{path}");
        assert!(t.elapsed() < Duration::from_secs(1), "{path}");
    }

    // The slow bodies end at the body timeout, with a 408 that says why.
    for mut c in slow {
        let text = read_until_close(&mut c, Duration::from_secs(5))
            .expect("a slow body outlived the 5 s body timeout");
        assert!(
            text.starts_with("HTTP/1.1 408") && text.contains("body"),
            "{text:?}"
        );
    }
    assert_eq!(get_status(&format!("{}/", sfu.base), None), 200);

    // The streams end at their lifetime (8 s), and their places come back.
    for mut c in streams {
        assert!(
            read_until_close(&mut c, Duration::from_secs(10)).is_some(),
            "an event stream outlived its 8 s lifetime"
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(8));
    let (_c, head) = open_with("127.0.0.3", admin_port, events, Duration::from_millis(300));
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
}
