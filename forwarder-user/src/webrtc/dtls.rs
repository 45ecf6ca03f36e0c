//! DTLS-SRTP server side: webrtc-dtls does the handshake over a demultiplexed share of
//! the one media socket; we pick the SRTP profile and check the peer's fingerprint.
//!
//! Profile choice: webrtc-dtls takes the first of the *client's* use_srtp profiles that
//! it is configured with, and Chromium lists AES_CM_128_HMAC_SHA1_80 first. To prefer
//! AEAD_AES_128_GCM (about half the per-packet cost with AES-NI) we read the use_srtp
//! list from the ClientHello ourselves, reassembling it from its handshake fragments
//! (Chromium's post-quantum ClientHello spans two datagrams), and configure the
//! server with exactly the profile we chose.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::{net::UdpSocket, sync::mpsc};
use webrtc_dtls::{
    config::{ClientAuthType, Config, ExtendedMasterSecretType},
    conn::DTLSConn,
    crypto::Certificate,
    extension::extension_use_srtp::SrtpProtectionProfile,
};
use webrtc_srtp::protection_profile::ProtectionProfile;
use webrtc_util::conn::Conn;

/// SRTP protection profiles we implement, in the server's order of preference.
pub const PREFERENCE: [u16; 2] = [
    0x0007, /* AEAD_AES_128_GCM */
    0x0001, /* AES_CM_128_HMAC_SHA1_80 */
];

pub fn profile_name(id: u16) -> &'static str {
    match id {
        0x0001 => "AES_CM_128_HMAC_SHA1_80",
        0x0007 => "AEAD_AES_128_GCM",
        _ => "unsupported",
    }
}

pub fn srtp_profile(id: u16) -> Option<ProtectionProfile> {
    match id {
        0x0001 => Some(ProtectionProfile::Aes128CmHmacSha1_80),
        0x0007 => Some(ProtectionProfile::AeadAes128Gcm),
        _ => None,
    }
}

fn dtls_profile(id: u16) -> SrtpProtectionProfile {
    SrtpProtectionProfile::from(id)
}

/// Collects the first ClientHello from DTLS datagrams, fragment by fragment.
#[derive(Default)]
pub struct ClientHelloReader {
    body: Vec<u8>,
    have: Vec<bool>,
    started: bool,
    /// The datagrams that carried the current message, for the handshake to replay.
    datagrams: Vec<Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HelloState {
    /// More fragments needed.
    Incomplete,
    /// The client's use_srtp profiles, in its order (empty: no use_srtp extension).
    Complete(Vec<u16>),
}

/// Whether a datagram is a sequence of well-framed DTLS records (RFC 6347 §4.1): a
/// known content type, a DTLS version, and lengths that add up to the datagram. What
/// fails this is junk (or an attack from a spoofed address) and is dropped before it
/// reaches the handshake; it must never end the session.
pub fn well_framed(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        if rest.len() < 13
            || !matches!(rest[0], 20..=23)
            || rest[1] != 0xfe
            || !matches!(rest[2], 0xfd | 0xff)
        {
            return false;
        }
        let len = u16::from_be_bytes([rest[11], rest[12]]) as usize;
        let Some(next) = rest.get(13 + len..) else {
            return false;
        };
        rest = next;
    }
    true
}

/// One ClientHello fragment of a datagram: (total length, offset, bytes).
type Fragment<'a> = (usize, usize, &'a [u8]);

/// The ClientHello fragments in one datagram, or what is malformed about it.
fn hello_fragments(datagram: &[u8]) -> Result<Vec<Fragment<'_>>, &'static str> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 13 {
        let (ctype, len) = (rest[0], u16::from_be_bytes([rest[11], rest[12]]) as usize);
        let rec = rest
            .get(13..13 + len)
            .ok_or("DTLS record longer than its datagram")?;
        rest = &rest[13 + len..];
        if ctype != 22 {
            continue; // not handshake
        }
        let mut hs = rec;
        while hs.len() >= 12 {
            let msg_type = hs[0];
            let total = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            let off = u32::from_be_bytes([0, hs[6], hs[7], hs[8]]) as usize;
            let flen = u32::from_be_bytes([0, hs[9], hs[10], hs[11]]) as usize;
            let frag = hs
                .get(12..12 + flen)
                .ok_or("handshake fragment longer than its record")?;
            hs = &hs[12 + flen..];
            if msg_type != 1 {
                continue; // not ClientHello
            }
            if total > 1 << 16 {
                return Err("ClientHello larger than 64 KiB");
            }
            if off + flen > total {
                return Err("ClientHello fragment beyond the message's length");
            }
            out.push((total, off, frag));
        }
    }
    Ok(out)
}

