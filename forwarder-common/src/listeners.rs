//! `EFWD_LISTEN_V1`: hash map, [`ListenerKey`] → [`ListenerValue`]. The media ports this
//! host serves. UDP to anything else is passed to the stack untouched, so the forwarder
//! never interferes with the host's other traffic.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_LISTEN_V1";
pub const MAX_LISTENERS: u32 = 1024;

// align(4): the XDP program builds, hashes and compares keys a word at a time;
// byte alignment made LLVM emit byte stores and a memset call.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    pub addr: [u8; 16],
    pub port_be: [u8; 2],
    pub _pad: [u8; 2],
}
assert_size!(ListenerKey, 20);

/// RTP/RTCP from a source with no route on this listener is dropped in XDP
/// (else passed to the stack for the control plane to see).
pub const FLAG_DROP_UNKNOWN_SOURCE: u32 = 1 << 0;
/// RTP from a known source with an SSRC that has no route is dropped
/// (else passed to the stack, e.g. for the control plane to learn a new SSRC).
pub const FLAG_DROP_NO_ROUTE: u32 = 1 << 1;

/// The WebRTC media port: SRTP/SRTCP from a bound peer (`EFWD_PEERS_V1`) goes to the
/// AF_XDP worker of its queue, from anyone else it is dropped; STUN/DTLS pass.
pub const FLAG_WEBRTC: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenerValue {
    pub flags: u32,
}
assert_size!(ListenerValue, 4);

// SAFETY: #[repr(C)], byte arrays with explicit padding (size asserted): every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenerKey {}
// SAFETY: #[repr(C)], one u32: every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenerValue {}
