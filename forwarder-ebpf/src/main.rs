//! XDP data plane: demultiplexes UDP on the media listeners (RFC 7983), forwards routed
//! RTP with rewritten Ethernet/IP/UDP/RTP headers (XDP_TX or XDP_REDIRECT), passes
//! STUN/DTLS/RTCP to the stack for the control plane, and counts every packet under
//! exactly one named verdict. The daemon's object holds this program only; the test
//! and benchmark programs are in tools.rs (their own object).
#![no_std]
#![no_main]

mod fanout;
mod maps;
mod packet;

use core::mem;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use forwarder_common::{
    csum::Delta,
    ifmac::IFMAC_SET,
    listeners::{FLAG_DROP_NO_ROUTE, FLAG_DROP_UNKNOWN_SOURCE, FLAG_WEBRTC, ListenerKey},
    routes::{FLAG_FANOUT, FLAG_IPV6, FLAG_VLAN, RouteKey, RouteValue},
    routes4::RouteKey4,
    rtp::{Class, MAX_RTP_LEN, RTP_FIXED_HEADER_LEN, classify},
    sources::SourceKey,
    verdicts::{Action, Verdict},
};
use maps::*;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};
use packet::*;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;

// The parser returns only the `Verdict` (one register); the XDP action follows
// from it. A (verdict, action) pair went through the stack.
#[inline(always)]
fn xdp_action_of(v: Verdict) -> u32 {
    match v.action() {
        // Up to the TC replicator, with the copy list in the metadata.
        Action::Forward if matches!(v, Verdict::ForwardFanout) => xdp_action::XDP_PASS,
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Forward if matches!(v, Verdict::ForwardTx) => xdp_action::XDP_TX,
        // bpf_redirect_map succeeded: it returned XDP_REDIRECT.
        Action::Forward => xdp_action::XDP_REDIRECT,
    }
}

#[xdp]
pub fn edgefwd_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = process(&ctx);
    if let Some(c) = EFWD_VERDICT_V4.get_ptr_mut(verdict as u32) {
        // Per-CPU slot: plain adds, no atomics needed.
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted mid-run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
    xdp_action_of(verdict)
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::PassNotIp;
    };
    // SAFETY: ptr_at checked that the Ethernet header lies inside the frame.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, l3) else {
            return Verdict::PassNotIp;
        };
        // SAFETY: ptr_at checked that the VLAN tag lies inside the frame.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => Verdict::PassNotIp,
    }
}

/// Whether the frame is addressed to the interface it arrived on (RFC 1812 §5.3.4, the
/// stack's PACKET_HOST rule): never broadcast or multicast; the registered MAC of
/// the interface where the control plane registered one. Only routed packets pay.
#[inline(always)]
fn addressed_to_us(ctx: &XdpContext) -> bool {
    let Some(eth) = ptr_at::<[u8; 6]>(ctx, 0) else {
        return false;
    };
    let p = eth as usize;
    // SAFETY: `p` points at 6 bytes inside the frame (checked above).
    let (hi, lo) = unsafe { (ld32(p), ld(p + 4)) };
    // The group bit: the lowest bit of the first byte (the low byte of a LE load).
    if hi & 1 != 0 {
        return false;
    }
    match EFWD_IFMAC_V1.get(ctx.ingress_ifindex() as u32) {
        Some(m) if m.flags & IFMAC_SET != 0 => {
            let mac = m.mac.as_ptr() as usize;
            // SAFETY: `mac` points at the 6-byte MAC of a map value.
            unsafe { hi == ld32(mac) && lo == ld(mac + 4) }
        }
        _ => true,
    }
}

