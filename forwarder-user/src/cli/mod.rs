//! What the CLI reads from the live pinned maps and how it prints it.

pub mod stats;
