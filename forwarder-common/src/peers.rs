//! `EFWD_PEERS_V1`: hash map, [`crate::sources::SourceKey`] (our WebRTC media address,
//! the peer's address) → [`PeerValue`]. The 5-tuples ICE has bound to a session: on a
//! WebRTC listener their SRTP/SRTCP is steered into the AF_XDP socket of the queue it
//! arrived on (`EFWD_XSKS_V1`); SRTP/SRTCP from any other address is dropped in XDP.
//! STUN and DTLS always go to the control plane's socket. Written by the control plane
//! when ICE binds an address and removed when the session ends.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_PEERS_V1";
pub const MAX_PEERS: u32 = 65_536;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerValue {
    /// The engine's session handle (for the CLI; the program only tests presence).
    pub session: u32,
}
assert_size!(PeerValue, 4);

// SAFETY: #[repr(C)], one u32, no padding: every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerValue {}

/// `EFWD_XSKS_V1`: XSKMAP, rx queue index → the AF_XDP socket of that queue's worker.
/// Not pinned: its sockets live and die with the daemon.
pub const XSKS_MAP_NAME: &str = "EFWD_XSKS_V1";
pub const MAX_QUEUES: u32 = 64;
