//! Packet and map memory access for the XDP programs: bounds-checked pointers into
//! the frame, and word loads and stores. Every caller states why its access is inside
//! the checked bounds in a `// SAFETY:` line.

use core::mem;

use aya_ebpf::programs::XdpContext;
use forwarder_common::csum::Delta;

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
#[inline(always)]
pub(crate) unsafe fn ld(p: usize) -> u16 {
    // SAFETY: the caller checked 2 readable bytes at `p` (packet or map memory).
    unsafe { (p as *const u16).read() }
}

#[inline(always)]
pub(crate) unsafe fn st(p: usize, v: u16) {
    // SAFETY: the caller checked 2 writable bytes at `p`.
    unsafe { (p as *mut u16).write(v) }
}

/// 32-bit access for addresses and the SSRC: x86 and arm64 JITs allow unaligned packet
/// loads, and the verifier only enforces alignment on architectures that need it.
#[inline(always)]
pub(crate) unsafe fn ld32(p: usize) -> u32 {
    // SAFETY: the caller checked 4 readable bytes at `p`.
    unsafe { (p as *const u32).read() }
}

#[inline(always)]
pub(crate) unsafe fn st32(p: usize, v: u32) {
    // SAFETY: the caller checked 4 writable bytes at `p`.
    unsafe { (p as *mut u32).write(v) }
}

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
