//! The media engines and what drives them, apart from signalling: one engine per
//! AF_XDP receive queue and core (one on the socket path), the command queues the
//! control plane fills, the AF_XDP worker loop, the socket receive loop and the
//! engines' timers.
//!
//! A room lives in one shard (by a hash of its name), so a stream's packets and all
//! its copies are handled on one core; the ids of a room's sessions and tracks name
//! their shard (`id % shards`). Commands are queued to their shard and applied before
//! its next batch: the control plane never waits for media, and media waits for no
//! control-plane work but the commands themselves. Signalling is reached only through
//! [`Signalling`] (STUN and DTLS on the socket path); it never holds an engine's lock
//! for longer than a command or a read.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use forwarder_common::rtp::{self, Class};

use super::{handoff::Inbox, socket::SocketTx, xsk::XskQueue};
use crate::media::{
    Counters, Drop, Transmit,
    demux::Demux,
    engine::{Command, Engine, SessionId},
};

/// What the data path hands up to signalling: the socket path's STUN and DTLS (on
/// the AF_XDP path XDP passes them to the socket, so they arrive the same way).
pub trait Signalling: Send + Sync + 'static {
    fn on_stun(self: &Arc<Self>, buf: &[u8], from: SocketAddr);
    fn on_dtls(self: &Arc<Self>, buf: &[u8], from: SocketAddr);
}

/// Where a shard's copies go.
enum Io {
    /// The media socket, from one reused buffer (jumbo frames fit).
    Socket(Vec<u8>),
    /// The AF_XDP socket of the shard's receive queue: every copy its engine makes
    /// leaves on its TX ring, whichever queue the packet came in on.
    Xsk(Box<XskQueue>),
}

/// One shard's engine and its output, locked by its worker per batch (and by the
/// control plane for timers and views).
struct Media {
    engine: Engine,
    io: Io,
    /// Commands queued by the control plane, applied before anything else touches
    /// the engine, so they keep their order.
    commands: std::sync::mpsc::Receiver<Command>,
}

/// The rooms hashed to one core: their engine, and what is handed to it.
struct Shard {
    media: Mutex<Media>,
    commands: std::sync::mpsc::Sender<Command>,
    /// AF_XDP: datagrams for this shard received on other queues, and its wake-up.
    inbox: Option<Inbox>,
    /// Its worker runs the engine's timers (else the control plane's timer task does).
    own_timers: std::sync::atomic::AtomicBool,
}

/// A shard's engine, locked. After a panic while it was held (a bug), the lock is
/// taken back rather than left poisoned: a panic mid-batch must not stop the shard's
/// worker and every later command for good. The engine's state is per session and
/// track, so what one batch left half done is lost at most.
fn lock(m: &Mutex<Media>) -> std::sync::MutexGuard<'_, Media> {
    m.lock().unwrap_or_else(|e| {
        log::error!("a media engine panicked while in use; it goes on with its state as left");
        m.clear_poison();
        e.into_inner()
    })
}

/// Applies what the control plane queued for a shard, in order.
fn catch_up(
    engine: &mut Engine,
    commands: &std::sync::mpsc::Receiver<Command>,
    tx: &mut dyn Transmit,
) {
    let mut now = None;
    while let Ok(cmd) = commands.try_recv() {
        let now = *now.get_or_insert_with(Instant::now);
        engine.apply(cmd, now, tx);
    }
}

/// The `k`th engine id of a shard: `id % shards == shard`, never 0; after 2^32 / shards
/// ids they come round again (long gone by then).
pub fn engine_id(k: u32, shard: usize, shards: usize) -> u32 {
    let n = shards as u32;
    (k % (u32::MAX / n - 1) + 1) * n + shard as u32
}

/// A room's shard: a stable hash of its name (FNV-1a), the same on every start.
pub fn shard_of_room(room: &str, shards: usize) -> usize {
    let h = room.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % shards as u64) as usize
}

/// Every shard of this node's media: engines, their data paths, the router between
/// AF_XDP workers.
pub struct Engines {
    /// Lock order: one shard's media, then `router`; never two shards at once.
    shards: Vec<Shard>,
    /// AF_XDP with several shards: which session (so which shard) a datagram is, for
    /// the worker that received it; made from the same commands as the engines' own.
    router: RwLock<Demux>,
    /// The socket path's sends: a plain non-blocking clone of the media socket.
    sender: std::net::UdpSocket,
    counters: Arc<Counters>,
    /// Tells the AF_XDP workers to end.
    stopping: AtomicBool,
}

