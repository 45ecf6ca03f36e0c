//! One load-test client on the wire, as a browser is: an SDP offer over WHIP or WHEP,
//! ICE connectivity checks as the controlling agent (USE-CANDIDATE), the DTLS client
//! handshake with the answer's fingerprint checked, SRTP keys exported from it. The
//! project's own SDP, ICE, DTLS and SRTP code on the client side.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, sync::mpsc};
use webrtc_dtls::{
    config::{Config, ExtendedMasterSecretType},
    conn::DTLSConn,
    extension::extension_use_srtp::SrtpProtectionProfile,
};

use crate::{
    http::client::{Auth, Outcome, Request, exchange},
    media::srtp::{Context, MasterKey, Profile},
    webrtc::{
        dtls::{DemuxConn, Identity, sha256},
        ice,
        sdp::{fingerprint_hex, parse_offer},
    },
};

/// Where the SFU under test is.
pub struct Target {
    pub http: SocketAddr,
    pub token: Option<String>,
    /// Subscribers ask this node for candidates (`/v1/edges`), probe them and join the
    /// fastest, as the page's `edges.js` does.
    pub edges: bool,
    /// Publishers publish again when their node goes silent: a node's loss, as a
    /// WHIP client of a cluster lives through it (viewers move with `edges`).
    pub failover: bool,
    /// Over ICE-TCP (the answer's passive TCP candidate) instead of UDP.
    pub tcp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Subscriber,
}

/// Why a client did not join: the stage (the failure reason in the report) and what
/// happened there.
#[derive(Debug)]
pub struct Failure {
    pub stage: &'static str,
    pub detail: String,
}

fn fail(stage: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        stage,
        detail: detail.into(),
    }
}

/// The payload types we offer, as Chromium numbers them.
pub const OPUS_PT: u8 = 111;
pub const VP8_PT: u8 = 96;

/// A joined client: connected socket, DTLS up, SRTP contexts both ways.
pub struct Joined {
    pub sock: Arc<UdpSocket>,
    pub dtls: DTLSConn,
    /// DTLS records that arrive after the handshake (alerts) go here.
    pub dtls_in: mpsc::Sender<Vec<u8>>,
    pub tx: Context,
    pub rx: Context,
    pub profile: Profile,
    /// The node that took the offer (another than the target's after a redirect), and
    /// the WHIP/WHEP resource there, for DELETE.
    pub node: SocketAddr,
    pub resource: String,
    /// USERNAME and password of our consent checks.
    pub ice_user: String,
    pub ice_pwd: String,
    /// Publisher: the SSRCs we announced, audio then video.
    pub ssrcs: [u32; 2],
    /// From the POST to SRTP keys.
    pub join_time: Duration,
}

