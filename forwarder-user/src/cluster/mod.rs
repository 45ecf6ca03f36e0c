//! Cascades between edgefwd nodes: one node identity, one node API, the directory of
//! which node serves which room, and the plain-RTP links (trunks) with their demand.
//!
//! Two kinds of trunk share them. WebRTC rooms are relayed over the node API's
//! `/node/v1/rooms/{room}/relay` (the webrtc module implements [`relay::RoomRelay`]
//! and asks its upstream through [`relay::ask`]); plain-RTP streams go over
//! configured `[[link]]`s, described below.
//!
//! A link joins an upstream node to a downstream one. The upstream sends the
//! downstream trunk copies: fan-out copies that keep the RTP packet as it is (SSRC,
//! sequence, payload; SRTP stays valid ciphertext), only Ethernet/IP/UDP change. It
//! sends only the SSRCs the downstream asks for: every downstream node tells its
//! upstream, over the node API and about once a second, which SSRCs it has demand for
//! (its own subscribers and its own downstream links' demand). Demand that is not
//! refreshed lapses, and with it the trunk copies: an idle or vanished branch costs
//! nothing.
//!
//! Links form a tree: a node has at most one upstream, never links to a peer in both
//! directions, and refuses a link that would close a cycle, naming it. Each upstream
//! answer carries the upstream's chain of ancestors, so a node learns the chain above
//! it and a cycle shows as a node finding itself there.
//!
//! * [`identity`] — the node's name and the keys derived from the cluster secret:
//!   signed requests, sealed key material.
//! * [`api`] — the node API on its own listener (`[cluster] api`): links' demand and
//!   rooms' relays, every request signed.
//! * [`relay`] — the room relay's side of the node API: the trait WebRTC implements,
//!   and the client a downstream node asks its upstream with.
//! * [`links`] — the sans-I/O link manager: demand in, trunk copies and our own demand
//!   out, link states for the maps.
//! * [`agent`] — the daemon's driver: the manager's plan applied to the maps.
//! * [`directory`] — where a WebRTC room is served from (the [`directory::Directory`]
//!   trait: the config's static list, and the Redis directory); WebRTC rooms across
//!   nodes ask it.
//! * [`lease`] — this node's lease in Redis, renewed once a second.
//! * [`placement`] — where a new room goes: rendezvous hashing over the live nodes,
//!   bounded by load.
//! * [`redis`] — the cluster's truth in Redis: node leases, room origins fenced by
//!   epochs.
//! * [`status`] — each link as the node sees it, for the CLI, the node API, /metrics.

pub mod agent;
pub mod api;
pub mod directory;
pub mod identity;
pub mod lease;
pub mod links;
pub mod placement;
pub mod redis;
pub mod relay;
pub mod status;
pub mod tree;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

pub use crate::dataplane::links::{Direction, Link, check_name};

/// The cluster secret from `[cluster]`: `secret_file` (trimmed) or `secret`, at least
/// 16 bytes.
pub fn read_secret(
    secret: &Option<String>,
    file: &Option<PathBuf>,
    section: &str,
) -> Result<String> {
    let s = match (secret, file) {
        (Some(_), Some(_)) => bail!("{section}: set secret or secret_file, not both"),
        (Some(s), None) => s.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("{section} secret_file {}: cannot read it", f.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!(
            "{section} needs the cluster secret (secret_file = \"/etc/edgefwd/cluster.secret\", \
             the same on every node): nodes refuse requests without it"
        ),
    };
    if s.len() < 16 {
        bail!(
            "{section}: the cluster secret is {} bytes; use at least 16 (e.g. `openssl rand -hex 32`)",
            s.len()
        );
    }
    Ok(s)
}

/// Longest cascade (nodes from the origin to the farthest leaf) a node accepts.
pub const MAX_DEPTH: usize = 32;

/// `[cluster]`: this node among the others, for both kinds of trunk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name; its peers' `[[link]] peer` and `[[cluster.upstream]] node`
    /// name it.
    pub node: String,
    /// Where the node API listens: downstream nodes send their links' demand and ask
    /// for rooms here. Bind a private address; absent, this node serves no other.
    pub api: Option<SocketAddr>,
    /// The cluster secret, shared by every node of the cascade. Prefer `secret_file`.
    pub secret: Option<String>,
    /// A file holding the cluster secret (surrounding whitespace ignored).
    pub secret_file: Option<PathBuf>,
    /// Seconds a downstream's demand (or room relay) lasts without a refresh
    /// (default 5).
    #[serde(default = "default_lapse")]
    pub lapse: u64,
    /// Rooms new to this node asked of upstreams per second, at most (default 20):
    /// each anonymous WHEP for an unknown room would otherwise cost an upstream call.
    #[serde(default = "default_new_rooms")]
    pub new_rooms_per_second: u32,
    /// `[[cluster.upstream]]`: which node serves which WebRTC room.
    #[serde(default)]
    pub upstream: Vec<directory::UpstreamConfig>,
    /// The cluster's Redis (`redis://host:port/`): node leases and the room directory,
    /// so any node takes any join. Absent: rooms come from `[[cluster.upstream]]` only.
    pub redis_url: Option<String>,
    /// This node's region, announced in its lease.
    #[serde(default)]
    pub region: String,
    /// New rooms placed on one node per second, at most (default 50): past it, a room
    /// goes to the next node of its order (a burst of new rooms would otherwise land
    /// on one node between two load reports).
    #[serde(default = "default_placements")]
    pub placements_per_second: u32,
    /// WHEP viewers this node takes (absent: its session limits): past it, new viewers
    /// are sent to other nodes (`307`, and `/v1/edges` leaves it out), which carry the
    /// room in its tree.
    pub capacity: Option<u64>,
    /// Children per node in a room's tree of nodes, at most (default 8).
    #[serde(default = "default_degree")]
    pub tree_degree: u32,
}

