//! edgefwd userspace. Each folder is one part of the system:
//!
//! * `dataplane/` — the XDP program's side: loading and attaching it, the one module
//!   that writes its maps, resolving routes to map values, `simulate`, preflight checks.
//! * `datapath/` — what moves packets in userspace: the AF_XDP queues and the socket
//!   that drive the media engine, and the plain-RTP socket relay (`--datapath user`).
//! * `media/` — the sans-I/O media engine: SRTP, RTCP, fan-out, NACK cache.
//! * `webrtc/` — signaling: WHIP/WHEP over HTTP, SDP, ICE, DTLS, the SFU's sessions.
//! * `daemon/` — the daemon's configuration and its Prometheus endpoint.
//! * `cluster/` — cascades between nodes: links, their demand, the node-to-node API.
//! * `cli/` — what the CLI prints from the live maps and the daemon's API.
//! * `loadtest/` — `edgefwd load-test`: WHIP/WHEP clients with real ICE, DTLS, SRTP.
//! * `http/` — HTTP plumbing every part shares: a small client, the server loop with
//!   connection limits, the bearer token.
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
