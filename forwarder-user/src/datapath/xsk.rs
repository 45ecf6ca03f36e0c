//! The AF_XDP data path of the WebRTC media port: one socket per receive queue, fed by
//! the XDP program's steering (`EFWD_PEERS_V1` → `EFWD_XSKS_V1`). Frames come in on the
//! RX ring, the media engine decrypts them in place and writes its copies straight
//! into TX frames; no socket syscall per packet, one kick per batch.
//!
//! UMEM: the first half of the frames is the receive pool (always on the fill ring or
//! being processed), the second half the transmit pool (free, or on the TX ring until
//! the completion ring gives it back).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    os::fd::RawFd,
    ptr::NonNull,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use forwarder_common::csum;
use xdpilone::{IfInfo, Socket, SocketConfig, Umem, UmemConfig, xdp::XdpDesc};

use crate::media::Transmit;

const FRAME: u32 = 2048;
const FRAMES: u32 = 4096;
const RING: u32 = 2048;
/// TX descriptors queued before the ring is kicked.
pub const BATCH: usize = 64;
/// How long a worker waits for a full device before it drops copies: long enough for
/// a veth peer's NAPI or a NIC to drain a burst, short enough that a stuck device does
/// not stall the worker's receive side (its RX ring holds RING frames).
const TX_WAIT: Duration = Duration::from_millis(2);
const ETH: usize = 14;
const V4_HDR: usize = ETH + 20 + 8;
const V6_HDR: usize = ETH + 40 + 8;

/// How the socket is bound: zero-copy where the driver allows, else copy mode (veth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    ZeroCopy,
    Copy,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::ZeroCopy => "zero-copy",
            Mode::Copy => "copy",
        }
    }
}

/// The anonymous mapping behind a UMEM: page aligned, as the kernel requires.
struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Area {
    fn new(len: usize) -> Result<Area> {
        // SAFETY: an anonymous private mapping; no file, no aliasing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(anyhow!(
                "mapping {len} bytes for the AF_XDP UMEM: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Area {
            ptr: NonNull::new(p as *mut u8).expect("mmap succeeded"),
            len,
        })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the rings that used it are dropped first
        // (field order in `XskQueue`).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// One received datagram: its source, our address it went to, and where its UDP
/// payload lies in the frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub src_mac: [u8; 6],
    pub payload: std::ops::Range<usize>,
}

/// Parses Ethernet (one optional 802.1Q tag), IPv4 or IPv6, UDP. None for anything
/// else: the XDP program steers only UDP to our port, so None means a bug or a race.
pub fn parse(frame: &[u8]) -> Option<Datagram> {
    let mut l3 = ETH;
    let mut ty = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ty == 0x8100 {
        ty = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        l3 += 4;
    }
    let src_mac: [u8; 6] = frame[6..12].try_into().ok()?;
    let (from_ip, to_ip, l4): (IpAddr, IpAddr, usize) = match ty {
        0x0800 => {
            let h = frame.get(l3..l3 + 20)?;
            let ihl = (h[0] & 0x0f) as usize * 4;
            if h[0] >> 4 != 4 || ihl < 20 || h[9] != 17 {
                return None;
            }
            let src: [u8; 4] = h[12..16].try_into().ok()?;
            let dst: [u8; 4] = h[16..20].try_into().ok()?;
            (src.into(), dst.into(), l3 + ihl)
        }
        0x86dd => {
            let h = frame.get(l3..l3 + 40)?;
            if h[0] >> 4 != 6 || h[6] != 17 {
                return None;
            }
            let src: [u8; 16] = h[8..24].try_into().ok()?;
            let dst: [u8; 16] = h[24..40].try_into().ok()?;
            (src.into(), dst.into(), l3 + 40)
        }
        _ => return None,
    };
    let u = frame.get(l4..l4 + 8)?;
    let len = u16::from_be_bytes([u[4], u[5]]) as usize;
    if len < 8 || l4 + len > frame.len() {
        return None;
    }
    Some(Datagram {
        from: SocketAddr::new(from_ip, u16::from_be_bytes([u[0], u[1]])),
        to: SocketAddr::new(to_ip, u16::from_be_bytes([u[2], u[3]])),
        src_mac,
        payload: l4 + 8..l4 + len,
    })
}

