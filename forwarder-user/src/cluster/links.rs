//! The link manager: sans-I/O (no sockets, no clock reads, no maps). Demand from
//! downstream nodes and our upstream's answers go in; out come the trunk copies the
//! maps should hold, the demand to send upstream, and every link's state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use forwarder_common::links::{STATE_DOWN, STATE_REFUSED, STATE_UNKNOWN, STATE_UP};
use serde::{Deserialize, Serialize};

use super::{Direction, Link, MAX_DEPTH, cycle_through};
use crate::dataplane::maps::Stream;

/// What a downstream node sends its upstream (`PUT /node/v1/links/{node}/demand`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemandRequest {
    /// The sender's node name (must match the path's).
    pub node: String,
    /// The SSRCs it wants on its trunk; empty keeps the link alive and carries nothing.
    pub ssrcs: Vec<u32>,
}

/// The upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemandReply {
    pub node: String,
    /// The upstream and its ancestors, parent first: the downstream's ancestors.
    pub chain: Vec<String>,
    /// The demanded SSRCs the upstream has (or asks its own upstream for).
    pub serving: Vec<u32>,
}

/// Why a demand is refused; `status` is the HTTP status the API answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

/// A trunk copy the maps should hold: stream (listen, source, SSRC) to a down link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Trunk {
    pub listen: SocketAddr,
    pub source: SocketAddr,
    pub ssrc: u32,
    /// The link's local (copies leave from) and remote (its downstream's listener).
    pub out_src: SocketAddr,
    pub out_dst: SocketAddr,
}

/// A link's state for `EFWD_LINKSTATE_V1`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    pub state: u8,
    pub message: String,
    /// The last good exchange, as the caller's clock (its `now`) had it.
    pub last_ok: Option<Instant>,
    pub demand: u32,
    pub copies: u32,
}

/// What the maps and the upstream should see now.
#[derive(Debug, Default)]
pub struct Plan {
    pub trunks: BTreeSet<Trunk>,
    /// The up link and what to ask it for.
    pub upstream: Option<(Link, DemandRequest)>,
    pub states: BTreeMap<String, State>,
}

#[derive(Debug, Clone)]
struct Demand {
    ssrcs: BTreeSet<u32>,
    at: Instant,
}

#[derive(Debug, Clone)]
enum Upstream {
    Unknown,
    Up {
        at: Instant,
        chain: Vec<String>,
    },
    Down {
        message: String,
        last_ok: Option<Instant>,
    },
    Refused {
        message: String,
        last_ok: Option<Instant>,
    },
}

pub struct LinkManager {
    node: String,
    lapse: Duration,
    links: Vec<Link>,
    /// Local streams offered on down links without local subscribers (`[[stream]]`).
    offered: Vec<(SocketAddr, SocketAddr, u32)>,
    demand: BTreeMap<String, Demand>,
    upstream: Upstream,
    /// SSRCs this node has without its upstream, as of the last plan.
    local: BTreeSet<u32>,
    /// SSRCs our upstream said it serves us, as of its last answer.
    upstream_serving: BTreeSet<u32>,
}

/// SSRCs one demand may name: a trunk tree's streams, with room to spare; a bound on
/// what a holder of the secret can make a node keep.
pub const MAX_DEMAND: usize = 4096;

