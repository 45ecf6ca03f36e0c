//! Addresses in map keys are 16 bytes: IPv6 as is, IPv4 as v4-mapped (`::ffff:a.b.c.d`),
//! so one key type serves both families.

/// IPv4 address as its v4-mapped IPv6 form.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The IPv4 address inside a v4-mapped address, if it is one.
#[inline(always)]
pub fn as_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_round_trip() {
        let m = v4_mapped([198, 51, 100, 7]);
        assert_eq!(as_v4(&m), Some([198, 51, 100, 7]));
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        v6[1] = 0x01;
        assert_eq!(as_v4(&v6), None);
    }
}
