//! Offers and answers: parsing browsers' offers and what we answer to them.

use super::*;

/// Trimmed from a real Chromium 156 offer: audio + video sendonly, RTX groups,
/// several H264 variants, a data channel.
const CHROMIUM_OFFER: &str = include_str!("../testdata/chromium-offer.sdp");

/// Our answer to `o` on one host candidate, with fixed ICE credentials.
fn answer_for(o: &Offer, media: &[AnswerMedia]) -> String {
    build_answer(&AnswerParams {
        offer: o,
        ice_ufrag: "uFrG",
        ice_pwd: "0123456789abcdefghijkl",
        fingerprint: &[0xAB; 32],
        candidates: &["127.0.0.1:40000".parse().unwrap()],
        tcp_candidates: &[],
        media,
        cname: "edgefwd",
    })
}

#[test]
fn parses_a_chromium_offer() {
    let o = parse_offer(CHROMIUM_OFFER).unwrap();
    assert_eq!(o.ice_ufrag, "8hhY");
    assert_eq!(o.ice_pwd, "asd88fgpdd777uzjYhagZg4b");
    assert_eq!(o.fingerprint.0, "sha-256");
    assert_eq!(o.fingerprint.1.len(), 32);
    assert_eq!(o.fingerprint.1[0], 0xD2);
    assert_eq!(o.media.len(), 3);
    assert_eq!(o.media[0].kind, Some(Kind::Audio));
    assert_eq!(o.media[0].ssrcs, vec![1111]);
    assert_eq!(
        o.media[1].ssrcs,
        vec![2222],
        "the RTX SSRC of the FID group is not media"
    );
    assert_eq!(o.media[1].direction, Direction::SendOnly);
    assert_eq!(o.media[2].kind, None);
    assert_eq!(o.media[0].publish_codec().unwrap().name, "opus");
    assert_eq!(o.media[1].publish_codec().unwrap().pt, 96);
}

#[test]
fn h264_needs_packetization_mode_1_and_a_matching_profile() {
    let o = parse_offer(CHROMIUM_OFFER).unwrap();
    let mut v = o.media[1].clone();
    v.codecs.retain(|c| c.name == "H264");
    assert_eq!(v.publish_codec().unwrap().pt, 104, "mode 0 variant skipped");
    let published = v.publish_codec().unwrap().clone();
    let mut sub = v.clone();
    sub.direction = Direction::RecvOnly;
    assert_eq!(sub.subscribe_codec(&published).unwrap().pt, 104);
    let mut other_profile = published.clone();
    other_profile.fmtp = "packetization-mode=1;profile-level-id=640c1f".into();
    assert!(sub.subscribe_codec(&other_profile).is_none());
}

#[test]
fn answer_is_ice_lite_passive_bundle_with_refused_datachannel() {
    let o = parse_offer(CHROMIUM_OFFER).unwrap();
    let media = vec![
        AnswerMedia::Receive {
            codec: o.media[0].publish_codec().unwrap().clone(),
            simulcast: false,
        },
        AnswerMedia::Receive {
            codec: o.media[1].publish_codec().unwrap().clone(),
            simulcast: false,
        },
        AnswerMedia::Reject,
    ];
    let text = answer_for(&o, &media);
    for want in [
        "a=ice-lite",
        "a=group:BUNDLE 0 1\r\n",
        "m=audio 40000 UDP/TLS/RTP/SAVPF 111\r\n",
        "m=video 40000 UDP/TLS/RTP/SAVPF 96\r\n",
        "m=application 0 UDP/DTLS/SCTP webrtc-datachannel",
        "a=setup:passive",
        "a=recvonly",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtcp-fb:96 nack pli",
        "a=rtcp-fb:96 ccm fir",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host",
        "a=fingerprint:sha-256 AB:AB:",
    ] {
        assert!(text.contains(want), "answer lacks {want:?}:\n{text}");
    }
    assert!(
        !text.contains("transport-cc"),
        "this offer has no transport-wide extension: no transport-cc"
    );
    assert!(
        !text.contains("rtx"),
        "a publisher is not offered RTX: its resends reuse the media SSRC"
    );
    // The answer must parse back.
    let back = SessionDescription::unmarshal(&mut Cursor::new(text.as_bytes())).unwrap();
    assert_eq!(back.media_descriptions.len(), 3);
}