fn random_token(n: usize) -> String {
    use rand::Rng as _;
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// The offer: BUNDLE, rtcp-mux, DTLS actpass. A publisher sends one Opus and one VP8
/// track; a subscriber receives `sources` of each (one per publisher in the room).
pub fn offer(
    role: Role,
    ufrag: &str,
    pwd: &str,
    fingerprint: &[u8],
    sources: usize,
    ssrcs: [u32; 2],
) -> String {
    let lines = match role {
        Role::Publisher => 1,
        Role::Subscriber => sources.max(1),
    };
    let mids: Vec<String> = (0..2 * lines).map(|i| i.to_string()).collect();
    let mut s = format!(
        "v=0\r\no=- {} 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE {}\r\na=msid-semantic: WMS\r\n",
        rand::random::<u32>(),
        mids.join(" ")
    );
    let fp = fingerprint_hex(fingerprint);
    for i in 0..2 * lines {
        let video = i % 2 == 1;
        let (kind, pt, map) = if video {
            ("video", VP8_PT, "VP8/90000")
        } else {
            ("audio", OPUS_PT, "opus/48000/2")
        };
        s += &format!(
            "m={kind} 9 UDP/TLS/RTP/SAVPF {pt}\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
             a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\na=fingerprint:sha-256 {fp}\r\n\
             a=setup:actpass\r\na=mid:{i}\r\na=rtcp-mux\r\na=rtcp-rsize\r\na=rtpmap:{pt} {map}\r\n"
        );
        if video {
            s += &format!("a=rtcp-fb:{pt} nack\r\na=rtcp-fb:{pt} nack pli\r\n");
        } else {
            s += &format!("a=fmtp:{pt} minptime=10;useinbandfec=1\r\n");
            if role == Role::Publisher {
                // Every audio packet says its level (RFC 6464), as browsers' do.
                s += &format!(
                    "a=extmap:{} {}\r\n",
                    super::traffic::AUDIO_LEVEL_ID,
                    crate::webrtc::sdp::EXT_AUDIO_LEVEL
                );
            }
        }
        match role {
            Role::Publisher => {
                let ssrc = ssrcs[i % 2];
                s += &format!(
                    "a=sendonly\r\na=msid:load {kind}\r\na=ssrc:{ssrc} cname:load\r\na=ssrc:{ssrc} msid:load {kind}\r\n"
                );
            }
            Role::Subscriber => s += "a=recvonly\r\n",
        }
    }
    s
}

/// The first host candidate of an answer.
fn candidate(answer: &str) -> Option<SocketAddr> {
    answer.lines().find_map(|l| {
        let c = l.trim().strip_prefix("a=candidate:")?;
        let f: Vec<&str> = c.split_whitespace().collect();
        // foundation component transport priority address port typ host
        if f.len() < 8 || !f[2].eq_ignore_ascii_case("udp") {
            return None;
        }
        Some(SocketAddr::new(f[4].parse().ok()?, f[5].parse().ok()?))
    })
}

/// The first passive TCP candidate of an answer (RFC 6544).
fn tcp_candidate(answer: &str) -> Option<SocketAddr> {
    answer.lines().find_map(|l| {
        let c = l.trim().strip_prefix("a=candidate:")?;
        let f: Vec<&str> = c.split_whitespace().collect();
        if f.len() < 10 || !f[2].eq_ignore_ascii_case("tcp") || f[9] != "passive" {
            return None;
        }
        Some(SocketAddr::new(f[4].parse().ok()?, f[5].parse().ok()?))
    })
}

/// Joins `room` as `role`: POST, ICE, DTLS, SRTP keys. Gives up after `timeout`.
pub async fn join(
    target: &Target,
    role: Role,
    room: &str,
    sources: usize,
    identity: &Identity,
    timeout: Duration,
    dtls_live: Arc<AtomicU64>,
) -> Result<Joined, Failure> {
    let started = Instant::now();
    let (ufrag, pwd) = (random_token(8), random_token(24));
    let ssrcs = [rand::random::<u32>() | 1, rand::random::<u32>() | 2];
    let sdp = offer(role, &ufrag, &pwd, &identity.fingerprint, sources, ssrcs);
    let path = match role {
        Role::Publisher => format!("/whip/{room}"),
        Role::Subscriber => format!("/whep/{room}"),
    };
    let (node, resource, answer) = if target.edges && role == Role::Subscriber {
        let at = Target {
            http: choose_edge(target, room, timeout).await?,
            token: target.token.clone(),
            edges: false,
            failover: false,
            tcp: target.tcp,
        };
        post_offer(&at, path, sdp, timeout).await?
    } else {
        post_offer(target, path, sdp, timeout).await?
    };
    let remote = parse_offer(&answer).map_err(|e| fail("sdp", format!("the answer: {e}")))?;
    let media = if target.tcp {
        let server = tcp_candidate(&answer).ok_or_else(|| {
            fail(
                "sdp",
                "the answer has no passive TCP candidate (ice_tcp unset?)",
            )
        })?;
        super::tcp::bridge(server)
            .await
            .map_err(|e| fail("ice", format!("ICE-TCP to {server}: {e}")))?
    } else {
        candidate(&answer).ok_or_else(|| fail("sdp", "the answer has no UDP candidate"))?
    };

    // ICE: checks every 100 ms until one is answered.
    let bind: SocketAddr = if media.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| fail("ice", format!("binding a UDP socket: {e}")))?;
    // Room for a keyframe's burst at tens of Mbit/s while the client's thread is busy
    // (the default ~200 KiB is one such frame): loss is the SFU's to show, not ours.
    // The FORCE option passes net.core.rmem_max where we may (root); else the plain.
    {
        use std::os::fd::AsFd as _;
        let set = |opt| crate::datapath::rxq::set_int(sock.as_fd(), opt, 4 << 20).is_ok();
        let _ = set(libc::SO_RCVBUFFORCE) || set(libc::SO_RCVBUF);
    }
    sock.connect(media)
        .await
        .map_err(|e| fail("ice", format!("connecting to {media}: {e}")))?;
    let ice_user = format!("{}:{ufrag}", remote.ice_ufrag);
    let deadline = started + timeout;
    let mut buf = vec![0u8; 2048];
    'ice: loop {
        if Instant::now() > deadline {
            return Err(fail("ice", format!("no answer to our checks from {media}")));
        }
        // A refused send (ENOBUFS) is loss: the next round resends.
        let _ = sock
            .send(&ice::binding_request(&ice_user, &remote.ice_pwd, true))
            .await;
        let round = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(round);
        loop {
            tokio::select! {
                _ = &mut round => continue 'ice,
                r = sock.recv(&mut buf) => {
                    // ICMP port unreachable surfaces here: keep trying until the deadline.
                    if let Ok(n) = r && ice::is_binding_success(&buf[..n]) {
                        break 'ice;
                    }
                }
            }
        }
    }

    // DTLS client; its datagrams are pumped from the socket until it is up.
    let sock = Arc::new(sock);
    let (dtls_in, rx) = mpsc::channel(64);
    let conn = Arc::new(DemuxConn::new(
        vec![],
        rx,
        sock.clone(),
        Arc::new(Mutex::new(media)),
        dtls_live,
    ));
    let pump = {
        let (sock, dtls_in) = (sock.clone(), dtls_in.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok(n) = sock.recv(&mut buf).await {
                if n > 0
                    && (20..=63).contains(&buf[0])
                    && dtls_in.send(buf[..n].to_vec()).await.is_err()
                {
                    return;
                }
            }
        })
    };
    let config = Config {
        certificates: vec![identity.cert.clone()],
        srtp_protection_profiles: vec![
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
        ],
        // WebRTC authenticates by the SDP fingerprint, checked below.
        insecure_skip_verify: true,
        extended_master_secret: ExtendedMasterSecretType::Require,
        ..Default::default()
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let handshake = tokio::time::timeout(left, DTLSConn::new(conn, config, true, None)).await;
    pump.abort();
    let dtls = match handshake {
        Err(_) => return Err(fail("dtls", "handshake did not finish in time")),
        Ok(Err(e)) => return Err(fail("dtls", format!("handshake: {e}"))),
        Ok(Ok(d)) => d,
    };
    let state = dtls.connection_state().await;
    let cert = state
        .peer_certificates
        .first()
        .ok_or_else(|| fail("dtls", "the SFU sent no certificate"))?;
    if remote.fingerprint.0 != "sha-256" || sha256(cert) != remote.fingerprint.1 {
        return Err(fail(
            "dtls",
            "the SFU's certificate does not match the answer's a=fingerprint",
        ));
    }
    let id = dtls.selected_srtpprotection_profile();
    let profile = Profile::from_dtls(id as u16)
        .ok_or_else(|| fail("dtls", format!("unsupported SRTP profile {id:?}")))?;
    let mut cfg = webrtc_srtp::config::Config {
        profile: crate::webrtc::dtls::srtp_profile(id as u16)
            .ok_or_else(|| fail("dtls", format!("unsupported SRTP profile {id:?}")))?,
        ..Default::default()
    };
    cfg.extract_session_keys_from_dtls(state, true)
        .await
        .map_err(|e| fail("dtls", format!("exporting SRTP keys: {e}")))?;
    let k = &cfg.keys;
    let key = |key: &[u8], salt: &[u8]| {
        MasterKey::new(profile, key, salt).map_err(|e| fail("dtls", format!("SRTP keys: {e}")))
    };
    let tx = Context::new(&key(&k.local_master_key, &k.local_master_salt)?);
    let rx = Context::new(&key(&k.remote_master_key, &k.remote_master_salt)?);
    Ok(Joined {
        sock,
        dtls,
        dtls_in,
        tx,
        rx,
        profile,
        node,
        resource,
        ice_user,
        ice_pwd: remote.ice_pwd,
        ssrcs,
        join_time: started.elapsed(),
    })
}

