//! Test and benchmark XDP programs, in an object of their own so the daemon's holds
//! only the forwarder: a pass-everything program for veth peers, a counting sink, the
//! UDP-checksum probe, the benchmark's traffic generator, and the devmap-broadcast
//! replicator the fan-out benchmark measures the TC replicator against.
#![no_std]
#![no_main]

// Shared with the forwarder, which uses every helper; these programs use a few.
#[allow(dead_code)]
mod packet;

use aya_ebpf::{
    bindings::{BPF_F_BROADCAST, TC_ACT_SHOT, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use forwarder_common::{csum, routes::RouteValue, verdicts::VerdictStats};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};
use packet::*;

const IPPROTO_UDP: u8 = 17;

/// For veth peers and sinks that must have an XDP program to receive redirected frames.
#[xdp]
pub fn edgefwd_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark sink: counts and drops (the ceiling measurement, and the receiving end of
/// the forward measurement).
#[xdp]
pub fn edgefwd_drop(ctx: XdpContext) -> u32 {
    if let Some(c) = EFWD_SINK_V1.get_ptr_mut(0) {
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += frame_len(&ctx) as u64;
        }
    }
    xdp_action::XDP_DROP
}

/// Benchmark sink for skb traffic (TC ingress): counts and drops. With RPS on its
/// device the receiving work runs on another core than the sender's, and veth takes
/// such a peer's frames through the backlog (no 256-frame XDP ring).
#[classifier]
pub fn edgefwd_tc_drop(ctx: TcContext) -> i32 {
    if let Some(c) = EFWD_SINK_V1.get_ptr_mut(0) {
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += ctx.len() as u64;
        }
    }
    TC_ACT_SHOT
}

/// Words of UDP a datagram of the largest frame the program forwards can have.
const UDP_VERIFY_MAX_WORDS: usize = 1500 / 4;

