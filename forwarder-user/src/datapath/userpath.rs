//! Userspace data path: the same routing and rewrite as the XDP program, on a UDP
//! socket with recvmmsg/sendmmsg. The fallback where XDP is unavailable, and the
//! honest baseline the benchmarks compare the kernel path against.

use std::{
    collections::{HashMap, HashSet},
    io,
    mem::{self, MaybeUninit},
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use forwarder_common::{
    routes::RouteValue,
    rtp::{self, Class, classify},
    verdicts::{NUM_VERDICTS, Verdict, VerdictStats},
};

use crate::dataplane::maps::{Listener, Route};

const BATCH: usize = 64;
const BUF: usize = 2048;

/// Per-verdict counters, the userspace twin of `EFWD_VERDICT_V4`, plus what the
/// kernel dropped before this path could judge it (full receive queues).
pub struct UserCounters {
    packets: [AtomicU64; NUM_VERDICTS as usize],
    bytes: [AtomicU64; NUM_VERDICTS as usize],
    pub socket_overflow: AtomicU64,
}

impl Default for UserCounters {
    fn default() -> Self {
        UserCounters {
            packets: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            socket_overflow: Default::default(),
        }
    }
}

impl UserCounters {
    fn add(&self, v: Verdict, len: usize) {
        self.packets[v as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[v as usize].fetch_add(len as u64, Ordering::Relaxed);
    }

    pub fn totals(&self) -> Vec<(Verdict, VerdictStats)> {
        Verdict::ALL
            .iter()
            .map(|v| {
                (
                    *v,
                    VerdictStats {
                        packets: self.packets[*v as usize].load(Ordering::Relaxed),
                        bytes: self.bytes[*v as usize].load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }
}

struct Target {
    value: RouteValue,
    /// `out_dst` as a sockaddr, converted once here rather than per packet.
    out_sa: libc::sockaddr_storage,
    out_sa_len: libc::socklen_t,
    /// Index into the output sockets.
    sock: usize,
    /// forward_tx when the copy leaves by the interface its source's packets come in
    /// on, forward_redirect otherwise: the verdict XDP would count.
    verdict: Verdict,
}

/// One listener's forwarding loop.
pub struct UserPath {
    listen: UdpSocket,
    outs: Vec<UdpSocket>,
    /// A stream's copies: one, or several (fan-out).
    routes: HashMap<(SocketAddr, u32), Vec<Target>>,
    /// Sources with at least one route: the userspace twin of `EFWD_SOURCES_V1`, so a
    /// route miss is one lookup, not a scan of the routes.
    sources: HashSet<SocketAddr>,
    drop_unknown_source: bool,
    drop_no_route: bool,
}

impl UserPath {
    /// `routes` carry their egress ifindex (0: the ingress interface) and
    /// `ingress_of` names the interface a source's packets arrive on, so each copy is
    /// counted under the verdict the XDP program gives it.
    pub fn new(
        listener: &Listener,
        routes: &[Route],
        ingress_of: impl Fn(SocketAddr) -> u32,
    ) -> Result<Self> {
        let listen = listener.addr;
        let sock = UdpSocket::bind(listen).with_context(|| {
            format!("binding listener {listen}: in use, or not a local address?")
        })?;
        // Big buffers: a burst of a few thousand packets must not overflow them.
        set_buf(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        crate::datapath::rxq::enable(sock.as_fd())
            .with_context(|| format!("enabling SO_RXQ_OVFL on listener {listen}"))?;
        let mut outs: Vec<(SocketAddr, UdpSocket)> = Vec::new();
        let mut table = HashMap::new();
        for r in routes.iter().filter(|r| r.listen == listen) {
            r.validate()?;
            let idx = if r.out_src == listen {
                usize::MAX
            } else if let Some(i) = outs.iter().position(|(a, _)| *a == r.out_src) {
                i
            } else {
                let s = UdpSocket::bind(r.out_src).with_context(|| {
                    format!(
                        "binding route source {}: in use, or not a local address?",
                        r.out_src
                    )
                })?;
                set_buf(&s, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 8 << 20);
                outs.push((r.out_src, s));
                outs.len() - 1
            };
            // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
            let mut out_sa: libc::sockaddr_storage = unsafe { mem::zeroed() };
            let out_sa_len = sockaddr_from(r.out_dst, &mut out_sa);
            let tx = r.egress_ifindex == 0 || r.egress_ifindex == ingress_of(r.source);
            table
                .entry((r.source, r.ssrc))
                .or_insert_with(Vec::new)
                .push(Target {
                    value: r.value(0),
                    out_sa,
                    out_sa_len,
                    sock: idx,
                    verdict: if tx {
                        Verdict::ForwardTx
                    } else {
                        Verdict::ForwardRedirect
                    },
                });
        }
        let mut outs: Vec<UdpSocket> = outs.into_iter().map(|(_, s)| s).collect();
        // usize::MAX meant "the listening socket": it goes last.
        outs.push(sock.try_clone()?);
        let last = outs.len() - 1;
        for t in table.values_mut().flatten() {
            if t.sock == usize::MAX {
                t.sock = last;
            }
        }
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(UserPath {
            listen: sock,
            outs,
            sources: table.keys().map(|(src, _)| *src).collect(),
            routes: table,
            drop_unknown_source: listener.drop_unknown_source,
            drop_no_route: listener.drop_no_route,
        })
    }

    /// Forwards until `stop` is set. Every buffer and message header is set up once;
    /// the loop itself allocates nothing.
    pub fn run(&self, stop: &AtomicBool, counters: &UserCounters) -> Result<()> {
        let mut bufs = vec![[0u8; BUF]; BATCH];
        // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
        let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { mem::zeroed() }; BATCH];
        let mut controls = vec![crate::datapath::rxq::Control::default(); BATCH];
        let mut overflow_seen = 0u32;
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: BUF,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(addrs.iter_mut())
            .zip(controls.iter_mut())
            .map(|((iov, addr), control)| {
                // SAFETY: mmsghdr is a plain C struct; all-zero is valid.
                let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
                h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = control.as_mut_ptr().cast();
                h
            })
            .collect();
        // Per output socket: the copies queued for it, in buffers of their own (each
        // copy of a fan-out is rewritten differently).
        let mut queues: Vec<OutQueue> = self.outs.iter().map(|_| OutQueue::new()).collect();
        while !stop.load(Ordering::Relaxed) {
            for m in msgs.iter_mut() {
                // The kernel overwrote these with the previous batch's lengths.
                m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
                m.msg_hdr.msg_controllen = mem::size_of::<crate::datapath::rxq::Control>();
            }
            // SAFETY: every header points at its own live buffer, address and control
            // block of the lengths given; BATCH is the vector's length.
            let n = unsafe {
                libc::recvmmsg(
                    self.listen.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    _ => return Err(e).context("recvmmsg"),
                }
            }
            // The count is cumulative: the batch's last datagram carries the newest.
            if let Some(d) = (n > 0)
                .then(|| crate::datapath::rxq::read(&msgs[n as usize - 1].msg_hdr))
                .flatten()
            {
                crate::datapath::rxq::observe(&counters.socket_overflow, &mut overflow_seen, d);
            }
            for i in 0..n as usize {
                let len = msgs[i].msg_len as usize;
                let Some(src) = sockaddr_to(&addrs[i]) else {
                    continue;
                };
                let pkt = &bufs[i][..len];
                match self.route_one(pkt, src) {
                    Ok(targets) => {
                        counters.add(verdict_of(targets), len);
                        for t in targets {
                            let q = &mut queues[t.sock];
                            if q.full() {
                                q.flush(&self.outs[t.sock]);
                            }
                            q.push(pkt, t);
                        }
                    }
                    Err(v) => counters.add(v, len),
                }
            }
            for (q, sock) in queues.iter_mut().zip(self.outs.iter()) {
                q.flush(sock);
            }
        }
        Ok(())
    }

    /// What this path does with a datagram from `src` (rewriting it in place when it
    /// is forwarded): the same verdict the XDP program gives the same datagram.
    pub fn judge(&self, pkt: &mut [u8], src: SocketAddr) -> Verdict {
        match self.route_one(pkt, src) {
            Ok([t]) => {
                rtp::rewrite(pkt, &t.value);
                t.verdict
            }
            Ok(targets) => verdict_of(targets),
            Err(v) => v,
        }
    }

    /// Routes one datagram: its stream's copies, or the verdict.
    fn route_one(&self, pkt: &[u8], src: SocketAddr) -> Result<&[Target], Verdict> {
        if pkt.len() < 2 {
            return Err(Verdict::DropUnknownProtocol);
        }
        match classify(pkt[0], pkt[1]) {
            Class::Stun => return Err(Verdict::PassStun),
            Class::Dtls => return Err(Verdict::PassDtls),
            Class::TurnChannel => return Err(Verdict::PassTurnChannel),
            Class::Rtcp if self.drop_unknown_source && !self.sources.contains(&src) => {
                return Err(Verdict::DropUnknownSource);
            }
            Class::Rtcp => return Err(Verdict::PassRtcp),
            Class::Unknown => return Err(Verdict::DropUnknownProtocol),
            Class::Rtp => {}
        }
        if rtp::validate(pkt).is_err() {
            return Err(Verdict::DropMalformedRtp);
        }
        let ssrc = u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]);
        let Some(targets) = self.routes.get(&(src, ssrc)) else {
            return Err(
                match (self.sources.contains(&src), self.drop_unknown_source) {
                    (true, _) if self.drop_no_route => Verdict::DropNoRoute,
                    (true, _) => Verdict::PassNoRoute,
                    (false, true) => Verdict::DropUnknownSource,
                    (false, false) => Verdict::PassUnknownSource,
                },
            );
        };
        Ok(targets)
    }
}

/// The verdict XDP gives a packet with these copies: one is forwarded by XDP itself,
/// several are handed to the replicator.
fn verdict_of(targets: &[Target]) -> Verdict {
    match targets {
        [t] => t.verdict,
        _ => Verdict::ForwardFanout,
    }
}

/// Copies waiting for one output socket's next sendmmsg.
struct OutQueue {
    bufs: Vec<[u8; BUF]>,
    lens: Vec<usize>,
    /// Each copy's destination, pointing into its route's Target (alive as long as
    /// the path).
    names: Vec<(*const libc::sockaddr_storage, libc::socklen_t)>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl OutQueue {
    fn new() -> Self {
        OutQueue {
            bufs: vec![[0u8; BUF]; BATCH],
            lens: Vec::with_capacity(BATCH),
            names: Vec::with_capacity(BATCH),
            iovs: Vec::with_capacity(BATCH),
            msgs: Vec::with_capacity(BATCH),
        }
    }

    fn full(&self) -> bool {
        self.lens.len() == BATCH
    }

    /// Queues a copy of `pkt` rewritten for `t` (the caller made room).
    fn push(&mut self, pkt: &[u8], t: &Target) {
        let i = self.lens.len();
        let buf = &mut self.bufs[i][..pkt.len()];
        buf.copy_from_slice(pkt);
        rtp::rewrite(buf, &t.value);
        self.lens.push(pkt.len());
        self.names.push((&t.out_sa, t.out_sa_len));
    }

    fn flush(&mut self, sock: &UdpSocket) {
        self.iovs.clear();
        self.msgs.clear();
        for (buf, len) in self.bufs.iter_mut().zip(&self.lens) {
            self.iovs.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: *len,
            });
        }
        for (iov, (name, name_len)) in self.iovs.iter_mut().zip(&self.names) {
            // SAFETY: mmsghdr is a plain C struct; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            // sendmmsg only reads the address.
            h.msg_hdr.msg_name = name.cast_mut().cast();
            h.msg_hdr.msg_namelen = *name_len;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            self.msgs.push(h);
        }
        let mut off = 0;
        while off < self.msgs.len() {
            // SAFETY: the headers point at this queue's buffers and the routes'
            // addresses, all alive until the call returns.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.msgs[off..].as_mut_ptr(),
                    (self.msgs.len() - off) as u32,
                    0,
                )
            };
            if r <= 0 {
                // A full socket buffer loses the rest, like a full NIC queue would; it
                // is not worth stalling the receive side.
                break;
            }
            off += r as usize;
        }
        self.lens.clear();
        self.names.clear();
    }
}

/// Sets a socket buffer size: the FORCE option first, since the plain one is silently
/// capped at net.core.[rw]mem_max (the FORCE one needs CAP_NET_ADMIN, which the
/// daemon has); a warning if the kernel granted less than asked.
pub(crate) fn set_buf(s: &UdpSocket, force: libc::c_int, plain: libc::c_int, bytes: libc::c_int) {
    let set = |opt| crate::datapath::rxq::set_int(s.as_fd(), opt, bytes).is_ok();
    if set(force) || set(plain) {
        let mut got: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket fd, a c_int out-parameter and its length.
        unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                plain,
                (&mut got as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        // The kernel reports twice the size set (it counts its bookkeeping).
        if got < bytes {
            log::warn!(
                "socket buffer {} B asked, {got} B granted: raise net.core.{}mem_max or run with CAP_NET_ADMIN",
                bytes,
                if plain == libc::SO_RCVBUF { "r" } else { "w" }
            );
        }
    }
}

pub(crate) fn sockaddr_to(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in, which it is
            // sized and aligned for.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}

fn sockaddr_from(a: SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
    *ss = unsafe { MaybeUninit::zeroed().assume_init() };
    match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is sized and aligned for any sockaddr.
            let s: &mut libc::sockaddr_in =
                unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in) };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = v4.port().to_be();
            s.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            mem::size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let s: &mut libc::sockaddr_in6 =
                unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in6) };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = v6.port().to_be();
            s.sin6_addr.s6_addr = v6.ip().octets();
            mem::size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

