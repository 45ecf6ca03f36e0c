//! `edgefwd rooms` and `edgefwd sessions`: the WebRTC side of a running daemon, read
//! from its `/api/sessions` (the public or the admin listener, with the token).

use std::net::SocketAddr;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::http::client::{Auth, Outcome, call};

/// `http://HOST:PORT[/]` or `HOST:PORT`: the address the daemon's ready line shows as
/// `webrtc-http` or `webrtc-admin`.
pub fn parse_api(api: &str) -> Result<SocketAddr> {
    if api.starts_with("https://") {
        bail!("--api {api}: the daemon's API is plain HTTP; give http://ADDR:PORT");
    }
    let a = api
        .strip_prefix("http://")
        .unwrap_or(api)
        .trim_end_matches('/');
    a.parse().with_context(|| {
        format!(
            "--api {api}: not ADDR:PORT; give the daemon's webrtc-http or webrtc-admin \
             address from its ready line, e.g. http://127.0.0.1:8080"
        )
    })
}

/// `GET /api/sessions` of the daemon at `api`.
pub fn fetch(api: &str, token: Option<&str>) -> Result<Value> {
    let addr = parse_api(api)?;
    let rt = runtime()?;
    match get_sessions(&rt, addr, token) {
        Outcome::Ok(body) => serde_json::from_slice(&body).with_context(|| {
            format!("{addr} answered /api/sessions with something else than JSON: is it an edgefwd [webrtc] http address?")
        }),
        Outcome::Refused(why) if why.starts_with("401") => bail!(
            "the daemon at {addr} wants its [webrtc] token: pass --token or set EDGEFWD_TOKEN ({why})"
        ),
        Outcome::Refused(why) => bail!("the daemon at {addr} refused /api/sessions: {why}"),
        Outcome::Unreachable(why) => bail!(
            "cannot reach a daemon's API at {addr} ({why}): is `edgefwd run` up with [webrtc]? \
             pass --api with the webrtc-http (or webrtc-admin) address of its ready line"
        ),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn get_sessions(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: Option<&str>,
) -> Outcome<Vec<u8>> {
    rt.block_on(call(
        addr,
        Auth::bearer(token),
        hyper::Method::GET,
        "/api/sessions",
        vec![],
    ))
}

/// `edgefwd drain`: POST /api/drain to the daemon at `api`, then (with `wait`) until
/// its API no longer answers (it exited) or the deadline and a margin passed.
pub fn drain(api: &str, token: Option<&str>, deadline: u64, wait: bool) -> Result<()> {
    let addr = parse_api(api)?;
    let rt = runtime()?;
    let path = format!("/api/drain?deadline={deadline}");
    match rt.block_on(call(
        addr,
        Auth::bearer(token),
        hyper::Method::POST,
        &path,
        vec![],
    )) {
        Outcome::Ok(body) => print!("{}", String::from_utf8_lossy(&body)),
        Outcome::Refused(why) if why.starts_with("409") => {
            println!("the daemon at {addr} is draining already")
        }
        Outcome::Refused(why) if why.starts_with("401") => bail!(
            "the daemon at {addr} wants its [webrtc] token: pass --token or set EDGEFWD_TOKEN ({why})"
        ),
        Outcome::Refused(why) if why.starts_with("404") => bail!(
            "{addr} has no /api/drain: give the daemon's webrtc-admin address if it has one ({why})"
        ),
        Outcome::Refused(why) => bail!("the daemon at {addr} refused to drain: {why}"),
        Outcome::Unreachable(why) => bail!(
            "cannot reach a daemon's API at {addr} ({why}): pass --api with the webrtc-http \
             (or webrtc-admin) address of its ready line"
        ),
    }
    if !wait {
        return Ok(());
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(deadline + 10);
    while std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if let Outcome::Unreachable(_) = get_sessions(&rt, addr, token) {
            println!("the daemon at {addr} drained and exited");
            return Ok(());
        }
    }
    bail!("the daemon at {addr} still answers 10 s after its drain deadline")
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RoomRow {
    pub room: String,
    pub publishers: usize,
    pub subscribers: usize,
    /// Sessions whose DTLS is up.
    pub connected: usize,
    /// Published tracks.
    pub tracks: usize,
    /// RTP packets received from the room's publishers.
    pub packets_in: u64,
    /// RTP copies sent to the room's subscribers.
    pub packets_out: u64,
    /// The media engine (AF_XDP worker, one per queue and core) the room lives on.
    pub engine: Option<u64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SessionRow {
    pub room: String,
    pub id: String,
    pub role: String,
    /// Its media engine (a room's sessions share one).
    pub engine: Option<u64>,
    pub connected: bool,
    pub srtp_profile: Option<String>,
    /// Where its media goes (the nominated ICE pair), else the last checked address.
    pub peer: Option<String>,
    /// Publisher: tracks it sends. Subscriber: down-tracks it receives.
    pub tracks: usize,
    /// Publisher: packets received. Subscriber: copies sent.
    pub packets: u64,
    /// Subscriber: packets resent from the cache on its NACKs.
    pub nack_resent: u64,
    /// Simulcast and SVC. Publisher: the rids it sends, or a scalable encoding's
    /// layers (`L3T3`); subscriber: per down-track the encoding it gets (or `s1t2`: the
    /// highest spatial and temporal layer), its caps, its bandwidth limit and whether
    /// paused (e.g. `1/cap1`, `0/bw0`, `s0t2/cap0/tcap2`, `paused`); `-` for none.
    pub layers: String,
    /// Subscriber: the worst loss (percent, last report interval) and RTT (ms) its
    /// receiver reports give over its down-tracks; None before the first report.
    pub loss_percent: Option<f64>,
    pub rtt_ms: Option<f64>,
    /// Subscriber: its bandwidth estimate (kbit/s): the lowest of its down-tracks'
    /// loss-based and delay-based estimates; None while nothing limits it.
    pub estimate_kbps: Option<f64>,
}

/// The smallest of `fields` over `list`, None if no entry has any.
fn least(v: &Value, list: &str, fields: &[&str]) -> Option<f64> {
    v[list]
        .as_array()?
        .iter()
        .flat_map(|x| fields.iter().filter_map(|f| x[*f].as_f64()))
        .reduce(f64::min)
}

/// The largest of `field` over `list`, None if no entry has it.
fn worst(v: &Value, list: &str, field: &str) -> Option<f64> {
    v[list]
        .as_array()?
        .iter()
        .filter_map(|x| x[field].as_f64())
        .reduce(f64::max)
}

/// What the LAYERS column shows for one session of `/api/sessions`.
fn layers_of(s: &Value) -> String {
    let list = |key: &str| s[key].as_array().cloned().unwrap_or_default();
    // Layers within one encoding (VP9 SVC, VP8 temporal layers), shown as L<n>T<n>
    // (publisher: how many there are) or s<i>t<i> (viewer: the highest it gets).
    let scalable = |v: &Value| -> Option<(u64, u64)> {
        let a = v.as_array()?;
        let (s, t) = (a.first()?.as_u64()?, a.get(1)?.as_u64()?);
        (s > 0 || t > 0).then_some((s, t))
    };
    let parts: Vec<String> = if s["role"] == "publisher" {
        list("tracks")
            .iter()
            .filter_map(|t| match t["layers"].as_array() {
                Some(ls) => Some(
                    ls.iter()
                        .filter_map(|l| l["rid"].as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                None => scalable(&t["top_layers"]).map(|(s, t)| format!("L{}T{}", s + 1, t + 1)),
            })
            .collect()
    } else {
        list("downtracks")
            .iter()
            .filter_map(|d| {
                if d["paused"] == true {
                    return Some("paused".to_string());
                }
                let got = d["spatial_layer"]
                    .as_u64()
                    .zip(d["temporal_layer"].as_u64());
                let svc = d["layers"].as_u64().unwrap_or(1) == 1
                    && (got.is_some_and(|(s, t)| s > 0 || t > 0) || !d["max_temporal"].is_null());
                let mut out = if d["layers"].as_u64().unwrap_or(1) > 1 {
                    d["layer"]
                        .as_u64()
                        .map_or("-".to_string(), |l| l.to_string())
                } else if svc {
                    got.map_or("-".to_string(), |(s, t)| format!("s{s}t{t}"))
                } else {
                    return None;
                };
                if let Some(m) = d["max_layer"].as_u64() {
                    out.push_str(&format!("/cap{m}"));
                }
                if let Some(m) = d["max_temporal"].as_u64() {
                    out.push_str(&format!("/tcap{m}"));
                }
                if let Some(b) = d["bw_limit"].as_u64() {
                    out.push_str(&format!("/bw{b}"));
                }
                Some(out)
            })
            .collect()
    };
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(" ")
    }
}

fn sum(v: &Value, list: &str, field: &str) -> u64 {
    v[list]
        .as_array()
        .map_or(0, |a| a.iter().filter_map(|x| x[field].as_u64()).sum())
}

fn len(v: &Value, list: &str) -> usize {
    v[list].as_array().map_or(0, |a| a.len())
}

fn rooms_of(v: &Value) -> Result<&serde_json::Map<String, Value>> {
    v["rooms"]
        .as_object()
        .context("the /api/sessions answer has no rooms: is this daemon older than the CLI?")
}

pub fn session_rows(v: &Value, room: Option<&str>) -> Result<Vec<SessionRow>> {
    let rooms = rooms_of(v)?;
    if let Some(r) = room
        && !rooms.contains_key(r)
    {
        let names: Vec<&str> = rooms.keys().map(|k| k.as_str()).collect();
        bail!(
            "no room {r:?} on this daemon (rooms: {}); a room exists while it has a session",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    let mut out = Vec::new();
    for (name, sessions) in rooms {
        if room.is_some_and(|r| r != name) {
            continue;
        }
        for s in sessions.as_array().into_iter().flatten() {
            let role = s["role"].as_str().unwrap_or("?").to_string();
            let publisher = role == "publisher";
            out.push(SessionRow {
                room: name.clone(),
                id: s["id"].as_str().unwrap_or("?").to_string(),
                engine: s["shard"].as_u64(),
                connected: s["connected"].as_bool().unwrap_or(false),
                srtp_profile: s["srtp_profile"].as_str().map(str::to_string),
                peer: s["nominated"]
                    .as_str()
                    .or_else(|| s["addrs"].as_array().and_then(|a| a.last()?.as_str()))
                    .map(str::to_string),
                tracks: if publisher {
                    len(s, "tracks")
                } else {
                    len(s, "downtracks")
                },
                packets: if publisher {
                    sum(s, "tracks", "packets")
                } else {
                    sum(s, "downtracks", "packets")
                },
                nack_resent: sum(s, "downtracks", "nack_resent"),
                layers: layers_of(s),
                loss_percent: worst(s, "downtracks", "loss_percent"),
                rtt_ms: worst(s, "downtracks", "rtt_ms"),
                estimate_kbps: least(s, "downtracks", &["estimate_bps", "delay_estimate_bps"])
                    .map(|b| b / 1000.0),
                role,
            });
        }
    }
    Ok(out)
}

pub fn room_rows(v: &Value) -> Result<Vec<RoomRow>> {
    let mut out: Vec<RoomRow> = Vec::new();
    for s in session_rows(v, None)? {
        if out.last().is_none_or(|r| r.room != s.room) {
            out.push(RoomRow {
                room: s.room.clone(),
                publishers: 0,
                subscribers: 0,
                connected: 0,
                tracks: 0,
                packets_in: 0,
                packets_out: 0,
                engine: s.engine,
            });
        }
        let r = out.last_mut().expect("pushed above");
        r.connected += s.connected as usize;
        if s.role == "publisher" {
            r.publishers += 1;
            r.tracks += s.tracks;
            r.packets_in += s.packets;
        } else {
            r.subscribers += 1;
            r.packets_out += s.packets;
        }
    }
    Ok(out)
}

pub fn print_rooms(rows: &[RoomRow]) {
    if rows.is_empty() {
        println!("no rooms (a room exists while someone publishes or watches: POST /whip/ROOM)");
        return;
    }
    println!(
        "{:<24} {:>10} {:>11} {:>9} {:>6} {:>12} {:>12} {:>6}",
        "ROOM",
        "PUBLISHERS",
        "SUBSCRIBERS",
        "CONNECTED",
        "TRACKS",
        "PACKETS IN",
        "PACKETS OUT",
        "ENGINE"
    );
    for r in rows {
        println!(
            "{:<24} {:>10} {:>11} {:>9} {:>6} {:>12} {:>12} {:>6}",
            r.room,
            r.publishers,
            r.subscribers,
            r.connected,
            r.tracks,
            r.packets_in,
            r.packets_out,
            r.engine.map_or("-".to_string(), |e| e.to_string())
        );
    }
}

pub fn print_sessions(rows: &[SessionRow]) {
    if rows.is_empty() {
        println!("no sessions");
        return;
    }
    println!(
        "{:<20} {:<16} {:<10} {:<9} {:<24} {:<22} {:>6} {:>10} {:>6} {:>6} {:>6} {:>8}  LAYERS",
        "ROOM",
        "SESSION",
        "ROLE",
        "STATE",
        "SRTP",
        "PEER",
        "TRACKS",
        "PACKETS",
        "NACKED",
        "LOSS%",
        "RTT",
        "EST_KBPS"
    );
    let num =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for s in rows {
        println!(
            "{:<20} {:<16} {:<10} {:<9} {:<24} {:<22} {:>6} {:>10} {:>6} {:>6} {:>6} {:>8}  {}",
            s.room,
            s.id,
            s.role,
            if s.connected { "up" } else { "joining" },
            s.srtp_profile.as_deref().unwrap_or("-"),
            s.peer.as_deref().unwrap_or("-"),
            s.tracks,
            s.packets,
            s.nack_resent,
            num(s.loss_percent, 1),
            num(s.rtt_ms, 0),
            num(s.estimate_kbps, 0),
            s.layers
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::json!({"rooms": {
            "a": [
                {"id": "p1", "role": "publisher", "shard": 1, "connected": true, "srtp_profile": "AEAD_AES_128_GCM",
                 "nominated": "192.0.2.1:5000", "addrs": ["192.0.2.1:5000"],
                 "tracks": [{"packets": 10}, {"packets": 5, "layers": [{"rid": "q"}, {"rid": "h"}]},
                            {"packets": 7, "top_layers": [2, 2]}], "downtracks": []},
                {"id": "s1", "role": "subscriber", "shard": 1, "connected": true, "srtp_profile": "AEAD_AES_128_GCM",
                 "nominated": null, "addrs": ["192.0.2.2:6000"],
                 "tracks": [], "downtracks": [{"packets": 9, "nack_resent": 2, "layers": 1, "loss_percent": 0.5, "rtt_ms": 40.0},
                                              {"packets": 4, "nack_resent": 0, "layers": 2, "layer": 0, "max_layer": 0,
                                               "bw_limit": 0, "loss_percent": 2.5, "rtt_ms": null,
                                               "estimate_bps": 300000, "delay_estimate_bps": 210000},
                                              {"packets": 3, "layers": 1, "spatial_layer": 0, "temporal_layer": 2,
                                               "max_layer": 0, "max_temporal": null}]},
            ],
            "b": [
                {"id": "s2", "role": "subscriber", "connected": false, "srtp_profile": null,
                 "nominated": null, "addrs": [], "tracks": [], "downtracks": []},
            ],
        }})
    }

    #[test]
    fn rooms_sum_their_sessions() {
        let r = room_rows(&sample()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RoomRow {
                room: "a".into(),
                publishers: 1,
                subscribers: 1,
                connected: 2,
                tracks: 3,
                packets_in: 22,
                packets_out: 16,
                engine: Some(1),
            }
        );
        assert_eq!(
            (r[1].subscribers, r[1].connected, r[1].packets_out),
            (1, 0, 0)
        );
    }

    #[test]
    fn sessions_of_one_room_and_an_unknown_room_named() {
        let s = session_rows(&sample(), Some("a")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].packets, s[0].peer.as_deref()),
            (22, Some("192.0.2.1:5000"))
        );
        // No nominated pair yet: the last checked address.
        assert_eq!(
            (s[1].packets, s[1].nack_resent, s[1].peer.as_deref()),
            (16, 2, Some("192.0.2.2:6000"))
        );
        assert_eq!(
            (s[0].layers.as_str(), s[1].layers.as_str()),
            ("q,h L3T3", "0/cap0/bw0 s0t2/cap0")
        );
        // The worst of its down-tracks' reports; nothing reported yet: none.
        assert_eq!((s[1].loss_percent, s[1].rtt_ms), (Some(2.5), Some(40.0)));
        assert_eq!((s[0].loss_percent, s[0].rtt_ms), (None, None));
        // The lowest estimate of its down-tracks, by loss or by delay.
        assert_eq!(
            (s[1].estimate_kbps, s[0].estimate_kbps),
            (Some(210.0), None)
        );
        let e = session_rows(&sample(), Some("zz")).unwrap_err().to_string();
        assert!(
            e.contains("no room \"zz\"") && e.contains("rooms: a, b"),
            "{e}"
        );
    }

    #[test]
    fn api_addresses_are_parsed_or_explained() {
        assert_eq!(
            parse_api("http://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(parse_api("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(
            parse_api("https://x:1")
                .unwrap_err()
                .to_string()
                .contains("plain HTTP")
        );
        assert!(
            parse_api("localhost")
                .unwrap_err()
                .to_string()
                .contains("ready line")
        );
    }
}