/// `http://IP:PORT/...` to IP:PORT.
fn host_of(url: &str) -> Option<SocketAddr> {
    let rest = url.strip_prefix("http://")?;
    rest[..rest.find('/').unwrap_or(rest.len())].parse().ok()
}

/// The node to watch `room` from: the candidates of `target`'s `/v1/edges`, each
/// probed once (`GET` its probe URL), the fastest taken; the choice and the RTTs are
/// reported to it.
async fn choose_edge(
    target: &Target,
    room: &str,
    timeout: Duration,
) -> Result<SocketAddr, Failure> {
    let get = |at: SocketAddr, path: String| async move {
        exchange(
            at,
            Auth::bearer(target.token.as_deref()),
            Request {
                method: hyper::Method::GET,
                path: &path,
                content_type: "text/plain",
                body: vec![],
                timeout,
            },
        )
        .await
    };
    let r = match get(target.http, format!("/v1/edges?room={room}")).await {
        Outcome::Ok(r) => r,
        Outcome::Refused(why) | Outcome::Unreachable(why) => {
            return Err(fail(
                "edges",
                format!("GET /v1/edges at {}: {why}", target.http),
            ));
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .map_err(|e| fail("edges", format!("/v1/edges answered no JSON: {e}")))?;
    let edges: Vec<(String, SocketAddr, String)> = v["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let probe = e["probe"].as_str()?;
            let at = host_of(probe)?;
            let path = probe.strip_prefix("http://")?;
            let path = path[path.find('/')?..].to_string();
            Some((e["node"].as_str()?.to_string(), at, path))
        })
        .collect();
    let Some(first) = edges.first() else {
        return Err(fail(
            "edges",
            format!("no node has room for a viewer of {room}"),
        ));
    };
    let timed = edges.iter().map(|(node, at, path)| async move {
        let t = Instant::now();
        match get(*at, path.clone()).await {
            Outcome::Ok(_) => Some((node.clone(), *at, t.elapsed())),
            _ => None,
        }
    });
    let measured: Vec<_> = futures_util::future::join_all(timed)
        .await
        .into_iter()
        .flatten()
        .collect();
    let (chosen, at) = measured
        .iter()
        .min_by_key(|m| m.2)
        .map_or((first.0.clone(), first.1), |m| (m.0.clone(), m.1));
    let rtts: serde_json::Map<String, serde_json::Value> = measured
        .iter()
        .map(|(n, _, d)| (n.clone(), serde_json::json!(d.as_secs_f64() * 1e3)))
        .collect();
    let body = serde_json::json!({"room": room, "chosen": chosen, "rtt_ms": rtts});
    let _ = exchange(
        at,
        Auth::bearer(target.token.as_deref()),
        Request {
            method: hyper::Method::POST,
            path: "/v1/edges/report",
            content_type: "application/json",
            body: body.to_string().into_bytes(),
            timeout,
        },
    )
    .await;
    Ok(at)
}

/// Redirects followed at most (a full node sends a viewer on, and each node tried is
/// named in the next URL, so a cluster of n nodes needs at most n - 1).
const MAX_REDIRECTS: usize = 8;

/// POSTs the offer, following redirects to another node (a cluster places rooms by
/// their name: RFC 9725 allows a 307), at most [`MAX_REDIRECTS`]: the node that answered, the
/// resource there and the SDP answer.
async fn post_offer(
    target: &Target,
    mut path: String,
    sdp: String,
    timeout: Duration,
) -> Result<(SocketAddr, String, String), Failure> {
    let mut http = target.http;
    for _ in 0..=MAX_REDIRECTS {
        let posted = exchange(
            http,
            Auth::bearer(target.token.as_deref()),
            Request {
                method: hyper::Method::POST,
                path: &path,
                content_type: "application/sdp",
                body: sdp.clone().into_bytes(),
                timeout,
            },
        )
        .await;
        let r = match posted {
            Outcome::Ok(r) => r,
            Outcome::Refused(why) | Outcome::Unreachable(why) => {
                return Err(fail("http", format!("POST {path} at {http}: {why}")));
            }
        };
        let location = r
            .location
            .ok_or_else(|| fail("http", format!("{} without a Location header", r.status)))?;
        if r.status < 300 {
            let answer =
                String::from_utf8(r.body).map_err(|_| fail("http", "answer is not UTF-8"))?;
            return Ok((http, location, answer));
        }
        // http://HOST:PORT/PATH: the node to ask instead.
        let rest = location.strip_prefix("http://").unwrap_or(&location);
        let (host, p) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        http = host.parse().map_err(|_| {
            fail(
                "http",
                format!("redirected to {location:?}: not http://IP:PORT/"),
            )
        })?;
        path = p.to_string();
    }
    Err(fail(
        "http",
        format!("POST {path}: more than {MAX_REDIRECTS} redirects"),
    ))
}

/// DELETE of the client's resource: the session ends now rather than at consent loss.
/// Returns when WHEP session `resource` at `node` is told to move (a `move` event on
/// its event stream: the node drains); never, if none comes or the stream cannot be
/// read (the stall check still moves the viewer).
pub async fn move_asked(node: SocketAddr, token: Option<String>, resource: String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let never = std::future::pending::<()>();
    let Ok(mut s) = tokio::net::TcpStream::connect(node).await else {
        return never.await;
    };
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET {resource}/events HTTP/1.1\r\nHost: {node}\r\nAccept: text/event-stream\r\n{auth}\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return never.await;
    }
    const MOVE: &[u8] = b"event: move";
    let (mut seen, mut buf) = (Vec::new(), [0u8; 2048]);
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return never.await,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.windows(MOVE.len()).any(|w| w == MOVE) {
            return;
        }
        // Keep-alives only: what could start an event is all that is kept.
        let keep = seen.len().saturating_sub(MOVE.len());
        seen.drain(..keep);
    }
}

