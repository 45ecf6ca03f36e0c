//! edgefwd userspace: loader, map writers, config, userspace data path, stats.

pub mod config;
pub mod datapath;
pub mod loader;
pub mod maps;
pub mod media;
pub mod metrics;
pub mod packet;
pub mod preflight;
pub mod resolve;
pub mod rxq;
pub mod simulate;
pub mod stats;
pub mod userpath;
pub mod webrtc;

/// The XDP object built by build.rs (aya-build), embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));
