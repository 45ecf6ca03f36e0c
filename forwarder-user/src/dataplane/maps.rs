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

use std::{collections::BTreeSet, net::SocketAddr, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, XskMap},
    util::nr_cpus,
};
use forwarder_common::{
    egress,
    fanout::{self, CopyVerdict},
    ifmac::{self, IFMAC_SET, IfMac},
    links::{LinkKey, LinkState, LinkValue},
    listeners::{
        self, FLAG_DROP_NO_ROUTE, FLAG_DROP_UNKNOWN_SOURCE, FLAG_WEBRTC, ListenerKey, ListenerValue,
    },
    peers::{self},
    route_stats::{self, RouteStats},
    routes::{self, FLAG_FANOUT, FLAG_IPV6, RouteKey, RouteValue},
    routes4::{self, RouteKey4},
    sources::{self, SourceKey, SourceValue},
    verdicts::{self, Verdict, VerdictStats},
};

mod alloc;
mod copies;
mod model;
mod peer_table;

use alloc::*;
pub use model::*;
pub use peer_table::PeerTable;

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
