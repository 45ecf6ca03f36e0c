//! The one place that writes forwarding state into the maps, used by the daemon, the
//! CLI and the tests alike, so the maps stay consistent with each other: every route
//! has a zeroed statistics slot, its source is counted in the sources map, and its
//! egress interface is in the devmap.
//!
//! A stream (listen, source, SSRC) has one or more copies, each a [`Route`]. One copy
//! is a plain route value that XDP forwards itself; several are a copy list in
//! `EFWD_COPIES_V1` that the TC replicator sends, named by the stream's route value.
//! A change to a list writes a new list and swaps the route value (see
//! forwarder-common's `fanout`): a packet sees the old copies or the new ones. A
//! change returns once the old list can no longer be read, so after `subs del`
//! returns, the removed subscriber gets nothing more.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, XskMap},
    util::nr_cpus,
};
use forwarder_common::{
    addr::{as_v4, v4_mapped},
    egress,
    fanout::{self, CopyVerdict, MAX_COPIES},
    ifmac::{self, IFMAC_SET, IfMac},
    links::{LinkKey, LinkState, LinkValue},
    listeners::{
        self, FLAG_DROP_NO_ROUTE, FLAG_DROP_UNKNOWN_SOURCE, FLAG_WEBRTC, ListenerKey, ListenerValue,
    },
    peers::{self, PeerValue},
    route_stats::{self, RouteStats},
    routes::{self, FLAG_FANOUT, FLAG_IPV6, FLAG_REWRITE_PT, FLAG_VLAN, RouteKey, RouteValue},
    routes4::{self, RouteKey4},
    sources::{self, SourceKey, SourceValue},
    verdicts::{self, Verdict, VerdictStats},
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

pub(super) fn sock(a: [u8; 16], port_be: [u8; 2]) -> SocketAddr {
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

/// Typed handles on every map.
pub struct Maps {
    pub routes4: HashMap<MapData, RouteKey4, RouteValue>,
    pub routes6: HashMap<MapData, RouteKey, RouteValue>,
    pub listeners: HashMap<MapData, ListenerKey, ListenerValue>,
    pub sources: HashMap<MapData, SourceKey, SourceValue>,
    pub route_stats: PerCpuArray<MapData, RouteStats>,
    pub verdicts: PerCpuArray<MapData, VerdictStats>,
    pub egress: DevMapHash<MapData>,
    pub ifmac: Array<MapData, IfMac>,
    pub copies: Array<MapData, RouteValue>,
    pub copy_verdicts: PerCpuArray<MapData, VerdictStats>,
    pub peers: PeerTable,
    pub links: HashMap<MapData, LinkKey, LinkValue>,
    pub link_states: HashMap<MapData, LinkKey, LinkState>,
    /// Only in the daemon's own load: its sockets die with it, so it is not pinned.
    pub xsks: Option<XskMap<MapData>>,
}

/// `EFWD_PEERS_V1`: the WebRTC 5-tuples ICE bound, which XDP steers to the workers.
pub struct PeerTable(HashMap<MapData, SourceKey, PeerValue>);

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

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))
}

fn pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {}: is `edgefwd run` running (or has it run) with this pin \
             directory? Start it, or pass --pin-dir",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
}

