//! WHIP (RFC 9725) and WHEP endpoints, the state view, and the built-in page.

// The checks return the finished HTTP reply as their error: once per request, so its
// size does not matter.
#![allow(clippy::result_large_err)]

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};

use super::{
    sdp::parse_offer,
    sfu::{ApiError, Role, Sfu},
};

/// What `/metrics` serves: the daemon's one scrape (the data plane and the SFU), as
/// status and exposition text. The daemon renders it; webrtc only serves it.
pub type Metrics = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = (StatusCode, String)> + Send>>
        + Send
        + Sync,
>;

pub struct Api {
    pub sfu: Arc<Sfu>,
    pub token: Option<String>,
    /// Served at `/metrics`.
    pub metrics: Metrics,
    /// Places for event streams (`[webrtc.limits] http_max_streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// How long one event stream lasts.
    pub stream_lifetime: std::time::Duration,
}

const PAGE: &str = include_str!("page.html");

/// The public listener: the page, WHIP and WHEP, and (unless an admin listener
/// takes them) the state and metrics endpoints.
pub fn router(api: Arc<Api>, with_admin: bool) -> Router {
    let r = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/whip/{room}", post(whip).options(options))
        .route("/whep/{room}", post(whep).options(options))
        .route(
            "/whip/{room}/{id}",
            axum::routing::delete(leave_whip)
                .patch(no_trickle)
                .options(options),
        )
        .route(
            "/whep/{room}/{id}",
            axum::routing::delete(leave_whep)
                .patch(no_trickle)
                .options(options),
        )
        .route(
            "/whip/{room}/{id}/events",
            get(session_events).options(options),
        )
        .route("/whep/{room}/{id}/layers", axum::routing::put(set_layers))
        .route(
            "/whep/{room}/{id}/events",
            get(session_events).options(options),
        );
    let r = super::edges::routes(r);
    let r = if with_admin { with_admin_routes(r) } else { r };
    r.with_state(api)
}

/// `[webrtc] admin`: state and metrics on their own listener, with the page for its
/// live view (publishing from there fails: signaling stays on the public listener).
pub fn admin_router(api: Arc<Api>) -> Router {
    with_admin_routes(Router::new().route("/", get(|| async { Html(PAGE) }))).with_state(api)
}

fn with_admin_routes(r: Router<Arc<Api>>) -> Router<Arc<Api>> {
    r.route("/api/sessions", get(sessions))
        .route("/api/cluster/rooms/{room}", get(super::edges::room_tree))
        .route("/api/drain", post(drain))
        .route("/api/rooms/{room}/events", get(room_events))
        .route("/metrics", get(metrics))
}

pub(super) fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = (status, format!("{}\n", msg.into())).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) fn api_error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let retry = matches!(
        e,
        ApiError::TooManyFromSource(_) | ApiError::ServerFull(_) | ApiError::RoomFull(..)
    );
    let mut r = text(status, e.to_string());
    if retry {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

/// Room names become URL path segments and log fields: keep them plain.
pub(super) fn check_room(room: &str) -> Result<(), Response> {
    if room.is_empty()
        || room.len() > 64
        || !room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(text(
            StatusCode::BAD_REQUEST,
            format!("room name {room:?} must be 1-64 characters of A-Z a-z 0-9 - _"),
        ));
    }
    Ok(())
}

pub(super) fn check_auth(api: &Api, headers: &HeaderMap) -> Result<(), Response> {
    let Some(want) = &api.token else {
        return Ok(());
    };
    // The token is never empty (config check), so "" (no header) never matches.
    if crate::http::server::bearer(headers) != want.as_str() {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "send the configured token as Authorization: Bearer <token>",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Err(r);
    }
    Ok(())
}

fn read_offer(headers: &HeaderMap, body: &[u8]) -> Result<super::sdp::Offer, Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The media type exactly (parameters after ';' allowed): "application/sdpfoo" is
    // another type.
    let media_type = ct.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/sdp") {
        return Err(text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type is {ct:?}; send the SDP offer as application/sdp"),
        ));
    }
    let sdp = std::str::from_utf8(body)
        .map_err(|_| text(StatusCode::BAD_REQUEST, "the SDP offer is not UTF-8"))?;
    parse_offer(sdp).map_err(|e| api_error(ApiError::BadOffer(e)))
}

fn created(kind: &str, room: &str, id: &str, answer: String) -> Response {
    let mut r = (StatusCode::CREATED, answer).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(loc) = HeaderValue::from_str(&format!("/{kind}/{room}/{id}")) {
        h.insert(header::LOCATION, loc);
    }
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location"),
    );
    r
}

