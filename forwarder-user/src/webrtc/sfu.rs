//! The SFU's signalling state: rooms and sessions as signalling knows them (ICE,
//! DTLS, the m-lines of each offer), and the commands that program the media engines
//! as sessions join, bind, key and leave.
//!
//! Everything per packet lives in the engines and the loops that drive them
//! ([`crate::datapath::engines`]): this module only queues commands to them, reads
//! them for the API and /metrics, and answers the STUN and DTLS the socket hands up
//! ([`Signalling`]). The control plane never waits for media: a command goes to its
//! room's engine queue and is applied before that engine's next batch.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{Rng, distributions::Alphanumeric};
use serde::Serialize;
use tokio::{net::UdpSocket, sync::mpsc};

use crate::datapath::{
    engines::{Engines, Signalling},
    xsk::XskQueue,
};
use crate::dataplane::maps::PeerTable;
pub use crate::media::engine::Role;
pub use crate::media::{Counters, Drop};
use crate::media::{
    Kind, Transmit, bump,
    codec::Format,
    engine::{Command, Engine, LAYER_IDLE, SessionId, TrackId},
    simulcast::UNCAPPED,
    speaker::Dominant,
    srtp::{MasterKey, Profile},
};

use super::{
    dtls::{self, ClientHelloReader, DemuxConn, HelloState, Identity},
    sdp::{AnswerMedia, AnswerParams, Codec, Offer, OfferError, build_answer},
};

/// A track a publisher sends us, as its offer described it.
pub struct Track {
    pub kind: Kind,
    pub mid: String,
    pub codec: Codec,
    /// Its encodings, lowest quality first: (rid, SSRC). A plain track has one, with
    /// the SSRC of a=ssrc if the offer named one; a simulcast track one per rid.
    pub streams: Vec<(Option<String>, Option<u32>)>,
    /// The rtp-stream-id header extension's id (simulcast).
    pub rid_ext: Option<u8>,
    /// The transport-wide sequence number extension's id: we send the publisher
    /// transport feedback.
    pub twcc_ext: Option<u8>,
    /// The audio level extension's id (audio): the room's active speaker.
    pub level_ext: Option<u8>,
    /// AV1's dependency descriptor extension's id: an SVC stream's layers.
    pub dd_ext: Option<u8>,
    pub track_id: String,
    /// The engine's handle of this track.
    pub media: TrackId,
}

/// Which publisher's track one of a subscriber's m-lines carries, with the SSRC and
/// payload type the answer announced for it. The engine's down-track is made from
/// this once (`AddDownTrack`) and holds the rewrite and the counters.
pub struct Subscription {
    /// The subscriber's m-line that carries it (how the layer API names it).
    pub mid: String,
    pub src_session: String,
    pub track: TrackId,
    pub kind: Kind,
    pub ssrc_out: u32,
    pub pt_out: u8,
    /// The m-line's codec as answered (a slot back in `reserved` if the publisher goes).
    pub codec: Codec,
    /// RTX (payload type, SSRC) as answered, if the m-line offered it.
    pub rtx: Option<(u8, u32)>,
    /// AV1: the dependency descriptor's id as answered, if the m-line offered it.
    pub dd_ext: Option<u8>,
    /// The transport-wide sequence extension's id as answered (with transport-cc).
    pub twcc_ext: Option<u8>,
}

/// A subscriber's m-line answered before any track could fill it (the subscriber
/// joined before the publisher): a track published later with a compatible codec
/// gets it, under the SSRC the answer already announced.
pub struct Slot {
    pub mid: String,
    pub kind: Kind,
    pub codec: Codec,
    pub ssrc_out: u32,
    pub rtx: Option<(u8, u32)>,
    pub dd_ext: Option<u8>,
    pub twcc_ext: Option<u8>,
}

pub struct Session {
    pub id: String,
    /// The engine's handle of this session.
    pub media: SessionId,
    pub room: String,
    pub role: Role,
    /// The HTTP client address that created it (for the per-source cap).
    pub http_source: std::net::IpAddr,
    ice_ufrag: String,
    ice_pwd: String,
    remote_ufrag: String,
    remote_fingerprint: (String, Vec<u8>),
    created: Instant,
    last_consent: Option<Instant>,
    /// Every address a valid check came from; media from any of them is this session's.
    pub addrs: Vec<SocketAddr>,
    /// The pair the client nominated (USE-CANDIDATE): media goes there.
    pub nominated: Option<SocketAddr>,
    /// Where the DTLS task sends: the address the client's DTLS last came from.
    dtls_peer: Arc<Mutex<SocketAddr>>,
    dtls_in: Option<mpsc::Sender<Vec<u8>>>,
    /// The SRTP profile once DTLS is up (the keys are the engine's).
    pub profile: Option<Profile>,
    /// How many datagrams the client's first ClientHello took (2 with Chromium's
    /// post-quantum key share) and the SRTP profiles it offered.
    hello: Option<(usize, Vec<u16>)>,
    /// Our SSRC in RTCP we originate towards this peer.
    rtcp_ssrc: u32,
    pub tracks: Vec<Track>,
    pub downtracks: Vec<Subscription>,
    /// A publisher of an upstream node, relayed here over a cascade trunk.
    pub relay: Option<super::cascade::RelayIn>,
    /// Subscriber: m-lines waiting for a track.
    pub reserved: Vec<Slot>,
    /// Subscriber: the layer cap and pause asked per m-line (mid). They belong to the
    /// m-line, so a track that fills it later (late, or after its publisher came
    /// back) starts under them.
    pub layer_prefs: HashMap<String, (u8, u8, bool)>,
}

#[derive(Default)]
pub struct Room {
    pub publishers: Vec<String>,
    pub subscribers: Vec<String>,
}

#[derive(Default)]
pub struct State {
    pub sessions: HashMap<String, Session>,
    // Arc<str>: looked up and cloned for every datagram (no allocation per packet).
    by_ufrag: HashMap<String, Arc<str>>,
    by_addr: HashMap<SocketAddr, Arc<str>>,
    pub rooms: BTreeMap<String, Room>,
    /// Trunk copies this node gives downstream nodes, by (node, publisher session).
    pub relays_out: HashMap<(String, String), super::cascade::RelayOut>,
}