impl Maps {
    /// Takes the maps out of a loaded object (the daemon, tests).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        let mut m = Self::build(|name| take(ebpf, name))?;
        m.xsks = Some(take(ebpf, peers::XSKS_MAP_NAME)?.try_into()?);
        Ok(m)
    }

    /// Opens the maps a running daemon pinned (the CLI).
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        crate::dataplane::preflight::require_root()?;
        Self::build(|name| pinned(dir, name))
    }

    fn build(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Maps {
            routes4: get(routes4::MAP_NAME)?.try_into()?,
            routes6: get(routes::MAP_NAME)?.try_into()?,
            listeners: get(listeners::MAP_NAME)?.try_into()?,
            sources: get(sources::MAP_NAME)?.try_into()?,
            route_stats: get(route_stats::MAP_NAME)?.try_into()?,
            verdicts: get(verdicts::MAP_NAME)?.try_into()?,
            egress: get(egress::MAP_NAME)?.try_into()?,
            ifmac: get(ifmac::MAP_NAME)?.try_into()?,
            copies: get(fanout::COPIES_MAP_NAME)?.try_into()?,
            copy_verdicts: get(fanout::COPY_VERDICT_MAP_NAME)?.try_into()?,
            peers: PeerTable(get(peers::MAP_NAME)?.try_into()?),
            links: get(forwarder_common::links::MAP_NAME)?.try_into()?,
            link_states: get(forwarder_common::links::STATE_MAP_NAME)?.try_into()?,
            xsks: None,
        })
    }

    /// Registers the MAC of an interface the program runs on: frames arriving there
    /// are forwarded only if addressed to it.
    pub fn set_interface_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        if ifindex >= ifmac::MAX_IFINDEX {
            bail!(
                "interface index {ifindex} is beyond the {} the MAC filter holds; recreate \
                 the interface (indexes grow with every interface a namespace creates)",
                ifmac::MAX_IFINDEX
            );
        }
        self.ifmac
            .set(
                ifindex,
                IfMac {
                    mac,
                    flags: IFMAC_SET,
                    _pad: 0,
                },
                0,
            )
            .with_context(|| format!("registering the MAC of ifindex {ifindex}"))
    }

    pub fn set_listener(&mut self, l: &Listener) -> Result<()> {
        self.listeners
            .insert(l.key(), l.value(), 0)
            .map_err(|e| full_or(e, "listeners", listeners::MAX_LISTENERS))
            .with_context(|| format!("adding listener {}", l.addr))
    }

    /// Removes the WebRTC listener on `media` (an unspecified address matches every
    /// address on its port) and the peer bindings steered through it: the kernel then
    /// passes that traffic to the stack. Returns the listeners removed.
    pub fn forget_webrtc_listener(&mut self, media: SocketAddr) -> Result<Vec<Listener>> {
        let hit = |a: SocketAddr| {
            media.port() == a.port() && (media.ip() == a.ip() || media.ip().is_unspecified())
        };
        let gone: Vec<Listener> = self
            .listeners()?
            .into_iter()
            .filter(|l| l.webrtc && hit(l.addr))
            .collect();
        for l in &gone {
            self.listeners
                .remove(&l.key())
                .with_context(|| format!("removing listener {}", l.addr))?;
        }
        if !gone.is_empty() {
            self.peers.clear()?;
        }
        Ok(gone)
    }

    pub fn listeners(&self) -> Result<Vec<Listener>> {
        let mut out = Vec::new();
        for item in self.listeners.iter() {
            let (k, v) = item?;
            out.push(Listener {
                addr: sock(k.addr, k.port_be),
                drop_unknown_source: v.flags & FLAG_DROP_UNKNOWN_SOURCE != 0,
                drop_no_route: v.flags & FLAG_DROP_NO_ROUTE != 0,
                webrtc: v.flags & FLAG_WEBRTC != 0,
            });
        }
        out.sort_by_key(|l| l.addr);
        Ok(out)
    }

    /// Adds a new stream with one copy; refuses one whose key (listen, source, SSRC)
    /// has a stream already, which would silently reset its rewrite fields.
    pub fn add_route(&mut self, r: &Route) -> Result<()> {
        self.check_copy(r)?;
        if self.get_route(&r.key()).is_ok() {
            bail!(
                "a route for SSRC {:#010x} from {} on {} exists already; pass --replace to \
                 overwrite it (its counters are kept), `edgefwd subs add` to give it another \
                 copy, or `edgefwd routes del` it first",
                r.ssrc,
                r.source,
                r.listen
            );
        }
        self.change(|m, b| m.write_stream(&r.key(), std::slice::from_ref(r), b))
    }

    /// Adds a route or replaces the copy of its stream that goes to the same
    /// destination (or the only copy): the daemon programming its config, `routes add
    /// --replace`. A replaced copy keeps its statistics slot and counters; the data
    /// plane sees the old value or the new one, never a mix (one map update).
    pub fn put_route(&mut self, r: &Route) -> Result<()> {
        let key = r.key();
        let mut copies = self.copies_of(&key)?;
        match copies.iter().position(|c| c.out_dst == r.out_dst) {
            Some(i) => copies[i] = r.clone(),
            None if copies.len() <= 1 => copies = vec![r.clone()],
            None => bail!(
                "the stream of SSRC {:#010x} from {} has {} copies and none to {}: add one \
                 with `edgefwd subs add`, or remove one with `edgefwd subs del`",
                r.ssrc,
                r.source,
                copies.len(),
                r.out_dst
            ),
        }
        self.change(|m, b| m.write_stream(&key, &copies, b))
    }

    /// Adds a copy to the stream of `r`'s key (creating the stream): fan-out.
    pub fn add_copy(&mut self, r: &Route) -> Result<()> {
        let key = r.key();
        let mut copies = self.copies_of(&key)?;
        if copies.iter().any(|c| c.out_dst == r.out_dst) {
            bail!(
                "the stream of SSRC {:#010x} from {} has a copy to {} already; `edgefwd subs \
                 del` it first to change it",
                r.ssrc,
                r.source,
                r.out_dst
            );
        }
        copies.push(r.clone());
        self.change(|m, b| m.write_stream(&key, &copies, b))
    }

    /// Removes the copy to `out_dst` from the stream of `key` (the stream itself with
    /// its last copy); false if there was none. The other copies go on undisturbed.
    pub fn del_copy(&mut self, key: &RouteKey, out_dst: SocketAddr) -> Result<bool> {
        Ok(self.del_copy_counted(key, out_dst)?.is_some())
    }

    /// [`Maps::del_copy`], returning the removed copy's final counters (read once no
    /// replication loop can count in its slot any more); None if there was none.
    pub fn del_copy_counted(
        &mut self,
        key: &RouteKey,
        out_dst: SocketAddr,
    ) -> Result<Option<RouteStats>> {
        let Some((_, values)) = self.stream_values(key)? else {
            return Ok(None);
        };
        let Some(slot) = values
            .iter()
            .find(|v| Route::from_map(key, v).out_dst == out_dst)
            .map(|v| v.stats_slot)
        else {
            return Ok(None);
        };
        let copies: Vec<Route> = values
            .iter()
            .map(|v| Route::from_map(key, v))
            .filter(|c| c.out_dst != out_dst)
            .collect();
        self.change(|m, b| m.write_stream(key, &copies, b))?;
        Ok(Some(self.stats(slot)))
    }

    /// Moves the copy to `out_dst` from the stream of `from` to the stream of `to`
    /// (a viewer switching channels, a relay re-parented), so that its receiver sees
    /// one sequence: the first packet of `to` it gets is numbered one after the last
    /// packet of `from` it got, and its timestamps continue from there. The copy is
    /// removed first, so no packet of either stream can reach it under a number the
    /// other already used; packets of `to` that arrive during the move are not sent
    /// to it and read as a gap (loss), never as a step back. Everything else of the
    /// copy (addresses, SSRC out, payload type, egress) stays. Both streams must exist.
    pub fn move_copy(
        &mut self,
        from: &RouteKey,
        out_dst: SocketAddr,
        to: &RouteKey,
    ) -> Result<Moved> {
        let name = |k: &RouteKey| {
            let r = Route::from_map(k, &RouteValue::default());
            format!("SSRC {:#010x} from {} on {}", r.ssrc, r.source, r.listen)
        };
        let Some(copy) = self
            .copies_of(from)?
            .into_iter()
            .find(|c| c.out_dst == out_dst)
        else {
            bail!(
                "the stream of {} has no copy to {out_dst} (see `edgefwd subs list`)",
                name(from)
            );
        };
        if from == to {
            bail!(
                "the copy to {out_dst} is in the stream of {} already",
                name(to)
            );
        }
        let target = self.copies_of(to)?;
        if target.is_empty() {
            bail!(
                "no stream of {} to move the copy to: add it first (`edgefwd subs add` or \
                 `edgefwd routes add`)",
                name(to)
            );
        }
        if target.iter().any(|c| c.out_dst == out_dst) {
            bail!(
                "the stream of {} has a copy to {out_dst} already; `edgefwd subs del` one of \
                 them first",
                name(to)
            );
        }
        let last = self
            .del_copy_counted(from, out_dst)?
            .context("the copy vanished while moving it (another writer?)")?;
        // The newest packet of the target stream: its copies' slots record it (XDP for
        // a stream of one copy, TC per copy for a list).
        let mut newest = RouteStats::default();
        if let Some((v, copies)) = self.stream_values(to)? {
            newest.merge(&self.stats(v.stats_slot));
            for c in &copies {
                newest.merge(&self.stats(c.stats_slot));
            }
        }
        let r = Route::from_map(to, &RouteValue::default());
        let mut moved = Route {
            listen: r.listen,
            source: r.source,
            ssrc: r.ssrc,
            ..copy.clone()
        };
        let continued = match (last.last(), newest.last()) {
            (Some((seq, ts)), Some((to_seq, to_ts))) => {
                let (seq_out, ts_out) = (
                    seq.wrapping_add(copy.seq_delta),
                    ts.wrapping_add(copy.ts_delta),
                );
                // to_seq + 1 becomes seq_out + 1; to_ts becomes ts_out.
                moved.seq_delta = seq_out.wrapping_sub(to_seq);
                moved.ts_delta = ts_out.wrapping_sub(to_ts);
                Some((seq_out, ts_out))
            }
            _ => None,
        };
        if let Err(e) = self.add_copy(&moved) {
            // Put it back where it was rather than lose the subscriber.
            let restored = self.add_copy(&copy);
            return Err(e).context(match restored {
                Ok(()) => "moving the copy; it is back in its old stream".to_string(),
                Err(r) => format!("moving the copy; putting it back failed too: {r:#}"),
            });
        }
        Ok(Moved {
            route: moved,
            continued_from: continued,
        })
    }

    /// Rejects a copy the data plane cannot send, saying what to change; makes sure
    /// its egress interface is in the devmap.
    fn check_copy(&mut self, r: &Route) -> Result<()> {
        r.validate()?;
        let key = r.key();
        let listener = ListenerKey {
            addr: key.listen_addr,
            port_be: key.listen_port_be,
            _pad: [0; 2],
        };
        if self.listeners.get(&listener, 0).is_err() {
            bail!(
                "route {}: {} is not a listener; add it first (config [[listener]] or \
                 `edgefwd routes add` creates it)",
                r.ssrc,
                r.listen
            );
        }
        if r.egress_ifindex != 0 {
            self.egress
                .insert(r.egress_ifindex, r.egress_ifindex, None, 0)
                .with_context(|| {
                    format!(
                        "adding ifindex {} to the egress devmap: does the interface exist in \
                         this namespace?",
                        r.egress_ifindex
                    )
                })?;
        }
        Ok(())
    }

    /// Runs a batch of writes, then waits until no replication loop can still read a
    /// copy list the batch retired.
    fn change<T>(&mut self, f: impl FnOnce(&mut Self, &mut Batch) -> Result<T>) -> Result<T> {
        let mut batch = Batch::default();
        let out = f(self, &mut batch);
        batch.settle();
        out
    }

    /// The copies of a stream as routes (empty if there is no stream).
    pub fn copies_of(&self, key: &RouteKey) -> Result<Vec<Route>> {
        Ok(self
            .stream_values(key)?
            .map(|(_, copies)| copies.iter().map(|c| Route::from_map(key, c)).collect())
            .unwrap_or_default())
    }

    /// A stream's route value and its copies' values (the route value itself for a
    /// stream with one copy).
    fn stream_values(&self, key: &RouteKey) -> Result<Option<(RouteValue, Vec<RouteValue>)>> {
        let v = match self.get_route(key) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e).context("looking up route"),
        };
        Ok(Some((v, self.copy_values(&v)?)))
    }

    fn copy_values(&self, v: &RouteValue) -> Result<Vec<RouteValue>> {
        if v.flags & FLAG_FANOUT == 0 {
            return Ok(vec![*v]);
        }
        (v.fanout_first..v.fanout_first + v.fanout_count)
            .map(|i| {
                self.copies
                    .get(&i, 0)
                    .with_context(|| format!("reading copy slot {i}"))
            })
            .collect()
    }

    /// Makes the stream of `key` have exactly `copies` (none: removes it).
    fn write_stream(&mut self, key: &RouteKey, copies: &[Route], batch: &mut Batch) -> Result<()> {
        if copies.is_empty() {
            self.remove_stream(key, batch)?;
            return Ok(());
        }
        let first = &copies[0];
        for r in copies {
            if r.key() != *key {
                bail!("copy to {} belongs to another stream", r.out_dst);
            }
        }
        check_stream(copies)?;
        for r in copies {
            self.check_copy(r)?;
        }
        let old = self.stream_values(key)?;
        // A copy keeps its counters by its destination; a stream with a list keeps its own.
        let mut kept: std::collections::HashMap<SocketAddr, u32> = Default::default();
        // Some: the stream had a copy list (retired below, once the new value is in).
        let mut stream_slot = None;
        if let Some((v, old_copies)) = &old {
            for c in old_copies {
                kept.insert(Route::from_map(key, c).out_dst, c.stats_slot);
            }
            if v.flags & FLAG_FANOUT != 0 {
                stream_slot = Some(v.stats_slot);
            }
        }
        let mut fresh = Vec::new();
        let mut slot_of = |r: Option<&Route>, maps: &Maps, batch: &mut Batch| -> Result<u32> {
            if let Some(s) = r.and_then(|r| kept.get(&r.out_dst)) {
                return Ok(*s);
            }
            let s = batch.slots.take(maps)?;
            fresh.push(s);
            Ok(s)
        };
        let value = if copies.len() == 1 {
            copies[0].value(slot_of(Some(&copies[0]), self, batch)?)
        } else {
            let mut values = Vec::with_capacity(copies.len());
            for r in copies {
                values.push(r.value(slot_of(Some(r), self, batch)?));
            }
            let stream = match stream_slot {
                Some(s) => s,
                None => slot_of(None, self, batch)?,
            };
            let start = batch.ranges.take(self, copies.len() as u32)?;
            // Nobody reads these slots until the route value below names them.
            for (i, v) in values.iter().enumerate() {
                self.copies
                    .set(start + i as u32, *v, 0)
                    .with_context(|| format!("writing copy slot {}", start + i as u32))?;
            }
            RouteValue {
                flags: FLAG_FANOUT
                    | if first.out_dst.is_ipv6() {
                        FLAG_IPV6
                    } else {
                        0
                    },
                stats_slot: stream,
                fanout_first: start,
                fanout_count: copies.len() as u32,
                ..Default::default()
            }
        };
        for s in &fresh {
            let zeros = PerCpuValues::try_from(vec![RouteStats::default(); ncpus()?])?;
            self.route_stats.set(*s, zeros, 0)?;
        }
        let cap = self.route_capacity();
        let inserted = match RouteKey4::from_mapped(key) {
            Some(k4) => self.routes4.insert(k4, value, 0),
            None => self.routes6.insert(*key, value, 0),
        };
        if let Err(e) = inserted {
            for s in fresh {
                batch.slots.give_back(s);
            }
            return Err(full_or(e, "routes", cap))
                .with_context(|| format!("adding route for SSRC {:#010x}", first.ssrc));
        }
        if stream_slot.is_some() {
            batch.ranges.retire();
        }
        if old.is_none() {
            let sk = first.source_key();
            let n = self.sources.get(&sk, 0).map(|v| v.routes).unwrap_or(0);
            self.sources
                .insert(sk, SourceValue { routes: n + 1 }, 0)
                .map_err(|e| full_or(e, "sources", sources::MAX_SOURCES))?;
        }
        Ok(())
    }

    /// Makes the maps hold exactly these listeners and routes (a restarted daemon
    /// adopting the maps an earlier one pinned): adds what is missing, updates what
    /// changed (keeping its statistics slot and counters), removes what is no longer
    /// configured. Routes with the same (listen, source, SSRC) are the copies of one
    /// stream (fan-out). Each step is one map update, so forwarding of the routes that
    /// stay is never interrupted.
    pub fn reconcile(&mut self, listeners: &[Listener], routes: &[Route]) -> Result<Reconciled> {
        let mut done = Reconciled::default();
        for l in listeners {
            self.set_listener(l)?;
        }
        let streams = group_streams(routes);
        let want: std::collections::HashSet<RouteKey> = streams.iter().map(|(k, _)| *k).collect();
        self.change(|m, batch| {
            for (k, _) in m.all_routes()? {
                if !want.contains(&k) {
                    done.removed += m.copies_of(&k)?.len();
                    m.remove_stream(&k, batch)?;
                }
            }
            for (k, copies) in &streams {
                let have = m.copies_of(k)?;
                for c in copies {
                    if have.iter().any(|h| h.out_dst == c.out_dst) {
                        done.kept += 1;
                    } else {
                        done.added += 1;
                    }
                }
                done.removed += have
                    .iter()
                    .filter(|h| !copies.iter().any(|c| c.out_dst == h.out_dst))
                    .count();
                m.write_stream(k, copies, batch)?;
            }
            Ok(())
        })?;
        let keep: std::collections::HashSet<ListenerKey> =
            listeners.iter().map(Listener::key).collect();
        for l in self.listeners()? {
            if !keep.contains(&l.key()) {
                self.listeners.remove(&l.key())?;
                done.listeners_removed += 1;
            }
        }
        Ok(done)
    }

    /// [`Maps::reconcile`], keeping the copies in the maps that `keep` names even if
    /// the config has none like them: the trunk copies the link manager wrote, which
    /// the next demand would ask for again (a restart does not pause them).
    pub fn reconcile_keeping(
        &mut self,
        listeners: &[Listener],
        routes: &[Route],
        keep: impl Fn(&Route) -> bool,
    ) -> Result<Reconciled> {
        let mut all = routes.to_vec();
        for (r, _) in self.routes()? {
            if keep(&r)
                && !all
                    .iter()
                    .any(|o| o.key() == r.key() && o.out_dst == r.out_dst)
            {
                all.push(r);
            }
        }
        self.reconcile(listeners, &all)
    }

    /// Removes a stream with all its copies; returns false if there was none.
    pub fn del_route(&mut self, key: &RouteKey) -> Result<bool> {
        self.change(|m, b| m.remove_stream(key, b))
    }

    fn remove_stream(&mut self, key: &RouteKey, batch: &mut Batch) -> Result<bool> {
        let old = self.get_route(key).ok();
        let removed = match RouteKey4::from_mapped(key) {
            Some(k4) => self.routes4.remove(&k4),
            None => self.routes6.remove(key),
        };
        match removed {
            Ok(()) => {}
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(false);
            }
            Err(e) => return Err(e).context("removing route"),
        }
        if let Some(v) = old
            && v.flags & FLAG_FANOUT != 0
        {
            batch.ranges.retire();
        }
        let sk = SourceKey {
            listen_addr: key.listen_addr,
            src_addr: key.src_addr,
            listen_port_be: key.listen_port_be,
            src_port_be: key.src_port_be,
        };
        match self.sources.get(&sk, 0) {
            Ok(v) if v.routes > 1 => self.sources.insert(
                sk,
                SourceValue {
                    routes: v.routes - 1,
                },
                0,
            )?,
            Ok(_) => self.sources.remove(&sk)?,
            Err(_) => {}
        }
        Ok(true)
    }

    /// A route by its (v4-mapped or IPv6) key, from the map of its family.
    pub fn get_route(&self, key: &RouteKey) -> Result<RouteValue, MapError> {
        match RouteKey4::from_mapped(key) {
            Some(k4) => self.routes4.get(&k4, 0),
            None => self.routes6.get(key, 0),
        }
    }

    /// Every route of both families, keyed the userspace way.
    fn all_routes(&self) -> Result<Vec<(RouteKey, RouteValue)>> {
        let mut out = Vec::new();
        for item in self.routes4.iter() {
            let (k, v) = item?;
            out.push((k.to_mapped(), v));
        }
        for item in self.routes6.iter() {
            out.push(item?);
        }
        Ok(out)
    }

    /// How many routes the tables hold: one statistics slot per route, shared by both
    /// families (read from the map, so a map sized at load time is honoured).
    pub fn route_capacity(&self) -> u32 {
        self.route_stats.len()
    }

    fn stats(&self, slot: u32) -> RouteStats {
        let mut total = RouteStats::default();
        if let Ok(per_cpu) = self.route_stats.get(&slot, 0) {
            for s in per_cpu.iter() {
                total.merge(s);
            }
        }
        total
    }

    /// Every copy of every stream as a route, with its own counters summed over CPUs.
    pub fn routes(&self) -> Result<Vec<(Route, RouteStats)>> {
        Ok(self.streams()?.into_iter().flat_map(|s| s.copies).collect())
    }

    /// Every stream with its copies and counters, sorted by (listen, source, SSRC).
    pub fn streams(&self) -> Result<Vec<Stream>> {
        let mut out = Vec::new();
        for (k, v) in self.all_routes()? {
            let copies: Vec<(Route, RouteStats)> = self
                .copy_values(&v)?
                .iter()
                .map(|c| (Route::from_map(&k, c), self.stats(c.stats_slot)))
                .collect();
            let r = &copies[0].0;
            out.push(Stream {
                listen: r.listen,
                source: r.source,
                ssrc: r.ssrc,
                received: self.stats(v.stats_slot),
                fanout: v.flags & FLAG_FANOUT != 0,
                copies,
            });
        }
        out.sort_by_key(|s| (s.listen, s.source, s.ssrc));
        Ok(out)
    }

    /// What the TC replicator did with every copy, summed over CPUs.
    pub fn copy_verdict_totals(&self) -> Result<Vec<(CopyVerdict, VerdictStats)>> {
        CopyVerdict::ALL
            .iter()
            .map(|v| {
                let per_cpu = self.copy_verdicts.get(&(*v as u32), 0)?;
                let mut t = VerdictStats::default();
                for s in per_cpu.iter() {
                    t.packets += s.packets;
                    t.bytes += s.bytes;
                }
                Ok((*v, t))
            })
            .collect()
    }

    /// Statistics slots in use: streams' and their copies'.
    fn used_slots(&self) -> Result<BTreeSet<u32>> {
        let mut used = BTreeSet::new();
        for (_, v) in self.all_routes()? {
            used.insert(v.stats_slot);
            if v.flags & FLAG_FANOUT != 0 {
                for c in self.copy_values(&v)? {
                    used.insert(c.stats_slot);
                }
            }
        }
        Ok(used)
    }

    /// Every verdict's packets and bytes, summed over CPUs.
    pub fn verdict_totals(&self) -> Result<Vec<(Verdict, VerdictStats)>> {
        Verdict::ALL
            .iter()
            .map(|v| {
                let per_cpu = self.verdicts.get(&(*v as u32), 0)?;
                let mut t = VerdictStats::default();
                for s in per_cpu.iter() {
                    t.packets += s.packets;
                    t.bytes += s.bytes;
                }
                Ok((*v, t))
            })
            .collect()
    }
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