async fn whip(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = check_room(&room).and_then(|_| check_auth(&api, &headers)) {
        return r;
    }
    let offer = match read_offer(&headers, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    // With the cluster's directory: the room is this node's, or another's to publish
    // at (RFC 9725 allows a redirect).
    match api.sfu.claim_room(&room).await {
        Ok(None) => answer(&api, peer.ip(), &room, &offer, Role::Publisher),
        Ok(Some(url)) => redirect(&url),
        Err(e) => api_error(e),
    }
}

/// 307 to the room's origin node: the client repeats its POST there.
pub(super) fn redirect(url: &str) -> Response {
    let mut r = text(
        StatusCode::TEMPORARY_REDIRECT,
        format!("this room is served at another node: POST the offer to {url}"),
    );
    if let Ok(v) = HeaderValue::from_str(url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location"),
    );
    r
}

async fn whep(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    axum::extract::Query(q): axum::extract::Query<super::edges::Tried>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = check_room(&room).and_then(|_| check_auth(&api, &headers)) {
        return r;
    }
    // The offer before anything else: a bad request costs no upstream call.
    let offer = match read_offer(&headers, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if api.sfu.at_capacity() || api.sfu.draining() {
        return super::edges::elsewhere(&api, &room, q).await;
    }
    // A room served by an upstream node: its tracks first, then the answer.
    if let Err(e) = api.sfu.ensure_upstream(&room, vec![]).await {
        return api_error(e);
    }
    answer(&api, peer.ip(), &room, &offer, Role::Subscriber)
}

/// The session for a checked offer, and its answer.
fn answer(
    api: &Api,
    source: IpAddr,
    room: &str,
    offer: &super::sdp::Offer,
    role: Role,
) -> Response {
    let (joined, kind) = match role {
        Role::Publisher => (api.sfu.publish(room, source, offer), "whip"),
        Role::Subscriber => (api.sfu.subscribe(room, source, offer), "whep"),
        Role::Relay => unreachable!("relays are made by the node API, not WHIP/WHEP"),
    };
    match joined {
        Ok((id, answer)) => {
            tracing::info!(event = "joined", session = %id, room, ?role, "session {id}: {role:?} joined room {room}");
            created(kind, room, &id, answer)
        }
        Err(e) => api_error(e),
    }
}

async fn leave(api: &Api, headers: &HeaderMap, room: &str, id: &str, role: Role) -> Response {
    if let Err(r) = check_auth(api, headers) {
        return r;
    }
    match api.sfu.leave(room, id, role) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => api_error(e),
    }
}

async fn leave_whip(
    State(api): State<Arc<Api>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    leave(&api, &headers, &room, &id, Role::Publisher).await
}

async fn leave_whep(
    State(api): State<Arc<Api>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    leave(&api, &headers, &room, &id, Role::Subscriber).await
}

/// What a subscriber asks of its down-tracks (`PUT {session}/layers`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LayersRequest {
    /// The subscriber's m-line (every down-track without).
    mid: Option<String>,
    /// Highest simulcast encoding (or spatial layer of a VP9 SVC stream) to get,
    /// 0 = lowest; absent or null = no cap.
    max_layer: Option<u8>,
    /// Highest temporal layer to get (0 = the base frame rate); absent or null = all.
    max_temporal: Option<u8>,
    #[serde(default)]
    paused: bool,
}

async fn set_layers(
    State(api): State<Arc<Api>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    let max = crate::media::engine::MAX_LAYERS - 1;
    let req: LayersRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON {{\"mid\": \"1\", \"max_layer\": 0..{max} or null, \"max_temporal\": 0..{max} or null, \"paused\": false}} (mid optional: every track): {e}"
                ),
            );
        }
    };
    if let Some(l) = req.max_layer.filter(|l| *l as usize > max) {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "max_layer {l} is out of range: simulcast has layers 0 (lowest) to {max}, or null for no cap"
            ),
        );
    }
    if let Some(l) = req.max_temporal.filter(|l| *l as usize > max) {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "max_temporal {l} is out of range: temporal layers are 0 (base frame rate) to {max}, or null for all"
            ),
        );
    }
    match api.sfu.set_layers(
        &room,
        &id,
        req.mid.as_deref(),
        req.max_layer,
        req.max_temporal,
        req.paused,
    ) {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => api_error(e),
    }
}

