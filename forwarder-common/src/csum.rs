//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624, eqn. 3).
//!
//! The data plane changes a handful of 16-bit words per packet; recomputing a
//! checksum over 1200 bytes would cost more than the rest of the rewrite, so it
//! folds only the changed words into the old checksum. Words are read big-endian;
//! one's complement sums do not depend on the byte order as long as it is consistent.

/// Accumulates `~old + new` for each changed 16-bit word.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        // No fold per word: a packet changes at most a few dozen words, and two folds
        // in `apply*` bring any sum of up to 127 words (< 2^24) back to 16 bits.
        self.0 += (!old as u32 & 0xffff) + new as u32;
    }

    /// Adds another accumulated change (e.g. addresses shared by IP and UDP sums).
    #[inline(always)]
    pub fn merge(&mut self, other: &Delta) {
        self.0 += other.0;
    }

    #[inline(always)]
    pub fn bytes2(&mut self, old: [u8; 2], new: [u8; 2]) {
        self.word(u16::from_be_bytes(old), u16::from_be_bytes(new));
    }

    #[inline(always)]
    pub fn bytes4(&mut self, old: [u8; 4], new: [u8; 4]) {
        self.bytes2([old[0], old[1]], [new[0], new[1]]);
        self.bytes2([old[2], old[3]], [new[2], new[3]]);
    }

    #[inline(always)]
    pub fn bytes16(&mut self, old: &[u8; 16], new: &[u8; 16]) {
        let mut i = 0;
        while i < 16 {
            self.bytes2([old[i], old[i + 1]], [new[i], new[i + 1]]);
            i += 2;
        }
    }

    /// Applies the accumulated change to a checksum word read the same way as the
    /// words given to [`Delta::word`] (RFC 1071 §2(B): the sum is byte-order
    /// independent, so native-order loads work as long as every word is native).
    #[inline(always)]
    pub fn apply_word(&self, check: u16) -> u16 {
        let sum = fold_once(fold_once((!check as u32) + self.0));
        !(sum as u16)
    }

    /// Applies the accumulated change to a checksum field (big-endian bytes).
    #[inline(always)]
    pub fn apply(&self, check: [u8; 2]) -> [u8; 2] {
        let hc = u16::from_be_bytes(check);
        let sum = fold_once(fold_once((!hc as u32) + self.0));
        (!(sum as u16)).to_be_bytes()
    }
}

/// Folds a one's complement sum below 2^48 to 16 bits in a fixed number of steps (no
/// data-dependent loop: the eBPF verifier must see it end).
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

#[inline(always)]
const fn fold_once(x: u32) -> u32 {
    (x & 0xffff) + (x >> 16)
}

/// One's complement sum of `data` added to `initial` (not folded/complemented).
pub fn sum_bytes(initial: u32, data: &[u8]) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    fold(sum) as u32
}

/// Full checksum of `data` (e.g. an IPv4 header with its checksum field zeroed).
pub fn checksum(data: &[u8]) -> u16 {
    !(sum_bytes(0, data) as u16)
}

/// Full UDP checksum from scratch, `udp` being header (checksum zeroed) + payload.
/// Returns 0xffff for a computed 0, as RFC 768 requires on the wire.
pub fn udp_checksum(src: &[u8], dst: &[u8], udp: &[u8]) -> u16 {
    let mut s = sum_bytes(0, src);
    s = sum_bytes(s, dst);
    let len = udp.len() as u32;
    if src.len() == 16 {
        s = sum_bytes(s, &len.to_be_bytes());
        s = sum_bytes(s, &[0, 0, 0, 17]);
    } else {
        s = sum_bytes(s, &[0, 17]);
        s = sum_bytes(s, &(len as u16).to_be_bytes());
    }
    s = sum_bytes(s, udp);
    match !(s as u16) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_matches_full_recompute() {
        let mut hdr = [
            0x45u8, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 17, 0, 0, 198, 51, 100, 1, 198, 51, 100, 2,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        // Change TTL and both addresses.
        let mut d = Delta::new();
        d.bytes2([hdr[8], hdr[9]], [63, 17]);
        d.bytes4([198, 51, 100, 1], [203, 0, 113, 2]);
        d.bytes4([198, 51, 100, 2], [203, 0, 113, 1]);
        let inc = d.apply([hdr[10], hdr[11]]);
        hdr[8] = 63;
        hdr[12..16].copy_from_slice(&[203, 0, 113, 2]);
        hdr[16..20].copy_from_slice(&[203, 0, 113, 1]);
        hdr[10] = 0;
        hdr[11] = 0;
        assert_eq!(u16::from_be_bytes(inc), checksum(&hdr));
    }

    #[test]
    fn incremental_many_random_words() {
        // Deterministic xorshift; compare incremental to full over many edits.
        let mut x: u32 = 0x1234_5678;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..2000 {
            let mut buf = [0u8; 32];
            for b in buf.iter_mut() {
                *b = rnd() as u8;
            }
            buf[0] = 0;
            buf[1] = 0;
            let c = checksum(&buf);
            buf[0..2].copy_from_slice(&c.to_be_bytes());
            let mut d = Delta::new();
            for _ in 0..(rnd() % 6) {
                let i = 2 + 2 * (rnd() as usize % 15);
                let new = [rnd() as u8, rnd() as u8];
                d.bytes2([buf[i], buf[i + 1]], new);
                buf[i..i + 2].copy_from_slice(&new);
            }
            let inc = d.apply([buf[0], buf[1]]);
            buf[0] = 0;
            buf[1] = 0;
            let full = checksum(&buf);
            // 0x0000 and 0xffff are the same value in one's complement.
            let norm = |v: u16| if v == 0xffff { 0 } else { v };
            assert_eq!(norm(u16::from_be_bytes(inc)), norm(full));
        }
    }
}
