//! Fan-out (1→N) in the kernel: XDP cannot clone a frame, so XDP validates a packet of a
//! stream with several copies and passes it up; the TC ingress program
//! (`edgefwd_fanout`) finds the stream's route by the same key and sends one rewritten
//! copy per entry of its copy list with `bpf_clone_redirect` (the last with
//! `bpf_redirect`). No XDP metadata: some kernels refuse `bpf_xdp_adjust_meta`.
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
//! Each copy also counts in its own `EFWD_RSTATS_V3` slot.

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