impl Engines {
    /// One engine per AF_XDP queue given, else one on the socket path (`sender`:
    /// the media socket, for its copies).
    pub fn new(
        cname: &str,
        counters: Arc<Counters>,
        sender: std::net::UdpSocket,
        queues: Option<Vec<XskQueue>>,
    ) -> anyhow::Result<Engines> {
        let io: Vec<Io> = match queues {
            Some(qs) => qs
                .into_iter()
                .map(|mut q| {
                    q.local_out = Some(super::socket::LocalOut::new(sender.try_clone()?));
                    Ok(Io::Xsk(Box::new(q)))
                })
                .collect::<std::io::Result<_>>()?,
            None => vec![Io::Socket(vec![
                0u8;
                forwarder_common::rtp::MAX_RTP_LEN + 64
            ])],
        };
        let several = io.len() > 1;
        let shards = io
            .into_iter()
            .map(|io| {
                let (commands, rx) = std::sync::mpsc::channel();
                let engine = Engine::new(cname.to_string(), counters.clone(), Instant::now());
                let inbox = match (&io, several) {
                    (Io::Xsk(_), true) => Some(Inbox::new().map_err(|e| {
                        anyhow::anyhow!("creating an AF_XDP worker's eventfd: {e}")
                    })?),
                    _ => None,
                };
                Ok(Shard {
                    media: Mutex::new(Media {
                        engine,
                        io,
                        commands: rx,
                    }),
                    commands,
                    inbox,
                    own_timers: Default::default(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Engines {
            shards,
            router: Default::default(),
            sender,
            counters,
            stopping: Default::default(),
        })
    }

    /// The `k`th engine id (session or track) of `room`'s shard.
    pub fn engine_id(&self, k: u32, room: &str) -> u32 {
        engine_id(k, self.shard_of_room(room), self.shards.len())
    }

    /// Runs `f` on shard `i`'s engine (its queued commands applied first) with the
    /// shard's data path as its transmit.
    pub fn with_shard<R>(
        &self,
        i: usize,
        f: impl FnOnce(&mut Engine, &mut dyn Transmit) -> R,
    ) -> R {
        let mut m = lock(&self.shards[i].media);
        self.run(&mut m, f)
    }

    fn run<R>(&self, m: &mut Media, f: impl FnOnce(&mut Engine, &mut dyn Transmit) -> R) -> R {
        let Media {
            engine,
            io,
            commands,
        } = m;
        match io {
            Io::Socket(buf) => {
                let tx = &mut SocketTx {
                    sock: &self.sender,
                    buf,
                };
                catch_up(engine, commands, tx);
                f(engine, tx)
            }
            Io::Xsk(q) => {
                let q = &mut **q;
                catch_up(engine, commands, q);
                let r = f(engine, q);
                q.flush();
                r
            }
        }
    }

    /// How many engines there are (AF_XDP: one per queue; socket path: one).
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The shard of a room, and of every session and track in it.
    pub fn shard_of_room(&self, room: &str) -> usize {
        shard_of_room(room, self.shards.len())
    }

    /// The shard whose engine holds session or track `id`.
    pub fn shard_of(&self, id: u32) -> usize {
        id as usize % self.shards.len()
    }

    /// Starts one AF_XDP worker thread per queue (none on the socket path), each
    /// pinned to a core. Each waits for frames or hand-offs without spinning, then
    /// handles a batch under its shard's lock.
    pub fn start_workers(self: &Arc<Self>) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
        let mut fds = Vec::new();
        for (i, sh) in self.shards.iter().enumerate() {
            if let Io::Xsk(q) = &lock(&sh.media).io {
                fds.push((i, q.fd()));
            }
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut out = Vec::new();
        for (i, fd) in fds {
            let engines = self.clone();
            let h = std::thread::Builder::new()
                .name(format!("edgefwd-xsk{i}"))
                .spawn(move || {
                    super::xsk::pin_to_cpu(i % cpus);
                    engines.worker(i, fd)
                })?;
            out.push(h);
        }
        Ok(out)
    }

    pub fn stop_workers(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    fn worker(&self, me: usize, fd: std::os::fd::RawFd) {
        use super::xsk::{BATCH, wait_readable};
        let shard = &self.shards[me];
        let mut descs = Vec::with_capacity(BATCH);
        // Per frame of a batch: its session as the router found it (several shards).
        let mut sessions: Vec<Option<SessionId>> = Vec::with_capacity(BATCH);
        let mut frames = Vec::with_capacity(BATCH);
        let mut woken = vec![false; self.shards.len()];
        // The engine's timers run here, on its core, between batches.
        shard.own_timers.store(true, Ordering::Relaxed);
        let mut due = Instant::now();
        while !self.stopping.load(Ordering::Relaxed) {
            // Whole milliseconds, rounded up: no spinning before a timer.
            // Hand-offs left over from the last batch: look again at once.
            let wait = if shard.inbox.as_ref().is_some_and(|i| i.pending()) {
                0
            } else {
                due.saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000)
                    .min(20) as i32
            };
            match &shard.inbox {
                Some(inbox) => {
                    wait_readable(&[fd, inbox.fd()], wait);
                    inbox.clear_wake();
                }
                None => wait_readable(&[fd], wait),
            }
            let mut m = lock(&shard.media);
            let Media {
                engine,
                io,
                commands,
            } = &mut *m;
            let Io::Xsk(xq) = io else { return };
            let xq = &mut **xq;
            catch_up(engine, commands, xq);
            let now = Instant::now();
            if let Some(inbox) = &shard.inbox {
                xq.stats.taken_over += inbox.take(BATCH, |from, session, mac, pkt| {
                    xq.learn_neighbour(from.ip(), mac);
                    engine.handle_srtp_of(session, pkt, now, xq)
                });
            }
            descs.clear();
            xq.receive(BATCH as u32, &mut descs);
            // Each frame parsed once (its sender's MAC learned, a bad one counted).
            frames.clear();
            frames.extend(descs.iter().map(|d| xq.datagram(d)));
            sessions.clear();
            if self.shards.len() > 1 && !frames.is_empty() {
                // Looked up first, so the router is not held while the engine works;
                // the session found is the engine's too (one lookup per packet).
                let router = self.router.read().unwrap();
                sessions.extend(frames.iter().map(|f| {
                    f.as_ref()
                        .and_then(|(g, frame)| router.lookup(g.from, &frame[g.payload.clone()]))
                }));
            } else {
                sessions.resize(frames.len(), None);
            }
            for (f, &session) in frames.drain(..).zip(&sessions) {
                let owner = session.map_or(me, |id| self.shard_of(id));
                match (f, session) {
                    (Some((g, frame)), Some(id)) if owner == me => {
                        engine.handle_srtp_of(id, &mut frame[g.payload], now, xq)
                    }
                    // One engine (no router), or a source the router does not know:
                    // the engine's own lookup decides (and counts an unknown peer).
                    (Some((g, frame)), None) => {
                        engine.handle_srtp(g.from, &mut frame[g.payload], now, xq)
                    }
                    (Some((g, frame)), Some(id)) => {
                        let to = self.shards[owner].inbox.as_ref().expect("several shards");
                        if to.give(g.from, id, g.src_mac, &frame[g.payload]) {
                            xq.stats.handed_off += 1;
                            woken[owner] = true;
                        } else {
                            self.counters.count(Drop::HandoffFull);
                        }
                    }
                    (None, _) => self.counters.count(Drop::UnknownProtocol),
                }
            }
            let now = Instant::now();
            if now >= due {
                engine.handle_timeout(now, SystemTime::now(), xq);
                due = engine.poll_timeout().max(now + Duration::from_millis(1));
            }
            xq.recycle(&descs);
            xq.flush();
            drop(m);
            for (i, w) in woken.iter_mut().enumerate().filter(|(_, w)| **w) {
                *w = false;
                if let Some(inbox) = &self.shards[i].inbox {
                    inbox.wake();
                }
            }
        }
    }

    /// Queues a command for the engine that holds its session: applied now if that
    /// engine is idle, else by its worker before its next batch (never waited for).
    pub fn command(&self, cmd: Command) {
        // Only binding changes take the router's write lock (workers read it per batch).
        if self.shards.len() > 1 && Demux::binds(&cmd) {
            self.router.write().unwrap().apply(&cmd);
        }
        let shard = &self.shards[self.shard_of(cmd.session())];
        // The receiver lives as long as the shard (both are the Sfu's).
        let _ = shard.commands.send(cmd);
        match shard.media.try_lock() {
            Ok(mut m) => self.run(&mut m, |_, _| ()),
            Err(_) => {
                if let Some(inbox) = &shard.inbox {
                    inbox.wake();
                }
            }
        }
    }

    /// Per AF_XDP queue: its socket's counters (none on the socket path).
    pub fn xsk_stats(&self) -> Vec<(u32, crate::datapath::xsk::Stats)> {
        self.shards
            .iter()
            .filter_map(|sh| match &lock(&sh.media).io {
                Io::Socket(_) => None,
                Io::Xsk(q) => Some((q.queue, q.stats)),
            })
            .collect()
    }

    /// One datagram on the media socket: STUN and DTLS up to signalling, SRTP and
    /// SRTCP (decrypted in place in `buf`) to the engine of its session.
    pub fn on_datagram<S: Signalling>(&self, up: &Arc<S>, buf: &mut [u8], from: SocketAddr) {
        if buf.len() < 2 {
            return self.counters.count(Drop::UnknownProtocol);
        }
        match rtp::classify(buf[0], buf[1]) {
            Class::Stun => up.on_stun(buf, from),
            Class::Dtls => up.on_dtls(buf, from),
            Class::Rtp | Class::Rtcp => {
                // With AF_XDP, only what XDP does not steer yet (a peer not bound there).
                let routed = match self.shards.len() {
                    1 => None,
                    _ => self.router.read().unwrap().lookup(from, buf),
                };
                match routed {
                    Some(id) => self.with_shard(self.shard_of(id), |e, tx| {
                        e.handle_srtp_of(id, buf, Instant::now(), tx)
                    }),
                    None => {
                        self.with_shard(0, |e, tx| e.handle_srtp(from, buf, Instant::now(), tx))
                    }
                }
            }
            Class::TurnChannel | Class::Unknown => self.counters.count(Drop::UnknownProtocol),
        }
    }

    /// Receives from the media socket until it fails.
    pub async fn run_socket<S: Signalling>(
        self: Arc<Self>,
        socket: Arc<tokio::net::UdpSocket>,
        up: Arc<S>,
    ) -> anyhow::Result<()> {
        use std::os::fd::AsFd as _;
        let mut buf = vec![0u8; 2048];
        let (mut control, mut overflow_seen) = (super::rxq::Control::default(), 0u32);
        loop {
            let (n, from, overflow) = socket
                .async_io(tokio::io::Interest::READABLE, || {
                    super::rxq::recv_from(socket.as_fd(), &mut buf, &mut control)
                })
                .await?;
            if let Some(d) = overflow {
                let total = &self.counters.drops[Drop::SocketOverflow as usize];
                super::rxq::observe(total, &mut overflow_seen, d);
            }
            self.on_datagram(&up, &mut buf[..n], from);
        }
    }

    /// Runs the timers of the engines no worker runs (the socket path's); returns
    /// when they are next due (None: every engine has a worker).
    pub fn run_timers(&self) -> Option<Instant> {
        (0..self.shards.len())
            .filter(|i| !self.shards[*i].own_timers.load(Ordering::Relaxed))
            .map(|i| {
                self.with_shard(i, |e, tx| {
                    e.handle_timeout(Instant::now(), SystemTime::now(), tx);
                    e.poll_timeout()
                })
            })
            .min()
    }

    /// The next hop's MAC of peer `ip`, for every AF_XDP queue's copies.
    pub fn set_neighbour(&self, ip: std::net::IpAddr, mac: [u8; 6]) {
        for sh in &self.shards {
            if let Io::Xsk(q) = &mut lock(&sh.media).io {
                q.set_neighbour(ip, mac);
            }
        }
    }

    /// Holds shard `i`'s engine as its worker does mid-batch (tests of what must not
    /// wait for it).
    #[cfg(test)]
    pub(crate) fn hold(&self, i: usize) -> impl Sized + '_ {
        lock(&self.shards[i].media)
    }
}