impl ClientHelloReader {
    /// Feeds one datagram. An error says what is malformed about it: the datagram is
    /// not used, and the caller drops (and counts) it and goes on, since junk from a
    /// spoofed address must not end a session.
    pub fn push(&mut self, datagram: &[u8]) -> Result<HelloState, &'static str> {
        let frags = hello_fragments(datagram)?;
        if frags.is_empty() {
            return Ok(HelloState::Incomplete); // nothing of a ClientHello: not kept
        }
        // A fragment of another length starts over: the newest ClientHello wins (a
        // stray or forged fragment cannot wedge the real one out).
        if let Some(&(total, ..)) = frags
            .iter()
            .find(|f| !self.started || f.0 != self.body.len())
        {
            self.body = vec![0; total];
            self.have = vec![false; total];
            self.started = true;
            self.datagrams.clear();
        }
        self.datagrams.push(datagram.to_vec());
        for (total, off, frag) in frags {
            if total != self.body.len() {
                continue; // an older message's fragment in the same datagram
            }
            self.body[off..off + frag.len()].copy_from_slice(frag);
            self.have[off..off + frag.len()]
                .iter_mut()
                .for_each(|h| *h = true);
        }
        if self.started && self.have.iter().all(|h| *h) {
            return match parse_use_srtp(&self.body) {
                Ok(p) => Ok(HelloState::Complete(p)),
                Err(e) => {
                    // A complete message that does not parse: forget it, wait for the
                    // next (the client retransmits its ClientHello).
                    *self = ClientHelloReader::default();
                    Err(e)
                }
            };
        }
        Ok(HelloState::Incomplete)
    }

    /// The datagrams the complete ClientHello came in, in arrival order.
    pub fn into_datagrams(self) -> Vec<Vec<u8>> {
        self.datagrams
    }
}

/// The use_srtp (14) profile list of a ClientHello body (RFC 6347 §4.2.2, RFC 5764 §4.1.1).
fn parse_use_srtp(body: &[u8]) -> Result<Vec<u16>, &'static str> {
    const TRUNC: &str = "truncated ClientHello";
    let mut p = 2 + 32; // client_version, random
    let sid = *body.get(p).ok_or(TRUNC)? as usize;
    p += 1 + sid;
    let cookie = *body.get(p).ok_or(TRUNC)? as usize;
    p += 1 + cookie;
    let suites =
        u16::from_be_bytes([*body.get(p).ok_or(TRUNC)?, *body.get(p + 1).ok_or(TRUNC)?]) as usize;
    p += 2 + suites;
    let comp = *body.get(p).ok_or(TRUNC)? as usize;
    p += 1 + comp;
    if p == body.len() {
        return Ok(vec![]); // no extensions at all
    }
    let ext_len =
        u16::from_be_bytes([*body.get(p).ok_or(TRUNC)?, *body.get(p + 1).ok_or(TRUNC)?]) as usize;
    p += 2;
    let exts = body.get(p..p + ext_len).ok_or(TRUNC)?;
    let mut e = exts;
    while e.len() >= 4 {
        let typ = u16::from_be_bytes([e[0], e[1]]);
        let len = u16::from_be_bytes([e[2], e[3]]) as usize;
        let data = e.get(4..4 + len).ok_or(TRUNC)?;
        e = &e[4 + len..];
        if typ == 14 {
            let n = u16::from_be_bytes([*data.first().ok_or(TRUNC)?, *data.get(1).ok_or(TRUNC)?])
                as usize;
            let list = data.get(2..2 + n).ok_or(TRUNC)?;
            return Ok(list
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect());
        }
    }
    Ok(vec![])
}

/// Our preferred profile among the client's.
pub fn choose_profile(client: &[u16]) -> Option<u16> {
    PREFERENCE.iter().copied().find(|p| client.contains(p))
}

