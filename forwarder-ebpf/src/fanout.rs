//! TC replicator (clsact ingress): XDP cannot clone, so it validates a packet of a
//! fan-out stream and passes it up; here the stream's route is looked up again by the
//! same key (see forwarder-common's `fanout`). Here the TTL drops once, then each copy gets its
//! own Ethernet/IP/UDP/RTP fields (checksums updated incrementally from the previous
//! copy's values) and leaves by `bpf_clone_redirect`; the last copy takes the packet
//! itself (`bpf_redirect`), saving one clone. Every copy is counted under one copy
//! verdict and in its own statistics slot.

use core::{ffi::c_void, mem};

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{
        bpf_clone_redirect, bpf_ktime_get_coarse_ns, bpf_loop, bpf_redirect, bpf_skb_vlan_pop,
    },
    macros::classifier,
    programs::TcContext,
};
use forwarder_common::{
    csum::Delta,
    fanout::{CopyVerdict, MAX_COPIES},
    routes::{FLAG_FANOUT, FLAG_IPV6, RouteKey, RouteValue},
    routes4::RouteKey4,
    rtp::{Class, classify},
};

use crate::{maps::*, packet::*};

const ETH: usize = 14;
const UDP: usize = 8;
const RTP: usize = 12;

/// What every copy of one packet shares: the packet, its list, and the RTP fields as
/// they arrived (each copy's are derived from these, not from the previous copy's).
#[repr(C)]
struct Replication {
    skb: *mut __sk_buff,
    first: u32,
    ingress: u32,
    orig: RtpIn,
    /// When the packet arrived, for every copy's statistics (one clock read per packet).
    now: u64,
    v6: u8,
    /// Copies sent so far: counted under `forward_copy` once per packet.
    sent: u32,
}

#[classifier]
pub fn edgefwd_fanout(ctx: TcContext) -> i32 {
    replicate(&ctx)
}

/// The stream a packet that XDP handed up belongs to: (copy list start, length,
/// IPv6). XDP handed up exactly the packets this finds: RTP, over UDP without IPv4
/// options or fragmentation, at most one VLAN tag, with a fan-out route; whatever
/// else XDP passes (options, fragments, double tags, non-RTP) does not match here,
/// and what it dropped never arrives. The stack has moved a tag out of the frame
/// (`vlan_present`) by now.
#[inline(always)]
fn stream_of(skb: *mut __sk_buff) -> Option<(u32, u32, bool)> {
    // SAFETY: reading fields of the context the kernel passed.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // The shortest RTP packet either family can carry.
    if data + ETH + 20 + UDP + RTP > end {
        return None;
    }
    // SAFETY: the ethertype lies inside the bytes checked just above.
    let proto = u16::from_be(unsafe { ld(data + 12) });
    let route = if proto == 0x0800 {
        let (ip, udp) = (data + ETH, data + ETH + 20);
        let rtp = udp + UDP;
        if rtp + RTP > end {
            return None;
        }
        // SAFETY: IPv4 (20 bytes), UDP and the fixed RTP header checked just above.
        unsafe {
            let vihl = *(ip as *const u8);
            let frag = ld(ip + 6) & 0x3fffu16.to_be();
            let l4 = *((ip + 9) as *const u8);
            if vihl != 0x45 || frag != 0 || l4 != 17 {
                return None;
            }
            if classify(*(rtp as *const u8), *((rtp + 1) as *const u8)) != Class::Rtp {
                return None;
            }
            let mut k = mem::MaybeUninit::<RouteKey4>::uninit();
            let kp = k.as_mut_ptr() as usize;
            st32(kp, ld32(ip + 16));
            st32(kp + 4, ld32(ip + 12));
            st(kp + 8, ld(udp + 2));
            st(kp + 10, ld(udp));
            st32(kp + 12, ld32(rtp + 8));
            EFWD_ROUTES4_V3.get(&k.assume_init())?
        }
    } else if proto == 0x86dd {
        let (ip, udp) = (data + ETH, data + ETH + 40);
        let rtp = udp + UDP;
        if rtp + RTP > end {
            return None;
        }
        // SAFETY: IPv6 (40 bytes), UDP and the fixed RTP header checked just above.
        unsafe {
            if *((ip + 6) as *const u8) != 17 {
                return None;
            }
            if classify(*(rtp as *const u8), *((rtp + 1) as *const u8)) != Class::Rtp {
                return None;
            }
            let mut k = mem::MaybeUninit::<RouteKey>::uninit();
            let kp = k.as_mut_ptr() as usize;
            let mut i = 0;
            while i < 4 {
                st32(kp + 4 * i, ld32(ip + 24 + 4 * i));
                st32(kp + 16 + 4 * i, ld32(ip + 8 + 4 * i));
                i += 1;
            }
            st(kp + 32, ld(udp + 2));
            st(kp + 34, ld(udp));
            st32(kp + 36, ld32(rtp + 8));
            EFWD_ROUTES6_V3.get(&k.assume_init())?
        }
    } else {
        return None;
    };
    if route.flags & FLAG_FANOUT == 0 {
        return None;
    }
    Some((
        route.fanout_first,
        route.fanout_count,
        route.flags & FLAG_IPV6 != 0,
    ))
}