impl State {
    /// Registers a new session under its ufrag and in its room; returns its id.
    pub(super) fn insert(&mut self, s: Session) -> String {
        let id = s.id.clone();
        self.by_ufrag
            .insert(s.ice_ufrag.clone(), id.as_str().into());
        let room = self.rooms.entry(s.room.clone()).or_default();
        match s.role {
            Role::Publisher => room.publishers.push(id.clone()),
            Role::Subscriber => room.subscribers.push(id.clone()),
            Role::Relay => unreachable!("relays to other nodes are relays_out, not sessions"),
        }
        self.sessions.insert(id.clone(), s);
        id
    }

    fn remove(&mut self, id: &str) -> Option<Session> {
        let s = self.sessions.remove(id)?;
        self.by_ufrag.remove(&s.ice_ufrag);
        for a in &s.addrs {
            if self.by_addr.get(a).is_some_and(|x| &**x == id) {
                self.by_addr.remove(a);
            }
        }
        if let Some(room) = self.rooms.get_mut(&s.room) {
            room.publishers.retain(|x| x != id);
            room.subscribers.retain(|x| x != id);
            if room.publishers.is_empty() && room.subscribers.is_empty() {
                self.rooms.remove(&s.room);
            }
        }
        // Subscribers keep their sessions; the m-lines of a gone publisher wait for
        // the next one.
        if s.role == Role::Publisher {
            for sub in self.sessions.values_mut() {
                let (gone, kept) = std::mem::take(&mut sub.downtracks)
                    .into_iter()
                    .partition(|d| d.src_session == id);
                sub.downtracks = kept;
                let gone: Vec<Subscription> = gone;
                sub.reserved.extend(gone.into_iter().map(|d| Slot {
                    mid: d.mid,
                    kind: d.kind,
                    codec: d.codec,
                    ssrc_out: d.ssrc_out,
                    rtx: d.rtx,
                    dd_ext: d.dd_ext,
                    twcc_ext: d.twcc_ext,
                }));
            }
        }
        Some(s)
    }
}

/// The AF_XDP fast path as the control plane programs it.
pub struct FastPath {
    /// `EFWD_PEERS_V1`: the control plane binds a peer there when ICE binds it.
    peers: Mutex<PeerTable>,
    /// Our media address as the listener map has it.
    listen: SocketAddr,
}

/// What `webrtc::start` hands the SFU to run the fast path: the interface's queues,
/// opened, and the peer table. Without it (or when opening failed) media takes the
/// socket path, for the reason given.
pub struct FastPathSetup {
    pub queues: Vec<XskQueue>,
    pub peers: PeerTable,
    pub listen: SocketAddr,
}

/// Which data path carries media, and why: logged at start, in `/metrics` and
/// `/api/sessions`.
#[derive(Clone, Debug, Serialize)]
pub struct PathInfo {
    /// "af_xdp" or "socket".
    pub path: &'static str,
    /// AF_XDP: "copy" or "zero-copy" mode and the queue count; socket: why not AF_XDP.
    pub detail: String,
}

/// Why a WHIP/WHEP request is refused; maps to an HTTP status.
#[derive(Debug)]
pub enum ApiError {
    BadOffer(OfferError),
    UnknownRoom(String),
    UnsupportedCodec(String),
    UnknownSession,
    /// A layer request names an m-line the session does not receive a track on.
    NoSuchTrack(String),
    /// (the cap) sessions in total.
    ServerFull(usize),
    /// (room, the cap).
    RoomFull(String, usize),
    /// A cascade request refused or failed: (HTTP status, what to fix).
    Cascade(u16, String),
    /// (the cap) sessions from the requesting address.
    TooManyFromSource(usize),
}

impl ApiError {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadOffer(_) => 400,
            ApiError::UnknownRoom(_) | ApiError::UnknownSession | ApiError::NoSuchTrack(_) => 404,
            ApiError::UnsupportedCodec(_) => 406,
            ApiError::TooManyFromSource(_) => 429,
            ApiError::Cascade(code, _) => *code,
            ApiError::ServerFull(_) | ApiError::RoomFull(..) => 503,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::BadOffer(e) => write!(f, "{e}"),
            ApiError::UnknownRoom(r) => write!(
                f,
                "room {r:?} has no publisher; publish to it first with POST /whip/{r}"
            ),
            ApiError::UnsupportedCodec(e) => write!(f, "{e}"),
            ApiError::UnknownSession => write!(
                f,
                "no such session (already deleted, or timed out without ICE consent)"
            ),
            ApiError::ServerFull(n) => write!(
                f,
                "the server has its maximum of {n} sessions ([webrtc.limits] max_sessions); retry later"
            ),
            ApiError::RoomFull(r, n) => write!(
                f,
                "room {r:?} has its maximum of {n} sessions ([webrtc.limits] max_sessions_per_room)"
            ),
            ApiError::TooManyFromSource(n) => write!(
                f,
                "your address already has {n} sessions ([webrtc.limits] max_sessions_per_source); DELETE some first"
            ),
            ApiError::Cascade(_, m) => write!(f, "{m}"),
            ApiError::NoSuchTrack(mid) => write!(
                f,
                "the session receives no track on m-line {mid:?}; GET /api/sessions lists its down-tracks with their mid"
            ),
        }
    }
}

pub struct Sfu {
    pub socket: Arc<UdpSocket>,
    sender: std::net::UdpSocket,
    pub identity: Identity,
    pub candidates: Vec<SocketAddr>,
    pub consent_timeout: Duration,
    pub limits: super::Limits,
    pub cname: String,
    pub state: Mutex<State>,
    pub counters: Arc<Counters>,
    /// The engines, one per AF_XDP queue (one on the socket path), and what drives
    /// them. Lock order: `state`, then one shard's media (then its router), then
    /// `fast.peers`; never two shards at once, never the other way.
    pub engines: Arc<Engines>,
    next_media_id: AtomicU32,
    fast: Option<FastPath>,
    pub path: PathInfo,
    /// Our ICE passwords (derived from the ufrag with a key on disk).
    pub passwords: super::ice::Passwords,
    /// Rooms across nodes (`[cluster]`), once set at start.
    pub cascade: std::sync::OnceLock<super::cascade::Cascade>,
    /// Each room's dominant speaker, decided on the engine's timer. Lock order: after
    /// `state` and `media`; nothing else is taken while it is held.
    pub speakers: Mutex<HashMap<String, Dominant<String>>>,
    /// Room events (the active speaker) for `GET /api/rooms/{room}/events`.
    pub events: tokio::sync::broadcast::Sender<RoomEvent>,
}