// IPv4, the bulk of media, is inlined into the entry (no call, the verdict stays in
// a register); IPv6 and the miss path (`judge`) are calls with their own frames, so
// their keys and spills do not add to the entry's share of the 512-byte stack.
#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return Verdict::DropMalformedIp;
    };
    let base = ip as usize;
    // SAFETY: ptr_at checked the 20-byte IPv4 header; nothing else refers to it meanwhile.
    let ip = unsafe { &mut *ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Verdict::DropMalformedIp;
    }
    // Word loads of the 16-bit fields: network-types declares them as byte arrays,
    // which LLVM assembles from two byte loads.
    // SAFETY: offset 2 is inside the checked 20-byte header.
    let tot_len = u16::from_be(unsafe { ld(base + 2) }) as usize;
    if tot_len < ihl || l3 + tot_len > frame_len(ctx) {
        return Verdict::DropMalformedIp;
    }
    if ip.proto != IPPROTO_UDP {
        return Verdict::PassNotUdp;
    }
    // MF flag or a fragment offset: only the stack can reassemble.
    // SAFETY: offset 6 is inside the checked 20-byte header.
    if unsafe { ld(base + 6) } & 0x3fffu16.to_be() != 0 {
        return Verdict::PassFragment;
    }
    let l4 = l3 + ihl;
    let mut slot = mem::MaybeUninit::<RouteKey4>::uninit();
    let key = slot.as_mut_ptr();
    // SAFETY: `key` is this frame's own stack slot; offsets 12..20 are inside the checked header.
    unsafe {
        let k = key as usize;
        st32(k, ld32(base + 16));
        st32(k + 4, ld32(base + 12));
    }
    // SAFETY: match_rtp fills every field of the key before any read (ports, SSRC; addresses above).
    let route = match match_rtp(ctx, l4, tot_len - ihl, unsafe { &mut *key }) {
        // SAFETY: `r` points at a map value, which lives while the program runs.
        Ok(r) => unsafe { &*r },
        Err(o) => return o,
    };
    if route.flags & FLAG_IPV6 != 0 {
        return Verdict::DropFamilyMismatch;
    }
    // What a router must check before it forwards (RFC 1812 §4.2.2, §5.2.2, §5.3.7),
    // paid only by packets that have a route.
    if !addressed_to_us(ctx) {
        return Verdict::DropNotForUs;
    }
    if ihl != Ipv4Hdr::LEN {
        return Verdict::PassIpOptions;
    }
    // SAFETY: `base` is the start of the 20-byte IPv4 header checked above.
    let (flags, src0) = unsafe { (ld(base + 6), *((base + 12) as *const u8)) };
    if flags & 0x8000u16.to_be() != 0 || src0 == 0 || src0 == 127 || src0 >= 224 {
        return Verdict::DropIpInvalid;
    }
    let mut sum = 0u32;
    let mut i = 0;
    while i < Ipv4Hdr::LEN / 2 {
        // SAFETY: 10 words inside the checked 20-byte header.
        sum += unsafe { ld(base + 2 * i) } as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    if sum != 0xffff {
        return Verdict::DropIpChecksum;
    }
    if ip.ttl <= 1 {
        return Verdict::DropTtlExceeded;
    }
    if route.flags & FLAG_FANOUT != 0 {
        return handoff(ctx, route);
    }
    let mut ipd = Delta::new();
    let mut l4d = Delta::new();
    // SAFETY: offsets 8..20 are inside the checked 20-byte header; route fields are map memory.
    unsafe {
        // TTL shares its word with the protocol (offset 8); TTL is the byte at the
        // lower address, the low byte of a little-endian load, and is > 1 here, so
        // the word decrements without a borrow. One word store: a byte store followed
        // by a word reload stalls store forwarding.
        let old = ld(base + 8);
        let new = (u16::from_le(old) - 1).to_le();
        st(base + 8, new);
        ipd.word(old, new);
        // Source and destination: 4 words from offset 12, IPv4 part of the v4-mapped
        // route addresses (bytes 12..16).
        replace_words::<2>(
            base + 12,
            route.out_src_addr.as_ptr() as usize + 12,
            &mut l4d,
        );
        replace_words::<2>(
            base + 16,
            route.out_dst_addr.as_ptr() as usize + 12,
            &mut l4d,
        );
        // The UDP pseudo-header holds the same addresses: same change for both sums.
        ipd.merge(&l4d);
        st(base + 10, ipd.apply_word(ld(base + 10)));
    }
    finish(ctx, l3, l4, route, l4d, false)
}

