//! RTCP: parsing, translation, reception statistics, transport feedback.

use super::*;
use rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;

#[test]
fn keyframe_requests_and_nacks_are_read() {
    let mut compound = pli(1, 0xaabbccdd);
    compound.extend(
        rtcp::packet::marshal(&[Box::new(FullIntraRequest {
            sender_ssrc: 1,
            media_ssrc: 0,
            fir: vec![rtcp::payload_feedbacks::full_intra_request::FirEntry {
                ssrc: 0x1234,
                sequence_number: 3,
            }],
        }) as Box<dyn Packet + Send + Sync>])
        .unwrap(),
    );
    compound.extend(translated_nack(1, 0x55, &[10, 11, 13], 0));
    let got = parse(&compound).unwrap();
    assert_eq!(
        got,
        vec![
            Request::KeyFrame {
                media_ssrc: 0xaabbccdd
            },
            Request::KeyFrame { media_ssrc: 0x1234 },
            Request::Nack {
                media_ssrc: 0x55,
                seqs: vec![10, 11, 13]
            },
        ]
    );
}

#[test]
fn lying_feedback_is_an_error_or_skipped_never_a_panic() {
    // The fuzzer's find: a REMB (PSFB fmt 15) claiming 0x31 SSRCs in 24 bytes,
    // which the rtcp crate's REMB parser reads past the end of.
    let remb = [
        0x8f, 0xce, 0x00, 0x05, 0, 0, 0, 1, 0, 0, 0, 0, b'R', b'E', b'M', b'B', 0x31, 0x12, 0x34,
        0x56, 0x11, 0x22, 0x33, 0x44,
    ];
    assert_eq!(parse(&remb).unwrap(), vec![]);
    // Kinds we read still come through when they follow one we skip.
    let mut compound = remb.to_vec();
    compound.extend(pli(1, 0xabc));
    assert_eq!(
        parse(&compound).unwrap(),
        vec![Request::KeyFrame { media_ssrc: 0xabc }]
    );
    // A length that overruns the datagram, a wrong version, a truncated header.
    let mut long = pli(1, 2);
    long[3] = 9;
    assert!(parse(&long).is_err());
    let mut v1 = pli(1, 2);
    v1[0] = 0x41;
    assert!(parse(&v1).is_err());
    assert!(parse(&pli(1, 2)[..3]).is_err());
    assert!(parse(&[]).is_err());
    // The fuzzer's second find: a FIR of 8 octets (no media SSRC, no entry),
    // then an SR and a packet of another kind; the crate's FIR parser reads on.
    let fir_short = [
        0x84, 0xce, 0x00, 0x01, 0x11, 0x22, 0x33, 0x44, 0x01, 0x00, 0x00, 0x02, 0x00, 0x00, 0x03,
        0xe8, 0x00, 0x00, 0x00, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0x81, 0, 0, 0, 0, 0, 0, 0, 0x00,
        0x11, 0x22, 0x33, 0x44, 0x07, 0, 0, 0, 0, 0,
    ];
    assert!(parse(&fir_short).is_err());
    // Each kind we read, one octet short of its layout or with lying padding.
    let mut short_pli = pli(1, 2);
    short_pli[3] = 1;
    assert!(parse(&short_pli[..8]).is_err());
    let mut sr = sender_report(1, 2, 3, 4, 5, "c");
    sr[0] |= 1; // RC = 1 with no report block
    assert!(parse(&sr).is_err());
    let mut nack = translated_nack(1, 2, &[5], 0);
    nack[0] |= 0x20; // padding bit, last octet 0x00
    assert!(parse(&nack).is_err());
}

#[test]
fn nack_moves_into_the_publisher_sequence_space_across_wraparound() {
    // The subscriber sees seq = publisher seq + 100 (mod 2^16).
    let raw = translated_nack(9, 0x77, &[50, 51, 99], 100);
    assert_eq!(
        parse(&raw).unwrap(),
        vec![Request::Nack {
            media_ssrc: 0x77,
            seqs: vec![65486, 65487, 65535]
        }]
    );
}

#[test]
fn sender_report_roundtrip() {
    let raw = sender_report(0x42, 0x1122334455667788, 9000, 10, 1000, "edgefwd");
    assert_eq!(
        parse(&raw).unwrap(),
        vec![Request::SenderReport {
            ssrc: 0x42,
            ntp: 0x1122334455667788,
            rtp: 9000
        }]
    );
}

#[test]
fn remb_is_read() {
    // 1.5 Mbit/s = 187,500 × 2^3 for SSRCs 0x11 and 0x22.
    let (exp, mantissa) = (3u32, 187_500u32);
    let mut p = vec![0x8f, 206, 0, 6, 0, 0, 0, 9, 0, 0, 0, 0];
    p.extend_from_slice(b"REMB");
    p.extend_from_slice(&((2 << 24) | (exp << 18) | mantissa).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0x11, 0, 0, 0, 0x22]);
    assert_eq!(
        parse(&p).unwrap(),
        vec![Request::Remb {
            bitrate: 1_500_000,
            ssrcs: vec![0x11, 0x22]
        }]
    );
}

