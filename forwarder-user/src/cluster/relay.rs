//! The room relay's place in the cluster. A downstream node asks its upstream for a
//! WebRTC room with `POST /node/v1/rooms/{room}/relay` on the upstream's node API,
//! signed by its [`Identity`]; what the request and its answer hold (tracks, codecs,
//! sealed SRTP keys) is the webrtc module's business, which implements [`RoomRelay`]
//! for the node API and calls [`ask`] as the client. The cluster carries the bytes,
//! authenticates both ends and never reads media types.

use std::{future::Future, net::SocketAddr, pin::Pin};

use super::identity::Identity;
use super::links::Refusal;
use crate::http::client::{Auth, Outcome, call};

/// An answer to come: the reply's JSON, or a refusal (HTTP status, what to fix).
pub type Answer = Pin<Box<dyn Future<Output = Result<Vec<u8>, Refusal>> + Send>>;

/// What serves relay requests on this node's node API (the WebRTC control plane).
pub trait RoomRelay: Send + Sync {
    /// `from` (the signed node name) asks for `room` with `body` (JSON as sent).
    fn relay(&self, room: String, from: String, body: Vec<u8>) -> Answer;
}

/// The path of a room's relay on the node API.
pub fn path(room: &str) -> String {
    format!("/node/v1/rooms/{room}/relay")
}

/// Asks the node API at `api` for `room`, signed as `me`.
pub async fn ask(me: &Identity, api: SocketAddr, room: &str, body: Vec<u8>) -> Outcome<Vec<u8>> {
    let path = path(room);
    let auth = me.sign("POST", &path, &body);
    call(api, Auth::Header(&auth), hyper::Method::POST, &path, body).await
}
