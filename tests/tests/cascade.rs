//! A cascade in network namespaces, each node its own `edgefwd run` process:
//!
//! ```text
//!  pub ── origin ──trunk── relay1 ── viewers1 (10 receivers)
//!              ├──trunk── relay2 ── viewers2 (10 receivers)
//!              └──trunk── relay3 ── viewers3 (10 receivers)
//! ```
//!
//! The origin sends three trunk copies that keep the RTP packet as it is (only
//! Ethernet/IP/UDP change); each relay fans its trunk out to ten subscribers with
//! their own SSRC and sequence/timestamp offsets. Every receiver must get every packet
//! exactly once with its rewrites; a subscriber removed mid-stream stops while the
//! others go on without a gap; the kernels' UDP checksum counters stay at zero.

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
const RELAYS: usize = 3;
const VIEWERS: usize = 10;

fn origin_config() -> String {
    let mut c = String::from(
        "[[listener]]\naddr = \"10.77.0.2:5004\"\ndrop_unknown_source = true\ndrop_no_route = true\n",
    );
    for k in 1..=RELAYS {
        // A trunk: SSRC, sequence and timestamp unchanged.
        c += &format!(
            "\n[[route]]\nlisten = \"10.77.0.2:5004\"\nsource = \"10.77.0.1:40000\"\nssrc = {SSRC}\n\
             out_src = \"10.77.{k}.1:5004\"\nout_dst = \"10.77.{k}.2:5004\"\n"
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

fn relay_config(k: usize) -> String {
    let mut c = format!(
        "[[listener]]\naddr = \"10.77.{k}.2:5004\"\ndrop_unknown_source = true\ndrop_no_route = true\n"
    );
    for j in 0..VIEWERS {
        c += &format!(
            "\n[[route]]\nlisten = \"10.77.{k}.2:5004\"\nsource = \"10.77.{k}.1:5004\"\nssrc = {SSRC}\n\
             out_src = \"10.78.{k}.1:5006\"\nout_dst = \"10.78.{k}.2:{}\"\nssrc_out = {}\n\
             seq_delta = {}\nts_delta = {}\n",
            6000 + j,
            viewer_ssrc(k, j),
            viewer_seq_delta(k, j),
            j * 90
        );
    }
    c
}

fn start(ns: &NetNs, pin: &PinDir, iface: &str, cfg: &str) -> Edgefwd {
    edgefwd_tests::start_node(ns, pin.path(), iface, cfg, &["--duration", "120"], None)
}

#[test]
fn origin_three_relays_thirty_receivers_and_a_removed_subscriber() {
    let _k = kernel_lock();
    let publisher = NetNs::new("cpub");
    let origin = NetNs::new("corg");
    let relays: Vec<NetNs> = (1..=RELAYS).map(|_| NetNs::new("crel")).collect();
    let viewers: Vec<NetNs> = (1..=RELAYS).map(|_| NetNs::new("cvw")).collect();
    link(
        &publisher,
        "p0",
        &["10.77.0.1"],
        &origin,
        "o0",
        &["10.77.0.2"],
    );
    for k in 1..=RELAYS {
        let (a, b) = (format!("10.77.{k}.1"), format!("10.77.{k}.2"));
        link(
            &origin,
            &format!("o{k}"),
            &[&a],
            &relays[k - 1],
            "i0",
            &[&b],
        );
        let (a, b) = (format!("10.78.{k}.1"), format!("10.78.{k}.2"));
        link(&relays[k - 1], "e0", &[&a], &viewers[k - 1], "v0", &[&b]);
    }
    // Receivers first: the daemons resolve their next hops at start.
    let socks: Vec<Vec<UdpSocket>> = (1..=RELAYS)
        .map(|k| {
            (0..VIEWERS)
                .map(|j| {
                    let addr: SocketAddr = format!("10.78.{k}.2:{}", 6000 + j).parse().unwrap();
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
    let mut daemons = Vec::new();
    for k in 1..=RELAYS {
        daemons.push(start(
            &relays[k - 1],
            &relay_pins[k - 1],
            "i0",
            &relay_config(k),
        ));
    }
    daemons.push(start(&origin, &origin_pin, "o0", &origin_config()));

    let tx = publisher.run(|| UdpSocket::bind("10.77.0.1:40000").unwrap());
    let send = |range: std::ops::Range<u16>| {
        for i in range {
            let r = Rtp::new(SSRC, 65_000u16.wrapping_add(i), 1000 + i as u32 * 3000, 400);
            tx.send_to(&r.bytes(), "10.77.0.2:5004").unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
    };
    send(0..N / 2);
    // Relay 1 loses subscriber 3 mid-stream, through the CLI on the live maps.
    std::thread::sleep(Duration::from_millis(200));
    let bin = edgefwd_bin();
    let out = relays[0]
        .command(bin.to_str().unwrap())
        .args([
            "--pin-dir",
            relay_pins[0].path().to_str().unwrap(),
            "subs",
            "del",
            "--listen",
            "10.77.1.2:5004",
            "--source",
            "10.77.1.1:5004",
            "--ssrc",
            &SSRC.to_string(),
            "--out-dst",
            "10.78.1.2:6003",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "subs del: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    send(N / 2..N);

    for k in 1..=RELAYS {
        for (j, s) in socks[k - 1].iter().enumerate() {
            let mut seen = vec![false; N as usize];
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                assert_eq!(from, format!("10.78.{k}.1:5006").parse().unwrap());
                let p = &buf[..len];
                assert_eq!(
                    u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
                    viewer_ssrc(k, j),
                    "SSRC of viewer {k}/{j}"
                );
                let seq = u16::from_be_bytes([p[2], p[3]]).wrapping_sub(viewer_seq_delta(k, j));
                let i = seq.wrapping_sub(65_000);
                assert!(i < N, "viewer {k}/{j}: sequence {seq} was never sent");
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
            if got != N as usize && (k, j) != (1, 3) {
                let missing: Vec<usize> = (0..N as usize).filter(|i| !seen[*i]).collect();
                eprintln!("viewer {k}/{j} missing {missing:?}");
                for (ns, pin) in [(&origin, &origin_pin), (&relays[0], &relay_pins[0])] {
                    let o = ns
                        .command(bin.to_str().unwrap())
                        .args([
                            "--pin-dir",
                            pin.path().to_str().unwrap(),
                            "stats",
                            "--interval",
                            "0",
                        ])
                        .output()
                        .unwrap();
                    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
                    let o = ns
                        .command(bin.to_str().unwrap())
                        .args(["--pin-dir", pin.path().to_str().unwrap(), "subs", "list"])
                        .output()
                        .unwrap();
                    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
                }
            }
            if (k, j) == (1, 3) {
                assert!(
                    seen[..N as usize / 2].iter().all(|s| *s)
                        && !seen[N as usize / 2..].iter().any(|s| *s),
                    "the removed subscriber got the first half only ({got} packets)"
                );
            } else {
                assert_eq!(got, N as usize, "viewer {k}/{j} got {got} of {N}");
            }
        }
        assert_eq!(
            viewers[k - 1].udp_csum_errors().0,
            0,
            "UDP checksum errors at viewers {k}"
        );
    }

    // The origin's trunk copies each carried every packet, replicated in the kernel.
    let out = origin
        .command(bin.to_str().unwrap())
        .args([
            "--pin-dir",
            origin_pin.path().to_str().unwrap(),
            "subs",
            "list",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["replicated_by"], "tc");
    assert_eq!(v[0]["packets_in"], N as u64);
    let copies = v[0]["copies"].as_array().unwrap();
    assert_eq!(copies.len(), RELAYS);
    assert!(copies.iter().all(|c| c["packets"] == N as u64), "{v:#}");
    drop(daemons);
}
