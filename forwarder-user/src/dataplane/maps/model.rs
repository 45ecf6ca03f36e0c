//! What a forwarded stream and a listener are, as people and configs speak of them,
//! and their map keys and values: the model the map writer stores.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{Result, bail};
use forwarder_common::{
    addr::{as_v4, v4_mapped},
    fanout::MAX_COPIES,
    listeners::{
        FLAG_DROP_NO_ROUTE, FLAG_DROP_UNKNOWN_SOURCE, FLAG_WEBRTC, ListenerKey, ListenerValue,
    },
    route_stats::RouteStats,
    routes::{FLAG_IPV6, FLAG_REWRITE_PT, FLAG_VLAN, RouteKey, RouteValue},
    sources::SourceKey,
};
use serde::Serialize;

/// What [`Maps::move_copy`] did.
#[derive(Debug)]
pub struct Moved {
    /// The copy as it now is, in the target stream.
    pub route: Route,
    /// The last (sequence, timestamp) its receiver got before the move, which the
    /// target stream's numbering continues from; None when either stream had no
    /// packet yet (the copy then keeps its offsets).
    pub continued_from: Option<(u16, u32)>,
}

/// One forwarded stream, as people and configs speak of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Our address:port the publisher sends to.
    pub listen: SocketAddr,
    /// The publisher's address:port.
    pub source: SocketAddr,
    pub ssrc: u32,
    /// Address:port the copy is sent from.
    pub out_src: SocketAddr,
    /// Address:port the copy is sent to.
    pub out_dst: SocketAddr,
    /// 0: back out of the ingress interface (XDP_TX).
    pub egress_ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub ssrc_out: u32,
    pub seq_delta: u16,
    pub ts_delta: u32,
    /// Payload type `from` is rewritten to `to`.
    pub pt_remap: Option<(u8, u8)>,
    /// 802.1Q VLAN id of the egress frame; None: untagged.
    pub vlan: Option<u16>,
}

pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ip_from16(a: [u8; 16]) -> IpAddr {
    match as_v4(&a) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(a)),
    }
}

pub(crate) fn sock(a: [u8; 16], port_be: [u8; 2]) -> SocketAddr {
    SocketAddr::new(ip_from16(a), u16::from_be_bytes(port_be))
}

/// Streams in first-seen order, each with its copies: routes sharing (listen, source,
/// SSRC) are the copies of one stream.
pub fn group_streams(routes: &[Route]) -> Vec<(RouteKey, Vec<Route>)> {
    let mut index: std::collections::HashMap<RouteKey, usize> = Default::default();
    let mut streams: Vec<(RouteKey, Vec<Route>)> = Vec::new();
    for r in routes {
        let k = r.key();
        match index.get(&k) {
            Some(i) => streams[*i].1.push(r.clone()),
            None => {
                index.insert(k, streams.len());
                streams.push((k, vec![r.clone()]));
            }
        }
    }
    streams
}

impl Route {
    /// The key of the stream (listen, source, SSRC) a route is a copy of.
    pub fn key_of(listen: SocketAddr, source: SocketAddr, ssrc: u32) -> RouteKey {
        RouteKey {
            listen_addr: addr16(listen.ip()),
            src_addr: addr16(source.ip()),
            listen_port_be: listen.port().to_be_bytes(),
            src_port_be: source.port().to_be_bytes(),
            ssrc_be: ssrc.to_be_bytes(),
        }
    }

    pub fn key(&self) -> RouteKey {
        Route::key_of(self.listen, self.source, self.ssrc)
    }

    pub fn source_key(&self) -> SourceKey {
        let k = self.key();
        SourceKey {
            listen_addr: k.listen_addr,
            src_addr: k.src_addr,
            listen_port_be: k.listen_port_be,
            src_port_be: k.src_port_be,
        }
    }

    pub fn value(&self, stats_slot: u32) -> RouteValue {
        let mut flags = 0;
        if self.out_dst.is_ipv6() {
            flags |= FLAG_IPV6;
        }
        if self.vlan.is_some() {
            flags |= FLAG_VLAN;
        }
        let (pt_from, pt_to) = match self.pt_remap {
            Some((f, t)) => {
                flags |= FLAG_REWRITE_PT;
                (f, t)
            }
            None => (0, 0),
        };
        RouteValue {
            dst_mac: self.dst_mac,
            src_mac: self.src_mac,
            out_src_addr: addr16(self.out_src.ip()),
            out_dst_addr: addr16(self.out_dst.ip()),
            out_src_port_be: self.out_src.port().to_be_bytes(),
            out_dst_port_be: self.out_dst.port().to_be_bytes(),
            egress_ifindex: self.egress_ifindex,
            ssrc_out_be: self.ssrc_out.to_be_bytes(),
            ts_delta: self.ts_delta,
            seq_delta: self.seq_delta,
            pt_from,
            pt_to,
            stats_slot,
            flags,
            vlan_tci_be: self.vlan.unwrap_or(0).to_be_bytes(),
            _pad: [0; 2],
            fanout_first: 0,
            fanout_count: 0,
        }
    }

