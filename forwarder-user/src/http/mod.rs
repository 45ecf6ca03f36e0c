//! HTTP plumbing shared by every part that speaks it: a small client (one request per
//! connection) and the server loop with connection limits. Below webrtc, cluster, cli
//! and loadtest; imports none of them.

pub mod client;
pub mod server;