#[inline(always)]
fn replicate(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let Some((first, n, v6)) = stream_of(skb) else {
        return TC_ACT_OK;
    };
    if n == 0 || n > MAX_COPIES {
        count(CopyVerdict::DropCopyMissing, 0);
        return TC_ACT_SHOT;
    }
    // SAFETY: reading a field of the context the kernel passed.
    if unsafe { (*skb).vlan_present } != 0 {
        // The copies leave untagged: the route decides the egress, never the ingress.
        // SAFETY: the helper gets the context the kernel gave us.
        if unsafe { bpf_skb_vlan_pop(skb) } != 0 {
            count(CopyVerdict::DropCopyMalformed, n);
            return TC_ACT_SHOT;
        }
    }
    let Some(orig) = (if v6 {
        prepare::<true>(skb)
    } else {
        prepare::<false>(skb)
    }) else {
        count(CopyVerdict::DropCopyMalformed, n);
        return TC_ACT_SHOT;
    };
    let mut r = Replication {
        skb,
        first,
        // SAFETY: reading a field of the context the kernel passed.
        ingress: unsafe { (*skb).ingress_ifindex },
        orig,
        // SAFETY: bpf_ktime_get_coarse_ns takes no arguments and touches no memory.
        now: unsafe { bpf_ktime_get_coarse_ns() },
        v6: v6 as u8,
        sent: 0,
    };
    if n > 1 {
        // SAFETY: the callback is a BPF function of this program; `r` outlives the loop.
        unsafe {
            bpf_loop(
                n - 1,
                clone_one as *mut c_void,
                &mut r as *mut Replication as *mut c_void,
                0,
            )
        };
    }
    // The last copy is the packet itself.
    let Some(copy) = EFWD_COPIES_V1.get(first + n - 1) else {
        count(CopyVerdict::DropCopyMissing, 1);
        forwarded(r.sent, skb);
        return TC_ACT_SHOT;
    };
    if let Err(v) = rewrite(&r, copy) {
        count(v, 1);
        dropped(copy);
        forwarded(r.sent, skb);
        return TC_ACT_SHOT;
    }
    let egress = egress_of(&r, copy);
    // SAFETY: plain helper call; the redirect happens when the program returns.
    let action = unsafe { bpf_redirect(egress, 0) } as i32;
    if action != TC_ACT_REDIRECT {
        count(CopyVerdict::DropCopyCloneError, 1);
        dropped(copy);
        forwarded(r.sent, skb);
        return TC_ACT_SHOT;
    }
    sent(&r, copy);
    forwarded(r.sent + 1, skb);
    action
}

/// bpf_loop's callback: copy `i` (all but the last) as a clone.
extern "C" fn clone_one(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `replicate` gave it, to its live frame,
    // and nothing else refers to it while the callback runs.
    let r = unsafe { &mut *(ctx as *mut Replication) };
    let Some(copy) = EFWD_COPIES_V1.get(r.first + i as u32) else {
        count(CopyVerdict::DropCopyMissing, 1);
        return 0;
    };
    if let Err(v) = rewrite(r, copy) {
        count(v, 1);
        dropped(copy);
        // The packet is too short for every copy alike: stop.
        return 1;
    }
    // SAFETY: the skb is the program's context; the helper clones it and sends the clone.
    if unsafe { bpf_clone_redirect(r.skb, egress_of(r, copy), 0) } != 0 {
        count(CopyVerdict::DropCopyCloneError, 1);
        dropped(copy);
        return 0;
    }
    sent(r, copy);
    r.sent += 1;
    0
}

#[inline(always)]
fn egress_of(r: &Replication, copy: &RouteValue) -> u32 {
    if copy.egress_ifindex == 0 {
        r.ingress
    } else {
        copy.egress_ifindex
    }
}

/// Counts one copy in its own statistics slot, with the packet's source numbering:
/// after the copy is removed, its slot tells what its subscriber got last.
#[inline(always)]
fn sent(r: &Replication, copy: &RouteValue) {
    // SAFETY: reading a field of the context the kernel passed.
    let len = unsafe { (*r.skb).len } as u64;
    if let Some(s) = EFWD_RSTATS_V3.get_ptr_mut(copy.stats_slot) {
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted mid-run.
        unsafe { (*s).record(len, r.orig.seq, r.orig.ts, r.now) };
    }
}

