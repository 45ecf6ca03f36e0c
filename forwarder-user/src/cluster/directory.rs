//! Where a room is served from: the directory a node asks when it has no publisher of
//! a room. Today's implementation is the static list of the config
//! (`[[cluster.upstream]]`); a Redis-backed one will sit beside it, behind the same
//! trait.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `[[cluster.upstream]]`: a room (or `"*"`, every room) comes from a node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub room: String,
    pub node: String,
    /// The upstream's node API (its `[cluster] api`).
    pub api: SocketAddr,
}

/// Where a room's media comes from when this node has no publisher of it.
pub trait Directory: Send + Sync {
    fn upstream(&self, room: &str) -> Option<UpstreamConfig>;
}

/// The config's `[[cluster.upstream]]` list: the room's own entry, else `"*"`.
pub struct StaticDirectory(pub Vec<UpstreamConfig>);

impl Directory for StaticDirectory {
    fn upstream(&self, room: &str) -> Option<UpstreamConfig> {
        let find = |r: &str| self.0.iter().find(|u| u.room == r).cloned();
        find(room).or_else(|| find("*"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rooms_own_entry_wins_over_the_wildcard() {
        let u = |room: &str, node: &str| UpstreamConfig {
            room: room.into(),
            node: node.into(),
            api: "127.0.0.1:1".parse().unwrap(),
        };
        let d = StaticDirectory(vec![u("*", "any"), u("live", "origin")]);
        assert_eq!(d.upstream("live").unwrap().node, "origin");
        assert_eq!(d.upstream("other").unwrap().node, "any");
        assert!(
            StaticDirectory(vec![u("live", "o")])
                .upstream("x")
                .is_none()
        );
    }
}
