//! `EFWD_PEERS_V1`: the WebRTC peers ICE bound, which XDP steers to the AF_XDP
//! workers; the control plane binds and unbinds them as sessions come and go.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use forwarder_common::{
    peers::{self, PeerValue},
    sources::SourceKey,
};

use super::{addr16, full_or, sock};

/// `EFWD_PEERS_V1`: the WebRTC 5-tuples ICE bound, which XDP steers to the workers.
pub struct PeerTable(pub(super) HashMap<MapData, SourceKey, PeerValue>);

impl PeerTable {
    fn key(listen: SocketAddr, peer: SocketAddr) -> SourceKey {
        SourceKey {
            listen_addr: addr16(listen.ip()),
            src_addr: addr16(peer.ip()),
            listen_port_be: listen.port().to_be_bytes(),
            src_port_be: peer.port().to_be_bytes(),
        }
    }

    /// SRTP from `peer` to our `listen` address is session `session`'s from now on.
    pub fn bind(&mut self, listen: SocketAddr, peer: SocketAddr, session: u32) -> Result<()> {
        self.0
            .insert(Self::key(listen, peer), PeerValue { session }, 0)
            .map_err(|e| full_or(e, "WebRTC peers", peers::MAX_PEERS))
            .with_context(|| format!("binding WebRTC peer {peer}"))
    }

    pub fn unbind(&mut self, listen: SocketAddr, peer: SocketAddr) {
        // Absent already is fine: the goal is that it is gone.
        let _ = self.0.remove(&Self::key(listen, peer));
    }

    /// (our address, peer, session) of every bound peer.
    pub fn list(&self) -> Result<Vec<(SocketAddr, SocketAddr, u32)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            out.push((
                sock(k.listen_addr, k.listen_port_be),
                sock(k.src_addr, k.src_port_be),
                v.session,
            ));
        }
        out.sort();
        Ok(out)
    }

    /// Empties the table: a starting daemon has no sessions (they do not survive a
    /// restart yet), so bindings left by an earlier one are stale.
    pub fn clear(&mut self) -> Result<usize> {
        let keys: Vec<SourceKey> = self.0.keys().collect::<Result<_, _>>()?;
        for k in &keys {
            let _ = self.0.remove(k);
        }
        Ok(keys.len())
    }
}