#[inline(never)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return Verdict::DropMalformedIp;
    };
    let base = ip as usize;
    // SAFETY: ptr_at checked the 40-byte IPv6 header; nothing else refers to it meanwhile.
    let ip = unsafe { &mut *ip };
    if ip.vcf[0] >> 4 != 6 {
        return Verdict::DropMalformedIp;
    }
    // SAFETY: offset 4 is inside the checked 40-byte header.
    let payload_len = u16::from_be(unsafe { ld(base + 4) }) as usize;
    if l3 + Ipv6Hdr::LEN + payload_len > frame_len(ctx) {
        return Verdict::DropMalformedIp;
    }
    if ip.next_hdr == 44 {
        return Verdict::PassFragment;
    }
    // Media never carries extension headers; anything else is for the stack.
    if ip.next_hdr != IPPROTO_UDP {
        return Verdict::PassNotUdp;
    }
    let l4 = l3 + Ipv6Hdr::LEN;
    let mut slot = mem::MaybeUninit::<RouteKey>::uninit();
    let key = slot.as_mut_ptr();
    // SAFETY: `key` is this frame's own stack slot; offsets 8..40 are inside the checked header.
    unsafe {
        let k = key as usize;
        copy_words32::<4>(k, base + 24);
        copy_words32::<4>(k + 16, base + 8);
    }
    // SAFETY: match_rtp fills every field of the key before any read (ports, SSRC; addresses above).
    let route = match match_rtp(ctx, l4, payload_len, unsafe { &mut *key }) {
        // SAFETY: `r` points at a map value, which lives while the program runs.
        Ok(r) => unsafe { &*r },
        Err(o) => return o,
    };
    if route.flags & FLAG_IPV6 == 0 {
        return Verdict::DropFamilyMismatch;
    }
    if !addressed_to_us(ctx) {
        return Verdict::DropNotForUs;
    }
    // Martian sources (RFC 4291): unspecified, loopback, multicast.
    // SAFETY: the source address is bytes 8..24 of the checked 40-byte header.
    let (a0, a1, a2, a3) = unsafe {
        (
            ld32(base + 8),
            ld32(base + 12),
            ld32(base + 16),
            ld32(base + 20),
        )
    };
    if a0 & 0xff == 0xff || (a0 | a1 | a2 == 0 && (a3 == 0 || a3 == 1u32.to_be())) {
        return Verdict::DropIpInvalid;
    }
    if ip.hop_limit <= 1 {
        return Verdict::DropTtlExceeded;
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, l4) else {
        return Verdict::DropMalformedUdp;
    };
    // SAFETY: ptr_at checked that the UDP header lies inside the frame.
    if unsafe { (*udp).check } == [0, 0] {
        return Verdict::DropZeroUdpChecksumV6;
    }
    if route.flags & FLAG_FANOUT != 0 {
        return handoff(ctx, route);
    }
    // IPv6 has no header checksum; the addresses feed the UDP pseudo-header.
    ip.hop_limit -= 1;
    let mut l4d = Delta::new();
    // SAFETY: offsets 8..40 are inside the checked 40-byte header; route fields are map memory.
    unsafe {
        replace_words::<8>(base + 8, route.out_src_addr.as_ptr() as usize, &mut l4d);
        replace_words::<8>(base + 24, route.out_dst_addr.as_ptr() as usize, &mut l4d);
    }
    finish(ctx, l3, l4, route, l4d, true)
}

/// A route key of one IP family, built in place by the program: addresses first (by
/// the caller), then ports and SSRC here.
trait Key {
    /// Writes the ports and the SSRC (both as on the wire).
    fn fill(&mut self, ports: u32, ssrc: u32);
    fn route(&self) -> Option<*mut RouteValue>;
    /// The key's ports as loaded (network order in memory): listen, source.
    fn ports(&self) -> (u16, u16);
    /// Writes the listen or the source address at `p` as 16 bytes, v4-mapped for IPv4
    /// (the listener and sources maps hold both families that way).
    ///
    /// # Safety
    /// `p..p + 16` must be writable memory of a key being built (the stack).
    unsafe fn put_addr(&self, p: usize, source: bool);

    /// Only built on a miss.
    #[inline(always)]
    fn listener(&self) -> ListenerKey {
        let mut k = mem::MaybeUninit::<ListenerKey>::uninit();
        // SAFETY: every byte of the key is written below before assume_init.
        unsafe {
            let p = k.as_mut_ptr() as usize;
            self.put_addr(p, false);
            st(p + 16, self.ports().0);
            st(p + 18, 0);
            k.assume_init()
        }
    }

