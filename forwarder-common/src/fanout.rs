//! Fan-out (1→N) in the kernel: XDP cannot clone a frame, so XDP validates a packet of a
//! stream with several copies and passes it up with [`FanoutMeta`] in the XDP metadata;
//! the TC ingress program (`edgefwd_fanout`) then sends one rewritten copy per entry of
//! the stream's copy list with `bpf_clone_redirect` (the last with `bpf_redirect`).
//!
//! `EFWD_COPIES_V1`: array of [`crate::routes::RouteValue`], the copy lists. A stream's
//! list is a contiguous range named by its route value (`fanout_first`,
//! `fanout_count`). A published range is never written again: a change writes a new
//! range, then swaps the route value (one hash-map update, atomic for the data plane),
//! and the old range is reused only after [`GRACE_MS`], longer than any replication
//! loop can run. So a packet sees the old list or the new one, never a mix.
//!
//! `EFWD_COPYVERDICT_V1`: per-CPU array of [`crate::verdicts::VerdictStats`] indexed by
//! [`CopyVerdict`]: every copy the replicator makes or fails to make, counted once.
//! Each copy also counts in its own `EFWD_RSTATS_V2` slot.

use crate::assert_size;

pub const COPIES_MAP_NAME: &str = "EFWD_COPIES_V1";
pub const COPY_VERDICT_MAP_NAME: &str = "EFWD_COPYVERDICT_V1";
/// Slots in the copies array, shared by every stream's list (and during a change, by
/// its old and new list).
pub const MAX_COPY_SLOTS: u32 = 65_536;
/// Copies of one packet. Bounds the replication loop, and with it [`GRACE_MS`].
pub const MAX_COPIES: u32 = 4_096;
/// How long a retired copy range stays untouched after its stream moved to a new one:
/// a replication loop that read the old route value finishes well within this (4,096
/// copies at ~1 µs each), and XDP hands a packet to TC within the same softirq run.
pub const GRACE_MS: u64 = 20;

/// Written by XDP in front of the packet (XDP metadata) for the TC replicator.
pub const FANOUT_MAGIC: u32 = 0x4546_4f31;
/// The packet is IPv6 (else IPv4).
pub const META_IPV6: u32 = 1 << 0;
/// The packet arrived 802.1Q-tagged: the copies leave untagged, so TC pops it.
pub const META_VLAN: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FanoutMeta {
    pub magic: u32,
    pub first: u32,
    pub count: u32,
    pub flags: u32,
}
assert_size!(FanoutMeta, 16);

/// What the replicator did with one copy.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyVerdict {
    ForwardCopy = 0,
    DropCopyMissing = 1,
    DropCopyCloneError = 2,
    DropCopyMalformed = 3,
}

impl CopyVerdict {
    pub const ALL: &'static [CopyVerdict] = &[
        CopyVerdict::ForwardCopy,
        CopyVerdict::DropCopyMissing,
        CopyVerdict::DropCopyCloneError,
        CopyVerdict::DropCopyMalformed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            CopyVerdict::ForwardCopy => "forward_copy",
            CopyVerdict::DropCopyMissing => "drop_copy_missing",
            CopyVerdict::DropCopyCloneError => "drop_copy_clone_error",
            CopyVerdict::DropCopyMalformed => "drop_copy_malformed",
        }
    }

    pub const fn help(self) -> &'static str {
        match self {
            CopyVerdict::ForwardCopy => "copy of a fan-out stream rewritten and sent",
            CopyVerdict::DropCopyMissing => {
                "copy index outside the copies array (a corrupted route value)"
            }
            CopyVerdict::DropCopyCloneError => {
                "bpf_clone_redirect/bpf_redirect failed (no memory, egress interface gone)"
            }
            CopyVerdict::DropCopyMalformed => {
                "packet too short for the headers XDP validated (every copy of it counted)"
            }
        }
    }
}

pub const NUM_COPY_VERDICTS: u32 = 4;
const _: () = assert!(CopyVerdict::ALL.len() as u32 == NUM_COPY_VERDICTS);
