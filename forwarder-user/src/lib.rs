//! edgefwd userspace. Each folder is one part of the system, lowest layer first; a
//! part uses only the parts below it (`layering.rs` checks it):
//!
//! * `http/` — HTTP plumbing every part shares: a small client, the server loop with
//!   connection limits, the bearer token.
//! * `media/` — the sans-I/O media engine: SRTP, RTCP, fan-out, NACK cache and RTX,
//!   simulcast and SVC, bandwidth estimates. No clock, no runtime, no socket.
//! * `dataplane/` — the XDP program's side: loading and attaching it, the one module
//!   that writes its maps, resolving routes to map values, `simulate`, preflight checks.
//! * `datapath/` — what drives the engines: one per AF_XDP queue and core, the worker
//!   and socket loops, the hand-off between workers; the plain-RTP socket relay.
//! * `cluster/` — cascades between nodes: links, their demand, the node-to-node API,
//!   the room directory.
//! * `webrtc/` — signalling: WHIP/WHEP over HTTP, SDP, ICE, DTLS, the SFU's sessions.
//! * `daemon/` — the composition root: configuration, startup of every part, /metrics.
//! * `cli/` — the command line, its commands, what it prints from the maps and the API.
//! * `loadtest/` — `edgefwd load-test`: WHIP/WHEP clients with real ICE, DTLS, SRTP.
// The /api/sessions snapshot is one json! literal per session, deeper than the default.
#![recursion_limit = "256"]

pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod datapath;
pub mod dataplane;
pub mod http;
pub mod loadtest;
pub mod media;
pub mod webrtc;

#[cfg(test)]
mod layering;

/// The XDP object built by build.rs (aya-build), embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));
/// The test and benchmark XDP programs (forwarder-ebpf/src/tools.rs), a separate object.
pub static EBPF_TOOLS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder-tools"));