/// Hands out free statistics slots. The used set is read from the tables on first
/// need and then kept up to date by the caller's batch, and the search resumes where
/// it stopped, so a batch of n new routes costs one table walk, not n.
#[derive(Default)]
struct SlotAllocator {
    used: Option<BTreeSet<u32>>,
    next: u32,
}

impl SlotAllocator {
    fn take(&mut self, maps: &Maps) -> Result<u32> {
        let cap = maps.route_capacity();
        if self.used.is_none() {
            self.used = Some(maps.used_slots()?);
        }
        let used = self.used.as_mut().expect("filled above");
        let free = (self.next..cap)
            .chain(0..self.next.min(cap))
            .find(|s| !used.contains(s))
            .ok_or_else(|| {
                anyhow!(
                    "the route table is full ({cap} routes): remove routes you no longer need \
                     (`edgefwd routes del`, or drop them from the config)"
                )
            })?;
        used.insert(free);
        self.next = free + 1;
        Ok(free)
    }

    fn give_back(&mut self, slot: u32) {
        if let Some(used) = self.used.as_mut() {
            used.remove(&slot);
        }
    }
}

/// Hands out contiguous ranges of the copies array for new copy lists. Ranges named by
/// a route value are in use, and so are ranges this batch retired: a replication loop
/// may still read them until [`Batch::settle`].
#[derive(Default)]
struct RangeAllocator {
    used: Option<Vec<(u32, u32)>>,
    retired: bool,
}