/// Trickle ICE and ICE restarts (RFC 9725 §4.3) are not supported: clients send every
/// candidate in the offer, and we are ICE-lite with fixed host candidates.
async fn no_trickle() -> Response {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "trickle ICE is not supported: wait for ICE gathering to complete before POSTing the offer",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("DELETE, OPTIONS"));
    r
}

pub(super) async fn options() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(
        header::ALLOW,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    r
}

/// Session ids, rooms and client addresses: behind the token like everything else
/// that reveals state.
async fn sessions(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    axum::Json(api.sfu.snapshot()).into_response()
}

/// A room's events as server-sent events: `active_speaker` with the speaking
/// publisher's session id (`{"speaker": "ID", "changes": N}`, null when nobody), the
/// current one first, and `move` when the node drains. Same token as `/api/sessions`.
async fn room_events(
    State(api): State<Arc<Api>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Response {
    use axum::response::sse::Event;
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    let now = serde_json::json!({ "speaker": api.sfu.active_speaker(&room) });
    let first = Event::default()
        .event("active_speaker")
        .data(now.to_string());
    event_stream(&api, room, vec![first], None)
}

/// A WHEP or WHIP session's events as server-sent events, for its client alone
/// (public, same token as DELETE): `move` (`{"reason": "draining", "ends_in_ms": N}`)
/// when it should watch (or publish) the room at another node: this one drains, and
/// ends the session in N ms. A publisher publishes again at its WHIP URL and keeps
/// sending here until then. Sent at once to a client that connects while the node
/// drains.
async fn session_events(
    State(api): State<Arc<Api>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    use axum::response::sse::Event;
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    if !api.sfu.has_session(&room, &id) {
        return api_error(ApiError::UnknownSession);
    }
    let first = match api.sfu.move_notice() {
        Some(data) => vec![Event::default().event("move").data(data.to_string())],
        None => vec![],
    };
    event_stream(&api, room, first, Some("move"))
}

/// `first`, then the room's events (of kind `only`, if given) as server-sent events,
/// each stream within the streams' budget and lifetime.
fn event_stream(
    api: &Api,
    room: String,
    first: Vec<axum::response::sse::Event>,
    only: Option<&'static str>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt as _;
    // Its own budget: streams last, and must not take every connection (or fd).
    let Ok(place) = api.streams.clone().try_acquire_owned() else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "as many event streams are open as [webrtc.limits] http_max_streams allows; retry later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return r;
    };
    let rx = api.sfu.events.subscribe();
    let first =
        futures_util::stream::iter(first.into_iter().map(Ok::<_, std::convert::Infallible>));
    let rest = futures_util::stream::unfold((rx, room), move |(mut rx, room)| async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(ev) if ev.room == room && only.is_none_or(|k| k == ev.kind) => {
                    let e = Event::default().event(ev.kind).data(ev.data.to_string());
                    return Some((Ok(e), (rx, room)));
                }
                Ok(_) => {}
                // Too slow a reader: say so, and go on from the newest.
                Err(RecvError::Lagged(n)) => {
                    let e = Event::default()
                        .event("lagged")
                        .data(serde_json::json!({ "missed": n }).to_string());
                    return Some((Ok(e), (rx, room)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    // It ends after its lifetime (the client reconnects), giving its place back.
    let end = tokio::time::sleep(api.stream_lifetime);
    let stream = first.chain(rest).take_until(end).map(move |e| {
        let _ = &place;
        e
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    // The connection closes with the stream: its descriptor goes too.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Prometheus exposition of the control plane's counters and session gauges (with a
/// token configured, scrape with `authorization: {credentials: <token>}`).
async fn metrics(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    let (status, text) = (api.metrics)().await;
    let mut r = (status, text).into_response();
    if status == StatusCode::OK {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
    }
    r
}

#[derive(serde::Deserialize)]
struct DrainQuery {
    /// Seconds until the daemon exits even with sessions left.
    deadline: Option<u64>,
}

/// `POST /api/drain[?deadline=SECS]`: the node drains ([`super::drain`]); 202, or 409
/// if it drains already.
async fn drain(
    State(api): State<Arc<Api>>,
    axum::extract::Query(q): axum::extract::Query<DrainQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    let deadline = q.deadline.map_or(
        super::drain::DEFAULT_DEADLINE,
        std::time::Duration::from_secs,
    );
    if api.sfu.start_drain(deadline) {
        text(
            StatusCode::ACCEPTED,
            format!(
                "draining: sessions end in {} s, the daemon exits when empty or in {} s",
                super::drain::HANDOFF.as_secs(),
                deadline.as_secs()
            ),
        )
    } else {
        text(StatusCode::CONFLICT, "this node is draining already")
    }
}
