//! The command line: its arguments (`args`), the commands on the live pinned maps and
//! on config files (`commands`), what the CLI reads from a running daemon's API
//! (`rooms`) and from the maps (`stats`), and how it prints them.

pub mod args;
pub mod cluster;
pub mod commands;
pub mod rooms;
pub mod stats;
