//! RTP sequence numbers over a long stream.
//!
//! Sixteen bits wrap every 65,536 packets: about five minutes of 1 Mbit/s video. Two
//! numbers can be compared in 16 bits only while they are less than 2^15 apart, so
//! anything remembered for longer than that (where a viewer's layer started, the
//! oldest renumbering kept) is held as an extended number ([`Unwrap`]) and compared
//! as one. Numbers updated at every packet (the newest one sent) may use
//! [`seq_after`].

/// `a` is after `b` in 16-bit sequence space: only for numbers less than 2^15 apart.
pub(crate) fn seq_after(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

/// Where the first extended number lands: room below it for packets reordered ahead
/// of the first one.
const START: u64 = 1 << 32;

/// One stream's sequence numbers extended to 64 bits against the newest seen: each
/// number is taken as the one closest to the newest (RFC 3550 A.1's assumption that
/// a stream never jumps by 2^15 or more at once).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unwrap {
    highest: Option<u64>,
}

impl Unwrap {
    /// The extended number of `seq`, without remembering it.
    pub fn extend(&self, seq: u16) -> u64 {
        match self.highest {
            None => START + seq as u64,
            Some(h) => h.wrapping_add_signed(seq.wrapping_sub(h as u16) as i16 as i64),
        }
    }

    /// The newest extended number seen.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Extends `seq` and makes it the newest if it is after every one before.
    pub fn update(&mut self, seq: u16) -> u64 {
        let e = self.extend(seq);
        if self.highest.is_none_or(|h| e > h) {
            self.highest = Some(e);
        }
        e
    }

    /// A new stream: nothing seen.
    pub fn reset(&mut self) {
        self.highest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_extend_across_wraps_in_both_directions() {
        let mut u = Unwrap::default();
        let first = u.update(65_530);
        assert_eq!(u.extend(65_529), first - 1, "reordered before the first");
        // Six wraps, one packet at a time: each number one more than the last.
        let mut last = first;
        for i in 1..=6 * 65_536u64 {
            let e = u.update(65_530u16.wrapping_add(i as u16));
            assert_eq!(e, last + 1);
            last = e;
        }
        assert_eq!(last - first, 6 * 65_536);
        // Late ones stay behind, up to 2^15 back; a jump ahead moves the newest.
        assert_eq!(u.extend(65_530u16.wrapping_sub(100)), last - 100);
        assert_eq!(u.update(65_530u16.wrapping_sub(100)), last - 100);
        assert_eq!(u.highest(), Some(last));
        assert_eq!(u.update(65_530u16.wrapping_add(30_000)), last + 30_000);
        // Far from anything remembered only as a 16-bit number: the first number of
        // a stream stays comparable with the newest after any number of wraps.
        assert!(u.highest().unwrap() > first + 6 * 65_536);
        assert!(seq_after(1, 65_535) && !seq_after(65_535, 1));
        u.reset();
        assert_eq!(u.highest(), None);
    }
}