/// Runs one forwarding thread per listener until `stop`; the first error ends all.
pub fn run_all(
    listeners: &[Listener],
    routes: &[Route],
    stop: Arc<AtomicBool>,
    counters: Arc<UserCounters>,
) -> Result<Vec<std::thread::JoinHandle<Result<()>>>> {
    let mut handles = Vec::new();
    // The interfaces the kernel would use: copies and their sources' packets.
    let ifindex_to = |ip: std::net::IpAddr| {
        crate::dataplane::resolve::route_get(ip)
            .ok()
            .and_then(|(dev, _)| crate::dataplane::preflight::ifindex(&dev).ok())
            .unwrap_or(0)
    };
    let routes: Vec<Route> = routes
        .iter()
        .map(|r| Route {
            egress_ifindex: ifindex_to(r.out_dst.ip()),
            ..r.clone()
        })
        .collect();
    for l in listeners {
        let path = UserPath::new(l, &routes, |src| ifindex_to(src.ip()))?;
        let stop = stop.clone();
        let counters = counters.clone();
        handles.push(std::thread::spawn(move || path.run(&stop, &counters)));
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams the kernel dropped on a full listener queue are counted beside the
    /// verdicts: judged + overflowed is exactly what was sent.
    #[test]
    fn socket_queue_overflow_is_counted() {
        let listener = Listener {
            addr: "127.0.0.1:0".parse().unwrap(),
            drop_unknown_source: true,
            drop_no_route: false,
            webrtc: false,
        };
        let path = UserPath::new(&listener, &[], |_| 0).unwrap();
        let to = path.listen.local_addr().unwrap();
        crate::datapath::rxq::set_int(path.listen.as_fd(), libc::SO_RCVBUF, 4096).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut rtp = [0u8; 100];
        rtp[0] = 0x80;
        rtp[1] = 96;
        const SENT: u64 = 400;
        for _ in 0..SENT {
            tx.send_to(&rtp, to).unwrap(); // a stranger's RTP: drop_unknown_source
        }
        let (stop, counters) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(UserCounters::default()),
        );
        let worker = {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::spawn(move || path.run(&stop, &counters))
        };
        let seen = || {
            let judged = counters.totals()[Verdict::DropUnknownSource as usize]
                .1
                .packets;
            (judged, counters.socket_overflow.load(Ordering::Relaxed))
        };
        let settle = |want: u64| {
            for _ in 0..200 {
                let (a, b) = seen();
                if a + b == want {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        settle(SENT); // may stop short: the last drops ride on the next datagram
        tx.send_to(&rtp, to).unwrap();
        settle(SENT + 1);
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap().unwrap();
        let (judged, overflowed) = seen();
        assert!(overflowed > 0, "a 4 KiB queue must overflow");
        assert_eq!(
            judged + overflowed,
            SENT + 1,
            "judged {judged} + overflowed {overflowed}"
        );
    }
}
