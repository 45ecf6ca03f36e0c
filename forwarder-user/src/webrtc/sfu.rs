//! The SFU's signalling state: rooms and sessions as signalling knows them (ICE,
//! DTLS, the m-lines of each offer), and the commands that program the media engines
//! as sessions join, bind, key and leave.
//!
//! Everything per packet lives in the engines and the loops that drive them
//! ([`crate::datapath::engines`]): this module only queues commands to them, reads
//! them for the API and /metrics, and answers the STUN and DTLS the socket hands up
//! ([`Signalling`]). The control plane never waits for media: a command goes to its
//! room's engine queue and is applied before that engine's next batch.
//!
//! * [`joins`] — WHIP/WHEP sessions from offers, relayed publishers, admission,
//!   filling m-lines, leaving.
//! * [`signalling`] — ICE checks and each session's DTLS handshake.
//! * [`timers`] — engine timers, dominant speakers, ICE and consent timeouts.
//! * [`views`] — the JSON snapshot and the /metrics families.

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
    engine::{Command, Engine, LAYER_IDLE, Resume, SessionId, TrackId},
    simulcast::UNCAPPED,
    speaker::Dominant,
    srtp::{MasterKey, Profile},
};

pub use api_error::ApiError;

use super::{
    dtls::{self, ClientHelloReader, DemuxConn, HelloState, Identity},
    sdp::{AnswerMedia, AnswerParams, Codec, Offer, OfferError, build_answer},
};

/// A track a publisher sends us, as its offer described it.
#[derive(Clone, Serialize, serde::Deserialize)]
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
#[derive(Clone, Serialize, serde::Deserialize)]
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
    /// Where its numbering starts (chosen at the answer, so the SRTP indices it will
    /// use can be reserved before the first is).
    pub start: Resume,
}

impl Subscription {
    /// Its m-line waiting again (its publisher left), under the same SSRC.
    pub fn into_slot(self) -> Slot {
        Slot {
            mid: self.mid,
            kind: self.kind,
            codec: self.codec,
            ssrc_out: self.ssrc_out,
            rtx: self.rtx,
            dd_ext: self.dd_ext,
            twcc_ext: self.twcc_ext,
            start: self.start,
        }
    }
}

/// A subscriber's m-line answered before any track could fill it (the subscriber
/// joined before the publisher): a track published later with a compatible codec
/// gets it, under the SSRC the answer already announced.
#[derive(Clone, Serialize, serde::Deserialize)]
pub struct Slot {
    pub mid: String,
    pub kind: Kind,
    pub codec: Codec,
    pub ssrc_out: u32,
    pub rtx: Option<(u8, u32)>,
    pub dd_ext: Option<u8>,
    pub twcc_ext: Option<u8>,
    pub start: Resume,
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
    /// Kept across restarts ([`keep`]): its keys and reserved send indices.
    pub kept: Option<keep::Kept>,
    /// Taken up from an earlier process (no DTLS connection of ours: a DTLS alert
    /// from its client ends it).
    pub restored: bool,
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
                if let (Some(k), false) = (sub.kept.as_mut(), gone.is_empty()) {
                    k.dirty = true;
                }
                sub.reserved
                    .extend(gone.into_iter().map(Subscription::into_slot));
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
    /// ICE over TCP (`[webrtc] ice_tcp`), once its listener is bound at start.
    pub ice_tcp: std::sync::OnceLock<Arc<super::tcp::IceTcp>>,
    /// Each room's dominant speaker, decided on the engine's timer. Lock order: after
    /// `state` and `media`; nothing else is taken while it is held.
    pub speakers: Mutex<HashMap<String, Dominant<String>>>,
    /// Room events (the active speaker) for `GET /api/rooms/{room}/events`.
    pub events: tokio::sync::broadcast::Sender<RoomEvent>,
    /// Draining ([`super::drain`]): no new rooms or viewers here.
    pub draining: std::sync::atomic::AtomicBool,
    /// Told when a drain is done: the daemon exits.
    pub drained: tokio::sync::Notify,
    /// Sessions kept across restarts (None: the media port is not fixed, or the
    /// runtime directory is not writable).
    pub keep: Option<keep::Keeper>,
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
        keep: Option<keep::Keeper>,
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
            ice_tcp: Default::default(),
            passwords,
            speakers: Default::default(),
            // Subscribers that fall this far behind skip events (they are told).
            events: tokio::sync::broadcast::channel(256).0,
            draining: Default::default(),
            drained: Default::default(),
            keep,
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
            resume: Some(d.start),
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
        if let Some(k) = &self.keep {
            k.forget(id);
        }
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

    /// ICE bound `addr` to session `media`: XDP steers its SRTP to the workers from
    /// now on, and the workers learn its next hop's MAC (off this thread: it may take
    /// a neighbour resolution).
    pub(super) fn bind_fast(self: &Arc<Self>, media: SessionId, addr: SocketAddr) {
        let Some(f) = &self.fast else { return };
        // An ICE-TCP leg is on this host: XDP never sees it (the engine's copies to it
        // take the media socket).
        if self
            .ice_tcp
            .get()
            .is_some_and(|t| t.client_of(&addr).is_some())
        {
            return;
        }
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

    fn send(&self, buf: &[u8], to: SocketAddr) -> bool {
        match self.sender.send_to(buf, to) {
            Ok(_) => true,
            Err(_) => {
                self.counters.count(Drop::SendFailed);
                false
            }
        }
    }

    /// The media socket's descriptor (for a hand-over to the next process).
    pub fn media_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sender)
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
}

mod api_error;
mod joins;
pub mod keep;
pub mod restore;
mod signalling;
mod timers;
mod views;

#[cfg(test)]
mod tests;