impl LinkManager {
    pub fn new(node: &str, lapse: Duration, offered: Vec<(SocketAddr, SocketAddr, u32)>) -> Self {
        LinkManager {
            node: node.to_string(),
            lapse,
            links: Vec::new(),
            offered,
            demand: BTreeMap::new(),
            upstream: Upstream::Unknown,
            local: BTreeSet::new(),
            upstream_serving: BTreeSet::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The links as the maps hold them now (the CLI may have changed them).
    pub fn set_links(&mut self, links: Vec<Link>) {
        self.demand.retain(|peer, _| {
            links
                .iter()
                .any(|l| l.peer == *peer && l.direction == Direction::Down)
        });
        let up = |ls: &[Link]| ls.iter().find(|l| l.direction == Direction::Up).cloned();
        if up(&links) != up(&self.links) {
            self.upstream = Upstream::Unknown;
            self.upstream_serving.clear();
        }
        self.links = links;
    }

    pub fn links(&self) -> &[Link] {
        &self.links
    }

    fn ancestors(&self) -> &[String] {
        match &self.upstream {
            Upstream::Up { chain, .. } => chain,
            _ => &[],
        }
    }

    /// A downstream node's demand for its link.
    pub fn on_demand(
        &mut self,
        peer: &str,
        req: DemandRequest,
        now: Instant,
    ) -> Result<DemandReply, Refusal> {
        if req.node != peer {
            return Err(Refusal {
                status: 400,
                message: format!(
                    "the request says it is from {} but names the link {peer}",
                    req.node
                ),
            });
        }
        if !self
            .links
            .iter()
            .any(|l| l.peer == peer && l.direction == Direction::Down)
        {
            return Err(Refusal {
                status: 404,
                message: format!(
                    "{} has no down link to {peer}: add one ([[link]] peer = \"{peer}\", \
                     direction = \"down\" in its config, or `edgefwd links add`)",
                    self.node
                ),
            });
        }
        if let Some(cycle) = cycle_through(&self.node, self.ancestors(), peer) {
            self.demand.remove(peer);
            return Err(Refusal {
                status: 409,
                message: format!("refused: the link would close a cycle: {cycle}"),
            });
        }
        if self.ancestors().len() + 1 >= MAX_DEPTH {
            return Err(Refusal {
                status: 409,
                message: format!(
                    "refused: the cascade above {peer} would be deeper than {MAX_DEPTH} nodes"
                ),
            });
        }
        if req.ssrcs.len() > MAX_DEMAND {
            return Err(Refusal {
                status: 413,
                message: format!(
                    "the demand names {} SSRCs; a link carries at most {MAX_DEMAND}",
                    req.ssrcs.len()
                ),
            });
        }
        let ssrcs: BTreeSet<u32> = req.ssrcs.into_iter().collect();
        // What we have, or our upstream sends us: not an echo of the demand. The rest
        // stays demanded (asked upstream) and is served once it arrives.
        let serving = ssrcs
            .iter()
            .copied()
            .filter(|s| self.local.contains(s) || self.upstream_serving.contains(s))
            .collect();
        self.demand
            .insert(peer.to_string(), Demand { ssrcs, at: now });
        let mut chain = vec![self.node.clone()];
        chain.extend(self.ancestors().iter().cloned());
        Ok(DemandReply {
            node: self.node.clone(),
            chain,
            serving,
        })
    }

    /// The upstream took our demand.
    pub fn upstream_ok(&mut self, reply: DemandReply, now: Instant) {
        let Some(up) = self.up_link() else {
            return;
        };
        if reply.node != up.peer {
            self.upstream_refused(format!(
                "{} answers as node {}, not {}: check the link's api address",
                up.api.map(|a| a.to_string()).unwrap_or_default(),
                reply.node,
                up.peer
            ));
            return;
        }
        if let Some(cycle) = cycle_through(&reply.node, &reply.chain[1..], &self.node) {
            self.upstream_refused(format!("refused: the link would close a cycle: {cycle}"));
            return;
        }
        if reply.chain.len() >= MAX_DEPTH {
            self.upstream_refused(format!(
                "refused: the cascade above would be deeper than {MAX_DEPTH} nodes"
            ));
            return;
        }
        self.upstream_serving = reply.serving.into_iter().collect();
        self.upstream = Upstream::Up {
            at: now,
            chain: reply.chain,
        };
    }

    fn last_ok(&self) -> Option<Instant> {
        match &self.upstream {
            Upstream::Up { at, .. } => Some(*at),
            Upstream::Down { last_ok, .. } | Upstream::Refused { last_ok, .. } => *last_ok,
            Upstream::Unknown => None,
        }
    }

    /// The upstream did not answer (connection, timeout).
    pub fn upstream_unreachable(&mut self, message: String) {
        self.upstream_serving.clear();
        self.upstream = Upstream::Down {
            message,
            last_ok: self.last_ok(),
        };
    }

    /// The upstream answered with a refusal (secret, unknown link, cycle).
    pub fn upstream_refused(&mut self, message: String) {
        self.upstream_serving.clear();
        self.upstream = Upstream::Refused {
            message,
            last_ok: self.last_ok(),
        };
    }

    fn up_link(&self) -> Option<&Link> {
        self.links.iter().find(|l| l.direction == Direction::Up)
    }

    /// What the maps should hold and what to ask upstream for, from the streams the
    /// maps hold now (and which of them this node has without its upstream, for the
    /// answers to demand).
    pub fn plan(&mut self, now: Instant, streams: &[Stream]) -> Plan {
        let mut plan = Plan::default();
        let down: Vec<&Link> = self
            .links
            .iter()
            .filter(|l| l.direction == Direction::Down)
            .collect();
        let is_trunk = |out_src: SocketAddr, out_dst: SocketAddr| {
            down.iter()
                .any(|l| (l.local, l.remote) == (out_src, out_dst))
        };
        let up = self.up_link().cloned();
        let up = up.as_ref();
        let fed_by_up = |listen: SocketAddr, source: SocketAddr| {
            up.is_some_and(|u| (u.local, u.remote) == (listen, source))
        };
        // Streams this node has without its upstream: configured ones, and any stream
        // in the maps that does not arrive on the up link.
        let mut local: BTreeMap<u32, BTreeSet<(SocketAddr, SocketAddr)>> = BTreeMap::new();
        for (l, s, ssrc) in &self.offered {
            local.entry(*ssrc).or_default().insert((*l, *s));
        }
        for s in streams {
            if !fed_by_up(s.listen, s.source) {
                local
                    .entry(s.ssrc)
                    .or_default()
                    .insert((s.listen, s.source));
            }
        }
        self.local = local.keys().copied().collect();
        let mut wanted_upstream: BTreeSet<u32> = BTreeSet::new();
        for l in &down {
            let fresh = self
                .demand
                .get(&l.peer)
                .filter(|d| now.saturating_duration_since(d.at) < self.lapse);
            let mut st = State {
                last_ok: self.demand.get(&l.peer).map(|d| d.at),
                ..Default::default()
            };
            match fresh {
                Some(d) => {
                    st.state = STATE_UP;
                    st.demand = d.ssrcs.len() as u32;
                    for ssrc in &d.ssrcs {
                        let mut from: BTreeSet<(SocketAddr, SocketAddr)> =
                            local.get(ssrc).cloned().unwrap_or_default();
                        if from.is_empty()
                            && let Some(u) = up
                        {
                            from.insert((u.local, u.remote));
                            wanted_upstream.insert(*ssrc);
                        }
                        for (listen, source) in from {
                            plan.trunks.insert(Trunk {
                                listen,
                                source,
                                ssrc: *ssrc,
                                out_src: l.local,
                                out_dst: l.remote,
                            });
                            st.copies += 1;
                        }
                    }
                }
                None if st.last_ok.is_some() => {
                    st.state = STATE_DOWN;
                    st.message = format!(
                        "no demand from {} for {} s: its trunk carries nothing until it asks again",
                        l.peer,
                        self.lapse.as_secs()
                    );
                }
                None => {
                    st.state = STATE_UNKNOWN;
                    st.message = format!("{} has not asked for anything yet", l.peer);
                }
            }
            plan.states.insert(l.peer.clone(), st);
        }
        if let Some(u) = up {
            // Our own subscribers on streams from upstream (trunk copies excluded: they
            // follow the downstream demand above, which is already counted).
            for s in streams {
                if fed_by_up(s.listen, s.source)
                    && s.copies
                        .iter()
                        .any(|(c, _)| !is_trunk(c.out_src, c.out_dst))
                {
                    wanted_upstream.insert(s.ssrc);
                }
            }
            let req = DemandRequest {
                node: self.node.clone(),
                ssrcs: wanted_upstream.iter().copied().collect(),
            };
            let mut st = State {
                demand: req.ssrcs.len() as u32,
                last_ok: self.last_ok(),
                ..Default::default()
            };
            match &self.upstream {
                Upstream::Unknown => {
                    st.state = STATE_UNKNOWN;
                    st.message = format!("not in contact with {} yet", u.peer);
                }
                Upstream::Up { .. } => st.state = STATE_UP,
                Upstream::Down { message, .. } => {
                    st.state = STATE_DOWN;
                    st.message = message.clone();
                }
                Upstream::Refused { message, .. } => {
                    st.state = STATE_REFUSED;
                    st.message = message.clone();
                }
            }
            plan.states.insert(u.peer.clone(), st);
            // Refused for a cycle: asking again would be refused again, but the
            // request is what notices a fixed config; keep sending.
            plan.upstream = Some((u.clone(), req));
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use forwarder_common::route_stats::RouteStats;

    use super::*;
    use crate::dataplane::maps::Route;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn down(peer: &str, local: &str, remote: &str) -> Link {
        Link {
            peer: peer.into(),
            direction: Direction::Down,
            local: a(local),
            remote: a(remote),
            api: None,
        }
    }

    fn up(peer: &str, local: &str, remote: &str) -> Link {
        Link {
            peer: peer.into(),
            direction: Direction::Up,
            local: a(local),
            remote: a(remote),
            api: Some(a("192.0.2.1:7000")),
        }
    }

    /// A stream in the maps with copies to these destinations.
    fn stream(listen: &str, source: &str, ssrc: u32, copies: &[(&str, &str)]) -> Stream {
        let copies = copies
            .iter()
            .map(|(src, dst)| {
                (
                    Route {
                        listen: a(listen),
                        source: a(source),
                        ssrc,
                        out_src: a(src),
                        out_dst: a(dst),
                        egress_ifindex: 0,
                        src_mac: [0; 6],
                        dst_mac: [0; 6],
                        ssrc_out: ssrc,
                        seq_delta: 0,
                        ts_delta: 0,
                        pt_remap: None,
                        vlan: None,
                    },
                    RouteStats::default(),
                )
            })
            .collect();
        Stream {
            listen: a(listen),
            source: a(source),
            ssrc,
            received: RouteStats::default(),
            fanout: false,
            copies,
        }
    }

    fn req(node: &str, ssrcs: &[u32]) -> DemandRequest {
        DemandRequest {
            node: node.into(),
            ssrcs: ssrcs.to_vec(),
        }
    }

    const PUB: (&str, &str) = ("192.0.2.2:5004", "192.0.2.9:40000");

    #[test]
    fn an_origin_sends_only_what_is_demanded_and_stops_when_demand_lapses() {
        let t0 = Instant::now();
        let mut m = LinkManager::new(
            "origin",
            Duration::from_secs(5),
            vec![(a(PUB.0), a(PUB.1), 1), (a(PUB.0), a(PUB.1), 2)],
        );
        m.set_links(vec![
            down("r1", "192.0.2.17:5004", "192.0.2.18:5004"),
            down("r2", "192.0.2.33:5004", "192.0.2.34:5004"),
        ]);
        let p = m.plan(t0, &[]);
        assert!(p.trunks.is_empty(), "no demand, no trunk copies");
        assert_eq!(p.states["r1"].state, STATE_UNKNOWN);
        assert!(p.upstream.is_none());

        let r = m.on_demand("r1", req("r1", &[2, 7]), t0).unwrap();
        assert_eq!(r.chain, vec!["origin".to_string()]);
        // r2 asks for nothing: an idle branch.
        m.on_demand("r2", req("r2", &[]), t0).unwrap();
        let p = m.plan(t0 + Duration::from_secs(1), &[]);
        let trunks: Vec<_> = p.trunks.iter().map(|t| (t.ssrc, t.out_dst)).collect();
        // SSRC 7 exists nowhere here, and there is no upstream to ask.
        assert_eq!(trunks, vec![(2, a("192.0.2.18:5004"))]);
        assert_eq!((p.states["r1"].state, p.states["r1"].demand), (STATE_UP, 2));
        assert_eq!((p.states["r2"].state, p.states["r2"].copies), (STATE_UP, 0));

        // r1 stops asking: after the lapse its copies go.
        let p = m.plan(t0 + Duration::from_secs(5), &[]);
        assert!(p.trunks.is_empty());
        assert_eq!(p.states["r1"].state, STATE_DOWN);
        assert!(
            p.states["r1"].message.contains("no demand from r1"),
            "{:?}",
            p.states["r1"]
        );
    }

    #[test]
    fn demand_is_refused_for_an_unknown_link_a_wrong_name_and_a_cycle() {
        let t0 = Instant::now();
        let mut m = LinkManager::new("b", Duration::from_secs(5), vec![]);
        m.set_links(vec![
            up("a", "192.0.2.18:5004", "192.0.2.17:5004"),
            down("c", "192.0.2.33:5004", "192.0.2.34:5004"),
        ]);
        let e = m.on_demand("x", req("x", &[1]), t0).unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e.message.contains("no down link to x"), "{}", e.message);
        assert_eq!(
            m.on_demand("c", req("d", &[1]), t0).unwrap_err().status,
            400
        );
        // a tells b its chain is [a, c]: c feeds a feeds b, so c asking b closes a cycle.
        m.upstream_ok(
            DemandReply {
                node: "a".into(),
                chain: vec!["a".into(), "c".into()],
                serving: vec![],
            },
            t0,
        );
        let e = m.on_demand("c", req("c", &[1]), t0).unwrap_err();
        assert_eq!(e.status, 409);
        assert!(e.message.contains("c -> a -> b -> c"), "{}", e.message);
        // An upstream whose chain holds us: we would be our own ancestor.
        m.upstream_ok(
            DemandReply {
                node: "a".into(),
                chain: vec!["a".into(), "b".into()],
                serving: vec![],
            },
            t0,
        );
        let p = m.plan(t0, &[]);
        assert_eq!(p.states["a"].state, STATE_REFUSED);
        assert!(
            p.states["a"].message.contains("b -> a -> b"),
            "{:?}",
            p.states["a"]
        );
        // An impostor at the api address.
        m.upstream_ok(
            DemandReply {
                node: "z".into(),
                chain: vec!["z".into()],
                serving: vec![],
            },
            t0,
        );
        assert!(
            m.plan(t0, &[]).states["a"]
                .message
                .contains("answers as node z")
        );
    }

    #[test]
    fn a_relay_asks_upstream_for_its_subscribers_and_its_downstreams_demand() {
        let t0 = Instant::now();
        let mut m = LinkManager::new("r1", Duration::from_secs(5), vec![]);
        let upl = up("origin", "192.0.2.18:5004", "192.0.2.17:5004");
        m.set_links(vec![
            upl.clone(),
            down("r2", "192.0.2.49:5004", "192.0.2.50:5004"),
        ]);
        // A local subscriber to SSRC 1 from upstream; a local publisher's SSRC 9.
        let streams = vec![
            stream(
                "192.0.2.18:5004",
                "192.0.2.17:5004",
                1,
                &[("192.0.2.145:6000", "192.0.2.146:6000")],
            ),
            stream(
                "192.0.2.81:5004",
                "192.0.2.89:4000",
                9,
                &[("192.0.2.145:6000", "192.0.2.147:6000")],
            ),
        ];
        let p = m.plan(t0, &streams);
        let (l, r) = p.upstream.clone().unwrap();
        assert_eq!(l, upl);
        assert_eq!(r, req("r1", &[1]));
        assert_eq!(p.states["origin"].state, STATE_UNKNOWN);
        // r2 wants 1 (already here), 2 (from upstream) and 9 (a local publisher).
        let r = m.on_demand("r2", req("r2", &[1, 2, 9]), t0).unwrap();
        assert_eq!(r.serving, vec![9], "only what this node has: no echo");
        let p = m.plan(t0, &streams);
        assert_eq!(p.upstream.unwrap().1, req("r1", &[1, 2]));
        let sources: Vec<_> = p
            .trunks
            .iter()
            .map(|t| (t.ssrc, t.listen, t.source))
            .collect();
        assert_eq!(
            sources,
            vec![
                (1, a("192.0.2.18:5004"), a("192.0.2.17:5004")),
                (2, a("192.0.2.18:5004"), a("192.0.2.17:5004")),
                (9, a("192.0.2.81:5004"), a("192.0.2.89:4000")),
            ]
        );
        // The local subscriber leaves; the trunk copy to r2 alone does not keep 1 wanted
        // by itself, r2's demand does.
        let only_trunk = vec![stream(
            "192.0.2.18:5004",
            "192.0.2.17:5004",
            1,
            &[("192.0.2.49:5004", "192.0.2.50:5004")],
        )];
        let later = t0 + Duration::from_secs(6);
        let p = m.plan(later, &only_trunk);
        assert!(p.trunks.is_empty(), "r2's demand lapsed");
        // What the upstream serves is served on: 1 (upstream serves it), not 2 or 77.
        m.upstream_ok(
            DemandReply {
                node: "origin".into(),
                chain: vec!["origin".into()],
                serving: vec![1],
            },
            later,
        );
        let r = m.on_demand("r2", req("r2", &[1, 2, 77]), later).unwrap();
        assert_eq!(r.serving, vec![1]);
        let many: Vec<u32> = (0..=MAX_DEMAND as u32).collect();
        assert_eq!(
            m.on_demand("r2", req("r2", &many), later)
                .unwrap_err()
                .status,
            413
        );
        assert_eq!(p.upstream.unwrap().1, req("r1", &[]));
        // Upstream unreachable: reported with the last good contact kept.
        m.upstream_ok(
            DemandReply {
                node: "origin".into(),
                chain: vec!["origin".into()],
                serving: vec![1],
            },
            t0,
        );
        m.upstream_unreachable("origin at 192.0.2.1:7000: connection refused".into());
        let p = m.plan(later, &[]);
        assert_eq!(p.states["origin"].state, STATE_DOWN);
        assert_eq!(p.states["origin"].last_ok, Some(t0));
    }
}
