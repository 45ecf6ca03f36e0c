//! The daemon, the composition root: its configuration (every part's section),
//! startup and shutdown of every part (`run`), and its Prometheus endpoint.

pub mod config;
pub mod metrics;
pub mod run;
