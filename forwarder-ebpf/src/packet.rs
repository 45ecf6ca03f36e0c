//! Packet and map memory access for the XDP programs: bounds-checked pointers into
//! the frame, and word loads and stores. Every caller states why its access is inside
//! the checked bounds in a `// SAFETY:` line.

use core::mem;

use aya_ebpf::programs::XdpContext;
use forwarder_common::{
    csum::Delta,
    routes::{FLAG_REWRITE_PT, RouteValue},
};

/// Bounds-checked pointer into the packet; the check is what the verifier wants to see.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub(crate) fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Loads a 16-bit word from packet or map memory. Header fields the program touches sit
/// at even offsets from an at least 2-byte aligned frame start, and map values are
/// 4-byte aligned; word access keeps the checksum arithmetic to one add per word
/// (byte access made LLVM spill past the 512-byte stack).
///
/// # Safety
/// `p..p + 2` must be readable: packet bytes checked against `data_end`, or a live
/// map value.
#[inline(always)]
pub(crate) unsafe fn ld(p: usize) -> u16 {
    // SAFETY: the caller checked 2 readable bytes at `p` (packet or map memory).
    unsafe { (p as *const u16).read() }
}

/// Stores a 16-bit word (see [`ld`]).
///
/// # Safety
/// `p..p + 2` must be writable packet bytes checked against `data_end`, or a live map
/// value.
#[inline(always)]
pub(crate) unsafe fn st(p: usize, v: u16) {
    // SAFETY: the caller checked 2 writable bytes at `p`.
    unsafe { (p as *mut u16).write(v) }
}

/// 32-bit access for addresses and the SSRC: x86 and arm64 JITs allow unaligned packet
/// loads, and the verifier only enforces alignment on architectures that need it.
///
/// # Safety
/// `p..p + 4` must be readable, as for [`ld`].
#[inline(always)]
pub(crate) unsafe fn ld32(p: usize) -> u32 {
    // SAFETY: the caller checked 4 readable bytes at `p`.
    unsafe { (p as *const u32).read() }
}

/// Stores a 32-bit word (see [`ld32`]).
///
/// # Safety
/// `p..p + 4` must be writable, as for [`st`].
#[inline(always)]
pub(crate) unsafe fn st32(p: usize, v: u32) {
    // SAFETY: the caller checked 4 writable bytes at `p`.
    unsafe { (p as *mut u32).write(v) }
}

/// Copies `N` 32-bit words from `src` to `dst`.
///
/// # Safety
/// `4 * N` bytes must be readable at `src` and writable at `dst`, as for [`ld32`]
/// and [`st32`].
#[inline(always)]
pub(crate) unsafe fn copy_words32<const N: usize>(dst: usize, src: usize) {
    let mut i = 0;
    while i < N {
        // SAFETY: the caller checked 4 * N bytes at both `dst` and `src`.
        unsafe { st32(dst + 4 * i, ld32(src + 4 * i)) };
        i += 1;
    }
}

/// Replaces `N` words at `dst` with those at `src`, folding the change into `d`.
///
/// # Safety
/// `2 * N` bytes must be readable at `src` and readable and writable at `dst`.
#[inline(always)]
pub(crate) unsafe fn replace_words<const N: usize>(dst: usize, src: usize, d: &mut Delta) {
    let mut i = 0;
    while i < N {
        // SAFETY: the caller checked 2 * N bytes at both `dst` and `src`.
        unsafe {
            let old = ld(dst + 2 * i);
            let new = ld(src + 2 * i);
            d.word(old, new);
            st(dst + 2 * i, new);
        }
        i += 1;
    }
}

/// The RTP fields a packet arrived with: a copy's are derived from these.
#[derive(Clone, Copy)]
pub(crate) struct RtpIn {
    /// Marker bit and payload type (byte 1).
    pub mpt: u8,
    /// Host order.
    pub seq: u16,
    /// Host order.
    pub ts: u32,
}

impl RtpIn {
    /// Reads them from the fixed RTP header at `rtp`.
    ///
    /// # Safety
    /// The 12-byte fixed RTP header at `rtp` must be within the packet (checked
    /// against `data_end`).
    #[inline(always)]
    pub(crate) unsafe fn read(rtp: usize) -> RtpIn {
        // SAFETY: the caller checked the 12-byte fixed header at `rtp`.
        unsafe {
            RtpIn {
                mpt: (u16::from_le(ld(rtp)) >> 8) as u8,
                seq: u16::from_be(ld(rtp + 2)),
                ts: u32::from_be(ld32(rtp + 4)),
            }
        }
    }
}

/// Gives the RTP header at `rtp` the fields `route` makes of a packet that arrived as
/// `orig`: payload type, sequence, timestamp, SSRC. Each change is folded into `d`
/// against what the header holds now (the original in XDP, the previous copy's in the
/// TC replicator): the one RTP rewrite of both programs, the kernel twin of
/// forwarder-common's `rtp::rewrite`.
///
/// # Safety
/// The 12-byte fixed RTP header at `rtp` must be within the packet and writable
/// (checked against `data_end`).
#[inline(always)]
pub(crate) unsafe fn rewrite_rtp(rtp: usize, orig: RtpIn, route: &RouteValue, d: &mut Delta) {
    // SAFETY: the caller checked the 12-byte fixed header at `rtp`; `route` is map memory.
    unsafe {
        // Word 0: V/P/X/CC (low byte of a LE load, never changed), then M/PT. Built in
        // a register and stored once: a byte store then a word reload stalls.
        let mut mpt = orig.mpt;
        if route.flags & FLAG_REWRITE_PT != 0 && mpt & 0x7f == route.pt_from {
            mpt = (mpt & 0x80) | (route.pt_to & 0x7f);
        }
        let old = ld(rtp);
        let new = ((u16::from_le(old) & 0x00ff) | (mpt as u16) << 8).to_le();
        if new != old {
            d.word(old, new);
            st(rtp, new);
        }

        let old = ld(rtp + 2);
        let new = orig.seq.wrapping_add(route.seq_delta).to_be();
        d.word(old, new);
        st(rtp + 2, new);

        let ts = orig.ts.wrapping_add(route.ts_delta);
        let (old_hi, old_lo) = (ld(rtp + 4), ld(rtp + 6));
        let (new_hi, new_lo) = (((ts >> 16) as u16).to_be(), (ts as u16).to_be());
        d.word(old_hi, new_hi);
        d.word(old_lo, new_lo);
        st(rtp + 4, new_hi);
        st(rtp + 6, new_lo);

        replace_words::<2>(rtp + 8, route.ssrc_out_be.as_ptr() as usize, d);
    }
}

/// Applies `d` to the UDP checksum at `udp + 6`. IPv4 UDP may carry none (0): it stays
/// so. A computed 0 goes on the wire as 0xffff (RFC 768; for IPv6 RFC 8200 §8.1).
#[inline(always)]
pub(crate) unsafe fn fix_udp_check(udp: usize, v6: bool, d: &Delta) {
    // SAFETY: the caller checked the 8-byte UDP header at `udp`.
    unsafe {
        let check = ld(udp + 6);
        if v6 || check != 0 {
            let c = d.apply_word(check);
            st(udp + 6, if c == 0 { 0xffff } else { c });
        }
    }
}
