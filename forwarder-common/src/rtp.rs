//! RTP/RTCP facts shared by both data paths: the RFC 7983 demultiplexing of the first
//! payload byte, the RFC 5761 RTP/RTCP split, RTP header validation, and the header
//! rewrite the userspace path applies (the XDP program does the same on packet memory).

use crate::routes::{FLAG_REWRITE_PT, RouteValue};

pub const RTP_FIXED_HEADER_LEN: usize = 12;
/// Largest RTP packet either data path handles (jumbo frames); also keeps the
/// verifier's packet offsets bounded.
pub const MAX_RTP_LEN: usize = 9000;

/// What the first two bytes of a UDP payload say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Stun,
    Dtls,
    TurnChannel,
    Rtp,
    Rtcp,
    Unknown,
}

/// RFC 7983 §7 first-byte ranges, then RFC 5761 §4 for RTP vs RTCP: RTCP packet types
/// 192-223 (SR 200, RR 201, ... FIR 192) appear as the second byte, which for RTP
/// holds marker + payload type, and payload types 64-95 are reserved for that reason.
#[inline(always)]
pub fn classify(b0: u8, b1: u8) -> Class {
    match b0 {
        0..=3 => Class::Stun,
        20..=63 => Class::Dtls,
        64..=79 => Class::TurnChannel,
        128..=191 => {
            if (192..=223).contains(&b1) {
                Class::Rtcp
            } else {
                Class::Rtp
            }
        }
        _ => Class::Unknown,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RtpError {
    /// Shorter than the 12-byte fixed header plus the CSRC list.
    Truncated,
    /// Extension header or its declared length runs past the packet.
    ExtensionTruncated,
    /// Padding count is 0 or larger than the payload.
    BadPadding,
    TooLong,
}

/// Validates an RTP packet; returns the header length (fixed + CSRCs + extension).
pub fn validate(pkt: &[u8]) -> Result<usize, RtpError> {
    let hlen = header_len(pkt)?;
    if pkt[0] & 0x20 != 0 {
        let pad = pkt[pkt.len() - 1] as usize;
        if pad == 0 || hlen + pad > pkt.len() {
            return Err(RtpError::BadPadding);
        }
    }
    Ok(hlen)
}

/// The header length (fixed + CSRCs + extension) of an RTP packet whose payload may be
/// encrypted: SRTP leaves the header in the clear but hides the padding count.
pub fn header_len(pkt: &[u8]) -> Result<usize, RtpError> {
    if pkt.len() > MAX_RTP_LEN {
        return Err(RtpError::TooLong);
    }
    if pkt.len() < RTP_FIXED_HEADER_LEN {
        return Err(RtpError::Truncated);
    }
    let cc = (pkt[0] & 0x0f) as usize;
    let mut hlen = RTP_FIXED_HEADER_LEN + 4 * cc;
    if pkt.len() < hlen {
        return Err(RtpError::Truncated);
    }
    if pkt[0] & 0x10 != 0 {
        if pkt.len() < hlen + 4 {
            return Err(RtpError::ExtensionTruncated);
        }
        let words = u16::from_be_bytes([pkt[hlen + 2], pkt[hlen + 3]]) as usize;
        hlen += 4 + 4 * words;
        if pkt.len() < hlen {
            return Err(RtpError::ExtensionTruncated);
        }
    }
    Ok(hlen)
}

/// Where header extension `id` (RFC 8285, one-byte or two-byte form) of a packet
/// that passed [`header_len`] is: (its element header's offset, its value's offset,
/// the value's length, whether the two-byte form); None if absent or malformed.
fn find_extension(pkt: &[u8], id: u8) -> Option<(usize, usize, usize, bool)> {
    if pkt.first()? & 0x10 == 0 || id == 0 {
        return None;
    }
    let at = RTP_FIXED_HEADER_LEN + 4 * (pkt[0] & 0x0f) as usize;
    let profile = u16::from_be_bytes([*pkt.get(at)?, *pkt.get(at + 1)?]);
    let words = u16::from_be_bytes([*pkt.get(at + 2)?, *pkt.get(at + 3)?]) as usize;
    let start = at + 4;
    let body = pkt.get(start..start + 4 * words)?;
    let two_byte = match profile {
        0xbede => false,
        p if p & 0xfff0 == 0x1000 => true,
        _ => return None,
    };
    let mut i = 0;
    while i < body.len() {
        let (eid, len, hdr) = if two_byte {
            if body[i] == 0 {
                i += 1; // padding
                continue;
            }
            (body[i], *body.get(i + 1)? as usize, 2)
        } else {
            let b = body[i];
            if b == 0 {
                i += 1; // padding
                continue;
            }
            if b >> 4 == 15 {
                return None; // reserved id: stop parsing (RFC 8285 §4.2)
            }
            (b >> 4, (b & 0x0f) as usize + 1, 1)
        };
        body.get(i + hdr..i + hdr + len)?;
        if eid == id {
            return Some((start + i, start + i + hdr, len, two_byte));
        }
        i += hdr + len;
    }
    None
}

/// The value of header extension `id` (RFC 8285, one-byte or two-byte form) of a
/// packet that passed [`header_len`]; None if absent or malformed. Used to learn which
/// simulcast encoding (rtp-stream-id, RFC 8852) an SSRC carries, and an AV1 packet's
/// layers (its dependency descriptor).
pub fn extension(pkt: &[u8], id: u8) -> Option<&[u8]> {
    let (_, at, len, _) = find_extension(pkt, id)?;
    pkt.get(at..at + len)
}

/// Where the value of header extension `id` starts, if the packet carries it with
/// exactly `len` bytes (to be written in place).
pub fn extension_value_offset(pkt: &[u8], id: u8, len: usize) -> Option<usize> {
    let (_, at, n, _) = find_extension(pkt, id)?;
    (n == len).then_some(at)
}

/// Adds header extension `id` with a 2-byte `value` to the packet of `len` bytes at
/// the start of `buf` (header and payload move up; `buf` must have the room): a new
/// one-byte block where it has none, else one more element in its block. Returns the
/// new length, or None if it does not fit (no room, an id the form cannot carry, a
/// profile that is not RFC 8285's).
pub fn insert_extension(buf: &mut [u8], len: usize, id: u8, value: [u8; 2]) -> Option<usize> {
    let base = RTP_FIXED_HEADER_LEN + 4 * (*buf.first()? & 0x0f) as usize;
    let (at, grow, element): (usize, usize, [u8; 8]) = if buf[0] & 0x10 == 0 {
        if !(1..=14).contains(&id) {
            return None;
        }
        let e = [0xbe, 0xde, 0, 1, (id << 4) | 1, value[0], value[1], 0];
        (base, 8, e)
    } else {
        let profile = u16::from_be_bytes([*buf.get(base)?, *buf.get(base + 1)?]);
        let words = u16::from_be_bytes([*buf.get(base + 2)?, *buf.get(base + 3)?]);
        let e = match profile {
            0xbede if (1..=14).contains(&id) => [(id << 4) | 1, value[0], value[1], 0, 0, 0, 0, 0],
            p if p & 0xfff0 == 0x1000 && id > 0 => [id, 2, value[0], value[1], 0, 0, 0, 0],
            _ => return None,
        };
        (base + 4 + 4 * words as usize, 4, e)
    };
    if len < at || buf.len() < len + grow {
        return None;
    }
    if grow == 4 {
        // One more word in the block (checked: the block ends within `len`).
        let words = u16::from_be_bytes([buf[base + 2], buf[base + 3]]).checked_add(1)?;
        buf[base + 2..base + 4].copy_from_slice(&words.to_be_bytes());
    }
    buf.copy_within(at..len, at + grow);
    buf[at..at + grow].copy_from_slice(&element[..grow]);
    buf[0] |= 0x10;
    Some(len + grow)
}

/// Gives header extension `from` the id `to` (a receiver that negotiated another id
/// for the same extension), in place; false if it is absent or `to` does not fit the
/// packet's form (the one-byte form has ids 1 to 14).
pub fn rename_extension(pkt: &mut [u8], from: u8, to: u8) -> bool {
    let Some((h, _, _, two_byte)) = find_extension(pkt, from) else {
        return false;
    };
    match (two_byte, to) {
        (true, 1..) => pkt[h] = to,
        (false, 1..=14) => pkt[h] = (to << 4) | (pkt[h] & 0x0f),
        _ => return false,
    }
    true
}

/// Applies a route's RTP rewrite (payload type, sequence, timestamp, SSRC) in place.
/// `pkt` must have passed [`validate`].
pub fn rewrite(pkt: &mut [u8], route: &RouteValue) {
    if route.flags & FLAG_REWRITE_PT != 0 && pkt[1] & 0x7f == route.pt_from {
        pkt[1] = (pkt[1] & 0x80) | (route.pt_to & 0x7f);
    }
    let seq = u16::from_be_bytes([pkt[2], pkt[3]]).wrapping_add(route.seq_delta);
    pkt[2..4].copy_from_slice(&seq.to_be_bytes());
    let ts = u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]).wrapping_add(route.ts_delta);
    pkt[4..8].copy_from_slice(&ts.to_be_bytes());
    pkt[8..12].copy_from_slice(&route.ssrc_out_be);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(b0: u8, extra: &[u8]) -> [u8; 64] {
        let mut p = [0u8; 64];
        p[0] = b0;
        p[1] = 96;
        p[12..12 + extra.len()].copy_from_slice(extra);
        p
    }

    #[test]
    fn classify_rfc7983_ranges() {
        assert_eq!(classify(0, 1), Class::Stun);
        assert_eq!(classify(3, 0), Class::Stun);
        assert_eq!(classify(4, 0), Class::Unknown);
        assert_eq!(classify(19, 0), Class::Unknown);
        assert_eq!(classify(20, 0), Class::Dtls);
        assert_eq!(classify(22, 0), Class::Dtls);
        assert_eq!(classify(63, 0), Class::Dtls);
        assert_eq!(classify(64, 0), Class::TurnChannel);
        assert_eq!(classify(79, 0), Class::TurnChannel);
        assert_eq!(classify(80, 0), Class::Unknown);
        assert_eq!(classify(127, 0), Class::Unknown);
        assert_eq!(classify(0x80, 96), Class::Rtp);
        assert_eq!(classify(0x80, 96 | 0x80), Class::Rtp);
        assert_eq!(classify(0x80, 200), Class::Rtcp);
        assert_eq!(classify(0x81, 201), Class::Rtcp);
        assert_eq!(classify(0x80, 192), Class::Rtcp);
        assert_eq!(classify(0x80, 223), Class::Rtcp);
        assert_eq!(classify(0x80, 224), Class::Rtp);
        assert_eq!(classify(191, 0), Class::Rtp);
        assert_eq!(classify(192, 0), Class::Unknown);
    }

    #[test]
    fn validate_headers() {
        assert_eq!(validate(&rtp(0x80, &[])), Ok(12));
        assert_eq!(validate(&[0x80; 11]), Err(RtpError::Truncated));
        // Two CSRCs.
        assert_eq!(validate(&rtp(0x82, &[])), Ok(20));
        assert_eq!(validate(&rtp(0x82, &[])[..19]), Err(RtpError::Truncated));
        // Extension with 2 words after 0 CSRCs.
        let p = rtp(0x90, &[0xbe, 0xde, 0, 2]);
        assert_eq!(validate(&p), Ok(24));
        assert_eq!(validate(&p[..23]), Err(RtpError::ExtensionTruncated));
        assert_eq!(validate(&p[..15]), Err(RtpError::ExtensionTruncated));
        // Padding: last byte counts padding including itself.
        let mut p = rtp(0xa0, &[]);
        p[63] = 4;
        assert_eq!(validate(&p), Ok(12));
        p[63] = 0;
        assert_eq!(validate(&p), Err(RtpError::BadPadding));
        p[63] = 53;
        assert_eq!(validate(&p), Err(RtpError::BadPadding));
        p[63] = 52;
        assert_eq!(validate(&p), Ok(12));
        assert_eq!(validate(&[0x80; MAX_RTP_LEN + 1]), Err(RtpError::TooLong));
    }

    #[test]
    fn header_extensions_one_and_two_byte_forms() {
        // One-byte form: id 1 "0" (mid), padding, id 10 "h" (rid), one word of padding.
        let mut p = [0u8; 40];
        p[0] = 0x90;
        p[1] = 96;
        p[12..16].copy_from_slice(&[0xbe, 0xde, 0, 2]);
        p[16..24].copy_from_slice(&[0x10, b'0', 0, 0xa0, b'h', 0, 0, 0]);
        assert_eq!(header_len(&p), Ok(24));
        assert_eq!(extension(&p, 1), Some(&b"0"[..]));
        assert_eq!(extension(&p, 10), Some(&b"h"[..]));
        assert_eq!(extension(&p, 3), None);
        // Two-byte form, after one CSRC: id 12, length 2.
        let mut q = [0u8; 40];
        q[0] = 0x91;
        q[16..20].copy_from_slice(&[0x10, 0x00, 0, 1]);
        q[20..24].copy_from_slice(&[12, 2, b'h', b'i']);
        assert_eq!(extension(&q, 12), Some(&b"hi"[..]));
        // A length that runs past the block, no extension bit, an unknown profile.
        let mut bad = p;
        bad[16] = 0x1f;
        assert_eq!(extension(&bad, 10), None);
        let mut none = p;
        none[0] = 0x80;
        assert_eq!(extension(&none, 1), None);
        let mut other = p;
        other[12] = 0x12;
        assert_eq!(extension(&other, 1), None);
        assert_eq!(extension(&p[..20], 10), None, "truncated block");
    }

    #[test]
    fn rewrite_wraps() {
        let mut p = rtp(0x80, &[]);
        p[1] = 0x80 | 100;
        p[2..4].copy_from_slice(&0xfffeu16.to_be_bytes());
        p[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        let route = RouteValue {
            seq_delta: 5,
            ts_delta: 0x20,
            ssrc_out_be: 0xdead_beefu32.to_be_bytes(),
            pt_from: 100,
            pt_to: 111,
            flags: FLAG_REWRITE_PT,
            ..Default::default()
        };
        rewrite(&mut p, &route);
        assert_eq!(p[1], 0x80 | 111, "marker kept, PT remapped");
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 3);
        assert_eq!(u32::from_be_bytes([p[4], p[5], p[6], p[7]]), 0x10);
        assert_eq!(&p[8..12], &0xdead_beefu32.to_be_bytes());
    }

    #[test]
    fn extensions_are_found_and_renamed_in_both_forms() {
        // One-byte form: id 3 (2 bytes), id 12 (3 bytes), padding.
        let mut p = [
            0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0xbe, 0xde, 0, 2, 0x31, 0xaa, 0xbb, 0xc2, 1, 2,
            3, 0, 0x77,
        ];
        assert_eq!(extension(&p, 12), Some(&[1, 2, 3][..]));
        assert_eq!(extension_value_offset(&p, 3, 2), Some(17));
        assert_eq!(extension_value_offset(&p, 12, 2), None, "3 bytes, not 2");
        assert!(rename_extension(&mut p, 12, 9));
        assert_eq!(extension(&p, 12), None);
        assert_eq!(extension(&p, 9), Some(&[1, 2, 3][..]));
        assert_eq!(
            extension(&p, 3),
            Some(&[0xaa, 0xbb][..]),
            "the others untouched"
        );
        assert!(
            !rename_extension(&mut p, 9, 15),
            "no id 15 in the one-byte form"
        );
        assert!(!rename_extension(&mut p, 4, 5), "absent");
        // Two-byte form (0x1000): id 13, 17 bytes.
        let mut q = [7u8; 36];
        q[..18].copy_from_slice(&[
            0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0x10, 0x00, 0, 5, 13, 17,
        ]);
        q[35] = 0;
        assert_eq!(extension(&q, 13).map(|v| v.len()), Some(17));
        assert!(rename_extension(&mut q, 13, 20));
        assert_eq!(extension(&q, 20).map(|v| v.len()), Some(17));
        // A length past the end is malformed: nothing found.
        q[17] = 30;
        assert_eq!(extension(&q, 20), None);
    }

    #[test]
    fn an_extension_is_inserted_in_every_form() {
        // No extension: a one-byte block of its own; the payload moves up.
        let mut b = [0u8; 64];
        b[..14].copy_from_slice(&[0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0xaa, 0xbb]);
        let n = insert_extension(&mut b, 14, 3, [0x12, 0x34]).unwrap();
        assert_eq!(n, 22);
        assert_eq!(header_len(&b[..n]), Ok(20));
        assert_eq!(extension(&b[..n], 3), Some(&[0x12, 0x34][..]));
        assert_eq!(&b[20..22], &[0xaa, 0xbb]);
        // A one-byte block: one more element, the others kept.
        let m = insert_extension(&mut b, n, 5, [0x56, 0x78]).unwrap();
        assert_eq!((m, header_len(&b[..m])), (26, Ok(24)));
        assert_eq!(extension(&b[..m], 3), Some(&[0x12, 0x34][..]));
        assert_eq!(extension(&b[..m], 5), Some(&[0x56, 0x78][..]));
        assert_eq!(&b[24..26], &[0xaa, 0xbb]);
        assert_eq!(
            insert_extension(&mut b, m, 15, [0, 0]),
            None,
            "no id 15 in one byte"
        );
        // A two-byte block takes any id.
        let mut t = [0u8; 64];
        t[..22].copy_from_slice(&[
            0x90, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0x10, 0x00, 0, 1, 13, 1, 9, 0, 0xcc, 0xdd,
        ]);
        let n = insert_extension(&mut t, 22, 20, [1, 2]).unwrap();
        assert_eq!(extension(&t[..n], 20), Some(&[1, 2][..]));
        assert_eq!(extension(&t[..n], 13), Some(&[9][..]));
        assert_eq!(&t[n - 2..n], &[0xcc, 0xdd]);
        // No room left in the buffer: nothing changed.
        let mut small = [0u8; 16];
        small[..14].copy_from_slice(&[0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0xaa, 0xbb]);
        assert_eq!(insert_extension(&mut small, 14, 3, [0, 0]), None);
        let mut full = t;
        let before = full;
        assert_eq!(insert_extension(&mut full[..n], n, 21, [3, 4]), None);
        assert_eq!(full, before, "untouched");
    }
}
