//! ICE over TCP for clients whose networks block UDP (RFC 6544 passive candidates,
//! RFC 4571 framing): `[webrtc] ice_tcp` is announced in every answer after the UDP
//! candidates, at a lower priority, so a browser uses it only when UDP fails.
//!
//! Each accepted connection gets a UDP socket of its own on the media address (a
//! "leg"): every frame the client sends goes to the media port from there, and what
//! the media port sends to the leg goes back down the connection, framed. So the SFU
//! sees an ordinary UDP peer at the leg's address: ICE, DTLS, SRTP and the engine are
//! the ones UDP clients get, on the socket path. The legs are listed so
//! `/api/sessions` and `/metrics` say which sessions came over TCP, and from where.
//!
//! Bad input costs a bounded amount and never UDP media: connections are capped in
//! total and per source address, the first frame must be a STUN binding request and
//! come within [`FIRST_FRAME`], a frame over [`MAX_FRAME`] bytes or a connection idle
//! past the consent timeout is closed, and a client that reads too slowly loses
//! datagrams (a bounded queue) rather than holding the media port back. Each refusal
//! is counted by reason.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::http::server::{ConnLimits, ConnSlot, Full};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
};

/// Longest datagram a frame may carry (media is well under the path MTU).
pub const MAX_FRAME: usize = 1500;
/// Time from the connection to its first frame (a STUN binding request).
pub const FIRST_FRAME: Duration = Duration::from_secs(10);
/// Datagrams queued towards a client that reads slowly; beyond it they are dropped.
const QUEUE: usize = 256;

/// Why a connection was refused or closed early (counted in /metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// More connections than `[webrtc.limits] ice_tcp_max_connections`.
    TooMany,
    /// More from one address than `ice_tcp_max_per_source`.
    PerSource,
    /// No frame within [`FIRST_FRAME`].
    Slow,
    /// The first frame is not a STUN binding request.
    NotStun,
    /// A frame longer than [`MAX_FRAME`] (or empty).
    Oversize,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::TooMany,
        Refusal::PerSource,
        Refusal::Slow,
        Refusal::NotStun,
        Refusal::Oversize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::TooMany => "too_many",
            Refusal::PerSource => "per_source",
            Refusal::Slow => "slow_first_frame",
            Refusal::NotStun => "not_stun",
            Refusal::Oversize => "oversize_frame",
        }
    }
}

/// The ICE-TCP listener's state, shared with the views.
#[derive(Default)]
pub struct IceTcp {
    /// Announced in answers (the listener's port on each candidate address).
    pub candidates: Vec<SocketAddr>,
    /// Open legs: the leg's UDP address (what the SFU sees) → the client's address.
    legs: Mutex<HashMap<SocketAddr, SocketAddr>>,
    refused: [AtomicU64; Refusal::ALL.len()],
    /// Datagrams dropped because the client read too slowly.
    pub queue_drops: AtomicU64,
    pub accepted: AtomicU64,
}

impl IceTcp {
    /// A listener's state, announcing `candidates`.
    pub fn new(candidates: Vec<SocketAddr>) -> IceTcp {
        IceTcp {
            candidates,
            ..Default::default()
        }
    }

    /// The client behind `addr` when `addr` is a TCP leg.
    pub fn client_of(&self, addr: &SocketAddr) -> Option<SocketAddr> {
        self.legs.lock().unwrap().get(addr).copied()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.legs.lock().unwrap().len()
    }

    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r as usize].load(Ordering::Relaxed)
    }

    fn refuse(&self, r: Refusal, peer: SocketAddr) {
        self.refused[r as usize].fetch_add(1, Ordering::Relaxed);
        log::debug!("ICE-TCP connection from {peer} refused: {}", r.name());
    }
}

/// The limits the listener enforces.
#[derive(Clone)]
pub struct TcpLimits {
    /// Connections open at once, in total and per client address (the HTTP
    /// listener's caps, with the ICE-TCP numbers).
    pub conns: Arc<ConnLimits>,
    /// Idle time after which a connection is closed (the consent timeout).
    pub idle: Duration,
}

impl TcpLimits {
    pub fn new(max_connections: usize, max_per_source: usize, idle: Duration) -> TcpLimits {
        TcpLimits {
            conns: Arc::new(ConnLimits::with(
                max_connections,
                max_per_source,
                FIRST_FRAME,
            )),
            idle,
        }
    }
}

