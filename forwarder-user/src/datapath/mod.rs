//! The data paths in userspace. For WebRTC media: the AF_XDP sockets fed by XDP
//! steering (`xsk`) and the plain UDP socket as the fallback (`socket`), both driving
//! the media engine, with `handoff` moving datagrams between workers to the one whose
//! engine holds their room. For plain RTP routes: the socket relay of `--datapath user`
//! (`userpath`), with `rxq` counting what the kernel dropped on full socket queues.

pub mod engines;
pub mod handoff;
pub mod rxq;
pub mod socket;
pub mod userpath;
pub mod xsk;
