//! `[webrtc]` in the config file: the listeners, the media path, the directories that
//! outlive the process, and the limits; refused with what to fix when they cannot work.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, bail};
use serde::Deserialize;

/// `[webrtc]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebrtcConfig {
    /// WHIP/WHEP and the built-in page.
    pub http: SocketAddr,
    /// The one UDP port all peers' media uses.
    pub media: SocketAddr,
    /// Addresses put in the SDP answer as host candidates. Default: the media
    /// address, which then must not be a wildcard.
    #[serde(default)]
    pub candidates: Vec<IpAddr>,
    /// ICE over TCP (RFC 6544 passive candidates) for clients whose networks block
    /// UDP, e.g. "0.0.0.0:443": announced after the UDP candidates at a lower
    /// priority; its media takes the socket path. Unset: UDP only.
    pub ice_tcp: Option<SocketAddr>,
    /// If set, every endpoint that reveals or changes state (WHIP/WHEP POST and
    /// DELETE, `/api/sessions`, `/metrics`) needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Seconds without a valid ICE check before a session is dropped (RFC 7675).
    #[serde(default = "default_consent")]
    pub consent_timeout: u64,
    /// If set, `/api/sessions` and `/metrics` are served here (e.g. a private
    /// address) and no longer on `http`.
    pub admin: Option<SocketAddr>,
    #[serde(default)]
    pub limits: Limits,
    /// "auto": media through the AF_XDP workers when the daemon runs XDP on the media
    /// interface and AF_XDP works there, else the socket; "socket": always the socket.
    #[serde(default)]
    pub datapath: MediaPath,
    /// Where the daemon keeps what must outlive it (the ICE key); default
    /// /var/lib/edgefwd (systemd's StateDirectory=edgefwd).
    #[serde(default = "default_state_dir")]
    pub state_dir: std::path::PathBuf,
    /// Where sessions are kept across restarts (keys included: a tmpfs, root only);
    /// default /run/edgefwd (systemd's RuntimeDirectory=edgefwd). Sessions are kept
    /// only with a fixed media port, which the next process binds again.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: std::path::PathBuf,
    /// The old `[webrtc.cascade]`: rooms across nodes are configured in `[cluster]`
    /// now; kept only to refuse it with the lines to write instead.
    pub cascade: Option<toml::Table>,
}

/// The `[cluster]` lines that replace an old `[webrtc.cascade]` section.
fn cascade_moved(old: &toml::Table) -> String {
    let mut s = String::from("[cluster]\n");
    for key in ["node", "secret_file", "secret", "lapse"] {
        if let Some(v) = old.get(key) {
            s += &format!("{key} = {v}\n");
        }
    }
    s += "api = \"<a private address of this node>:7000\"   # the node API, on its own listener\n";
    let ups = old.get("upstream").and_then(|u| u.as_array());
    for u in ups.into_iter().flatten() {
        let get = |k: &str| u.get(k).map_or("?".to_string(), |v| v.to_string());
        s += &format!(
            "[[cluster.upstream]]\nroom = {}\nnode = {}\napi = \"<{}'s [cluster] api>\"   # was http = {}\n",
            get("room"),
            get("node"),
            get("node").trim_matches('"'),
            get("http")
        );
    }
    s
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MediaPath {
    #[default]
    Auto,
    Socket,
}

fn default_consent() -> u64 {
    30
}

fn default_state_dir() -> std::path::PathBuf {
    "/var/lib/edgefwd".into()
}

fn default_runtime_dir() -> std::path::PathBuf {
    "/run/edgefwd".into()
}

/// `[webrtc.limits]`: what one client, one room, or everyone together may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Sessions in total; beyond it POSTs get 503.
    pub max_sessions: usize,
    /// Sessions in one room; beyond it 503 for that room.
    pub max_sessions_per_room: usize,
    /// Sessions created from one client IP address; beyond it 429. A reverse proxy
    /// in front makes every client one address: raise it there.
    pub max_sessions_per_source: usize,
    /// Seconds a session may wait for its first valid ICE check before it is
    /// removed (a never-connected session should not hold state for the whole
    /// consent timeout).
    pub ice_timeout: u64,
    /// HTTP connections open at once; beyond it new ones get 503 and are closed.
    pub http_max_connections: usize,
    /// HTTP connections open at once from one client IP address.
    pub http_max_connections_per_source: usize,
    /// Seconds a client has to send a request's headers, also between requests on
    /// a kept-alive connection; then the connection is closed.
    pub http_header_timeout: u64,
    /// Seconds from a request's headers to its answer (its body included); then 408
    /// and the connection closes.
    pub http_body_timeout: u64,
    /// Event streams (`/api/rooms/{room}/events`) open at once; beyond it 503. At most
    /// half the connections of the listener serving them (32 on an admin listener),
    /// so streams never take every one.
    pub http_max_streams: usize,
    /// Seconds an event stream lasts; then it ends and the client reconnects
    /// (EventSource does on its own), so no client holds a descriptor for good.
    pub http_stream_lifetime: u64,
    /// ICE-TCP connections open at once; beyond it new ones are closed.
    pub ice_tcp_max_connections: usize,
    /// ICE-TCP connections open at once from one client IP address.
    pub ice_tcp_max_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_sessions_per_room: 2_000,
            max_sessions_per_source: 200,
            ice_timeout: 10,
            http_max_connections: 1_024,
            http_max_connections_per_source: 64,
            http_header_timeout: 10,
            http_body_timeout: 10,
            http_max_streams: 256,
            http_stream_lifetime: 300,
            ice_tcp_max_connections: 1_024,
            ice_tcp_max_per_source: 16,
        }
    }
}