/// Accepts connections for the daemon's life; each is served on its own task.
pub async fn serve(
    listener: TcpListener,
    media: SocketAddr,
    state: Arc<IceTcp>,
    limits: TcpLimits,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, typically: wait rather than spin.
                log::warn!("ICE-TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn = match limits.conns.take(peer.ip()) {
            Ok(c) => c,
            Err(Full::Total) => {
                state.refuse(Refusal::TooMany, peer);
                continue;
            }
            Err(Full::PerSource) => {
                state.refuse(Refusal::PerSource, peer);
                continue;
            }
        };
        state.accepted.fetch_add(1, Ordering::Relaxed);
        let (state, idle) = (state.clone(), limits.idle);
        tokio::spawn(async move {
            let mut leg = Leg {
                state: state.clone(),
                addr: None,
                _conn: conn,
            };
            if let Err(e) = serve_one(stream, peer, media, &state, idle, &mut leg).await {
                log::debug!("ICE-TCP connection from {peer}: {e:#}");
            }
        });
    }
}

/// A connection's leg (listed while it is open) and its place under the caps, both
/// given back on drop.
struct Leg {
    state: Arc<IceTcp>,
    addr: Option<SocketAddr>,
    _conn: ConnSlot,
}

impl Drop for Leg {
    fn drop(&mut self) {
        if let Some(a) = self.addr {
            self.state.legs.lock().unwrap().remove(&a);
        }
    }
}

/// Room for a keyframe's burst from the media port while the leg's task waits for
/// its turn (the default ~200 KiB is one frame at tens of Mbit/s); past net.core.rmem_max
/// where we may (root).
pub fn grow_receive_buffer(sock: &UdpSocket) {
    use std::os::fd::AsFd as _;
    let set = |opt| crate::datapath::rxq::set_int(sock.as_fd(), opt, 2 << 20).is_ok();
    let _ = set(libc::SO_RCVBUFFORCE) || set(libc::SO_RCVBUF);
}

/// Reads one RFC 4571 frame into `buf`: its length, or None at a clean end of stream.
pub async fn read_frame(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8; MAX_FRAME],
) -> anyhow::Result<Option<usize>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u16::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        anyhow::bail!("a frame of {n} bytes (1..={MAX_FRAME} expected)");
    }
    r.read_exact(&mut buf[..n]).await?;
    Ok(Some(n))
}

