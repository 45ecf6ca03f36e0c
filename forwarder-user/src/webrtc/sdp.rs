//! SDP offer reading and answer writing for WHIP (publish) and WHEP (subscribe).
//!
//! The sdp crate parses and marshals; this module decides: which codec each m-line
//! gets, which m-lines are refused, and what the answer says about ICE-lite, DTLS and
//! the one media port. Offers are read here; answers are written in [`answer`].

use std::{fmt, io::Cursor, net::SocketAddr};

use sdp::{
    SessionDescription,
    description::{
        common::{Address, Attribute, ConnectionInformation},
        media::{MediaDescription, RangedPort},
    },
};

/// Why an offer cannot be answered. Each message says what the client must change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferError {
    /// Not parseable SDP at all.
    Syntax(String),
    /// A required attribute is missing.
    Missing(&'static str),
    /// Nothing in the offer that we can carry.
    NoUsableMedia,
    /// A codec the client requires that we (or the publisher) cannot provide.
    Unsupported(String),
}

impl fmt::Display for OfferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OfferError::Syntax(e) => write!(
                f,
                "the body is not valid SDP ({e}); send the offer from RTCPeerConnection.createOffer()"
            ),
            OfferError::Missing(what) => write!(
                f,
                "the offer has no {what}; WebRTC offers must carry it (RFC 8829)"
            ),
            OfferError::NoUsableMedia => write!(
                f,
                "the offer has no audio or video m-line with a supported codec (Opus; VP8, H264 packetization-mode=1, VP9, AV1)"
            ),
            OfferError::Unsupported(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for OfferError {}

pub use crate::media::Kind;

/// One payload type of an m-line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Codec {
    pub pt: u8,
    pub name: String,
    pub clock_rate: u32,
    pub channels: u16,
    pub fmtp: String,
    pub feedback: Vec<String>,
}

