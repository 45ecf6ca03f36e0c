//! The data paths that move WebRTC media between the wire and the media engine: the
//! AF_XDP sockets fed by XDP steering (`xsk`), and the plain UDP socket as the
//! fallback (in `webrtc::sfu`, beside STUN and DTLS).

pub mod socket;
pub mod xsk;
