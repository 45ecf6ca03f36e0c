//! The edge-choice endpoints of the public listener: `GET /v1/edges?room=R` (the
//! candidates, [`crate::webrtc::cascade::edges`]), `GET /v1/probe` (answered at once,
//! for the client's RTT race), `POST /v1/edges/report` (what it measured and chose),
//! and `/edges.js`, the module that does the race for the page and other clients; on
//! the admin side `GET /api/cluster/rooms/{room}`, the room's tree for the page.
//! All of them, WHIP and WHEP allow any origin: a page from one node talks to others.

// The checks return the finished HTTP reply as their error (as in `http`).
#![allow(clippy::result_large_err)]

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{ConnectInfo, Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;

use super::http::{Api, api_error, check_auth, check_room, options, redirect, text};
use super::sfu::ApiError;

/// The module clients import.
pub const EDGES_JS: &str = include_str!("edges.js");

pub fn routes(r: Router<Arc<Api>>) -> Router<Arc<Api>> {
    r.route("/v1/edges", get(edges).options(options))
        .route("/v1/edges/report", post(report).options(options))
        .route("/v1/probe", get(probe))
        .route("/edges.js", get(module))
        .layer(axum::middleware::from_fn(any_origin))
}

/// `Access-Control-Allow-Origin: *` on every answer: no cookies are involved (a token,
/// if any, is sent as a header), so any page may call any node.
async fn any_origin(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

#[derive(Deserialize)]
struct RoomQuery {
    room: Option<String>,
}

/// This node's URL as the client reached it (for the candidate list without Redis).
fn my_http(headers: &HeaderMap, local: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or(local);
    format!("http://{host}")
}

async fn edges(
    State(api): State<Arc<Api>>,
    Query(q): Query<RoomQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    let Some(room) = q.room else {
        return text(
            StatusCode::BAD_REQUEST,
            "name the room: GET /v1/edges?room=NAME",
        );
    };
    if let Err(r) = check_room(&room) {
        return r;
    }
    let local = api.sfu.candidates[0].to_string();
    match api
        .sfu
        .edges(
            &room,
            &my_http(&headers, &local),
            super::cascade::edges::EDGES,
        )
        .await
    {
        Ok(e) => Json(serde_json::json!({ "room": room, "edges": e })).into_response(),
        Err(e) => api_error(e),
    }
}

async fn report(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = check_auth(&api, &headers) {
        return r;
    }
    match serde_json::from_slice::<super::cascade::edges::Report>(&body) {
        Ok(r) => {
            api.sfu.edge_report(r, peer.ip());
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => text(
            StatusCode::BAD_REQUEST,
            format!(
                "the report is not JSON {{\"room\": NAME, \"chosen\": NODE, \"rtt_ms\": {{NODE: MS}}}}: {e}"
            ),
        ),
    }
}

/// Nothing to compute: the round trip is the answer. Not cached anywhere.
async fn probe() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn module() -> Response {
    let mut r = EDGES_JS.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    r
}

/// `?tried=a,b`: the nodes a redirected WHEP offer went through, all full. Nodes'
/// loads in the directory are up to a second old, so two full nodes could send an
/// offer back and forth; each redirect adds its node, and no node is tried twice.
#[derive(Deserialize, Default)]
pub struct Tried {
    #[serde(default)]
    tried: String,
}

/// A full node's answer to a WHEP offer: 307 to the best candidate not tried yet
/// (RFC 9725 allows a redirect), or 503 when every node is full.
pub async fn elsewhere(api: &Api, room: &str, q: Tried) -> Response {
    let me = api.sfu.cascade.get().map(|c| c.node().to_string());
    let mut tried: Vec<&str> = q
        .tried
        .split(',')
        .filter(|n| !n.is_empty())
        .take(crate::cluster::MAX_DEPTH)
        .collect();
    tried.extend(me.as_deref());
    let local = api.sfu.candidates[0].to_string();
    match api
        .sfu
        .edges(room, &format!("http://{local}"), usize::MAX)
        .await
    {
        Ok(e) => match e.iter().find(|e| !tried.contains(&e.node.as_str())) {
            Some(e) => redirect(&format!("{}?tried={}", e.whep, tried.join(","))),
            None => api_error(ApiError::Cascade(
                503,
                format!(
                    "this node has its [cluster] capacity of viewers, and so have the others \
                     tried ({}); retry later",
                    tried.join(", ")
                ),
            )),
        },
        Err(e) => api_error(e),
    }
}

/// The room's origin, epoch and tree in the cluster's directory (404 without one).
pub async fn room_tree(
    State(api): State<Arc<Api>>,
    axum::extract::Path(room): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check_room(&room).and_then(|_| check_auth(&api, &headers)) {
        return r;
    }
    let Some(d) = api.sfu.cascade.get().and_then(|c| c.redis()) else {
        return text(
            StatusCode::NOT_FOUND,
            "this node has no cluster directory ([cluster] redis_url), or it has not answered yet",
        );
    };
    match crate::cluster::tree::room_view(d, &room).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            format!("room {room:?} has no origin in the cluster's directory"),
        ),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}