async fn serve_one(
    stream: TcpStream,
    peer: SocketAddr,
    media: SocketAddr,
    state: &Arc<IceTcp>,
    idle: Duration,
    leg_slot: &mut Leg,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = [0u8; MAX_FRAME];
    let first = match tokio::time::timeout(FIRST_FRAME, read_frame(&mut rd, &mut buf)).await {
        Err(_) => {
            state.refuse(Refusal::Slow, peer);
            return Ok(());
        }
        Ok(Err(e)) => {
            state.refuse(Refusal::Oversize, peer);
            return Err(e);
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(n))) => n,
    };
    if super::ice::parse_check(&buf[..first]).is_err() {
        state.refuse(Refusal::NotStun, peer);
        return Ok(());
    }
    // The leg: from the media address's IP, so replies route like any local peer's.
    let sock = UdpSocket::bind(SocketAddr::new(media.ip(), 0)).await?;
    grow_receive_buffer(&sock);
    sock.connect(media).await?;
    let leg = sock.local_addr()?;
    state.legs.lock().unwrap().insert(leg, peer);
    leg_slot.addr = Some(leg);
    let sock = Arc::new(sock);
    sock.send(&buf[..first]).await?;

    // Media port → client: through a bounded queue, so a slow reader loses datagrams
    // instead of growing memory or stalling the leg.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let down = {
        let (sock, state) = (sock.clone(), state.clone());
        tokio::spawn(async move {
            let mut b = [0u8; 2048];
            loop {
                // An error is one ICMP report (the media port restarting): go on.
                let Ok(n) = sock.recv(&mut b).await else {
                    continue;
                };
                if n > MAX_FRAME {
                    continue;
                }
                if tx.try_send(b[..n].to_vec()).is_err() {
                    state.queue_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let writer = tokio::spawn(async move {
        // Whatever is queued goes in one write (a keyframe's burst: one syscall, not
        // one per datagram), up to 64 KiB.
        let mut out = Vec::with_capacity(64 << 10);
        while let Some(d) = rx.recv().await {
            out.clear();
            let mut next = Some(d);
            while let Some(d) = next.take() {
                out.extend_from_slice(&(d.len() as u16).to_be_bytes());
                out.extend_from_slice(&d);
                if out.len() < 62 << 10 {
                    next = rx.try_recv().ok();
                }
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
    });
    // Client → media port, until the client closes, errs or idles out.
    let result = loop {
        match tokio::time::timeout(idle, read_frame(&mut rd, &mut buf)).await {
            Err(_) => break Ok(()),
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(e)) => {
                state.refuse(Refusal::Oversize, peer);
                break Err(e);
            }
            Ok(Ok(Some(n))) => {
                let _ = sock.send(&buf[..n]).await;
            }
        }
    };
    down.abort();
    writer.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn framed(c: &mut TcpStream, d: &[u8]) {
        c.write_all(&(d.len() as u16).to_be_bytes()).await.unwrap();
        c.write_all(d).await.unwrap();
    }

    /// Whether the server closed `c` (within a second).
    async fn closed(c: &mut TcpStream) -> bool {
        let mut b = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), c.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// A check opens a leg: its frames reach the media port from the leg's address,
    /// the media port's answer comes back framed, and the views see the client behind
    /// the leg. Junk first frames, oversize frames and connections past the per-source
    /// cap are closed and counted by reason.
    #[tokio::test]
    async fn legs_carry_frames_both_ways_and_bad_input_is_refused() {
        let media = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let state = Arc::new(IceTcp::new(vec![at]));
        let limits = TcpLimits::new(100, 2, Duration::from_secs(5));
        tokio::spawn(serve(
            listener,
            media.local_addr().unwrap(),
            state.clone(),
            limits,
        ));

        let check = crate::webrtc::ice::binding_request("ours:theirs", "pwd", false);
        let mut c = TcpStream::connect(at).await.unwrap();
        framed(&mut c, &check).await;
        let mut b = [0u8; 2048];
        let (n, leg) = media.recv_from(&mut b).await.unwrap();
        assert_eq!(&b[..n], &check[..], "the check reached the media port");
        assert_eq!(state.client_of(&leg), Some(c.local_addr().unwrap()));
        framed(&mut c, b"\x80after").await;
        let (n, _) = media.recv_from(&mut b).await.unwrap();
        assert_eq!(&b[..n], b"\x80after");
        media.send_to(b"answer", leg).await.unwrap();
        let mut got = [0u8; 8];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x00\x06answer", "framed back down the connection");

        // A first frame that is not a check.
        let mut junk = TcpStream::connect(at).await.unwrap();
        framed(&mut junk, b"GET / HTTP/1.1").await;
        assert!(closed(&mut junk).await);
        assert_eq!(state.refused(Refusal::NotStun), 1);
        // A frame longer than a datagram.
        let mut big = TcpStream::connect(at).await.unwrap();
        big.write_all(&[0xff, 0xff, 0]).await.unwrap();
        assert!(closed(&mut big).await);
        assert_eq!(state.refused(Refusal::Oversize), 1);
        // Past the per-source cap (c holds one place, the next takes the other).
        let _second = TcpStream::connect(at).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = TcpStream::connect(at).await.unwrap();
        assert!(closed(&mut third).await);
        assert_eq!(state.refused(Refusal::PerSource), 1);
        assert_eq!(state.open(), 1, "one leg: the checked connection's");
        drop(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(state.open(), 0, "the leg closed with its connection");
    }

    #[tokio::test]
    async fn frames_are_read_whole_and_oversize_ones_refused() {
        let mut wire: &[u8] = &[0, 3, 1, 2, 3, 0, 1, 9];
        let mut buf = [0u8; MAX_FRAME];
        assert_eq!(read_frame(&mut wire, &mut buf).await.unwrap(), Some(3));
        assert_eq!(&buf[..3], &[1, 2, 3]);
        assert_eq!(read_frame(&mut wire, &mut buf).await.unwrap(), Some(1));
        assert_eq!(read_frame(&mut wire, &mut buf).await.unwrap(), None);
        let big = (MAX_FRAME as u16 + 1).to_be_bytes();
        let mut wire: &[u8] = &[big[0], big[1], 0];
        assert!(read_frame(&mut wire, &mut buf).await.is_err());
        let mut wire: &[u8] = &[0, 0];
        assert!(read_frame(&mut wire, &mut buf).await.is_err());
    }
}