/// With the transport-wide sequence extension offered (as Chromium does), a
/// publisher's m-lines answer it and transport-cc feedback (we send it feedback),
/// and so do a viewer's (it sends us feedback); an offer without the extension
/// gets neither.
#[test]
fn transport_cc_is_answered_where_the_extension_is_offered() {
    let with_ext = CHROMIUM_OFFER
        .replace(
            "a=mid:0\r\n",
            &format!("a=mid:0\r\na=extmap:3 {EXT_TWCC}\r\n"),
        )
        .replace(
            "a=mid:1\r\n",
            &format!("a=mid:1\r\na=extmap:3 {EXT_TWCC}\r\n"),
        );
    let o = parse_offer(&with_ext).unwrap();
    let (audio, video) = (&o.media[0], &o.media[1]);
    let vp8 = video.publish_codec().unwrap().clone();
    assert_eq!(video.twcc(&vp8), Some(3));
    let mut h264 = vp8.clone();
    h264.feedback.retain(|f| f != "transport-cc");
    assert_eq!(video.twcc(&h264), None, "only with transport-cc feedback");
    let media = vec![
        AnswerMedia::Receive {
            codec: audio.publish_codec().unwrap().clone(),
            simulcast: false,
        },
        AnswerMedia::Receive {
            codec: vp8.clone(),
            simulcast: false,
        },
        AnswerMedia::Reject,
    ];
    let text = answer_for(&o, &media);
    for want in [
        "a=rtcp-fb:111 transport-cc\r\n",
        "a=rtcp-fb:96 transport-cc\r\n",
        &format!("a=extmap:3 {EXT_TWCC}\r\n"),
    ] {
        assert!(text.contains(want), "answer lacks {want:?}:\n{text}");
    }
    assert!(!text.contains("goog-remb"), "{text}");
    // The audio level extension Chromium offers on its audio m-line is kept there.
    assert_eq!(audio.audio_level(), Some(1));
    assert_eq!(video.audio_level(), None);
    assert!(
        text.contains(&format!("a=extmap:1 {EXT_AUDIO_LEVEL}\r\n")),
        "{text}"
    );
    // A subscriber's m-line: the same (its feedback drives its delay estimate).
    let send = vec![AnswerMedia::Send {
        codec: vp8,
        ssrc: 7,
        rtx: None,
        stream_id: "s".into(),
        track_id: "t".into(),
    }];
    let mut sub = o.clone();
    sub.media.truncate(1);
    sub.media[0] = o.media[1].clone();
    sub.media[0].direction = Direction::RecvOnly;
    let text = answer_for(&sub, &send);
    assert!(
        text.contains("a=rtcp-fb:96 transport-cc\r\n")
            && text.contains(&format!("a=extmap:3 {EXT_TWCC}\r\n")),
        "{text}"
    );
    assert!(
        !text.contains("goog-remb"),
        "transport-cc offered too: {text}"
    );
    // A viewer that offers REMB only is answered REMB.
    let mut remb_only = send.clone();
    if let AnswerMedia::Send { codec, .. } = &mut remb_only[0] {
        codec.feedback.retain(|f| f != "transport-cc");
    }
    let text = answer_for(&sub, &remb_only);
    assert!(text.contains("a=rtcp-fb:96 goog-remb\r\n"), "{text}");
    assert!(!text.contains("transport-cc"), "{text}");
    // Without the extension in the offer: not answered either.
    let o = parse_offer(CHROMIUM_OFFER).unwrap();
    assert_eq!(o.media[1].twcc(o.media[1].publish_codec().unwrap()), None);
}

/// A viewer's m-line that offers RTX for the codec it gets is answered with it:
/// the rtx codec bound to that payload type, and the FID group pairing the media
/// SSRC with the retransmission SSRC.
#[test]
fn rtx_is_answered_to_viewers_that_offer_it() {
    let o = parse_offer(CHROMIUM_OFFER).unwrap();
    let mut v = o.media[1].clone();
    v.direction = Direction::RecvOnly;
    assert_eq!(v.rtx_for(96), Some(97), "a=fmtp:97 apt=96");
    assert_eq!(v.rtx_for(45), None, "no rtx offered for it");
    assert_eq!(o.media[0].rtx_for(111), None, "audio: none");
    let mut sub = o.clone();
    sub.media = vec![v.clone()];
    let text = answer_for(
        &sub,
        &[AnswerMedia::Send {
            codec: v.codecs.iter().find(|c| c.pt == 96).unwrap().clone(),
            ssrc: 1000,
            rtx: Some((97, 2000)),
            stream_id: "s".into(),
            track_id: "t".into(),
        }],
    );
    for want in [
        "m=video 40000 UDP/TLS/RTP/SAVPF 96 97\r\n",
        "a=rtpmap:97 rtx/90000\r\n",
        "a=fmtp:97 apt=96\r\n",
        "a=ssrc-group:FID 1000 2000\r\n",
        "a=ssrc:2000 cname:edgefwd\r\n",
    ] {
        assert!(text.contains(want), "answer lacks {want:?}:\n{text}");
    }
}

