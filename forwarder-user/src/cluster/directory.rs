//! Where a room is served from: the directory a node asks when it has no publisher of
//! a room. Two implementations behind one trait: the static list of the config
//! (`[[cluster.upstream]]`), and [`Layered`], the room's own static entry, else the
//! cluster's Redis, else the static `"*"`.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
};

use serde::{Deserialize, Serialize};

/// `[[cluster.upstream]]`: a room (or `"*"`, every room) comes from a node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub room: String,
    pub node: String,
    /// The upstream's node API (its `[cluster] api`).
    pub api: SocketAddr,
    /// The origin's epoch in the cluster's directory, when it came from there: the
    /// upstream refuses a request naming a stale one.
    #[serde(skip)]
    pub epoch: Option<u64>,
}

/// An answer to come from a directory.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = Option<UpstreamConfig>> + Send + 'a>>;

/// Where a room's media comes from when this node has no publisher of it (None: from
/// nowhere else; this node is, or may become, its origin). `avoid`: nodes this one
/// suspects dead (their probes went unanswered), passed over where the directory
/// chooses (a room's tree), not where the config names them.
pub trait Directory: Send + Sync {
    fn upstream<'a>(&'a self, room: &'a str, avoid: &'a [String]) -> Lookup<'a>;
}

/// The config's `[[cluster.upstream]]` list: the room's own entry, else `"*"`.
pub struct StaticDirectory(pub Vec<UpstreamConfig>);

impl StaticDirectory {
    /// The room's own entry.
    pub fn exact(&self, room: &str) -> Option<UpstreamConfig> {
        self.0.iter().find(|u| u.room == room).cloned()
    }

    /// The room's own entry, else `"*"`.
    pub fn find(&self, room: &str) -> Option<UpstreamConfig> {
        self.exact(room).or_else(|| self.exact("*"))
    }
}

impl Directory for StaticDirectory {
    fn upstream<'a>(&'a self, room: &'a str, _avoid: &'a [String]) -> Lookup<'a> {
        let found = self.find(room);
        Box::pin(async move { found })
    }
}

/// The room's own `[[cluster.upstream]]` entry, else the cluster's Redis (the room's
/// origin when it is another live node), else the static `"*"` entry. Redis away or
/// not connected yet: the static entries alone (and a warning).
pub struct Layered {
    pub config: StaticDirectory,
    pub redis: Arc<OnceLock<super::redis::Directory>>,
    /// `[cluster] tree_degree`: children per node in a room's tree.
    pub degree: u32,
}

impl Directory for Layered {
    fn upstream<'a>(&'a self, room: &'a str, avoid: &'a [String]) -> Lookup<'a> {
        Box::pin(async move {
            if let Some(u) = self.config.exact(room) {
                return Some(u);
            }
            if let Some(d) = self.redis.get() {
                match d.upstream(room, self.degree, avoid).await {
                    Ok(Some(u)) => return Some(u),
                    // Ours, or no one's yet: no upstream.
                    Ok(None) => return None,
                    Err(e) => log::warn!("{e:#}; room {room:?} from the config's entries only"),
                }
            }
            self.config.find(room)
        })
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
            epoch: None,
        };
        let d = StaticDirectory(vec![u("*", "any"), u("live", "origin")]);
        assert_eq!(d.find("live").unwrap().node, "origin");
        assert_eq!(d.find("other").unwrap().node, "any");
        assert!(StaticDirectory(vec![u("live", "o")]).find("x").is_none());
    }
}