impl WebrtcConfig {
    /// WebRTC on these addresses with every other setting at its default.
    pub fn on(http: SocketAddr, media: SocketAddr) -> WebrtcConfig {
        WebrtcConfig {
            http,
            media,
            candidates: vec![],
            ice_tcp: None,
            token: None,
            consent_timeout: default_consent(),
            admin: None,
            limits: Limits::default(),
            datapath: MediaPath::Auto,
            state_dir: default_state_dir(),
            runtime_dir: default_runtime_dir(),
            cascade: None,
        }
    }

    /// Refuses settings that cannot work, saying which to fix.
    pub fn check(&self) -> Result<()> {
        self.candidates()?;
        let l = &self.limits;
        for (name, v) in [
            ("max_sessions", l.max_sessions),
            ("max_sessions_per_room", l.max_sessions_per_room),
            ("max_sessions_per_source", l.max_sessions_per_source),
            ("http_max_connections", l.http_max_connections),
            (
                "http_max_connections_per_source",
                l.http_max_connections_per_source,
            ),
            ("http_max_streams", l.http_max_streams),
            ("ice_tcp_max_connections", l.ice_tcp_max_connections),
            ("ice_tcp_max_per_source", l.ice_tcp_max_per_source),
        ] {
            if v == 0 {
                bail!("[webrtc.limits] {name} = 0 would refuse every client; set it to at least 1");
            }
        }
        for (name, v) in [
            ("ice_timeout", l.ice_timeout),
            ("http_header_timeout", l.http_header_timeout),
            ("http_body_timeout", l.http_body_timeout),
            ("http_stream_lifetime", l.http_stream_lifetime),
        ] {
            if v == 0 {
                bail!(
                    "[webrtc.limits] {name} = 0 would cut every client off at once; give seconds ≥ 1"
                );
            }
        }
        if self.consent_timeout == 0 {
            bail!(
                "[webrtc] consent_timeout = 0 would drop every session at once; give seconds ≥ 1"
            );
        }
        if let Some(old) = &self.cascade {
            bail!(
                "[webrtc.cascade] moved into [cluster], with the node API on its own listener \
                 (no longer on [webrtc] http) and signed requests; every node of the cascade \
                 needs the new version and these lines instead:\n{}",
                cascade_moved(old)
            );
        }
        if self.token.as_deref() == Some("") {
            bail!(
                "[webrtc] token = \"\" cannot be sent as a bearer token; remove it or set a secret"
            );
        }
        Ok(())
    }

    pub fn candidates(&self) -> Result<Vec<SocketAddr>> {
        if self.candidates.is_empty() {
            if self.media.ip().is_unspecified() {
                bail!(
                    "[webrtc] media = {} listens on every address, so the answer needs to know which to announce: set candidates = [\"<public IP>\"]",
                    self.media
                );
            }
            return Ok(vec![self.media]);
        }
        Ok(self
            .candidates
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.media.port()))
            .collect())
    }
}
