//! RFC 7983 classification, RTP validation and the shared header rewrite, with the
//! invariants both data paths rely on: a validated packet can be rewritten in place
//! without changing its framing, and the incremental UDP checksum update equals a
//! recomputation from scratch.
#![no_main]

use forwarder_common::{
    csum,
    routes::{FLAG_REWRITE_PT, RouteValue},
    rtp::{Class, classify, validate},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 12 bytes choose the rewrite; the rest is the UDP payload.
    if data.len() < 12 {
        return;
    }
    let (knobs, pkt) = data.split_at(12);
    if pkt.len() < 2 {
        return;
    }
    if classify(pkt[0], pkt[1]) != Class::Rtp {
        return;
    }
    let Ok(hlen) = validate(pkt) else { return };
    assert!(hlen <= pkt.len(), "header length {hlen} past a {}-byte packet", pkt.len());

    let route = RouteValue {
        ssrc_out_be: [knobs[0], knobs[1], knobs[2], knobs[3]],
        ts_delta: u32::from_be_bytes([knobs[4], knobs[5], knobs[6], knobs[7]]),
        seq_delta: u16::from_be_bytes([knobs[8], knobs[9]]),
        pt_from: knobs[10] & 0x7f,
        pt_to: knobs[11] & 0x7f,
        flags: if knobs[10] & 0x80 != 0 { FLAG_REWRITE_PT } else { 0 },
        ..RouteValue::default()
    };
    let mut out = pkt.to_vec();
    forwarder_common::rtp::rewrite(&mut out, &route);
    assert_eq!(validate(&out), Ok(hlen), "the rewrite changed the packet's framing");
    assert_eq!(out[hlen..], pkt[hlen..], "the rewrite touched the payload");
    assert_eq!(out[8..12], route.ssrc_out_be);

    // The checksum over a UDP datagram carrying it, before and after, versus the
    // incremental update of the twelve header bytes the rewrite may change.
    let (src, dst) = ([192, 0, 2, 1], [198, 51, 100, 7]);
    let udp = |payload: &[u8]| {
        let mut d = vec![0x13, 0x88, 0x13, 0x89];
        d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(payload);
        d
    };
    let (before, after) = (udp(pkt), udp(&out));
    if before.len() > u16::MAX as usize {
        return;
    }
    let c0 = csum::udp_checksum(&src, &dst, &before);
    let c1 = csum::udp_checksum(&src, &dst, &after);
    let mut delta = csum::Delta::new();
    for w in (0..12).step_by(2) {
        delta.bytes2([pkt[w], pkt[w + 1]], [out[w], out[w + 1]]);
    }
    let incr = u16::from_be_bytes(delta.apply(c0.to_be_bytes()));
    // 0x0000 and 0xffff are the same one's complement value; UDP sends 0 as 0xffff.
    let norm = |c: u16| if c == 0 { 0xffff } else { c };
    assert_eq!(norm(incr), norm(c1), "incremental checksum differs from a full one");
});
