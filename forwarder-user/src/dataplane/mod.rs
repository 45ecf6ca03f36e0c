//! The XDP data plane as userspace sees it: load and attach the program, write its
//! maps (one writer for the daemon, the CLI and the tests), resolve routes, simulate.

pub mod config;
pub mod links;
pub mod loader;
pub mod maps;
pub mod packet;
pub mod preflight;
pub mod resolve;
pub mod simulate;