    #[inline(always)]
    fn source(&self) -> SourceKey {
        let mut k = mem::MaybeUninit::<SourceKey>::uninit();
        // SAFETY: every byte of the key is written below before assume_init.
        unsafe {
            let p = k.as_mut_ptr() as usize;
            self.put_addr(p, false);
            self.put_addr(p + 16, true);
            let (listen, src) = self.ports();
            st(p + 32, listen);
            st(p + 34, src);
            k.assume_init()
        }
    }
}

/// What both key types share: they end in the same three fields.
macro_rules! key_tail {
    ($map:ident) => {
        #[inline(always)]
        fn fill(&mut self, ports: u32, ssrc: u32) {
            // The UDP header's first word is source then destination port; the key
            // wants destination (listen) then source.
            // SAFETY: the port fields are 2-byte arrays inside `self`.
            unsafe {
                st(
                    self.listen_port_be.as_mut_ptr() as usize,
                    (ports >> 16) as u16,
                );
                st(self.src_port_be.as_mut_ptr() as usize, ports as u16);
            }
            // SAFETY: the SSRC field is a 4-byte array inside `self`.
            unsafe { st32(self.ssrc_be.as_mut_ptr() as usize, ssrc) };
        }

        #[inline(always)]
        fn route(&self) -> Option<*mut RouteValue> {
            $map.get_ptr_mut(self)
        }

        #[inline(always)]
        fn ports(&self) -> (u16, u16) {
            // SAFETY: the port fields are 2-byte arrays inside `self`.
            unsafe {
                (
                    ld(self.listen_port_be.as_ptr() as usize),
                    ld(self.src_port_be.as_ptr() as usize),
                )
            }
        }
    };
}

impl Key for RouteKey4 {
    key_tail!(EFWD_ROUTES4_V3);

    #[inline(always)]
    unsafe fn put_addr(&self, p: usize, source: bool) {
        let a = if source {
            &self.src_addr
        } else {
            &self.listen_addr
        };
        // SAFETY: the caller passes 16 writable key bytes at `p`; `a` holds 16 bytes.
        unsafe { st_mapped(p, ld32(a.as_ptr() as usize)) };
    }
}

impl Key for RouteKey {
    key_tail!(EFWD_ROUTES6_V3);

    #[inline(always)]
    unsafe fn put_addr(&self, p: usize, source: bool) {
        let a = if source {
            &self.src_addr
        } else {
            &self.listen_addr
        };
        // SAFETY: the caller passes 16 writable key bytes at `p`; `a` holds 16 bytes.
        unsafe { copy_words32::<4>(p, a.as_ptr() as usize) };
    }
}

