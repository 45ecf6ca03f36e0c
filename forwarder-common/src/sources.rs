//! `EFWD_SOURCES_V1`: hash map, [`SourceKey`] → [`SourceValue`]. Which publishers a
//! listener knows, with the number of routes from each. Only looked up when a packet
//! has no route, to tell "unknown source" (drop early: scan or flood) from "known
//! source, new SSRC". Kept in step with the routes map by the userspace route writer.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_SOURCES_V1";
pub const MAX_SOURCES: u32 = 65_536;

// align(4): the XDP program builds, hashes and compares keys a word at a time;
// byte alignment made LLVM emit byte stores and a memset call.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceKey {
    pub listen_addr: [u8; 16],
    pub src_addr: [u8; 16],
    pub listen_port_be: [u8; 2],
    pub src_port_be: [u8; 2],
}
assert_size!(SourceKey, 36);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceValue {
    /// Routes (in `EFWD_ROUTES4_V2` or `EFWD_ROUTES6_V2`) from this source.
    pub routes: u32,
}
assert_size!(SourceValue, 4);

// SAFETY: #[repr(C)], byte arrays only, no padding (size asserted): every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceKey {}
// SAFETY: #[repr(C)], one u32: every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceValue {}
