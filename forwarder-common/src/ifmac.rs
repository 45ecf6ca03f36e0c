//! `EFWD_IFMAC_V1`: array indexed by ifindex, the MAC address of each interface the
//! forwarder runs on, written by the control plane when it attaches. A router
//! forwards only frames addressed to the receiving interface (RFC 1812 §5.3.4, the
//! Linux stack's PACKET_HOST rule): broadcast, multicast and other hosts' unicast
//! frames (a promiscuous NIC, a flooding switch) are dropped, not copied to
//! subscribers. An array: the lookup is inlined by the verifier.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_IFMAC_V1";
/// ifindexes at or above this cannot be registered (the daemon says so).
pub const MAX_IFINDEX: u32 = 16_384;

/// The entry is set: frames arriving on this interface must be addressed to `mac`.
pub const IFMAC_SET: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfMac {
    pub mac: [u8; 6],
    pub flags: u8,
    pub _pad: u8,
}
assert_size!(IfMac, 8);

// SAFETY: repr(C), integers and byte arrays only, explicit padding: every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for IfMac {}
