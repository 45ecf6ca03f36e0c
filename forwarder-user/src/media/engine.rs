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
mod tests;
