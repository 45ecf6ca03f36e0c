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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
    /// Continues receive streams another node has been authenticating: per SSRC the
    /// highest packet index it accepted (so a rollover counter above 0 carries over).
    ResumeRx {
        id: SessionId,
        streams: Vec<(u32, u64)>,
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
            | Command::ResumeRx { id, .. } => *id,
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

/// Queues `bytes` unchanged (a trunk copy: still SRTP, still authenticated end to end).
fn send_raw(to: SocketAddr, bytes: &[u8], c: &Counters, tx: &mut dyn Transmit) {
    let sent = tx.transmit(to, &mut |out| {
        out.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(bytes.len())
    });
    if sent {
        bump(&c.relay_out);
    } else {
        c.count(Drop::SendFailed);
    }
}

/// Protects `plain` (an RTCP compound we built) for one peer and queues it.
fn send_rtcp(
    ctx: &mut srtp::Context,
    to: SocketAddr,
    plain: &[u8],
    c: &Counters,
    tx: &mut dyn Transmit,
) -> bool {
    let sent = tx.transmit(to, &mut |out| {
        out.get_mut(..plain.len())?.copy_from_slice(plain);
        ctx.protect_rtcp(out, plain.len()).ok()
    });
    if sent {
        bump(&c.rtcp_out);
    } else {
        c.count(Drop::SendFailed);
    }
    sent
}

/// Where RTCP about encoding `layer` of `track` goes: the stream, its publisher's
/// address, the stream's SSRC, our RTCP SSRC towards the publisher, and the context
/// that protects it. None until the publisher is bound, keyed and the SSRC known.
fn upstream_of<'a>(
    tracks: &'a mut HashMap<TrackId, UpTrack>,
    sessions: &'a mut HashMap<SessionId, Session>,
    track: TrackId,
    layer: Layer,
) -> Option<(&'a mut Stream, SocketAddr, u32, u32, &'a mut srtp::Context)> {
    let t = tracks.get_mut(&track)?;
    let p = sessions.get_mut(&t.session)?;
    let st = t.streams.get_mut(layer as usize)?;
    let (to, ssrc, rtcp_ssrc) = (p.media_addr()?, st.ssrc?, p.rtcp_ssrc);
    Some((st, to, ssrc, rtcp_ssrc, &mut p.srtp.as_mut()?.tx))
}

/// Writes `plain` (header `hlen` bytes) rewritten for `d`, numbered as `out` says
/// (VP8 numbering shifted after a layer switch or dropped frames), and protected with
/// the subscriber's keys.
#[allow(clippy::too_many_arguments)]
fn send_copy(
    d: &DownTrack,
    ctx: &mut srtp::Context,
    to: SocketAddr,
    plain: &[u8],
    hlen: usize,
    vp8: Option<&Vp8Descriptor>,
    out: Out,
    rtx: Option<(u8, u32, u16)>,
    twcc: Option<Numbering>,
    tx: &mut dyn Transmit,
) -> bool {
    let mut numbered = None;
    let sent = tx.transmit(to, &mut |buf| {
        // RTX puts the original sequence number in front of the payload: 2 more.
        let room = plain.len() + if rtx.is_some() { 2 } else { 0 };
        buf.get(..room)?;
        let frame = &mut buf[..plain.len()];
        frame.copy_from_slice(plain);
        rtp::rewrite(frame, &d.route);
        // A late packet from before a dropped one keeps the delta of its place.
        if out.seq_delta != d.route.seq_delta {
            let seq = u16::from_be_bytes([plain[2], plain[3]]).wrapping_add(out.seq_delta);
            frame[2..4].copy_from_slice(&seq.to_be_bytes());
        }
        if out.marker {
            frame[1] |= 0x80;
        }
        if let Some((from, to)) = d.dd_rename {
            rtp::rename_extension(frame, from, to);
        }
        // Nothing to shift until a switch, a resume or a dropped frame moved it.
        let tl0 = d.layering.tl0_delta;
        if let Some(v) = vp8.filter(|_| out.pic_delta != 0 || tl0 != 0) {
            v.shift(&mut frame[hlen..], out.pic_delta, tl0);
        }
        // The transport-wide number, which may add an extension (the header grows).
        let (mut len, mut hlen) = (plain.len(), hlen);
        if let Some(n) = &twcc
            && let Some((seq, grown)) = n.out.number(buf, len, n.from)
        {
            numbered = Some(seq);
            hlen += grown - len;
            len = grown;
        }
        let Some((pt, ssrc, seq)) = rtx else {
            return ctx.protect_rtp(buf, len).ok();
        };
        // RFC 4588 §4: the same header on the RTX stream (its payload type, sequence
        // and SSRC), the original sequence number the subscriber knows first in the
        // payload.
        let frame = buf.get_mut(..len + 2)?;
        let osn = [frame[2], frame[3]];
        frame.copy_within(hlen..len, hlen + 2);
        frame[hlen..hlen + 2].copy_from_slice(&osn);
        frame[1] = (frame[1] & 0x80) | (pt & 0x7f);
        frame[2..4].copy_from_slice(&seq.to_be_bytes());
        frame[8..12].copy_from_slice(&ssrc.to_be_bytes());
        ctx.protect_rtp(buf, len + 2).ok()
    });
    if sent && let (Some(n), Some(seq)) = (twcc, numbered) {
        n.out.sent(seq, n.at_us, plain.len());
    }
    sent
}

/// A copy's transport-wide number: the viewer's numbering, the publisher's extension
/// id (renamed where the viewer's differs), and the send time (µs since the epoch).
struct Numbering<'a> {
    out: &'a mut TwccOut,
    from: Option<u8>,
    at_us: i64,
}

/// The layer ids of one packet (`plain`, header `hlen` bytes): AV1's from its
/// dependency descriptor under the template structure `dd` (or the one the packet
/// carries, returned to be kept), the others' from the payload descriptor.
fn layer_ids_of(
    format: Format,
    dd_ext: Option<u8>,
    dd: Option<&DdStructure>,
    plain: &[u8],
    hlen: usize,
    vp8: Option<&Vp8Descriptor>,
) -> (Option<LayerIds>, Option<DdStructure>) {
    if format != Format::Av1 {
        return (format.layer_ids(&plain[hlen..], vp8), None);
    }
    let Some(d) = dd_ext
        .and_then(|id| rtp::extension(plain, id))
        .and_then(DependencyDescriptor::parse)
    else {
        return (None, None);
    };
    let ids = d.structure.as_ref().or(dd).and_then(|s| s.layer_ids(&d));
    (ids, d.structure)
}