/// A per-peer view of the shared media socket: the demultiplexer feeds it the peer's
/// DTLS datagrams; sends go to the peer's current address.
///
/// The session owns the sending half of `rx`: when the session goes, `rx` closes, and
/// [`DemuxConn::closed`] fires. `recv` must not fail then: webrtc-dtls's reader task
/// retries a failed `recv` at once, forever (it only ends on a fatal alert or on
/// `DTLSConn::close`/drop), so an error there spun a core per finished session. It
/// waits instead, and the session's task closes the DTLS connection, which ends the
/// reader.
pub struct DemuxConn {
    /// Datagrams read before the handshake started (the ClientHello we peeked at).
    pending: Mutex<std::collections::VecDeque<Vec<u8>>>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    closed: tokio::sync::watch::Sender<bool>,
    socket: Arc<UdpSocket>,
    peer: Arc<Mutex<SocketAddr>>,
    last_flight: Mutex<LastFlight>,
    /// Connections alive (shared gauge): one that outlives its session is a leaked task.
    live: Arc<AtomicU64>,
}

impl Drop for DemuxConn {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// RFC 6347 §4.2.4: the server sends the handshake's last flight (ChangeCipherSpec +
/// Finished) and is done, but if that flight is lost the client retransmits its own
/// last flight until it gives up, and the server must answer each such retransmit
/// with its last flight again. webrtc-dtls stops its handshake state machine on
/// completion and never does, so a lost Finished left a browser "connecting" forever
/// while the session looked keyed here. We keep the datagrams sent since the last
/// one received (at completion: exactly the last flight) and resend them.
#[derive(Default)]
struct LastFlight {
    sent: Vec<Vec<u8>>,
    /// A datagram arrived since the last send: the next send starts a new flight.
    new_flight: bool,
    complete: bool,
    last_resend: Option<std::time::Instant>,
    resends: u64,
}

/// The client's last flight in a full handshake opens with its Certificate (we
/// require one) or ClientKeyExchange in an epoch-0 handshake record; after
/// completion that can only be a retransmission.
fn is_retransmitted_client_flight(d: &[u8]) -> bool {
    d.len() > 13 && d[0] == 22 && d[3..5] == [0, 0] && matches!(d[13], 11 | 16)
}

impl DemuxConn {
    pub fn new(
        pending: Vec<Vec<u8>>,
        rx: mpsc::Receiver<Vec<u8>>,
        socket: Arc<UdpSocket>,
        peer: Arc<Mutex<SocketAddr>>,
        live: Arc<AtomicU64>,
    ) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        DemuxConn {
            pending: Mutex::new(pending.into()),
            rx: tokio::sync::Mutex::new(rx),
            closed: tokio::sync::watch::Sender::new(false),
            socket,
            peer,
            last_flight: Mutex::default(),
            live,
        }
    }

    /// Resolves once the session is gone (its datagram queue closed).
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
    fn peer(&self) -> SocketAddr {
        *self.peer.lock().unwrap()
    }

    /// Marks the handshake done: from now on a retransmitted client flight is
    /// answered with our last flight.
    pub fn handshake_complete(&self) {
        self.last_flight.lock().unwrap().complete = true;
    }

    /// How many times the last flight was sent again for the client.
    #[cfg(test)]
    pub fn last_flight_resends(&self) -> u64 {
        self.last_flight.lock().unwrap().resends
    }

    async fn on_received(&self, d: &[u8]) {
        let resend = {
            let mut f = self.last_flight.lock().unwrap();
            if !f.complete {
                f.new_flight = true;
                return;
            }
            // A retransmitted flight can span datagrams: answer it once.
            let now = std::time::Instant::now();
            if !is_retransmitted_client_flight(d)
                || f.last_resend
                    .is_some_and(|t| now - t < Duration::from_millis(250))
            {
                return;
            }
            f.last_resend = Some(now);
            f.resends += 1;
            f.sent.clone()
        };
        let peer = self.peer();
        log::debug!("DTLS peer {peer} repeated its last flight: sending ours again");
        for d in resend {
            let _ = self.socket.send_to(&d, peer).await;
        }
    }
}

