//! What the media port hands signalling: ICE checks (answered, or refused with a
//! signed 400 for a session this node no longer has) and each session's DTLS
//! handshake, which keys SRTP.

use super::*;

impl Sfu {
    /// One session's DTLS: read the ClientHello's profiles, handshake, key SRTP, then
    /// keep reading so alerts (close_notify) end the session.
    async fn dtls_session(
        self: Arc<Self>,
        id: String,
        mut rx: mpsc::Receiver<Vec<u8>>,
        peer: Arc<Mutex<SocketAddr>>,
        fingerprint: (String, Vec<u8>),
    ) -> anyhow::Result<()> {
        let mut reader = ClientHelloReader::default();
        let offered = loop {
            let d = rx
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("session deleted during DTLS"))?;
            match reader.push(&d) {
                Ok(HelloState::Complete(p)) => break p,
                Ok(HelloState::Incomplete) => continue,
                Err(e) => {
                    // Anyone who can spoof the client's address can send this: drop
                    // it, keep the session.
                    self.counters.count(Drop::DtlsMalformed);
                    log::debug!("session {id}: malformed ClientHello datagram dropped: {e}");
                }
            }
        };
        let seen = reader.into_datagrams();
        if let Some(s) = self.state.lock().unwrap().sessions.get_mut(&id) {
            s.hello = Some((seen.len(), offered.clone()));
        }
        if seen.len() > 1 {
            self.counters
                .dtls_fragmented_hellos
                .fetch_add(1, Ordering::Relaxed);
        }
        let Some(profile) = dtls::choose_profile(&offered) else {
            self.counters.count(Drop::DtlsMalformed);
            anyhow::bail!(
                "the client offers SRTP profiles {offered:04x?}, none of AEAD_AES_128_GCM, AES_CM_128_HMAC_SHA1_80"
            );
        };
        let conn = Arc::new(DemuxConn::new(
            seen,
            rx,
            self.socket.clone(),
            peer,
            self.counters.dtls_conns.clone(),
        ));
        let handshake = dtls::accept(conn.clone(), &self.identity, profile, &fingerprint);
        // Dropping the handshake on the session's end drops its connection, which ends
        // webrtc-dtls's tasks.
        let dtls = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(20), handshake) => {
                r.map_err(|_| anyhow::anyhow!("DTLS handshake did not finish in 20 s"))??
            }
            _ = conn.closed() => anyhow::bail!("session ended during the DTLS handshake"),
        };
        let srtp_profile = dtls::srtp_profile(profile).expect("chosen from PREFERENCE");
        let mut cfg = webrtc_srtp::config::Config {
            profile: srtp_profile,
            ..Default::default()
        };
        cfg.extract_session_keys_from_dtls(dtls.connection_state().await, false)
            .await
            .map_err(|e| anyhow::anyhow!("exporting SRTP keys: {e}"))?;
        let k = &cfg.keys;
        let srtp = Profile::from_dtls(profile).expect("chosen from PREFERENCE");
        let key = |key: &[u8], salt: &[u8]| {
            MasterKey::new(srtp, key, salt)
                .map_err(|e| anyhow::anyhow!("DTLS exported SRTP keys of the wrong size: {e}"))
        };
        let rx = key(&k.remote_master_key, &k.remote_master_salt)?;
        let tx = key(&k.local_master_key, &k.local_master_salt)?;
        {
            let mut st = self.state.lock().unwrap();
            let s = st
                .sessions
                .get_mut(&id)
                .ok_or_else(|| anyhow::anyhow!("session deleted during DTLS"))?;
            s.profile = Some(srtp);
            let reserve = self.keep_first(s, &rx, &tx);
            // A subscriber's keys also ask its publishers for keyframes (the engine).
            self.command(Command::SetKeys {
                id: s.media,
                rx,
                tx,
                reserve,
            });
            bump(&self.counters.dtls_handshakes);
            tracing::info!(
                event = "dtls_up",
                session = %id,
                room = %s.room,
                srtp_profile = srtp.name(),
                "session {id}: DTLS up, SRTP {} (client offered {:04x?} in a ClientHello of {} datagram(s))",
                srtp.name(),
                offered,
                s.hello.as_ref().map_or(0, |h| h.0)
            );
            if s.role == Role::Publisher {
                // A room handed over from a draining origin is this node's from now.
                self.take_over_if_due(&s.room.clone());
            }
        }
        let mut buf = vec![0u8; 2048];
        loop {
            // We carry no application data; reading processes alerts and retransmits.
            tokio::select! {
                r = dtls.read(&mut buf, None) => if let Err(e) = r {
                    let _ = dtls.close().await;
                    tracing::info!(event = "dtls_ended", session = %id, "session {id}: DTLS ended ({e}); removing the session");
                    return Ok(());
                },
                _ = conn.closed() => {
                    // Ends webrtc-dtls's reader and writer tasks.
                    let _ = dtls.close().await;
                    return Ok(());
                }
            }
        }
    }
}

