//! The SDP answer: ICE-lite, DTLS passive, BUNDLE of the accepted m-lines on one
//! port, each m-line received from a publisher or sent to a subscriber, or refused.

use super::*;

/// How one offered m-line is answered.
#[derive(Debug, Clone)]
pub enum AnswerMedia {
    /// Receive this codec from the publisher; with `simulcast`, those encodings.
    Receive { codec: Codec, simulcast: bool },
    /// Send this codec to the subscriber from `ssrc`, labelled with msid; with `rtx`
    /// (payload type, SSRC), retransmissions go that way (RFC 4588).
    Send {
        codec: Codec,
        ssrc: u32,
        rtx: Option<(u8, u32)>,
        stream_id: String,
        track_id: String,
    },
    /// Refused (port 0).
    Reject,
}

pub struct AnswerParams<'a> {
    pub offer: &'a Offer,
    pub ice_ufrag: &'a str,
    pub ice_pwd: &'a str,
    /// SHA-256 of our DTLS certificate.
    pub fingerprint: &'a [u8],
    pub candidates: &'a [SocketAddr],
    /// ICE-TCP passive candidates (RFC 6544), announced after the UDP ones.
    pub tcp_candidates: &'a [SocketAddr],
    pub media: &'a [AnswerMedia],
    pub cname: &'a str,
}

