//! Why a WHIP/WHEP request is refused, and the HTTP status and message that say so.

use super::OfferError;

/// Why a WHIP/WHEP request is refused; maps to an HTTP status.
#[derive(Debug)]
pub enum ApiError {
    BadOffer(OfferError),
    UnknownRoom(String),
    UnsupportedCodec(String),
    UnknownSession,
    /// A layer request names an m-line the session does not receive a track on.
    NoSuchTrack(String),
    /// (the cap) sessions in total.
    ServerFull(usize),
    /// (room, the cap).
    RoomFull(String, usize),
    /// A cascade request refused or failed: (HTTP status, what to fix).
    Cascade(u16, String),
    /// (the cap) sessions from the requesting address.
    TooManyFromSource(usize),
}

impl ApiError {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadOffer(_) => 400,
            ApiError::UnknownRoom(_) | ApiError::UnknownSession | ApiError::NoSuchTrack(_) => 404,
            ApiError::UnsupportedCodec(_) => 406,
            ApiError::TooManyFromSource(_) => 429,
            ApiError::Cascade(code, _) => *code,
            ApiError::ServerFull(_) | ApiError::RoomFull(..) => 503,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::BadOffer(e) => write!(f, "{e}"),
            ApiError::UnknownRoom(r) => write!(
                f,
                "room {r:?} has no publisher; publish to it first with POST /whip/{r}"
            ),
            ApiError::UnsupportedCodec(e) => write!(f, "{e}"),
            ApiError::UnknownSession => write!(
                f,
                "no such session (already deleted, or timed out without ICE consent)"
            ),
            ApiError::ServerFull(n) => write!(
                f,
                "the server has its maximum of {n} sessions ([webrtc.limits] max_sessions); retry later"
            ),
            ApiError::RoomFull(r, n) => write!(
                f,
                "room {r:?} has its maximum of {n} sessions ([webrtc.limits] max_sessions_per_room)"
            ),
            ApiError::TooManyFromSource(n) => write!(
                f,
                "your address already has {n} sessions ([webrtc.limits] max_sessions_per_source); DELETE some first"
            ),
            ApiError::Cascade(_, m) => write!(f, "{m}"),
            ApiError::NoSuchTrack(mid) => write!(
                f,
                "the session receives no track on m-line {mid:?}; GET /api/sessions lists its down-tracks with their mid"
            ),
        }
    }
}