#[async_trait]
impl Conn for DemuxConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let queued = self.pending.lock().unwrap().pop_front();
        let d = match queued {
            Some(d) => d,
            None => match self.rx.lock().await.recv().await {
                Some(d) => d,
                None => {
                    // Session gone: tell its task, then never return (see the type).
                    self.closed.send_replace(true);
                    return std::future::pending().await;
                }
            },
        };
        self.on_received(&d).await;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok(n)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        Ok((n, self.peer()))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.send_to(buf, self.peer()).await
    }
    /// A refused datagram (ENOBUFS, or EPERM from a firewall drop) is loss, as on the
    /// wire: DTLS retransmits its flight, so report it sent instead of failing the
    /// handshake.
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        {
            let mut f = self.last_flight.lock().unwrap();
            if !f.complete {
                if f.new_flight {
                    f.sent.clear();
                    f.new_flight = false;
                }
                f.sent.push(buf.to_vec());
            }
        }
        if let Err(e) = self.socket.send_to(buf, target).await {
            log::debug!("DTLS datagram to {target} not sent ({e}); DTLS will retransmit");
        }
        Ok(buf.len())
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer())
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

pub fn sha256(der: &[u8]) -> Vec<u8> {
    Sha256::digest(der).to_vec()
}

/// Our certificate and its SHA-256 fingerprint (for a=fingerprint).
pub struct Identity {
    pub cert: Certificate,
    pub fingerprint: Vec<u8>,
}

impl Identity {
    pub fn generate() -> anyhow::Result<Identity> {
        let cert = Certificate::generate_self_signed(vec!["edgefwd".to_string()])
            .map_err(|e| anyhow::anyhow!("generating the DTLS certificate: {e}"))?;
        let fingerprint = sha256(cert.certificate[0].as_ref());
        Ok(Identity { cert, fingerprint })
    }
}

