//! Katran-style fixture table: packets through the real XDP program with
//! BPF_PROG_TEST_RUN, maps filled by the real control-plane code (`Maps::add_route`),
//! expected action, counted verdict and output bytes.

use std::net::{IpAddr, SocketAddr};

use edgefwd::{
    dataplane::loader::{self, Counters},
    dataplane::maps::{Listener, Maps, Route},
    dataplane::simulate::Simulator,
};
use edgefwd_tests::{
    PinDir, kernel_lock,
    netns::NetNs,
    pkt::{Frame, MAC_FWD, MAC_FWD_B, MAC_NEXT, MAC_PUB, Rtp},
};
use forwarder_common::verdicts::Verdict;

const L1: &str = "198.51.100.2:5004"; // drops strangers and unrouted SSRCs
const L2: &str = "198.51.100.2:5008"; // passes them to the stack
const L6: &str = "[2001:db8:a::2]:5004";
const PUB: &str = "198.51.100.1:40000";
const PUB6: &str = "[2001:db8:a::1]:40000";

const SSRC_TX: u32 = 0x1122_3344;
const SSRC_WRAP: u32 = 0x0a0b_0c0d;
const SSRC_REDIRECT: u32 = 0x0000_beef;
const SSRC_V6: u32 = 0x0000_0066;
const SSRC_VLAN: u32 = 0x0000_0a1a;
const MARTIAN4: &str = "127.0.0.9:40000";
const MARTIAN6: &str = "[::1]:40000";
/// The veth the program "receives" on in a non-live test run is the namespace's lo.
const TEST_RUN_IFINDEX: u32 = 1;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn route(listen: &str, source: &str, ssrc: u32, out_src: &str, out_dst: &str) -> Route {
    Route {
        listen: sa(listen),
        source: sa(source),
        ssrc,
        out_src: sa(out_src),
        out_dst: sa(out_dst),
        egress_ifindex: 0,
        src_mac: MAC_FWD_B,
        dst_mac: MAC_NEXT,
        ssrc_out: ssrc,
        seq_delta: 0,
        ts_delta: 0,
        pt_remap: None,
        vlan: None,
    }
}

fn tx_route() -> Route {
    Route {
        ssrc_out: 0x5566_7788,
        seq_delta: 1000,
        ts_delta: 90_000,
        pt_remap: Some((96, 100)),
        ..route(L1, PUB, SSRC_TX, "203.0.113.2:5006", "203.0.113.1:6000")
    }
}

fn wrap_route() -> Route {
    Route {
        ssrc_out: 0x0102_0304,
        seq_delta: 10,
        ts_delta: 0x20,
        ..route(L1, PUB, SSRC_WRAP, "203.0.113.2:5006", "203.0.113.1:6002")
    }
}