/// ::ffff:a.b.c.d at `p`, a word at a time (LLVM makes array literals memset calls).
///
/// # Safety
/// `p..p + 16` must be writable.
#[inline(always)]
unsafe fn st_mapped(p: usize, v4: u32) {
    // SAFETY: the caller passes 16 writable bytes at `p`.
    unsafe {
        st32(p, 0);
        st32(p + 4, 0);
        st32(p + 8, u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        st32(p + 12, v4);
    }
}

/// Finds the route of a valid RTP packet; `key` comes with the addresses filled in.
/// The hot path is one hash lookup: a route exists only on a listener, so a hit says
/// everything, and the listener table is consulted only to judge the rest.
#[inline(always)]
fn match_rtp<K: Key>(
    ctx: &XdpContext,
    l4: usize,
    ip_payload_len: usize,
    key: &mut K,
) -> Result<*mut RouteValue, Verdict> {
    let Some(udp) = ptr_at::<UdpHdr>(ctx, l4) else {
        return Err(Verdict::DropMalformedUdp);
    };
    // SAFETY: ptr_at checked that the UDP header lies inside the frame.
    let udp = unsafe { &*udp };
    let parsed = rtp_ssrc(ctx, l4, udp, ip_payload_len);
    key.fill(
        // SAFETY: the first 4 bytes of the checked UDP header.
        unsafe { ld32(udp as *const UdpHdr as usize) },
        *parsed.as_ref().unwrap_or(&0),
    );
    if parsed.is_ok()
        && let Some(route) = key.route()
    {
        return Ok(route);
    }
    Err(judge(key, parsed.err(), ctx.rx_queue_index()))
}

/// What to do with a datagram that has no route: `not_rtp` is the parser's verdict,
/// None for valid RTP. Not inlined: the listener and source keys it builds stay out
/// of the forwarding path's stack frame and registers.
#[inline(never)]
fn judge<K: Key>(key: &K, not_rtp: Option<Verdict>, queue: u32) -> Verdict {
    // SAFETY: a map lookup; the value is only read while the program runs.
    let Some(listener) = (unsafe { EFWD_LISTEN_V1.get(&key.listener()) }) else {
        return Verdict::PassNotListener;
    };
    let flags = listener.flags;
    if flags & FLAG_WEBRTC != 0 {
        return steer(key, not_rtp, queue);
    }
    match not_rtp {
        Some(Verdict::PassRtcp)
            if flags & FLAG_DROP_UNKNOWN_SOURCE != 0 && !source_known(&key.source()) =>
        {
            Verdict::DropUnknownSource
        }
        Some(v) => v,
        // A miss: only misses pay for the sources lookup.
        None => {
            if source_known(&key.source()) {
                if flags & FLAG_DROP_NO_ROUTE != 0 {
                    Verdict::DropNoRoute
                } else {
                    Verdict::PassNoRoute
                }
            } else if flags & FLAG_DROP_UNKNOWN_SOURCE != 0 {
                Verdict::DropUnknownSource
            } else {
                Verdict::PassUnknownSource
            }
        }
    }
}

/// The WebRTC media port: SRTP and SRTCP of a peer ICE has bound go to the AF_XDP
/// socket of the queue they arrived on (its worker decrypts, fans out, re-encrypts);
/// STUN and DTLS pass to the control plane. SRTP hides its padding count, so what the
/// RTP parser calls bad padding may be valid SRTP: the worker authenticates it.
#[inline(always)]
fn steer<K: Key>(key: &K, not_rtp: Option<Verdict>, queue: u32) -> Verdict {
    match not_rtp {
        None | Some(Verdict::PassRtcp) | Some(Verdict::DropMalformedRtp) => {}
        Some(v) => return v,
    }
    // SAFETY: a map lookup whose value is only tested for presence.
    if unsafe { EFWD_PEERS_V1.get(&key.source()) }.is_none() {
        return Verdict::DropUnknownPeer;
    }
    match EFWD_XSKS_V1.redirect(queue, xdp_action::XDP_PASS as u64) {
        Ok(_) => Verdict::ForwardXsk,
        Err(_) => Verdict::PassNoWorker,
    }
}

/// The SSRC (as loaded, network order in memory) of a well-formed RTP packet, or what
/// to do with the datagram if it arrived on a listener.
#[inline(always)]
fn rtp_ssrc(
    ctx: &XdpContext,
    l4: usize,
    udp: &UdpHdr,
    ip_payload_len: usize,
) -> Result<u32, Verdict> {
    // SAFETY: offset 4 of the checked 8-byte UDP header.
    let udp_len = u16::from_be(unsafe { ld(udp as *const UdpHdr as usize + 4) }) as usize;
    if udp_len < UdpHdr::LEN || udp_len != ip_payload_len {
        return Err(Verdict::DropMalformedUdp);
    }
    let rtp_off = l4 + UdpHdr::LEN;
    let rtp_len = udp_len - UdpHdr::LEN;
    let Some(first) = ptr_at::<[u8; 2]>(ctx, rtp_off) else {
        return Err(Verdict::DropUnknownProtocol);
    };
    // SAFETY: ptr_at checked these 2 bytes.
    let [b0, b1] = unsafe { *first };
    match classify(b0, b1) {
        Class::Stun => return Err(Verdict::PassStun),
        Class::Dtls => return Err(Verdict::PassDtls),
        Class::TurnChannel => return Err(Verdict::PassTurnChannel),
        Class::Unknown => return Err(Verdict::DropUnknownProtocol),
        Class::Rtcp => return Err(Verdict::PassRtcp),
        Class::Rtp => {}
    }
    if !(RTP_FIXED_HEADER_LEN..=MAX_RTP_LEN).contains(&rtp_len) {
        return Err(Verdict::DropMalformedRtp);
    }
    let Some(hdr) = ptr_at::<[u8; RTP_FIXED_HEADER_LEN]>(ctx, rtp_off) else {
        return Err(Verdict::DropMalformedRtp);
    };
    let mut hlen = RTP_FIXED_HEADER_LEN + 4 * (b0 & 0x0f) as usize;
    if hlen > rtp_len {
        return Err(Verdict::DropMalformedRtp);
    }
    if b0 & 0x10 != 0 {
        let Some(ext) = ptr_at::<[u8; 4]>(ctx, rtp_off + hlen) else {
            return Err(Verdict::DropMalformedRtp);
        };
        // SAFETY: ptr_at checked the 4-byte extension header.
        let words = u16::from_be(unsafe { ld(ext as usize + 2) }) as usize;
        hlen += 4 + 4 * words;
        if hlen > rtp_len {
            return Err(Verdict::DropMalformedRtp);
        }
    }
    if b0 & 0x20 != 0 {
        // The mask changes nothing (rtp_off + rtp_len < 0x3fff) but proves a bound to the
        // verifier, which ignores packet offsets that may exceed 0xffff; black_box keeps
        // LLVM from dropping it as redundant. Reading the last two bytes rather than one
        // keeps a nonzero constant in the bounds check, which the verifier needs.
        let tail_off = core::hint::black_box(rtp_off + rtp_len - 2) & 0x3fff;
        let Some(tail) = ptr_at::<[u8; 2]>(ctx, tail_off) else {
            return Err(Verdict::DropMalformedRtp);
        };
        // SAFETY: ptr_at checked these 2 bytes.
        let pad = unsafe { (*tail)[1] } as usize;
        if pad == 0 || hlen + pad > rtp_len {
            return Err(Verdict::DropMalformedRtp);
        }
    }
    // SAFETY: offset 8 of the 12-byte RTP header ptr_at checked.
    Ok(unsafe { ld32(hdr as usize + 8) })
}

#[inline(always)]
fn source_known(key: &SourceKey) -> bool {
    // SAFETY: a map lookup whose value is only tested for presence.
    unsafe { EFWD_SOURCES_V1.get(key) }.is_some()
}

/// A validated packet of a stream with several copies: counted for the stream, then
/// passed up to the TC replicator, which finds the stream's copy list by the same key
/// (no XDP metadata: some kernels refuse `bpf_xdp_adjust_meta`, and some drivers keep
/// none). The packet itself is untouched here (TC decrements the TTL once and
/// rewrites per copy).
#[inline(never)]
fn handoff(ctx: &XdpContext, route: &RouteValue) -> Verdict {
    // The stream's own count; the RTP numbering is recorded per copy, by TC.
    if let Some(s) = EFWD_RSTATS_V3.get_ptr_mut(route.stats_slot) {
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted mid-run.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += frame_len(ctx) as u64;
        }
    }
    Verdict::ForwardFanout
}

