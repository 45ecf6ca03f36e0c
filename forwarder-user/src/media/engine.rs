//! The sans-I/O media engine: SRTP in, fan-out with rewrite and per-subscriber
//! protect out, NACKs answered from a cache, keyframe requests throttled and passed
//! on, sender and receiver reports once a second.
//!
//! One engine owns a set of sessions whole (a room is never split between engines),
//! so a stream's packets and every copy of them are handled on one core without a
//! lock shared with other cores. The control plane programs it with [`Command`]s; the
//! data path calls [`Engine::handle_srtp`] per datagram and [`Engine::handle_timeout`]
//! at [`Engine::poll_timeout`]. Nothing here reads a clock or touches a socket.
//!
//! The forwarding model: a subscriber's [`DownTrack`] carries its rewrite as the
//! data plane's own [`RouteValue`] (SSRC out, sequence and timestamp offsets, payload
//! type map) and is applied with the one [`forwarder_common::rtp::rewrite`] every
//! path uses; the subscriber's SRTP keys are its session's. There is no second copy.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use forwarder_common::{
    routes::{FLAG_REWRITE_PT, RouteValue},
    rtp,
};

use interceptor::twcc;

use super::{
    Counters, Drop, Kind, Transmit, bump, bwe,
    codec::{DdStructure, DependencyDescriptor, Format, LayerIds, Vp8Descriptor},
    demux::Demux,
    rtcp::{self, Reception, Request},
    simulcast::{Continuation, Layer, Layering, Out, Packet, UNCAPPED},
    speaker::Levels,
    srtp::{self, MasterKey},
    svc::Seen,
};

/// Engine handles, chosen by the control plane so commands need no round trip.
pub type SessionId = u32;
pub type TrackId = u32;

/// Publisher packets kept per video track for retransmission (~2 s of 720p video).
pub const CACHE: usize = 512;
/// At most one keyframe request per track in this interval, however many ask.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(300);
/// How often sender and receiver reports go out.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Transport feedback to publishers: libwebrtc's receive side sends it every 50–250 ms
/// depending on rate; 100 ms keeps its delay-based estimate responsive.
pub const FEEDBACK_INTERVAL: Duration = Duration::from_millis(100);

/// Moves a periodic deadline on by `every`, on a fixed schedule: the caller's timer
/// fires a little late each time, and `now + every` would then drift and lower the
/// rate. A deadline far behind (a stalled caller) restarts from now.
fn advance(deadline: &mut Instant, every: Duration, now: Instant) {
    *deadline += every;
    if *deadline <= now {
        *deadline = now + every;
    }
}
/// A simulcast encoding with no packet for this long is not chosen for anyone (the
/// publisher stopped it: bandwidth, CPU, or it was never sent).
pub const LAYER_IDLE: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Publisher,
    Subscriber,
    /// A downstream edgefwd node fed a publisher's tracks over a cascade trunk: it
    /// gets the publisher's SRTP as it arrived (no crypto here) and sends back RTCP
    /// (keyframe requests, NACKs) protected with a key of its own.
    Relay,
}

