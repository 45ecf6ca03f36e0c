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
    /// `bpf_ktime_get_ns` when the last packet was counted here (0: none yet), so the
    /// newest of the per-CPU `last_*` can be told.
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

    /// Adds another CPU's counters; the newest `last_*` of the two stays.
    pub fn merge(&mut self, o: &RouteStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.drops += o.drops;
        if o.last_ns > self.last_ns {
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
}