/// Something that happened in a room, for its event stream.
#[derive(Debug, Clone)]
pub struct RoomEvent {
    pub room: String,
    /// The SSE event name.
    pub kind: &'static str,
    pub data: serde_json::Value,
}

fn random_string(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn nonzero_u32() -> u32 {
    rand::thread_rng().gen_range(1..=u32::MAX)
}

impl Sfu {
    /// Takes the bound media socket; must run inside the tokio runtime.
    pub fn new(
        socket: std::net::UdpSocket,
        candidates: Vec<SocketAddr>,
        consent_timeout: Duration,
        limits: super::Limits,
        fast: Result<FastPathSetup, String>,
        passwords: super::ice::Passwords,
    ) -> anyhow::Result<Arc<Sfu>> {
        socket.set_nonblocking(true)?;
        crate::datapath::userpath::set_buf(&socket, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        crate::datapath::rxq::enable(std::os::fd::AsFd::as_fd(&socket))
            .map_err(|e| anyhow::anyhow!("enabling SO_RXQ_OVFL on the WebRTC media socket: {e}"))?;
        // Sends go through a plain non-blocking clone of the fd: tokio's try_send_to
        // answers WouldBlock until its reactor has seen the socket writable once.
        let sender = socket.try_clone()?;
        let counters = Arc::new(Counters::default());
        let cname = format!("edgefwd-{}", random_string(8));
        let (queues, fast, path) = match fast {
            Ok(f) => {
                let path = PathInfo {
                    path: "af_xdp",
                    detail: format!(
                        "{} mode, {} queue(s), a worker and engine per queue",
                        f.queues.first().map_or("?", |q| q.mode().name()),
                        f.queues.len()
                    ),
                };
                let fast = FastPath {
                    peers: Mutex::new(f.peers),
                    listen: f.listen,
                };
                (Some(f.queues), Some(fast), path)
            }
            Err(why) => (
                None,
                None,
                PathInfo {
                    path: "socket",
                    detail: why,
                },
            ),
        };
        let engines = Engines::new(&cname, counters.clone(), socket.try_clone()?, queues)?;
        Ok(Arc::new(Sfu {
            socket: Arc::new(UdpSocket::from_std(socket)?),
            sender,
            identity: Identity::generate()?,
            candidates,
            consent_timeout,
            limits,
            cname,
            state: Mutex::new(State::default()),
            counters,
            engines: Arc::new(engines),
            next_media_id: AtomicU32::new(1),
            fast,
            path,
            cascade: Default::default(),
            passwords,
            speakers: Default::default(),
            // Subscribers that fall this far behind skip events (they are told).
            events: tokio::sync::broadcast::channel(256).0,
        }))
    }

    /// Runs `f` on shard `i`'s engine (its queued commands applied first).
    pub(super) fn with_shard<R>(
        &self,
        i: usize,
        f: impl FnOnce(&mut Engine, &mut dyn Transmit) -> R,
    ) -> R {
        self.engines.with_shard(i, f)
    }

    /// Queues a command for the engine that holds its session (never waited for).
    pub(super) fn command(&self, cmd: Command) {
        self.engines.command(cmd)
    }

    /// How many engines there are (AF_XDP: one per queue; socket path: one).
    pub fn shards(&self) -> usize {
        self.engines.shards()
    }

    /// The shard of a room, and of every session and track in it.
    pub fn shard_of_room(&self, room: &str) -> usize {
        self.engines.shard_of_room(room)
    }

    /// The shard whose engine holds session or track `id`.
    pub fn shard_of(&self, id: u32) -> usize {
        self.engines.shard_of(id)
    }

    /// A new engine id (session or track) in `room`'s shard.
    pub(super) fn media_id(&self, room: &str) -> u32 {
        let k = self.next_media_id.fetch_add(1, Ordering::Relaxed);
        self.engines.engine_id(k, room)
    }

    /// Gives the engine a new session with its tracks or down-tracks.
    /// The engine's down-track of one subscription: the answer's SSRC, payload type
    /// and RTX; random starting numbers, as a fresh sender would pick (RFC 3550 §5.1).
    fn add_downtrack(&self, sub: SessionId, d: &Subscription) {
        let mut rng = rand::thread_rng();
        self.command(Command::AddDownTrack {
            track: d.track,
            sub,
            ssrc_out: d.ssrc_out,
            pt_out: d.pt_out,
            rtx: d.rtx.map(|(pt, ssrc)| (pt, ssrc, rng.r#gen())),
            remb: d.codec.remb_only(),
            dd_ext: d.dd_ext,
            twcc_ext: d.twcc_ext,
            seq_delta: rng.r#gen(),
            ts_delta: rng.r#gen(),
        });
    }

    fn register(&self, s: &Session) {
        self.command(Command::AddSession {
            id: s.media,
            role: s.role,
            rtcp_ssrc: s.rtcp_ssrc,
        });
        for t in &s.tracks {
            self.command(Command::AddTrack {
                id: t.media,
                session: s.media,
                kind: t.kind,
                pt: t.codec.pt,
                clock_rate: t.codec.clock_rate,
                format: Format::from_name(&t.codec.name),
                streams: t.streams.clone(),
                rid_ext: t.rid_ext,
                twcc_ext: t.twcc_ext,
                level_ext: t.level_ext,
                dd_ext: t.dd_ext,
            });
        }
        for d in &s.downtracks {
            self.add_downtrack(s.media, d);
        }
    }

    /// Ends a session in the signaling state and in the engine.
    pub(super) fn remove(&self, st: &mut State, id: &str) -> Option<Session> {
        let s = st.remove(id)?;
        self.command(Command::RemoveSession { id: s.media });
        for a in &s.addrs {
            self.unbind_fast_unless_used(st, *a);
        }
        Some(s)
    }

    /// Ends XDP's steering of `addr` unless another session or relay still uses it
    /// (a cascade peer's one address carries many).
    pub(super) fn unbind_fast_unless_used(&self, st: &State, addr: SocketAddr) {
        let Some(f) = &self.fast else { return };
        let used = st.sessions.values().any(|s| s.addrs.contains(&addr))
            || st.relays_out.values().any(|r| r.addr == addr);
        if !used {
            f.peers.lock().unwrap().unbind(f.listen, addr);
        }
    }

    /// A publisher session for a publisher of an upstream node: no ICE, no DTLS (its
    /// keys come over the node API), connected from the start.
    pub(super) fn relay_session(&self, room: &str, rtcp_ssrc: u32, profile: Profile) -> Session {
        Session {
            id: random_string(16),
            media: self.media_id(room),
            room: room.to_string(),
            role: Role::Publisher,
            http_source: std::net::IpAddr::from([0, 0, 0, 0]),
            ice_ufrag: random_string(8),
            ice_pwd: random_string(24),
            remote_ufrag: String::new(),
            remote_fingerprint: (String::new(), vec![]),
            created: Instant::now(),
            last_consent: None,
            addrs: vec![],
            nominated: None,
            dtls_peer: Arc::new(Mutex::new(SocketAddr::from(([0, 0, 0, 0], 0)))),
            dtls_in: None,
            profile: Some(profile),
            hello: None,
            rtcp_ssrc,
            tracks: vec![],
            downtracks: vec![],
            relay: None,
            reserved: vec![],
            layer_prefs: HashMap::new(),
        }
    }

    /// Gives the engine a relayed publisher: its tracks, bound by their SSRCs at the
    /// upstream's address, decrypted with the publisher's key from where the upstream
    /// left off, RTCP back with the trunk key.
    pub(super) fn register_relay_in(
        self: &Arc<Self>,
        s: &Session,
        upstream: SocketAddr,
        rx: MasterKey,
        trunk: MasterKey,
        streams: Vec<(u32, u64)>,
    ) {
        self.register(s);
        self.command(Command::BindRelay {
            id: s.media,
            addr: upstream,
            ssrcs: s
                .tracks
                .iter()
                .flat_map(|t| t.streams.iter().filter_map(|(_, ssrc)| *ssrc))
                .collect(),
        });
        self.command(Command::SetKeys {
            id: s.media,
            rx,
            tx: trunk,
        });
        self.command(Command::ResumeRx {
            id: s.media,
            streams,
        });
        self.bind_fast(s.media, upstream);
    }

    /// ICE bound `addr` to session `media`: XDP steers its SRTP to the workers from
    /// now on, and the workers learn its next hop's MAC (off this thread: it may take
    /// a neighbour resolution).
    pub(super) fn bind_fast(self: &Arc<Self>, media: SessionId, addr: SocketAddr) {
        let Some(f) = &self.fast else { return };
        if let Err(e) = f.peers.lock().unwrap().bind(f.listen, addr, media) {
            log::warn!("{e:#}; its media stays on the socket path");
            return;
        }
        let (sfu, local) = (self.clone(), f.listen.ip());
        tokio::task::spawn_blocking(move || {
            let mac = crate::dataplane::resolve::route_get(addr.ip())
                .and_then(|(dev, hop)| crate::dataplane::resolve::neighbour_mac(hop, &dev, local));
            match mac {
                Ok(mac) => sfu.engines.set_neighbour(addr.ip(), mac),
                Err(e) => log::warn!("peer {addr}: {e:#}; copies wait until it sends"),
            }
        });
    }

    fn new_session(
        &self,
        room: &str,
        role: Role,
        source: std::net::IpAddr,
        offer: &Offer,
    ) -> Session {
        let ufrag = random_string(8);
        Session {
            id: random_string(16),
            media: self.media_id(room),
            room: room.to_string(),
            role,
            http_source: source,
            ice_ufrag: ufrag.clone(),
            ice_pwd: self.passwords.for_ufrag(&ufrag),
            remote_ufrag: offer.ice_ufrag.clone(),
            remote_fingerprint: offer.fingerprint.clone(),
            created: Instant::now(),
            last_consent: None,
            addrs: vec![],
            nominated: None,
            dtls_peer: Arc::new(Mutex::new(SocketAddr::from(([0, 0, 0, 0], 0)))),
            dtls_in: None,
            profile: None,
            hello: None,
            rtcp_ssrc: nonzero_u32(),
            tracks: vec![],
            downtracks: vec![],
            relay: None,
            reserved: vec![],
            layer_prefs: HashMap::new(),
        }
    }

    fn answer(&self, offer: &Offer, s: &Session, media: &[AnswerMedia]) -> String {
        build_answer(&AnswerParams {
            offer,
            ice_ufrag: &s.ice_ufrag,
            ice_pwd: &s.ice_pwd,
            fingerprint: &self.identity.fingerprint,
            candidates: &self.candidates,
            media,
            cname: &self.cname,
        })
    }

    /// Refuses a new session in `room` from `source` beyond the configured caps.
    fn admit(&self, st: &State, room: &str, source: std::net::IpAddr) -> Result<(), ApiError> {
        let l = &self.limits;
        if st.sessions.len() >= l.max_sessions {
            return Err(ApiError::ServerFull(l.max_sessions));
        }
        let in_room = st
            .rooms
            .get(room)
            .map_or(0, |r| r.publishers.len() + r.subscribers.len());
        if in_room >= l.max_sessions_per_room {
            return Err(ApiError::RoomFull(
                room.to_string(),
                l.max_sessions_per_room,
            ));
        }
        // A per-source count kept beside the sessions would be a second copy to keep
        // in sync; a scan is fine at signaling rates (thousands of sessions).
        let from = st
            .sessions
            .values()
            .filter(|s| s.http_source == source)
            .count();
        if from >= l.max_sessions_per_source {
            return Err(ApiError::TooManyFromSource(l.max_sessions_per_source));
        }
        Ok(())
    }

    /// WHIP: a publisher joins `room`. Returns (session id, SDP answer).
    pub fn publish(
        &self,
        room: &str,
        source: std::net::IpAddr,
        offer: &Offer,
    ) -> Result<(String, String), ApiError> {
        self.admit(&self.state.lock().unwrap(), room, source)?;
        let mut s = self.new_session(room, Role::Publisher, source, offer);
        let mut media = Vec::new();
        for m in &offer.media {
            match (m.kind, m.publish_codec()) {
                (Some(kind), Some(codec)) => {
                    let simulcast = m.simulcast().filter(|_| kind == Kind::Video);
                    let (streams, rid_ext) = match &simulcast {
                        Some((rids, ext)) => (
                            rids.iter().map(|r| (Some(r.clone()), None)).collect(),
                            Some(*ext),
                        ),
                        None => (vec![(None, m.ssrcs.first().copied())], None),
                    };
                    s.tracks.push(Track {
                        kind,
                        mid: m.mid.clone(),
                        codec: codec.clone(),
                        streams,
                        rid_ext,
                        twcc_ext: m.twcc(codec),
                        level_ext: m.audio_level(),
                        dd_ext: m.dependency_descriptor(codec),
                        track_id: format!("{}-{}", kind.as_str(), random_string(6)),
                        media: self.media_id(&s.room),
                    });
                    media.push(AnswerMedia::Receive {
                        codec: codec.clone(),
                        simulcast: simulcast.is_some(),
                    });
                }
                _ => media.push(AnswerMedia::Reject),
            }
        }
        if s.tracks.is_empty() {
            return Err(ApiError::BadOffer(OfferError::NoUsableMedia));
        }
        let answer = self.answer(offer, &s, &media);
        let mut st = self.state.lock().unwrap();
        // Checked again under the lock that inserts: the first check ran before the
        // answer was built.
        self.admit(&st, room, source)?;
        self.register(&s);
        let id = st.insert(s);
        self.fill_slots(&mut st, &id);
        Ok((id, answer))
    }

    /// WHEP: a subscriber joins `room` and gets every published track its offer has an
    /// m-line of the same kind for, in publication order.
    pub fn subscribe(
        &self,
        room: &str,
        source: std::net::IpAddr,
        offer: &Offer,
    ) -> Result<(String, String), ApiError> {
        let mut st = self.state.lock().unwrap();
        self.admit(&st, room, source)?;
        // No publisher yet is fine: the m-lines wait for one (late tracks).
        let publishers = st
            .rooms
            .get(room)
            .map(|r| r.publishers.clone())
            .unwrap_or_default();
        let mut s = self.new_session(room, Role::Subscriber, source, offer);
        // (publisher, track index) not yet given to an m-line.
        let mut available: Vec<(String, usize)> = publishers
            .iter()
            .flat_map(|p| (0..st.sessions[p].tracks.len()).map(move |i| (p.clone(), i)))
            .collect();
        let mut media = Vec::new();
        let mut refusals = Vec::new();
        for m in &offer.media {
            let Some(kind) = m.kind else {
                media.push(AnswerMedia::Reject);
                continue;
            };
            let mut chosen = None;
            for (n, (p, i)) in available.iter().enumerate() {
                let t = &st.sessions[p].tracks[*i];
                if t.kind != kind {
                    continue;
                }
                match m.subscribe_codec(&t.codec) {
                    Some(c) => {
                        chosen = Some((n, c.clone()));
                        break;
                    }
                    None => refusals.push(format!(
                        "the {} track is {} ({}), which the offer's m-line {} does not accept",
                        kind.as_str(),
                        t.codec.name,
                        t.codec.fmtp,
                        m.mid
                    )),
                }
            }
            let offered_kind = available
                .iter()
                .any(|(p, i)| st.sessions[p].tracks[*i].kind == kind);
            let Some((n, codec)) = chosen else {
                // Nothing of this kind published yet: keep the m-line for a later track,
                // under an SSRC announced now. (A track of the kind with a codec the
                // m-line cannot take is a refusal, above, not a wait.)
                match m.reserve_codec().filter(|_| !offered_kind) {
                    Some(codec) => {
                        let ssrc_out = nonzero_u32();
                        let rtx = m.rtx_for(codec.pt).map(|pt| (pt, nonzero_u32()));
                        s.reserved.push(Slot {
                            mid: m.mid.clone(),
                            kind,
                            codec: codec.clone(),
                            ssrc_out,
                            rtx,
                            dd_ext: m.dependency_descriptor(codec),
                            twcc_ext: m.twcc(codec),
                        });
                        media.push(AnswerMedia::Send {
                            codec: codec.clone(),
                            ssrc: ssrc_out,
                            rtx,
                            stream_id: format!("room-{room}"),
                            track_id: format!("{}-pending-{}", kind.as_str(), random_string(6)),
                        });
                    }
                    None => media.push(AnswerMedia::Reject),
                }
                continue;
            };
            let (p, i) = available.remove(n);
            let t = &st.sessions[&p].tracks[i];
            let ssrc_out = nonzero_u32();
            let rtx = m.rtx_for(codec.pt).map(|pt| (pt, nonzero_u32()));
            s.downtracks.push(Subscription {
                mid: m.mid.clone(),
                src_session: p.clone(),
                track: t.media,
                kind,
                ssrc_out,
                pt_out: codec.pt,
                codec: codec.clone(),
                rtx,
                dd_ext: m.dependency_descriptor(&codec),
                twcc_ext: m.twcc(&codec),
            });
            media.push(AnswerMedia::Send {
                codec,
                ssrc: ssrc_out,
                rtx,
                stream_id: p.clone(),
                track_id: t.track_id.clone(),
            });
        }
        if s.downtracks.is_empty() && s.reserved.is_empty() {
            return Err(if refusals.is_empty() {
                ApiError::BadOffer(OfferError::NoUsableMedia)
            } else {
                ApiError::UnsupportedCodec(refusals.join("; "))
            });
        }
        let answer = self.answer(offer, &s, &media);
        self.register(&s);
        Ok((st.insert(s), answer))
    }

    /// A new publisher's tracks go to the room's subscribers' waiting m-lines (those
    /// of the same kind with a compatible codec), as down-tracks under the SSRCs their
    /// answers announced; the engine asks for a keyframe for a connected viewer.
    pub(super) fn fill_slots(&self, st: &mut State, publisher: &str) {
        let Some(p) = st.sessions.get(publisher) else {
            return;
        };
        let tracks: Vec<(TrackId, Kind, Codec)> = p
            .tracks
            .iter()
            .map(|t| (t.media, t.kind, t.codec.clone()))
            .collect();
        let subs = st
            .rooms
            .get(&p.room)
            .map(|r| r.subscribers.clone())
            .unwrap_or_default();
        for sid in subs {
            let Some(s) = st.sessions.get_mut(&sid) else {
                continue;
            };
            for (tid, kind, codec) in &tracks {
                let Some(i) = s
                    .reserved
                    .iter()
                    .position(|r| r.kind == *kind && codec.compatible(&r.codec))
                else {
                    continue;
                };
                let slot = s.reserved.remove(i);
                s.downtracks.push(Subscription {
                    mid: slot.mid.clone(),
                    src_session: publisher.to_string(),
                    track: *tid,
                    kind: *kind,
                    ssrc_out: slot.ssrc_out,
                    pt_out: slot.codec.pt,
                    codec: slot.codec.clone(),
                    rtx: slot.rtx,
                    dd_ext: slot.dd_ext,
                    twcc_ext: slot.twcc_ext,
                });
                self.add_downtrack(s.media, s.downtracks.last().expect("pushed"));
                // A cap asked while the m-line waited holds for its track.
                if let Some(&(max_layer, max_temporal, paused)) = s.layer_prefs.get(&slot.mid) {
                    self.command(Command::SetLayers {
                        sub: s.media,
                        track: *tid,
                        max_layer,
                        max_temporal,
                        paused,
                    });
                }
                tracing::info!(event = "late_track", session = %sid, publisher, "session {sid}: {} track of {publisher} fills a waiting m-line", kind.as_str());
            }
        }
    }

    /// A subscriber's layer choice for its down-track on m-line `mid` (every one
    /// without): at most `max_layer` (0 = lowest encoding, or spatial layer of a
    /// scalable stream; None = no cap) and `max_temporal`, or paused.
    /// Returns the down-tracks changed, as `/api/sessions` shows them.
    pub fn set_layers(
        &self,
        room: &str,
        id: &str,
        mid: Option<&str>,
        max_layer: Option<u8>,
        max_temporal: Option<u8>,
        paused: bool,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        let mut st = self.state.lock().unwrap();
        let s = match st.sessions.get_mut(id) {
            Some(s) if s.room == room && s.role == Role::Subscriber => s,
            _ => return Err(ApiError::UnknownSession),
        };
        let wanted = |m: &str| mid.is_none_or(|x| x == m);
        let chosen: Vec<(String, Kind, Option<TrackId>)> = s
            .downtracks
            .iter()
            .filter(|d| wanted(&d.mid))
            .map(|d| (d.mid.clone(), d.kind, Some(d.track)))
            .chain(
                s.reserved
                    .iter()
                    .filter(|r| wanted(&r.mid))
                    .map(|r| (r.mid.clone(), r.kind, None)),
            )
            .collect();
        if let (Some(m), true) = (mid, chosen.is_empty()) {
            return Err(ApiError::NoSuchTrack(m.to_string()));
        }
        let cap = max_layer.unwrap_or(UNCAPPED);
        let temporal = max_temporal.unwrap_or(UNCAPPED);
        for (m, _, track) in &chosen {
            s.layer_prefs.insert(m.clone(), (cap, temporal, paused));
            if let Some(track) = track {
                self.command(Command::SetLayers {
                    sub: s.media,
                    track: *track,
                    max_layer: cap,
                    max_temporal: temporal,
                    paused,
                });
            }
        }
        tracing::debug!(event = "layers", session = %id, room, ?mid, ?max_layer, ?max_temporal, paused, "session {id}: layer cap {max_layer:?}, temporal cap {max_temporal:?}, paused {paused}");
        // A waiting m-line takes them when a track fills it.
        Ok(chosen
            .iter()
            .map(|(m, kind, track)| serde_json::json!({"mid": m, "kind": kind, "max_layer": max_layer, "max_temporal": max_temporal, "paused": paused, "waiting": track.is_none()}))
            .collect())
    }

    /// DELETE of a WHIP/WHEP resource.
    pub fn leave(&self, room: &str, id: &str, role: Role) -> Result<(), ApiError> {
        let mut st = self.state.lock().unwrap();
        match st.sessions.get(id) {
            Some(s) if s.room == room && s.role == role => {
                self.remove(&mut st, id);
                tracing::info!(event = "left", session = %id, room, ?role, "session {id} ({role:?}) left room {room}");
                Ok(())
            }
            _ => Err(ApiError::UnknownSession),
        }
    }

    fn send(&self, buf: &[u8], to: SocketAddr) -> bool {
        match self.sender.send_to(buf, to) {
            Ok(_) => true,
            Err(_) => {
                self.counters.count(Drop::SendFailed);
                false
            }
        }
    }

    /// Receives from the media socket until it fails (the socket path; on the AF_XDP
    /// path STUN and DTLS arrive here too).
    pub async fn run_socket(self: Arc<Self>) -> anyhow::Result<()> {
        let engines = self.engines.clone();
        engines.run_socket(self.socket.clone(), self).await
    }

    /// One datagram on the media port; SRTP is decrypted in place in `buf`.
    pub fn on_datagram(self: &Arc<Self>, buf: &mut [u8], from: SocketAddr) {
        self.engines.on_datagram(self, buf, from)
    }

    /// One session's DTLS: read the ClientHello's profiles, handshake, key SRTP, then
    /// keep reading so alerts (close_notify) end the session.
    async fn dtls_session(
        self: Arc<Self>,
        id: String,
        mut rx: mpsc::Receiver<Vec<u8>>,
        peer: Arc<Mutex<SocketAddr>>,
        fingerprint: (String, Vec<u8>),
    ) -> anyhow::Result<()> {
        let mut reader = ClientHelloReader::default();
        let offered = loop {
            let d = rx
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("session deleted during DTLS"))?;
            match reader.push(&d) {
                Ok(HelloState::Complete(p)) => break p,
                Ok(HelloState::Incomplete) => continue,
                Err(e) => {
                    // Anyone who can spoof the client's address can send this: drop
                    // it, keep the session.
                    self.counters.count(Drop::DtlsMalformed);
                    log::debug!("session {id}: malformed ClientHello datagram dropped: {e}");
                }
            }
        };
        let seen = reader.into_datagrams();
        if let Some(s) = self.state.lock().unwrap().sessions.get_mut(&id) {
            s.hello = Some((seen.len(), offered.clone()));
        }
        if seen.len() > 1 {
            self.counters
                .dtls_fragmented_hellos
                .fetch_add(1, Ordering::Relaxed);
        }
        let Some(profile) = dtls::choose_profile(&offered) else {
            self.counters.count(Drop::DtlsMalformed);
            anyhow::bail!(
                "the client offers SRTP profiles {offered:04x?}, none of AEAD_AES_128_GCM, AES_CM_128_HMAC_SHA1_80"
            );
        };
        let conn = Arc::new(DemuxConn::new(
            seen,
            rx,
            self.socket.clone(),
            peer,
            self.counters.dtls_conns.clone(),
        ));
        let handshake = dtls::accept(conn.clone(), &self.identity, profile, &fingerprint);
        // Dropping the handshake on the session's end drops its connection, which ends
        // webrtc-dtls's tasks.
        let dtls = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(20), handshake) => {
                r.map_err(|_| anyhow::anyhow!("DTLS handshake did not finish in 20 s"))??
            }
            _ = conn.closed() => anyhow::bail!("session ended during the DTLS handshake"),
        };
        let srtp_profile = dtls::srtp_profile(profile).expect("chosen from PREFERENCE");
        let mut cfg = webrtc_srtp::config::Config {
            profile: srtp_profile,
            ..Default::default()
        };
        cfg.extract_session_keys_from_dtls(dtls.connection_state().await, false)
            .await
            .map_err(|e| anyhow::anyhow!("exporting SRTP keys: {e}"))?;
        let k = &cfg.keys;
        let srtp = Profile::from_dtls(profile).expect("chosen from PREFERENCE");
        let key = |key: &[u8], salt: &[u8]| {
            MasterKey::new(srtp, key, salt)
                .map_err(|e| anyhow::anyhow!("DTLS exported SRTP keys of the wrong size: {e}"))
        };
        let rx = key(&k.remote_master_key, &k.remote_master_salt)?;
        let tx = key(&k.local_master_key, &k.local_master_salt)?;
        {
            let mut st = self.state.lock().unwrap();
            let s = st
                .sessions
                .get_mut(&id)
                .ok_or_else(|| anyhow::anyhow!("session deleted during DTLS"))?;
            s.profile = Some(srtp);
            // A subscriber's keys also ask its publishers for keyframes (the engine).
            self.command(Command::SetKeys {
                id: s.media,
                rx,
                tx,
            });
            bump(&self.counters.dtls_handshakes);
            tracing::info!(
                event = "dtls_up",
                session = %id,
                room = %s.room,
                srtp_profile = srtp.name(),
                "session {id}: DTLS up, SRTP {} (client offered {:04x?} in a ClientHello of {} datagram(s))",
                srtp.name(),
                offered,
                s.hello.as_ref().map_or(0, |h| h.0)
            );
        }
        let mut buf = vec![0u8; 2048];
        loop {
            // We carry no application data; reading processes alerts and retransmits.
            tokio::select! {
                r = dtls.read(&mut buf, None) => if let Err(e) = r {
                    let _ = dtls.close().await;
                    tracing::info!(event = "dtls_ended", session = %id, "session {id}: DTLS ended ({e}); removing the session");
                    return Ok(());
                },
                _ = conn.closed() => {
                    // Ends webrtc-dtls's reader and writer tasks.
                    let _ = dtls.close().await;
                    return Ok(());
                }
            }
        }
    }

    /// The engine's timers when due (transport feedback every 100 ms, SR/RR every
    /// second); the caller runs this at [`Engine::poll_timeout`]'s pace.
    pub fn engine_tick(&self) -> Instant {
        let next = self
            .engines
            .run_timers()
            // Every engine has a worker: the speakers' pace.
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
        self.decide_speakers(Instant::now());
        next
    }

    /// Each room's dominant speaker from its publishers' audio levels; a change is
    /// logged and sent to the room's event stream.
    fn decide_speakers(&self, now: Instant) {
        // Who publishes audio with levels, per room (then the locks are let go).
        // Per room: (publisher session, its audio tracks with levels).
        type Publishers = Vec<(String, Vec<TrackId>)>;
        let rooms: Vec<(String, Publishers)> = {
            let st = self.state.lock().unwrap();
            st.rooms
                .iter()
                .map(|(name, r)| {
                    let pubs = r
                        .publishers
                        .iter()
                        .filter_map(|p| st.sessions.get(p))
                        .map(|s| {
                            let audio = s.tracks.iter().filter(|t| t.level_ext.is_some());
                            (s.id.clone(), audio.map(|t| t.media).collect())
                        })
                        .collect();
                    (name.clone(), pubs)
                })
                .collect()
        };
        let scored: Vec<(String, Vec<(String, u32)>)> = rooms
            .into_iter()
            .map(|(room, pubs)| {
                let scores = self.with_shard(self.shard_of_room(&room), |e, _| {
                    pubs.into_iter()
                        .map(|(id, tracks)| {
                            let score = tracks
                                .iter()
                                .filter_map(|t| e.track(*t))
                                .map(|t| t.levels.score(now))
                                .max()
                                .unwrap_or(0);
                            (id, score)
                        })
                        .collect()
                });
                (room, scores)
            })
            .collect();
        let mut speakers = self.speakers.lock().unwrap();
        // A room that ended had its speaker leave: said once, then forgotten.
        speakers.retain(|room, d| {
            let open = scored.iter().any(|(r, _)| r == room);
            if !open && d.current.is_some() {
                let _ = self.events.send(RoomEvent {
                    room: room.clone(),
                    kind: "active_speaker",
                    data: serde_json::json!({ "speaker": null, "changes": d.changes + 1 }),
                });
            }
            open
        });
        for (room, scores) in scored {
            let d = speakers.entry(room.clone()).or_default();
            if let Some(speaker) = d.update(&scores, now) {
                bump(&self.counters.speaker_changes);
                tracing::info!(event = "active_speaker", room, speaker = ?speaker, "room {room}: active speaker now {}", speaker.as_deref().unwrap_or("nobody"));
                let _ = self.events.send(RoomEvent {
                    room,
                    kind: "active_speaker",
                    data: serde_json::json!({ "speaker": speaker, "changes": d.changes }),
                });
            }
        }
    }

    /// A room's active speaker now (its publisher session id).
    pub fn active_speaker(&self, room: &str) -> Option<String> {
        self.speakers
            .lock()
            .unwrap()
            .get(room)
            .and_then(|d| d.current.clone())
    }

    /// Once a second: consent freshness here, the engine's reports (SR to
    /// subscribers, RR to publishers) when they are due.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        let ice_timeout = Duration::from_secs(self.limits.ice_timeout);
        let expired: Vec<(String, &str, &str)> = st
            .sessions
            .values()
            // Relayed publishers have no ICE: the cascade round keeps or ends them.
            .filter(|s| s.relay.is_none())
            .filter_map(|s| match s.last_consent {
                // Never connected: a short window, not the whole consent timeout.
                None if now - s.created > ice_timeout => Some((
                    s.id.clone(),
                    "ice_timeout",
                    "no valid ICE check since it was created",
                )),
                Some(at) if now - at > self.consent_timeout => {
                    Some((s.id.clone(), "consent_lost", "no ICE consent check"))
                }
                _ => None,
            })
            .collect();
        for (id, event, why) in expired {
            tracing::info!(event, session = %id, "session {id}: {why} within the timeout; removing it");
            self.remove(&mut st, &id);
        }
        drop(st);
        self.engines.run_timers();
    }
}

