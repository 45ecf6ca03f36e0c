//! `EFWD_RSTATS_V3`: per-CPU array indexed by `RouteValue::stats_slot`. Packets and
//! bytes forwarded per route (per copy of a fan-out stream), copies that could not be
//! sent, and the RTP sequence number and timestamp of the last packet counted (as it
//! arrived, before any rewrite), so the control plane can move a subscriber from one
//! stream to another with a continuous sequence. An array slot rather than a second
//! hash lookup keyed by the route: array lookups are inlined by the verifier, so
//! per-route counting costs a few instructions on the hot path.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_RSTATS_V3";

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteStats {
    pub packets: u64,
    pub bytes: u64,
    /// Copies the replicator could not send (clone or redirect refused, too short).
    pub drops: u64,
    /// `bpf_ktime_get_coarse_ns` when the last packet was counted here (0: none yet), so
    /// the newest of the per-CPU `last_*` can be told. The coarse clock (the last
    /// timer tick, a few ms apart) costs the data path far less per packet than the
    /// precise one; slots of the same tick are told apart by their sequence numbers.
    pub last_ns: u64,
    /// The last counted packet's RTP timestamp and sequence number, source numbering.
    pub last_ts: u32,
    pub last_seq: u16,
    pub _pad: [u8; 2],
}
assert_size!(RouteStats, 40);

impl RouteStats {
    /// Counts one packet of `len` bytes that arrived with (`seq`, `ts`) at `now_ns`.
    #[inline(always)]
    pub fn record(&mut self, len: u64, seq: u16, ts: u32, now_ns: u64) {
        self.packets += 1;
        self.bytes += len;
        self.last_ns = now_ns;
        self.last_ts = ts;
        self.last_seq = seq;
    }

    /// Adds another CPU's counters; the newest `last_*` of the two stays: the later
    /// tick, or in the same tick the later sequence number (a stream's packets within
    /// a few ms are far inside half the sequence space).
    pub fn merge(&mut self, o: &RouteStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.drops += o.drops;
        let later_seq =
            o.last_seq != self.last_seq && o.last_seq.wrapping_sub(self.last_seq) < 0x8000;
        if o.last_ns > self.last_ns || (o.last_ns == self.last_ns && o.last_ns != 0 && later_seq) {
            (self.last_ns, self.last_ts, self.last_seq) = (o.last_ns, o.last_ts, o.last_seq);
        }
    }

    /// The last packet's (sequence, timestamp), if one was counted.
    pub fn last(&self) -> Option<(u16, u32)> {
        (self.last_ns != 0).then_some((self.last_seq, self.last_ts))
    }
}

// SAFETY: #[repr(C)], four u64s, a u32, a u16 and 2 explicit padding bytes: no
// implicit padding, every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for RouteStats {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_cpus_sums_counts_and_keeps_the_newest_packet() {
        let mut a = RouteStats::default();
        assert_eq!(a.last(), None);
        a.record(100, 7, 700, 50);
        let mut b = RouteStats::default();
        b.record(10, 9, 900, 60);
        b.drops = 1;
        let mut t = RouteStats::default();
        t.merge(&b);
        t.merge(&a);
        assert_eq!((t.packets, t.bytes, t.drops), (2, 110, 1));
        assert_eq!(t.last(), Some((9, 900)));
    }

    #[test]
    fn in_the_same_tick_the_later_sequence_number_is_the_newest_across_a_wrap() {
        let (mut a, mut b) = (RouteStats::default(), RouteStats::default());
        a.record(100, 65_535, 700, 50);
        b.record(100, 2, 900, 50);
        for (x, y) in [(a, b), (b, a)] {
            let mut t = RouteStats::default();
            t.merge(&x);
            t.merge(&y);
            assert_eq!(t.last(), Some((2, 900)), "seq 2 follows 65535");
        }
    }
}
