//! A cascade in network namespaces, each node its own `edgefwd run` process:
//!
//! ```text
//!  pub ── origin ──trunk── relay1 ── viewers1 (10 receivers)
//!              ├──trunk── relay2 ── viewers2 (10 receivers)
//!              └──trunk── relay3 ── viewers3 (10 receivers)
//! ```
//!
//! The nodes are joined by links (`[[link]]`): each relay asks the origin, over the
//! node API with the cluster secret, for the SSRCs its subscribers want, and the
//! origin sends it trunk copies that keep the RTP packet as it is (only
//! Ethernet/IP/UDP change); each relay fans its trunk out to ten subscribers with
//! their own SSRC and sequence/timestamp offsets. Every receiver must get every packet
//! exactly once with its rewrites; a subscriber removed mid-stream stops while the
//! others go on without a gap; the kernels' UDP checksum counters stay at zero. A
//! relay whose subscribers all leave stops receiving (its branch carries nothing), a
//! relay that dies loses its trunk once its demand lapses, and a relay whose origin
//! dies reports it.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use edgefwd_tests::{
    Edgefwd, PinDir, edgefwd_bin, kernel_lock,
    netns::{NetNs, link},
    pkt::Rtp,
};

const SSRC: u32 = 0x00c0_ffee;
const N: u16 = 300;
/// Packets sent after relay 3's subscribers left.
const EXTRA: u16 = 50;
const RELAYS: usize = 3;
const VIEWERS: usize = 10;

const LAPSE: u64 = 2;

/// Trunk link `k`'s end `h` (k = 0: publisher to origin): 198.51.100.0/24 in /27s,
/// one per link.
fn trunk(k: usize, h: usize) -> String {
    format!("198.51.100.{}", k * 32 + h)
}

/// Relay `k`'s viewer link, end `h`: 203.0.113.0/24 in /27s.
fn edge(k: usize, h: usize) -> String {
    format!("203.0.113.{}", k * 32 + h)
}

fn origin_config(secret: &std::path::Path) -> String {
    let mut c = format!(
        "[[listener]]\naddr = \"198.51.100.2:5004\"\ndrop_unknown_source = true\ndrop_no_route = true\n\
         [cluster]\nnode = \"origin\"\napi = \"0.0.0.0:7000\"\nsecret_file = \"{}\"\nlapse = {LAPSE}\n\
         [[stream]]\nlisten = \"198.51.100.2:5004\"\nsource = \"198.51.100.1:40000\"\nssrc = {SSRC}\n",
        secret.display()
    );
    for k in 1..=RELAYS {
        // A trunk per relay; it carries what the relay asks for.
        let (o, r) = (trunk(k, 1), trunk(k, 2));
        c += &format!(
            "\n[[link]]\npeer = \"relay{k}\"\ndirection = \"down\"\nlocal = \"{o}:5004\"\n\
             remote = \"{r}:5004\"\n"
        );
    }
    c
}

fn viewer_ssrc(k: usize, j: usize) -> u32 {
    0x5000_0000 + (k as u32) * 0x100 + j as u32
}

fn viewer_seq_delta(k: usize, j: usize) -> u16 {
    (k * 1000 + j * 7) as u16
}

fn relay_config(k: usize, secret: &std::path::Path) -> String {
    let (o, r, e, v) = (trunk(k, 1), trunk(k, 2), edge(k, 1), edge(k, 2));
    let mut c = format!(
        "[[listener]]\naddr = \"{r}:5004\"\ndrop_unknown_source = true\ndrop_no_route = true\n\
         [cluster]\nnode = \"relay{k}\"\nsecret_file = \"{}\"\nlapse = {LAPSE}\n\
         [[link]]\npeer = \"origin\"\ndirection = \"up\"\nlocal = \"{r}:5004\"\n\
         remote = \"{o}:5004\"\napi = \"{o}:7000\"\n",
        secret.display()
    );
    for j in 0..VIEWERS {
        c += &format!(
            "\n[[route]]\nlisten = \"{r}:5004\"\nsource = \"{o}:5004\"\nssrc = {SSRC}\n\
             out_src = \"{e}:5006\"\nout_dst = \"{v}:{}\"\nssrc_out = {}\n\
             seq_delta = {}\nts_delta = {}\n",
            6000 + j,
            viewer_ssrc(k, j),
            viewer_seq_delta(k, j),
            j * 90
        );
    }
    c
}

