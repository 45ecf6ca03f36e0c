//! `EFWD_RSTATS_V2`: per-CPU array indexed by `RouteValue::stats_slot`. Packets and
//! bytes forwarded per route (per copy of a fan-out stream), and copies that could not
//! be sent. An array slot rather than a second hash lookup keyed by the route: array
//! lookups are inlined by the verifier, so per-route counting costs a few instructions
//! on the hot path.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_RSTATS_V2";

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteStats {
    pub packets: u64,
    pub bytes: u64,
    /// Copies the replicator could not send (clone or redirect refused, too short).
    pub drops: u64,
}
assert_size!(RouteStats, 24);

// SAFETY: #[repr(C)], three u64s, no padding: every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for RouteStats {}