pub async fn leave(target: &Target, resource: &str) -> Result<(), String> {
    match exchange(
        target.http,
        Auth::bearer(target.token.as_deref()),
        Request {
            method: hyper::Method::DELETE,
            path: resource,
            content_type: "application/sdp",
            body: vec![],
            timeout: Duration::from_secs(5),
        },
    )
    .await
    {
        Outcome::Ok(_) => Ok(()),
        Outcome::Refused(e) | Outcome::Unreachable(e) => Err(format!("DELETE {resource}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offers_parse_as_the_sfu_reads_them() {
        let id = Identity::generate().unwrap();
        let p = parse_offer(&offer(
            Role::Publisher,
            "abcd",
            "p".repeat(24).as_str(),
            &id.fingerprint,
            0,
            [5, 6],
        ))
        .unwrap();
        assert_eq!(p.media.len(), 2);
        assert_eq!(p.media[0].ssrcs, vec![5]);
        assert_eq!(p.media[1].ssrcs, vec![6]);
        assert!(p.media.iter().all(|m| m.publish_codec().is_some()));
        assert_eq!(p.fingerprint.1, id.fingerprint);
        let s = parse_offer(&offer(
            Role::Subscriber,
            "abcd",
            "p".repeat(24).as_str(),
            &id.fingerprint,
            3,
            [0, 0],
        ))
        .unwrap();
        assert_eq!(s.media.len(), 6);
        assert!(s.media.iter().all(|m| m.publish_codec().is_none()));
    }

    #[test]
    fn the_answers_candidate_is_found() {
        let a = "v=0\r\nm=audio 50000 UDP/TLS/RTP/SAVPF 111\r\na=candidate:1 1 udp 2130706431 198.51.100.2 50000 typ host\r\n";
        assert_eq!(candidate(a), Some("198.51.100.2:50000".parse().unwrap()));
        assert_eq!(candidate("a=candidate:1 1 tcp 1 1.2.3.4 9 typ host"), None);
    }
}