#[test]
fn report_blocks_from_receiver_and_sender_reports() {
    let block = |ssrc| ReceptionReport {
        ssrc,
        fraction_lost: 64,
        total_lost: 12,
        last_sequence_number: 0x1_0005,
        jitter: 90,
        last_sender_report: 0xdead_beef,
        delay: 65536 / 2,
    };
    let rr = receiver_report(7, vec![block(0x11), block(0x22)]);
    let got = parse(&rr).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1],
        Request::Reception(ReportBlock {
            media_ssrc: 0x22,
            fraction_lost: 64,
            total_lost: 12,
            highest_seq: 0x1_0005,
            jitter: 90,
            lsr: 0xdead_beef,
            dlsr: 32768,
        })
    );
    // In an SR after the sender info; cumulative loss is signed (duplicates).
    let mut sr = marshal(vec![Box::new(SenderReport {
        ssrc: 1,
        reports: vec![block(0x33)],
        ..Default::default()
    })]);
    sr[28 + 5..28 + 8].copy_from_slice(&[0xff, 0xff, 0xfe]);
    let got = parse(&sr).unwrap();
    assert!(matches!(got[1], Request::Reception(b) if b.media_ssrc == 0x33 && b.total_lost == -2));
    // RC larger than what follows.
    let mut short = rr.clone();
    short[0] = (short[0] & 0xe0) | 3;
    assert!(parse(&short).is_err());
}

#[test]
fn reception_counts_loss_wraparound_and_jitter() {
    let mut r = Reception::default();
    let t0 = std::time::Instant::now();
    // 65530..=65535, then 0..=9 with 3 and 4 lost: 16 expected, 14 received.
    for (n, s) in (65530u32..65536).chain(0..10).map(|s| s as u16).enumerate() {
        let n = n as u64;
        if s != 3 && s != 4 {
            r.update(s, (n * 3000) as u32, n * 3000 + (n % 2) * 90);
        }
    }
    let rep = r.report(7, t0).unwrap();
    assert_eq!(rep.last_sequence_number, (1 << 16) + 9);
    assert_eq!(rep.total_lost, 2);
    assert_eq!(rep.fraction_lost, (2 * 256 / 16) as u8);
    assert!(
        rep.jitter > 0,
        "alternating 90-unit transit changes show as jitter"
    );
    // Next interval without loss reports 0 lost in the interval, 2 in total.
    r.update(10, 0, 0);
    let rep = r.report(7, t0).unwrap();
    assert_eq!((rep.fraction_lost, rep.total_lost), (0, 2));
}

/// Transport feedback as a real recorder builds it (the interceptor crate's, which
/// the engine also sends publishers): the received sequence numbers, in order,
/// with their arrival times as sent; the lost ones left out.
#[test]
fn transport_feedback_lists_what_arrived_and_when() {
    let mut rec = interceptor::twcc::Recorder::new(5);
    let arrivals: Vec<(u16, i64)> = (0..10u16)
        .map(|i| 65_530u16.wrapping_add(i))
        .filter(|s| *s != 65_533 && *s != 65_534)
        .enumerate()
        .map(|(i, s)| {
            (
                s,
                1_000_000 + 1_250 * i as i64 + if i > 4 { 70_000 } else { 0 },
            )
        })
        .collect();
    for (seq, at) in &arrivals {
        rec.record(0xaa, *seq, *at);
    }
    let bytes = rtcp::packet::marshal(&rec.build_feedback_packet()).unwrap();
    let got = parse(&bytes).unwrap();
    let [Request::TransportFeedback { received }] = &got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(
        received.iter().map(|r| r.0).collect::<Vec<_>>(),
        arrivals.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    // Times relative to the first (the reference time is in 64 ms units).
    let rel = |v: &[(u16, i64)]| v.iter().map(|r| r.1 - v[0].1).collect::<Vec<_>>();
    assert_eq!(rel(received), rel(&arrivals));
    assert!(parse(&bytes[..bytes.len() - 4]).is_err(), "truncated");
}

/// Transport feedback that lies: a status count of 65,535 with a few chunks (the
/// fuzzer's find, which panics the rtcp crate's reader), deltas past the end; and
/// a vector of two-bit symbols read right. An error or what is there, never a
/// panic.
#[test]
fn lying_transport_feedback_is_an_error() {
    let mut p = vec![
        0x8f, 205, 0, 5, 0, 0, 0, 1, 0, 0, 0, 2, 0, 10, 0xff, 0xff, 0, 0, 1, 0,
    ];
    p.extend_from_slice(&[0xc0, 0x00, 0xd5, 0x55]);
    assert!(parse(&p).is_err());
    // Two statuses (a run of small deltas): 4 × 250 µs, then 0.
    let mut q = vec![
        0x8f, 205, 0, 5, 0, 0, 0, 1, 0, 0, 0, 2, 0, 10, 0, 2, 0, 0, 1, 0,
    ];
    q.extend_from_slice(&[0x20, 0x02, 4, 0]);
    assert_eq!(
        parse(&q).unwrap(),
        vec![Request::TransportFeedback {
            received: vec![(10, 64_000 + 1_000), (11, 64_000 + 1_000)]
        }]
    );
    // Two packets reported, one delta there.
    let mut r = q.clone();
    r[15] = 3;
    r[21] = 0x03;
    assert!(parse(&r).is_err(), "a delta past the end");
    // A vector of seven two-bit symbols: small (2 ms), large (-1 ms), then none.
    let mut v = vec![
        0x8f, 205, 0, 6, 0, 0, 0, 1, 0, 0, 0, 2, 0, 10, 0, 7, 0, 0, 0, 0,
    ];
    v.extend_from_slice(&[0b1101_1000, 0, 8, 0xff, 0xfc, 0, 0, 0]);
    assert_eq!(
        parse(&v).unwrap(),
        vec![Request::TransportFeedback {
            received: vec![(10, 2_000), (11, 1_000)]
        }]
    );
}