/// Benchmark probe for the UDP checksum policy: verifies the UDP checksum of an
/// untagged IPv4 frame over the pseudo-header and every datagram byte, which the
/// forwarder does not do (its incremental update keeps a bad checksum bad, so the
/// receiver still rejects the packet). XDP_DROP when it verifies, XDP_PASS when it does
/// not, XDP_ABORTED for a frame it cannot read. Never attached by the daemon.
// `p + 1 <= end` rather than `p < end`: the form the verifier's packet-range tracking
// is written for, like every other bound in this file.
#[allow(clippy::int_plus_one)]
#[xdp]
pub fn edgefwd_udp_verify(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let udp = start + EthHdr::LEN + Ipv4Hdr::LEN;
    if udp + UdpHdr::LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the 42 header bytes were bounds-checked above.
    let (src, dst, len_raw) = unsafe { (ld32(start + 26), ld32(start + 30), ld(udp + 4)) };
    let udp_len = u16::from_be(len_raw) as usize;
    // No `udp + udp_len <= end` test up front: LLVM would use it to drop the per-word
    // packet bound below, which the verifier needs to see; a datagram longer than the
    // frame is caught after the loop instead.
    if udp_len < UdpHdr::LEN {
        return xdp_action::XDP_ABORTED;
    }
    // One's-complement sums are byte-order independent: words are added as loaded
    // and the folded sum compared with 0xffff, which reads the same either way.
    let mut sum: u64 =
        src as u64 + dst as u64 + u16::from_ne_bytes([0, IPPROTO_UDP]) as u64 + len_raw as u64;
    let mut off = 0usize;
    let mut i = 0;
    while i < UDP_VERIFY_MAX_WORDS {
        let p = udp + off;
        if off + 4 > udp_len || p + 4 > end {
            break;
        }
        // SAFETY: p + 4 <= data_end was checked on this iteration.
        sum += unsafe { ld32(p) } as u64;
        off += 4;
        i += 1;
    }
    let p = udp + off;
    if off + 2 <= udp_len && p + 2 <= end {
        // SAFETY: p + 2 <= data_end was checked.
        sum += unsafe { ld(p) } as u64;
        off += 2;
    }
    let p = udp + off;
    if off < udp_len && p + 1 <= end {
        // SAFETY: p + 1 <= data_end was checked; the odd byte is padded with a zero.
        sum += u16::from_ne_bytes([unsafe { (p as *const u8).read() }, 0]) as u64;
        off += 1;
    }
    if off != udp_len {
        return xdp_action::XDP_ABORTED;
    }
    if csum::fold(sum) == 0xffff {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[map]
static EFWD_SINK_V1: PerCpuArray<VerdictStats> = PerCpuArray::with_max_entries(1, 0);

/// Header bytes the generator restores on every frame: live test_run frames are
/// recycled pages that keep whatever the forwarder wrote into them last time.
pub const GEN_TEMPLATE_LEN: usize = 64;

#[map]
static EFWD_GENTPL_V1: Array<[u8; GEN_TEMPLATE_LEN]> = Array::with_max_entries(1, 0);

/// Benchmark traffic generator, run with BPF_PROG_TEST_RUN live frames on the generator
/// veth: restores the header template and transmits (XDP_TX) to the forwarder.
#[xdp]
pub fn edgefwd_gen(ctx: XdpContext) -> u32 {
    let (Some(tpl), Some(dst)) = (
        EFWD_GENTPL_V1.get(0),
        ptr_at::<[u8; GEN_TEMPLATE_LEN]>(&ctx, 0),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    // Eight word copies, volatile so LLVM does not make them a call to the byte-wise
    // memcpy of compiler_builtins (which halved the generator's rate).
    let (src, dst) = (tpl as *const _ as *const u64, dst as *mut u64);
    let mut i = 0;
    while i < GEN_TEMPLATE_LEN / 8 {
        // SAFETY: both are GEN_TEMPLATE_LEN bytes (map value; frame checked by ptr_at).
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Fan-out benchmark alternative: the copies of a packet by XDP devmap broadcast, one
/// devmap entry per copy (all to the same egress), each entry's egress program
/// rewriting its copy. Not the product's path (veth delivers at most its ring, 256
/// frames, per poll, so large N loses copies); measured to compare.
#[map]
static EFWD_BCAST_V1: DevMap = DevMap::with_max_entries(1024, 0);
/// Per-copy rewrite fields, the replicator's own layout.
#[map]
static EFWD_BCASTCOPY_V1: Array<RouteValue> = Array::with_max_entries(1024, 0);
/// Copies emitted on this CPU, modulo the copy count: which entry's fields a copy gets
/// (the egress program cannot see its entry).
#[map]
static EFWD_BCASTIDX_V1: PerCpuArray<u32> = PerCpuArray::with_max_entries(2, 0);

#[xdp]
pub fn edgefwd_bcast(_ctx: XdpContext) -> u32 {
    match EFWD_BCAST_V1.redirect(0, BPF_F_BROADCAST as u64) {
        Ok(a) => a,
        Err(_) => xdp_action::XDP_DROP,
    }
}

#[xdp(map = "devmap")]
pub fn edgefwd_bcast_egress(ctx: XdpContext) -> u32 {
    let (Some(idx), Some(n)) = (EFWD_BCASTIDX_V1.get_ptr_mut(0), EFWD_BCASTIDX_V1.get_ptr(1))
    else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: per-CPU slots, only this CPU's; the program is not preempted.
    let i = unsafe {
        let i = *idx;
        *idx = if i + 1 >= *n { 0 } else { i + 1 };
        i
    };
    let Some(copy) = EFWD_BCASTCOPY_V1.get(i) else {
        return xdp_action::XDP_DROP;
    };
    let Some(h) = ptr_at::<[u8; 54]>(&ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let p = h as usize;
    let mut l4d = csum::Delta::new();
    // SAFETY: 54 bytes (Ethernet, IPv4, UDP, fixed RTP) checked above; `copy` is map memory.
    unsafe {
        let mut unused = csum::Delta::new();
        replace_words::<6>(p, copy.dst_mac.as_ptr() as usize, &mut unused);
        replace_words::<2>(p + 26, copy.out_src_addr.as_ptr() as usize + 12, &mut l4d);
        replace_words::<2>(p + 30, copy.out_dst_addr.as_ptr() as usize + 12, &mut l4d);
        st(p + 24, l4d.apply_word(ld(p + 24)));
        replace_words::<2>(p + 34, copy.out_src_port_be.as_ptr() as usize, &mut l4d);
        rewrite_rtp(p + 42, RtpIn::read(p + 42), copy, &mut l4d);
        fix_udp_check(p + 34, false, &l4d);
    }
    xdp_action::XDP_PASS
}