fn default_degree() -> u32 {
    8
}

fn default_placements() -> u32 {
    50
}

/// This node in the cluster, as every part that serves it shares it.
#[derive(Clone)]
pub struct Membership {
    pub identity: Arc<identity::Identity>,
    pub cfg: ClusterConfig,
    /// The cluster's Redis, once connected (the lease task connects and keeps it);
    /// empty without `redis_url` or while Redis has not answered yet.
    pub redis: Arc<OnceLock<redis::Directory>>,
    /// What the lease task saw last, for /metrics.
    pub health: Arc<Health>,
}

/// The cluster as this node's lease task last saw it.
#[derive(Default)]
pub struct Health {
    /// The last lease renewal reached Redis.
    pub redis_up: std::sync::atomic::AtomicBool,
    /// Live nodes (leases) at the last count.
    pub live_nodes: std::sync::atomic::AtomicU64,
}

fn default_lapse() -> u64 {
    5
}

fn default_new_rooms() -> u32 {
    20
}

impl ClusterConfig {
    /// What holds within the section: names, secret, timings, upstreams. (Links are
    /// checked with the listeners they need, in the daemon's config.)
    pub fn check(&self) -> Result<()> {
        check_name(&self.node).context("[cluster] node")?;
        read_secret(&self.secret, &self.secret_file, "[cluster]")?;
        if self.lapse == 0 {
            bail!("[cluster] lapse = 0: demand must last at least a second (default 5)");
        }
        if self.new_rooms_per_second == 0 {
            bail!(
                "[cluster] new_rooms_per_second = 0 would never ask an upstream for a room; \
                 give at least 1 (default 20)"
            );
        }
        if self.placements_per_second == 0 {
            bail!(
                "[cluster] placements_per_second = 0 would place no room anywhere; give at \
                 least 1 (default 50)"
            );
        }
        if self.tree_degree == 0 {
            bail!(
                "[cluster] tree_degree = 0 would let no node relay a room to another; give at least 1 (default 8)"
            );
        }
        if self.capacity == Some(0) {
            bail!("[cluster] capacity = 0 would send every viewer away; leave it out for no bound");
        }
        if self.redis_url.is_some() && self.api.is_none() {
            bail!(
                "[cluster] redis_url needs api: the other nodes ask this one for its rooms \
                 at its node API (e.g. api = \"198.51.100.7:7000\", a private address)"
            );
        }
        for u in &self.upstream {
            check_name(&u.node)
                .with_context(|| format!("[[cluster.upstream]] room {:?} node", u.room))?;
            if u.node == self.node {
                bail!(
                    "[[cluster.upstream]] room {:?}: the upstream is this node ({}) itself",
                    u.room,
                    u.node
                );
            }
        }
        Ok(())
    }

