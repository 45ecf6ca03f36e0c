//! The node API, on its own listener (`[cluster] api`; bind a private address): what
//! nodes of a cluster ask each other, for both kinds of trunk. Every request is signed
//! by the sending node ([`Identity::sign`]); unsigned, badly signed or stale requests
//! get 401 with the reason and change nothing. The secret never crosses the network.
//!
//! * `PUT /node/v1/links/{node}/demand` — a downstream node's demand on its plain-RTP
//!   link (JSON [`DemandRequest`]); the answer is a [`DemandReply`], or a refusal with
//!   its reason as text (404 no such link, 409 a cycle).
//! * `GET /node/v1/links` — this node's links with their state and counters (JSON).
//! * `POST /node/v1/rooms/{room}/relay` — a downstream node asks for a WebRTC room
//!   (served by the [`RoomRelay`] the WebRTC control plane gives).
//!
//! A node may speak only for itself: the node named in a path or body must be the one
//! that signed.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRequest, Path, Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};

pub use crate::http::client::Outcome;
use crate::http::client::{Auth, call};

use super::identity::Identity;
use super::links::{DemandReply, DemandRequest, LinkManager};
use super::relay::RoomRelay;
use super::status;
use crate::dataplane::maps::Maps;

/// The plain-RTP links this node serves (XDP nodes with `[[link]]`s or `[[stream]]`s).
pub struct Links {
    pub manager: Arc<Mutex<LinkManager>>,
    pub pin_dir: PathBuf,
}

pub struct NodeApi {
    pub identity: Arc<Identity>,
    pub links: Option<Links>,
    pub rooms: Option<Arc<dyn RoomRelay>>,
}

pub fn router(api: Arc<NodeApi>) -> Router {
    Router::new()
        .route("/node/v1/links/{node}/demand", put(demand))
        .route("/node/v1/links", get(links))
        .route("/node/v1/rooms/{room}/relay", post(relay))
        .with_state(api)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", msg.into()),
    )
        .into_response()
}

/// A request's body and the node that signed it; unsigned or badly signed requests
/// are answered 401 with the reason before any handler runs.
struct Signed {
    from: String,
    body: Bytes,
}

impl FromRequest<Arc<NodeApi>> for Signed {
    type Rejection = Response;

    async fn from_request(req: Request, api: &Arc<NodeApi>) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let auth = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = Bytes::from_request(Request::from_parts(parts.clone(), body), api)
            .await
            .map_err(IntoResponse::into_response)?;
        let from = api
            .identity
            .verify(&auth, parts.method.as_str(), parts.uri.path(), &body)
            .map_err(|e| text(StatusCode::UNAUTHORIZED, e))?;
        Ok(Signed { from, body })
    }
}

fn speaks_for_itself(signed: &str, named: &str) -> Result<(), Box<Response>> {
    if signed == named {
        return Ok(());
    }
    // Quoted short: the name is anyone's input, maybe a megabyte of it.
    let named: String = named.chars().take(40).collect();
    Err(Box::new(text(
        StatusCode::FORBIDDEN,
        format!(
            "node {signed:?} signed a request for node {named:?}: a node speaks only for itself"
        ),
    )))
}

async fn demand(
    State(api): State<Arc<NodeApi>>,
    Path(node): Path<String>,
    Signed { from, body }: Signed,
) -> Response {
    let Some(links) = &api.links else {
        return text(
            StatusCode::NOT_FOUND,
            "this node has no plain-RTP links: [[link]] and [[stream]] need --datapath xdp",
        );
    };
    let req: DemandRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the demand is not JSON {{\"node\": NAME, \"ssrcs\": [..]}}: {e}"),
            );
        }
    };
    if let Err(r) =
        speaks_for_itself(&from, &node).and_then(|_| speaks_for_itself(&from, &req.node))
    {
        return *r;
    }
    let n = req.ssrcs.len();
    let out = links
        .manager
        .lock()
        .unwrap()
        .on_demand(&node, req, Instant::now());
    match out {
        Ok(reply) => {
            log::debug!("demand from {node}: {n} SSRC(s)");
            Json(reply).into_response()
        }
        Err(r) => {
            log::warn!("demand from {node} refused: {}", r.message);
            text(
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
                r.message,
            )
        }
    }
}

async fn links(State(api): State<Arc<NodeApi>>, _: Signed) -> Response {
    let Some(links) = &api.links else {
        return Json(Vec::<serde_json::Value>::new()).into_response();
    };
    let dir = links.pin_dir.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let maps = Maps::open_pinned(&dir)?;
        status::link_rows(&maps)
    })
    .await;
    match rows {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn relay(
    State(api): State<Arc<NodeApi>>,
    Path(room): Path<String>,
    Signed { from, body }: Signed,
) -> Response {
    let Some(rooms) = &api.rooms else {
        return text(
            StatusCode::NOT_FOUND,
            "this node has no [webrtc] section: it relays no rooms",
        );
    };
    match rooms.relay(room, from, body.to_vec()).await {
        Ok(reply) => ([(header::CONTENT_TYPE, "application/json")], reply).into_response(),
        Err(r) => text(
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
            r.message,
        ),
    }
}

/// Binds the node API on `addr` and serves it; returns the bound address.
pub async fn serve(addr: SocketAddr, api: NodeApi) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the node API on {addr} ([cluster] api): is it in use, or not an address of this host?")
    })?;
    let local = listener.local_addr()?;
    log::info!(
        "node API on http://{local}/node/v1/ (node {}; links: {}, rooms: {})",
        api.identity.node,
        if api.links.is_some() { "yes" } else { "no" },
        if api.rooms.is_some() { "yes" } else { "no" },
    );
    let app = router(Arc::new(api));
    // Its own connection budget: nodes are few, and whatever the public listeners
    // suffer does not reach this one.
    let limits = Arc::new(crate::http::server::ConnLimits::with(
        256,
        64,
        Duration::from_secs(5),
    ));
    tokio::spawn(async move {
        if let Err(e) = crate::http::server::serve(listener, app, limits).await {
            log::error!("node API stopped: {e:#}");
        }
    });
    Ok(local)
}

/// Sends our demand to the upstream's node API.
pub async fn put_demand(
    api: SocketAddr,
    me: &Identity,
    req: &DemandRequest,
) -> Outcome<DemandReply> {
    let body = serde_json::to_vec(req).expect("a demand serializes");
    let path = format!("/node/v1/links/{}/demand", req.node);
    let auth = me.sign("PUT", &path, &body);
    match call(api, Auth::Header(&auth), hyper::Method::PUT, &path, body).await {
        Outcome::Ok(b) => match serde_json::from_slice(&b) {
            Ok(r) => Outcome::Ok(r),
            Err(e) => Outcome::Unreachable(format!(
                "the answer is not a node API demand reply ({e}): is {api} another node's [cluster] api?"
            )),
        },
        Outcome::Refused(m) => Outcome::Refused(m),
        Outcome::Unreachable(m) => Outcome::Unreachable(m),
    }
}
