//! `EFWD_LINKS_V1` and `EFWD_LINKSTATE_V1`: the cascade trunks between edgefwd nodes.
//! Userspace state kept beside the forwarding maps so the daemon, the CLI (`edgefwd
//! links`) and `/metrics` share one view of it; no program reads them. A trunk's
//! packets are ordinary fan-out copies (see `fanout`), written by the daemon's link
//! manager for the SSRCs the downstream node asks for.
//!
//! - `EFWD_LINKS_V1`: hash map, [`LinkKey`] (the peer node's name) → [`LinkValue`]:
//!   the configured link (from `[[link]]` or `edgefwd links add`).
//! - `EFWD_LINKSTATE_V1`: hash map, same key → [`LinkState`]: what the daemon last saw
//!   on the link (demand, contact, the reason it is down), written by the daemon only.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_LINKS_V1";
pub const STATE_MAP_NAME: &str = "EFWD_LINKSTATE_V1";
pub const MAX_LINKS: u32 = 256;
/// Longest node name, in bytes.
pub const NAME_LEN: usize = 32;
/// Longest status message kept in [`LinkState`], in bytes.
pub const MESSAGE_LEN: usize = 128;

/// The peer node's name, ASCII, zero padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LinkKey {
    pub name: [u8; NAME_LEN],
}
assert_size!(LinkKey, 32);

/// The peer feeds us: its trunk arrives at `local`, from `remote`.
pub const DIR_UP: u8 = 1;
/// We feed the peer: trunk copies leave from `local` to `remote`.
pub const DIR_DOWN: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LinkValue {
    /// v4-mapped or IPv6.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Up links: the peer's node API (where our demand goes).
    pub api_addr: [u8; 16],
    pub local_port_be: [u8; 2],
    pub remote_port_be: [u8; 2],
    pub api_port_be: [u8; 2],
    /// [`DIR_UP`] or [`DIR_DOWN`].
    pub direction: u8,
    pub _pad: u8,
}
assert_size!(LinkValue, 56);

/// Nothing heard yet.
pub const STATE_UNKNOWN: u8 = 0;
/// Up link: the upstream took our demand at the last try. Down link: the downstream's
/// demand is fresh.
pub const STATE_UP: u8 = 1;
/// Up link: the upstream did not answer. Down link: the downstream's demand lapsed.
pub const STATE_DOWN: u8 = 2;
/// The peer answered and refused (wrong secret, unknown link, a cycle): `message`.
pub const STATE_REFUSED: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Last successful exchange (unix ms); 0: never.
    pub last_ok_ms: u64,
    /// SSRCs demanded on the link (down: by the peer; up: by us).
    pub demand: u32,
    /// Trunk copies the link has in the maps (down links).
    pub copies: u32,
    /// Counters of the link's trunk copies that were removed (demand went): the
    /// link's totals are these plus its live copies', so they never go down.
    pub packets_retired: u64,
    pub bytes_retired: u64,
    pub drops_retired: u64,
    /// STATE_*.
    pub state: u8,
    pub _pad: [u8; 7],
    /// Why the link is down or refused, UTF-8, zero padded.
    pub message: [u8; MESSAGE_LEN],
}
assert_size!(LinkState, 176);

impl Default for LinkState {
    fn default() -> Self {
        LinkState {
            last_ok_ms: 0,
            demand: 0,
            copies: 0,
            packets_retired: 0,
            bytes_retired: 0,
            drops_retired: 0,
            state: STATE_UNKNOWN,
            _pad: [0; 7],
            message: [0; MESSAGE_LEN],
        }
    }
}

// SAFETY: #[repr(C)], byte arrays only: every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for LinkKey {}
// SAFETY: #[repr(C)], byte arrays and u8s with explicit padding: any bits are valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for LinkValue {}
// SAFETY: #[repr(C)], integers and byte arrays with explicit padding: any bits are valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for LinkState {}
