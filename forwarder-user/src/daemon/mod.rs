//! The daemon's configuration (TOML) and its Prometheus endpoint.

pub mod config;
pub mod metrics;