/// Writes Ethernet, IP and UDP headers in front of a `payload_len`-byte payload that
/// is already at `frame[header_len(to)..]`. IPv4 UDP goes without a checksum (RFC 768
/// allows it; SRTP's tag authenticates the payload end to end, and summing every byte
/// would cost more than the rewrite); IPv6 requires one and gets it.
pub fn write_headers(
    frame: &mut [u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    from: SocketAddr,
    to: SocketAddr,
    payload_len: usize,
) -> usize {
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    let udp_len = 8 + payload_len;
    let l4 = match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ip = &mut frame[ETH..ETH + 20];
            ip[0] = 0x45;
            ip[1] = 0;
            ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            ip[4..8].copy_from_slice(&[0, 0, 0x40, 0]); // id 0, DF
            ip[8] = 64;
            ip[9] = 17;
            ip[10..12].fill(0);
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = csum::checksum(ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ETH + 20
        }
        (s, d) => {
            let (s, d) = (v6(s), v6(d));
            frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            let ip = &mut frame[ETH..ETH + 40];
            ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
            ip[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            ip[6] = 17;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s);
            ip[24..40].copy_from_slice(&d);
            ETH + 40
        }
    };
    let u = &mut frame[l4..l4 + 8];
    u[0..2].copy_from_slice(&from.port().to_be_bytes());
    u[2..4].copy_from_slice(&to.port().to_be_bytes());
    u[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    u[6..8].fill(0);
    if to.is_ipv6() {
        let c = csum::udp_checksum(&v6(from.ip()), &v6(to.ip()), &frame[l4..l4 + udp_len]);
        frame[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    }
    l4 + udp_len
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
        IpAddr::V6(v) => v.octets(),
    }
}

pub fn header_len(to: SocketAddr) -> usize {
    if to.is_ipv6() { V6_HDR } else { V4_HDR }
}

/// What one queue's socket has seen, besides what the engine counts.
#[derive(Default, Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub rx: u64,
    pub tx: u64,
    /// Frames the XDP program steered here that are not UDP (never expected).
    pub rx_unparsed: u64,
    /// Copies dropped because the device stayed full past TX_WAIT (no free TX frame,
    /// or the ring would not take them).
    pub tx_ring_full: u64,
    /// Short pauses waiting for the device to drain (backpressure, no loss).
    pub tx_waits: u64,
    /// Copies to a peer whose MAC address is not known yet.
    pub tx_no_neighbour: u64,
    pub kicks: u64,
    /// Received here for a room another worker's engine holds: handed to it.
    pub handed_off: u64,
    /// Handled here for a room of this worker's engine, received on another queue.
    pub taken_over: u64,
}

impl Stats {
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("rx", self.rx),
            ("tx", self.tx),
            ("rx_unparsed", self.rx_unparsed),
            ("tx_ring_full", self.tx_ring_full),
            ("tx_waits", self.tx_waits),
            ("tx_no_neighbour", self.tx_no_neighbour),
            ("kicks", self.kicks),
            ("handed_off", self.handed_off),
            ("taken_over", self.taken_over),
        ]
    }
}

/// One AF_XDP socket on one receive queue with its UMEM and rings.
pub struct XskQueue {
    // Field order is drop order: rings before the UMEM, the UMEM before its memory.
    rx: xdpilone::RingRx,
    tx: xdpilone::RingTx,
    device: xdpilone::DeviceQueue,
    _umem: Umem,
    area: Area,
    fd: RawFd,
    mode: Mode,
    pub queue: u32,
    /// Our media address (the source of every copy) and the interface's MAC.
    local: SocketAddr,
    mac: [u8; 6],
    /// Next-hop MAC per peer address: learned from what arrives, or resolved by the
    /// control plane when ICE binds the peer.
    neighbours: HashMap<IpAddr, [u8; 6]>,
    tx_free: Vec<u64>,
    pending: Vec<XdpDesc>,
    pub stats: Stats,
    /// Copies to this host's own media address (ICE-TCP legs) take the media socket.
    pub local_out: Option<super::socket::LocalOut>,
}