/// What the control plane tells the engine.
#[derive(Debug)]
pub enum Command {
    AddSession {
        id: SessionId,
        role: Role,
        /// Our SSRC in RTCP we originate towards this peer.
        rtcp_ssrc: u32,
    },
    /// A valid ICE check came from `addr`: media from it is this session's; with
    /// `nominated`, media to the session goes there.
    Bind {
        id: SessionId,
        addr: SocketAddr,
        nominated: bool,
    },
    /// DTLS finished (or renegotiated): the session's SRTP keys, receive and send.
    SetKeys {
        id: SessionId,
        rx: MasterKey,
        tx: MasterKey,
        /// A session that outlives its process sends only under persisted indices.
        reserve: Option<Reserve>,
    },
    /// More SRTP indices session `id` may send under, persisted first.
    Reserve {
        id: SessionId,
        up_to: crate::media::srtp::Marks,
    },
    /// Session `id` is no longer kept for a next process (its record is gone): it
    /// sends without reservations.
    Unkeep {
        id: SessionId,
    },
    AddTrack {
        id: TrackId,
        session: SessionId,
        kind: Kind,
        pt: u8,
        clock_rate: u32,
        format: Format,
        /// One per encoding, lowest quality first: (rid, SSRC). A plain track has one,
        /// without rid; its SSRC from a=ssrc, else learned from the first packet of the
        /// track's payload type. A simulcast encoding's SSRC is learned from the
        /// rtp-stream-id header extension (`rid_ext`).
        streams: Vec<(Option<String>, Option<u32>)>,
        rid_ext: Option<u8>,
        /// The transport-wide sequence number extension's id: the engine then sends
        /// the publisher transport feedback (one recorder per session: the sequence
        /// is transport-wide, and every m-line of a BUNDLE uses the same id).
        twcc_ext: Option<u8>,
        /// The RFC 6464 audio level extension's id (audio): the track's loudness is
        /// kept for the room's active speaker.
        level_ext: Option<u8>,
        /// AV1's dependency descriptor extension's id: the layers of an SVC stream.
        dd_ext: Option<u8>,
    },
    AddDownTrack {
        track: TrackId,
        sub: SessionId,
        ssrc_out: u32,
        pt_out: u8,
        /// RTX (RFC 4588) payload type, SSRC and first sequence number, where the
        /// subscriber negotiated it.
        rtx: Option<(u8, u32, u16)>,
        /// Whether its REMB bounds its layer (negotiated REMB, no transport-cc).
        remb: bool,
        /// AV1: the dependency descriptor's id the subscriber negotiated, if any.
        dd_ext: Option<u8>,
        /// The transport-wide sequence number extension's id the subscriber
        /// negotiated with transport-cc: its copies are numbered and its feedback
        /// read (one numbering per session: every m-line of a BUNDLE has the same id).
        twcc_ext: Option<u8>,
        seq_delta: u16,
        ts_delta: u32,
        /// Numbering from a persisted start instead (the deltas are then set at the
        /// first packet, as at a switch).
        resume: Option<Resume>,
    },
    RemoveSession {
        id: SessionId,
    },
    /// A cascade peer at `addr` (one address carries many sessions): its datagrams
    /// are this session's when their SSRC (RTP) or sender SSRC (RTCP) is one of
    /// `ssrcs`; media to the session goes to `addr`.
    BindRelay {
        id: SessionId,
        addr: SocketAddr,
        ssrcs: Vec<u32>,
    },
    /// Trunk copies of `track` to the relay session `relay`: the SRTP packet as the
    /// publisher sent it, once it authenticated here.
    AddTrunk {
        track: TrackId,
        relay: SessionId,
    },
    /// A subscriber's caps on its down-track of `track`: the simulcast encoding (or
    /// a scalable stream's spatial layer) and the temporal layer, and whether it is
    /// paused (a resumed one restarts at a keyframe).
    SetLayers {
        sub: SessionId,
        track: TrackId,
        max_layer: Layer,
        max_temporal: Layer,
        paused: bool,
    },
    /// The highest encoding of `track` the node behind trunk `relay` wants
    /// ([`crate::media::simulcast::UNCAPPED`]: all).
    SetTrunkLayers {
        track: TrackId,
        relay: SessionId,
        max_layer: Layer,
    },
    /// Continues receive streams another node (or process) has been authenticating:
    /// per SSRC the highest packet index it accepted (so a rollover counter above 0
    /// carries over), and per sender the highest SRTCP index.
    ResumeRx {
        id: SessionId,
        streams: Vec<(u32, u64)>,
        rtcp: Vec<(u32, u64)>,
    },
}

impl Command {
    /// The session the command is about. A control plane running several engines
    /// hands each command to the engine that holds this session (and so its room).
    pub fn session(&self) -> SessionId {
        match self {
            Command::AddSession { id, .. }
            | Command::Bind { id, .. }
            | Command::SetKeys { id, .. }
            | Command::RemoveSession { id }
            | Command::BindRelay { id, .. }
            | Command::ResumeRx { id, .. }
            | Command::Reserve { id, .. }
            | Command::Unkeep { id } => *id,
            Command::AddTrack { session, .. } => *session,
            Command::AddDownTrack { sub, .. } | Command::SetLayers { sub, .. } => *sub,
            Command::AddTrunk { relay, .. } | Command::SetTrunkLayers { relay, .. } => *relay,
        }
    }
}

