//! The SFU's signalling state without a network: sessions, rooms, late tracks, ids
//! and engines, commands queued while a worker holds its engine.

use super::*;
use crate::datapath::engines::{engine_id, shard_of_room};
use crate::media::rtcp::{self as feedback, Request};
use crate::webrtc::{ice::tests::request, sdp::parse_offer};
use forwarder_common::rtp::{self, Class};
use std::collections::HashSet;
use webrtc_srtp::{context::Context, protection_profile::ProtectionProfile};

const OFFER: &str = include_str!("../testdata/chromium-offer.sdp");
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn answer_attr<'a>(answer: &'a str, key: &str) -> &'a str {
    answer
        .lines()
        .find_map(|l| l.strip_prefix(&format!("a={key}:")))
        .unwrap_or_else(|| panic!("answer has no a={key}"))
}

async fn sfu(consent: Duration) -> Arc<Sfu> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    Sfu::new(
        sock,
        vec![addr],
        consent,
        crate::webrtc::Limits::default(),
        Err("unit test".into()),
        crate::webrtc::ice::Passwords::ephemeral(),
        None,
    )
    .unwrap()
}

/// Datagrams the kernel dropped on a full media socket queue show up with the
/// other drop reasons: read + dropped is exactly what was sent.
#[tokio::test]
async fn socket_queue_overflow_is_counted_as_a_drop() {
    use std::os::fd::AsRawFd as _;
    let sfu = sfu(Duration::from_secs(30)).await;
    let size: libc::c_int = 4096;
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    unsafe {
        libc::setsockopt(
            sfu.socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let to = sfu.socket.local_addr().unwrap();
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    const SENT: u64 = 400;
    for _ in 0..SENT {
        tx.send_to(&[0xff, 0], to).unwrap(); // junk: counted as unknown_protocol
    }
    let d = |r: Drop| sfu.counters.drops[r as usize].load(Ordering::Relaxed);
    let run = tokio::spawn(sfu.clone().run_socket());
    let settle = async |want: u64| {
        for _ in 0..200 {
            if d(Drop::UnknownProtocol) + d(Drop::SocketOverflow) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    settle(SENT).await; // may stop short: the last drops ride on the next datagram
    tx.send_to(&[0xff, 0], to).unwrap();
    settle(SENT + 1).await;
    run.abort();
    assert!(d(Drop::SocketOverflow) > 0, "a 4 KiB queue must overflow");
    assert_eq!(
        d(Drop::UnknownProtocol) + d(Drop::SocketOverflow),
        SENT + 1,
        "read {} + overflowed {}",
        d(Drop::UnknownProtocol),
        d(Drop::SocketOverflow)
    );
    assert!(sfu.render_metrics().unwrap().contains(&format!(
        "edgefwd_webrtc_drops_total{{reason=\"socket_overflow\"}} {}",
        d(Drop::SocketOverflow)
    )));
}

#[tokio::test]
async fn checks_bind_addresses_and_keep_consent_until_they_stop() {
    let sfu = sfu(Duration::from_millis(300)).await;
    let offer = parse_offer(OFFER).unwrap();
    let (id, answer) = sfu.publish("r", LOCAL, &offer).unwrap();
    let (ufrag, pwd) = (
        answer_attr(&answer, "ice-ufrag"),
        answer_attr(&answer, "ice-pwd"),
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let from = client.local_addr().unwrap();
    let user = format!("{ufrag}:{}", offer.ice_ufrag);

    // Wrong password: no answer, no binding, counted.
    sfu.on_datagram(&mut request(&user, "not-the-password", true), from);
    assert_eq!(
        sfu.counters.drops[Drop::StunUnauthenticated as usize].load(Ordering::Relaxed),
        1
    );
    assert!(sfu.state.lock().unwrap().sessions[&id].addrs.is_empty());

    // A valid nominating check: answered to the sender, address bound and nominated.
    sfu.on_datagram(&mut request(&user, pwd, true), from);
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let mut resp = stun::message::Message::new();
    resp.unmarshal_binary(&buf[..n]).unwrap();
    assert_eq!(resp.typ, stun::message::BINDING_SUCCESS);
    {
        let st = sfu.state.lock().unwrap();
        assert_eq!(st.sessions[&id].nominated, Some(from));
        assert_eq!(st.by_addr.get(&from).map(|x| &**x), Some(id.as_str()));
    }

    // Checks every 100 ms keep it alive past the 300 ms timeout ...
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sfu.on_datagram(&mut request(&user, pwd, false), from);
        sfu.tick();
    }
    assert!(sfu.state.lock().unwrap().sessions.contains_key(&id));
    // ... and without them it goes, with its room and address binding.
    tokio::time::sleep(Duration::from_millis(400)).await;
    sfu.tick();
    let st = sfu.state.lock().unwrap();
    assert!(st.sessions.is_empty() && st.rooms.is_empty() && st.by_addr.is_empty());
}

/// A WebRTC client reduced to what the SFU sees: ICE check, then a real
/// webrtc-dtls client handshake from the same socket.
struct Client {
    sock: Arc<UdpSocket>,
    id: Identity,
    session: String,
}

/// The Chromium offer with its fingerprint replaced by `id`'s.
fn offer_for(id: &Identity) -> Offer {
    let fp = id
        .fingerprint
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let sdp: String = OFFER
        .lines()
        .map(|l| {
            if l.starts_with("a=fingerprint:") {
                format!("a=fingerprint:sha-256 {fp}\r\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    parse_offer(&sdp).unwrap()
}

/// A client socket that has passed ICE for the session `answer` belongs to.
async fn pass_ice(sfu: &Arc<Sfu>, answer: &str, offer: &Offer) -> UdpSocket {
    let user = format!("{}:{}", answer_attr(answer, "ice-ufrag"), offer.ice_ufrag);
    let pwd = answer_attr(answer, "ice-pwd").to_string();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(sfu.socket.local_addr().unwrap())
        .await
        .unwrap();
    sock.send(&request(&user, &pwd, true)).await.unwrap();
    let mut buf = [0u8; 512];
    tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .expect("no STUN answer")
        .unwrap();
    sock
}

/// Publishes into `room` (with a matching or a foreign fingerprint) and passes ICE.
async fn client(sfu: &Arc<Sfu>, room: &str, matching_fingerprint: bool) -> Client {
    let id = Identity::generate().unwrap();
    let other = Identity::generate().unwrap();
    let offer = offer_for(if matching_fingerprint { &id } else { &other });
    let (session, answer) = sfu.publish(room, LOCAL, &offer).unwrap();
    let sock = pass_ice(sfu, &answer, &offer).await;
    Client {
        sock: Arc::new(sock),
        id,
        session,
    }
}

impl Client {
    async fn handshake(&self) -> Result<webrtc_dtls::conn::DTLSConn, webrtc_dtls::Error> {
        let config = webrtc_dtls::config::Config {
            certificates: vec![self.id.cert.clone()],
            srtp_protection_profiles: vec![
                webrtc_dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
            ],
            insecure_skip_verify: true,
            extended_master_secret: webrtc_dtls::config::ExtendedMasterSecretType::Require,
            ..Default::default()
        };
        webrtc_dtls::conn::DTLSConn::new(self.sock.clone(), config, true, None).await
    }
}

fn started_sfu_socket(sfu: &Arc<Sfu>) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(sfu.clone().run_socket())
}

/// Waits until every DTLS connection's tasks have ended.
async fn dtls_tasks_end(sfu: &Sfu, why: &str) {
    for _ in 0..200 {
        if sfu.counters.dtls_conns.load(Ordering::Relaxed) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{why}: {} DTLS connection(s) still have live tasks 2 s after their session ended \
         (webrtc-dtls's reader spins on a closed session's conn)",
        sfu.counters.dtls_conns.load(Ordering::Relaxed)
    );
}

fn connected(sfu: &Sfu, id: &str) -> bool {
    sfu.state
        .lock()
        .unwrap()
        .sessions
        .get(id)
        .is_some_and(|s| s.profile.is_some())
}

async fn wait_connected(sfu: &Sfu, id: &str) {
    for _ in 0..300 {
        if connected(sfu, id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("session {id} never got its SRTP keys");
}

#[test]
fn ids_name_their_rooms_shard_and_rooms_spread() {
    for n in 1..=8usize {
        for shard in 0..n {
            let top = u32::MAX / n as u32;
            for k in [0, 1, 2, top - 2, top - 1, top, u32::MAX - 1, u32::MAX] {
                let id = engine_id(k, shard, n);
                assert!(id != 0 && id as usize % n == shard, "k {k} n {n}: {id}");
            }
            assert_ne!(engine_id(1, shard, n), engine_id(2, shard, n));
        }
    }
    let on_0 = (0..1000)
        .filter(|i| shard_of_room(&format!("room-{i}"), 2) == 0)
        .count();
    assert!(
        (400..=600).contains(&on_0),
        "{on_0} of 1000 rooms on shard 0"
    );
    assert_eq!(shard_of_room("lobby", 4), shard_of_room("lobby", 4));
}

/// A worker mid-batch holds its engine: the control plane's commands do not wait
/// for it, and the engine applies them, in order, before it is used again.
#[tokio::test]
async fn commands_never_wait_for_a_busy_engine_and_keep_their_order() {
    let sfu = sfu(Duration::from_secs(30)).await;
    let (session, track) = (sfu.media_id("r"), sfu.media_id("r"));
    let shard = sfu.shard_of(track);
    assert_eq!(shard, sfu.shard_of(session));
    let busy = sfu.engines.hold(shard);
    let (done, returned) = std::sync::mpsc::channel();
    let control = sfu.clone();
    std::thread::spawn(move || {
        control.command(Command::AddSession {
            id: session,
            role: Role::Publisher,
            rtcp_ssrc: 1,
        });
        control.command(Command::AddTrack {
            id: track,
            session,
            kind: Kind::Video,
            pt: 96,
            clock_rate: 90_000,
            format: Format::from_name("VP8"),
            streams: vec![(None, Some(0x1234))],
            rid_ext: None,
            twcc_ext: None,
            level_ext: None,
            dd_ext: None,
        });
        done.send(()).unwrap();
    });
    returned
        .recv_timeout(Duration::from_secs(5))
        .expect("the commands waited for the busy engine");
    drop(busy);
    // The track needed its session first: both applied, in order.
    let ssrc = sfu.with_shard(shard, |e, _| e.track(track).and_then(|t| t.ssrc()));
    assert_eq!(ssrc, Some(0x1234));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_sessions_dtls_tasks_end_however_it_ended() {
    let sfu = sfu(Duration::from_millis(600)).await;
    let _media = started_sfu_socket(&sfu);

    // DELETE of a connected session.
    let c = client(&sfu, "r", true).await;
    let dtls = c.handshake().await.expect("client handshake");
    wait_connected(&sfu, &c.session).await;
    assert_eq!(sfu.counters.dtls_conns.load(Ordering::Relaxed), 1);
    sfu.leave("r", &c.session, Role::Publisher).unwrap();
    dtls_tasks_end(&sfu, "after DELETE").await;
    drop(dtls);

    // Consent expiry of a connected session (the browser was killed mid-call).
    let c = client(&sfu, "r", true).await;
    let dtls = c.handshake().await.expect("client handshake");
    wait_connected(&sfu, &c.session).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    sfu.tick();
    assert!(!sfu.state.lock().unwrap().sessions.contains_key(&c.session));
    dtls_tasks_end(&sfu, "after consent expiry").await;
    drop(dtls);

    // DELETE in the middle of the handshake: the client sends its ClientHello and
    // is gone before finishing.
    let c = client(&sfu, "r", true).await;
    let hs = tokio::spawn(async move {
        let _ = c.handshake().await;
    });
    for _ in 0..200 {
        if sfu.counters.dtls_conns.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hs.abort();
    let id = sfu
        .state
        .lock()
        .unwrap()
        .sessions
        .keys()
        .next()
        .cloned()
        .unwrap();
    sfu.leave("r", &id, Role::Publisher).unwrap();
    dtls_tasks_end(&sfu, "after DELETE mid-handshake").await;

    // A failed handshake: the certificate does not match the offer's fingerprint.
    // (The aborted client above may or may not have finished before its abort.)
    let handshakes = sfu.counters.dtls_handshakes.load(Ordering::Relaxed);
    let c = client(&sfu, "r", false).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), c.handshake()).await;
    for _ in 0..200 {
        if !sfu.state.lock().unwrap().sessions.contains_key(&c.session) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !sfu.state.lock().unwrap().sessions.contains_key(&c.session),
        "a peer whose certificate does not match its a=fingerprint keeps its session"
    );
    assert_eq!(
        sfu.counters.dtls_handshakes.load(Ordering::Relaxed),
        handshakes,
        "a handshake with a mismatched fingerprint was counted as up"
    );
    dtls_tasks_end(&sfu, "after a failed handshake").await;
}

/// Anyone who can spoof a client's address can send it DTLS junk: before, during
/// and after the handshake it is dropped and counted, and the session lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_dtls_from_a_clients_address_does_not_end_its_session() {
    let sfu = sfu(Duration::from_secs(30)).await;
    let _media = started_sfu_socket(&sfu);
    let c = client(&sfu, "r", true).await;
    let hello_junk: Vec<u8> = {
        // A well-framed handshake record holding a truncated ClientHello.
        let mut r = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12 + 8];
        r.extend([1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 8]);
        r.extend([0xfe, 0xfd, 1, 2, 3, 4, 5, 6]);
        r
    };
    let junk: [&[u8]; 4] = [
        &[0x16, 0xfe, 0xfd, 0, 1, 2, 3],
        &[0x17; 300],
        &[0x14, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1],
        &hello_junk,
    ];
    for j in junk {
        c.sock.send(j).await.unwrap();
    }
    let dtls = tokio::time::timeout(Duration::from_secs(10), c.handshake())
        .await
        .expect("handshake after junk timed out")
        .expect("client handshake after junk");
    wait_connected(&sfu, &c.session).await;
    for j in junk {
        c.sock.send(j).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        connected(&sfu, &c.session),
        "junk after the handshake ended the session"
    );
    assert_eq!(
        sfu.counters.drops[Drop::DtlsMalformed as usize].load(Ordering::Relaxed),
        4 + 3,
        "all four before the handshake; after it, the three badly framed ones (the \
         well-framed one goes to webrtc-dtls, which discards it)"
    );
    drop(dtls);
}

#[tokio::test]
async fn session_caps_refuse_by_total_room_and_source_and_unconnected_ones_are_reaped() {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let limits = crate::webrtc::Limits {
        max_sessions: 5,
        max_sessions_per_room: 3,
        max_sessions_per_source: 2,
        ice_timeout: 1,
        ..Default::default()
    };
    let sfu = Sfu::new(
        sock,
        vec![addr],
        Duration::from_secs(30),
        limits,
        Err("test".into()),
        crate::webrtc::ice::Passwords::ephemeral(),
        None,
    )
    .unwrap();
    let offer = parse_offer(OFFER).unwrap();
    let watch = parse_offer(&OFFER.replace("a=sendonly", "a=recvonly")).unwrap();
    let ip = |n: u8| std::net::IpAddr::from([192, 0, 2, n]);
    sfu.publish("a", ip(1), &offer).unwrap();
    sfu.publish("a", ip(1), &offer).unwrap();
    assert!(matches!(
        sfu.publish("b", ip(1), &offer),
        Err(ApiError::TooManyFromSource(2))
    ));
    sfu.subscribe("a", ip(2), &watch).unwrap();
    assert!(matches!(
        sfu.subscribe("a", ip(3), &watch),
        Err(ApiError::RoomFull(r, 3)) if r == "a"
    ));
    sfu.publish("b", ip(3), &offer).unwrap();
    sfu.publish("c", ip(4), &offer).unwrap();
    let e = sfu.publish("d", ip(5), &offer).unwrap_err();
    assert!(matches!(e, ApiError::ServerFull(5)));
    assert!(e.to_string().contains("max_sessions"), "{e}");
    // None did ICE: after ice_timeout (not the 30 s consent timeout) all go.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sfu.tick();
    assert!(sfu.state.lock().unwrap().sessions.is_empty());
    sfu.publish("d", ip(5), &offer).unwrap();
}

#[tokio::test]
async fn garbage_is_counted_by_reason_never_fatal() {
    let sfu = sfu(Duration::from_secs(30)).await;
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    sfu.on_datagram(&mut [], from);
    sfu.on_datagram(&mut [0xff, 0], from);
    sfu.on_datagram(&mut [0x16, 0xfe, 0xfd, 0, 0], from); // DTLS from nobody
    sfu.on_datagram(&mut [0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1], from); // RTP from nobody
    sfu.on_datagram(&mut [0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42], from); // truncated STUN
    let d = |r: Drop| sfu.counters.drops[r as usize].load(Ordering::Relaxed);
    assert_eq!(d(Drop::UnknownProtocol), 2);
    assert_eq!(d(Drop::UnknownPeer), 2);
    assert_eq!(d(Drop::StunMalformed), 1);
}

/// A peer whose ICE check passed, with SRTP keys installed on both sides (the
/// DTLS part is covered by the handshake tests; here the media plane is under test).
struct Peer {
    sock: UdpSocket,
    session: String,
    tx: Context,
    rx: Context,
}

async fn peer(sfu: &Arc<Sfu>, room: &str, role: Role, sdp: &str) -> Peer {
    let offer = parse_offer(sdp).unwrap();
    let (session, answer) = match role {
        Role::Publisher => sfu.publish(room, LOCAL, &offer).unwrap(),
        Role::Subscriber => sfu.subscribe(room, LOCAL, &offer).unwrap(),
        Role::Relay => panic!("relays are not WHIP/WHEP peers"),
    };
    let sock = pass_ice(sfu, &answer, &offer).await;
    let key = |b: u8| ([b; 16], [b ^ 0x55; 12]);
    let ((kc, sc), (ks, ss)) = (key(rand::random()), key(rand::random()));
    let ctx = |k: &[u8; 16], s: &[u8; 12], replay: bool| {
        Context::new(
            k,
            s,
            ProtectionProfile::AeadAes128Gcm,
            replay.then(|| webrtc_srtp::option::srtp_replay_protection(512)),
            None,
        )
        .unwrap()
    };
    // The client side stays webrtc-srtp: an independent implementation checks ours.
    let id = sfu.state.lock().unwrap().sessions[&session].media;
    let master = |k: &[u8; 16], s: &[u8; 12]| MasterKey::new(Profile::AeadAes128Gcm, k, s).unwrap();
    sfu.command(Command::SetKeys {
        id,
        rx: master(&kc, &sc),
        tx: master(&ks, &ss),
        reserve: None,
    });
    Peer {
        sock,
        session,
        tx: ctx(&kc, &sc, false),
        rx: ctx(&ks, &ss, true),
    }
}

/// The Chromium offer's SSRCs renumbered, so two publishers differ.
fn publisher_sdp(audio: u32, video: u32) -> String {
    OFFER
        .replace("a=ssrc:1111 ", &format!("a=ssrc:{audio} "))
        .replace(
            "a=ssrc-group:FID 2222 3333",
            &format!("a=ssrc-group:FID {video} 3333"),
        )
        .replace("a=ssrc:2222 ", &format!("a=ssrc:{video} "))
}

/// A recvonly offer with two audio and two video m-lines (mids 0, 1, 3, 4).
fn four_track_subscriber_sdp() -> String {
    let recv: String = OFFER
        .lines()
        .filter(|l| !l.starts_with("a=ssrc") && !l.starts_with("a=msid:"))
        .map(|l| format!("{}\r\n", l.replace("a=sendonly", "a=recvonly")))
        .collect();
    let at = |m: &str| recv.find(m).unwrap();
    let (audio, video, app) = (at("m=audio"), at("m=video"), at("m=application"));
    let header = recv[..audio].replace("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 0 1 3 4");
    let (a, v) = (&recv[audio..video], &recv[video..app]);
    format!(
        "{header}{a}{v}{}{}",
        a.replace("a=mid:0", "a=mid:3"),
        v.replace("a=mid:1", "a=mid:4")
    )
}

/// VP8 (pt 96) payloads open with a keyframe's descriptor and header byte (S=1,
/// P=0): a viewer starts on a keyframe.
const VP8_KEY: [u8; 2] = [0x10, 0x00];

fn rtp_packet(pt: u8, seq: u16, ssrc: u32, tag: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, pt];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(seq as u32 * 3000).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    if pt == 96 {
        p.extend_from_slice(&VP8_KEY);
    }
    p.extend_from_slice(tag);
    p
}

/// What the subscriber got within `wait`: payload tag by (SSRC, payload type).
async fn received(p: &mut Peer, wait: Duration) -> Vec<(u32, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(Ok(n)) = tokio::time::timeout(wait, p.sock.recv(&mut buf)).await {
        if rtp::classify(buf[0], buf[1]) != Class::Rtp {
            continue;
        }
        let plain = p.rx.decrypt_rtp(&buf[..n]).expect("SFU's SRTP decrypts");
        let ssrc = u32::from_be_bytes(plain[8..12].try_into().unwrap());
        let tag = plain[12..].strip_prefix(&VP8_KEY).unwrap_or(&plain[12..]);
        out.push((ssrc, plain[1] & 0x7f, tag.to_vec()));
    }
    out
}

/// Two publishers in one room, one subscriber with four m-lines: every track
/// arrives under its own SSRC, a PLI reaches only the publisher of the track it
/// names (with that publisher's SSRC), and a publisher leaving mid-stream stops
/// its tracks while the other's go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_one_subscriber_pli_and_a_publisher_leaving() {
    let sfu = sfu(Duration::from_secs(30)).await;
    let _media = started_sfu_socket(&sfu);
    let mut a = peer(&sfu, "r", Role::Publisher, &publisher_sdp(0xa0a0, 0xa1a1)).await;
    let mut b = peer(&sfu, "r", Role::Publisher, &publisher_sdp(0xb0b0, 0xb1b1)).await;
    let mut sub = peer(&sfu, "r", Role::Subscriber, &four_track_subscriber_sdp()).await;
    // The new viewer's keys asked each publisher for a keyframe of its own video.
    for (p, video) in [(&mut a, 0xa1a1), (&mut b, 0xb1b1)] {
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(1), p.sock.recv(&mut buf))
            .await
            .expect("no keyframe request for a new viewer")
            .unwrap();
        let plain = p.rx.decrypt_rtcp(&buf[..n]).unwrap();
        assert_eq!(
            feedback::parse(&plain).unwrap(),
            vec![Request::KeyFrame { media_ssrc: video }]
        );
    }
    let send = async |p: &mut Peer, name: &[u8], seq: u16| {
        for (pt, ssrc, kind) in [(111, 0, b"audio"), (96, 1, b"video")] {
            let base = if name == b"A" { 0xa0a0 } else { 0xb0b0 };
            let tag = [name, kind.as_slice()].concat();
            let pkt = rtp_packet(pt, seq, base + ssrc * 0x0101, &tag);
            p.sock.send(&p.tx.encrypt_rtp(&pkt).unwrap()).await.unwrap();
        }
    };
    for seq in 100..110 {
        send(&mut a, b"A", seq).await;
        send(&mut b, b"B", seq).await;
    }
    let got = received(&mut sub, Duration::from_millis(300)).await;
    let mut by_tag: HashMap<Vec<u8>, (u32, u8, usize)> = HashMap::new();
    for (ssrc, pt, tag) in &got {
        let e = by_tag.entry(tag.clone()).or_insert((*ssrc, *pt, 0));
        assert_eq!((e.0, e.1), (*ssrc, *pt), "one SSRC and PT per track");
        e.2 += 1;
    }
    for (tag, pt) in [
        ("Aaudio", 111),
        ("Avideo", 96),
        ("Baudio", 111),
        ("Bvideo", 96),
    ] {
        let e = by_tag
            .get(tag.as_bytes())
            .unwrap_or_else(|| panic!("no {tag}: {got:?}"));
        assert_eq!((e.1, e.2), (pt, 10), "{tag}");
    }
    let ssrcs: HashSet<u32> = by_tag.values().map(|e| e.0).collect();
    assert_eq!(ssrcs.len(), 4, "four down-tracks, four SSRCs");

    // PLI for B's video, by the SSRC the subscriber sees: B gets one for 0xb1b1.
    let b_video = by_tag[b"Bvideo".as_slice()].0;
    let pli = sub.tx.encrypt_rtcp(&feedback::pli(1, b_video)).unwrap();
    sub.sock.send(&pli).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(1), b.sock.recv(&mut buf))
        .await
        .expect("publisher B got no keyframe request")
        .unwrap();
    let plain = b.rx.decrypt_rtcp(&buf[..n]).unwrap();
    assert_eq!(
        feedback::parse(&plain).unwrap(),
        vec![Request::KeyFrame { media_ssrc: 0xb1b1 }]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.sock.recv(&mut buf))
            .await
            .is_err(),
        "publisher A got B's keyframe request"
    );

    // A leaves mid-stream: its tracks stop, B's go on, the subscriber stays.
    sfu.leave("r", &a.session, Role::Publisher).unwrap();
    for seq in 110..120 {
        send(&mut a, b"A", seq).await;
        send(&mut b, b"B", seq).await;
    }
    let got = received(&mut sub, Duration::from_millis(300)).await;
    let tags: HashSet<&[u8]> = got.iter().map(|(_, _, t)| t.as_slice()).collect();
    assert_eq!(
        tags,
        HashSet::from([b"Baudio".as_slice(), b"Bvideo".as_slice()])
    );
    assert_eq!(got.len(), 20);
    let st = sfu.state.lock().unwrap();
    assert_eq!(st.sessions[&sub.session].downtracks.len(), 2);
    assert_eq!(st.rooms["r"].publishers, vec![b.session.clone()]);
    drop(st);
    assert!(sfu.counters.drops[Drop::UnknownPeer as usize].load(Ordering::Relaxed) >= 20);
}

/// A viewer that joins before anyone publishes: its m-lines are answered under
/// SSRCs announced at once, and a publisher joining later fills them — a keyframe
/// request for the waiting viewer, media under exactly those SSRCs. When the
/// publisher leaves, the m-lines wait again.
#[tokio::test]
async fn a_viewer_that_joins_first_gets_the_tracks_published_later() {
    let sfu = sfu(Duration::from_secs(30)).await;
    let _media = started_sfu_socket(&sfu);
    let mut sub = peer(&sfu, "r", Role::Subscriber, &four_track_subscriber_sdp()).await;
    let announced: HashSet<u32> = {
        let st = sfu.state.lock().unwrap();
        let s = &st.sessions[&sub.session];
        assert!(s.downtracks.is_empty());
        assert_eq!(s.reserved.len(), 4, "four m-lines waiting");
        s.reserved.iter().map(|r| r.ssrc_out).collect()
    };
    // A cap asked for a waiting video m-line holds for the track that fills it.
    let (mid, ssrc_out) = {
        let st = sfu.state.lock().unwrap();
        let r = st.sessions[&sub.session]
            .reserved
            .iter()
            .find(|r| r.kind == Kind::Video)
            .unwrap();
        (r.mid.clone(), r.ssrc_out)
    };
    let set = sfu
        .set_layers("r", &sub.session, Some(&mid), Some(0), None, false)
        .unwrap();
    assert_eq!(
        (set.len(), &set[0]["waiting"]),
        (1, &serde_json::json!(true))
    );
    let mut a = peer(&sfu, "r", Role::Publisher, &publisher_sdp(0xa0a0, 0xa1a1)).await;
    let media = sfu.state.lock().unwrap().sessions[&sub.session].media;
    let cap = sfu.with_shard(sfu.shard_of(media), |e, _| {
        e.downtracks(media)
            .iter()
            .find(|(_, d)| d.ssrc_out() == ssrc_out)
            .map(|(_, d)| d.layering.max_layer)
    });
    assert_eq!(cap, Some(0), "the cap asked while it waited");
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(1), a.sock.recv(&mut buf))
        .await
        .expect("no keyframe request for the waiting viewer")
        .unwrap();
    let plain = a.rx.decrypt_rtcp(&buf[..n]).unwrap();
    assert_eq!(
        feedback::parse(&plain).unwrap(),
        vec![Request::KeyFrame { media_ssrc: 0xa1a1 }]
    );
    for seq in 100..110 {
        for (pt, ssrc, tag) in [(111, 0xa0a0, b"audio"), (96, 0xa1a1, b"video")] {
            let pkt = rtp_packet(pt, seq, ssrc, tag);
            a.sock.send(&a.tx.encrypt_rtp(&pkt).unwrap()).await.unwrap();
        }
    }
    let got = received(&mut sub, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 20, "{got:?}");
    let ssrcs: HashSet<u32> = got.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(ssrcs.len(), 2);
    assert!(
        ssrcs.is_subset(&announced),
        "{ssrcs:?} not among {announced:?}"
    );
    sfu.leave("r", &a.session, Role::Publisher).unwrap();
    let st = sfu.state.lock().unwrap();
    assert_eq!(st.sessions[&sub.session].reserved.len(), 4);
    assert!(st.sessions[&sub.session].downtracks.is_empty());
}

#[tokio::test]
async fn subscribers_get_the_publishers_tracks_with_their_own_payload_types() {
    let sfu = sfu(Duration::from_secs(30)).await;
    let pub_offer = parse_offer(OFFER).unwrap();
    // A send-only offer has nothing to receive, with or without a publisher.
    assert!(matches!(
        sfu.subscribe("r", LOCAL, &pub_offer),
        Err(ApiError::BadOffer(OfferError::NoUsableMedia))
    ));
    let (pid, _) = sfu.publish("r", LOCAL, &pub_offer).unwrap();
    // The subscriber numbers VP8 as 120 and offers recvonly.
    let sub_sdp = OFFER
        .replace("a=sendonly", "a=recvonly")
        .replace(" 96 97 103 104 45", " 120 97 103 104 45")
        .replace("a=rtpmap:96 VP8/90000", "a=rtpmap:120 VP8/90000");
    let (sid, answer) = sfu
        .subscribe("r", LOCAL, &parse_offer(&sub_sdp).unwrap())
        .unwrap();
    assert!(
        answer.contains("a=sendonly") && answer.contains("a=rtpmap:120 VP8/90000"),
        "{answer}"
    );
    let st = sfu.state.lock().unwrap();
    let d = &st.sessions[&sid].downtracks;
    assert_eq!(d.len(), 2);
    assert_eq!(
        (d[1].kind, d[1].pt_out, d[1].src_session.as_str()),
        (Kind::Video, 120, pid.as_str())
    );
    assert!(
        answer.contains(&format!("a=ssrc:{} cname:", d[1].ssrc_out)),
        "the answer names the SSRC we send from"
    );
}