/// Runs a test inside a fresh namespace with a veth `d0` to redirect to
/// (non-live test runs only report a redirect, they never transmit).
fn in_ns(f: impl FnOnce() + Send + 'static) {
    let _k = kernel_lock();
    let ns = NetNs::new("fx");
    ns.exec(&[
        "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ns.exec(&["ip", "link", "set", "d0", "up"]);
    ns.run(f);
}

fn d0() -> u32 {
    edgefwd::dataplane::preflight::ifindex("d0").unwrap()
}

fn redirect_route() -> Route {
    Route {
        egress_ifindex: d0(),
        ..route(
            L1,
            PUB,
            SSRC_REDIRECT,
            "203.0.113.2:5006",
            "203.0.113.1:6004",
        )
    }
}

fn v6_route() -> Route {
    Route {
        ssrc_out: 0x6666_0000,
        seq_delta: 7,
        ts_delta: 3000,
        ..route(
            L6,
            PUB6,
            SSRC_V6,
            "[2001:db8:b::2]:5006",
            "[2001:db8:b::1]:6000",
        )
    }
}

fn vlan_route() -> Route {
    Route {
        vlan: Some(200),
        ..route(L1, PUB, SSRC_VLAN, "203.0.113.2:5006", "203.0.113.1:6010")
    }
}

fn setup(pin: &PinDir) -> Simulator {
    let mut ebpf = loader::load(pin.path(), Counters::Private).expect("load");
    let mut maps = Maps::from_ebpf(&mut ebpf).expect("maps");
    for (addr, strict) in [(L1, true), (L2, false), (L6, true)] {
        maps.set_listener(&Listener {
            addr: sa(addr),
            drop_unknown_source: strict,
            drop_no_route: strict,
            webrtc: false,
        })
        .unwrap();
    }
    for r in [
        tx_route(),
        wrap_route(),
        redirect_route(),
        v6_route(),
        vlan_route(),
    ] {
        maps.add_route(&r).unwrap();
    }
    // Routes from martian sources: a router must still refuse to forward them.
    maps.add_route(&route(
        L1,
        MARTIAN4,
        SSRC_TX,
        "203.0.113.2:5006",
        "203.0.113.1:6000",
    ))
    .unwrap();
    maps.add_route(&route(
        L6,
        MARTIAN6,
        SSRC_V6,
        "[2001:db8:b::2]:5006",
        "[2001:db8:b::1]:6000",
    ))
    .unwrap();
    maps.set_interface_mac(TEST_RUN_IFINDEX, MAC_FWD).unwrap();
    // A route on L2 so PUB is a known source there.
    maps.add_route(&route(
        L2,
        PUB,
        0x0000_0001,
        "203.0.113.2:5006",
        "203.0.113.1:6008",
    ))
    .unwrap();
    Simulator::from_parts(ebpf, maps)
}

fn from_pub(dport: u16) -> Frame {
    Frame {
        eth_src: MAC_PUB,
        eth_dst: MAC_FWD,
        vlan: None,
        src: ip("198.51.100.1"),
        dst: ip("198.51.100.2"),
        ttl: 64,
        sport: 40000,
        dport,
    }
}

fn from_pub6() -> Frame {
    Frame {
        src: ip("2001:db8:a::1"),
        dst: ip("2001:db8:a::2"),
        ..from_pub(5004)
    }
}

/// The frame a route should produce from `input` framing and `rtp`.
fn rewritten(input: &Frame, r: &Route, rtp: &Rtp) -> Vec<u8> {
    let out = Frame {
        eth_src: r.src_mac,
        eth_dst: r.dst_mac,
        // The route decides the egress tag, never the ingress frame.
        vlan: r.vlan,
        src: r.out_src.ip(),
        dst: r.out_dst.ip(),
        ttl: input.ttl - 1,
        sport: r.out_src.port(),
        dport: r.out_dst.port(),
    };
    let mut x = rtp.clone();
    if let Some((f, t)) = r.pt_remap
        && x.pt == f
    {
        x.pt = t;
    }
    x.seq = x.seq.wrapping_add(r.seq_delta);
    x.ts = x.ts.wrapping_add(r.ts_delta);
    x.ssrc = r.ssrc_out;
    out.build(&x.bytes())
}

struct Fixture {
    desc: &'static str,
    input: Vec<u8>,
    action: &'static str,
    verdict: Verdict,
    /// None: the frame must come out unchanged.
    output: Option<Vec<u8>>,
}

fn fx(
    desc: &'static str,
    input: Vec<u8>,
    action: &'static str,
    verdict: Verdict,
    output: Option<Vec<u8>>,
) -> Fixture {
    Fixture {
        desc,
        input,
        action,
        verdict,
        output,
    }
}

/// Recomputes the IPv4 header checksum of the header at `l3` (a fixture that changes
/// a header field but means to test something else).
fn with_ip_checksum(mut v: Vec<u8>, l3: usize) -> Vec<u8> {
    let ihl = (v[l3] & 0x0f) as usize * 4;
    v[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = forwarder_common::csum::checksum(&v[l3..l3 + ihl]);
    v[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    v
}

/// The same IPv4 frame with 4 bytes of options (NOPs) in its header.
fn with_options(mut v: Vec<u8>) -> Vec<u8> {
    v.splice(14 + 20..14 + 20, [1, 1, 1, 1]);
    v[14] = 0x46;
    let tot = u16::from_be_bytes([v[16], v[17]]) + 4;
    v[16..18].copy_from_slice(&tot.to_be_bytes());
    with_ip_checksum(v, 14)
}

fn set(mut v: Vec<u8>, off: usize, bytes: &[u8]) -> Vec<u8> {
    v[off..off + bytes.len()].copy_from_slice(bytes);
    v
}

fn fixtures() -> Vec<Fixture> {
    let f = from_pub(5004);
    let l4 = f.l4_offset();
    let basic = Rtp::new(SSRC_TX, 1234, 5678, 160);
    let mut fancy = Rtp::new(SSRC_TX, 40000, 0xdead_0000, 100);
    fancy.marker = true;
    fancy.csrcs = vec![0xaaaa_aaaa, 0xbbbb_bbbb];
    fancy.ext = Some((0xbede, vec![0x1020_3040, 0x5060_7080]));
    fancy.padding = 4;
    let wrap = Rtp::new(SSRC_WRAP, 65530, 0xffff_fff0, 20);
    let redirect = Rtp::new(SSRC_REDIRECT, 1, 2, 1200);
    let v6 = Rtp::new(SSRC_V6, 9, 10, 300);
    let vlan = Frame {
        vlan: Some(100),
        ..f.clone()
    };
    let rtcp_sr = {
        let mut v = vec![0x80, 200, 0, 6];
        v.extend_from_slice(&SSRC_TX.to_be_bytes());
        v.extend_from_slice(&[0u8; 20]);
        v
    };
    let stun = {
        // Binding request, no attributes.
        let mut v = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        v.extend_from_slice(&[7u8; 12]);
        v
    };
    let dtls = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1];
    let stranger = Frame {
        sport: 40001,
        ..f.clone()
    };
    let small = Rtp::new(SSRC_TX, 1, 1, 0).bytes();
    let vlan_rtp = Rtp::new(SSRC_VLAN, 77, 88, 200);

    let mut v = vec![
        fx(
            "IPv4 RTP, full rewrite back out the ingress interface",
            f.build(&basic.bytes()),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&f, &tx_route(), &basic)),
        ),
        fx(
            "IPv4 RTP with marker, 2 CSRCs, header extension and padding",
            f.build(&fancy.bytes()),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&f, &tx_route(), &fancy)),
        ),
        fx(
            "sequence number and timestamp wrap around on rewrite",
            f.build(&wrap.bytes()),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&f, &wrap_route(), &wrap)),
        ),
        fx(
            "1200-byte RTP redirected to another interface",
            f.build(&redirect.bytes()),
            "XDP_REDIRECT",
            Verdict::ForwardRedirect,
            Some(rewritten(&f, &redirect_route(), &redirect)),
        ),
        fx(
            "IPv6 RTP, full rewrite, mandatory UDP checksum",
            from_pub6().build(&v6.bytes()),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&from_pub6(), &v6_route(), &v6)),
        ),
        fx(
            "802.1Q-tagged IPv4 RTP to an untagged route leaves untagged (no VLAN leak)",
            vlan.build(&basic.bytes()),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&vlan, &tx_route(), &basic)),
        ),
        fx(
            "802.1ad-tagged IPv4 RTP to an untagged route leaves untagged",
            set(vlan.build(&basic.bytes()), 12, &[0x88, 0xa8]),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&vlan, &tx_route(), &basic)),
        ),
        fx(
            "untagged IPv4 RTP to a VLAN 200 route gets the route's tag",
            f.build(&vlan_rtp.bytes()),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&f, &vlan_route(), &vlan_rtp)),
        ),
        fx(
            "VLAN 100 IPv4 RTP to a VLAN 200 route leaves on VLAN 200",
            vlan.build(&vlan_rtp.bytes()),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(rewritten(&vlan, &vlan_route(), &vlan_rtp)),
        ),
        fx(
            "double tag (802.1ad + 802.1Q) goes to the stack",
            {
                let mut b = vlan.build(&basic.bytes());
                b[12..14].copy_from_slice(&[0x88, 0xa8]);
                b.splice(16..16, [0x81, 0x00, 0x00, 0x64]);
                b
            },
            "XDP_PASS",
            Verdict::PassNotIp,
            None,
        ),
        fx(
            "IPv4 header checksum wrong",
            {
                let mut b = f.build(&basic.bytes());
                b[14 + 10] ^= 0x5a;
                b
            },
            "XDP_DROP",
            Verdict::DropIpChecksum,
            None,
        ),
        fx(
            "IPv4 reserved flag set",
            with_ip_checksum(set(f.build(&basic.bytes()), 14 + 6, &[0x80, 0x00]), 14),
            "XDP_DROP",
            Verdict::DropIpInvalid,
            None,
        ),
        fx(
            "IPv4 martian source 127.0.0.9 with a route is not forwarded",
            Frame {
                src: ip("127.0.0.9"),
                ..f.clone()
            }
            .build(&basic.bytes()),
            "XDP_DROP",
            Verdict::DropIpInvalid,
            None,
        ),
        fx(
            "IPv6 loopback source with a route is not forwarded",
            Frame {
                src: ip("::1"),
                ..from_pub6()
            }
            .build(&v6.bytes()),
            "XDP_DROP",
            Verdict::DropIpInvalid,
            None,
        ),
        fx(
            "IPv4 with options goes to the stack",
            with_options(f.build(&basic.bytes())),
            "XDP_PASS",
            Verdict::PassIpOptions,
            None,
        ),
        fx(
            "IPv6 hop limit 1 would expire",
            Frame {
                ttl: 1,
                ..from_pub6()
            }
            .build(&v6.bytes()),
            "XDP_DROP",
            Verdict::DropTtlExceeded,
            None,
        ),
        {
            // A payload for which the rewritten UDP checksum computes to 0: it must go
            // out as 0xffff (0 means "no checksum" for IPv4 and is invalid for IPv6).
            let (rtp, out) = (0..=u16::MAX)
                .map(|w| {
                    let mut r = Rtp::new(SSRC_TX, 1234, 5678, 0);
                    r.payload = w.to_be_bytes().to_vec();
                    let out = rewritten(&f, &tx_route(), &r);
                    (r, out)
                })
                .find(|(_, out)| out[l4 + 6..l4 + 8] == [0xff, 0xff])
                .expect("some payload word makes the checksum 0");
            fx(
                "a rewritten UDP checksum of 0 goes out as 0xffff",
                f.build(&rtp.bytes()),
                "XDP_TX",
                Verdict::ForwardTx,
                Some(out),
            )
        },
        fx(
            "IPv4 UDP without checksum stays without",
            set(f.build(&basic.bytes()), l4 + 6, &[0, 0]),
            "XDP_TX",
            Verdict::ForwardTx,
            Some(set(rewritten(&f, &tx_route(), &basic), l4 + 6, &[0, 0])),
        ),
        fx(
            "IPv6 UDP with checksum 0 is invalid",
            set(from_pub6().build(&v6.bytes()), 14 + 40 + 6, &[0, 0]),
            "XDP_DROP",
            Verdict::DropZeroUdpChecksumV6,
            None,
        ),
        fx(
            "TTL 1 would expire: forwarding loop guard",
            Frame {
                ttl: 1,
                ..f.clone()
            }
            .build(&basic.bytes()),
            "XDP_DROP",
            Verdict::DropTtlExceeded,
            None,
        ),
        fx(
            "RTCP sender report from a known source goes to the stack",
            f.build(&rtcp_sr),
            "XDP_PASS",
            Verdict::PassRtcp,
            None,
        ),
        fx(
            "RTCP from an unknown source is dropped",
            stranger.build(&rtcp_sr),
            "XDP_DROP",
            Verdict::DropUnknownSource,
            None,
        ),
        fx(
            "STUN binding request from anyone goes to the stack (ICE)",
            stranger.build(&stun),
            "XDP_PASS",
            Verdict::PassStun,
            None,
        ),
        fx(
            "DTLS record goes to the stack",
            f.build(&dtls),
            "XDP_PASS",
            Verdict::PassDtls,
            None,
        ),
        fx(
            "TURN channel data goes to the stack",
            f.build(&[0x40, 0x00, 0, 4, 1, 2, 3, 4]),
            "XDP_PASS",
            Verdict::PassTurnChannel,
            None,
        ),
        fx(
            "first byte outside RFC 7983 ranges",
            f.build(&[0x10; 20]),
            "XDP_DROP",
            Verdict::DropUnknownProtocol,
            None,
        ),
        fx(
            "empty UDP payload",
            f.build(&[]),
            "XDP_DROP",
            Verdict::DropUnknownProtocol,
            None,
        ),
        fx(
            "RTP shorter than its fixed header",
            f.build(&small[..8]),
            "XDP_DROP",
            Verdict::DropMalformedRtp,
            None,
        ),
        fx(
            "CSRC count runs past the packet",
            f.build(&set(small.clone(), 0, &[0x84])),
            "XDP_DROP",
            Verdict::DropMalformedRtp,
            None,
        ),
        fx(
            "extension length runs past the packet",
            f.build(&{
                let mut r = Rtp::new(SSRC_TX, 1, 1, 4);
                r.ext = Some((0xbede, vec![]));
                set(r.bytes(), 14, &[0, 9])
            }),
            "XDP_DROP",
            Verdict::DropMalformedRtp,
            None,
        ),
        fx(
            "padding count 0",
            f.build(&{
                let mut r = Rtp::new(SSRC_TX, 1, 1, 8);
                r.padding = 1;
                let mut b = r.bytes();
                *b.last_mut().unwrap() = 0;
                b
            }),
            "XDP_DROP",
            Verdict::DropMalformedRtp,
            None,
        ),
        fx(
            "padding longer than the payload",
            f.build(&{
                let mut r = Rtp::new(SSRC_TX, 1, 1, 8);
                r.padding = 1;
                let mut b = r.bytes();
                *b.last_mut().unwrap() = 200;
                b
            }),
            "XDP_DROP",
            Verdict::DropMalformedRtp,
            None,
        ),
        fx(
            "unknown SSRC from a known source, strict listener",
            f.build(&Rtp::new(0x7777, 1, 1, 10).bytes()),
            "XDP_DROP",
            Verdict::DropNoRoute,
            None,
        ),
        fx(
            "unknown SSRC from a known source, lenient listener",
            from_pub(5008).build(&Rtp::new(0x7777, 1, 1, 10).bytes()),
            "XDP_PASS",
            Verdict::PassNoRoute,
            None,
        ),
        fx(
            "RTP from an unknown source, strict listener",
            stranger.build(&basic.bytes()),
            "XDP_DROP",
            Verdict::DropUnknownSource,
            None,
        ),
        fx(
            "RTP from an unknown source, lenient listener",
            Frame {
                sport: 40001,
                ..from_pub(5008)
            }
            .build(&basic.bytes()),
            "XDP_PASS",
            Verdict::PassUnknownSource,
            None,
        ),
        fx(
            "UDP to a port that is not a listener",
            from_pub(9999).build(&basic.bytes()),
            "XDP_PASS",
            Verdict::PassNotListener,
            None,
        ),
        fx(
            "IPv4 fragment (MF set)",
            set(f.build(&basic.bytes()), 14 + 6, &[0x20, 0x00]),
            "XDP_PASS",
            Verdict::PassFragment,
            None,
        ),
        fx(
            "IPv4 non-first fragment",
            set(f.build(&basic.bytes()), 14 + 6, &[0x00, 0x10]),
            "XDP_PASS",
            Verdict::PassFragment,
            None,
        ),
        fx(
            "IPv6 fragment header",
            set(from_pub6().build(&v6.bytes()), 14 + 6, &[44]),
            "XDP_PASS",
            Verdict::PassFragment,
            None,
        ),
        fx(
            "TCP goes to the stack",
            set(f.build(&basic.bytes()), 14 + 9, &[6]),
            "XDP_PASS",
            Verdict::PassNotUdp,
            None,
        ),
        fx(
            "ARP goes to the stack",
            {
                let mut a = vec![0xff; 6];
                a.extend_from_slice(&MAC_PUB);
                a.extend_from_slice(&[0x08, 0x06]);
                a.extend_from_slice(&[0u8; 28]);
                a
            },
            "XDP_PASS",
            Verdict::PassNotIp,
            None,
        ),
        fx(
            "truncated IPv4 header",
            f.build(&basic.bytes())[..14 + 10].to_vec(),
            "XDP_DROP",
            Verdict::DropMalformedIp,
            None,
        ),
        fx(
            "IPv4 header length below 20",
            set(f.build(&basic.bytes()), 14, &[0x44]),
            "XDP_DROP",
            Verdict::DropMalformedIp,
            None,
        ),
        fx(
            "IPv4 total length beyond the frame",
            set(f.build(&basic.bytes()), 14 + 2, &[0x0f, 0xff]),
            "XDP_DROP",
            Verdict::DropMalformedIp,
            None,
        ),
        fx(
            "IPv6 payload length beyond the frame",
            set(from_pub6().build(&v6.bytes()), 14 + 4, &[0x0f, 0xff]),
            "XDP_DROP",
            Verdict::DropMalformedIp,
            None,
        ),
        fx(
            "UDP length larger than the IP payload",
            set(f.build(&basic.bytes()), l4 + 4, &[0x0f, 0xff]),
            "XDP_DROP",
            Verdict::DropMalformedUdp,
            None,
        ),
        fx(
            "UDP length smaller than the IP payload",
            set(f.build(&basic.bytes()), l4 + 4, &[0x00, 20]),
            "XDP_DROP",
            Verdict::DropMalformedUdp,
            None,
        ),
    ];
    // Frames not addressed to the receiving interface: never forwarded.
    let foreign = [0x02, 0, 0, 0, 0, 0x99];
    for (desc, dst, frame, rtp) in [
        ("broadcast frame is not forwarded", [0xff; 6], &f, &basic),
        (
            "multicast frame is not forwarded",
            [0x01, 0x00, 0x5e, 0, 0, 1],
            &f,
            &basic,
        ),
        (
            "another host's unicast frame (promiscuous NIC) is not forwarded",
            foreign,
            &f,
            &basic,
        ),
        (
            "IPv6 frame to another host's MAC is not forwarded",
            foreign,
            &from_pub6(),
            &v6,
        ),
    ] {
        let input = Frame {
            eth_dst: dst,
            ..frame.clone()
        }
        .build(&rtp.bytes());
        v.push(fx(desc, input, "XDP_DROP", Verdict::DropNotForUs, None));
    }
    // Ethernet padding after a short IP packet is legal and must not upset the lengths.
    let mut padded = f.build(&small);
    padded.resize(padded.len() + 6, 0);
    let mut expect = rewritten(&f, &tx_route(), &Rtp::new(SSRC_TX, 1, 1, 0));
    expect.resize(expect.len() + 6, 0);
    v.push(fx(
        "Ethernet trailer padding after a minimal RTP packet",
        padded,
        "XDP_TX",
        Verdict::ForwardTx,
        Some(expect),
    ));
    v
}

