//! Which session a datagram on the media port belongs to. One table type, used by
//! each engine (to find the session) and by the AF_XDP workers' router (to find the
//! engine shard that owns it), both fed from the same commands.

use std::{collections::HashMap, net::SocketAddr};

use forwarder_common::rtp;

use super::engine::{Command, SessionId};

#[derive(Default)]
pub struct Demux {
    /// A browser's address is its session.
    by_addr: HashMap<SocketAddr, SessionId>,
    /// Cascade peers: (address, SSRC) → session, for addresses many sessions share.
    by_relay: HashMap<(SocketAddr, u32), SessionId>,
    /// What each session bound, so a leave touches only its own entries (not a scan
    /// of every session's while an engine is locked).
    bound: HashMap<SessionId, Vec<(SocketAddr, Option<u32>)>>,
}

impl Demux {
    /// The session of a datagram from `from`: one lookup for most packets. Only an
    /// address not bound that way may be a cascade peer, whose datagrams name their
    /// session by SSRC (cleartext in SRTP and SRTCP: RTP bytes 8..12, RTCP 4..8).
    pub fn lookup(&self, from: SocketAddr, pkt: &[u8]) -> Option<SessionId> {
        if let Some(id) = self.by_addr.get(&from) {
            return Some(*id);
        }
        let is_rtcp = pkt.len() >= 2 && rtp::classify(pkt[0], pkt[1]) == rtp::Class::Rtcp;
        let at = if is_rtcp { 4 } else { 8 };
        let ssrc = u32::from_be_bytes(pkt.get(at..at + 4)?.try_into().ok()?);
        self.by_relay.get(&(from, ssrc)).copied()
    }

    pub fn bind(&mut self, addr: SocketAddr, id: SessionId) {
        self.by_addr.insert(addr, id);
        self.note(id, (addr, None));
    }

    pub fn bind_relay(&mut self, addr: SocketAddr, ssrcs: &[u32], id: SessionId) {
        for ssrc in ssrcs {
            self.by_relay.insert((addr, *ssrc), id);
            self.note(id, (addr, Some(*ssrc)));
        }
    }

    fn note(&mut self, id: SessionId, key: (SocketAddr, Option<u32>)) {
        let keys = self.bound.entry(id).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }

    /// Forgets every binding of `id`; an address rebound to another session since
    /// stays that session's.
    pub fn remove(&mut self, id: SessionId) {
        for (addr, ssrc) in self.bound.remove(&id).unwrap_or_default() {
            match ssrc {
                None if self.by_addr.get(&addr) == Some(&id) => {
                    self.by_addr.remove(&addr);
                }
                Some(ssrc) if self.by_relay.get(&(addr, ssrc)) == Some(&id) => {
                    self.by_relay.remove(&(addr, ssrc));
                }
                _ => {}
            }
        }
    }

    /// Whether a command makes or ends bindings (the others leave the table alone).
    pub fn binds(cmd: &Command) -> bool {
        matches!(
            cmd,
            Command::Bind { .. } | Command::BindRelay { .. } | Command::RemoveSession { .. }
        )
    }

    /// The bindings a command makes or ends (the router's copy of the engines'
    /// tables is made by this, from the commands the engines get).
    pub fn apply(&mut self, cmd: &Command) {
        match cmd {
            Command::Bind { id, addr, .. } => self.bind(*addr, *id),
            Command::BindRelay { id, addr, ssrcs } => self.bind_relay(*addr, ssrcs, *id),
            Command::RemoveSession { id } => self.remove(*id),
            _ => {}
        }
    }

    pub fn len(&self) -> usize {
        self.by_addr.len() + self.by_relay.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_first_then_a_cascade_peers_ssrc_and_removal_keeps_rebinds() {
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let trunk: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        let mut d = Demux::default();
        d.bind(a, 1);
        d.bind_relay(trunk, &[0x1111, 0x2222], 2);
        d.bind_relay(trunk, &[0x3333], 3);
        let mut rtp = [0x80u8, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0x22, 0x22, 0xaa];
        assert_eq!(d.lookup(a, &rtp), Some(1));
        assert_eq!(d.lookup(trunk, &rtp), Some(2));
        // RTCP names its sender at bytes 4..8 (a receiver report, PT 201).
        let rtcp = [0x80u8, 201, 0, 1, 0, 0, 0x33, 0x33];
        assert_eq!(d.lookup(trunk, &rtcp), Some(3));
        rtp[10] = 0x99;
        assert_eq!(d.lookup(trunk, &rtp), None, "an SSRC nobody bound");
        assert_eq!(d.lookup(trunk, &rtp[..6]), None, "too short to name one");
        // The address moved to session 4 before 1 ended: it stays 4's.
        d.apply(&Command::Bind {
            id: 4,
            addr: a,
            nominated: true,
        });
        d.apply(&Command::RemoveSession { id: 1 });
        d.apply(&Command::RemoveSession { id: 2 });
        assert_eq!(d.lookup(a, &rtp), Some(4));
        rtp[10] = 0x22;
        assert_eq!(d.lookup(trunk, &rtp), None);
        assert_eq!(d.len(), 2);
        assert!(!d.bound.contains_key(&1) && !d.bound.contains_key(&2));
        d.apply(&Command::RemoveSession { id: 4 });
        d.apply(&Command::RemoveSession { id: 3 });
        assert!(d.is_empty() && d.bound.is_empty());
    }
}