impl Sfu {
    /// A check for a ufrag no session has: if it authenticates with the password we
    /// would have given that ufrag (a session of this node before a restart, or one
    /// just removed), a signed 400 tells the client to give up the pair and rejoin.
    fn refuse_forgotten(&self, check: super::ice::Check, from: SocketAddr) {
        self.counters.count(Drop::StunUnknownUfrag);
        let pwd = self.passwords.for_ufrag(&check.local_ufrag);
        if let Ok(resp) = check.refuse(&pwd)
            && self.send(&resp, from)
        {
            self.counters.stun_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Signalling for Sfu {
    fn on_stun(self: &Arc<Self>, buf: &[u8], from: SocketAddr) {
        let check = match super::ice::parse_check(buf) {
            Ok(c) => c,
            Err(_) => return self.counters.count(Drop::StunMalformed),
        };
        let mut st = self.state.lock().unwrap();
        let Some(id) = st.by_ufrag.get(&check.local_ufrag).cloned() else {
            drop(st);
            return self.refuse_forgotten(check, from);
        };
        let s = st
            .sessions
            .get_mut(&*id)
            .expect("by_ufrag points at live sessions");
        if check.remote_ufrag != s.remote_ufrag {
            return self.counters.count(Drop::StunUnauthenticated);
        }
        let nominate = check.use_candidate;
        let resp = match check.answer(&s.ice_pwd, from) {
            Ok(r) => r,
            Err(_) => return self.counters.count(Drop::StunUnauthenticated),
        };
        s.last_consent = Some(Instant::now());
        let newly_nominated = nominate && s.nominated != Some(from);
        if newly_nominated {
            tracing::info!(event = "nominated", session = %id, room = %s.room, addr = %from, "session {id}: client nominated {from}");
            s.nominated = Some(from);
        }
        let new_addr = !s.addrs.contains(&from);
        if new_addr {
            if s.addrs.is_empty() {
                tracing::info!(event = "ice_bound", session = %id, room = %s.room, addr = %from, "session {id}: first valid ICE check from {from}");
            }
            s.addrs.push(from);
        }
        if new_addr || newly_nominated {
            self.command(Command::Bind {
                id: s.media,
                addr: from,
                nominated: newly_nominated,
            });
        }
        let media = s.media;
        if new_addr {
            st.by_addr.insert(from, id);
        }
        drop(st);
        if new_addr {
            self.bind_fast(media, from);
        }
        if self.send(&resp, from) {
            self.counters.stun_answered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_dtls(self: &Arc<Self>, buf: &[u8], from: SocketAddr) {
        let mut st = self.state.lock().unwrap();
        let Some(id) = st.by_addr.get(&from).cloned() else {
            return self.counters.count(Drop::UnknownPeer);
        };
        if !dtls::well_framed(buf) {
            return self.counters.count(Drop::DtlsMalformed);
        }
        let s = st
            .sessions
            .get_mut(&*id)
            .expect("by_addr points at live sessions");
        *s.dtls_peer.lock().unwrap() = from;
        let tx = match &s.dtls_in {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(64);
                s.dtls_in = Some(tx.clone());
                let sfu = self.clone();
                let peer = s.dtls_peer.clone();
                let fp = s.remote_fingerprint.clone();
                tokio::spawn(async move {
                    if let Err(e) = sfu.clone().dtls_session(id.to_string(), rx, peer, fp).await {
                        log::warn!("session {id}: {e:#}; closing it");
                    }
                    sfu.remove(&mut sfu.state.lock().unwrap(), &id);
                });
                tx
            }
        };
        drop(st);
        // A full queue means the handshake task is stuck; DTLS retransmits anyway.
        let _ = tx.try_send(buf.to_vec());
    }
}

mod views;

#[cfg(test)]
mod tests;
