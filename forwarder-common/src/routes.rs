//! `EFWD_ROUTES6_V3` (V3: the fan-out range in [`RouteValue`]): hash map, [`RouteKey`] → [`RouteValue`], the IPv6 routes; and
//! [`RouteValue`], shared with the IPv4 routes (`EFWD_ROUTES4_V3`, [`crate::routes4`])
//! and with the copies of a fan-out (`EFWD_COPIES_V1`, [`crate::fanout`]).
//! One entry per forwarded stream: RTP with this SSRC, arriving on this listener from
//! this source, goes to one destination with its headers rewritten (XDP), or, with
//! [`FLAG_FANOUT`], to every copy of a published copy list (the TC replicator).
//!
//! [`RouteKey`] is also how userspace names any route (IPv4 as v4-mapped addresses);
//! the route writer stores IPv4 routes under the 16-byte [`crate::routes4::RouteKey4`],
//! because hashing and comparing the key is a large part of the per-packet cost.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_ROUTES6_V3";
/// Per family; also the size of the per-route statistics array (`stats_slot` < this),
/// whose slots both families share.
pub const MAX_ROUTES: u32 = 65_536;

/// Which packet a route matches. Addresses are 16 bytes (IPv4 v4-mapped when naming an
/// IPv4 route; the IPv4 map itself uses [`crate::routes4::RouteKey4`]).
// align(4): the XDP program builds, hashes and compares keys a word at a time;
// byte alignment made LLVM emit byte stores and a memset call.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouteKey {
    /// Our address the publisher sends to.
    pub listen_addr: [u8; 16],
    /// The publisher's address.
    pub src_addr: [u8; 16],
    pub listen_port_be: [u8; 2],
    pub src_port_be: [u8; 2],
    pub ssrc_be: [u8; 4],
}
assert_size!(RouteKey, 40);

impl RouteKey {
    pub const ZERO: RouteKey = RouteKey {
        listen_addr: [0; 16],
        src_addr: [0; 16],
        listen_port_be: [0; 2],
        src_port_be: [0; 2],
        ssrc_be: [0; 4],
    };
}

/// Rewrite the payload type `pt_from` to `pt_to`.
pub const FLAG_REWRITE_PT: u32 = 1 << 0;
/// Output addresses are IPv6 (must match the input family: the header length
/// cannot change in place).
pub const FLAG_IPV6: u32 = 1 << 1;
/// The copy leaves with an 802.1Q tag of `vlan_tci_be`; without this flag it leaves
/// untagged. The route decides the egress encapsulation, never the ingress frame.
pub const FLAG_VLAN: u32 = 1 << 2;
/// A stream with more than one copy: `fanout_first..fanout_first + fanout_count` in
/// `EFWD_COPIES_V1` are its copies, and the rewrite fields of this value are unused.
/// XDP validates the packet and hands it to the TC replicator; `stats_slot` counts
/// the stream's incoming packets, each copy counts in its own slot.
pub const FLAG_FANOUT: u32 = 1 << 3;

/// Where and how the copy goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteValue {
    /// Next hop's MAC address.
    pub dst_mac: [u8; 6],
    /// Egress interface's MAC address.
    pub src_mac: [u8; 6],
    pub out_src_addr: [u8; 16],
    pub out_dst_addr: [u8; 16],
    pub out_src_port_be: [u8; 2],
    pub out_dst_port_be: [u8; 2],
    /// Same as the ingress interface: XDP_TX; other: XDP_REDIRECT via `EFWD_EGRESS_V1`.
    pub egress_ifindex: u32,
    pub ssrc_out_be: [u8; 4],
    /// Added (mod 2^32) to the RTP timestamp.
    pub ts_delta: u32,
    /// Added (mod 2^16) to the RTP sequence number.
    pub seq_delta: u16,
    pub pt_from: u8,
    pub pt_to: u8,
    /// Index into `EFWD_RSTATS_V3`.
    pub stats_slot: u32,
    pub flags: u32,
    /// The egress 802.1Q tag control (PCP, DEI, VLAN id) with [`FLAG_VLAN`].
    pub vlan_tci_be: [u8; 2],
    pub _pad: [u8; 2],
    /// With [`FLAG_FANOUT`]: the first copy's index in `EFWD_COPIES_V1`.
    pub fanout_first: u32,
    /// With [`FLAG_FANOUT`]: how many copies (2..=[`crate::fanout::MAX_COPIES`]).
    pub fanout_count: u32,
}
assert_size!(RouteValue, 84);

// SAFETY: #[repr(C)], byte arrays only, no padding (size asserted): every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for RouteKey {}
// SAFETY: #[repr(C)], integers and byte arrays with explicit padding (size asserted): every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for RouteValue {}