/// A track a publisher sends, with everything the fan-out needs of it.
pub struct UpTrack {
    pub session: SessionId,
    pub kind: Kind,
    pub pt: u8,
    pub clock_rate: u32,
    pub format: Format,
    /// Its encodings, lowest quality first: one for a plain track, up to three with
    /// simulcast. Each is its own RTP stream.
    pub streams: Vec<Stream>,
    rid_ext: Option<u8>,
    /// Audio: the audio level extension's id and the recent levels it carried.
    level_ext: Option<u8>,
    pub levels: Levels,
    /// AV1: the dependency descriptor extension's id.
    dd_ext: Option<u8>,
    pub downs: Vec<DownTrack>,
    /// Relay sessions (downstream nodes) this track's ciphertext is copied to.
    pub trunks: Vec<SessionId>,
    /// Per trunk, the highest encoding its node wants (absent: all): an encoding no
    /// viewer below watches does not cross the trunk.
    pub trunk_caps: HashMap<SessionId, Layer>,
}

/// One encoding of a track: its own SSRC, sequence space, reports and cache.
pub struct Stream {
    pub rid: Option<String>,
    pub ssrc: Option<u32>,
    pub packets: u64,
    pub bytes: u64,
    last_packet: Option<Instant>,
    /// Bits/s received over the last report interval, and the byte count and time it
    /// was measured from.
    pub rate_bps: u64,
    rate_mark: (u64, Instant),
    pub reception: Reception,
    /// Last SR of this source: (NTP, RTP, arrival), to carry lip sync to subscribers.
    last_sr: Option<(u64, u32, Instant)>,
    last_keyframe_request: Option<Instant>,
    /// Plaintext packets by source sequence number (video only).
    cache: Vec<Option<(u16, Vec<u8>)>>,
    /// Its spatial and temporal layers (a scalable stream: VP9 SVC, VP8 with
    /// temporal layers).
    pub seen: Seen,
    /// AV1: the template structure of its last keyframe's dependency descriptor.
    dd: Option<DdStructure>,
}

impl UpTrack {
    /// The SSRC of a plain track (the first encoding's for simulcast).
    pub fn ssrc(&self) -> Option<u32> {
        self.streams.first().and_then(|s| s.ssrc)
    }

    /// RTP packets and bytes received, every encoding together.
    pub fn totals(&self) -> (u64, u64) {
        self.streams
            .iter()
            .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes))
    }

    fn layer_of(&self, ssrc: u32) -> Option<Layer> {
        self.streams
            .iter()
            .position(|s| s.ssrc == Some(ssrc))
            .map(|i| i as Layer)
    }

    /// Which encodings are being received now.
    fn active(&self, now: Instant) -> [bool; MAX_LAYERS] {
        let mut a = [false; MAX_LAYERS];
        for (i, s) in self.streams.iter().take(MAX_LAYERS).enumerate() {
            a[i] = s.last_packet.is_some_and(|at| now - at < LAYER_IDLE);
        }
        a
    }
}

/// Simulcast encodings per track we take (Chromium and OBS send up to three).
pub const MAX_LAYERS: usize = 3;

/// What one subscriber receives of one track.
pub struct DownTrack {
    pub sub: SessionId,
    /// The rewrite half of a data-plane route; the addressing half is the subscriber
    /// session's bound 5-tuple. Its deltas move only at a layer switch or a resume.
    pub route: RouteValue,
    /// Which encoding it gets, the cap, pause, and the numbering across switches.
    pub layering: Layering,
    pub packets: u32,
    pub octets: u32,
    pub nack_resent: u64,
    /// RTX: payload type, SSRC and the next RTX sequence number.
    pub rtx: Option<(u8, u32, u16)>,
    /// What the subscriber's receiver reports say of this stream.
    pub quality: rtcp::Quality,
    /// Its bandwidth as loss says, and the layer limit that follows (simulcast).
    pub bwe: bwe::LossBased,
    /// AV1: the dependency descriptor's id (publisher's, subscriber's) where they differ.
    dd_rename: Option<(u8, u8)>,
    /// AV1 without the dependency descriptor: spatial layer 0 only.
    one_spatial: bool,
    last_ts_out: u32,
    last_out_at: Option<Instant>,
}