/// Runs the server handshake with exactly `profile`, then checks that the client's
/// certificate is the one its SDP fingerprint names.
pub async fn accept(
    conn: Arc<DemuxConn>,
    identity: &Identity,
    profile: u16,
    expected_fingerprint: &(String, Vec<u8>),
) -> anyhow::Result<DTLSConn> {
    let config = Config {
        certificates: vec![identity.cert.clone()],
        srtp_protection_profiles: vec![dtls_profile(profile)],
        // WebRTC authenticates by the SDP fingerprint, not by a CA (RFC 8827 §6.5).
        client_auth: ClientAuthType::RequireAnyClientCert,
        insecure_skip_verify: true,
        extended_master_secret: ExtendedMasterSecretType::Require,
        ..Default::default()
    };
    let dtls = DTLSConn::new(conn.clone(), config, false, None)
        .await
        .map_err(|e| anyhow::anyhow!("DTLS handshake: {e}"))?;
    conn.handshake_complete();
    let state = dtls.connection_state().await;
    let cert = state
        .peer_certificates
        .first()
        .ok_or_else(|| anyhow::anyhow!("the client sent no DTLS certificate"))?;
    if expected_fingerprint.0 != "sha-256" {
        anyhow::bail!(
            "a=fingerprint uses {}; only sha-256 is supported",
            expected_fingerprint.0
        );
    }
    if sha256(cert) != expected_fingerprint.1 {
        anyhow::bail!(
            "the client's DTLS certificate does not match the a=fingerprint of its offer"
        );
    }
    Ok(dtls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body with the given use_srtp profiles, and padding extensions
    /// to make it large enough to need fragments.
    fn hello_body(profiles: &[u16], pad: usize) -> Vec<u8> {
        let mut b = vec![0xfe, 0xfd];
        b.extend([7u8; 32]);
        b.push(0); // session id
        b.push(0); // cookie
        b.extend(4u16.to_be_bytes());
        b.extend([0xc0, 0x2b, 0xc0, 0x2f]);
        b.extend([1, 0]); // compression: null
        let mut exts = Vec::new();
        exts.extend(0x0015u16.to_be_bytes()); // padding extension first
        exts.extend((pad as u16).to_be_bytes());
        exts.extend(vec![0; pad]);
        exts.extend(14u16.to_be_bytes());
        exts.extend(((profiles.len() * 2 + 3) as u16).to_be_bytes());
        exts.extend(((profiles.len() * 2) as u16).to_be_bytes());
        for p in profiles {
            exts.extend(p.to_be_bytes());
        }
        exts.push(0); // MKI
        b.extend((exts.len() as u16).to_be_bytes());
        b.extend(exts);
        b
    }

    fn record(frag_of: &[u8], off: usize, len: usize) -> Vec<u8> {
        let mut hs = vec![1];
        hs.extend(&(frag_of.len() as u32).to_be_bytes()[1..]);
        hs.extend([0, 0]);
        hs.extend(&(off as u32).to_be_bytes()[1..]);
        hs.extend(&(len as u32).to_be_bytes()[1..]);
        hs.extend(&frag_of[off..off + len]);
        let mut r = vec![22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
        r.extend((hs.len() as u16).to_be_bytes());
        r.extend(hs);
        r
    }

    #[test]
    fn one_datagram_hello() {
        let body = hello_body(&[0x0001, 0x0007], 0);
        let mut r = ClientHelloReader::default();
        assert_eq!(
            r.push(&record(&body, 0, body.len())).unwrap(),
            HelloState::Complete(vec![1, 7])
        );
    }

    #[test]
    fn fragmented_hello_over_two_datagrams_with_use_srtp_in_the_second() {
        let body = hello_body(&[0x0001, 0x0007], 1400);
        let half = 1000;
        let mut r = ClientHelloReader::default();
        assert_eq!(
            r.push(&record(&body, 0, half)).unwrap(),
            HelloState::Incomplete
        );
        assert_eq!(
            r.push(&record(&body, half, body.len() - half)).unwrap(),
            HelloState::Complete(vec![1, 7])
        );
        // Out of order works too.
        let mut r = ClientHelloReader::default();
        assert_eq!(
            r.push(&record(&body, half, body.len() - half)).unwrap(),
            HelloState::Incomplete
        );
        assert_eq!(
            r.push(&record(&body, 0, half)).unwrap(),
            HelloState::Complete(vec![1, 7])
        );
    }

    #[test]
    fn server_prefers_gcm_but_takes_cm_when_that_is_all() {
        assert_eq!(choose_profile(&[0x0001, 0x0007]), Some(0x0007));
        assert_eq!(choose_profile(&[0x0001, 0x0002]), Some(0x0001));
        assert_eq!(choose_profile(&[0x0002]), None);
    }

    #[test]
    fn malformed_hellos_are_errors_not_panics() {
        let body = hello_body(&[7], 0);
        let mut rec = record(&body, 0, body.len());
        rec.truncate(rec.len() - 5);
        assert!(ClientHelloReader::default().push(&rec).is_err());
        let mut r = ClientHelloReader::default();
        let trunc = &body[..40];
        let mut rec = record(trunc, 0, trunc.len());
        rec[14..17].copy_from_slice(&[0, 0, 40]);
        assert!(r.push(&rec).is_err());
    }

    #[test]
    fn junk_and_stray_fragments_never_wedge_the_real_hello() {
        let body = hello_body(&[0x0001, 0x0007], 1400);
        let half = 1000;
        let mut r = ClientHelloReader::default();
        // A complete but unparseable ClientHello: refused, forgotten.
        let junk = vec![0u8; 40];
        assert!(r.push(&record(&junk, 0, junk.len())).is_err());
        // A stray fragment of some other ClientHello, then the real one in two parts:
        // the newest message wins.
        let stray = vec![1u8; 3000];
        assert_eq!(
            r.push(&record(&stray, 0, 100)).unwrap(),
            HelloState::Incomplete
        );
        let (a, b) = (
            record(&body, 0, half),
            record(&body, half, body.len() - half),
        );
        assert_eq!(r.push(&a).unwrap(), HelloState::Incomplete);
        // Records that are not ClientHello fragments change nothing.
        assert_eq!(
            r.push(&[21, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 2, 40])
                .unwrap(),
            HelloState::Incomplete
        );
        assert_eq!(r.push(&b).unwrap(), HelloState::Complete(vec![1, 7]));
        assert_eq!(
            r.into_datagrams(),
            vec![a, b],
            "only the real hello is replayed"
        );
    }

    #[test]
    fn framing_check_takes_records_and_refuses_junk() {
        let body = hello_body(&[7], 0);
        let rec = record(&body, 0, body.len());
        assert!(well_framed(&rec));
        assert!(well_framed(&[rec.clone(), rec.clone()].concat()));
        assert!(!well_framed(&rec[..rec.len() - 1]), "short record");
        assert!(
            !well_framed(&[rec.clone(), vec![22, 0xfe]].concat()),
            "trailing bytes"
        );
        let mut bad_type = rec.clone();
        bad_type[0] = 24;
        assert!(!well_framed(&bad_type));
        let mut bad_version = rec;
        bad_version[2] = 0x00;
        assert!(!well_framed(&bad_version));
        assert!(!well_framed(&[]));
        assert!(!well_framed(&[0x16; 200]));
    }

    /// The client's side of a loopback socket that loses the first datagram opening
    /// with a ChangeCipherSpec record: the server's last flight.
    struct LosesServerFinished {
        sock: UdpSocket,
        lost: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Conn for LosesServerFinished {
        async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
            Ok(())
        }
        async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
            loop {
                let n = self.sock.recv(buf).await?;
                if n > 0 && buf[0] == 20 && !self.lost.swap(true, Ordering::SeqCst) {
                    continue;
                }
                return Ok(n);
            }
        }
        async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
            let n = self.recv(buf).await?;
            Ok((n, self.sock.peer_addr()?))
        }
        async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
            Ok(self.sock.send(buf).await?)
        }
        async fn send_to(&self, buf: &[u8], _t: SocketAddr) -> webrtc_util::Result<usize> {
            self.send(buf).await
        }
        fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
            Ok(self.sock.local_addr()?)
        }
        fn remote_addr(&self) -> Option<SocketAddr> {
            self.sock.peer_addr().ok()
        }
        async fn close(&self) -> webrtc_util::Result<()> {
            Ok(())
        }
        fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
            self
        }
    }

    #[tokio::test]
    async fn lost_server_finished_is_sent_again_when_the_client_repeats_its_flight() {
        let server_sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let client_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client_sock
            .connect(server_sock.local_addr().unwrap())
            .await
            .unwrap();
        let peer = Arc::new(Mutex::new(client_sock.local_addr().unwrap()));
        // The SFU's demultiplexer, reduced to its DTLS share: every datagram to the
        // session's queue.
        let (tx, rx) = mpsc::channel(64);
        let reader = server_sock.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
        let live = Arc::new(AtomicU64::new(0));
        let conn = Arc::new(DemuxConn::new(vec![], rx, server_sock, peer, live));
        let server_id = Identity::generate().unwrap();
        let client_id = Identity::generate().unwrap();
        let fingerprint = ("sha-256".to_string(), client_id.fingerprint.clone());
        let server = {
            let conn = conn.clone();
            tokio::spawn(async move { accept(conn, &server_id, 0x0007, &fingerprint).await })
        };
        let client_conn = Arc::new(LosesServerFinished {
            sock: client_sock,
            lost: false.into(),
        });
        let lost = client_conn.clone();
        let config = Config {
            certificates: vec![client_id.cert.clone()],
            srtp_protection_profiles: vec![SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm],
            insecure_skip_verify: true,
            extended_master_secret: ExtendedMasterSecretType::Require,
            ..Default::default()
        };
        // The client retransmits its last flight every second; without the server's
        // answer it would never finish.
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            DTLSConn::new(client_conn, config, true, None),
        )
        .await
        .expect("the client's handshake never finished: the server ignored its repeated flight")
        .expect("client handshake");
        assert!(
            lost.lost.load(Ordering::SeqCst),
            "the server's ChangeCipherSpec flight was never seen, so never lost"
        );
        let server = server.await.unwrap().expect("server handshake");
        assert!(conn.last_flight_resends() >= 1);
        // Both ends export the same SRTP keys.
        let (a, b) = (
            client.connection_state().await,
            server.connection_state().await,
        );
        let mut ka = webrtc_srtp::config::Config::default();
        let mut kb = webrtc_srtp::config::Config::default();
        ka.extract_session_keys_from_dtls(a, true).await.unwrap();
        kb.extract_session_keys_from_dtls(b, false).await.unwrap();
        assert_eq!(ka.keys.local_master_key, kb.keys.remote_master_key);
        assert_eq!(ka.keys.remote_master_key, kb.keys.local_master_key);
    }

    #[test]
    fn only_epoch_0_client_flights_count_as_retransmissions() {
        let mut certificate = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 40, 11];
        certificate.extend([0; 40]);
        assert!(is_retransmitted_client_flight(&certificate));
        let mut key_exchange = certificate.clone();
        key_exchange[13] = 16;
        assert!(is_retransmitted_client_flight(&key_exchange));
        let mut epoch1 = certificate.clone();
        epoch1[4] = 1;
        assert!(!is_retransmitted_client_flight(&epoch1));
        let mut hello = certificate.clone();
        hello[13] = 1;
        assert!(!is_retransmitted_client_flight(&hello));
        let mut alert = certificate;
        alert[0] = 21;
        assert!(!is_retransmitted_client_flight(&alert));
        assert!(!is_retransmitted_client_flight(&[22, 0xfe]));
    }
}
