//! WHIP (RFC 9725) and WHEP endpoints, the state view, and the built-in page.

// The checks return the finished HTTP reply as their error: once per request, so its
// size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};

use super::{
    sdp::parse_offer,
    sfu::{ApiError, Role, Sfu},
};

pub struct Api {
    pub sfu: Arc<Sfu>,
    pub token: Option<String>,
}

const PAGE: &str = include_str!("page.html");

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/sessions", get(sessions))
        .route("/metrics", get(metrics))
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
        .with_state(api)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = (status, format!("{}\n", msg.into())).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn api_error(e: ApiError) -> Response {
    let status = match e {
        ApiError::BadOffer(_) => StatusCode::BAD_REQUEST,
        ApiError::UnknownRoom(_) | ApiError::UnknownSession => StatusCode::NOT_FOUND,
        ApiError::UnsupportedCodec(_) => StatusCode::NOT_ACCEPTABLE,
    };
    text(status, e.to_string())
}

/// Room names become URL path segments and log fields: keep them plain.
fn check_room(room: &str) -> Result<(), Response> {
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

fn check_auth(api: &Api, headers: &HeaderMap) -> Result<(), Response> {
    let Some(want) = &api.token else {
        return Ok(());
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if got != Some(want.as_str()) {
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
    if !ct
        .trim()
        .to_ascii_lowercase()
        .starts_with("application/sdp")
    {
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
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    join(&api, &room, &headers, &body, Role::Publisher)
}

async fn whep(
    State(api): State<Arc<Api>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    join(&api, &room, &headers, &body, Role::Subscriber)
}

/// WHIP (publish) or WHEP (subscribe): checks, offer, answer.
fn join(api: &Api, room: &str, headers: &HeaderMap, body: &[u8], role: Role) -> Response {
    if let Err(r) = check_room(room).and_then(|_| check_auth(api, headers)) {
        return r;
    }
    let offer = match read_offer(headers, body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let (joined, kind) = match role {
        Role::Publisher => (api.sfu.publish(room, &offer), "whip"),
        Role::Subscriber => (api.sfu.subscribe(room, &offer), "whep"),
    };
    match joined {
        Ok((id, answer)) => {
            log::info!("session {id}: {role:?} joined room {room}");
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

async fn options() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(
        header::ALLOW,
        HeaderValue::from_static("POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    r
}

async fn sessions(State(api): State<Arc<Api>>) -> Response {
    axum::Json(api.sfu.snapshot()).into_response()
}

/// Prometheus exposition of the control plane's counters and session gauges.
async fn metrics(State(api): State<Arc<Api>>) -> Response {
    match api.sfu.render_metrics() {
        Ok(text) => {
            let mut r = text.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    }
}
