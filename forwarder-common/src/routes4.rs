//! `EFWD_ROUTES4_V3`: hash map, [`RouteKey4`] → [`crate::routes::RouteValue`], the IPv4
//! routes. Same meaning as the IPv6 map, with a 16-byte key instead of 40: the kernel
//! hashes and compares the whole key on every packet, and on this path that was a
//! measurable share of the program's cost (see the benchmark's program-alone figures).

use crate::{addr::v4_mapped, assert_size, routes::RouteKey};

pub const MAP_NAME: &str = "EFWD_ROUTES4_V3";

// align(4): the XDP program builds the key a word at a time.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouteKey4 {
    pub listen_addr: [u8; 4],
    pub src_addr: [u8; 4],
    pub listen_port_be: [u8; 2],
    pub src_port_be: [u8; 2],
    pub ssrc_be: [u8; 4],
}
assert_size!(RouteKey4, 16);

impl RouteKey4 {
    /// The IPv4 form of a route key, if both its addresses are v4-mapped.
    pub fn from_mapped(k: &RouteKey) -> Option<RouteKey4> {
        Some(RouteKey4 {
            listen_addr: crate::addr::as_v4(&k.listen_addr)?,
            src_addr: crate::addr::as_v4(&k.src_addr)?,
            listen_port_be: k.listen_port_be,
            src_port_be: k.src_port_be,
            ssrc_be: k.ssrc_be,
        })
    }

    pub fn to_mapped(&self) -> RouteKey {
        RouteKey {
            listen_addr: v4_mapped(self.listen_addr),
            src_addr: v4_mapped(self.src_addr),
            listen_port_be: self.listen_port_be,
            src_port_be: self.src_port_be,
            ssrc_be: self.ssrc_be,
        }
    }
}

// SAFETY: #[repr(C)], byte arrays only, no padding (size asserted): every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for RouteKey4 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_round_trip() {
        let k = RouteKey {
            listen_addr: v4_mapped([192, 0, 2, 1]),
            src_addr: v4_mapped([192, 0, 2, 7]),
            listen_port_be: 5004u16.to_be_bytes(),
            src_port_be: 40000u16.to_be_bytes(),
            ssrc_be: 0x1234_5678u32.to_be_bytes(),
        };
        let k4 = RouteKey4::from_mapped(&k).unwrap();
        assert_eq!(k4.listen_addr, [192, 0, 2, 1]);
        assert_eq!(k4.src_addr, [192, 0, 2, 7]);
        assert_eq!(k4.to_mapped(), k);
        let mut v6 = k;
        v6.src_addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(RouteKey4::from_mapped(&v6), None);
    }
}
