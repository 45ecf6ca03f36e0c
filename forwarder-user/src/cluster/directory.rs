//! Where a room is served from: the directory a node asks when it has no publisher of
//! a room. Today's implementation is the static list of the config
//! (`[[webrtc.cascade.upstream]]`); a Redis-backed one will sit beside it, behind the
//! same trait.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `[[webrtc.cascade.upstream]]`: a room (or `"*"`, every room) comes from a node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub room: String,
    pub node: String,
    /// The upstream's `[webrtc] http` address (its node API is served there).
    pub http: SocketAddr,
}

/// Where a room's media comes from when this node has no publisher of it.
pub trait Directory: Send + Sync {
    fn upstream(&self, room: &str) -> Option<UpstreamConfig>;
}

/// The config's `[[webrtc.cascade.upstream]]` list: the room's own entry, else `"*"`.
pub struct StaticDirectory(pub Vec<UpstreamConfig>);

impl Directory for StaticDirectory {
    fn upstream(&self, room: &str) -> Option<UpstreamConfig> {
        let find = |r: &str| self.0.iter().find(|u| u.room == r).cloned();
        find(room).or_else(|| find("*"))
    }
}