impl Codec {
    fn fmtp_param(&self, key: &str) -> Option<&str> {
        self.fmtp.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            k.eq_ignore_ascii_case(key).then_some(v.trim())
        })
    }

    /// Whether media encoded for `self` decodes at a receiver that negotiated `other`.
    pub fn compatible(&self, other: &Codec) -> bool {
        if !self.name.eq_ignore_ascii_case(&other.name) || self.clock_rate != other.clock_rate {
            return false;
        }
        match self.name.to_ascii_uppercase().as_str() {
            "H264" => {
                let mode = |c: &Codec| {
                    c.fmtp_param("packetization-mode")
                        .unwrap_or("0")
                        .to_string()
                };
                // profile_idc + constraint flags; the level may differ (the decoder
                // handles lower levels and Chromium offers one level per profile).
                let profile = |c: &Codec| {
                    c.fmtp_param("profile-level-id")
                        .unwrap_or("42e01f")
                        .get(..4)
                        .unwrap_or("")
                        .to_ascii_lowercase()
                };
                mode(self) == mode(other) && profile(self) == profile(other)
            }
            "VP9" => {
                let p = |c: &Codec| c.fmtp_param("profile-id").unwrap_or("0").to_string();
                p(self) == p(other)
            }
            "AV1" => {
                let p = |c: &Codec| c.fmtp_param("profile").unwrap_or("0").to_string();
                p(self) == p(other)
            }
            _ => true,
        }
    }

    /// Codecs the forwarder carries: media is relayed, never decoded, so this is
    /// about what both ends can agree on and what keyframe requests work for.
    fn supported(&self, kind: Kind) -> bool {
        let name = self.name.to_ascii_uppercase();
        match kind {
            Kind::Audio => name == "OPUS" && self.clock_rate == 48000,
            Kind::Video => match name.as_str() {
                "VP8" | "VP9" | "AV1" => self.clock_rate == 90000,
                // Mode 0 sends one NAL unit per packet and needs no FU-A support,
                // but Chromium never sends large frames that way; mode 1 is what works.
                "H264" => {
                    self.clock_rate == 90000 && self.fmtp_param("packetization-mode") == Some("1")
                }
                _ => false,
            },
        }
    }

    /// Whether a viewer's codec offers REMB and not transport-cc: its own bandwidth
    /// estimate is then answered and acted on. One that offers both (Chromium) sends a
    /// receive-side estimate anyway, but it trails what arrives and would cut every
    /// probe up short: shown, not acted on.
    pub fn remb_only(&self) -> bool {
        let offers = |fb: &str| self.feedback.iter().any(|f| f == fb);
        offers("goog-remb") && !offers("transport-cc")
    }

    /// Feedback the forwarder answers: NACK (from the packet cache), PLI, FIR.
    /// transport-cc is answered where the extension is offered too (see
    /// [`OfferMedia::twcc`]), goog-remb only to viewers without transport-cc.
    fn answer_feedback(&self) -> Vec<String> {
        self.feedback
            .iter()
            .filter(|f| matches!(f.as_str(), "nack" | "nack pli" | "ccm fir"))
            .cloned()
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

/// One m-line of an offer.
#[derive(Debug, Clone)]
pub struct OfferMedia {
    pub mid: String,
    /// None for m-lines that are not audio/video (data channels): always refused.
    pub kind: Option<Kind>,
    pub direction: Direction,
    pub codecs: Vec<Codec>,
    /// Media SSRCs (a=ssrc), without the RTX/FEC members of ssrc-groups.
    pub ssrcs: Vec<u32>,
    /// Header extensions offered (a=extmap): (id, URI).
    pub extmaps: Vec<(u8, String)>,
    /// Simulcast encodings the client sends (RFC 8853 a=simulcast:send, RFC 8851
    /// a=rid), in the offer's order; paused ones (~) included.
    pub send_rids: Vec<String>,
    /// Kept to write the refusal: the m-line's media name and formats.
    media_name: sdp::description::media::MediaName,
}

/// What an offer says that the answer and the transport need.
#[derive(Debug, Clone)]
pub struct Offer {
    pub ice_ufrag: String,
    pub ice_pwd: String,
    /// (hash function, digest bytes) from a=fingerprint.
    pub fingerprint: (String, Vec<u8>),
    pub media: Vec<OfferMedia>,
    /// RFC 8285 §6 `a=extmap-allow-mixed`: two-byte header extensions may come
    /// (AV1's dependency descriptor needs them for its template structure).
    pub allow_mixed: bool,
}

fn attr<'a>(
    session: &'a SessionDescription,
    m: &'a MediaDescription,
    key: &str,
) -> Option<&'a str> {
    m.attribute(key)
        .flatten()
        .or_else(|| session.attribute(key).map(|s| s.as_str()))
}

