//! Types shared by the XDP data plane (`forwarder-ebpf`) and userspace (`forwarder-user`).
//!
//! Rules for everything in a map: `#[repr(C)]`, integers and byte arrays only, explicit
//! padding, a compile-time size assert. Fields ending in `_be` hold network byte order
//! exactly as on the wire; every other integer is host order.
//!
//! One module per map. Every map name carries a version: a layout change gets a new
//! name, so a new daemon never reinterprets a pinned map left by an older one.
#![no_std]

pub mod addr;
pub mod csum;
pub mod egress;
pub mod fanout;
pub mod ifmac;
pub mod links;
pub mod listeners;
pub mod peers;
pub mod route_stats;
pub mod routes;
pub mod routes4;
pub mod rtp;
pub mod sources;
pub mod verdicts;

/// Default bpffs directory for pinned maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/edgefwd";

/// Name of the forwarding XDP program in the object file.
pub const PROG_FORWARD: &str = "edgefwd_xdp";
/// Name of the TC replicator (clsact ingress): sends every copy of a fan-out stream.
pub const PROG_FANOUT: &str = "edgefwd_fanout";
/// Name of a pass-everything XDP program: a veth peer needs an XDP program of its own
/// for XDP_TX/REDIRECT frames to arrive, and tests/benchmarks attach this one there.
pub const PROG_PASS: &str = "edgefwd_pass";
/// Name of a drop-everything XDP program: the sink of the benchmark's ceiling run.
pub const PROG_DROP: &str = "edgefwd_drop";
/// Benchmark probe: verifies a datagram's UDP checksum over every byte (what the
/// forwarder chooses not to do; the bench measures what it would cost).
pub const PROG_UDP_VERIFY: &str = "edgefwd_udp_verify";

/// Compile-time size check: a changed layout must come with a new map version.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
