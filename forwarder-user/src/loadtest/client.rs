//! One load-test client, publisher or subscriber: it joins through the gate (real
//! ICE, DTLS, SRTP), sends stamped media or counts what arrives, keeps consent, and
//! leaves with DELETE.

use super::*;

pub(super) struct Client {
    pub(super) target: Arc<Target>,
    pub(super) identity: Arc<Identity>,
    pub(super) live: Arc<Live>,
    pub(super) epoch: Instant,
    pub(super) room: usize,
    pub(super) room_name: String,
    pub(super) timeout: Duration,
}

/// Consent freshness (RFC 7675): a check every couple of seconds.
const CONSENT_INTERVAL: Duration = Duration::from_secs(2);

impl Client {
    async fn join(&self, gate: &Semaphore, role: Role, sources: usize) -> Result<Joined, Failure> {
        let _permit = gate.acquire().await.expect("the gate is never closed");
        let r = peer::join(
            &self.target,
            role,
            &self.room_name,
            sources,
            &self.identity,
            self.timeout,
            self.live.dtls_conns.clone(),
        )
        .await;
        let counter = match (&r, role) {
            (Err(_), _) => &self.live.failed,
            (Ok(_), Role::Publisher) => &self.live.joined_publishers,
            (Ok(_), Role::Subscriber) => &self.live.joined_subscribers,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// DELETE through the same gate as the joins: the SFU caps HTTP connections per
    /// source, and a whole run leaving at once would exceed it.
    /// The server frees a connection's slot only once it sees the close, so a burst of
    /// DELETEs on fresh connections can still meet the per-source cap (a 503, or the
    /// connection closed before the answer is read): retried, as a well-behaved client
    /// would, until the server's idle timeout has freed the slots; a 4xx is final.
    async fn leave(
        &self,
        gate: &Semaphore,
        node: std::net::SocketAddr,
        resource: &str,
    ) -> Result<(), String> {
        // At the node that took the offer (another one after a redirect).
        let at = Target {
            http: node,
            token: self.target.token.clone(),
            edges: false,
        };
        let _permit = gate.acquire().await.expect("the gate is never closed");
        // Up to the server's own idle-connection timeout (10 s by default), by when
        // any connection still counted against us has been closed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
        loop {
            match peer::leave(&at, resource).await {
                // A 4xx is an answer (e.g. already gone); a 503 or a connection the
                // server closed at its cap before answering ("canceled") is not.
                Err(e) if !is_4xx(&e) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                r => return r,
            }
        }
    }

    /// Leaves (DELETE) and closes DTLS; what the outcome keeps of the session.
    async fn finish(
        &self,
        gate: &Semaphore,
        j: Joined,
    ) -> (
        Result<Duration, Failure>,
        Option<&'static str>,
        Result<(), String>,
    ) {
        let left = self.leave(gate, j.node, &j.resource).await;
        let _ = j.dtls.close().await;
        (Ok(j.join_time), Some(j.profile.name()), left)
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub(super) async fn publisher(
        self,
        gate: Arc<Semaphore>,
        track: u32,
        kbps: u32,
        talk: Option<Talk>,
        mut stop: watch::Receiver<bool>,
        joined: tokio::sync::oneshot::Sender<bool>,
    ) -> Outcome {
        let mut j = match self.join(&gate, Role::Publisher, 1).await {
            Ok(j) => j,
            Err(f) => {
                let _ = joined.send(false);
                return Outcome::failed(Role::Publisher, self.room, f);
            }
        };
        let _ = joined.send(true);
        let mut audio = Audio {
            stream: Stream::new(j.ssrcs[0], peer::OPUS_PT, track),
            talk,
        };
        let mut video = Video::new(Stream::new(j.ssrcs[1], peer::VP8_PT, track + 1), kbps);
        let overhead = j.profile.rtp_overhead();
        let mut out = vec![0u8; traffic::MAX_PAYLOAD * 2 + 64];
        let mut buf = vec![0u8; 2048];
        let (mut next_audio, mut next_video) =
            (tokio::time::Instant::now(), tokio::time::Instant::now());
        let mut next_consent = tokio::time::Instant::now() + CONSENT_INTERVAL;
        let mut plis = 0;
        let live = self.live.clone();
        loop {
            let due = next_audio.min(next_video).min(next_consent);
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(due) => {
                    let now = tokio::time::Instant::now();
                    let now_ns = self.now_ns();
                    if now >= next_audio {
                        let n = audio.next(&mut out, now_ns);
                        send_srtp(&j.sock, &mut j.tx, &mut out, n, overhead, &live).await;
                        next_audio += traffic::AUDIO_INTERVAL;
                    }
                    if now >= next_video {
                        let mut frame = Vec::new();
                        video.next_frame(&mut out, now_ns, |b, len| frame.push(b[..len].to_vec()));
                        for mut p in frame {
                            let n = p.len();
                            p.resize(n + overhead, 0);
                            send_srtp(&j.sock, &mut j.tx, &mut p, n, overhead, &live).await;
                        }
                        next_video += Video::frame_interval();
                    }
                    if now >= next_consent {
                        let _ = j.sock.send(&crate::webrtc::ice::binding_request(&j.ice_user, &j.ice_pwd, false)).await;
                        next_consent += CONSENT_INTERVAL;
                    }
                    // Behind by more than a frame (an overloaded machine): skip, don't burst.
                    let late = now.checked_duration_since(next_video).unwrap_or_default();
                    if late > Video::frame_interval() {
                        next_video = now + Video::frame_interval();
                        next_audio = now + traffic::AUDIO_INTERVAL;
                    }
                }
                r = j.sock.recv(&mut buf) => if let Ok(n) = r {
                    match classify_datagram(&buf[..n]) {
                        Class::Rtcp => if let Ok(len) = j.rx.unprotect_rtcp(&mut buf[..n]) {
                            for req in rtcp::parse(&buf[..len]).unwrap_or_default() {
                                if matches!(req, rtcp::Request::KeyFrame { .. }) {
                                    video.key_requested = true;
                                    plis += 1;
                                }
                            }
                        },
                        Class::Dtls => { let _ = j.dtls_in.try_send(buf[..n].to_vec()); }
                        _ => {}
                    }
                },
            }
        }
        let (join, profile, left) = self.finish(&gate, j).await;
        Outcome {
            role: Role::Publisher,
            room: self.room,
            join,
            profile,
            sent: [&audio.stream, &video.stream]
                .map(|s| (s.track, s.packets, s.last_ns))
                .to_vec(),
            joined_ns: 0,
            keyframes: video.keyframes,
            plis,
            received: HashMap::new(),
            given: 0,
            left,
        }
    }

    pub(super) async fn subscriber(
        self,
        gate: Arc<Semaphore>,
        sources: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Outcome {
        if sources == 0 {
            self.live.failed.fetch_add(1, Ordering::Relaxed);
            return Outcome::failed(
                Role::Subscriber,
                self.room,
                Failure {
                    stage: "no_publisher",
                    detail: format!("no publisher of room {} joined", self.room_name),
                },
            );
        }
        let mut j = match self.join(&gate, Role::Subscriber, sources).await {
            Ok(j) => j,
            Err(f) => return Outcome::failed(Role::Subscriber, self.room, f),
        };
        let joined_ns = self.now_ns();
        let mut received: HashMap<u32, Received> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        let mut consent = tokio::time::interval(CONSENT_INTERVAL);
        let live = self.live.clone();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = consent.tick() => {
                    let _ = j.sock.send(&crate::webrtc::ice::binding_request(&j.ice_user, &j.ice_pwd, false)).await;
                }
                r = j.sock.recv(&mut buf) => if let Ok(n) = r {
                    match classify_datagram(&buf[..n]) {
                        Class::Rtp => if let Ok(len) = j.rx.unprotect_rtp(&mut buf[..n]) {
                            let rtp = &buf[..len];
                            let Ok(h) = header_len(rtp) else { continue };
                            if let Some(s) = Stamp::read(&rtp[h..]) {
                                let payload = len - h;
                                let grew = received.entry(s.track).or_default().on_packet(s, payload, self.now_ns());
                                live.received.fetch_add(1, Ordering::Relaxed);
                                live.expected.fetch_add(grew, Ordering::Relaxed);
                                live.received_bytes.fetch_add(payload as u64, Ordering::Relaxed);
                            }
                        },
                        Class::Dtls => { let _ = j.dtls_in.try_send(buf[..n].to_vec()); }
                        _ => {}
                    }
                },
            }
        }
        let (join, profile, left) = self.finish(&gate, j).await;
        Outcome {
            role: Role::Subscriber,
            room: self.room,
            join,
            profile,
            sent: vec![],
            joined_ns,
            keyframes: 0,
            plis: 0,
            received,
            given: 2 * sources,
            left,
        }
    }
}