pub fn fingerprint_hex(digest: &[u8]) -> String {
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The answer: ICE-lite, DTLS passive (we are the DTLS server), BUNDLE of the accepted
/// m-lines on one port, rtcp-mux and reduced-size RTCP, host candidates only.
pub fn build_answer(p: &AnswerParams<'_>) -> String {
    let port = p.candidates.first().map(|c| c.port()).unwrap_or(9);
    let conn_ip = p.candidates.first().map(|c| c.ip());
    let accepted: Vec<&str> = p
        .offer
        .media
        .iter()
        .zip(p.media)
        .filter(|(_, a)| !matches!(a, AnswerMedia::Reject))
        .map(|(m, _)| m.mid.as_str())
        .collect();
    let mut sd = SessionDescription::new_jsep_session_description(false)
        .with_property_attribute("ice-lite".into())
        .with_value_attribute("group".into(), format!("BUNDLE {}", accepted.join(" ")))
        .with_value_attribute("msid-semantic".into(), " WMS *".trim().into());
    // We read both header extension forms and forward packets as sent.
    if p.offer.allow_mixed {
        sd = sd.with_property_attribute("extmap-allow-mixed".into());
    }
    sd.session_name = "edgefwd".into();
    for (om, am) in p.offer.media.iter().zip(p.media) {
        let (codec, direction) = match am {
            AnswerMedia::Receive { codec, .. } => (codec, "recvonly"),
            AnswerMedia::Send { codec, .. } => (codec, "sendonly"),
            AnswerMedia::Reject => {
                let mut md = MediaDescription {
                    media_name: om.media_name.clone(),
                    media_title: None,
                    connection_information: None,
                    bandwidth: vec![],
                    encryption_key: None,
                    attributes: vec![Attribute::new("mid".into(), Some(om.mid.clone()))],
                };
                md.media_name.port = RangedPort {
                    value: 0,
                    range: None,
                };
                sd = sd.with_media(md);
                continue;
            }
        };
        let kind = om.kind.expect("only audio/video m-lines are accepted");
        let mut md = MediaDescription::new_jsep_media_description(kind.as_str().into(), vec![]);
        md.media_name.port = RangedPort {
            value: port as isize,
            range: None,
        };
        if let Some(ip) = conn_ip {
            md.connection_information = Some(ConnectionInformation {
                network_type: "IN".into(),
                address_type: if ip.is_ipv4() { "IP4" } else { "IP6" }.into(),
                address: Some(Address {
                    address: ip.to_string(),
                    ttl: None,
                    range: None,
                }),
            });
        }
        md = md
            .with_value_attribute("mid".into(), om.mid.clone())
            .with_ice_credentials(p.ice_ufrag.into(), p.ice_pwd.into())
            .with_fingerprint("sha-256".into(), fingerprint_hex(p.fingerprint))
            .with_value_attribute("setup".into(), "passive".into())
            .with_property_attribute(direction.into())
            .with_property_attribute("rtcp-mux".into())
            .with_property_attribute("rtcp-rsize".into())
            .with_codec(
                codec.pt,
                codec.name.clone(),
                codec.clock_rate,
                codec.channels,
                codec.fmtp.clone(),
            );
        for fb in codec.answer_feedback() {
            md = md.with_value_attribute("rtcp-fb".into(), format!("{} {fb}", codec.pt));
        }
        if let AnswerMedia::Send { .. } = am
            && codec.remb_only()
        {
            md = md.with_value_attribute("rtcp-fb".into(), format!("{} goog-remb", codec.pt));
        }
        if let AnswerMedia::Receive { .. } = am
            && let Some(id) = om.audio_level()
        {
            md = md.with_value_attribute("extmap".into(), format!("{id} {EXT_AUDIO_LEVEL}"));
        }
        // AV1: the layers of an SVC stream are read from the dependency descriptor,
        // and a viewer's decoder assembles its frames by it: both sides get it (the
        // forwarded packets carry the publisher's).
        if let Some(id) = om.dependency_descriptor(codec) {
            md = md.with_value_attribute("extmap".into(), format!("{id} {EXT_DD}"));
        }
        // Publishers get our transport feedback; viewers send theirs, from which their
        // bandwidth is estimated by delay (each copy carries our transport-wide number).
        if let Some(id) = om.twcc(codec) {
            md = md
                .with_value_attribute("rtcp-fb".into(), format!("{} transport-cc", codec.pt))
                .with_value_attribute("extmap".into(), format!("{id} {EXT_TWCC}"));
        }
        // Simulcast: the MID and rid extensions under the offer's ids, and every rid
        // received, in the offer's order (RFC 8853 §5.3: the answer mirrors it).
        if let AnswerMedia::Receive {
            simulcast: true, ..
        } = am
        {
            for uri in [EXT_MID, EXT_RID] {
                if let Some(id) = om.extmap(uri) {
                    md = md.with_value_attribute("extmap".into(), format!("{id} {uri}"));
                }
            }
            for r in &om.send_rids {
                md = md.with_value_attribute("rid".into(), format!("{r} recv"));
            }
            md = md.with_value_attribute(
                "simulcast".into(),
                format!("recv {}", om.send_rids.join(";")),
            );
        }
        if let AnswerMedia::Send {
            ssrc,
            rtx,
            stream_id,
            track_id,
            ..
        } = am
        {
            if let Some((rtx_pt, rtx_ssrc)) = rtx {
                md = md
                    .with_codec(
                        *rtx_pt,
                        "rtx".into(),
                        codec.clock_rate,
                        0,
                        format!("apt={}", codec.pt),
                    )
                    .with_value_attribute("ssrc-group".into(), format!("FID {ssrc} {rtx_ssrc}"));
            }
            md = md
                .with_value_attribute("msid".into(), format!("{stream_id} {track_id}"))
                .with_value_attribute("ssrc".into(), format!("{ssrc} cname:{}", p.cname))
                .with_value_attribute("ssrc".into(), format!("{ssrc} msid:{stream_id} {track_id}"));
            if let Some((_, rtx_ssrc)) = rtx {
                md = md
                    .with_value_attribute("ssrc".into(), format!("{rtx_ssrc} cname:{}", p.cname))
                    .with_value_attribute(
                        "ssrc".into(),
                        format!("{rtx_ssrc} msid:{stream_id} {track_id}"),
                    );
            }
        }
        for (n, c) in p.candidates.iter().enumerate() {
            // RFC 8445 host priority: type pref 126, local pref by order, component 1.
            let prio = (126u32 << 24) | ((65535 - n as u32) << 8) | 255;
            md = md.with_candidate(format!(
                "{} 1 udp {prio} {} {} typ host",
                n + 1,
                c.ip(),
                c.port()
            ));
        }
        for (n, c) in p.tcp_candidates.iter().enumerate() {
            // Type preference 90: below every UDP host candidate (126), so a browser
            // takes TCP only when UDP fails.
            let prio = (90u32 << 24) | ((65535 - n as u32) << 8) | 255;
            md = md.with_candidate(format!(
                "{} 1 tcp {prio} {} {} typ host tcptype passive",
                p.candidates.len() + n + 1,
                c.ip(),
                c.port()
            ));
        }
        md = md.with_property_attribute("end-of-candidates".into());
        sd = sd.with_media(md);
    }
    sd.marshal()
}