/// Counts a packet in the route's statistics slot, with its RTP numbering as it
/// arrived (what a move between streams continues from).
#[inline(always)]
fn count_route(ctx: &XdpContext, route: &RouteValue, orig: &RtpIn) {
    if let Some(s) = EFWD_RSTATS_V3.get_ptr_mut(route.stats_slot) {
        // SAFETY: bpf_ktime_get_coarse_ns takes no arguments and touches no memory.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted mid-run.
        unsafe { (*s).record(frame_len(ctx) as u64, orig.seq, orig.ts, now) };
    }
}

/// Rewrites Ethernet, UDP and RTP (the IP header is done by the caller), fixes the UDP
/// checksum from `l4d`, counts the route and sends the frame on its way.
#[inline(always)]
fn finish(
    ctx: &XdpContext,
    l3: usize,
    l4: usize,
    route: &RouteValue,
    mut l4d: Delta,
    v6: bool,
) -> Verdict {
    // One bounds check covers UDP and the fixed RTP header. Pointers must come from
    // the checked ones: a fresh ctx.data() carries no proven range.
    // black_box: LLVM sees the Ethernet check as implied by the UDP one and drops it,
    // but the verifier tracks ranges per pointer, not per frame.
    let (Some(eth), Some(udp)) = (
        ptr_at::<EthHdr>(ctx, core::hint::black_box(0)),
        ptr_at::<[u8; UdpHdr::LEN + RTP_FIXED_HEADER_LEN]>(ctx, l4),
    ) else {
        return Verdict::DropMalformedRtp;
    };
    let data = eth as usize;
    let udp = udp as usize;
    let rtp = udp + UdpHdr::LEN;
    // SAFETY: the UDP and RTP headers were bounds-checked by rtp_ssrc on this path.
    let orig = unsafe {
        // Ethernet: destination then source MAC, 3 words each, not checksummed.
        let mut unused = Delta::new();
        replace_words::<6>(data, route.dst_mac.as_ptr() as usize, &mut unused);

        // UDP ports.
        replace_words::<2>(udp, route.out_src_port_be.as_ptr() as usize, &mut l4d);

        // RTP (payload type, sequence, timestamp, SSRC), then the UDP checksum.
        let orig = RtpIn::read(rtp);
        rewrite_rtp(rtp, orig, route, &mut l4d);
        fix_udp_check(udp, v6, &l4d);
        orig
    };

    // Last, since moving the frame start invalidates every packet pointer: the route
    // decides the egress encapsulation, never the ingress frame.
    if let Err(v) = encapsulate(ctx, l3 != EthHdr::LEN, route) {
        return v;
    }

    count_route(ctx, route, &orig);

    let egress = route.egress_ifindex;
    if egress == 0 || egress == ctx.ingress_ifindex() as u32 {
        return Verdict::ForwardTx;
    }
    match EFWD_EGRESS_V1.redirect(egress, 0) {
        Ok(_) => Verdict::ForwardRedirect,
        Err(_) => {
            warn!(ctx, "egress ifindex {} is not in EFWD_EGRESS_V1", egress);
            Verdict::DropRedirectError
        }
    }
}