    /// This node's identity: its name and the keys from the secret.
    pub fn identity(&self) -> Result<identity::Identity> {
        identity::Identity::new(
            &self.node,
            &read_secret(&self.secret, &self.secret_file, "[cluster]")?,
        )
    }
}

/// `[[stream]]`: a stream this node receives and offers on its down links even with
/// no local subscriber (an origin's publishers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub listen: SocketAddr,
    pub source: SocketAddr,
    pub ssrc: u32,
}

/// Rejects a set of links that would not be a tree node, naming what to fix: a link
/// to ourselves, two links to one peer (both directions is a cycle of two), more
/// than one upstream.
pub fn check_links(node: &str, links: &[Link]) -> Result<()> {
    let mut seen: BTreeMap<&str, Direction> = BTreeMap::new();
    for l in links {
        l.check()?;
        if l.peer == node {
            bail!(
                "link {}: that is this node's own name; a node does not link to itself",
                l.peer
            );
        }
        if let Some(d) = seen.insert(&l.peer, l.direction) {
            if d != l.direction {
                let (up, down) = (node, l.peer.as_str());
                bail!(
                    "links to {down} in both directions form a cycle: {up} -> {down} -> {up}; \
                     a trunk tree has one direction per link (keep one)"
                );
            }
            bail!("two links to {}: keep one", l.peer);
        }
    }
    let ups: Vec<&str> = links
        .iter()
        .filter(|l| l.direction == Direction::Up)
        .map(|l| l.peer.as_str())
        .collect();
    if ups.len() > 1 {
        bail!(
            "{node} has {} up links ({}): in a trunk tree a node has one upstream, or a \
             stream could arrive twice; keep one",
            ups.len(),
            ups.join(", ")
        );
    }
    Ok(())
}

/// Checks the links of several nodes' configs together (`edgefwd check-config a.toml
/// b.toml ...`): both ends of every link agree, and the links form a tree. A cycle is
/// refused with its nodes in feed order.
pub fn check_topology(nodes: &[(String, Vec<Link>)]) -> Result<()> {
    let mut names = BTreeSet::new();
    for (n, links) in nodes {
        if !names.insert(n.as_str()) {
            bail!("two configs name their node {n}: node names must be unique");
        }
        check_links(n, links).with_context(|| format!("node {n}"))?;
    }
    // Feeding edges, upstream -> downstream, from both ends' views.
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    for (n, links) in nodes {
        for l in links {
            let (up, down) = match l.direction {
                Direction::Up => (l.peer.as_str(), n.as_str()),
                Direction::Down => (n.as_str(), l.peer.as_str()),
            };
            if let Some(p) = parent.insert(down, up)
                && p != up
            {
                bail!(
                    "{down} is fed by both {p} and {up}: in a trunk tree a node has one upstream"
                );
            }
            // The other end, if its config is in the set, must have the mirror entry.
            let other = if l.direction == Direction::Up {
                up
            } else {
                down
            };
            if let Some((_, theirs)) = nodes.iter().find(|(m, _)| m == other) {
                let want = match l.direction {
                    Direction::Up => Direction::Down,
                    Direction::Down => Direction::Up,
                };
                match theirs.iter().find(|t| t.peer == *n) {
                    Some(t)
                        if t.direction == want && (t.local, t.remote) == (l.remote, l.local) => {}
                    Some(t) if t.direction == want => bail!(
                        "link {up} -> {down}: {n} has local {} remote {}, {other} has local {} \
                         remote {}; one side's local is the other's remote",
                        l.local,
                        l.remote,
                        t.local,
                        t.remote
                    ),
                    _ => bail!(
                        "link {up} -> {down}: {n} has it, {other} has no `{}` link to {n}; add it \
                         there",
                        format!("{want:?}").to_lowercase()
                    ),
                }
            }
        }
    }
    for start in parent.keys() {
        let mut chain = vec![*start];
        let mut at = *start;
        while let Some(p) = parent.get(at) {
            if let Some(i) = chain.iter().position(|c| c == p) {
                // chain is downstream-first: reverse for feed order.
                let mut cycle: Vec<&str> = chain[i..].iter().rev().copied().collect();
                cycle.push(cycle[0]);
                bail!("the links form a cycle: {}", cycle.join(" -> "));
            }
            chain.push(p);
            at = p;
        }
    }
    Ok(())
}