impl Sfu {
    /// A check for a ufrag no session has: if it authenticates with the password we
    /// would have given that ufrag (a session of this node before a restart, or one
    /// just removed), a signed 400 tells the client to give up the pair and rejoin.
    fn refuse_forgotten(&self, check: crate::webrtc::ice::Check, from: SocketAddr) {
        self.counters.count(Drop::StunUnknownUfrag);
        let pwd = self.passwords.for_ufrag(&check.local_ufrag);
        if let Ok(resp) = check.refuse(&pwd)
            && self.send(&resp, from)
        {
            self.counters.stun_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Sfu {
    /// Another node's RTT probe (signed with the cluster's probe password): answered
    /// like an ICE check, on the media path it measures. Unsigned or wrongly signed
    /// ones are dropped, so the port reflects nothing for strangers.
    fn answer_probe(&self, check: crate::webrtc::ice::Check, from: SocketAddr) {
        let Some(c) = self.cascade.get() else {
            return self.counters.count(Drop::StunUnknownUfrag);
        };
        match check.answer(&c.identity.probe_pwd, from) {
            Ok(resp) => {
                if self.send(&resp, from) {
                    self.counters.stun_probes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => self.counters.count(Drop::StunUnauthenticated),
        }
    }
}

impl Signalling for Sfu {
    fn on_stun(self: &Arc<Self>, buf: &[u8], from: SocketAddr) {
        let check = match crate::webrtc::ice::parse_check(buf) {
            Ok(c) => c,
            Err(_) => return self.counters.count(Drop::StunMalformed),
        };
        if check.local_ufrag == crate::cluster::identity::PROBE_UFRAG {
            return self.answer_probe(check, from);
        }
        let mut st = self.state.lock().unwrap();
        let Some(id) = st.by_ufrag.get(&check.local_ufrag).cloned() else {
            drop(st);
            return self.refuse_forgotten(check, from);
        };
        let s = st
            .sessions
            .get_mut(&*id)
            .expect("by_ufrag points at live sessions");
        if check.remote_ufrag != s.remote_ufrag {
            return self.counters.count(Drop::StunUnauthenticated);
        }
        let nominate = check.use_candidate;
        let resp = match check.answer(&s.ice_pwd, from) {
            Ok(r) => r,
            Err(_) => return self.counters.count(Drop::StunUnauthenticated),
        };
        s.last_consent = Some(Instant::now());
        let newly_nominated = nominate && s.nominated != Some(from);
        if newly_nominated {
            tracing::info!(event = "nominated", session = %id, room = %s.room, addr = %from, "session {id}: client nominated {from}");
            s.nominated = Some(from);
        }
        let new_addr = !s.addrs.contains(&from);
        if new_addr {
            if s.addrs.is_empty() {
                tracing::info!(event = "ice_bound", session = %id, room = %s.room, addr = %from, "session {id}: first valid ICE check from {from}");
            }
            s.addrs.push(from);
        }
        if new_addr || newly_nominated {
            if let Some(k) = s.kept.as_mut() {
                k.dirty = true;
            }
            self.command(Command::Bind {
                id: s.media,
                addr: from,
                nominated: newly_nominated,
            });
        }
        let media = s.media;
        if new_addr {
            st.by_addr.insert(from, id);
        }
        drop(st);
        if new_addr {
            self.bind_fast(media, from);
        }
        if self.send(&resp, from) {
            self.counters.stun_answered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_dtls(self: &Arc<Self>, buf: &[u8], from: SocketAddr) {
        let mut st = self.state.lock().unwrap();
        let Some(id) = st.by_addr.get(&from).cloned() else {
            return self.counters.count(Drop::UnknownPeer);
        };
        if !dtls::well_framed(buf) {
            return self.counters.count(Drop::DtlsMalformed);
        }
        let s = st
            .sessions
            .get_mut(&*id)
            .expect("by_addr points at live sessions");
        // A restored session has no DTLS connection here: its client's alert
        // (close_notify as the page closes) is all that may still come, and ends it.
        if s.restored {
            if buf.first() == Some(&21) {
                tracing::info!(event = "dtls_ended", session = %id, "session {id}: DTLS alert from the client of a restored session; removing it");
                self.remove(&mut st, &id);
            }
            return;
        }
        *s.dtls_peer.lock().unwrap() = from;
        let tx = match &s.dtls_in {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(64);
                s.dtls_in = Some(tx.clone());
                let sfu = self.clone();
                let peer = s.dtls_peer.clone();
                let fp = s.remote_fingerprint.clone();
                tokio::spawn(async move {
                    if let Err(e) = sfu.clone().dtls_session(id.to_string(), rx, peer, fp).await {
                        log::warn!("session {id}: {e:#}; closing it");
                    }
                    sfu.remove(&mut sfu.state.lock().unwrap(), &id);
                });
                tx
            }
        };
        drop(st);
        // A full queue means the handshake task is stuck; DTLS retransmits anyway.
        let _ = tx.try_send(buf.to_vec());
    }
}