impl DownTrack {
    pub fn ssrc_out(&self) -> u32 {
        u32::from_be_bytes(self.route.ssrc_out_be)
    }

    /// The encoding it is on (the first until a keyframe started it anywhere).
    pub fn layer(&self) -> Layer {
        self.layering.current.unwrap_or(0)
    }

    /// Where it stands, for the next down-track on its SSRC (its track, of
    /// `clock_rate`, ended).
    fn ended(&self, clock_rate: u32) -> Ended {
        Ended {
            numbering: self.layering.continuation(clock_rate),
            packets: self.packets,
            octets: self.octets,
            rtx: self.rtx.map(|(_, ssrc, seq)| (ssrc, seq)),
            last_ts_out: self.last_ts_out,
            last_out_at: self.last_out_at,
        }
    }

    /// Continues an ended down-track of the same SSRC: its numbering from the first
    /// packet on, its sender-report counts, and its RTX numbering if the RTX SSRC is
    /// the same (this track's clock: `clock_rate`).
    fn continue_from(&mut self, e: Ended, clock_rate: u32) {
        if let Some(n) = e.numbering {
            self.layering.continue_from(n, clock_rate);
        }
        (self.packets, self.octets) = (e.packets, e.octets);
        (self.last_ts_out, self.last_out_at) = (e.last_ts_out, e.last_out_at);
        if let (Some((_, ssrc, seq)), Some((old_ssrc, next))) = (self.rtx.as_mut(), e.rtx)
            && *ssrc == old_ssrc
        {
            *seq = next;
        }
    }
}

struct Srtp {
    rx: srtp::Context,
    tx: srtp::Context,
    /// The receive master key, kept for a cascade handover (never logged: its Debug
    /// is redacted).
    rx_key: MasterKey,
}

struct Session {
    role: Role,
    rtcp_ssrc: u32,
    addrs: Vec<SocketAddr>,
    nominated: Option<SocketAddr>,
    srtp: Option<Srtp>,
    /// Publisher: its tracks. Subscriber: the tracks it has a down-track of.
    tracks: Vec<TrackId>,
    /// Publisher: the transport-wide sequence extension's id and the arrivals since
    /// the last transport feedback.
    twcc: Option<(u8, twcc::Recorder)>,
    /// Subscriber: the numbering of what we send it and what its feedback says.
    twcc_out: Option<TwccOut>,
    /// Subscriber: per SSRC of a down-track whose publisher left, where it stood: the
    /// track that refills the m-line (same SSRC) continues it.
    ended: HashMap<u32, Ended>,
}

/// A down-track whose publisher left, as the next one on its SSRC continues it.
struct Ended {
    numbering: Option<Continuation>,
    packets: u32,
    octets: u32,
    /// RTX SSRC and its next sequence number.
    rtx: Option<(u32, u16)>,
    last_ts_out: u32,
    last_out_at: Option<Instant>,
}

/// Padding octets per padding-only packet (the count is one octet; libwebrtc's 224).
const PADDING: usize = 224;

/// Sends remembered for a viewer's transport feedback (a few seconds' worth).
const TWCC_HISTORY: usize = 4096;

/// A viewer's transport-wide numbering: each copy carries the next number in the
/// viewer's extension id, and its send time and size are kept until its feedback
/// says when it arrived.
pub struct TwccOut {
    ext: u8,
    next: u16,
    sent: Vec<Option<(u16, i64, u32)>>,
    pub delay: bwe::DelayBased,
}

impl TwccOut {
    fn new(ext: u8) -> TwccOut {
        TwccOut {
            ext,
            next: 0,
            sent: vec![None; TWCC_HISTORY],
            delay: bwe::DelayBased::default(),
        }
    }