/// The cycle a node would close by taking demand from (or feeding) `peer`, given the
/// chain above it (parent first): Some(feed-order names) if `peer` is in that chain.
pub fn cycle_through(node: &str, ancestors: &[String], peer: &str) -> Option<String> {
    let i = ancestors.iter().position(|a| a == peer)?;
    let mut names: Vec<&str> = ancestors[..=i].iter().rev().map(String::as_str).collect();
    names.push(node);
    names.push(peer);
    Some(names.join(" -> "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(peer: &str, d: Direction, local: &str, remote: &str) -> Link {
        Link {
            peer: peer.into(),
            direction: d,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            api: (d == Direction::Up).then(|| "192.0.2.1:7000".parse().unwrap()),
        }
    }

    #[test]
    fn a_node_refuses_what_is_not_a_tree() {
        let a = link("b", Direction::Down, "192.0.2.1:5004", "192.0.2.2:5004");
        check_links("a", std::slice::from_ref(&a)).unwrap();
        let back = link("b", Direction::Up, "192.0.2.1:5004", "192.0.2.2:5004");
        let e = check_links("a", &[a.clone(), back])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cycle: a -> b -> a"), "{e}");
        let e = check_links(
            "a",
            &[link("a", Direction::Down, "192.0.2.1:1", "192.0.2.2:1")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("own name"), "{e}");
        let two_ups = [
            link("x", Direction::Up, "192.0.2.1:1", "192.0.2.2:1"),
            link("y", Direction::Up, "192.0.2.1:2", "192.0.2.3:1"),
        ];
        let e = check_links("a", &two_ups).unwrap_err().to_string();
        assert!(e.contains("2 up links (x, y)"), "{e}");
        let mut no_api = link("x", Direction::Up, "192.0.2.1:1", "192.0.2.2:1");
        no_api.api = None;
        assert!(
            no_api
                .check()
                .unwrap_err()
                .to_string()
                .contains("needs `api`")
        );
        assert!(check_name("relay 1").is_err());
        assert!(check_name(&"x".repeat(33)).is_err());
        check_name("relay-1.eu_west").unwrap();
    }

    #[test]
    fn a_set_of_configs_is_checked_as_one_tree_and_a_cycle_is_named() {
        let ab = link("b", Direction::Down, "192.0.2.17:5004", "192.0.2.18:5004");
        let ba = link("a", Direction::Up, "192.0.2.18:5004", "192.0.2.17:5004");
        let bc = link("c", Direction::Down, "192.0.2.33:5004", "192.0.2.34:5004");
        let cb = link("b", Direction::Up, "192.0.2.34:5004", "192.0.2.33:5004");
        let tree = vec![
            ("a".to_string(), vec![ab.clone()]),
            ("b".to_string(), vec![ba.clone(), bc.clone()]),
            ("c".to_string(), vec![cb.clone()]),
        ];
        check_topology(&tree).unwrap();
        // c feeds a: a -> b -> c -> a.
        let ca = link("a", Direction::Down, "192.0.2.49:5004", "192.0.2.50:5004");
        let ac = link("c", Direction::Up, "192.0.2.50:5004", "192.0.2.49:5004");
        let cyclic = vec![
            ("a".to_string(), vec![ab.clone(), ac]),
            ("b".to_string(), vec![ba.clone(), bc.clone()]),
            ("c".to_string(), vec![cb.clone(), ca]),
        ];
        let e = format!("{:#}", check_topology(&cyclic).unwrap_err());
        assert!(
            ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]
                .iter()
                .any(|c| e.contains(c)),
            "{e}"
        );
        // The two ends disagree on the addresses.
        let mut wrong = ba.clone();
        wrong.remote = "192.0.2.25:5004".parse().unwrap();
        let e = check_topology(&[
            ("a".to_string(), vec![ab.clone()]),
            ("b".to_string(), vec![wrong]),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("one side's local is the other's remote"), "{e}");
        // One end only.
        let e = check_topology(&[("a".to_string(), vec![ab]), ("b".to_string(), vec![])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("b has no `up` link to a"), "{e}");
    }

    #[test]
    fn a_cycle_through_the_ancestors_is_named_in_feed_order() {
        // c's parent is b, b's parent is a; a asking c for demand closes a -> b -> c -> a.
        let anc = vec!["b".to_string(), "a".to_string()];
        assert_eq!(
            cycle_through("c", &anc, "a").as_deref(),
            Some("a -> b -> c -> a")
        );
        assert_eq!(cycle_through("c", &anc, "d"), None);
    }
}