pub fn parse_offer(text: &str) -> Result<Offer, OfferError> {
    let sd = SessionDescription::unmarshal(&mut Cursor::new(text.as_bytes()))
        .map_err(|e| OfferError::Syntax(e.to_string()))?;
    let first = sd
        .media_descriptions
        .first()
        .ok_or(OfferError::NoUsableMedia)?;
    let ice_ufrag = attr(&sd, first, "ice-ufrag")
        .ok_or(OfferError::Missing("a=ice-ufrag"))?
        .to_string();
    let ice_pwd = attr(&sd, first, "ice-pwd")
        .ok_or(OfferError::Missing("a=ice-pwd"))?
        .to_string();
    let fp = attr(&sd, first, "fingerprint").ok_or(OfferError::Missing("a=fingerprint"))?;
    let (alg, hex) = fp
        .split_once(' ')
        .ok_or(OfferError::Missing("a=fingerprint hash and value"))?;
    let digest = hex
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| {
            OfferError::Syntax(format!(
                "a=fingerprint value {hex:?} is not colon-separated hex"
            ))
        })?;
    let mut media = Vec::new();
    for (i, m) in sd.media_descriptions.iter().enumerate() {
        let kind = match m.media_name.media.as_str() {
            "audio" => Some(Kind::Audio),
            "video" => Some(Kind::Video),
            _ => None,
        };
        let mid = m
            .attribute("mid")
            .flatten()
            .map(str::to_string)
            .unwrap_or_else(|| i.to_string());
        let direction = if m.has_attribute("sendonly") {
            Direction::SendOnly
        } else if m.has_attribute("recvonly") {
            Direction::RecvOnly
        } else if m.has_attribute("inactive") {
            Direction::Inactive
        } else {
            Direction::SendRecv
        };
        let mut codecs = Vec::new();
        for f in &m.media_name.formats {
            let Ok(pt) = f.parse::<u8>() else { continue };
            let prefix = format!("{pt} ");
            let values = |key: &str| {
                m.attributes
                    .iter()
                    .filter(move |a| a.key == key)
                    .filter_map(|a| a.value.as_deref())
                    .filter_map(|v| v.strip_prefix(prefix.as_str()).map(str::to_string))
                    .collect::<Vec<_>>()
            };
            let Some(rtpmap) = values("rtpmap").into_iter().next() else {
                continue;
            };
            let mut parts = rtpmap.split('/');
            let name = parts.next().unwrap_or_default().to_string();
            let clock_rate = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            let channels = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            codecs.push(Codec {
                pt,
                name,
                clock_rate,
                channels,
                fmtp: values("fmtp").into_iter().next().unwrap_or_default(),
                feedback: values("rtcp-fb"),
            });
        }
        // RTX/FEC SSRCs are the non-first members of ssrc-groups: not media.
        let secondary: Vec<u32> = m
            .attributes
            .iter()
            .filter(|a| a.key == "ssrc-group")
            .filter_map(|a| a.value.as_deref())
            .flat_map(|v| {
                v.split_whitespace()
                    .skip(2)
                    .filter_map(|s| s.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        let mut ssrcs = Vec::new();
        for a in m.attributes.iter().filter(|a| a.key == "ssrc") {
            if let Some(s) = a
                .value
                .as_deref()
                .and_then(|v| v.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                && !secondary.contains(&s)
                && !ssrcs.contains(&s)
            {
                ssrcs.push(s);
            }
        }
        let extmaps = m
            .attributes
            .iter()
            .filter(|a| a.key == "extmap")
            .filter_map(|a| {
                let mut it = a.value.as_deref()?.split_whitespace();
                // "<id>[/<direction>] <uri> [attributes]"
                let id = it.next()?.split('/').next()?.parse().ok()?;
                Some((id, it.next()?.to_string()))
            })
            .collect();
        media.push(OfferMedia {
            mid,
            kind,
            direction,
            codecs,
            ssrcs,
            extmaps,
            send_rids: send_rids(m),
            media_name: m.media_name.clone(),
        });
    }
    let allow_mixed = sd.attributes.iter().any(|a| a.key == "extmap-allow-mixed")
        || sd
            .media_descriptions
            .iter()
            .any(|m| m.attribute("extmap-allow-mixed").is_some());
    Ok(Offer {
        ice_ufrag,
        ice_pwd,
        fingerprint: (alg.to_ascii_lowercase(), digest),
        media,
        allow_mixed,
    })
}

/// The rids of `a=simulcast:send` (first alternative of each, `~` dropped), else of the
/// `a=rid:<id> send` lines.
fn send_rids(m: &MediaDescription) -> Vec<String> {
    let simulcast = m.attribute("simulcast").flatten().and_then(|v| {
        let mut it = v.split_whitespace();
        while let Some(dir) = it.next() {
            let list = it.next()?;
            if dir == "send" {
                return Some(list);
            }
        }
        None
    });
    let rid = |alt: &str| alt.trim_start_matches('~').to_string();
    match simulcast {
        Some(list) => list
            .split(';')
            .filter_map(|stream| stream.split(',').next())
            .map(rid)
            .filter(|r| !r.is_empty())
            .collect(),
        None => m
            .attributes
            .iter()
            .filter(|a| a.key == "rid")
            .filter_map(|a| {
                let mut it = a.value.as_deref()?.split_whitespace();
                let (id, dir) = (it.next()?, it.next()?);
                (dir == "send").then(|| id.to_string())
            })
            .collect(),
    }
}

/// RFC 8852 header extensions: the m-line's MID and an encoding's RtpStreamId.
pub const EXT_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
pub const EXT_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
/// RFC 6464: the audio level of each packet, for the room's active speaker.
pub const EXT_AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
/// Transport-wide sequence numbers (draft-holmer-rmcat-transport-wide-cc-extensions).
pub const EXT_TWCC: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// AV1's dependency descriptor (AV1 RTP spec, appendix A): which spatial and temporal
/// layer each packet carries, where each layer's frame starts and ends.
pub const EXT_DD: &str =
    "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension";

impl OfferMedia {
    /// The dependency descriptor extension's id, on an m-line whose codec is AV1
    /// (the only one that needs it to say its layers).
    pub fn dependency_descriptor(&self, codec: &Codec) -> Option<u8> {
        self.extmap(EXT_DD)
            .filter(|_| codec.name.eq_ignore_ascii_case("AV1"))
    }

    /// The offered id of header extension `uri`.
    pub fn extmap(&self, uri: &str) -> Option<u8> {
        self.extmaps
            .iter()
            .find(|(_, u)| u == uri)
            .map(|(id, _)| *id)
    }

    /// The transport-wide sequence number extension's id, when the offer has both it
    /// and `transport-cc` feedback for `codec`. A publisher's: the SFU reports every
    /// packet's arrival to it (transport feedback), so its own congestion controller
    /// can raise its rate (without, Chromium stays near its start rate and holds back
    /// its top simulcast encodings). A viewer's: the SFU numbers every copy to it and
    /// estimates its bandwidth from the arrival times it reports back.
    pub fn twcc(&self, codec: &Codec) -> Option<u8> {
        codec
            .feedback
            .iter()
            .any(|f| f == "transport-cc")
            .then(|| self.extmap(EXT_TWCC))
            .flatten()
    }

    /// The audio level extension's id on an audio m-line that offers it.
    pub fn audio_level(&self) -> Option<u8> {
        self.extmap(EXT_AUDIO_LEVEL)
            .filter(|_| self.kind == Some(Kind::Audio))
    }

    /// A publisher's simulcast encodings, lowest quality first, and the rid header
    /// extension's id; None for a plain m-line. The order is the offer's unless the
    /// rids are the common q/h/f (quarter, half, full), which say their order.
    pub fn simulcast(&self) -> Option<(Vec<String>, u8)> {
        if self.send_rids.len() < 2 {
            return None;
        }
        let ext = self.extmap(EXT_RID)?;
        let mut rids = self.send_rids.clone();
        let rank = |r: &String| ["q", "h", "f"].iter().position(|x| x == r);
        if rids.iter().all(|r| rank(r).is_some()) {
            rids.sort_by_key(rank);
        }
        rids.truncate(crate::media::engine::MAX_LAYERS);
        Some((rids, ext))
    }

    /// The codec a publisher's m-line is received with: the first supported one in the
    /// client's order (the client's preference, e.g. from setCodecPreferences).
    pub fn publish_codec(&self) -> Option<&Codec> {
        let kind = self.kind?;
        if !matches!(self.direction, Direction::SendOnly | Direction::SendRecv) {
            return None;
        }
        self.codecs.iter().find(|c| c.supported(kind))
    }

    /// The codec a receiving m-line with no track yet is answered with: its first one
    /// we carry. A track published later fills it if its codec is compatible.
    pub fn reserve_codec(&self) -> Option<&Codec> {
        let kind = self.kind?;
        if !matches!(self.direction, Direction::RecvOnly | Direction::SendRecv) {
            return None;
        }
        self.codecs.iter().find(|c| c.supported(kind))
    }

    /// The subscriber's payload type for a publisher's codec.
    pub fn subscribe_codec(&self, published: &Codec) -> Option<&Codec> {
        if !matches!(self.direction, Direction::RecvOnly | Direction::SendRecv) {
            return None;
        }
        self.codecs.iter().find(|c| published.compatible(c))
    }

    /// The payload type of the RTX (RFC 4588) codec this receiving m-line offers for
    /// payload type `pt` (`a=fmtp:N apt=pt`): retransmissions to it then go on their
    /// own SSRC and sequence, so its loss and jitter statistics stay the media's.
    pub fn rtx_for(&self, pt: u8) -> Option<u8> {
        if self.kind != Some(Kind::Video) {
            return None;
        }
        self.codecs
            .iter()
            .find(|c| {
                c.name.eq_ignore_ascii_case("rtx")
                    && c.fmtp_param("apt").and_then(|a| a.parse::<u8>().ok()) == Some(pt)
            })
            .map(|c| c.pt)
    }
}

mod answer;
pub use answer::{AnswerMedia, AnswerParams, build_answer, fingerprint_hex};

#[cfg(test)]
mod tests;