fn start(ns: &NetNs, pin: &PinDir, iface: &str, cfg: &str, extra: &[&str]) -> Edgefwd {
    let mut args = vec!["--duration", "120"];
    args.extend_from_slice(extra);
    edgefwd_tests::start_node(ns, pin.path(), iface, cfg, &args, None)
}

/// `edgefwd --pin-dir PIN ARGS...` in a namespace; panics on failure.
fn cli(ns: &NetNs, pin: &PinDir, args: &[&str]) -> Vec<u8> {
    let out = ns
        .command(edgefwd_bin().to_str().unwrap())
        .arg("--pin-dir")
        .arg(pin.path())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "edgefwd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `links list --json` by peer name.
fn links(ns: &NetNs, pin: &PinDir) -> std::collections::BTreeMap<String, serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(&cli(ns, pin, &["links", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| (l["peer"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

/// Polls `f` every 100 ms until it holds; panics with `what` and the last links view.
fn wait_for(
    ns: &NetNs,
    pin: &PinDir,
    limit: Duration,
    what: &str,
    f: impl Fn(&std::collections::BTreeMap<String, serde_json::Value>) -> bool,
) {
    let start = std::time::Instant::now();
    loop {
        let l = links(ns, pin);
        if f(&l) {
            return;
        }
        if start.elapsed() > limit {
            panic!("{what} within {limit:?}; links: {l:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A relay's links view says its upstream, the origin, does not answer.
fn upstream_unreachable(l: &std::collections::BTreeMap<String, serde_json::Value>) -> bool {
    l["origin"]["state"] == "down"
        && l["origin"]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable")
}

/// One HTTP/1.0 request from inside `ns`; the whole answer.
fn http(ns: &NetNs, addr: &str, request: String) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

/// A link's demand as node `node`, signed with `secret` (none: unsigned).
fn put_demand(ns: &NetNs, node: &str, secret: Option<&str>) -> String {
    let body = format!("{{\"node\":\"{node}\",\"ssrcs\":[{SSRC}]}}");
    let path = format!("/node/v1/links/{node}/demand");
    let auth = secret
        .map(|s| {
            let me = edgefwd::cluster::identity::Identity::new(node, s).unwrap();
            format!(
                "Authorization: {}\r\n",
                me.sign("PUT", &path, body.as_bytes())
            )
        })
        .unwrap_or_default();
    http(
        ns,
        "198.51.100.2:7000",
        format!(
            "PUT {path} HTTP/1.0\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

const SECRET: &str = "cascade-test-secret-0123456789";

#[test]
fn origin_three_relays_thirty_receivers_demand_lapse_and_a_removed_subscriber() {
    let _k = kernel_lock();
    let publisher = NetNs::new("cpub");
    let origin = NetNs::new("corg");
    let relays: Vec<NetNs> = (1..=RELAYS).map(|_| NetNs::new("crel")).collect();
    let viewers: Vec<NetNs> = (1..=RELAYS).map(|_| NetNs::new("cvw")).collect();
    link(
        &publisher,
        "p0",
        &["198.51.100.1/27"],
        &origin,
        "o0",
        &["198.51.100.2/27"],
    );
    for k in 1..=RELAYS {
        let (a, b) = (format!("{}/27", trunk(k, 1)), format!("{}/27", trunk(k, 2)));
        link(
            &origin,
            &format!("o{k}"),
            &[&a],
            &relays[k - 1],
            "i0",
            &[&b],
        );
        let (a, b) = (format!("{}/27", edge(k, 1)), format!("{}/27", edge(k, 2)));
        link(&relays[k - 1], "e0", &[&a], &viewers[k - 1], "v0", &[&b]);
    }
    let secret = std::env::temp_dir().join(edgefwd_tests::unique("cascade-secret"));
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    // Receivers first: the daemons resolve their next hops at start.
    let socks: Vec<Vec<UdpSocket>> = (1..=RELAYS)
        .map(|k| {
            (0..VIEWERS)
                .map(|j| {
                    let addr: SocketAddr = format!("{}:{}", edge(k, 2), 6000 + j).parse().unwrap();
                    viewers[k - 1].run(move || {
                        let s = UdpSocket::bind(addr).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(150)))
                            .unwrap();
                        // Read only after the stream ends: room for all of it.
                        edgefwd_tests::big_rcvbuf(&s, 8 << 20);
                        s
                    })
                })
                .collect()
        })
        .collect();
    let origin_pin = PinDir::new();
    let relay_pins: Vec<PinDir> = (0..RELAYS).map(|_| PinDir::new()).collect();
    // Relays first: their upstream is not there yet, and they say so.
    let mut relay_daemons = Vec::new();
    for k in 1..=RELAYS {
        relay_daemons.push(start(
            &relays[k - 1],
            &relay_pins[k - 1],
            "i0",
            &relay_config(k, &secret),
            &["--metrics", "127.0.0.1:0"],
        ));
    }
    wait_for(
        &relays[0],
        &relay_pins[0],
        Duration::from_secs(5),
        "relay1 reports its upstream unreachable",
        upstream_unreachable,
    );
    let mut origin_daemon = start(&origin, &origin_pin, "o0", &origin_config(&secret), &[]);
    assert_eq!(
        origin_daemon.ready_addr("node-api"),
        "0.0.0.0:7000".parse().unwrap()
    );
    // Each relay's subscribers make it ask for SSRC; the origin adds one trunk copy each.
    wait_for(
        &origin,
        &origin_pin,
        Duration::from_secs(5),
        "every relay's demand reaches the origin",
        |l| {
            (1..=RELAYS).all(|k| {
                let r = &l[&format!("relay{k}")];
                r["state"] == "up" && r["demand"] == 1 && r["copies"] == 1
            })
        },
    );
    wait_for(
        &relays[0],
        &relay_pins[0],
        Duration::from_secs(3),
        "relay1 sees its upstream up",
        |l| l["origin"]["state"] == "up" && l["origin"]["demand"] == 1,
    );

    // The node API wants requests signed with the cluster secret, and knows its links.
    let r = put_demand(&publisher, "relay1", None);
    assert!(
        r.starts_with("HTTP/1.0 401") || r.starts_with("HTTP/1.1 401"),
        "{r}"
    );
    assert!(r.contains("cluster secret"), "{r}");
    let r = put_demand(&publisher, "relay1", Some("not-the-secret-at-all"));
    assert!(r.contains(" 401 ") && r.contains("does not verify"), "{r}");
    let r = put_demand(&publisher, "relay9", Some(SECRET));
    assert!(
        r.contains(" 404 ") && r.contains("no down link to relay9"),
        "{r}"
    );

    let tx = publisher.run(|| UdpSocket::bind("198.51.100.1:40000").unwrap());
    let send = |range: std::ops::Range<u16>| {
        for i in range {
            let r = Rtp::new(SSRC, 65_000u16.wrapping_add(i), 1000 + i as u32 * 3000, 400);
            tx.send_to(&r.bytes(), "198.51.100.2:5004").unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
    };
    send(0..N / 2);
    // Relay 1 loses subscriber 3 mid-stream, through the CLI on the live maps.
    std::thread::sleep(Duration::from_millis(200));
    cli(
        &relays[0],
        &relay_pins[0],
        &[
            "subs",
            "del",
            "--listen",
            "198.51.100.34:5004",
            "--source",
            "198.51.100.33:5004",
            "--ssrc",
            &SSRC.to_string(),
            "--out-dst",
            "203.0.113.34:6003",
        ],
    );
    send(N / 2..N);
    std::thread::sleep(Duration::from_millis(200));

    // Relay 3 loses every subscriber: its demand goes, and the origin stops its trunk.
    cli(
        &relays[2],
        &relay_pins[2],
        &[
            "routes",
            "del",
            "--listen",
            "198.51.100.98:5004",
            "--source",
            "198.51.100.97:5004",
            "--ssrc",
            &SSRC.to_string(),
        ],
    );
    wait_for(
        &origin,
        &origin_pin,
        Duration::from_secs(3),
        "relay3's empty demand removes its trunk copy",
        |l| {
            l["relay3"]["demand"] == 0 && l["relay3"]["copies"] == 0 && l["relay3"]["state"] == "up"
        },
    );
    send(N..N + EXTRA);
    std::thread::sleep(Duration::from_millis(200));

    for k in 1..=RELAYS {
        // Relay 3's subscribers left after packet N.
        let sent = if k == 3 { N } else { N + EXTRA };
        for (j, s) in socks[k - 1].iter().enumerate() {
            let mut seen = vec![false; (N + EXTRA) as usize];
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                assert_eq!(from, format!("{}:5006", edge(k, 1)).parse().unwrap());
                let p = &buf[..len];
                assert_eq!(
                    u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
                    viewer_ssrc(k, j),
                    "SSRC of viewer {k}/{j}"
                );
                let seq = u16::from_be_bytes([p[2], p[3]]).wrapping_sub(viewer_seq_delta(k, j));
                let i = seq.wrapping_sub(65_000);
                assert!(
                    i < sent,
                    "viewer {k}/{j}: sequence {seq} (packet {i}) should not have come"
                );
                assert!(
                    !seen[i as usize],
                    "viewer {k}/{j}: packet {i} arrived twice"
                );
                seen[i as usize] = true;
                let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]).wrapping_sub(j as u32 * 90);
                assert_eq!(
                    ts,
                    1000 + i as u32 * 3000,
                    "viewer {k}/{j}: timestamp of {i}"
                );
                assert_eq!(&p[12..], &Rtp::new(SSRC, 0, 0, 400).bytes()[12..]);
            }
            let got = seen.iter().filter(|s| **s).count();
            if (k, j) == (1, 3) {
                assert!(
                    seen[..N as usize / 2].iter().all(|s| *s)
                        && !seen[N as usize / 2..].iter().any(|s| *s),
                    "the removed subscriber got the first half only ({got} packets)"
                );
            } else {
                if got != sent as usize {
                    let missing: Vec<usize> = (0..sent as usize).filter(|i| !seen[*i]).collect();
                    eprintln!("viewer {k}/{j} missing {missing:?}");
                    eprintln!(
                        "{}",
                        String::from_utf8_lossy(&cli(
                            &origin,
                            &origin_pin,
                            &["stats", "--interval", "0"]
                        ))
                    );
                    eprintln!(
                        "{}",
                        String::from_utf8_lossy(&cli(&origin, &origin_pin, &["links", "list"]))
                    );
                }
                assert_eq!(got, sent as usize, "viewer {k}/{j} got {got} of {sent}");
            }
        }
        assert_eq!(
            viewers[k - 1].udp_csum_errors().0,
            0,
            "UDP checksum errors at viewers {k}"
        );
    }

    // Per-link counters at the origin: relays 1 and 2 got everything, relay 3 nothing
    // after its demand went.
    let l = links(&origin, &origin_pin);
    for k in 1..=RELAYS {
        let want = if k == 3 { N } else { N + EXTRA } as u64;
        let r = &l[&format!("relay{k}")];
        assert_eq!(r["packets"], want, "origin's trunk to relay{k}: {r:#}");
        assert_eq!(r["drops"], 0, "{r:#}");
    }
    // The trunk copies are replicated in the kernel and keep the packet as it is.
    let v: serde_json::Value =
        serde_json::from_slice(&cli(&origin, &origin_pin, &["subs", "list", "--json"])).unwrap();
    assert_eq!(v[0]["replicated_by"], "tc", "{v:#}");
    assert_eq!(v[0]["copies"].as_array().unwrap().len(), 2, "{v:#}");
    assert!(
        v[0]["copies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ssrc_out"] == SSRC && c["seq_delta"] == 0),
        "{v:#}"
    );
    // A relay counts what its up link brought.
    let l = links(&relays[0], &relay_pins[0]);
    assert_eq!(
        l["origin"]["packets"],
        (N + EXTRA) as u64,
        "{:#}",
        l["origin"]
    );

    // A downstream that vanishes: its demand lapses and the origin drops its trunk.
    relay_daemons[1].kill9();
    wait_for(
        &origin,
        &origin_pin,
        Duration::from_secs(LAPSE + 3),
        "relay2's trunk goes once its demand lapses",
        |l| l["relay2"]["state"] == "down" && l["relay2"]["copies"] == 0,
    );
    assert!(
        links(&origin, &origin_pin)["relay2"]["message"]
            .as_str()
            .unwrap()
            .contains("no demand from relay2"),
    );

    // An upstream that vanishes: the relay says so in its links and its metrics.
    origin_daemon.kill9();
    wait_for(
        &relays[0],
        &relay_pins[0],
        Duration::from_secs(5),
        "relay1 reports the lost upstream",
        upstream_unreachable,
    );
    let m = http(
        &relays[0],
        &relay_daemons[0].ready_addr("metrics").to_string(),
        "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n".into(),
    );
    assert!(
        m.contains("edgefwd_link_up{direction=\"up\",peer=\"origin\"} 0"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "edgefwd_link_packets_total{{direction=\"up\",peer=\"origin\"}} {}",
            N + EXTRA
        )),
        "{m}"
    );
    drop(relay_daemons);
    let _ = std::fs::remove_file(&secret);
}

/// Three nodes' configs: a tree is accepted, a cycle is refused and named, and a node
/// with links both ways to a peer does not start.
#[test]
fn a_cycle_of_links_is_refused_and_named() {
    let dir = std::env::temp_dir().join(edgefwd_tests::unique("cycle"));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    // node i feeds node i+1 over 192.0.2.16i/28; `closing` adds c -> a.
    let config = |name: &str, links: &[(&str, &str, &str, &str)], api: bool| {
        let mut c = format!(
            "[[listener]]\naddr = \"192.0.2.153:5004\"\n[cluster]\nnode = \"{name}\"\nsecret_file = \"{}\"\n",
            secret.display()
        );
        if api {
            c += "api = \"127.0.0.1:7000\"\n";
        }
        for (peer, dir, local, remote) in links {
            c += &format!(
                "[[link]]\npeer = \"{peer}\"\ndirection = \"{dir}\"\nlocal = \"{local}\"\nremote = \"{remote}\"\n"
            );
            if *dir == "up" {
                c += "api = \"192.0.2.1:7000\"\n";
            }
        }
        c
    };
    let write = |name: &str, text: String| {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let ab = ("b", "down", "192.0.2.17:5004", "192.0.2.18:5004");
    let ba = ("a", "up", "192.0.2.18:5004", "192.0.2.17:5004");
    let bc = ("c", "down", "192.0.2.33:5004", "192.0.2.34:5004");
    let cb = ("b", "up", "192.0.2.34:5004", "192.0.2.33:5004");
    let ca = ("a", "down", "192.0.2.49:5004", "192.0.2.50:5004");
    let ac = ("c", "up", "192.0.2.50:5004", "192.0.2.49:5004");
    let check = |files: &[&std::path::Path]| {
        std::process::Command::new(edgefwd_bin())
            .arg("check-config")
            .args(files)
            .output()
            .unwrap()
    };
    // The listener the up links need is 192.0.2.153:5004 in every file: make the up
    // links' local that address by giving each node the listener it needs.
    let fix = |text: String, locals: &[&str]| {
        let mut t = text;
        for l in locals {
            t = format!("[[listener]]\naddr = \"{l}\"\n{t}");
        }
        t
    };
    let a = write("a", fix(config("a", &[ab], true), &[]));
    let b = write("b", fix(config("b", &[ba, bc], true), &[ba.2]));
    let c = write("c", fix(config("c", &[cb], false), &[cb.2]));
    let out = check(&[&a, &b, &c]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cascade OK: 3 node(s), 2 link(s)"));

    let a = write("a", fix(config("a", &[ab, ac], true), &[ac.2]));
    let c = write("c", fix(config("c", &[cb, ca], true), &[cb.2]));
    let out = check(&[&a, &b, &c]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]
            .iter()
            .any(|cy| err.contains(&format!("the links form a cycle: {cy}"))),
        "{err}"
    );

    // Links both ways to one peer: `run` refuses before loading anything.
    let both = write(
        "both",
        fix(
            config(
                "a",
                &[ab, ("b", "up", "192.0.2.17:5004", "192.0.2.18:5004")],
                true,
            ),
            &["192.0.2.17:5004"],
        ),
    );
    let out = std::process::Command::new(edgefwd_bin())
        .args(["run", "--iface", "lo", "--config"])
        .arg(&both)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("form a cycle: a -> b -> a"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
