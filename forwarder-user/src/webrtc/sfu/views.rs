//! What the SFU shows of itself: its Prometheus series (sessions, media events and
//! drops by reason, AF_XDP queues, viewers by layer and estimate, the media path) and
//! the JSON snapshot of rooms and sessions served at `/api/sessions`. Each engine is
//! read under its own lock, one at a time; labels are built outside the locks.

use super::*;

impl Sfu {
    /// Prometheus text: counters by name, drops by reason, sessions by role.
    /// Registers the WebRTC series (sessions, media socket events and drops, AF_XDP
    /// queues, the media path) in `registry`: the one registry of a scrape.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> anyhow::Result<()> {
        use prometheus::{IntCounterVec, IntGaugeVec, Opts};
        let c = &self.counters;
        let events = IntCounterVec::new(
            Opts::new(
                "edgefwd_webrtc_events_total",
                "WebRTC media socket events by kind",
            ),
            &["event"],
        )?;
        for (name, v) in [
            ("stun_answered", &c.stun_answered),
            ("stun_refused", &c.stun_refused),
            ("stun_probes", &c.stun_probes),
            ("rtp_in", &c.rtp_in),
            ("rtp_out", &c.rtp_out),
            ("relay_out", &c.relay_out),
            ("rtcp_in", &c.rtcp_in),
            ("rtcp_out", &c.rtcp_out),
            ("nack_resent", &c.nack_resent),
            ("transport_feedback", &c.transport_feedback),
            ("bwe_probes", &c.bwe_probes),
            ("bwe_failed_probes", &c.bwe_failed_probes),
            ("bwe_delay_overuses", &c.bwe_delay_overuses),
            ("bwe_padding_packets", &c.bwe_padding),
            ("speaker_changes", &c.speaker_changes),
            ("keyframe_requests", &c.keyframe_requests),
            ("dtls_handshakes", &c.dtls_handshakes),
            ("dtls_fragmented_hellos", &c.dtls_fragmented_hellos),
        ] {
            events
                .with_label_values(&[name])
                .inc_by(v.load(Ordering::Relaxed));
        }
        let drops = IntCounterVec::new(
            Opts::new(
                "edgefwd_webrtc_drops_total",
                "Datagrams the WebRTC media socket dropped, by reason",
            ),
            &["reason"],
        )?;
        for d in Drop::ALL {
            drops
                .with_label_values(&[d.name()])
                .inc_by(c.drops[d as usize].load(Ordering::Relaxed));
        }
        let sessions = IntGaugeVec::new(
            Opts::new(
                "edgefwd_webrtc_sessions",
                "Live WebRTC sessions by role and DTLS state",
            ),
            &["role", "connected"],
        )?;
        {
            let down = self.upstreams_down();
            let st = self.state.lock().unwrap();
            for s in st.sessions.values() {
                let role = match (s.role, s.relay.is_some()) {
                    (Role::Publisher, true) => "relayed_publisher",
                    (Role::Publisher, false) => "publisher",
                    (Role::Subscriber, _) => "subscriber",
                    (Role::Relay, _) => "relay",
                };
                sessions
                    .with_label_values(&[role, if connected(s, &down) { "true" } else { "false" }])
                    .inc();
            }
        }
        let relays = IntGaugeVec::new(
            Opts::new(
                "edgefwd_webrtc_relays_out",
                "Publishers this node relays to downstream nodes, by node",
            ),
            &["node"],
        )?;
        let upstream = IntGaugeVec::new(
            Opts::new(
                "edgefwd_webrtc_upstream_up",
                "Whether every room this node relays from the upstream node answered its last request (1) or not (0)",
            ),
            &["node"],
        )?;
        if let Some(c) = self.cascade.get() {
            for r in self.state.lock().unwrap().relays_out.values() {
                relays.with_label_values(&[r.node.as_str()]).inc();
            }
            let mut up: BTreeMap<String, bool> = BTreeMap::new();
            for s in c.status.lock().unwrap().values() {
                *up.entry(s.node.clone()).or_insert(true) &= s.up;
            }
            for (node, ok) in up {
                upstream.with_label_values(&[node.as_str()]).set(ok as i64);
            }
        }
        registry.register(Box::new(relays))?;
        registry.register(Box::new(upstream))?;
        if let Some(t) = self.ice_tcp.get() {
            self.register_ice_tcp(registry, t)?;
        }
        if let Some(c) = self.cascade.get() {
            use std::sync::atomic::Ordering::Relaxed;
            for (name, help, v) in [
                (
                    "edgefwd_cluster_redis_up",
                    "Whether this node's last lease renewal reached the cluster's Redis (1) or not (0)",
                    c.health.redis_up.load(Relaxed) as i64,
                ),
                (
                    "edgefwd_cluster_nodes_live",
                    "Live nodes in the cluster's Redis (leases) at this node's last count",
                    c.health.live_nodes.load(Relaxed) as i64,
                ),
                (
                    "edgefwd_cluster_rooms_origin",
                    "Rooms this node holds as origin in the cluster's directory",
                    self.rooms_held() as i64,
                ),
                (
                    "edgefwd_cluster_suspects",
                    "Nodes this node suspects dead now (their probes unanswered for 300 ms while it takes rooms from them)",
                    c.avoid().len() as i64,
                ),
                (
                    "edgefwd_cluster_suspicions",
                    "Times this node suspected a parent dead since it started",
                    c.suspicions.load(Relaxed) as i64,
                ),
            ] {
                let g = prometheus::IntGauge::new(name, help)?;
                g.set(v);
                registry.register(Box::new(g))?;
            }
            let chosen = IntCounterVec::new(
                Opts::new(
                    "edgefwd_edge_chosen_total",
                    "Viewers' reports: the node each chose after racing probes (/v1/edges), by node",
                ),
                &["node"],
            )?;
            let probes = IntCounterVec::new(
                Opts::new(
                    "edgefwd_edge_probe_rtt_count",
                    "Viewers' probe round trips reported, by the node probed",
                ),
                &["node"],
            )?;
            let rtt_sum = prometheus::GaugeVec::new(
                Opts::new(
                    "edgefwd_edge_probe_rtt_ms_sum",
                    "Sum of the viewers' reported probe round trips in ms, by the node probed (divide by _count)",
                ),
                &["node"],
            )?;
            for (node, s) in c.edge_stats.lock().unwrap().iter() {
                chosen.with_label_values(&[node.as_str()]).inc_by(s.chosen);
                probes.with_label_values(&[node.as_str()]).inc_by(s.probes);
                rtt_sum
                    .with_label_values(&[node.as_str()])
                    .set(s.rtt_ms_sum);
            }
            registry.register(Box::new(chosen))?;
            registry.register(Box::new(probes))?;
            registry.register(Box::new(rtt_sum))?;
        }
        let conns = prometheus::IntGauge::new(
            "edgefwd_webrtc_dtls_connections",
            "DTLS connections whose tasks are alive (past the ClientHello)",
        )?;
        conns.set(c.dtls_conns.load(Ordering::Relaxed) as i64);
        let path = IntGaugeVec::new(
            Opts::new(
                "edgefwd_webrtc_media_path",
                "The data path WebRTC media takes (1), with why or how",
            ),
            &["path", "detail"],
        )?;
        path.with_label_values(&[self.path.path, self.path.detail.as_str()])
            .set(1);
        let xsk = IntCounterVec::new(
            Opts::new(
                "edgefwd_webrtc_xsk_frames_total",
                "Frames through the AF_XDP sockets of the WebRTC workers, by queue and event",
            ),
            &["queue", "event"],
        )?;
        for (q, st) in self.engines.xsk_stats() {
            for (name, v) in st.named() {
                xsk.with_label_values(&[q.to_string().as_str(), name])
                    .inc_by(v);
            }
        }
        // Simulcast viewers by the layer they get and what holds them below the top:
        // a cap (the API), their bandwidth, a pause, or nothing.
        let layers = IntGaugeVec::new(
            Opts::new(
                "edgefwd_webrtc_viewer_layers",
                "Simulcast and SVC down-tracks by the layer they get (encoding, or spatial layer) and what limits it (none, cap, bandwidth, paused)",
            ),
            &["layer", "limited_by"],
        )?;
        // Viewers' bandwidth estimates as cumulative buckets (a per-viewer series
        // would grow with the audience).
        let estimates = IntGaugeVec::new(
            Opts::new(
                "edgefwd_webrtc_viewer_estimates",
                "Video down-tracks whose bandwidth estimate (the lower of the loss- and delay-based ones) is at most `le` bits/s; le=\"+Inf\" counts them all, limited or not",
            ),
            &["le"],
        )?;
        const BUCKETS: [u64; 6] = [100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000];
        for b in BUCKETS {
            estimates
                .with_label_values(&[b.to_string().as_str()])
                .set(0);
        }
        // Per shard: its numbers read under its lock (no label work there), then
        // counted into the series.
        for i in 0..self.shards() {
            let now = Instant::now();
            let (ests, viewers) = self.with_shard(i, |engine, _| {
                let ests: Vec<Option<u64>> = engine
                    .tracks()
                    .filter(|t| t.kind == Kind::Video)
                    .flat_map(|t| &t.downs)
                    .map(|d| [d.bwe.estimate, d.bwe.delay].into_iter().flatten().min())
                    .collect();
                (ests, Self::viewer_layers(engine, now))
            });
            for est in ests {
                estimates.with_label_values(&["+Inf"]).inc();
                for b in BUCKETS.iter().filter(|b| est.is_some_and(|e| e <= **b)) {
                    estimates.with_label_values(&[b.to_string().as_str()]).inc();
                }
            }
            for (layer, why) in viewers {
                let layer = layer.map_or("none".to_string(), |c| c.to_string());
                layers.with_label_values(&[layer.as_str(), why]).inc();
            }
        }
        registry.register(Box::new(layers))?;
        registry.register(Box::new(estimates))?;
        registry.register(Box::new(path))?;
        registry.register(Box::new(xsk))?;
        registry.register(Box::new(events))?;
        registry.register(Box::new(drops))?;
        registry.register(Box::new(sessions))?;
        registry.register(Box::new(conns))?;
        Ok(())
    }

    /// Per video down-track of a shard's engine: the layer it gets now and what
    /// holds it below the top ("none", "cap", "bandwidth", "paused").
    pub(super) fn viewer_layers(engine: &Engine, now: Instant) -> Vec<(Option<u8>, &'static str)> {
        let mut out = Vec::new();
        for t in engine.tracks() {
            // Simulcast: the encodings; one scalable encoding: its spatial layers.
            let spatial = t.streams[0].seen.top(now, LAYER_IDLE).0;
            let top = match t.streams.len() {
                1 if spatial > 0 => spatial,
                1 => continue,
                n => n as u8 - 1,
            };
            for d in &t.downs {
                let l = &d.layering;
                let why = if l.paused {
                    "paused"
                } else if l.cap() >= top {
                    "none"
                } else if l.bw_limit <= l.max_layer {
                    "bandwidth"
                } else {
                    "cap"
                };
                let on = match t.streams.len() {
                    1 => l.got((spatial, 0)).map(|g| g.0),
                    _ => l.current,
                };
                out.push((on, why));
            }
        }
        out
    }

    /// The WebRTC series alone, as exposition text (unit tests).
    #[cfg(test)]
    pub(super) fn render_metrics(&self) -> anyhow::Result<String> {
        use prometheus::Encoder as _;
        let registry = prometheus::Registry::new();
        self.register_metrics(&registry)?;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }

    /// Rooms whose upstream did not answer its last refresh (taken before the state
    /// lock, and let go: never both at once).
    /// ICE-TCP: connections open, refusals by reason, datagrams a slow reader lost.
    fn register_ice_tcp(
        &self,
        registry: &prometheus::Registry,
        t: &super::super::tcp::IceTcp,
    ) -> anyhow::Result<()> {
        use super::super::tcp::Refusal;
        use prometheus::{IntCounter, IntCounterVec, Opts};
        use std::sync::atomic::Ordering::Relaxed;
        let open = prometheus::IntGauge::new(
            "edgefwd_webrtc_ice_tcp_connections",
            "ICE-TCP connections open now (clients whose networks block UDP)",
        )?;
        open.set(t.open() as i64);
        registry.register(Box::new(open))?;
        let accepted = IntCounter::new(
            "edgefwd_webrtc_ice_tcp_accepted_total",
            "ICE-TCP connections accepted under the caps",
        )?;
        accepted.inc_by(t.accepted.load(Relaxed));
        registry.register(Box::new(accepted))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "edgefwd_webrtc_ice_tcp_refused_total",
                "ICE-TCP connections refused or closed early, by reason",
            ),
            &["reason"],
        )?;
        for r in Refusal::ALL {
            refused.with_label_values(&[r.name()]).inc_by(t.refused(r));
        }
        registry.register(Box::new(refused))?;
        let drops = IntCounter::new(
            "edgefwd_webrtc_ice_tcp_queue_drops_total",
            "Datagrams dropped towards ICE-TCP clients that read too slowly",
        )?;
        drops.inc_by(t.queue_drops.load(Relaxed));
        registry.register(Box::new(drops))?;
        Ok(())
    }

    fn upstreams_down(&self) -> std::collections::BTreeSet<String> {
        self.cascade
            .get()
            .map(|c| {
                let status = c.status.lock().unwrap();
                status
                    .iter()
                    .filter(|(_, u)| !u.up)
                    .map(|(r, _)| r.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A JSON view of the state model (the `/api/sessions` body).
    pub fn snapshot(&self) -> serde_json::Value {
        let cascade = self.cascade_snapshot();
        let down = self.upstreams_down();
        let tcp = self.ice_tcp.get();
        let tcp_client = |s: &Session| -> Option<SocketAddr> {
            tcp.and_then(|t| t.client_of(&s.nominated.or(s.addrs.first().copied())?))
        };
        let st = self.state.lock().unwrap();
        // Which layers are present now (the engines themselves never read the clock).
        let now = Instant::now();
        let mut rooms = serde_json::Map::new();
        for (name, r) in &st.rooms {
            let sessions: Vec<_> = r
                .publishers
                .iter()
                .chain(&r.subscribers)
                .filter_map(|id| st.sessions.get(id))
                // One session at a time under its shard's lock: a large room's view
                // never holds an engine for more than one session's worth.
                .map(|s| self.with_shard(self.shard_of(s.media), |engine, _| {
                    serde_json::json!({
                        "id": s.id,
                        "shard": self.shard_of(s.media),
                        "role": s.role,
                        "upstream": s.relay.as_ref().map(|r| &r.node),
                        "connected": connected(s, &down),
                        "srtp_profile": s.profile.map(|p| p.name()),
                        "client_hello_datagrams": s.hello.as_ref().map(|h| h.0),
                        "client_srtp_profiles": s.hello.as_ref().map(|h| h.1.iter().map(|p| dtls::profile_name(*p)).collect::<Vec<_>>()),
                        "nominated": s.nominated.map(|a| a.to_string()),
                        "addrs": s.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                        // ICE over TCP: the session's peer is a leg, the client behind it.
                        "transport": if tcp_client(s).is_some() { "tcp" } else { "udp" },
                        "tcp_client": tcp_client(s).map(|a| a.to_string()),
                        "tracks": s.tracks.iter().map(|t| {
                            let m = engine.track(t.media);
                            serde_json::json!({
                                "kind": t.kind, "mid": t.mid, "codec": t.codec.name, "pt": t.codec.pt,
                                "ssrc": m.and_then(|m| m.ssrc()).or(t.streams[0].1),
                                "packets": m.map_or(0, |m| m.totals().0), "bytes": m.map_or(0, |m| m.totals().1),
                                // Simulcast: each encoding, lowest first.
                                // What we never received of it (RFC 3550 A.3), all encodings.
                                "lost": m.map_or(0, |m| m.streams.iter().map(|st| st.reception.lost() as u64).sum::<u64>()),
                                "layers": m.filter(|m| m.streams.len() > 1).map(|m| m.streams.iter().map(|st| serde_json::json!({
                                    "rid": st.rid, "ssrc": st.ssrc, "packets": st.packets, "bytes": st.bytes, "lost": st.reception.lost(), "rate_bps": st.rate_bps,
                                    "top_layers": st.seen.top(now, LAYER_IDLE),
                                })).collect::<Vec<_>>()),
                                // The highest spatial and temporal layer its packets show
                                // ([0, 0]: not scalable), and each spatial layer's rate.
                                "top_layers": m.map(|m| m.streams[0].seen.top(now, LAYER_IDLE)),
                                "spatial_rates_bps": m.filter(|m| m.streams.len() == 1).map(|m| m.streams[0].seen.rates),
                            })
                        }).collect::<Vec<_>>(),
                        // A viewer's transport as its transport-wide feedback shows it.
                        "transport_cc": engine.transport_cc(s.media).map(|t| serde_json::json!({
                            "received_bps": t.received_bps, "estimate_bps": t.estimate,
                            "usage": t.usage, "trend": t.trend, "overuses": t.overuses,
                        })),
                        "downtracks": engine.downtracks(s.media).iter().map(|(tid, d)| (s.downtracks.iter().find(|x| x.track == *tid), tid, d)).map(|(sub, tid, d)| {
                            let got = d.layering.got(engine.track(*tid).map_or((0, 0), |t| t.streams[d.layer() as usize].seen.top(now, LAYER_IDLE)));
                            serde_json::json!({
                            "kind": sub.map(|x| x.kind),
                            "from_session": sub.map(|x| &x.src_session),
                            "ssrc_out": d.ssrc_out(), "pt_out": d.route.pt_to,
                            "seq_delta": d.route.seq_delta, "ts_delta": d.route.ts_delta,
                            "packets": d.packets, "payload_octets": d.octets, "nack_resent": d.nack_resent,
                            "mid": sub.map(|x| &x.mid),
                            "layer": d.layering.current, "target_layer": d.layering.target,
                            "max_layer": (d.layering.max_layer != UNCAPPED).then_some(d.layering.max_layer),
                            "max_temporal": (d.layering.max_temporal != UNCAPPED).then_some(d.layering.max_temporal),
                            // Of a scalable encoding (VP9 SVC, VP8 temporal layers):
                            // the highest spatial and temporal layer it gets.
                            "spatial_layer": got.map(|g| g.0), "temporal_layer": got.map(|g| g.1),
                            "paused": d.layering.paused, "layer_switches": d.layering.switches,
                            "layers": engine.track(*tid).map_or(1, |t| t.streams.len()),
                            // From the subscriber's receiver reports (none yet: null).
                            "reports": d.quality.reports,
                            "loss_percent": (d.quality.reports > 0).then(|| d.quality.loss_percent()),
                            "total_lost": (d.quality.reports > 0).then_some(d.quality.total_lost),
                            "jitter_ms": (d.quality.reports > 0).then_some(d.quality.jitter.as_secs_f64() * 1e3),
                            "rtt_ms": d.quality.rtt.map(|r| r.as_secs_f64() * 1e3),
                            // The loss-based estimate and the layer limit it sets
                            // (simulcast; null: no limit).
                            "send_rate_bps": d.bwe.send_rate,
                            "estimate_bps": d.bwe.estimate, "remb_bps": d.bwe.remb,
                            "delay_estimate_bps": d.bwe.delay, "padding_bps": d.bwe.padding(),
                            "bw_limit": (d.layering.bw_limit != UNCAPPED).then_some(d.layering.bw_limit),
                            "probes": d.bwe.probes, "failed_probes": d.bwe.failed_probes,
                        })}).collect::<Vec<_>>(),
                    })
                }))
                .collect();
            rooms.insert(name.clone(), serde_json::Value::Array(sessions));
        }
        let c = &self.counters;
        let drops: serde_json::Map<String, serde_json::Value> = Drop::ALL
            .iter()
            .map(|d| {
                (
                    d.name().to_string(),
                    c.drops[*d as usize].load(Ordering::Relaxed).into(),
                )
            })
            .collect();
        let xsk: Vec<_> = self
            .engines
            .xsk_stats()
            .into_iter()
            .map(|(q, st)| serde_json::json!({"queue": q, "stats": st}))
            .collect();
        serde_json::json!({
            "media_path": self.path,
            // Engines (one per AF_XDP queue and core); a room's sessions share one.
            "shards": self.shards(),
            "cascade": cascade,
            "xsk": xsk,
            "rooms": rooms,
            // Per room, the publisher session that speaks (RFC 6464 audio levels).
            "active_speakers": self.speakers.lock().unwrap().iter()
                .filter_map(|(r, d)| Some((r.clone(), serde_json::Value::from(d.current.clone()?))))
                .collect::<serde_json::Map<_, _>>(),
            "counters": {
                "stun_answered": c.stun_answered.load(Ordering::Relaxed),
                "stun_refused": c.stun_refused.load(Ordering::Relaxed),
                "stun_probes": c.stun_probes.load(Ordering::Relaxed),
                "rtp_in": c.rtp_in.load(Ordering::Relaxed),
                "rtp_out": c.rtp_out.load(Ordering::Relaxed),
                "relay_out": c.relay_out.load(Ordering::Relaxed),
                "rtcp_in": c.rtcp_in.load(Ordering::Relaxed),
                "rtcp_out": c.rtcp_out.load(Ordering::Relaxed),
                "nack_resent": c.nack_resent.load(Ordering::Relaxed),
                "transport_feedback": c.transport_feedback.load(Ordering::Relaxed),
                "bwe_probes": c.bwe_probes.load(Ordering::Relaxed),
                "bwe_failed_probes": c.bwe_failed_probes.load(Ordering::Relaxed),
                "bwe_delay_overuses": c.bwe_delay_overuses.load(Ordering::Relaxed),
                "bwe_padding_packets": c.bwe_padding.load(Ordering::Relaxed),
                "speaker_changes": c.speaker_changes.load(Ordering::Relaxed),
                "keyframe_requests": c.keyframe_requests.load(Ordering::Relaxed),
                "dtls_handshakes": c.dtls_handshakes.load(Ordering::Relaxed),
                "dtls_fragmented_hellos": c.dtls_fragmented_hellos.load(Ordering::Relaxed),
                "dtls_conns": c.dtls_conns.load(Ordering::Relaxed),
                "drops": drops,
            }
        })
    }
}

/// Whether a session is connected: keyed by DTLS (or, relayed, by its upstream's
/// handover) and, for a relayed publisher, its upstream answering (one whose node
/// died is not connected, though its keys stay until the room's relay ends).
fn connected(s: &Session, upstreams_down: &std::collections::BTreeSet<String>) -> bool {
    s.profile.is_some() && !(s.relay.is_some() && upstreams_down.contains(&s.room))
}