    pub fn from_map(k: &RouteKey, v: &RouteValue) -> Route {
        Route {
            listen: sock(k.listen_addr, k.listen_port_be),
            source: sock(k.src_addr, k.src_port_be),
            ssrc: u32::from_be_bytes(k.ssrc_be),
            out_src: sock(v.out_src_addr, v.out_src_port_be),
            out_dst: sock(v.out_dst_addr, v.out_dst_port_be),
            egress_ifindex: v.egress_ifindex,
            src_mac: v.src_mac,
            dst_mac: v.dst_mac,
            ssrc_out: u32::from_be_bytes(v.ssrc_out_be),
            seq_delta: v.seq_delta,
            ts_delta: v.ts_delta,
            pt_remap: (v.flags & FLAG_REWRITE_PT != 0).then_some((v.pt_from, v.pt_to)),
            vlan: (v.flags & FLAG_VLAN != 0).then_some(u16::from_be_bytes(v.vlan_tci_be) & 0x0fff),
        }
    }

    /// Rejects what the data plane cannot do, saying what to change.
    pub fn validate(&self) -> Result<()> {
        if self.listen.is_ipv6() != self.source.is_ipv6() {
            bail!(
                "route {}: listen {} and source {} are of different IP families",
                self.ssrc,
                self.listen,
                self.source
            );
        }
        if self.out_src.is_ipv6() != self.out_dst.is_ipv6() {
            bail!(
                "route {}: out_src {} and out_dst {} are of different IP families",
                self.ssrc,
                self.out_src,
                self.out_dst
            );
        }
        if self.listen.is_ipv6() != self.out_dst.is_ipv6() {
            bail!(
                "route {}: input is {} but output is {}; the header is rewritten in place, so \
                 both sides must be the same IP family",
                self.ssrc,
                if self.listen.is_ipv6() {
                    "IPv6"
                } else {
                    "IPv4"
                },
                if self.out_dst.is_ipv6() {
                    "IPv6"
                } else {
                    "IPv4"
                }
            );
        }
        if let Some(v) = self.vlan
            && !(1..=4094).contains(&v)
        {
            bail!("route {}: VLAN id {v} is outside 1-4094", self.ssrc);
        }
        if let Some((f, t)) = self.pt_remap
            && (f > 127 || t > 127 || (64..=95).contains(&t))
        {
            bail!(
                "route {}: payload types are 0-127 and 64-95 would be taken for RTCP (RFC \
                 5761); got {f} -> {t}",
                self.ssrc
            );
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub addr: SocketAddr,
    pub drop_unknown_source: bool,
    pub drop_no_route: bool,
    /// The WebRTC media port: SRTP of bound peers to the AF_XDP workers.
    pub webrtc: bool,
}

impl Listener {
    pub fn key(&self) -> ListenerKey {
        ListenerKey {
            addr: addr16(self.addr.ip()),
            port_be: self.addr.port().to_be_bytes(),
            _pad: [0; 2],
        }
    }

    pub fn value(&self) -> ListenerValue {
        let mut flags = 0;
        if self.drop_unknown_source {
            flags |= FLAG_DROP_UNKNOWN_SOURCE;
        }
        if self.drop_no_route {
            flags |= FLAG_DROP_NO_ROUTE;
        }
        if self.webrtc {
            flags |= FLAG_WEBRTC;
        }
        ListenerValue { flags }
    }
}

/// A stream (what arrives: listen, source, SSRC) and its copies.
#[derive(Clone, Debug)]
pub struct Stream {
    pub listen: SocketAddr,
    pub source: SocketAddr,
    pub ssrc: u32,
    /// Packets the stream received (with one copy: that copy's counters).
    pub received: RouteStats,
    /// Replicated by the TC program (more than one copy).
    pub fanout: bool,
    pub copies: Vec<(Route, RouteStats)>,
}

/// What [`Maps::reconcile`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub added: usize,
    pub kept: usize,
    pub removed: usize,
    pub listeners_removed: usize,
}

/// Rejects a stream's copies the data plane cannot send together, saying what to
/// change (each copy is checked on its own by [`Route::validate`]). Pure: `edgefwd
/// check-config` uses it without maps.
pub fn check_stream(copies: &[Route]) -> Result<()> {
    for r in copies {
        r.validate()?;
    }
    let Some(first) = copies.first() else {
        return Ok(());
    };
    if copies.len() > 1 {
        if copies.len() > MAX_COPIES as usize {
            bail!(
                "the stream of SSRC {:#010x} from {} would have {} copies; at most {} \
                 per stream: split the audience over relays (trunks)",
                first.ssrc,
                first.source,
                copies.len(),
                MAX_COPIES
            );
        }
        let mut seen = BTreeSet::new();
        for r in copies {
            if !seen.insert(r.out_dst) {
                bail!(
                    "the stream of SSRC {:#010x} has two copies to {}; keep one",
                    r.ssrc,
                    r.out_dst
                );
            }
            if r.vlan.is_some() {
                bail!(
                    "the copy of SSRC {:#010x} to {} has a VLAN tag, which the TC \
                     replicator cannot push: copies of a stream with several leave \
                     untagged (drop `vlan`, or keep this stream to one copy)",
                    r.ssrc,
                    r.out_dst
                );
            }
        }
    }
    Ok(())
}
