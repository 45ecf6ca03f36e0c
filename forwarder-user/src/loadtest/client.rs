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
    /// No progress lines (`--quiet`).
    pub(super) quiet: bool,
}

/// Consent freshness (RFC 7675): a check every couple of seconds.
const CONSENT_INTERVAL: Duration = Duration::from_secs(2);

/// A subscriber that chose its node through `/v1/edges` and gets nothing for this
/// long joins another node, as the page does (its node may be gone).
const STALL: Duration = Duration::from_secs(1);

/// With `--failover`, publishers check consent this often (a silent node shows fast).
const FAILOVER_CONSENT: Duration = Duration::from_millis(250);

/// New sessions a subscriber tries after a stall before it gives up.
const RECONNECT_TRIES: u32 = 5;

/// A publisher's new session being made while it still sends on its old one.
type Joining<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Joined, Failure>> + Send + 'a>>;

/// A publisher told to move sends to its old session as well for this long (the
/// draining node's hand-off: it ends the session then), so the nodes below switch to
/// the room's new origin while the old one still has the media.
const MOVE_OVERLAP: Duration = Duration::from_secs(4);

impl Client {
    async fn join(&self, gate: &Semaphore, role: Role, sources: usize) -> Result<Joined, Failure> {
        let r = self.join_again(gate, role, sources).await;
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
            failover: false,
            tcp: false,
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
        let first_join = (j.join_time, Some(j.profile.name()));
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
        let failover = self.target.failover;
        // With failover: consent checks often, so a silent node shows within a second.
        let consent_every = if failover {
            FAILOVER_CONSENT
        } else {
            CONSENT_INTERVAL
        };
        let mut next_consent = tokio::time::Instant::now() + consent_every;
        let mut last_heard = tokio::time::Instant::now();
        let mut plis = 0;
        let mut reconnects = 0;
        let live = self.live.clone();
        let mut moved = self.publisher_moves(&j);
        // Told to move: the new session being made (media goes on meanwhile), then the
        // old session it still sends to, until when.
        let mut joining: Option<Joining<'_>> = None;
        let mut old: Option<(Joined, tokio::time::Instant)> = None;
        loop {
            let due = next_audio.min(next_video).min(next_consent);
            let old_until = old.as_ref().map(|o| o.1);
            tokio::select! {
                _ = stop.changed() => break,
                _ = &mut moved, if joining.is_none() => {
                    // Its node drains: publish again at the room's next node while the
                    // old session still carries the media (make-before-break).
                    joining = Some(Box::pin(self.join_again(&gate, Role::Publisher, 1)));
                    moved = tokio::spawn(std::future::pending());
                }
                r = async { joining.as_mut().expect("guarded").await }, if joining.is_some() => {
                    let n = match r {
                        Ok(n) => n,
                        Err(f) => {
                            if !self.quiet {
                                eprintln!("edgefwd load-test: publishing {} again: {}", self.room_name, f.detail);
                            }
                            let (me, gate) = (&self, &gate);
                            joining = Some(Box::pin(async move {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                me.join_again(gate, Role::Publisher, 1).await
                            }));
                            continue;
                        }
                    };
                    joining = None;
                    let was = std::mem::replace(&mut j, n);
                    if let Some((o, _)) = old.replace((was, tokio::time::Instant::now() + MOVE_OVERLAP)) {
                        self.abandon(o);
                    }
                    audio.stream.ssrc = j.ssrcs[0];
                    video.stream.ssrc = j.ssrcs[1];
                    video.key_requested = true;
                    reconnects += 1;
                    last_heard = tokio::time::Instant::now();
                    moved = self.publisher_moves(&j);
                }
                _ = tokio::time::sleep_until(old_until.unwrap_or(due)), if old_until.is_some() => {
                    if let Some((o, _)) = old.take() {
                        self.abandon(o);
                    }
                }
                _ = tokio::time::sleep_until(last_heard + STALL), if failover => {
                    // Its node is silent (gone?): publish again where the cluster puts
                    // the room now; the streams' stamps go on, so viewers count the gap.
                    match self.republish(&gate, &mut stop, j).await {
                        Some(n) => j = n,
                        // The run stopped while it republished: its first join stands.
                        None => return self.publisher_outcome(
                            (Ok(first_join.0), first_join.1, Ok(())), &audio, &video, plis, reconnects,
                        ),
                    }
                    audio.stream.ssrc = j.ssrcs[0];
                    video.stream.ssrc = j.ssrcs[1];
                    video.key_requested = true;
                    reconnects += 1;
                    last_heard = tokio::time::Instant::now();
                }
                _ = tokio::time::sleep_until(due) => {
                    let now = tokio::time::Instant::now();
                    let now_ns = self.now_ns();
                    if now >= next_audio {
                        let n = audio.next(&mut out, now_ns);
                        if let Some((o, _)) = old.as_mut() {
                            send_copy(o, 0, &out[..n], overhead).await;
                        }
                        send_srtp(&j.sock, &mut j.tx, &mut out, n, overhead, &live).await;
                        next_audio += traffic::AUDIO_INTERVAL;
                    }
                    if now >= next_video {
                        let mut frame = Vec::new();
                        video.next_frame(&mut out, now_ns, |b, len| frame.push(b[..len].to_vec()));
                        for mut p in frame {
                            let n = p.len();
                            if let Some((o, _)) = old.as_mut() {
                                send_copy(o, 1, &p, overhead).await;
                            }
                            p.resize(n + overhead, 0);
                            send_srtp(&j.sock, &mut j.tx, &mut p, n, overhead, &live).await;
                        }
                        next_video += Video::frame_interval();
                    }
                    if now >= next_consent {
                        let _ = j.sock.send(&crate::webrtc::ice::binding_request(&j.ice_user, &j.ice_pwd, false)).await;
                        next_consent += consent_every;
                    }
                    // Behind by more than a frame (an overloaded machine): skip, don't burst.
                    let late = now.checked_duration_since(next_video).unwrap_or_default();
                    if late > Video::frame_interval() {
                        next_video = now + Video::frame_interval();
                        next_audio = now + traffic::AUDIO_INTERVAL;
                    }
                }
                r = j.sock.recv(&mut buf) => if let Ok(n) = r {
                    last_heard = tokio::time::Instant::now();
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
        if let Some((o, _)) = old.take() {
            self.abandon(o);
        }
        let (join, profile, left) = self.finish(&gate, j).await;
        self.publisher_outcome((join, profile, left), &audio, &video, plis, reconnects)
    }

    /// A task that ends when publisher session `j` is told to move (followed with
    /// `--edges` or `--failover`, as the shipped JS module does).
    fn publisher_moves(&self, j: &Joined) -> tokio::task::JoinHandle<()> {
        if !self.target.edges && !self.target.failover {
            return tokio::spawn(std::future::pending());
        }
        tokio::spawn(peer::move_asked(
            j.node,
            self.target.token.clone(),
            j.resource.clone(),
        ))
    }

    /// What a publisher came to: its join (time, SRTP profile, DELETE), what it sent.
    fn publisher_outcome(
        &self,
        (join, profile, left): (
            Result<Duration, Failure>,
            Option<&'static str>,
            Result<(), String>,
        ),
        audio: &Audio,
        video: &Video,
        plis: u64,
        reconnects: u32,
    ) -> Outcome {
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
            reconnects,
        }
    }

    /// Leaves a session whose node went silent, in the background (it may never
    /// answer the DELETE).
    fn abandon(&self, old: Joined) {
        let at = Target {
            http: old.node,
            token: self.target.token.clone(),
            edges: false,
            failover: false,
            tcp: false,
        };
        let resource = old.resource.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), peer::leave(&at, &resource)).await;
            let _ = old.dtls.close().await;
        });
    }

    /// A join as `role` through the gate, not counted (the first join counts itself;
    /// one after a node's loss is a reconnect).
    async fn join_again(
        &self,
        gate: &Semaphore,
        role: Role,
        sources: usize,
    ) -> Result<Joined, Failure> {
        let _permit = gate.acquire().await.expect("the gate is never closed");
        peer::join(
            &self.target,
            role,
            &self.room_name,
            sources,
            &self.identity,
            self.timeout,
            self.live.dtls_conns.clone(),
        )
        .await
    }

    /// A new WHIP session for a publisher whose node went silent, tried every 300 ms
    /// until it is made or the run stops (None). The old one is left in the background.
    async fn republish(
        &self,
        gate: &Semaphore,
        stop: &mut watch::Receiver<bool>,
        old: Joined,
    ) -> Option<Joined> {
        self.abandon(old);
        loop {
            let attempt = self.join_again(gate, Role::Publisher, 1);
            tokio::select! {
                _ = stop.changed() => return None,
                r = attempt => match r {
                    Ok(j) => return Some(j),
                    Err(f) => {
                        if !self.quiet {
                            eprintln!("edgefwd load-test: republishing {}: {}", self.room_name, f.detail);
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
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
        let first_join = (j.join_time, Some(j.profile.name()));
        let mut received: HashMap<u32, Received> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        let mut consent = tokio::time::interval(CONSENT_INTERVAL);
        let live = self.live.clone();
        let mut last_media = tokio::time::Instant::now();
        let mut reconnects = 0;
        // With edge choice: the session's event stream says when its node drains.
        let mut moved = self.follow_moves(&j);
        loop {
            let stalled = tokio::time::sleep_until(last_media + STALL);
            tokio::select! {
                _ = stop.changed() => break,
                _ = &mut moved, if self.target.edges && reconnects < RECONNECT_TRIES => {
                    // Make-before-break: the old node still sends while we join.
                    match self.join_again(&gate, Role::Subscriber, sources).await {
                        Ok(n) => {
                            self.abandon(std::mem::replace(&mut j, n));
                            reconnects += 1;
                            last_media = tokio::time::Instant::now();
                        }
                        Err(f) => if !self.quiet {
                            eprintln!("edgefwd load-test: a subscriber of {} told to move found no node: {}", self.room_name, f.detail);
                        }
                    }
                    moved = self.follow_moves(&j);
                }
                _ = stalled, if self.target.edges && reconnects < RECONNECT_TRIES => {
                    moved.abort();
                    match self.reconnect(&gate, sources, j).await {
                        Ok(n) => {
                            j = n;
                            moved = self.follow_moves(&j);
                        }
                        Err(f) => {
                            // Nowhere to go: what it got so far is its outcome.
                            if !self.quiet {
                                eprintln!("edgefwd load-test: a subscriber of {} found no node to reconnect to: {}", self.room_name, f.detail);
                            }
                            return self.stalled_outcome(first_join, joined_ns, received, sources, reconnects + 1);
                        }
                    }
                    reconnects += 1;
                    last_media = tokio::time::Instant::now();
                }
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
                                last_media = tokio::time::Instant::now();
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
        moved.abort();
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
            reconnects,
        }
    }

    /// A task that ends when session `j` is told to move (never without edge choice).
    fn follow_moves(&self, j: &Joined) -> tokio::task::JoinHandle<()> {
        if !self.target.edges {
            return tokio::spawn(std::future::pending());
        }
        tokio::spawn(peer::move_asked(
            j.node,
            self.target.token.clone(),
            j.resource.clone(),
        ))
    }

    /// A new session at another node for a subscriber whose node stopped sending: the
    /// old one is left in the background (its node may not answer), the new one is
    /// chosen through `/v1/edges` again (a dead node fails its probe).
    async fn reconnect(
        &self,
        gate: &Semaphore,
        sources: usize,
        old: Joined,
    ) -> Result<Joined, Failure> {
        self.abandon(old);
        let mut last = None;
        for _ in 0..3 {
            match self.join_again(gate, Role::Subscriber, sources).await {
                Ok(j) => return Ok(j),
                Err(f) => last = Some(f),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(last.expect("tried at least once"))
    }

    /// The outcome of a subscriber that stalled and found no node to go to.
    fn stalled_outcome(
        &self,
        (join, profile): (Duration, Option<&'static str>),
        joined_ns: u64,
        received: HashMap<u32, Received>,
        sources: usize,
        reconnects: u32,
    ) -> Outcome {
        Outcome {
            role: Role::Subscriber,
            room: self.room,
            join: Ok(join),
            profile,
            sent: vec![],
            joined_ns,
            keyframes: 0,
            plis: 0,
            received,
            given: 2 * sources,
            left: Ok(()),
            reconnects,
        }
    }
}