    /// Numbers the packet of `len` bytes at the start of `buf` (rewritten, before
    /// protection): the extension under the viewer's id if the packet carries it,
    /// else the publisher's (`from`) renamed, else one added (the header grows; `buf`
    /// has the frame's room). Returns the number given and the packet's length, or
    /// None if it could not be numbered.
    fn number(&self, buf: &mut [u8], len: usize, from: Option<u8>) -> Option<(u16, usize)> {
        let value = self.next.to_be_bytes();
        let frame = buf.get_mut(..len)?;
        let at = rtp::extension_value_offset(frame, self.ext, 2).or_else(|| {
            let from = from.filter(|f| *f != self.ext)?;
            rtp::extension_value_offset(frame, from, 2)?;
            rtp::rename_extension(frame, from, self.ext)
                .then(|| rtp::extension_value_offset(frame, self.ext, 2))?
        });
        match at {
            Some(at) => {
                frame[at..at + 2].copy_from_slice(&value);
                Some((self.next, len))
            }
            None => Some((self.next, rtp::insert_extension(buf, len, self.ext, value)?)),
        }
    }

    fn sent(&mut self, seq: u16, at_us: i64, size: usize) {
        self.sent[seq as usize % TWCC_HISTORY] = Some((seq, at_us, size as u32));
        self.next = seq.wrapping_add(1);
    }

    /// What the feedback says arrived: (sent, arrived, size) of the packets we know.
    fn arrivals(&self, received: &[(u16, i64)]) -> Vec<(i64, i64, u32)> {
        received
            .iter()
            .filter_map(|(seq, at)| match self.sent[*seq as usize % TWCC_HISTORY] {
                Some((s, sent, size)) if s == *seq => Some((sent, *at, size)),
                _ => None,
            })
            .collect()
    }
}

impl Session {
    fn media_addr(&self) -> Option<SocketAddr> {
        self.nominated.or_else(|| self.addrs.last().copied())
    }
}

pub struct Engine {
    cname: String,
    epoch: Instant,
    counters: Arc<Counters>,
    sessions: HashMap<SessionId, Session>,
    tracks: HashMap<TrackId, UpTrack>,
    /// Which session a datagram is (by address, or a cascade peer's by SSRC).
    demux: Demux,
    /// The received ciphertext, kept while a packet with trunk copies is decrypted.
    scratch: Vec<u8>,
    next_report: Instant,
    next_feedback: Instant,
}

impl Engine {
    pub fn new(cname: String, counters: Arc<Counters>, now: Instant) -> Engine {
        Engine {
            cname,
            epoch: now,
            counters,
            sessions: HashMap::new(),
            tracks: HashMap::new(),
            demux: Demux::default(),
            scratch: Vec::new(),
            next_report: now + REPORT_INTERVAL,
            next_feedback: now + FEEDBACK_INTERVAL,
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The cascade handover of a publisher session: its receive master key and, per
    /// SSRC, the highest packet index authenticated so far.
    pub fn relay_handover(&self, id: SessionId) -> Option<(MasterKey, Vec<(u32, u64)>)> {
        let s = self.sessions.get(&id)?;
        let srtp = s.srtp.as_ref()?;
        Some((srtp.rx_key.clone(), srtp.rx.rtp_highest()))
    }

    /// Whether session `id` has keys (its DTLS finished).
    pub fn connected(&self, id: SessionId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.srtp.is_some())
    }

    /// A viewer's delay-based estimate (None unless it negotiated transport-cc).
    pub fn transport_cc(&self, sub: SessionId) -> Option<&bwe::DelayBased> {
        Some(&self.sessions.get(&sub)?.twcc_out.as_ref()?.delay)
    }

    pub fn track(&self, id: TrackId) -> Option<&UpTrack> {
        self.tracks.get(&id)
    }

    /// Every published track (for gauges over them).
    pub fn tracks(&self) -> impl Iterator<Item = &UpTrack> {
        self.tracks.values()
    }

    /// A subscriber's down-tracks, with the track each comes from.
    pub fn downtracks(&self, sub: SessionId) -> Vec<(TrackId, &DownTrack)> {
        let Some(s) = self.sessions.get(&sub) else {
            return vec![];
        };
        s.tracks
            .iter()
            .filter_map(|tid| {
                let t = self.tracks.get(tid)?;
                Some((*tid, t.downs.iter().find(|d| d.sub == sub)?))
            })
            .collect()
    }
}

mod apply;
mod feedback;
mod ingress;
mod resume;
mod send;
mod timers;

pub use resume::{DownMark, Persisted, Reserve, Resume};

use send::*;

#[cfg(test)]
mod tests;
