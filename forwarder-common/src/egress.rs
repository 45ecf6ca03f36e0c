//! `EFWD_EGRESS_V1`: DEVMAP_HASH keyed by ifindex, value the same ifindex. Interfaces a
//! route may redirect to (XDP_REDIRECT needs the target in a devmap to use the bulk
//! transmit path). Filled by userspace from the routes' egress interfaces.

pub const MAP_NAME: &str = "EFWD_EGRESS_V1";
pub const MAX_EGRESS: u32 = 256;