#[test]
fn bad_offers_say_what_is_missing() {
    assert!(matches!(parse_offer("hello"), Err(OfferError::Syntax(_))));
    let no_pwd = CHROMIUM_OFFER.replace("a=ice-pwd:asd88fgpdd777uzjYhagZg4b\r\n", "");
    assert_eq!(
        parse_offer(&no_pwd).unwrap_err(),
        OfferError::Missing("a=ice-pwd")
    );
    let no_fp: String = CHROMIUM_OFFER
        .lines()
        .filter(|l| !l.starts_with("a=fingerprint"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    assert!(
        parse_offer(&no_fp)
            .unwrap_err()
            .to_string()
            .contains("a=fingerprint")
    );
}

/// A Chromium simulcast offer (sendEncodings with rids): the rids in layer order,
/// the rid extension's id, and an answer that mirrors a=simulcast and a=rid with
/// the MID and rid extensions under the offer's ids.
#[test]
fn simulcast_offer_and_answer() {
    let text = CHROMIUM_OFFER.replace(
        "a=mid:1\r\na=sendonly\r\n",
        "a=mid:1\r\na=sendonly\r\na=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
         a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n\
         a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\r\n\
         a=rid:f send\r\na=rid:h send\r\na=rid:q send\r\na=simulcast:send f;h;~q\r\n",
    );
    assert_ne!(text, CHROMIUM_OFFER);
    let o = parse_offer(&text).unwrap();
    let v = &o.media[1];
    assert_eq!(v.send_rids, vec!["f", "h", "q"]);
    assert_eq!(v.extmap(EXT_RID), Some(10));
    assert_eq!(
        v.simulcast(),
        Some((vec!["q".into(), "h".into(), "f".into()], 10)),
        "q/h/f name their order: lowest first"
    );
    assert_eq!(o.media[0].simulcast(), None, "audio has no rids");
    // Without the rid extension there is no way to tell the encodings apart.
    let mut no_ext = v.clone();
    no_ext.extmaps.retain(|(id, _)| *id != 10);
    assert_eq!(no_ext.simulcast(), None);
    // Other names keep the offer's order.
    let mut named = v.clone();
    named.send_rids = vec!["lo".into(), "mid".into(), "hi".into()];
    assert_eq!(named.simulcast().unwrap().0, vec!["lo", "mid", "hi"]);
    let media = vec![
        AnswerMedia::Receive {
            codec: o.media[0].publish_codec().unwrap().clone(),
            simulcast: false,
        },
        AnswerMedia::Receive {
            codec: v.publish_codec().unwrap().clone(),
            simulcast: true,
        },
        AnswerMedia::Reject,
    ];
    let answer = answer_for(&o, &media);
    let video = &answer[answer.find("m=video").unwrap()..];
    for want in [
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n",
        "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n",
        "a=rid:f recv\r\na=rid:h recv\r\na=rid:q recv\r\n",
        "a=simulcast:recv f;h;q\r\n",
    ] {
        assert!(video.contains(want), "answer lacks {want:?}:\n{answer}");
    }
    assert!(!video.contains("repaired"), "no RTX: no repaired-rid");
    let audio = &answer[answer.find("m=audio").unwrap()..answer.find("m=video").unwrap()];
    // A plain m-line gets no MID or rid extension; audio keeps its level.
    assert_eq!(
        audio.matches("a=extmap:").collect::<Vec<_>>().len(),
        1,
        "{audio}"
    );
    assert!(audio.contains(EXT_AUDIO_LEVEL), "{audio}");
}

/// AV1's dependency descriptor is answered on AV1 m-lines that offer it (the
/// publisher's and the viewer's), never on other codecs'; `extmap-allow-mixed` is
/// answered where offered (the descriptor's structure needs two-byte extensions).
#[test]
fn the_dependency_descriptor_is_answered_for_av1() {
    let with_dd = CHROMIUM_OFFER.replace(
        "a=mid:1\r\n",
        &format!("a=mid:1\r\na=extmap:13 {EXT_DD}\r\n"),
    );
    let o = parse_offer(&with_dd).unwrap();
    assert!(o.allow_mixed, "Chromium offers two-byte extensions");
    let video = &o.media[1];
    let vp8 = video.publish_codec().unwrap().clone();
    assert_eq!(
        video.dependency_descriptor(&vp8),
        None,
        "VP8 says its layers itself"
    );
    let mut av1 = vp8.clone();
    av1.name = "AV1".into();
    assert_eq!(video.dependency_descriptor(&av1), Some(13));
    let receive = |codec: &Codec| {
        vec![
            AnswerMedia::Reject,
            AnswerMedia::Receive {
                codec: codec.clone(),
                simulcast: false,
            },
            AnswerMedia::Reject,
        ]
    };
    let line = format!("a=extmap:13 {EXT_DD}\r\n");
    assert!(answer_for(&o, &receive(&av1)).contains(&line));
    assert!(!answer_for(&o, &receive(&vp8)).contains(EXT_DD));
    assert!(answer_for(&o, &receive(&av1)).contains("a=extmap-allow-mixed\r\n"));
    let one_byte = parse_offer(&with_dd.replace("a=extmap-allow-mixed\r\n", "")).unwrap();
    assert!(!one_byte.allow_mixed);
    assert!(!answer_for(&one_byte, &receive(&av1)).contains("extmap-allow-mixed"));
}
