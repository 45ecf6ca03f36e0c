//! The node-to-node HTTP API, on `[cluster] api`. Every request carries the cluster
//! secret as `Authorization: Bearer <secret>`; without it the answer is 401 and
//! nothing changes. The secret never appears in a URL, a log line or a metric.
//!
//! * `PUT /node/v1/links/{node}/demand` — a downstream node's demand (JSON
//!   [`DemandRequest`]); the answer is a [`DemandReply`], or a refusal with its reason
//!   as text (404 no such link, 409 a cycle).
//! * `GET /node/v1/links` — this node's links with their state and counters (JSON).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, put},
};

pub use crate::http::client::Outcome;
use crate::http::{client::call, server::bearer};

use super::links::{DemandReply, DemandRequest, LinkManager};
use super::status;
use crate::dataplane::maps::Maps;

pub struct NodeApi {
    pub manager: Arc<Mutex<LinkManager>>,
    pub secret: String,
    pub pin_dir: PathBuf,
}

pub fn router(api: Arc<NodeApi>) -> Router {
    Router::new()
        .route("/node/v1/links/{node}/demand", put(demand))
        .route("/node/v1/links", get(links))
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

fn authorized(api: &NodeApi, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let got = bearer(headers);
    // Constant time: the comparison must not tell how much of a guess was right.
    if aws_lc_rs::constant_time::verify_slices_are_equal(got.as_bytes(), api.secret.as_bytes())
        .is_err()
    {
        return Err(Box::new(text(
            StatusCode::UNAUTHORIZED,
            "missing or wrong cluster secret: every node of a cascade needs the same \
             [cluster] secret_file, sent as Authorization: Bearer <secret>",
        )));
    }
    Ok(())
}

async fn demand(
    State(api): State<Arc<NodeApi>>,
    Path(node): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let req: DemandRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the demand is not JSON {{\"node\": NAME, \"ssrcs\": [..]}}: {e}"),
            );
        }
    };
    let n = req.ssrcs.len();
    let out = api
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

async fn links(State(api): State<Arc<NodeApi>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let dir = api.pin_dir.clone();
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

/// Binds the node API, so a bad address fails the start.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the node API on {addr} ([cluster] api): is it in use, or not an address of this host?")
    })
}

/// Sends our demand to the upstream's node API.
pub async fn put_demand(
    api: SocketAddr,
    secret: &str,
    req: &DemandRequest,
) -> Outcome<DemandReply> {
    let body = serde_json::to_vec(req).expect("a demand serializes");
    let path = format!("/node/v1/links/{}/demand", req.node);
    match call(api, Some(secret), hyper::Method::PUT, &path, body).await {
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