#[test]
fn fixture_table() {
    in_ns(|| {
        let pin = PinDir::new();
        let mut sim = setup(&pin);
        let mut failures = Vec::new();
        for fx in fixtures() {
            let before = sim.maps().verdict_totals().unwrap();
            let out = sim
                .run(&fx.input)
                .unwrap_or_else(|e| panic!("{}: {e:#}", fx.desc));
            let after = sim.maps().verdict_totals().unwrap();
            // Exactly one counter moved, by exactly one packet of the input's size.
            let moved: Vec<_> = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a.1 != b.1)
                .map(|(a, b)| (a.0.name(), b.1.packets - a.1.packets, b.1.bytes - a.1.bytes))
                .collect();
            let want_out = fx.output.clone().unwrap_or_else(|| fx.input.clone());
            let mut errs = Vec::new();
            if moved != [(fx.verdict.name(), 1, fx.input.len() as u64)] {
                errs.push(format!("verdict counters moved: {moved:?}"));
            }
            if out.action != fx.action {
                errs.push(format!("action {} (want {})", out.action, fx.action));
            }
            if out.verdict != Some(fx.verdict.name()) {
                errs.push(format!(
                    "verdict {:?} (want {})",
                    out.verdict,
                    fx.verdict.name()
                ));
            }
            if out.output != want_out {
                errs.push(format!(
                    "output differs\n   got  {}\n   want {}\n   got decoded:\n{}",
                    hex(&out.output),
                    hex(&want_out),
                    out.decoded
                ));
            }
            if fx.output.is_some() {
                // Independent of the byte comparison: checksums verified from scratch.
                if out.decoded.ipv4_checksum_ok == Some(false) {
                    errs.push("IPv4 header checksum wrong".into());
                }
                if out.decoded.udp_checksum_ok == Some(false) {
                    errs.push("UDP checksum wrong".into());
                }
            }
            if !errs.is_empty() {
                failures.push(format!("{}:\n  {}", fx.desc, errs.join("\n  ")));
            }
        }
        assert!(
            failures.is_empty(),
            "{} fixture(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    });
}

#[test]
fn counters_and_route_stats_follow_traffic() {
    in_ns(|| {
        let pin = PinDir::new();
        let mut sim = setup(&pin);
        let f = from_pub(5004);
        let pkt = f.build(&Rtp::new(SSRC_TX, 1, 1, 100).bytes());
        for _ in 0..5 {
            assert_eq!(sim.run(&pkt).unwrap().action, "XDP_TX");
        }
        let routes = sim.maps().routes().unwrap();
        let (_, stats) = routes
            .iter()
            .find(|(r, _)| r.ssrc == SSRC_TX && r.source == sa(PUB))
            .unwrap();
        assert_eq!(stats.packets, 5);
        assert_eq!(stats.bytes, 5 * pkt.len() as u64);
        let (_, other) = routes.iter().find(|(r, _)| r.ssrc == SSRC_WRAP).unwrap();
        assert_eq!(
            other.packets, 0,
            "a route's traffic must not count on another"
        );
        let totals = sim.maps().verdict_totals().unwrap();
        let tx = totals
            .iter()
            .find(|(v, _)| *v == Verdict::ForwardTx)
            .unwrap()
            .1;
        assert_eq!(tx.packets, 5);
    });
}

#[test]
fn redirect_to_interface_missing_from_devmap_is_counted() {
    in_ns(|| {
        let pin = PinDir::new();
        let mut sim = setup(&pin);
        sim.maps().egress.remove(d0()).unwrap();
        let pkt = from_pub(5004).build(&Rtp::new(SSRC_REDIRECT, 1, 1, 100).bytes());
        let out = sim.run(&pkt).unwrap();
        assert_eq!(out.action, "XDP_DROP");
        assert_eq!(out.verdict, Some(Verdict::DropRedirectError.name()));
    });
}

#[test]
fn route_deletion_and_replacement_keep_maps_consistent() {
    in_ns(|| {
        let pin = PinDir::new();
        let mut sim = setup(&pin);
        let pkt = from_pub(5004).build(&Rtp::new(SSRC_TX, 1, 1, 100).bytes());
        sim.run(&pkt).unwrap();
        // Replacing keeps the statistics slot and its counts.
        let mut r = tx_route();
        r.seq_delta = 1;
        let e = sim.maps().add_route(&r).unwrap_err();
        assert!(format!("{e:#}").contains("--replace"), "{e:#}");
        sim.maps().put_route(&r).unwrap();
        assert_eq!(route_packets(&mut sim, L1, SSRC_TX), Some(1));
        // Deleting: the source stays known while other routes from it remain.
        assert!(sim.maps().del_route(&r.key()).unwrap());
        assert!(
            !sim.maps().del_route(&r.key()).unwrap(),
            "second delete finds nothing"
        );
        assert_eq!(
            sim.run(&pkt).unwrap().verdict,
            Some(Verdict::DropNoRoute.name())
        );
        for k in [
            wrap_route().key(),
            redirect_route().key(),
            vlan_route().key(),
        ] {
            assert!(sim.maps().del_route(&k).unwrap());
        }
        assert_eq!(
            sim.run(&pkt).unwrap().verdict,
            Some(Verdict::DropUnknownSource.name())
        );
    });
}

#[test]
fn bad_routes_are_refused_with_a_reason() {
    in_ns(|| {
        let pin = PinDir::new();
        let mut sim = setup(&pin);
        let mixed = Route {
            out_dst: sa("[2001:db8:b::1]:6000"),
            out_src: sa("[2001:db8:b::2]:5006"),
            ..tx_route()
        };
        let e = sim.maps().add_route(&mixed).unwrap_err();
        assert!(format!("{e:#}").contains("same IP family"), "{e:#}");
        let no_listener = route(
            "198.51.100.2:7777",
            PUB,
            1,
            "203.0.113.2:5006",
            "203.0.113.1:6000",
        );
        let e = sim.maps().add_route(&no_listener).unwrap_err();
        assert!(format!("{e:#}").contains("not a listener"), "{e:#}");
        let bad_pt = Route {
            pt_remap: Some((96, 72)),
            ..tx_route()
        };
        let e = sim.maps().add_route(&bad_pt).unwrap_err();
        assert!(format!("{e:#}").contains("RFC 5761"), "{e:#}");
        let bad_if = Route {
            egress_ifindex: 999_999,
            ..tx_route()
        };
        let e = sim.maps().add_route(&bad_if).unwrap_err();
        assert!(format!("{e:#}").contains("egress devmap"), "{e:#}");
    });
}

/// A small route table (sized at load) filled to its end: the next route is refused
/// with the capacity and the fix; a slot freed by a delete is reused by the next route
/// with its counters back at zero, so the new route does not inherit the old traffic.
#[test]
fn full_route_table_is_refused_and_a_freed_slot_starts_from_zero() {
    in_ns(|| {
        use forwarder_common::{route_stats, routes, routes4};
        const CAP: u32 = 8;
        let pin = PinDir::new();
        let mut ebpf = loader::load_sized(
            pin.path(),
            Counters::Private,
            &[
                (routes4::MAP_NAME, CAP),
                (routes::MAP_NAME, CAP),
                (route_stats::MAP_NAME, CAP),
            ],
        )
        .expect("load");
        let mut maps = Maps::from_ebpf(&mut ebpf).expect("maps");
        assert_eq!(maps.route_capacity(), CAP);
        for addr in [L1, L6] {
            maps.set_listener(&Listener {
                addr: sa(addr),
                drop_unknown_source: true,
                drop_no_route: true,
                webrtc: false,
            })
            .unwrap();
        }
        maps.set_interface_mac(TEST_RUN_IFINDEX, MAC_FWD).unwrap();
        let v4 = |ssrc: u32| route(L1, PUB, ssrc, "203.0.113.2:5006", "203.0.113.1:6000");
        for ssrc in 1..CAP {
            maps.add_route(&v4(ssrc)).unwrap();
        }
        // Both families share the slots: the eighth route is IPv6, and then the table
        // is full for either family.
        maps.add_route(&v6_route()).unwrap();
        for r in [
            v4(100),
            Route {
                ssrc: 101,
                ..v6_route()
            },
        ] {
            let e = format!("{:#}", maps.add_route(&r).unwrap_err());
            assert!(
                e.contains("route table is full (8 routes)") && e.contains("routes del"),
                "{e}"
            );
        }
        assert_eq!(
            maps.routes().unwrap().len(),
            CAP as usize,
            "a refused add changed nothing"
        );
        let mut sim = Simulator::from_parts(ebpf, maps);
        let pkt = |ssrc| from_pub(5004).build(&Rtp::new(ssrc, 1, 1, 100).bytes());
        for _ in 0..3 {
            assert_eq!(sim.run(&pkt(3)).unwrap().action, "XDP_TX");
        }
        let slot_of =
            |sim: &mut Simulator, ssrc| sim.maps().get_route(&v4(ssrc).key()).unwrap().stats_slot;
        let packets_of = |sim: &mut Simulator, ssrc| route_packets(sim, L1, ssrc);
        assert_eq!(packets_of(&mut sim, 3), Some(3));
        let freed = slot_of(&mut sim, 3);
        assert!(sim.maps().del_route(&v4(3).key()).unwrap());
        sim.maps().add_route(&v4(200)).unwrap();
        assert_eq!(
            slot_of(&mut sim, 200),
            freed,
            "the only free slot is the freed one"
        );
        assert_eq!(
            packets_of(&mut sim, 200),
            Some(0),
            "a reused slot starts from zero"
        );
        assert_eq!(sim.run(&pkt(200)).unwrap().action, "XDP_TX");
        assert_eq!(
            sim.run(&pkt(3)).unwrap().verdict,
            Some(Verdict::DropNoRoute.name())
        );
        assert_eq!(packets_of(&mut sim, 200), Some(1));
        // A restart whose config is a different full table: removals come first, so
        // it fits.
        let listeners = sim.maps().listeners().unwrap();
        let next: Vec<Route> = (1000..1000 + CAP).map(v4).collect();
        let r = sim.maps().reconcile(&listeners, &next).unwrap();
        assert_eq!((r.added, r.removed), (CAP as usize, CAP as usize));
        let mut slots: Vec<u32> = next
            .iter()
            .map(|r| sim.maps().get_route(&r.key()).unwrap().stats_slot)
            .collect();
        slots.sort();
        assert_eq!(slots, (0..CAP).collect::<Vec<_>>(), "one slot per route");
    });
}

/// A pin left by an incompatible build (here: a routes map of another size, the way
/// an older build would have left it) is refused by name with the fix, instead of
/// being handed to the program; pins of older map versions that this build no longer
/// uses are found, and removed once no other link may use them.
#[test]
fn pins_of_another_layout_are_refused_and_stale_versions_removed() {
    in_ns(|| {
        use forwarder_common::routes4;
        let pin = PinDir::new();
        drop(
            loader::load_sized(pin.path(), Counters::Private, &[(routes4::MAP_NAME, 16)]).unwrap(),
        );
        let e = match loader::load(pin.path(), Counters::Private) {
            Ok(_) => panic!("a routes map of another size was reused silently"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains(routes4::MAP_NAME) && e.contains("16 entries") && e.contains("edgefwd down"),
            "{e}"
        );
        std::fs::remove_file(pin.path().join(routes4::MAP_NAME)).unwrap();
        drop(loader::load(pin.path(), Counters::Private).expect("loads once the pin is gone"));
        // A map pinned under an older version's name.
        let stale = pin.path().join("EFWD_VERDICT_V1");
        let any = pin.path().join(forwarder_common::listeners::MAP_NAME);
        // bpffs has no plain files: pin a second handle of a real map under the old name.
        let m = aya::maps::MapData::from_pin(&any).unwrap();
        m.pin(&stale).unwrap();
        assert_eq!(loader::stale_pins(pin.path()), vec![stale.clone()]);
        let other_link = pin
            .path()
            .join(format!("{}native_d1", loader::LINK_PIN_PREFIX));
        m.pin(&other_link).unwrap();
        assert!(
            loader::remove_stale_pins(pin.path(), &["d0"])
                .unwrap()
                .is_empty(),
            "another interface's link may still use them"
        );
        assert!(stale.exists());
        std::fs::remove_file(&other_link).unwrap();
        assert_eq!(
            loader::remove_stale_pins(pin.path(), &["d0"]).unwrap(),
            vec![stale.clone()]
        );
        assert!(!stale.exists());
        assert!(any.exists(), "current maps stay");
    });
}

/// The bench's UDP-checksum probe must really verify, or its cost figure means
/// nothing: valid datagrams of even and odd length verify, one flipped payload bit or a
/// wrong length does not.
#[test]
fn udp_verify_probe_tells_good_checksums_from_bad() {
    in_ns(|| {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut ebpf = loader::load_tools().expect("load");
        let prog = loader::program(&mut ebpf, forwarder_common::PROG_UDP_VERIFY).unwrap();
        let run = |frame: &[u8]| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .unwrap()
            .return_value
        };
        const DROP: u32 = 1;
        const PASS: u32 = 2;
        for len in [0, 1, 2, 3, 1188, 1189, 1190, 1191] {
            let good = from_pub(5004).build(&Rtp::new(SSRC_TX, 1, 1, len).bytes());
            assert_eq!(run(&good), DROP, "a valid {len} B payload did not verify");
            let mut bad = good.clone();
            *bad.last_mut().unwrap() ^= 0x10;
            assert_eq!(
                run(&bad),
                PASS,
                "a flipped bit in a {len} B payload verified"
            );
        }
        let good = from_pub(5004).build(&Rtp::new(SSRC_TX, 1, 1, 100).bytes());
        let mut short = good.clone();
        short[14 + 20 + 5] -= 2; // UDP length 2 bytes short of the datagram
        assert_eq!(run(&short), PASS);
    });
}

/// The packet counter of the route for `ssrc` on `listen` from PUB.
fn route_packets(sim: &mut Simulator, listen: &str, ssrc: u32) -> Option<u64> {
    sim.maps()
        .routes()
        .unwrap()
        .into_iter()
        .find(|(r, _)| r.ssrc == ssrc && r.listen == sa(listen) && r.source == sa(PUB))
        .map(|(_, s)| s.packets)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Verdicts decided below UDP: the kernel stack makes these calls (or drops the
/// frame) before a socket sees the datagram, so the socket path never does.
const BELOW_UDP: [Verdict; 13] = [
    Verdict::PassNotIp,
    Verdict::PassNotUdp,
    Verdict::PassFragment,
    Verdict::PassNotListener,
    Verdict::PassIpOptions,
    Verdict::DropMalformedIp,
    Verdict::DropMalformedUdp,
    Verdict::DropTtlExceeded,
    Verdict::DropZeroUdpChecksumV6,
    Verdict::DropRedirectError,
    Verdict::DropIpChecksum,
    Verdict::DropIpInvalid,
    Verdict::DropNotForUs,
];

/// The same fixture rows through the socket path (`--datapath user`): every row whose
/// datagram a socket would receive gets the XDP program's verdict, and forwarded
/// rows the same rewritten RTP.
#[test]
fn socket_path_gives_the_fixture_verdicts() {
    use edgefwd::datapath::userpath::UserPath;
    in_ns(|| {
        let ns_addrs = [
            ("198.51.100.2/32", "lo"),
            ("203.0.113.2/32", "lo"),
            ("2001:db8:a::2/128", "lo"),
            ("2001:db8:b::2/128", "lo"),
        ];
        for (a, dev) in ns_addrs {
            let st = std::process::Command::new("ip")
                .args(["addr", "add", a, "dev", dev, "nodad"])
                .status()
                .unwrap();
            assert!(st.success(), "ip addr add {a}");
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        let routes = vec![
            tx_route(),
            wrap_route(),
            redirect_route(),
            v6_route(),
            vlan_route(),
            route(
                L1,
                MARTIAN4,
                SSRC_TX,
                "203.0.113.2:5006",
                "203.0.113.1:6000",
            ),
            route(
                L6,
                MARTIAN6,
                SSRC_V6,
                "[2001:db8:b::2]:5006",
                "[2001:db8:b::1]:6000",
            ),
            // Its own output port: each listener's path binds its routes' sources.
            route(L2, PUB, 0x0000_0001, "203.0.113.2:5007", "203.0.113.1:6008"),
        ];
        let paths: Vec<(SocketAddr, UserPath)> = [(L1, true), (L2, false), (L6, true)]
            .iter()
            .map(|(a, strict)| {
                let l = Listener {
                    addr: sa(a),
                    drop_unknown_source: *strict,
                    drop_no_route: *strict,
                    webrtc: false,
                };
                // Every source arrives on lo (ifindex 1), as in the test runs.
                (
                    sa(a),
                    UserPath::new(&l, &routes, |_| TEST_RUN_IFINDEX).unwrap(),
                )
            })
            .collect();
        let pin = PinDir::new();
        let mut sim = setup(&pin);
        let (mut checked, mut failures) = (0, Vec::new());
        for fx in fixtures() {
            if BELOW_UDP.contains(&fx.verdict) {
                continue;
            }
            let Ok(p) = etherparse::SlicedPacket::from_ethernet(&fx.input) else {
                continue;
            };
            let (src_ip, dst_ip): (IpAddr, IpAddr) = match &p.net {
                Some(etherparse::NetSlice::Ipv4(v4)) => (
                    v4.header().source_addr().into(),
                    v4.header().destination_addr().into(),
                ),
                Some(etherparse::NetSlice::Ipv6(v6)) => (
                    v6.header().source_addr().into(),
                    v6.header().destination_addr().into(),
                ),
                _ => continue,
            };
            let Some(etherparse::TransportSlice::Udp(udp)) = &p.transport else {
                continue;
            };
            let dst = SocketAddr::new(dst_ip, udp.destination_port());
            let src = SocketAddr::new(src_ip, udp.source_port());
            let Some((_, path)) = paths.iter().find(|(a, _)| *a == dst) else {
                continue;
            };
            let mut payload = udp.payload().to_vec();
            let got = path.judge(&mut payload, src);
            checked += 1;
            if got != fx.verdict {
                failures.push(format!(
                    "{}: socket path {} (XDP {})",
                    fx.desc,
                    got.name(),
                    fx.verdict.name()
                ));
                continue;
            }
            if fx.verdict.action() == forwarder_common::verdicts::Action::Forward {
                let out = sim.run(&fx.input).unwrap().output;
                let o = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
                let Some(etherparse::TransportSlice::Udp(ou)) = &o.transport else {
                    panic!("{}: XDP output has no UDP", fx.desc);
                };
                if ou.payload() != payload.as_slice() {
                    failures.push(format!("{}: the paths rewrite RTP differently", fx.desc));
                }
            }
        }
        assert!(checked >= 20, "only {checked} rows reached the socket path");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// A WebRTC listener (FLAG_WEBRTC): SRTP and SRTCP from a peer bound in
/// `EFWD_PEERS_V1` go to the AF_XDP socket of the receive queue (or, with none there,
/// to the stack), SRTP padding the parser cannot check (it is encrypted) included;
/// STUN and DTLS pass; SRTP/SRTCP from an unbound address, or from a peer after it is
/// unbound, is dropped. IPv4 and IPv6.
#[test]
fn webrtc_listener_steers_bound_peers_to_af_xdp_and_drops_strangers() {
    in_ns(|| {
        let pin = PinDir::new();
        let mut ebpf = loader::load(pin.path(), Counters::Private).expect("load");
        let mut maps = Maps::from_ebpf(&mut ebpf).expect("maps");
        let (w4, w6) = (sa("198.51.100.2:5010"), sa("[2001:db8:a::2]:5010"));
        for addr in [w4, w6] {
            maps.set_listener(&Listener {
                addr,
                drop_unknown_source: false,
                drop_no_route: false,
                webrtc: true,
            })
            .unwrap();
        }
        maps.peers.bind(w4, sa(PUB), 7).unwrap();
        maps.peers.bind(w6, sa(PUB6), 8).unwrap();
        assert_eq!(maps.peers.list().unwrap().len(), 2);
        let mut sim = Simulator::from_parts(ebpf, maps);
        let v4 = from_pub(5010);
        let v6 = Frame {
            dport: 5010,
            ..from_pub6()
        };
        let stranger = Frame {
            sport: 40001,
            ..v4.clone()
        };
        let srtp = Rtp::new(0x1234, 9, 9, 100).bytes();
        // P bit set and a "pad count" larger than the payload: in SRTP the count is
        // ciphertext, so only the worker (after authentication) may judge it.
        let mut padded = srtp.clone();
        padded[0] |= 0x20;
        *padded.last_mut().unwrap() = 0xff;
        let srtcp = [
            0x80u8, 201, 0, 1, 0, 0, 0, 1, 0xaa, 0xbb, 0xcc, 0xdd, 0x80, 0, 0, 1,
        ];
        let stun = [
            0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        let dtls = [22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let run = |sim: &mut Simulator, f: &Frame, p: &[u8]| {
            let o = sim.run(&f.build(p)).unwrap();
            (o.action, o.verdict.unwrap())
        };
        let no_worker = ("XDP_PASS", "pass_no_worker");
        let dropped = ("XDP_DROP", "drop_unknown_peer");
        for f in [&v4, &v6] {
            assert_eq!(run(&mut sim, f, &srtp), no_worker, "{f:?}");
            assert_eq!(run(&mut sim, f, &padded), no_worker);
            assert_eq!(run(&mut sim, f, &srtcp), no_worker);
            assert_eq!(run(&mut sim, f, &stun), ("XDP_PASS", "pass_stun"));
            assert_eq!(run(&mut sim, f, &dtls), ("XDP_PASS", "pass_dtls"));
        }
        assert_eq!(run(&mut sim, &stranger, &srtp), dropped);
        assert_eq!(run(&mut sim, &stranger, &srtcp), dropped);
        assert_eq!(
            run(&mut sim, &stranger, &stun),
            ("XDP_PASS", "pass_stun"),
            "ICE checks come from new addresses"
        );
        // An AF_XDP socket on the queue the test run arrives on (lo, queue 0).
        let xq =
            edgefwd::datapath::xsk::XskQueue::open(TEST_RUN_IFINDEX, 0, w4, [2, 0, 0, 0, 0, 1])
                .expect("AF_XDP socket on lo");
        sim.maps()
            .xsks
            .as_mut()
            .unwrap()
            .set(0, xq.fd(), 0)
            .unwrap();
        assert_eq!(run(&mut sim, &v4, &srtp), ("XDP_REDIRECT", "forward_xsk"));
        assert_eq!(run(&mut sim, &v6, &srtcp), ("XDP_REDIRECT", "forward_xsk"));
        sim.maps().peers.unbind(w4, sa(PUB));
        assert_eq!(
            run(&mut sim, &v4, &srtp),
            dropped,
            "unbound when its session ended"
        );
        assert_eq!(sim.maps().peers.clear().unwrap(), 1);
        assert_eq!(run(&mut sim, &v6, &srtp), dropped);
    });
}

/// Fan-out: one packet of a stream with several copies through XDP (validated, handed
/// up with the copy list in the metadata) and the TC replicator, with live frames so
/// the copies are really sent. Every copy is captured at its receiving end and
/// compared byte for byte (addresses, ports, SSRC, seq/ts offsets, PT, TTL, both
/// checksums) with what its route says; then a copy is removed and the others go on.
#[test]
fn fanout_sends_every_copy_rewritten_and_a_removed_copy_stops() {
    let _k = kernel_lock();
    let ns = NetNs::new("fo");
    for (a, b) in [("f0", "f1"), ("d0", "d1")] {
        ns.exec(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
        ns.exec(&["ip", "link", "set", a, "up"]);
        ns.exec(&["ip", "link", "set", b, "up"]);
    }
    ns.run(|| {
        let pin = PinDir::new();
        let mut ebpf = loader::load(pin.path(), Counters::Private).expect("load");
        let mut maps = Maps::from_ebpf(&mut ebpf).expect("maps");
        let f0 = edgefwd::dataplane::preflight::ifindex("f0").unwrap();
        let d0 = edgefwd::dataplane::preflight::ifindex("d0").unwrap();
        for addr in [L1, L6] {
            maps.set_listener(&Listener {
                addr: sa(addr),
                drop_unknown_source: true,
                drop_no_route: true,
                webrtc: false,
            })
            .unwrap();
        }
        maps.set_interface_mac(f0, MAC_FWD).unwrap();
        let base = route(L1, PUB, SSRC_TX, "203.0.113.2:5006", "203.0.113.1:6000");
        let copies = vec![
            // Back out of the ingress interface, fields unchanged but addresses: a trunk.
            base.clone(),
            Route {
                egress_ifindex: d0,
                ssrc_out: 0x5566_7788,
                seq_delta: 0xfff0,
                ts_delta: 0xffff_ff00,
                pt_remap: Some((96, 100)),
                ..route(L1, PUB, SSRC_TX, "203.0.113.2:5006", "203.0.113.7:6002")
            },
            Route {
                egress_ifindex: d0,
                ssrc_out: 0x0a0a_0a0a,
                seq_delta: 3,
                ts_delta: 90_000,
                ..route(L1, PUB, SSRC_TX, "203.0.113.9:5010", "203.0.113.8:6004")
            },
        ];
        for c in &copies {
            maps.add_copy(c).unwrap();
        }
        let copies6 = vec![
            Route {
                egress_ifindex: d0,
                ssrc_out: 0x6666_0001,
                seq_delta: 1,
                ..route(
                    L6,
                    PUB6,
                    SSRC_V6,
                    "[2001:db8:b::2]:5006",
                    "[2001:db8:b::1]:6000",
                )
            },
            Route {
                egress_ifindex: d0,
                ssrc_out: 0x6666_0002,
                seq_delta: 2,
                ts_delta: 7,
                ..route(
                    L6,
                    PUB6,
                    SSRC_V6,
                    "[2001:db8:b::2]:5006",
                    "[2001:db8:b::3]:6002",
                )
            },
        ];
        for c in &copies6 {
            maps.add_copy(c).unwrap();
        }
        let e = maps
            .add_copy(&Route {
                vlan: Some(5),
                ..route(L1, PUB, SSRC_TX, "203.0.113.2:5006", "203.0.113.6:6000")
            })
            .unwrap_err();
        assert!(format!("{e:#}").contains("untagged"), "{e:#}");
        let e = maps.add_copy(&copies[1]).unwrap_err();
        assert!(format!("{e:#}").contains("has a copy to"), "{e:#}");
        let streams = maps.streams().unwrap();
        assert_eq!(streams.len(), 2);
        assert!(streams.iter().all(|s| s.fanout));
        let mut sim = Simulator::from_parts(ebpf, maps);
        loader::attach_fanout(sim.ebpf(), "f0").expect("attach the replicator");
        // Real traffic into f0 from its veth peer, XDP in native mode: the path a
        // publisher's packet takes (this kernel refuses BPF_PROG_TEST_RUN's live frames).
        loader::attach(sim.ebpf(), forwarder_common::PROG_FORWARD, "f0").expect("attach XDP");
        let back = edgefwd_tests::RawSock::open("f1");
        let out = edgefwd_tests::RawSock::open("d1");
        let rtp = Rtp {
            pt: 96,
            marker: true,
            ..Rtp::new(SSRC_TX, 0x0012, 0x0000_0200, 200)
        };
        let input = from_pub(5004).build(&rtp.bytes());
        let rtp6 = Rtp::new(SSRC_V6, 0xfffe, 5, 100);
        let input6 = from_pub6().build(&rtp6.bytes());
        back.send(&input);
        back.send(&input6);

        // Frames to the copies' destination ports (the veths also carry IPv6 ND).
        let udp_to = |f: &[u8], port: u16| {
            let l4 = match u16::from_be_bytes([f[12], f[13]]) {
                0x0800 => 34,
                0x86dd => 54,
                _ => return false,
            };
            f.len() > l4 + 4 && u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]) == port
        };
        let gather = |s: &edgefwd_tests::RawSock, want: usize| {
            let mut got = Vec::new();
            let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while got.len() < want && std::time::Instant::now() < until {
                if let Some(f) = s.recv()
                    && (6000..6010).any(|p| udp_to(&f, p))
                {
                    got.push(f);
                }
            }
            got
        };
        let mut want_back = vec![rewritten(&from_pub(5004), &copies[0], &rtp)];
        let mut want_out: Vec<Vec<u8>> = copies[1..]
            .iter()
            .map(|c| rewritten(&from_pub(5004), c, &rtp))
            .chain(copies6.iter().map(|c| rewritten(&from_pub6(), c, &rtp6)))
            .collect();
        let mut got_back = gather(&back, 1);
        let mut got_out = gather(&out, 4);
        for v in [&mut want_back, &mut want_out, &mut got_back, &mut got_out] {
            v.sort();
        }
        assert_eq!(
            got_back.iter().map(|f| hex(f)).collect::<Vec<_>>(),
            want_back.iter().map(|f| hex(f)).collect::<Vec<_>>(),
            "the copy sent back out of f0"
        );
        assert_eq!(
            got_out.iter().map(|f| hex(f)).collect::<Vec<_>>(),
            want_out.iter().map(|f| hex(f)).collect::<Vec<_>>(),
            "the copies redirected to d0"
        );
        let verdicts = sim.maps().verdict_totals().unwrap();
        let n = |v: Verdict| verdicts.iter().find(|(x, _)| *x == v).unwrap().1.packets;
        assert_eq!(n(Verdict::ForwardFanout), 2);
        let copy_verdicts = sim.maps().copy_verdict_totals().unwrap();
        assert_eq!(copy_verdicts[0].1.packets, 5, "{copy_verdicts:?}");
        assert!(
            copy_verdicts[1..].iter().all(|(_, s)| s.packets == 0),
            "{copy_verdicts:?}"
        );
        for s in sim.maps().streams().unwrap() {
            assert_eq!(s.received.packets, 1);
            assert!(s.copies.iter().all(|(_, st)| st.packets == 1), "{s:?}");
        }

        // Remove the middle copy: the next packet reaches the other two, no one else.
        assert!(
            sim.maps()
                .del_copy(&copies[1].key(), copies[1].out_dst)
                .unwrap()
        );
        let rtp2 = Rtp {
            seq: 0x0013,
            ..rtp.clone()
        };
        back.send(&from_pub(5004).build(&rtp2.bytes()));
        let got_back = gather(&back, 1);
        let got_out = gather(&out, 2);
        assert_eq!(
            got_back,
            vec![rewritten(&from_pub(5004), &copies[0], &rtp2)]
        );
        assert_eq!(got_out, vec![rewritten(&from_pub(5004), &copies[2], &rtp2)]);
        let stream = &sim.maps().streams().unwrap()[0];
        assert_eq!(stream.copies.len(), 2);
        assert!(
            stream.copies.iter().all(|(_, st)| st.packets == 2),
            "{stream:?}"
        );
        // Down to one copy: a plain route again, forwarded by XDP itself.
        assert!(
            sim.maps()
                .del_copy(&copies[2].key(), copies[2].out_dst)
                .unwrap()
        );
        let stream = &sim.maps().streams().unwrap()[0];
        assert!(!stream.fanout);
        assert_eq!(stream.copies[0].1.packets, 2, "the copy kept its counters");
    });
}