/// Gives the frame the route's egress 802.1Q tag, or none: rewrites the tag in place,
/// pops the ingress tag, or pushes a new one (4 bytes of headroom).
#[inline(always)]
fn encapsulate(ctx: &XdpContext, tagged: bool, route: &RouteValue) -> Result<(), Verdict> {
    let want = route.flags & FLAG_VLAN != 0;
    if !tagged && !want {
        return Ok(());
    }
    // The 802.1Q tag protocol identifier.
    let tpid = ETH_P_8021Q.to_be();
    // SAFETY: the tag control word of a map value.
    let tci = unsafe { ld(route.vlan_tci_be.as_ptr() as usize) };
    if tagged && want {
        let Some(h) = ptr_at::<[u8; 18]>(ctx, 0) else {
            return Err(Verdict::DropEncapError);
        };
        // SAFETY: 18 bytes checked above.
        unsafe {
            st(h as usize + 12, tpid);
            st(h as usize + 14, tci);
        }
        return Ok(());
    }
    let Some(h) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return Err(Verdict::DropEncapError);
    };
    // The (already rewritten) MACs move with the frame start.
    // SAFETY: 12 bytes checked above.
    let (m0, m1, m2) = unsafe { (ld32(h as usize), ld32(h as usize + 4), ld32(h as usize + 8)) };
    let delta: i32 = if tagged { 4 } else { -4 };
    // SAFETY: the helper gets the context the kernel gave us.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Verdict::DropEncapError);
    }
    let Some(h) = ptr_at::<[u8; 18]>(ctx, 0) else {
        return Err(Verdict::DropEncapError);
    };
    let p = h as usize;
    // SAFETY: 18 bytes checked above (a popped frame is still at least that long:
    // it holds IP and UDP headers).
    unsafe {
        st32(p, m0);
        st32(p + 4, m1);
        st32(p + 8, m2);
        if !tagged {
            // Pushed: the old EtherType is now at 16, behind the new tag.
            st(p + 12, tpid);
            st(p + 14, tci);
        }
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