/// Counts a packet's `n` sent copies under `forward_copy`, once per packet (every copy
/// has the packet's length).
#[inline(always)]
fn forwarded(n: u32, skb: *mut __sk_buff) {
    // SAFETY: reading a field of the context the kernel passed.
    let len = unsafe { (*skb).len } as u64;
    if let Some(c) = EFWD_COPYVERDICT_V1.get_ptr_mut(CopyVerdict::ForwardCopy as u32) {
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted mid-run.
        unsafe {
            (*c).packets += n as u64;
            (*c).bytes += n as u64 * len;
        }
    }
}

/// Counts a copy that could not be sent, in its own slot.
#[inline(always)]
fn dropped(copy: &RouteValue) {
    if let Some(s) = EFWD_RSTATS_V3.get_ptr_mut(copy.stats_slot) {
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted mid-run.
        unsafe { (*s).drops += 1 };
    }
}

#[inline(always)]
fn count(v: CopyVerdict, n: u32) {
    if let Some(c) = EFWD_COPYVERDICT_V1.get_ptr_mut(v as u32) {
        // SAFETY: the per-CPU slot is only this CPU's, and the program is not preempted mid-run.
        unsafe { (*c).packets += n as u64 };
    }
}

/// The bounds every copy's rewrite needs, from a fresh look at the packet (a clone or
/// a helper call invalidates earlier pointers).
#[inline(always)]
fn headers<const V6: bool>(skb: *mut __sk_buff) -> Option<usize> {
    let l4 = if V6 { ETH + 40 } else { ETH + 20 };
    // SAFETY: reading fields of the context the kernel passed.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if data + l4 + UDP + RTP > end {
        return None;
    }
    Some(data)
}

/// Decrements the TTL (hop limit) once for all copies; returns the RTP fields as they
/// arrived.
#[inline(always)]
fn prepare<const V6: bool>(skb: *mut __sk_buff) -> Option<RtpIn> {
    let p = headers::<V6>(skb)?;
    let rtp = p + if V6 { ETH + 40 } else { ETH + 20 } + UDP;
    // SAFETY: `headers` checked Ethernet, IP, UDP and the fixed RTP header.
    unsafe {
        if V6 {
            // Hop limit: byte 7 of the IPv6 header; XDP checked it is > 1.
            let h = (p + ETH + 7) as *mut u8;
            *h -= 1;
        } else {
            // TTL and protocol share a word; TTL is its low byte in a LE load (> 1).
            let old = ld(p + ETH + 8);
            let new = (u16::from_le(old) - 1).to_le();
            st(p + ETH + 8, new);
            let mut d = Delta::new();
            d.word(old, new);
            st(p + ETH + 10, d.apply_word(ld(p + ETH + 10)));
        }
        Some(RtpIn::read(rtp))
    }
}

#[inline(always)]
fn rewrite(r: &Replication, copy: &RouteValue) -> Result<(), CopyVerdict> {
    if r.v6 != 0 {
        rewrite_family::<true>(r, copy)
    } else {
        rewrite_family::<false>(r, copy)
    }
}

/// Gives the packet `copy`'s fields. The packet holds the previous copy's (or the
/// original's) values, so the checksum deltas are taken against what is there.
#[inline(always)]
fn rewrite_family<const V6: bool>(r: &Replication, copy: &RouteValue) -> Result<(), CopyVerdict> {
    let Some(p) = headers::<V6>(r.skb) else {
        return Err(CopyVerdict::DropCopyMalformed);
    };
    let l3 = p + ETH;
    let udp = l3 + if V6 { 40 } else { 20 };
    let rtp = udp + UDP;
    let mut l4d = Delta::new();
    // SAFETY: `headers` checked Ethernet, IP, UDP and the fixed RTP header; the copy's
    // fields are map memory.
    unsafe {
        // Destination then source MAC: not checksummed.
        let mut unused = Delta::new();
        replace_words::<6>(p, copy.dst_mac.as_ptr() as usize, &mut unused);
        if V6 {
            replace_words::<8>(l3 + 8, copy.out_src_addr.as_ptr() as usize, &mut l4d);
            replace_words::<8>(l3 + 24, copy.out_dst_addr.as_ptr() as usize, &mut l4d);
        } else {
            replace_words::<2>(l3 + 12, copy.out_src_addr.as_ptr() as usize + 12, &mut l4d);
            replace_words::<2>(l3 + 16, copy.out_dst_addr.as_ptr() as usize + 12, &mut l4d);
            // The IP header sums the same address change.
            st(l3 + 10, l4d.apply_word(ld(l3 + 10)));
        }
        replace_words::<2>(udp, copy.out_src_port_be.as_ptr() as usize, &mut l4d);

        rewrite_rtp(rtp, r.orig, copy, &mut l4d);
        fix_udp_check(udp, V6, &l4d);
    }
    Ok(())
}
