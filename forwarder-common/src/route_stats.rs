//! `EFWD_RSTATS_V1`: per-CPU array indexed by `RouteValue::stats_slot`. Packets and
//! bytes forwarded per route. An array slot rather than a second hash lookup keyed by
//! the route: array lookups are inlined by the verifier, so per-route counting costs
//! a few instructions on the hot path.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_RSTATS_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteStats {
    pub packets: u64,
    pub bytes: u64,
}
assert_size!(RouteStats, 16);

#[cfg(feature = "user")]
unsafe impl aya::Pod for RouteStats {}
