//! Each cascade link as the node sees it: the link table, the daemon's state of it,
//! and its trunk traffic from the maps. One view for `edgefwd links list`, the node
//! API and /metrics.

use anyhow::Result;
use serde::Serialize;

use super::Direction;
use crate::dataplane::maps::Maps;

/// One cascade link with its state and its traffic, for `edgefwd links list`, the
/// node API and /metrics.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct LinkRow {
    pub peer: String,
    pub direction: Direction,
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub api: Option<std::net::SocketAddr>,
    /// unknown, up, down or refused.
    pub state: String,
    /// Why the link is down or refused.
    pub message: String,
    /// Seconds since the last good exchange with the peer; None: never.
    pub last_ok_secs_ago: Option<f64>,
    /// SSRCs demanded on the link.
    pub demand: u32,
    /// Trunk copies in the maps (down links).
    pub copies: u32,
    /// Down: sent on the trunk. Up: received from it.
    pub packets: u64,
    pub bytes: u64,
    /// Down: trunk copies the replicator could not send. Up links count nothing here
    /// (what arrives is counted by verdict).
    pub drops: u64,
}

pub fn state_name(s: u8) -> &'static str {
    use forwarder_common::links::*;
    match s {
        STATE_UP => "up",
        STATE_DOWN => "down",
        STATE_REFUSED => "refused",
        _ => "unknown",
    }
}

/// Every link from the maps: the link table, the daemon's state table, and the trunk
/// copies' (down) or trunk streams' (up) counters.
pub fn link_rows(maps: &Maps) -> Result<Vec<LinkRow>> {
    let states = maps.link_states()?;
    let streams = maps.streams()?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut out = Vec::new();
    for l in maps.links()? {
        let st = states.get(&l.peer).copied().unwrap_or_default();
        let (mut packets, mut bytes, mut drops) =
            (st.packets_retired, st.bytes_retired, st.drops_retired);
        for s in &streams {
            match l.direction {
                Direction::Down => {
                    for (c, cs) in &s.copies {
                        if (c.out_src, c.out_dst) == (l.local, l.remote) {
                            packets += cs.packets;
                            bytes += cs.bytes;
                            drops += cs.drops;
                        }
                    }
                }
                Direction::Up if (s.listen, s.source) == (l.local, l.remote) => {
                    packets += s.received.packets;
                    bytes += s.received.bytes;
                }
                Direction::Up => {}
            }
        }
        let end = st
            .message
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(st.message.len());
        out.push(LinkRow {
            state: state_name(st.state).into(),
            message: String::from_utf8_lossy(&st.message[..end]).into_owned(),
            last_ok_secs_ago: (st.last_ok_ms != 0)
                .then(|| now_ms.saturating_sub(st.last_ok_ms) as f64 / 1000.0),
            demand: st.demand,
            copies: st.copies,
            packets,
            bytes,
            drops,
            peer: l.peer,
            direction: l.direction,
            local: l.local,
            remote: l.remote,
            api: l.api,
        });
    }
    Ok(out)
}