// SAFETY: the raw UMEM pointer and the rings are used only by the thread holding the
// queue (behind the media lock); nothing is shared with another thread.
unsafe impl Send for XskQueue {}

impl XskQueue {
    /// Opens and binds a socket on `ifindex`/`queue`, zero-copy if the driver takes it.
    pub fn open(ifindex: u32, queue: u32, local: SocketAddr, mac: [u8; 6]) -> Result<XskQueue> {
        match Self::open_mode(ifindex, queue, local, mac, Mode::ZeroCopy) {
            Ok(q) => Ok(q),
            Err(zc) => Self::open_mode(ifindex, queue, local, mac, Mode::Copy).map_err(|e| {
                anyhow!(
                    "AF_XDP on ifindex {ifindex} queue {queue}: zero-copy: {zc:#}; copy mode: {e:#}"
                )
            }),
        }
    }

    fn open_mode(
        ifindex: u32,
        queue: u32,
        local: SocketAddr,
        mac: [u8; 6],
        mode: Mode,
    ) -> Result<XskQueue> {
        let e = |what: &str| {
            let what = what.to_string();
            move |err: xdpilone::Errno| anyhow!("{what}: {err:?}")
        };
        let area = Area::new((FRAME * FRAMES) as usize)?;
        let cfg = UmemConfig {
            fill_size: RING,
            complete_size: RING,
            frame_size: FRAME,
            headroom: 0,
            flags: 0,
        };
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.len);
        // SAFETY: the area is page aligned, FRAME * FRAMES long, and outlives the UMEM
        // (both live in the returned queue, the area dropped last).
        let umem = unsafe { Umem::new(cfg, slice) }.map_err(e("registering the UMEM"))?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex)
            .map_err(e("looking up the interface"))?;
        info.set_queue(queue);
        let sock = Socket::with_shared(&info, &umem).map_err(e("creating the AF_XDP socket"))?;
        let mut device = umem
            .fq_cq(&sock)
            .map_err(e("creating the fill/completion rings"))?;
        let flags = SocketConfig::XDP_BIND_NEED_WAKEUP
            | match mode {
                Mode::ZeroCopy => SocketConfig::XDP_BIND_ZEROCOPY,
                Mode::Copy => SocketConfig::XDP_BIND_COPY,
            };
        let rxtx = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(RING),
                    tx_size: NonZeroU32::new(RING),
                    bind_flags: flags,
                },
            )
            .map_err(e("creating the RX/TX rings"))?;
        let rx = rxtx.map_rx().map_err(e("mapping the RX ring"))?;
        let tx = rxtx.map_tx().map_err(e("mapping the TX ring"))?;
        umem.bind(&rxtx)
            .map_err(e(&format!("binding in {} mode", mode.name())))?;
        // The receive half goes on the fill ring at once.
        let rx_frames = FRAMES / 2;
        {
            let mut w = device.fill(rx_frames);
            let n = w.insert((0..rx_frames).map(|i| (i * FRAME) as u64));
            w.commit();
            if n != rx_frames.min(RING) {
                return Err(anyhow!("the fill ring took {n} of {rx_frames} frames"));
            }
        }
        let fd = rx.as_raw_fd();
        Ok(XskQueue {
            rx,
            tx,
            device,
            _umem: umem,
            area,
            fd,
            mode,
            queue,
            local,
            mac,
            neighbours: HashMap::new(),
            tx_free: (FRAMES / 2..FRAMES).map(|i| (i * FRAME) as u64).collect(),
            pending: Vec::with_capacity(BATCH),
            stats: Stats::default(),
            local_out: None,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn set_neighbour(&mut self, ip: IpAddr, mac: [u8; 6]) {
        self.neighbours.insert(ip, mac);
    }

    /// What a received frame showed of its sender (per packet: no write unless new).
    pub fn learn_neighbour(&mut self, ip: IpAddr, mac: [u8; 6]) {
        if self.neighbours.get(&ip) != Some(&mac) {
            self.neighbours.insert(ip, mac);
        }
    }

    fn frame_mut(&mut self, addr: u64) -> &'static mut [u8] {
        let base = addr & !(FRAME as u64 - 1);
        debug_assert!(base + FRAME as u64 <= self.area.len as u64);
        // SAFETY: `base` is a frame inside the area; a frame is owned by exactly one of
        // the kernel (on a ring) or us (taken off a ring, or free), and we hand out one
        // slice per frame we own. The 'static lie is bounded by the caller giving the
        // frame back (recycle / tx) before the queue is dropped.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.area.ptr.as_ptr().add(base as usize),
                FRAME as usize,
            )
        }
    }

    /// Takes up to `max` received frames off the RX ring.
    pub fn receive(&mut self, max: u32, out: &mut Vec<XdpDesc>) {
        let mut r = self.rx.receive(max);
        while let Some(d) = r.read() {
            out.push(d);
        }
        r.release();
        self.stats.rx += out.len() as u64;
    }

    /// The frame of a received descriptor, parsed; also learns the sender's MAC.
    pub fn datagram(&mut self, d: &XdpDesc) -> Option<(Datagram, &'static mut [u8])> {
        let frame = self.frame_mut(d.addr);
        let off = (d.addr & (FRAME as u64 - 1)) as usize;
        let frame = &mut frame[off..off + d.len as usize];
        let Some(g) = parse(frame) else {
            self.stats.rx_unparsed += 1;
            return None;
        };
        self.learn_neighbour(g.from.ip(), g.src_mac);
        Some((g, frame))
    }

    /// Gives received frames back to the kernel.
    pub fn recycle(&mut self, descs: &[XdpDesc]) {
        let mut w = self.device.fill(descs.len() as u32);
        w.insert(descs.iter().map(|d| d.addr & !(FRAME as u64 - 1)));
        w.commit();
    }

    /// Queues what is pending on the TX ring and kicks it; takes back completed frames.
    /// When the ring cannot take them all (the device is draining slower than copies
    /// are made: a veth peer's 256-entry ring, a NIC queue), waits for it up to
    /// TX_WAIT, the link's own backpressure, rather than drop; only a device that stays
    /// stuck past that costs copies, counted as tx_ring_full.
    pub fn flush(&mut self) {
        let mut deadline = None;
        while !self.pending.is_empty() {
            let mut w = self.tx.transmit(self.pending.len() as u32);
            let n = w.insert(self.pending.iter().copied()) as usize;
            w.commit();
            drop(w);
            self.pending.drain(..n);
            self.stats.tx += n as u64;
            self.kick();
            self.reclaim();
            if self.pending.is_empty() || !self.wait_for_device(&mut deadline) {
                break;
            }
        }
        for d in self.pending.drain(..) {
            self.tx_free.push(d.addr);
            self.stats.tx_ring_full += 1;
        }
        self.reclaim();
    }

    /// One short pause for the device to consume frames, false once `deadline` (set on
    /// the first call) has passed. Sleeping, not spinning: on a shared core the NAPI
    /// that drains the device must get to run.
    fn wait_for_device(&mut self, deadline: &mut Option<Instant>) -> bool {
        let d = *deadline.get_or_insert_with(|| Instant::now() + TX_WAIT);
        if Instant::now() >= d {
            return false;
        }
        self.stats.tx_waits += 1;
        std::thread::sleep(Duration::from_micros(20));
        true
    }

    /// Copy mode sends only inside the kick (`sendto`), at most 32 frames per call
    /// (the kernel's per-call budget): kick until the ring is drained or the kernel
    /// stops taking frames (device queue full). Zero-copy only when the driver asks.
    fn kick(&mut self) {
        match self.mode {
            Mode::ZeroCopy => {
                if self.tx.needs_wakeup() {
                    self.tx.wake();
                    self.stats.kicks += 1;
                }
            }
            Mode::Copy => {
                let mut left = self.tx.pending();
                while left > 0 {
                    self.tx.wake();
                    self.stats.kicks += 1;
                    let now = self.tx.pending();
                    if now >= left {
                        break;
                    }
                    left = now;
                }
            }
        }
    }

    fn reclaim(&mut self) {
        let mut r = self.device.complete(RING);
        while let Some(a) = r.read() {
            self.tx_free.push(a);
        }
        r.release();
    }
}