/// Whether a packet of `format` with `payload` may start a subscriber: a keyframe's
/// first packet; for audio (and codecs whose keyframes we cannot see) any packet.
fn may_start(format: Format, payload: &[u8]) -> bool {
    format == Format::Other || format.keyframe_start(payload)
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

    /// Applies one control-plane command. Commands about unknown handles are ignored:
    /// the session may have ended in between.
    pub fn apply(&mut self, cmd: Command, now: Instant, tx: &mut dyn Transmit) {
        match cmd {
            Command::AddSession {
                id,
                role,
                rtcp_ssrc,
            } => {
                self.sessions.insert(
                    id,
                    Session {
                        role,
                        rtcp_ssrc,
                        addrs: vec![],
                        nominated: None,
                        srtp: None,
                        tracks: vec![],
                        twcc: None,
                        twcc_out: None,
                        ended: HashMap::new(),
                    },
                );
            }
            Command::Bind {
                id,
                addr,
                nominated,
            } => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                if !s.addrs.contains(&addr) {
                    s.addrs.push(addr);
                }
                if nominated {
                    s.nominated = Some(addr);
                }
                self.demux.bind(addr, id);
            }
            Command::SetKeys { id, rx, tx: tx_key } => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                s.srtp = Some(Srtp {
                    rx: srtp::Context::new(&rx),
                    tx: srtp::Context::new(&tx_key),
                    rx_key: rx,
                });
                // A keyframe now, not at the next periodic one: for a new viewer's
                // tracks, or for viewers already waiting on a publisher's (they joined
                // first). A relay asks through its trunk's own RTCP.
                let role = s.role;
                let video: Vec<TrackId> = s
                    .tracks
                    .iter()
                    .copied()
                    .filter(|t| {
                        self.tracks.get(t).is_some_and(|t| {
                            t.kind == Kind::Video
                                && match role {
                                    Role::Subscriber => true,
                                    Role::Publisher => !t.downs.is_empty() || !t.trunks.is_empty(),
                                    Role::Relay => false,
                                }
                        })
                    })
                    .collect();
                for t in video {
                    self.request_keyframe(t, None, now, tx);
                }
            }
            Command::AddTrack {
                id,
                session,
                kind,
                pt,
                clock_rate,
                format,
                streams,
                rid_ext,
                twcc_ext,
                level_ext,
                dd_ext,
            } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    return;
                };
                s.tracks.push(id);
                if let (None, Some(ext)) = (&s.twcc, twcc_ext) {
                    s.twcc = Some((ext, twcc::Recorder::new(s.rtcp_ssrc)));
                }
                let streams = streams
                    .into_iter()
                    .take(MAX_LAYERS)
                    .map(|(rid, ssrc)| Stream {
                        rid,
                        ssrc,
                        packets: 0,
                        bytes: 0,
                        last_packet: None,
                        rate_bps: 0,
                        rate_mark: (0, now),
                        reception: Reception::default(),
                        last_sr: None,
                        last_keyframe_request: None,
                        seen: Seen::default(),
                        dd: None,
                        cache: if kind == Kind::Video {
                            vec![None; CACHE]
                        } else {
                            vec![]
                        },
                    })
                    .collect();
                self.tracks.insert(
                    id,
                    UpTrack {
                        session,
                        kind,
                        pt,
                        clock_rate,
                        format,
                        streams,
                        rid_ext,
                        level_ext: level_ext.filter(|_| kind == Kind::Audio),
                        levels: Levels::default(),
                        dd_ext: dd_ext.filter(|_| format == Format::Av1),
                        downs: vec![],
                        trunks: vec![],
                        trunk_caps: HashMap::new(),
                    },
                );
            }
            Command::AddDownTrack {
                track,
                sub,
                ssrc_out,
                pt_out,
                rtx,
                remb,
                dd_ext,
                twcc_ext,
                seq_delta,
                ts_delta,
            } => {
                let (Some(t), Some(s)) = (self.tracks.get_mut(&track), self.sessions.get_mut(&sub))
                else {
                    return;
                };
                s.tracks.push(track);
                if let (None, Some(ext)) = (&s.twcc_out, twcc_ext) {
                    s.twcc_out = Some(TwccOut::new(ext));
                }
                let ended = s.ended.remove(&ssrc_out);
                t.downs.push(DownTrack {
                    sub,
                    route: RouteValue {
                        ssrc_out_be: ssrc_out.to_be_bytes(),
                        seq_delta,
                        ts_delta,
                        pt_from: t.pt,
                        pt_to: pt_out,
                        flags: FLAG_REWRITE_PT,
                        ..Default::default()
                    },
                    layering: Layering::default(),
                    packets: 0,
                    octets: 0,
                    nack_resent: 0,
                    rtx,
                    quality: rtcp::Quality::default(),
                    bwe: bwe::LossBased::new(remb, rtx.is_some() && s.twcc_out.is_some()),
                    // AV1: the publisher's descriptor goes out under the subscriber's
                    // id; a subscriber without it cannot assemble a picture of several
                    // spatial layers (measured with Chromium: nothing decodes), so it
                    // gets one.
                    dd_rename: match (t.dd_ext, dd_ext) {
                        (Some(a), Some(b)) if a != b => Some((a, b)),
                        _ => None,
                    },
                    one_spatial: t.format == Format::Av1 && dd_ext.is_none(),
                    last_ts_out: 0,
                    last_out_at: None,
                });
                if let (Some(e), Some(d)) = (ended, t.downs.last_mut()) {
                    d.continue_from(e, t.clock_rate);
                }
                // A track added to a viewer already connected (it joined first): a
                // keyframe, or it waits for the next periodic one.
                if s.srtp.is_some() && t.kind == Kind::Video {
                    self.request_keyframe(track, None, now, tx);
                }
            }
            Command::SetLayers {
                sub,
                track,
                max_layer,
                max_temporal,
                paused,
            } => {
                let Some(d) = self
                    .tracks
                    .get_mut(&track)
                    .and_then(|t| t.downs.iter_mut().find(|d| d.sub == sub))
                else {
                    return;
                };
                d.layering.max_layer = max_layer;
                d.layering.max_temporal = max_temporal;
                d.layering.set_paused(paused);
            }
            Command::RemoveSession { id } => {
                let Some(s) = self.sessions.remove(&id) else {
                    return;
                };
                self.demux.remove(id);
                match s.role {
                    Role::Relay => {
                        for t in &s.tracks {
                            if let Some(t) = self.tracks.get_mut(t) {
                                t.trunks.retain(|r| *r != id);
                                t.trunk_caps.remove(&id);
                            }
                        }
                    }
                    Role::Subscriber => {
                        for t in &s.tracks {
                            if let Some(t) = self.tracks.get_mut(t) {
                                t.downs.retain(|d| d.sub != id);
                            }
                        }
                    }
                    Role::Publisher => {
                        // Subscribers stay, without the down-tracks of a gone publisher;
                        // each remembers where its SSRCs' numbering stood.
                        for tid in &s.tracks {
                            let Some(t) = self.tracks.remove(tid) else {
                                continue;
                            };
                            for d in &t.downs {
                                if let Some(sub) = self.sessions.get_mut(&d.sub) {
                                    sub.ended.insert(d.ssrc_out(), d.ended(t.clock_rate));
                                }
                            }
                            for sub in t.downs.iter().map(|d| d.sub).chain(t.trunks) {
                                if let Some(sub) = self.sessions.get_mut(&sub) {
                                    sub.tracks.retain(|x| x != tid);
                                }
                            }
                        }
                    }
                }
            }
            Command::BindRelay { id, addr, ssrcs } => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                if !s.addrs.contains(&addr) {
                    s.addrs.push(addr);
                }
                s.nominated = Some(addr);
                self.demux.bind_relay(addr, &ssrcs, id);
            }
            Command::AddTrunk { track, relay } => {
                let (Some(t), Some(s)) =
                    (self.tracks.get_mut(&track), self.sessions.get_mut(&relay))
                else {
                    return;
                };
                if !t.trunks.contains(&relay) {
                    t.trunks.push(relay);
                    s.tracks.push(track);
                }
                // The new branch's viewers need a keyframe to start decoding.
                if t.kind == Kind::Video {
                    self.request_keyframe(track, None, now, tx);
                }
            }
            Command::SetTrunkLayers {
                track,
                relay,
                max_layer,
            } => {
                let Some(t) = self.tracks.get_mut(&track) else {
                    return;
                };
                let before = t.trunk_caps.get(&relay).copied().unwrap_or(UNCAPPED);
                if max_layer == UNCAPPED {
                    t.trunk_caps.remove(&relay);
                } else {
                    t.trunk_caps.insert(relay, max_layer);
                }
                // A layer newly wanted below starts at a keyframe there.
                if max_layer > before || (before != UNCAPPED && max_layer == UNCAPPED) {
                    let first = before.saturating_add(1);
                    let last = max_layer.min(t.streams.len().saturating_sub(1) as Layer);
                    for l in first..=last {
                        self.request_keyframe(track, Some(l), now, tx);
                    }
                }
            }
            Command::ResumeRx { id, streams } => {
                if let Some(srtp) = self.sessions.get_mut(&id).and_then(|s| s.srtp.as_mut()) {
                    for (ssrc, highest) in streams {
                        srtp.rx.resume_rtp(ssrc, highest);
                    }
                }
            }
        }
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

    /// One SRTP or SRTCP datagram from `from`, decrypted in place in `pkt`.
    pub fn handle_srtp(
        &mut self,
        from: SocketAddr,
        pkt: &mut [u8],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        match self.demux.lookup(from, pkt) {
            Some(id) => self.handle_srtp_of(id, pkt, now, tx),
            None => self.counters.count(Drop::UnknownPeer),
        }
    }

    /// [`Engine::handle_srtp`] for a datagram whose session a router already looked
    /// up (the AF_XDP workers, by the same [`Demux`] fed by the same commands): one
    /// lookup per packet. A session this engine does not hold (yet, or any longer) is
    /// an unknown peer, as an unbound address is.
    pub fn handle_srtp_of(
        &mut self,
        id: SessionId,
        pkt: &mut [u8],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        if !self.sessions.contains_key(&id) {
            return self.counters.count(Drop::UnknownPeer);
        }
        let is_rtcp = pkt.len() >= 2 && rtp::classify(pkt[0], pkt[1]) == rtp::Class::Rtcp;
        if is_rtcp {
            self.on_rtcp(id, pkt, now, tx)
        } else {
            self.on_rtp(id, pkt, now, tx)
        }
    }

    fn on_rtp(&mut self, id: SessionId, pkt: &mut [u8], now: Instant, tx: &mut dyn Transmit) {
        let c = &*self.counters;
        let s = self
            .sessions
            .get_mut(&id)
            .expect("the demux points at live sessions");
        if s.role != Role::Publisher {
            return c.count(Drop::UnexpectedRtp);
        }
        let Some(srtp) = s.srtp.as_mut() else {
            return c.count(Drop::NotConnected);
        };
        // Trunk copies are the ciphertext: kept before the in-place decryption.
        let relayed = s
            .tracks
            .iter()
            .any(|t| self.tracks.get(t).is_some_and(|t| !t.trunks.is_empty()));
        if relayed {
            self.scratch.clear();
            self.scratch.extend_from_slice(pkt);
        }
        let n = match srtp.rx.unprotect_rtp(pkt) {
            Ok(n) => n,
            Err(e) => return c.count(Drop::from_srtp(e)),
        };
        let plain = &pkt[..n];
        let Ok(hlen) = rtp::validate(plain) else {
            return c.count(Drop::RtpMalformed);
        };
        // Every authenticated packet arrived at the transport, whichever stream it is.
        let at_us = now.duration_since(self.epoch).as_micros() as i64;
        if let Some((ext, rec)) = s.twcc.as_mut()
            && let Some(&[a, b]) = rtp::extension(plain, *ext)
        {
            let ssrc = u32::from_be_bytes([plain[8], plain[9], plain[10], plain[11]]);
            rec.record(ssrc, u16::from_be_bytes([a, b]), at_us);
        }
        // The publisher's transport-wide number is in its copies: each viewer's
        // replaces it (under the viewer's id).
        let pub_twcc = s.twcc.as_ref().map(|(id, _)| *id);
        let (pt, seq) = (plain[1] & 0x7f, u16::from_be_bytes([plain[2], plain[3]]));
        let ts = u32::from_be_bytes([plain[4], plain[5], plain[6], plain[7]]);
        let ssrc = u32::from_be_bytes([plain[8], plain[9], plain[10], plain[11]]);
        let tracks = &mut self.tracks;
        let found = s
            .tracks
            .iter()
            .find_map(|t| Some((*t, tracks[t].layer_of(ssrc)?)));
        let (tid, layer) = match found {
            Some(f) => f,
            // Unsignalled SSRC: the simulcast encoding its rid names, or else the plain
            // track whose payload type it carries, if still unbound.
            None => match s.tracks.iter().find_map(|t| {
                let up = &tracks[t];
                let i = match up.rid_ext {
                    Some(id) => {
                        let rid = rtp::extension(plain, id)?;
                        up.streams.iter().position(|st| {
                            st.ssrc.is_none() && st.rid.as_deref().map(str::as_bytes) == Some(rid)
                        })?
                    }
                    None if up.pt == pt && up.streams[0].ssrc.is_none() => 0,
                    None => return None,
                };
                Some((*t, i as Layer))
            }) {
                Some((t, i)) => {
                    tracks.get_mut(&t).expect("listed").streams[i as usize].ssrc = Some(ssrc);
                    (t, i)
                }
                None => return c.count(Drop::UnknownSsrc),
            },
        };
        bump(&c.rtp_in);
        let t = tracks.get_mut(&tid).expect("listed");
        if let Some(&[level, ..]) = t.level_ext.and_then(|id| rtp::extension(plain, id)) {
            t.levels.record(level, now);
        }
        let units = (now.duration_since(self.epoch).as_micros() as u64)
            .wrapping_mul(t.clock_rate as u64)
            / 1_000_000;
        let st = &mut t.streams[layer as usize];
        st.packets += 1;
        st.bytes += n as u64;
        st.last_packet = Some(now);
        st.reception.update(seq, ts, units);
        if !st.cache.is_empty() {
            // Reuse the slot's buffer rather than allocating one per packet.
            let slot = &mut st.cache[seq as usize % CACHE];
            let mut buf = slot.take().map(|(_, b)| b).unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(plain);
            *slot = Some((seq, buf));
        }
        // Once per packet, not per copy: what the layer choice needs.
        let payload = &plain[hlen..];
        let start = may_start(t.format, payload);
        let vp8 = (t.format == Format::Vp8)
            .then(|| Vp8Descriptor::parse(payload))
            .flatten();
        let (ids, structure) = layer_ids_of(
            t.format,
            t.dd_ext,
            st.dd.as_ref(),
            plain,
            hlen,
            vp8.as_ref(),
        );
        if structure.is_some() {
            st.dd = structure;
        }
        if let Some(ids) = &ids {
            st.seen.record(ids, n - hlen, now);
        }
        let top = st.seen.top(now, LAYER_IDLE);
        let active = t.active(now);
        let encodings = t.streams.len();
        let pkt = Packet {
            layer,
            seq,
            ts,
            keyframe: start,
            vp8: vp8.as_ref(),
            ids,
        };
        // Encodings some subscriber waits for a keyframe of (a bit per layer).
        let mut wanted = 0u8;
        let sessions = &mut self.sessions;
        for d in &mut t.downs {
            // A viewer on another encoding that still flows has nothing to decide at
            // this one's packets but its keyframes (where it may switch here): its
            // choice is made at its own encoding's packets.
            if !start
                && d.layering
                    .current
                    .is_some_and(|c| c != layer && active.get(c as usize) == Some(&true))
            {
                continue;
            }
            let target = d.layering.choose(&active[..encodings]);
            let mut want = d.layering.want(encodings);
            if d.one_spatial {
                want.0 = 0;
            }
            let out = d.layering.accept(&pkt, target, want, units, &mut d.route);
            // Waiting to switch (a cap, a bandwidth limit, a layer that stopped) or for
            // more layers of its encoding: a keyframe is asked for, whether the old
            // layer still flows or not.
            if let Some(w) = d.layering.waiting(want, top) {
                wanted |= 1 << w;
            }
            let Some(out) = out else {
                continue;
            };
            let Some(sub) = sessions.get_mut(&d.sub) else {
                continue;
            };
            let to = sub.media_addr();
            let Session { srtp, twcc_out, .. } = sub;
            let (Some(to), Some(srtp)) = (to, srtp.as_mut()) else {
                continue;
            };
            let twcc = twcc_out.as_mut().map(|out| Numbering {
                out,
                from: pub_twcc,
                at_us,
            });
            if send_copy(
                d,
                &mut srtp.tx,
                to,
                plain,
                hlen,
                vp8.as_ref(),
                out,
                None,
                twcc,
                tx,
            ) {
                bump(&c.rtp_out);
                d.packets = d.packets.wrapping_add(1);
                d.octets = d.octets.wrapping_add((n - hlen) as u32);
                d.last_ts_out = ts.wrapping_add(d.route.ts_delta);
                d.last_out_at = Some(now);
            } else {
                c.count(Drop::SendFailed);
            }
        }
        for r in &t.trunks {
            if t.trunk_caps.get(r).is_some_and(|cap| layer > *cap) {
                continue;
            }
            if let Some(to) = sessions.get(r).and_then(|s| s.media_addr()) {
                send_raw(to, &self.scratch, c, tx);
            }
        }
        if wanted != 0 && t.kind == Kind::Video {
            for l in 0..MAX_LAYERS as Layer {
                if wanted & (1 << l) != 0 {
                    self.request_keyframe(tid, Some(l), now, tx);
                }
            }
        }
    }

    fn on_rtcp(&mut self, id: SessionId, pkt: &mut [u8], now: Instant, tx: &mut dyn Transmit) {
        let c = self.counters.clone();
        let s = self
            .sessions
            .get_mut(&id)
            .expect("the demux points at live sessions");
        let Some(srtp) = s.srtp.as_mut() else {
            return c.count(Drop::NotConnected);
        };
        // A publisher's reports go down the cascade as they are (its sender reports
        // carry lip sync to every node): the relays of any of its tracks.
        let mut relays: Vec<SessionId> = Vec::new();
        if s.role == Role::Publisher {
            for t in s.tracks.iter().filter_map(|t| self.tracks.get(t)) {
                for r in &t.trunks {
                    if !relays.contains(r) {
                        relays.push(*r);
                    }
                }
            }
        }
        if !relays.is_empty() {
            self.scratch.clear();
            self.scratch.extend_from_slice(pkt);
        }
        let n = match srtp.rx.unprotect_rtcp(pkt) {
            Ok(n) => n,
            Err(e) => return c.count(Drop::from_srtp(e)),
        };
        let requests = match rtcp::parse(&pkt[..n]) {
            Ok(r) => r,
            Err(_) => return c.count(Drop::RtcpMalformed),
        };
        bump(&c.rtcp_in);
        let role = s.role;
        for r in &relays {
            if let Some(to) = self.sessions.get(r).and_then(|s| s.media_addr()) {
                send_raw(to, &self.scratch, &c, tx);
            }
        }
        for r in requests {
            match (role, r) {
                (Role::Publisher, Request::SenderReport { ssrc, ntp, rtp }) => {
                    if let Some((t, l)) = self.stream_of(id, ssrc) {
                        let st = &mut self.tracks.get_mut(&t).expect("found").streams[l as usize];
                        st.last_sr = Some((ntp, rtp, now));
                        st.reception.last_sr = Some(((ntp >> 16) as u32, now));
                    }
                }
                (Role::Subscriber, Request::KeyFrame { media_ssrc }) => {
                    // The encoding it is on, or the one it waits to start on.
                    if let Some((tid, i)) = self.downtrack_by_ssrc(id, media_ssrc) {
                        let l = &self.tracks[&tid].downs[i].layering;
                        let layer = l.current.or(l.target).unwrap_or(0);
                        self.request_keyframe(tid, Some(layer), now, tx);
                    }
                }
                (Role::Subscriber, Request::Nack { media_ssrc, seqs }) => {
                    self.on_nack(id, media_ssrc, &seqs, now, tx)
                }
                (Role::Subscriber, Request::TransportFeedback { received }) => {
                    let Some(s) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    let Some(tw) = s.twcc_out.as_mut() else {
                        continue;
                    };
                    let before = tw.delay.overuses;
                    let arrivals = tw.arrivals(&received);
                    tw.delay.on_feedback(&arrivals, now);
                    c.bwe_delay_overuses.fetch_add(
                        tw.delay.overuses - before,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    // The transport's estimate bounds each of its down-tracks' layers.
                    let (estimate, overuses) = (tw.delay.estimate, tw.delay.overuses);
                    for tid in &s.tracks {
                        if let Some(t) = self.tracks.get_mut(tid) {
                            for d in t.downs.iter_mut().filter(|d| d.sub == id) {
                                d.bwe.delay = estimate;
                                d.bwe.delay_overuses = overuses;
                            }
                        }
                    }
                }
                (Role::Subscriber, Request::Remb { bitrate, ssrcs }) => {
                    for ssrc in ssrcs {
                        if let Some((tid, i)) = self.downtrack_by_ssrc(id, ssrc) {
                            let t = self.tracks.get_mut(&tid).expect("found");
                            t.downs[i].bwe.on_remb(bitrate);
                        }
                    }
                }
                (Role::Subscriber, Request::Reception(b)) => {
                    if let Some((tid, i)) = self.downtrack_by_ssrc(id, b.media_ssrc) {
                        let t = self.tracks.get_mut(&tid).expect("found");
                        let rate = t.clock_rate;
                        // Rates of the encodings being received (0: not), for the
                        // layer the viewer's bandwidth carries.
                        let active = t.active(now);
                        let mut rates = [0u64; MAX_LAYERS];
                        let top = t.streams[0].seen.top(now, LAYER_IDLE);
                        let (n, svc) = if t.streams.len() == 1 {
                            // One scalable encoding: its spatial layers are the choice.
                            (t.streams[0].seen.cumulative(top.0, &mut rates), true)
                        } else {
                            for ((r, st), a) in rates.iter_mut().zip(&t.streams).zip(active) {
                                *r = if a { st.rate_bps.max(1) } else { 0 };
                            }
                            (t.streams.len().min(MAX_LAYERS), false)
                        };
                        let rates = &rates[..n];
                        let d = &mut t.downs[i];
                        d.quality.update(&b, rate, now);
                        if rates.len() > 1 {
                            let on = if svc {
                                d.layering.got(top).map(|g| g.0)
                            } else {
                                d.layering.current
                            };
                            let before = (d.bwe.probes, d.bwe.failed_probes);
                            d.layering.bw_limit = d.bwe.on_report(
                                b.total_lost,
                                b.highest_seq,
                                d.octets,
                                on,
                                now,
                                rates,
                            );
                            let relaxed = std::sync::atomic::Ordering::Relaxed;
                            c.bwe_probes.fetch_add(d.bwe.probes - before.0, relaxed);
                            c.bwe_failed_probes
                                .fetch_add(d.bwe.failed_probes - before.1, relaxed);
                        }
                    }
                }
                // A relay names the publisher's own SSRCs (trunks keep them).
                (Role::Relay, Request::KeyFrame { media_ssrc }) => {
                    if let Some((tid, l)) = self.stream_of(id, media_ssrc) {
                        self.request_keyframe(tid, Some(l), now, tx);
                    }
                }
                (Role::Relay, Request::Nack { media_ssrc, seqs }) => {
                    // What the relay lost on the trunk: the publisher resends it and the
                    // resend goes down the trunk like any packet.
                    if let Some((tid, l)) = self.stream_of(id, media_ssrc) {
                        self.nack_publisher(tid, l, &seqs, tx);
                    }
                }
                _ => {}
            }
        }
    }

    /// The track and encoding of session `id`'s tracks (a publisher's own, or those a
    /// relay gets) whose source SSRC is `ssrc`.
    fn stream_of(&self, id: SessionId, ssrc: u32) -> Option<(TrackId, Layer)> {
        let s = self.sessions.get(&id)?;
        s.tracks
            .iter()
            .find_map(|t| Some((*t, self.tracks.get(t)?.layer_of(ssrc)?)))
    }

    /// Asks the publisher of `track` for `seqs` of encoding `layer` (its own numbers).
    fn nack_publisher(
        &mut self,
        track: TrackId,
        layer: Layer,
        seqs: &[u16],
        tx: &mut dyn Transmit,
    ) {
        let Some((_, to, ssrc, rtcp_ssrc, ctx)) =
            upstream_of(&mut self.tracks, &mut self.sessions, track, layer)
        else {
            return;
        };
        let nack = rtcp::translated_nack(rtcp_ssrc, ssrc, seqs, 0);
        send_rtcp(ctx, to, &nack, &self.counters, tx);
    }

    /// The subscriber's down-track that sends `ssrc_out`: (track, index in its downs).
    fn downtrack_by_ssrc(&self, sub: SessionId, ssrc_out: u32) -> Option<(TrackId, usize)> {
        self.sessions.get(&sub)?.tracks.iter().find_map(|tid| {
            let t = self.tracks.get(tid)?;
            let i = t
                .downs
                .iter()
                .position(|d| d.sub == sub && d.ssrc_out() == ssrc_out)?;
            Some((*tid, i))
        })
    }

    /// Sends a PLI for encoding `layer` of a publisher's track (every encoding with
    /// None), at most every [`KEYFRAME_INTERVAL`] per encoding, so a room of viewers
    /// asking at once costs the publisher one keyframe.
    pub fn request_keyframe(
        &mut self,
        track: TrackId,
        layer: Option<Layer>,
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        let layers = match (layer, self.tracks.get(&track)) {
            (Some(l), _) => l..l + 1,
            (None, Some(t)) => 0..t.streams.len() as Layer,
            (None, None) => return,
        };
        for l in layers {
            let Some((st, to, ssrc, rtcp_ssrc, ctx)) =
                upstream_of(&mut self.tracks, &mut self.sessions, track, l)
            else {
                continue;
            };
            if st
                .last_keyframe_request
                .is_some_and(|at| now - at < KEYFRAME_INTERVAL)
            {
                continue;
            }
            st.last_keyframe_request = Some(now);
            if send_rtcp(ctx, to, &rtcp::pli(rtcp_ssrc, ssrc), &self.counters, tx) {
                bump(&self.counters.keyframe_requests);
            }
        }
    }

    /// Resends what the cache has; asks the publisher for the rest.
    fn on_nack(
        &mut self,
        sub: SessionId,
        ssrc_out: u32,
        seqs: &[u16],
        now: Instant,
        tx: &mut dyn Transmit,
    ) {
        let Some((tid, i)) = self.downtrack_by_ssrc(sub, ssrc_out) else {
            return;
        };
        let c = &*self.counters;
        let t = self.tracks.get_mut(&tid).expect("found");
        let pub_twcc = self
            .sessions
            .get(&t.session)
            .and_then(|p| p.twcc.as_ref().map(|(id, _)| *id));
        let at_us = now.duration_since(self.epoch).as_micros() as i64;
        let s = self.sessions.get_mut(&sub).expect("found");
        let to = s.media_addr();
        let Session { srtp, twcc_out, .. } = s;
        let (Some(to), Some(srtp)) = (to, srtp.as_mut()) else {
            return;
        };
        let d = &mut t.downs[i];
        let layer = d.layer();
        let cache = &t.streams[layer as usize].cache;
        let mut missing = Vec::new();
        // Only packets since the last switch are this encoding's (older ones are
        // lost), and only those it was sent (not the numbers of dropped layers).
        for &seq_out in seqs {
            // The source number is known once the cached packet's layers are read;
            // without a cached packet there is nothing to read them from.
            let Some((src_seq, _)) = d.layering.resend(seq_out, &d.route, None) else {
                continue;
            };
            match cache.get(src_seq as usize % CACHE) {
                Some(Some((cached, plain))) if *cached == src_seq => {
                    let Ok(hlen) = rtp::header_len(plain) else {
                        continue;
                    };
                    let vp8 = (t.format == Format::Vp8)
                        .then(|| Vp8Descriptor::parse(&plain[hlen..]))
                        .flatten();
                    let dd = t.streams[layer as usize].dd.as_ref();
                    let (ids, _) = layer_ids_of(t.format, t.dd_ext, dd, plain, hlen, vp8.as_ref());
                    let Some((_, out)) = d.layering.resend(seq_out, &d.route, ids.as_ref()) else {
                        continue;
                    };
                    if send_copy(
                        d,
                        &mut srtp.tx,
                        to,
                        plain,
                        hlen,
                        vp8.as_ref(),
                        out,
                        d.rtx,
                        twcc_out.as_mut().map(|out| Numbering {
                            out,
                            from: pub_twcc,
                            at_us,
                        }),
                        tx,
                    ) {
                        d.nack_resent += 1;
                        bump(&c.nack_resent);
                        if let Some((_, _, seq)) = d.rtx.as_mut() {
                            *seq = seq.wrapping_add(1);
                        }
                    } else {
                        c.count(Drop::SendFailed);
                    }
                }
                _ => missing.push(src_seq),
            }
        }
        if missing.is_empty() {
            return;
        }
        self.nack_publisher(tid, layer, &missing, tx);
    }

    /// When [`Engine::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_report.min(self.next_feedback)
    }

    /// Transport feedback to publishers every [`FEEDBACK_INTERVAL`]; sender reports
    /// to subscribers (lip sync carried over from the publisher's SR) and receiver
    /// reports to publishers every [`REPORT_INTERVAL`]. `wall` is only for streams no
    /// SR has timed yet.
    pub fn handle_timeout(&mut self, now: Instant, wall: SystemTime, tx: &mut dyn Transmit) {
        if now >= self.next_feedback {
            advance(&mut self.next_feedback, FEEDBACK_INTERVAL, now);
            self.send_feedback(tx);
            self.send_padding(now, tx);
        }
        if now < self.next_report {
            return;
        }
        advance(&mut self.next_report, REPORT_INTERVAL, now);
        let c = &*self.counters;
        for t in self.tracks.values_mut() {
            for st in &mut t.streams {
                let (bytes, at) = st.rate_mark;
                let secs = now.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    st.rate_bps = ((st.bytes - bytes) as f64 * 8.0 / secs) as u64;
                }
                st.seen.tick(secs);
                st.rate_mark = (st.bytes, now);
            }
            for d in &mut t.downs {
                if d.packets == 0 {
                    continue;
                }
                let Some(sub) = self.sessions.get_mut(&d.sub) else {
                    continue;
                };
                let (Some(to), Some(srtp)) = (sub.media_addr(), sub.srtp.as_mut()) else {
                    continue;
                };
                let (ntp, rtp) = match t.streams[d.layer() as usize].last_sr {
                    Some((ntp, rtp, at)) => {
                        let el = now - at;
                        (
                            ntp.wrapping_add(((el.as_nanos() as u64) << 32) / 1_000_000_000),
                            rtp.wrapping_add(d.route.ts_delta)
                                .wrapping_add((el.as_secs_f64() * t.clock_rate as f64) as u32),
                        )
                    }
                    None => {
                        let el = d.last_out_at.map(|at| now - at).unwrap_or_default();
                        (
                            rtcp::ntp_time(wall),
                            d.last_ts_out
                                .wrapping_add((el.as_secs_f64() * t.clock_rate as f64) as u32),
                        )
                    }
                };
                let sr =
                    rtcp::sender_report(d.ssrc_out(), ntp, rtp, d.packets, d.octets, &self.cname);
                send_rtcp(&mut srtp.tx, to, &sr, c, tx);
                d.quality.sent_sr(ntp, now);
            }
        }
        for s in self.sessions.values_mut() {
            if s.role != Role::Publisher {
                continue;
            }
            let mut blocks = Vec::new();
            for tid in &s.tracks {
                let Some(t) = self.tracks.get_mut(tid) else {
                    continue;
                };
                for st in &mut t.streams {
                    if let Some(b) = st.ssrc.and_then(|ssrc| st.reception.report(ssrc, now)) {
                        blocks.push(b);
                    }
                }
            }
            let (Some(to), Some(srtp)) = (s.media_addr(), s.srtp.as_mut()) else {
                continue;
            };
            if !blocks.is_empty() {
                send_rtcp(
                    &mut srtp.tx,
                    to,
                    &rtcp::receiver_report(s.rtcp_ssrc, blocks),
                    c,
                    tx,
                );
            }
        }
    }

    /// What each publisher's packets did on the way (transport-wide sequence numbers
    /// and arrival times), for its congestion controller.
    fn send_feedback(&mut self, tx: &mut dyn Transmit) {
        let c = &*self.counters;
        for s in self.sessions.values_mut() {
            let to = s.media_addr();
            let (Some((_, rec)), Some(to), Some(srtp)) = (s.twcc.as_mut(), to, s.srtp.as_mut())
            else {
                continue;
            };
            // One datagram each: a second's worth at a high rate outgrows one packet.
            for fb in rec.build_feedback_packet() {
                if let Ok(b) = ::rtcp::packet::marshal(std::slice::from_ref(&fb)) {
                    send_rtcp(&mut srtp.tx, to, &b, c, tx);
                    bump(&c.transport_feedback);
                }
            }
        }
    }

    /// Padding probes: a [`FEEDBACK_INTERVAL`]'s worth of each probing down-track's
    /// padding rate, as padding-only packets on its RTX stream (its own sequence
    /// numbers: the media numbering is untouched), each with a transport-wide number
    /// so the viewer's feedback shows whether the path carried them.
    fn send_padding(&mut self, now: Instant, tx: &mut dyn Transmit) {
        let c = &*self.counters;
        let at_us = now.duration_since(self.epoch).as_micros() as i64;
        for t in self.tracks.values_mut() {
            for d in &mut t.downs {
                let (Some(rate), Some((pt, ssrc, seq))) = (d.bwe.padding(), d.rtx.as_mut()) else {
                    continue;
                };
                let Some(sub) = self.sessions.get_mut(&d.sub) else {
                    continue;
                };
                let to = sub.media_addr();
                let Session { srtp, twcc_out, .. } = sub;
                let (Some(to), Some(srtp), Some(tw)) = (to, srtp.as_mut(), twcc_out.as_mut())
                else {
                    continue;
                };
                let mut bytes = (rate * FEEDBACK_INTERVAL.as_millis() as u64 / 8_000) as usize;
                while bytes > 0 {
                    // RTP padding is counted in one octet; libwebrtc pads by 224.
                    let pad = bytes.min(PADDING);
                    let ts = d.last_ts_out;
                    let mut numbered = None;
                    let sent = tx.transmit(to, &mut |buf| {
                        let len = 20 + pad;
                        let p = buf.get_mut(..len)?;
                        // V=2, P, X; one one-byte extension: the transport-wide number.
                        p[..2].copy_from_slice(&[0xb0, *pt & 0x7f]);
                        p[2..4].copy_from_slice(&seq.to_be_bytes());
                        p[4..8].copy_from_slice(&ts.to_be_bytes());
                        p[8..12].copy_from_slice(&ssrc.to_be_bytes());
                        p[12..20].copy_from_slice(&[0xbe, 0xde, 0, 1, (tw.ext << 4) | 1, 0, 0, 0]);
                        p[20..].fill(0);
                        p[len - 1] = pad as u8;
                        numbered = tw.number(buf, len, None).map(|(n, _)| n);
                        srtp.tx.protect_rtp(buf, len).ok()
                    });
                    if !sent {
                        c.count(Drop::SendFailed);
                        break;
                    }
                    if let Some(n) = numbered {
                        tw.sent(n, at_us, 20 + pad);
                    }
                    *seq = seq.wrapping_add(1);
                    bump(&c.bwe_padding);
                    bytes -= pad;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::srtp::{Context, Profile};
    use std::sync::atomic::Ordering;

    mod long_stream;
    mod reused_ssrc;

    /// The sink of a test: every datagram queued, in order; refuses when `full`.
    #[derive(Default)]
    struct Sink {
        out: Vec<(SocketAddr, Vec<u8>)>,
        full: bool,
    }

    impl Transmit for Sink {
        fn transmit(
            &mut self,
            to: SocketAddr,
            fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
        ) -> bool {
            if self.full {
                return false;
            }
            let mut buf = vec![0u8; 1500];
            match fill(&mut buf) {
                Some(n) => {
                    buf.truncate(n);
                    self.out.push((to, buf));
                    true
                }
                None => false,
            }
        }
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 10_000 + n))
    }

    fn key(profile: Profile, b: u8) -> MasterKey {
        MasterKey::new(
            profile,
            &[b; 16],
            &vec![b ^ 0x5a; profile.master_salt_len()],
        )
        .unwrap()
    }

    /// A peer's side of a session: its address and SRTP contexts (peer→SFU, SFU→peer).
    struct Peer {
        id: SessionId,
        addr: SocketAddr,
        tx: Context,
        rx: Context,
    }

    struct Fixture {
        engine: Engine,
        sink: Sink,
        now: Instant,
    }

    impl Fixture {
        fn new() -> Fixture {
            let now = Instant::now();
            Fixture {
                engine: Engine::new("test".into(), Arc::new(Counters::default()), now),
                sink: Sink::default(),
                now,
            }
        }

        fn cmd(&mut self, c: Command) {
            self.engine.apply(c, self.now, &mut self.sink);
        }

        fn add(&mut self, id: SessionId, role: Role) {
            self.cmd(Command::AddSession {
                id,
                role,
                rtcp_ssrc: 0x5000 + id,
            });
        }

        /// ICE and DTLS done: the session is bound and keyed.
        fn connect(&mut self, id: SessionId, profile: Profile) -> Peer {
            let (up, down) = (key(profile, id as u8), key(profile, id as u8 ^ 0xff));
            self.cmd(Command::Bind {
                id,
                addr: addr(id as u16),
                nominated: true,
            });
            self.cmd(Command::SetKeys {
                id,
                rx: up.clone(),
                tx: down.clone(),
            });
            Peer {
                id,
                addr: addr(id as u16),
                tx: Context::new(&up),
                rx: Context::new(&down),
            }
        }

        /// Publisher 1, connected, sending track 10 (90 kHz video or 48 kHz audio).
        fn publisher(&mut self, profile: Profile, kind: Kind, pt: u8, ssrc: Option<u32>) -> Peer {
            let p = self.peer(1, Role::Publisher, profile);
            let clock_rate = if kind == Kind::Video { 90_000 } else { 48_000 };
            self.cmd(Command::AddTrack {
                id: 10,
                session: 1,
                kind,
                pt,
                clock_rate,
                format: Format::Other,
                streams: vec![(None, ssrc)],
                rid_ext: None,
                twcc_ext: None,
                level_ext: None,
                dd_ext: None,
            });
            p
        }

        fn peer(&mut self, id: SessionId, role: Role, profile: Profile) -> Peer {
            self.add(id, role);
            self.connect(id, profile)
        }

        /// A subscriber with one down-track of `track`, keyed after it (as WHEP does).
        fn viewer(
            &mut self,
            id: SessionId,
            track: TrackId,
            profile: Profile,
            down: Command,
        ) -> Peer {
            self.add(id, Role::Subscriber);
            assert!(
                matches!(down, Command::AddDownTrack { sub, track: t, .. } if sub == id && t == track)
            );
            self.cmd(down);
            self.connect(id, profile)
        }

        /// Publisher 1, connected, sending track 10: one video encoding (SSRC
        /// 0xaaaa) of `format` with these header extension ids.
        fn video_publisher(
            &mut self,
            format: Format,
            pt: u8,
            twcc_ext: Option<u8>,
            dd_ext: Option<u8>,
        ) -> Peer {
            let p = self.peer(1, Role::Publisher, Profile::AeadAes128Gcm);
            self.cmd(Command::AddTrack {
                id: 10,
                session: 1,
                kind: Kind::Video,
                pt,
                clock_rate: 90_000,
                format,
                streams: vec![(None, Some(0xaaaa))],
                rid_ext: None,
                twcc_ext,
                level_ext: None,
                dd_ext,
            });
            p
        }

        /// Viewer `id` of track 10: SSRC 0x100 + id, payload type `pt`, sequence +
        /// `seq_delta`, these header extension ids as it negotiated them.
        fn track_viewer(
            &mut self,
            id: SessionId,
            pt: u8,
            seq_delta: u16,
            dd_ext: Option<u8>,
            twcc_ext: Option<u8>,
        ) -> Peer {
            let down = Command::AddDownTrack {
                track: 10,
                sub: id,
                ssrc_out: 0x100 + id,
                pt_out: pt,
                rtx: None,
                remb: false,
                dd_ext,
                twcc_ext,
                seq_delta,
                ts_delta: 0,
            };
            self.viewer(id, 10, Profile::AeadAes128Gcm, down)
        }

        /// What was sent to `v` since the last look, decrypted with its keys (and
        /// taken out of the sink).
        fn take_for(&mut self, v: &mut Peer) -> Vec<Vec<u8>> {
            let (mine, rest) = std::mem::take(&mut self.sink.out)
                .into_iter()
                .partition(|(to, _)| *to == v.addr);
            self.sink.out = rest;
            mine.into_iter().map(|(_, w)| unprotect(v, &w)).collect()
        }

        fn protect(from: &mut Peer, plain: &[u8]) -> Vec<u8> {
            let mut buf = plain.to_vec();
            buf.resize(plain.len() + 20, 0);
            let n = if rtp::classify(plain[0], plain[1]) == rtp::Class::Rtcp {
                from.tx.protect_rtcp(&mut buf, plain.len()).unwrap()
            } else {
                from.tx.protect_rtp(&mut buf, plain.len()).unwrap()
            };
            buf.truncate(n);
            buf
        }

        fn send(&mut self, from: &mut Peer, plain: &[u8]) -> Vec<u8> {
            let wire = Self::protect(from, plain);
            self.deliver(from.addr, &wire);
            wire
        }

        fn deliver(&mut self, from: SocketAddr, wire: &[u8]) {
            let mut b = wire.to_vec();
            self.engine
                .handle_srtp(from, &mut b, self.now, &mut self.sink);
        }

        fn drops(&self, d: Drop) -> u64 {
            self.engine.counters.dropped(d)
        }
    }

    fn rtp_packet(pt: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, pt];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn unprotect(p: &mut Peer, wire: &[u8]) -> Vec<u8> {
        let mut b = wire.to_vec();
        let n = if rtp::classify(b[0], b[1]) == rtp::Class::Rtcp {
            p.rx.unprotect_rtcp(&mut b)
                .expect("the SFU's SRTCP authenticates")
        } else {
            p.rx.unprotect_rtp(&mut b)
                .expect("the SFU's SRTP authenticates")
        };
        b.truncate(n);
        b
    }

    /// A VP8 publisher (SSRC 0xaaaa) and one viewer (SSRC 0x42, sequence + 100,
    /// timestamp + `ts_delta`, `rtx` if given) after source packets 0..10 (timestamp
    /// 3000 × seq, marker on 5, payload 30 × seq), its copies taken from the sink.
    fn cached_video(rtx: Option<(u8, u32, u16)>, ts_delta: u32) -> (Fixture, Peer, Peer) {
        let mut f = Fixture::new();
        let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
        let down = Command::AddDownTrack {
            track: 10,
            sub: 2,
            ssrc_out: 0x42,
            pt_out: 96,
            rtx,
            remb: false,
            dd_ext: None,
            twcc_ext: None,
            seq_delta: 100,
            ts_delta,
        };
        let sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
        for seq in 0..10u16 {
            let mut p = rtp_packet(96, seq, 3000 * seq as u32, 0xaaaa, &[seq as u8; 30]);
            p[1] |= 0x80 * (seq == 5) as u8;
            f.send(&mut publisher, &p);
        }
        f.sink.out.clear();
        (f, publisher, sub)
    }

    /// One publisher, N subscribers on either profile with their own keys, SSRCs,
    /// offsets and payload types: each gets every packet once, rewritten its way and
    /// decryptable only with its own keys.
    #[test]
    fn fan_out_to_n_subscribers_with_their_own_keys_and_rewrite() {
        let mut f = Fixture::new();
        let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
        let n = 25u32;
        let mut subs: Vec<Peer> = (0..n)
            .map(|i| {
                let down = Command::AddDownTrack {
                    track: 10,
                    sub: 100 + i,
                    ssrc_out: 0x1000 + i,
                    pt_out: 100 + (i % 20) as u8,
                    rtx: None,
                    remb: false,
                    dd_ext: None,
                    twcc_ext: None,
                    seq_delta: (i * 1000) as u16,
                    ts_delta: i * 7,
                };
                f.viewer(100 + i, 10, Profile::ALL[i as usize % 2], down)
            })
            .collect();
        // Each viewer's keys ask for a keyframe; the throttle lets the first through.
        assert_eq!(
            f.sink.out.len(),
            1,
            "one keyframe request for {n} new viewers"
        );
        assert_eq!(f.sink.out[0].0, publisher.addr);
        f.sink.out.clear();
        for seq in [65_534u16, 65_535, 0, 1] {
            f.send(
                &mut publisher,
                &rtp_packet(96, seq, 3000 * seq as u32, 0xaaaa, b"frame"),
            );
        }
        assert_eq!(f.sink.out.len(), 4 * n as usize);
        for (k, (to, wire)) in std::mem::take(&mut f.sink.out).into_iter().enumerate() {
            let i = k % n as usize;
            let sub = &mut subs[i];
            assert_eq!(to, sub.addr);
            let other = (i + 1) % n as usize;
            let mut b = wire.clone();
            assert!(
                Context::new(&key(Profile::ALL[other % 2], (100 + other as u8) ^ 0xff))
                    .unprotect_rtp(&mut b)
                    .is_err(),
                "another subscriber's keys do not open it"
            );
            let p = unprotect(sub, &wire);
            let seq_in = [65_534u16, 65_535, 0, 1][k / n as usize];
            assert_eq!(p[1] & 0x7f, 100 + (i % 20) as u8);
            assert_eq!(
                u16::from_be_bytes([p[2], p[3]]),
                seq_in.wrapping_add((i * 1000) as u16)
            );
            assert_eq!(
                u32::from_be_bytes(p[4..8].try_into().unwrap()),
                (3000 * seq_in as u32).wrapping_add(i as u32 * 7)
            );
            assert_eq!(
                u32::from_be_bytes(p[8..12].try_into().unwrap()),
                0x1000 + i as u32
            );
            assert_eq!(&p[12..], b"frame");
        }
        let c = f.engine.counters();
        assert_eq!(c.rtp_in.load(Ordering::Relaxed), 4);
        assert_eq!(c.rtp_out.load(Ordering::Relaxed), 4 * n as u64);
        assert_eq!(f.engine.downtracks(105)[0].1.packets, 4);
    }

    /// Forged, replayed, truncated SRTP, SRTP from nobody, before keys, RTP from a
    /// subscriber and an unknown SSRC: each dropped under its own reason, nothing sent.
    #[test]
    fn bad_srtp_is_dropped_and_counted_by_reason() {
        let mut f = Fixture::new();
        let mut publisher = f.publisher(Profile::AesCm128HmacSha1_80, Kind::Audio, 111, None);
        let down = Command::AddDownTrack {
            track: 10,
            sub: 2,
            ssrc_out: 7,
            pt_out: 111,
            rtx: None,
            remb: false,
            dd_ext: None,
            twcc_ext: None,
            seq_delta: 0,
            ts_delta: 0,
        };
        let mut sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
        let good = f.send(&mut publisher, &rtp_packet(111, 5, 0, 0x77, b"opus"));
        assert_eq!(
            f.sink.out.len(),
            1,
            "an unsignalled SSRC binds by payload type"
        );
        assert_eq!(f.engine.track(10).unwrap().ssrc(), Some(0x77));
        f.deliver(publisher.addr, &good);
        assert_eq!(f.drops(Drop::SrtpReplay), 1);
        let next = Fixture::protect(&mut publisher, &rtp_packet(111, 6, 0, 0x77, b"opus"));
        let mut forged = next.clone();
        forged[13] ^= 1;
        f.deliver(publisher.addr, &forged);
        assert_eq!(f.drops(Drop::SrtpAuth), 1);
        f.deliver(publisher.addr, &next[..15]);
        assert_eq!(f.drops(Drop::SrtpTruncated), 1);
        f.deliver(publisher.addr, &next);
        assert_eq!(
            f.sink.out.len(),
            2,
            "the forgery and the truncation changed nothing"
        );
        f.deliver(addr(999), &good);
        assert_eq!(f.drops(Drop::UnknownPeer), 1);
        // A router's session this engine does not hold is an unknown peer too.
        let mut routed = good.clone();
        f.engine
            .handle_srtp_of(4242, &mut routed, Instant::now(), &mut f.sink);
        assert_eq!(f.drops(Drop::UnknownPeer), 2);
        f.send(&mut publisher, &rtp_packet(8, 7, 0, 0x99, b"?"));
        assert_eq!(f.drops(Drop::UnknownSsrc), 1);
        f.send(&mut sub, &rtp_packet(111, 1, 0, 0x88, b"?"));
        assert_eq!(f.drops(Drop::UnexpectedRtp), 1);
        f.cmd(Command::AddSession {
            id: 3,
            role: Role::Publisher,
            rtcp_ssrc: 1,
        });
        f.cmd(Command::Bind {
            id: 3,
            addr: addr(3),
            nominated: false,
        });
        f.deliver(addr(3), &good);
        assert_eq!(f.drops(Drop::NotConnected), 1);
        assert_eq!(f.sink.out.len(), 2, "only the good packets were forwarded");
    }

    /// A NACK is answered from the cache with the subscriber's own rewrite and keys;
    /// what the cache lacks is asked of the publisher in its own sequence space.
    #[test]
    fn nack_from_cache_and_the_rest_from_the_publisher() {
        let (mut f, mut publisher, mut sub) = cached_video(None, 0);
        // The subscriber lost its 103 and 105 (source 3 and 5), and asks for 1000 too.
        let nack = rtcp::translated_nack(9, 0x42, &[103, 105, 1000], 0);
        f.send(&mut sub, &nack);
        let out = std::mem::take(&mut f.sink.out);
        assert_eq!(
            out.len(),
            3,
            "two resent, one NACK to the publisher: {out:?}"
        );
        for (k, want) in [(0usize, 3u8), (1, 5)] {
            assert_eq!(out[k].0, sub.addr);
            let p = unprotect(&mut sub, &out[k].1);
            assert_eq!(u16::from_be_bytes([p[2], p[3]]), 100 + want as u16);
            assert_eq!(&p[12..], &[want; 30]);
        }
        assert_eq!(out[2].0, publisher.addr);
        let asked = rtcp::parse(&unprotect(&mut publisher, &out[2].1)).unwrap();
        assert_eq!(
            asked,
            vec![Request::Nack {
                media_ssrc: 0xaaaa,
                seqs: vec![900]
            }]
        );
        assert_eq!(f.engine.counters.nack_resent.load(Ordering::Relaxed), 2);
    }

    /// With RTX negotiated, a NACKed packet comes back on the RTX stream (RFC 4588):
    /// its payload type and SSRC, its own consecutive sequence numbers, the original
    /// sequence number the subscriber knows in front of the original payload, the
    /// timestamp and marker as they were.
    #[test]
    fn retransmissions_go_on_the_rtx_stream_where_negotiated() {
        let (mut f, _publisher, mut sub) = cached_video(Some((97, 0x4242, 65_534)), 7);
        f.send(&mut sub, &rtcp::translated_nack(9, 0x42, &[103, 105], 0));
        f.send(&mut sub, &rtcp::translated_nack(9, 0x42, &[103], 0));
        let out = std::mem::take(&mut f.sink.out);
        assert_eq!(out.len(), 3, "{out:?}");
        let got: Vec<Vec<u8>> = out.iter().map(|(_, w)| unprotect(&mut sub, w)).collect();
        let rtx_seq = |p: &[u8]| u16::from_be_bytes([p[2], p[3]]);
        for (p, osn) in got.iter().zip([103u16, 105, 103]) {
            assert_eq!(p[1] & 0x7f, 97, "RTX payload type");
            assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 0x4242);
            assert_eq!(u16::from_be_bytes([p[12], p[13]]), osn, "OSN first");
            let src = (osn - 100) as u8;
            assert_eq!(&p[14..], &[src; 30], "then the original payload");
            assert_eq!(
                u32::from_be_bytes(p[4..8].try_into().unwrap()),
                3000 * src as u32 + 7
            );
            assert_eq!(p[1] & 0x80 != 0, src == 5, "marker as it was");
        }
        assert_eq!(
            rtx_seq(&got[0]),
            65_534,
            "the first RTX sequence number given"
        );
        assert_eq!(rtx_seq(&got[1]), rtx_seq(&got[0]).wrapping_add(1));
        assert_eq!(rtx_seq(&got[2]), rtx_seq(&got[0]).wrapping_add(2));
        assert_eq!(f.engine.downtracks(2)[0].1.nack_resent, 3);
    }

    /// Keyframe requests from many subscribers cost the publisher one PLI per interval.
    #[test]
    fn keyframe_requests_are_throttled_per_track() {
        let mut f = Fixture::new();
        let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
        let mut subs: Vec<Peer> = (2..6)
            .map(|i| {
                let down = Command::AddDownTrack {
                    track: 10,
                    sub: i,
                    ssrc_out: 0x40 + i,
                    pt_out: 96,
                    rtx: None,
                    remb: false,
                    dd_ext: None,
                    twcc_ext: None,
                    seq_delta: 0,
                    ts_delta: 0,
                };
                f.viewer(i, 10, Profile::AeadAes128Gcm, down)
            })
            .collect();
        assert_eq!(f.sink.out.len(), 1, "four viewers joined at once: one PLI");
        f.sink.out.clear();
        f.now += KEYFRAME_INTERVAL;
        for s in &mut subs {
            let pli = rtcp::pli(s.id, 0x40 + s.id);
            f.send(s, &pli);
        }
        assert_eq!(f.sink.out.len(), 1);
        let got = rtcp::parse(&unprotect(&mut publisher, &f.sink.out[0].1)).unwrap();
        assert_eq!(got, vec![Request::KeyFrame { media_ssrc: 0xaaaa }]);
        assert_eq!(
            f.engine.counters.keyframe_requests.load(Ordering::Relaxed),
            2
        );
    }

    /// New keys replace the old at once: packets under the old keys are refused.
    #[test]
    fn rekey_replaces_the_contexts() {
        let mut f = Fixture::new();
        let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Audio, 111, Some(5));
        let down = Command::AddDownTrack {
            track: 10,
            sub: 2,
            ssrc_out: 6,
            pt_out: 111,
            rtx: None,
            remb: false,
            dd_ext: None,
            twcc_ext: None,
            seq_delta: 0,
            ts_delta: 0,
        };
        let mut sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
        f.send(&mut publisher, &rtp_packet(111, 1, 0, 5, b"a"));
        let (up, down) = (
            key(Profile::AesCm128HmacSha1_80, 0x31),
            key(Profile::AesCm128HmacSha1_80, 0x32),
        );
        f.cmd(Command::SetKeys {
            id: 1,
            rx: up.clone(),
            tx: down,
        });
        f.send(&mut publisher, &rtp_packet(111, 2, 0, 5, b"b"));
        assert_eq!(
            f.drops(Drop::SrtpAuth),
            1,
            "old keys refused after the rekey"
        );
        publisher.tx = Context::new(&up);
        f.send(&mut publisher, &rtp_packet(111, 3, 0, 5, b"c"));
        let got: Vec<Vec<u8>> = std::mem::take(&mut f.sink.out)
            .iter()
            .map(|(_, w)| unprotect(&mut sub, w))
            .collect();
        assert_eq!(got.iter().map(|p| p[12]).collect::<Vec<_>>(), b"ac");
    }

    /// Reports once per interval: an SR per down-track to its subscriber in the
    /// subscriber's SSRC, an RR to the publisher; a full sink counts a send failure.
    #[test]
    fn reports_and_a_full_sink() {
        let mut f = Fixture::new();
        let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Audio, 111, Some(5));
        let down = Command::AddDownTrack {
            track: 10,
            sub: 2,
            ssrc_out: 6,
            pt_out: 111,
            rtx: None,
            remb: false,
            dd_ext: None,
            twcc_ext: None,
            seq_delta: 0,
            ts_delta: 0,
        };
        let mut sub = f.viewer(2, 10, Profile::AeadAes128Gcm, down);
        f.send(&mut publisher, &rtp_packet(111, 1, 0, 5, b"a"));
        f.sink.out.clear();
        f.engine
            .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
        assert!(f.sink.out.is_empty(), "not due yet");
        // A timer that fires late keeps the schedule: the next report is due one
        // interval after the last one was due, not after the late firing.
        // (The transport feedback timer, earlier, sends nothing: no twcc here.)
        assert!(f.engine.poll_timeout() <= f.engine.next_report);
        let due = f.engine.next_report;
        f.now = due + Duration::from_millis(10);
        f.engine
            .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
        assert_eq!(f.engine.next_report, due + REPORT_INTERVAL);
        let out = std::mem::take(&mut f.sink.out);
        assert_eq!(out.len(), 2);
        let (sub_addr, pub_addr) = (sub.addr, publisher.addr);
        let sr = unprotect(&mut sub, &out.iter().find(|o| o.0 == sub_addr).unwrap().1);
        assert_eq!(
            (sr[1], u32::from_be_bytes(sr[4..8].try_into().unwrap())),
            (200, 6)
        );
        let rr = unprotect(
            &mut publisher,
            &out.iter().find(|o| o.0 == pub_addr).unwrap().1,
        );
        assert_eq!(rr[1], 201);
        // The subscriber's RR about our SR: loss and jitter as reported, the RTT from
        // its echo of the SR's NTP time minus the time it held it.
        let lsr = u32::from_be_bytes(sr[10..14].try_into().unwrap());
        f.now += Duration::from_millis(80);
        let block = rtcp::ReportBlock {
            media_ssrc: 6,
            fraction_lost: 32,
            total_lost: 3,
            highest_seq: 1,
            jitter: 480, // 10 ms at 48 kHz
            lsr,
            dlsr: 65536 / 20, // held 50 ms
        };
        let report = |b: rtcp::ReportBlock| {
            rtcp::receiver_report(
                99,
                vec![::rtcp::reception_report::ReceptionReport {
                    ssrc: b.media_ssrc,
                    fraction_lost: b.fraction_lost,
                    total_lost: b.total_lost as u32,
                    last_sequence_number: b.highest_seq,
                    jitter: b.jitter,
                    last_sender_report: b.lsr,
                    delay: b.dlsr,
                }],
            )
        };
        f.send(&mut sub, &report(block));
        let q = &f.engine.downtracks(2)[0].1.quality;
        assert_eq!((q.reports, q.fraction_lost, q.total_lost), (1, 32, 3));
        assert_eq!(q.loss_percent(), 12.5);
        assert_eq!(q.jitter, Duration::from_millis(10));
        let rtt = q.rtt.expect("an RTT from an echoed SR").as_millis();
        assert!((29..=31).contains(&rtt), "{rtt} ms");
        // An LSR that is not our last SR's gives no RTT; a block about an SSRC the
        // subscriber does not get changes nothing.
        let mut f2 = f.engine.downtracks(2)[0].1.quality.clone();
        f2.rtt = None;
        f2.update(
            &rtcp::ReportBlock {
                lsr: lsr ^ 1,
                ..block
            },
            48_000,
            f.now,
        );
        assert_eq!(f2.rtt, None);
        f.send(
            &mut sub,
            &report(rtcp::ReportBlock {
                media_ssrc: 77,
                fraction_lost: 255,
                ..block
            }),
        );
        assert_eq!(f.engine.downtracks(2)[0].1.quality.fraction_lost, 32);
        f.sink.full = true;
        f.send(&mut publisher, &rtp_packet(111, 2, 0, 5, b"b"));
        assert_eq!(f.drops(Drop::SendFailed), 1);
    }

    /// A subscriber leaving removes its copies; a publisher leaving removes its tracks
    /// from its subscribers, who stay.
    #[test]
    fn sessions_leaving() {
        let mut f = Fixture::new();
        let mut publisher = f.publisher(Profile::AeadAes128Gcm, Kind::Audio, 111, Some(5));
        for id in [2, 3] {
            let down = Command::AddDownTrack {
                track: 10,
                sub: id,
                ssrc_out: id,
                pt_out: 111,
                rtx: None,
                remb: false,
                dd_ext: None,
                twcc_ext: None,
                seq_delta: 0,
                ts_delta: 0,
            };
            f.viewer(id, 10, Profile::AeadAes128Gcm, down);
        }
        f.cmd(Command::RemoveSession { id: 2 });
        f.send(&mut publisher, &rtp_packet(111, 1, 0, 5, b"a"));
        assert_eq!(
            f.sink.out.iter().map(|o| o.0).collect::<Vec<_>>(),
            vec![addr(3)]
        );
        f.cmd(Command::RemoveSession { id: 1 });
        assert!(f.engine.track(10).is_none());
        assert!(f.engine.downtracks(3).is_empty());
        f.deliver(
            addr(1),
            &[
                0x80, 111, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0,
            ],
        );
        assert_eq!(
            f.drops(Drop::UnknownPeer),
            1,
            "the gone publisher's address is unbound"
        );
    }

    /// Node A copies the publisher's SRTP down a trunk unchanged (no crypto per copy);
    /// node B, given the handover (key and highest index, past a rollover), decrypts
    /// and fans it out; a forged or replayed trunk packet is dropped and counted at B;
    /// B's keyframe request goes up the trunk with the trunk key and reaches the
    /// publisher at A.
    #[test]
    fn a_trunk_carries_ciphertext_and_the_relay_node_authenticates_and_fans_out() {
        let (b_addr, a_addr) = (addr(500), addr(900));
        let trunk = key(Profile::AeadAes128Gcm, 0x77);
        let mut a = Fixture::new();
        let mut publisher = a.publisher(Profile::AeadAes128Gcm, Kind::Video, 96, Some(0xaaaa));
        // Past a rollover before the relay starts: the handover must carry ROC 1.
        for seq in [65_535u16, 0] {
            a.send(&mut publisher, &rtp_packet(96, seq, 1, 0xaaaa, b"before"));
        }
        let (pub_key, streams) = a.engine.relay_handover(1).expect("keyed");
        assert_eq!(streams, vec![(0xaaaa, 1 << 16)]);
        a.add(50, Role::Relay);
        a.cmd(Command::BindRelay {
            id: 50,
            addr: b_addr,
            ssrcs: vec![0x7777],
        });
        a.cmd(Command::SetKeys {
            id: 50,
            rx: trunk.clone(),
            tx: trunk.clone(),
        });
        a.sink.out.clear();
        a.cmd(Command::AddTrunk {
            track: 10,
            relay: 50,
        });
        assert_eq!(a.sink.out.len(), 1, "a new branch asks for a keyframe");
        assert_eq!(a.sink.out[0].0, publisher.addr);
        a.sink.out.clear();
        let sent: Vec<Vec<u8>> = [1u16, 2, 3]
            .iter()
            .map(|&seq| a.send(&mut publisher, &rtp_packet(96, seq, 2, 0xaaaa, b"media")))
            .collect();
        let copies: Vec<_> = a.sink.out.drain(..).collect();
        assert_eq!(copies.len(), 3);
        for (c, w) in copies.iter().zip(&sent) {
            assert_eq!(c.0, b_addr);
            assert_eq!(
                &c.1, w,
                "the trunk copy is the publisher's packet, byte for byte"
            );
        }
        assert_eq!(a.engine.counters.relay_out.load(Ordering::Relaxed), 3);

        let mut b = Fixture::new();
        b.cmd(Command::AddSession {
            id: 1,
            role: Role::Publisher,
            rtcp_ssrc: 0x7777,
        });
        b.cmd(Command::AddTrack {
            id: 10,
            session: 1,
            kind: Kind::Video,
            pt: 96,
            clock_rate: 90_000,
            format: Format::Other,
            streams: vec![(None, Some(0xaaaa))],
            rid_ext: None,
            twcc_ext: None,
            level_ext: None,
            dd_ext: None,
        });
        b.cmd(Command::BindRelay {
            id: 1,
            addr: a_addr,
            ssrcs: vec![0xaaaa],
        });
        b.cmd(Command::SetKeys {
            id: 1,
            rx: pub_key,
            tx: trunk.clone(),
        });
        b.cmd(Command::ResumeRx { id: 1, streams });
        let down = Command::AddDownTrack {
            track: 10,
            sub: 100,
            ssrc_out: 0xbbbb,
            pt_out: 100,
            rtx: None,
            remb: false,
            dd_ext: None,
            twcc_ext: None,
            seq_delta: 10,
            ts_delta: 0,
        };
        let mut viewer = b.viewer(100, 10, Profile::AesCm128HmacSha1_80, down);
        // The viewer's keyframe request goes up the trunk, to A's media address.
        let pli: Vec<_> = b.sink.out.drain(..).collect();
        assert_eq!(pli.len(), 1);
        assert_eq!(pli[0].0, a_addr);
        for (_, w) in &copies {
            b.deliver(a_addr, w);
        }
        let got: Vec<u16> = b
            .sink
            .out
            .drain(..)
            .map(|(to, w)| {
                assert_eq!(to, viewer.addr);
                let plain = unprotect(&mut viewer, &w);
                assert_eq!(&plain[12..], b"media");
                u16::from_be_bytes([plain[2], plain[3]])
            })
            .collect();
        assert_eq!(
            got,
            vec![11, 12, 13],
            "decrypted at B with ROC 1, rewritten for the viewer"
        );
        // A packet not seen yet, one payload bit flipped on the trunk.
        let mut forged = Fixture::protect(&mut publisher, &rtp_packet(96, 4, 2, 0xaaaa, b"media"));
        forged[14] ^= 1;
        b.deliver(a_addr, &forged);
        b.deliver(a_addr, &copies[1].1);
        assert!(
            b.sink.out.is_empty(),
            "forged and replayed trunk packets are not forwarded"
        );
        assert_eq!(b.drops(Drop::SrtpAuth), 1);
        assert_eq!(b.drops(Drop::SrtpReplay), 1);
        // At A, past the throttle: B's PLI (trunk key, sender 0x7777) reaches the publisher.
        a.now += KEYFRAME_INTERVAL;
        a.deliver(b_addr, &pli[0].1);
        let out: Vec<_> = a.sink.out.drain(..).collect();
        assert_eq!(out.len(), 1, "one keyframe request to the publisher");
        assert_eq!(out[0].0, publisher.addr);
        let plain = unprotect(&mut publisher, &out[0].1);
        assert!(
            rtcp::parse(&plain)
                .unwrap()
                .iter()
                .any(|r| matches!(r, Request::KeyFrame { media_ssrc: 0xaaaa })),
            "a PLI for the publisher's own SSRC"
        );
    }

    /// An RTP packet with the rid in a one-byte header extension (id 10), as Chromium
    /// sends the first packets of each simulcast encoding.
    /// A publisher whose packets carry the transport-wide sequence extension gets,
    /// every feedback interval, transport feedback (RTCP RTPFB fmt 15) that lists
    /// them from the first one, across its SSRCs, with nothing before it is due and
    /// nothing when no packet arrived since.
    #[test]
    fn publishers_get_transport_feedback() {
        let mut f = Fixture::new();
        let mut publisher = f.peer(1, Role::Publisher, Profile::AeadAes128Gcm);
        for (id, kind, pt, ssrc) in [(10, Kind::Audio, 111, 5), (11, Kind::Video, 96, 6)] {
            f.cmd(Command::AddTrack {
                id,
                session: 1,
                kind,
                pt,
                clock_rate: if kind == Kind::Video { 90_000 } else { 48_000 },
                format: Format::Other,
                streams: vec![(None, Some(ssrc))],
                rid_ext: None,
                twcc_ext: Some(3),
                level_ext: None,
                dd_ext: None,
            });
        }
        // One-byte header extension, id 3, two bytes: the transport-wide sequence.
        let twcc_packet = |pt: u8, ssrc: u32, seq: u16, tseq: u16| {
            let mut p = vec![0x90, pt];
            p.extend_from_slice(&seq.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]);
            p.extend_from_slice(&ssrc.to_be_bytes());
            p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x31]);
            p.extend_from_slice(&tseq.to_be_bytes());
            p.push(0);
            p.extend_from_slice(b"media");
            p
        };
        for (i, tseq) in (65_534u16..=65_535).chain(0..4).enumerate() {
            let (pt, ssrc) = if i % 2 == 0 { (111, 5) } else { (96, 6) };
            f.now += Duration::from_millis(5);
            f.send(&mut publisher, &twcc_packet(pt, ssrc, i as u16, tseq));
        }
        f.sink.out.clear();
        let due = f.engine.poll_timeout();
        assert!(
            due <= f.now + FEEDBACK_INTERVAL,
            "feedback is the next timer"
        );
        f.engine.handle_timeout(
            due - Duration::from_millis(1),
            SystemTime::now(),
            &mut f.sink,
        );
        assert!(f.sink.out.is_empty(), "not due yet");
        f.now = due;
        f.engine
            .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
        let out = std::mem::take(&mut f.sink.out);
        assert_eq!(out.len(), 1, "one feedback packet");
        assert_eq!(out[0].0, publisher.addr);
        let plain = unprotect(&mut publisher, &out[0].1);
        assert_eq!((plain[0] & 0x1f, plain[1]), (15, 205), "RTPFB transport-cc");
        let fb = <::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc as
            webrtc_util::Unmarshal>::unmarshal(&mut &plain[..])
        .expect("well-formed transport feedback");
        assert_eq!(
            (fb.base_sequence_number, fb.packet_status_count),
            (65_534, 6),
            "every packet from the first, across the wrap"
        );
        assert_eq!(fb.recv_deltas.len(), 6, "all six received");
        assert_eq!(
            f.engine.counters.transport_feedback.load(Ordering::Relaxed),
            1
        );
        // Nothing new arrived: the next interval sends nothing.
        f.now += FEEDBACK_INTERVAL;
        f.engine
            .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
        assert!(f.sink.out.is_empty(), "no feedback without packets");
    }

    fn rid_packet(seq: u16, ts: u32, ssrc: u32, rid: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x90, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0xa0 | (rid.len() as u8 - 1)]);
        p.extend_from_slice(rid);
        p.resize(p.len() + 3 - rid.len(), 0);
        p.extend_from_slice(payload);
        p
    }

    /// Three encodings bound by their rid extension; a capped viewer gets the lowest,
    /// an uncapped one the highest, each starting at a keyframe of its layer (asked
    /// for); lifting the cap switches at the next keyframe of the top layer with one
    /// continuous sequence, timestamp and VP8 picture numbering; pausing stops it.
    #[test]
    fn simulcast_viewers_get_their_layer_and_switch_at_keyframes() {
        use crate::media::codec::tests::vp8;
        use crate::media::simulcast::UNCAPPED;
        let mut f = Fixture::new();
        let mut publisher = f.peer(1, Role::Publisher, Profile::AeadAes128Gcm);
        f.cmd(Command::AddTrack {
            id: 10,
            session: 1,
            kind: Kind::Video,
            pt: 96,
            clock_rate: 90_000,
            format: Format::Vp8,
            streams: ["q", "h", "f"]
                .map(|r| (Some(r.to_string()), None))
                .to_vec(),
            rid_ext: Some(10),
            twcc_ext: None,
            level_ext: None,
            dd_ext: None,
        });
        let viewer = |f: &mut Fixture, id: SessionId| {
            let down = Command::AddDownTrack {
                track: 10,
                sub: id,
                ssrc_out: 0x100 + id,
                pt_out: 96,
                rtx: None,
                remb: false,
                dd_ext: None,
                twcc_ext: None,
                seq_delta: 0,
                ts_delta: 0,
            };
            f.viewer(id, 10, Profile::AeadAes128Gcm, down)
        };
        let mut low = viewer(&mut f, 2);
        let mut high = viewer(&mut f, 3);
        f.cmd(Command::SetLayers {
            sub: 2,
            track: 10,
            max_layer: 0,
            max_temporal: UNCAPPED,
            paused: false,
        });
        f.sink.out.clear();
        // Each layer's SSRC is learned from the rid of its first packet; a rid we did
        // not answer is an unknown SSRC.
        let ssrcs = [0xa0u32, 0xa1, 0xa2];
        let rids: [&[u8]; 3] = [b"q", b"h", b"f"];
        for l in 0..3 {
            f.send(
                &mut publisher,
                &rid_packet(
                    100,
                    0,
                    ssrcs[l],
                    rids[l],
                    &vp8(10 * l as u16, 1, 0, true, false),
                ),
            );
        }
        f.send(
            &mut publisher,
            &rid_packet(1, 0, 0xbad, b"x", &vp8(0, 0, 0, true, true)),
        );
        assert_eq!(f.drops(Drop::UnknownSsrc), 1);
        let t = f.engine.track(10).unwrap();
        assert_eq!(
            t.streams.iter().map(|s| s.ssrc).collect::<Vec<_>>(),
            ssrcs.map(Some)
        );
        // No keyframe yet: nothing forwarded; a keyframe asked of each layer as it
        // became the best one received for a viewer.
        let plis: Vec<u32> = f
            .sink
            .out
            .drain(..)
            .map(|(to, w)| {
                assert_eq!(to, publisher.addr);
                match rtcp::parse(&unprotect(&mut publisher, &w)).unwrap()[0] {
                    Request::KeyFrame { media_ssrc } => media_ssrc,
                    ref r => panic!("{r:?}"),
                }
            })
            .collect();
        assert_eq!(plis, vec![0xa0, 0xa1, 0xa2]);
        // Keyframes on every layer (SSRCs now known: no extension needed).
        for l in 0..3u32 {
            f.send(
                &mut publisher,
                &rtp_packet(
                    96,
                    101,
                    3000,
                    ssrcs[l as usize],
                    &vp8(10 * l as u16 + 1, 2, 0, true, true),
                ),
            );
        }
        f.send(
            &mut publisher,
            &rtp_packet(96, 102, 6000, 0xa0, &vp8(2, 3, 0, true, false)),
        );
        f.send(
            &mut publisher,
            &rtp_packet(96, 102, 6000, 0xa2, &vp8(22, 3, 0, true, false)),
        );
        let got = |f: &mut Fixture, p: &mut Peer| -> Vec<(u16, u32, u16)> {
            let addr = p.addr;
            let mine: Vec<_> = f
                .sink
                .out
                .iter()
                .filter(|o| o.0 == addr)
                .map(|o| o.1.clone())
                .collect();
            f.sink.out.retain(|o| o.0 != addr);
            mine.iter()
                .map(|w| {
                    let plain = unprotect(p, w);
                    let hlen = rtp::header_len(&plain).unwrap();
                    let d = Vp8Descriptor::parse(&plain[hlen..]).unwrap();
                    (
                        u16::from_be_bytes([plain[2], plain[3]]),
                        u32::from_be_bytes(plain[4..8].try_into().unwrap()),
                        d.picture_id.unwrap().1,
                    )
                })
                .collect()
        };
        assert_eq!(
            got(&mut f, &mut low),
            vec![(101, 3000, 1), (102, 6000, 2)],
            "layer 0 from its keyframe"
        );
        assert_eq!(
            got(&mut f, &mut high),
            vec![(101, 3000, 21), (102, 6000, 22)],
            "layer 2 from its keyframe"
        );
        // The cap lifted: a delta frame of layer 2 waits, its keyframe switches; 30 ms
        // (2,700 ticks) after the last packet sent.
        f.cmd(Command::SetLayers {
            sub: 2,
            track: 10,
            max_layer: UNCAPPED,
            max_temporal: UNCAPPED,
            paused: false,
        });
        f.send(
            &mut publisher,
            &rtp_packet(96, 103, 9000, 0xa2, &vp8(23, 3, 0, true, false)),
        );
        f.send(
            &mut publisher,
            &rtp_packet(96, 103, 9000, 0xa0, &vp8(3, 3, 0, true, false)),
        );
        f.now += Duration::from_millis(30);
        f.send(
            &mut publisher,
            &rtp_packet(96, 104, 12000, 0xa2, &vp8(24, 4, 0, true, true)),
        );
        f.send(
            &mut publisher,
            &rtp_packet(96, 104, 12000, 0xa0, &vp8(4, 4, 0, true, false)),
        );
        assert_eq!(
            got(&mut f, &mut low),
            vec![(103, 9000, 3), (104, 11_700, 4)],
            "continuous across the switch"
        );
        assert_eq!(got(&mut f, &mut high).len(), 2);
        let low_dt = &f.engine.downtracks(2)[0].1.layering;
        assert_eq!((low_dt.current, low_dt.switches), (Some(2), 2));
        // Paused: nothing, even at a keyframe.
        f.cmd(Command::SetLayers {
            sub: 2,
            track: 10,
            max_layer: UNCAPPED,
            max_temporal: UNCAPPED,
            paused: true,
        });
        f.send(
            &mut publisher,
            &rtp_packet(96, 105, 15000, 0xa2, &vp8(25, 5, 0, true, true)),
        );
        assert!(got(&mut f, &mut low).is_empty());
        assert_eq!(got(&mut f, &mut high).len(), 1);
        // Bandwidth: over a second, the encodings' rates measured, the uncapped
        // viewer's reports say 70 % of its packets were lost, and its bandwidth limit
        // takes it down to the lowest layer, switching at that layer's keyframe
        // (asked for).
        let rr = |lost: u32, highest: u32| {
            rtcp::receiver_report(
                0x333,
                vec![::rtcp::reception_report::ReceptionReport {
                    ssrc: 0x103,
                    total_lost: lost,
                    last_sequence_number: highest,
                    ..Default::default()
                }],
            )
        };
        f.send(&mut high, &rr(0, 100));
        for k in 0..4u16 {
            f.now += Duration::from_millis(250);
            for (l, ssrc) in ssrcs.iter().enumerate() {
                let pic = 10 * l as u16 + 6 + k;
                let (seq, ts) = (106 + k, 18000 + 3000 * k as u32);
                f.send(
                    &mut publisher,
                    &rtp_packet(96, seq, ts, *ssrc, &vp8(pic, 6, 0, true, false)),
                );
            }
        }
        f.engine
            .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
        assert!(
            f.engine
                .track(10)
                .unwrap()
                .streams
                .iter()
                .all(|st| st.rate_bps > 0)
        );
        f.sink.out.clear();
        f.send(&mut high, &rr(70, 200));
        let d = &f.engine.downtracks(3)[0].1;
        assert_eq!(d.layering.bw_limit, 0, "{:?}", d.bwe);
        assert!(d.bwe.estimate.is_some());
        f.send(
            &mut publisher,
            &rtp_packet(96, 110, 30000, 0xa2, &vp8(30, 7, 0, true, false)),
        );
        let d = &f.engine.downtracks(3)[0].1;
        assert_eq!(
            d.layering.target,
            Some(0),
            "the limit moves its target down"
        );
        let pub_addr = publisher.addr;
        let plis: Vec<Request> = f
            .sink
            .out
            .drain(..)
            .filter(|o| o.0 == pub_addr)
            .flat_map(|(_, w)| rtcp::parse(&unprotect(&mut publisher, &w)).unwrap())
            .collect();
        assert!(
            plis.contains(&Request::KeyFrame { media_ssrc: 0xa0 }),
            "{plis:?}"
        );
        f.send(
            &mut publisher,
            &rtp_packet(96, 110, 30000, 0xa0, &vp8(10, 8, 0, true, true)),
        );
        assert_eq!(got(&mut f, &mut high).len(), 1, "layer 0's keyframe");
        assert_eq!(f.engine.downtracks(3)[0].1.layering.current, Some(0));
    }

    /// VP9 SVC (three spatial layers, two temporal) to three viewers: capped to
    /// spatial layer 0, to temporal layer 0, and uncapped. Each gets one continuous
    /// numbering across the 16-bit wrap with the layers it does not get taken out, the
    /// picture ends where its highest layer ends (marker), a NACK maps back to the
    /// source packet, and a lifted cap takes effect at the next keyframe it asked for.
    #[test]
    fn svc_viewers_get_the_layers_their_caps_allow() {
        use crate::media::codec::tests::vp9;
        use crate::media::simulcast::UNCAPPED;
        let mut f = Fixture::new();
        let mut publisher = f.video_publisher(Format::Vp9, 98, None, None);
        let mut viewers: Vec<Peer> = (2..5)
            .map(|id| f.track_viewer(id, 98, 0, None, None))
            .collect();
        let caps = [(0, UNCAPPED), (UNCAPPED, 0), (UNCAPPED, UNCAPPED)];
        for (id, (max_layer, max_temporal)) in (2..5).zip(caps) {
            f.cmd(Command::SetLayers {
                sub: id,
                track: 10,
                max_layer,
                max_temporal,
                paused: false,
            });
        }
        // Picture k: three spatial layer frames of one packet each, temporal layer
        // k % 2, the marker on the last; picture 0 is a keyframe.
        let mut seq = 65_530u16;
        let send = |f: &mut Fixture, publisher: &mut Peer, seq: &mut u16, k: u16, key: bool| {
            for sid in 0..3u8 {
                let mut p = rtp_packet(
                    98,
                    *seq,
                    3000 * k as u32,
                    0xaaaa,
                    &vp9(k, sid, (k % 2) as u8, true, true, key, true),
                );
                p[1] |= 0x80 * (sid == 2) as u8;
                f.send(publisher, &p);
                *seq = seq.wrapping_add(1);
            }
        };
        for k in 0..6 {
            send(&mut f, &mut publisher, &mut seq, k, k == 0);
        }
        // What each viewer got: (seq, marker, spatial, temporal, picture id).
        let got = |f: &mut Fixture, v: &mut Peer| -> Vec<(u16, bool, u8, u8, u16)> {
            f.take_for(v)
                .into_iter()
                .map(|p| {
                    let d = crate::media::codec::Vp9Descriptor::parse(&p[12..]).unwrap();
                    (
                        u16::from_be_bytes([p[2], p[3]]),
                        p[1] & 0x80 != 0,
                        d.sid,
                        d.tid,
                        d.picture_id.unwrap(),
                    )
                })
                .collect()
        };
        let low = got(&mut f, &mut viewers[0]);
        assert_eq!(
            low,
            (0..6u16)
                .map(|k| (65_530u16.wrapping_add(k), true, 0, (k % 2) as u8, k))
                .collect::<Vec<_>>(),
            "spatial layer 0 of every picture, each ending its picture"
        );
        let slow = got(&mut f, &mut viewers[1]);
        let want: Vec<_> = [0u16, 2, 4]
            .iter()
            .flat_map(|k| (0..3u8).map(move |s| (*k, s)))
            .enumerate()
            .map(|(i, (k, s))| (65_530u16.wrapping_add(i as u16), s == 2, s, 0, k))
            .collect();
        assert_eq!(
            slow, want,
            "temporal layer 0, numbered without the holes; VP9 picture ids kept"
        );
        let all = got(&mut f, &mut viewers[2]);
        assert_eq!(all.len(), 18);
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, p)| p.0 == 65_530u16.wrapping_add(i as u16))
        );
        // A NACK of the capped viewer's fourth packet: the source of picture 3's
        // spatial layer 0 (not the fourth source packet), marker set as sent.
        let nack = rtcp::translated_nack(9, 0x102, &[65_533], 0);
        f.send(&mut viewers[0], &nack);
        // (A fresh receive context: the one above has seen that index.)
        let seen = std::mem::replace(
            &mut viewers[0].rx,
            Context::new(&key(Profile::AeadAes128Gcm, 2 ^ 0xff)),
        );
        assert_eq!(got(&mut f, &mut viewers[0]), [(65_533, true, 0, 1, 3)]);
        viewers[0].rx = seen;
        // The cap lifted: a delta picture cannot start layers 1 and 2; a keyframe is
        // asked for, and it brings them.
        // (Past the throttle of the keyframe asked when the viewers joined.)
        f.now += KEYFRAME_INTERVAL;
        f.sink.out.clear();
        f.cmd(Command::SetLayers {
            sub: 2,
            track: 10,
            max_layer: UNCAPPED,
            max_temporal: UNCAPPED,
            paused: false,
        });
        send(&mut f, &mut publisher, &mut seq, 6, false);
        assert_eq!(got(&mut f, &mut viewers[0]), [(0, true, 0, 0, 6)]);
        let plis = f
            .sink
            .out
            .iter()
            .filter(|(to, w)| {
                *to == publisher.addr
                    && matches!(
                        rtcp::parse(&unprotect(&mut publisher, w)).unwrap()[0],
                        Request::KeyFrame { media_ssrc: 0xaaaa }
                    )
            })
            .count();
        assert_eq!(plis, 1, "one keyframe asked of the publisher");
        f.sink.out.clear();
        send(&mut f, &mut publisher, &mut seq, 7, true);
        assert_eq!(
            got(&mut f, &mut viewers[0]),
            [(1, false, 0, 1, 7), (2, false, 1, 1, 7), (3, true, 2, 1, 7)]
        );
    }

    /// VP8 with three temporal layers (0, 2, 1, 2, ...) to viewers capped at temporal
    /// layers 0 and 1: each gets its frames with one continuous sequence and picture
    /// id numbering (libwebrtc waits for a missing picture id), TL0PICIDX as sent; a
    /// lifted cap takes effect at a layer sync frame (Y) of the layer.
    #[test]
    fn vp8_temporal_caps_renumber_sequence_and_picture_ids() {
        use crate::media::codec::tests::vp8;
        use crate::media::simulcast::UNCAPPED;
        let mut f = Fixture::new();
        let mut publisher = f.video_publisher(Format::Vp8, 96, None, None);
        let mut viewers: Vec<Peer> = (2..4)
            .map(|id| {
                let v = f.track_viewer(id, 96, 1000, None, None);
                f.cmd(Command::SetLayers {
                    sub: id,
                    track: 10,
                    max_layer: UNCAPPED,
                    max_temporal: id as u8 - 2,
                    paused: false,
                });
                v
            })
            .collect();
        // Frame k (one packet, source seq 10 + k): picture id 32_760 + k (it wraps at
        // 2^15), temporal layer of the 0, 2, 1, 2 pattern, TL0PICIDX counting TL0s.
        let frame = |k: u16, sync: bool| {
            let tid = [0u8, 2, 1, 2][k as usize % 4];
            let mut payload = vp8((32_760 + k) & 0x7fff, (k / 4) as u8, tid, true, k == 0);
            if sync {
                payload[5] |= 0x20;
            }
            rtp_packet(96, 10 + k, 3000 * k as u32, 0xaaaa, &payload)
        };
        for k in 0..12 {
            f.send(&mut publisher, &frame(k, false));
        }
        let got = |f: &mut Fixture, v: &mut Peer| -> Vec<(u16, u16, u8, u8)> {
            f.take_for(v)
                .into_iter()
                .map(|p| {
                    let d = Vp8Descriptor::parse(&p[12..]).unwrap();
                    (
                        u16::from_be_bytes([p[2], p[3]]),
                        d.picture_id.unwrap().1,
                        d.tl0.unwrap().1,
                        d.tid.unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(
            got(&mut f, &mut viewers[0]),
            [
                (1010, 32_760, 0, 0),
                (1011, 32_761, 1, 0),
                (1012, 32_762, 2, 0)
            ]
        );
        assert_eq!(
            got(&mut f, &mut viewers[1]),
            [
                (1010, 32_760, 0, 0),
                (1011, 32_761, 0, 1),
                (1012, 32_762, 1, 0),
                (1013, 32_763, 1, 1),
                (1014, 32_764, 2, 0),
                (1015, 32_765, 2, 1),
            ]
        );
        // Lifted to every layer: the next TL2 frame without Y stays dropped, the TL1
        // sync frame starts layer 1, the TL2 sync frame layer 2; numbering continues
        // (source picture ids wrap to 0 meanwhile).
        f.cmd(Command::SetLayers {
            sub: 2,
            track: 10,
            max_layer: UNCAPPED,
            max_temporal: UNCAPPED,
            paused: false,
        });
        f.sink.out.clear();
        for (k, sync) in [(12, false), (13, false), (14, true), (15, true)] {
            f.send(&mut publisher, &frame(k, sync));
        }
        assert_eq!(
            got(&mut f, &mut viewers[0]),
            [
                (1013, 32_763, 3, 0),
                (1014, 32_764, 3, 1),
                (1015, 32_765, 3, 2)
            ]
        );
    }

    /// AV1 SVC (two spatial layers) read from the dependency descriptor: a viewer
    /// that negotiated it under the publisher's id gets both layers as sent, one under
    /// another id gets the descriptor renamed, and one without it gets spatial layer
    /// 0 only, each of its frames ending its picture.
    #[test]
    fn av1_layers_come_from_the_dependency_descriptor() {
        use crate::media::codec::tests::dd;
        let mut f = Fixture::new();
        let mut publisher = f.video_publisher(Format::Av1, 45, None, Some(12));
        let mut viewers: Vec<Peer> = [(2, Some(12)), (3, Some(9)), (4, None)]
            .into_iter()
            .map(|(id, dd_ext)| f.track_viewer(id, 45, 0, dd_ext, None))
            .collect();
        // Two temporal units of two spatial layer frames (one packet each); the first
        // is a keyframe whose descriptor carries the L2T1 structure.
        for k in 0..2u16 {
            for sid in 0..2u8 {
                let ext = dd(
                    true,
                    true,
                    sid,
                    2 * k + sid as u16,
                    (k == 0 && sid == 0).then_some(&[2, 3][..]),
                );
                let mut p = vec![0x90, 45 | if sid == 1 { 0x80 } else { 0 }];
                p.extend_from_slice(&(100 + 2 * k + sid as u16).to_be_bytes());
                p.extend_from_slice(&(3000 * k as u32).to_be_bytes());
                p.extend_from_slice(&0xaaaau32.to_be_bytes());
                let words = (1 + ext.len()).div_ceil(4);
                p.extend_from_slice(&[0xbe, 0xde, 0, words as u8]);
                p.push((12 << 4) | (ext.len() as u8 - 1));
                p.extend_from_slice(&ext);
                p.resize(16 + 4 * words, 0);
                // Aggregation header: N on the keyframe's first packet.
                p.extend_from_slice(&[if k == 0 && sid == 0 { 0x18 } else { 0x10 }, sid]);
                f.send(&mut publisher, &p);
            }
        }
        // (seq, marker, template id under 12, under 9, spatial layer in the payload)
        type Got = (u16, bool, Option<u8>, Option<u8>, u8);
        let got = |f: &mut Fixture, v: &mut Peer| -> Vec<Got> {
            f.take_for(v)
                .into_iter()
                .map(|p| {
                    let len = rtp::header_len(&p).unwrap();
                    let id_of = |id| rtp::extension(&p, id).map(|e| e[0] & 0x3f);
                    (
                        u16::from_be_bytes([p[2], p[3]]),
                        p[1] & 0x80 != 0,
                        id_of(12),
                        id_of(9),
                        p[len + 1],
                    )
                })
                .collect()
        };
        assert_eq!(
            got(&mut f, &mut viewers[0]),
            [
                (100, false, Some(0), None, 0),
                (101, true, Some(1), None, 1),
                (102, false, Some(0), None, 0),
                (103, true, Some(1), None, 1)
            ]
        );
        assert_eq!(
            got(&mut f, &mut viewers[1]),
            [
                (100, false, None, Some(0), 0),
                (101, true, None, Some(1), 1),
                (102, false, None, Some(0), 0),
                (103, true, None, Some(1), 1)
            ],
            "the descriptor under the subscriber's id"
        );
        assert_eq!(
            got(&mut f, &mut viewers[2]),
            [(100, true, Some(0), None, 0), (101, true, Some(0), None, 0)],
            "spatial layer 0, each frame ending its picture"
        );
        let t = f.engine.track(10).unwrap();
        assert_eq!(t.streams[0].seen.top(f.now, LAYER_IDLE), (1, 0));
    }

    /// Viewers that negotiated transport-cc get their own transport-wide numbering in
    /// every copy (under their own extension id: renamed where it differs from the
    /// publisher's), and their feedback drives the delay-based estimate: arrivals that
    /// fall further and further behind the sends are over-use, which bounds the layer.
    #[test]
    fn viewers_transport_feedback_drives_the_delay_estimate() {
        let mut f = Fixture::new();
        let mut publisher = f.video_publisher(Format::Other, 96, Some(3), None);
        let mut viewers: Vec<Peer> = [(2, Some(3)), (3, Some(5)), (4, None)]
            .into_iter()
            .map(|(id, twcc_ext)| f.track_viewer(id, 96, 0, None, twcc_ext))
            .collect();
        // 2 s of 1,000-byte packets every 10 ms (800 kbit/s), the publisher's own
        // transport-wide numbers (from 40,000) in extension 3.
        // Per viewer: (seq, transport-wide number under id 3, under id 5).
        type Numbered = (u16, Option<u16>, Option<u16>);
        let mut got: Vec<Vec<Numbered>> = vec![vec![]; 3];
        let start = f.now;
        for i in 0..200u16 {
            let mut p = vec![0x90, 96];
            p.extend_from_slice(&i.to_be_bytes());
            p.extend_from_slice(&(900 * i as u32).to_be_bytes());
            p.extend_from_slice(&0xaaaau32.to_be_bytes());
            p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x31]);
            p.extend_from_slice(&(40_000 + i).to_be_bytes());
            p.push(0);
            p.resize(1_000, 0x5a);
            f.now = start + Duration::from_millis(10 * i as u64);
            f.send(&mut publisher, &p);
            for (k, v) in viewers.iter_mut().enumerate() {
                for p in f.take_for(v) {
                    let ext = |id| rtp::extension(&p, id).map(|e| u16::from_be_bytes([e[0], e[1]]));
                    got[k].push((u16::from_be_bytes([p[2], p[3]]), ext(3), ext(5)));
                }
            }
            f.sink.out.clear();
        }
        assert!(
            got[0]
                .iter()
                .enumerate()
                .all(|(i, g)| *g == (i as u16, Some(i as u16), None))
        );
        assert!(
            got[1]
                .iter()
                .enumerate()
                .all(|(i, g)| *g == (i as u16, None, Some(i as u16))),
            "renamed to the viewer's id"
        );
        assert!(
            got[2]
                .iter()
                .enumerate()
                .all(|(i, g)| *g == (i as u16, Some(40_000 + i as u16), None)),
            "no transport-cc: as the publisher sent it"
        );
        // Viewer 2's feedback every 100 ms: its link delivers 400 kbit/s, so each
        // packet arrives 20 ms after the one before (sent 10 ms apart): a queue.
        let mut rec = interceptor::twcc::Recorder::new(0x5002);
        let mut feedbacks = 0;
        for i in 0..200u16 {
            rec.record(0x102, i, 1_000_000 + 20_000 * i as i64);
            if i % 10 == 9 {
                let fb = ::rtcp::packet::marshal(&rec.build_feedback_packet()).unwrap();
                f.now = start + Duration::from_millis(20 * i as u64 + 30);
                f.send(&mut viewers[0], &fb);
                feedbacks += 1;
            }
        }
        assert_eq!(feedbacks, 20);
        let t = f.engine.transport_cc(2).unwrap();
        assert_eq!(t.usage, bwe::Usage::Over, "{t:?}");
        assert!(t.overuses >= 1);
        let e = t.estimate.unwrap();
        assert!((300_000..=360_000).contains(&e), "0.85 x 400 kbit/s: {e}");
        assert_eq!(f.engine.downtracks(2)[0].1.bwe.delay, Some(e));
        assert_eq!(
            f.engine.counters.bwe_delay_overuses.load(Ordering::Relaxed),
            t.overuses
        );
        assert!(f.engine.transport_cc(4).is_none());
    }

    /// A padding probe: every feedback interval, its rate's worth of padding-only
    /// packets on the viewer's RTX stream (RTX payload type, SSRC and sequence, the P
    /// bit and the padding count, no payload), each with the viewer's next
    /// transport-wide number; the media numbering untouched.
    #[test]
    fn padding_probes_go_on_the_rtx_stream_with_transport_numbers() {
        let (mut f, mut publisher, _) = cached_video(None, 0);
        f.add(5, Role::Subscriber);
        f.cmd(Command::AddDownTrack {
            track: 10,
            sub: 5,
            ssrc_out: 0x55,
            pt_out: 96,
            rtx: Some((97, 0x4242, 1_000)),
            remb: false,
            dd_ext: None,
            twcc_ext: Some(3),
            seq_delta: 0,
            ts_delta: 0,
        });
        let mut v = f.connect(5, Profile::AeadAes128Gcm);
        // The publisher's packet has no transport-wide extension: the copy gets one
        // (number 0), the payload moved up behind it.
        f.send(
            &mut publisher,
            &rtp_packet(96, 10, 30_000, 0xaaaa, &[1; 30]),
        );
        let media: Vec<Vec<u8>> = f.take_for(&mut v);
        let [copy] = &media[..] else {
            panic!("{media:?}")
        };
        assert_eq!(rtp::extension(copy, 3), Some(&[0, 0][..]));
        let hlen = rtp::header_len(copy).unwrap();
        assert_eq!((hlen, &copy[hlen..]), (20, &[1u8; 30][..]));
        f.sink.out.clear();
        let d = f
            .engine
            .tracks
            .get_mut(&10)
            .unwrap()
            .downs
            .iter_mut()
            .find(|d| d.sub == 5)
            .unwrap();
        assert!(d.bwe.pad_capable);
        d.bwe.probe_with_padding(1, 500_000, 400_000);
        f.now += FEEDBACK_INTERVAL;
        f.engine
            .handle_timeout(f.now, SystemTime::now(), &mut f.sink);
        let pads: Vec<Vec<u8>> = f.take_for(&mut v);
        // 400 kbit/s for 100 ms: 5,000 octets in packets of 224.
        assert_eq!(pads.len(), 5_000usize.div_ceil(PADDING), "{}", pads.len());
        for (i, p) in pads.iter().enumerate() {
            assert_eq!(p[0] & 0x20, 0x20, "P bit");
            assert_eq!(p[1], 97);
            assert_eq!(u16::from_be_bytes([p[2], p[3]]), 1_000 + i as u16);
            assert_eq!(u32::from_be_bytes([p[8], p[9], p[10], p[11]]), 0x4242);
            assert_eq!(
                u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                30_000,
                "the last media timestamp"
            );
            let twcc = rtp::extension(p, 3).unwrap();
            // After the media copy's 0.
            assert_eq!(u16::from_be_bytes([twcc[0], twcc[1]]), 1 + i as u16);
            let hlen = rtp::header_len(p).unwrap();
            assert_eq!(*p.last().unwrap() as usize, p.len() - hlen, "all padding");
        }
        assert_eq!(
            f.engine.counters.bwe_padding.load(Ordering::Relaxed),
            pads.len() as u64
        );
        // A NACK of the media copy: resent on RTX, its transport-wide extension added
        // in front of the original sequence number and payload.
        f.sink.out.clear();
        f.send(&mut v, &rtcp::translated_nack(9, 0x55, &[10], 0));
        let resent: Vec<Vec<u8>> = f.take_for(&mut v);
        let [r] = &resent[..] else {
            panic!("{resent:?}")
        };
        let hlen = rtp::header_len(r).unwrap();
        assert_eq!((r[1] & 0x7f, hlen), (97, 20));
        assert_eq!(&r[hlen..hlen + 2], &10u16.to_be_bytes(), "OSN");
        assert_eq!(&r[hlen + 2..], &[1u8; 30][..]);
        let twcc = rtp::extension(r, 3).unwrap();
        assert_eq!(
            u16::from_be_bytes([twcc[0], twcc[1]]),
            1 + pads.len() as u16
        );
    }
}