impl RangeAllocator {
    fn take(&mut self, maps: &Maps, n: u32) -> Result<u32> {
        if self.used.is_none() {
            let mut used = Vec::new();
            for (_, v) in maps.all_routes()? {
                if v.flags & FLAG_FANOUT != 0 {
                    used.push((v.fanout_first, v.fanout_count));
                }
            }
            self.used = Some(used);
        }
        let used = self.used.as_mut().expect("filled above");
        used.sort_unstable();
        let cap = maps.copies.len();
        // First fit over the gaps between used ranges.
        let mut at = 0u32;
        for (first, count) in used.iter() {
            if first.saturating_sub(at) >= n {
                break;
            }
            at = at.max(first + count);
        }
        if cap.saturating_sub(at) < n {
            bail!(
                "the copies array is full ({cap} slots, shared by every stream's copy list \
                 while it changes): remove copies you no longer need (`edgefwd subs del`)"
            );
        }
        used.push((at, n));
        Ok(at)
    }

    /// A range left its stream. It stays in `used` (read from the maps, or taken in
    /// this batch), so the batch never hands it out again; the batch waits at the end.
    fn retire(&mut self) {
        self.retired = true;
    }
}

/// The allocators of one batch of writes.
#[derive(Default)]
struct Batch {
    slots: SlotAllocator,
    ranges: RangeAllocator,
}

impl Batch {
    /// Waits until no replication loop can read a copy list this batch retired.
    fn settle(self) {
        if self.ranges.retired {
            std::thread::sleep(std::time::Duration::from_millis(fanout::GRACE_MS));
        }
    }
}

fn ncpus() -> Result<usize> {
    nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))
}

pub(super) fn full_or(e: MapError, what: &str, max: u32) -> anyhow::Error {
    if let MapError::SyscallError(s) = &e
        && s.io_error.raw_os_error() == Some(libc::E2BIG)
    {
        return anyhow!(
            "the {what} map is full ({max} entries): remove entries you no longer need"
        );
    }
    anyhow::Error::new(e)
}
