//! What the CLI reads from the live pinned maps (stats) and from a running daemon's
//! API (rooms), and how it prints it.

pub mod rooms;
pub mod stats;