/// Waits up to `timeout_ms` for `fd` to have received frames (no busy spin: a shared
/// core's NAPI must run too).
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) {
    let mut p = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 2];
    let n = fds.len().min(p.len());
    for (p, fd) in p.iter_mut().zip(fds) {
        p.fd = *fd;
    }
    // SAFETY: n valid pollfds in a live array for the duration of the call.
    unsafe { libc::poll(p.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
}

/// Pins the calling thread to one CPU (a worker per core); a failure only costs
/// locality, so it is logged, not fatal.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        log::warn!(
            "pinning an AF_XDP worker to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Transmit for XskQueue {
    fn transmit(
        &mut self,
        to: SocketAddr,
        fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
    ) -> bool {
        let Some(&dst_mac) = self.neighbours.get(&to.ip()) else {
            let local = to.ip() == self.local.ip() || to.ip().is_loopback();
            if let Some(out) = self.local_out.as_mut().filter(|_| local) {
                return out.transmit(to, fill);
            }
            self.stats.tx_no_neighbour += 1;
            return false;
        };
        if self.tx_free.is_empty() {
            self.reclaim();
        }
        // Every frame is on the ring or in the device: push what is pending and wait
        // (bounded) for completions, as flush does.
        let mut deadline = None;
        while self.tx_free.is_empty() {
            self.flush();
            if self.tx_free.is_empty() && !self.wait_for_device(&mut deadline) {
                break;
            }
            self.kick();
            self.reclaim();
        }
        let Some(addr) = self.tx_free.pop() else {
            self.stats.tx_ring_full += 1;
            return false;
        };
        let frame = self.frame_mut(addr);
        let hdr = header_len(to);
        let Some(n) = fill(&mut frame[hdr..]) else {
            self.tx_free.push(addr);
            return false;
        };
        let len = write_headers(frame, self.mac, dst_mac, self.local, to, n);
        self.pending.push(XdpDesc {
            addr,
            len: len as u32,
            options: 0,
        });
        if self.pending.len() >= BATCH {
            self.flush();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What write_headers builds, parse reads back, for both families; the IPv4 header
    /// checksum and the IPv6 UDP checksum verify.
    #[test]
    fn headers_round_trip() {
        for (from, to) in [
            ("192.0.2.1:4000", "192.0.2.2:5000"),
            ("[fd00::1]:4000", "[fd00::2]:5000"),
        ] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
            let mut frame = vec![0u8; 256];
            let hdr = header_len(to);
            frame[hdr..hdr + 5].copy_from_slice(b"hello");
            let len = write_headers(&mut frame, [1; 6], [2; 6], from, to, 5);
            let g = parse(&frame[..len]).unwrap();
            assert_eq!((g.from, g.to, g.src_mac), (from, to, [1; 6]));
            assert_eq!(&frame[g.payload.clone()], b"hello");
            if to.is_ipv4() {
                assert_eq!(
                    csum::checksum(&frame[14..34]),
                    0,
                    "IPv4 header checksum verifies"
                );
            } else {
                let udp = &frame[54..len];
                assert_eq!(
                    csum::udp_checksum(&v6(from.ip()), &v6(to.ip()), udp),
                    0xffff,
                    "IPv6 UDP checksum verifies (sums to zero)"
                );
            }
        }
        assert_eq!(parse(&[0u8; 20]), None);
    }
}
