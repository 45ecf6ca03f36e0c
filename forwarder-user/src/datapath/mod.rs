//! The data paths in userspace. For WebRTC media: the engines and what drives them
//! (`engines`: one engine per AF_XDP queue and core, the worker and socket loops,
//! the command queues, the timers), the AF_XDP sockets fed by XDP steering (`xsk`),
//! the plain UDP socket as the fallback (`socket`), and `handoff` moving datagrams
//! between workers to the one whose engine holds their room. For plain RTP routes:
//! the socket relay of `--datapath user` (`userpath`), with `rxq` counting what the
//! kernel dropped on full socket queues.

pub mod engines;
pub mod handoff;
pub mod rxq;
pub mod socket;
pub mod userpath;
pub mod xsk;
