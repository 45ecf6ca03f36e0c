//! The media engine and its packet operations: SRTP, the fan-out, the NACK cache, RTCP.
//!
//! No sockets and no clock reads here: a data path (an AF_XDP worker, or the socket
//! path; `datapath::engines`) feeds datagrams in with the time, gives the engine a
//! [`Transmit`] to write its copies into, and calls it back when
//! [`engine::Engine::poll_timeout`] says. The control plane (WHIP/WHEP, ICE, DTLS)
//! programs it with [`engine::Command`]s, queued to the engine that holds the room.

pub mod bwe;
pub mod codec;
pub mod demux;
pub mod engine;
pub mod rtcp;
pub mod seq;
pub mod simulcast;
pub mod speaker;
pub mod srtp;
pub mod svc;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Audio,
    Video,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Audio => "audio",
            Kind::Video => "video",
        }
    }
}

/// Where a data path puts the engine's copies. `fill` gets a buffer for one UDP
/// payload to `to` and returns its length, or None to abandon it; `transmit` returns
/// false when the copy could not be queued (socket buffer or TX ring full).
pub trait Transmit {
    fn transmit(
        &mut self,
        to: SocketAddr,
        fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
    ) -> bool;
}

/// Drop reasons on the WebRTC media port, by name. Every datagram that is not
/// delivered is counted under exactly one of these, whichever path handled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Drop {
    /// First byte is none of STUN, DTLS, RTP/RTCP (RFC 7983).
    UnknownProtocol,
    /// STUN that is not a well-formed binding request.
    StunMalformed,
    /// Binding request for a ufrag no session has.
    StunUnknownUfrag,
    /// Integrity or fingerprint check failed, or the remote ufrag is wrong.
    StunUnauthenticated,
    /// DTLS or SRTP from an address no valid ICE check came from.
    UnknownPeer,
    /// DTLS that is not well-framed records, or a malformed ClientHello (the session
    /// stays: such datagrams can be spoofed), or a ClientHello with no common SRTP
    /// profile (which ends the session).
    DtlsMalformed,
    /// SRTP/SRTCP before the handshake finished.
    NotConnected,
    /// SRTP/SRTCP whose authentication tag is wrong (forged or corrupted).
    SrtpAuth,
    /// SRTP/SRTCP already received, or older than the replay window.
    SrtpReplay,
    /// SRTP/SRTCP too short for its header and tag.
    SrtpTruncated,
    /// RTP header malformed after decryption.
    RtpMalformed,
    /// RTP with an SSRC/payload type the offer did not announce.
    UnknownSsrc,
    /// RTP from a subscriber (they only send RTCP).
    UnexpectedRtp,
    /// RTCP that does not parse.
    RtcpMalformed,
    /// The copy could not be queued (socket buffer or TX ring full, or larger than a frame).
    SendFailed,
    /// Lost in the kernel: the media socket's receive queue was full (SO_RXQ_OVFL).
    SocketOverflow,
    /// Received on one AF_XDP queue for a room another worker's engine owns, whose
    /// hand-off queue was full (that worker's core is overloaded).
    HandoffFull,
    /// A copy or report past the SRTP indices persisted for its stream (restart
    /// safety: the writer of the high-water marks fell behind).
    SrtpUnreserved,
}

impl Drop {
    pub const ALL: [Drop; 18] = [
        Drop::UnknownProtocol,
        Drop::StunMalformed,
        Drop::StunUnknownUfrag,
        Drop::StunUnauthenticated,
        Drop::UnknownPeer,
        Drop::DtlsMalformed,
        Drop::NotConnected,
        Drop::SrtpAuth,
        Drop::SrtpReplay,
        Drop::SrtpTruncated,
        Drop::RtpMalformed,
        Drop::UnknownSsrc,
        Drop::UnexpectedRtp,
        Drop::RtcpMalformed,
        Drop::SendFailed,
        Drop::SocketOverflow,
        Drop::HandoffFull,
        Drop::SrtpUnreserved,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Drop::UnknownProtocol => "unknown_protocol",
            Drop::StunMalformed => "stun_malformed",
            Drop::StunUnknownUfrag => "stun_unknown_ufrag",
            Drop::StunUnauthenticated => "stun_unauthenticated",
            Drop::UnknownPeer => "unknown_peer",
            Drop::DtlsMalformed => "dtls_malformed",
            Drop::NotConnected => "not_connected",
            Drop::SrtpAuth => "srtp_auth",
            Drop::SrtpReplay => "srtp_replay",
            Drop::SrtpTruncated => "srtp_truncated",
            Drop::RtpMalformed => "rtp_malformed",
            Drop::UnknownSsrc => "unknown_ssrc",
            Drop::UnexpectedRtp => "unexpected_rtp",
            Drop::RtcpMalformed => "rtcp_malformed",
            Drop::SendFailed => "send_failed",
            Drop::SocketOverflow => "socket_overflow",
            Drop::HandoffFull => "handoff_full",
            Drop::SrtpUnreserved => "srtp_unreserved",
        }
    }

    /// The drop for an SRTP refusal.
    pub fn from_srtp(e: srtp::Error) -> Drop {
        match e {
            srtp::Error::Auth => Drop::SrtpAuth,
            srtp::Error::Replay => Drop::SrtpReplay,
            srtp::Error::Truncated => Drop::SrtpTruncated,
            // Only our own sends can hit these; a receive never does.
            srtp::Error::NoRoom | srtp::Error::TooManyStreams | srtp::Error::KeyLength => {
                Drop::SendFailed
            }
            srtp::Error::Unreserved => Drop::SrtpUnreserved,
        }
    }
}

/// The WebRTC port's counters, shared by the control plane and the engine.
#[derive(Default)]
pub struct Counters {
    pub drops: [AtomicU64; Drop::ALL.len()],
    pub stun_answered: AtomicU64,
    /// Checks of sessions this node no longer has, answered with a signed 400 so the
    /// client rejoins (each also counted as `stun_unknown_ufrag`).
    pub stun_refused: AtomicU64,
    /// Other nodes' RTT probes answered (signed with the cluster's probe password).
    pub stun_probes: AtomicU64,
    pub rtp_in: AtomicU64,
    pub rtp_out: AtomicU64,
    /// Trunk copies to downstream nodes (ciphertext as received).
    pub relay_out: AtomicU64,
    pub rtcp_in: AtomicU64,
    pub rtcp_out: AtomicU64,
    pub nack_resent: AtomicU64,
    /// Transport feedback packets sent to publishers (transport-cc).
    pub transport_feedback: AtomicU64,
    /// Viewers moved a layer up to find room (bandwidth probes), and those that
    /// caused loss and were taken back.
    pub bwe_probes: AtomicU64,
    pub bwe_failed_probes: AtomicU64,
    /// Viewers' paths seen over-used by the delay-based estimate (a queue building).
    pub bwe_delay_overuses: AtomicU64,
    /// Padding-only packets sent to probe a viewer's path before moving it up.
    pub bwe_padding: AtomicU64,
    /// Changes of a room's dominant speaker.
    pub speaker_changes: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub dtls_handshakes: AtomicU64,
    /// DTLS connections whose tasks are alive (a gauge): one per session that got past
    /// its ClientHello; a finished session's must go to 0.
    pub dtls_conns: Arc<AtomicU64>,
    /// ClientHellos that spanned more than one datagram (post-quantum key shares).
    pub dtls_fragmented_hellos: AtomicU64,
}

impl Counters {
    pub fn count(&self, why: Drop) {
        self.drops[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, why: Drop) -> u64 {
        self.drops[why as usize].load(Ordering::Relaxed)
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
