//! The one place that writes forwarding state into the maps, used by the daemon, the
//! CLI and the tests alike, so the maps stay consistent with each other: every route
//! has a zeroed statistics slot, its source is counted in the sources map, and its
//! egress interface is in the devmap.

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
    ifmac::{self, IFMAC_SET, IfMac},
    listeners::{
        self, FLAG_DROP_NO_ROUTE, FLAG_DROP_UNKNOWN_SOURCE, FLAG_WEBRTC, ListenerKey, ListenerValue,
    },
    peers::{self, PeerValue},
    route_stats::{self, RouteStats},
    routes::{self, FLAG_IPV6, FLAG_REWRITE_PT, FLAG_VLAN, RouteKey, RouteValue},
    routes4::{self, RouteKey4},
    sources::{self, SourceKey, SourceValue},
    verdicts::{self, Verdict, VerdictStats},
};
use serde::Serialize;

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

fn sock(a: [u8; 16], port_be: [u8; 2]) -> SocketAddr {
    SocketAddr::new(ip_from16(a), u16::from_be_bytes(port_be))
}

impl Route {
    pub fn key(&self) -> RouteKey {
        RouteKey {
            listen_addr: addr16(self.listen.ip()),
            src_addr: addr16(self.source.ip()),
            listen_port_be: self.listen.port().to_be_bytes(),
            src_port_be: self.source.port().to_be_bytes(),
            ssrc_be: self.ssrc.to_be_bytes(),
        }
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
    pub peers: PeerTable,
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
            peers: PeerTable(get(peers::MAP_NAME)?.try_into()?),
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

    /// Adds a new route; refuses one whose key (listen, source, SSRC) has a route
    /// already, which would silently reset its rewrite fields.
    pub fn add_route(&mut self, r: &Route) -> Result<()> {
        self.write_route(r, false)
    }

    /// Adds a route or replaces the one with its key (the daemon programming its
    /// config, `routes add --replace`). A replaced route keeps its statistics slot
    /// and counters; the data plane sees the old value or the new one, never a mix
    /// (one map update).
    pub fn put_route(&mut self, r: &Route) -> Result<()> {
        self.write_route(r, true)
    }

    fn write_route(&mut self, r: &Route, replace: bool) -> Result<()> {
        self.write_route_with(r, replace, &mut SlotAllocator::default())
    }

    /// `slots` carries the set of used statistics slots between the writes of one
    /// batch (reconcile), so a batch of n routes reads the tables once, not n times.
    fn write_route_with(
        &mut self,
        r: &Route,
        replace: bool,
        slots: &mut SlotAllocator,
    ) -> Result<()> {
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
        let (slot, existed) = match self.get_route(&key) {
            Ok(_) if !replace => bail!(
                "a route for SSRC {:#010x} from {} on {} exists already; pass --replace to \
                 overwrite it (its counters are kept) or `edgefwd routes del` it first",
                r.ssrc,
                r.source,
                r.listen
            ),
            Ok(v) => (v.stats_slot, true),
            Err(MapError::KeyNotFound) => (slots.take(self)?, false),
            Err(e) => return Err(e).context("looking up route"),
        };
        if !existed {
            let zeros = PerCpuValues::try_from(vec![RouteStats::default(); ncpus()?])?;
            self.route_stats.set(slot, zeros, 0)?;
        }
        let value = r.value(slot);
        let cap = self.route_capacity();
        let inserted = match RouteKey4::from_mapped(&key) {
            Some(k4) => self.routes4.insert(k4, value, 0),
            None => self.routes6.insert(key, value, 0),
        };
        if let Err(e) = inserted {
            if !existed {
                slots.give_back(slot);
            }
            return Err(full_or(e, "routes", cap))
                .with_context(|| format!("adding route for SSRC {:#010x}", r.ssrc));
        }
        if !existed {
            let sk = r.source_key();
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
    /// configured. Each step is one map update, so forwarding of the routes that stay
    /// is never interrupted.
    pub fn reconcile(&mut self, listeners: &[Listener], routes: &[Route]) -> Result<Reconciled> {
        let mut done = Reconciled::default();
        for l in listeners {
            self.set_listener(l)?;
        }
        let want: std::collections::HashSet<RouteKey> = routes.iter().map(Route::key).collect();
        let mut slots = SlotAllocator::default();
        for (k, _) in self.all_routes()? {
            if !want.contains(&k) {
                self.del_route(&k)?;
                done.removed += 1;
            }
        }
        for r in routes {
            if self.get_route(&r.key()).is_ok() {
                done.kept += 1;
            } else {
                done.added += 1;
            }
            self.write_route_with(r, true, &mut slots)?;
        }
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

    /// Removes a route; returns false if there was none.
    pub fn del_route(&mut self, key: &RouteKey) -> Result<bool> {
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

    /// Routes with their per-route counters summed over CPUs.
    pub fn routes(&self) -> Result<Vec<(Route, RouteStats)>> {
        let mut out = Vec::new();
        for (k, v) in self.all_routes()? {
            let mut total = RouteStats::default();
            if let Ok(per_cpu) = self.route_stats.get(&v.stats_slot, 0) {
                for s in per_cpu.iter() {
                    total.packets += s.packets;
                    total.bytes += s.bytes;
                }
            }
            out.push((Route::from_map(&k, &v), total));
        }
        out.sort_by_key(|(r, _)| (r.listen, r.source, r.ssrc));
        Ok(out)
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
            self.used = Some(
                maps.all_routes()?
                    .into_iter()
                    .map(|(_, v)| v.stats_slot)
                    .collect(),
            );
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

fn ncpus() -> Result<usize> {
    nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))
}

fn full_or(e: MapError, what: &str, max: u32) -> anyhow::Error {
    if let MapError::SyscallError(s) = &e
        && s.io_error.raw_os_error() == Some(libc::E2BIG)
    {
        return anyhow!(
            "the {what} map is full ({max} entries): remove entries you no longer need"
        );
    }
    anyhow::Error::new(e)
}
