//! The cascade links in the maps (`EFWD_LINKS_V1`, `EFWD_LINK_STATES_V1`): each link
//! to a neighbour node, its direction and addresses, and the daemon's view of its
//! state, beside the forwarding maps so the daemon, the CLI and /metrics see the same
//! links. What a link is and how it keys the maps lives here; whether a node's links
//! form a tree is the cluster's to check before it writes them.

use std::net::SocketAddr;

use anyhow::{Context as _, Result, bail};
use forwarder_common::links::{self, DIR_DOWN, DIR_UP, LinkKey, LinkState, LinkValue, NAME_LEN};
use serde::{Deserialize, Serialize};

use forwarder_common::routes::RouteKey;

use super::maps::{Maps, addr16, full_or, sock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The peer feeds us.
    Up,
    /// We feed the peer.
    Down,
}

/// One link, as configs and the CLI speak of it. The two nodes' entries for one link
/// carry the same two media addresses, swapped.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The peer node's name.
    pub peer: String,
    pub direction: Direction,
    /// Up: our listener the trunk arrives at. Down: the address trunk copies leave from.
    pub local: SocketAddr,
    /// Up: the address the upstream's trunk copies leave from. Down: the downstream's
    /// listener.
    pub remote: SocketAddr,
    /// Up links: the upstream's node API.
    pub api: Option<SocketAddr>,
}

/// A node name is what keys the maps and the node API's paths: 1-32 bytes of letters,
/// digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        // Shown cut short: a name is attacker-controlled on the node API.
        let shown: String = name.chars().take(40).collect();
        let more = if shown.len() < name.len() { "…" } else { "" };
        bail!(
            "node name {shown:?}{more} ({} bytes): use 1-{NAME_LEN} letters, digits, '-', '_' or '.'",
            name.len()
        );
    }
    Ok(())
}

impl Link {
    /// Rejects a link that cannot work on its own, saying what to change.
    pub fn check(&self) -> Result<()> {
        check_name(&self.peer)?;
        if self.local.is_ipv6() != self.remote.is_ipv6() {
            bail!(
                "link {}: local {} and remote {} are of different IP families",
                self.peer,
                self.local,
                self.remote
            );
        }
        match (self.direction, self.api) {
            (Direction::Up, None) => bail!(
                "link {}: an up link needs `api`, the upstream's node API address (its \
                 [cluster] api), where this node sends its demand",
                self.peer
            ),
            (Direction::Down, Some(_)) => bail!(
                "link {}: `api` is for up links; a down link's peer calls us (drop it)",
                self.peer
            ),
            _ => {}
        }
        Ok(())
    }
}

fn link_key(peer: &str) -> Result<LinkKey> {
    check_name(peer)?;
    let mut k = LinkKey::default();
    k.name[..peer.len()].copy_from_slice(peer.as_bytes());
    Ok(k)
}

fn link_name(k: &LinkKey) -> String {
    let end = k.name.iter().position(|b| *b == 0).unwrap_or(k.name.len());
    String::from_utf8_lossy(&k.name[..end]).into_owned()
}

impl Link {
    fn value(&self) -> LinkValue {
        let api = self.api.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        LinkValue {
            local_addr: addr16(self.local.ip()),
            remote_addr: addr16(self.remote.ip()),
            api_addr: addr16(api.ip()),
            local_port_be: self.local.port().to_be_bytes(),
            remote_port_be: self.remote.port().to_be_bytes(),
            api_port_be: api.port().to_be_bytes(),
            direction: match self.direction {
                Direction::Up => DIR_UP,
                Direction::Down => DIR_DOWN,
            },
            _pad: 0,
        }
    }

    fn from_map(k: &LinkKey, v: &LinkValue) -> Link {
        let up = v.direction == DIR_UP;
        Link {
            peer: link_name(k),
            direction: if up { Direction::Up } else { Direction::Down },
            local: sock(v.local_addr, v.local_port_be),
            remote: sock(v.remote_addr, v.remote_port_be),
            api: up.then(|| sock(v.api_addr, v.api_port_be)),
        }
    }
}

/// The cascade links (`EFWD_LINKS_V1`) and their states: userspace state beside the
/// forwarding maps, so the daemon, the CLI and /metrics see the same links.
impl Maps {
    pub fn links(&self) -> Result<Vec<Link>> {
        let mut out = Vec::new();
        for item in self.links.iter() {
            let (k, v) = item?;
            out.push(Link::from_map(&k, &v));
        }
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(out)
    }

    /// Adds a link, or replaces the one to the same peer (the caller checked that the
    /// links still form a tree: `cluster::check_links`).
    pub fn put_link(&mut self, l: &Link) -> Result<()> {
        l.check()?;
        if let Some(old) = self.links()?.into_iter().find(|o| o.peer == l.peer)
            && old != *l
        {
            self.drop_trunks(&old)?;
        }
        self.links
            .insert(link_key(&l.peer)?, l.value(), 0)
            .map_err(|e| full_or(e, "links", links::MAX_LINKS))
            .with_context(|| format!("adding link {}", l.peer))
    }

    /// Removes the link to `peer` with its state and its trunk copies: after this
    /// returns, the peer gets nothing more from us. False if there was none.
    pub fn del_link(&mut self, peer: &str) -> Result<bool> {
        let Some(l) = self.links()?.into_iter().find(|o| o.peer == peer) else {
            return Ok(false);
        };
        let k = link_key(peer)?;
        let _ = self.links.remove(&k);
        let _ = self.link_states.remove(&k);
        self.drop_trunks(&l)?;
        Ok(true)
    }

    /// Makes the link table hold exactly `want` (a starting daemon's config, whose
    /// links were checked to form a tree when it was loaded).
    pub fn reconcile_links(&mut self, want: &[Link]) -> Result<()> {
        for l in self.links()? {
            if !want.contains(&l) {
                self.del_link(&l.peer)?;
            }
        }
        for l in want {
            self.links
                .insert(link_key(&l.peer)?, l.value(), 0)
                .map_err(|e| full_or(e, "links", links::MAX_LINKS))
                .with_context(|| format!("adding link {}", l.peer))?;
        }
        Ok(())
    }

    /// The trunk copies of a down link: copies leaving from its local address to its
    /// remote, as (stream key, out_dst).
    pub fn trunks_of(&self, l: &Link) -> Result<Vec<(RouteKey, SocketAddr)>> {
        if l.direction != Direction::Down {
            return Ok(Vec::new());
        }
        Ok(self
            .routes()?
            .into_iter()
            .filter(|(r, _)| (r.out_src, r.out_dst) == (l.local, l.remote))
            .map(|(r, _)| (r.key(), r.out_dst))
            .collect())
    }

    fn drop_trunks(&mut self, l: &Link) -> Result<()> {
        for (k, dst) in self.trunks_of(l)? {
            self.del_copy(&k, dst)?;
        }
        Ok(())
    }

    pub fn link_states(&self) -> Result<std::collections::BTreeMap<String, LinkState>> {
        let mut out = std::collections::BTreeMap::new();
        for item in self.link_states.iter() {
            let (k, v) = item?;
            out.insert(link_name(&k), v);
        }
        Ok(out)
    }

    /// The daemon's view of a link (only for a link the table has).
    pub fn set_link_state(&mut self, peer: &str, st: &LinkState) -> Result<()> {
        let k = link_key(peer)?;
        if self.links.get(&k, 0).is_err() {
            return Ok(());
        }
        self.link_states
            .insert(k, *st, 0)
            .with_context(|| format!("writing the state of link {peer}"))
    }
}
